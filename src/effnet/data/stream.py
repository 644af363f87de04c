"""Streaming the shards into training: webdataset pipelines and a Lightning DataModule.

Training streams resampled shards (every rank and worker draws shards independently and endlessly) cut to a fixed
epoch length from the manifest, so all DDP ranks run the same number of steps. Evaluation reads each val shard
once, split by node and worker, so that every sample is seen exactly once across ranks. Shards may live in a local
folder, at an fsspec URL (s3://, gs://, memory://...) or behind a `pipe:` command with `{name}` in it.

With `transform=None` the loaders yield the JPEG bytes undecoded (`gpu.collate_jpeg`: flat bytes, byte counts,
labels[, keys]); `ShardDataModule(decode="gpu")` decodes and augments those on the device (`effnet.data.gpu`).
"""
from __future__ import annotations

import importlib
import io
import warnings
from pathlib import Path
from urllib.parse import urlparse

import fsspec
import pytorch_lightning as pl
import torch
import webdataset as wds
from PIL import Image

from effnet.data.gpu import GpuPreprocess, collate_jpeg
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
    """Batches of (images, labels); with transform None, of undecoded JPEG bytes (see `gpu.collate_jpeg`)."""
    total = read_manifest(shards)["splits"]["train"]["total"]
    steps = max(1, total // (batch_size * world_size))
    ds = (wds.WebDataset(shard_urls(shards, "train"), resampled=True, shardshuffle=False,
                         nodesplitter=wds.split_by_node, seed=seed)
          .shuffle(shuffle_buffer)
          .to_tuple("jpg", "cls"))
    if transform is None:
        ds = ds.map_tuple(bytes, int).batched(batch_size, collation_fn=collate_jpeg, partial=False)
    else:
        ds = (ds.map_tuple(lambda jpg: transform(decode({"jpg": jpg}, draft)), int)
              .batched(batch_size, partial=False))
    return wds.WebLoader(ds, batch_size=None, num_workers=num_workers,
                         persistent_workers=num_workers > 0).with_epoch(steps).with_length(steps)


def eval_loader(shards: str | Path, transform, batch_size: int, num_workers: int, split: str = "val") -> wds.WebLoader:
    """Batches of (images, labels, keys); with transform None, of undecoded JPEG bytes (see `gpu.collate_jpeg`)."""
    ds = (wds.WebDataset(shard_urls(shards, split), shardshuffle=False, nodesplitter=wds.split_by_node,
                         empty_check=False)
          .to_tuple("jpg", "cls", "__key__"))
    if transform is None:
        ds = ds.map_tuple(bytes, int, str).batched(batch_size, collation_fn=collate_jpeg, partial=True)
    else:
        ds = (ds.map_tuple(lambda jpg: transform(decode({"jpg": jpg})), int, str)
              .batched(batch_size, partial=True))
    return wds.WebLoader(ds, batch_size=None, num_workers=num_workers)


class ShardDataModule(pl.LightningDataModule):
    """Train and val loaders over the shards. decode="cpu": workers decode and transform (train_tf, val_tf).
    decode="gpu": workers only read the JPEG bytes; `gpu` (a `GpuPreprocess`) decodes and augments them on the
    batch's device in `on_after_batch_transfer` (train_tf/val_tf unused). `channels_last` also converts the CPU
    path's batches to channels_last once they are on a CUDA device."""

    def __init__(self, shards: str | Path, train_tf, val_tf, batch_size: int, num_workers: int, shuffle_buffer: int,
                 seed: int = 0, draft: int | None = None, decode: str = "cpu", gpu: GpuPreprocess | None = None,
                 channels_last: bool = False):
        super().__init__()
        if decode not in ("cpu", "gpu") or (decode == "gpu" and gpu is None):
            raise ValueError(f"decode={decode!r}: expected 'cpu', or 'gpu' with a GpuPreprocess")
        self.shards, self.train_tf, self.val_tf = _root(shards), train_tf, val_tf
        self.batch_size, self.num_workers, self.shuffle_buffer, self.seed = batch_size, num_workers, shuffle_buffer, seed
        self.draft, self.decode, self.gpu, self.channels_last = draft, decode, gpu, channels_last
        self.manifest = read_manifest(self.shards)

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    def train_dataloader(self):
        world = self.trainer.world_size if self.trainer else 1
        tf = None if self.decode == "gpu" else self.train_tf
        return train_loader(self.shards, tf, self.batch_size, self.num_workers, self.shuffle_buffer,
                            world, self.seed, self.draft)

    def val_dataloader(self):
        return eval_loader(self.shards, None if self.decode == "gpu" else self.val_tf, self.batch_size,
                           self.num_workers)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        if self.decode != "gpu":
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        flat, sizes, *rest = batch  # the JPEG bytes stay in host memory: nvjpeg reads them from there
        return [flat, sizes, *super().transfer_batch_to_device(rest, device, dataloader_idx)]

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self.decode == "gpu":
            flat, sizes, y, *rest = batch
            training = self.trainer is not None and self.trainer.training
            x = (self.gpu.train if training else self.gpu.eval)(flat, sizes, y.device)
            return [x, y, *rest]
        x = batch[0]
        if self.channels_last and torch.is_tensor(x) and x.ndim == 4 and x.is_cuda:
            return [x.contiguous(memory_format=torch.channels_last), *batch[1:]]
        return batch
