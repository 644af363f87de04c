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

import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from effnet import io, services
from effnet.errors import EffnetError

# mlflow is imported where it is used: the training library imports this module, and a user of that library (a
# bench, a notebook) need not have MLflow installed until something is logged.

log = logging.getLogger(__name__)
PIPELINE_RUN_ENV = "EFFNET_PIPELINE_RUN"  # set by the Prefect flow, one value per flow run
PIPELINE_RUN_NAME_ENV = "EFFNET_PIPELINE_RUN_NAME"
DATA_OUT = "data/shards"  # the dvc.yaml output whose dvc.lock hash identifies the data a run saw


def machine() -> str:
    """This machine as a figure should name it: the CPU model with its family and model numbers (oneDNN chooses its
    kernels by the CPU, so the weights and the last digits of a figure move with it), the cores this process may
    use, and the machine's GPUs (asked of NVIDIA's driver, not torch: the flow imports this module and no torch).
    E.g. `AMD EPYC (family 26, model 2), 2 cores, x86_64, no GPU`."""
    import platform

    import pynvml
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
    try:
        pynvml.nvmlInit()
        gpus = [pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                for i in range(pynvml.nvmlDeviceGetCount())]
        pynvml.nvmlShutdown()
    except pynvml.NVMLError:  # no NVIDIA driver
        gpus = []
    gpu = f"{len(gpus)} x {gpus[0]}" if gpus else "no GPU"
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, {platform.machine()}, {gpu}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


def store_problem(uri: str) -> str | None:
    """Why the tracking store at URI cannot be used right now, found within a few seconds (services.TIMEOUT_S):
    a server that does not answer `GET /health`, a database port that accepts no connection, a sqlite or file store
    whose path cannot be written, or a URI MLflow does not know. None when it can be."""
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry
    from mlflow.utils.uri import get_uri_scheme
    try:
        scheme = get_uri_scheme(uri)
    except Exception as e:  # noqa: BLE001 - MLflow's own parser: whatever it raises, the URI is bad
        return f"not a tracking URI ({e})"
    if scheme in ("http", "https"):
        return services.url_problem(uri) or services.http_problem(uri.rstrip("/") + "/health")
    if scheme in ("sqlite", *DATABASE_PORTS):
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError
        try:
            url = make_url(uri)
        except ArgumentError as e:
            return f"not a database URL ({e})"
        if scheme == "sqlite":
            in_memory = url.database in (None, "", ":memory:")  # sqlite makes the file, not its folder
            return None if in_memory else services.writable_problem(url.database, parents=False)
        if not url.host:
            return "no database host in the URL"
        return services.port_problem(url.host, url.port or DATABASE_PORTS[scheme])
    if scheme in ("", "file"):
        from mlflow.utils.file_utils import local_file_uri_to_path
        return services.writable_problem(local_file_uri_to_path(uri) if scheme == "file" else uri)
    if scheme not in _tracking_store_registry._registry:
        return (f"not a tracking URI MLflow knows (scheme '{scheme}'; expected http(s)://host:port, sqlite:///path, "
                "a database URL, file:/path or databricks)")
    return None  # databricks & co: their client checks their credentials


def check(uri: str | None = None) -> str:
    """The tracking store (URI, default `tracking_uri()`) can be used, or EffnetError naming it, in one line, within
    a few seconds. Every stage that logs calls it before any work: MLflow's own client would retry a server that is
    down for minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES) and then fail with a traceback. Returns the URI."""
    uri = uri or tracking_uri()
    if problem := store_problem(uri):
        named = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") == uri else "the MLflow store"
        raise EffnetError(f"{named} {uri}: {problem}")
    return uri


def store_failure(e: BaseException) -> str | None:
    """One line for E when it is the MLflow store failing mid-stage (MLflow's client gave up on it), else None."""
    from mlflow.exceptions import MlflowException
    if not isinstance(e, MlflowException):
        return None
    first = str(e.message if hasattr(e, "message") else e).strip().splitlines()[0]
    return f"MLflow store {tracking_uri()}: {first[:300]}"


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
    send_unsent()  # what an earlier stage could not deliver: the store is there now
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
    """KEY as a curve over integer steps (a resolution, say) in the finished run RUN_ID; kept for later
    (`keep_unsent`) if the store does not take it."""
    import mlflow
    now = int(time.time() * 1000)
    metrics = [{"key": key, "value": float(v), "timestamp": now, "step": s} for s, v in sorted(points.items())]
    try:
        mlflow.MlflowClient(tracking_uri()).log_batch(run_id, metrics=[_metric(m) for m in metrics])
    except Exception:  # noqa: BLE001 - the store went away: the stage's outputs matter more than its curve
        keep_unsent(run_id, metrics)


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


# ---- metrics that must not be lost when the store is ---------------------------------------------------------------

UNSENT = Path(".effnet/unsent")  # in the workspace: one JSON file per run whose metrics did not reach the store
BATCH = 1000  # metrics per request: MLflow's log_batch limit


def _metric(m: dict):
    from mlflow.entities import Metric
    return Metric(key=m["key"], value=m["value"], timestamp=m["timestamp"], step=m["step"])


def _plain(m) -> dict:
    return {"key": m.key, "value": float(m.value), "timestamp": int(m.timestamp), "step": int(m.step)}


class Outbox:
    """Metrics on their way to the run RUN_ID, sent by a thread of their own, so that training never waits on the
    store. While the store cannot take them (the server is down, restarting, unreachable) they stay queued, in
    order, and go with the next try, every RETRY_S seconds: a server that comes back gets everything. MLflow's own
    asynchronous logging (`synchronous=False`) drops a batch whose request fails. `unsent()` is what a checkpoint
    keeps and `put` what a resumed run gives back; `close` tries once more and returns what never arrived."""

    def __init__(self, run_id: str, uri: str | None = None, retry_s: float = 10.0):
        self.run_id, self.uri, self.retry_s = run_id, uri or tracking_uri(), retry_s
        self._queue: list[dict] = []
        self._cv = threading.Condition()
        self._closing = False
        self._sending = 0  # metrics taken from the queue by the request in flight
        self.down_since: float | None = None  # when the store first refused, while it still does
        self._thread = threading.Thread(target=self._loop, name="effnet-outbox", daemon=True)
        self._thread.start()

    def put(self, metrics) -> None:
        """Queue METRICS (MLflow Metric entities or their plain dicts)."""
        with self._cv:
            self._queue += [m if isinstance(m, dict) else _plain(m) for m in metrics]
            self._cv.notify()

    def unsent(self) -> list[dict]:
        """Every metric not yet confirmed by the store, in order (the one request in flight included)."""
        with self._cv:
            return list(self._queue)

    def _loop(self) -> None:
        import mlflow
        client = mlflow.MlflowClient(self.uri)
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    self._cv.wait()
                if not self._queue:
                    return
                batch = self._queue[:BATCH]
            try:
                client.log_batch(self.run_id, metrics=[_metric(m) for m in batch])
            except Exception as e:  # noqa: BLE001 - any failure of the store: keep the metrics, try again later
                with self._cv:
                    if self.down_since is None:
                        self.down_since = time.monotonic()
                        log.warning("MLflow store %s: %s; metrics are queued and sent when it is back", self.uri,
                                    str(e).strip().splitlines()[0][:200])
                    if self._closing:
                        return
                    self._cv.wait(self.retry_s)
                continue
            with self._cv:
                del self._queue[:len(batch)]
                if self.down_since is not None:
                    log.warning("MLflow store %s is back after %.0f s: queued metrics sent", self.uri,
                                time.monotonic() - self.down_since)
                    self.down_since = None

    def close(self, timeout: float = 30.0) -> list[dict]:
        """Send what is queued (one more try if the store refused), waiting at most TIMEOUT seconds; returns what did
        not arrive."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout)
        return self.unsent()


def outbox_client(uri: str, outbox):
    """An MlflowClient for URI whose metric-only batches go to OUTBOX() (an `Outbox`, made when first needed) instead
    of the store: Lightning's MLFlowLogger logs its metrics through its client's `log_batch`."""
    import mlflow

    class OutboxClient(mlflow.MlflowClient):
        def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
            if metrics and not params and not tags:
                return outbox().put(metrics)
            return super().log_batch(run_id, metrics, params, tags, synchronous)

    return OutboxClient(uri)


def keep_unsent(run_id: str, metrics: list[dict], status: str | None = None, uri: str | None = None) -> Path | None:
    """METRICS (and the run's final STATUS) that did not reach run RUN_ID, kept in UNSENT/<run_id>.json for the next
    stage that reaches the store (`send_unsent`); says so in one line, naming them. None when there is nothing."""
    if not metrics and not status:
        return None
    path = UNSENT / f"{run_id}.json"
    uri = uri or tracking_uri()
    kept = json.loads(path.read_text()) if path.is_file() else {"metrics": []}
    io.write_json(path, {"run_id": run_id, "tracking_uri": uri, "status": status or kept.get("status"),
                         "metrics": kept["metrics"] + metrics})
    keys = sorted({m["key"] for m in metrics})
    steps = sorted({m["step"] for m in metrics})
    what = (f"{len(metrics)} metric values ({', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}; steps "
            f"{steps[0]}-{steps[-1]})" if metrics else "no metrics")
    log.warning("MLflow store %s unreachable: %s%s did not reach run %s; kept in %s, sent by the next stage that "
                "reaches the store", uri, what, f" and its status {status}" if status else "", run_id, path)
    return path


def send_unsent(uri: str | None = None) -> int:
    """Send what earlier stages kept in UNSENT for the store at URI (the current one by default), and drop each file
    once its run has it all; returns the number of metric values sent. A store that still refuses keeps them."""
    import mlflow
    uri = uri or tracking_uri()
    sent = 0
    for path in sorted(UNSENT.glob("*.json")) if UNSENT.is_dir() else []:
        kept = json.loads(path.read_text())
        if kept.get("tracking_uri") != uri:
            continue
        client = mlflow.MlflowClient(uri)
        try:
            for i in range(0, len(kept["metrics"]), BATCH):
                client.log_batch(kept["run_id"], metrics=[_metric(m) for m in kept["metrics"][i:i + BATCH]])
            if kept.get("status"):
                client.set_terminated(kept["run_id"], kept["status"])
        except Exception as e:  # noqa: BLE001 - still unreachable, or the run is gone: keep the file, say so
            log.warning("%s: not sent yet (%s)", path, str(e).strip().splitlines()[0][:200])
            continue
        path.unlink()
        sent += len(kept["metrics"])
        log.warning("sent %d metric values kept from run %s (%s)", len(kept["metrics"]), kept["run_id"], path)
    return sent
