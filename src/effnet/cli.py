"""`effnet <stage>`: parse arguments, load params.yaml (plus --set overrides), call the stage function.

Errors a user can fix (bad params, missing paths) print as one line, `effnet: error: ...`, with exit status 2.

With $EFFNET_LAUNCHER set (a command prefix: `srun ...`, `torchrun --no-python ...`, a script that submits a job),
`effnet train` checks its params, then hands itself to that launcher, which runs it on every node, and waits for
it: how a scheduler that runs the stage on one machine (DVC, the Prefect flow) trains on many.
"""
from __future__ import annotations

import argparse
import errno
import os
import shlex
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel

from effnet import env
from effnet.errors import EffnetError

PARAMS = "params.yaml"
MODEL_FORMS = "a bundle folder, models:/<name>@<alias>, models:/<name>/<version> or runs:/<run_id>/model"
PREDICT_FLAGS = {"--topk": "topk", "--batch-size": "batch_size", "--workers": "num_workers", "--device": "device"}


def _common(p: argparse.ArgumentParser, variant: bool = False) -> None:
    p.add_argument("--params", default=PARAMS, help=f"params file (default: {PARAMS})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one param (repeatable), e.g. --set train.epochs=3")
    if variant:
        p.add_argument("--variant", required=True, help="a key of `variants:` (or `students:`) in params")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="effnet", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="write the procedural demo ImageFolder")
    p.add_argument("out", type=Path)
    _common(p)
    p = sub.add_parser("shard", help="ImageFolder or CSV/TSV list -> webdataset shards + manifest")
    p.add_argument("src", type=Path)
    p.add_argument("out", help="output folder or fsspec URL (s3://, gs://, file://, memory://)")
    _common(p)
    p = sub.add_parser("train", help="train a variant on the shards")
    p.add_argument("shards", help="shards folder or fsspec URL")
    p.add_argument("out", type=Path, help="model bundle folder to write")
    p.add_argument("--curves", type=Path, help="also write the per-epoch training curves (JSON rows for dvc plots)")
    p.add_argument("--pseudo", type=Path, help="a student's pseudo-labels: `effnet pseudolabel`'s output folder")
    _common(p, variant=True)
    p = sub.add_parser("pseudolabel", help="a student's teacher labels the unlabeled shards (Noisy Student)")
    p.add_argument("shards", help="shards folder or fsspec URL (with an unlabeled split)")
    p.add_argument("teacher", type=Path, help="the teacher's models folder (its bundles and registered.json)")
    p.add_argument("metrics", type=Path, help="the teacher's evaluate metrics JSON (which model it published)")
    p.add_argument("out", type=Path, help="the folder to write: labels.parquet and pseudolabel.json")
    _common(p, variant=True)
    p = sub.add_parser("fixres", help="FixRes fine-tune a trained bundle at a larger resolution")
    p.add_argument("shards", help="shards folder or fsspec URL")
    p.add_argument("trained", type=Path)
    p.add_argument("out", type=Path)
    _common(p, variant=True)
    p = sub.add_parser("evaluate", help="top-1/top-5 of model bundles at each one's resolution")
    p.add_argument("shards", help="shards folder or fsspec URL")
    p.add_argument("bundles", nargs="+", metavar="LABEL=BUNDLE", help="e.g. trained=models/x/trained")
    p.add_argument("--out", type=Path, required=True, help="metrics JSON to write")
    _common(p, variant=True)
    p = sub.add_parser("register", help="publish the candidate evaluate selected to the MLflow Model Registry")
    p.add_argument("metrics", type=Path, help="evaluate's metrics JSON (its `selected` entry names the candidate)")
    p.add_argument("out", type=Path, help="registration record (JSON) to write")
    p.add_argument("bundles", nargs="+", metavar="LABEL=BUNDLE", help="the bundles evaluate measured, by label")
    p.add_argument("--shards", help="shards folder/URL: the data fingerprints promotion compares on")
    p.add_argument("--plot", type=Path, help="evaluate's sweep rows: the model card's candidate table")
    _common(p, variant=True)
    p = sub.add_parser("predict", help="top-k classes per image: a folder, CSV/TSV of paths, image file or shards")
    p.add_argument("model", help=f"the model: {MODEL_FORMS}")
    p.add_argument("source", help="a folder (recursive), a CSV/TSV with a path column, an image file, or shards")
    p.add_argument("--out", type=Path, help="rows to write: .csv, .tsv, .jsonl or .parquet (default: standard output)")
    p.add_argument("--format", choices=["csv", "tsv", "jsonl", "parquet"], help="instead of the --out suffix")
    for flag, key in PREDICT_FLAGS.items():
        p.add_argument(flag, dest=key, metavar="DEVICE" if key == "device" else "N",
                       help=f"sets predict.{key} (else from params, else its default)")
    _common(p)
    p = sub.add_parser("export", help="a model to ONNX, parity-checked against PyTorch (onnxruntime)")
    p.add_argument("model", help=f"the model: {MODEL_FORMS}")
    p.add_argument("out", type=Path, help="the .onnx file to write")
    p.add_argument("--images", help="parity-check on these images (any predict source); default: noise images")
    _common(p)
    p = sub.add_parser("variants", help="the model card as a table")
    p.add_argument("--json", action="store_true", help="print a JSON list instead")
    p.add_argument("--flops", action="store_true", help="add FLOPs measured on the built model")
    p.add_argument("--phi", type=float, action="append", help="show the compound-scaled variant for PHI")
    return ap


def _predict_overrides(args: argparse.Namespace) -> list[str]:
    """--topk 3 & co are --set predict.topk=3: the same checks, and they win over params."""
    return args.overrides + [f"predict.{key}={getattr(args, key)}" for key in PREDICT_FLAGS.values()
                             if getattr(args, key) is not None]


def _labelled(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep:
            raise EffnetError(f"expected LABEL=BUNDLE, got {item!r}")
        out[label] = Path(path)
    return out


def dispatch(args: argparse.Namespace) -> object:
    # Stage modules import torch & co: import them only for the command that runs.
    if args.command == "variants":
        from effnet import variants
        measure = None
        if args.flops or args.phi:  # compound rows need the built model's size; the table knows no model code
            from effnet.models import measure
        return variants.show(args.phi or [], as_json=args.json, measure=measure, measure_flops=args.flops)

    from effnet import config
    if args.command in ("predict", "export"):  # also outside a workspace: params.yaml when there, else defaults
        default = args.params == PARAMS
        if args.command == "predict":
            from effnet.stages import predict
            cfg = config.load_section("predict", args.params, _predict_overrides(args), optional=default)
            return predict.run(cfg, args.model, args.source, args.out, args.format)
        from effnet.stages import export
        cfg = config.load_section("export", args.params, args.overrides, optional=default)
        return export.run(cfg, args.model, args.out, args.images)
    params = config.load(args.params, args.overrides)
    if hasattr(args, "variant"):
        params.variant(args.variant)  # unknown key -> error before any work
    if args.command == "demo-data":
        from effnet.stages import demo_data
        return demo_data.run(params.demo_data, args.out)
    if args.command == "shard":
        from effnet.stages import shard
        return shard.run(params.shard, args.src, args.out)
    if args.command == "train":
        from effnet.stages import train
        return train.run(params, args.variant, args.shards, args.out, args.curves, args.pseudo)
    if args.command == "pseudolabel":
        from effnet.stages import pseudolabel
        return pseudolabel.run(params, args.variant, args.shards, args.teacher, args.metrics, args.out)
    if args.command == "fixres":
        from effnet.stages import fixres
        return fixres.run(params, args.variant, args.shards, args.trained, args.out)
    if args.command == "evaluate":
        from effnet.stages import evaluate
        return evaluate.run(params, args.variant, args.shards, _labelled(args.bundles), args.out)
    if args.command == "register":
        from effnet.stages import register
        return register.run(params, args.variant, args.metrics, _labelled(args.bundles), args.out,
                            shards=args.shards, plot=args.plot)
    raise AssertionError(args.command)


def fault_line(e: BaseException) -> str | None:
    """One line for a fault of the machine rather than of the code: a disk (or quota) full, naming the file."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{e.filename or 'a file'}: {os.strerror(e.errno).lower()}"
    return None


LAUNCHER_ENV = "EFFNET_LAUNCHER"


def launch(launcher: str, args: argparse.Namespace, argv: list[str]) -> int:
    """Run `python -m effnet ARGV` through LAUNCHER (its processes do not launch again) once the params are known to
    be good; its exit status is this command's."""
    from effnet import config
    config.load(args.params, args.overrides).variant(args.variant)  # bad params: fail here, not on N nodes
    environ = {k: v for k, v in os.environ.items() if k != LAUNCHER_ENV}
    return subprocess.call([*shlex.split(launcher), sys.executable, "-m", "effnet", *argv], env=environ)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    env.configure()
    launcher = os.environ.get(LAUNCHER_ENV)
    try:
        if launcher and args.command == "train":
            return launch(launcher, args, argv)
        result = dispatch(args)
    except EffnetError as e:
        print(f"effnet: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # `effnet predict ... | head`: the reader has gone, as with any Unix tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:  # a fault of the machine or a service (disk full, the MLflow store gone): one line
        from effnet import tracking
        if (line := fault_line(e) or tracking.store_failure(e)) is None:
            raise
        print(f"effnet: error: {line}", file=sys.stderr)
        return 2
    if isinstance(result, BaseModel):  # predict's rows may be on stdout: its summary goes to stderr
        print(result.model_dump_json(indent=2), file=sys.stderr if args.command == "predict" else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
