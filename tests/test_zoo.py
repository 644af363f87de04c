"""Every card variant through the whole DAG: `dvc repro` with the 13 card variants in params.yaml on tiny data (a few
images per class at 32 px, a couple of steps each), train -> fixres -> evaluate -> register for each. Slow (tens of
minutes on 2 cores; L2 alone trains 480 M parameters): `make zoo` runs it and prints its time and peak memory."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import mlflow
import pytest
import yaml

from effnet import variants
from tests.conftest import git_workspace

CARD = list(variants.table())
ZOO = {
    "variants": {name: {"model": name} for name in CARD},
    "demo_data": {"classes": 3, "train_per_class": 6, "val_per_class": 2, "image_size": 40},
    "data": {"num_workers": 0, "holdout": 0.0},
    "train": {"img_size": 32, "epochs": 1, "batch_size": 6, "lr": 0.01, "ema_decay": None, "progress_bar": False,
              "log_every_n_steps": 1, "checkpoint_every_n_steps": None},
    "fixres": {"epochs": 1, "batch_size": 6},
    "evaluate": {"batch_size": 6, "sweep": [1.0]},
}


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 16.5 min here: past the suite's 900 s per test
def test_every_card_variant_goes_through_train_fixres_evaluate_register(tmp_path):
    repo = git_workspace(tmp_path)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in ZOO.items():
        params[section] = values if section == "variants" else {**params[section], **values}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=repo, capture_output=True, text=True)
    minutes = (time.monotonic() - start) / 60
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # the largest stage process (KiB)
    print(f"\nzoo: {len(CARD)} variants through dvc repro in {minutes:.1f} min, peak stage RSS {peak_gib:.1f} GiB")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    for name in CARD:
        metrics = json.loads((repo / f"metrics/{name}.json").read_text())
        assert metrics["selected"]["model"] in ("trained", "fixres"), name
        record = json.loads((repo / f"models/{name}/registered.json").read_text())
        version = client.get_model_version(name, record["version"])
        assert version.tags["model"] == name and version.tags["selected_model"] == metrics["selected"]["model"]
        assert version.tags["img_size"] == str(metrics["selected"]["resolution"])
        card = variants.table()[name]
        assert f"| top1 | {card.top1} |" in version.description and f"# {name}" in version.description
    assert len(client.search_registered_models()) == len(CARD)
