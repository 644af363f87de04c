"""The `register` stage: publish the candidate `evaluate` selected (a model bundle at a resolution) to MLflow as a
pyfunc (`effnet.pyfunc`) and register it in the Model Registry, one registered model per variant.

The published model is exactly the selected one: its weights, with the preprocessing at the selected resolution
(the signature example and the pyfunc follow it). A version's tags are what users filter and compare on: the
measured top-1/top-5 (on test when the data has a test split, else on val, where it was also selected), the split
they were measured on, the resolution, the variant, the selected model and the data fingerprints. Everything else
(the card's figures and recipe, the candidate table, preprocessing, provenance) is the version's description, its
model card, and the run's params.

Idempotent: the register run is tagged with `effnet.registration_key`, a hash of the published bundle, the metrics
and the evaluated data; registering the same inputs again finds that version and creates nothing.

Aliases: each new version becomes the challenger; it takes the champion alias only when its measured top-1 beats
the current champion's, measured on the same data (same `eval_fingerprint`), by at least `registry.margin` points
(or there is no champion yet). The decision goes to the run (`promotion.json`, tags, metrics).
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from pydantic import BaseModel

import effnet
from effnet import io, models, onnx_export, pyfunc, tracking
from effnet.config import Params, RegistryConfig
from effnet.data.manifest import open_url, read_manifest, shard_urls
from effnet.errors import EffnetError

KEY_TAG = "effnet.registration_key"
DECISION_TAG = "effnet.promotion_decision"


class Registration(BaseModel):
    """The registered version and the promotion decision (also written as the stage's JSON output)."""

    name: str
    version: str
    run_id: str
    model_uri: str
    already_registered: bool
    promoted: bool | None = None
    reason: str | None = None
    top1: float | None = None
    champion_top1: float | None = None
    margin: float | None = None
    same_data: bool | None = None
    previous_champion: str | None = None


@dataclass
class Version:
    """What a new version would be: the model to publish, its tags and model card, and the key that makes
    registering it idempotent."""

    model: object  # nn.Module
    spec: models.ModelSpec  # at the published resolution
    top1: float
    tags: dict[str, str]
    description: str
    key: str


def run(params: Params, variant_key: str, metrics_file: Path, bundles: dict[str, Path], out: Path,
        shards: str | Path | None = None, plot: Path | None = None) -> Registration:
    """Register the candidate METRICS_FILE selected (one of BUNDLES, label -> folder, at its resolution) as a
    version of model `variant_key`; write OUT.

    SHARDS (optional) gives the data fingerprints the promotion compares on; PLOT (optional, evaluate's sweep rows)
    the candidate table of the model card."""
    tracking.check()  # a store that is down stops the stage here, in seconds, before the ONNX export
    experiment_id = tracking.experiment(params.mlflow.experiment)
    run_tags = tracking.run_tags(variant_key, params, "register", experiment_id=experiment_id)
    new = describe(variant_key, json.loads(Path(metrics_file).read_text()), bundles, shards,
                   json.loads(Path(plot).read_text()) if plot else None, run_tags)
    registration = (registered(params, variant_key, new, experiment_id)
                    or publish(params, variant_key, new, experiment_id, run_tags))
    io.write_json(out, registration.model_dump())
    return registration


def describe(variant_key: str, metrics: dict, bundles: dict[str, Path], shards: str | Path | None,
             candidates: list[dict] | None, run_tags: dict[str, str]) -> Version:
    """The selected model at its resolution, its tags and its model card."""
    selected = metrics["selected"]
    if selected["model"] not in bundles:
        raise EffnetError(f"evaluate selected '{selected['model']}', which is not among the bundles given "
                          f"({', '.join(bundles)})")
    own = {label: models.load_bundle(path) for label, path in bundles.items()}
    model, spec = own[selected["model"]]
    spec = spec.model_copy(update={"preprocessing": spec.preprocessing.at(selected["resolution"])})
    split = "test" if "test_top1" in selected else "val"
    fingerprints = data_fingerprints(shards, split)
    tags = {
        "variant": variant_key,
        "model": spec.resolve().name,
        "measured_top1": str(selected[f"{split}_top1"]), "measured_top5": str(selected[f"{split}_top5"]),
        "measured_on": split,
        "img_size": str(spec.img_size),
        "selected_model": selected["model"],
        **fingerprints,
    }
    student = provenance(bundles)
    tags |= student_tags(student)
    key = io.sha256_json({"weights": io.sha256_file(bundles[selected["model"]] / "model.safetensors"),
                          "spec": spec.model_dump(), "metrics": metrics, "data": fingerprints})
    card = model_card(variant_key, spec, selected, split, {label: s.img_size for label, (_, s) in own.items()},
                      candidates, fingerprints, run_tags, student)
    return Version(model, spec, float(selected[f"{split}_top1"]), tags, card, key)


def registered(params: Params, name: str, new: Version, experiment_id: str) -> Registration | None:
    """The version already registered from the same model, metrics and data, if any; one whose registration was cut
    short (the stage killed after the version was made, before its promotion was decided) is completed first."""
    client = mlflow.MlflowClient()
    runs = client.search_runs([experiment_id], f"tags.`{KEY_TAG}` = '{new.key}'",
                              order_by=["attributes.start_time ASC"])
    for r in runs:
        try:
            versions = client.search_model_versions(f"name = '{name}' and run_id = '{r.info.run_id}'")
        except MlflowException:
            versions = []
        if versions:
            mv = str(min(versions, key=lambda v: int(v.version)).version)
            decision = (json.loads(r.data.tags[DECISION_TAG]) if DECISION_TAG in r.data.tags
                        else complete(client, params, name, mv, new, r.info.run_id))
            return Registration(name=name, version=mv, run_id=r.info.run_id,
                                model_uri=f"models:/{name}/{mv}", already_registered=True, **decision)
    return None


def publish(params: Params, variant_key: str, new: Version, experiment_id: str, run_tags: dict[str, str]
            ) -> Registration:
    """Log the pyfunc in a `register@<variant>` run, register it, tag and describe the version, decide promotion."""
    client = mlflow.MlflowClient()
    spec = new.spec
    example = np.random.default_rng(0).integers(0, 256, (2, spec.img_size, spec.img_size, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(
            experiment_id=experiment_id, run_name=f"register@{variant_key}",
            tags=run_tags | {"stage": "register", "variant": variant_key, KEY_TAG: new.key}) as r:
        bundle = Path(tmp) / "bundle"
        models.save_bundle(new.model, spec, bundle)  # the selected weights at the selected resolution
        mlflow.log_params({"registry." + k: v for k, v in params.registry.model_dump().items()})
        mlflow.log_params({k: new.tags[k] for k in ("selected_model", "img_size", "measured_on")})
        mlflow.log_metrics({"top1": new.top1, "top5": float(new.tags["measured_top5"])})
        with onnx_export.exported(bundle, params.export) as onnx_file:  # parity-checked, or no version at all
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(pyfunc.MODEL_CODE),  # models from code: no pickle to load
                artifacts={"bundle": str(bundle), "onnx": str(onnx_file)},
                code_paths=[str(Path(effnet.__file__).parent)], signature=pyfunc.signature(spec.classes),
                input_example=example, registered_model_name=variant_key,
                metadata={"classes": spec.classes, "preprocessing": spec.preprocessing.model_dump()},
                pip_requirements=[f"{p}=={version(p)}" for p in pyfunc.SERVING_REQUIREMENTS])
        mv = str(info.registered_model_version)
        decision = complete(client, params, variant_key, mv, new, r.info.run_id)
    return Registration(name=variant_key, version=mv, run_id=r.info.run_id, model_uri=info.model_uri,
                        already_registered=False, **decision)


def complete(client: mlflow.MlflowClient, params: Params, name: str, mv: str, new: Version, run_id: str) -> dict:
    """Version MV's tags and model card, the promotion decided, and the decision recorded in RUN_ID, last: a run
    without the decision tag is a registration cut short, which `registered` completes on the next run."""
    for k, v in new.tags.items():
        client.set_model_version_tag(name, mv, k, v)
    client.update_model_version(name, mv, description=new.description)
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=f"{new.spec.resolve().name}: TF-EfficientNet from "
                                       "the effnet pipeline; each version's description is its model card.")
    decision = promote(client, name, mv, new.top1, new.tags.get("eval_fingerprint"), params.registry)
    client.log_dict(run_id, decision | {"version": mv}, "promotion.json")
    for key, value in {"promoted": float(decision["promoted"]),
                       **({"champion_top1": decision["champion_top1"]}
                          if decision["champion_top1"] is not None else {})}.items():
        client.log_metric(run_id, key, value)
    client.set_tag(run_id, "effnet.promotion",
                   "champion" if decision["promoted"] else params.registry.challenger_alias)
    client.set_tag(run_id, DECISION_TAG, json.dumps(decision))
    return decision


STUDENT_RECORD = "noisy_student.json"  # in a Noisy Student's trained bundle (the train stage writes it)


def provenance(bundles: dict[str, Path]) -> dict | None:
    """A Noisy Student's record (teacher, iteration, pseudo-labels, noise), from the first bundle that has one."""
    for path in bundles.values():
        if (Path(path) / STUDENT_RECORD).is_file():
            return json.loads((Path(path) / STUDENT_RECORD).read_text())
    return None


def student_tags(student: dict | None) -> dict[str, str]:
    """A student version's tags: its teacher (variant, registered model and version), iteration, the unlabeled
    data's fingerprint and the pseudo-label settings; none for a plain variant."""
    if not student:
        return {}
    settings = student["settings"]
    return {"noisy_student.teacher": student["teacher"],
            "noisy_student.teacher_model": f"{student['teacher_model']}/{student['teacher_version']}",
            "noisy_student.iteration": str(student["iteration"]),
            "noisy_student.unlabeled_fingerprint": student["unlabeled_fingerprint"],
            "noisy_student.pseudo_labels": (f"{settings['labels']}, threshold {settings['threshold']:g}, "
                                            + (f"balanced to {settings['per_class_used']} per class"
                                               if settings["balance"] else "not balanced")),
            "noisy_student.ratio": f"{student['ratio']:g}"}


def data_fingerprints(shards: str | Path | None, split: str) -> dict[str, str]:
    """`data_fingerprint`: the shard manifest's (every source image's bytes and label); `eval_fingerprint`: sha256
    of the class list and the bytes of SPLIT's shards, the data the measured figure comes from (shards are
    byte-identical for the same inputs and options)."""
    if shards is None:
        return {}
    manifest = read_manifest(shards)
    if split not in manifest["splits"]:
        raise EffnetError(f"the metrics were measured on the {split} split, but the shards at {shards} have no "
                          f"{split} split")
    h = hashlib.sha256(json.dumps(manifest["classes"]).encode())
    for url in shard_urls(shards, split):
        with open_url(url) as f:
            io.sha256_stream(f, h)
    return {"data_fingerprint": manifest["fingerprint"], "eval_fingerprint": h.hexdigest()}


def model_card(name: str, spec: models.ModelSpec, selected: dict, split: str, own: dict[str, int],
               candidates: list[dict] | None, fingerprints: dict[str, str], run_tags: dict[str, str],
               student: dict | None = None) -> str:
    """The version's description: markdown, what a user of the registry page needs."""
    variant = spec.resolve()
    card = variant.card_tags()
    size = models.measure(variant, num_classes=len(spec.classes), img_size=spec.img_size)
    pre = spec.preprocessing
    figure = f"{selected[f'{split}_top1']} % top-1, {selected[f'{split}_top5']} % top-5 on the {split} split"
    honesty = ("selected on val, measured on test" if split == "test"
               else "selected on val and measured on val (no test split: an optimistic figure)")
    resolutions = ", ".join(f"{label} {px} px" for label, px in own.items())
    lines = [
        f"# {card.get('name', name)} (`{name}`)",
        "",
        f"**{figure}** ({honesty}). Published: the `{selected['model']}` model at **{spec.img_size} px**, the best "
        f"of {len(candidates or []) * len(own) or 'the'} candidates on val top-1 ({selected['val_top1']} %).",
        "",
        "| | model card | this version |",
        "|---|---|---|",
        f"| top-1 (%) | {card.get('top1', '–')} | {selected[f'{split}_top1']} ({split}) |",
        f"| top-5 (%) | {card.get('top5', '–')} | {selected[f'{split}_top5']} ({split}) |",
        f"| resolution (px) | {card.get('img_size', '–')} | {spec.img_size} |",
        f"| parameters | {card.get('params_m', '–')} M | {size['params']:,} |",
        f"| FLOPs | {card.get('flops_g', '–')} G | {size['gmacs']:.4g} GMACs |",
        "",
        f"Models evaluated (own resolution): {resolutions}. Data `{fingerprints.get('data_fingerprint', '?')[:16]}`, "
        f"{len(spec.classes)} classes: {', '.join(spec.classes[:20])}{' ...' if len(spec.classes) > 20 else ''}.",
    ]
    if candidates:
        labels = [k for k in candidates[0] if k != "resolution"]
        lines += ["", "## Candidates (val top-1, %)", "", "| resolution (px) | " + " | ".join(labels) + " |",
                  "|---|" + "---|" * len(labels)]
        for row in candidates:
            cells = [f"**{row[k]}**" if (k, row["resolution"]) == (selected["model"], selected["resolution"])
                     else str(row[k]) for k in labels]
            lines.append(f"| {row['resolution']} | " + " | ".join(cells) + " |")
    if student:
        noise = student["noise"]
        lines += ["", "## Noisy Student",
                  f"Iteration {student['iteration']} ({' <- '.join(student['chain'])}): taught by `{student['teacher']}`, "
                  f"registered model `{student['teacher_model']}` version {student['teacher_version']} "
                  f"(its {student['teacher_selected']['model']} model at {student['teacher_selected']['resolution']} px).",
                  f"Unlabeled data `{student['unlabeled_fingerprint'][:16]}`: {student['images']} images, {student['kept']} "
                  f"past the threshold, {student['samples']} pseudo-labeled samples a pass ({student['rows']} images"
                  " and their copies).",
                  f"Pseudo-labels: {student_tags(student)['noisy_student.pseudo_labels']}; {student['ratio']:g} "
                  f"pseudo-labeled per labeled image in each batch; noise: RandAugment `{noise['auto_augment']}`, "
                  f"dropout {noise['drop_rate']}, stochastic depth {noise['drop_path_rate']}."]
    lines += [
        "",
        "## Preprocessing",
        f"Resize the shorter side to img_size / crop_pct ({pre.img_size} / {pre.crop_pct}), "
        f"{pre.interpolation}; center crop {pre.img_size}; scale to [0, 1]; normalise with mean "
        f"{list(pre.mean)}, std {list(pre.std)}. The pyfunc does this itself.",
        "",
        "## Use",
        "```python",
        "import mlflow, numpy as np",
        f'model = mlflow.pyfunc.load_model("models:/{name}@champion")',
        "model.predict(images)                        # uint8 array (N, H, W, 3)",
        "model.predict([path_or_base64_or_bytes, ...]) # or pd.DataFrame({'image': [...]}): encoded images",
        "# -> DataFrame of class probabilities, one column per class",
        "```",
        f"Served: `make serve-model MODEL=models:/{name}@champion`, then POST `{{\"inputs\": [\"<base64 JPEG>\"]}}` "
        "to /invocations. ONNX: `artifacts/model.onnx` (parity-checked against PyTorch; classes and preprocessing "
        "in its metadata).",
        "",
        "## Provenance",
        *(f"- {k}: `{v}`" for k, v in {**fingerprints, **{t: run_tags[t] for t in (
            "effnet.pipeline_run", "effnet.git_commit", "effnet.data_hash") if t in run_tags}}.items()),
        "",
        "## Model card",
        "| field | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in card.items()),
    ]
    return "\n".join(lines) + "\n"


def promote(client: mlflow.MlflowClient, name: str, version_: str, top1: float, eval_fingerprint: str | None,
            cfg: RegistryConfig) -> dict:
    """Challenger always; champion when it beats the current champion, measured on the same data, by the margin."""
    client.set_registered_model_alias(name, cfg.challenger_alias, version_)
    try:
        champion = client.get_model_version_by_alias(name, cfg.alias)
    except MlflowException:
        champion = None
    champion_top1 = float(champion.tags["measured_top1"]) if champion and "measured_top1" in champion.tags else None
    same_data = champion is not None and champion.tags.get("eval_fingerprint") == eval_fingerprint
    if champion is None:
        promoted, reason = True, "no champion yet"
    elif not same_data:
        promoted = cfg.promote_on_new_data
        reason = ("champion measured on other data: not comparable, "
                  + ("promote_on_new_data is set" if promoted else "kept (registry.promote_on_new_data: false)"))
    elif champion_top1 is None:
        promoted, reason = True, "champion has no measured top-1"
    else:
        promoted = top1 > champion_top1 and top1 - champion_top1 >= cfg.margin
        reason = (f"top-1 {top1:.4g} vs champion {champion_top1:.4g}: "
                  + ("beats" if promoted else "does not beat") + f" it by the margin {cfg.margin:g}")
    if promoted:
        client.set_registered_model_alias(name, cfg.alias, version_)
    return {"promoted": promoted, "reason": reason, "top1": top1, "champion_top1": champion_top1,
            "margin": cfg.margin, "same_data": same_data if champion else None,
            "previous_champion": str(champion.version) if champion else None}
