"""`effnet predict` through its stage function and CLI, with a real tiny timm model: every kind of source, every
output format, bad files as rows with a reason, batches and loader workers that change nothing, the model's own
preprocessing, registry URIs that give the bundle's rows, and bad input as one line before any work."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from io import StringIO
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from effnet import cli, models, onnx_export, tables
from effnet.config import PredictConfig
from effnet.data import images, transforms
from effnet.data.manifest import read_manifest
from effnet.stages import predict

CFG = PredictConfig(batch_size=4, num_workers=0, topk=3, device="cpu")
BAD = {"notes.txt": "not an image", "broken.jpg": "corrupt image", "empty.jpg": "empty file"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread (with more, OpenMP spin-waits whenever other processes share the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_bundle(dest: Path, classes: list[str], size: int = 40) -> Path:
    """A tiny model with random weights that predicts like a trained one (`models.calibrate`)."""
    variant = models.variants.resolve(None, -6)
    torch.manual_seed(0)
    model = models.build(variant, len(classes))
    spec = models.ModelSpec(variant="tiny", phi=variant.phi, classes=classes,
                            preprocessing=models.preprocessing(model, variant, size))
    batches = [onnx_export.normalised(spec, onnx_export.synthetic(8, size, seed)) for seed in range(3)]
    models.save_bundle(models.calibrate(model, batches), spec, dest)
    return dest


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, shards_dir):
    return tiny_bundle(tmp_path_factory.mktemp("predict") / "bundle", read_manifest(shards_dir)["classes"])


@pytest.fixture(scope="module")
def pics(tmp_path_factory, demo_dir):
    """A folder tree: JPEGs at two depths, a PNG, a hidden file (left out) and three bad files (rows with a reason)."""
    root = tmp_path_factory.mktemp("pics") / "pics"
    jpegs = sorted((demo_dir / "val").rglob("*.jpg"))[::4][:6]
    (root / "a/b").mkdir(parents=True)
    for i, src in enumerate(jpegs):
        shutil.copy(src, root / ("a" if i % 2 else "a/b") / f"{i}.jpg")
    Image.open(jpegs[0]).save(root / "a/b/png.png")
    shutil.copy(jpegs[1], root / ".hidden.jpg")
    (root / "notes.txt").write_text("not a picture")
    (root / "broken.jpg").write_bytes(jpegs[2].read_bytes()[:-200])  # truncated
    (root / "empty.jpg").write_bytes(b"")
    return root


def rows(cfg: PredictConfig, model, source, tmp_path: Path, name: str = "out.csv") -> pd.DataFrame:
    result = predict.run(cfg, str(model), source, tmp_path / name)
    assert result.images == len(table := read(tmp_path / name))
    return table


def read(path: Path) -> pd.DataFrame:
    fmt = tables.FORMATS[path.suffix]
    if fmt == "parquet":
        return pd.read_parquet(path)
    if fmt == "jsonl":
        return pd.read_json(path, lines=True, dtype=False)
    return pd.read_csv(path, sep="\t" if fmt == "tsv" else ",", keep_default_na=False, na_values=[""])


def listed(root: Path) -> list[str]:
    """The folder's files in predict's order (sorted walk, hidden ones left out)."""
    out = []
    for folder, subs, files in os.walk(root):
        subs[:] = sorted(s for s in subs if not s.startswith("."))
        out += [str(Path(folder) / f) for f in sorted(files) if not f.startswith(".")]
    return out


def test_folder_gives_one_row_per_file_in_order_with_reasons_for_bad_ones(bundle, pics, tmp_path):
    out = rows(CFG, bundle, pics, tmp_path)
    assert list(out["path"]) == listed(pics) and ".hidden" not in "".join(out["path"])
    bad = out[out["error"].notna()]
    assert {Path(p).name: e.split(":")[0].split(" (")[0] for p, e in zip(bad["path"], bad["error"])} == BAD
    assert bad[["class_1", "prob_1"]].isna().all().all()
    good = out[out["error"].isna()]
    assert len(good) == 7 and list(good.columns) == ["path", "class_1", "prob_1", "class_2", "prob_2", "class_3",
                                                     "prob_3", "error"]
    probs = good[["prob_1", "prob_2", "prob_3"]].to_numpy()
    assert (np.diff(probs, axis=1) <= 0).all() and (probs.sum(axis=1) <= 1 + 1e-5).all()
    assert good["class_1"].nunique() > 1, "a calibrated model tells the images apart"


def test_rows_are_the_models_own_preprocessing_and_softmax(bundle, pics, tmp_path):
    """Each image through timm's float eval transform at the bundle's resolution, by hand, gives the same top-k."""
    out = rows(CFG.model_copy(update={"topk": 4}), bundle, pics, tmp_path).set_index("path")
    model, spec = models.load_bundle(bundle)
    transform = transforms.eval_transform(spec.preprocessing)
    for path in listed(pics):
        if Path(path).name in BAD:
            continue
        with torch.inference_mode():
            probs = model(transform(images.read(path))[None]).softmax(1)[0]
        top = probs.topk(4)
        row = out.loc[path]
        assert [row[f"class_{i + 1}"] for i in range(4)] == [spec.classes[j] for j in top.indices]
        np.testing.assert_allclose([row[f"prob_{i + 1}"] for i in range(4)], top.values, atol=1e-5)


def test_batch_size_and_loader_workers_change_nothing(bundle, pics, tmp_path):
    alone = rows(CFG.model_copy(update={"batch_size": 5}), bundle, pics, tmp_path, "alone.csv")
    workers = rows(CFG.model_copy(update={"batch_size": 2, "num_workers": 2}), bundle, pics, tmp_path, "w.csv")
    pd.testing.assert_frame_equal(alone, workers, check_exact=False, atol=1e-5)  # classes exact, probabilities
    # to float rounding: oneDNN's kernels vary with the batch size


def test_tables_files_and_shards_are_sources_too(bundle, pics, demo_dir, shards_dir, tmp_path):
    folder = rows(CFG, bundle, pics, tmp_path, "folder.csv").set_index("path")
    relative = [os.path.relpath(p, pics) for p in listed(pics)]
    (pics.parent / "list.csv").write_text("label,path\n" + "".join(f"x,pics/{r}\n" for r in relative) + "\n")
    (pics.parent / "list.tsv").write_text("".join(f"{pics / r}\tx\n" for r in relative))
    by_csv = rows(CFG, bundle, pics.parent / "list.csv", tmp_path, "csv.csv")
    assert list(by_csv["path"]) == [f"pics/{r}" for r in relative]  # named as the table writes them
    pd.testing.assert_frame_equal(by_csv.drop(columns="path"), folder.reset_index(drop=True))
    by_tsv = rows(CFG, bundle, pics.parent / "list.tsv", tmp_path, "tsv.csv")
    pd.testing.assert_frame_equal(by_tsv, folder.reset_index())  # same batches as the folder's: exact
    one = rows(CFG, bundle, pics / "a/1.jpg", tmp_path, "one.csv")
    assert len(one) == 1 and one.iloc[0]["class_1"] == folder.loc[str(pics / "a/1.jpg"), "class_1"]
    # The shards hold the demo JPEGs byte for byte: the same predictions, named <split>/<key>.
    sharded = rows(CFG, bundle, shards_dir, tmp_path, "shards.csv")
    assert len(sharded) == sum(s["total"] for s in read_manifest(shards_dir)["splits"].values())
    assert sharded["path"].str.match(r"^(train|val)/\d{9}$").all() and sharded["error"].isna().all()
    demo = rows(CFG, bundle, demo_dir, tmp_path, "demo.csv")
    by_bytes = {f"{split}/{key}": digest for split, key, digest in shard_digests(shards_dir)}
    sharded["sha"] = sharded["path"].map(by_bytes)
    demo["sha"] = demo["path"].map(lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest())
    joined = sharded.merge(demo, on="sha", suffixes=("", "_demo"))
    assert len(joined) == len(sharded) == len(demo)
    assert (joined["class_1"] == joined["class_1_demo"]).all()
    np.testing.assert_allclose(joined["prob_1"], joined["prob_1_demo"], atol=1e-5)  # batch neighbours: 6th digit


def shard_digests(shards: Path):
    """(split, key, sha256 of the JPEG) of every sample in the shards."""
    for split, entry in read_manifest(shards)["splits"].items():
        for s in entry["shards"]:
            with tarfile.open(shards / s["name"]) as tar:
                for m in tar.getmembers():
                    if m.name.endswith(".jpg"):
                        yield split, m.name[:-4], hashlib.sha256(tar.extractfile(m).read()).hexdigest()


@pytest.mark.parametrize("suffix", [".tsv", ".jsonl", ".parquet"])
def test_every_format_holds_the_csv_rows(bundle, pics, tmp_path, suffix):
    csv = rows(CFG, bundle, pics, tmp_path, "out.csv")
    other = rows(CFG, bundle, pics, tmp_path, "out" + suffix)
    pd.testing.assert_frame_equal(other.fillna(np.nan), csv.fillna(np.nan), check_dtype=False)
    assert not list(tmp_path.glob("*.tmp"))


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    out = tmp_path / "rows.csv"
    out.write_text("old\n")
    with pytest.raises(KeyboardInterrupt), tables.writer(out, "csv", {"path": str}) as write:
        write([{"path": "a"}])
        raise KeyboardInterrupt
    assert out.read_text() == "old\n" and not list(tmp_path.glob("*.tmp"))


def test_cli_writes_csv_to_stdout_and_its_summary_to_stderr(bundle, pics, capsys):
    assert cli.main(["predict", str(bundle), str(pics), "--topk", "2", "--workers", "0"]) == 0
    captured = capsys.readouterr()
    out = pd.read_csv(StringIO(captured.out))
    assert list(out.columns) == ["path", "class_1", "prob_1", "class_2", "prob_2", "error"]
    assert len(out) == len(listed(pics)) and out["error"].notna().sum() == len(BAD)
    summary = json.loads(captured.err)
    assert summary["images"] == len(out) and summary["failed"] == len(BAD) and summary["out"] == "-"


@pytest.mark.parametrize("args, culprit", [
    (["no/such/bundle", "{pics}"], "no/such/bundle"),
    (["{bundle}", "no/such/folder"], "no/such/folder"),
    (["models:/tiny@champion", "{pics}"], "no MLflow store here"),
    (["{bundle}", "{pics}", "--out", "rows.xlsx"], "rows.xlsx"),
    (["{bundle}", "{pics}", "--topk", "0"], "predict.topk"),
    (["{bundle}", "{pics}", "--device", "tpu9"], "tpu9"),
    (["{bundle}", "{pics}", "--set", "train.epochs=1"], "train.epochs"),
])
def test_bad_input_is_one_line_naming_it_before_any_work(bundle, pics, tmp_path, monkeypatch, capsys, args, culprit):
    monkeypatch.chdir(tmp_path)
    argv = ["predict", *(a.format(bundle=bundle, pics=pics) for a in args), "--out", "rows.csv"]
    assert cli.main(argv if "--out" not in args else argv[:-2]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("effnet: error:") and culprit in err[0], err
    assert not list(tmp_path.iterdir()), "nothing written, no store created"


def test_registry_uris_give_the_bundles_rows(pipeline, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", pipeline.tracking_uri)
    run_id = json.loads((pipeline.repo / "models/tiny/registered.json").read_text())["run_id"]
    val = pipeline.repo / "data/demo/val"
    by_bundle = rows(CFG, pipeline.published(tmp_path / "published"), val, tmp_path, "bundle.csv")
    for uri in ["models:/tiny@champion", "models:/tiny/1", f"runs:/{run_id}/model"]:
        pd.testing.assert_frame_equal(rows(CFG, uri, val, tmp_path, "uri.csv"), by_bundle, obj=uri)
    assert cli.main(["predict", "models:/tiny@nope", str(val)]) == 2
    assert "models:/tiny@nope" in capsys.readouterr().err and not (tmp_path / "mlflow.db").exists()
