"""Where MLflow writes: $MLFLOW_TRACKING_URI when set (a server), else an embedded store in the workspace:
sqlite `mlflow.db` with artifacts in `mlartifacts/` beside it."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # offline by design

import mlflow  # noqa: E402


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def experiment(name: str) -> str:
    """Point MLflow at the store and return the experiment's id, creating it (artifacts beside the db) if new."""
    mlflow.set_tracking_uri(tracking_uri())
    found = mlflow.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    location = None if os.environ.get("MLFLOW_TRACKING_URI") else (Path.cwd() / "mlartifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=location)
