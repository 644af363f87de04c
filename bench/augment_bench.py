"""The GPU train path's cost per batch, per-image loops against the batched ops that replaced them: random-resized
crop + flip (torchvision's resized_crop per image, bicubic antialiased, vs `gpu.resized_crops`, from images twice
the output size), and auto-augmentation (`batch_augment.augmenter(policy)` per image vs `BatchAugment`).

    PYTHONPATH=src python bench/augment_bench.py                       # CUDA if available, else CPU
    python bench/augment_bench.py --device cpu --size 64 --iters 5

Times are the median wall time per batch over --iters batches after --warmup untimed ones, synchronising the device
before each clock read. The images are smooth colour fields with noise (bench/common.py's look), so Equalize,
AutoContrast and friends see photo-like histograms.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # the project, when not installed
from effnet.data import batch_augment, gpu  # noqa: E402
from torchvision.transforms.v2 import functional as F  # noqa: E402
from effnet.data.batch_augment import BatchAugment  # noqa: E402


def images(n: int, size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 256, (n, 3, 6, 6), generator=g).float()
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (smooth + 12 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 255).to(torch.uint8).to(device)


def seconds_per_batch(fn, x: torch.Tensor, warmup: int, iters: int) -> float:
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        fn(x)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=64, help="image side, px")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--policies", nargs="+", default=["original", "rand-m9-mstd0.5"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); 1 is steadier on a busy CPU")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"{torch.get_num_threads()} threads), {args.size}x{args.size} uint8, torch {torch.__version__}, "
          f"median of {args.iters} after {args.warmup} warm-up")
    print(f"{'what':18} {'batch':>5} {'per-image loop ms':>18} {'batched ms':>16} {'speed-up':>9}")
    for n in args.batches:
        sources = list(images(n, 2 * args.size, device))
        boxes = [gpu.crop_params(img) for img in sources]
        flips = [i % 2 == 0 for i in range(n)]

        def per_image(_):
            out = torch.stack([F.resized_crop(img, *box, [args.size] * 2, F.InterpolationMode.BICUBIC, antialias=True)
                               for img, box in zip(sources, boxes)])
            return gpu.random_hflip(out, flips)
        loop = seconds_per_batch(per_image, sources[0], args.warmup, args.iters)
        fast = seconds_per_batch(lambda _: gpu.resized_crops(sources, boxes, args.size, flips), sources[0],
                                 args.warmup, args.iters)
        print(f"{'crop + flip':18} {n:5d} {loop * 1e3:18.1f} {fast * 1e3:16.1f} {loop / fast:8.1f}x")
    for policy in args.policies:
        batched = BatchAugment(policy)
        per_image = batch_augment.augmenter(policy)  # the transform gpu.py applies image by image
        for n in args.batches:
            x = images(n, args.size, device)
            loop = seconds_per_batch(lambda b: torch.stack([per_image(img) for img in b]), x, args.warmup, args.iters)
            fast = seconds_per_batch(batched, x, args.warmup, args.iters)
            print(f"{policy:18} {n:5d} {loop * 1e3:18.1f} {fast * 1e3:16.1f} {loop / fast:8.1f}x")


if __name__ == "__main__":
    main()
