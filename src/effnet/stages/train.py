"""The `train` stage: a timm TF-EfficientNet fitted by a Lightning Trainer on the shards, with the card's recipe
(`lightning.fit`); the model exported is the EMA of the weights when there is one (with early stopping, the EMA of
the epoch with the best val top-1). Under DDP every rank runs this stage; only rank 0 writes the bundle."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
from pydantic import BaseModel
from pytorch_lightning.utilities import rank_zero_only
from torch import nn

from effnet import io, lightning, models, tracking
from effnet.config import Params, TrainConfig
from effnet.data import feed, mixed_stream, regularise, transforms
from effnet.data.manifest import UNLABELED, read_manifest
from effnet.errors import EffnetError
from effnet.variants import Recipe, Variant


class TrainResult(BaseModel):
    bundle: Path | None  # None on DDP ranks other than 0, which write nothing
    run_id: str | None  # the MLflow run (None on DDP ranks other than 0)
    spec: models.ModelSpec
    lr: float  # after the linear scaling rule
    global_batch: int  # per optimizer step: batch_size x world_size x accumulate_grad_batches
    world_size: int
    rank: int
    steps: int  # optimizer steps taken (resumed runs: counting those before the resume)
    weights: str  # sha256 of the exported weights (every rank's own: under DDP they are the same)
    decode: str  # the data path that ran: cpu or gpu
    curves: Path | None  # the per-epoch curves written (rank 0, when asked for)


@dataclass
class Trained:
    """A fitted Classifier and what describes it, before anything is written."""

    module: lightning.Classifier
    spec: models.ModelSpec
    run_id: str | None
    lr: float
    global_batch: int
    world_size: int
    rank: int
    steps: int
    decode: str
    curves: list[dict]  # per epoch: epoch, train_loss, val_top1 (lightning.Curves)


def run(params: Params, variant_key: str, shards: str | Path, out: Path, curves: Path | None = None,
        pseudo: Path | None = None) -> TrainResult:
    """Train variant `variant_key` on SHARDS; write the model bundle to OUT and, with CURVES, the per-epoch training
    curves there as JSON rows (`dvc plots`), on rank 0. A student (a key of `students:`) trains on the labeled
    split and the pseudo-labels in PSEUDO (`effnet pseudolabel`'s folder), whose record goes into the bundle
    (`noisy_student.json`: what register names as its provenance)."""
    student = noisy_student(params, variant_key, shards, pseudo)
    trained = fit_model(params, variant_key, shards, student)
    written = trained.rank == 0
    if written:
        write(trained, params, out)
        if student:
            io.write_json(Path(out) / PROVENANCE, student.provenance)
        if curves:
            io.write_json(curves, trained.curves)
    return TrainResult(bundle=Path(out) if written else None, run_id=trained.run_id, spec=trained.spec,
                       lr=trained.lr, global_batch=trained.global_batch, world_size=trained.world_size,
                       rank=trained.rank, steps=trained.steps,
                       weights=models.weights_hash(trained.module.eval_model), decode=trained.decode,
                       curves=Path(curves) if curves and written else None)


PROVENANCE = "noisy_student.json"  # in a student's bundle: its teacher, iteration, pseudo-labels, noise


@dataclass
class Student:
    """What makes a variant a Noisy Student: its pseudo-label targets and the record that names their origin."""

    targets: dict  # mixed_stream.Targets
    provenance: dict


def noisy_student(params: Params, variant_key: str, shards: str | Path, pseudo: Path | None) -> Student | None:
    """None for a plain variant; for a student, its pseudo-labels (checked before any work: there, with the shards'
    classes, and settings a soft target can train with)."""
    if variant_key not in params.students:
        if pseudo is not None:
            raise EffnetError(f"variants.{variant_key}: --pseudo given, but it is not a student (no teacher)")
        return None
    if pseudo is None:
        raise EffnetError(f"students.{variant_key}: a student trains with --pseudo <pseudolabel's folder>")
    if params.train.mixup or params.train.cutmix:
        raise EffnetError("train.mixup/train.cutmix: not for a student (its pseudo-labels are soft targets already)")
    found = read_manifest(shards)
    if found["splits"].get(UNLABELED, {}).get("total", 0) == 0:
        raise EffnetError(f"students.{variant_key}: the shards at {shards} have no unlabeled images")
    info_file = Path(pseudo) / "pseudolabel.json"
    if not info_file.is_file():
        raise EffnetError(f"students.{variant_key}: {info_file} not found (run `effnet pseudolabel` first)")
    info = json.loads(info_file.read_text())
    targets = mixed_stream.read_table(Path(pseudo) / "labels.parquet", found["classes"])
    provenance = {**info, "student": variant_key, "pseudo_labels": io.sha256_file(Path(pseudo) / "labels.parquet"),
                  "noise": student_cfg(params).model_dump(include={"auto_augment", "drop_rate", "drop_path_rate"}),
                  "ratio": params.student.ratio}
    return Student(targets, provenance)


def student_cfg(params: Params) -> TrainConfig:
    """train's params with the student's noise where `student:` sets it (RandAugment, dropout, stochastic depth)."""
    noise = {k: v for k, v in params.student.model_dump(include={"auto_augment", "drop_rate", "drop_path_rate"}).items()
             if v is not None}
    return params.train.model_copy(update=noise)


def fit_model(params: Params, variant_key: str, shards: str | Path, student: Student | None = None) -> Trained:
    """Build the model and fit it: the MLflow run `train@<variant_key>`, resumed from the variant's checkpoint.
    The Trainer comes first: its world size sets the global batch and so the LR, and a setting it cannot run with
    stops the stage before any work. A STUDENT trains with its noise on the mixed stream of labeled and
    pseudo-labeled images (soft targets)."""
    cfg, variant = (student_cfg(params) if student else params.train), params.variant(variant_key)
    rank_zero_only(tracking.check)()  # the one process that logs: a store that is down stops it here, in seconds
    trainer = lightning.make_trainer(cfg, cfg.epochs, checkpoint_folder(cfg, variant_key), cfg.accumulate_grad_batches,
                                     cfg.sync_bn, cfg.max_time, cfg.early_stop_patience)
    global_batch = lightning.global_batch(trainer, cfg.batch_size)
    lr = learning_rate(cfg, variant.recipe, global_batch)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # before the model is built: its init draws too
    classes = read_manifest(shards)["classes"]
    model = build_model(cfg, variant, len(classes))
    pre = models.preprocessing(model, variant, cfg.img_size)
    speed = lightning.speed_settings(cfg)
    train_tf = transforms.train_transform(pre, cfg.auto_augment, cfg.crop_scale, uint8=True)
    smoothing = variant.recipe.label_smoothing if cfg.label_smoothing is None else cfg.label_smoothing
    mix = dict(targets=student.targets, ratio=params.student.ratio, smoothing=smoothing) if student else None
    dm = feed.data_module(params, shards, pre, train_tf, cfg.batch_size, cfg.seed, speed["channels_last"], mix=mix)
    module = lightning.Classifier(model, len(classes), optimizer_kwargs(cfg, variant.recipe, lr),
                                  schedule_kwargs(cfg, lr), smoothing, ema_decay=cfg.ema_decay,
                                  regularise=regularise.for_config(cfg, len(classes), smoothing),
                                  compile=speed["compile"], channels_last=speed["channels_last"],
                                  soft_targets=student is not None)
    decode = "gpu" if dm.feed.decodes else "cpu"
    logged = {**cfg.model_dump(), "variant": variant.name, "lr_scaled": lr, "global_batch": global_batch,
              "world_size": trainer.world_size, "img_size": pre.img_size, "num_classes": len(classes),
              "decode": decode, **lightning.log_speed_settings(cfg)}
    if student:  # in the resume fingerprint too: other pseudo-labels start afresh
        logged |= {f"noisy_student.{k}": student.provenance[k] for k in
                   ("teacher", "teacher_model", "teacher_version", "iteration", "unlabeled_fingerprint",
                    "pseudo_labels", "ratio")}
    run_id = lightning.fit(trainer, module, dm, cfg, params.mlflow.experiment, f"train@{variant_key}", logged,
                           checkpoints=checkpoint_folder(cfg, variant_key))
    spec = models.ModelSpec(variant=variant_key, model=None if variant.phi is not None else variant.name,
                            phi=variant.phi, classes=classes, preprocessing=pre)
    return Trained(module, spec, run_id, lr, global_batch, trainer.world_size, trainer.global_rank, trainer.global_step,
                   decode, lightning.curves(trainer))


def write(trained: Trained, params: Params, out: Path) -> None:
    """The bundle (the EMA weights when there is an EMA); then the checkpoints go: nothing is left to resume."""
    models.save_bundle(trained.module.eval_model, trained.spec, out)
    shutil.rmtree(checkpoint_folder(params.train, trained.spec.variant), ignore_errors=True)


def build_model(cfg: TrainConfig, variant: Variant, num_classes: int) -> nn.Module:
    model = models.build(variant, num_classes, cfg.drop_rate, cfg.drop_path_rate, cfg.bn_momentum, cfg.pretrained)
    if cfg.pretrained_file:
        models.load_weights(model, cfg.pretrained_file, variant.name)
    elif not cfg.pretrained:
        # TF's head init, uniform(+-1/sqrt(classes)), is scaled for 1000 classes; with few classes it starts
        # far above chance loss and stalls training from scratch. A small normal init starts at chance.
        nn.init.normal_(model.get_classifier().weight, std=0.01)
        nn.init.zeros_(model.get_classifier().bias)
    return model


def scaled_lr(recipe: Recipe, global_batch: int) -> float:
    """The linear scaling rule: the card's LR at the card's batch, scaled to GLOBAL_BATCH."""
    return recipe.lr * global_batch / recipe.batch_size


def learning_rate(cfg: TrainConfig, recipe: Recipe, global_batch: int) -> float:
    """`train.lr`, or the card's scaled to GLOBAL_BATCH; a global batch or an LR that cannot train stops the stage,
    naming the keys that made it."""
    if global_batch < 1:
        raise EffnetError(f"train.batch_size x world size x train.accumulate_grad_batches = {global_batch}: "
                          "no samples per optimizer step")
    lr = cfg.lr or scaled_lr(recipe, global_batch)
    if not lr > 0:
        raise EffnetError(f"train.lr: {lr} (the card's {recipe.lr} x global batch {global_batch} / "
                          f"{recipe.batch_size}) must be positive")
    return lr


def optimizer_kwargs(cfg: TrainConfig, recipe: Recipe, lr: float) -> dict:
    """timm's `create_optimizer_v2` arguments. foreach: one multi-tensor update instead of a Python loop over ~300
    parameter tensors; torch picks it on CUDA only, and on a CPU it makes the whole step ~9 % faster (8 ms instead
    of 18 a step for the demo's model, adamw and rmsproptf alike)."""
    kwargs = dict(opt=cfg.opt, lr=lr, momentum=recipe.momentum, foreach=cfg.accelerator != "tpu",
                  weight_decay=recipe.weight_decay if cfg.weight_decay is None else cfg.weight_decay)
    if cfg.opt == "rmsproptf":
        kwargs |= dict(alpha=recipe.rmsprop_decay, eps=1e-3)  # TF RMSProp: decay 0.9, epsilon 1e-3
    return kwargs


def schedule_kwargs(cfg: TrainConfig, lr: float) -> dict:
    """timm's `create_scheduler_v2` arguments: warm-up, then LR x decay_rate every decay_epochs."""
    return dict(sched="step", decay_epochs=cfg.decay_epochs, decay_rate=cfg.decay_rate,
                warmup_epochs=cfg.warmup_epochs, warmup_lr=lr * 0.01)


def checkpoint_folder(cfg: TrainConfig, variant_key: str) -> Path:
    return Path(cfg.checkpoint_dir) / variant_key
