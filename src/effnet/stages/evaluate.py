"""The `evaluate` stage: top-1/top-5 on the val shards with each model's own preprocessing (resize by crop pct,
center crop, bicubic), for every model at every model's resolution: the FixRes comparison in one table.

Every model is also swept over a range of resolutions (`evaluate.sweep`, multiples of the smallest model's):
accuracy against resolution, one line per model, as a DVC plot (`plots/<variant>_resolution.json`) and a PNG
in the MLflow run.

The final model (`fixres`, else the last one given) at its own resolution also gets a confusion matrix and
per-class precision/recall: a DVC confusion plot (`plots/confusion/<variant>.json`, one {actual, predicted} row per
val image), and in the MLflow run a PNG, the per-class table (`mlflow.log_table` JSON, shown as a table in the UI,
and CSV), macro precision/recall metrics and the shard manifest."""
from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import pandas as pd
import torch
from pydantic import BaseModel

from effnet import io, models, plots, tracking
from effnet.config import Params
from effnet.data import feed
from effnet.data.manifest import read_manifest
from effnet.inference import ClassStats, accuracy, confusion_rows

FINAL = "fixres"  # the label of the final model: the one the per-class figures are for (else the last one)


class Evaluation(BaseModel):
    """What the stage measured, before anything is written."""

    sweep: dict[str, dict[int, dict[str, float]]]  # label -> resolution -> {"top1", "top5"} (in %)
    own: dict[str, int]  # label -> the model's own resolution
    final: str  # the label the per-class figures are for
    classes: list[str]
    matrix: list[list[int]]  # the final model's confusion matrix at its own resolution
    per_class: list[dict]  # ClassStats.table()
    macro: dict[str, float]  # macro precision/recall (in %)

    @property
    def metrics(self) -> dict[str, dict[str, dict[str, float]]]:
        """The metrics JSON: every model at every model's own resolution."""
        sizes = sorted(set(self.own.values()))
        return {label: {f"res{size}": by_size[size] for size in sizes} for label, by_size in self.sweep.items()}

    @property
    def at(self) -> str:
        return f"{self.final}_res{self.own[self.final]}"


class EvaluateResult(BaseModel):
    metrics: dict[str, dict[str, dict[str, float]]]
    metrics_file: Path
    plot: Path
    confusion: Path
    run_id: str


def run(params: Params, variant_key: str, shards: str | Path, bundles: dict[str, Path], out: Path,
        plot: Path | None = None, confusion: Path | None = None) -> EvaluateResult:
    """Evaluate each bundle (label -> folder); write OUT (the metrics JSON), PLOT (default
    `plots/<variant>_resolution.json`: the sweep) and CONFUSION (default `plots/confusion/<variant>.json`), and log
    them to MLflow."""
    plot = Path(plot or f"plots/{variant_key}_resolution.json")
    confusion = Path(confusion or f"plots/confusion/{variant_key}.json")
    # start_run(experiment_id=...), not set_experiment: that would export MLFLOW_EXPERIMENT_ID to later stages.
    experiment_id = tracking.experiment(params.mlflow.experiment)
    # The run spans the evaluation itself, so its duration and system metrics are the evaluation's.
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"evaluate@{variant_key}",
                          tags={"stage": "evaluate", "variant": variant_key,
                                **tracking.run_tags(variant_key, params, "evaluate", experiment_id=experiment_id)}
                          ) as mlflow_run:
        evaluation = measure(params, shards, bundles)
        write(evaluation, out, plot, confusion)
        log(evaluation, params, variant_key, shards)
    return EvaluateResult(metrics=evaluation.metrics, metrics_file=Path(out), plot=plot, confusion=confusion,
                          run_id=mlflow_run.info.run_id)


def measure(params: Params, shards: str | Path, bundles: dict[str, Path]) -> Evaluation:
    """Every bundle at every resolution of the sweep; the per-class figures of the final one at its own."""
    loaded = {label: models.load_bundle(path) for label, path in bundles.items()}
    own = {label: spec.img_size for label, (_, spec) in loaded.items()}
    sizes = sweep_sizes(set(own.values()), params.evaluate.sweep)
    final = FINAL if FINAL in loaded else list(loaded)[-1]
    stats = ClassStats(loaded[final][1].classes)
    device = torch.device("cuda" if feed.cuda_usable(params.train.accelerator) else "cpu")
    decode = feed.resolve_decode(params.data.decode, params.train.accelerator)  # warns once, not per size
    params = params.model_copy(update={"data": params.data.model_copy(update={"decode": decode})})
    sweep = {}
    for label, (model, spec) in loaded.items():
        for size in sizes:
            pre = spec.preprocessing.at(size)
            extra = stats.metrics if (label, size) == (final, own[final]) else ()
            sweep.setdefault(label, {})[size] = accuracy(
                model, pre, shards, params.evaluate.batch_size, params.data.num_workers, extra,
                feed.for_params(params, pre, channels_last=device.type == "cuda"), device)
    return Evaluation(sweep=sweep, own=own, final=final, classes=stats.classes, matrix=stats.matrix(),
                      per_class=stats.table(), macro=stats.macro())


def write(evaluation: Evaluation, out: Path, plot: Path, confusion: Path) -> None:
    """The DVC outputs: the metrics JSON, the sweep's plot rows, the final model's confusion rows."""
    io.write_json(out, evaluation.metrics)
    io.write_json(plot, plot_rows(evaluation.sweep))
    io.write_json(confusion, confusion_rows(evaluation.matrix, evaluation.classes))


def log(evaluation: Evaluation, params: Params, variant_key: str, shards: str | Path) -> None:
    """Params, metrics, the sweep as curves, the per-class table, the manifest and both figures, to the active
    MLflow run."""
    final, at = evaluation.final, evaluation.at
    mlflow.log_params({"evaluate." + k: v for k, v in params.evaluate.model_dump().items()})
    mlflow.log_metrics({f"{label}.{res}.{k}": v for label, by_res in evaluation.metrics.items()
                        for res, m in by_res.items() for k, v in m.items()})
    mlflow.log_metrics({f"{final}.res{evaluation.own[final]}.{k}": v for k, v in evaluation.macro.items()})
    for label, by_size in evaluation.sweep.items():  # the sweep as curves: MLflow's step axis is the resolution
        for size, m in by_size.items():
            mlflow.log_metric(f"sweep.{label}.top1", m["top1"], step=size)
    table = pd.DataFrame(evaluation.per_class)
    mlflow.log_table(table, artifact_file=f"per_class_{at}.json")  # shown as a table in the UI
    mlflow.log_text(table.to_csv(index=False), f"per_class_{at}.csv")
    mlflow.log_dict(read_manifest(shards), "manifest.json")
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / f"{variant_key}_resolution.png"
        plots.resolution_png(plot_rows(evaluation.sweep), list(evaluation.sweep),
                             f"{variant_key}: top-1 against test resolution", png)
        mlflow.log_artifact(str(png))
        png = Path(tmp) / f"confusion_{at}.png"
        plots.confusion_png(evaluation.matrix, evaluation.classes,
                            f"{variant_key} {final} at {evaluation.own[final]} px: confusion", png)
        mlflow.log_artifact(str(png))


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
