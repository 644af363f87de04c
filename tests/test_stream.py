"""Streaming under DDP: 2 CPU processes (torch.multiprocessing + gloo), as Lightning's ddp_spawn runs them."""
from __future__ import annotations

import copy
import json
import os

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from effnet.config import ShardConfig
from effnet.data import held_splits, loaders, prefetch, transforms
from effnet.data.manifest import read_manifest
from effnet.models import Preprocessing
from effnet.stages import shard

PRE = Preprocessing(img_size=32, crop_pct=0.875, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)


def _rank(rank: int, shards: str, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    try:
        keys = [k for _, _, ks in loaders.eval_loader(shards, transforms.eval_transform(PRE), 5, 0) for k in ks]
        train = loaders.train_loader(shards, transforms.train_transform(PRE, transforms.RAND_AUGMENT), 4, 0, 8,
                                    world_size=2)
        batches = [len(y) for _, y, _ in train]
        with open(f"{tmp}/rank{rank}.json", "w") as f:
            json.dump({"keys": keys, "batches": batches}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("per_shard", [5, 1000])  # several val shards per rank; one val shard for both ranks
def test_ddp_ranks_see_each_val_sample_once_and_equal_train_batches(demo_dir, tmp_path, per_shard):
    shards = tmp_path / "shards"
    shard.run(ShardConfig(samples_per_shard=per_shard, workers=1), demo_dir, shards)
    manifest = read_manifest(shards)
    assert (len(manifest["splits"]["val"]["shards"]) >= 2) == (per_shard == 5)
    mp.spawn(_rank, args=(str(shards), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    seen = ranks[0]["keys"] + ranks[1]["keys"]
    assert ranks[0]["keys"] and ranks[1]["keys"]
    assert len(seen) == len(set(seen)) == manifest["splits"]["val"]["total"]
    steps = manifest["splits"]["train"]["total"] // (4 * 2)
    assert ranks[0]["batches"] == ranks[1]["batches"] == [4] * steps


def test_rand_augment_and_draft_decode(shards_dir):
    tf = transforms.train_transform(PRE, transforms.RAND_AUGMENT)
    assert "RandAugment" in repr(tf)
    x, y, _ = next(iter(loaders.train_loader(shards_dir, tf, 4, 0, 8, draft=16)))
    assert x.shape == (4, 3, 32, 32) and y.shape == (4,)


def _feed(batch, train, device):
    if batch == "boom":
        raise ValueError("bad batch")
    return [torch.tensor(batch) * (10 if train else 1)]


def test_device_prefetcher_keeps_order_and_length_and_raises_the_feeds_error():
    loader = list(range(7))
    pre = prefetch.DevicePrefetcher(loader, _feed, True, "cpu", depth=2)
    assert len(pre) == 7
    assert [int(x) for x, in pre] == [10 * i for i in range(7)]
    assert [int(x) for x, in pre] == [10 * i for i in range(7)]  # every epoch starts afresh
    failing = prefetch.DevicePrefetcher([1, "boom", 3], _feed, False, "cpu")
    got = []
    try:
        for x, in failing:
            got.append(int(x))
    except ValueError as e:
        assert "bad batch" in str(e) and got == [1]
    else:
        raise AssertionError("the feed's error was swallowed")


def test_device_prefetcher_stops_its_thread_when_the_consumer_leaves():
    import threading
    pulled = []

    def endless():
        i = 0
        while True:
            pulled.append(i)
            yield i
            i += 1

    it = iter(prefetch.DevicePrefetcher(endless(), _feed, True, "cpu", depth=2))
    assert int(next(it)[0]) == 0
    it.close()  # what dropping the iterator does
    assert not [t for t in threading.enumerate() if t.name == "effnet-prefetch"]
    assert len(pulled) <= 1 + 2 + 2  # it ran at most its depth ahead (plus the batch in its hands)


def _first_batches(shards, seed: int, workers: int, n: int = 3):
    torch.manual_seed(0)  # what pl.seed_everything does: the DataLoader seeds its workers from it
    loader = loaders.train_loader(shards, transforms.train_transform(PRE, "original", uint8=True), 4, workers, 8,
                                 seed=seed)
    batches = []
    for x, y, _ in loader:
        batches.append((x, y))
        if len(batches) == n:
            return batches


def test_the_train_stream_is_a_function_of_its_seed(shards_dir):
    """Same seed: the same shards, order and augmentations, batch for batch (so `dvc repro` repeats a run);
    another seed: another stream."""
    a, b, c = (_first_batches(shards_dir, seed, workers=1) for seed in (0, 0, 1))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
    assert a[0][0].dtype == torch.uint8 and a[0][0].shape == (4, 3, 32, 32)


def _epochs(loader, n: int) -> list[tuple]:
    """N epochs of LOADER's batches, each with the stream state after training on it (a copy)."""
    out = []
    for _ in range(n):
        for x, y, advance in loader:
            loader.state.advance(advance)
            out.append((x, y, copy.deepcopy(loader.state)))
    return out


def test_a_resumed_stream_yields_what_the_uninterrupted_one_yields_next(shards_dir):
    """Resumed from its state after any batch (mid-epoch with the next batch due from the first or the second
    worker, or at the epoch's end), the stream continues batch for batch, augmentations included (2 loader
    workers: their RNGs come back from the state), into the next epoch."""
    tf = transforms.train_transform(PRE, "original", uint8=True)
    torch.manual_seed(0)
    whole = _epochs(loaders.train_loader(shards_dir, tf, 16, 2, 8, seed=1), 2)  # 6 batches an epoch
    for k in (2, 3, 5):
        torch.manual_seed(1)  # another base seed for the new workers: what they draw must come from the state
        resumed = loaders.train_loader(shards_dir, tf, 16, 2, 8, seed=1, resume=whole[k][2])
        rest = _epochs(resumed, 1 if k == 5 else 2)[:len(whole) - k - 1]
        assert len(rest) == len(whole) - k - 1
        assert all(torch.equal(x, wx) and torch.equal(y, wy) for (x, y, _), (wx, wy, _) in zip(rest, whole[k + 1:]))


def test_a_resumed_stream_does_not_decode_the_samples_it_skips(shards_dir):
    decoded = []
    tf = transforms.train_transform(PRE, None, uint8=True)

    def counting(img):
        decoded.append(1)
        return tf(img)

    whole = _epochs(loaders.train_loader(shards_dir, counting, 16, 0, 8), 1)
    decoded.clear()
    resumed = loaders.train_loader(shards_dir, counting, 16, 0, 8, resume=whole[3][2])
    rest = _epochs(resumed, 1)
    assert [y.tolist() for _, y, _ in rest] == [y.tolist() for _, y, _ in whole[4:]]
    assert len(rest) * 16 <= len(decoded) <= len(rest) * 16 + 1  # (the batcher may read one sample ahead)


def test_a_held_split_gives_the_batches_the_stream_gives(shards_dir):
    """Held in memory (decoded once) or streamed from the shards: the same images, labels and keys, in order;
    a pass at a preprocessing made before reuses its batches while they fit in the budget beside the images, another
    preprocessing makes new ones."""
    held = held_splits.HeldSplit.load(shards_dir, "val")
    assert len(held) == read_manifest(shards_dir)["splits"]["val"]["total"]
    streamed = list(loaders.eval_loader(shards_dir, transforms.eval_transform(PRE, uint8=True), 5, 0))
    batches = held.batches(PRE, 5)
    assert len(batches) == len(streamed)
    for (x, y, keys), (sx, sy, skeys) in zip(batches, streamed):
        assert torch.equal(x, sx) and torch.equal(y, torch.as_tensor(sy)) and list(keys) == list(skeys)
    assert held.batches(PRE, 5) is batches
    bigger = held.batches(PRE.at(40), 5)
    assert bigger is not batches and bigger[0][0].shape[-2:] == (40, 40)
    assert held.batches(PRE, 5) is batches and held.batches(PRE.at(40), 5) is bigger
    images = sum(image.width * image.height * 3 for image in held.images)
    held.budget = images + sum(x.nbytes for x, *_ in bigger) + 1  # room for one preprocessing's batches only
    assert held.batches(PRE, 5) is batches and held.batches(PRE.at(40), 5) is bigger  # made: as they were
    assert held.batches(PRE.at(36), 5)[0][0].shape[-2:] == (36, 36) and held.batches(PRE, 5) is not batches


def test_a_split_over_the_memory_budget_is_not_held(shards_dir):
    assert held_splits.HeldSplit.load(shards_dir, "val", budget_mb=0) is None
    keep = held_splits.HeldSplit.load(shards_dir, "train", keep=lambda key: key.endswith("1"), limit=3)
    assert len(keep) == 3 and all(key.endswith("1") for key in keep.keys)


def _priority(_image) -> torch.Tensor:
    return torch.tensor(os.getpriority(os.PRIO_PROCESS, 0))


@pytest.mark.parametrize("device, lower", [("cpu", loaders.CPU_WORKER_NICE), ("meta", 0)])
def test_loader_workers_give_way_to_a_model_on_the_cpu(shards_dir, device, lower):
    """Where the model runs on the CPU, loader workers run at a lower priority, so that they take only what the
    step leaves; feeding an accelerator, they keep the training process's."""
    own = os.getpriority(os.PRIO_PROCESS, 0)
    nice = loaders.worker_nice(device)
    priorities, _, _ = next(iter(loaders.eval_loader(shards_dir, _priority, 4, 1, nice=nice)))
    assert priorities.tolist() == [min(19, own + lower)] * len(priorities)
    train = loaders.train_loader(shards_dir, _priority, 4, 1, 8, nice=nice)
    assert next(iter(train))[0].tolist() == [min(19, own + lower)] * 4


def _held_epochs(shards, workers: int, hold_mb: float, epochs: int = 3) -> tuple[list, loaders.TrainLoader]:
    pl.seed_everything(0, verbose=False)  # without workers, this process's RNGs drive the augmentations
    loader = loaders.train_loader(shards, transforms.train_transform(PRE, "original", uint8=True), 4, workers, 8,
                                 hold_mb=hold_mb)
    return [(x, y) for _ in range(epochs) for x, y, _ in loader], loader


@pytest.mark.parametrize("workers", [0, 2])
def test_a_held_training_split_gives_the_batches_the_stream_gives(shards_dir, workers, monkeypatch):
    """Each loader process reads and decodes the training split once and serves it from memory after that: the
    same images (augmented alike), labels and order, epoch after epoch, as streaming every epoch; and where the
    split passes the budget (here after a few images), it lets go and streams on, still the same batches."""
    decoded = []
    real_decode = held_splits.decode
    monkeypatch.setattr(held_splits, "decode",
                        lambda sample, draft=None: decoded.append(1) or real_decode(sample, draft))
    streamed, _ = _held_epochs(shards_dir, workers, hold_mb=0)
    decoded.clear()
    held, loader = _held_epochs(shards_dir, workers, hold_mb=64)
    assert len(held) == len(streamed) > 0
    assert all(torch.equal(x, sx) and torch.equal(y, sy) for (x, y), (sx, sy) in zip(held, streamed))
    if workers == 0:  # the split is held in this process: each image was decoded once over the 3 epochs
        total = read_manifest(shards_dir)["splits"]["train"]["total"]
        assert loader.loader.dataset.held.on and len(decoded) == len(loader.loader.dataset.held.images) <= total
        assert len(held) * 4 > total  # so some images were served again from memory
    over, loader = _held_epochs(shards_dir, workers, hold_mb=0.01)
    assert all(torch.equal(x, sx) and torch.equal(y, sy) for (x, y), (sx, sy) in zip(over, streamed))
    if workers == 0:
        assert not loader.loader.dataset.held.on and not loader.loader.dataset.held.images
