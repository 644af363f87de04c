"""The model card as data (variants.yaml) and the card's compound scaling as code.

A variant is either a row of the card (`tf_efficientnet_b0` ... `tf_efficientnet_l2_ns_475`) or a compound-scaled
EfficientNet given by `phi` (width 1.1^phi, depth 1.2^phi, resolution 224 * 1.15^phi, the card's method):
phi = 0 is B0's architecture, negative phi gives the tiny models the demo and the tests train on a CPU.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import cache
from importlib import resources

import yaml
from pydantic import BaseModel, ConfigDict

from effnet.errors import EffnetError

# Compound-scaling coefficients of the paper: depth alpha, width beta, resolution gamma.
ALPHA, BETA, GAMMA = 1.2, 1.1, 1.15
BASE_RESOLUTION = 224


class Recipe(BaseModel):
    """The card's training recipe (TF terms: bn_momentum 0.99 is PyTorch momentum 0.01)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    lr: float
    epochs: int
    batch_size: int
    momentum: float
    weight_decay: float
    rmsprop_decay: float
    label_smoothing: float
    bn_momentum: float
    survival_prob: float


class Variant(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    img_size: int
    crop_pct: float
    width: float
    depth: float
    dropout: float
    recipe: Recipe
    interpolation: str = "bicubic"
    timm_name: str | None = None  # timm name.tag of the checkpoint the card's row describes
    phi: float | None = None  # set for compound-scaled variants built from B0's architecture
    params_m: float | None = None
    flops_g: float | None = None
    file_size_mb: float | None = None
    top1: float | None = None
    top5: float | None = None
    training_data: list[str] = []
    training_resources: str | None = None
    techniques: list[str] = []
    sources: dict[str, str] = {}  # figure -> where it comes from when not the card

    @property
    def arch(self) -> str:
        return self.timm_name or self.name

    @property
    def drop_path_rate(self) -> float:
        return round(1.0 - self.recipe.survival_prob, 6)

    def card_tags(self) -> dict[str, str]:
        """The card's figures as flat string tags (MLflow registry, docs)."""
        flat = self.model_dump(exclude={"recipe", "sources"}) | {f"recipe.{k}": v for k, v in self.recipe}
        return {k: ", ".join(v) if isinstance(v, list) else str(v) for k, v in flat.items() if v not in (None, [])}


@cache
def table() -> dict[str, Variant]:
    raw = yaml.safe_load(resources.files("effnet").joinpath("variants.yaml").read_text())
    return {name: Variant(name=name, **row) for name, row in raw["variants"].items()}


def compound(phi: float) -> Variant:
    """A compound-scaled EfficientNet: B0's architecture scaled by phi, with B0's recipe and preprocessing."""
    b0 = table()["tf_efficientnet_b0"]
    return Variant(
        name=f"tf_efficientnet_phi{phi:g}",
        timm_name=b0.arch,  # B0's timm architecture (and pretrained config: mean/std), scaled below
        phi=phi,
        width=round(BETA**phi, 6),
        depth=round(ALPHA**phi, 6),
        img_size=round(BASE_RESOLUTION * GAMMA**phi),
        crop_pct=b0.crop_pct,
        interpolation=b0.interpolation,
        dropout=b0.dropout,
        recipe=b0.recipe,
        techniques=b0.techniques,
        sources={"all": f"compound scaling of tf_efficientnet_b0, phi={phi:g}"},
    )


def resolve(model: str | None = None, phi: float | None = None) -> Variant:
    """The variant named by the card's ID, or the compound-scaled one for phi."""
    if (model is None) == (phi is None):
        raise EffnetError("a variant needs exactly one of 'model' (a card ID) or 'phi' (compound scaling)")
    if phi is not None:
        return compound(phi)
    if model not in table():
        raise EffnetError(f"unknown variant '{model}'; known: {', '.join(table())}")
    return table()[model]


Measure = Callable[["Variant"], dict]  # variant -> {"params": count, "gmacs": ...}: `models.measure`


def records(phis: Sequence[float] = (), measure: Measure | None = None, measure_flops: bool = False) -> list[dict]:
    """The card's rows, then the compound-scaled variant for each phi, as plain dicts.

    params/flops are the card's figures (millions of parameters, GFLOPs as the card counts them); compound
    rows, which the card lacks, get the built model's parameter count instead (MEASURE builds it: the table itself
    knows no model code). measure_flops adds `flops_measured` (GMACs, multiply-adds of the model built at its
    img_size) and `params_measured` (millions).
    """
    rows = list(table().values()) + [compound(phi) for phi in phis]
    out = []
    for v in rows:
        r = {"name": v.name, "phi": v.phi, "params": v.params_m, "flops": v.flops_g, "img_size": v.img_size,
             "crop_pct": v.crop_pct, "interpolation": v.interpolation, "width": v.width, "depth": v.depth,
             "dropout": v.dropout, "top1": v.top1, "top5": v.top5, "timm": v.arch}
        if measure is not None and (measure_flops or v.phi is not None):
            m = measure(v)
            if v.phi is not None:
                r["params"] = round(m["params"] / 1e6, 2)
            if measure_flops:
                r["params_measured"] = round(m["params"] / 1e6, 2)
                r["flops_measured"] = round(m["gmacs"], 3)
        out.append(r)
    return out


COLUMNS = {"name": "variant", "img_size": "img", "crop_pct": "crop", "interpolation": "interp", "width": "width",
           "depth": "depth", "dropout": "drop", "params": "params M", "params_measured": "built M",
           "flops": "GFLOPs", "flops_measured": "built GMACs", "top1": "top1", "top5": "top5"}


def cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The table of ROWS (`records`) as text: the headers of the columns they have, and one list of cells a row
    (`tf_efficientnet_` left out of the names). `effnet variants` prints it; the docs' card table is made of it."""
    columns = {k: h for k, h in COLUMNS.items() if k in rows[0]}
    text = [["" if r[k] is None else f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in columns]
            for r in ({**r, "name": r["name"].removeprefix("tf_efficientnet_")} for r in rows)]
    return list(columns.values()), text


def show(phis: list[float], as_json: bool = False, measure: Measure | None = None, measure_flops: bool = False
         ) -> None:
    """Print the card table (and any compound-scaled variants) with rich, or as JSON."""
    rows = records(phis, measure, measure_flops)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    headers, text = cells(rows)
    title = "TF-EfficientNet variants (model card; tf_efficientnet_ omitted)"
    if measure_flops:
        title += "; built: the model built at img, GMACs = multiply-adds"
    t = Table(title=title)
    for header in headers:
        t.add_column(header, justify="left" if header in ("variant", "interp") else "right", no_wrap=True)
    for row in text:
        t.add_row(*row)
    console = Console()
    if not console.is_terminal:  # piped: as wide as the table needs, not the 80 columns rich assumes
        need = sum(max(len(h), *(len(row[i]) for row in text)) + 3 for i, h in enumerate(headers)) + 1
        console = Console(width=max(console.width, need))
    console.print(t)
