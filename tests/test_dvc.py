"""DVC as users work with it, on the test session's tiny pipeline run (a copy of its workspace): `dvc push` to the
default local remote, then `git clone` + `dvc pull` restores data, models and metrics byte for byte; `dvc metrics
show`, `dvc plots show` (resolution sweep and confusion matrix) and `dvc exp run -S train.epochs=2` work."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
RESTORED = ["data/demo", "data/shards", "models/tiny/trained", "models/tiny/fixres", "models/tiny/registered.json",
            "metrics/tiny.json", "plots/tiny_resolution.json", "plots/confusion/tiny.json", "plots/train/tiny.json",
            "dvc.lock"]


def dvc(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def digests(root: Path, rel: str) -> dict[str, str]:
    path = root / rel
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def pushed(tmp_path_factory, pipeline):
    """The tiny pipeline's workspace (a copy), its results committed to git and pushed to the default remote."""
    repo = pipeline.copy(tmp_path_factory.mktemp("dvc") / "repo")
    subprocess.run(GIT + ["add", "-A"], cwd=repo, check=True)
    subprocess.run(GIT + ["commit", "-qm", "repro"], cwd=repo, check=True)
    ok(dvc("push", cwd=repo))
    return repo


def test_push_then_pull_into_a_fresh_clone_restores_everything(pushed, tmp_path):
    store = pushed / ".dvcstore"  # the default remote: `local` -> ../.dvcstore, relative to .dvc/
    assert store.is_dir() and any(p.is_file() for p in store.rglob("*"))
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(pushed), str(clone)], check=True)
    assert not (clone / "data").exists() and not (clone / "models").exists()
    # The clone's remote resolves to its own (empty) .dvcstore: point it at the shared store, as a team member
    # would at a shared folder or bucket (.dvc/config.local, not committed).
    ok(dvc("remote", "modify", "--local", "local", "url", str(store), cwd=clone))
    ok(dvc("pull", cwd=clone))
    for rel in RESTORED:
        original = digests(pushed, rel)
        assert original, rel
        assert digests(clone, rel) == original, rel
    assert json.loads(ok(dvc("status", "--json", cwd=clone))) == {}
    assert "Running stage" not in ok(dvc("repro", "--dry", cwd=clone))


def test_metrics_and_plots_show(pushed, tmp_path):
    shown = json.loads(ok(dvc("metrics", "show", "--json", cwd=pushed)))
    metrics = shown[""]["data"]["metrics/tiny.json"]["data"]
    assert metrics == json.loads((pushed / "metrics/tiny.json").read_text())
    plots = json.loads(ok(dvc("plots", "show", "--json", cwd=pushed)))
    assert not plots.get("errors"), plots["errors"]
    shown_plots = plots["data"]  # plot id -> renderers; each file drawn once, by its folder's definition
    templates = {pid: json.dumps(entries) for pid, entries in shown_plots.items()}
    # (the repo's own committed plots of other variants may be there too)
    resolution = [pid for pid in shown_plots if pid.endswith("plots/tiny_resolution.json")]
    confusion = [pid for pid in shown_plots if pid.endswith("plots/confusion/tiny.json")]
    curves = [pid for pid in shown_plots if pid.endswith("plots/train/tiny.json")]
    assert len(resolution) == 1 and len(confusion) == 1 and len(curves) == 1, list(shown_plots)
    assert '"fixres"' in templates[resolution[0]] and '"trained"' in templates[resolution[0]]
    assert '"predicted"' in templates[confusion[0]] and '"actual"' in templates[confusion[0]]
    assert '"field": "epoch"' in templates[curves[0]] and '"field": "val_top1"' in templates[curves[0]]
    html = tmp_path / "html"
    ok(dvc("plots", "show", "-o", str(html), cwd=pushed))
    assert (html / "index.html").stat().st_size > 0


@pytest.mark.slow  # a second training run: ~100 s here
def test_exp_run_with_a_param_override(pushed):
    """Last in the module: it changes the workspace (params.yaml, outputs)."""
    before = digests(pushed, "models/tiny/trained")
    out = ok(dvc("exp", "run", "-S", "train.epochs=2", cwd=pushed))
    assert "Running stage 'train@tiny'" in out
    assert yaml.safe_load((pushed / "params.yaml").read_text())["train"]["epochs"] == 2
    assert ok(dvc("exp", "list", "--name-only", cwd=pushed)).split()  # the experiment is kept as a git ref
    params = json.loads(ok(dvc("params", "diff", "--json", cwd=pushed)))
    epochs = params["params.yaml"]["train.epochs"]
    assert (epochs["old"], epochs["new"]) == (1, 2)
    assert digests(pushed, "models/tiny/trained") != before
    json.loads(ok(dvc("metrics", "diff", "--json", cwd=pushed)))  # the tiny model's figures may not move
    assert json.loads(ok(dvc("status", "--json", cwd=pushed))) == {}
