"""Shared fixtures: tiny params and data, built once per session with the real stages; every test runs in a
temporary workspace so MLflow's embedded store and DVC state never touch the repo."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Offline and local, as `make` sets them; stages started as subprocesses find `effnet` beside this python.
os.environ.update(DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", PREFECT_SERVER_ANALYTICS_ENABLED="false")
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


def write_tiny_params(path: Path) -> Path:
    """The repo's params.yaml (every section, as DVC tracks them) shrunk by TINY_OVERRIDES."""
    import yaml
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in TINY_OVERRIDES.items():
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
    from effnet.data import demo
    out = tmp_path_factory.mktemp("demo") / "demo"
    demo.run(tiny_params.demo_data, out)
    return out


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory, tiny_params, demo_dir):
    from effnet.data import shard
    out = tmp_path_factory.mktemp("shards") / "shards"
    shard.run(tiny_params.shard, demo_dir, out)
    return out


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """An empty working directory: MLflow's default store (mlflow.db, mlartifacts/) lands here."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def git_workspace(dest: Path) -> Path:
    """A fresh git repo holding the project's tracked files (like a clone) with the tiny params."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    write_tiny_params(dest / "params.yaml")
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
