"""Streaming the shards into training: webdataset pipelines and a Lightning DataModule.

Training streams resampled shards (every rank and worker draws shards independently and endlessly) cut to a fixed
epoch length from the manifest, so all DDP ranks run the same number of steps. Evaluation reads each val shard
once, split by node and worker, so that every sample is seen exactly once across ranks. Shards may live in a local
folder, at an fsspec URL (s3://, gs://, memory://...) or behind a `pipe:` command with `{name}` in it.
"""
from __future__ import annotations

import importlib
import io
import warnings
from pathlib import Path
from urllib.parse import urlparse

import fsspec
import pytorch_lightning as pl
import webdataset as wds
from PIL import Image

from effnet.data.shard import location, read_manifest

# with_length() is only the epoch length Lightning shows and plans with; with_epoch() sets the real one.
warnings.filterwarnings("ignore", message=r"\.with_length\(\) only sets")

_GOPEN = importlib.import_module("webdataset.gopen")  # the module: `wds.gopen` is its function


def _gopen_fsspec(url, mode="rb", bufsize=8192, **kw):
    return fsspec.open(url, mode).open()


def _route_to_fsspec(urls: list[str]) -> None:
    """Let webdataset open the URL schemes it has no handler of its own for (s3, memory...) through fsspec."""
    for scheme in {urlparse(u).scheme for u in urls} - {"", "file", "pipe", "http", "https"}:
        if _GOPEN.gopen_schemes.get(scheme) in (None, _GOPEN.gopen_error, _GOPEN.gopen_gsutil):
            _GOPEN.gopen_schemes[scheme] = _gopen_fsspec


def _root(shards) -> str | Path:
    """Keep URLs as strings: Path() would turn s3://b/x into s3:/b/x."""
    return shards if isinstance(shards, str) else Path(shards)


def shard_urls(shards: str | Path, split: str) -> list[str]:
    urls = [location(shards, s["name"]) for s in read_manifest(shards)["splits"][split]["shards"]]
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


def train_loader(shards: str | Path, transform, batch_size: int, num_workers: int, shuffle_buffer: int,
                 world_size: int = 1, seed: int = 0, draft: int | None = None) -> wds.WebLoader:
    total = read_manifest(shards)["splits"]["train"]["total"]
    steps = max(1, total // (batch_size * world_size))
    ds = (wds.WebDataset(shard_urls(shards, "train"), resampled=True, shardshuffle=False,
                         nodesplitter=wds.split_by_node, seed=seed)
          .shuffle(shuffle_buffer)
          .to_tuple("jpg", "cls")
          .map_tuple(lambda jpg: transform(decode({"jpg": jpg}, draft)), int)
          .batched(batch_size, partial=False))
    return wds.WebLoader(ds, batch_size=None, num_workers=num_workers,
                         persistent_workers=num_workers > 0).with_epoch(steps).with_length(steps)


def eval_loader(shards: str | Path, transform, batch_size: int, num_workers: int, split: str = "val") -> wds.WebLoader:
    ds = (wds.WebDataset(shard_urls(shards, split), shardshuffle=False, nodesplitter=wds.split_by_node,
                         empty_check=False)
          .to_tuple("jpg", "cls", "__key__")
          .map_tuple(lambda jpg: transform(decode({"jpg": jpg})), int, str)
          .batched(batch_size, partial=True))
    return wds.WebLoader(ds, batch_size=None, num_workers=num_workers)


class ShardDataModule(pl.LightningDataModule):
    def __init__(self, shards: str | Path, train_tf, val_tf, batch_size: int, num_workers: int, shuffle_buffer: int,
                 seed: int = 0, draft: int | None = None):
        super().__init__()
        self.shards, self.train_tf, self.val_tf = _root(shards), train_tf, val_tf
        self.batch_size, self.num_workers, self.shuffle_buffer, self.seed = batch_size, num_workers, shuffle_buffer, seed
        self.draft = draft
        self.manifest = read_manifest(self.shards)

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    def train_dataloader(self):
        world = self.trainer.world_size if self.trainer else 1
        return train_loader(self.shards, self.train_tf, self.batch_size, self.num_workers, self.shuffle_buffer,
                            world, self.seed, self.draft)

    def val_dataloader(self):
        return eval_loader(self.shards, self.val_tf, self.batch_size, self.num_workers)
