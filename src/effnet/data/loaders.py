"""Loaders over the shards: training epochs of a `TrainStream`, evaluation passes that see each sample once.

Evaluation reads each val shard once, split by node and worker, so that every sample is seen exactly once across
ranks. With `transform=None` the loaders yield the JPEG bytes undecoded (`gpu.collate_jpeg`). Loader workers give
way to a model that runs on the CPU (`worker_nice`).
"""
from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import webdataset as wds

from effnet.data import manifest
from effnet.data.gpu import collate_jpeg
from effnet.data.held_splits import HeldShards
from effnet.data.reading import decode, shard_sizes, shard_urls
from effnet.data.train_stream import PREFETCH, Advance, Position, StreamState, TrainStream

log = logging.getLogger(__name__)

# Loader workers' nice increment where the model runs on the CPU: its ops split over every core and wait for the
# slowest, so a worker holding 40 % of one core slowed a model-only step by a third; at nice 19 it ran in the
# step's gaps and cost 4 % (bench/cpu_bench.py, 2 cores). On an accelerator the workers keep their priority.
CPU_WORKER_NICE = 19


def _nice_worker(nice: int, _worker_id: int) -> None:
    os.nice(nice)


def _lower_priority(nice: int):
    """A DataLoader worker_init_fn (picklable, for any start method): the worker gives way to the training process
    by NICE (see CPU_WORKER_NICE)."""
    return functools.partial(_nice_worker, nice) if nice else None


def worker_nice(device) -> int:
    return CPU_WORKER_NICE if torch.device(device).type == "cpu" else 0


class TrainLoader:
    """A DataLoader over a `TrainStream`, as epochs of `state.steps` batches `[images, labels, Advance]` (the workers'
    announcements ride on the next batch). Sized, as Lightning wants. `state` is where the stream starts; the
    training side advances it with each batch it trains on (`ShardDataModule`)."""

    def __init__(self, loader, state: StreamState):
        self.loader, self.state = loader, state

    def __len__(self) -> int:
        return self.state.steps

    def __iter__(self):
        news = []
        for item in self.loader:
            if isinstance(item[-1], Position):  # an announcement: (worker, position)
                news.append(tuple(item))
                continue
            *batch, advance = item
            yield [*batch, Advance(news + advance.news)]
            news = []


def epoch_steps(total: int, batch_size: int, world_size: int, accumulate: int = 1) -> int:
    """Batches per epoch of each rank: whole optimizer steps of the global batch (at least one), each
    `accumulate` batches."""
    return max(1, total // (batch_size * world_size * accumulate)) * accumulate


def train_loader(shards: str | Path, transform, batch_size: int, num_workers: int, shuffle_buffer: int,
                 world_size: int = 1, seed: int = 0, draft: int | None = None, pin_memory: bool = False,
                 rank: int | None = None, accumulate: int = 1, resume: StreamState | None = None,
                 holdout: float = 0.0, nice: int = 0, hold_mb: float = 0) -> TrainLoader:
    """Batches of (images, labels, Advance); with transform None, of undecoded JPEG bytes (see `gpu.collate_jpeg`).
    The HOLDOUT share of the samples (`manifest.in_holdout`) is left out.

    The stream is a function of `seed` (see `TrainStream`), and the workers' augmentations are seeded by the
    DataLoader from torch's RNG (which `pl.seed_everything` sets), so a run with loader workers repeats batch for
    batch; with `resume` (a `StreamState` of this rank's stream, same steps and workers) it continues where that
    was. Workers: at most one per batch of the epoch, at a lower priority by NICE. With HOLD_MB, each worker (or
    this process, without workers) holds the split read and decoded where its share of HOLD_MB allows
    (`HeldShards`)."""
    total = manifest.read_manifest(shards)["splits"]["train"]["total"]
    steps = epoch_steps(round(total * (1 - holdout)), batch_size, world_size, accumulate)
    workers, rank, resume = resumable(steps, num_workers, rank, resume)
    held = HeldShards(total, hold_mb / max(1, workers)) if hold_mb else None
    stream = TrainStream(shard_urls(shards, "train"), transform, batch_size, shuffle_buffer, seed, rank, steps,
                         draft, resume, holdout, held, shard_sizes(shards, "train"))
    return epochs(stream, steps, workers, resume, pin_memory, nice)


def resumable(steps: int, num_workers: int, rank: int | None, resume: StreamState | None
              ) -> tuple[int, int, StreamState | None]:
    """A training stream's loader workers (at most one per batch of the epoch), its rank (torch.distributed's when
    None) and the state it resumes from: RESUME where it was made with the same steps and workers, else None (and a
    warning)."""
    workers = min(num_workers, steps)
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if resume is not None and (resume.steps, resume.workers) != (steps, workers):
        log.warning("the checkpoint's stream had %d batches per epoch over %d workers, this one %d over %d: it starts "
                    "afresh, not where the checkpoint was", resume.steps, resume.workers, steps, workers)
        resume = None
    return workers, rank, resume


def epochs(stream: TrainStream, steps: int, workers: int, resume: StreamState | None, pin_memory: bool, nice: int
           ) -> TrainLoader:
    """STREAM's epochs of STEPS batches over WORKERS loader workers (at a lower priority by NICE), from RESUME."""
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                                         pin_memory=pin_memory, prefetch_factor=PREFETCH if workers else None,
                                         worker_init_fn=_lower_priority(nice))
    state = StreamState(steps, workers) if resume is None else StreamState.from_dict(resume.to_dict())
    return TrainLoader(loader, state)


def eval_loader(shards: str | Path, transform, batch_size: int, num_workers: int, split: str = "val",
                pin_memory: bool = False, keep: Callable[[str], bool] | None = None, nice: int = 0
                ) -> wds.WebLoader:
    """Batches of (images, labels, keys) of SPLIT (only the samples whose key KEEP accepts, when given); with
    transform None, of undecoded JPEG bytes (see `gpu.collate_jpeg`). Workers run at a lower priority by NICE.
    The unlabeled split's samples have no class: their labels are -1.

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
    ds = (ds.to_tuple("jpg", "cls", "__key__") if split != manifest.UNLABELED
          else ds.to_tuple("jpg", "__key__").map(lambda sample: (sample[0], -1, sample[1])))
    if transform is None:
        ds = ds.map_tuple(bytes, int, str).batched(batch_size, collation_fn=collate_jpeg, partial=True)
    else:
        ds = (ds.map_tuple(lambda jpg: transform(decode({"jpg": jpg})), int, str)
              .batched(batch_size, partial=True))
    return wds.WebLoader(ds, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                         worker_init_fn=_lower_priority(nice))
