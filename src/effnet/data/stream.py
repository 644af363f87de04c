"""Streaming the shards into training: webdataset pipelines and a Lightning DataModule.

Training streams resampled shards (every rank and worker draws shards independently and endlessly) cut to a fixed
epoch length from the manifest (whole optimizer steps of the global batch), so all DDP ranks run the same number of
steps; the stream is resumable, exactly (`TrainStream`, `StreamState`). Evaluation reads each val shard
once, split by node and worker, so that every sample is seen exactly once across ranks. Shards may live in a local
folder, at an fsspec URL (s3://, gs://, memory://...) or behind a `pipe:` command with `{name}` in it.

With `transform=None` the loaders yield the JPEG bytes undecoded (`gpu.collate_jpeg`). `ShardDataModule` hands each
batch to a device feed (`effnet.data.feed`: normalise uint8 images, or decode and augment JPEG bytes) that
`DevicePrefetcher` runs ahead of the training step, in a thread, on a side CUDA stream.
"""
from __future__ import annotations

import functools
import importlib
import itertools
import io
import logging
import os
import queue
import random
import signal
import threading
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import fsspec
import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import webdataset as wds
from PIL import Image

from effnet.data import manifest, transforms
from effnet.data.gpu import collate_jpeg
from effnet.models import Preprocessing

log = logging.getLogger(__name__)
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


MIB = 2 ** 20
PREFETCH = 2  # batches each loader worker works ahead (the DataLoader's prefetch_factor)
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


@dataclass
class Position:
    """Where one loader worker's part of a rank's training stream stands: the epoch it draws (each epoch draws a new
    shard sequence), how many samples it has taken from that epoch's shuffled samples, and, with loader workers,
    its RNG states after them (they drive its augmentations). Plain values only: it travels through the workers'
    queues and into checkpoints (loaded with torch's weights_only)."""

    epoch: int = 0
    samples: int = 0
    rng: dict | None = None


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
                 held: HeldShards | None = None):
        super().__init__()
        self.urls, self.transform, self.batch_size, self.shuffle_buffer = urls, transform, batch_size, shuffle_buffer
        self.seed, self.rank, self.steps, self.draft = seed, rank, steps, draft
        self.resume, self.holdout, self.held = resume, holdout, held
        self._epoch: int | None = None  # per worker process: the epoch its next iteration makes
        self._position = Position()

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
                self._position = Position(epoch, self._position.samples + self.batch_size, self._rng(info))
            else:
                for _ in range((PREFETCH if info else 0) * self.batch_size + 1):
                    next(samples)
                self._position = Position(epoch + 1, 0, self._rng(info))
            yield *batch, Advance([(worker, self._position)])

    def _begin(self, worker: int, in_worker: bool) -> int:
        """Set this worker's first epoch and position (its recorded one on resume); returns the epoch's first batch."""
        if in_worker:
            signal.signal(signal.SIGTERM, _exit_quietly)
        if self.resume is None:
            self._epoch, self._position = 0, Position(0, 0, self._rng(in_worker))
            return 0
        self._epoch, self._position = self.resume.epoch, self.resume.positions[worker]
        if self._position.rng is not None:
            set_rng_state(self._position.rng)
        return self.resume.batch

    @staticmethod
    def _rng(in_worker) -> dict | None:
        return rng_state() if in_worker else None  # without workers the training process owns the RNG

    def _samples(self, worker: int):
        """This worker's (image, label) samples of its position's epoch, from its position on, transformed."""
        key = self.rank * 1000 + worker  # webdataset's pytorch_worker_seed
        shards = _resampled(self.urls, wds.utils.make_seed(key, self._position.epoch, self.seed))
        held = self.held if self.transform is not None else None  # bytes for a device decoder: nothing to spare
        read = held.samples if held else wds.tarfile_to_samples()
        samples = (s for s in read(shards) if not manifest.in_holdout(s["__key__"], self.holdout))
        if self.shuffle_buffer >= 1:
            rng = random.Random(wds.utils.make_seed(self.seed, key))
            samples = wds.shuffle(self.shuffle_buffer, rng=rng)(samples)
        items = itertools.islice(wds.to_tuple("jpg", "cls", "__url__", "__key__")(samples), self._position.samples,
                                 None)
        if self.transform is None:
            return ((bytes(jpg), int(cls)) for jpg, cls, *_ in items)
        if held:
            return ((self.transform(held.image(jpg, url, key, self.draft)), int(cls)) for jpg, cls, url, key in items)
        return ((self.transform(decode({"jpg": jpg}, self.draft)), int(cls)) for jpg, cls, *_ in items)

    def _collate(self, samples: list[tuple]):
        if self.transform is None:
            return collate_jpeg(samples)
        return wds.filters.default_collation_fn(samples)


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

    def samples(self, shards):
        """webdataset's `tarfile_to_samples` over SHARDS (dicts with a url), from memory where it can."""
        for shard in shards:
            if not self.on:
                yield from wds.tarfile_to_samples()([shard])
            elif shard["url"] in self.shards:
                yield from self.shards[shard["url"]]
            else:
                read = []
                for sample in wds.tarfile_to_samples()([shard]):
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
    workers = min(num_workers, steps)
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if resume is not None and (resume.steps, resume.workers) != (steps, workers):
        log.warning("the checkpoint's stream had %d batches per epoch over %d workers, this one %d over %d: it starts "
                    "afresh, not where the checkpoint was", resume.steps, resume.workers, steps, workers)
        resume = None
    held = HeldShards(total, hold_mb / max(1, workers)) if hold_mb else None
    stream = TrainStream(shard_urls(shards, "train"), transform, batch_size, shuffle_buffer, seed, rank, steps,
                         draft, resume, holdout, held)
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
    return wds.WebLoader(ds, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                         worker_init_fn=_lower_priority(nice))


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
        """(uint8 NCHW images, labels, keys) batches with PRE's eval preprocessing, as `stream.eval_loader` makes."""
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


class DevicePrefetcher:
    """Iterates `loader`, running `feed(batch, train, device)` on each batch `depth` batches ahead, in a thread.

    On CUDA the feed runs on a side stream and each batch carries an event the consumer's stream waits for, so
    the copies, decoding and augmentation of the next batches overlap the training step (their host-side work
    too: torch releases the GIL inside its ops). On other devices it is the same thread and queue, no streams;
    with `threaded=False`, no thread: the feed runs in the consumer's, between steps (on a CPU whose cores the
    step already fills, where loader workers work ahead anyway, a second thread's ops only slow the step's down).
    Sized when the loader is, as Lightning wants for its epoch length."""

    def __init__(self, loader, feed, train: bool, device, depth: int = 2, threaded: bool = True):
        self.loader, self.feed, self.train, self.depth, self.threaded = loader, feed, train, depth, threaded
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        cuda = self.device.type == "cuda"
        if not (self.threaded or cuda):
            yield from (self.feed(batch, self.train, self.device) for batch in self.loader)
            return
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
    read JPEG bytes and train_tf/val_pre are not used; otherwise they decode and transform to uint8 images
    (`transforms.*(..., uint8=True)`: train_tf, and val_pre's eval transform). Single-process, val is decoded once
    and held in memory where it fits in HOLD_MB (`HeldSplit`), since it is validated every epoch.

    The training stream is resumable: each training batch advances `stream` (a `StreamState`) just before the step,
    checkpoints record every rank's (`state_dict`), and a run restored from a checkpoint continues each rank's
    stream from there (same world size and loader workers; otherwise it starts afresh, with a warning)."""

    def __init__(self, shards: str | Path, train_tf, val_pre: Preprocessing | None, batch_size: int, num_workers: int,
                 shuffle_buffer: int, feed, seed: int = 0, draft: int | None = None, holdout: float = 0.0,
                 hold_mb: int = 0):
        super().__init__()
        self.holdout, self.val_pre, self.hold_mb = holdout, val_pre, hold_mb
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
        loader = train_loader(self.shards, None if self.feed.decodes else self.train_tf, self.batch_size,
                              self.num_workers, self.shuffle_buffer, world, self.seed, self.draft,
                              pin_memory=self.device.type == "cuda", rank=rank, accumulate=accumulate,
                              resume=self._resume(world, rank), holdout=self.holdout, nice=worker_nice(self.device),
                              hold_mb=self.hold_mb)
        self.stream = loader.state
        return self._prefetched(loader, train=True)

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
        return DevicePrefetcher(loader, self.feed, train, self.device, threaded=self.num_workers == 0)

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
