"""The training library: the LightningModule (`Classifier`), its callbacks, checkpoint/resume, and `fit`, which
runs a Lightning Trainer with MLflow logging. The train and fixres stages both train through it."""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from effnet import io, tracking
from effnet.config import TrainConfig
from effnet.data.feed import cuda_usable
from effnet.data.stream import ShardDataModule
from effnet.errors import EffnetError

log = logging.getLogger(__name__)


class Classifier(pl.LightningModule):
    """Cross-entropy training of `model`. With `trainable` set, only those submodules learn and run in train
    mode (BatchNorm statistics update); the rest stays frozen in eval mode. With `ema_decay`, an exponential
    moving average of the weights (timm's ModelEmaV3, decay warmed up from 0) follows every optimizer step and is
    the model validated (`eval_model`); it is a submodule, so checkpoints carry it. With `channels_last`, the
    model (and so its EMA copy) is converted to NHWC; with `compile`, its forward is torch.compile'd in place
    (state_dict keys unchanged), after the EMA has copied it. `speedups` gives both from the train config."""

    def __init__(self, model: nn.Module, num_classes: int, optimizer: dict, schedule: dict | None,
                 label_smoothing: float, trainable: list[str] | None = None, ema_decay: float | None = None,
                 compile: bool = False, channels_last: bool = False):
        super().__init__()
        if channels_last:
            model.to(memory_format=torch.channels_last)  # in place
        self.model, self.optimizer, self.schedule, self.trainable = model, optimizer, schedule, trainable
        self.ema = None if ema_decay is None else ModelEmaV3(model, decay=ema_decay, use_warmup=True)
        self.nonfinite: torch.Tensor | None = None  # on the device: did any loss since the last check overflow?
        if self.ema is not None:
            self.ema.requires_grad_(False)  # updated by lerp, never by the optimizer (nor DDP's gradient sync)
        if compile:  # static shapes: a new resolution retraces timm's 'same' padding symbolically (minutes)
            model.compile(dynamic=False)
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.train_top1 = MulticlassAccuracy(num_classes, average="micro")
        self.val_top1 = MulticlassAccuracy(num_classes, average="micro")
        if trainable is not None:
            for p in model.parameters():
                p.requires_grad_(False)
            for name in trainable:
                for p in model.get_submodule(name).parameters():
                    p.requires_grad_(True)

    @property
    def eval_model(self) -> nn.Module:
        """The model to validate and export: the EMA when there is one."""
        return self.model if self.ema is None else self.ema.module

    def on_train_epoch_start(self) -> None:
        if self.trainable is not None:  # Lightning put everything in train mode: re-freeze
            self.model.eval()
            for name in self.trainable:
                self.model.get_submodule(name).train()

    def training_step(self, batch, _):
        x, y = batch
        logits = self.model(x)
        loss = self.loss(logits, y)
        # Reading the loss on the host would stall the GPU every step: a non-finite loss is remembered on the
        # device and checked when metrics are logged anyway, and before any checkpoint is written.
        bad = ~torch.isfinite(loss.detach())
        self.nonfinite = bad if self.nonfinite is None else self.nonfinite | bad
        if self.global_step % self.trainer.log_every_n_steps == 0:
            self.check_finite()
        self.train_top1(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/top1", self.train_top1, on_step=True, on_epoch=False)
        return loss

    def check_finite(self) -> None:
        if self.nonfinite is not None and bool(self.nonfinite):
            raise EffnetError(f"loss is not finite (nan or inf) by step {self.global_step}: stopping (lower the LR?)")

    def on_save_checkpoint(self, checkpoint) -> None:
        self.check_finite()  # never save weights a non-finite loss has already updated

    def on_train_end(self) -> None:
        self.check_finite()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:  # global_step has just counted this optimizer step: it drives the warm-up
            self.ema.update(self.model, step=self.global_step)

    def validation_step(self, batch, _):
        x, y, _keys = batch
        logits = self.eval_model(x)
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


class ProgressBar(RichProgressBar):
    """Rich's bar, reading the logged metrics (a device sync) only at the logging interval, not every step."""

    shown: dict | None = None

    def get_metrics(self, trainer, pl_module) -> dict:
        if self.shown is None or not trainer.training or trainer.global_step % trainer.log_every_n_steps == 0:
            self.shown = super().get_metrics(trainer, pl_module)
        return self.shown


class EpochSummary(pl.Callback):
    """Throughput to MLflow (train/img_per_s) and one line per epoch, which logs keep when there is no terminal
    for the progress bar."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start, self.seen = time.perf_counter(), 0

    on_train_start = on_train_epoch_start  # a resume mid-epoch starts there, without an epoch start

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
    return "bf16-mixed" if cuda_usable(cfg.accelerator) else "32-true"


def on_for(setting: bool | str, cfg: TrainConfig) -> bool:
    """A `true | false | auto` train setting; auto: on where the Trainer runs on CUDA."""
    return cuda_usable(cfg.accelerator) if setting == "auto" else bool(setting)


def speedups(cfg: TrainConfig) -> dict[str, bool]:
    """Classifier's compile and channels_last settings from the train config (`auto`: on with CUDA)."""
    return dict(compile=on_for(cfg.compile, cfg), channels_last=on_for(cfg.channels_last, cfg))


LAST = "last.ckpt"
RUN_FILE = "run.json"  # beside the checkpoint: the MLflow run it belongs to and the params it was made with


def fingerprint(params: dict, manifest: dict) -> str:
    """What a checkpoint is only valid for: the logged params and the data. Any change starts afresh."""
    return io.sha256_json({"params": params, "manifest": manifest})


@rank_zero_only
def prepare_checkpoints(folder: Path, fp: str, resume: bool) -> str | None:
    """The MLflow run_id to continue when FOLDER holds a resumable checkpoint made with the same fingerprint;
    otherwise empty FOLDER (a stale or unwanted checkpoint) and return None."""
    meta = folder / RUN_FILE
    if resume and (folder / LAST).is_file() and meta.is_file():
        saved = json.loads(meta.read_text())
        if saved.get("fingerprint") == fp:
            return saved["run_id"]
        log.warning("%s: made with other params or data: starting afresh", folder / LAST)
    shutil.rmtree(folder, ignore_errors=True)
    return None


@rank_zero_only
def write_run_file(folder: Path, run_id: str, fp: str) -> None:
    io.write_atomic(folder / RUN_FILE, json.dumps({"run_id": run_id, "fingerprint": fp}))


def checkpoint_callbacks(folder: Path, every_n_steps: int | None) -> list[ModelCheckpoint]:
    """One `last.ckpt`, rewritten at each epoch end and every N optimizer steps. Lightning writes a local
    checkpoint inside an fsspec transaction (a temp file renamed into place on commit), so a kill -9 leaves the
    previous checkpoint or the new one, never a torn file."""
    kw = dict(dirpath=folder, filename=LAST.removesuffix(".ckpt"), save_top_k=1, enable_version_counter=False)
    callbacks = [ModelCheckpoint(every_n_epochs=1, **kw)]  # at validation end: the epoch's val metrics included
    if every_n_steps:
        callbacks.append(ModelCheckpoint(every_n_train_steps=every_n_steps, every_n_epochs=0, **kw))
    return callbacks


def fit(module: Classifier, dm: ShardDataModule, cfg: TrainConfig, epochs: int, experiment: str, run_name: str,
        params: dict, checkpoints: Path | None = None) -> str | None:
    """Run a Lightning Trainer with MLflow logging (PARAMS logged as the run's params); returns the MLflow run id
    (None on DDP ranks other than 0, which log nothing).

    With CHECKPOINTS (a folder), save `last.ckpt` there as `checkpoint_callbacks` says and, with `cfg.resume`,
    continue from it and its MLflow run when it was made with the same params and data."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    fp = fingerprint(params, dm.manifest)
    run_id = prepare_checkpoints(Path(checkpoints), fp, cfg.resume) if checkpoints else None
    stage, _, variant_key = run_name.partition("@")
    experiment_id = tracking.experiment(experiment)  # created with the workspace artifact location, not Lightning's
    parent = experiment_id if rank_zero_only.rank == 0 else None  # only rank 0 may create the pipeline's parent run
    logger = MLFlowLogger(experiment_name=experiment, run_name=run_name, tracking_uri=tracking.tracking_uri(),
                          artifact_location=None, run_id=run_id,
                          tags={"stage": stage, **tracking.run_tags(variant_key, params, stage, experiment_id=parent)})
    logger.log_hyperparams(params)  # on resume: the same values again, which MLflow accepts
    callbacks = [LearningRateMonitor(logging_interval="step"), EpochSummary()]
    if cfg.progress_bar:
        callbacks.append(ProgressBar())
    ckpt_path = None
    if checkpoints:
        write_run_file(Path(checkpoints), logger.run_id, fp)
        callbacks += checkpoint_callbacks(Path(checkpoints), cfg.checkpoint_every_n_steps)
        last = Path(checkpoints) / LAST
        ckpt_path = str(last) if last.is_file() else None  # DDP ranks > 0 see what rank 0 left
        if ckpt_path:
            rank_zero_info(f"resuming from {last} (MLflow run {run_id})")
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
        strategy=cfg.strategy, precision=precision_for(cfg), logger=logger, callbacks=callbacks,
        enable_checkpointing=bool(checkpoints), enable_progress_bar=cfg.progress_bar, log_every_n_steps=cfg.log_every_n_steps,
        enable_model_summary=False, default_root_dir=".lightning",
    )
    try:  # MLFlowLogger creates its run through the client, which starts no system metrics monitor by itself
        with tracking.system_metrics(logger.run_id if trainer.is_global_zero else None, resume=run_id is not None):
            trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    except EffnetError as e:  # NaN loss: the checkpoint folder stays, holding the last checkpoint saved before it
        kept = Path(checkpoints) / LAST if checkpoints else None
        raise EffnetError(f"{e}; last good checkpoint kept: {kept}" if kept and kept.is_file() else str(e)) from None
    return logger.run_id if trainer.is_global_zero else None
