"""The `evaluate` stage: top-1/top-5 on the val shards with each model's own preprocessing (resize by crop pct,
center crop, bicubic), for every model at every model's resolution: the FixRes comparison in one table.

Every model is also swept over a range of resolutions (`evaluate.sweep`, multiples of the smallest model's):
accuracy against resolution, one line per model, as a DVC plot (`plots/<variant>_resolution.json`) and a PNG
in the MLflow run.

The final model (`fixres`, else the last one given) at its own resolution also gets a confusion matrix and
per-class precision/recall (torchmetrics): a DVC confusion plot (`plots/confusion/<variant>.json`, one
{actual, predicted} row per val image), and in the MLflow run a PNG, the per-class table (`mlflow.log_table`
JSON, shown as a table in the UI, and CSV), macro precision/recall metrics and the shard manifest.

On CUDA the models run in bf16 autocast and channels_last, fed by the same device path as training
(`data.decode`), eager: the sweep runs each model at many resolutions, where compiling each would cost more
than it saves."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import mlflow
import pandas as pd
import torch
from torchmetrics import Metric
from torchmetrics.classification import (MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassPrecision,
                                         MulticlassRecall)

from effnet import models, tracking
from effnet.config import Params
from effnet.data import gpu, shard, transforms
from effnet.data.stream import DevicePrefetcher, eval_loader
from effnet.train import device_feed

FINAL = "fixres"  # the label of the final model: the one the per-class figures are for (else the last one)


@torch.inference_mode()
def accuracy(model: torch.nn.Module, dc: dict, shards: Path, batch_size: int, num_workers: int,
             extra: Sequence[Metric] = (), feed: gpu.DeviceFeed | None = None,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """Top-1 and top-5 (in %) of `model` over the val split at data config `dc`, on DEVICE, the batches finished
    there by FEED (default: the CPU decode path's). EXTRA metrics (torchmetrics, e.g. `ClassStats`) are updated
    with the same logits and labels in the same pass."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    feed = feed or gpu.DeviceFeed(dc["mean"], dc["std"], channels_last=cuda)
    n = model.get_classifier().out_features
    top1, top5 = MulticlassAccuracy(n, average="micro"), MulticlassAccuracy(n, top_k=min(5, n), average="micro")
    metrics = [m.to(device) for m in (top1, top5, *extra)]
    model.eval().to(device, memory_format=torch.channels_last if feed.channels_last else torch.preserve_format)
    loader = eval_loader(shards, None if feed.decodes else transforms.eval_transform(dc, uint8=True), batch_size,
                         num_workers, pin_memory=cuda)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        for x, y, _ in DevicePrefetcher(loader, feed, False, device):
            logits = model(x).float()
            for metric in metrics:
                metric.update(logits, y)
    return {"top1": round(100 * top1.compute().item(), 4), "top5": round(100 * top5.compute().item(), 4)}


class ClassStats:
    """Confusion matrix (rows: actual, columns: predicted) and per-class precision/recall, by torchmetrics."""

    def __init__(self, classes: list[str]):
        n = len(classes)
        self.classes = classes
        self.confusion = MulticlassConfusionMatrix(n)
        self.precision = MulticlassPrecision(n, average=None, zero_division=0)
        self.recall = MulticlassRecall(n, average=None, zero_division=0)

    @property
    def metrics(self) -> list[Metric]:
        return [self.confusion, self.precision, self.recall]

    def matrix(self) -> list[list[int]]:
        return self.confusion.compute().tolist()

    def macro(self) -> dict[str, float]:
        """Precision and recall (in %) averaged over classes (torchmetrics' macro average)."""
        return {k: round(100 * m.compute().mean().item(), 4)
                for k, m in (("macro_precision", self.precision), ("macro_recall", self.recall))}

    def table(self) -> list[dict]:
        """One row per class: precision and recall (in %), support (val images of the class), predicted."""
        cm = self.confusion.compute()
        precision, recall = self.precision.compute().tolist(), self.recall.compute().tolist()
        support, predicted = cm.sum(dim=1).tolist(), cm.sum(dim=0).tolist()
        return [{"class": c, "precision": round(100 * p, 4), "recall": round(100 * r, 4), "support": int(s),
                 "predicted": int(q)}
                for c, p, r, s, q in zip(self.classes, precision, recall, support, predicted)]

    def rows(self) -> list[dict]:
        """DVC's confusion template input: one {actual, predicted} row per val image (class names)."""
        return [{"actual": self.classes[i], "predicted": self.classes[j]}
                for i, counts in enumerate(self.matrix()) for j, count in enumerate(counts) for _ in range(count)]


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


def confusion_png(matrix: list[list[int]], classes: list[str], title: str, path: Path) -> None:
    """The confusion matrix as an image, normalised per actual class (row); counts written in small matrices."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    cm = np.asarray(matrix, dtype=float)
    rate = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    side = min(4 + 0.4 * n, 16)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(rate, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the actual class")
    if n <= 50:  # beyond that, names are unreadable: the axes show indices
        ax.set_xticks(range(n), classes, rotation=90 if n > 10 else 45, ha="center" if n > 10 else "right")
        ax.set_yticks(range(n), classes)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if rate[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="actual", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def run(params: Params, variant_key: str, shards: Path, bundles: dict[str, Path], out: Path,
        plot: Path | None = None, confusion: Path | None = None) -> dict:
    """Evaluate each bundle (label -> folder) at each bundle's resolution and over the sweep; write OUT (JSON of
    the former), PLOT (default `plots/<variant>_resolution.json`: the sweep), CONFUSION (default
    `plots/confusion/<variant>.json`: the final model at its resolution) and log them to MLflow."""
    loaded = {label: models.load_bundle(path) for label, path in bundles.items()}
    own = {spec.img_size for _, spec in loaded.values()}
    sizes = sweep_sizes(own, params.evaluate.sweep)
    final = FINAL if FINAL in loaded else list(loaded)[-1]
    final_spec = loaded[final][1]
    stats = ClassStats(final_spec.classes)
    at = f"{final}_res{final_spec.img_size}"
    # start_run(experiment_id=...), not set_experiment: that would export MLFLOW_EXPERIMENT_ID to later stages.
    experiment_id = tracking.experiment(params.mlflow.experiment)
    # The run spans the evaluation itself, so its duration and system metrics are the evaluation's.
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"evaluate@{variant_key}",
                          tags={"stage": "evaluate", "variant": variant_key,
                                **tracking.run_tags(variant_key, params, "evaluate", experiment_id=experiment_id)}):
        mlflow.log_params({"evaluate." + k: v for k, v in params.evaluate.model_dump().items()})
        sweep = {}
        device = torch.device("cuda" if gpu.cuda_usable(params.train.accelerator) else "cpu")
        decode = gpu.resolve_decode(params.data.decode, params.train.accelerator)  # warns once, not per size
        params = params.model_copy(update={"data": params.data.model_copy(update={"decode": decode})})
        for label, (model, spec) in loaded.items():
            for size in sizes:
                dc = spec.model_dump(include={"crop_pct", "interpolation", "mean", "std"}) | {"img_size": size}
                extra = stats.metrics if (label, size) == (final, final_spec.img_size) else ()
                sweep.setdefault(label, {})[size] = accuracy(
                    model, dc, shards, params.evaluate.batch_size, params.data.num_workers, extra,
                    device_feed(params, dc, channels_last=device.type == "cuda"), device)
        metrics = {label: {f"res{size}": by_size[size] for size in sorted(own)} for label, by_size in sweep.items()}
        write_json(metrics, Path(out))
        rows = plot_rows(sweep)
        write_json(rows, Path(plot or f"plots/{variant_key}_resolution.json"))
        write_json(stats.rows(), Path(confusion or f"plots/confusion/{variant_key}.json"))
        table = pd.DataFrame(stats.table())
        mlflow.log_metrics({f"{label}.{res}.{k}": v for label, by_res in metrics.items()
                            for res, m in by_res.items() for k, v in m.items()})
        mlflow.log_metrics({f"{final}.res{final_spec.img_size}.{k}": v for k, v in stats.macro().items()})
        for label, by_size in sweep.items():  # the sweep as curves: MLflow's step axis is the resolution
            for size, m in by_size.items():
                mlflow.log_metric(f"sweep.{label}.top1", m["top1"], step=size)
        mlflow.log_table(table, artifact_file=f"per_class_{at}.json")  # shown as a table in the UI
        mlflow.log_text(table.to_csv(index=False), f"per_class_{at}.csv")
        mlflow.log_dict(shard.read_manifest(shards), "manifest.json")
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / f"{variant_key}_resolution.png"
            plot_png(rows, list(sweep), f"{variant_key}: top-1 against test resolution", png)
            mlflow.log_artifact(str(png))
            png = Path(tmp) / f"confusion_{at}.png"
            confusion_png(stats.matrix(), final_spec.classes,
                          f"{variant_key} {final} at {final_spec.img_size} px: confusion", png)
            mlflow.log_artifact(str(png))
    return metrics
