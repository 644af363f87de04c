"""Reading shards: their URLs, wherever they live, and their samples' JPEG bytes decoded.

Shards may live in a local folder, at an fsspec URL (s3://, gs://, memory://...) or behind a `pipe:` command with
`{name}` in it: `shard_urls` lists a split's and lets webdataset open the schemes it has no handler of its own for
through fsspec.
"""
from __future__ import annotations

import importlib
import io
from pathlib import Path
from urllib.parse import urlparse

import fsspec
from PIL import Image

from effnet.data import manifest

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
