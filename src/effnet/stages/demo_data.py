"""The `demo-data` stage: a JPEG ImageFolder (one folder per class) to run the pipeline on without a dataset of
one's own. `demo_data.dataset` picks one of two:

* `digits`: real data nobody here drew, scikit-learn's 1,797 handwritten digit scans (8x8, shipped inside its
  wheel), upscaled to `image_size` (nearest neighbour: the scan's pixels as squares), split as scikit-learn's own
  example splits them: the first half train, the second half val and test alternately (so train/, val/, test/).
* `shapes` (the default): ten procedural classes of shapes and textures, each drawn at a random scale (0.3 to 0.9
  of the image's side), position, rotation and colour over a background cluttered with lines, so that a tiny
  EfficientNet learns them in minutes on a CPU and the apparent object size varies as in real photos, which is
  what makes the test resolution matter (FixRes). Deterministic: every image is drawn from its own RNG seeded by
  (seed, split, class, index); train/ and val/.

`demo_data.labeled` < 1 makes either semi-supervised: that share of each class's training images stays in train/,
the rest move to unlabeled/ under names that do not tell their class (Noisy Student's teacher labels them).
"""
from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pydantic import BaseModel

from effnet import io
from effnet.config import DemoDataConfig

CLASSES = ["circle", "square", "triangle", "star", "cross", "ring", "stripes", "checker", "dots", "hexagon"]
SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges, as a camera would see them


def _colour(rng: np.random.Generator, avoid: tuple[int, ...] | None = None) -> tuple[int, int, int]:
    while True:
        c = tuple(int(x) for x in rng.integers(0, 256, 3))
        if avoid is None or sum(abs(a - b) for a, b in zip(c, avoid)) > 200:  # keep the object visible
            return c


def _polygon(cx: float, cy: float, r: float, n: int, angle: float, inner: float | None = None) -> list[tuple]:
    pts = []
    for i in range(n * (2 if inner else 1)):
        rad = r if not inner or i % 2 == 0 else r * inner
        a = angle + math.pi * 2 * i / (n * (2 if inner else 1))
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _texture(kind: str, size: int, fg, rng: np.random.Generator) -> Image.Image:
    """A square patch of a periodic texture, later masked to a disc and rotated."""
    patch = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(patch)
    period = max(4, size // int(rng.integers(4, 7)))
    if kind == "stripes":
        for x in range(0, size, period):
            d.rectangle([x, 0, x + period // 2, size], fill=fg)
    elif kind == "checker":
        for x in range(0, size, period):
            for y in range(0, size, period):
                if (x // period + y // period) % 2 == 0:
                    d.rectangle([x, y, x + period - 1, y + period - 1], fill=fg)
    else:  # dots
        r = period / 4
        for x in range(period // 2, size, period):
            for y in range(period // 2, size, period):
                d.ellipse([x - r, y - r, x + r, y + r], fill=fg)
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).ellipse([0, 0, size - 1, size - 1], fill=255)
    patch.putalpha(Image.composite(patch.getchannel("A"), mask, mask))
    return patch.rotate(float(rng.uniform(0, 180)), resample=Image.BICUBIC)


def draw(cls: int, size: int, rng: np.random.Generator) -> Image.Image:
    """One image of class `cls`."""
    s = size * SUPERSAMPLE
    bg = _colour(rng)
    img = Image.new("RGB", (s, s), bg)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 5))):  # clutter: thin lines of random colours
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, s, 4))
        d.line([x0, y0, x1, y1], fill=_colour(rng), width=int(rng.integers(1, 2 * SUPERSAMPLE)))
    fg = _colour(rng, avoid=bg)
    r = float(rng.uniform(0.15, 0.45)) * s  # object radius: the scale varies 3x across images
    cx, cy = (float(v) for v in rng.uniform(r, s - r, 2))
    angle = float(rng.uniform(0, 2 * math.pi))
    name = CLASSES[cls]
    if name == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif name == "square":
        d.polygon(_polygon(cx, cy, r, 4, angle), fill=fg)
    elif name == "triangle":
        d.polygon(_polygon(cx, cy, r, 3, angle), fill=fg)
    elif name == "hexagon":
        d.polygon(_polygon(cx, cy, r, 6, angle), fill=fg)
    elif name == "star":
        d.polygon(_polygon(cx, cy, r, 5, angle, inner=0.45), fill=fg)
    elif name == "cross":
        w = r * 0.35
        arm = [(-r, -w), (r, -w), (r, w), (-r, w)]
        for rot in (angle, angle + math.pi / 2):
            c, sn = math.cos(rot), math.sin(rot)
            d.polygon([(cx + x * c - y * sn, cy + x * sn + y * c) for x, y in arm], fill=fg)
    elif name == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=max(2, int(r * 0.3)))
    else:
        patch = _texture(name, int(2 * r), fg, rng)
        img.paste(patch, (int(cx - r), int(cy - r)), patch)
    img = img.resize((size, size), Image.LANCZOS)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.2, 0.8))))
    return img


class DemoData(BaseModel):
    out: Path
    counts: dict[str, int]  # images per split


def run(cfg: DemoDataConfig, out: Path) -> DemoData:
    """Write OUT/<split>/<class>/<index>.jpg."""
    with io.atomic_dir(out) as tmp:
        counts = write_digits(cfg, tmp) if cfg.dataset == "digits" else write_shapes(cfg, tmp)
        if cfg.labeled < 1:
            counts["unlabeled"] = unlabel(tmp, cfg.labeled, cfg.seed)
            counts["train"] -= counts["unlabeled"]
    return DemoData(out=Path(out), counts=counts)


def write_shapes(cfg: DemoDataConfig, root: Path) -> dict[str, int]:
    counts = {}
    for split_id, (split, n) in enumerate([("train", cfg.train_per_class), ("val", cfg.val_per_class)]):
        for cls in range(cfg.classes):
            folder = root / split / CLASSES[cls]
            folder.mkdir(parents=True)
            for i in range(n):
                rng = np.random.default_rng([cfg.seed, split_id, cls, i])
                draw(cls, cfg.image_size, rng).save(folder / f"{i:05d}.jpg", quality=90)
        counts[split] = n * cfg.classes
    return counts


def write_digits(cfg: DemoDataConfig, root: Path) -> dict[str, int]:
    """scikit-learn's digits (classes 0 .. cfg.classes - 1), dark ink on white as scanned; its example's split."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    half = len(digits.images) // 2
    counts = {"train": 0, "val": 0, "test": 0}
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        if label >= cfg.classes:
            continue
        split = "train" if i < half else ("val", "test")[(i - half) % 2]
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        grey = (255 - pixels * (255 / 16)).round().astype(np.uint8)  # 0..16 ink -> white paper, dark strokes
        img = Image.fromarray(grey).resize((cfg.image_size, cfg.image_size), Image.NEAREST).convert("RGB")
        img.save(folder / f"{i:05d}.jpg", quality=95)
        counts[split] += 1
    return counts


def unlabel(root: Path, labeled: float, seed: int) -> int:
    """Move all but a LABELED share (at least one) of each ROOT/train/<class>/ to ROOT/unlabeled/, drawn with a
    seeded shuffle, each renamed to a hash of its old path; returns how many moved."""
    (root / "unlabeled").mkdir()
    moved = 0
    for folder in sorted(p for p in (root / "train").iterdir() if p.is_dir()):
        files = sorted(folder.iterdir())
        random.Random(f"{seed}:{folder.name}").shuffle(files)
        for path in files[max(1, round(len(files) * labeled)):]:
            name = hashlib.sha256(f"{seed}/{folder.name}/{path.name}".encode()).hexdigest()[:16]
            path.rename(root / "unlabeled" / f"{name}{path.suffix}")
            moved += 1
    return moved
