"""The end-to-end Prefect flow: the stages of dvc.yaml, one Prefect task each, run through `dvc repro`.

The flow computes nothing itself: each task is `dvc repro --single-item <stage>` in the workspace, so DVC
decides what is stale, records dvc.lock, and leaves the workspace exactly as `dvc repro` would (after a flow run,
`dvc status` is clean). Prefect adds scheduling, retries and logs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task

from effnet import config

SHARED_STAGES = ["demo-data", "shard"]
VARIANT_STAGES = ["train", "fixres", "evaluate", "register"]


def stage_env() -> dict[str, str]:
    """The stages' `effnet` command lives beside this interpreter; DVC and MLflow stay offline."""
    env = os.environ.copy()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return env


@task(retries=1, retry_delay_seconds=5, task_run_name="dvc repro {target}")
def repro(target: str, workspace: str) -> None:
    log = get_run_logger()
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--single-item", target], cwd=workspace,
                            env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.strip():
            log.info(line.rstrip())
    if proc.wait():
        raise RuntimeError(f"dvc repro {target} failed with exit status {proc.returncode}")


@flow(name="effnet-pipeline")
def pipeline(workspace: str = ".", variants: list[str] | None = None) -> dict:
    """Shard the data, then train, FixRes-tune, evaluate and register each variant; returns the metrics."""
    params = config.load(Path(workspace) / "params.yaml")
    keys = variants or list(params.variants)
    for key in keys:
        params.variant(key)  # unknown variant: fail before any work
    for stage in SHARED_STAGES:
        repro(stage, workspace)
    for key in keys:
        for stage in VARIANT_STAGES:
            repro(f"{stage}@{key}", workspace)
    return {key: json.loads((Path(workspace) / "metrics" / f"{key}.json").read_text()) for key in keys}


if __name__ == "__main__":
    print(json.dumps(pipeline(), indent=2))
