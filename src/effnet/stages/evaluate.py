"""The `evaluate` stage: measures every candidate for publication, each model bundle at each resolution of the
sweep (`evaluate.sweep`, multiples of the smallest model's resolution, plus every model's own), on the val split
with each model's own preprocessing (resize by crop pct, center crop), and selects the one to publish: the best
val top-1 (ties: the smaller resolution, then the model given first).

Selecting on val and reporting val is optimistic: when the shards have a test split, the selected candidate is
measured on it once, and that is the figure `register` publishes. Outputs: the metrics JSON (every model at every
model's own resolution, `selected`, and the `machine` that measured them), the sweep as a DVC plot
(`plots/<variant>_resolution.json`, one line per model) and PNG, and the selected candidate's confusion matrix and per-class precision/recall on the reported split
(test, else val): a DVC confusion plot (`plots/confusion/<variant>.json`) and, in the MLflow run, a PNG, the
per-class table and the shard manifest."""
from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import pandas as pd
from pydantic import BaseModel

from effnet import io, models, plots, tracking
from effnet.config import Params
from effnet.data import feed
from effnet.data.manifest import read_manifest
from effnet.data.held_splits import HeldSplit
from effnet.inference import ClassStats, accuracy, confusion_rows

class Candidate(BaseModel):
    model: str  # the bundle's label
    resolution: int
    top1: float  # on val, in %
    top5: float


class Evaluation(BaseModel):
    """What the stage measured, before anything is written."""

    sweep: dict[str, dict[int, dict[str, float]]]  # label -> resolution -> {"top1", "top5"} on val (in %)
    own: dict[str, int]  # label -> the model's own resolution
    selected: Candidate
    reported_on: str  # the split of `reported` and the per-class figures: test when there is one, else val
    reported: dict[str, float]  # the selected candidate's top-1/top-5 on that split
    classes: list[str]
    matrix: list[list[int]]  # the selected candidate's confusion matrix on the reported split
    per_class: list[dict]  # ClassStats.table()
    macro: dict[str, float]  # macro precision/recall (in %)
    machine: str  # where it was measured (tracking.machine): figures repeat to the last digit only on the same one

    @property
    def metrics(self) -> dict:
        """The metrics JSON: every model at every model's own resolution, the selected candidate, and the machine
        that measured them."""
        sizes = sorted(set(self.own.values()))
        table = {label: {f"res{size}": by_size[size] for size in sizes} for label, by_size in self.sweep.items()}
        selected = {"model": self.selected.model, "resolution": self.selected.resolution,
                    "val_top1": self.selected.top1, "val_top5": self.selected.top5}
        if self.reported_on != "val":
            selected |= {f"{self.reported_on}_{k}": v for k, v in self.reported.items()}
        return table | {"selected": selected, "machine": self.machine}

    @property
    def at(self) -> str:
        return f"{self.selected.model}_res{self.selected.resolution}"


class EvaluateResult(BaseModel):
    metrics: dict
    metrics_file: Path
    plot: Path
    confusion: Path
    run_id: str


def run(params: Params, variant_key: str, shards: str | Path, bundles: dict[str, Path], out: Path,
        plot: Path | None = None, confusion: Path | None = None) -> EvaluateResult:
    """Evaluate each bundle (label -> folder); write OUT (the metrics JSON), PLOT (default
    `plots/<variant>_resolution.json`: the sweep) and CONFUSION (default `plots/confusion/<variant>.json`), and log
    them to MLflow."""
    tracking.check()  # a store that is down stops the stage here, in seconds, before any model is measured
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
    """Every bundle at every resolution of the sweep on val; the selected candidate on the reported split."""
    loaded = {label: models.load_bundle(path) for label, path in bundles.items()}
    own = {label: spec.img_size for label, (_, spec) in loaded.items()}
    sizes = sweep_sizes(set(own.values()), params.evaluate.sweep)
    decode = feed.resolve_decode(params.data.decode, params.train.accelerator)  # warns once, not per size
    params = params.model_copy(update={"data": params.data.model_copy(update={"decode": decode})})

    # The sweep reads val once per candidate: decoded once and held in memory where it fits (CPU decoding). So is
    # test, read once: in this process that is faster than starting loader workers for a split this size.
    def held(split: str) -> HeldSplit | None:
        return HeldSplit.load(shards, split, budget_mb=params.data.hold_mb) if decode == "cpu" else None

    def score(label: str, size: int, split: str, data: HeldSplit | None, extra=()) -> dict[str, float]:
        model, spec = loaded[label]
        pre = spec.preprocessing.at(size)
        fed, device = feed.for_inference(params, pre)
        return accuracy(model, pre, shards, params.evaluate.batch_size, params.data.num_workers, extra, fed, device,
                        split, held=data)

    # size by size: the models at one size share its batches
    images = held("val")
    by_size = {size: {label: score(label, size, "val", images) for label in loaded} for size in sizes}
    sweep = {label: {size: by_size[size][label] for size in sizes} for label in loaded}
    selected = select(sweep, list(loaded))
    reported_on = "test" if "test" in read_manifest(shards)["splits"] else "val"
    stats = ClassStats(loaded[selected.model][1].classes)
    if reported_on != "val":
        images = None  # the sweep is done: its images go before test's are read
        images = held(reported_on)
    reported = score(selected.model, selected.resolution, reported_on, images, stats.metrics)
    return Evaluation(sweep=sweep, own=own, selected=selected, reported_on=reported_on, reported=reported,
                      classes=stats.classes, matrix=stats.matrix(), per_class=stats.table(), macro=stats.macro(),
                      machine=tracking.machine())


def select(sweep: dict[str, dict[int, dict[str, float]]], order: list[str]) -> Candidate:
    """The best val top-1; ties: the smaller resolution, then the model earlier in ORDER (the simpler one)."""
    top1, _, _, label, size = max((m["top1"], -size, -order.index(label), label, size)
                                  for label, by_size in sweep.items() for size, m in by_size.items())
    return Candidate(model=label, resolution=size, **sweep[label][size])


def write(evaluation: Evaluation, out: Path, plot: Path, confusion: Path) -> None:
    """The DVC outputs: the metrics JSON, the sweep's plot rows, the selected candidate's confusion rows."""
    io.write_json(out, evaluation.metrics)
    io.write_json(plot, plot_rows(evaluation.sweep))
    io.write_json(confusion, confusion_rows(evaluation.matrix, evaluation.classes))


def log(evaluation: Evaluation, params: Params, variant_key: str, shards: str | Path) -> None:
    """Params, metrics, the selection, the sweep as curves, the per-class table, the manifest and both figures, to
    the active MLflow run."""
    selected, at, split = evaluation.selected, evaluation.at, evaluation.reported_on
    mlflow.log_params({"evaluate." + k: v for k, v in params.evaluate.model_dump().items()})
    mlflow.log_params({"selected.model": selected.model, "selected.resolution": selected.resolution,
                       "reported_on": split})
    mlflow.log_metrics({f"{label}.{res}.{k}": v for label in evaluation.sweep
                        for res, m in evaluation.metrics[label].items() for k, v in m.items()})
    mlflow.set_tag("machine", evaluation.machine)
    mlflow.log_metrics({f"selected.val_{k}": getattr(selected, k) for k in ("top1", "top5")}
                       | {f"selected.{split}_{k}": v for k, v in evaluation.reported.items()}
                       | {f"selected.{split}_{k}": v for k, v in evaluation.macro.items()})
    for label, by_size in evaluation.sweep.items():  # the sweep as curves: MLflow's step axis is the resolution
        for size, m in by_size.items():
            mlflow.log_metric(f"sweep.{label}.top1", m["top1"], step=size)
    table = pd.DataFrame(evaluation.per_class)
    mlflow.log_table(table, artifact_file=f"per_class_{at}_{split}.json")  # shown as a table in the UI
    mlflow.log_text(table.to_csv(index=False), f"per_class_{at}_{split}.csv")
    mlflow.log_dict(read_manifest(shards), "manifest.json")
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / f"{variant_key}_resolution.png"
        plots.resolution_png(plot_rows(evaluation.sweep), list(evaluation.sweep),
                             f"{variant_key}: val top-1 against test resolution", png)
        mlflow.log_artifact(str(png))
        png = Path(tmp) / f"confusion_{at}_{split}.png"
        plots.confusion_png(evaluation.matrix, evaluation.classes,
                            f"{variant_key} {selected.model} at {selected.resolution} px, {split}: confusion", png)
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
