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

Prefect's API: `PREFECT_API_URL`'s server when it is set, else Prefect's temporary local server, which `main()`
starts and waits for before the flow (`start_api`): a first start on a new PREFECT_HOME creates and migrates its
database, ~10-30 s on 2 cores, past the 20 s Prefect waits by default.

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
STUDENT_STAGES = ["pseudolabel", "train-student", "fixres-student", "evaluate-student", "register-student"]


def in_order(params: config.Params, keys: list[str]) -> list[str]:
    """KEYS with every teacher they need first (a Noisy Student chain runs teacher, student 1, student 2...)."""
    out: list[str] = []
    for key in keys:
        for k in reversed([key, *params.teachers(key)]):
            if k not in out:
                out.append(k)
    return out


def stages_of(params: config.Params, key: str) -> list[str]:
    """The dvc.yaml stages of model KEY, in order: a variant's, or a student's (pseudolabel first)."""
    return [f"{stage}@{key}" for stage in (STUDENT_STAGES if key in params.students else VARIANT_STAGES)]


LAUNCHER_ENV = "EFFNET_LAUNCHER"  # read by `effnet train` (effnet.cli)

# Prefect waits 20 s for its temporary server; a first start on a new PREFECT_HOME (a fresh clone's `make demo`)
# migrates the database first and has taken ~30 s on an idle 2-core machine. A user's setting wins.
STARTUP_TIMEOUT_S = 180
SLOW_START_S = 5  # a start taking longer says what it waits for (a first start says so at once)


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


def start_api() -> None:
    """Make sure the flow has a Prefect API: PREFECT_API_URL's server when set, else Prefect's temporary local server,
    started here and waited for up to STARTUP_TIMEOUT_S (or PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS where
    the user set it); the flow's client then finds it running. A first start, or one past SLOW_START_S, says what
    it waits for. The server's own output goes to <PREFECT_HOME>/server.log. For entry points: a start that fails
    exits the process with one line, as soon as the server gives up (Prefect's own wait restarts a server that
    fails its start-up, exit status 3 as for a taken port, until the whole timeout has passed)."""
    import threading
    import time

    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        return
    ephemeral = settings.server.ephemeral
    user_set = "startup_timeout_seconds" in ephemeral.model_fields_set
    timeout = ephemeral.startup_timeout_seconds if user_set else STARTUP_TIMEOUT_S
    url = settings.server.database.connection_url.get_secret_value()
    database = url.partition(":///")[2] if url.startswith("sqlite") else ""
    first = bool(database) and not Path(database).exists()
    why = f"a first start creates and migrates its database, {database}" if first else f"PREFECT_HOME={settings.home}"
    log = Path(settings.home) / "server.log"
    log.parent.mkdir(parents=True, exist_ok=True)

    server, failed, done = SubprocessASGIServer(), [], threading.Event()

    def start() -> None:
        try:
            server.start(timeout=timeout)
        except Exception as e:  # its message carries the server's whole output: reported below in one line
            failed.append(e)
        finally:
            done.set()

    # The server process inherits this process's stdout and stderr: point them at the log while it starts.
    sys.stdout.flush(), sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]  # this process's own stdout and stderr, back after the start
    with log.open("w") as out:
        os.dup2(out.fileno(), 1), os.dup2(out.fileno(), 2)
    try:
        threading.Thread(target=start, daemon=True).start()
        begun, told, exits = time.monotonic(), False, set()
        while not done.wait(0.2):
            if not told and (first or time.monotonic() - begun > SLOW_START_S):
                os.write(saved[1], f"effnet: waiting up to {timeout} s for Prefect's temporary API server ({why})\n"
                         .encode())
                told = True
            process = server.server_process
            if process is not None and process.poll() is not None:
                exits.add(process.pid)
                if process.returncode != 3 or len(exits) > 1:  # 3 once: a taken port, retried on another
                    failed.append(f"its process exited with status {process.returncode}")
                    break
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        for fd, copy in enumerate(saved, start=1):
            os.dup2(copy, fd)
            os.close(copy)
    if failed:
        how = failed[0] if isinstance(failed[0], str) else f"no answer within {timeout} s"
        server.stop()
        raise SystemExit(f"effnet: error: Prefect's temporary API server did not start ({how}; its output: {log});"
                         " set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS higher, or PREFECT_API_URL to a"
                         " running server")


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
    """Shard the data, then train, FixRes-tune, evaluate and register each variant; returns the metrics. A student
    (Noisy Student) runs after its teacher: pseudolabel, then its own train, fixres, evaluate and register.

    variants: keys of `variants:` or `students:` in params.yaml (default: all; a student brings its teachers). overrides: `section.key=value` written into
    params.yaml first (e.g. `train.epochs=3`). launcher: a command prefix the train stage runs through, on many
    nodes (`srun ...`; set train.num_nodes and train.devices to match), waited for."""
    env.configure()
    log = get_run_logger()
    params_file = Path(workspace) / "params.yaml"
    params = config.load(params_file, overrides or [])  # bad override or params: fail before any work
    for key in variants or []:
        params.variant(key)  # unknown variant: fail before any work
    keys = in_order(params, variants or list(params.models))
    tracking.check()  # the stages' MLflow store, down or malformed: one line now, not at the first stage that logs
    lock_file = Path(workspace) / WORKSPACE_LOCK
    with io.exclusive(lock_file, lambda: log.info("waiting for the workspace: another flow run holds %s", lock_file)
                      ) as lock:
        apply_overrides(params_file, overrides or [])
        for stage in SHARED_STAGES:
            repro(stage, workspace, lock=lock)
        for key in keys:
            for target in stages_of(params, key):
                train = target.partition("@")[0] in ("train", "train-student")
                repro(target, workspace, launcher if train else None, lock=lock)
    return {key: json.loads((Path(workspace) / "metrics" / f"{key}.json").read_text()) for key in keys}


def check_prefect_api() -> None:
    """$PREFECT_API_URL, when set, answers `GET /health` within seconds; else EffnetError naming it, in one line
    (Prefect itself would fail with a traceback when the flow starts). Unset: start_api() starts a temporary server."""
    from prefect.settings import get_current_settings
    url = get_current_settings().api.url
    if url and (problem := services.http_problem(url.rstrip("/") + "/health")):
        raise EffnetError(f"PREFECT_API_URL {url}: {problem}")


def main() -> int:
    """`python flows/pipeline.py` (`make demo`): the flow once on this workspace, after checking the Prefect API (or
    starting Prefect's temporary server); prints the metrics."""
    env.configure()
    try:
        check_prefect_api()
        start_api()
        print(json.dumps(pipeline(), indent=2))
    except EffnetError as e:
        print(f"effnet: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
