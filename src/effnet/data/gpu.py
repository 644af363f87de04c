"""The tensor operations of the GPU data path (`data.decode: gpu`, driven by `feed.GpuPreprocess`): decode a
batch of JPEG bytes (`torchvision.io.decode_jpeg(list, device=...)`, nvjpeg on CUDA) and do what timm's CPU
transforms do, batch-wise:

* train: timm's RandomResizedCrop sampler itself (`crop_params`: the same scale and log-ratio distribution, the
  same 10 tries and central fallback), the crops resized and flipped in one batched resample (`resized_crops`);
* eval: resize of the shorter side to floor(size / crop_pct) (bicubic, antialias), center crop (timm's eval
  transform; it matches the CPU path to within JPEG decoder and resampler rounding); normalisation.

Every function is device-agnostic: on CPU tensors they run the same code (decode_jpeg on the CPU), which is how
the tests check them.
"""
from __future__ import annotations

import functools
import math
import random

import torch
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

RATIO = (3 / 4, 4 / 3)  # timm's (and Inception's) RandomResizedCrop aspect-ratio range


# --- what the workers do: bytes only ---------------------------------------------------------------------------

def collate_jpeg(samples: list[tuple]) -> list:
    """[(jpeg bytes, label[, key]), ...] -> [(flat uint8 tensor, byte counts), labels[, keys]]: one tensor for the
    bytes of the whole batch, so a worker hands over one shared-memory block, not one per image."""
    cols = list(zip(*samples))
    sizes = torch.tensor([len(b) for b in cols[0]], dtype=torch.int64)
    flat = torch.frombuffer(bytearray(b"".join(cols[0])), dtype=torch.uint8)
    return [(flat, sizes), torch.tensor(cols[1], dtype=torch.int64), *(list(c) for c in cols[2:])]


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


PAD_BYTES = 2**30  # one padded float32 chunk at most (1 GiB): bounds memory when a batch has huge images


def resized_crops(images: list[torch.Tensor], boxes: list[tuple[int, int, int, int]], size: int,
                  flips: list[bool]) -> torch.Tensor:
    """Each image's box (top, left, height, width) resized to size x size and mirrored where `flips` says, as a
    uint8 NCHW batch, in a handful of batched ops instead of a few per image.

    The boxes are copied into one zero-padded batch; one `grid_sample` reads each output pixel's bilinear sample,
    on a grid k times finer than the output, where k is how many times the largest box shrinks (at most 4), and a
    k x k average pools it back: antialiased bilinear resizing (what DALI's random_resized_crop does, and one of
    the two filters timm's own training draws from). Sample positions are clamped to each box, as a crop-then-
    resize does, so no padding leaks in. The flip is the mirrored sample grid."""
    n, device = len(images), images[0].device
    h, w = (on_device([b[i] for b in boxes], torch.float32, device) for i in (2, 3))
    mirrors = on_device(flips, torch.bool, device)[:, None]
    k = max(1, min(4, math.ceil(max(max(b[2], b[3]) for b in boxes) / size)))
    out = torch.empty(n, images[0].shape[0], size, size, dtype=torch.uint8, device=device)
    for lo, hi in _chunks([(b[2], b[3]) for b in boxes], PAD_BYTES // (3 * 4)):
        ph, pw = max(b[2] for b in boxes[lo:hi]), max(b[3] for b in boxes[lo:hi])
        padded = images[0].new_zeros(hi - lo, images[0].shape[0], ph, pw)
        for row, (img, (top, left, bh, bw)) in enumerate(zip(images[lo:hi], boxes[lo:hi])):
            padded[row, :, :bh, :bw] = img[:, top:top + bh, left:left + bw]
        base = (torch.arange(size * k, dtype=torch.float32, device=device) + 0.5) / (size * k)
        xs = _clamped(base[None, :] * w[lo:hi, None] - 0.5, w[lo:hi, None])
        xs = torch.where(mirrors[lo:hi], w[lo:hi, None] - 1 - xs, xs)
        ys = _clamped(base[None, :] * h[lo:hi, None] - 0.5, h[lo:hi, None])
        grid = torch.stack([  # grid_sample's (x, y) in [-1, 1] over the padded size (align_corners=True)
            (2 * xs / max(pw - 1, 1) - 1)[:, None, :].expand(-1, size * k, -1),
            (2 * ys / max(ph - 1, 1) - 1)[:, :, None].expand(-1, -1, size * k)], dim=-1)
        x = torch.nn.functional.grid_sample(padded.float(), grid, mode="bilinear", align_corners=True)
        if k > 1:
            x = torch.nn.functional.avg_pool2d(x, k)
        out[lo:hi] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out


@functools.cache
def _scaled_stats(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """255 * mean and 255 * std as (1, C, 1, 1) tensors on `device`: made once, not per batch."""
    return tuple(on_device([v * 255 for v in values], torch.float32, device).view(1, -1, 1, 1)
                 for values in (mean, std))


def on_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small per-batch list as a tensor on `device`, copied from pinned memory without blocking: a plain
    torch.tensor(..., device="cuda") would wait for the stream's earlier work."""
    t = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return t.to(device, non_blocking=True)


def _clamped(pos: torch.Tensor, extent: torch.Tensor) -> torch.Tensor:
    return torch.minimum(pos.clamp(min=0), extent - 1)


def _chunks(sizes: list[tuple[int, int]], budget: int) -> list[tuple[int, int]]:
    """[lo, hi) runs of images whose padded size (count x tallest x widest) stays within `budget` pixels."""
    runs, lo = [], 0
    while lo < len(sizes):
        hi, ph, pw = lo + 1, *sizes[lo]
        while hi < len(sizes):
            nh, nw = max(ph, sizes[hi][0]), max(pw, sizes[hi][1])
            if (hi - lo + 1) * nh * nw > budget:
                break
            hi, ph, pw = hi + 1, nh, nw
        runs.append((lo, hi))
        lo = hi
    return runs


def random_hflip(x: torch.Tensor, flips: list[bool]) -> torch.Tensor:
    """Mirror the images of an NCHW batch where `flips` says."""
    mirror = on_device(flips, torch.bool, x.device)[:, None, None, None]
    return torch.where(mirror, x.flip(-1), x)


def resize_center_crop(img: torch.Tensor, size: int, crop_pct: float, interpolation: str = "bicubic") -> torch.Tensor:
    """timm's eval transform for a square size on a CHW or NCHW tensor: shorter side to floor(size / crop_pct),
    then center crop."""
    scale_size = math.floor(size / crop_pct)
    img = F.resize(img, [scale_size], interpolation=interp_mode(interpolation), antialias=True)
    return F.center_crop(img, [size, size])


def normalize(x: torch.Tensor, mean, std, channels_last: bool = True) -> torch.Tensor:
    """uint8 NCHW -> float32 (x / 255 - mean) / std, optionally in channels_last memory format."""
    m, s = _scaled_stats(tuple(mean), tuple(std), x.device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(dtype=torch.float32, memory_format=memory_format).sub_(m).div_(s)
