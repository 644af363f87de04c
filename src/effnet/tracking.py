"""Where MLflow writes, and the tags that tie a run to its pipeline run and its inputs.

Store: $MLFLOW_TRACKING_URI when set (a server), else an embedded store in the workspace: sqlite `mlflow.db` with
artifacts in `mlartifacts/` beside it. Experiment: one per pipeline (`mlflow.experiment` in params.yaml).

Grouping: every stage's run carries `run_tags(...)`: `effnet.pipeline_run` (from $EFFNET_PIPELINE_RUN, which the
Prefect flow sets to its flow run id, so one flow run reads as one unit: filter the experiment's runs on
`tags.effnet.pipeline_run = '<id>'`), the git commit, the `dvc.lock` hash of the shards, and a hash of the
resolved params.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # offline by design

import mlflow  # noqa: E402

PIPELINE_RUN_ENV = "EFFNET_PIPELINE_RUN"  # set by the Prefect flow, one value per flow run
PIPELINE_RUN_NAME_ENV = "EFFNET_PIPELINE_RUN_NAME"
DATA_OUT = "data/shards"  # the dvc.yaml output whose dvc.lock hash identifies the data a run saw


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def experiment(name: str) -> str:
    """Point MLflow at the store and return the experiment's id, creating it (artifacts beside the db) if new."""
    user_set = bool(os.environ.get("MLFLOW_TRACKING_URI"))
    mlflow.set_tracking_uri(tracking_uri())
    if not user_set:  # MLflow exports the URI to the environment: the default must keep following the cwd
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    found = mlflow.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    location = None if os.environ.get("MLFLOW_TRACKING_URI") else (Path.cwd() / "mlartifacts").as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created meanwhile by a concurrent stage
        return mlflow.get_experiment_by_name(name).experiment_id


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
    data = params.model_dump(mode="json") if hasattr(params, "model_dump") else params
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_tags(variant: str | None = None, params=None, stage: str | None = None,
             workspace: Path | None = None) -> dict[str, str]:
    """Tags for a stage's MLflow run: pass them to `mlflow.start_run(tags=...)` or `MLFlowLogger(tags=...)`.

    Only keys with a value are returned (no pipeline run outside a flow, no commit outside git, ...).
    """
    commit = git_commit(workspace)
    tags = {
        "effnet.pipeline_run": os.environ.get(PIPELINE_RUN_ENV),
        "effnet.pipeline_run_name": os.environ.get(PIPELINE_RUN_NAME_ENV),
        "effnet.stage": stage,
        "effnet.variant": variant,
        "effnet.git_commit": commit,
        "mlflow.source.git.commit": commit.removesuffix("-dirty") if commit else None,  # shown by the UI
        "effnet.data_hash": dvc_data_hash(workspace),
        "effnet.params_hash": params_hash(params) if params is not None else None,
    }
    return {k: v for k, v in tags.items() if v}
