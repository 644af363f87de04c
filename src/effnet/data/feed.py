"""The device half of the data path, and the DataModule a training stage gets from its params.

A loader batch becomes the model's input on the training device here, run by `prefetch.DevicePrefetcher` in a thread
(on a side CUDA stream) ahead of the step:

* `DeviceFeed` (`data.decode: cpu`, the portable default): loader workers decode and augment with timm's
  transforms and send uint8 images (a quarter of float32's bytes through shared memory and over PCIe); the device
  normalises them.
* `GpuPreprocess` (`data.decode: gpu`): workers only read the shards and pack each batch's JPEG bytes
  (`gpu.collate_jpeg`); the device decodes the batch (nvjpeg), crops, flips and auto-augments it
  (`gpu`, `batch_augment`), or resizes and center-crops it for eval. Without CUDA, `resolve_decode` falls back to
  the CPU path with one warning.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import torch

from effnet.config import Params
from effnet.data import gpu
from effnet.data.batch_augment import BatchAugment
from effnet.data.datamodule import ShardDataModule
from effnet.data.mixed_stream import MixedDataModule
from effnet.models import Preprocessing

log = logging.getLogger(__name__)


def cuda_usable(accelerator: str = "auto") -> bool:
    """Whether a Trainer with this `accelerator` runs on CUDA."""
    return torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")


def resolve_decode(decode: str, accelerator: str = "auto") -> str:
    """'gpu' only where the Trainer runs on CUDA; otherwise one warning and the portable CPU path."""
    if decode == "gpu" and not cuda_usable(accelerator):
        why = "no CUDA device" if not torch.cuda.is_available() else f"accelerator is {accelerator!r}"
        log.warning("data.decode: gpu needs a CUDA device (%s): decoding and augmenting on the CPU instead", why)
        return "cpu"
    return decode


class DeviceFeed:
    """The CPU decode path's device half: turns a loader batch `[uint8 images, labels, *rest]` into the model's
    input on `device`. `decodes` says what the loader must yield: decoded uint8 images (False) or JPEG bytes
    (True)."""

    decodes = False

    def __init__(self, mean, std, channels_last: bool = True):
        self.mean, self.std, self.channels_last = tuple(mean), tuple(std), channels_last

    def images(self, payload, train: bool, device) -> torch.Tensor:
        """The loader's image payload -> uint8 NCHW on `device`."""
        return payload.to(device, non_blocking=True)

    def __call__(self, batch, train: bool, device) -> list:
        payload, y, *rest = batch
        x = gpu.normalize(self.images(payload, train, device), self.mean, self.std, self.channels_last)
        return [x, y.to(device, non_blocking=True), *rest]


class GpuPreprocess(DeviceFeed):
    """The GPU decode path's device half, for one `Preprocessing`: the loader yields JPEG bytes, the device decodes
    them in one batch and crops, flips and auto-augments them (train) or resizes and center-crops them (eval).
    With `augment=False`, training batches get the eval preprocessing plus the flip (FixRes's test-time
    statistics)."""

    decodes = True

    def __init__(self, pre: Preprocessing, auto_augment: str | None = "original", crop_scale=(0.08, 1.0),
                 ratio=gpu.RATIO, hflip: float = 0.5, channels_last: bool = True, augment: bool = True):
        super().__init__(pre.mean, pre.std, channels_last)
        self.size, self.crop_pct, self.interpolation = pre.img_size, pre.crop_pct, pre.interpolation
        self.scale, self.ratio, self.hflip = tuple(crop_scale), tuple(ratio), hflip
        self.augment = BatchAugment(auto_augment, self.mean) if augment else None

    def images(self, payload, train: bool, device) -> torch.Tensor:
        decoded = gpu.decode_batch(gpu.unpack(*payload), device)
        return self.train_images(decoded) if train else self.eval_images(decoded)

    def train_images(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Decoded uint8 CHW images -> augmented uint8 NCHW batch (crop, flip, auto-augment)."""
        flips = [random.random() < self.hflip for _ in images]
        if self.augment is None:
            return gpu.random_hflip(self.eval_images(images), flips)
        boxes = [gpu.crop_params(img, self.scale, self.ratio) for img in images]
        return self.augment(gpu.resized_crops(images, boxes, self.size, flips))

    def eval_images(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Resize + center crop, exactly timm's eval transform: one batched resize per distinct image shape (most
        ImageNet photos share a few shapes)."""
        out = images[0].new_empty(len(images), images[0].shape[0], self.size, self.size)
        same_shape: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            same_shape.setdefault(tuple(img.shape), []).append(i)
        for rows in same_shape.values():
            out.index_copy_(0, gpu.on_device(rows, torch.long, out.device),
                            gpu.resize_center_crop(torch.stack([images[i] for i in rows]), self.size, self.crop_pct,
                                                   self.interpolation))
        return out

    def __repr__(self) -> str:
        return (f"GpuPreprocess(size={self.size}, crop_pct={self.crop_pct}, scale={self.scale}, "
                f"augment={self.augment!r})")


def for_params(params: Params, pre: Preprocessing, channels_last: bool, augment: bool = True) -> DeviceFeed:
    """The device half of the configured data path (`data.decode`; the CPU path where there is no CUDA). With
    augment=False, training batches get the eval preprocessing plus a flip (FixRes)."""
    cfg = params.train
    if resolve_decode(params.data.decode, cfg.accelerator) == "gpu":
        return GpuPreprocess(pre, cfg.auto_augment, cfg.crop_scale, channels_last=channels_last, augment=augment)
    return DeviceFeed(pre.mean, pre.std, channels_last)


def data_module(params: Params, shards: str | Path, pre: Preprocessing, train_tf, batch_size: int, seed: int,
                channels_last: bool, augment: bool = True, mix: dict | None = None) -> ShardDataModule:
    """A training stage's DataModule: the workers' uint8 transforms (TRAIN_TF for training, timm's eval transform
    for validation), the device half of the configured data path, the `data.holdout` share of train left out.
    With MIX (targets, ratio, smoothing: a Noisy Student's), training batches mix in pseudo-labeled images
    (`mixed_stream.MixedDataModule`)."""
    cls, extra = (ShardDataModule, {}) if mix is None else (MixedDataModule, mix)
    return cls(shards, train_tf, pre, batch_size, params.data.num_workers, params.data.shuffle_buffer,
               for_params(params, pre, channels_last, augment), seed, holdout=params.data.holdout,
               hold_mb=params.data.hold_mb, max_skipped=params.data.max_skipped, **extra)


def for_inference(params: Params, pre: Preprocessing) -> tuple[DeviceFeed, torch.device]:
    """Where and how a stage runs a model over shards, as the evaluate stage does: on CUDA when the Trainer would
    use it (in bf16: see `inference.forward`), else on the CPU, through the configured data path; channels_last
    on both (on a CPU, inference runs 1.6x faster so: bench/cpu_bench.py)."""
    device = torch.device("cuda" if cuda_usable(params.train.accelerator) else "cpu")
    return for_params(params, pre, channels_last=True), device
