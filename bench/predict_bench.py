"""`effnet predict` against timm's own inference loop on the same folder and model, on the CPU, in one call: img/s
of each, their ratio, and how often their top-1 agree.

timm's loop is its inference.py's: `create_model`, `resolve_data_config`, `create_dataset` + `create_loader` (its
prefetcher normalising uint8 batches), a `no_grad` loop with top-k. Both get the same weights (a b0 with random
weights calibrated to predict like a trained one, `models.calibrate`, saved as a bundle), the same loader workers
and intra-op threads, and are timed end to end (model load, listing, decoding, inference; ours also writes its CSV).
Each runs `--rounds` times, alternating; the best round counts (the first reads the JPEGs from disk).

    nice -n 19 .venv/bin/python bench/predict_bench.py --images 256
    .venv/bin/python bench/predict_bench.py --dry-run    # seconds: tiny images and model, checks the harness
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import timm
import torch
from safetensors.torch import load_file
from timm.data import create_dataset, create_loader, resolve_data_config

sys.path.insert(0, str(Path(__file__).parent))
from common import make_image_folder, print_rates  # noqa: E402

from effnet import env, models, onnx_export, variants  # noqa: E402
from effnet.config import PredictConfig  # noqa: E402
from effnet.stages import predict  # noqa: E402


def make_bundle(name: str, out: Path, img_size: int | None) -> Path:
    variant = variants.resolve(name, None)
    torch.manual_seed(0)
    model = models.build(variant, 1000)
    spec = models.ModelSpec(variant=name, model=name, classes=[f"class{i}" for i in range(1000)],
                            preprocessing=models.preprocessing(model, variant, img_size))
    size = spec.img_size
    batches = [onnx_export.normalised(spec, onnx_export.synthetic(8, size, seed)) for seed in range(3)]
    models.save_bundle(models.calibrate(model, batches), spec, out)
    return out


def ours(bundle: Path, folder: Path, out: Path, batch: int, workers: int) -> tuple[float, dict[str, str]]:
    start = time.perf_counter()
    predict.run(PredictConfig(batch_size=batch, num_workers=workers, topk=5, device="cpu"), str(bundle), folder, out)
    seconds = time.perf_counter() - start
    rows = pd.read_csv(out)
    return seconds, dict(zip(rows["path"], rows["class_1"]))


def timms(name: str, bundle: Path, folder: Path, batch: int, workers: int, img_size: int | None
          ) -> tuple[float, dict[str, str]]:
    """timm's inference.py, reduced to what it does for this model and folder."""
    start = time.perf_counter()
    model = timm.create_model(name, num_classes=1000)
    model.load_state_dict(load_file(str(bundle / "model.safetensors")))
    model.eval()
    config = resolve_data_config({"img_size": img_size} if img_size else {}, model=model)
    dataset = create_dataset("", root=str(folder))
    loader = create_loader(dataset, batch_size=batch, use_prefetcher=True, num_workers=workers,
                           device=torch.device("cpu"), **config)
    top1 = []
    with torch.no_grad():
        for x, _ in loader:
            top1 += model(x).topk(5)[1][:, 0].tolist()
    seconds = time.perf_counter() - start
    names = [dataset.filename(i, absolute=True) for i in range(len(dataset))]
    classes = models.load_bundle(bundle)[1].classes
    return seconds, {str(n): classes[c] for n, c in zip(names, top1)}


def check_same_preprocessing(name: str, bundle: Path, img_size: int | None) -> None:
    """The comparison is only fair if timm resolves the preprocessing the bundle publishes."""
    pre = models.load_bundle(bundle)[1].preprocessing
    config = resolve_data_config({"img_size": img_size} if img_size else {},
                                 model=timm.create_model(name, pretrained=False, num_classes=1000))
    theirs = (config["input_size"][-1], config["crop_pct"], config["interpolation"], config["mean"], config["std"])
    assert theirs == (pre.img_size, pre.crop_pct, pre.interpolation, pre.mean, pre.std), (theirs, pre)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--model", default="tf_efficientnet_b0")
    ap.add_argument("--img-size", type=int, help="default: the model's own")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, help="torch intra-op threads for both (default: torch's)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dry-run", action="store_true", help="16 small images at 64 px, one round")
    args = ap.parse_args()
    if args.dry_run:
        args.images, args.img_size, args.batch, args.rounds, args.workers = 16, 64, 8, 1, 1
    env.configure()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        size = (96, 72) if args.dry_run else (500, 375)
        folder = make_image_folder(tmp / "images", args.images, size=size) / "train"
        bundle = make_bundle(args.model, tmp / "bundle", args.img_size)
        check_same_preprocessing(args.model, bundle, args.img_size)
        best = {"timm": 0.0, "effnet": 0.0}
        for _ in range(args.rounds):
            seconds, theirs = timms(args.model, bundle, folder, args.batch, args.workers, args.img_size)
            best["timm"] = max(best["timm"], args.images / seconds)
            seconds, mine = ours(bundle, folder, tmp / "rows.csv", args.batch, args.workers)
            best["effnet"] = max(best["effnet"], args.images / seconds)
        assert sorted(theirs) == sorted(mine), "both saw the same files"
        agree = sum(theirs[k] == mine[k] for k in theirs) / len(theirs)
        pre = models.load_bundle(bundle)[1].preprocessing
        print_rates(f"{args.model} at {pre.img_size} px, {args.images} JPEGs {size[0]}x{size[1]}, batch {args.batch}, "
                    f"{args.workers} loader workers, {torch.get_num_threads()} intra-op threads, CPU, best of "
                    f"{args.rounds}", [("timm inference loop", best["timm"]), ("effnet predict", best["effnet"])],
                    "timm")
        print(f"top-1 agreement: {agree:.2%} of {len(theirs)} images")


if __name__ == "__main__":
    main()
