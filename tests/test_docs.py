"""The documentation site: its generated pages and pictures match their sources (docs/gen.py --check), it builds with
`mkdocs build --strict`, where a link to a missing page or anchor fails, and `make docs` serves it on 127.0.0.1 or
says in one line that the port is taken."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import REPO, free_port, stop

MKDOCS = [sys.executable, "-m", "mkdocs"]
# Without make's own variables: under `make test` an inner make would report as make[1].
QUIET = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")} | {
    "NO_MKDOCS_2_WARNING": "1"}


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("docs_gen", REPO / "docs/gen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sources_copy(dest):
    """What docs/gen.py reads, copied: the docs, params.yaml, dvc.yaml, the Makefile, the committed run's files,
    as a git and DVC repository (DVC resolves the DAG's picture)."""
    for rel in ("docs", "metrics", "plots", ".dvc"):
        shutil.copytree(REPO / rel, dest / rel)
    for rel in ("mkdocs.yml", "params.yaml", "dvc.yaml", "Makefile", ".dvcignore"):
        shutil.copy2(REPO / rel, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def test_the_generated_pages_and_pictures_are_current(gen):
    """Run `make docs-gen` and commit what it wrote when this fails."""
    assert gen.stale(REPO, write=False) == []


def test_a_changed_source_makes_what_it_feeds_stale_until_regenerated(gen, tmp_path):
    root = sources_copy(tmp_path)
    assert gen.stale(root, write=False) == []
    key = "tf_efficientnet_tiny"
    sweep = root / f"plots/{key}_resolution.json"
    rows = json.loads(sweep.read_text())
    rows[0]["fixres"] += 1.0
    sweep.write_text(json.dumps(rows))
    (root / "params.yaml").write_text((root / "params.yaml").read_text().replace("epochs: 34", "epochs: 35"))
    page = root / "docs/variants.md"
    page.write_text(page.read_text().replace("| b0 | 224 |", "| b0 | 225 |"))  # a generated part edited by hand
    (root / "plots/train").mkdir(exist_ok=True)  # a run with training curves gets their picture
    (root / f"plots/train/{key}.json").write_text(json.dumps(
        [{"epoch": e, "train_loss": 2.0 / e, "val_top1": 30.0 + e} for e in (1, 2, 3)]))
    assert sorted(gen.stale(root, write=False)) == sorted([
        f"docs/img/{key}_resolution.png", "docs/quickstart.md", "docs/reference/params.md", "docs/variants.md",
        f"docs/img/{key}_train.png"])
    assert gen.stale(root, write=True)
    assert gen.stale(root, write=False) == []
    assert f"img/{key}_train.png" in (root / "docs/quickstart.md").read_text()
    assert "| b0 | 224 |" in page.read_text()


def test_the_check_names_what_is_stale_in_one_line(tmp_path):
    root = sources_copy(tmp_path)
    page = root / "docs/reference/params.md"
    page.write_text(page.read_text().replace("Training epochs.", "Epochs."))  # inside its generated part
    done = subprocess.run([sys.executable, str(REPO / "docs/gen.py"), "--check", "--root", str(root)],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.splitlines() == ["docs/gen.py: stale (run `make docs-gen`): docs/reference/params.md"]


def test_the_site_builds_strictly(tmp_path):
    done = subprocess.run(MKDOCS + ["build", "--strict", "-d", str(tmp_path / "site")], cwd=REPO, env=QUIET,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for page in ("quickstart", "own-data", "pipeline", "variants", "fixres", "scale-out", "registry", "reproduce",
                 "performance", "reference/params", "reference/commands", "reference/layout"):
        assert (tmp_path / "site" / page / "index.html").is_file(), page
    assert not (tmp_path / "site/gen.py").exists()


def test_a_link_to_a_missing_page_or_anchor_fails_the_build(tmp_path):
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copy2(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    index = tmp_path / "docs/index.md"
    index.write_text(index.read_text() + "\n[gone](nope.md), [no anchor](pipeline.md#no-such-section)\n")
    done = subprocess.run(MKDOCS + ["build", "--strict", "-d", str(tmp_path / "site")], cwd=tmp_path, env=QUIET,
                          capture_output=True, text=True)
    assert done.returncode != 0
    assert "contains a link 'nope.md', but the target is not found" in done.stderr
    assert "does not contain an anchor '#no-such-section'" in done.stderr


def test_make_docs_serves_the_site_on_127_0_0_1(tmp_path):
    port = free_port()
    log = tmp_path / "docs.log"
    proc = subprocess.Popen(["make", "-s", "-o", "install", "docs", f"DOCS_PORT={port}"], cwd=REPO, env=QUIET,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, page = time.monotonic() + 120, None
        while page is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/quickstart/", timeout=5) as r:
                    page = r.read().decode()
            except OSError:
                time.sleep(0.5)
        assert page is not None, log.read_text()[-3000:]
        assert "<title>Quickstart - effnet</title>" in page and "make demo" in page
    finally:
        stop(proc)


def test_make_docs_on_a_taken_port_says_so_in_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(["make", "-s", "-o", "install", "docs", f"DOCS_PORT={port}"], cwd=REPO, env=QUIET,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    ours = [line for line in done.stderr.splitlines() if not line.startswith("make: ***")]  # make's own trailer
    assert ours == [f"make docs: port {port} on 127.0.0.1 is taken; choose another: make docs DOCS_PORT=8001"]
