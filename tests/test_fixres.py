"""The evaluate stage's resolution sweep (before/after FixRes): metrics JSON unchanged, DVC plot data, MLflow PNG."""
from __future__ import annotations

import json

import mlflow
import pytest
import torch

from effnet import evaluate, models



def test_sweep_scales_the_smallest_resolution_and_keeps_every_model_own():
    assert evaluate.sweep_sizes({32, 40}, [0.75, 1.0, 1.5]) == [24, 32, 40, 48]


def test_evaluate_sweeps_both_models_and_writes_plot_and_png(tiny_params, shards_dir, workspace):
    torch.manual_seed(0)
    variant = tiny_params.variant("tiny")
    bundles = {}
    for label, size in (("trained", 32), ("fixres", 40)):  # untrained weights: the sweep's plumbing, not accuracy
        model = models.build(variant, num_classes=4)
        dc = models.data_config(model, variant, size)
        spec = models.ModelSpec(variant="tiny", phi=-6, classes=list("abcd"), **dc)
        models.save_bundle(model, spec, workspace / label)
        bundles[label] = workspace / label
    sweep = tiny_params.evaluate.model_copy(update={"sweep": [0.75, 1.5]})
    params = tiny_params.model_copy(update={"evaluate": sweep})
    metrics = evaluate.run(params, "tiny", shards_dir, bundles, workspace / "metrics.json")
    assert json.loads((workspace / "metrics.json").read_text()) == metrics
    assert {label: set(m) for label, m in metrics.items()} == dict.fromkeys(bundles, {"res32", "res40"})
    rows = json.loads((workspace / "plots/tiny_resolution.json").read_text())
    assert [r["resolution"] for r in rows] == [24, 32, 40, 48]
    for row in rows:
        assert set(row) == {"resolution", *bundles} and all(0 <= row[k] <= 100 for k in bundles)
        if row["resolution"] in (32, 40):
            assert row["trained"] == metrics["trained"][f"res{row['resolution']}"]["top1"]
    client = mlflow.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("effnet").experiment_id])[0]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["tiny_resolution.png"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "sweep.fixres.top1")] == [24, 32, 40, 48]
