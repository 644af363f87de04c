"""Faults a long training job meets, each injected for real: a tracking server that is down, or killed -9 mid-run
and started again on the same port and store (a real `mlflow server`); bytes of a checkpoint cut off or flipped; a
DDP rank killed -9 (two torchrun nodes, gloo); a full disk (a size-limited tmpfs); the Prefect flow killed
mid-stage, its server restarted while a stage runs; a registered model loaded in a fresh process. Each is survived,
or refused in one line, with nothing valid lost. docs/faults.md is the table of them."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import psutil
import pytest
import torch

from tests.conftest import free_port, kill_tree, result_json, stop, torchrun, train_args, write_tiny_params

CHECKPOINTS = Path(".effnet/checkpoints/tiny")


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("effnet: error:")]


def effnet(*args: str) -> list[str]:
    return [sys.executable, "-m", "effnet", *args]


def wait_until(what: str, check, timeout: float = 120, proc: subprocess.Popen | None = None, poll: float = 0.05):
    """CHECK()'s first true value within TIMEOUT seconds, else fail naming WHAT (or as soon as PROC has exited)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := check():
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the process exited with {proc.returncode} first:\n"
                        f"{proc.stderr.read()[-3000:] if proc.stderr else ''}")
        time.sleep(poll)
    pytest.fail(f"timed out waiting for {what}")


def step_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


# ---- 1, 2: the tracking server down at the start, or lost mid-run -----------------------------------------------

class MlflowServer:
    """A real `mlflow server` on a free port over a sqlite store in FOLDER, which a test kills -9 and starts again on
    the same port and store."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def start(self) -> MlflowServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}", "--artifacts-destination",
             str(self.folder / "artifacts"), "--workers", "1"],
            stdout=(self.folder / "server.log").open("a"), stderr=subprocess.STDOUT, cwd=self.folder,
            start_new_session=True)
        wait_until("the MLflow server", self.up, 180, self.proc, poll=0.3)
        return self

    def kill(self) -> None:
        """SIGKILL to the server and its workers (its process group): a crash, no goodbye to any client."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def client(self) -> mlflow.MlflowClient:
        return mlflow.MlflowClient(self.url)


@pytest.fixture
def server(tmp_path):
    s = MlflowServer(tmp_path / "server")
    yield s
    s.kill()


def test_a_tracking_server_that_is_down_stops_train_in_seconds_with_one_line_before_any_work(shards_dir, tmp_path):
    """Nothing listens on the port: `effnet train` stops in one line naming MLFLOW_TRACKING_URI, in the time its
    imports take, where MLflow's own retries took 4 min 26 s and ended in a 30-line traceback."""
    params = write_tiny_params(tmp_path / "params.yaml")
    down = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    done = subprocess.run(effnet(*train_args(shards_dir, params)), cwd=tmp_path, capture_output=True, text=True,
                          env=os.environ | {"MLFLOW_TRACKING_URI": down}, timeout=300)
    took = time.monotonic() - start
    assert done.returncode == 2 and len(errors(done.stderr)) == 1, done.stderr[-3000:]
    assert errors(done.stderr)[0].startswith(f"effnet: error: MLFLOW_TRACKING_URI {down}: not reachable")
    assert "Traceback" not in done.stderr
    assert took < 60, f"{took:.0f} s"  # the check itself: well under a second; the rest is Python's start-up
    assert not (tmp_path / "trained").exists() and not (tmp_path / ".effnet").exists()


@pytest.mark.parametrize("uri, says", [
    ("localhost:5000", "not a tracking URI MLflow knows (scheme 'localhost'"),
    ("http://127.0.0.1:port", "not a valid URL"),
    ("http://", "not a valid URL"),
    ("sqlite:////no/such/folder/mlflow.db", "/no/such/folder does not exist"),
    ("postgresql://u@127.0.0.1:1/db", "not reachable (127.0.0.1:1"),
])
def test_a_malformed_or_unusable_tracking_uri_is_one_line_naming_it(uri, says, monkeypatch):
    from effnet import tracking
    from effnet.errors import EffnetError
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(EffnetError) as e:
        tracking.check()
    assert str(e.value).startswith(f"MLFLOW_TRACKING_URI {uri}: ") and says in str(e.value)
    assert "\n" not in str(e.value)


def test_a_server_that_accepts_but_never_answers_is_refused_within_the_check_timeout(monkeypatch):
    """A hung server (the port accepts connections, nothing answers): refused after services.TIMEOUT_S."""
    import socket

    from effnet import services, tracking
    from effnet.errors import EffnetError
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{hung.getsockname()[1]}")
        start = time.monotonic()
        with pytest.raises(EffnetError, match="no answer within"):
            tracking.check()
        assert services.TIMEOUT_S <= time.monotonic() - start < services.TIMEOUT_S + 5


def test_every_other_stage_that_logs_checks_the_store_before_any_work(tiny_params, shards_dir, tmp_path,
                                                                      monkeypatch):
    from effnet.errors import EffnetError
    from effnet.stages import evaluate, fixres, register
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    missing = {"trained": tmp_path / "no-bundle"}  # never read: the check comes first
    stages = {"fixres": lambda: fixres.run(tiny_params, "tiny", shards_dir, missing["trained"], tmp_path / "fixres"),
              "evaluate": lambda: evaluate.run(tiny_params, "tiny", shards_dir, missing, tmp_path / "m.json"),
              "register": lambda: register.run(tiny_params, "tiny", tmp_path / "m.json", missing, tmp_path / "r.json")}
    for name, stage in stages.items():
        with pytest.raises(EffnetError, match="MLFLOW_TRACKING_URI .*: not reachable"):
            stage()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("url, says", [(f"http://127.0.0.1:{free_port()}/api", "not reachable"),
                                       ("127.0.0.1:4200/api", "not a valid URL")])
def test_a_prefect_api_url_that_is_down_or_malformed_stops_the_flow_in_one_line(url, says, tmp_path):
    from tests.conftest import REPO
    done = subprocess.run([sys.executable, str(REPO / "flows/pipeline.py")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=os.environ | {"PREFECT_API_URL": url,
                                                                    "PREFECT_HOME": str(tmp_path / "prefect")})
    lines = errors(done.stderr)
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"effnet: error: PREFECT_API_URL {url}: ")
    assert says in lines[0] and "Traceback" not in done.stderr and not (tmp_path / "data").exists()


# 8 epochs of 6 steps (96 images, batch 16, nothing held out), every step logged, a checkpoint every 2 steps; loader
# workers, so that a resume is exact.
LOGGED_SETS = ["train.epochs=8", "train.checkpoint_every_n_steps=2", "train.log_every_n_steps=1", "data.holdout=0",
               "data.num_workers=2", "train.lr=0.003"]
LOGGED_STEPS = 8 * 6


def lines_of(stream) -> list[str]:
    """The lines of STREAM as they come (a thread reads them into the list returned)."""
    import threading
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(stream.readline, "")), daemon=True).start()
    return lines


def unsent_step(ws: Path) -> int:
    """The checkpoint step the record of unsent metrics beside the checkpoints was written after, -1 if none."""
    try:
        return json.loads((ws / CHECKPOINTS / "unsent.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def checkpoint_step(ws: Path) -> int:
    """The step of the last checkpoint written whole (its checksum entry), -1 before there is one."""
    try:
        return json.loads((ws / CHECKPOINTS / "checksums.json").read_text())["last.ckpt"]["step"]
    except (OSError, ValueError, KeyError):
        return -1


def train_run(client: mlflow.MlflowClient):
    runs = client.search_runs([client.get_experiment_by_name("effnet").experiment_id],
                              "tags.mlflow.runName = 'train@tiny'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0], {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, "train/loss")}


@pytest.mark.slow
def test_training_goes_on_while_the_server_is_down_and_the_resumed_run_gets_every_metric(shards_dir, tmp_path,
                                                                                        server):
    """The server killed -9 after the first checkpoint; training goes on (checkpoints keep coming) and is then killed
    -9 too, its metrics since the server went in no store yet. Run again while the server is still down: refused in
    one line. Server back (same port, same store), run again: it resumes the same MLflow run, and the run ends
    FINISHED with the loss of every step, those logged while the server was down included (the checkpoint carried
    them)."""
    params = write_tiny_params(tmp_path / "params.yaml")
    ws = tmp_path / "ws"
    ws.mkdir()
    cmd = effnet(*train_args(shards_dir, params, *LOGGED_SETS))
    # No retries: the outbox finds the server gone at its next send, not after MLflow's ~6 s of them.
    env = os.environ | {"MLFLOW_TRACKING_URI": server.start().url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    proc = subprocess.Popen(cmd, cwd=ws, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    err = lines_of(proc.stderr)
    try:
        wait_until("the first checkpoint", lambda: checkpoint_step(ws) >= 2, 300, proc)
        server.kill()
        wait_until("the outbox finding the server gone", lambda: any("metrics are queued" in x for x in err), 120,
                   proc)
        down_at = checkpoint_step(ws)
        # A checkpoint made while the server is down, and the record of what was unsent once its batch was logged
        # (Lightning logs a batch's metrics after its checkpoint): a kill between the two would lose that batch's.
        wait_until("a checkpoint made while the server is down, and its batch logged",
                   lambda: unsent_step(ws) >= down_at + 2 and unsent_step(ws) == checkpoint_step(ws), 300, proc)
        kill_tree(proc)
    finally:
        stop(proc)
    killed_at = checkpoint_step(ws)

    refused = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and len(errors(refused.stderr)) == 1 and "not reachable" in refused.stderr

    server.start()
    resumed = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and result_json(resumed.stdout)["steps"] == LOGGED_STEPS
    run, loss = train_run(server.client())
    assert run.info.status == "FINISHED" and sorted(loss) == list(range(LOGGED_STEPS))
    assert killed_at > 2, "no step was logged while the server was down"


def test_a_server_gone_for_good_costs_the_stage_nothing_and_the_next_stage_delivers(shards_dir, tmp_path, server,
                                                                                  monkeypatch):
    """The server killed -9 after the first checkpoint and not back before training ends: the stage still writes its
    bundle and exits 0, saying in one line which metrics did not reach which run and where they are kept. Once the
    server is back, the next stage that reaches it (here: its `tracking.experiment` call) sends them; the run ends
    FINISHED with every step."""
    from effnet import tracking
    params = write_tiny_params(tmp_path / "params.yaml")
    ws = tmp_path / "ws"
    ws.mkdir()
    env = os.environ | {"MLFLOW_TRACKING_URI": server.start().url}
    cmd = effnet(*train_args(shards_dir, params, *LOGGED_SETS, "train.epochs=2"))  # the last --set wins
    proc = subprocess.Popen(cmd, cwd=ws, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        wait_until("the first checkpoint", lambda: checkpoint_step(ws) >= 2, 300, proc)
        server.kill()
        out, err = proc.communicate(timeout=600)
    finally:
        stop(proc)
    assert proc.returncode == 0, err[-3000:]
    assert (ws / "trained/model.safetensors").is_file() and not (ws / CHECKPOINTS).exists()
    lost = [line for line in err.splitlines() if "did not reach run" in line]
    run_id = result_json(out)["run_id"]
    kept = ws / tracking.UNSENT / f"{run_id}.json"
    assert len(lost) == 1 and run_id in lost[0] and str(kept.relative_to(ws)) in lost[0] and "train/loss" in lost[0]
    assert json.loads(kept.read_text())["status"] == "FINISHED"

    server.start()
    monkeypatch.chdir(ws)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    tracking.experiment("effnet")
    run, loss = train_run(server.client())
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert sorted(loss) == list(range(2 * 6)) and not kept.exists()


# ---- 3: a corrupt checkpoint --------------------------------------------------------------------------------------

def flip_bytes(path: Path, at: float = 0.5, n: int = 64) -> None:
    """Invert N bytes in the middle of PATH (at fraction AT), as a failing disk leaves a file: same size, bad bytes."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i:i + n] = bytes(b ^ 0xFF for b in data[i:i + n])
    path.write_bytes(bytes(data))


def test_a_corrupt_checkpoint_is_refused_in_one_line_and_the_one_before_resumes_exactly(shards_dir, tmp_path):
    """Killed -9 once two checkpoints are there. With last.ckpt cut short and previous.ckpt's bytes flipped, the
    rerun says in one line each that it refuses them and starts afresh, and does: an uninterrupted run. With only
    last.ckpt's bytes flipped, the rerun refuses it in one line, resumes from previous.ckpt and exports that
    uninterrupted run's weights, bit for bit."""
    import shutil
    params = write_tiny_params(tmp_path / "params.yaml")
    cmd = effnet(*train_args(shards_dir, params, *LOGGED_SETS, "train.epochs=2"))  # the last --set wins
    ws = tmp_path / "flipped"
    ws.mkdir()
    proc = subprocess.Popen(cmd, cwd=ws, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_until("two checkpoints", lambda: checkpoint_step(ws) >= 4, 300, proc)
        kill_tree(proc)
    finally:
        stop(proc)
    both = shutil.copytree(ws, tmp_path / "both", symlinks=True)
    last, previous = ws / CHECKPOINTS / "last.ckpt", ws / CHECKPOINTS / "previous.ckpt"
    assert previous.is_file() and 0 < step_of(previous) < step_of(last) < 2 * 6

    cut = both / CHECKPOINTS / "last.ckpt"
    with cut.open("r+b") as f:
        f.truncate(cut.stat().st_size // 3)
    flip_bytes(both / CHECKPOINTS / "previous.ckpt", at=0.9)
    afresh = subprocess.run(cmd, cwd=both, capture_output=True, text=True, timeout=600)
    assert afresh.returncode == 0, afresh.stderr[-3000:]
    refusals = [line for line in afresh.stderr.splitlines() if "corrupt" in line]
    assert len(refusals) == 2 and "starting afresh" in refusals[1] and "resuming from" not in afresh.stderr

    flip_bytes(last)
    resumed = subprocess.run(cmd, cwd=ws, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    refusals = [line for line in resumed.stderr.splitlines() if "corrupt" in line]
    assert len(refusals) == 1 and f"{CHECKPOINTS / 'last.ckpt'}: corrupt" in refusals[0], resumed.stderr[-3000:]
    assert "trying the one before" in refusals[0] and f"resuming from {CHECKPOINTS / 'previous.ckpt'}" in resumed.stderr
    assert result_json(resumed.stdout)["weights"] == result_json(afresh.stdout)["weights"]


@pytest.mark.slow
def test_a_registration_killed_after_its_version_is_made_is_completed_not_duplicated(tiny_params, shards_dir,
                                                                                      tmp_path):
    """`effnet register` killed -9 as soon as its model version is in the store (before or while its tags, model
    card and aliases are written), then run again: still one version, and it has them all."""
    import sqlite3

    from effnet import models
    from effnet.data.manifest import read_manifest
    from tests.test_registry import metrics
    params = write_tiny_params(tmp_path / "params.yaml")
    variant = tiny_params.variant("tiny")
    classes = read_manifest(shards_dir)["classes"]
    for label, size in (("trained", 32), ("fixres", 40)):
        model = models.build(variant, len(classes))
        models.save_bundle(model, models.ModelSpec(variant="tiny", phi=variant.phi, classes=classes,
                                                   preprocessing=models.preprocessing(model, variant, size)),
                           tmp_path / label)
    (tmp_path / "m.json").write_text(json.dumps(metrics(50.0)))
    cmd = effnet("register", "m.json", "registered.json", "trained=trained", "fixres=fixres", "--shards",
                 str(shards_dir), "--variant", "tiny", "--params", str(params))

    def version_made() -> bool:
        try:
            with sqlite3.connect(tmp_path / "mlflow.db", timeout=0.1) as db:
                return bool(db.execute("select count(*) from model_versions").fetchone()[0])
        except sqlite3.Error:
            return False
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_until("the model version", version_made, 300, proc, poll=0.01)
        kill_tree(proc)
    finally:
        stop(proc)
    assert not (tmp_path / "registered.json").exists()
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'tiny'")
    assert len(versions) == 1 and versions[0].tags["measured_top1"] == "50.0" and versions[0].description
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == str(versions[0].version)
    record = json.loads((tmp_path / "registered.json").read_text())
    assert record["version"] == str(versions[0].version) and record["promoted"] is True


# ---- 7: a full disk -----------------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 48 MiB tmpfs mounted in TMP_PATH, for a test to fill; skipped, with the reason, where it cannot be mounted
    (not root, or a container without the right to mount)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(disk)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small filesystem to fill here (mount -t tmpfs: "
                    f"{done.stderr.strip() or done.returncode}): the disk-full tests need root or CAP_SYS_ADMIN")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> Path:
    """Write DISK full (1 MiB at a time, then byte by byte to the last one); returns the filler to remove later."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f:
        for chunk in (1 << 20, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass
    return filler


def snapshot(folder: Path) -> dict[str, str]:
    from effnet import io
    return {p.name: io.sha256_file(p) for p in sorted(folder.iterdir())}


def test_a_disk_full_while_sharding_is_one_line_and_the_previous_shards_stay_whole(tiny_params, demo_dir, small_disk):
    from effnet.errors import EffnetError
    from effnet.stages import shard
    out = small_disk / "shards"
    shard.run(tiny_params.shard, demo_dir, out)
    before = snapshot(out)
    fill(small_disk)
    smaller = tiny_params.shard.model_copy(update={"samples_per_shard": 8})  # other shards, over the same names
    with pytest.raises(EffnetError) as e:
        shard.run(smaller, demo_dir, out)
    assert str(e.value) == f"{out}: shards not written: No space left on device (what was there is as it was)"
    assert snapshot(out) == before  # the manifest and every shard, byte for byte; no .tmp left


def test_a_disk_full_while_checkpointing_stops_in_one_line_and_keeps_the_last_good_one(shards_dir, tmp_path,
                                                                                      small_disk):
    """The checkpoint folder on a small filesystem, filled once the first checkpoint is there: the next checkpoint
    fails, the stage stops in one line naming it, the last good one (and its checksum) is intact, no temp file is
    left; nothing else was written. (A rerun resumes from it as after any stop: test_train.py.)"""
    params = write_tiny_params(tmp_path / "params.yaml")
    folder = small_disk / "checkpoints/tiny"
    cmd = effnet(*train_args(shards_dir, params, *LOGGED_SETS, f"train.checkpoint_dir={small_disk / 'checkpoints'}"))
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_until("the first checkpoint", (folder / "last.ckpt").is_file, 300, proc)
        fill(small_disk)
        err = proc.communicate(timeout=300)[1]
    finally:
        stop(proc)
    assert proc.returncode == 2 and len(errors(err)) == 1, err[-3000:]
    assert errors(err)[0].startswith(f"effnet: error: {folder / 'last.ckpt'}: checkpoint not written: No space left "
                                     f"on device; last good checkpoint kept: {folder / 'last.ckpt'}")
    from effnet.lightning import checked
    assert checked(folder / "last.ckpt") is not None
    assert not list(folder.glob("*.tmp")) and not (tmp_path / "trained").exists()


# ---- 4: a shard that goes bad during training ---------------------------------------------------------------------

def gone_bad(shards, dest: Path) -> Path:
    """A copy of SHARDS where, after sharding, train-000001.tar lost its last 60 % (a truncated copy) and the first
    JPEG inside train-000002.tar was overwritten with zeros (the tar itself still whole)."""
    import shutil
    import tarfile
    dest = Path(shutil.copytree(shards, dest))
    cut = dest / "train-000001.tar"
    with cut.open("r+b") as f:
        f.truncate(int(cut.stat().st_size * 0.4))
    rotten = dest / "train-000002.tar"
    with tarfile.open(rotten) as tar:
        jpg = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
    with rotten.open("r+b") as f:
        f.seek(jpg.offset_data)
        f.write(b"\0" * jpg.size)
    return dest


@pytest.mark.parametrize("held", [0, 64])
def test_a_stream_over_shards_gone_bad_skips_and_counts_and_resumes_exactly(shards_dir, tmp_path, held):
    """Streamed or held in memory, with 2 loader workers: every epoch has its full count of whole batches, the
    skipped samples are counted by shard (the truncated tar's lost ones as well as the zeroed JPEG), and a stream
    resumed from its state after any batch yields what the uninterrupted one yields next, counts included."""
    from effnet.data import loaders, transforms
    from tests.test_stream import PRE, _epochs
    bad = gone_bad(shards_dir, tmp_path / "shards")
    tf = transforms.train_transform(PRE, "original", uint8=True)
    torch.manual_seed(0)
    whole = _epochs(loaders.train_loader(bad, tf, 16, 2, 8, seed=1, hold_mb=held), 2)
    assert len(whole) == 2 * 6 and all(len(y) == 16 for _, y, _ in whole)
    counts: dict[str, int] = {}
    for p in whole[-1][2].positions.values():
        for url, n in p.skipped.items():
            counts[Path(url).name] = counts.get(Path(url).name, 0) + n
    assert set(counts) == {"train-000001.tar", "train-000002.tar"} and counts["train-000001.tar"] > counts[
        "train-000002.tar"] > 0, counts
    for k in (3, 6):
        torch.manual_seed(1)
        resumed = loaders.train_loader(bad, tf, 16, 2, 8, seed=1, resume=whole[k][2], hold_mb=held)
        rest = _epochs(resumed, 2)[:len(whole) - k - 1]
        assert all(torch.equal(x, wx) and torch.equal(y, wy) for (x, y, _), (wx, wy, _) in zip(rest, whole[k + 1:]))
        assert rest[-1][2].positions == whole[-1][2].positions


@pytest.mark.slow
def test_two_ranks_train_through_shards_gone_bad_and_log_what_they_skipped(shards_dir, tmp_path):
    """torchrun, 2 ranks: both run every step (no rank waits for another at a collective) and the run ends; the
    skips are said once per shard and logged as data/skipped."""
    bad = gone_bad(shards_dir, tmp_path / "shards")
    params = write_tiny_params(tmp_path / "params.yaml")
    sets = ["train.accelerator=cpu", "train.devices=2", "train.strategy=ddp", "train.batch_size=8",
            "train.epochs=2", "data.num_workers=1", "data.max_skipped=0.5"]
    (tmp_path / "ws").mkdir()
    done = subprocess.run(torchrun("--standalone", "--nproc-per-node", "2") + train_args(bad, params, *sets),
                          cwd=tmp_path / "ws", capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if "counted in data/skipped" in line]
    assert any("train-000001.tar: cut short after" in line for line in said), done.stderr[-3000:]
    assert any("train-000002.tar/" in line and "not a decodable image" in line for line in said)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'ws/mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("effnet").experiment_id])[0]
    skipped = client.get_metric_history(run.info.run_id, "data/skipped")
    assert skipped and skipped[-1].value > 0 and run.info.status == "FINISHED"


def test_past_the_set_share_of_skipped_samples_the_stage_stops_naming_the_shard(shards_dir, tmp_path):
    bad = gone_bad(shards_dir, tmp_path / "shards")
    params = write_tiny_params(tmp_path / "params.yaml")
    done = subprocess.run(effnet(*train_args(bad, params, "data.num_workers=1")), cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    lines = errors(done.stderr)
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith(f"effnet: error: {bad / 'train-000001.tar'}: ") and "over data.max_skipped 1.0%" in lines[0]
    assert not (tmp_path / "trained").exists()


# ---- 5: a rank dies -----------------------------------------------------------------------------------------------

DDP_SETS = ["train.accelerator=cpu", "train.num_nodes=2", "train.strategy=ddp", "train.checkpoint_every_n_steps=2",
            "data.num_workers=1", "data.holdout=0", "train.lr=0.003"]


def two_nodes(shards, params, tmp_path: Path, *sets: str) -> list[subprocess.Popen]:
    """`effnet train` as two torchrun nodes of one process each, each in its own working directory."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        ws = tmp_path / f"node{rank}"
        ws.mkdir(exist_ok=True)
        cmd = torchrun("--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank), "--master-addr",
                       "127.0.0.1", "--master-port", str(port)) + train_args(shards, params, *DDP_SETS, *sets)
        procs.append(subprocess.Popen(cmd, cwd=ws, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    return procs


def worker(agent: subprocess.Popen) -> psutil.Process:
    """The rank torchrun started (its one child running effnet)."""
    return wait_until("torchrun's worker", lambda: next(
        (p for p in psutil.Process(agent.pid).children() if "effnet" in " ".join(p.cmdline())), None))


def test_a_rank_killed_stops_the_other_in_seconds_with_one_line(shards_dir, tmp_path):
    """Two nodes (torchrun, one process each, as on two machines sharing the data and the checkpoint folder); node
    1's rank killed -9 mid-run: node 0's rank fails its next collective (the connection reset), stops in one line
    and keeps its checkpoint. (Running the stage again resumes bit for bit: tests/test_train.py, slow.)"""
    params = write_tiny_params(tmp_path / "params.yaml")
    sets = ["train.epochs=6", "train.collective_timeout=20", f"train.checkpoint_dir={tmp_path / 'checkpoints'}"]
    procs = two_nodes(shards_dir, params, tmp_path, *sets)
    try:
        ckpt = tmp_path / "checkpoints/tiny/last.ckpt"
        wait_until("the first checkpoint", ckpt.is_file, 300, procs[0])
        victim = worker(procs[1])
        killed = time.monotonic()
        victim.kill()
        out, err = procs[0].communicate(timeout=300)
        survived_s = time.monotonic() - killed
    finally:
        for p in procs:
            stop(p)
    assert procs[0].returncode != 0
    assert len(errors(err)) == 1, err[-3000:]
    survivor = errors(err)[0]
    assert "rank 0 of 2: another rank is gone" in survivor and "last good checkpoint kept" in survivor
    assert survived_s < 60, f"rank 0 took {survived_s:.0f} s to stop"  # measured: ~8 s (5 of them its loader's)


# ---- 6: the flow dies, or its server restarts --------------------------------------------------------------------

def stale_pipeline(pipeline, dest: Path) -> Path:
    """A copy of the session's finished pipeline with train's params changed: DVC says train onward is stale."""
    from flows.pipeline import apply_overrides
    repo = pipeline.copy(dest)
    apply_overrides(repo / "params.yaml", ["train.epochs=5", "train.checkpoint_every_n_steps=2"])
    return repo


def registered_versions(repo: Path) -> list:
    return mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").search_model_versions("name = 'tiny'")


def flow_cmd(repo: Path) -> list[str]:
    return [sys.executable, str(repo / "flows/pipeline.py")]


def dvc_clean(repo: Path) -> bool:
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=repo, capture_output=True,
                            text=True)
    return status.returncode == 0 and json.loads(status.stdout) == {}


@pytest.mark.slow
def test_the_flow_killed_mid_stage_and_run_again_continues_from_what_dvc_says_is_stale(pipeline, tmp_path):
    """`python flows/pipeline.py` (its temporary Prefect server, DVC, the train stage: the whole process group)
    killed -9 while train runs; run again, it does not wait for the dead run's hold on the workspace, DVC skips
    what is up to date, train resumes from its checkpoint, and the registry gains one version, not two."""
    repo = stale_pipeline(pipeline, tmp_path / "repo")
    before = len(registered_versions(repo))
    env = os.environ | {"PREFECT_HOME": str(tmp_path / "prefect")}
    log = tmp_path / "killed.log"
    proc = subprocess.Popen(flow_cmd(repo), cwd=repo, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_until("train's first checkpoint", lambda: checkpoint_step(repo) >= 2, 600, proc)
        kill_tree(proc)
    finally:
        stop(proc)
    assert not dvc_clean(repo)
    start = time.monotonic()
    again = subprocess.run(flow_cmd(repo), cwd=repo, env=env, capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    out = again.stdout + again.stderr
    assert "waiting for the workspace" not in out
    assert "Stage 'shard' didn't change, skipping" in out and "resuming from" in out
    assert dvc_clean(repo) and len(registered_versions(repo)) == before + 1
    print(f"the rerun took {time.monotonic() - start:.0f} s")


@pytest.mark.slow
def test_a_prefect_server_restarted_while_a_stage_runs_loses_none_of_its_outputs(pipeline, tmp_path):
    """A real `prefect server start` (its own PREFECT_HOME, a free port), the flow run against it; killed -9 while
    the train stage runs and started again on the same port and database: the stage goes on (it is DVC's
    subprocess, not the server's), the flow run completes, and DVC has every output recorded."""
    repo = stale_pipeline(pipeline, tmp_path / "repo")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    server_env = os.environ | {"PREFECT_HOME": str(tmp_path / "server"), "PREFECT_UI_ENABLED": "false"}
    server_cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server_log = tmp_path / "server.log"

    def start_server() -> subprocess.Popen:
        proc = subprocess.Popen(server_cmd, env=server_env, stdout=server_log.open("a"), stderr=subprocess.STDOUT,
                                start_new_session=True)

        def healthy():
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False
        wait_until("the Prefect server", healthy, 300, proc, poll=0.5)
        return proc

    server = start_server()
    flow = None
    try:
        env = os.environ | {"PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "client")}
        flow = subprocess.Popen(flow_cmd(repo), cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        wait_until("train's first checkpoint", lambda: checkpoint_step(repo) >= 2, 600, flow)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        down = time.monotonic()
        server = start_server()
        print(f"the Prefect server was down {time.monotonic() - down:.0f} s")
        out = flow.communicate(timeout=1200)[0]
    finally:
        if flow is not None:
            stop(flow)
        stop(server)
    assert flow.returncode == 0, out[-5000:]
    assert dvc_clean(repo) and not (repo / ".effnet/checkpoints/tiny").exists()
