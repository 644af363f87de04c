"""The end-to-end Prefect flow: the stages of dvc.yaml, one Prefect task each, run through `dvc repro`.

The flow computes nothing itself: each task is `dvc repro --single-item <stage>` in the workspace, so DVC
decides what is stale, records dvc.lock, and leaves the workspace exactly as `dvc repro` would (after a flow run,
`dvc status` is clean). Prefect adds scheduling (flows/serve.py, prefect.yaml), retries, logs and a concurrency
limit: one flow run at a time per workspace (DVC's repository lock would fail a second one mid-way instead), held as
a lock on `.effnet/flow.lock` that the kernel releases when the run and the stage it started end, however they end:
a flow killed mid-stage and run again continues from what DVC says is stale. (A Prefect global concurrency slot
stayed taken after a kill -9: the temporary server keeps no lease, and the rerun waited for it for ever.)

Overrides (`section.key=value`, as `effnet --set` takes them) are written into the workspace's params.yaml before
any stage runs, comments kept, the way `dvc exp run -S` applies them: params.yaml stays the one source of truth,
DVC sees the change and re-runs what depends on it, and `git diff params.yaml` shows what the run used.
(`dvc repro` itself takes no overrides; `dvc exp run -S` would also make one DVC experiment per stage.)

Every stage's MLflow run is tagged `effnet.pipeline_run=<flow run id>` ($EFFNET_PIPELINE_RUN): one flow run
reads as one unit in the MLflow UI.

Multi-node training: with `launcher` (a command prefix such as `srun --nodes 4 --ntasks-per-node 8` or
`torchrun --no-python --nnodes 2 ...`), each train task still runs `dvc repro train@<variant>` here, and the stage's
`effnet train` hands itself to the launcher ($EFFNET_LAUNCHER) and waits for it; DVC then records the bundle the
job wrote (on storage this machine shares with the nodes) as it records any other.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from io import StringIO
from pathlib import Path

from prefect import flow, get_run_logger, task

from effnet import config, env, io, services, tracking
from effnet.errors import EffnetError

SHARED_STAGES = ["demo-data", "shard"]
VARIANT_STAGES = ["train", "fixres", "evaluate", "register"]


LAUNCHER_ENV = "EFFNET_LAUNCHER"  # read by `effnet train` (effnet.cli)


def stage_env(launcher: str | None = None) -> dict[str, str]:
    """The stages' `effnet` command lives beside this interpreter; DVC and MLflow stay offline; stages tag their
    MLflow runs with this flow run; with LAUNCHER, `effnet train` runs through it."""
    from prefect.runtime import flow_run

    environ = os.environ.copy()  # with env.configure()'s offline defaults
    environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environ.get('PATH', '')}"
    if flow_run.id:
        environ["EFFNET_PIPELINE_RUN"] = str(flow_run.id)
        environ["EFFNET_PIPELINE_RUN_NAME"] = str(flow_run.name)
    if launcher:
        environ[LAUNCHER_ENV] = launcher
    return environ


@task(retries=1, retry_delay_seconds=5, task_run_name="dvc repro {target}")
def repro(target: str, workspace: str, launcher: str | None = None, lock: int | None = None) -> None:
    """`dvc repro --single-item TARGET` in WORKSPACE, its output in the task's log; LOCK (the workspace lock's file
    descriptor) goes with it, so that the workspace stays locked while it runs, even if this process dies."""
    log = get_run_logger()
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--single-item", target], cwd=workspace,
                            env=stage_env(launcher), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            pass_fds=(lock,) if lock is not None else ())
    for line in proc.stdout:
        if line.strip():
            log.info(line.rstrip())
    if proc.wait():
        raise RuntimeError(f"dvc repro {target} failed with exit status {proc.returncode}")


def apply_overrides(params_file: Path, overrides: list[str]) -> None:
    """Write `section.key=value` overrides into params.yaml, keeping its comments and order (validated first)."""
    if not overrides:
        return
    from ruamel.yaml import YAML

    config.load(params_file, overrides)  # a bad key or value fails here, before the file changes
    rt = YAML()
    rt.preserve_quotes = True
    doc = rt.load(params_file.read_text())
    for assignment in overrides:
        config._override(doc, assignment)
    text = StringIO()
    rt.dump(doc, text)
    io.write_atomic(params_file, text.getvalue())


WORKSPACE_LOCK = ".effnet/flow.lock"  # held by a flow run (and the stage it runs) for as long as it works there


@flow(name="effnet-pipeline")
def pipeline(workspace: str = ".", variants: list[str] | None = None, overrides: list[str] | None = None,
             launcher: str | None = None) -> dict:
    """Shard the data, then train, FixRes-tune, evaluate and register each variant; returns the metrics.

    variants: keys of `variants:` in params.yaml (default: all). overrides: `section.key=value` written into
    params.yaml first (e.g. `train.epochs=3`). launcher: a command prefix the train stage runs through, on many
    nodes (`srun ...`; set train.num_nodes and train.devices to match), waited for."""
    env.configure()
    log = get_run_logger()
    params_file = Path(workspace) / "params.yaml"
    params = config.load(params_file, overrides or [])  # bad override or params: fail before any work
    keys = variants or list(params.variants)
    for key in keys:
        params.variant(key)  # unknown variant: fail before any work
    tracking.check()  # the stages' MLflow store, down or malformed: one line now, not at the first stage that logs
    lock_file = Path(workspace) / WORKSPACE_LOCK
    with io.exclusive(lock_file, lambda: log.info("waiting for the workspace: another flow run holds %s", lock_file)
                      ) as lock:
        apply_overrides(params_file, overrides or [])
        for stage in SHARED_STAGES:
            repro(stage, workspace, lock=lock)
        for key in keys:
            for stage in VARIANT_STAGES:
                repro(f"{stage}@{key}", workspace, launcher if stage == "train" else None, lock=lock)
    return {key: json.loads((Path(workspace) / "metrics" / f"{key}.json").read_text()) for key in keys}


def check_prefect_api() -> None:
    """$PREFECT_API_URL, when set, answers `GET /health` within seconds; else EffnetError naming it, in one line
    (Prefect itself would fail with a traceback when the flow starts). Unset: Prefect starts a temporary server."""
    from prefect.settings import get_current_settings
    url = get_current_settings().api.url
    if url and (problem := services.http_problem(url.rstrip("/") + "/health")):
        raise EffnetError(f"PREFECT_API_URL {url}: {problem}")


def main() -> int:
    """`python flows/pipeline.py` (`make demo`): the flow on this workspace, after checking the Prefect API."""
    env.configure()
    try:
        check_prefect_api()
        print(json.dumps(pipeline(), indent=2))
    except EffnetError as e:
        print(f"effnet: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
