"""Noisy Student on real shards: demo images with a quarter of train labeled and the rest unlabeled, a tiny teacher
trained a few steps, evaluated and registered; its pseudo-labels (threshold, balance), the student's mixed stream
(the ratio per batch, exact resume, equal steps on every rank), the student trained and registered with its
provenance, and bad input as one line before any work."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from effnet import config, models, tracking
from effnet.data import mixed_stream, transforms
from effnet.data.manifest import read_manifest
from effnet.data.train_stream import StreamState
from effnet.errors import EffnetError
from effnet.stages import demo_data, evaluate, pseudolabel, register, shard, train
from tests.conftest import REPO, write_tiny_params

STUDENT = {"students": {"tiny_ns": {"phi": -6, "teacher": "tiny"}}, "demo_data": {"labeled": 0.25},
           "pseudolabel": {"threshold": 0.0}, "student": {"ratio": 1.0}}


@pytest.fixture(scope="module")
def ns(tmp_path_factory):
    """Teacher `tiny` trained, evaluated and registered; student `tiny_ns` pseudo-labeled, trained, evaluated and
    registered, all under one pipeline run, in a workspace of its own (its MLflow store)."""
    ws = tmp_path_factory.mktemp("noisy-student")
    mp = pytest.MonkeyPatch()
    mp.chdir(ws)
    mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mp.setenv(tracking.PIPELINE_RUN_ENV, "flow-run-ns")
    params = config.load(write_tiny_params(ws / "params.yaml", STUDENT))
    data = demo_data.run(params.demo_data, ws / "data/demo").out
    shards = Path(shard.run(params.shard, data, ws / "data/shards").out)
    out = {}
    for key in ("tiny", "tiny_ns"):
        models_dir = ws / "models" / key
        pseudo = None
        if key == "tiny_ns":
            out["labels"] = pseudolabel.run(params, key, shards, ws / "models/tiny", ws / "metrics/tiny.json",
                                            ws / "pseudo" / key)
            pseudo = ws / "pseudo" / key
        out[f"train_{key}"] = train.run(params, key, shards, models_dir / "trained", pseudo=pseudo)
        bundles = {"trained": models_dir / "trained"}
        evaluate.run(params, key, shards, bundles, ws / f"metrics/{key}.json", ws / f"plots/{key}.json",
                     ws / f"plots/confusion/{key}.json")
        out[f"register_{key}"] = register.run(params, key, ws / f"metrics/{key}.json", bundles,
                                              models_dir / "registered.json", shards=shards,
                                              plot=ws / f"plots/{key}.json")
    yield dict(ws=ws, params=params, shards=shards, client=mlflow.MlflowClient(f"sqlite:///{ws / 'mlflow.db'}"),
               **out)
    mp.undo()


def table(ns) -> dict:
    return pq.read_table(ns["labels"].table).to_pydict()


def test_the_teacher_labels_every_unlabeled_image_and_balancing_makes_classes_equal(ns):
    shards = ns["shards"]
    unlabeled = read_manifest(shards)["splits"]["unlabeled"]["total"]
    classes = read_manifest(shards)["classes"]
    rows = table(ns)
    info = json.loads(ns["labels"].info.read_text())
    assert ns["labels"].images == unlabeled == info["images"] == 72  # 4 classes x 18 unlabeled
    assert len(set(rows["key"])) == len(rows["key"])  # keyed by sample key
    probs = np.stack([rows[f"p:{c}"] for c in classes], axis=1)
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)  # soft: the teacher's probabilities
    assert [classes[i] for i in probs.argmax(axis=1)] == rows["label"]
    per_class = info["settings"]["per_class_used"]
    assert per_class == 18  # null: the mean count per class past the threshold (72 / 4)
    for c in classes:  # every class the teacher predicts counts alike, with copies where it has fewer
        mine = [n for n, label in zip(rows["copies"], rows["label"]) if label == c]
        assert not mine or sum(mine) == per_class
    assert info["after"] == {c: per_class if info["before"][c] else 0 for c in classes}
    assert sum(info["before"].values()) == 72 and info["teacher"] == "tiny" and info["iteration"] == 1
    assert info["teacher_model"] == "tiny" and info["teacher_version"] == ns["register_tiny"].version


def test_select_keeps_the_most_confident_past_the_threshold_and_repeats_a_short_class(ns):
    rows = table(ns)
    classes = read_manifest(ns["shards"])["classes"]
    probs = np.stack([rows[f"p:{c}"] for c in classes], axis=1).astype(np.float32)
    threshold = float(np.median(probs.max(axis=1)))
    cfg = ns["params"].pseudolabel.model_copy(update={"threshold": threshold, "per_class": 5})
    chosen = pseudolabel.select(probs, cfg)
    confidence, top = probs.max(axis=1), probs.argmax(axis=1)
    assert (confidence[chosen.index] >= threshold).all()
    for c in range(len(classes)):
        past = np.flatnonzero((confidence >= threshold) & (top == c))
        mine = chosen.index[top[chosen.index] == c]
        assert len(mine) == min(5, len(past))
        assert set(confidence[mine]) == set(sorted(confidence[past], reverse=True)[:len(mine)])  # the most confident
        assert chosen.copies[top[chosen.index] == c].sum() == (5 if len(past) else 0)  # repeated up to per_class
    hard = pseudolabel.select(probs, cfg.model_copy(update={"balance": False}))
    assert len(hard.index) == (confidence >= threshold).sum() and (hard.copies == 1).all()
    with pytest.raises(EffnetError, match=r"^pseudolabel.threshold: 0.999 keeps none"):
        pseudolabel.select(probs, cfg.model_copy(update={"threshold": 0.999}))


def test_pseudolabel_logs_histograms_and_the_confidence_plot_nested_under_the_pipeline_run(ns):
    run = ns["client"].get_run(ns["labels"].run_id)
    classes = read_manifest(ns["shards"])["classes"]
    assert {"img_per_s", "kept", *(f"{when}.{c}" for when in ("before", "after") for c in classes)} <= set(
        run.data.metrics)
    assert run.data.params["pseudolabel.labels"] == "soft" and run.data.params["teacher"] == "tiny"
    artifacts = {a.path for a in ns["client"].list_artifacts(run.info.run_id)}
    assert {"pseudolabels.png", "pseudolabel.json"} <= artifacts
    parent = run.data.tags["mlflow.parentRunId"]
    assert ns["client"].get_run(parent).data.tags["effnet.stage"] == "pipeline"
    for key in ("train_tiny", "train_tiny_ns", "register_tiny_ns"):  # teacher, pseudolabel and student: one parent
        assert ns["client"].get_run(ns[key].run_id).data.tags["mlflow.parentRunId"] == parent


def test_the_registered_student_names_its_teacher_iteration_data_and_settings(ns):
    reg = ns["register_tiny_ns"]
    version = ns["client"].get_model_version("tiny_ns", reg.version)
    fingerprint = read_manifest(ns["shards"])["splits"]["unlabeled"]["fingerprint"]
    assert version.tags["noisy_student.teacher"] == "tiny"
    assert version.tags["noisy_student.teacher_model"] == f"tiny/{ns['register_tiny'].version}"
    assert version.tags["noisy_student.iteration"] == "1"
    assert version.tags["noisy_student.unlabeled_fingerprint"] == fingerprint and fingerprint
    assert version.tags["noisy_student.pseudo_labels"] == "soft, threshold 0, balanced to 18 per class"
    assert version.tags["noisy_student.ratio"] == "1"
    assert "## Noisy Student" in version.description and "registered model `tiny` version" in version.description
    teacher = ns["client"].get_model_version("tiny", ns["register_tiny"].version)
    assert not any(k.startswith("noisy_student.") for k in teacher.tags)
    run = ns["client"].get_run(ns["train_tiny_ns"].run_id)
    assert run.data.params["auto_augment"] == "rand-n2-m27-mmax27"  # the paper's noise on the student
    assert run.data.params["drop_rate"] == "0.5" and run.data.params["drop_path_rate"] == "0.2"
    assert run.data.params["noisy_student.teacher"] == "tiny"


def loader(ns, resume=None, workers=0, world=1, rank=0, transform=None):
    params, shards = ns["params"], ns["shards"]
    targets = mixed_stream.read_table(ns["labels"].table, read_manifest(shards)["classes"])
    pre = models.Preprocessing(img_size=32, crop_pct=0.875, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
    tf = transform or transforms.eval_transform(pre, uint8=True)
    return mixed_stream.mixed_loader(shards, targets, 3.0, 0.1, tf, 16, workers, 64, world, seed=3, rank=rank,
                                     resume=resume), targets


def batches(train_loader, n):
    """N batches as (images, targets), advancing the loader's state as a training run does."""
    out = []
    for images, y, advance in itertools.islice(train_loader, n):
        train_loader.state.advance(advance)
        out.append((images.clone(), y.clone()))
    return out


def test_every_batch_mixes_labeled_and_pseudo_labeled_at_the_ratio(ns):
    first, targets = loader(ns)
    table_rows = np.stack([t for t, _ in targets.values()])
    for _, y in batches(first, 3):
        assert y.shape == (16, 4)
        labeled, pseudo = y[:4].numpy(), y[4:].numpy()  # ratio 3: 16 / (1 + 3) labeled, first
        assert np.allclose(labeled.max(axis=1), 0.9 + 0.1 / 4) and np.allclose(labeled.min(axis=1), 0.1 / 4)
        for row in pseudo:  # each a row of the table, as it is
            assert np.isclose(table_rows, row, atol=1e-6).all(axis=1).any()
    samples, labeled = sum(n for _, n in targets.values()), 24  # 4 classes x 6 labeled
    assert len(first) == round(max(labeled * 16 / 4, samples * 16 / 12)) // 16  # one pass over the larger set
    assert len(loader(ns, world=2, rank=0)[0]) == len(loader(ns, world=2, rank=1)[0]) == len(first) // 2


@pytest.mark.parametrize("workers", [0, 1])
def test_a_resumed_mixed_stream_continues_batch_for_batch(ns, workers):
    pre = models.Preprocessing(img_size=32, crop_pct=0.875, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
    tf = transforms.train_transform(pre, "rand-n2-m27-mmax27", uint8=True) if workers else None
    torch.manual_seed(0)
    whole = batches(loader(ns, workers=workers, transform=tf)[0], 9)  # past an epoch's end (6 steps)
    torch.manual_seed(0)
    cut = loader(ns, workers=workers, transform=tf)[0]
    head = batches(cut, 4)
    state = StreamState.from_dict(json.loads(json.dumps(cut.state.to_dict())))  # as a checkpoint keeps it
    assert any(p.unlabeled for p in state.positions.values())
    tail = batches(loader(ns, resume=state, workers=workers, transform=tf)[0], 5)
    for (a, ya), (b, yb) in zip(whole, head + tail):
        assert torch.equal(a, b) and torch.equal(ya, yb)


def test_bad_students_are_one_line_naming_the_key_before_any_work(ns, tmp_path):
    def load(students, variants=None):
        return config.load(write_tiny_params(tmp_path / "p.yaml", {"students": students,
                                                                    **({"variants": variants} if variants else {})}))
    with pytest.raises(EffnetError, match=r"students.s.teacher: 'nope' is not a variant key \(known: tiny, s\)$"):
        load({"s": {"phi": -6, "teacher": "nope"}})
    with pytest.raises(EffnetError, match=r"students.a.teacher: the chain loops \(a -> b -> a\)$"):
        load({"a": {"phi": -6, "teacher": "b"}, "b": {"phi": -6, "teacher": "a"}})
    with pytest.raises(EffnetError, match=r"students.s.teacher: the chain loops \(s -> s\)"):
        load({"s": {"phi": -6, "teacher": "s"}})
    with pytest.raises(EffnetError, match=r"students.s: smaller than its teacher tiny \(width"):
        load({"s": {"phi": -7, "teacher": "tiny"}})
    with pytest.raises(EffnetError, match=r"variants.v.teacher: a student goes under students:"):
        load({}, {"tiny": {"phi": -6}, "v": {"phi": -6, "teacher": "tiny"}})
    chain = load({"s1": {"phi": -6, "teacher": "tiny"}, "s2": {"phi": -5, "teacher": "s1"}})
    assert chain.teachers("s2") == ["s1", "tiny"] and chain.teachers("tiny") == []
    params, ws = ns["params"], ns["ws"]
    other = models.build(params.variant("tiny"), 2)  # a teacher of two classes for a four-class student
    spec = json.loads((ws / "models/tiny/trained/model.json").read_text()) | {"classes": ["a", "b"]}
    teacher = tmp_path / "teacher"
    models.save_bundle(other, models.ModelSpec.model_validate(spec), teacher / "trained")
    (teacher / "registered.json").write_text((ws / "models/tiny/registered.json").read_text())
    with pytest.raises(EffnetError, match=r"^students.tiny_ns.teacher: tiny's classes \(a, b\) are not the student's"):
        pseudolabel.check(params, "tiny_ns", ns["shards"], teacher, ws / "metrics/tiny.json")


def test_a_student_without_unlabeled_shards_is_one_line(ns, shards_dir, tmp_path):
    params, ws = ns["params"], ns["ws"]
    with pytest.raises(EffnetError, match=r"^students.tiny_ns: the shards at .* have no unlabeled images"):
        pseudolabel.check(params, "tiny_ns", shards_dir, ws / "models/tiny", ws / "metrics/tiny.json")
    with pytest.raises(EffnetError, match=r"^students.tiny_ns: the shards at .* have no unlabeled images"):
        train.noisy_student(params, "tiny_ns", shards_dir, ws / "pseudo/tiny_ns")
    with pytest.raises(EffnetError, match=r"^students.tiny_ns: a student trains with --pseudo"):
        train.noisy_student(params, "tiny_ns", ns["shards"], None)
    out = subprocess.run([sys.executable, "-m", "effnet", "pseudolabel", str(ns["shards"]), "models/tiny",
                          "metrics/tiny.json", str(tmp_path / "x"), "--variant", "tiny", "--params",
                          str(ws / "params.yaml")], cwd=ws, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "effnet: error: students.tiny: not a student (pseudolabel runs for the keys of students:, each naming a "
        "teacher)"]


def test_students_get_their_own_dvc_stages_after_their_teacher_and_the_flow_orders_chains(tmp_path):
    from flows import pipeline
    params = config.load(write_tiny_params(tmp_path / "params.yaml", {"students": {
        "s2": {"phi": -5, "teacher": "s1"}, "s1": {"phi": -6, "teacher": "tiny"}}}))
    assert pipeline.in_order(params, ["s2"]) == ["tiny", "s1", "s2"]
    assert pipeline.stages_of(params, "s1")[:2] == ["pseudolabel@s1", "train-student@s1"]
    for name in ("dvc.yaml",):
        (tmp_path / name).write_text((REPO / name).read_text())
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    out = subprocess.run([sys.executable, "-m", "dvc", "dag", "--md", "register-student@s2"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for stage in ("register@tiny", "pseudolabel@s1", "train-student@s1", "register-student@s1",
                  "pseudolabel@s2", "fixres-student@s2", "evaluate-student@s2"):
        assert stage in out.stdout
    assert yaml.safe_load((REPO / "params.yaml").read_text())["students"] == {}  # the demo: no student by default


def test_a_student_trains_under_ddp_with_equal_steps_on_both_ranks(ns, tmp_path):
    """`effnet train` of the student on 2 CPU processes (gloo): each rank's mixed stream runs the same steps, one
    MLflow run, one bundle with its provenance."""
    ws = ns["ws"]
    sets = ["train.accelerator=cpu", "train.devices=2", "train.strategy=ddp", "train.epochs=1"]
    out = subprocess.run([sys.executable, "-m", "effnet", "train", str(ns["shards"]), str(tmp_path / "trained"),
                          "--variant", "tiny_ns", "--pseudo", str(ws / "pseudo/tiny_ns"), "--params",
                          str(ws / "params.yaml"), *[a for s in sets for a in ("--set", s)]],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    targets = mixed_stream.read_table(ns["labels"].table, read_manifest(ns["shards"])["classes"])
    steps = len(mixed_stream.mixed_loader(ns["shards"], targets, 1.0, 0.1, None, 16, 0, 64, world_size=2, rank=0))
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("effnet").experiment_id],
                               "tags.mlflow.runName = 'train@tiny_ns'")  # one, from rank 0 (beside the pipeline's)
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) + 1 == steps
    assert json.loads((tmp_path / "trained/noisy_student.json").read_text())["teacher"] == "tiny"


@pytest.mark.slow
def test_the_flow_runs_a_student_after_its_teacher_and_leaves_dvc_clean(tmp_path_factory):
    """`python flows/pipeline.py` (as `make demo`) with a student in params: its stages run after its teacher's,
    through `dvc repro`, and afterwards `dvc status` is clean."""
    import os

    from tests.conftest import git_workspace
    repo = git_workspace(tmp_path_factory.mktemp("ns-flow"), STUDENT)
    environ = {**os.environ, "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-home"))}
    environ.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "flows/pipeline.py"], cwd=repo, env=environ, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert set(json.loads(proc.stdout)) == {"tiny", "tiny_ns"}
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("effnet").experiment_id],
                              order_by=["attributes.start_time ASC"])
    order = [r.info.run_name for r in runs]
    assert order.index("register@tiny") < order.index("pseudolabel@tiny_ns") < order.index("train@tiny_ns")
    assert order.index("train@tiny_ns") < order.index("register@tiny_ns")
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=repo, capture_output=True,
                            text=True)
    assert json.loads(status.stdout) == {}, status.stdout
    assert client.get_model_version("tiny_ns", "1").tags["noisy_student.teacher_model"] == "tiny/1"
