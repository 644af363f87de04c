"""The pseudolabel stage's labeling rate against model-only inference of the same model on the same images.

Writes the demo data with a labeled share (the rest unlabeled), shards it, builds the variant's model at the given
resolution, and measures in one call, in turn (REPEAT times, the best of each kept):
  model only   the model's forward (inference mode, channels_last, as the stage runs it) over the unlabeled images
               decoded and preprocessed beforehand, in batches of pseudolabel.batch_size;
  pseudolabel  `pseudolabel.label`: reading the unlabeled shards, decoding, preprocessing and the same forward,
               through the configured data path (data.num_workers loader workers).
  data alone   reading, decoding and preprocessing in one process, no model: with the model-only rate, the bound
               a CPU puts on the ratio, where the data work takes the model's cores (perfect packing).
The goal is >= 0.9x. Prints the table and writes --out (JSON) with the date, machine and command.

  python bench/pseudolabel_bench.py --phi -4 --img-size 64 --images 2000
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_rates, provenance  # noqa: E402

from effnet import config, env, models  # noqa: E402
from effnet.data import transforms  # noqa: E402
from effnet.data.loaders import eval_loader  # noqa: E402
from effnet.stages import demo_data, pseudolabel, shard  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phi", type=float, default=-4, help="compound scaling of the model (the demo's -4)")
    ap.add_argument("--img-size", type=int, default=64, help="the teacher's resolution")
    ap.add_argument("--images", type=int, default=2000, help="unlabeled images (about)")
    ap.add_argument("--workers", type=int, default=None, help="data.num_workers (default: params')")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/pseudolabel_bench.json")
    ap.add_argument("--dry-run", action="store_true", help="a few images, once: the bench's own logic")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.images, args.repeat = 40, 1
    env.configure()
    torch.manual_seed(0)
    sets = [f"data.num_workers={args.workers}"] if args.workers is not None else []
    params = config.load(REPO / "params.yaml", sets)
    per_class = max(2, args.images // params.demo_data.classes + 1)
    demo = params.demo_data.model_copy(update={"train_per_class": per_class, "val_per_class": 2,
                                               "labeled": 1 / per_class})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = Path(shard.run(params.shard, demo_data.run(demo, tmp / "demo").out, tmp / "shards").out)
        variant = config.VariantSpec(phi=args.phi).resolve()
        classes = json.loads((shards / "manifest.json").read_text())["classes"]
        model = models.build(variant, len(classes)).eval()
        spec = models.ModelSpec(variant="bench", phi=args.phi, classes=classes,
                                preprocessing=models.preprocessing(model, variant, args.img_size))
        teacher = pseudolabel.Teacher("bench", model, spec, {"model": "trained", "resolution": args.img_size}, {})
        pre = spec.preprocessing
        batch = params.pseudolabel.batch_size
        decoded = [x for x, _, _ in eval_loader(shards, transforms.eval_transform(pre), batch, 0, "unlabeled")]
        n = sum(len(x) for x in decoded)
        model.to(memory_format=torch.channels_last)

        @torch.inference_mode()
        def model_only() -> float:
            start = time.perf_counter()
            for x in decoded:
                model(x.contiguous(memory_format=torch.channels_last)).softmax(dim=1)
            return n / (time.perf_counter() - start)

        def data_alone() -> float:
            start = time.perf_counter()
            images = sum(len(x) for x, _, _ in eval_loader(shards, transforms.eval_transform(pre, uint8=True), batch,
                                                          0, "unlabeled"))
            return images / (time.perf_counter() - start)

        def stage() -> float:
            labels = pseudolabel.label(params, teacher, shards)
            return len(labels.keys) / labels.seconds

        model_only()  # warm-up: the first forward allocates
        rates = {"model only": 0.0, "pseudolabel": 0.0, "data alone (read, decode, preprocess; 1 process)": 0.0}
        for _ in range(args.repeat):  # in turn, so that a noisy neighbour costs all alike
            for name, measure in zip(rates, (model_only, stage, data_alone)):
                rates[name] = max(rates[name], measure())
    print_rates(f"pseudolabel vs model-only inference: phi {args.phi:g} at {args.img_size} px, {n} images, batch "
                f"{batch}, {params.data.num_workers} loader workers", list(rates.items()), "model only")
    ratio = rates["pseudolabel"] / rates["model only"]
    # Where the data work shares the model's cores (a CPU), even perfect packing costs its CPU time: the model's
    # all-core time per image plus the data's one-core time, over the cores.
    cores = len(os.sched_getaffinity(0))
    model_rate, data_rate = rates["model only"], list(rates.values())[2]
    bound = 1 / (1 + model_rate / (cores * data_rate))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**provenance(), "images": n, "img_size": args.img_size, "phi": args.phi,
                                    "rates": rates, "ratio": round(ratio, 3), "cpu_bound": round(bound, 3)},
                                   indent=1) + "\n")
    print(f"ratio {ratio:.2f} (goal >= 0.9); bound where the data work shares the model's {cores} cores: {bound:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
