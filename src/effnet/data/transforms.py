"""Preprocessing, all through timm: train = RandomResizedCrop + flip + AutoAugment or RandAugment; eval = resize by
crop pct + center crop (what timm's resolve_data_config + create_transform give for the model); FixRes = eval + flip.

`uint8=True` stops before ToTensor + Normalize (timm's prefetcher mode): the loader then yields uint8 CHW images
and the device normalises them (`gpu.DeviceFeed`), as timm's own fast loader does."""
from __future__ import annotations

from timm.data import create_transform
from torchvision import transforms as T


RAND_AUGMENT = "rand-m9-mstd0.5"  # timm's policy string for the RandAugment of its EfficientNet recipes


def train_transform(dc: dict, auto_augment: str | None, crop_scale: tuple[float, float] = (0.08, 1.0),
                    uint8: bool = False):
    """auto_augment: a timm policy string: 'original' (AutoAugment, the card's), RAND_AUGMENT or any 'rand-...'."""
    return create_transform(dc["img_size"], is_training=True, auto_augment=auto_augment, scale=crop_scale,
                            interpolation=dc["interpolation"], mean=dc["mean"], std=dc["std"], use_prefetcher=uint8)


def eval_transform(dc: dict, uint8: bool = False):
    return create_transform(dc["img_size"], is_training=False, crop_pct=dc["crop_pct"],
                            interpolation=dc["interpolation"], mean=dc["mean"], std=dc["std"], use_prefetcher=uint8)


def fixres_transform(dc: dict, uint8: bool = False):
    """Test-time preprocessing with a flip: FixRes fine-tunes on the statistics the model is tested on."""
    return T.Compose([T.RandomHorizontalFlip(), eval_transform(dc, uint8)])
