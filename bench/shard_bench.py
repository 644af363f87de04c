"""Sharding throughput (img/s): `effnet shard` in copy mode and max_side mode beside `tar -cf` of the same files.

    nice -n 19 .venv/bin/python bench/shard_bench.py --images 400 --workers 2
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import make_image_folder, print_rates  # noqa: E402

from effnet.config import ShardConfig  # noqa: E402
from effnet.stages import shard  # noqa: E402


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--workers", type=int, default=None, help="default: all cores")
    ap.add_argument("--max-side", type=int, default=320)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = make_image_folder(tmp / "src", args.images, val=max(10, args.images // 50))
        n = sum(1 for _ in src.rglob("*.jpg"))
        mb = sum(p.stat().st_size for p in src.rglob("*.jpg")) / 1e6
        cfg = ShardConfig(samples_per_shard=1000, workers=args.workers)
        rows = [("tar -cf (reference)", timed(lambda: subprocess.run(["tar", "-cf", str(tmp / "ref.tar"), "-C",
                                                                       str(src), "."], check=True)))]
        rows.append(("effnet shard, copy", timed(lambda: shard.run(cfg, src, tmp / "copy"))))
        side = cfg.model_copy(update={"max_side": args.max_side, "quality": 90})
        rows.append((f"effnet shard, max_side {args.max_side}", timed(lambda: shard.run(side, src, tmp / "side"))))
        print_rates(f"{n} images, {mb:.1f} MB, workers={cfg.workers or 'all cores'}",
                    [(name, n / secs) for name, secs in rows], "tar")


if __name__ == "__main__":
    main()
