"""GPU throughput, side by side in one call (issue 7): img/s and ratios, printed as a table and written as JSON.

Per config (default: tf_efficientnet_b0 @224 batch 256 and tf_efficientnet_b4 @380 batch 64; bf16 autocast,
channels_last, RMSpropTF, label smoothing 0.1):

  model train eager / compiled     the training step on a fixed random batch (the ceiling)
  effnet train, decode=cpu / gpu   `effnet train`'s own pieces (models.build, Classifier with EMA, ShardDataModule,
                                   Lightning Trainer, bf16-mixed, channels_last, torch.compile as `train.compile`)
                                   over synthetic webdataset shards, a fixed number of steps after a warm-up
  timm create_loader / + step      timm's loader (ImageFolder, AutoAugment 'original', bicubic, prefetcher) over the
                                   same images, alone and feeding the same compiled training step
  model inference eager / compiled
  effnet eval, decode=cpu / gpu    the evaluate stage's `accuracy` (eager, bf16, channels_last, prefetch thread)

Ratios are against the compiled model-only step (train rows) or eager inference (eval rows, eager as the
evaluate stage runs), measured in the same call. Synthetic JPEGs: ~500x375, q90, ImageNet-like size (bench/common.py), a few hundred unique images
repeated (decode work per sample is the same; disk caching is not what is measured).

    PYTHONPATH=src python bench/gpu_bench.py --out gpu_bench.json   # the full run, on a CUDA machine
    python bench/gpu_bench.py --configs b0 --out b0.json           # one config (each takes a few minutes)
    python bench/gpu_bench.py --dry-run                            # tiny, on the CPU: checks that it runs
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "src"))  # the project, when not installed
from common import make_image_folder  # noqa: E402

import pytorch_lightning as pl  # noqa: E402
import timm  # noqa: E402
from timm.data import create_dataset, create_loader  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from torch import nn  # noqa: E402

# Needed beyond torch/torchvision/timm/lightning: webdataset and pydantic (`pip install webdataset pydantic`), and
# the project on the path (PYTHONPATH=src); MLflow is not (the bench logs nothing).
from effnet import inference, models, variants  # noqa: E402
from effnet.config import ShardConfig  # noqa: E402
from effnet.data import datamodule, feed, transforms  # noqa: E402
from effnet.data.manifest import read_manifest  # noqa: E402
from effnet.lightning import Classifier  # noqa: E402
from effnet.stages import shard  # noqa: E402

CONFIGS = {"b0": ("tf_efficientnet_b0", 224, 256), "b4": ("tf_efficientnet_b4", 380, 64)}
OPT = dict(opt="rmsproptf", lr=0.01, momentum=0.9, alpha=0.9, eps=1e-3, weight_decay=1e-5)


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
        self.cuda = self.device.type == "cuda"
        self.amp = self.cuda  # bf16 autocast on the GPU; fp32 on the CPU (dry run)
        self.rows: list[dict] = []

    # -- helpers -------------------------------------------------------------------------------------------------
    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def mem_reset(self):
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self):
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None

    def record(self, config: str, what: str, fn, batch: int, ref: str | None = None, **info):
        """Run fn() -> img/s; keep going after a failure (the row says why). Each row also counts the graphs
        torch.compile made during it and its graph breaks: a compiled training run should show one graph for
        training (plus one per validation batch shape) and no breaks."""
        self.mem_reset()
        torch._dynamo.reset()
        counters = torch._dynamo.utils.counters
        counters.clear()
        t = time.perf_counter()
        try:
            rate, err = float(fn()), None
        except Exception as e:  # noqa: BLE001 - one failed row must not lose the others
            traceback.print_exc()
            rate, err = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        row = dict(config=config, what=what, img_s=rate, batch=batch, ref=ref, peak_gib=self.peak_gib(),
                   wall_s=round(time.perf_counter() - t, 1), error=err,
                   graphs=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()),
                   **info)
        self.rows.append(row)
        print(f"  {config:4} {what:34} {'-' if rate is None else f'{rate:9.1f}'} img/s  ({row['wall_s']} s, "
              f"{row['graphs']} graphs, {row['graph_breaks']} breaks)" + (f"  ERROR {err}" if err else ""),
              flush=True)
        return rate

    def variant(self, name):
        return variants.resolve(phi=-6) if self.args.dry_run else variants.resolve(name)

    def model(self, name, num_classes=1000):
        m = models.build(self.variant(name), num_classes).to(self.device)
        return m.to(memory_format=torch.channels_last) if self.cuda else m

    def timed(self, step, batch, warm=None, steps=None):
        warm, steps = warm or self.args.warmup, steps or self.args.steps
        for _ in range(warm):
            step()
        self.sync()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        self.sync()
        return steps * batch / (time.perf_counter() - t)

    # -- model only ----------------------------------------------------------------------------------------------
    def train_step(self, model, compiled):
        opt = create_optimizer_v2(model, **OPT)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
        fwd = torch.compile(model) if compiled else model

        def step(x, y):
            with self.autocast():
                loss = loss_fn(fwd(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def batch(self, b, size, classes=1000):
        x = torch.randn(b, 3, size, size, device=self.device)
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, torch.randint(0, classes, (b,), device=self.device)

    def model_train(self, name, size, b, compiled):
        model = self.model(name).train()
        step, (x, y) = self.train_step(model, compiled), self.batch(b, size)
        return self.timed(lambda: step(x, y), b)

    def model_infer(self, name, size, b, compiled):
        model = self.model(name).eval()
        fwd = torch.compile(model) if compiled else model
        x, _ = self.batch(b, size)

        def step():
            with torch.inference_mode(), self.autocast():
                fwd(x)
        return self.timed(step, b)

    # -- effnet train end to end ---------------------------------------------------------------------------------
    def effnet_train(self, name, size, b, decode, shards, compiled):
        classes = len(read_manifest(shards)["classes"])
        variant = self.variant(name)
        model = models.build(variant, classes)
        pre = models.preprocessing(model, variant, size)
        if self.cuda:
            model = model.to(memory_format=torch.channels_last)
        fed = feed.GpuPreprocess(pre, "original", (0.08, 1.0), channels_last=self.cuda) if decode == "gpu" \
            else feed.DeviceFeed(pre.mean, pre.std, channels_last=self.cuda)
        dm = datamodule.ShardDataModule(shards, transforms.train_transform(pre, "original", uint8=True),
                                    pre, b, self.args.workers,
                                    self.args.shuffle_buffer, fed)
        module = Classifier(model, classes, dict(OPT), None, 0.1, ema_decay=0.9999, compile=compiled)
        warm, steps = self.args.warmup, self.args.steps
        timing = {}

        class Clock(pl.Callback):
            def on_train_batch_start(cb, trainer, *_):
                if trainer.global_step == warm and "t0" not in timing:
                    self.sync()
                    timing["t0"] = time.perf_counter()

            def on_train_end(cb, trainer, *_):
                self.sync()
                timing["t1"] = time.perf_counter()

        trainer = pl.Trainer(max_steps=warm + steps, accelerator="gpu" if self.cuda else "cpu", devices=1,
                             precision="bf16-mixed" if self.cuda else "32-true", logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Clock()])
        trainer.fit(module, datamodule=dm)
        return steps * b / (timing["t1"] - timing["t0"])

    # -- timm's loader -------------------------------------------------------------------------------------------
    def timm_loader(self, size, b, folder, with_step=None):
        ds = create_dataset("", root=str(folder / "train"))
        loader = create_loader(ds, input_size=(3, size, size), batch_size=b, is_training=True,
                               auto_augment="original", interpolation="bicubic", num_workers=self.args.workers,
                               use_prefetcher=self.cuda, device=self.device, persistent_workers=False)
        warm, steps, seen, t = self.args.warmup, self.args.steps, 0, None
        for i, (x, y) in enumerate(loader):
            if i == warm:
                self.sync()
                t = time.perf_counter()
            if i >= warm + steps:
                break
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if with_step is not None:
                with_step(x.contiguous(memory_format=torch.channels_last) if self.cuda else x, y)
            if t is not None:
                seen += len(y)
        self.sync()
        if t is None:
            raise RuntimeError(f"the loader gave fewer than {warm} batches")
        return seen / (time.perf_counter() - t)

    def timm_train(self, name, size, b, folder, compiled):
        classes = len([p for p in (folder / "train").iterdir() if p.is_dir()])
        model = self.model(name, classes).train()
        return self.timm_loader(size, b, folder, self.train_step(model, compiled))

    # -- eval loop -----------------------------------------------------------------------------------------------
    def effnet_eval(self, name, size, b, decode, shards):
        """The evaluate stage's own `accuracy` (device feed, prefetch thread, bf16, channels_last, eager), timed
        from the end of its first batch (warm-up: the loader workers start) to its end."""
        classes = len(read_manifest(shards)["classes"])
        variant = self.variant(name)
        model = self.model(name, classes).eval()
        pre = models.preprocessing(model, variant, size)
        fed = feed.GpuPreprocess(pre, channels_last=self.cuda) if decode == "gpu" \
            else feed.DeviceFeed(pre.mean, pre.std, channels_last=self.cuda)
        timing = {"seen": 0}
        first_forward = model.forward

        def forward(x):  # clock the batches after the first
            out = first_forward(x)
            if "t0" not in timing:
                self.sync()
                timing["t0"] = time.perf_counter()
            else:
                timing["seen"] += x.shape[0]
            return out
        model.forward = forward
        inference.accuracy(model, pre, shards, b, self.args.workers, feed=fed, device=self.device)
        self.sync()
        if not timing["seen"]:
            raise RuntimeError("too few val batches: raise --unique-val or --repeat-val")
        return timing["seen"] / (time.perf_counter() - timing["t0"])


def make_data(root: Path, args) -> tuple[Path, Path]:
    """An ImageFolder of unique synthetic JPEGs, each repeated (hard links) to the sample counts wanted, and the
    same images as webdataset shards (JPEG bytes kept as they are)."""
    size = (160, 120) if args.dry_run else (500, 375)
    src = make_image_folder(root / "unique", args.unique, classes=args.classes, val=args.unique_val, size=size)
    folder = root / "images"
    for split, copies in (("train", args.repeat), ("val", args.repeat_val)):
        for f in sorted((src / split).rglob("*.jpg")):
            dest = folder / split / f.parent.name
            dest.mkdir(parents=True, exist_ok=True)
            for k in range(copies):
                target = dest / f"{f.stem}_{k}.jpg"
                try:
                    os.link(f, target)
                except OSError:
                    shutil.copyfile(f, target)
    shards = root / "shards"
    # Small shards: the eval loader splits val shards across workers, so there must be more shards than workers.
    per_shard = 16 if args.dry_run else 256
    shard.run(ShardConfig(samples_per_shard=per_shard, workers=None if not args.dry_run else 1), folder, shards)
    return folder, shards


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="b0,b4", help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--rows", default="all",
                    help="comma list of: model, effnet, timm, infer, eval (default all)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled rows (effnet rows run eager)")
    ap.add_argument("--warmup", type=int, default=None, help="steps not timed (default 10, dry run 1)")
    ap.add_argument("--steps", type=int, default=None, help="steps timed (default 30, dry run 2)")
    ap.add_argument("--workers", type=int, default=None, help="loader workers (default: all cores, dry run 0)")
    ap.add_argument("--shuffle-buffer", type=int, default=1000)
    ap.add_argument("--unique", type=int, default=512, help="unique train images")
    ap.add_argument("--repeat", type=int, default=24, help="times each train image is repeated")
    ap.add_argument("--unique-val", type=int, default=256)
    ap.add_argument("--repeat-val", type=int, default=16)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--data", type=Path, default=None, help="keep the synthetic data here (reused when present)")
    ap.add_argument("--out", type=Path, default=Path("gpu_bench.json"))
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, a phi -6 model at 32 px")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.unique, args.repeat, args.unique_val, args.repeat_val, args.classes = 24, 2, 16, 2, 4
        args.warmup, args.steps = args.warmup or 1, args.steps or 2
        args.workers = 0 if args.workers is None else args.workers
        args.no_compile = True
    args.warmup, args.steps = args.warmup or 10, args.steps or 30
    args.workers = os.cpu_count() if args.workers is None else args.workers
    rows = {"model", "effnet", "timm", "infer", "eval"} if args.rows == "all" else set(args.rows.split(","))
    bench = Bench(args)
    env = dict(torch=torch.__version__, timm=timm.__version__, lightning=pl.__version__,
               device=torch.cuda.get_device_name() if bench.cuda else platform.processor() or "cpu",
               cpus=os.cpu_count(), workers=args.workers, warmup=args.warmup, steps=args.steps, dry_run=args.dry_run)
    print(json.dumps(env))
    compiles = [False] if args.no_compile else [False, True]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or Path(tmp)
        if (root / "shards" / "manifest.json").exists():
            folder, shards = root / "images", root / "shards"
        else:
            t = time.perf_counter()
            folder, shards = make_data(root, args)
            print(f"synthetic data: {time.perf_counter() - t:.0f} s", flush=True)
        for key in args.configs.split(","):
            name, size, b = CONFIGS[key]
            if args.dry_run:
                size, b = 32, 8
            top = "model train compiled" if not args.no_compile else "model train eager"
            for c in compiles if "model" in rows else []:
                bench.record(key, f"model train {'compiled' if c else 'eager'}", lambda: bench.model_train(name, size, b, c), b)
            for decode in ("cpu", "gpu") if "effnet" in rows else []:
                c = not args.no_compile
                bench.record(key, f"effnet train decode={decode}{' compiled' if c else ''}",
                             lambda: bench.effnet_train(name, size, b, decode, shards, c), b, ref=top)
            if "timm" in rows:
                bench.record(key, "timm create_loader only", lambda: bench.timm_loader(size, b, folder), b, ref=top)
                c = not args.no_compile
                bench.record(key, f"timm create_loader + step{' compiled' if c else ''}",
                             lambda: bench.timm_train(name, size, b, folder, c), b, ref=top)
            eb = b * 2  # inference batch: twice the training one
            for c in compiles if "infer" in rows else []:
                bench.record(key, f"model inference {'compiled' if c else 'eager'}",
                             lambda: bench.model_infer(name, size, eb, c), eb)
            for decode in ("cpu", "gpu") if "eval" in rows else []:  # eager, as the evaluate stage runs
                bench.record(key, f"effnet eval decode={decode}",
                             lambda: bench.effnet_eval(name, size, eb, decode, shards), eb,
                             ref="model inference eager")
    by = {(r["config"], r["what"]): r["img_s"] for r in bench.rows}
    for r in bench.rows:
        ref = by.get((r["config"], r["ref"])) if r["ref"] else None
        r["ratio"] = round(r["img_s"] / ref, 3) if r["img_s"] and ref else None
    print(f"\n{'config':6} {'what':40} {'img/s':>9} {'ratio':>7} {'peak GiB':>8} {'graphs/breaks':>13}  vs")
    for r in bench.rows:
        rate = "-" if r["img_s"] is None else f"{r['img_s']:.0f}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        compiled = f"{r['graphs']}/{r['graph_breaks']}" if r["graphs"] else ""
        print(f"{r['config']:6} {r['what']:40} {rate:>9} {ratio:>7} {r['peak_gib'] or '':>8} {compiled:>13}  "
              f"{r['ref'] or ''}"
              + (f"  ERROR {r['error']}" if r["error"] else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"env": env, "rows": bench.rows}, indent=1))
    print(f"\nwritten: {args.out}")
    return 1 if any(r["error"] for r in bench.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
