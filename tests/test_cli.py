"""Bad input stops a stage before any work with one line naming the culprit, and no traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO, write_tiny_params


def effnet(*args, cwd):
    return subprocess.run([sys.executable, "-m", "effnet", *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize("args, culprit", [
    (["--set", "train.epochs=many"], "train.epochs"),
    (["--set", "train.epochs_typo=3"], "train.epochs_typo"),
    (["--set", "variants.tiny.model=tf_efficientnet_b99"], "variants.tiny"),
    (["--set", "variants.tiny.phi=-4", "--set", "variants.tiny.model=tf_efficientnet_b0"], "variants.tiny"),
    (["--params", "missing.yaml"], "missing.yaml"),
])
def test_bad_params_fail_in_one_line_naming_the_key(tmp_path, args, culprit):
    write_tiny_params(tmp_path / "params.yaml")
    result = effnet("train", "shards", "out", "--variant", "tiny", *args, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and culprit in lines[0] and lines[0].startswith("effnet: error:"), result.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_variant_key_and_missing_data_name_the_culprit(tmp_path):
    write_tiny_params(tmp_path / "params.yaml")
    result = effnet("train", "shards", "out", "--variant", "nope", cwd=tmp_path)
    assert result.returncode == 2 and "variants.nope" in result.stderr and "Traceback" not in result.stderr
    result = effnet("shard", "no/such/folder", "out", cwd=tmp_path)
    assert result.returncode == 2 and "no/such/folder" in result.stderr and "Traceback" not in result.stderr


def test_repo_params_yaml_is_valid():
    from effnet import config
    params = config.load(REPO / "params.yaml")
    assert params.variants and all(params.variant(k) for k in params.variants)


@pytest.mark.parametrize("given", [{}, {"num_workers": "auto"}])
def test_auto_loader_workers_are_one_per_usable_core_at_most_8_set_or_left_out(given):
    """`data.num_workers: auto` and the key left out (params built in code) both come to a count, never the string."""
    import os

    from effnet.config import DataConfig
    assert DataConfig(**given).num_workers == min(8, len(os.sched_getaffinity(0)))
    assert DataConfig(num_workers=0).num_workers == 0


def test_train_hands_itself_to_the_launcher_and_waits(tmp_path, monkeypatch):
    """$EFFNET_LAUNCHER (here a script that records how it was called): `effnet train` checks its params, runs
    `python -m effnet train ...` through it, without the variable (its processes do not launch again), and
    returns its exit status."""
    from effnet import cli
    params = write_tiny_params(tmp_path / "params.yaml")
    script = tmp_path / "launch.sh"
    script.write_text('#!/bin/sh\necho "$@" > called.txt\necho "${EFFNET_LAUNCHER:-unset}" >> called.txt\nexit 7\n')
    script.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EFFNET_LAUNCHER", f"{script} --nodes 2")
    argv = ["train", "shards", "out", "--params", str(params), "--variant", "tiny", "--set", "train.epochs=2"]
    assert cli.main(argv) == 7
    args, launcher_env = (tmp_path / "called.txt").read_text().splitlines()
    assert args == " ".join(["--nodes", "2", sys.executable, "-m", "effnet", *argv]) and launcher_env == "unset"
    (tmp_path / "called.txt").unlink()
    assert cli.main([*argv, "--set", "train.epochs=0"]) == 2  # bad params: nothing launched
    assert not (tmp_path / "called.txt").exists()
