"""Streaming the shards into training: webdataset pipelines and a Lightning DataModule.

Training streams resampled shards (every rank and worker draws shards independently and endlessly) cut to a fixed
epoch length from the manifest, so all DDP ranks run the same number of steps. Evaluation reads each val shard
once, split by node and worker, so that every sample is seen exactly once across ranks. Shards may live in a local
folder, at an fsspec URL (s3://, gs://, memory://...) or behind a `pipe:` command with `{name}` in it.

With `transform=None` the loaders yield the JPEG bytes undecoded (`gpu.collate_jpeg`). `ShardDataModule` hands each
batch to a device feed (`effnet.data.feed`: normalise uint8 images, or decode and augment JPEG bytes) that
`DevicePrefetcher` runs ahead of the training step, in a thread, on a side CUDA stream.
"""
from __future__ import annotations

import importlib
import itertools
import io
import queue
import random
import threading
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

import fsspec
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import webdataset as wds
from PIL import Image

from effnet.data import manifest
from effnet.data.gpu import collate_jpeg

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


def train_loader(shards: str | Path, transform, batch_size: int, num_workers: int, shuffle_buffer: int,
                 world_size: int = 1, seed: int = 0, draft: int | None = None, pin_memory: bool = False,
                 holdout: float = 0.0) -> wds.WebLoader:
    """Batches of (images, labels); with transform None, of undecoded JPEG bytes (see `gpu.collate_jpeg`). The
    HOLDOUT share of the samples (`manifest.in_holdout`) is left out.

    The stream is a function of `seed`: every (rank, worker) draws its shards and shuffles its buffer from its
    own seed derived from it, and the workers' augmentations are seeded by the DataLoader from torch's RNG (which
    `pl.seed_everything` sets), so a run with loader workers repeats batch for batch."""
    total = manifest.read_manifest(shards)["splits"]["train"]["total"]
    steps = max(1, round(total * (1 - holdout)) // (batch_size * world_size))
    if transform is None:
        load = [wds.map_tuple(bytes, int), wds.batched(batch_size, collation_fn=collate_jpeg, partial=False)]
    else:
        load = [wds.map_tuple(lambda jpg: transform(decode({"jpg": jpg}, draft)), int),
                wds.batched(batch_size, partial=False)]
    ds = wds.DataPipeline(wds.ResampledShards(shard_urls(shards, "train"), seed=seed, deterministic=True),
                          wds.tarfile_to_samples(), wds.select(lambda s: not manifest.in_holdout(s["__key__"], holdout)),
                          partial(_seeded_shuffle, bufsize=shuffle_buffer, seed=seed),
                          wds.to_tuple("jpg", "cls"), *load)
    return wds.WebLoader(ds, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
                         pin_memory=pin_memory).with_epoch(steps).with_length(steps)


def _seeded_shuffle(samples, bufsize: int, seed: int):
    """webdataset's buffer shuffle with a generator seeded per (seed, rank, worker): its default seeds from the
    clock, so no two runs would see the same order."""
    if bufsize < 1:
        yield from samples
        return
    rng = random.Random(wds.utils.make_seed(seed, wds.utils.pytorch_worker_seed()))
    yield from wds.shuffle(bufsize, rng=rng)(samples)


def eval_loader(shards: str | Path, transform, batch_size: int, num_workers: int, split: str = "val",
                pin_memory: bool = False, keep: Callable[[str], bool] | None = None) -> wds.WebLoader:
    """Batches of (images, labels, keys) of SPLIT (only the samples whose key KEEP accepts, when given); with
    transform None, of undecoded JPEG bytes (see `gpu.collate_jpeg`).

    Under torch.distributed every sample goes to exactly one rank: whole shards per rank when there are at least
    as many shards as ranks; otherwise every rank reads all shards and keeps every world_size-th sample (so no
    rank is left without data, which would also stall the ranks' metric sync)."""
    urls = shard_urls(shards, split)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    by_shard = len(urls) >= world
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node if by_shard else None,
                        empty_check=False)
    if not by_shard:
        ds = ds.slice(rank, None, world)
    if keep is not None:
        ds = ds.select(lambda sample: keep(sample["__key__"]))
    ds = ds.to_tuple("jpg", "cls", "__key__")
    if transform is None:
        ds = ds.map_tuple(bytes, int, str).batched(batch_size, collation_fn=collate_jpeg, partial=True)
    else:
        ds = (ds.map_tuple(lambda jpg: transform(decode({"jpg": jpg})), int, str)
              .batched(batch_size, partial=True))
    return wds.WebLoader(ds, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)


class DevicePrefetcher:
    """Iterates `loader`, running `feed(batch, train, device)` on each batch `depth` batches ahead, in a thread.

    On CUDA the feed runs on a side stream and each batch carries an event the consumer's stream waits for, so
    the copies, decoding and augmentation of the next batches overlap the training step (their host-side work
    too: torch releases the GIL inside its ops). On other devices it is the same thread and queue, no streams.
    Sized when the loader is, as Lightning wants for its epoch length."""

    def __init__(self, loader, feed, train: bool, device, depth: int = 2):
        self.loader, self.feed, self.train, self.depth = loader, feed, train, depth
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        cuda = self.device.type == "cuda"
        ready: queue.Queue = queue.Queue(self.depth)
        stop = threading.Event()

        def put(item) -> None:  # gives up once the consumer has gone
            while not stop.is_set():
                try:
                    return ready.put(item, timeout=0.1)
                except queue.Full:
                    pass

        # The first batch is fetched here, in the consumer's thread: starting the loader draws its workers' seeds
        # from torch's global RNG, which must happen at the same point of every run, not whenever the thread runs.
        batches = iter(self.loader)
        first = next(batches, StopIteration)

        def work() -> None:
            try:
                if cuda:
                    torch.cuda.set_device(self.device)
                side = torch.cuda.Stream(self.device) if cuda else None
                for batch in itertools.chain([] if first is StopIteration else [first], batches):
                    if stop.is_set():
                        return
                    with torch.cuda.stream(side) if cuda else nullcontext():
                        out = self.feed(batch, self.train, self.device)
                        done = torch.cuda.Event() if cuda else None
                        if done is not None:
                            done.record(side)
                    put((out, done))
                put(StopIteration)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
                put(e)

        thread = threading.Thread(target=work, name="effnet-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is StopIteration:
                    return
                if isinstance(item, BaseException):
                    raise item
                out, done = item
                if done is not None:
                    stream = torch.cuda.current_stream(self.device)
                    stream.wait_event(done)
                    for t in out:  # made on the side stream: keep the allocator from reusing it too early
                        if torch.is_tensor(t):
                            t.record_stream(stream)
                yield out
        finally:
            stop.set()
            thread.join(timeout=5)


class ShardDataModule(pl.LightningDataModule):
    """Train and val loaders over the shards, each batch finished on the training device by `feed` (a
    `feed.DeviceFeed`) through a `DevicePrefetcher`. With a feed that decodes (`GpuPreprocess`), the workers only
    read JPEG bytes and train_tf/val_tf are not used; otherwise they decode and transform to uint8 images
    (`transforms.*(..., uint8=True)`)."""

    def __init__(self, shards: str | Path, train_tf, val_tf, batch_size: int, num_workers: int, shuffle_buffer: int,
                 feed, seed: int = 0, draft: int | None = None, holdout: float = 0.0):
        super().__init__()
        self.holdout = holdout
        self.shards, self.train_tf, self.val_tf, self.feed = _root(shards), train_tf, val_tf, feed
        self.batch_size, self.num_workers, self.shuffle_buffer, self.seed = batch_size, num_workers, shuffle_buffer, seed
        self.draft = draft
        self.manifest = manifest.read_manifest(self.shards)

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer else torch.device("cpu")

    def train_dataloader(self):
        world = self.trainer.world_size if self.trainer else 1
        loader = train_loader(self.shards, None if self.feed.decodes else self.train_tf, self.batch_size,
                              self.num_workers, self.shuffle_buffer, world, self.seed, self.draft,
                              pin_memory=self.device.type == "cuda", holdout=self.holdout)
        return DevicePrefetcher(loader, self.feed, True, self.device)

    def val_dataloader(self):
        loader = eval_loader(self.shards, None if self.feed.decodes else self.val_tf, self.batch_size,
                             self.num_workers, pin_memory=self.device.type == "cuda")
        return DevicePrefetcher(loader, self.feed, False, self.device)
