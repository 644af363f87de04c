"""Synthetic ImageNet-like JPEGs for the benches: ~500x375, smooth content with fine noise, ~40-80 KB each."""
from __future__ import annotations

import datetime
import shlex
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def provenance() -> dict:
    """What a bench's figures carry: the day (UTC), the machine (`tracking.machine`) and the command that made them."""
    from effnet import tracking
    return {"date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(), "machine": tracking.machine(),
            "command": shlex.join(["python", *sys.argv])}


def print_rates(header: str, rows: list[tuple[str, float]], reference: str) -> None:
    """A table of img/s with each row's ratio to the first one (the reference run measured in the same call)."""
    width = max(len(name) for name, _ in rows) + 2
    print(header)
    print(f"{'':{width}} {'img/s':>9} {'vs ' + reference:>12}")
    for name, rate in rows:
        print(f"{name:{width}} {rate:9.1f} {rate / rows[0][1]:11.2f}x")


def make_image_folder(root: Path, n: int, classes: int = 10, val: int = 0, size=(500, 375), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n + val):
        split = "train" if i < n else "val"
        folder = Path(root) / split / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        fine = rng.normal(0, 12, (size[1], size[0], 3))
        img = Image.fromarray(np.clip(np.asarray(coarse) + fine, 0, 255).astype(np.uint8))
        img.save(folder / f"{i:06d}.jpg", quality=90)
    return Path(root)
