"""The `evaluate` stage: top-1/top-5 on the val shards with each model's own preprocessing (resize by crop pct,
center crop, bicubic), for every model at every model's resolution: the FixRes comparison in one table.

Every model is also swept over a range of resolutions (`evaluate.sweep`, multiples of the smallest model's):
accuracy against resolution, one line per model, as a DVC plot (`plots/<variant>_resolution.json`) and a PNG
in the MLflow run."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import mlflow
import torch
from torchmetrics.classification import MulticlassAccuracy

from effnet import models, tracking
from effnet.config import Params
from effnet.data import transforms
from effnet.data.stream import eval_loader


@torch.inference_mode()
def accuracy(model: torch.nn.Module, dc: dict, shards: Path, batch_size: int, num_workers: int) -> dict[str, float]:
    """Top-1 and top-5 (in %) of `model` over the val split at data config `dc`."""
    n = model.get_classifier().out_features
    top1, top5 = MulticlassAccuracy(n, average="micro"), MulticlassAccuracy(n, top_k=min(5, n), average="micro")
    model.eval()
    for x, y, _ in eval_loader(shards, transforms.eval_transform(dc), batch_size, num_workers):
        logits = model(x)
        top1.update(logits, y)
        top5.update(logits, y)
    return {"top1": round(100 * top1.compute().item(), 4), "top5": round(100 * top5.compute().item(), 4)}


def sweep_sizes(model_sizes: set[int], scales: list[float]) -> list[int]:
    """The swept resolutions: each scale times the smallest model resolution (rounded to a pixel), plus every
    model's own resolution."""
    base = min(model_sizes)
    return sorted({max(1, round(base * s)) for s in scales} | set(model_sizes))


def plot_rows(sweep: dict[str, dict[int, dict[str, float]]]) -> list[dict]:
    """Wide rows for DVC's plot: one per resolution, a top-1 column per model (one line per model)."""
    sizes = sorted({size for by_size in sweep.values() for size in by_size})
    return [{"resolution": size} | {label: by_size[size]["top1"] for label, by_size in sweep.items()}
            for size in sizes]


def plot_png(rows: list[dict], labels: list[str], title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # headless: no display on servers or in DVC/Prefect runs
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in labels:
        ax.plot([r["resolution"] for r in rows], [r[label] for r in rows], marker="o", label=label)
    ax.set(xlabel="test resolution (px)", ylabel="top-1 (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def run(params: Params, variant_key: str, shards: Path, bundles: dict[str, Path], out: Path,
        plot: Path | None = None) -> dict:
    """Evaluate each bundle (label -> folder) at each bundle's resolution and over the sweep; write OUT (JSON of
    the former), PLOT (default `plots/<variant>_resolution.json`: the sweep) and log both to MLflow."""
    loaded = {label: models.load_bundle(path) for label, path in bundles.items()}
    own = {spec.img_size for _, spec in loaded.values()}
    sizes = sweep_sizes(own, params.evaluate.sweep)
    sweep = {}
    for label, (model, spec) in loaded.items():
        for size in sizes:
            dc = spec.model_dump(include={"crop_pct", "interpolation", "mean", "std"}) | {"img_size": size}
            sweep.setdefault(label, {})[size] = accuracy(model, dc, shards, params.evaluate.batch_size,
                                                         params.data.num_workers)
    metrics = {label: {f"res{size}": by_size[size] for size in sorted(own)} for label, by_size in sweep.items()}
    write_json(metrics, Path(out))
    rows = plot_rows(sweep)
    write_json(rows, Path(plot or f"plots/{variant_key}_resolution.json"))
    # start_run(experiment_id=...), not set_experiment: that would export MLFLOW_EXPERIMENT_ID to later stages.
    with mlflow.start_run(experiment_id=tracking.experiment(params.mlflow.experiment), run_name=f"evaluate@{variant_key}",
                          tags={"stage": "evaluate", "variant": variant_key,
                                **tracking.run_tags(variant_key, params, "evaluate")}):
        mlflow.log_metrics({f"{label}.{res}.{k}": v for label, by_res in metrics.items()
                            for res, m in by_res.items() for k, v in m.items()})
        for label, by_size in sweep.items():  # the sweep as curves: MLflow's step axis is the resolution
            for size, m in by_size.items():
                mlflow.log_metric(f"sweep.{label}.top1", m["top1"], step=size)
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / f"{variant_key}_resolution.png"
            plot_png(rows, list(sweep), f"{variant_key}: top-1 against test resolution", png)
            mlflow.log_artifact(str(png))
    return metrics
