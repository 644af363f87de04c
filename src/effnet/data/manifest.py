"""Where shards live and what they hold: `manifest.json` (classes, splits, shard files, counts, the source
fingerprint), written last by the `shard` stage and read by everything downstream. Shards may be in a local folder,
at an fsspec URL (s3://, gs://, memory://...) or behind a `pipe:` command with `{name}` in it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import fsspec
import webdataset as wds

from effnet.errors import EffnetError

SPLITS = ("train", "val", "test")  # train and val always (val held out of train when the source has none); test optional
UNLABELED = "unlabeled"  # images without a class (Noisy Student's): samples with no `cls`, optional
MANIFEST = "manifest.json"
REJECTS = "rejects.json"


def location(root: str | Path, name: str) -> str:
    """NAME inside ROOT: a local folder, an fsspec URL, or a `pipe:` command with `{name}` in it."""
    root = str(root)
    if root.startswith("pipe:"):
        return root.replace("{name}", name)
    if "://" in root:
        return f"{root.rstrip('/')}/{name}"
    return str(Path(root) / name)


def open_url(url: str, mode: str = "rb"):
    return wds.gopen(url, mode) if url.startswith("pipe:") else fsspec.open(url, mode).open()


def read_manifest(shards: str | Path) -> dict:
    url = location(shards, MANIFEST)
    try:
        with open_url(url) as f:
            return json.load(f)
    except FileNotFoundError:
        raise EffnetError(f"no shard manifest at {url} (run `effnet shard` first)") from None


def shard_urls(shards: str | Path, split: str) -> list[str]:
    """The locations of SPLIT's shard files, in manifest order."""
    return [location(shards, s["name"]) for s in read_manifest(shards)["splits"][split]["shards"]]


def in_holdout(key: str, fraction: float) -> bool:
    """Whether the sample with KEY falls in a FRACTION of its split set aside by a hash of the key: the same
    samples in every run and on every rank, whatever the shard order."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) < fraction * 2**32
