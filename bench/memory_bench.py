"""Peak GPU memory and the largest batch that fits, per variant at its own resolution (issue 7).

For each variant (default b0-b7): one training step as `effnet train` takes it on a GPU (timm model with the card's
BatchNorm and drop rates, bf16 autocast, channels_last, RMSpropTF, label smoothing, EMA copy on the device), eager
(a compiled step needs a compile per batch size tried; it uses less memory, so these batches are safe with it).
It reports the peak memory at batch 32, then grows the batch by doubling until a step runs out of memory and
bisects to the largest batch (a multiple of 8) whose step fits. Prints a markdown table (paste it into the docs)
and writes JSON.

    PYTHONPATH=src python bench/memory_bench.py --out memory.json   # on a CUDA machine
    python bench/memory_bench.py --dry-run                          # tiny models on the CPU, batches capped
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "src"))  # the project, when not installed
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.utils import ModelEmaV3  # noqa: E402
from torch import nn  # noqa: E402

from effnet import models, variants  # noqa: E402

OPT = dict(opt="rmsproptf", lr=0.01, momentum=0.9, alpha=0.9, eps=1e-3, weight_decay=1e-5)


def largest_fit(fits: Callable[[int], bool], start: int, step: int = 8, cap: int = 1 << 16) -> int:
    """The largest multiple of `step` up to `cap` for which fits(batch) holds, assuming fitting is monotone in the
    batch: double from `start` while it fits, then bisect between the last fit and the first failure. 0 if even
    `step` fails."""
    cap = cap // step * step
    lo, hi = 0, cap + step  # lo fits (0 trivially); hi does not (beyond the cap counts as not fitting)
    batch = max(step, start // step * step)
    while batch < hi and fits(batch):
        lo, batch = batch, min(batch * 2, hi)
    hi = min(hi, batch)
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


class Step:
    """One variant's training step; `peak(batch)` runs two steps and returns the peak memory in GiB (None on CPU),
    raising torch.OutOfMemoryError when they do not fit."""

    def __init__(self, variant: variants.Variant, size: int, device: torch.device):
        self.size, self.device, self.cuda = size, device, device.type == "cuda"
        self.model = models.build(variant, 1000).to(device)
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = ModelEmaV3(self.model, decay=0.9999)
        self.opt = create_optimizer_v2(self.model, **OPT)
        self.loss = nn.CrossEntropyLoss(label_smoothing=0.1)

    def peak(self, batch: int) -> float | None:
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        memory_format = torch.channels_last if self.cuda else torch.contiguous_format
        x = torch.randn(batch, 3, self.size, self.size, device=self.device).contiguous(memory_format=memory_format)
        y = torch.randint(0, 1000, (batch,), device=self.device)
        for _ in range(2):  # the second step has the optimizer state the first one allocated
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda):
                loss = self.loss(self.model(x), y)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.ema.update(self.model)
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**30
        return None

    def fits(self, batch: int) -> bool:
        try:
            self.peak(batch)
            return True
        except torch.OutOfMemoryError:
            self.opt.zero_grad(set_to_none=True)
            return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="b0,b1,b2,b3,b4,b5,b6,b7", help="card IDs without the prefix")
    ap.add_argument("--ref-batch", type=int, default=32, help="batch at which peak memory is reported")
    ap.add_argument("--cap", type=int, default=4096, help="largest batch tried")
    ap.add_argument("--out", type=Path, default=Path("memory_bench.json"))
    ap.add_argument("--dry-run", action="store_true", help="phi -6 models at 32 px on the CPU, batches up to 16")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if device.type != "cuda" and not args.dry_run:
        print("memory_bench: needs a CUDA device (or --dry-run)", file=sys.stderr)
        return 2
    cap = 16 if args.dry_run else args.cap
    total = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name() if total else "cpu",
                      "total_gib": total, "dry_run": args.dry_run}))
    rows = []
    for key in args.variants.split(","):
        variant = variants.resolve(phi=-6) if args.dry_run else variants.resolve(f"tf_efficientnet_{key}")
        size = 32 if args.dry_run else variant.img_size
        t = time.perf_counter()
        step = Step(variant, size, device)
        ref = min(args.ref_batch, cap)
        peak = step.peak(ref) if step.fits(ref) else None
        largest = largest_fit(step.fits, ref, cap=cap)
        rows.append(dict(variant=key, img_size=size, params_m=round(sum(p.numel() for p in step.model.parameters())
                                                                        / 1e6, 2),
                         ref_batch=ref, peak_gib=None if peak is None else round(peak, 2), largest_batch=largest,
                         wall_s=round(time.perf_counter() - t, 1)))
        print(json.dumps(rows[-1]), flush=True)
        del step
    print(f"\n| variant | resolution | params (M) | peak GiB @ batch {args.ref_batch} | largest batch |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['variant']} | {r['img_size']} | {r['params_m']} | {r['peak_gib'] or '-'} | "
              f"{r['largest_batch']}{'+' if r['largest_batch'] >= cap else ''} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": str(device), "total_gib": total, "rows": rows}, indent=1))
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
