"""The `register` stage: log the final (FixRes) model to MLflow as a pyfunc (`effnet.pyfunc`) and register it in
the Model Registry, one registered model per variant. Each version carries the model card as its description
(markdown), and as tags the card's figures, the measured accuracy, the train and FixRes resolutions and the data
fingerprints.

Idempotent: a version is tagged with `registration_key`, a hash of the bundle's bytes, the metrics and the val
data; registering the same inputs again finds that version and creates nothing (no run, no version, no alias move).

Aliases: each new version becomes the challenger; it takes the champion alias only when its top-1 beats the
current champion's, measured on the same val data (same `val_fingerprint`), by at least `registry.margin` points
(or there is no champion yet). The decision and its figures go to the run (`promotion.json`, metrics) and to the
version's tags.
"""
from __future__ import annotations

import hashlib
import json
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
    same_val_data: bool | None = None
    previous_champion: str | None = None


@dataclass
class Version:
    """What a new version would be: its spec, tags, description, and the key that makes registering idempotent."""

    spec: models.ModelSpec
    top1: float
    top5: float
    tags: dict[str, str]
    description: str
    key: str


def run(params: Params, variant_key: str, bundle: Path, metrics_file: Path, out: Path,
        shards: str | Path | None = None, trained: Path | None = None) -> Registration:
    """Register BUNDLE (the FixRes model) with its METRICS as a version of model `variant_key`; write OUT.

    SHARDS (optional) gives the data fingerprints the promotion compares on; TRAINED (optional) the exact train
    resolution (else read from the metrics table)."""
    experiment_id = tracking.experiment(params.mlflow.experiment)
    run_tags = tracking.run_tags(variant_key, params, "register", experiment_id=experiment_id)
    new = describe(variant_key, bundle, metrics_file, shards, trained, run_tags)
    registration = (registered(variant_key, new.key)
                    or publish(params, variant_key, bundle, new, experiment_id, run_tags))
    io.write_json(out, registration.model_dump())
    return registration


def describe(variant_key: str, bundle: Path, metrics_file: Path, shards: str | Path | None, trained: Path | None,
             run_tags: dict[str, str]) -> Version:
    """The version's tags (the card's figures, the measured ones, resolutions, fingerprints) and model card."""
    _, spec = models.load_bundle(bundle)
    variant = spec.resolve()
    metrics = json.loads(Path(metrics_file).read_text())
    final = metrics["fixres"][f"res{spec.img_size}"]
    fingerprints = data_fingerprints(shards)
    key = io.sha256_json({"bundle": io.sha256_tree(bundle), "metrics": metrics,
                          "val": fingerprints.get("val_fingerprint")})
    size = models.measure(variant, num_classes=len(spec.classes), img_size=spec.img_size)
    card = variant.card_tags()
    train_size = train_resolution(metrics, spec.img_size, trained)
    tags = card | {
        "variant": variant_key,
        "card_top1": card.get("top1", ""), "card_top5": card.get("top5", ""),
        "measured_top1": str(final["top1"]), "measured_top5": str(final["top5"]),
        "img_size": str(spec.img_size), "fixres_img_size": str(spec.img_size),
        "train_img_size": str(train_size) if train_size else "",
        "crop_pct": str(spec.preprocessing.crop_pct), "interpolation": spec.preprocessing.interpolation,
        "params": str(size["params"]), "gmacs": f"{size['gmacs']:.4g}",
        "classes": str(len(spec.classes)),
        "registration_key": key,
        **fingerprints,
        **{k: v for k, v in run_tags.items() if k in ("effnet.pipeline_run", "effnet.git_commit", "effnet.data_hash")},
    }
    tags = {k: v for k, v in tags.items() if v != ""}
    return Version(spec, final["top1"], final["top5"], tags, model_card(variant_key, tags, card, spec), key)


def registered(name: str, key: str) -> Registration | None:
    """The version already registered from the same bundle, metrics and data, if any."""
    try:
        existing = mlflow.MlflowClient().search_model_versions(f"name = '{name}' and tags.registration_key = '{key}'")
    except MlflowException:
        return None
    if not existing:
        return None
    mv = min(existing, key=lambda v: int(v.version))
    decision = json.loads(mv.tags.get("promotion", "{}"))
    return Registration(name=name, version=str(mv.version), run_id=mv.run_id, model_uri=f"models:/{name}/{mv.version}",
                        already_registered=True, **decision)


def publish(params: Params, variant_key: str, bundle: Path, new: Version, experiment_id: str,
            run_tags: dict[str, str]) -> Registration:
    """Log the pyfunc in a `register@<variant>` run, register it, tag and describe the version, decide promotion."""
    client = mlflow.MlflowClient()
    spec = new.spec
    example = np.random.default_rng(0).integers(0, 256, (2, spec.img_size, spec.img_size, 3), dtype=np.uint8)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"register@{variant_key}",
                          tags=run_tags | {"stage": "register", "variant": variant_key}) as r, \
            onnx_export.exported(bundle, params.export) as onnx_file:  # parity-checked, or no version at all
        mlflow.log_params({"registry." + k: v for k, v in params.registry.model_dump().items()})
        mlflow.log_metrics({"top1": new.top1, "top5": new.top5})
        info = mlflow.pyfunc.log_model(
            name="model", python_model=pyfunc.EffnetPyfunc(),
            artifacts={"bundle": str(bundle), "onnx": str(onnx_file)},
            code_paths=[str(Path(effnet.__file__).parent)], signature=pyfunc.signature(spec.classes),
            input_example=example, registered_model_name=variant_key,
            metadata={"classes": spec.classes, "preprocessing": spec.preprocessing.model_dump()},
            pip_requirements=[f"{p}=={version(p)}" for p in pyfunc.SERVING_REQUIREMENTS])
        mv = str(info.registered_model_version)
        for k, v in new.tags.items():
            client.set_model_version_tag(variant_key, mv, k, v)
        client.update_model_version(variant_key, mv, description=new.description)
        if not client.get_registered_model(variant_key).description:
            client.update_registered_model(variant_key, description=f"{spec.resolve().name}: TF-EfficientNet from "
                                           "the effnet pipeline; each version's description is its model card.")
        decision = promote(client, variant_key, mv, new.top1, new.tags.get("val_fingerprint"), params.registry)
        client.set_model_version_tag(variant_key, mv, "promotion", json.dumps(decision))
        mlflow.log_dict(decision | {"version": mv}, "promotion.json")
        mlflow.log_metrics({"promoted": float(decision["promoted"]),
                            **({"champion_top1": decision["champion_top1"]}
                               if decision["champion_top1"] is not None else {})})
        mlflow.set_tag("effnet.promotion", "champion" if decision["promoted"] else params.registry.challenger_alias)
    return Registration(name=variant_key, version=mv, run_id=r.info.run_id, model_uri=info.model_uri,
                        already_registered=False, **decision)


def data_fingerprints(shards: str | Path | None) -> dict[str, str]:
    """`data_fingerprint`: the shard manifest's (every source image's bytes and label); `val_fingerprint`: sha256
    of the val shards' bytes and the class list (shards are byte-identical for the same inputs and options)."""
    if shards is None:
        return {}
    manifest = read_manifest(shards)
    h = hashlib.sha256(json.dumps(manifest["classes"]).encode())
    for url in shard_urls(shards, "val"):
        with open_url(url) as f:
            io.sha256_stream(f, h)
    return {"data_fingerprint": manifest["fingerprint"], "val_fingerprint": h.hexdigest()}


def train_resolution(metrics: dict, fixres_size: int, trained: Path | None) -> int | None:
    """From the trained bundle when given; else the evaluate table's other resolution (it evaluates the trained
    and the FixRes model at both models' resolutions)."""
    if trained is not None:
        return models.load_bundle(trained)[1].img_size
    sizes = {int(k.removeprefix("res")) for k in metrics.get("trained", {})}
    others = sizes - {fixres_size}
    if len(others) == 1:
        return others.pop()
    return fixres_size if sizes == {fixres_size} else None


def model_card(name: str, tags: dict[str, str], card: dict[str, str], spec: models.ModelSpec) -> str:
    """The version's description: markdown, what a user of the registry page needs."""
    def row(label, key_card, key_measured):
        return f"| {label} | {card.get(key_card, '–')} | {tags.get(key_measured, '–')} |"
    pre = spec.preprocessing
    lines = [
        f"# {card.get('name', name)} (`{name}`)",
        "",
        "TF-EfficientNet trained by the effnet pipeline (timm + pytorch-lightning), FixRes fine-tuned at "
        f"{tags['img_size']} px.",
        "",
        "| | model card | this version |",
        "|---|---|---|",
        row("top-1 (%)", "top1", "measured_top1"),
        row("top-5 (%)", "top5", "measured_top5"),
        row("resolution (px)", "img_size", "img_size"),
        f"| train / FixRes resolution (px) | – | {tags.get('train_img_size', '?')} / {tags['fixres_img_size']} |",
        f"| parameters | {card.get('params_m', '–')} M | {tags['params']} |",
        f"| FLOPs | {card.get('flops_g', '–')} G | {tags['gmacs']} GMACs |",
        "",
        f"Measured on the val split of data `{tags.get('val_fingerprint', 'unknown')[:16]}` "
        f"({len(spec.classes)} classes: {', '.join(spec.classes[:20])}{' ...' if len(spec.classes) > 20 else ''}).",
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
        "## Model card",
        "| field | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in card.items()),
    ]
    return "\n".join(lines) + "\n"


def promote(client: mlflow.MlflowClient, name: str, version_: str, top1: float, val_fingerprint: str | None,
            cfg: RegistryConfig) -> dict:
    """Challenger always; champion when it beats the current champion on the same val data by the margin."""
    client.set_registered_model_alias(name, cfg.challenger_alias, version_)
    try:
        champion = client.get_model_version_by_alias(name, cfg.alias)
    except MlflowException:
        champion = None
    champion_top1 = float(champion.tags["measured_top1"]) if champion and "measured_top1" in champion.tags else None
    same_data = champion is not None and champion.tags.get("val_fingerprint") == val_fingerprint
    if champion is None:
        promoted, reason = True, "no champion yet"
    elif not same_data:
        promoted = cfg.promote_on_new_data
        reason = ("champion measured on other val data: not comparable, "
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
            "margin": cfg.margin, "same_val_data": same_data if champion else None,
            "previous_champion": str(champion.version) if champion else None}
