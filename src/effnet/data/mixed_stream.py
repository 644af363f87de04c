"""A Noisy Student's training stream: every batch mixes labeled training images and the teacher's pseudo-labeled
unlabeled ones at a set ratio, their targets soft class vectors (timm's SoftTargetCrossEntropy trains on them).

`MixedStream` is a `TrainStream` (the same seeded shard draw per rank, worker and epoch; the same positions in
checkpoints, so a resumed run continues batch for batch) with a second, endless stream beside the labeled one: the
unlabeled shards, resampled and shuffled with seeds of their own, each sample the pseudo-label table selected
repeated as many times as the table says (`copies`, the balancing's duplicates), the others passed over. A worker's
`Position.unlabeled` counts what it took of that stream in the epoch, as `Position.samples` does for the labeled one.

An epoch is a whole number of optimizer steps on every rank (`loaders.epoch_steps`), enough for one pass over the
larger of the two sets (the labeled one at its share of each batch, the pseudo-labeled one with its copies at the
rest), so DDP ranks run the same steps.
"""
from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from effnet.data import manifest
from effnet.data.manifest import UNLABELED
from effnet.data.datamodule import ShardDataModule
from effnet.data.gpu import collate_jpeg
from effnet.data.held_splits import HeldShards
from effnet.data.loaders import TrainLoader, epoch_steps, epochs, resumable
from effnet.data.reading import LOST, decode, read_shard, say_once, shard_sizes, shard_urls
from effnet.data.train_stream import Position, StreamState, TrainStream, _resampled
from effnet.errors import EffnetError

Targets = dict[str, tuple[np.ndarray, int]]  # sample key -> (class probabilities, copies per pass)
PROB_PREFIX = "p:"  # the pseudo-label table's column of each class's probability is "p:<class>"


def read_table(path: str | Path, classes: list[str]) -> Targets:
    """The pseudo-label table (`effnet pseudolabel`'s Parquet) as targets by sample key; its classes must be
    CLASSES (the shards'), else one line naming the file."""
    import pyarrow.parquet as pq
    path = Path(path)
    if not path.is_file():
        raise EffnetError(f"{path}: no pseudo-label table (run `effnet pseudolabel` first)")
    table = pq.read_table(path).to_pydict()
    columns = [PROB_PREFIX + c for c in classes]
    missing = [c for c in columns if c not in table]
    if missing or len([c for c in table if c.startswith(PROB_PREFIX)]) != len(classes):
        raise EffnetError(f"{path}: its classes are not the shards' ({', '.join(classes)}): pseudo-label again")
    probs = np.stack([np.asarray(table[c], dtype=np.float32) for c in columns], axis=1)
    return {key: (probs[i], int(copies)) for i, (key, copies) in enumerate(zip(table["key"], table["copies"]))}


def one_hot(label: int, num_classes: int, smoothing: float) -> np.ndarray:
    target = np.full(num_classes, smoothing / num_classes, dtype=np.float32)
    target[label] += 1.0 - smoothing
    return target


def labeled_share(batch_size: int, ratio: float) -> int:
    """Labeled images of each BATCH_SIZE batch at RATIO pseudo-labeled per labeled one (at least one of each)."""
    if batch_size < 2:
        raise EffnetError(f"train.batch_size: {batch_size}: a student's batch mixes labeled and pseudo-labeled "
                          "images, at least one of each")
    return min(batch_size - 1, max(1, round(batch_size / (1 + ratio))))


class MixedStream(TrainStream):
    """A `TrainStream` whose batches hold LABELED labeled images (first) and batch_size - LABELED pseudo-labeled
    ones, every target a vector: the labeled class one-hot with label SMOOTHING, the table's probabilities as they
    are. See the module's docstring."""

    def __init__(self, urls: list[str], unlabeled_urls: list[str], targets: Targets, labeled: int,
                 num_classes: int, smoothing: float, transform, batch_size: int, shuffle_buffer: int, seed: int,
                 rank: int, steps: int, draft: int | None = None, resume: StreamState | None = None,
                 holdout: float = 0.0, held: HeldShards | None = None, expected: dict[str, int] | None = None,
                 unlabeled_expected: dict[str, int] | None = None):
        super().__init__(urls, transform, batch_size, shuffle_buffer, seed, rank, steps, draft, resume, holdout,
                         held, expected)
        self.unlabeled_urls, self.targets, self.labeled = unlabeled_urls, targets, labeled
        self.num_classes, self.smoothing, self.unlabeled_expected = num_classes, smoothing, unlabeled_expected
        self._unlabeled_taken = 0

    def _after(self, epoch: int, taken: int, info) -> Position:
        position = super()._after(epoch, taken, info)
        position.unlabeled = self._unlabeled_taken if taken else 0  # taken 0: the next epoch, from its start
        return position

    def _samples(self, worker: int):
        labeled = ((x, one_hot(y, self.num_classes, self.smoothing)) for x, y in super()._samples(worker))
        pseudo = self._pseudo(worker)
        unlabeled = self.batch_size - self.labeled

        def mixed():
            while True:
                yield from itertools.islice(labeled, self.labeled)
                yield from itertools.islice(pseudo, unlabeled)
        return mixed()

    def _pseudo(self, worker: int):
        """This worker's pseudo-labeled (image, target) samples of its position's epoch, from its position on."""
        key = self.rank * 1000 + worker
        shards = _resampled(self.unlabeled_urls, wds.utils.make_seed(key, self._position.epoch, self.seed, 1))
        read = (s for shard in shards for s in read_shard(shard, self.unlabeled_expected))
        samples = self._selected(read)
        if self.shuffle_buffer >= 1:
            rng = random.Random(wds.utils.make_seed(self.seed, key, 1))
            samples = wds.shuffle(self.shuffle_buffer, rng=rng)(samples)
        self._unlabeled_taken = self._position.unlabeled
        return self._pseudo_usable(itertools.islice(samples, self._position.unlabeled, None))

    def _selected(self, read):
        """The samples the table selected, each as many times as its copies; lost samples' stand-ins pass through."""
        passed = 0
        limit = 2 * sum(self.unlabeled_expected.values()) + 1000 if self.unlabeled_expected else 100_000
        for sample in read:
            copies = 1 if LOST in sample else self.targets.get(sample["__key__"], (None, 0))[1]
            passed = 0 if copies else passed + 1
            if passed > limit:
                raise EffnetError(f"{sample['__url__']}: none of the last {passed - 1} unlabeled samples is in the "
                                  "pseudo-label table (shards made again after pseudolabel? run it again)")
            for _ in range(copies):
                yield sample

    def _pseudo_usable(self, samples):
        for sample in samples:
            self._unlabeled_taken += 1
            url, lost = sample["__url__"], sample.get(LOST)
            self._read += lost if lost is not None else 1
            if lost is not None or sample.get("jpg") is None:
                if lost != 0:
                    self._skipped[url] = self._skipped.get(url, 0) + (lost or 1)
                    if lost is None:
                        say_once(f"{url}/{sample['__key__']}", "no image")
                continue
            target = self.targets[sample["__key__"]][0]
            if self.transform is None:
                yield bytes(sample["jpg"]), target
                continue
            try:
                image = decode({"jpg": sample["jpg"]}, self.draft)
            except Exception as e:  # noqa: BLE001 - PIL raises many types for bytes that are not a whole image
                self._skipped[url] = self._skipped.get(url, 0) + 1
                say_once(f"{url}/{sample['__key__']}", f"not a decodable image ({type(e).__name__}: {e})")
                continue
            yield self.transform(image), target

    def _collate(self, samples: list[tuple]):
        images, targets = zip(*samples)
        targets = torch.from_numpy(np.stack(targets))
        if self.transform is None:  # JPEG bytes for a device decoder, packed as the training stream packs them
            return [collate_jpeg([(jpg, 0) for jpg in images])[0], targets]
        return [torch.stack(images), targets]


def mixed_loader(shards: str | Path, targets: Targets, ratio: float, smoothing: float, transform, batch_size: int,
                 num_workers: int, shuffle_buffer: int, world_size: int = 1, seed: int = 0, draft: int | None = None,
                 pin_memory: bool = False, rank: int | None = None, accumulate: int = 1,
                 resume: StreamState | None = None, holdout: float = 0.0, nice: int = 0, hold_mb: float = 0
                 ) -> TrainLoader:
    """`loaders.train_loader` for a student: batches of (images, soft targets, Advance) mixing the labeled training
    split (its HOLDOUT share left out) and the unlabeled split's samples TARGETS selected, RATIO of those per
    labeled image."""
    found = manifest.read_manifest(shards)
    if found["splits"].get(UNLABELED, {}).get("total", 0) == 0:
        raise EffnetError(f"{shards}: no unlabeled shards (shard a source with an unlabeled/ folder)")
    labeled = labeled_share(batch_size, ratio)
    total = found["splits"]["train"]["total"]
    passes = max(round(total * (1 - holdout)) * batch_size / labeled,
                 sum(copies for _, copies in targets.values()) * batch_size / (batch_size - labeled))
    steps = epoch_steps(round(passes), batch_size, world_size, accumulate)
    workers, rank, resume = resumable(steps, num_workers, rank, resume)
    held = HeldShards(total, hold_mb / max(1, workers)) if hold_mb else None
    stream = MixedStream(shard_urls(shards, "train"), shard_urls(shards, UNLABELED), targets, labeled,
                         len(found["classes"]), smoothing, transform, batch_size, shuffle_buffer, seed, rank, steps,
                         draft, resume, holdout, held, shard_sizes(shards, "train"), shard_sizes(shards, UNLABELED))
    return epochs(stream, steps, workers, resume, pin_memory, nice)


class MixedDataModule(ShardDataModule):
    """A student's DataModule: the training epochs are `mixed_loader`'s (TARGETS from the pseudo-label table, RATIO
    pseudo-labeled per labeled image, the labeled targets smoothed by SMOOTHING); validation as for any variant."""

    def __init__(self, *args, targets: Targets, ratio: float, smoothing: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.targets, self.ratio, self.smoothing = targets, ratio, smoothing

    def make_train_loader(self, shards, transform, batch_size, *args, **kwargs):
        return mixed_loader(shards, self.targets, self.ratio, self.smoothing, transform, batch_size, *args, **kwargs)
