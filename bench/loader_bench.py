"""Training-loader throughput per worker core (decode + RandomResizedCrop 224 + flip + AutoAugment 'original'):
our shards (copy mode, max_side mode, reduced-size JPEG decoding) beside timm's create_loader over the same images
as an ImageFolder. One process, num_workers=0, so img/s is per worker core. Our loader yields uint8 images (the
device normalises them), as `effnet train` runs it; timm's yields normalised float32.

    nice -n 19 .venv/bin/python bench/loader_bench.py --images 256
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import make_image_folder, print_rates  # noqa: E402

from timm.data import create_dataset, create_loader  # noqa: E402

from effnet.config import ShardConfig  # noqa: E402
from effnet.data import loaders, transforms  # noqa: E402
from effnet.models import Preprocessing  # noqa: E402
from effnet.stages import shard  # noqa: E402

PRE = Preprocessing(img_size=224, crop_pct=0.875, interpolation="bicubic", mean=(0.485, 0.456, 0.406),
                    std=(0.229, 0.224, 0.225))


def rate(loader, n: int) -> float:
    seen, t = 0, None
    for i, (x, *_) in enumerate(loader):
        if i == 1:  # the first batch pays for start-up
            seen, t = 0, time.perf_counter()
        seen += len(x)
        if t and seen >= n:
            break
    return seen / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-side", type=int, default=320)
    args = ap.parse_args()
    if args.images < 2 * args.batch:
        ap.error(f"--images {args.images}: needs at least two batches of --batch {args.batch} (the first is warm-up)")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = make_image_folder(tmp / "src", args.images, val=10)
        shard.run(ShardConfig(samples_per_shard=1000), src, tmp / "copy")
        shard.run(ShardConfig(samples_per_shard=1000, max_side=args.max_side, quality=90), src, tmp / "side")
        n = args.images - args.batch  # timed images, after the first batch
        timm_loader = create_loader(create_dataset("", root=str(src / "train")), input_size=(3, 224, 224),
                                    batch_size=args.batch, is_training=True, auto_augment="original",
                                    interpolation="bicubic", num_workers=0, use_prefetcher=False)
        tf = transforms.train_transform(PRE, "original", uint8=True)  # as `effnet train` runs it
        rows = [("timm create_loader, ImageFolder", rate(timm_loader, n))]
        for name, where, draft in [("shards, copy", "copy", None), ("shards, copy + draft decode", "copy", 224),
                                   (f"shards, max_side {args.max_side}", "side", None)]:
            loader = loaders.train_loader(tmp / where, tf, args.batch, 0, 64, draft=draft)
            rows.append((name, rate(loader, n)))
        print_rates(f"{args.images} images ~500x375, batch {args.batch}, 1 worker core, RRC 224 + flip + AutoAugment",
                    rows, "timm")


if __name__ == "__main__":
    main()
