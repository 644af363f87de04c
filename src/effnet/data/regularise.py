"""timm's batch regularisers, on the training device, in the training step, whichever data path made the batch:
random erasing (timm's `RandomErasing`, on the normalised batch, where timm's own prefetching loader applies it),
then Mixup/CutMix (timm's `Mixup`, with the label smoothing folded into the mixed soft targets, as timm's
train.py does; the loss is then timm's `SoftTargetCrossEntropy`).

They draw from the training process's RNGs (python, numpy, the device's torch generator) in the training thread,
not in a loader worker or the prefetch thread, so a resumed run that restores those RNGs draws the same again.
"""
from __future__ import annotations

import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing

from effnet.config import TrainConfig


class Regularise:
    """`(images, labels) -> (images, targets)`: targets are soft (N, classes) when Mixup/CutMix is on (`mixes`),
    the labels otherwise. Images are changed in place."""

    def __init__(self, num_classes: int, smoothing: float, mixup: float = 0.0, cutmix: float = 0.0,
                 mix_prob: float = 1.0, switch_prob: float = 0.5, mix_mode: str = "batch", erase: float = 0.0,
                 erase_mode: str = "pixel", erase_count: int = 1):
        self.erase_args = dict(probability=erase, mode=erase_mode, max_count=erase_count) if erase else None
        self.mix = (Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mix_prob, switch_prob=switch_prob,
                          mode=mix_mode, label_smoothing=smoothing, num_classes=num_classes)
                    if mixup or cutmix else None)
        self._erasers: dict[torch.device, RandomErasing] = {}

    @property
    def mixes(self) -> bool:
        return self.mix is not None

    def eraser(self, device: torch.device) -> RandomErasing:
        """timm's RandomErasing makes its noise on the device it was built for: one per device."""
        if device not in self._erasers:
            self._erasers[device] = RandomErasing(**self.erase_args, device=device)
        return self._erasers[device]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.erase_args:
            x = self.eraser(x.device)(x)
        if self.mix is not None:
            x, y = self.mix(x, y)
        return x, y

    def __repr__(self) -> str:
        return f"Regularise(erase={self.erase_args}, mix={self.mix is not None})"


def for_config(cfg: TrainConfig, num_classes: int, smoothing: float) -> Regularise | None:
    """The train config's regularisers; None when all are off (the card's recipe)."""
    if not (cfg.mixup or cfg.cutmix or cfg.random_erase):
        return None
    return Regularise(num_classes, smoothing, cfg.mixup, cfg.cutmix, cfg.mixup_prob, cfg.mixup_switch_prob,
                      cfg.mixup_mode, cfg.random_erase, cfg.random_erase_mode, cfg.random_erase_count)
