"""The GPU data path (`data.decode: gpu`): the loader yields JPEG bytes, the device decodes and augments them.

Workers only read the shards and pack each batch's JPEG bytes into one flat uint8 tensor plus the byte counts
(`collate_jpeg`); `ShardDataModule` keeps those on the CPU (nvjpeg reads its input from host memory) and, in
`on_after_batch_transfer`, `GpuPreprocess` decodes the whole batch with `torchvision.io.decode_jpeg(list,
device=...)` and applies on the device what `transforms.train_transform` / `eval_transform` apply on the CPU:

* train: timm's RandomResizedCrop sampler itself (`RandomResizedCropAndInterpolation.get_params`: the same scale
  and log-ratio distribution, the same 10 tries and central fallback), bicubic antialiased resize per image,
  horizontal flip p=0.5, then AutoAugment / RandAugment per image (torchvision v2 on uint8 tensors, see
  `augmenter` for how those policies relate to timm's), normalisation, channels_last;
* eval: resize of the shorter side to floor(size / crop_pct) (bicubic, antialias), center crop, normalisation
  (timm's eval transform; it matches the CPU path to within JPEG decoder and resampler rounding).

Every function is device-agnostic: on CPU tensors they run the same code (decode_jpeg on the CPU), which is how
the tests check them. Where CUDA is absent, `resolve_decode` falls back to the CPU path with one warning.
"""
from __future__ import annotations

import logging
import math
import random
import re
import warnings

import torch
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

log = logging.getLogger(__name__)
# torchvision 0.29 deprecates torchvision.io's decoders in favour of TorchCodec; decode_jpeg still is the batched
# nvjpeg decoder this path is built on (and what the GPU machines' torchvision has).
warnings.filterwarnings("ignore", message=r"The image decoding and encoding capabilities of TorchVision")

RATIO = (3 / 4, 4 / 3)  # timm's (and Inception's) RandomResizedCrop aspect-ratio range


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


# --- what the workers do: bytes only ---------------------------------------------------------------------------

def collate_jpeg(samples: list[tuple]) -> list:
    """[(jpeg bytes, label[, key]), ...] -> [flat uint8 tensor, byte counts, labels[, keys]]: one tensor for the
    bytes of the whole batch, so a worker hands over one shared-memory block, not one per image."""
    cols = list(zip(*samples))
    sizes = torch.tensor([len(b) for b in cols[0]], dtype=torch.int64)
    flat = torch.frombuffer(bytearray(b"".join(cols[0])), dtype=torch.uint8)
    return [flat, sizes, torch.tensor(cols[1], dtype=torch.int64), *(list(c) for c in cols[2:])]


def unpack(flat: torch.Tensor, sizes: torch.Tensor) -> list[torch.Tensor]:
    """The per-image 1-D byte tensors of a `collate_jpeg` batch (views, no copy)."""
    return list(torch.split(flat, sizes.tolist()))


def decode_batch(data: list[torch.Tensor], device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """JPEG bytes (CPU tensors) -> list of uint8 CHW RGB tensors on `device`, decoded as one batch (nvjpeg on CUDA)."""
    if not data:
        return []
    device = torch.device(device)
    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


# --- pure tensor functions -------------------------------------------------------------------------------------

def interp_mode(name: str) -> InterpolationMode:
    """timm's interpolation names; 'random' (timm's bilinear-or-bicubic per image) draws one per call."""
    if name == "random":
        name = random.choice(["bilinear", "bicubic"])
    return InterpolationMode(name)


def crop_params(img: torch.Tensor, scale=(0.08, 1.0), ratio=RATIO) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random-resized crop of a CHW tensor: timm's own sampler (Python `random`),
    so the crop distribution is the CPU path's by construction."""
    return RandomResizedCropAndInterpolation.get_params(img, scale, ratio)


def random_resized_crop(img: torch.Tensor, size: int, scale=(0.08, 1.0), ratio=RATIO,
                        interpolation: str = "bicubic") -> torch.Tensor:
    i, j, h, w = crop_params(img, scale, ratio)
    return F.resized_crop(img, i, j, h, w, [size, size], interpolation=interp_mode(interpolation), antialias=True)


def random_hflip(x: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    """Flip each image of an NCHW batch independently with probability p."""
    flip = torch.rand(x.shape[0], device=x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def resize_center_crop(img: torch.Tensor, size: int, crop_pct: float, interpolation: str = "bicubic") -> torch.Tensor:
    """timm's eval transform for a square size: shorter side to floor(size / crop_pct), then center crop."""
    scale_size = math.floor(size / crop_pct)
    img = F.resize(img, [scale_size], interpolation=interp_mode(interpolation), antialias=True)
    return F.center_crop(img, [size, size])


def normalize(x: torch.Tensor, mean, std, channels_last: bool = True) -> torch.Tensor:
    """uint8 NCHW -> float32 (x / 255 - mean) / std, optionally in channels_last memory format."""
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, -1, 1, 1) * 255
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, -1, 1, 1) * 255
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(dtype=torch.float32, memory_format=memory_format).sub_(m).div_(s)


def augmenter(policy: str | None, mean=(0.485, 0.456, 0.406)):
    """A per-image uint8 tensor transform for timm's policy string, or None.

    * 'original' (the card's AutoAugment) and any other non-'rand' AutoAugment name -> torchvision's
      `v2.AutoAugment(IMAGENET)`: the same 25 sub-policies of the AutoAugment paper as timm's 'original', with
      torchvision's magnitude tables. Known differences from timm's 'original': Posterize keeps 4 + level*0.4 bits
      in timm (more bits, milder, at higher level) and 8 - round(level*4/9) bits in torchvision (fewer bits);
      the translate/rotate/shear magnitude tables differ slightly; timm's rotate/shear/translate resample bicubic,
      torchvision's tensor ops here bilinear. The probabilities, op pairs and sign flips are the same. Fill: the
      mean colour, as timm's.
    * 'rand-m{M}[-n{N}]...' -> `v2.RandAugment(num_ops=N (default 2), magnitude=M, num_magnitude_bins=11)`, so M is
      on timm's 0-10 scale; timm's per-image magnitude noise (mstd) and its slightly different op set are not
      reproduced.
    * None -> ColorJitter(0.4, 0.4, 0.4): what timm applies when there is no auto-augment policy.
    """
    fill = [min(255, round(255 * m)) for m in mean]
    if policy is None:
        return v2.ColorJitter(0.4, 0.4, 0.4)
    if policy.startswith("rand"):
        m = re.search(r"-m(\d+)", policy)
        n = re.search(r"-n(\d+)", policy)
        return v2.RandAugment(num_ops=int(n.group(1)) if n else 2, magnitude=int(m.group(1)) if m else 9,
                              num_magnitude_bins=11, interpolation=InterpolationMode.BILINEAR, fill=fill)
    return v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=InterpolationMode.BILINEAR, fill=fill)


class GpuPreprocess:
    """The train and eval preprocessing of one data config (`models.data_config`: img_size, crop_pct,
    interpolation, mean, std), applied to a batch of JPEG bytes on any device."""

    def __init__(self, dc: dict, auto_augment: str | None = "original", crop_scale=(0.08, 1.0), ratio=RATIO,
                 hflip: float = 0.5, channels_last: bool = True):
        self.size, self.crop_pct = int(dc["img_size"]), float(dc["crop_pct"])
        self.interpolation, self.mean, self.std = dc["interpolation"], tuple(dc["mean"]), tuple(dc["std"])
        self.scale, self.ratio, self.hflip, self.channels_last = tuple(crop_scale), tuple(ratio), hflip, channels_last
        self.augment = augmenter(auto_augment, self.mean)

    def train_images(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Decoded uint8 CHW images -> augmented uint8 NCHW batch (crop, flip, auto-augment)."""
        out = []
        for img in images:
            crop = random_resized_crop(img, self.size, self.scale, self.ratio, self.interpolation)
            out.append(self.augment(crop) if self.augment is not None else crop)
        x = torch.stack(out)
        return random_hflip(x, self.hflip) if self.hflip > 0 else x

    def eval_images(self, images: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([resize_center_crop(img, self.size, self.crop_pct, self.interpolation) for img in images])

    def train(self, flat: torch.Tensor, sizes: torch.Tensor, device) -> torch.Tensor:
        """A `collate_jpeg` batch's bytes -> normalised float32 NCHW batch on `device`."""
        x = self.train_images(decode_batch(unpack(flat, sizes), device))
        return normalize(x, self.mean, self.std, self.channels_last)

    def eval(self, flat: torch.Tensor, sizes: torch.Tensor, device) -> torch.Tensor:
        x = self.eval_images(decode_batch(unpack(flat, sizes), device))
        return normalize(x, self.mean, self.std, self.channels_last)

    def __repr__(self) -> str:
        return (f"GpuPreprocess(size={self.size}, crop_pct={self.crop_pct}, scale={self.scale}, "
                f"interpolation={self.interpolation}, augment={self.augment!r})")
