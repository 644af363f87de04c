"""The resumable training stream: one rank's resampled shards, split over its loader workers, continued exactly
from a checkpoint.

Every rank and worker draws shards independently and endlessly, cut to a fixed epoch length (whole optimizer steps
of the global batch, `loaders.epoch_steps`), so all DDP ranks run the same number of steps. Each batch carries the
positions of the workers it brings news of (`Advance`); the training side folds them into a `StreamState`, which a
checkpoint records and a resumed run continues from.

A shard that went bad after sharding costs samples, never steps: a worker skips each sample it cannot use (an
image that does not decode, a sample missing its image or label, the samples of a truncated tar lost after the
fault: `reading.read_shard`) and takes the next, and counts it, by shard, in its position; the training side adds
the counts up (`data/skipped`) and stops the run past `data.max_skipped` (`lightning.SkippedSamples`).
"""
from __future__ import annotations

import itertools
import os
import random
import signal
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import webdataset as wds

from effnet.data import manifest
from effnet.errors import EffnetError
from effnet.data.gpu import collate_jpeg
from effnet.data.held_splits import HeldShards
from effnet.data.reading import LOST, decode, read_shard, say_once

PREFETCH = 2  # batches each loader worker works ahead (the DataLoader's prefetch_factor)
MAX_IN_A_ROW = 1000  # samples skipped in a row (or 20 batches' worth) after which a worker gives up on the shards


@dataclass
class Position:
    """Where one loader worker's part of a rank's training stream stands: the epoch it draws (each epoch draws a new
    shard sequence), how many samples it has taken from that epoch's shuffled samples, and, with loader workers,
    its RNG states after them (they drive its augmentations). Plain values only: it travels through the workers'
    queues and into checkpoints (loaded with torch's weights_only)."""

    epoch: int = 0
    samples: int = 0
    rng: dict | None = None
    read: int = 0  # samples read over all epochs, skipped ones included
    skipped: dict[str, int] = field(default_factory=dict)  # shard URL -> samples of it skipped, over all epochs
    unlabeled: int = 0  # a student's mixed stream: samples taken from the epoch's pseudo-labeled stream


class Advance:
    """What a training batch tells about the stream: the positions of the workers it brings news of (the worker that
    made it, after it, and any worker that announced itself before it). Not a dataclass or sequence, so that
    Lightning's batch transfer leaves it alone."""

    __slots__ = ("news",)

    def __init__(self, news: list[tuple[int, Position]]):
        self.news = news


@dataclass
class StreamState:
    """How far a rank's training has consumed its stream: the epoch, the batches of it trained on, and each loader
    worker's position after the last batch it made that was trained on. A checkpoint records it per rank
    (`ShardDataModule.state_dict`); `train_loader(resume=...)` continues the stream from it."""

    steps: int  # batches per epoch
    workers: int  # loader workers (0: the stream runs in the training process)
    epoch: int = 0
    batch: int = 0
    positions: dict[int, Position] = field(default_factory=dict)

    def advance(self, advance: Advance) -> None:
        """One batch trained on."""
        for worker, position in advance.news:
            self.positions[worker] = position
        self.batch += 1
        if self.batch == self.steps:
            self.epoch, self.batch = self.epoch + 1, 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StreamState:
        positions = {int(k): Position(**v) for k, v in d["positions"].items()}
        return cls(**{**d, "positions": positions})


def rng_state() -> dict:
    """This process's python, numpy and torch (CPU) RNG states, as plain values."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


class TrainStream(torch.utils.data.IterableDataset):
    """One rank's training stream, split over the DataLoader's workers: worker w makes batches w, w + W, w + 2W...
    of each epoch (the DataLoader takes them round robin, so they arrive in order) and ends its epoch after them.

    Worker w of rank r reads what webdataset's ResampledShards + buffer shuffle would give worker w of rank r: in
    epoch e, shards drawn from a generator seeded with (r * 1000 + w, e, seed), their samples shuffled by one seeded
    with (seed, r * 1000 + w). Each batch carries the worker's `Position` after it, and a worker's first item
    announces its starting position, so the training side always knows every worker's position as of the batches
    it has trained on (`StreamState`).

    With `resume`, each worker continues from its recorded position: it draws the same shards, reads and drops
    (without decoding) the samples it had taken, and sets its RNG states; the epoch continues at the recorded
    batch. Workers before that batch's worker in the round announce twice, so that the round robin still hands the
    batches over in order.

    At the end of its epoch a worker augments PREFETCH batches and one sample more and drops them: what the endless
    loader this stream replaced had done (its DataLoader kept PREFETCH batches per worker in flight, and webdataset's
    batcher reads one sample ahead), kept so that runs repeat those of earlier versions bit for bit."""

    def __init__(self, urls: list[str], transform, batch_size: int, shuffle_buffer: int, seed: int, rank: int,
                 steps: int, draft: int | None = None, resume: StreamState | None = None, holdout: float = 0.0,
                 held: HeldShards | None = None, expected: dict[str, int] | None = None):
        super().__init__()
        self.urls, self.transform, self.batch_size, self.shuffle_buffer = urls, transform, batch_size, shuffle_buffer
        self.seed, self.rank, self.steps, self.draft = seed, rank, steps, draft
        self.resume, self.holdout, self.held, self.expected = resume, holdout, held, expected
        self._epoch: int | None = None  # per worker process: the epoch its next iteration makes
        self._position = Position()
        self._taken = 0  # items taken from this epoch's shuffled samples, skipped ones included (Position.samples)
        self._read, self._skipped = 0, {}  # Position.read and .skipped as they grow

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, n = (info.id, info.num_workers) if info else (0, 1)
        start = 0
        if self._epoch is None:  # this worker's first epoch: where it starts, announced
            start = self._begin(worker, info is not None)
            yield worker, self._position
            if self.resume and worker < start % n:
                yield worker, self._position
        epoch, self._epoch = self._epoch, self._epoch + 1
        if self._position.epoch > epoch:  # made all its batches of this epoch before the resume
            return
        samples = self._samples(worker)
        own = range(start + (worker - start) % n, self.steps, n)
        for i, _ in enumerate(own):
            batch = self._collate(list(itertools.islice(samples, self.batch_size)))
            if i < len(own) - 1:
                self._position = self._after(epoch, self._taken, info)
            else:
                for _ in range((PREFETCH if info else 0) * self.batch_size + 1):
                    next(samples)
                self._position = self._after(epoch + 1, 0, info)
            yield *batch, Advance([(worker, self._position)])

    def _after(self, epoch: int, taken: int, info) -> Position:
        return Position(epoch, taken, self._rng(info), self._read, dict(self._skipped))

    def _begin(self, worker: int, in_worker: bool) -> int:
        """Set this worker's first epoch and position (its recorded one on resume); returns the epoch's first batch."""
        if in_worker:
            signal.signal(signal.SIGTERM, _exit_quietly)
        if self.resume is None:
            self._epoch, self._position = 0, Position(0, 0, self._rng(in_worker))
            return 0
        self._epoch, self._position = self.resume.epoch, self.resume.positions[worker]
        self._read, self._skipped = self._position.read, dict(self._position.skipped)
        if self._position.rng is not None:
            set_rng_state(self._position.rng)
        return self.resume.batch

    @staticmethod
    def _rng(in_worker) -> dict | None:
        return rng_state() if in_worker else None  # without workers the training process owns the RNG

    def _samples(self, worker: int):
        """This worker's (image, label) samples of its position's epoch, from its position on, transformed; the
        ones it cannot use skipped and counted (`_usable`)."""
        key = self.rank * 1000 + worker  # webdataset's pytorch_worker_seed
        shards = _resampled(self.urls, wds.utils.make_seed(key, self._position.epoch, self.seed))
        held = self.held if self.transform is not None else None  # bytes for a device decoder: nothing to spare
        read = held.samples(shards, self.expected) if held else (s for shard in shards
                                                                 for s in read_shard(shard, self.expected))
        samples = (s for s in read if LOST in s or not manifest.in_holdout(s["__key__"], self.holdout))
        if self.shuffle_buffer >= 1:
            rng = random.Random(wds.utils.make_seed(self.seed, key))
            samples = wds.shuffle(self.shuffle_buffer, rng=rng)(samples)
        self._taken = self._position.samples
        items = ((s.get("jpg"), s.get("cls"), s["__url__"], s["__key__"], s.get(LOST)) for s in samples)
        return self._usable(itertools.islice(items, self._position.samples, None), held)

    def _usable(self, items, held: HeldShards | None):
        """ITEMS (jpg, cls, url, key, lost) made into (image, label) samples; what cannot be, skipped and counted in
        the position: a lost samples' stand-in (as the samples it stands for), a sample without its image or label,
        an image that does not decode (the CPU path's: a device decoder gets the bytes as they are)."""
        in_a_row = 0  # skipped since the last usable sample: every shard bad would otherwise loop for ever
        for jpg, cls, url, key, lost in items:
            self._taken += 1
            self._read += lost if lost is not None else 1
            in_a_row += 1
            if in_a_row > max(MAX_IN_A_ROW, 20 * self.batch_size):
                raise EffnetError(f"{url}: none of the last {in_a_row - 1} samples read could be used: the shards are "
                                  "bad (run `effnet shard` again)")
            if lost is not None or jpg is None or cls is None:
                if lost != 0:
                    self._skipped[url] = self._skipped.get(url, 0) + (lost or 1)
                    if lost is None:
                        say_once(f"{url}/{key}", "no image or no label")
                continue
            if self.transform is None:
                in_a_row = 0
                yield bytes(jpg), int(cls)
                continue
            try:
                image = held.image(jpg, url, key, self.draft) if held else decode({"jpg": jpg}, self.draft)
            except Exception as e:  # noqa: BLE001 - PIL raises many types for bytes that are not a whole image
                self._skipped[url] = self._skipped.get(url, 0) + 1
                say_once(f"{url}/{key}", f"not a decodable image ({type(e).__name__}: {e})")
                continue
            in_a_row = 0
            yield self.transform(image), int(cls)

    def _collate(self, samples: list[tuple]):
        if self.transform is None:
            return collate_jpeg(samples)
        return wds.filters.default_collation_fn(samples)


def _exit_quietly(signum, frame) -> None:
    """A loader worker's SIGTERM handler. SLURM signals every process of a job, workers included: a worker killed by
    the signal makes torch raise in the training process at once, before it has saved its checkpoint; a worker
    that exits with status 0 does not (the training process handles the signal and needs no more batches)."""
    os._exit(0)


def _resampled(urls: list[str], seed: int):
    """Shard URLs drawn with replacement, endlessly: webdataset's ResampledShards(deterministic=True), seeded
    directly so that a stream can start in any epoch."""
    rng = random.Random(seed)
    while True:
        yield dict(url=urls[rng.randint(0, len(urls) - 1)])
