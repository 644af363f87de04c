"""The `train` stage: a timm TF-EfficientNet fitted by a Lightning Trainer on the shards, with the card's recipe.

`Classifier` and `fit` are shared with the FixRes stage, which trains the same module on fewer parameters.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, RichProgressBar
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities import rank_zero_info
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from effnet import models, tracking
from effnet.config import Params, TrainConfig
from effnet.data import transforms
from effnet.data.stream import ShardDataModule
from effnet.errors import EffnetError

log = logging.getLogger(__name__)


class Classifier(pl.LightningModule):
    """Cross-entropy training of `model`. With `trainable` set, only those submodules learn and run in train
    mode (BatchNorm statistics update); the rest stays frozen in eval mode."""

    def __init__(self, model: nn.Module, num_classes: int, optimizer: dict, schedule: dict | None,
                 label_smoothing: float, trainable: list[str] | None = None):
        super().__init__()
        self.model, self.optimizer, self.schedule, self.trainable = model, optimizer, schedule, trainable
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.train_top1 = MulticlassAccuracy(num_classes, average="micro")
        self.val_top1 = MulticlassAccuracy(num_classes, average="micro")
        if trainable is not None:
            for p in model.parameters():
                p.requires_grad_(False)
            for name in trainable:
                for p in model.get_submodule(name).parameters():
                    p.requires_grad_(True)

    def on_train_epoch_start(self) -> None:
        if self.trainable is not None:  # Lightning put everything in train mode: re-freeze
            self.model.eval()
            for name in self.trainable:
                self.model.get_submodule(name).train()

    def training_step(self, batch, _):
        x, y = batch
        logits = self.model(x)
        loss = self.loss(logits, y)
        if not torch.isfinite(loss):
            raise EffnetError(f"loss is {loss.item()} at step {self.global_step}: stopping (lower the LR?)")
        self.train_top1(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/top1", self.train_top1, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, _):
        x, y, _keys = batch
        logits = self.model(x)
        self.val_top1(logits, y)
        self.log("val/loss", self.loss(logits, y), on_epoch=True, sync_dist=True, batch_size=len(y))
        self.log("val/top1", self.val_top1, on_epoch=True, prog_bar=True, batch_size=len(y))

    def configure_optimizers(self):
        # timm's factory: filters BatchNorm and bias out of weight decay, skips frozen parameters.
        opt = create_optimizer_v2(self.model, **self.optimizer)
        if self.schedule is None:
            return opt
        steps_per_epoch = max(1, int(self.trainer.estimated_stepping_batches // self.trainer.max_epochs))
        sched, _ = create_scheduler_v2(opt, num_epochs=self.trainer.max_epochs, step_on_epochs=False,
                                       updates_per_epoch=steps_per_epoch, **self.schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        scheduler.step_update(num_updates=self.global_step)  # timm schedulers count optimizer updates


class EpochSummary(pl.Callback):
    """Throughput to MLflow (train/img_per_s) and one line per epoch, which logs keep when there is no terminal
    for the progress bar."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start, self.seen = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += len(batch[1]) * trainer.world_size

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        rate = self.seen / (time.perf_counter() - self.start)
        pl_module.log("train/img_per_s", rate)
        shown = {k: f"{v.item():.4g}" for k, v in trainer.callback_metrics.items() if k in ("train/loss", "val/top1")}
        rank_zero_info(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: "
                       + " ".join(f"{k} {v}" for k, v in shown.items()) + f" ({rate:.0f} img/s)")


def precision_for(cfg: TrainConfig) -> str:
    if cfg.precision:
        return cfg.precision
    if cfg.accelerator == "tpu":
        return "bf16-true"  # XLA: bf16-mixed is not supported
    gpu = torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda")
    return "bf16-mixed" if gpu else "32-true"


def fit(module: Classifier, dm: ShardDataModule, cfg: TrainConfig, epochs: int, experiment: str, run_name: str,
        params: dict) -> MLFlowLogger:
    """Run a Lightning Trainer with MLflow logging; returns the logger (its run_id names the MLflow run)."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    logger = MLFlowLogger(experiment_name=experiment, run_name=run_name, tracking_uri=tracking.tracking_uri(),
                          artifact_location=None, tags={"stage": run_name.split("@")[0]})
    tracking.experiment(experiment)  # creates it with the workspace artifact location before Lightning does
    logger.log_hyperparams(params)
    callbacks = [LearningRateMonitor(logging_interval="step"), EpochSummary()]
    if cfg.progress_bar:
        callbacks.append(RichProgressBar())
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
        strategy=cfg.strategy, precision=precision_for(cfg), logger=logger, callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=cfg.progress_bar, log_every_n_steps=1,
        enable_model_summary=False, default_root_dir=".lightning",
    )
    trainer.fit(module, datamodule=dm)
    return logger


def run(params: Params, variant_key: str, shards: Path, out: Path) -> Path:
    """Train variant `variant_key` on SHARDS; write the model bundle to OUT."""
    cfg, variant = params.train, params.variant(variant_key)
    recipe = variant.recipe
    dm_probe = ShardDataModule(shards, None, None, cfg.batch_size, params.data.num_workers, 0)
    classes = dm_probe.classes
    model = models.build(variant, len(classes), cfg.drop_rate, cfg.drop_path_rate, cfg.bn_momentum, cfg.pretrained)
    if cfg.pretrained_file:
        models.load_weights(model, cfg.pretrained_file, variant.name)
    elif not cfg.pretrained:
        # TF's head init, uniform(+-1/sqrt(classes)), is scaled for 1000 classes; with few classes it starts
        # far above chance loss and stalls training from scratch. A small normal init starts at chance.
        nn.init.normal_(model.get_classifier().weight, std=0.01)
        nn.init.zeros_(model.get_classifier().bias)
    dc = models.data_config(model, variant, cfg.img_size)
    dm = ShardDataModule(shards, transforms.train_transform(dc, cfg.auto_augment, cfg.crop_scale), transforms.eval_transform(dc),
                         cfg.batch_size, params.data.num_workers, params.data.shuffle_buffer, cfg.seed)
    devices = cfg.devices if isinstance(cfg.devices, int) else 1
    global_batch = cfg.batch_size * devices * cfg.num_nodes
    lr = cfg.lr or recipe.lr * global_batch / recipe.batch_size  # linear scaling rule from the card's batch
    optimizer = dict(opt=cfg.opt, lr=lr, momentum=recipe.momentum,
                     weight_decay=recipe.weight_decay if cfg.weight_decay is None else cfg.weight_decay)
    if cfg.opt == "rmsproptf":
        optimizer |= dict(alpha=recipe.rmsprop_decay, eps=1e-3)  # TF RMSProp: decay 0.9, epsilon 1e-3
    schedule = dict(sched="step", decay_epochs=cfg.decay_epochs, decay_rate=cfg.decay_rate,
                    warmup_epochs=cfg.warmup_epochs, warmup_lr=lr * 0.01)
    smoothing = recipe.label_smoothing if cfg.label_smoothing is None else cfg.label_smoothing
    module = Classifier(model, len(classes), optimizer, schedule, smoothing)
    fit(module, dm, cfg, cfg.epochs, params.mlflow.experiment, f"train@{variant_key}",
        {**cfg.model_dump(), "variant": variant.name, "lr_scaled": lr, "global_batch": global_batch,
         "img_size": dc["img_size"], "num_classes": len(classes)})
    spec = models.ModelSpec(variant=variant_key, model=None if variant.phi is not None else variant.name,
                            phi=variant.phi, classes=classes, **dc)
    models.save_bundle(model, spec, out)
    return Path(out)
