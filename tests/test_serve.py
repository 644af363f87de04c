"""The scheduled deployment for real: a `prefect server` on 127.0.0.1, `flows/serve.py` serving the deployment in a
fresh workspace, a run triggered with `prefect deployment run`, Completed, with a new model version registered and
tagged with the flow run. Serve is stopped with SIGTERM before the server."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest

from tests.conftest import REPO, free_port, git_workspace, stop



def test_overrides_are_validated_then_written_into_params_yaml_keeping_comments(tmp_path):
    from effnet import config
    from effnet.errors import EffnetError
    from flows.pipeline import apply_overrides

    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    with pytest.raises(EffnetError, match="train.nope"):
        apply_overrides(params, ["train.nope=1"])
    assert params.read_text() == (REPO / "params.yaml").read_text()  # untouched
    apply_overrides(params, ["train.epochs=3", "fixres.scale=1.5"])
    text = params.read_text()
    assert "# Every knob of the pipeline" in text and "demo: null trains at the variant's own resolution" in text
    loaded = config.load(params)
    assert loaded.train.epochs == 3 and loaded.fixres.scale == 1.5 and loaded.train.img_size == 64


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def wait_for(what: str, check, timeout: float, proc=None, log=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.returncode}\n{log.read_text()[-3000:] if log else ''}")
        try:
            value = check()
            if value:
                return value
        except Exception:
            pass
        time.sleep(2)
    pytest.fail(f"timed out waiting for {what}\n{log.read_text()[-3000:] if log else ''}")


@pytest.mark.slow
def test_served_deployment_runs_on_trigger_and_registers_a_version(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = os.environ | {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
                        "PREFECT_LOGGING_LEVEL": "INFO"}
    (tmp_path / "ws").mkdir()
    repo = git_workspace(tmp_path / "ws")
    prefect = [sys.executable, "-m", "prefect"]
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    server = subprocess.Popen(prefect + ["server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=server_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    serve = None
    try:
        wait_for("prefect server", lambda: get_json(f"{api}/health") is True, 180, server, server_log)
        serve = subprocess.Popen([sys.executable, str(REPO / "flows/serve.py"), "--name", "test", "--cron", "0 0 1 1 *",
                                  "--workspace", str(repo)],
                                 cwd=repo, env=env, stdout=serve_log.open("w"), stderr=subprocess.STDOUT,
                                 start_new_session=True)
        wait_for("the deployment", lambda: get_json(f"{api}/deployments/name/effnet-pipeline/test")["id"],
                 120, serve, serve_log)
        deployment = get_json(f"{api}/deployments/name/effnet-pipeline/test")
        assert deployment["paused"] is False and deployment["schedules"][0]["schedule"]["cron"] == "0 0 1 1 *"
        triggered = subprocess.run(prefect + ["deployment", "run", "effnet-pipeline/test"], env=env,
                                   capture_output=True, text=True, timeout=120)
        assert triggered.returncode == 0, triggered.stdout + triggered.stderr
        run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", triggered.stdout).group(1)

        def finished():
            state = get_json(f"{api}/flow_runs/{run_id}")["state"]
            return state["type"] if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        final = wait_for("the flow run", finished, 540, serve, serve_log)
        assert final == "COMPLETED", serve_log.read_text()[-5000:]
    finally:
        if serve is not None:
            stop(serve)  # before the server, or serve's shutdown hooks hit a dead API
        stop(server)
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    version = client.get_model_version_by_alias("tiny", "champion")
    assert version.tags["effnet.pipeline_run"] == run_id
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["effnet"], filter_string=f"tags.`effnet.pipeline_run` = '{run_id}'")
    assert "register@tiny" in set(runs["tags.mlflow.runName"])  # the stages' runs of this flow run, as one unit
