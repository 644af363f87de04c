"""The `shard` stage: an ImageFolder (ROOT/<split>/<class>/<image>) -> webdataset tar shards + manifest.json.

JPEG bytes are stored as they are (no re-encode); other decodable images are converted to RGB JPEG; files that
do not decode are skipped and listed in the manifest's `rejects`. Samples are shuffled across shards with a fixed
seed, so that a shuffle buffer sees every class, and tar headers carry a fixed mtime: the same inputs give
byte-identical shards. Everything is written into OUT.tmp and renamed to OUT once complete.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
from pathlib import Path

import webdataset as wds
from PIL import Image

from effnet.config import ShardConfig
from effnet.errors import EffnetError

SPLITS = ("train", "val")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
JPEG_MAGIC = b"\xff\xd8\xff"
MANIFEST = "manifest.json"


def list_images(root: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Class names (sorted folder names of the train split) and (path, label) per split."""
    root = Path(root)
    if not root.is_dir():
        raise EffnetError(f"data folder not found: {root}")
    missing = [s for s in SPLITS if not (root / s).is_dir()]
    if missing:
        raise EffnetError(f"data folder {root} has no {'/ '.join(missing)}/ split (expected {root}/<split>/<class>/)")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise EffnetError(f"no class folders in {root / 'train'}")
    index = {c: i for i, c in enumerate(classes)}
    files = {}
    for split in SPLITS:
        files[split] = []
        for folder in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            if folder.name not in index:
                raise EffnetError(f"class folder {folder} is not a class of {root / 'train'}")
            files[split] += [(p, index[folder.name]) for p in sorted(folder.iterdir())
                             if p.suffix.lower() in IMAGE_SUFFIXES]
    return classes, files


def as_jpeg(data: bytes) -> bytes:
    """JPEG bytes unchanged; any other decodable image as an RGB JPEG. Raises ValueError if it does not decode."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decode fully: truncated files fail here, not in training
            if data.startswith(JPEG_MAGIC) and img.mode in ("RGB", "L"):
                return data
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="JPEG", quality=95)
            return buf.getvalue()
    except Exception as e:  # PIL raises many types for bad files
        raise ValueError(f"not a decodable image: {type(e).__name__}: {e}") from None


def run(cfg: ShardConfig, src: Path, out: Path) -> dict:
    """Shard SRC into OUT; returns the manifest."""
    src, out = Path(src), Path(out)
    classes, files = list_images(src)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fingerprint = hashlib.sha256()
    manifest = {"source": str(src), "classes": classes, "options": cfg.model_dump(), "splits": {}, "rejects": []}
    for split in SPLITS:
        items = files[split]
        random.Random(cfg.seed).shuffle(items)
        shards: list[dict] = []
        count = 0
        with wds.ShardWriter(str(tmp / f"{split}-%06d.tar"), maxcount=cfg.samples_per_shard, verbose=0, mtime=0,
                             post=lambda name: shards.append({"name": Path(name).name, "samples": sink.count})) as sink:
            for path, label in items:
                data = path.read_bytes()
                rel = path.relative_to(src).as_posix()
                fingerprint.update(f"{rel}\0{label}\0".encode() + hashlib.sha256(data).digest())
                try:
                    jpeg = as_jpeg(data)
                except ValueError as e:
                    manifest["rejects"].append({"path": rel, "reason": str(e)})
                    continue
                sink.write({"__key__": f"{count:09d}", "jpg": jpeg, "cls": label})
                count += 1
        manifest["splits"][split] = {"shards": shards, "total": count}
    manifest["fingerprint"] = fingerprint.hexdigest()
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return manifest


def read_manifest(shards: Path) -> dict:
    path = Path(shards) / MANIFEST
    if not path.is_file():
        raise EffnetError(f"no shard manifest at {path} (run `effnet shard` first)")
    return json.loads(path.read_text())
