"""Shared fixtures: tiny params and data, built once per test session with the real stages; the tiny pipeline, run
once per test session through the Prefect flow and `dvc repro`, for every test that needs a finished pipeline; every
test runs in a temporary workspace so MLflow's embedded store and DVC state never touch the repo."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from effnet import env

# The XLA tests need torch_xla, which only .venv-xla has (`make test-xla`): elsewhere they are not collected, rather
# than reported as skipped in every plain run.
collect_ignore = [] if importlib.util.find_spec("torch_xla") else ["test_xla.py"]

REPO = Path(__file__).resolve().parents[1]

# Offline and local, as the CLI sets them up; stages started as subprocesses find `effnet` beside this python.
env.configure()
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"

# Small enough for 2 CPU cores: 4 classes, 48 px images, a phi -6 model trained at 32 px for one epoch.
TINY_OVERRIDES = {
    "variants": {"tiny": {"phi": -6}},
    "demo_data": {"classes": 4, "train_per_class": 24, "val_per_class": 6, "image_size": 48, "seed": 0},
    "data": {"source": "data/demo", "num_workers": 0, "shuffle_buffer": 64},
    "shard": {"samples_per_shard": 32, "seed": 0},
    "train": {"img_size": 32, "epochs": 1, "batch_size": 16, "lr": 0.02, "progress_bar": False,
              "log_every_n_steps": 1},
    "fixres": {"epochs": 1, "batch_size": 16},
    "evaluate": {"batch_size": 32},
}


# The test session's pipeline runs on real data: scikit-learn's digit scans (0-3, at 32 px), which the tiny model learns
# well above chance in 3 epochs; their test split exercises the honest figure end to end, and 20 % held out of
# training (72 images) FixRes's choice.
PIPELINE_OVERRIDES = {"demo_data": {"dataset": "digits", "image_size": 32}, "data": {"holdout": 0.2},
                      "train": {"epochs": 3, "lr": 0.01}, "fixres": {"candidates": [1.0, 1.25, 1.5]}}


def write_tiny_params(path: Path, *more: dict) -> Path:
    """The repo's params.yaml (every section, as DVC tracks them) shrunk by TINY_OVERRIDES, then MORE overrides."""
    import yaml
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for overrides in (TINY_OVERRIDES, *more):
        for section, values in overrides.items():
            params[section] = values if section == "variants" else {**params.get(section, {}), **values}
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def _own_mlflow_store():
    """mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI: keep one test's store from catching the next's runs."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def tiny_params(tmp_path_factory):
    from effnet import config
    return config.load(write_tiny_params(tmp_path_factory.mktemp("params") / "params.yaml"))


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory, tiny_params):
    from effnet.stages import demo_data
    return demo_data.run(tiny_params.demo_data, tmp_path_factory.mktemp("demo") / "demo").out


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory, tiny_params, demo_dir):
    from effnet.stages import shard
    return Path(shard.run(tiny_params.shard, demo_dir, tmp_path_factory.mktemp("shards") / "shards").out)


@dataclass
class Pipeline:
    """A workspace where the whole tiny pipeline has run, and what the flow returned."""

    repo: Path
    metrics: dict  # what the flow printed
    log: str  # the flow's stderr: Prefect's log and the stages' output

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.repo / 'mlflow.db'}"

    def published(self, dest: Path) -> Path:
        """A bundle of what `register` published: the model evaluate selected, at the resolution it selected."""
        from effnet import models
        selected = json.loads((self.repo / "metrics/tiny.json").read_text())["selected"]
        model, spec = models.load_bundle(self.repo / "models/tiny" / selected["model"])
        spec = spec.model_copy(update={"preprocessing": spec.preprocessing.at(selected["resolution"])})
        models.save_bundle(model, spec, dest)
        return dest

    def copy(self, dest: Path) -> Path:
        """A copy of the workspace (git, DVC cache, MLflow store), for a test that changes it."""
        shutil.copytree(self.repo, dest, symlinks=True)
        return dest


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """The tiny pipeline, run once per test session as `make demo` runs it: `python flows/pipeline.py` in a fresh git
    repo (a clone of this one with the tiny params) from an empty PREFECT_HOME, so Prefect's temporary server makes
    its first start, each stage a `dvc repro` of dvc.yaml. Tests read it; a test that would change it works on
    `pipeline.copy(...)`."""
    repo = git_workspace(tmp_path_factory.mktemp("pipeline"), PIPELINE_OVERRIDES)
    home = tmp_path_factory.mktemp("prefect-home")
    environ = {**os.environ, "PREFECT_HOME": str(home),
               "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.1",  # tiny stages: sample often enough to log
               "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "1"}
    environ.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)  # the flow's own wait, as a user gets it
    environ.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "flows/pipeline.py"], cwd=repo, env=environ, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return Pipeline(repo, json.loads(proc.stdout), proc.stderr)


@pytest.fixture(scope="module")
def xla_as_tpu():
    """torch_xla's CPU device (PJRT_DEVICE=CPU) standing in for one TPU chip, for the `xla` tests only: Lightning's
    XLAAccelerator counts TPU chips on the PCI bus (and asks the cloud's metadata server), finds none here and refuses
    `accelerator="tpu"`; told there is one, it runs its XLA strategy on `xla:0`, the same lazy tensors and graph
    compilation as on a TPU. The product never pretends: without a TPU, `train.accelerator=tpu` stops in one line."""
    from lightning_fabric.accelerators.xla import XLAAccelerator
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PJRT_DEVICE", "CPU")
        patch.setattr(XLAAccelerator, "is_available", staticmethod(lambda: True))
        patch.setattr(XLAAccelerator, "auto_device_count", staticmethod(lambda: 1))
        yield


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """An empty working directory: MLflow's default store (mlflow.db, mlartifacts/) lands here."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def git_workspace(dest: Path, *overrides: dict) -> Path:
    """A fresh git repo holding the project's tracked files (like a clone) with the tiny params (and OVERRIDES)."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    write_tiny_params(dest / "params.yaml", *overrides)
    (dest / "dvc.lock").unlink(missing_ok=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-qm", "clone"], cwd=dest, check=True)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group it leads (started with start_new_session): it and what it started."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL to PROC and every process under it, whatever process group they are in (torchrun starts its workers
    in sessions of their own): what losing a node does to a job."""
    import psutil
    try:
        procs = [psutil.Process(proc.pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def torchrun(*args: str) -> list[str]:
    """`torchrun ARGS -m effnet`, as a cluster launches the stage on each node."""
    return [str(Path(sys.executable).parent / "torchrun"), *args, "-m", "effnet"]


def train_args(shards, params, *sets: str, out: str = "trained") -> list[str]:
    """`train SHARDS OUT --params PARAMS --variant tiny --set ...`: the arguments of `effnet train` in the tests."""
    return ["train", str(shards), out, "--params", str(params), "--variant", "tiny",
            *[a for s in sets for a in ("--set", s)]]


def result_json(stdout: str) -> dict:
    """The stage result the CLI prints last (indented JSON) from a process's stdout."""
    return json.loads(stdout[stdout.rfind("\n{") + 1:])
