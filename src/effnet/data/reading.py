"""Reading shards: their URLs, wherever they live, and their samples' JPEG bytes decoded.

Shards may live in a local folder, at an fsspec URL (s3://, gs://, memory://...) or behind a `pipe:` command with
`{name}` in it: `shard_urls` lists a split's and lets webdataset open the schemes it has no handler of its own for
through fsspec. `read_shard` reads a training shard that went bad after sharding (a truncated or corrupted tar) up to
the fault, and says how many samples it lost.
"""
from __future__ import annotations

import importlib
import io
import logging
from pathlib import Path
from urllib.parse import urlparse

import fsspec
import webdataset as wds
from PIL import Image

from effnet.data import manifest

log = logging.getLogger(__name__)
LOST = "__lost__"  # the key of a sample that stands for those a shard cut short no longer has (how many)

_GOPEN = importlib.import_module("webdataset.gopen")  # the module: `wds.gopen` is its function


def _gopen_fsspec(url, mode="rb", bufsize=8192, **kw):
    return fsspec.open(url, mode).open()


def _route_to_fsspec(urls: list[str]) -> None:
    """Let webdataset open the URL schemes it has no handler of its own for (s3, memory...) through fsspec."""
    for scheme in {urlparse(u).scheme for u in urls} - {"", "file", "pipe", "http", "https"}:
        if _GOPEN.gopen_schemes.get(scheme) in (None, _GOPEN.gopen_error, _GOPEN.gopen_gsutil):
            _GOPEN.gopen_schemes[scheme] = _gopen_fsspec


def shard_urls(shards: str | Path, split: str) -> list[str]:
    urls = manifest.shard_urls(shards, split)
    _route_to_fsspec(urls)
    return urls


def decode(sample: dict, draft: int | None = None) -> Image.Image:
    """JPEG bytes -> RGB PIL image: the separable decode step (a GPU path takes the bytes instead). With `draft`,
    libjpeg decodes at a reduced scale (1/2, 1/4, 1/8) that keeps both sides >= draft: far cheaper for large
    images when the transform shrinks them anyway."""
    img = Image.open(io.BytesIO(sample["jpg"]))
    if draft:
        img.draft("RGB", (draft, draft))
    return img.convert("RGB")


def shard_sizes(shards: str | Path, split: str) -> dict[str, int]:
    """Each of SPLIT's shard URLs -> the samples the manifest says it holds."""
    entries = manifest.read_manifest(shards)["splits"][split]["shards"]
    return {url: entry["samples"] for url, entry in zip(shard_urls(shards, split), entries)}


_said: set[str] = set()  # the faults already said, once per process


def say_once(url: str, what: str) -> None:
    if url not in _said:
        _said.add(url)
        log.warning("%s: %s: skipped (counted in data/skipped)", url, what)


def read_shard(shard: dict, expected: dict[str, int] | None = None):
    """webdataset's `tarfile_to_samples` over one SHARD (a dict with its url), read up to the fault where the tar went
    bad after it was written (truncated, bytes overwritten). What it lost (EXPECTED[url], the manifest's count, less
    the samples read) comes last, as one sample `{LOST: n}`, which a stream skips and counts as it would the samples
    themselves; said once per shard and process."""
    url, faults, read = shard["url"], [], 0
    for sample in wds.tarfile_to_samples(handler=lambda e: not faults.append(e))([shard]):
        read += 1
        yield sample
    lost = (expected or {}).get(url, read) - read
    if faults or lost > 0:
        reason = str(faults[0].args[0] if faults and faults[0].args else faults[0]).split(" @ ")[0] if faults else ""
        say_once(url, f"cut short after {read} samples, {max(lost, 0)} lost ({reason or 'fewer than the manifest'})")
        yield {LOST: max(lost, 0), "__url__": url, "__key__": f"{url}#lost"}
