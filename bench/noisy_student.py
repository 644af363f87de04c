"""Noisy Student measured: teacher -> student 1 -> student 2 on a semi-supervised split, top-1 on the same val/test.

For each dataset (scikit-learn's digits, the demo shapes), `demo-data` keeps --labeled of each class's training
images labeled and moves the rest to unlabeled/; the shards hold both. Then, with the repo's params.yaml and the
overrides below, in a workspace of its own (its MLflow store), the stages run as the pipeline runs them:
teacher (a variant): train, evaluate, register; each student: pseudolabel (its teacher's published model), train
on the labeled + pseudo-labeled mix, evaluate, register. FixRes is left out (it applies alike to all three). All
three models are the same size (phi -4; a student may be larger). Prints one table per dataset and writes --out.

  python bench/noisy_student.py --datasets digits shapes --epochs 4 --teacher-epochs 40
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance  # noqa: E402

from effnet import config, env  # noqa: E402
from effnet.stages import demo_data, evaluate, pseudolabel, register, shard, train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEYS = ["teacher", "student1", "student2"]
SIZES = {"digits": dict(image=32, train=32), "shapes": dict(image=96, train=64)}


def overrides(dataset: str, args) -> list[str]:
    size = SIZES[dataset]
    return [
        f"variants={{teacher: {{phi: {args.phi}}}}}",
        f"students={{student1: {{phi: {args.phi}, teacher: teacher}}, student2: {{phi: {args.phi}, teacher: student1}}}}",
        f"demo_data.dataset={dataset}", f"demo_data.labeled={args.labeled}", f"demo_data.image_size={size['image']}",
        f"train.img_size={size['train']}", f"train.batch_size={args.batch_size}", "train.progress_bar=false",
        "train.checkpoint_every_n_steps=null", "train.lr=0.01", "data.holdout=0", f"student.ratio={args.ratio}",
        f"pseudolabel.threshold={args.threshold}", *args.set,
    ]


def run_dataset(dataset: str, args, root: Path) -> list[dict]:
    ws = root / dataset
    ws.mkdir(parents=True, exist_ok=True)
    os.chdir(ws)
    params = config.load(REPO / "params.yaml", overrides(dataset, args))
    data = demo_data.run(params.demo_data, ws / "data/demo")
    shards = Path(shard.run(params.shard, data.out, ws / "data/shards").out)
    rows = []
    for key in KEYS:
        epochs = args.teacher_epochs if key == "teacher" else args.epochs
        p = params.model_copy(update={"train": params.train.model_copy(update={"epochs": epochs})})
        pseudo, info = None, {}
        if key == "teacher" and args.keep_teacher and (ws / "models/teacher/registered.json").is_file():
            metrics = json.loads((ws / "metrics/teacher.json").read_text())["selected"]
            rows.append({"model": key, "iteration": 0, "epochs": epochs, "steps": None, "kept": True,
                         "val_top1": metrics["val_top1"], "test_top1": metrics.get("test_top1"),
                         "pseudo_kept": None, "pseudo_samples": None})
            continue
        if key in p.students:
            teacher = p.students[key].teacher
            pseudo = ws / "pseudo" / key
            pseudolabel.run(p, key, shards, ws / "models" / teacher, ws / f"metrics/{teacher}.json", pseudo)
            info = json.loads((pseudo / "pseudolabel.json").read_text())
        trained = train.run(p, key, shards, ws / f"models/{key}/trained", pseudo=pseudo)
        bundles = {"trained": ws / f"models/{key}/trained"}
        metrics = evaluate.run(p, key, shards, bundles, ws / f"metrics/{key}.json", ws / f"plots/{key}.json",
                               ws / f"plots/confusion/{key}.json").metrics["selected"]
        register.run(p, key, ws / f"metrics/{key}.json", bundles, ws / f"models/{key}/registered.json",
                     shards=shards, plot=ws / f"plots/{key}.json")
        rows.append({"model": key, "iteration": len(p.teachers(key)), "epochs": epochs, "steps": trained.steps,
                     "val_top1": metrics["val_top1"], "test_top1": metrics.get("test_top1"),
                     "pseudo_kept": info.get("kept"), "pseudo_samples": info.get("samples")})
    counts = data.counts
    print(f"\n{dataset}: {counts['train']} labeled, {counts.get('unlabeled', 0)} unlabeled, val/test as shard made "
          f"them; phi {args.phi}, batch {args.batch_size}, ratio {args.ratio:g}, threshold {args.threshold:g}")
    print(f"{'model':10} {'iter':>4} {'epochs':>6} {'steps':>6} {'val top-1':>10} {'test top-1':>11} {'pseudo':>7}")
    for r in rows:
        test = "-" if r["test_top1"] is None else f"{r['test_top1']:.2f}"
        print(f"{r['model']:10} {r['iteration']:4} {r['epochs']:6} {r['steps'] or '-':>6} {r['val_top1']:10.2f} {test:>11} "
              f"{r['pseudo_kept'] or '-':>7}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["digits", "shapes"], choices=list(SIZES))
    ap.add_argument("--labeled", type=float, default=0.1, help="share of each class's train images kept labeled")
    ap.add_argument("--phi", type=float, default=-4)
    ap.add_argument("--epochs", type=int, default=4, help="each student's epochs (a pass over the larger set)")
    ap.add_argument("--teacher-epochs", type=int, default=40, help="the teacher's (passes over the labeled images)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--ratio", type=float, default=3.0)
    ap.add_argument("--threshold", type=float, default=0.3)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="more overrides")
    ap.add_argument("--keep-teacher", action="store_true",
                    help="with --workdir: a teacher trained there before is kept (the students are trained again)")
    ap.add_argument("--workdir", type=Path, help="keep the workspaces here (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/noisy_student.json")
    ap.add_argument("--dry-run", action="store_true", help="digits, one epoch each: the bench's own logic")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.datasets, args.epochs, args.teacher_epochs, args.threshold = ["digits"], 1, 1, 0.0
    env.configure()
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    out = args.out.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        root = (args.workdir or Path(tmp)).resolve()
        results = {dataset: run_dataset(dataset, args, root) for dataset in args.datasets}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**provenance(), "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
