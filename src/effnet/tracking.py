"""Where MLflow writes, and the tags that tie a run to its pipeline run and its inputs.

Store: $MLFLOW_TRACKING_URI when set (a server), else an embedded store in the workspace: sqlite `mlflow.db` with
artifacts in `mlartifacts/` beside it. Experiment: one per pipeline (`mlflow.experiment` in params.yaml).

Grouping: every stage's run carries `run_tags(...)`: `effnet.pipeline_run` (from $EFFNET_PIPELINE_RUN, which the
Prefect flow sets to its flow run id, so one flow run reads as one unit: filter the experiment's runs on
`tags.effnet.pipeline_run = '<id>'`), the git commit, the `dvc.lock` hash of the shards, and a hash of the
resolved params. Given the experiment id as well, a stage's run under a pipeline run is also nested (the tag
`mlflow.parentRunId`) under one parent run per pipeline run, `pipeline <name>`, which the first stage creates:
the UI shows the pipeline run as one expandable row.

System metrics: `env.configure()` turns on MLflow's system metrics (`system/*`: CPU, memory, disk, network, and GPU
when `nvidia-ml-py` is installed), sampled every $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (10 by default; a
run shorter than one interval gets none). `mlflow.start_run` honours the switch by itself; a run made through the
client (Lightning's MLFlowLogger) needs `system_metrics(run_id)` around its work. Set
MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false to turn it off.
"""
from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from effnet import io
from effnet.errors import EffnetError

# mlflow is imported where it is used: the training library imports this module, and a user of that library (a
# bench, a notebook) need not have MLflow installed until something is logged.

PIPELINE_RUN_ENV = "EFFNET_PIPELINE_RUN"  # set by the Prefect flow, one value per flow run
PIPELINE_RUN_NAME_ENV = "EFFNET_PIPELINE_RUN_NAME"
DATA_OUT = "data/shards"  # the dvc.yaml output whose dvc.lock hash identifies the data a run saw


def machine() -> str:
    """This machine as a figure should name it: the CPU model with its family and model numbers (oneDNN chooses its
    kernels by the CPU, so the weights and the last digits of a figure move with it), the cores this process may
    use, and the GPUs. E.g. `AMD EPYC (family 26, model 2), 2 cores, x86_64, no GPU`."""
    import platform

    import torch
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:  # not Linux
        pass
    cpu = info.get("model name") or platform.processor() or "unknown CPU"
    if "cpu family" in info:
        cpu += f" (family {info['cpu family']}, model {info.get('model', '?')})"
    gpu = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if torch.cuda.is_available()
           else "no GPU")
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, {platform.machine()}, {gpu}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def connect(existing: bool = False) -> str:
    """Point MLflow at the store and return its URI. EXISTING: a reader's call (predict, export), which fails in
    one line where there is no store rather than let MLflow create an empty one in the working directory."""
    import mlflow
    user_set = bool(os.environ.get("MLFLOW_TRACKING_URI"))
    if existing and not user_set and not (Path.cwd() / "mlflow.db").is_file():
        raise EffnetError(f"no MLflow store here: no mlflow.db in {Path.cwd()} and MLFLOW_TRACKING_URI is not set")
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if not user_set:  # MLflow exports the URI to the environment: the default must keep following the cwd
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    return uri


def experiment(name: str) -> str:
    """Point MLflow at the store and return the experiment's id, creating it (artifacts beside the db) if new."""
    import mlflow
    connect()
    found = mlflow.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    location = None if os.environ.get("MLFLOW_TRACKING_URI") else (Path.cwd() / "mlartifacts").as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created meanwhile by a concurrent stage
        return mlflow.get_experiment_by_name(name).experiment_id


def system_metrics_enabled() -> bool:
    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
    return bool(MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get())


@contextmanager
def system_metrics(run_id: str | None, resume: bool = False) -> Iterator[None]:
    """Log `system/*` metrics to RUN_ID while the block runs, for a run not started by `mlflow.start_run` (which
    does this itself): Lightning's MLFlowLogger creates its run through the client. RESUME continues the step
    count of a resumed run. No-op when RUN_ID is None (pass None on DDP ranks other than 0: one process logs)
    or when system metrics are turned off; a monitor that fails to start only warns."""
    if not run_id or not system_metrics_enabled():
        yield
        return
    monitor = None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        monitor = SystemMetricsMonitor(run_id, resume_logging=resume, tracking_uri=tracking_uri())
        monitor.start()
    except Exception as e:  # noqa: BLE001 - monitoring must never stop a stage (psutil missing, store down)
        logging.getLogger(__name__).warning("system metrics not logged: %s", e)
        monitor = None
    try:
        yield
    finally:
        if monitor is not None:
            monitor.finish()


def log_curve(run_id: str, key: str, points: dict[int, float]) -> None:
    """KEY as a curve over integer steps (a resolution, say) in the finished run RUN_ID."""
    import mlflow
    client = mlflow.MlflowClient(tracking_uri())
    for step, value in sorted(points.items()):
        client.log_metric(run_id, key, value, step=step)


def git_commit(workspace: Path | None = None) -> str | None:
    """HEAD of the workspace's git repo (with `-dirty` when tracked files changed), or None outside git."""
    cwd = Path(workspace or Path.cwd())
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


def dvc_data_hash(workspace: Path | None = None, out: str = DATA_OUT) -> str | None:
    """The hash dvc.lock records for OUT (the shards): the same value `dvc status` compares; None if not locked."""
    import yaml
    lock = Path(workspace or Path.cwd()) / "dvc.lock"
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return None
    for stage in stages.values():
        for entry in stage.get("outs", []) or []:
            if entry.get("path") == out:
                return entry.get("md5") or entry.get("hash") or entry.get("etag")
    return None


def params_hash(params) -> str:
    """sha256 (first 16 hex digits) of the resolved params (pydantic model or dict), key order independent."""
    return io.sha256_json(params.model_dump(mode="json") if hasattr(params, "model_dump") else params)[:16]


def pipeline_parent(experiment_id: str, pipeline_run: str, name: str | None = None) -> str:
    """The id of the parent run of pipeline run PIPELINE_RUN in EXPERIMENT_ID, created (FINISHED) if new. Its end
    time moves to each stage's start, so it spans the stages (stages of one workspace run one at a time)."""
    import mlflow
    from mlflow.entities import RunStatus
    client = mlflow.MlflowClient(tracking_uri())
    query = f"tags.`effnet.pipeline_run` = '{pipeline_run}' and tags.`effnet.stage` = 'pipeline'"
    found = client.search_runs([experiment_id], query, order_by=["attributes.start_time ASC"], max_results=1)
    if found:
        run_id = found[0].info.run_id
    else:
        tags = {"effnet.pipeline_run": pipeline_run, "effnet.stage": "pipeline",
                **({"effnet.pipeline_run_name": name} if name else {})}
        run_id = client.create_run(experiment_id, tags=tags, run_name=f"pipeline {name or pipeline_run}").info.run_id
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    return run_id


def run_tags(variant: str | None = None, params=None, stage: str | None = None,
             workspace: Path | None = None, experiment_id: str | None = None) -> dict[str, str]:
    """Tags for a stage's MLflow run: pass them to `mlflow.start_run(tags=...)` or `MLFlowLogger(tags=...)`.

    Only keys with a value are returned (no pipeline run outside a flow, no commit outside git, ...). With
    EXPERIMENT_ID (the run's) under a pipeline run, `mlflow.parentRunId` nests the run under `pipeline_parent`.
    """
    commit = git_commit(workspace)
    pipeline_run = os.environ.get(PIPELINE_RUN_ENV)
    tags = {
        "effnet.pipeline_run": pipeline_run,
        "effnet.pipeline_run_name": os.environ.get(PIPELINE_RUN_NAME_ENV),
        "effnet.stage": stage,
        "effnet.variant": variant,
        "effnet.git_commit": commit,
        "mlflow.source.git.commit": commit.removesuffix("-dirty") if commit else None,  # shown by the UI
        "effnet.data_hash": dvc_data_hash(workspace),
        "effnet.params_hash": params_hash(params) if params is not None else None,
    }
    if pipeline_run and experiment_id:
        tags["mlflow.parentRunId"] = pipeline_parent(experiment_id, pipeline_run,
                                                     os.environ.get(PIPELINE_RUN_NAME_ENV))
    return {k: v for k, v in tags.items() if v}
