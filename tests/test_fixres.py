"""The evaluate stage: the resolution sweep (before/after FixRes; metrics JSON unchanged, DVC plot data, MLflow PNG)
and the final model's per-class figures (confusion matrix, precision/recall) with the shard manifest."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import logging

import mlflow
import pytest
import torch

from effnet import inference, models
from effnet.data import gpu, loaders
from effnet.data.manifest import in_holdout, read_manifest
from effnet.stages import evaluate, fixres, shard


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
    selected = metrics.pop("selected")
    assert {label: set(m) for label, m in metrics.items()} == dict.fromkeys(bundles, {"res32", "res40"})
    rows = json.loads((workspace / "plots/tiny_resolution.json").read_text())
    assert [r["resolution"] for r in rows] == [24, 32, 40, 48]
    for row in rows:
        assert set(row) == {"resolution", *bundles} and all(0 <= row[k] <= 100 for k in bundles)
        if row["resolution"] in (32, 40):
            assert row["trained"] == metrics["trained"][f"res{row['resolution']}"]["top1"]
    # The selected candidate: the best val top-1 of every (model, resolution); ties to the smaller resolution,
    # then to the model given first. No test split here: it is reported on val.
    best = max((row[label], -row["resolution"], -list(bundles).index(label), label, row["resolution"])
               for row in rows for label in bundles)
    assert (selected["model"], selected["resolution"], selected["val_top1"]) == (best[3], best[4], best[0])
    assert set(selected) == {"model", "resolution", "val_top1", "val_top5"}
    at = f"{selected['model']}_res{selected['resolution']}_val"
    client = mlflow.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    run = client.get_run(result.run_id)
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == sorted([
        f"confusion_{at}.png", "manifest.json", f"per_class_{at}.csv", f"per_class_{at}.json", "tiny_resolution.png"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "sweep.fixres.top1")] == [24, 32, 40, 48]
    assert run.data.params["selected.model"] == selected["model"] and run.data.params["reported_on"] == "val"
    # The selected candidate on the reported split: DVC confusion rows, per-class table, manifest, system metrics.
    manifest = read_manifest(shards_dir)
    confusion = json.loads((workspace / "plots/confusion/tiny.json").read_text())
    assert len(confusion) == manifest["splits"]["val"]["total"]
    assert all(set(r) == {"actual", "predicted"} and {r["actual"], r["predicted"]} <= set("abcd") for r in confusion)
    correct = sum(r["actual"] == r["predicted"] for r in confusion)
    assert round(100 * correct / len(confusion), 4) == selected["val_top1"]
    local = Path(client.download_artifacts(run.info.run_id, "", str(workspace / "downloaded")))
    assert json.loads((local / "manifest.json").read_text()) == manifest
    table = json.loads((local / f"per_class_{at}.json").read_text())  # mlflow.log_table: pandas "split"
    assert [row[0] for row in table["data"]] == list("abcd")
    assert table["columns"] == ["class", "precision", "recall", "support", "predicted"]
    assert sum(row[3] for row in table["data"]) == len(confusion)
    assert (local / f"confusion_{at}.png").read_bytes()[:4] == b"\x89PNG"
    data = run.data
    assert {"selected.val_macro_precision", "selected.val_macro_recall", "selected.val_top1"} <= set(data.metrics)
    assert data.params["evaluate.batch_size"] == str(tiny_params.evaluate.batch_size)
    assert any(k.startswith("system/") for k in data.metrics), "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING from env"


def test_selection_prefers_top1_then_the_smaller_resolution_then_the_first_model():
    sweep = {"trained": {32: {"top1": 50.0, "top5": 90.0}, 40: {"top1": 60.0, "top5": 91.0}},
             "fixres": {32: {"top1": 60.0, "top5": 92.0}, 40: {"top1": 55.0, "top5": 93.0}}}
    assert evaluate.select(sweep, ["trained", "fixres"]).model_dump() == {
        "model": "fixres", "resolution": 32, "top1": 60.0, "top5": 92.0}  # 60 at 32 beats 60 at 40
    sweep["trained"][32]["top1"] = 60.0
    assert evaluate.select(sweep, ["trained", "fixres"]).model == "trained"  # same top-1, same size: given first


def test_with_a_test_split_the_selected_candidate_is_reported_on_test(tiny_params, demo_dir, workspace,
                                                                      monkeypatch):
    """Test holds val's images: the same figures, measured on the other split; read once, test is held in memory
    too (no pass streams the shards), with the figures streaming gives."""
    streamed_passes = []
    eval_loader = inference.eval_loader
    monkeypatch.setattr(inference, "eval_loader", lambda *a, **kw: streamed_passes.append(a) or eval_loader(*a, **kw))
    src = workspace / "src"
    shutil.copytree(demo_dir, src)
    shutil.copytree(demo_dir / "val", src / "test")
    shard.run(tiny_params.shard, src, workspace / "shards")
    variant = tiny_params.variant("tiny")
    model = models.build(variant, num_classes=4)
    models.save_bundle(model, models.ModelSpec(variant="tiny", phi=-6, classes=sorted(p.name for p in (
        src / "train").iterdir()), preprocessing=models.preprocessing(model, variant, 32)), workspace / "trained")
    params = tiny_params.model_copy(update={"evaluate": tiny_params.evaluate.model_copy(update={"sweep": [1.0]})})
    streamed = params.model_copy(update={"data": params.data.model_copy(update={"hold_mb": 0})})
    selected = evaluate.run(streamed, "tiny", workspace / "shards", {"trained": workspace / "trained"},
                            workspace / "m.json").metrics["selected"]
    assert len(streamed_passes) == 2  # val, then test
    streamed_passes.clear()
    assert evaluate.run(params, "tiny", workspace / "shards", {"trained": workspace / "trained"},
                        workspace / "m.json").metrics["selected"] == selected
    assert not streamed_passes
    assert (selected["model"], selected["resolution"]) == ("trained", 32)
    assert (selected["test_top1"], selected["test_top5"]) == (selected["val_top1"], selected["val_top5"])
    confusion = json.loads((workspace / "plots/confusion/tiny.json").read_text())
    assert len(confusion) == read_manifest(workspace / "shards")["splits"]["test"]["total"]


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


# --- FixRes's resolution choice ----------------------------------------------------------------------------------

def _untrained_bundle(tiny_params, path, size=32):
    variant = tiny_params.variant("tiny")
    torch.manual_seed(0)
    model = models.build(variant, num_classes=4)
    spec = models.ModelSpec(variant="tiny", phi=-6, classes=list("abcd"),
                            preprocessing=models.preprocessing(model, variant, size))
    models.save_bundle(model, spec, path)
    return models.load_bundle(path)


def test_auto_resolution_and_scope_are_chosen_on_the_training_images_held_out_of_training(tiny_params, shards_dir,
                                                                                        workspace):
    params = tiny_params.model_copy(update={
        "data": tiny_params.data.model_copy(update={"holdout": 0.3}),
        "fixres": tiny_params.fixres.model_copy(update={"img_size": "auto", "min_holdout": 10,
                                                         "candidates": [1.0, 1.25, 1.5]})})
    _untrained_bundle(tiny_params, workspace / "trained")
    result = fixres.run(params, "tiny", shards_dir, workspace / "trained", workspace / "fixres")
    choice = result.choice
    assert choice.how == "auto" and {scope: set(by_size) for scope, by_size in choice.scores.items()} == {
        "last": {32, 40, 48}, "all": {32, 40, 48}}
    ranked = max((score, -size, -fixres.SCOPES.index(scope), size, scope)
                 for scope, by_size in choice.scores.items() for size, score in by_size.items())
    assert (choice.img_size, choice.scope) == ranked[-2:] and result.img_size == choice.img_size
    assert models.load_bundle(workspace / "fixres")[1].img_size == choice.img_size
    # the fine-tune is kept only where it does at least as well on the held-out images
    assert result.fine_tuned == (result.holdout_top1["fine_tuned"] >= result.holdout_top1["adapted"])
    assert result.holdout_top1["adapted"] == choice.scores[choice.scope][choice.img_size]
    client = mlflow.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    for scope, by_size in choice.scores.items():
        curve = client.get_metric_history(result.run_id, f"choice.{scope}_bn.holdout_top1")
        assert {m.step: m.value for m in curve} == pytest.approx(by_size)
    logged = client.get_run(result.run_id).data.params
    assert logged["chosen_by"] == "auto" and logged["batchnorm_scope"] == choice.scope


def test_too_few_held_out_images_fall_back_to_the_scale_in_one_line(tiny_params, shards_dir, workspace, caplog):
    model, spec = _untrained_bundle(tiny_params, workspace / "trained")
    with caplog.at_level(logging.WARNING, logger="effnet.stages.fixres"):
        choice = fixres.choose(tiny_params, model, spec, shards_dir)  # 96 x 0.1 held out: < 50
    assert choice.img_size == round(32 * tiny_params.fixres.scale) and choice.how.startswith("scale (too few")
    assert choice.scope == "last" and choice.scores == {}
    warned = [r.getMessage() for r in caplog.records if r.name == "effnet.stages.fixres"]
    assert len(warned) == 1 and "fixres.min_holdout" in warned[0] and "\n" not in warned[0]


def test_training_never_sees_the_held_out_samples(shards_dir):
    held = {bytes(b) for (flat, sizes), _, _ in loaders.eval_loader(
        shards_dir, None, 8, 0, split="train", keep=lambda key: in_holdout(key, 0.3))
        for b in gpu.unpack(flat, sizes)}
    total = read_manifest(shards_dir)["splits"]["train"]["total"]
    assert 0 < len(held) < total
    loader = loaders.train_loader(shards_dir, None, 4, 0, 16, holdout=0.3)
    seen = {bytes(b) for _ in range(3) for (flat, sizes), _, _ in loader for b in gpu.unpack(flat, sizes)}
    assert seen and not seen & held
    assert len(loader) == round(total * 0.7) // 4


@pytest.mark.parametrize("stage", ["evaluate", "fixres"])
def test_held_in_memory_or_streamed_the_stages_measure_the_same(tiny_params, shards_dir, workspace, stage,
                                                                monkeypatch):
    """evaluate's sweep and fixres's choice read their images many times: decoded once and held in memory
    (data.hold_mb, the default: no pass streams the shards) or streamed from the shards every pass (0), the
    figures are the same."""
    _untrained_bundle(tiny_params, workspace / "trained")
    streamed_passes = []
    eval_loader = inference.eval_loader
    monkeypatch.setattr(inference, "eval_loader", lambda *a, **kw: streamed_passes.append(a) or eval_loader(*a, **kw))
    figures, passes = [], []
    for hold_mb in (tiny_params.data.hold_mb, 0):
        streamed_passes.clear()
        params = tiny_params.model_copy(update={
            "data": tiny_params.data.model_copy(update={"holdout": 0.3, "hold_mb": hold_mb}),
            "fixres": tiny_params.fixres.model_copy(update={"img_size": "auto", "min_holdout": 10,
                                                             "candidates": [1.0, 1.25]}),
            "evaluate": tiny_params.evaluate.model_copy(update={"sweep": [0.75, 1.25]})})
        if stage == "evaluate":
            evaluation = evaluate.measure(params, shards_dir, {"a": workspace / "trained", "b": workspace / "trained"})
            figures.append((evaluation.sweep, evaluation.reported))
        else:
            model, spec = models.load_bundle(workspace / "trained")
            figures.append(fixres.choose(params, model, spec, shards_dir).scores)
        passes.append(len(streamed_passes))
    assert figures[0] == figures[1]
    # streamed: evaluate, 2 models x 3 sizes + the selected one's report; fixres, 2 sizes x 2 scopes x 2 passes
    assert passes[0] == 0 and passes[1] == (7 if stage == "evaluate" else 8)
