"""The two drivers end to end in a fresh git repo (a clone of this one with tiny params):
`dvc repro` runs everything and a second run does nothing; the Prefect flow leaves the same clean state."""
from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import numpy as np
import pytest

from tests.conftest import git_workspace


def dvc(*args, cwd):
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)


def assert_clean(repo):
    status = dvc("status", "--json", cwd=repo)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout) == {}, status.stdout


def test_dvc_repro_runs_everything_then_nothing(tmp_path):
    repo = git_workspace(tmp_path)
    first = dvc("repro", cwd=repo)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in ("demo-data", "shard", "train@tiny", "fixres@tiny", "evaluate@tiny", "register@tiny"):
        assert f"Running stage '{stage}'" in first.stdout
    metrics = json.loads((repo / "metrics/tiny.json").read_text())
    assert set(metrics) == {"trained", "fixres"}
    assert_clean(repo)
    second = dvc("repro", cwd=repo)
    assert second.returncode == 0 and "Running stage" not in second.stdout, second.stdout
    shown = dvc("metrics", "show", "--json", cwd=repo)
    assert "fixres" in shown.stdout


def test_prefect_flow_runs_the_dvc_stages_and_registers(tmp_path, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline

    repo = git_workspace(tmp_path)
    monkeypatch.chdir(repo)
    with prefect_test_harness():
        metrics = pipeline(workspace=str(repo))
    assert metrics["tiny"] == json.loads((repo / "metrics/tiny.json").read_text())
    assert_clean(repo)
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/tiny@champion")
    probs = model.predict(np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8))
    assert probs.shape == (2, 4)


def test_flow_rejects_an_unknown_variant_before_any_work(tmp_path):
    from prefect.testing.utilities import prefect_test_harness

    from effnet.errors import EffnetError
    from flows.pipeline import pipeline

    repo = git_workspace(tmp_path)
    with prefect_test_harness(), pytest.raises(EffnetError, match="variants.nope"):
        pipeline(workspace=str(repo), variants=["nope"])
    assert not (repo / "data").exists()
