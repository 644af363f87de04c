"""The `pseudolabel` stage (Noisy Student): a student's teacher labels the unlabeled shards.

The teacher is a variant key (`students.<key>.teacher`); its model is the one `evaluate` selected and `register`
published (its `trained` or `fixres` bundle, at the selected resolution), run with its own eval preprocessing and
no noise (eval mode, no augmentation). Its class probabilities become the table the student trains on: soft (the
probabilities) or hard (the top class, one-hot), filtered and balanced as the paper does: images below the
confidence threshold left out, then per class (the teacher's top class) the `per_class` most confident kept and a
class with fewer repeated up to it (`copies`: the most confident images first).

Outputs (one folder, DVC-tracked): `labels.parquet`, one row per selected sample keyed by its shard key (key, label,
confidence, copies, `p:<class>` per class), written atomically; `pseudolabel.json`, what the student's provenance
names (teacher, its registered version, iteration, the unlabeled data's fingerprint, the settings, the class
histograms). The MLflow run `pseudolabel@<student>` logs the histograms before and after balancing and the
confidence distribution (a PNG), and the labeling rate.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from pydantic import BaseModel

from effnet import io, models, plots, tables, tracking
from effnet.config import Params, PseudoLabelConfig
from effnet.data import feed
from effnet.data.manifest import UNLABELED, read_manifest
from effnet.data.mixed_stream import PROB_PREFIX
from effnet.errors import EffnetError
from effnet.inference import forward

TABLE = "labels.parquet"
INFO = "pseudolabel.json"


class PseudoLabelResult(BaseModel):
    table: Path
    info: Path
    run_id: str
    images: int  # unlabeled images the teacher labeled
    kept: int  # past the threshold
    rows: int  # distinct images in the table
    samples: int  # with copies: what one pass of the student's unlabeled stream holds
    img_per_s: float  # the labeling rate (reading, decoding, the model)


@dataclass
class Teacher:
    """The published model of a student's teacher, and what names it."""

    key: str
    model: torch.nn.Module
    spec: models.ModelSpec  # at the selected resolution
    selected: dict  # evaluate's `selected`
    registered: dict  # register's record (name, version, ...)


@dataclass
class Labels:
    keys: list[str]
    probs: np.ndarray  # (images, classes) float32
    seconds: float


@dataclass
class Selection:
    index: np.ndarray  # rows of Labels kept, most confident first within each class
    copies: np.ndarray  # per kept row
    before: list[int]  # per class: images past the threshold
    after: list[int]  # per class: with the balancing's copies
    per_class: int | None


def run(params: Params, student: str, shards: str | Path, teacher_dir: Path, teacher_metrics: Path, out: Path
        ) -> PseudoLabelResult:
    """Label SHARDS' unlabeled split with STUDENT's teacher (its bundles and registered.json in TEACHER_DIR, its
    evaluate metrics TEACHER_METRICS); write the table and its record to the folder OUT; log to MLflow."""
    teacher = check(params, student, shards, teacher_dir, teacher_metrics)
    tracking.check()
    experiment_id = tracking.experiment(params.mlflow.experiment)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"pseudolabel@{student}",
                          tags={"stage": "pseudolabel", "variant": student,
                                **tracking.run_tags(student, params, "pseudolabel", experiment_id=experiment_id)}
                          ) as mlflow_run:
        labels = label(params, teacher, shards)
        selection = select(labels.probs, params.pseudolabel)
        info = record(params, student, teacher, shards, labels, selection)
        write(out, labels, selection, read_manifest(shards)["classes"], params.pseudolabel, info)
        log(info, labels, selection, student)
    return PseudoLabelResult(table=Path(out) / TABLE, info=Path(out) / INFO, run_id=mlflow_run.info.run_id,
                             images=len(labels.keys), kept=sum(selection.before), rows=len(selection.index),
                             samples=int(selection.copies.sum()), img_per_s=info["img_per_s"])


def check(params: Params, student: str, shards: str | Path, teacher_dir: Path, teacher_metrics: Path) -> Teacher:
    """Before any work: STUDENT is a student, the shards have unlabeled images, the teacher's published model is
    there and has the shards' classes; each failure one line naming the key."""
    spec = params.students.get(student)
    if spec is None:
        raise EffnetError(f"students.{student}: not a student (pseudolabel runs for the keys of students:, each "
                          "naming a teacher)")
    manifest = read_manifest(shards)
    if manifest["splits"].get(UNLABELED, {}).get("total", 0) == 0:
        raise EffnetError(f"students.{student}: the shards at {shards} have no unlabeled images (put them under "
                          f"unlabeled/ in {params.data.source}, or rows path,,unlabeled, and shard again)")
    teacher_dir, teacher_metrics = Path(teacher_dir), Path(teacher_metrics)
    if not teacher_metrics.is_file():
        raise EffnetError(f"students.{student}.teacher: {teacher_metrics} not found (evaluate {spec.teacher} first)")
    selected = json.loads(teacher_metrics.read_text())["selected"]
    registered_file = teacher_dir / "registered.json"
    if not registered_file.is_file():
        raise EffnetError(f"students.{student}.teacher: {registered_file} not found (register {spec.teacher} first)")
    model, teacher_spec = models.load_bundle(teacher_dir / selected["model"])
    if teacher_spec.classes != manifest["classes"]:
        raise EffnetError(f"students.{student}.teacher: {spec.teacher}'s classes ({', '.join(teacher_spec.classes)}) "
                          f"are not the student's ({', '.join(manifest['classes'])})")
    at = teacher_spec.model_copy(update={"preprocessing": teacher_spec.preprocessing.at(selected["resolution"])})
    return Teacher(spec.teacher, model, at, selected, json.loads(registered_file.read_text()))


@torch.inference_mode()
def label(params: Params, teacher: Teacher, shards: str | Path) -> Labels:
    """The teacher's class probabilities for every unlabeled image, in eval mode, with its eval preprocessing at
    its selected resolution, through the configured data path (as evaluate measures it)."""
    pre = teacher.spec.preprocessing
    fed, device = feed.for_inference(params, pre)
    teacher.model.eval()
    keys, probs = [], []
    start = time.perf_counter()
    for logits, _, names in forward(teacher.model, pre, shards, params.pseudolabel.batch_size,
                                    params.data.num_workers, fed, device, UNLABELED, keys=True):
        probs.append(logits.softmax(dim=1).cpu())
        keys += list(names)
    seconds = time.perf_counter() - start
    return Labels(keys, torch.cat(probs).numpy().astype(np.float32), seconds)


def select(probs: np.ndarray, cfg: PseudoLabelConfig) -> Selection:
    """The paper's filtering and balancing: images whose top probability reaches the threshold; with balance, per
    top class the per_class most confident (default: the mean count per class past the threshold), a class with
    fewer repeated up to it, its most confident images first."""
    classes = probs.shape[1]
    confidence, top = probs.max(axis=1), probs.argmax(axis=1)
    kept = np.flatnonzero(confidence >= cfg.threshold)
    if not len(kept):
        raise EffnetError(f"pseudolabel.threshold: {cfg.threshold:g} keeps none of the {len(probs)} unlabeled images "
                          f"(the teacher's highest confidence is {confidence.max():.3g})")
    before = np.bincount(top[kept], minlength=classes)
    per_class = cfg.per_class or math.ceil(len(kept) / classes) if cfg.balance else None
    index, copies = [], []
    for c in range(classes):
        mine = kept[top[kept] == c]
        mine = mine[np.argsort(-confidence[mine], kind="stable")]
        if per_class is None:
            index.append(mine), copies.append(np.ones(len(mine), dtype=np.int64))
        elif len(mine):
            take = mine[:per_class]
            repeat = np.full(len(take), per_class // len(take), dtype=np.int64)
            repeat[:per_class % len(take)] += 1  # the most confident get the remainder's extra copy
            index.append(take), copies.append(repeat)
    index, copies = np.concatenate(index), np.concatenate(copies)
    after = np.bincount(top[index], weights=copies, minlength=classes).astype(int)
    return Selection(index, copies, before.tolist(), after.tolist(), per_class)


def unlabeled_fingerprint(shards: str | Path) -> str:
    """The unlabeled split's fingerprint, as `shard` recorded it (its source files' bytes)."""
    return read_manifest(shards)["splits"][UNLABELED].get("fingerprint", "")


def record(params: Params, student: str, teacher: Teacher, shards: str | Path, labels: Labels,
           selection: Selection) -> dict:
    """What the student's provenance names: teacher (and its registered version), iteration, data, settings."""
    classes = read_manifest(shards)["classes"]
    confidence = labels.probs.max(axis=1)
    return {
        "student": student,
        "teacher": teacher.key,
        "teacher_model": teacher.registered.get("name", teacher.key),
        "teacher_version": str(teacher.registered.get("version", "")),
        "teacher_model_uri": teacher.registered.get("model_uri", ""),
        "teacher_selected": {"model": teacher.selected["model"], "resolution": teacher.selected["resolution"]},
        "iteration": len(params.teachers(student)),
        "chain": [student, *params.teachers(student)],
        "unlabeled_fingerprint": unlabeled_fingerprint(shards),
        "settings": params.pseudolabel.model_dump(exclude={"batch_size"}) | {"per_class_used": selection.per_class},
        "classes": classes,
        "images": len(labels.keys),
        "kept": int(sum(selection.before)),
        "rows": len(selection.index),
        "samples": int(selection.copies.sum()),
        "before": dict(zip(classes, selection.before)),
        "after": dict(zip(classes, selection.after)),
        "mean_confidence": round(float(confidence.mean()), 4),
        "img_per_s": round(len(labels.keys) / max(labels.seconds, 1e-9), 1),
    }


def write(out: Path, labels: Labels, selection: Selection, classes: list[str], cfg: PseudoLabelConfig,
          info: dict) -> None:
    """The table (Parquet, atomically) and its record, into the folder OUT, written whole or not at all."""
    columns = {"key": str, "label": str, "confidence": float, "copies": float,
               **{PROB_PREFIX + c: float for c in classes}}
    probs = labels.probs[selection.index]
    top = probs.argmax(axis=1)
    if cfg.labels == "hard":
        probs = np.eye(len(classes), dtype=np.float32)[top]
    confidence = labels.probs[selection.index].max(axis=1)
    rows = [{"key": labels.keys[i], "label": classes[t], "confidence": round(float(p), 6), "copies": float(n),
             **{PROB_PREFIX + c: float(v) for c, v in zip(classes, row)}}
            for i, t, p, n, row in zip(selection.index, top, confidence, selection.copies, probs)]
    with io.atomic_dir(out) as tmp:
        with tables.writer(tmp / TABLE, "parquet", columns) as put:
            put(rows)
        io.write_json(tmp / INFO, info)


def log(info: dict, labels: Labels, selection: Selection, student: str) -> None:
    """Settings, counts, rate, both histograms and the confidence plot, to the active MLflow run."""
    mlflow.log_params({f"pseudolabel.{k}": v for k, v in info["settings"].items()}
                      | {k: info[k] for k in ("teacher", "teacher_model", "teacher_version", "iteration",
                                              "unlabeled_fingerprint")})
    mlflow.log_metrics({k: float(info[k]) for k in ("images", "kept", "rows", "samples", "mean_confidence",
                                                    "img_per_s")})
    mlflow.log_metrics({f"before.{c}": float(n) for c, n in info["before"].items()}
                       | {f"after.{c}": float(n) for c, n in info["after"].items()})
    mlflow.log_dict(info, INFO)
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "pseudolabels.png"
        plots.pseudolabel_png(info["classes"], selection.before, selection.after,
                              labels.probs.max(axis=1).tolist(), info["settings"]["threshold"],
                              f"{student}: {info['teacher']}'s pseudo-labels", png)
        mlflow.log_artifact(str(png))
