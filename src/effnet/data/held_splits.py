"""Splits held in memory: read and decoded once, served again without the shards' reading and decoding.

`HeldShards` holds the training split in each loader process as its stream first reads it (`data.hold_mb`);
`HeldSplit` holds an evaluation split for a stage that measures it many times (evaluate's sweep, fixres's choice).
Both stream instead where the split would pass its budget.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image

from effnet.data import manifest, transforms
from effnet.data.reading import decode, read_shard, shard_urls
from effnet.models import Preprocessing

log = logging.getLogger(__name__)

MIB = 2 ** 20
ESTIMATE_AFTER = 32  # images held before a split's size is estimated against its budget


def _image_bytes(image: Image.Image) -> int:
    return image.width * image.height * len(image.getbands())


class _Budget:
    """Bytes held for a split of EXPECTED samples against BUDGET_MB: `add` says whether they still fit, and stops
    early, after ESTIMATE_AFTER samples, where their mean size says the whole split would not."""

    def __init__(self, expected: int, budget_mb: float):
        self.expected, self.limit, self.used, self.samples = expected, budget_mb * MIB, 0, 0

    def add(self, nbytes: int) -> bool:
        self.used, self.samples = self.used + nbytes, self.samples + 1
        estimate = self.used / self.samples * self.expected if self.samples == ESTIMATE_AFTER else 0
        return self.used <= self.limit and estimate <= self.limit


class HeldShards:
    """One loader process's copy of the training split, filled as its stream first reads it: each shard's samples
    are kept once read to its end, each image once decoded, and served from memory after that, in the order and
    with the pixels that streaming gives (runs repeat streamed ones bit for bit). Training reads the same shards
    every epoch; reading and decoding them again took a third of a loader worker's CPU, which on a CPU comes out of
    the model's. Where the split would pass BUDGET_MB (estimated from the first images decoded against its
    EXPECTED samples), it lets go of everything, says so once, and streams."""

    def __init__(self, expected: int, budget_mb: float):
        self.budget = _Budget(expected, budget_mb)
        self.shards: dict[str, list[dict]] = {}  # url -> its samples, as webdataset reads them
        self.images: dict[tuple[str, str], Image.Image] = {}  # (url, key) -> decoded
        self.on = budget_mb > 0

    def samples(self, shards, expected: dict[str, int] | None = None):
        """`reading.read_shard` over SHARDS (dicts with a url; EXPECTED: their sample counts), from memory where it
        can (a shard gone bad is held as read, its lost samples' stand-in included)."""
        for shard in shards:
            if not self.on:
                yield from read_shard(shard, expected)
            elif shard["url"] in self.shards:
                yield from self.shards[shard["url"]]
            else:
                read = []
                for sample in read_shard(shard, expected):
                    read.append(sample)
                    yield sample
                if self.on:  # read to its end (an epoch can stop mid-shard: then it is read again)
                    self.shards[shard["url"]] = read

    def image(self, jpg: bytes, url: str, key: str, draft: int | None) -> Image.Image:
        """`decode`, once per sample (its bytes and pixels counted against the budget then). Transforms make new
        images, never change the one they are given."""
        image = self.images.get((url, key))
        if image is None:
            image = decode({"jpg": jpg}, draft)
            if self.on:
                self.images[url, key] = image
                if not self.budget.add(len(jpg) + _image_bytes(image)):
                    log.info("the training split would take over %.0f MiB in each loader process (data.hold_mb "
                             "shared by the workers): it is streamed every epoch", self.budget.limit / MIB)
                    self.on, self.shards, self.images = False, {}, {}
        return image


class HeldSplit:
    """A split's images (those KEEP accepts, the first LIMIT), decoded once and held in memory, for a stage that
    measures them many times (evaluate's sweep, fixres's resolution choice): each pass then only resizes and crops
    them, in the consumer's process, and passes at a preprocessing made before (two models at one resolution, the
    selected one measured again) reuse its batches, as many as fit in the budget beside the images. Streaming them
    from the shards instead repeats the decoding every pass, in loader workers that take the CPU from the model (on
    a CPU, a pass took 1.6x the model's own time)."""

    def __init__(self, images: list, labels: list[int], keys: list[str], budget_mb: float = 2048):
        self.images, self.labels, self.keys, self.budget = images, labels, keys, budget_mb * MIB
        self.image_bytes = sum(map(_image_bytes, images))
        self._made: dict[tuple, list[tuple]] = {}  # (preprocessing, batch size) -> batches, oldest first

    @classmethod
    def load(cls, shards: str | Path, split: str = "val", keep: Callable[[str], bool] | None = None,
             limit: int | None = None, budget_mb: int = 2048) -> HeldSplit | None:
        """The split decoded, in shard order; None where its decoded images would pass BUDGET_MB (estimated
        from the first images against the split's size in the manifest): a caller then streams it."""
        total = manifest.read_manifest(shards)["splits"][split]["total"]
        budget, images, labels, keys = _Budget(min(total, limit or total), budget_mb), [], [], []
        samples = wds.WebDataset(shard_urls(shards, split), shardshuffle=False, empty_check=False)
        if keep is not None:
            samples = samples.select(lambda sample: keep(sample["__key__"]))
        for jpg, label, key in samples.to_tuple("jpg", "cls", "__key__"):
            if len(keys) == limit:
                break
            image = decode({"jpg": jpg})
            if not budget.add(_image_bytes(image)):
                log.info("%s: %s's decoded images would take over data.hold_mb = %d MiB: streamed each pass",
                         shards, split, budget_mb)
                return None
            images.append(image)
            labels.append(int(label))
            keys.append(str(key))
        return cls(images, labels, keys, budget_mb)

    def __len__(self) -> int:
        return len(self.keys)

    def batches(self, pre: Preprocessing, batch_size: int) -> list[tuple]:
        """(uint8 NCHW images, labels, keys) batches with PRE's eval preprocessing, as `loaders.eval_loader` makes."""
        if (pre, batch_size) not in self._made:
            transform = transforms.eval_transform(pre, uint8=True)
            batches = []
            for start in range(0, len(self), batch_size):
                end = start + batch_size
                images = torch.stack([transform(image) for image in self.images[start:end]])
                batches.append((images, torch.tensor(self.labels[start:end]), self.keys[start:end]))
            while self._made and self.image_bytes + sum(map(_nbytes, [*self._made.values(), batches])) > self.budget:
                del self._made[next(iter(self._made))]
            self._made[pre, batch_size] = batches
        return self._made[pre, batch_size]


def _nbytes(batches: list[tuple]) -> int:
    return sum(images.nbytes for images, *_ in batches)
