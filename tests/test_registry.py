"""The register stage against a real MLflow store, on an untrained tiny bundle (no training: fast):
idempotence, the model card as tags and description, the pyfunc's inputs, promotion on the same val data only."""
from __future__ import annotations

import base64
import json
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from effnet import models, tracking
from effnet.data.manifest import read_manifest
from effnet.stages import register, shard


def metrics(top1: float, train: int = 32, fixres: int = 40) -> dict:
    m = {f"res{s}": {"top1": top1, "top5": min(100.0, top1 + 20)} for s in (train, fixres)}
    return {"trained": m, "fixres": m}


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
    models.save_bundle(model, spec, ws / "bundle")
    (ws / "m.json").write_text(json.dumps(metrics(50.0)))
    first = register.run(tiny_params, "tiny", ws / "bundle", ws / "m.json", ws / "rec.json", shards=shards_dir)
    client = mlflow.MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    yield dict(ws=ws, first=first, client=client, spec=spec, shards=shards_dir, mp=mp)
    mp.undo()


def test_registering_the_same_run_twice_creates_no_second_version(store, tiny_params):
    ws, client = store["ws"], store["client"]
    again = register.run(tiny_params, "tiny", ws / "bundle", ws / "m.json", ws / "rec2.json", shards=store["shards"])
    assert again.version == store["first"].version and again.already_registered is True
    assert again.run_id == store["first"].run_id
    assert len(client.search_model_versions("name = 'tiny'")) == 1
    runs = mlflow.search_runs(experiment_names=["effnet"], filter_string="tags.stage = 'register'")
    assert len(runs) == 1


def test_version_carries_the_card_and_the_measured_figures(store):
    mv = store["client"].get_model_version("tiny", store["first"].version)
    t = mv.tags
    assert t["variant"] == "tiny" and t["measured_top1"] == "50.0" and t["measured_top5"] == "70.0"
    assert t["img_size"] == t["fixres_img_size"] == "40" and t["train_img_size"] == "32"
    assert t["crop_pct"] == "0.875" and t["recipe.lr"] == "0.256" and int(t["params"]) > 0 and float(t["gmacs"]) > 0
    manifest = read_manifest(store["shards"])
    assert t["data_fingerprint"] == manifest["fingerprint"] and len(t["val_fingerprint"]) == 64
    assert t["effnet.pipeline_run"] == "flow-run-1"
    assert mv.description.startswith("# ") and "| top-1 (%) |" in mv.description and "## Preprocessing" in mv.description
    decision = json.loads(t["promotion"])
    assert decision["promoted"] is True and decision["reason"] == "no champion yet"
    run = mlflow.get_run(store["first"].run_id)
    assert run.data.tags["effnet.pipeline_run"] == "flow-run-1" and run.data.tags["effnet.params_hash"]
    assert json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/promotion.json"))["promoted"] is True


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


def test_promotion_compares_only_on_the_same_val_data(store, tiny_params, demo_dir, tmp_path):
    ws, client = store["ws"], store["client"]
    champion = store["first"].version
    # Better top-1, but measured on other val data (one val image fewer): not comparable, stays challenger.
    other_data = tmp_path / "other"
    shutil.copytree(demo_dir, other_data)
    next((other_data / "val").rglob("*.jpg")).unlink()
    shard.run(tiny_params.shard, other_data, tmp_path / "other-shards")
    (ws / "better.json").write_text(json.dumps(metrics(90.0)))
    other = register.run(tiny_params, "tiny", ws / "bundle", ws / "better.json", ws / "r3.json",
                         shards=tmp_path / "other-shards")
    assert other.promoted is False and other.same_val_data is False and "other val data" in other.reason
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == champion
    assert str(client.get_model_version_by_alias("tiny", "challenger").version) == other.version
    # Same val data: within the margin it stays challenger, beyond it becomes champion.
    strict = tiny_params.registry.model_copy(update={"margin": 50.0})
    params = tiny_params.model_copy(update={"registry": strict})
    kept = register.run(params, "tiny", ws / "bundle", ws / "better.json", ws / "r4.json", shards=store["shards"])
    assert kept.promoted is False and kept.same_val_data is True and kept.champion_top1 == 50.0
    won = register.run(tiny_params, "tiny", ws / "bundle", ws / "better.json", ws / "r4.json", shards=store["shards"])
    assert won.version == kept.version and won.already_registered is True  # same inputs: same version
    (ws / "best.json").write_text(json.dumps(metrics(95.0)))
    best = register.run(tiny_params, "tiny", ws / "bundle", ws / "best.json", ws / "r5.json", shards=store["shards"])
    assert best.promoted is True and best.previous_champion == champion
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == best.version
    run = mlflow.get_run(best.run_id)
    assert run.data.metrics["promoted"] == 1.0 and run.data.metrics["champion_top1"] == 50.0
