"""Measuring a model on the shards: top-1/top-5 over a split in one pass (with any extra torchmetrics), and the
per-class figures (confusion matrix, precision, recall).

Stages run the model channels_last (`feed.for_inference`), on CUDA in bf16 autocast, fed by the same device path
as training; eager: the evaluate stage's sweep runs each model at many resolutions, where compiling each would cost
more than it saves."""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torchmetrics import Metric
from torchmetrics.classification import (MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassPrecision,
                                         MulticlassRecall)

from effnet.data import transforms
from effnet.data.feed import DeviceFeed
from effnet.data.held_splits import HeldSplit
from effnet.data.loaders import eval_loader, worker_nice
from effnet.data.prefetch import DevicePrefetcher
from effnet.models import Preprocessing


@torch.inference_mode()
def accuracy(model: torch.nn.Module, pre: Preprocessing, shards: str | Path, batch_size: int, num_workers: int,
             extra: Sequence[Metric] = (), feed: DeviceFeed | None = None, device: torch.device | str = "cpu",
             split: str = "val", keep: Callable[[str], bool] | None = None, max_batches: int | None = None,
             held: HeldSplit | None = None) -> dict[str, float]:
    """Top-1 and top-5 (in %) of `model` over SPLIT (the samples KEEP accepts, by key, when given; their first
    MAX_BATCHES batches when given) with preprocessing PRE, on DEVICE, the batches finished there by FEED (default:
    the CPU decode path's); HELD: those images already held in memory (`HeldSplit`). EXTRA metrics (torchmetrics,
    e.g. `ClassStats`) are updated with the same logits and labels in the same pass."""
    device = torch.device(device)
    n = model.get_classifier().out_features
    top1, top5 = MulticlassAccuracy(n, average="micro"), MulticlassAccuracy(n, top_k=min(5, n), average="micro")
    metrics = [m.to(device) for m in (top1, top5, *extra)]
    model.eval()
    for logits, y in forward(model, pre, shards, batch_size, num_workers, feed, device, split, keep, max_batches,
                             held=held):
        for metric in metrics:
            metric.update(logits, y)
    return {"top1": round(100 * top1.compute().item(), 4), "top5": round(100 * top5.compute().item(), 4)}


def forward(model: torch.nn.Module, pre: Preprocessing, shards: str | Path, batch_size: int, num_workers: int,
            feed: DeviceFeed | None = None, device: torch.device | str = "cpu", split: str = "val",
            keep: Callable[[str], bool] | None = None, max_batches: int | None = None,
            bf16: bool | None = None, held: HeldSplit | None = None, keys: bool = False) -> Iterator[tuple]:
    """(float32 logits, labels) of MODEL, in the mode the caller left it, over the first MAX_BATCHES batches of
    SPLIT with eval preprocessing PRE (see `accuracy`; from HELD when given and the feed takes decoded images); in
    the FEED's memory format; in bf16 autocast with BF16 (None: on CUDA, where it is 2x faster; on the CPU it is
    not). With KEYS, (logits, labels, sample keys)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    bf16 = cuda if bf16 is None else bf16
    feed = feed or DeviceFeed(pre.mean, pre.std, channels_last=cuda)
    model.to(device, memory_format=torch.channels_last if feed.channels_last else torch.preserve_format)
    if held is not None and not feed.decodes:
        loader, threaded = held.batches(pre, batch_size), False
    else:
        loader = eval_loader(shards, None if feed.decodes else transforms.eval_transform(pre, uint8=True),
                             batch_size, num_workers, split, pin_memory=cuda, keep=keep, nice=worker_nice(device))
        threaded = num_workers == 0
    batches = DevicePrefetcher(loader, feed, False, device, threaded=threaded)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for x, y, names in itertools.islice(batches, max_batches):
            yield (model(x).float(), y, names) if keys else (model(x).float(), y)


class ClassStats:
    """Confusion matrix (rows: actual, columns: predicted) and per-class precision/recall, by torchmetrics."""

    def __init__(self, classes: list[str]):
        n = len(classes)
        self.classes = classes
        self.confusion = MulticlassConfusionMatrix(n)
        self.precision = MulticlassPrecision(n, average=None, zero_division=0)
        self.recall = MulticlassRecall(n, average=None, zero_division=0)

    @property
    def metrics(self) -> list[Metric]:
        return [self.confusion, self.precision, self.recall]

    def matrix(self) -> list[list[int]]:
        return self.confusion.compute().tolist()

    def macro(self) -> dict[str, float]:
        """Precision and recall (in %) averaged over classes (torchmetrics' macro average)."""
        return {k: round(100 * m.compute().mean().item(), 4)
                for k, m in (("macro_precision", self.precision), ("macro_recall", self.recall))}

    def table(self) -> list[dict]:
        """One row per class: precision and recall (in %), support (val images of the class), predicted."""
        cm = self.confusion.compute()
        precision, recall = self.precision.compute().tolist(), self.recall.compute().tolist()
        support, predicted = cm.sum(dim=1).tolist(), cm.sum(dim=0).tolist()
        return [{"class": c, "precision": round(100 * p, 4), "recall": round(100 * r, 4), "support": int(s),
                 "predicted": int(q)}
                for c, p, r, s, q in zip(self.classes, precision, recall, support, predicted)]

    def rows(self) -> list[dict]:
        return confusion_rows(self.matrix(), self.classes)


def confusion_rows(matrix: list[list[int]], classes: list[str]) -> list[dict]:
    """DVC's confusion template input: one {actual, predicted} row per image (class names)."""
    return [{"actual": classes[i], "predicted": classes[j]}
            for i, counts in enumerate(matrix) for j, count in enumerate(counts) for _ in range(count)]
