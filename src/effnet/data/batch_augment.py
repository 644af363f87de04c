"""Batched AutoAugment / RandAugment / ColorJitter for uint8 NCHW batches on any device.

`augmenter` gives a torchvision v2 transform that augments one image per call; looping it over a batch costs
a few small kernels per image, which is what limits the GPU data path at batch 256. `BatchAugment` draws the same
random choices for every image of the batch at once, then applies each op once per slot to the images that drew
it, with a per-image magnitude. Per batch that is at most (slots x op types) op applications, whatever its size.

The sampling follows torchvision's (v2 `AutoAugment`, `RandAugment`, `ColorJitter` in the pinned torchvision
0.29) and reads the policy and magnitude tables from those transforms themselves; the ops are torchvision's
functional tensor kernels with a per-image magnitude instead of a Python float (see `test_batch_augment.py` for
how close they are). Randomness comes from torch's global CPU generator, as torchvision's own transforms draw it,
so `torch.manual_seed` governs both, and grouping the images needs no device synchronisation.
"""
from __future__ import annotations

import re
from functools import partial

import torch
import torch.nn.functional as nnf
from torchvision.transforms import v2
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from effnet.errors import EffnetError

Plan = list[tuple[torch.Tensor, torch.Tensor]]  # per slot: (op index per image, -1 = untouched; magnitude per image)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device` without a blocking copy: from pinned memory on CUDA."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _col(m: torch.Tensor) -> torch.Tensor:
    """A per-image value (k,) as (k, 1, 1, 1), to broadcast over an image batch."""
    return m.view(-1, 1, 1, 1)


def _blend(img: torch.Tensor, other: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """torchvision's `_blend(img, other, ratio=1 + m)`: img * (1 + m) - other * m, clamped, truncated to uint8
    (addcmul: the fused multiply-add of its `add_(other, alpha=1 - ratio)`, so the rounding is the same)."""
    out = img.float().mul_(_col(1 + m)).addcmul_(other, _col(-m))
    return out.clamp_(0, 255).to(torch.uint8)


def _gray(img: torch.Tensor) -> torch.Tensor:
    """Luma floored to an integer, as torchvision's saturation and contrast use it for uint8 images."""
    return F.rgb_to_grayscale(img).float()


# --- the ops: (uint8 images (k, C, H, W), float32 magnitudes (k,)) -> uint8 images, `magnitude` as torchvision's
# `_AutoAugmentBase._apply_image_or_video_transform` takes it -------------------------------------------------

def brightness(img, m):
    return img.float().mul_(_col(1 + m)).clamp_(0, 255).to(torch.uint8)


def color(img, m):
    return _blend(img, _gray(img), m)


def contrast(img, m):
    return _blend(img, _gray(img).mean(dim=(-3, -2, -1), keepdim=True), m)


def sharpness(img, m):
    """F.adjust_sharpness: the interior blended with a rounded 3x3 smoothing, the border kept."""
    c, h, w = img.shape[-3:]
    if h <= 2 or w <= 2:
        return img
    kernel = torch.full((3, 3), 1 / 13, device=img.device)  # built on the device: no blocking copy
    kernel[1, 1].fill_(5 / 13)
    out = img.float()
    blurred = nnf.conv2d(out, kernel.expand(c, 1, 3, 3), groups=c).round_()
    inner = out[..., 1:-1, 1:-1]
    inner.addcmul_(blurred.sub_(inner), _col(-m))  # + (1 - factor) * (blurred - img)
    return out.clamp_(0, 255).to(torch.uint8)


def posterize(img, m):
    """Keep the top int(m) bits: the mask ((1 << bits) - 1) << (8 - bits) == 256 - 2 ** (8 - bits)."""
    mask = 256 - 2 ** (8 - m.int())
    return img & _col(mask.to(torch.uint8))


def solarize(img, m):
    """Invert the pixels >= 255 * m, compared in float32 as torchvision compares uint8 with a Python float."""
    return torch.where(img >= _col(255 * m), F.invert(img), img)


def autocontrast(img, m):
    return F.autocontrast(img)  # per image and channel already


def equalize(img, m):
    return F.equalize(img)  # per image and channel already


def invert(img, m):
    return F.invert(img)


# The inverse affine matrix (output pixel -> input pixel, both centred on the image centre) that torchvision's
# `_get_inverse_affine_matrix` gives for the arguments `_apply_image_or_video_transform` passes, as rows
# (a, b, c, d, e, f) of [[a, b, c], [d, e, f]]; magnitudes are tan(shear), pixels, degrees.
def _shear_x(m, h, w):  # F.affine(shear=[degrees(atan(m)), 0], center=[0, 0]): the top-left corner stays
    return 1, m, m * (h / 2), 0, 1, 0


def _shear_y(m, h, w):  # F.affine(shear=[0, degrees(atan(m))], center=[0, 0])
    return 1, 0, 0, m, 1, m * (w / 2)


def _translate_x(m, h, w):  # F.affine(translate=[int(m), 0])
    return 1, 0, -m.trunc(), 0, 1, 0


def _translate_y(m, h, w):  # F.affine(translate=[0, int(m)])
    return 1, 0, 0, 0, 1, -m.trunc()


def _rotate(m, h, w):  # F.rotate(angle=m): counter-clockwise about the centre
    cos, sin = torch.deg2rad(m).cos(), torch.deg2rad(m).sin()
    return cos, -sin, 0, sin, cos, 0


def affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """torchvision's `_affine_grid` (output size = input size) for one matrix per image: (k, 2, 3) -> (k, h, w, 2).
    Not torch's affine_grid: that one applies theta to [-1, 1] coordinates, torchvision's to centred pixels and
    normalises after; the rounding differs enough to move ~0.5% of sheared pixels by one level."""
    x = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=theta.device)
    y = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=theta.device)
    base = torch.stack([x.expand(h, w), y[:, None].expand(h, w), torch.ones(h, w, device=theta.device)], dim=-1)
    theta = theta.transpose(1, 2)
    theta = torch.stack([theta[..., 0] / (0.5 * w), theta[..., 1] / (0.5 * h)], dim=-1)
    return (base.view(1, h * w, 3) @ theta).view(-1, h, w, 2)


def warp(img, m, matrix, fill: list[float], mode: str = "bilinear"):
    """One grid and one grid_sample for all images, each with its own matrix. The fill is torchvision's
    (`_apply_grid_transform`): a channel of ones sampled along gives each pixel's in-image weight, and
    out = weight * (sampled - fill) + fill. Not that function itself: it copies `fill` to the device with a blocking
    copy, which on CUDA waits for the stream at every call."""
    k, c, h, w = img.shape
    rows = [v if torch.is_tensor(v) else torch.full_like(m, v) for v in matrix(m, h, w)]
    theta = torch.stack(rows, dim=1).view(k, 2, 3)
    ones = torch.ones(k, 1, h, w, device=img.device)
    out = nnf.grid_sample(torch.cat([img.float(), ones], 1), affine_grid(theta, h, w), mode=mode,
                          padding_mode="zeros", align_corners=False)
    out, weight = out[:, :c], out[:, c:]
    fill_img = _to_device(torch.tensor(fill, dtype=torch.float32).view(1, c, 1, 1), img.device)
    if mode == "nearest":
        out = torch.where(weight < 0.5, fill_img, out)
    else:
        out = out.sub_(fill_img).mul_(weight).add_(fill_img)
    return out.round_().to(torch.uint8)


GEOMETRIC = {"ShearX": _shear_x, "ShearY": _shear_y, "TranslateX": _translate_x, "TranslateY": _translate_y,
             "Rotate": _rotate}
PHOTOMETRIC = {"Brightness": brightness, "Color": color, "Contrast": contrast, "Sharpness": sharpness,
               "Posterize": posterize, "Solarize": solarize, "AutoContrast": autocontrast, "Equalize": equalize,
               "Invert": invert}
OP_NAMES = tuple(GEOMETRIC) + tuple(PHOTOMETRIC)  # op index -> name in a Plan


def augmenter(policy: str | None, mean=(0.485, 0.456, 0.406)):
    """The per-image torchvision transform for timm's policy string, which `BatchAugment` applies batch-wise.

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
    if policy.startswith("augmix"):
        raise EffnetError(f"train.auto_augment: {policy!r}: AugMix runs on the CPU path only (data.decode: cpu)")
    if policy.startswith("rand"):
        m = re.search(r"-m(\d+)", policy)
        n = re.search(r"-n(\d+)", policy)
        if m and int(m.group(1)) > 10:
            raise EffnetError(f"train.auto_augment: {policy!r}: the GPU path's RandAugment takes magnitudes 0-10")
        return v2.RandAugment(num_ops=int(n.group(1)) if n else 2, magnitude=int(m.group(1)) if m else 9,
                              num_magnitude_bins=11, interpolation=InterpolationMode.BILINEAR, fill=fill)
    return v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=InterpolationMode.BILINEAR, fill=fill)


class BatchAugment:
    """`augmenter(policy, mean)` for a whole uint8 NCHW batch: each image gets its own random augmentation,
    drawn as the per-image torchvision transform draws it, at a fixed number of op applications per batch.

        aug = BatchAugment("original")      # or "rand-m9-mstd0.5", or None (ColorJitter 0.4)
        out = aug(x)                        # x: uint8 (N, 3, H, W) on any device -> same shape, dtype, device

    `sample` and `apply` are the two halves of `__call__`, for tests: what was drawn, and applying it.
    """

    def __init__(self, policy: str | None = "original", mean=(0.485, 0.456, 0.406)):

        self.policy = policy
        self.reference = augmenter(policy, mean)  # the per-image transform: the source of every table used here
        ref = self.reference
        if isinstance(ref, v2.ColorJitter):
            self.ops = {}
        else:
            mode = v2.InterpolationMode(ref.interpolation).value
            self.ops = {name: partial(warp, matrix=matrix, fill=list(ref.fill), mode=mode)
                        for name, matrix in GEOMETRIC.items()}
        self.ops.update(PHOTOMETRIC)
        self._tables = {}  # (h, w) -> _choices(h, w): Translate's magnitudes depend on the image size

    def __repr__(self) -> str:
        return f"BatchAugment({self.policy!r}, reference={self.reference!r})"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x, self.sample(x.shape[0], *x.shape[-2:]))

    # --- sampling: CPU tensors, one row per image -----------------------------------------------------------------

    def _choices(self, h: int, w: int):
        """(op index, probability, magnitude, signed) tables, shape (choices, slots), from torchvision's tables
        (`_policies`, `_AUGMENTATION_SPACE`: private attributes of the pinned torchvision 0.29). AutoAugment: a
        choice is one of its sub-policies, shared by both slots; RandAugment: one of its ops, drawn per slot."""
        ref = self.reference
        if isinstance(ref, v2.AutoAugment):
            rows, bins = ref._policies, 10
        else:
            rows = [((name, 1.0, ref.magnitude),) * ref.num_ops for name in ref._AUGMENTATION_SPACE]
            bins = ref.num_magnitude_bins
        entries = [[self._entry(name, p, index, bins, h, w) for name, p, index in row] for row in rows]
        op, p, mag, signed = ([[e[i] for e in row] for row in entries] for i in range(4))
        return torch.tensor(op), torch.tensor(p), torch.tensor(mag), torch.tensor(signed)

    def _entry(self, name: str, p: float, index, bins: int, h: int, w: int):
        """One slot of a choice, as torchvision's `forward` turns it into a call: magnitude = table[index]."""
        magnitudes, signed = self.reference._AUGMENTATION_SPACE[name]
        mags = magnitudes(bins, h, w)
        op = OP_NAMES.index(name) if name != "Identity" else -1
        return op, p, 0.0 if mags is None else float(mags[index]), signed

    def sample(self, n: int, h: int, w: int) -> Plan:
        """Each image's ops, slot by slot: (op index or -1, signed magnitude) per image, on the CPU."""
        ref = self.reference
        if isinstance(ref, v2.ColorJitter):
            return self._sample_jitter(n)
        if (h, w) not in self._tables:
            self._tables[h, w] = self._choices(h, w)
        op, p, mag, signed = self._tables[h, w]
        if isinstance(ref, v2.AutoAugment):
            choice = torch.randint(len(op), (n,)).expand(op.shape[1], n)  # one sub-policy per image
        else:
            choice = torch.randint(len(op), (op.shape[1], n))  # one op per image and slot
        plan = []
        for s, c in enumerate(choice):
            applied = torch.rand(n) <= p[c, s]
            flip = signed[c, s] & (torch.rand(n) <= 0.5)
            plan.append((torch.where(applied, op[c, s], -1), torch.where(flip, -mag[c, s], mag[c, s])))
        return plan

    def _sample_jitter(self, n: int) -> Plan:
        """ColorJitter: brightness, contrast, saturation (torchvision's Color), each factor uniform in its range
        (0.6..1.4), in a random order per image (torchvision's randperm over the four, hue unused)."""
        ref = self.reference
        ops = torch.tensor([OP_NAMES.index(name) for name in ("Brightness", "Contrast", "Color")])
        factors = torch.stack([torch.empty(n).uniform_(*r) for r in (ref.brightness, ref.contrast, ref.saturation)], 1)
        order = torch.rand(n, 3).argsort(dim=1)
        rows = torch.arange(n)
        return [(ops[order[:, s]], factors[rows, order[:, s]] - 1) for s in range(3)]

    # --- applying ---------------------------------------------------------------------------------------------------

    def apply(self, x: torch.Tensor, plan: Plan) -> torch.Tensor:
        """Slot by slot, each op once on the images that drew it, written back in place of a copy of x. The groups
        are found on the CPU, and their indices and magnitudes go to the device in one asynchronous copy each, so
        that nothing here waits for the device."""
        groups = [(s, k, (op == k).nonzero().squeeze(1)) for s, (op, _) in enumerate(plan)
                  for k in op.unique().tolist() if k >= 0]
        out = x.clone()
        if not groups:
            return out
        sizes = [len(rows) for _, _, rows in groups]
        index = _to_device(torch.cat([rows for _, _, rows in groups]), x.device).split(sizes)
        mags = _to_device(torch.cat([plan[s][1][rows] for s, _, rows in groups]), x.device).split(sizes)
        for (_, k, _), idx, mag in zip(groups, index, mags):
            out[idx] = self.op(OP_NAMES[k], out[idx], mag)
        return out

    def op(self, name: str, images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
        """One op on a uint8 batch, with one magnitude per image (torchvision's meaning of `magnitude`)."""
        return self.ops[name](images, magnitudes.to(images.device, torch.float32))
