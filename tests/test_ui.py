"""The MLflow UI for real: a `mlflow server` on 127.0.0.1 (sqlite in tmp), the register stage run against it, then the
UI opened in headless Chromium (Debian's `chromium`): the experiment, its runs and the registered model with its
alias must be on the rendered pages. Screenshots land in the test's tmp dir (printed; kept by pytest)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from effnet import models, tracking
from effnet.data.manifest import read_manifest
from effnet.stages import register
from tests.conftest import free_port, stop

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
         "--window-size=1440,1000"]


def chromium(url: str, tmp_path, *action: str, budget_ms: int = 20000) -> str:
    """Load URL in a fresh headless Chromium, let the React app render (virtual time), then do ACTION."""
    profile = tmp_path / f"profile-{time.monotonic_ns()}"
    out = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
                          *action, url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def rendered(url: str, tmp_path, *needles: str) -> str:
    """The page's DOM once it shows every needle: the app fetches its data after load, which takes longer on a
    busy machine, so retry with a growing virtual-time budget before giving up (the caller asserts)."""
    for budget_ms in (20000, 45000, 90000):
        dom = chromium(url, tmp_path, "--dump-dom", budget_ms=budget_ms)
        if all(n in dom for n in needles):
            break
    return dom


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    log = tmp_path / "mlflow-server.log"
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > end:
                pytest.fail(f"mlflow server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:  # its own process group: the server and the uvicorn workers it starts
        stop(proc)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_ui_shows_experiment_runs_and_registered_model_with_alias(mlflow_server, tiny_params, shards_dir,
                                                                 tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv(tracking.PIPELINE_RUN_ENV, "ui-test")
    variant = tiny_params.variant("tiny")
    classes = read_manifest(shards_dir)["classes"]
    model = models.build(variant, len(classes))
    spec = models.ModelSpec(variant="tiny", phi=variant.phi, classes=classes,
                            preprocessing=models.preprocessing(model, variant, 40))
    models.save_bundle(model, spec, tmp_path / "fixres")
    m = {f"res{s}": {"top1": 42.0, "top5": 80.0} for s in (32, 40)}
    selected = {"model": "fixres", "resolution": 40, "val_top1": 42.0, "val_top5": 80.0}
    (tmp_path / "m.json").write_text(json.dumps({"fixres": m, "selected": selected}))
    record = register.run(tiny_params, "tiny", tmp_path / "m.json", {"fixres": tmp_path / "fixres"},
                          tmp_path / "rec.json", shards=shards_dir)
    assert record.promoted is True
    experiment_id = tracking.experiment(tiny_params.mlflow.experiment)

    # The experiment lists the pipeline run as one (collapsed) parent row; the stage's run has its own page.
    runs_page = rendered(f"{mlflow_server}/#/experiments/{experiment_id}/runs", tmp_path, "effnet", "pipeline ui-test")
    assert "effnet" in runs_page and "pipeline ui-test" in runs_page, runs_page[-3000:]
    run_page = rendered(f"{mlflow_server}/#/experiments/{experiment_id}/runs/{record.run_id}", tmp_path,
                        "register@tiny")
    assert "register@tiny" in run_page, run_page[-3000:]
    model_page = rendered(f"{mlflow_server}/#/models/tiny", tmp_path, "tiny", "champion", "challenger")
    assert "tiny" in model_page and "champion" in model_page and "challenger" in model_page, model_page[-3000:]
    version_page = rendered(f"{mlflow_server}/#/models/tiny/versions/{record.version}", tmp_path,
                            "measured_top1", "Preprocessing")
    assert "measured_top1" in version_page and "Preprocessing" in version_page, version_page[-3000:]

    for name, page in [("runs", f"#/experiments/{experiment_id}/runs"), ("model", "#/models/tiny")]:
        shot = tmp_path / f"mlflow-ui-{name}.png"
        chromium(f"{mlflow_server}/{page}", tmp_path, f"--screenshot={shot}")
        assert shot.is_file() and shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")
    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_server
