"""MLflow system metrics (system/*: CPU, memory, ...): on for every stage's run, including the runs Lightning's
MLFlowLogger creates through the client (train, fixres)."""
from __future__ import annotations

import os
import subprocess
import sys

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


def test_configure_turns_system_metrics_on_and_keeps_what_the_user_set(monkeypatch):
    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING

    from effnet import env
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")
    env.configure()
    assert MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get() and tracking.system_metrics_enabled()
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "false"


def test_no_module_changes_the_environment_or_warning_filters_on_import():
    """Importing every effnet module in a fresh interpreter sets no environment variable and no warning filter from
    effnet's own code (libraries may): set-up is `env.configure()`'s, called once by the CLI and the flow."""
    code = """
import os, pkgutil, importlib, sys, warnings
import effnet
ours = []

def from_effnet():  # the first caller outside os and collections.abc (setdefault...), if it is one of effnet's files
    frame = sys._getframe(2)
    while frame.f_code.co_filename.endswith(("os.py", "os>", "_collections_abc.py", "_collections_abc>")):
        frame = frame.f_back
    if frame.f_code.co_filename.startswith(effnet.__path__[0]):
        ours.append(frame.f_code.co_filename)

for name in ("filterwarnings", "simplefilter"):
    def spy(*a, _real=getattr(warnings, name), **k):
        from_effnet()
        return _real(*a, **k)
    setattr(warnings, name, spy)

class Environ(type(os.environ)):
    def __setitem__(self, key, value):
        from_effnet()
        super().__setitem__(key, value)

    def __delitem__(self, key):
        from_effnet()
        super().__delitem__(key)

os.environ.__class__ = Environ
for m in pkgutil.walk_packages(effnet.__path__, "effnet."):
    if m.name != "effnet.__main__":  # that one runs the CLI
        importlib.import_module(m.name)
print(ours)
"""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "PREFECT_"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


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


def test_every_stage_run_of_the_pipeline_gets_system_metrics(pipeline):
    """Lightning's client-made runs (train, fixres) as well as the stages' own `mlflow.start_run` ones."""
    client = mlflow.MlflowClient(pipeline.tracking_uri)
    experiment_id = client.get_experiment_by_name("effnet").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([experiment_id])}
    for name in ("train@tiny", "fixres@tiny", "evaluate@tiny"):
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
