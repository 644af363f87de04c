"""The register stage against a real MLflow store, on untrained tiny bundles (no training: fast): it publishes exactly
the candidate evaluate selected, idempotently, with lean tags and the model card as description; the pyfunc's
inputs; promotion on the same evaluated data only."""
from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from effnet import models, tracking
from effnet.data.manifest import read_manifest
from effnet.errors import EffnetError
from effnet.stages import register, shard


def metrics(top1: float, model: str = "fixres", resolution: int = 40, test: bool = False) -> dict:
    """evaluate's metrics JSON, with MODEL at RESOLUTION selected at TOP1 (on test too, 1 point lower, with TEST)."""
    m = {f"res{s}": {"top1": top1 - 5, "top5": 90.0} for s in (32, 40)}
    selected = {"model": model, "resolution": resolution, "val_top1": top1, "val_top5": min(100.0, top1 + 20)}
    if test:
        selected |= {"test_top1": top1 - 1, "test_top5": min(100.0, top1 + 19)}
    return {"trained": m, "fixres": m, "selected": selected}


CANDIDATES = [{"resolution": 32, "trained": 40.0, "fixres": 41.0}, {"resolution": 40, "trained": 38.0, "fixres": 50.0}]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_params, shards_dir):
    """A workspace with an embedded store, a FixRes-sized bundle, its metrics, and one registration done."""
    ws = tmp_path_factory.mktemp("registry")
    mp = pytest.MonkeyPatch()
    mp.chdir(ws)
    mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # restored to unset afterwards, whatever MLflow exported
    mp.setenv(tracking.PIPELINE_RUN_ENV, "flow-run-1")
    variant = tiny_params.variant("tiny")
    classes = read_manifest(shards_dir)["classes"]
    model = models.build(variant, len(classes))
    spec = models.ModelSpec(variant="tiny", phi=variant.phi, classes=classes,
                            preprocessing=models.preprocessing(model, variant, 40))
    models.save_bundle(model, spec, ws / "fixres")
    models.save_bundle(models.build(variant, len(classes)),
                       spec.model_copy(update={"preprocessing": spec.preprocessing.at(32)}), ws / "trained")
    bundles = {"trained": ws / "trained", "fixres": ws / "fixres"}
    (ws / "m.json").write_text(json.dumps(metrics(50.0)))
    (ws / "plot.json").write_text(json.dumps(CANDIDATES))

    def publish(metrics_file, out, params=tiny_params, shards=shards_dir):
        return register.run(params, "tiny", ws / metrics_file, bundles, ws / out, shards=shards, plot=ws / "plot.json")

    first = publish("m.json", "rec.json")
    client = mlflow.MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    yield dict(ws=ws, first=first, client=client, spec=spec, shards=shards_dir, mp=mp, publish=publish)
    mp.undo()


def test_registering_the_same_run_twice_creates_no_second_version(store, tiny_params):
    ws, client = store["ws"], store["client"]
    again = store["publish"]("m.json", "rec2.json")
    assert again.version == store["first"].version and again.already_registered is True
    assert again.run_id == store["first"].run_id
    assert len(client.search_model_versions("name = 'tiny'")) == 1
    runs = mlflow.search_runs(experiment_names=["effnet"], filter_string="tags.stage = 'register'")
    assert len(runs) == 1


def test_version_tags_are_the_figures_users_compare_and_the_card_is_the_description(store):
    mv = store["client"].get_model_version("tiny", store["first"].version)
    manifest = read_manifest(store["shards"])
    assert mv.tags == {
        "variant": "tiny", "model": "tf_efficientnet_phi-6", "measured_top1": "50.0", "measured_top5": "70.0",
        "measured_on": "val", "img_size": "40", "selected_model": "fixres",
        "data_fingerprint": manifest["fingerprint"], "eval_fingerprint": mv.tags["eval_fingerprint"]}
    assert len(mv.tags["eval_fingerprint"]) == 64
    card = mv.description
    assert card.startswith("# ") and "selected on val and measured on val" in card and "## Preprocessing" in card
    assert "| 40 | 38.0 | **50.0** |" in card  # the candidate table, the published one in bold
    assert "| recipe.lr | 0.256 |" in card and "effnet.pipeline_run: `flow-run-1`" in card
    run = mlflow.get_run(store["first"].run_id)
    assert run.data.tags["effnet.pipeline_run"] == "flow-run-1" and run.data.tags["effnet.params_hash"]
    assert run.data.params["selected_model"] == "fixres" and run.data.params["img_size"] == "40"
    assert json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/promotion.json"))["promoted"] is True


def test_the_published_model_is_the_selected_one_at_the_selected_resolution(store, tiny_params, demo_dir,
                                                                           tmp_path):
    """evaluate selected the trained model at 48 px and measured it on a test split: the version holds the trained
    weights with 48 px preprocessing, predicts exactly as that bundle does at 48 px, and shows the test figure."""
    ws = store["ws"]
    with_test = tmp_path / "with-test"
    shutil.copytree(demo_dir, with_test)
    shutil.copytree(demo_dir / "val", with_test / "test", ignore=lambda d, names: sorted(names)[:1])  # not val's
    shard.run(tiny_params.shard, with_test, tmp_path / "shards")
    (ws / "trained48.json").write_text(json.dumps(metrics(60.0, model="trained", resolution=48, test=True)))
    with pytest.raises(EffnetError, match="no test split"):  # measured on test: the shards must have one
        store["publish"]("trained48.json", "rec48.json")
    record = store["publish"]("trained48.json", "rec48.json", shards=tmp_path / "shards")
    mv = store["client"].get_model_version("tiny", record.version)
    assert (mv.tags["selected_model"], mv.tags["img_size"], mv.tags["measured_on"]) == ("trained", "48", "test")
    assert mv.tags["measured_top1"] == "59.0" and "selected on val, measured on test" in mv.description
    assert record.promoted is False and record.same_data is False  # the champion was measured on other data
    model = mlflow.pyfunc.load_model(record.model_uri)
    assert model.metadata.metadata["preprocessing"]["img_size"] == 48
    paths = [str(p) for p in sorted((demo_dir / "val").rglob("*.jpg"))[:4]]
    served = model.predict(np.array(paths, dtype=object)).to_numpy()
    weights, spec = models.load_bundle(ws / "trained")
    from effnet.data import transforms
    tf = transforms.eval_transform(spec.preprocessing.at(48))
    import torch
    with torch.inference_mode():
        direct = weights(torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])).softmax(1).numpy()
    np.testing.assert_allclose(served, direct, atol=1e-5)


def test_a_selected_model_not_given_is_one_line_naming_it(store, tiny_params):
    ws = store["ws"]
    (ws / "other.json").write_text(json.dumps(metrics(60.0, model="fixres2")))
    with pytest.raises(EffnetError, match="selected 'fixres2'"):
        store["publish"]("other.json", "nope.json")
    assert not (ws / "nope.json").exists()


def test_pyfunc_takes_arrays_paths_and_encoded_images_and_returns_named_probabilities(store, demo_dir):
    model = mlflow.pyfunc.load_model("models:/tiny@champion")
    paths = [str(p) for p in sorted((demo_dir / "val").rglob("*.jpg"))[:3]]
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    from_array = model.predict(images)
    assert isinstance(from_array, pd.DataFrame) and list(from_array.columns) == store["spec"].classes
    np.testing.assert_allclose(from_array.sum(axis=1), 1.0, atol=1e-5)
    encoded = [base64.b64encode(open(p, "rb").read()).decode() for p in paths]
    for same in [paths, np.array(paths, dtype=object), encoded, pd.DataFrame({"image": encoded}),
                 pd.DataFrame({"path": paths}), [open(p, "rb").read() for p in paths], list(images)]:
        np.testing.assert_allclose(model.predict(same).to_numpy(), from_array.to_numpy(), atol=1e-6)
    ragged = model.predict(np.array([images[0], images[1][:30, :20], None], dtype=object)[:2])
    assert ragged.shape == (2, len(store["spec"].classes))
    assert model.metadata.get_input_schema() is None  # the model checks its input (MLflow's schemas cannot)
    with pytest.raises(mlflow.exceptions.MlflowException, match="item 1: not an image"):
        model.predict([encoded[0], base64.b64encode(b"not an image").decode()])


def test_promotion_compares_only_on_the_same_evaluated_data(store, tiny_params, demo_dir, tmp_path):
    ws, client = store["ws"], store["client"]
    champion = store["first"].version
    # Better top-1, but measured on other val data (one val image fewer): not comparable, stays challenger.
    other_data = tmp_path / "other"
    shutil.copytree(demo_dir, other_data)
    next((other_data / "val").rglob("*.jpg")).unlink()
    shard.run(tiny_params.shard, other_data, tmp_path / "other-shards")
    (ws / "better.json").write_text(json.dumps(metrics(90.0)))
    other = store["publish"]("better.json", "r3.json", shards=tmp_path / "other-shards")
    assert other.promoted is False and other.same_data is False and "other data" in other.reason
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == champion
    assert str(client.get_model_version_by_alias("tiny", "challenger").version) == other.version
    # Same val data: within the margin it stays challenger, beyond it becomes champion.
    strict = tiny_params.registry.model_copy(update={"margin": 50.0})
    params = tiny_params.model_copy(update={"registry": strict})
    kept = store["publish"]("better.json", "r4.json", params=params)
    assert kept.promoted is False and kept.same_data is True and kept.champion_top1 == 50.0
    won = store["publish"]("better.json", "r4.json")
    assert won.version == kept.version and won.already_registered is True  # same inputs: same version
    (ws / "best.json").write_text(json.dumps(metrics(95.0)))
    best = store["publish"]("best.json", "r5.json")
    assert best.promoted is True and best.previous_champion == champion
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == best.version
    run = mlflow.get_run(best.run_id)
    assert run.data.metrics["promoted"] == 1.0 and run.data.metrics["champion_top1"] == 50.0


def test_a_version_is_models_from_code_and_loads_in_a_fresh_process(store, demo_dir):
    """The version holds the model's code (pyfunc_model.py), not a pickled object (MLflow's warning about pickles is
    gone), and a fresh interpreter that has only the store loads it and predicts what this process does."""
    import subprocess
    import sys

    from effnet import pyfunc
    uri = store["first"].model_uri
    local = Path(mlflow.artifacts.download_artifacts(uri))
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert Path(flavor["model_code_path"]).name == pyfunc.MODEL_CODE.name and "python_model" not in flavor
    assert not list(local.rglob("*.pkl")) and (local / "code/effnet/pyfunc_model.py").is_file()
    paths = [str(p) for p in sorted((demo_dir / "val").rglob("*.jpg"))[:3]]
    here = mlflow.pyfunc.load_model(uri).predict(paths).to_numpy()
    code = ("import json, sys, mlflow; m = mlflow.pyfunc.load_model(sys.argv[1]); "
            "print(json.dumps(m.predict(sys.argv[2:]).to_numpy().tolist()))")
    store_uri = f"sqlite:///{store['ws'] / 'mlflow.db'}"
    fresh = subprocess.run([sys.executable, "-c", code, uri, *paths], capture_output=True, text=True, timeout=300,
                           cwd=store["ws"], env=os.environ | {"MLFLOW_TRACKING_URI": store_uri})
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    np.testing.assert_allclose(np.array(json.loads(fresh.stdout.splitlines()[-1])), here, atol=1e-6)
