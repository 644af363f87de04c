"""Preprocessing, all through timm: train = RandomResizedCrop + flip + AutoAugment or RandAugment; eval = resize by
crop pct + center crop (what timm's resolve_data_config + create_transform give for the model); FixRes = eval + flip.

`uint8=True` stops before ToTensor + Normalize (timm's prefetcher mode): the loader then yields uint8 CHW images
and the device normalises them (`feed.DeviceFeed`), as timm's own fast loader does."""
from __future__ import annotations

from timm.data import create_transform
from torchvision import transforms as T

from effnet.models import Preprocessing

RAND_AUGMENT = "rand-m9-mstd0.5"  # timm's policy string for the RandAugment of its EfficientNet recipes


def train_transform(pre: Preprocessing, auto_augment: str | None, crop_scale: tuple[float, float] = (0.08, 1.0),
                    uint8: bool = False):
    """auto_augment: a timm policy string: 'original' (AutoAugment, the card's), RAND_AUGMENT or any 'rand-...'."""
    return create_transform(pre.img_size, is_training=True, auto_augment=auto_augment, scale=crop_scale,
                            interpolation=pre.interpolation, mean=pre.mean, std=pre.std, use_prefetcher=uint8)


def eval_transform(pre: Preprocessing, uint8: bool = False):
    return create_transform(pre.img_size, is_training=False, crop_pct=pre.crop_pct, interpolation=pre.interpolation,
                            mean=pre.mean, std=pre.std, use_prefetcher=uint8)


def fixres_transform(pre: Preprocessing, uint8: bool = False):
    """Test-time preprocessing with a flip: FixRes fine-tunes on the statistics the model is tested on."""
    return T.Compose([T.RandomHorizontalFlip(), eval_transform(pre, uint8)])
