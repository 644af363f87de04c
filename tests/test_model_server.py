"""The registered model served for real: `make serve-model`, run with the venv's bin not on PATH (the target puts it
there; `mlflow models serve` alone exits 127 then), starts `mlflow models serve` on the pipeline's champion. JPEG
files sent over HTTP as base64 get the probabilities `effnet predict` gives in-process for the same files; bad
requests get a 4xx with a message naming the problem, and the server stays up."""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from effnet.config import PredictConfig
from effnet.stages import predict
from tests.conftest import REPO, free_port, stop


def post(url: str, payload) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_until_up(url: str, proc: subprocess.Popen, log, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"server not up after {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(pipeline, tmp_path_factory):
    """One server for the module's tests."""
    port, log = free_port(), tmp_path_factory.mktemp("server") / "server.log"
    env = os.environ | {"PATH": "/usr/bin:/bin", "MLFLOW_TRACKING_URI": pipeline.tracking_uri}
    proc = subprocess.Popen(["make", "-C", str(REPO), "serve-model", "MODEL=models:/tiny@champion", f"PORT={port}"],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


# predict writes probabilities to 6 decimals, and float32 on a CPU differs in the 6th digit between the two paths'
# kernels (oneDNN picks them by the CPU; 3.1e-6 apart on an AMD EPYC family 26): one probability within 1e-5.
SAME_PROB = 1e-5


def test_served_champion_answers_jpeg_files_as_predict_does(server, pipeline, tmp_path, monkeypatch):
    files = sorted((pipeline.repo / "data/demo/val").rglob("*.jpg"))[::5]
    (tmp_path / "jpegs").mkdir()
    for f in files:
        shutil.copy(f, tmp_path / "jpegs" / f"{f.parent.name}-{f.name}")
    files = sorted((tmp_path / "jpegs").iterdir())
    encoded = [base64.b64encode(f.read_bytes()).decode() for f in files]
    status, answer = post(f"{server}/invocations", {"inputs": encoded})
    assert status == 200, answer
    same = post(f"{server}/invocations", {"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}})
    assert same == (200, answer)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", pipeline.tracking_uri)
    cfg = PredictConfig(topk=len(answer["predictions"][0]), num_workers=0, device="cpu")
    predict.run(cfg, "models:/tiny@champion", tmp_path / "jpegs", tmp_path / "rows.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rows] == [str(f) for f in files] and len(answer["predictions"]) == len(files)
    for row, probs in zip(rows, answer["predictions"]):
        ranked = sorted(probs.items(), key=lambda kv: -kv[1])
        assert [row[f"class_{i + 1}"] for i in range(len(ranked))] == [c for c, _ in ranked]
        np.testing.assert_allclose([row[f"prob_{i + 1}"] for i in range(len(ranked))], [p for _, p in ranked],
                                   atol=SAME_PROB)
    spread = np.array([list(p.values()) for p in answer["predictions"]]).std(axis=0).max()
    assert spread > 100 * SAME_PROB, "answers differ from image to image by far more than the tolerance"


@pytest.mark.parametrize("payload, says", [
    ({"inputs": ["a caption, not an image"]}, "item 0: neither a file nor base64 image data"),
    ({"inputs": [base64.b64encode(b"GIF89a but not really").decode()]}, "item 0: not an image"),
    ({"inputs": [[[[1, 2]]]]}, "item 0: an image array must be HxWx3"),
    ({"inputs": [[[1, 2], [3, 4]]]}, "expected a batch"),
    ({"inputs": [[1, 2], [3, 4]]}, "expected a batch"),
    ({"inputs": []}, "empty batch"),
    ({"dataframe_split": {"columns": ["image"], "data": []}}, "empty batch"),
    ({"dataframe_split": {"columns": ["a", "b"], "data": [["x", "y"]]}}, "'image'"),
])
def test_bad_requests_get_a_4xx_naming_the_problem_and_the_server_stays_up(server, payload, says):
    status, answer = post(f"{server}/invocations", payload)
    assert 400 <= status < 500 and says in answer["message"], (status, answer)
    with urllib.request.urlopen(f"{server}/ping", timeout=5) as r:
        assert r.status == 200
