"""MLflow system metrics (system/*: CPU, memory, ...): on for every stage's run, including the runs Lightning's
MLFlowLogger creates through the client (train, fixres)."""
from __future__ import annotations

import mlflow
import pytest

from effnet import tracking


@pytest.fixture
def fast_sampling(monkeypatch):
    """One sample every 0.2 s (MLflow's default is 10 s: a run shorter than that logs none)."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")


def system_keys(client: mlflow.MlflowClient, run_id: str) -> set[str]:
    return {k for k in client.get_run(run_id).data.metrics if k.startswith("system/")}


def test_importing_tracking_turns_system_metrics_on():
    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
    assert MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get() and tracking.system_metrics_enabled()


def test_a_client_created_run_gets_system_metrics_inside_the_block(workspace, fast_sampling):
    import time
    client = mlflow.MlflowClient(tracking.tracking_uri())
    run = client.create_run(tracking.experiment("effnet"))  # as Lightning's MLFlowLogger does
    with tracking.system_metrics(run.info.run_id):
        time.sleep(1.0)
    client.set_terminated(run.info.run_id)
    keys = system_keys(client, run.info.run_id)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys, keys


def test_system_metrics_is_a_no_op_without_a_run_or_when_turned_off(workspace, fast_sampling, monkeypatch):
    import time
    client = mlflow.MlflowClient(tracking.tracking_uri())
    run = client.create_run(tracking.experiment("effnet"))
    with tracking.system_metrics(None):  # a DDP rank other than 0
        time.sleep(0.5)
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    with tracking.system_metrics(run.info.run_id):
        time.sleep(0.5)
    assert system_keys(client, run.info.run_id) == set()


def test_train_and_fixres_runs_get_system_metrics(tiny_params, shards_dir, workspace, fast_sampling):
    from effnet import fixres, train
    trained = train.run(tiny_params, "tiny", shards_dir, workspace / "trained")
    fixres.run(tiny_params, "tiny", shards_dir, trained, workspace / "fixres")
    client = mlflow.MlflowClient(tracking.tracking_uri())
    experiment_id = client.get_experiment_by_name("effnet").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([experiment_id])}
    for name in ("train@tiny", "fixres@tiny"):
        assert "system/cpu_utilization_percentage" in system_keys(client, runs[name].info.run_id), name


def test_runs_of_one_pipeline_run_nest_under_one_parent(workspace, monkeypatch):
    experiment_id = tracking.experiment("effnet")
    assert "mlflow.parentRunId" not in tracking.run_tags("tiny", stage="train", experiment_id=experiment_id)
    monkeypatch.setenv(tracking.PIPELINE_RUN_ENV, "flow-1")
    monkeypatch.setenv(tracking.PIPELINE_RUN_NAME_ENV, "brave-otter")
    assert "mlflow.parentRunId" not in tracking.run_tags("tiny", stage="train")  # no experiment: no parent
    parents = {tracking.run_tags("tiny", stage=s, experiment_id=experiment_id)["mlflow.parentRunId"]
               for s in ("train", "evaluate")}
    assert len(parents) == 1
    monkeypatch.setenv(tracking.PIPELINE_RUN_ENV, "flow-2")
    other = tracking.run_tags("tiny", stage="train", experiment_id=experiment_id)["mlflow.parentRunId"]
    assert other not in parents
    client = mlflow.MlflowClient(tracking.tracking_uri())
    parent = client.get_run(parents.pop())
    assert parent.info.run_name == "pipeline brave-otter" and parent.info.status == "FINISHED"
    assert parent.data.tags["effnet.pipeline_run"] == "flow-1" and parent.data.tags["effnet.stage"] == "pipeline"
    assert len(client.search_runs([experiment_id])) == 2
