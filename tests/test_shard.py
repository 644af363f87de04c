"""The shard stage on the files real datasets contain, its inputs and outputs, and its behaviour when killed."""
from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from effnet.config import ShardConfig
from effnet.data import loaders
from effnet.data.manifest import MANIFEST, REJECTS, read_manifest
from effnet.errors import EffnetError
from effnet.stages import shard

CFG = ShardConfig(samples_per_shard=4, seed=0, workers=2, max_bad_fraction=1.0)


def sharded(cfg: ShardConfig, src, out) -> dict:
    """Run the shard stage; the manifest it wrote."""
    shard.run(cfg, src, out)
    return read_manifest(out)


def noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def bomb() -> bytes:
    """A small JPEG whose header claims 20000x20000: only a check before decoding catches it cheaply."""
    data = bytearray(encode(noise(16, 16)))
    sof = data.index(b"\xff\xc0") + 5  # marker, length(2), precision(1): then height, width
    data[sof:sof + 4] = (20000).to_bytes(2, "big") * 2
    return bytes(data)


def rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    return encode(noise(60, 40), exif=exif)


GOOD = encode(noise(64, 48))
# name -> (bytes, expected: "kept" byte for byte, "normalised" to an RGB JPEG, or the reject reason's kind)
KINDS = {
    "ok.jpg": (GOOD, "kept"),
    "png.jpg": (encode(noise(64, 48), "PNG"), "normalised"),
    "webp.jpg": (encode(noise(64, 48), "WEBP"), "normalised"),
    "gif.jpg": (encode(noise(64, 48, "P"), "GIF"), "normalised"),
    "cmyk.jpg": (encode(noise(64, 48, "CMYK")), "normalised"),
    "grey.jpg": (encode(noise(64, 48, "L")), "normalised"),
    "grey16.png": (encode(Image.fromarray(np.tile(np.arange(0, 65536, 1024, dtype=np.uint16), (48, 1))), "PNG"),
                   "normalised"),
    "rotated.jpg": (rotated(), "normalised"),
    "truncated.jpg": (GOOD[: len(GOOD) // 2], "corrupt"),
    "garbage.jpg": (GOOD[:20] + bytes(range(256)) * 8, "not an image|corrupt"),
    "empty.jpg": (b"", "empty file"),
    "text.jpg": (b"this is not an image\n" * 10, "not an image"),
    "pixel.png": (encode(noise(1, 1), "PNG"), "too small"),
    "bomb.jpg": (bomb(), "decompression bomb"),
}


def image_folder(root, files: dict[str, bytes], val: int = 2):
    for cls in ("a", "b"):
        for name, data in files.items():
            (root / "train" / cls).mkdir(parents=True, exist_ok=True)
            (root / "train" / cls / name).write_bytes(data)
        for i in range(val):
            (root / "val" / cls).mkdir(parents=True, exist_ok=True)
            (root / "val" / cls / f"{i}.jpg").write_bytes(encode(noise(40, 30, seed=i)))
    return root


def stored(out, manifest, split="train", member=".jpg") -> dict[str, bytes]:
    samples = {}
    for s in manifest["splits"][split]["shards"]:
        with tarfile.open(out / s["name"]) as tar:
            samples |= {m.name: tar.extractfile(m).read() for m in tar if m.name.endswith(member)}
    return samples


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_every_bad_file_kind_is_normalised_or_rejected_and_nothing_is_lost(tmp_path):
    src = image_folder(tmp_path / "src", {name: data for name, (data, _) in KINDS.items()})
    manifest = sharded(CFG, src, tmp_path / "out")
    reasons = {r["path"]: r["reason"] for r in manifest["rejects"]}
    for cls in ("a", "b"):
        for name, (_, expected) in KINDS.items():
            reason = reasons.get(f"train/{cls}/{name}")
            if expected in ("kept", "normalised"):
                assert reason is None, (name, reason)
            else:
                assert reason and reason.split(":")[0] in expected.split("|"), (name, reason)
    n_in = 2 * len(KINDS) + 4
    assert manifest["counts"]["inputs"] == n_in
    assert manifest["counts"]["samples"] + manifest["counts"]["rejected"] == n_in
    assert sum(sp["total"] + sp["rejected"] for sp in manifest["splits"].values()) == n_in
    samples = stored(tmp_path / "out", manifest)
    assert len(samples) == manifest["splits"]["train"]["total"] == 2 * sum(
        e in ("kept", "normalised") for _, e in KINDS.values())
    images = [Image.open(io.BytesIO(b)) for b in samples.values()]
    assert all(im.format == "JPEG" and im.mode == "RGB" for im in images)
    assert sum(b == GOOD for b in samples.values()) == 2  # valid JPEGs are stored byte for byte
    assert sum(im.size == (40, 60) for im in images) == 2  # EXIF orientation applied
    greys = [np.asarray(im) for im in images if im.size == (64, 48) and np.ptp(np.asarray(im)[0, :, 0]) > 200
             and (np.asarray(im)[..., 0] == np.asarray(im)[..., 2]).all() and np.asarray(im)[0, 0, 0] < 10]
    assert greys, "16-bit greyscale gradient should be scaled to 8 bits, not clipped to white"
    assert (tmp_path / "out" / REJECTS).is_file()


def test_too_many_rejects_fail_with_one_line_naming_fraction_and_limit(tmp_path):
    src = image_folder(tmp_path / "src", {"ok.jpg": GOOD, "empty.jpg": b""})
    with pytest.raises(EffnetError) as err:
        shard.run(CFG.model_copy(update={"max_bad_fraction": 0.1}), src, tmp_path / "out")
    msg = str(err.value)
    assert "\n" not in msg and "2 of 8" in msg and "25.00%" in msg and "max_bad_fraction 10.00%" in msg
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_max_side_resizes_only_larger_images_and_shard_bytes_caps_shards(tmp_path):
    big, small = encode(noise(200, 100)), encode(noise(50, 40))
    src = image_folder(tmp_path / "src", {f"big{i}.jpg": big for i in range(3)} | {"small.jpg": small})
    cfg = CFG.model_copy(update={"max_side": 64, "quality": 90, "shard_bytes": 12000, "samples_per_shard": 100})
    manifest = sharded(cfg, src, tmp_path / "out")
    samples = stored(tmp_path / "out", manifest)
    sizes = sorted(Image.open(io.BytesIO(b)).size for b in samples.values())
    assert sizes == [(50, 40)] * 2 + [(64, 32)] * 6
    assert sum(b == small for b in samples.values()) == 2
    assert len(manifest["splits"]["train"]["shards"]) > 1
    record = tarfile.RECORDSIZE  # tar pads every file to whole 10 KiB records
    assert all((tmp_path / "out" / s["name"]).stat().st_size <= -(-(12000 + 1024) // record) * record
               for s in manifest["splits"]["train"]["shards"])


def test_csv_and_tsv_lists_with_splits(tmp_path):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(6):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(encode(noise(32, 32, seed=i)))
        rows.append([f"img/{i}.jpg", "cat" if i % 2 else "dog", "val" if i >= 4 else "train"])
    (tmp_path / "list.csv").write_text("path,label,split\n" + "".join(",".join(r) + "\n" for r in rows))
    (tmp_path / "list.tsv").write_text("".join("\t".join(r[:2]) + "\n" for r in rows))
    m = sharded(CFG, tmp_path / "list.csv", tmp_path / "out")
    assert m["classes"] == ["cat", "dog"] and m["splits"]["train"]["total"] == 4 and m["splits"]["val"]["total"] == 2
    assert m["val_held_out"] is None and "test" not in m["splits"]
    m = sharded(CFG, tmp_path / "list.tsv", tmp_path / "out2")  # no split column: all train, val held out of it
    assert m["splits"]["train"]["total"] == 4 and m["splits"]["val"]["total"] == 2
    assert m["val_held_out"] == {"from": "train", "val_fraction": CFG.val_fraction, "seed": CFG.seed}
    (tmp_path / "bad.csv").write_text("img/0.jpg\n")
    with pytest.raises(EffnetError, match="row 1"):
        shard.run(CFG, tmp_path / "bad.csv", tmp_path / "out3")
    (tmp_path / "test.csv").write_text("img/0.jpg,dog,train\nimg/1.jpg,cat,train\nimg/2.jpg,dog,test\n"
                                       "img/3.jpg,bird,test\n")
    with pytest.raises(EffnetError, match="class 'bird' of the test split"):
        shard.run(CFG, tmp_path / "test.csv", tmp_path / "out4")


def test_unlabeled_images_at_any_depth_or_as_table_rows_get_their_own_shards_without_a_class(tmp_path):
    src = image_folder(tmp_path / "src", {"ok.jpg": GOOD})
    files = {"unlabeled/a.jpg": GOOD, "unlabeled/web/2026/b.png": encode(noise(40, 30), "PNG"),
             "unlabeled/deep/er/c.jpg": encode(noise(50, 40, seed=3)), "unlabeled/deep/text.jpg": b"not an image"}
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    m = sharded(CFG, src, tmp_path / "out")
    unl = m["splits"]["unlabeled"]
    assert (unl["total"], unl["rejected"]) == (3, 1) and m["classes"] == ["a", "b"]
    assert [r["path"] for r in m["rejects"]] == ["unlabeled/deep/text.jpg"]  # listed, not fatal
    assert m["counts"]["inputs"] == 2 + 4 + 4 and m["splits"]["train"]["total"] == 2  # train as without unlabeled/
    assert len(stored(tmp_path / "out", m, "unlabeled")) == 3
    assert not stored(tmp_path / "out", m, "unlabeled", ".cls")  # no class member at all
    assert unl["fingerprint"] != m["splits"]["train"]["fingerprint"]
    without = sharded(CFG, image_folder(tmp_path / "plain", {"ok.jpg": GOOD}), tmp_path / "out2")
    assert without["fingerprint"] != m["fingerprint"] and "unlabeled" not in without["splits"]
    assert without["splits"]["train"]["fingerprint"] == m["splits"]["train"]["fingerprint"]

    (tmp_path / "img").mkdir()
    for i in range(5):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(encode(noise(32, 32, seed=i)))
    (tmp_path / "list.csv").write_text("path,label,split\nimg/0.jpg,cat,train\nimg/1.jpg,dog,train\n"
                                       "img/2.jpg,,unlabeled\nimg/3.jpg,,unlabeled\nimg/4.jpg,dog,val\n")
    t = sharded(CFG, tmp_path / "list.csv", tmp_path / "out3")
    assert t["splits"]["unlabeled"]["total"] == 2 and t["classes"] == ["cat", "dog"]
    for bad in ("img/2.jpg,cat,unlabeled", "img/2.jpg,,train"):  # a label on an unlabeled row; none on a train row
        (tmp_path / "bad.csv").write_text(f"img/0.jpg,cat\nimg/1.jpg,dog\n{bad}\n")
        with pytest.raises(EffnetError, match=r"bad.csv: row 3: .*unlabeled"):
            shard.run(CFG, tmp_path / "bad.csv", tmp_path / "out4")


def test_a_source_without_val_gets_a_stratified_seeded_hold_out(tmp_path):
    src = tmp_path / "src"
    for cls, n in (("a", 20), ("b", 10), ("c", 2)):
        for i in range(n):
            (src / "train" / cls).mkdir(parents=True, exist_ok=True)
            (src / "train" / cls / f"{i}.jpg").write_bytes(encode(noise(16, 16, seed=i)))
    cfg = CFG.model_copy(update={"val_fraction": 0.2})
    m = sharded(cfg, src, tmp_path / "out")
    val = [int(b) for name, b in stored(tmp_path / "out", m, "val", ".cls").items()]
    assert sorted(val) == [0] * 4 + [1] * 2 + [2]  # 20 % of each class, at least one of a class of two
    assert m["splits"]["train"]["total"] == 32 - 7 and m["val_held_out"]["val_fraction"] == 0.2
    assert digest(tmp_path / "out") == digest(Path(shard.run(cfg, src, tmp_path / "again").out))  # seeded
    other = sharded(cfg.model_copy(update={"seed": 1}), src, tmp_path / "other")
    assert stored(tmp_path / "other", other, "val") != stored(tmp_path / "out", m, "val")


def test_a_test_split_is_sharded_and_must_hold_only_train_classes(tmp_path):
    src = image_folder(tmp_path / "src", {f"{i}.jpg": encode(noise(32, 24, seed=i)) for i in range(3)})
    for cls in ("a", "b"):
        (src / "test" / cls).mkdir(parents=True)
        (src / "test" / cls / "t.jpg").write_bytes(encode(noise(20, 20, seed=7)))
    m = sharded(CFG, src, tmp_path / "out")
    assert m["splits"]["test"]["total"] == 2 and m["splits"]["val"]["total"] == 4 and m["val_held_out"] is None
    (src / "test" / "zebra").mkdir()
    with pytest.raises(EffnetError, match="class 'zebra' of .*test is not a class of"):
        shard.run(CFG, src, tmp_path / "out2")
    assert read_manifest(tmp_path / "out")["splits"]["test"]["total"] == 2  # the earlier output is untouched


def test_output_is_the_same_for_any_worker_count_and_stale_files_go(tmp_path):
    src = image_folder(tmp_path / "src", {f"{i}.jpg": encode(noise(32, 24, seed=i)) for i in range(9)})
    shard.run(CFG.model_copy(update={"workers": 1}), src, tmp_path / "one")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "train-000099.tar").write_bytes(b"old")
    (tmp_path / "two" / "train-000000.tar.tmp").write_bytes(b"half")
    shard.run(CFG.model_copy(update={"workers": 2}), src, tmp_path / "two")
    assert digest(tmp_path / "one") == digest(tmp_path / "two")


def test_fsspec_urls_for_writing_and_reading(tmp_path):
    import fsspec
    src = image_folder(tmp_path / "src", {f"{i}.jpg": encode(noise(32, 24, seed=i)) for i in range(3)}, val=3)
    shard.run(CFG, src, tmp_path / "local")
    m = sharded(CFG, src, "memory://effnet-test/shards")
    mem = fsspec.filesystem("memory")
    for s in m["splits"]["val"]["shards"]:
        assert mem.cat(f"/effnet-test/shards/{s['name']}") == (tmp_path / "local" / s["name"]).read_bytes()
    assert not mem.glob("/effnet-test/shards/*.tmp")
    assert sharded(CFG, src, f"file://{tmp_path}/viaurl") == sharded(CFG, src, tmp_path / "local") | {
        "source": str(src)}
    keys = {}
    for where in ("memory://effnet-test/shards", f"file://{tmp_path}/local", f"pipe:cat {tmp_path}/local/{{name}}"):
        keys[where] = sorted(k for _, _, ks in loaders.eval_loader(where, lambda im: im.size, 4, 0) for k in ks)
    assert len({tuple(v) for v in keys.values()}) == 1 and len(keys[f"file://{tmp_path}/local"]) == 6


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    return image_folder(root / "src", {f"{i:03d}.jpg": encode(noise(96, 72, seed=i)) for i in range(150)})


def test_kill_9_mid_run_then_rerun_gives_the_uninterrupted_shards(many, tmp_path):
    cfg = ShardConfig(samples_per_shard=5, workers=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"variants": {"t": {"phi": -6}}, "shard": cfg.model_dump()}))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "effnet", "shard", str(many), str(out), "--params",
                             str(tmp_path / "params.yaml")], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(out.glob("train-00000[3-9].tar*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its pool workers: a process group we started
    proc.wait()
    assert not (out / MANIFEST).exists(), "the run finished before the kill: make the dataset larger"
    shard.run(cfg, many, out)
    shard.run(cfg, many, tmp_path / "clean")
    assert digest(out) == digest(tmp_path / "clean")
    assert not list(out.glob("*.tmp"))
