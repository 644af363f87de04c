"""The `shard` stage: an ImageFolder (ROOT/<split>/<class>/<image>) or a CSV/TSV list -> webdataset tar shards,
manifest.json and rejects.json, in a local folder or at any fsspec URL.

Splits: train (required), val, test. A source without val gets a stratified, seeded hold-out of train
(`shard.val_fraction`, recorded in the manifest); test, when there is one, is sharded for the honest figure
(`evaluate` selects on val and reports test). Every class of val and test must be a class of train. Images
without a class (a teacher labels them for Noisy Student) go to `unlabeled` shards: ROOT/unlabeled/ at any depth,
or table rows `path,,unlabeled`; their samples have no `cls`.

Every source file is checked in a worker process (`prepare`): valid RGB JPEGs are stored byte for byte; other
decodable images (PNG/WebP/GIF under any name, CMYK, greyscale, 16-bit, EXIF-rotated) become RGB JPEGs; the rest
(empty, not an image, truncated, too small, decompression bombs) are skipped and listed with their reason.
Samples are shuffled across shards with a fixed seed, results come back in order and tar headers carry a fixed
mtime, so the same inputs give byte-identical shards. Every shard is written under a temporary name, and renamed
only once all are complete: a run that fails while writing them (a full disk: one line naming the folder) removes
what it wrote and leaves an earlier run's shards and manifest as they were. Then the old manifest is removed, the
shards renamed and the new manifest written last, so a killed run leaves no manifest and no truncated shard, and
re-running it ends with the same files as an uninterrupted run.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import multiprocessing
import os
import random
import warnings
from collections import Counter
from functools import partial
from io import BytesIO
from pathlib import Path

import fsspec
import webdataset as wds
from PIL import Image, ImageOps
from pydantic import BaseModel

from effnet import console, io
from effnet.config import ShardConfig
from effnet.data.images import to_rgb
from effnet.data.manifest import MANIFEST, REJECTS, SPLITS, UNLABELED, location
from effnet.errors import EffnetError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
ORIENTATION = 0x0112  # EXIF tag


# ---- listing the source -------------------------------------------------------------------------------------

Listing = tuple[list[str], dict[str, list[tuple[Path, int | None]]]]  # class names, (path, label) per split


def list_images(root: Path) -> Listing:
    """Class names (sorted folder names of the train split) and (path, label) per split present (train/ required;
    val/, test/ and unlabeled/ optional; unlabeled/ holds images at any depth, label None)."""
    root = Path(root)
    if not root.is_dir():
        raise EffnetError(f"data folder not found: {root}")
    if not (root / "train").is_dir():
        raise EffnetError(f"data folder {root} has no train/ split (expected {root}/train/<class>/)")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise EffnetError(f"no class folders in {root / 'train'}")
    index = {c: i for i, c in enumerate(classes)}
    files = {}
    for split in (s for s in SPLITS if (root / s).is_dir()):
        files[split] = []
        for folder in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            if folder.name not in index:
                raise EffnetError(f"class '{folder.name}' of {root / split} is not a class of {root / 'train'}")
            files[split] += [(p, index[folder.name]) for p in sorted(folder.iterdir())
                             if p.suffix.lower() in IMAGE_SUFFIXES]
    if (root / UNLABELED).is_dir():
        files[UNLABELED] = [(p, None) for p in sorted((root / UNLABELED).rglob("*"))
                            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return classes, files


def list_table(table: Path) -> Listing:
    """A CSV/TSV of `path,label[,split]` (optional header; paths relative to the table's folder; no split: train;
    `path,,unlabeled` for an image without a class). The classes are the train rows' labels."""
    table = Path(table)
    with table.open(newline="") as f:
        rows = [r for r in csv.reader(f, delimiter="\t" if table.suffix.lower() == ".tsv" else ",") if r]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]

    def valid(r: list[str]) -> bool:  # a label exactly when the row is not an unlabeled one
        split = r[2] if len(r) == 3 else "train"
        return len(r) in (2, 3) and split in (*SPLITS, UNLABELED) and bool(r[1]) == (split != UNLABELED)

    bad = next((i for i, r in enumerate(rows) if not valid(r)), None)
    if bad is not None:
        raise EffnetError(f"{table}: row {bad + 1}: expected path,label[,{'|'.join(SPLITS)}] or path,,{UNLABELED}, "
                          f"got {rows[bad]}")
    if not rows:
        raise EffnetError(f"{table}: no rows")
    split_of = [r[2] if len(r) == 3 else "train" for r in rows]
    classes = sorted({r[1] for r, split in zip(rows, split_of) if split == "train"})
    index = {c: i for i, c in enumerate(classes)}
    files = {}
    for r, split in sorted(zip(rows, split_of)):
        if split == UNLABELED:
            files.setdefault(split, []).append((table.parent / r[0], None))
            continue
        if r[1] not in index:
            raise EffnetError(f"{table}: class '{r[1]}' of the {split} split is not a class of the train split")
        files.setdefault(split, []).append((table.parent / r[0], index[r[1]]))
    return classes, files


def list_source(src: Path, val_fraction: float, seed: int) -> tuple[list[str], dict, dict | None]:
    """The source's classes and files per split, and how val was made when the source has no val split: a
    stratified, seeded VAL_FRACTION of train held out (None when the source has its own)."""
    src = Path(src)
    classes, files = list_table(src) if src.is_file() else list_images(src)
    if not files.get("train"):
        raise EffnetError(f"{src}: the train split has no images")
    if files.get("val"):
        return classes, files, None
    files["train"], files["val"] = hold_out(files["train"], val_fraction, seed)
    return classes, files, {"from": "train", "val_fraction": val_fraction, "seed": seed}


def hold_out(files: list[tuple[Path, int]], fraction: float, seed: int) -> tuple[list, list]:
    """(kept, held out): per class, FRACTION of its files (rounded, at least one of a class with two or more),
    drawn with a seeded shuffle: every class is in both parts in proportion, and the split repeats."""
    by_class: dict[int, list] = {}
    for item in files:
        by_class.setdefault(item[1], []).append(item)
    kept, held = [], []
    for label in sorted(by_class):
        items = sorted(by_class[label])
        random.Random(f"{seed}:{label}").shuffle(items)
        n = min(len(items) - 1, max(1, round(len(items) * fraction)))
        held += items[:n]
        kept += items[n:]
    return sorted(kept), sorted(held)


# ---- one image: keep, normalise or reject ---------------------------------------------------------------------

def _fit(w: int, h: int, side: int | None) -> tuple[int, int]:
    """(w, h) shrunk to a longest side of SIDE, aspect kept; never enlarged."""
    if not side or max(w, h) <= side:
        return w, h
    scale = side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def prepare(data: bytes, cfg: ShardConfig) -> bytes:
    """Source bytes -> the JPEG bytes to store; raises ValueError('<kind>: <detail>') for a file to skip."""
    if not data:
        raise ValueError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check the size ourselves
            img = Image.open(BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ValueError(f"decompression bomb: {e}") from None
    except Exception as e:  # UnidentifiedImageError and friends
        raise ValueError(f"not an image: {type(e).__name__}: {e}") from None
    w, h = img.size  # from the header: nothing decoded yet
    if w * h > cfg.max_pixels:
        raise ValueError(f"decompression bomb: {w}x{h} > max_pixels {cfg.max_pixels}")
    if min(w, h) < cfg.min_side:
        raise ValueError(f"too small: {w}x{h} < min_side {cfg.min_side}")
    target = _fit(w, h, cfg.max_side)
    as_is = (img.format == "JPEG" and img.mode == "RGB" and target == (w, h)
             and img.getexif().get(ORIENTATION, 1) == 1)
    try:
        # Decoding is the check for truncated files; libjpeg's DCT scaling still reads every byte, at a
        # fraction of the cost: 1/8 when the bytes are kept, down to just above the target when resizing.
        img.draft("RGB", (max(1, w // 8), max(1, h // 8)) if as_is else target)
        img.load()
        if as_is:
            return data
        img = to_rgb(ImageOps.exif_transpose(img))
        if _fit(*img.size, cfg.max_side) != img.size:  # after the transpose: w and h may have swapped
            img = img.resize(_fit(*img.size, cfg.max_side), Image.LANCZOS)
        buf = BytesIO()
        img.save(buf, format="JPEG", quality=cfg.quality)
        return buf.getvalue()
    except Exception as e:  # PIL raises many types for corrupt data
        raise ValueError(f"corrupt: {type(e).__name__}: {e}") from None


def _work(path: str, cfg: ShardConfig) -> tuple[str, bytes | None, str | None]:
    """In a worker: path -> (sha256 of the source, stored bytes or None, reject reason or None)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return "", None, f"unreadable: {e}"
    digest = hashlib.sha256(data).hexdigest()
    try:
        return digest, prepare(data, cfg), None
    except ValueError as e:
        return digest, None, str(e)


def _pool(workers: int):
    # fork: workers start at once without re-importing torch (webdataset imports it); spawn elsewhere
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    return ctx.Pool(workers)


# ---- writing --------------------------------------------------------------------------------------------------

class Shards:
    """Writes one split's samples into `<split>-NNNNNN.tar.tmp` files of at most `count` samples / `size` bytes
    (plus tar's padding to whole 10 KiB records); `publish` renames them once every split's are complete."""

    def __init__(self, fs, root: str, split: str, count: int, size: int | None):
        self.fs, self.root, self.split, self.count, self.size = fs, root, split, count, size
        self.done: list[dict] = []
        self.file = self.tar = None

    def write(self, sample: dict) -> None:
        nbytes = len(sample["jpg"]) + 2048  # at most, with the tar headers and padding of its two members
        if self.tar and (self.n >= self.count or (self.size and self.nbytes + nbytes > self.size)):
            self.close()
        if not self.tar:
            self.name = f"{self.split}-{len(self.done):06d}.tar"
            self.file = self.fs.open(f"{self.root}/{self.name}.tmp", "wb")
            self.tar, self.n, self.nbytes = wds.TarWriter(self.file, mtime=0), 0, 0
        self.tar.write(sample)
        self.n, self.nbytes = self.n + 1, self.nbytes + nbytes

    def close(self) -> None:
        if self.tar:
            self.tar.close()
            self.file.close()
            self.done.append({"name": self.name, "samples": self.n})
            self.tar = None

    def abort(self) -> None:
        """Close the file being written without flushing what a full disk refused (its .tmp is removed after)."""
        if self.tar:
            for close in (self.tar.close, self.file.close):  # each marks itself closed before the write that fails
                try:
                    close()
                except (OSError, ValueError):
                    pass
            self.tar = None


class ShardResult(BaseModel):
    out: str
    classes: list[str]
    totals: dict[str, int]  # samples per split
    rejects: list[dict]  # {"path", "reason"} of each skipped source file
    fingerprint: str  # of every source file's bytes and label


def run(cfg: ShardConfig, src: Path, out: str | Path) -> ShardResult:
    """Shard SRC (an ImageFolder, or a CSV/TSV list) into OUT (a folder or fsspec URL)."""
    src = Path(src)
    classes, files, held_out = list_source(src, cfg.val_fraction, cfg.seed)
    fs, root = fsspec.core.url_to_fs(str(out))
    fs.makedirs(root, exist_ok=True)
    jobs = {s: random.Random(cfg.seed).sample(files[s], len(files[s])) for s in (*SPLITS, UNLABELED) if s in files}
    try:
        splits, digests, rejects = write_shards(cfg, jobs, fs, root, base=src.parent if src.is_file() else src)
    except OSError as e:  # a full disk, a quota, a store gone: what was there stays, what this run wrote goes
        for path in fs.glob(f"{root}/*.tmp"):
            fs.rm(path)
        raise EffnetError(f"{out}: shards not written: {e.strerror or e} (what was there is as it was)") from None
    names = [s["name"] for sp in splits.values() for s in sp["shards"]]
    if fs.exists(f"{root}/{MANIFEST}"):
        fs.rm(f"{root}/{MANIFEST}")  # from here on OUT is incomplete until the new manifest lands
    for name in names:  # renames: no space needed
        fs.mv(f"{root}/{name}.tmp", f"{root}/{name}")
    _remove_stale(fs, root, set(names))
    io.write_atomic(f"{root}/{REJECTS}", json.dumps(rejects, indent=2), fs)
    n_in = sum(len(j) for j in jobs.values())
    allowed = math.ceil(cfg.max_bad_fraction * n_in)  # rounded up: a tiny dataset may always lose a file
    if len(rejects) > allowed:
        raise EffnetError(f"{len(rejects)} of {n_in} images rejected ({len(rejects) / max(n_in, 1):.2%}), over "
                          f"shard.max_bad_fraction {cfg.max_bad_fraction:.2%}; reasons in {location(out, REJECTS)}")
    fingerprint = fingerprint_of(digests)
    manifest = {"source": str(src), "fingerprint": fingerprint, "classes": classes,
                "options": cfg.model_dump(exclude={"workers"}), "splits": splits,
                "val_held_out": held_out,
                "counts": {"inputs": n_in, "samples": n_in - len(rejects), "rejected": len(rejects),
                           "reasons": dict(sorted(Counter(r["reason"].split(":")[0] for r in rejects).items()))},
                "rejects": rejects}
    io.write_atomic(f"{root}/{MANIFEST}", json.dumps(manifest, indent=2), fs)  # last: OUT is complete now
    return ShardResult(out=str(out), classes=classes, totals={k: v["total"] for k, v in splits.items()},
                       rejects=rejects, fingerprint=fingerprint)


def write_shards(cfg: ShardConfig, jobs: dict[str, list[tuple[Path, int | None]]], fs, root: str, base: Path
                 ) -> tuple[dict, dict[str, str], list[dict]]:
    """Check and write every split's files (in worker processes, results in order); returns the manifest's
    `splits` (each with the fingerprint of its own files), each source file's `label:sha256` by its path relative
    to BASE (no label: `:sha256`), and the rejects (sorted)."""
    digests, rejects, splits = {}, [], {}
    workers = cfg.workers or os.cpu_count() or 1
    with _pool(workers) as pool, console.progress("shard") as bar:
        task = bar.add_task("shard", total=sum(len(j) for j in jobs.values()))
        for split, todo in jobs.items():
            sink, count, mine = Shards(fs, root, split, cfg.samples_per_shard, cfg.shard_bytes), 0, {}
            results = pool.imap(partial(_work, cfg=cfg), [str(p) for p, _ in todo], chunksize=8)
            try:
                for (path, label), (digest, jpeg, reason) in zip(todo, results):
                    rel = os.path.relpath(path, base).replace(os.sep, "/")
                    digests[rel] = mine[rel] = f"{'' if label is None else label}:{digest}"
                    if jpeg is None:
                        rejects.append({"path": rel, "reason": reason})
                    else:
                        sample = {"__key__": f"{count:09d}", "jpg": jpeg}
                        sink.write(sample if label is None else {**sample, "cls": label})
                        count += 1
                    bar.advance(task)
                sink.close()
            except OSError:
                sink.abort()
                raise
            splits[split] = {"shards": sink.done, "total": count, "rejected": len(todo) - count,
                             "fingerprint": fingerprint_of(mine)}
    return splits, digests, sorted(rejects, key=lambda r: r["path"])


def fingerprint_of(digests: dict[str, str]) -> str:
    """One sha256 over source files' `label:sha256` by path: the same files with the same labels, the same value."""
    return hashlib.sha256("\n".join(f"{k}\0{v}" for k, v in sorted(digests.items())).encode()).hexdigest()


def _remove_stale(fs, root: str, keep: set[str]) -> None:
    """Shards of an earlier, different run and temporary files of a killed one."""
    for path in fs.glob(f"{root}/*.tar") + fs.glob(f"{root}/*.tmp"):
        if path.rsplit("/", 1)[-1] not in keep:
            fs.rm(path)
