"""The documentation's generated parts, each made from its one source, and the check that they are current.

  docs/variants.md            the model card's table       <- src/effnet/variants.yaml (`variants.records`)
  docs/reference/params.md    every params.yaml key        <- the pydantic config, src/effnet/config.py (type,
                                                              default, field docstring), and params.yaml's values
  docs/reference/commands.md  each command's --help        <- effnet's CLI parser, flows/serve.py, the Makefile
  docs/img/dag.png            the pipeline's stages        <- dvc.yaml with params.yaml (DVC's own graph)
  docs/img/<variant>_*.png    the committed run's figures  <- metrics/<variant>.json and plots/ (accuracy against
                                                              resolution, confusion matrix, and the training curves
                                                              where plots/train/<variant>.json exists)

A page's generated part sits between `<!-- gen:NAME -->` and `<!-- /gen:NAME -->`; the prose around it is written
by hand. A picture is stale when its pixels differ from a fresh rendering of its sources.

    python docs/gen.py             # write them all (make docs-gen)
    python docs/gen.py --check     # write nothing; exit 1 naming each stale page or picture (make test)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import types
from pathlib import Path
from typing import Annotated, Literal, Union, get_args, get_origin

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # flows/ for the serve command's --help

HELP_COLUMNS = "92"  # argparse wraps --help to the terminal: the page gets the same width everywhere


# ---- text --------------------------------------------------------------------------------------------------------

def _cell(text: str) -> str:
    """One table cell: on one line, pipes escaped (Python-Markdown's tables split on them), and outside code spans
    `<` too (`<key>` is not an HTML tag)."""
    parts = " ".join(str(text).split()).replace("|", "\\|").split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts))


def _table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    rule = ["---:" if i in right else "---" for i in range(len(headers))]
    lines = [headers, rule, *rows]
    return "\n".join("| " + " | ".join(_cell(c) for c in line) + " |" for line in lines)


def variants_table(root: Path) -> str:
    from effnet import variants
    records = variants.records()
    headers, rows = variants.cells(records)
    for row, record in zip(rows, records):
        row.append(f"`{record['timm']}`")
    numbers = {i for i, h in enumerate(headers) if h not in ("variant", "interp")}
    return _table(headers + ["timm checkpoint"], rows, right=numbers)


RECIPE_KEYS = {  # the card's recipe field -> the params key that sets it (null there: the card's value)
    "lr": "`train.lr` (null: this, scaled to the global batch)", "epochs": "`train.epochs`",
    "batch_size": "global batch: `train.batch_size` x world size x `train.accumulate_grad_batches`",
    "momentum": "the optimizer's (`train.opt`)", "weight_decay": "`train.weight_decay`",
    "rmsprop_decay": "RMSProp's decay (`train.opt: rmsproptf`)", "label_smoothing": "`train.label_smoothing`",
    "bn_momentum": "`train.bn_momentum` (TF terms)", "survival_prob": "`train.drop_path_rate` = 1 - this",
}


def recipe_table(root: Path) -> str:
    """The card's recipes side by side, one column per distinct recipe, with the params key for each field."""
    from effnet import variants
    groups: dict = {}
    for v in variants.table().values():
        groups.setdefault(v.recipe, []).append(v.name.removeprefix("tf_efficientnet_"))
    headers = ["recipe", *(", ".join(names) for names in groups.values()), "set by"]
    rows = [[field, *(f"{getattr(r, field):g}" for r in groups), RECIPE_KEYS[field]]
            for field in variants.Recipe.model_fields]
    return _table(headers, rows, right=set(range(1, len(groups) + 1)))


def _constraints(metadata) -> list[str]:
    marks = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    out = []
    for m in metadata:
        for attr, mark in marks.items():
            if getattr(m, attr, None) is not None:
                out.append(f"{mark} {getattr(m, attr)}")
        if getattr(m, "min_length", None):
            out.append(f"at least {m.min_length}")
    return out


def type_text(annotation, metadata=()) -> str:
    """A field's type as a reader says it: `int ≥ 16 or null`, `cpu or gpu`, `list of float > 0`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):  # a bound on an optional field bounds its value, not the null
        return " or ".join(type_text(a, () if a is type(None) else metadata) for a in args)
    if origin is Annotated:
        base, *extra = args
        return type_text(base, [m for e in extra for m in (getattr(e, "metadata", None) or [e])])
    if origin is Literal:
        return " or ".join(f"`{a}`" for a in args)
    if annotation is type(None):
        return "null"
    if origin is list:
        return f"list of {type_text(args[0])}" + "".join(f", {c}" for c in _constraints(metadata))
    if origin is tuple:
        return "[" + ", ".join(type_text(a) for a in args) + "]"
    if origin is dict:
        return f"mapping of {type_text(args[0])} to {type_text(args[1])}"
    name = getattr(annotation, "__name__", str(annotation))
    name = {"str": "string", "VariantSpec": "variant"}.get(name, name)
    bounds = _constraints(metadata)
    return f"{name} {', '.join(bounds)}" if bounds else name


def value_text(value) -> str:
    if isinstance(value, str):
        return f"`{value}`"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value)}`"


def _section_rows(prefix: str, model, set_values: dict) -> list[list[str]]:
    from pydantic_core import PydanticUndefined
    rows = []
    for name, field in model.model_fields.items():
        if not field.description:
            raise SystemExit(f"docs/gen.py: {model.__name__}.{name} has no docstring: say what {prefix}.{name} does")
        default = "required" if field.default is PydanticUndefined else value_text(field.default)
        given = value_text(set_values[name]) if name in set_values else ""
        rows.append([f"`{prefix}.{name}`", type_text(field.annotation, field.metadata), default, given,
                     field.description])
    return rows


def params_reference(root: Path) -> str:
    """One table per params.yaml section: key, type, default (the config's), the value params.yaml sets, meaning."""
    import yaml

    from effnet import config
    given = yaml.safe_load((root / "params.yaml").read_text())
    headers = ["key", "type", "default", "params.yaml", "description"]
    parts = []
    for section, field in config.Params.model_fields.items():
        parts.append(f"## {section}\n\n{_cell(field.description)}\n")
        if section in ("variants", "students"):
            keys = ", ".join(f"`{k}`" for k in given.get(section) or {}) or "none"
            parts.append(f"Each entry is `{section}.<key>: {{model: ...}}` or `{{phi: ...}}`"
                         + (", with `teacher: <variant key>`" if section == "students" else "")
                         + f"; params.yaml has {keys}.\n")
            rows = _section_rows(f"{section}.<key>", config.VariantSpec, {})
        else:
            rows = _section_rows(section, field.annotation, given.get(section) or {})
        parts.append(_table(headers, rows) + "\n")
    return "\n".join(parts).rstrip()


def commands_reference(root: Path) -> str:
    """Each `effnet` command's --help, the scheduled deployment's, and the Makefile's targets."""
    os.environ["COLUMNS"] = HELP_COLUMNS
    from effnet import cli
    from flows import serve

    top = cli.parser()
    commands = next(a for a in top._actions if a.choices and a.dest == "command").choices
    parts = ["## effnet\n", f"```text\n{top.format_help().rstrip()}\n```\n"]
    for name, sub in commands.items():
        parts += [f"## effnet {name}\n", f"```text\n{sub.format_help().rstrip()}\n```\n"]
    parts += ["## python flows/serve.py\n", f"```text\n{serve.parser().format_help().rstrip()}\n```\n"]
    targets = re.findall(r"^([a-z-]+):.*?##\s*(.+)$", (root / "Makefile").read_text(), re.M)
    parts += ["## make\n", _table(["target", "what it does"], [[f"`make {t}`", doc] for t, doc in targets])]
    return "\n".join(parts)


def run_figures_table(root: Path) -> str:
    """The committed run, per variant: top-1 of each model at each swept resolution (the published candidate in
    bold), what FixRes chose and what was published, the machine that measured it, and its pictures; from
    metrics/ and plots/."""
    import yaml
    parts = []
    for key in yaml.safe_load((root / "params.yaml").read_text())["variants"]:
        sweep, metrics = root / f"plots/{key}_resolution.json", root / f"metrics/{key}.json"
        if not (sweep.exists() and metrics.exists()):
            parts.append(f"`{key}`: no committed run (metrics/{key}.json, plots/{key}_resolution.json).")
            continue
        rows, measured = json.loads(sweep.read_text()), json.loads(metrics.read_text())
        selected = measured["selected"]
        labels = [label for label in rows[0] if label != "resolution"]
        at = {(label, r["resolution"]): r[label] for r in rows for label in labels}

        def cell(label, size):
            return f"**{at[label, size]}**" if (label, size) == (selected["model"], selected["resolution"]) \
                else f"{at[label, size]}"
        sizes = [r["resolution"] for r in rows]
        table = _table(["model", *(f"{size} px" for size in sizes)],
                       [[f"`{label}`", *(cell(label, size) for size in sizes)] for label in labels],
                       right=set(range(1, len(sizes) + 1)))
        own = sorted(int(r.removeprefix("res")) for r in measured[labels[0]])  # train's, then FixRes's (larger)
        trained, chosen = own[0], own[-1]
        split = "test" if "test_top1" in selected else "val"
        machine = measured.get("machine")
        text = [f"`{key}`, top-1 (%) on val at each test resolution:", table,
                f"FixRes chose {chosen} px on the held-out training images: there it scores "
                f"{at['fixres', chosen]} % where the trained model scores {at['trained', chosen]} %; the trained "
                f"model at its own {trained} px scores {at['trained', trained]} %. `evaluate` selected "
                f"**{selected['model']} at {selected['resolution']} px** ({selected[f'{split}_top1']} % on {split}), "
                "and that is the version `register` published. "
                + (f"Measured on: {machine}." if machine else f"metrics/{key}.json does not name its machine.")]
        text += [f"![{key}: {what}](img/{key}_{name}.png)" for name, what in
                 (("resolution", "top-1 against test resolution"), ("confusion", "confusion matrix"),
                  ("train", "training curves")) if f"{key}_{name}.png" in run_figures(root)]
        parts.append("\n\n".join(text))
    return "\n\n".join(parts)


BLOCKS = {  # page -> {block name: maker}
    "quickstart.md": {"demo": run_figures_table},
    "variants.md": {"card": variants_table, "recipe": recipe_table},
    "reference/params.md": {"params": params_reference},
    "reference/commands.md": {"commands": commands_reference},
}


def render_page(text: str, makers: dict, root: Path, page: str) -> str:
    for name, make in makers.items():
        pattern = re.compile(rf"(<!-- gen:{name} -->\n).*?(<!-- /gen:{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"docs/{page}: no <!-- gen:{name} --> ... <!-- /gen:{name} --> block")
        text = pattern.sub(lambda m: m[1] + make(root) + "\n" + m[2], text)
    return text


# ---- pictures ----------------------------------------------------------------------------------------------------

def dag_png(root: Path, path: Path) -> None:
    """dvc.yaml's stages as DVC resolves them with params.yaml: a box a stage, with what it writes, dependencies
    above; an arrow from each stage to every stage that reads its outputs, along the boxes' left edges."""
    import networkx as nx
    from dvc.repo import Repo

    from effnet.plots import _pyplot
    with Repo(str(root)) as repo:
        graph = repo.index.graph.reverse()  # DVC's edges run from a stage to what it depends on
        names = {stage: stage.name for stage in graph}
        outs = {stage: [o.def_path for o in stage.outs] for stage in graph}
    levels = list(nx.topological_generations(graph))
    column = 5.5  # stages of one level (several variants) side by side
    where = {stage: (x * column, -1.2 * y) for y, level in enumerate(levels)
             for x, stage in enumerate(sorted(level, key=names.get))}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(2.2 + 3.3 * max(map(len, levels)), 1.0 + 0.95 * len(levels)))
    for stage, (x, y) in where.items():
        ax.text(x + 0.25, y, names[stage], ha="left", va="bottom", fontsize=9, fontweight="bold")
        ax.text(x + 0.25, y - 0.05, "\n".join(outs[stage]), ha="left", va="top", fontsize=7, color="#333333",
                linespacing=1.3)
        ax.plot([x], [y], marker="o", color="#4a6fa5", markersize=6)
    for a, b in graph.edges:
        (xa, ya), (xb, yb) = where[a], where[b]
        ax.annotate("", xy=(xb, yb + 0.08), xytext=(xa, ya - 0.08),
                    arrowprops=dict(arrowstyle="-|>", color="#4a6fa5", shrinkA=2, shrinkB=2, lw=1,
                                    connectionstyle="arc3,rad=0" if ya - yb < 1.5 else "arc3,rad=0.35"))
    ax.set(xlim=(-1.3, column * (max(map(len, levels)) - 1) + 4.5), ylim=(-1.2 * len(levels) + 0.6, 0.5))
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_figures(root: Path) -> dict[str, callable]:
    """The committed run's pictures, by file name under docs/img: a maker writing each to a given path."""
    import yaml

    from effnet import plots
    figures = {"dag.png": lambda path: dag_png(root, path)}
    for key in yaml.safe_load((root / "params.yaml").read_text())["variants"]:
        sweep, confusion = root / f"plots/{key}_resolution.json", root / f"plots/confusion/{key}.json"
        metrics, curves = root / f"metrics/{key}.json", root / f"plots/train/{key}.json"
        if sweep.exists():
            figures[f"{key}_resolution.png"] = lambda path, sweep=sweep, key=key: plots.resolution_png(
                json.loads(sweep.read_text()), ["trained", "fixres"], f"{key}: val top-1 against test resolution",
                path)
        if confusion.exists() and metrics.exists():
            figures[f"{key}_confusion.png"] = lambda path, confusion=confusion, metrics=metrics, key=key: (
                _confusion(json.loads(confusion.read_text()), json.loads(metrics.read_text()), key, path))
        if curves.exists():
            figures[f"{key}_train.png"] = lambda path, curves=curves, key=key: plots.curves_png(
                json.loads(curves.read_text()), f"{key}: training curves", path)
    return figures


def _confusion(rows: list[dict], metrics: dict, key: str, path: Path) -> None:
    """The published candidate's confusion matrix from DVC's rows (one per image: actual, predicted)."""
    from effnet import plots
    classes = sorted({r["actual"] for r in rows} | {r["predicted"] for r in rows})
    index = {c: i for i, c in enumerate(classes)}
    matrix = [[0] * len(classes) for _ in classes]
    for r in rows:
        matrix[index[r["actual"]]][index[r["predicted"]]] += 1
    selected = metrics["selected"]
    split = "test" if "test_top1" in selected else "val"
    title = f"{key}: {selected['model']} at {selected['resolution']} px, {len(rows)} {split} images"
    plots.confusion_png(matrix, classes, title, path)


def same_pixels(a: Path, b: Path) -> bool:
    import numpy as np
    from PIL import Image
    with Image.open(a) as x, Image.open(b) as y:
        return x.size == y.size and np.array_equal(np.asarray(x.convert("RGBA")), np.asarray(y.convert("RGBA")))


# ---- the two modes -----------------------------------------------------------------------------------------------

def stale(root: Path, write: bool) -> list[str]:
    """The generated pages and pictures under ROOT/docs that differ from their sources; with WRITE, rewritten."""
    docs, found = root / "docs", []
    for page, makers in BLOCKS.items():
        text = (docs / page).read_text()
        fresh = render_page(text, makers, root, page)
        if fresh != text:
            found.append(f"docs/{page}")
            if write:
                (docs / page).write_text(fresh)
    (docs / "img").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in run_figures(root).items():
            fresh, committed = Path(tmp) / name, docs / "img" / name
            make(fresh)
            if not committed.exists() or not same_pixels(fresh, committed):
                found.append(f"docs/img/{name}")
                if write:
                    os.replace(fresh, committed)
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 naming what is stale")
    ap.add_argument("--root", type=Path, default=REPO, help="the workspace whose sources and docs/ to use")
    args = ap.parse_args(argv)
    from effnet import env
    env.configure()
    found = stale(args.root.resolve(), write=not args.check)
    if args.check and found:
        print("docs/gen.py: stale (run `make docs-gen`): " + ", ".join(found), file=sys.stderr)
        return 1
    for path in found:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
