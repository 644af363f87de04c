"""Streaming the shards into training: webdataset pipelines and a Lightning DataModule.

Training streams resampled shards (every rank and worker draws shards independently and endlessly) cut to a fixed
epoch length from the manifest, so all DDP ranks run the same number of steps. Evaluation reads each val shard
once, split by node and worker, so that every sample is seen exactly once.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytorch_lightning as pl
import webdataset as wds

from effnet.data.shard import read_manifest

# with_length() is only the epoch length Lightning shows and plans with; with_epoch() sets the real one.
warnings.filterwarnings("ignore", message=r"\.with_length\(\) only sets")


def shard_urls(shards: Path, split: str) -> list[str]:
    return [str(Path(shards) / s["name"]) for s in read_manifest(shards)["splits"][split]["shards"]]


def decode(sample: dict) -> dict:
    """JPEG bytes -> PIL: the separable decode step (a GPU path takes the bytes instead)."""
    return wds.autodecode.imagehandler("pilrgb")("jpg", sample["jpg"])


def train_loader(shards: Path, transform, batch_size: int, num_workers: int, shuffle_buffer: int,
                 world_size: int = 1, seed: int = 0) -> wds.WebLoader:
    total = read_manifest(shards)["splits"]["train"]["total"]
    steps = max(1, total // (batch_size * world_size))
    ds = (wds.WebDataset(shard_urls(shards, "train"), resampled=True, shardshuffle=False,
                         nodesplitter=wds.split_by_node, seed=seed)
          .shuffle(shuffle_buffer)
          .to_tuple("jpg", "cls")
          .map_tuple(lambda jpg: transform(decode({"jpg": jpg})), int)
          .batched(batch_size, partial=False))
    return wds.WebLoader(ds, batch_size=None, num_workers=num_workers,
                         persistent_workers=num_workers > 0).with_epoch(steps).with_length(steps)


def eval_loader(shards: Path, transform, batch_size: int, num_workers: int, split: str = "val") -> wds.WebLoader:
    ds = (wds.WebDataset(shard_urls(shards, split), shardshuffle=False, nodesplitter=wds.split_by_node,
                         empty_check=False)
          .to_tuple("jpg", "cls", "__key__")
          .map_tuple(lambda jpg: transform(decode({"jpg": jpg})), int, str)
          .batched(batch_size, partial=True))
    return wds.WebLoader(ds, batch_size=None, num_workers=num_workers)


class ShardDataModule(pl.LightningDataModule):
    def __init__(self, shards: Path, train_tf, val_tf, batch_size: int, num_workers: int, shuffle_buffer: int,
                 seed: int = 0):
        super().__init__()
        self.shards, self.train_tf, self.val_tf = Path(shards), train_tf, val_tf
        self.batch_size, self.num_workers, self.shuffle_buffer, self.seed = batch_size, num_workers, shuffle_buffer, seed
        self.manifest = read_manifest(shards)

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    def train_dataloader(self):
        world = self.trainer.world_size if self.trainer else 1
        return train_loader(self.shards, self.train_tf, self.batch_size, self.num_workers, self.shuffle_buffer,
                            world, self.seed)

    def val_dataloader(self):
        return eval_loader(self.shards, self.val_tf, self.batch_size, self.num_workers)
