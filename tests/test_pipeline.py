"""The two drivers end to end in a fresh git repo (a clone of this one with tiny params): the Prefect flow runs every
dvc.yaml stage through `dvc repro` and registers the model; afterwards `dvc status` is clean and a second
`dvc repro` does nothing: both drivers agree on one pipeline."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import yaml

from tests.conftest import git_workspace

STAGES = ["demo-data", "shard", "train@tiny", "fixres@tiny", "evaluate@tiny", "register@tiny"]


def dvc(*args, cwd):
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)


def assert_clean(repo):
    status = dvc("status", "--json", cwd=repo)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout) == {}, status.stdout


def test_the_flow_ran_every_stage_through_dvc_and_returned_the_metrics(pipeline):
    lock = yaml.safe_load((pipeline.repo / "dvc.lock").read_text())
    assert sorted(lock["stages"]) == sorted(STAGES)
    assert pipeline.metrics["tiny"] == json.loads((pipeline.repo / "metrics/tiny.json").read_text())
    assert set(pipeline.metrics["tiny"]) == {"trained", "fixres", "selected", "machine"}
    curves = json.loads((pipeline.repo / "plots/train/tiny.json").read_text())  # train's curves, one row an epoch
    assert [row["epoch"] for row in curves] == [1, 2, 3]
    client = mlflow.MlflowClient(pipeline.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("effnet").experiment_id])
    flow_runs = {r.data.tags.get("effnet.pipeline_run") for r in runs}
    assert len(flow_runs) == 1 and None not in flow_runs, "every run is tagged with the one flow run"
    assert {r.info.run_name for r in runs} >= {"train@tiny", "fixres@tiny", "evaluate@tiny", "register@tiny"}


def test_the_flow_waited_for_prefect_s_first_start_and_said_what_for(pipeline):
    """`make demo` from an empty PREFECT_HOME: the temporary server migrates a new database first, past Prefect's
    20 s default on a slow machine; the flow waits its own longer timeout and says so in one line."""
    notices = [line for line in pipeline.log.splitlines() if line.startswith("effnet: waiting")]
    assert len(notices) == 1, pipeline.log[-3000:]
    assert notices[0].startswith("effnet: waiting up to 180 s for Prefect's temporary API server (a first start "
                                 "creates and migrates its database")


@pytest.mark.parametrize("setting, reason", [
    ({"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"}, "no answer within 1 s"),  # the user's setting wins
    ({"PREFECT_SERVER_DATABASE_CONNECTION_URL": "nope://x"}, "its process exited with status 1"),
])
def test_a_prefect_server_that_does_not_start_stops_the_flow_in_one_line(tmp_path, setting, reason):
    (tmp_path / "ws").mkdir()
    repo = git_workspace(tmp_path / "ws")
    home = tmp_path / "prefect"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {"PREFECT_HOME": str(home)}
    proc = subprocess.run([sys.executable, "flows/pipeline.py"], cwd=repo, env=environ | setting,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last == (f"effnet: error: Prefect's temporary API server did not start ({reason}; its output: "
                    f"{home / 'server.log'}); set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS higher, or "
                    "PREFECT_API_URL to a running server"), proc.stderr
    assert (home / "server.log").exists()
    assert not (repo / "data").exists()  # no stage ran


def test_after_the_flow_dvc_is_clean_and_repro_runs_nothing(pipeline):
    assert_clean(pipeline.repo)
    again = dvc("repro", cwd=pipeline.repo)
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout
    shown = dvc("metrics", "show", "--json", cwd=pipeline.repo)
    assert "fixres" in shown.stdout


def test_the_champion_loads_from_the_registry_and_predicts(pipeline):
    mlflow.set_tracking_uri(pipeline.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/tiny@champion")
    probs = model.predict(np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8))
    assert probs.shape == (2, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_flow_rejects_an_unknown_variant_before_any_work(tmp_path):
    from prefect.testing.utilities import prefect_test_harness

    from effnet.errors import EffnetError
    from flows.pipeline import pipeline

    repo = git_workspace(tmp_path)
    with prefect_test_harness(server_startup_timeout=120), pytest.raises(EffnetError, match="variants.nope"):
        pipeline(workspace=str(repo), variants=["nope"])
    assert not (repo / "data").exists()


@pytest.mark.slow
def test_the_flow_hands_a_multi_process_train_to_a_launcher_and_waits(pipeline, tmp_path):
    """The flow with `launcher`: its train task's `dvc repro` runs `effnet train` through a local two-process
    launcher (torchrun, as srun would run it on two nodes), waits, and DVC records what rank 0 wrote; the rest of
    the pipeline follows and the workspace ends clean."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline as flow
    from tests.conftest import torchrun

    repo = pipeline.copy(tmp_path / "repo")
    launcher = " ".join(torchrun("--no-python", "--standalone", "--nproc-per-node", "2")[:-2])  # without -m effnet
    overrides = ["train.accelerator=cpu", "train.devices=2", "train.strategy=ddp"]
    with prefect_test_harness():
        metrics = flow(workspace=str(repo), overrides=overrides, launcher=launcher)
    assert set(metrics["tiny"]) == {"trained", "fixres", "selected", "machine"}
    assert_clean(repo)
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("effnet").experiment_id],
                              "tags.mlflow.runName = 'train@tiny'", order_by=["attributes.start_time DESC"])
    assert len(runs) == 2 and runs[0].data.params["world_size"] == "2"  # the launcher's run, after the fixture's
    assert runs[0].data.tags["effnet.pipeline_run"] != runs[1].data.tags["effnet.pipeline_run"]
