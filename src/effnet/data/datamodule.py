"""The Lightning DataModule over the shards: train and val loaders, each batch finished on the training device by
a device feed (`effnet.data.feed`: normalise uint8 images, or decode and augment JPEG bytes) that
`DevicePrefetcher` runs ahead of the step; the training stream's state saved with checkpoints and resumed from them.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from effnet.data import manifest, transforms
from effnet.data.held_splits import HeldSplit
from effnet.data.loaders import eval_loader, train_loader, worker_nice
from effnet.data.prefetch import DevicePrefetcher
from effnet.data.train_stream import Advance, StreamState
from effnet.models import Preprocessing

log = logging.getLogger(__name__)


def _root(shards) -> str | Path:
    """Keep URLs as strings: Path() would turn s3://b/x into s3:/b/x."""
    return shards if isinstance(shards, str) else Path(shards)


class ShardDataModule(pl.LightningDataModule):
    """Train and val loaders over the shards, each batch finished on the training device by `feed` (a
    `feed.DeviceFeed`) through a `DevicePrefetcher`. With a feed that decodes (`GpuPreprocess`), the workers only
    read JPEG bytes and train_tf/val_pre are not used; otherwise they decode and transform to uint8 images
    (`transforms.*(..., uint8=True)`: train_tf, and val_pre's eval transform). Single-process, val is decoded once
    and held in memory where it fits in HOLD_MB (`HeldSplit`), since it is validated every epoch.

    The training stream is resumable: each training batch advances `stream` (a `StreamState`) just before the step,
    checkpoints record every rank's (`state_dict`), and a run restored from a checkpoint continues each rank's
    stream from there (same world size and loader workers; otherwise it starts afresh, with a warning)."""

    def __init__(self, shards: str | Path, train_tf, val_pre: Preprocessing | None, batch_size: int, num_workers: int,
                 shuffle_buffer: int, feed, seed: int = 0, draft: int | None = None, holdout: float = 0.0,
                 hold_mb: int = 0, max_skipped: float = 0.01):
        super().__init__()
        self.holdout, self.val_pre, self.hold_mb = holdout, val_pre, hold_mb
        self.max_skipped = max_skipped  # share of the training samples read that may be skipped (shards gone bad)
        self._held_val: HeldSplit | None | bool = None  # False: too big to hold
        self.shards, self.train_tf, self.feed = _root(shards), train_tf, feed
        self.batch_size, self.num_workers, self.shuffle_buffer = batch_size, num_workers, shuffle_buffer
        self.seed, self.draft = seed, draft
        self.manifest = manifest.read_manifest(self.shards)
        self.stream: StreamState | None = None
        self._restored: dict = {}

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer else torch.device("cpu")

    def train_dataloader(self):
        trainer = self.trainer
        world, rank, accumulate = ((trainer.world_size, trainer.global_rank, trainer.accumulate_grad_batches)
                                   if trainer else (1, 0, 1))
        loader = self.make_train_loader(self.shards, None if self.feed.decodes else self.train_tf, self.batch_size,
                                        self.num_workers, self.shuffle_buffer, world, self.seed, self.draft,
                                        pin_memory=self.device.type == "cuda", rank=rank, accumulate=accumulate,
                                        resume=self._resume(world, rank), holdout=self.holdout,
                                        nice=worker_nice(self.device), hold_mb=self.hold_mb)
        self.stream = loader.state
        return self._prefetched(loader, train=True)

    def make_train_loader(self, *args, **kwargs):
        """The training epochs (`loaders.train_loader`'s arguments): a student's DataModule mixes in pseudo-labeled
        images here (`mixed_stream.MixedDataModule`)."""
        return train_loader(*args, **kwargs)

    def val_dataloader(self):
        if not self.feed.decodes and (self.trainer is None or self.trainer.world_size == 1):
            if self._held_val is None:  # validated every epoch: decoded once, held in memory where it fits
                self._held_val = HeldSplit.load(self.shards, "val", budget_mb=self.hold_mb) or False
            if self._held_val:
                return DevicePrefetcher(self._held_val.batches(self.val_pre, self.batch_size), self.feed, False,
                                        self.device, threaded=False)
        val_tf = None if self.feed.decodes else transforms.eval_transform(self.val_pre, uint8=True)
        loader = eval_loader(self.shards, val_tf, self.batch_size,
                             self.num_workers, pin_memory=self.device.type == "cuda", nice=worker_nice(self.device))
        return self._prefetched(loader, train=False)

    def _prefetched(self, loader, train: bool) -> DevicePrefetcher:
        # XLA: no thread. Its ops are traced lazily into the pending graph, whichever thread runs them: a feed run
        # beside the step would land in that step's graph or the next, as timing has it, a new graph to compile
        # each time. In the step's own thread the normalisation joins each step's graph the same way.
        threaded = self.num_workers == 0 and self.device.type != "xla"
        return DevicePrefetcher(loader, self.feed, train, self.device, threaded=threaded)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """A training batch is about to be trained on: advance the stream's state, and drop its `Advance`."""
        if isinstance(batch[-1], Advance):
            self.stream.advance(batch[-1])
            batch = batch[:-1]
        return batch

    def state_dict(self) -> dict:
        if self.stream is None:
            return {}
        return {"world_size": self.trainer.world_size, "ranks": per_rank(self.stream.to_dict())}

    def load_state_dict(self, state: dict) -> None:
        self._restored = state

    def _resume(self, world: int, rank: int) -> StreamState | None:
        if not self._restored:
            return None
        if self._restored["world_size"] != world:
            log.warning("the checkpoint's stream ran on %d ranks, this run on %d: it starts afresh, not where the "
                        "checkpoint was", self._restored["world_size"], world)
            return None
        return StreamState.from_dict(self._restored["ranks"][rank])


def per_rank(obj) -> list:
    """OBJ of every rank, in rank order (a collective: every rank calls it); [OBJ] without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
