"""The TPU path (`train.accelerator: tpu`) run on torch_xla's CPU device (PJRT_DEVICE=CPU, one device), in .venv-xla
(`make test-xla`, from requirements-xla.lock): the train stage through Lightning's XLA accelerator, its single-device
XLA strategy and bf16-true, with the same DataModule, webdataset stream, EMA, checkpoints and exact resume as on a
GPU. XLA compiles each distinct graph once, ~20-40 s each on 2 cores; the runs share the process's compile cache, so
the first one pays for nearly all of it. Lightning is told the CPU device is a TPU (`xla_as_tpu`): only here.

Not run here: several XLA devices (two CPU devices hang in their first all-reduce), so multi-chip and multi-host
training, cross-replica BatchNorm among them, run on a real TPU VM only (docs/tpu.md)."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

torch_xla = pytest.importorskip("torch_xla")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch_xla.debug.metrics as met  # noqa: E402
from pytorch_lightning.plugins.precision import XLAPrecision  # noqa: E402
from pytorch_lightning.strategies import SingleDeviceXLAStrategy  # noqa: E402

from effnet import config, lightning, models  # noqa: E402
from effnet.data import transforms  # noqa: E402
from effnet.data.feed import DeviceFeed  # noqa: E402
from effnet.data.loaders import eval_loader  # noqa: E402
from effnet.errors import Preempted  # noqa: E402
from effnet.stages import demo_data, shard, train  # noqa: E402
from tests.conftest import write_tiny_params  # noqa: E402

pytestmark = [pytest.mark.xla, pytest.mark.usefixtures("xla_as_tpu")]

# Real images: scikit-learn's digit scans of 0 and 1 at 32 px, 160 for training (10 % held out) in batches of 8: 20
# steps an epoch, 2 epochs at a constant LR; the loss read on the host every 4 steps; a checkpoint every 3 steps and
# at each epoch end; one loader worker, which owns the augmentations' RNG (as in the CPU resume tests). Precision:
# the TPU's default (bf16-true).
EPOCHS, LOG_EVERY = 2, 4
XLA_OVERRIDES = {"demo_data": {"dataset": "digits", "classes": 2, "image_size": 32},
                 "data": {"num_workers": 1},
                 "train": {"accelerator": "tpu", "batch_size": 8, "epochs": EPOCHS, "log_every_n_steps": LOG_EVERY,
                           "checkpoint_every_n_steps": 3, "lr": 0.003, "warmup_epochs": 0}}


def compiles() -> int:
    """XLA graph compilations in this process so far (torch_xla's CompileTime metric)."""
    data = met.metric_data("CompileTime")
    return data[0] if data else 0


class Watch(pl.Callback):
    """What the Trainer ran on, and the compile count after every training step and validation."""

    def __init__(self):
        self.after_step: dict[int, int] = {}
        self.after_val: list[int] = []
        self.trainer: pl.Trainer | None = None
        self.batch: tuple | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.trainer = trainer
        if self.batch is None:
            self.batch = (batch[0].device, batch[0].dtype, tuple(batch[0].shape), next(pl_module.parameters()).device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after_step[trainer.global_step] = compiles()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.after_val.append(compiles())


class SigtermAt(pl.Callback):
    """SIGTERM to this process once STEP optimizer steps are done, as a cluster sends it: `SaveOnSigterm` saves at the
    next step's end and stops the run."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def with_callbacks(patch: pytest.MonkeyPatch, *extra: pl.Callback) -> None:
    made = lightning.make_trainer

    def make(*args, **kwargs):
        trainer = made(*args, **kwargs)
        trainer.callbacks += list(extra)
        return trainer

    patch.setattr(lightning, "make_trainer", make)


def train_in(ws: Path, params, shards, *extra: pl.Callback) -> train.TrainResult:
    """The train stage in workspace WS (its MLflow store and checkpoints there), with EXTRA callbacks."""
    ws.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ws)
        with_callbacks(patch, *extra)
        return train.run(params, "tiny", shards, ws / "trained", curves=ws / "curves.json")


@pytest.fixture(scope="module")
def xla_params(tmp_path_factory):
    return config.load(write_tiny_params(tmp_path_factory.mktemp("xla") / "params.yaml", XLA_OVERRIDES))


@pytest.fixture(scope="module")
def digit_shards(xla_params, tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    return Path(shard.run(xla_params.shard, demo_data.run(xla_params.demo_data, folder / "demo").out,
                          folder / "shards").out)


@pytest.fixture(scope="module")
def whole(xla_params, digit_shards, tmp_path_factory):
    """One uninterrupted run, watched; the process's first XLA fit (its compile cache is empty)."""
    watch = Watch()
    before = compiles()
    result = train_in(tmp_path_factory.mktemp("whole"), xla_params, digit_shards, watch)
    return result, watch, before


def test_the_train_stage_runs_through_lightnings_xla_strategy_and_compiles_each_graph_once(whole):
    """bf16-true through Lightning's XLA precision on its single-device strategy, batches fed on `xla:0`; the loss
    falls; every graph compiles by the second epoch's first step, and the steps after it (checkpoints, host reads and
    the last validation among them) compile none: each step's graphs are the same ones (fixed shapes, the host reads at
    the logging interval only, after the step)."""
    result, watch, before = whole
    strategy = watch.trainer.strategy
    assert isinstance(strategy, SingleDeviceXLAStrategy) and str(strategy.root_device) == "xla:0"
    assert isinstance(strategy.precision_plugin, XLAPrecision) and strategy.precision_plugin.precision == "bf16-true"
    images_on, dtype, shape, weights_on = watch.batch
    assert images_on.type == weights_on.type == "xla" and dtype == torch.float32 and shape == (8, 3, 32, 32)
    per_epoch = result.steps // EPOCHS
    assert result.steps == EPOCHS * per_epoch >= 2 * 15 and result.decode == "cpu"
    rows = json.loads(Path(result.curves).read_text())
    print(f"curves: {rows}")
    steps = watch.after_step
    total = compiles() - before
    later = steps[result.steps] - steps[per_epoch + 1]  # the second epoch's steps after its first
    print(f"XLA graph compilations: {total} in the whole run of {result.steps} steps, {later} in steps "
          f"{per_epoch + 2}-{result.steps}; after each step: { {s: n - before for s, n in steps.items()} }; after each "
          f"validation (Lightning's sanity check first): {[n - before for n in watch.after_val]}")
    assert later == 0 and 0 < total <= 30, (steps, watch.after_val)
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1)) and rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_the_exported_bundle_predicts_on_the_cpu_what_it_predicts_on_xla(whole, digit_shards):
    """The bundle the XLA run wrote loads on the CPU, without torch_xla's help: its logits for the val images match
    its logits on the XLA device to within bf16's precision (the process may still compute in bf16 there: torch_xla
    may keep the XLA_USE_BF16 that bf16-true set), and so its top-1 classes, but for near-ties."""
    result, _, _ = whole
    model, spec = models.load_bundle(result.bundle)
    assert models.weights_hash(model) == result.weights
    pre = spec.preprocessing
    images, *_ = next(iter(eval_loader(digit_shards, transforms.eval_transform(pre, uint8=True), 24, 0)))
    x = DeviceFeed(pre.mean, pre.std, channels_last=False)([images, torch.zeros(0)], False, "cpu")[0]
    on_cpu = model(x)
    device = torch_xla.device()
    on_xla = model.to(device)(x.to(device)).cpu()
    assert on_cpu.shape == (24, 2)
    scale = on_cpu.abs().max().item()
    assert (on_xla - on_cpu).abs().max().item() <= 0.05 * scale + 0.05, (on_xla, on_cpu)
    assert (on_xla.argmax(1) == on_cpu.argmax(1)).float().mean().item() >= 0.9


def test_a_run_stopped_by_sigterm_and_resumed_on_xla_exports_the_same_weights(whole, xla_params, digit_shards,
                                                                              tmp_path):
    """SIGTERM mid-epoch: the checkpoint (written from the XLA device to the host) is saved at the next step and the
    run stops; run again, it resumes there (weights, EMA, optimizer, the stream, the XLA device's RNG) and exports the
    uninterrupted run's weights bit for bit. Both runs reuse the first run's compiled graphs but for the few a resume
    traces anew (restored state enters the first steps' graphs as data): 6 of them on 2026-12-03."""
    result, _, _ = whole
    before = compiles()
    with pytest.raises(Preempted, match="stopped by SIGTERM at step 5"):
        train_in(tmp_path, xla_params, digit_shards, SigtermAt(4))
    ckpt = torch.load(tmp_path / ".effnet/checkpoints/tiny/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 5 and "xla" in ckpt["callbacks"]["ProcessRng"]["ranks"][0]
    assert all(t.device.type == "cpu" for t in ckpt["state_dict"].values())
    resumed = train_in(tmp_path, xla_params, digit_shards)
    assert resumed.steps == result.steps and resumed.run_id is not None
    print(f"XLA graph compilations of the stopped and the resumed run together: {compiles() - before}")
    assert resumed.weights == result.weights and compiles() - before <= 12
