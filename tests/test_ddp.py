"""`effnet train` under DDP with 2 CPU processes (gloo), end to end: the same stage command a multi-GPU or
multi-node run uses, with only accelerator/devices/strategy changed in params."""
from __future__ import annotations

import subprocess
import sys

import mlflow

from effnet import models
from effnet.data.manifest import read_manifest
from effnet.stages import shard
from tests.conftest import write_tiny_params


def test_ddp_two_cpu_processes_train_one_model_logged_once(tiny_params, demo_dir, workspace):
    # Several val shards, so that each rank gets its own part of the val set.
    shard.run(tiny_params.shard.model_copy(update={"samples_per_shard": 6}), demo_dir, workspace / "shards")
    params = write_tiny_params(workspace / "params.yaml")
    sets = ["train.accelerator=cpu", "train.devices=2", "train.strategy=ddp", "train.epochs=2"]
    result = subprocess.run([sys.executable, "-m", "effnet", "train", "shards", "trained", "--params", str(params),
                             "--variant", "tiny", *[a for s in sets for a in ("--set", s)]],
                            cwd=workspace, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    model, spec = models.load_bundle(workspace / "trained")
    assert spec.classes == read_manifest(workspace / "shards")["classes"]
    client = mlflow.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("effnet")
    found = client.search_runs([experiment.experiment_id], "tags.mlflow.runName = 'train@tiny'")
    assert len(found) == 1, "only rank 0 logs"
    run = found[0]
    assert int(run.data.params["global_batch"]) == 2 * tiny_params.train.batch_size
    total = read_manifest(workspace / "shards")["splits"]["train"]["total"]
    steps = client.get_metric_history(run.info.run_id, "train/loss")
    trained_on = round(total * (1 - tiny_params.data.holdout))  # data.holdout never reaches training
    assert max(m.step for m in steps) + 1 == 2 * (trained_on // (2 * tiny_params.train.batch_size))
