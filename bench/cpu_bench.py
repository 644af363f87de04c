"""CPU throughput, side by side in one call (issue 15): img/s and ratios, printed as a table and written as JSON.

Same model (the params' variant: the demo's tiny model by default, or --variant tf_efficientnet_b0) and same
images (the demo's shapes, as shards for effnet and as an ImageFolder for timm) in every row:

  model train step           the training step on a fixed batch, NCHW / channels_last x fp32 / bf16 autocast,
                             with effnet's optimizer: the best of the four is the ceiling
  loader alone               the training stream's decode + augment in one process, no model: the CPU it takes
                             from the model on a machine whose cores the model already uses; and with the split
                             held in memory (data.hold_mb, as effnet train's workers hold it): augment only
  effnet train               `effnet train` as a user runs it (its own process, params.yaml's CPU defaults):
                             steady-state img/s over the epochs after the first, and seconds from process start
                             to the first step; --rounds runs, each between two ceiling steps (the machine's
                             speed drifts), the median round reported
  timm loop                  timm's own training loop on the same images as an ImageFolder: create_dataset +
                             create_loader with the same augmentation, create_optimizer_v2, ModelEmaV3, NCHW fp32
                             (timm's defaults), in a process of its own with glibc's malloc policy; and in this
                             one, with effnet's (env.keep_freed_memory)
  model inference            eval forward on a fixed batch, the best memory format
  effnet evaluate loop       `inference.accuracy` over the val shards, streamed (one pass of the evaluate stage)
  effnet evaluate stage      `evaluate.measure`: two models over the resolution sweep, val decoded once and held
                             in memory (and with data.hold_mb=0: streamed every pass), against model-only
                             inference over the same passes
  evaluate's resize alone    the stage's own resize + crop of val, held, at each sweep size once

Besides the ratios it prints the bounds the goals meet on these cores: the ceiling step with the loader's work
spread over every core, the ceiling against timm's loop, and the evaluate stage's model-only passes with its
resizing spread over every core.

    .venv/bin/python bench/cpu_bench.py --out cpu_bench.json      # the demo's model and data (a few minutes)
    .venv/bin/python bench/cpu_bench.py --variant tf_efficientnet_b0 --out cpu_bench_b0.json   # a card row
    .venv/bin/python bench/cpu_bench.py --dry-run                 # tiny: checks that it runs
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import yaml
from timm.data import create_dataset, create_loader
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # the project, when not installed
from effnet import config, env, inference, models, variants  # noqa: E402
from effnet.data import feed, held_splits, loaders, transforms  # noqa: E402
from effnet.data.manifest import read_manifest  # noqa: E402
from effnet.stages import demo_data, evaluate, shard, train  # noqa: E402


def timed(step, batch: int, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t)


class Bench:
    def __init__(self, params: config.Params, variant_key: str, args):
        self.params, self.key, self.args = params, variant_key, args
        self.variant = params.variant(variant_key)
        self.size, self.batch = params.train.img_size or self.variant.img_size, params.train.batch_size
        self.classes = params.demo_data.classes
        self.rows: list[dict] = []

    def record(self, what: str, rate: float, ref: str | None = None, **info) -> None:
        row = dict(what=what, img_s=round(rate, 1), ref=ref, **info)
        self.rows.append(row)
        print(f"  {what:44} {rate:8.1f} img/s" + "".join(f"  {k}={v}" for k, v in info.items()), flush=True)

    def model(self) -> nn.Module:
        cfg = self.params.train
        torch.manual_seed(0)
        return train.build_model(cfg, self.variant, self.classes)

    def fixed_batch(self, n: int, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        size = size or self.size
        return torch.randn(n, 3, size, size), torch.randint(0, self.classes, (n,))

    # -- the ceiling -------------------------------------------------------------------------------------------
    def model_train(self, channels_last: bool, bf16: bool) -> float:
        cfg, recipe = self.params.train, self.variant.recipe
        model = self.model().train()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=fmt)
        opt = create_optimizer_v2(model, **train.optimizer_kwargs(cfg, recipe, cfg.lr or 0.01))
        loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
        x, y = self.fixed_batch(self.batch)
        x = x.contiguous(memory_format=fmt)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return timed(step, self.batch, self.args.warmup, self.args.steps)

    def model_infer(self, channels_last: bool, size: int | None = None) -> float:
        model = self.model().eval()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=fmt)
        x, _ = self.fixed_batch(self.params.evaluate.batch_size, size)
        x = x.contiguous(memory_format=fmt)

        def step():
            with torch.inference_mode():
                model(x)
        return timed(step, len(x), self.args.warmup, self.args.steps)

    # -- effnet ------------------------------------------------------------------------------------------------
    def effnet_train(self, shards: Path, workspace: Path, *sets: str) -> tuple[float, float]:
        """`effnet train` in its own process (with SETS, `section.key=value`); (steady img/s over epochs 2..,
        seconds from start to the first step), read from its log lines."""
        sets = (f"train.epochs={self.args.epochs}", "train.progress_bar=false", "train.resume=false", *sets)
        out = subprocess.run(
            [sys.executable, "-m", "effnet", "train", str(shards), str(workspace / "trained"), "--variant", self.key,
             "--params", str(workspace / "params.yaml"), *[a for s in sets for a in ("--set", s)]],
            cwd=workspace, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(out.stderr[-3000:])
        rates = [float(r) for r in re.findall(r"\((\d+(?:\.\d+)?) img/s train", out.stderr)]
        first = float(re.search(r"first step after (\d+(?:\.\d+)?) s", out.stderr).group(1))
        if len(rates) < 2:
            raise RuntimeError(f"expected per-epoch rates in the log: {out.stderr[-2000:]}")
        return sum(rates[1:]) / len(rates[1:]), first

    def loader_alone(self, shards: Path, train: bool, hold_mb: int = 0) -> float:
        """A loader in this process, no model: the training stream's decode + augment, or the val split's decode +
        resize + crop. What it costs a core. With HOLD_MB, the training split held as `effnet train` holds it in
        each loader worker: an epoch after the first (which reads and decodes it)."""
        cfg = self.params.train
        pre = models.preprocessing(self.model(), self.variant, self.size)
        if train:
            tf = transforms.train_transform(pre, cfg.auto_augment, cfg.crop_scale, uint8=True)
            loader = loaders.train_loader(shards, tf, self.batch, 0, self.params.data.shuffle_buffer, hold_mb=hold_mb)
        else:
            loader = loaders.eval_loader(shards, transforms.eval_transform(pre, uint8=True),
                                        self.params.evaluate.batch_size, 0)
        for _ in loader if hold_mb else ():
            pass
        seen, t = 0, time.perf_counter()
        for images, *_ in loader:
            seen += len(images)
        return seen / (time.perf_counter() - t)

    def eval_preprocessing_held(self, shards: Path) -> float:
        """The evaluate stage's own preprocessing, val held in memory (`HeldSplit.batches`: timm's eval resize and
        crop, no decoding), once at each size of its sweep, in this process: images per second."""
        held = held_splits.HeldSplit.load(shards, "val", budget_mb=self.params.data.hold_mb)
        pre = models.preprocessing(self.model(), self.variant, self.size)
        sizes = evaluate.sweep_sizes({self.size}, self.params.evaluate.sweep)
        t = time.perf_counter()
        for size in sizes:
            held.batches(pre.at(size), self.params.evaluate.batch_size)
        return len(sizes) * len(held) / (time.perf_counter() - t)

    def effnet_eval(self, shards: Path) -> float:
        model = self.model()
        pre = models.preprocessing(model, self.variant, self.size)
        fed, device = feed.for_inference(self.params, pre)
        inference.accuracy(model, pre, shards, self.params.evaluate.batch_size, self.params.data.num_workers,
                           feed=fed, device=device)  # warm-up: loader workers, first forward
        t = time.perf_counter()
        inference.accuracy(model, pre, shards, self.params.evaluate.batch_size, self.params.data.num_workers,
                           feed=fed, device=device)
        return read_manifest(shards)["splits"]["val"]["total"] / (time.perf_counter() - t)

    def effnet_evaluate_stage(self, shards: Path, bundle: Path, *sets: str) -> tuple[float, float, int, int]:
        """The evaluate stage's measuring (`evaluate.measure`) of two bundles (BUNDLE twice, as trained and fixres
        are two models of one preprocessing) over its resolution sweep: (image passes per second, the same passes
        at model-only inference speed, channels_last, measured here at each size before and after the stage; the
        passes; the sizes among them, each resized once)."""
        params = config.load(self.args.params, [*self.args.overrides, *sets])
        sizes = evaluate.sweep_sizes({self.size}, params.evaluate.sweep)
        before = {size: self.model_infer(True, size) for size in sizes}  # and after: the machine's speed drifts
        t = time.perf_counter()
        evaluation = evaluate.measure(params, shards, {"trained": bundle, "fixres": bundle})
        wall = time.perf_counter() - t
        rates = {size: (before[size] + self.model_infer(True, size)) / 2 for size in sizes}
        images = read_manifest(shards)["splits"]["val"]["total"]
        passes = [size for by_size in evaluation.sweep.values() for size in by_size] + [evaluation.selected.resolution]
        model_only = sum(images / rates[size] for size in passes)
        return len(passes) * images / wall, len(passes) * images / model_only, len(passes), len(set(passes))

    # -- timm ----------------------------------------------------------------------------------------------------
    def timm_train(self, folder: Path) -> float:
        """timm's loop with timm's defaults (NCHW fp32), the same augmentation, optimizer and EMA as effnet."""
        cfg, recipe = self.params.train, self.variant.recipe
        model = self.model().train()
        pre = models.preprocessing(model, self.variant, self.size)
        loader = create_loader(create_dataset("", root=str(folder / "train")), input_size=(3, self.size, self.size),
                               batch_size=self.batch, is_training=True, auto_augment=cfg.auto_augment,
                               scale=cfg.crop_scale, interpolation=pre.interpolation, mean=pre.mean, std=pre.std,
                               num_workers=self.params.data.num_workers, use_prefetcher=False,
                               persistent_workers=self.params.data.num_workers > 0)
        opt = create_optimizer_v2(model, **{**train.optimizer_kwargs(cfg, recipe, cfg.lr or 0.01), "foreach": None})
        ema = ModelEmaV3(model, decay=cfg.ema_decay or 0.9998, use_warmup=True)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
        step, seen, t = 0, 0, None
        for epoch in range(self.args.epochs):
            if epoch == 1:
                t, seen = time.perf_counter(), 0
            for x, y in loader:
                loss = loss_fn(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                ema.update(model, step=step)
                seen += len(y)
        return seen / (time.perf_counter() - t)


TIMM = "timm loop (timm defaults: NCHW fp32, glibc malloc)"
STAGE = "effnet evaluate stage (sweep, 2 models)"
EVAL_PREP = "evaluate's resize + crop alone, val held (each sweep size once, 1 process)"


def in_turn(*rates: float) -> float:
    """The rate of jobs run one after the other on every item, from each one's own rate (img/s)."""
    return 1 / sum(1 / rate for rate in rates)


def step_row(channels_last: bool, bf16: bool) -> str:
    return f"model train step {'channels_last' if channels_last else 'NCHW'} {'bf16' if bf16 else 'fp32'}"


def timm_train_elsewhere(args, key: str, folder: Path) -> float:
    """`Bench.timm_train` in a spawned process, which has not run env.configure()."""
    return Bench(config.load(args.params, args.overrides), key, args).timm_train(folder)


def bench_params(args) -> tuple[config.Params, str]:
    """The params (ARGS.params with ARGS.overrides) and the variant key to bench: ARGS.variant, a key of the
    params' variants or a card ID (then benched as params would name it: `{ID: {model: ID}}`); default the first
    key. The overrides gain the card's entry, so every process of the call loads the same params."""
    params = config.load(args.params, args.overrides)
    if args.variant in variants.table() and args.variant not in params.variants:
        args.overrides.append(f"variants={{{args.variant}: {{model: {args.variant}}}}}")
        params = config.load(args.params, args.overrides)
    return params, args.variant or next(iter(params.variants))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--variant", default=None,
                    help="a key of the params' variants or a card ID, e.g. tf_efficientnet_b0 (default: the first key)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--epochs", type=int, default=3, help="effnet train and timm loop: epochs (the first is warm-up)")
    ap.add_argument("--warmup", type=int, default=3, help="model rows: steps not timed")
    ap.add_argument("--steps", type=int, default=20, help="model rows: steps timed")
    ap.add_argument("--rounds", type=int, default=3, help="effnet train runs, each between two ceiling steps")
    ap.add_argument("--workers", type=lambda v: [int(n) for n in v.split(",")], default=[],
                    help="also run effnet train with each of these data.num_workers, e.g. 0,1,2")
    ap.add_argument("--train-set", dest="train_sets", action="append", default=[], metavar="K=V[,K=V]",
                    help="also run effnet train with these overrides (repeatable), e.g. train.channels_last=false")
    ap.add_argument("--out", type=Path, default=Path("cpu_bench.json"))
    ap.add_argument("--dry-run", action="store_true", help="tiny data and model")
    args = ap.parse_args(argv)
    env.configure()
    if args.dry_run:
        args.overrides += ["variants={tiny: {phi: -6}}", "demo_data.classes=4", "demo_data.train_per_class=32",
                           "demo_data.val_per_class=8", "demo_data.image_size=48", "train.img_size=32",
                           "train.batch_size=16", "evaluate.batch_size=32"]
        args.epochs, args.warmup, args.steps, args.rounds = 2, 1, 2, 1
    params, key = bench_params(args)
    bench = Bench(params, key, args)
    info = dict(torch=torch.__version__, cpu=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                threads=torch.get_num_threads(), variant=bench.variant.name, img_size=bench.size, batch=bench.batch,
                workers=params.data.num_workers, epochs=args.epochs, dry_run=args.dry_run)
    print(json.dumps(info), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp)
        folder = demo_data.run(params.demo_data, ws / "demo").out
        shards = Path(shard.run(params.shard, folder, ws / "shards").out)
        (ws / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
        steps = {}  # (channels_last, bf16) -> img/s
        for cl, bf16 in itertools.product((False, True), repeat=2):
            steps[cl, bf16] = bench.model_train(cl, bf16)
            bench.record(step_row(cl, bf16), steps[cl, bf16])
        # The ceiling's layout: one window can mislead (the machine drifts +-10 %, and a b0 call once measured NCHW
        # above channels_last), so the two best are measured again and the mean of their two windows decides.
        top = sorted(steps, key=steps.get)[-2:]
        again = {lay: bench.model_train(*lay) for lay in top}
        layout = max(top, key=lambda lay: steps[lay] + again[lay])
        bench.record("loader alone (decode + augment, 1 process)", bench.loader_alone(shards, train=True))
        bench.record("loader alone, split held (augment only)", bench.loader_alone(shards, True, params.data.hold_mb))
        # This machine's speed drifts by +-10 % within a minute: each effnet run is compared with the ceiling's
        # step measured just before and just after it, and the median round is reported.
        rounds = []
        for _ in range(args.rounds):
            before = bench.model_train(*layout)
            rate, first = bench.effnet_train(shards, ws)
            rounds.append((rate / ((before + bench.model_train(*layout)) / 2), rate, first))
        ratio, rate, first = sorted(rounds)[len(rounds) // 2]
        ceiling = f"{step_row(*layout)}, around each effnet train run"
        bench.record(ceiling, rate / ratio, rounds=[round(r, 3) for r, *_ in rounds])
        bench.record("effnet train (steady state)", rate, ref=ceiling, first_step_s=first)
        for n in args.workers:  # what data.num_workers costs or gains, the rest as above
            rate, first = bench.effnet_train(shards, ws, f"data.num_workers={n}")
            bench.record(f"effnet train, data.num_workers={n}", rate, ref=ceiling, first_step_s=first)
        for sets in args.train_sets:  # e.g. train.channels_last=false: what a speed default gains
            rate, first = bench.effnet_train(shards, ws, *sets.split(","))
            bench.record(f"effnet train, {sets}", rate, ref=ceiling, first_step_s=first)
        # timm's loop as a timm user runs it: in a process of its own that never ran env.configure(), so with
        # glibc's malloc policy; and here, with effnet's (`env.keep_freed_memory`), for what that alone gives it.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            rate = pool.submit(timm_train_elsewhere, args, key, folder).result()
        bench.record(TIMM, rate, ref=ceiling)
        bench.record("timm loop, effnet's malloc policy", bench.timm_train(folder), ref=ceiling)
        for cl in (False, True):
            bench.record(f"model inference {'channels_last' if cl else 'NCHW'} fp32", bench.model_infer(cl))
        best_infer = max((r for r in bench.rows if r["what"].startswith("model inference")),
                         key=lambda r: r["img_s"])["what"]
        bench.record("eval loader alone (decode + resize, 1 process)", bench.loader_alone(shards, train=False))
        bench.record("effnet evaluate loop", bench.effnet_eval(shards), ref=best_infer)
        for what, sets in ((STAGE, ()),
                           ("effnet evaluate stage, data.hold_mb=0 (streamed)", ("data.hold_mb=0",))):
            rate, model_only, passes, sizes = bench.effnet_evaluate_stage(shards, ws / "trained", *sets)
            bench.record(f"model inference over the same passes ({what})", model_only)
            bench.record(what, rate, ref=f"model inference over the same passes ({what})", passes=passes, sizes=sizes)
        bench.record(EVAL_PREP, bench.eval_preprocessing_held(shards))
    by = {r["what"]: r["img_s"] for r in bench.rows}
    for r in bench.rows:
        r["ratio"] = round(r["img_s"] / by[r["ref"]], 3) if r["ref"] else None
    ratios = {"effnet train / ceiling": by["effnet train (steady state)"] / by[ceiling],
              "effnet train / timm loop": by["effnet train (steady state)"] / by[TIMM],
              "effnet train / timm loop with effnet's malloc policy": by["effnet train (steady state)"] / by[
                  "timm loop, effnet's malloc policy"],
              "evaluate loop / model inference": by["effnet evaluate loop"] / by[best_infer],
              "evaluate stage / model inference": by[STAGE] / by[f"model inference over the same passes ({STAGE})"]}
    # Where the cores are all the model's, the loader's CPU time adds to each step's: the best a training loop can
    # do is then both in turn. effnet train against that bound says what is left besides the loader's work.
    loader = by["loader alone, split held (augment only)"]
    ratios["effnet train / (ceiling step + loader, in turn)"] = by["effnet train (steady state)"] / in_turn(
        by[ceiling], loader)
    # What the goals can reach at all with this model on these cores: a step that fills every core, with the
    # loader's work spread evenly over them beside it; and the ceiling against timm's loop (no loop beats timm by
    # more unless it beats the ceiling).
    cores = info["threads"]
    ratios["bound: (ceiling step + loader over all cores) / ceiling"] = in_turn(by[ceiling], loader * cores) / by[
        ceiling]
    ratios["bound: ceiling / timm loop"] = by[ceiling] / by[TIMM]
    # The evaluate stage's bound likewise: its model-only passes with its resizing (each size once, so SIZES image
    # resizes per PASSES image passes) spread over every core; decoding, loading and per-shape warm-up left out.
    stage = next(r for r in bench.rows if r["what"] == STAGE)
    model_only = by[f"model inference over the same passes ({STAGE})"]
    resizing = by[EVAL_PREP] * cores * stage["passes"] / stage["sizes"]  # image passes' worth of resizing per second
    ratios["bound: evaluate stage (model-only passes + its resizing over all cores) / model inference"] = in_turn(
        model_only, resizing) / model_only
    ratios["evaluate loop / (inference + eval loader, in turn)"] = by["effnet evaluate loop"] / in_turn(
        by[best_infer], by["eval loader alone (decode + resize, 1 process)"])
    print(f"\n{'what':46} {'img/s':>8} {'ratio':>7}  vs")
    for r in bench.rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(f"{r['what']:46} {r['img_s']:8.1f} {ratio:>7}  {r['ref'] or ''}")
    print("\n" + "\n".join(f"{k}: {v:.2f}x" for k, v in ratios.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"env": info, "rows": bench.rows, "ratios": ratios}, indent=1))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
