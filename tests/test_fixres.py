"""The evaluate stage: the resolution sweep (before/after FixRes; metrics JSON unchanged, DVC plot data, MLflow PNG)
and the final model's per-class figures (confusion matrix, precision/recall) with the shard manifest."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import torch

from effnet import inference, models
from effnet.data.manifest import read_manifest
from effnet.stages import evaluate


def test_class_stats_confusion_precision_recall_and_dvc_rows():
    stats = inference.ClassStats(["a", "b", "c"])
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 1, 1, 1, 1])  # c is never predicted, b is predicted for one a and the c
    for metric in stats.metrics:
        metric.update(torch.nn.functional.one_hot(pred, 3).float(), y)
    assert stats.matrix() == [[2, 1, 0], [0, 2, 0], [0, 1, 0]]
    table = {r["class"]: r for r in stats.table()}
    assert table["a"] == {"class": "a", "precision": 100.0, "recall": round(200 / 3, 4), "support": 3, "predicted": 2}
    assert table["b"]["precision"] == 50.0 and table["b"]["recall"] == 100.0
    assert table["c"] == {"class": "c", "precision": 0.0, "recall": 0.0, "support": 1, "predicted": 0}
    rows = stats.rows()
    assert len(rows) == 6 and rows.count({"actual": "c", "predicted": "b"}) == 1
    assert rows.count({"actual": "a", "predicted": "a"}) == 2


def test_sweep_scales_the_smallest_resolution_and_keeps_every_model_own():
    assert evaluate.sweep_sizes({32, 40}, [0.75, 1.0, 1.5]) == [24, 32, 40, 48]


def test_evaluate_sweeps_both_models_and_writes_plot_and_png(tiny_params, shards_dir, workspace, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # the run is short: sample often
    torch.manual_seed(0)
    variant = tiny_params.variant("tiny")
    bundles = {}
    for label, size in (("trained", 32), ("fixres", 40)):  # untrained weights: the sweep's plumbing, not accuracy
        model = models.build(variant, num_classes=4)
        spec = models.ModelSpec(variant="tiny", phi=-6, classes=list("abcd"),
                                preprocessing=models.preprocessing(model, variant, size))
        models.save_bundle(model, spec, workspace / label)
        bundles[label] = workspace / label
    sweep = tiny_params.evaluate.model_copy(update={"sweep": [0.75, 1.5]})
    params = tiny_params.model_copy(update={"evaluate": sweep})
    result = evaluate.run(params, "tiny", shards_dir, bundles, workspace / "metrics.json")
    metrics = result.metrics
    assert json.loads((workspace / "metrics.json").read_text()) == metrics
    assert {label: set(m) for label, m in metrics.items()} == dict.fromkeys(bundles, {"res32", "res40"})
    rows = json.loads((workspace / "plots/tiny_resolution.json").read_text())
    assert [r["resolution"] for r in rows] == [24, 32, 40, 48]
    for row in rows:
        assert set(row) == {"resolution", *bundles} and all(0 <= row[k] <= 100 for k in bundles)
        if row["resolution"] in (32, 40):
            assert row["trained"] == metrics["trained"][f"res{row['resolution']}"]["top1"]
    client = mlflow.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    run = client.get_run(result.run_id)
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == [
        "confusion_fixres_res40.png", "manifest.json", "per_class_fixres_res40.csv", "per_class_fixres_res40.json",
        "tiny_resolution.png"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "sweep.fixres.top1")] == [24, 32, 40, 48]
    # The final (fixres) model at its resolution: DVC confusion rows, per-class table, manifest, system metrics.
    manifest = read_manifest(shards_dir)
    confusion = json.loads((workspace / "plots/confusion/tiny.json").read_text())
    assert len(confusion) == manifest["splits"]["val"]["total"]
    assert all(set(r) == {"actual", "predicted"} and {r["actual"], r["predicted"]} <= set("abcd") for r in confusion)
    correct = sum(r["actual"] == r["predicted"] for r in confusion)
    assert round(100 * correct / len(confusion), 4) == metrics["fixres"]["res40"]["top1"]
    local = Path(client.download_artifacts(run.info.run_id, "", str(workspace / "downloaded")))
    assert json.loads((local / "manifest.json").read_text()) == manifest
    table = json.loads((local / "per_class_fixres_res40.json").read_text())  # mlflow.log_table: pandas "split"
    assert [row[0] for row in table["data"]] == list("abcd")
    assert table["columns"] == ["class", "precision", "recall", "support", "predicted"]
    assert sum(row[3] for row in table["data"]) == len(confusion)
    assert (local / "confusion_fixres_res40.png").read_bytes()[:4] == b"\x89PNG"
    data = run.data
    assert {"fixres.res40.macro_precision", "fixres.res40.macro_recall"} <= set(data.metrics)
    assert data.params["evaluate.batch_size"] == str(tiny_params.evaluate.batch_size)
    assert any(k.startswith("system/") for k in data.metrics), "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING from tracking"


def test_exact_mean_batchnorm_matches_momentum_none_and_keeps_the_state_dict():
    """fixres.ExactMeanBatchNormAct2d (tensors only, so torch.compile traces it) = timm's BatchNormAct2d with
    momentum=None: the running statistics are the exact mean over the batches seen, outputs and gradients equal."""
    from timm.layers import BatchNormAct2d
    from effnet.stages.fixres import ExactMeanBatchNormAct2d
    torch.manual_seed(0)
    ref = BatchNormAct2d(6, momentum=None)
    ours = BatchNormAct2d(6, momentum=None)
    ours.load_state_dict(ref.state_dict())
    ours.__class__ = ExactMeanBatchNormAct2d
    for step in range(5):
        x = torch.randn(4, 6, 5, 5) * (step + 1) + step
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ref(xa), ours(xb)
        ya.square().sum().backward()
        yb.square().sum().backward()
        assert torch.allclose(ya, yb, atol=1e-5) and torch.allclose(xa.grad, xb.grad, atol=1e-4)
    for key, value in ref.state_dict().items():
        assert torch.allclose(value.float(), ours.state_dict()[key].float(), atol=1e-5), key
    assert int(ours.num_batches_tracked) == 5 and ours.running_mean.abs().sum() > 0
    ours.eval(), ref.eval()
    x = torch.randn(2, 6, 5, 5)
    assert torch.allclose(ours(x), ref(x), atol=1e-5)
