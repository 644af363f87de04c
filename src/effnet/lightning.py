"""The training library: the LightningModule (`Classifier`), its callbacks, checkpoint/resume, the Trainer
(`make_trainer`: its devices resolved before anything else is built, so the global batch is known) and `fit`, which
runs it with MLflow logging on rank 0. The train and fixres stages both train through it.

Under DDP, however launched (Lightning's own launcher, torchrun, srun: every rank runs the same command), only rank
0 touches MLflow, the checkpoint folder's run file and the stage's outputs; the other ranks only read the checkpoint
folder, and only before the ranks first meet."""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import signal
import time
from datetime import timedelta
from io import BytesIO
from pathlib import Path

import psutil
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO, XLACheckpointIO
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, RichProgressBar
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.loggers.logger import DummyLogger
from pytorch_lightning.plugins.layer_sync import LayerSync
from pytorch_lightning.strategies import StrategyRegistry
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from timm.layers import BatchNormAct2d
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics.aggregation import MeanMetric, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from effnet import io, models, tracking
from effnet.config import TrainConfig
from effnet.data import datamodule, train_stream
from effnet.data.feed import cuda_usable
from effnet.data.regularise import Regularise
from effnet.data.datamodule import ShardDataModule
from effnet.errors import EffnetError, Preempted

log = logging.getLogger(__name__)


class Ema(ModelEmaV3):
    """timm's ModelEmaV3, its update reading the two models' tensors from lists made once instead of two
    state_dict() calls per step (on a CPU, three quarters of the update's time). The same tensors get the same
    lerp (copy for integer buffers); the lists are made again after either model moves (`.to()` replaces
    buffers; parameters keep their identity)."""

    _made_for: tuple = ()  # (model, its first buffer, the EMA's first buffer) when the lists were made
    _floating: tuple[list, list] = ([], [])  # (EMA tensors, model tensors): lerped
    _integer: list[tuple] = []  # (EMA tensor, model tensor): copied

    def apply_update_(self, model, decay: float):
        if not self.foreach:
            return super().apply_update_(model, decay)
        made_for = (model, next(model.buffers(), None), next(self.module.buffers(), None))
        if len(made_for) != len(self._made_for) or any(a is not b for a, b in zip(made_for, self._made_for)):
            both = list(zip(self.module.state_dict(keep_vars=True).values(), model.state_dict(keep_vars=True).values()))
            floating = [pair for pair in both if pair[0].is_floating_point()]
            self._floating = ([e for e, _ in floating], [m for _, m in floating])
            self._integer = [pair for pair in both if not pair[0].is_floating_point()]
            self._made_for = made_for
        for ema_v, model_v in self._integer:
            ema_v.copy_(model_v)
        self._foreach_lerp_(*self._floating, weight=1. - decay)


class Classifier(pl.LightningModule):
    """Cross-entropy training of `model`. With `trainable` set, only those submodules learn and run in train
    mode (BatchNorm statistics update); the rest stays frozen in eval mode. With `ema_decay`, an exponential
    moving average of the weights (timm's ModelEmaV3, decay warmed up from 0) follows every optimizer step (not
    every batch, under gradient accumulation) and is the model validated (`eval_model`); it is a submodule, so
    checkpoints carry it. With `regularise` (random erasing, Mixup/CutMix), training batches go through it first;
    mixed soft targets are trained against with timm's SoftTargetCrossEntropy (the smoothing is in the targets).
    With `channels_last`, the model (and so its EMA copy) is converted to NHWC; with `compile`, its forward is
    torch.compile'd in place (state_dict keys unchanged), after the EMA has copied it. `speed_settings` gives both
    from the train config. With `soft_targets`, the training batches' targets are class vectors (a Noisy Student's
    mixed stream), trained against with SoftTargetCrossEntropy."""

    def __init__(self, model: nn.Module, num_classes: int, optimizer: dict, schedule: dict | None,
                 label_smoothing: float, trainable: list[str] | None = None, ema_decay: float | None = None,
                 compile: bool = False, channels_last: bool = False, regularise: Regularise | None = None,
                 soft_targets: bool = False):
        super().__init__()
        if channels_last:
            model.to(memory_format=torch.channels_last)  # in place
        self.model, self.optimizer, self.schedule, self.trainable = model, optimizer, schedule, trainable
        self.ema = None if ema_decay is None else Ema(model, decay=ema_decay, use_warmup=True)
        self.nonfinite: torch.Tensor | None = None  # on the device: did any loss since the last check overflow?
        if self.ema is not None:
            self.ema.requires_grad_(False)  # updated by lerp, never by the optimizer (nor DDP's gradient sync)
        if compile:  # static shapes: a new resolution retraces timm's 'same' padding symbolically (minutes)
            model.compile(dynamic=False)
        self.regularise = regularise
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        soft = soft_targets or (regularise is not None and regularise.mixes)
        self.train_loss = SoftTargetCrossEntropy() if soft else self.loss
        # No host reads in the training step (a GPU stall, a graph cut short on XLA): the labels (from the manifest)
        # are not checked by a torch.unique per step, nor the loss for NaN by MeanMetric (`check_finite` does that).
        self.train_top1 = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_top1 = MulticlassAccuracy(num_classes, average="micro")
        self.val_images = SumMetric()  # across ranks: each val image is counted once
        self.epoch_loss = MeanMetric(nan_strategy="disable")  # the epoch's mean training loss, for `Curves`
        self.epoch_loss.persistent(True)  # in the checkpoint: an epoch resumed mid-way keeps its whole mean
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

    def on_train_start(self) -> None:
        # A tensor from the first step on (also after a resume): every step traces the same ops (one XLA graph).
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)

    def on_train_epoch_start(self) -> None:
        if self.trainable is not None:  # Lightning put everything in train mode: re-freeze
            self.model.eval()
            for name in self.trainable:
                self.model.get_submodule(name).train()

    def training_step(self, batch, _):
        x, y = batch
        inputs, targets = (x, y) if self.regularise is None else self.regularise(x, y)
        logits = self.model(inputs)
        loss = self.train_loss(logits, targets)
        # Reading the loss on the host would stall the GPU every step: a non-finite loss is remembered on the
        # device and checked after the step when metrics are logged anyway, and before any checkpoint is written.
        bad = ~torch.isfinite(loss.detach())
        self.nonfinite = bad if self.nonfinite is None else self.nonfinite | bad
        self.train_top1(logits, y.argmax(1) if y.ndim == 2 else y)  # soft targets (a student's): their top class
        self.epoch_loss.update(loss.detach())
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/top1", self.train_top1, on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if (self.global_step - 1) % self.trainer.log_every_n_steps == 0:  # the step just taken, at the interval
            self.check_finite()

    def check_finite(self) -> None:
        if self.nonfinite is not None and bool(self.nonfinite):
            raise EffnetError(f"loss is not finite (nan or inf) by step {self.global_step}: stopping (lower the LR?)")

    def on_save_checkpoint(self, checkpoint) -> None:
        self.check_finite()  # never save weights a non-finite loss has already updated

    def on_train_end(self) -> None:
        self.check_finite()

    def optimizer_step(self, *args, **kwargs) -> None:
        """The optimizer's step, then the EMA's: once per optimizer step (batches that only accumulate gradients
        do not step), before any callback sees the batch end, so a checkpoint saved there holds both. Lightning
        counts the step in global_step right after this returns; that count drives the EMA's warm-up."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step + 1)
            if self.device.type == "xla":  # the EMA's update as a graph of its own, run now (the optimizer's ran in
                import torch_xla  # Lightning's `mark_step`): each step's graphs the same, whether a checkpoint or
                torch_xla.sync()  # validation comes next or not

    def validation_step(self, batch, _):
        x, y, _keys = batch
        logits = self.eval_model(x)
        self.val_top1(logits, y)
        self.val_images.update(len(y))
        self.log("val/loss", self.loss(logits, y), on_epoch=True, sync_dist=True, batch_size=len(y))
        self.log("val/top1", self.val_top1, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log("val/images", self.val_images, on_epoch=True, batch_size=len(y))

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
    """One line per epoch, which logs keep when there is no terminal for the progress bar, with the training rate
    (train/img_per_s in MLflow: the training batches alone, validation left out, so that it compares with a
    model-only step); and once, how long after the process started the first step ended (imports, MLflow, Trainer,
    loader workers: the start-up a user waits through)."""

    def __init__(self):
        self.first_step_done = False

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start = self.last = time.perf_counter()
        self.seen = 0

    on_train_start = on_train_epoch_start  # a resume mid-epoch starts there, without an epoch start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += len(batch[1]) * trainer.world_size
        self.last = time.perf_counter()
        if not self.first_step_done:
            self.first_step_done = True
            rank_zero_info(f"first step after {time.time() - psutil.Process().create_time():.1f} s "
                           "(from the process start)")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        rate = self.seen / max(self.last - self.start, 1e-9)
        pl_module.log("train/img_per_s", rate)
        shown = {k: f"{v.item():.4g}" for k, v in trainer.callback_metrics.items() if k in ("train/loss", "val/top1")}
        rank_zero_info(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: "
                       + " ".join(f"{k} {v}" for k, v in shown.items()) + f" ({rate:.0f} img/s train)")


class Curves(pl.Callback):
    """The training curves, one row per epoch: its mean training loss and the val top-1 (%) after it (the train
    stage writes them for `dvc plots`). The rows are in the checkpoint, and an epoch's row is made at validation end,
    before Lightning saves that epoch's checkpoint there: a resumed run's curves are whole."""

    def __init__(self):
        self.rows: list[dict] = []

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.rows = list(state["rows"])

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        loss = pl_module.epoch_loss.compute().item()  # every rank: the mean over all of them
        pl_module.epoch_loss.reset()
        self.rows.append({"epoch": trainer.current_epoch + 1, "train_loss": round(loss, 4),
                          "val_top1": round(100 * trainer.callback_metrics["val/top1"].item(), 4)})


def curves(trainer: pl.Trainer) -> list[dict]:
    """The rows `Curves` made during TRAINER's fit."""
    return next(c for c in trainer.callbacks if isinstance(c, Curves)).rows


# What `train.channels_last: auto`, `train.compile: auto` and `train.precision: null` choose on each kind of
# device, from measurement. CPU (bench/cpu_bench.py, 2 cores): channels_last trains 1.5-1.8x faster than NCHW
# in fp32, bf16 autocast is no faster, and torch.compile's minutes of compiling outweigh what it saves on a CPU-sized
# run. CUDA (../PERF.md, H200): bf16 + channels_last 2.3x fp32 NCHW, compile 1.4x more. TPU: XLA picks its layouts.
AUTO = {"cuda": dict(channels_last=True, compile=True, precision="bf16-mixed"),
        "cpu": dict(channels_last=True, compile=False, precision="32-true"),
        "tpu": dict(channels_last=False, compile=False, precision="bf16-true"),  # XLA: no bf16-mixed
        "other": dict(channels_last=False, compile=False, precision="32-true")}  # mps...: unmeasured, plain


def device_kind(accelerator: str) -> str:
    """The AUTO row for the Trainer's ACCELERATOR: cuda when it would use CUDA, cpu for `cpu` (and `auto` without
    CUDA), tpu, or other."""
    if cuda_usable(accelerator):
        return "cuda"
    return accelerator if accelerator in ("cpu", "tpu") else "cpu" if accelerator == "auto" else "other"


def speed_settings(cfg: TrainConfig) -> dict:
    """channels_last, compile and precision for CFG: each as set, or where `auto`/null, the AUTO row's."""
    auto = AUTO[device_kind(cfg.accelerator)]
    return dict(channels_last=auto["channels_last"] if cfg.channels_last == "auto" else bool(cfg.channels_last),
                compile=auto["compile"] if cfg.compile == "auto" else bool(cfg.compile),
                precision=cfg.precision or auto["precision"])


def log_speed_settings(cfg: TrainConfig) -> dict:
    """Say what the speed settings came to on this device, once, and return them for the run's params."""
    chosen = speed_settings(cfg)
    how = {k: "set" if getattr(cfg, k) not in ("auto", None) else f"auto on {device_kind(cfg.accelerator)}"
           for k in chosen}
    rank_zero_info("speed: " + ", ".join(f"{k} {v} ({how[k]})" for k, v in chosen.items()))
    return {f"speed.{k}": v for k, v in chosen.items()}


LAST = "last.ckpt"
PREVIOUS = "previous.ckpt"  # the last.ckpt before the current one: what a resume falls back to
BEST = "best.ckpt"  # with early stopping: the checkpoint of the epoch with the best val top-1
RUN_FILE = "run.json"  # beside the checkpoint: the MLflow run it belongs to and the params it was made with
CHECKSUMS = "checksums.json"  # beside the checkpoints: the sha256 (and step) of each one written whole
MONITOR = "val/top1"


def fingerprint(params: dict, manifest: dict) -> str:
    """What a checkpoint is only valid for: the logged params and the data. Any change starts afresh."""
    return io.sha256_json({"params": params, "manifest": manifest})


def read_checksums(folder: Path) -> dict[str, dict]:
    try:
        return json.loads((Path(folder) / CHECKSUMS).read_text())
    except (OSError, ValueError):
        return {}


def checked(path: Path) -> dict | None:
    """The checksums entry ({sha256, step}) that PATH's bytes match, or None: a file cut short or with flipped
    bytes (as a failing disk or a full one leaves it), or one written by no save that completed. Any entry will do:
    `CheckedCheckpointIO` lists the new sum before it renames, so a save killed between its steps leaves every file
    it has not finished matching none."""
    if not path.is_file():
        return None
    digest = io.sha256_file(path)
    return next((e for e in read_checksums(path.parent).values() if e.get("sha256") == digest), None)


class CheckedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, each file written whole, with its sha256 listed in `checksums.json` beside it,
    and `last.ckpt`'s former self kept as `previous.ckpt`, so that a resume can refuse a corrupt checkpoint and go
    on from the one before. A save that fails (a full disk) removes what it wrote and stops the run in one line
    naming the file; the checkpoints already there are left as they were. Read back with `weights_only` (tensors
    and plain values only: loading a checkpoint runs no code)."""

    def on_host(self, checkpoint: dict) -> dict:
        """CHECKPOINT with its tensors where `torch.save` can write them from: as they are."""
        return checkpoint

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        buffer = BytesIO()
        torch.save(self.on_host(checkpoint), buffer)
        data = buffer.getbuffer()
        sums = read_checksums(path.parent)
        entry = {"sha256": hashlib.sha256(data).hexdigest(), "step": checkpoint.get("global_step")}
        rotate = path.name == LAST and path.is_file()
        listed = {**sums, path.name: entry}
        if rotate:
            listed[PREVIOUS] = sums.get(LAST, {})
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            io.write_atomic(path.parent / CHECKSUMS, json.dumps(listed, indent=1))
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise EffnetError(f"{path}: checkpoint not written: {e.strerror or e}") from None
        if rotate:
            os.replace(path, path.with_name(PREVIOUS))
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return super().load_checkpoint(path, map_location=map_location or (lambda storage, loc: storage),
                                       weights_only=True)


class CheckedXLACheckpointIO(CheckedCheckpointIO, XLACheckpointIO):
    """`CheckedCheckpointIO` for Lightning's XLA strategies (which take an XLACheckpointIO only): the pending graph
    run first (the last step's EMA update follows the optimizer's `mark_step`), then every tensor copied to the host,
    as Lightning's own XLA writer does: the file loads where there is no XLA device (a CPU, `effnet fixres`)."""

    def on_host(self, checkpoint: dict) -> dict:
        import torch_xla
        import torch_xla.core.xla_model as xm
        torch_xla.sync()
        return xm._maybe_convert_to_cpu(checkpoint, convert=True)


def checkpoint_io(accelerator: str) -> CheckedCheckpointIO:
    return CheckedXLACheckpointIO() if accelerator == "tpu" else CheckedCheckpointIO()


def resume_point(folder: Path, fp: str, resume: bool) -> tuple[str | None, str | None]:
    """(MLflow run id, checkpoint) to continue when FOLDER holds a resumable checkpoint made with fingerprint FP,
    else (None, None): `last.ckpt`, or where it does not match its checksum, `previous.ckpt`, each refusal said in
    one line. It only reads: every rank asks before the ranks meet; rank 0 empties a stale folder after they have
    (`RunFile`), so that no rank reads what another is removing."""
    meta = folder / RUN_FILE
    candidates = [folder / name for name in (LAST, PREVIOUS) if (folder / name).is_file()]
    if not (resume and candidates and meta.is_file()):
        return None, None
    saved = json.loads(meta.read_text())
    if saved.get("fingerprint") != fp:
        rank_zero_warn(f"{candidates[0]}: made with other params or data: starting afresh")
        return None, None
    for path in candidates:
        if (entry := checked(path)) is not None:
            return saved["run_id"], str(path)
        rest = "trying the one before" if path.name == LAST and len(candidates) > 1 else "starting afresh"
        rank_zero_warn(f"{path}: corrupt (its bytes match no checksum in {CHECKSUMS}): refused; {rest}")
    return None, None


class RunFile(pl.Callback):
    """Once every rank has decided whether it resumes (`resume_point`): checks they agree (they read the same folder
    only when it is on storage all nodes share); then rank 0 empties the folder when starting afresh (a stale or
    unwanted checkpoint) and writes the run file: the MLflow run and the fingerprint that a resume must match."""

    def __init__(self, folder: Path, fp: str, resuming: bool, corrupt: Path | None = None):
        self.folder, self.fp, self.resuming, self.corrupt = folder, fp, resuming, corrupt

    def setup(self, trainer, pl_module, stage) -> None:
        every = trainer.strategy.reduce_boolean_decision(self.resuming, all=True)
        some = trainer.strategy.reduce_boolean_decision(self.resuming, all=False)
        if some and not every:
            raise EffnetError(f"{self.folder / LAST}: seen by some ranks only: train.checkpoint_dir must be on storage "
                              "every node shares to resume")
        if trainer.is_global_zero:
            if not self.resuming:
                shutil.rmtree(self.folder, ignore_errors=True)
            elif self.corrupt:  # resuming from the one before: the next save must not keep this as the fallback
                self.corrupt.unlink(missing_ok=True)
            io.write_atomic(self.folder / RUN_FILE, json.dumps({"run_id": trainer.logger.run_id,
                                                                 "fingerprint": self.fp}))


class StepCheckpoint(ModelCheckpoint):
    """Every N optimizer steps, but not at an epoch's last batch: the epoch-end checkpoint follows once validation
    has run, and validating draws from the process RNG (its loader's seed), which a resume from before it could
    not replay in order."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 < trainer.num_training_batches:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def checkpoint_callbacks(folder: Path, every_n_steps: int | None, best: bool = False) -> list[ModelCheckpoint]:
    """One `last.ckpt`, rewritten at each epoch end and every N optimizer steps; with BEST, also `best.ckpt`, the
    epoch with the best val top-1. Lightning writes a local checkpoint inside an fsspec transaction (a temp file
    renamed into place on commit), so a kill -9 leaves the previous checkpoint or the new one, never a torn file."""
    kw = dict(dirpath=folder, save_top_k=1, enable_version_counter=False)
    callbacks = [ModelCheckpoint(filename=LAST.removesuffix(".ckpt"), every_n_epochs=1, **kw)]  # at validation end
    if every_n_steps:
        callbacks.append(StepCheckpoint(filename=LAST.removesuffix(".ckpt"), every_n_train_steps=every_n_steps,
                                        every_n_epochs=0, **kw))
    if best:
        callbacks.append(ModelCheckpoint(filename=BEST.removesuffix(".ckpt"), monitor=MONITOR, mode="max", **kw))
    return callbacks


def process_rng(device: torch.device | None = None) -> dict:
    """The training process's RNG states (python, numpy, torch CPU and CUDA; on an XLA DEVICE, its own), as plain
    values."""
    state = train_stream.rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    if device is not None and device.type == "xla":
        import torch_xla.core.xla_model as xm
        state["xla"] = xm.get_rng_state(device)
    return state


def set_process_rng(state: dict, device: torch.device | None = None) -> None:
    train_stream.set_rng_state(state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    if "xla" in state and device is not None and device.type == "xla":
        import torch_xla.core.xla_model as xm
        xm.set_rng_state(state["xla"], device)


class XlaSeed(pl.Callback):
    """On an XLA device, its RNG (dropout and drop path draw from it there) seeded with SEED as the run starts:
    torch's seed (`pl.seed_everything`) does not reach it, and it goes on from wherever the process left it."""

    def __init__(self, seed: int):
        self.seed = seed

    def setup(self, trainer, pl_module, stage) -> None:
        device = trainer.strategy.root_device
        if device.type == "xla":
            import torch_xla.core.xla_model as xm
            xm.set_rng_state(self.seed, device)


class ProcessRng(pl.Callback):
    """Every checkpoint records each rank's RNG states (dropout, stochastic depth and the regularisers draw from
    them); a resumed run sets them just before its first training step, after anything that starts the loaders has
    drawn, so it goes on drawing what the interrupted run would have. Together with the stream's own state
    (`ShardDataModule`) and the module's (weights, EMA, optimizer, schedule) this makes a resume exact."""

    def __init__(self):
        self.restored: list[dict] | None = None
        self.device: torch.device | None = None

    def setup(self, trainer, pl_module, stage) -> None:
        self.device = trainer.strategy.root_device

    def state_dict(self) -> dict:  # a collective: every rank saves the checkpoint's dict
        return {"ranks": datamodule.per_rank(process_rng(self.device))}

    def load_state_dict(self, state: dict) -> None:
        self.restored = state["ranks"]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.restored is not None:
            if len(self.restored) == trainer.world_size:
                set_process_rng(self.restored[trainer.global_rank], self.device)
            self.restored = None


class SaveOnSigterm(pl.Callback):
    """SIGTERM (what SLURM and Kubernetes send before they stop a job, on a cluster often to one node's processes
    only) ends training after the next optimizer step (not an epoch's last: its validation and epoch-end checkpoint
    come first, as for `StepCheckpoint`): at each step's end the ranks agree whether any of them got it, then save
    `last.ckpt` together, as a step checkpoint, and raise `Preempted`. It replaces Lightning's
    handler, which acts on rank 0's signal only and broadcasts from inside the handler, out of step with the
    other ranks' collectives (two ranks hung until torchrun killed them); Lightning restores the process's
    handlers when training ends."""

    def __init__(self, path: Path):
        self.path, self.received, self._steps_before = path, False, 0

    def on_train_start(self, trainer, pl_module) -> None:
        signal.signal(signal.SIGTERM, self._received)

    def _received(self, signum, frame) -> None:
        self.received = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._steps_before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stepped = trainer.global_step > self._steps_before  # accumulated gradients are not in a checkpoint
        last = batch_idx + 1 == trainer.num_training_batches
        if stepped and not last and trainer.strategy.reduce_boolean_decision(self.received, all=False):
            trainer.save_checkpoint(self.path)
            raise Preempted(f"stopped by SIGTERM at step {trainer.global_step}; checkpoint saved: {self.path} "
                            "(run the stage again to resume)")


class GlobalBatchNorm(LayerSync):
    """Lightning's layer-sync plugin (`sync_batchnorm`) with `models.SyncBatchNormAct2d` for timm's BatchNormAct2d
    layers (torch's converter would turn them into plain SyncBatchNorm, dropping their activation; torch's
    SyncBatchNorm also refuses CPU modules)."""

    def apply(self, model: nn.Module) -> nn.Module:
        layers = sum(type(m) is BatchNormAct2d for m in model.modules())
        rank_zero_info(f"cross-replica BatchNorm: {layers} layers take their statistics over every rank's batch")
        return _swap_class(model, BatchNormAct2d, models.SyncBatchNormAct2d)

    def revert(self, model: nn.Module) -> nn.Module:
        return _swap_class(model, models.SyncBatchNormAct2d, BatchNormAct2d)


def _swap_class(model: nn.Module, old: type, new: type) -> nn.Module:
    """Same attributes and state, another forward: in place."""
    for module in model.modules():
        if type(module) is old:
            module.__class__ = new
    return model


class SkippedSamples(pl.Callback):
    """Samples the training stream skipped because their shard went bad (`train_stream.TrainStream._usable`), added
    up over every loader worker and rank at each logging interval and epoch end (a collective: every rank runs the
    same steps), logged as `data/skipped`, and past the datamodule's `max_skipped` share of the samples read
    (against at least one epoch's worth, so that one bad sample early stops nothing) the run stops on every rank
    together, in one line naming the shard that lost the most."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % trainer.log_every_n_steps == 0:
            self.check(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.check(trainer, pl_module)

    def check(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        if not isinstance(dm, ShardDataModule) or dm.stream is None:
            return
        positions = dm.stream.positions.values()
        skipped: dict[str, int] = {}
        for p in positions:
            for url, n in p.skipped.items():
                skipped[url] = skipped.get(url, 0) + n
        local = torch.tensor([sum(p.read for p in positions), sum(skipped.values())], dtype=torch.float64,
                             device=pl_module.device)
        read, total = (int(v) for v in trainer.strategy.reduce(local, reduce_op="sum"))
        if trainer.is_global_zero and trainer.logger is not None:
            trainer.logger.log_metrics({"data/skipped": float(total)}, step=trainer.global_step)
        epoch = dm.stream.steps * dm.batch_size * trainer.world_size
        if total <= dm.max_skipped * max(read, epoch):
            return
        every: dict[str, int] = {}
        for rank in datamodule.per_rank(skipped):
            for url, n in rank.items():
                every[url] = every.get(url, 0) + n
        worst = max(every, key=every.get)
        raise EffnetError(f"{worst}: {every[worst]} of its samples skipped (cut short, or not an image); {total} of the "
                          f"{read} training samples read so far skipped ({total / max(read, 1):.1%}), over "
                          f"data.max_skipped {dm.max_skipped:.1%} (run `effnet shard` again, or raise it)")


def strategy(cfg: TrainConfig):
    """`train.strategy`, built with `train.collective_timeout` where its class takes a timeout (ddp and its kin,
    fsdp): a rank that is gone or hung then stops the others within that time, each with one line, instead of
    PyTorch's 30 minutes. Any other value (auto, or a strategy object) as it is."""
    name = cfg.strategy
    if isinstance(name, str) and name in StrategyRegistry:
        entry = StrategyRegistry[name]
        if "timeout" in inspect.signature(entry["strategy"].__init__).parameters:
            return entry["strategy"](**{**entry["init_params"], "timeout": timedelta(seconds=cfg.collective_timeout)})
    return name


def require_xla(accelerator: str) -> None:
    """`tpu` needs torch_xla, built for this torch: not in the main lock (requirements.lock), which pins a torch that
    torch_xla's wheels do not run with. Checked before any work, in one line naming the lock to install."""
    if accelerator != "tpu":
        return
    try:
        import torch_xla  # noqa: F401
    except ImportError as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EffnetError(f"train.accelerator=tpu needs torch_xla, which this environment cannot import ({why}): "
                          "install requirements-xla.lock (its own venv: `make test-xla` builds .venv-xla; see "
                          "docs/tpu.md)") from None


def make_trainer(cfg: TrainConfig, epochs: int, checkpoints: Path | None = None, accumulate: int = 1,
                 sync_bn: bool = False, max_time: str | None = None, patience: int | None = None) -> pl.Trainer:
    """The Trainer on CFG's accelerator, devices, nodes and strategy, resolved: its world size and rank are known
    from here on, whatever form `devices` takes. Settings it cannot run with (devices=-1 on a CPU, a world size
    other than the launcher's) stop here, naming the keys. With CHECKPOINTS (a folder), checkpoints as
    `checkpoint_callbacks` says and on SIGTERM; ACCUMULATE batches per optimizer step; SYNC_BN: BatchNorm statistics
    over all ranks; MAX_TIME: Lightning's time budget (DD:HH:MM:SS); PATIENCE: early stopping on val top-1 (epochs
    without a better one), keeping `best.ckpt`."""
    require_xla(cfg.accelerator)
    callbacks = [LearningRateMonitor(logging_interval="step"), EpochSummary(), Curves(), XlaSeed(cfg.seed)]
    if cfg.progress_bar:
        callbacks.append(ProgressBar())
    if patience:
        callbacks.append(EarlyStopping(monitor=MONITOR, mode="max", patience=patience))
    if checkpoints:
        callbacks += [ProcessRng(), SaveOnSigterm(Path(checkpoints) / LAST),
                      *checkpoint_callbacks(Path(checkpoints), cfg.checkpoint_every_n_steps, best=bool(patience))]
    try:
        trainer = pl.Trainer(
            max_epochs=epochs, accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
            strategy=strategy(cfg), precision=speed_settings(cfg)["precision"], logger=False, callbacks=callbacks,
            enable_checkpointing=bool(checkpoints), enable_progress_bar=cfg.progress_bar,
            log_every_n_steps=cfg.log_every_n_steps, enable_model_summary=False, default_root_dir=".lightning",
            accumulate_grad_batches=accumulate,
            plugins=[*([GlobalBatchNorm()] if sync_bn else []), *([checkpoint_io(cfg.accelerator)] if checkpoints else [])],
            max_time=max_time,
        )
    except (MisconfigurationException, TypeError, ValueError, RuntimeError) as e:
        raise EffnetError(f"train.accelerator={cfg.accelerator!r}, train.devices={cfg.devices!r}, "
                          f"train.num_nodes={cfg.num_nodes}, train.strategy={cfg.strategy!r}: "
                          f"{str(e).strip().splitlines()[0]}") from None
    launched = int(os.environ.get("WORLD_SIZE", trainer.world_size))
    if launched != trainer.world_size:  # e.g. torchrun started 2 processes, but the Trainer runs 1 device
        raise EffnetError(f"train.num_nodes x train.devices = {cfg.num_nodes} x {cfg.devices!r} runs "
                          f"{trainer.world_size} process(es), but the launcher started WORLD_SIZE={launched}")
    return trainer


def global_batch(trainer: pl.Trainer, batch_size: int) -> int:
    """Samples per optimizer step: per-device batch x the Trainer's world size x its gradient accumulation."""
    return batch_size * trainer.world_size * trainer.accumulate_grad_batches


class KeptMLFlowLogger(MLFlowLogger):
    """Lightning's MLflow logger, its metrics sent through a `tracking.Outbox` (a thread of its own): a store lost
    mid-run costs training nothing, what is logged meanwhile reaches the store when it is back, and what has not by
    the end is kept, with the run's final status, in the workspace (`tracking.keep_unsent`) for the next stage that
    reaches the store; `kept` is then that file. Parameters, tags and the run itself are written directly: they
    come at the start, after `tracking.check`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._mlflow_client = tracking.outbox_client(self._tracking_uri, lambda: self.outbox)
        self._outbox: tracking.Outbox | None = None
        self.kept: Path | None = None
        self._finalized = False

    @property
    def outbox(self) -> tracking.Outbox:
        if self._outbox is None:
            self._outbox = tracking.Outbox(self.run_id, self._tracking_uri)
        return self._outbox

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if not self._initialized or self._finalized:  # once: a second call would keep the unsent twice
            return
        self._finalized = True
        status = {"success": "FINISHED", "finished": "FINISHED", "failed": "FAILED"}.get(status, status)
        unsent = self.outbox.close()
        if not unsent:
            try:
                self.experiment.set_terminated(self.run_id, status)
                return
            except Exception:  # noqa: BLE001 - the store went away after the last metric: keep the status
                pass
        self.kept = tracking.keep_unsent(self.run_id, unsent, status, self._tracking_uri)


class UnsentMetrics(pl.Callback):
    """What the store has not confirmed yet (while it is down) survives a kill: a run resumed from a checkpoint sends
    it with its own metrics, and logs the steps after the checkpoint again itself. Lightning logs a batch's metrics
    after the checkpoint made at that batch's end, so the checkpoint carries what was unsent when it was made, and
    FOLDER/unsent.json, written as the next batch starts, what was unsent by then: that batch's metrics too."""

    SIDECAR = "unsent.json"

    def __init__(self, folder: Path | None = None):
        self.folder, self.logger, self.restored, self.saved_step = folder, None, [], None

    def setup(self, trainer, pl_module, stage) -> None:
        self.logger = trainer.logger if isinstance(trainer.logger, KeptMLFlowLogger) else None

    def state_dict(self) -> dict:
        return {"metrics": self.logger.outbox.unsent() if self.logger else []}

    def load_state_dict(self, state: dict) -> None:
        self.restored = state["metrics"]

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.saved_step = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.saved_step is not None and self.logger and self.folder:
            sidecar = self.folder / self.SIDECAR
            try:
                if unsent := self.logger.outbox.unsent():
                    io.write_json(sidecar, {"step": self.saved_step, "metrics": unsent})
                else:
                    sidecar.unlink(missing_ok=True)
            except OSError:  # a full disk: the checkpoint's own list stands (the next checkpoint says it in one line)
                pass
        self.saved_step = None

    def on_train_start(self, trainer, pl_module) -> None:
        sidecar = self.folder / self.SIDECAR if self.folder else None
        if sidecar and sidecar.is_file():
            kept = json.loads(sidecar.read_text())
            if kept["step"] == trainer.global_step:  # made after the checkpoint this run resumes from
                self.restored = kept["metrics"]
        if self.logger and self.restored:
            self.logger.outbox.put(self.restored)
        self.restored = []


def mlflow_logger(experiment: str, run_name: str, run_id: str | None, params: dict) -> MLFlowLogger:
    """Rank 0's logger: the run RUN_NAME (RUN_ID's, to continue one) in EXPERIMENT, created with the workspace's
    artifact location, tagged and with PARAMS logged."""
    stage, _, variant_key = run_name.partition("@")
    experiment_id = tracking.experiment(experiment)  # created with the workspace artifact location, not Lightning's
    tags = {"stage": stage, **tracking.run_tags(variant_key, params, stage, experiment_id=experiment_id)}
    logger = KeptMLFlowLogger(experiment_name=experiment, run_name=run_name, tracking_uri=tracking.tracking_uri(),
                              artifact_location=None, run_id=run_id, tags=tags)
    logger.log_hyperparams(params)  # on resume: the same values again, which MLflow accepts
    return logger


def collective_failure(e: BaseException, trainer: pl.Trainer) -> str | None:
    """One line for E when it is a collective that failed under DDP (another rank died: its connection reset; or
    hangs: `train.collective_timeout` passed), else None."""
    text = str(e).strip()
    backend = any(s in text for s in ("gloo", "NCCL", "c10d", "ProcessGroup"))
    if trainer.world_size < 2 or not (isinstance(e, torch.distributed.DistError) or backend):
        return None
    first = text.splitlines()[0] if text else type(e).__name__
    reason = first.split("] ", 1)[-1].split(". ")[0]  # gloo: "[.../pair.cc:545] Read error [host]:port: Connection reset by peer. This is..."
    return (f"rank {trainer.global_rank} of {trainer.world_size}: another rank is gone or does not answer ({reason}): "
            "stopping (run the stage again on every node to resume)")


def fit(trainer: pl.Trainer, module: Classifier, dm: ShardDataModule, cfg: TrainConfig, experiment: str,
        run_name: str, params: dict, checkpoints: Path | None = None) -> str | None:
    """Run TRAINER (`make_trainer`) on MODULE and DM, logging to MLflow from rank 0 (PARAMS logged as the run's
    params); returns the MLflow run id (None on other ranks, which never touch MLflow).

    With CHECKPOINTS (the Trainer's folder) and `cfg.resume`, continue from `last.ckpt` there, and its MLflow run,
    when it was made with the same params and data. With early stopping, MODULE ends with the weights (and EMA) of
    the epoch with the best val top-1 on rank 0. SIGTERM raises `Preempted` once the checkpoint is saved
    (`SaveOnSigterm`)."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    fp = fingerprint(params, dm.manifest)
    folder = Path(checkpoints) if checkpoints else None
    run_id, ckpt_path = resume_point(folder, fp, cfg.resume) if folder else (None, None)
    trainer.logger = (mlflow_logger(experiment, run_name, run_id, params) if trainer.is_global_zero
                      else DummyLogger())  # LearningRateMonitor wants a logger on every rank
    trainer.callbacks += [UnsentMetrics(folder), SkippedSamples()]
    if folder:
        refused = folder / LAST if ckpt_path and Path(ckpt_path).name != LAST else None
        trainer.callbacks.append(RunFile(folder, fp, resuming=ckpt_path is not None, corrupt=refused))
    if ckpt_path:
        rank_zero_info(f"resuming from {ckpt_path} (MLflow run {run_id})")
    try:  # MLFlowLogger creates its run through the client, which starts no system metrics monitor by itself
        with tracking.system_metrics(trainer.logger.run_id if trainer.is_global_zero else None, resume=bool(run_id)):
            trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    except Preempted:
        raise
    except Exception as e:  # NaN loss, a checkpoint not written, a rank gone: the folder keeps the last good one
        message = str(e) if isinstance(e, EffnetError) else collective_failure(e, trainer)
        if message is None:
            raise
        kept = folder / LAST if folder else None
        raise EffnetError(f"{message}; last good checkpoint kept: {kept}" if kept and kept.is_file() else message
                          ) from None
    best = folder / BEST if folder else None
    if trainer.is_global_zero and best and best.is_file():
        module.load_state_dict(torch.load(best, map_location=module.device, weights_only=True)["state_dict"])
        rank_zero_info(f"exporting the epoch with the best {MONITOR}: {best}")
    return trainer.logger.run_id if trainer.is_global_zero else None
