"""Training at any scale, in one process: Lightning's gradient accumulation against the one big batch, the schedule
and EMA counting optimizer steps, the global batch's bad input, timm's regularisers on CPU tensors, cross-replica
BatchNorm against BatchNorm over the whole batch (two gloo processes), early stopping exporting the best epoch."""
from __future__ import annotations

import copy

import mlflow
import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp
from pytorch_lightning.loggers.logger import DummyLogger
from timm.layers import BatchNormAct2d
from timm.loss import SoftTargetCrossEntropy

from effnet import cli, lightning, models
from effnet.data.manifest import read_manifest
from effnet.data.regularise import Regularise
from effnet.stages import train
from tests import ranks
from tests.conftest import write_tiny_params


def _tiny_model(tiny_params, seed: int = 0):
    torch.manual_seed(seed)
    return models.build(tiny_params.variant("tiny"), 4, drop_rate=0.0, drop_path_rate=0.0)


class _Watch(pl.Callback):
    """What each batch saw (the LR, the step) and the gradients at each optimizer step; BatchNorm kept in eval mode
    so that a batch split in two normalises exactly as the whole does."""

    def __init__(self):
        self.grads, self.lrs, self.steps = [], [], []

    def on_train_batch_start(self, trainer, module, batch, idx):
        module.model.eval()
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, module, outputs, batch, idx):
        self.steps.append(trainer.global_step)

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.grads.append({n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None})


def _fit(tiny_params, model, batches, accumulate: int, ema: float | None = None, schedule: dict | None = None):
    module = lightning.Classifier(model, 4, dict(opt="momentum", lr=0.1, momentum=0.9, weight_decay=0.0), schedule, 0.1,
                                  ema_decay=ema)
    trainer = lightning.make_trainer(tiny_params.train.model_copy(update={"accelerator": "cpu"}), 1,
                                     accumulate=accumulate)
    watch = _Watch()
    trainer.callbacks.append(watch)
    trainer.logger = DummyLogger()
    updates = []
    if module.ema is not None:  # spy on the real EMA: which steps it was updated at
        real = module.ema.update
        module.ema.update = lambda m, step: (updates.append(step), real(m, step=step))
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return watch, updates, trainer


def test_two_accumulated_batches_of_32_give_the_gradients_of_one_batch_of_64(tiny_params):
    x, y = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(64) % 4
    model = _tiny_model(tiny_params)
    one, _, _ = _fit(tiny_params, copy.deepcopy(model), [(x, y)], accumulate=1)
    two, _, trainer = _fit(tiny_params, copy.deepcopy(model), [(x[:32], y[:32]), (x[32:], y[32:])], accumulate=2)
    assert len(one.grads) == len(two.grads) == 1 and trainer.global_step == 1
    assert one.grads[0].keys() == two.grads[0].keys() and one.grads[0]
    worst = max((one.grads[0][n] - two.grads[0][n]).abs().max().item() for n in one.grads[0])
    assert worst <= 1e-5, worst


def test_the_schedule_and_the_ema_count_optimizer_steps_not_batches(tiny_params):
    """4 batches accumulated 2 by 2 make 2 optimizer steps: the LR moves and the EMA updates at those 2 steps,
    exactly as 2 unaccumulated batches move and update it."""
    schedule = train.schedule_kwargs(tiny_params.train.model_copy(update={"warmup_epochs": 1.0}), 0.1)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    plain, plain_updates, _ = _fit(tiny_params, _tiny_model(tiny_params), [(x, y)] * 2, 1, 0.9, schedule)
    acc, acc_updates, trainer = _fit(tiny_params, _tiny_model(tiny_params), [(x, y)] * 4, 2, 0.9, schedule)
    assert trainer.global_step == 2 and acc.steps == [0, 1, 1, 2]
    assert acc_updates == plain_updates == [1, 2]
    assert plain.lrs[0] != plain.lrs[1]  # the warm-up moves the LR at each step...
    assert acc.lrs == [plain.lrs[0], plain.lrs[0], plain.lrs[1], plain.lrs[1]]  # ...not at each batch


@pytest.mark.parametrize("sets, culprit", [
    (["train.accelerator=cpu", "train.devices=-1"], "train.devices"),  # Lightning's "all": no such CPU count
    (["train.accelerator=cpu", "train.devices=0"], "train.devices"),
    (["train.accumulate_grad_batches=0"], "train.accumulate_grad_batches"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.num_nodes=0"], "train.num_nodes"),
    (["train.mixup=0.2", "train.batch_size=15"], "train.batch_size"),
])
def test_a_global_batch_that_cannot_train_stops_before_any_work(shards_dir, workspace, capsys, sets, culprit):
    params = write_tiny_params(workspace / "params.yaml")
    rc = cli.main(["train", str(shards_dir), "trained", "--params", str(params), "--variant", "tiny",
                   *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("effnet: error:") and culprit in err[0], err
    assert not [p for p in workspace.iterdir() if p.name != "params.yaml"]  # no MLflow store, no checkpoint


def test_a_launcher_that_started_more_processes_than_the_trainer_runs_stops(shards_dir, workspace, capsys,
                                                                              monkeypatch):
    """torchrun --nproc-per-node 2 with train.devices left at 1: each process would train alone on a world of 1."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    params = write_tiny_params(workspace / "params.yaml")
    rc = cli.main(["train", str(shards_dir), "trained", "--params", str(params), "--variant", "tiny",
                   "--set", "train.accelerator=cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "WORLD_SIZE=2" in err[0] and "train.devices" in err[0], err


def test_the_lr_rule_refuses_an_empty_global_batch(tiny_params):
    recipe = tiny_params.variant("tiny").recipe
    cfg = tiny_params.train.model_copy(update={"lr": None})
    assert train.learning_rate(cfg, recipe, recipe.batch_size) == recipe.lr
    with pytest.raises(Exception, match="train.accumulate_grad_batches"):
        train.learning_rate(cfg, recipe, 0)


# --- timm's regularisers, on CPU tensors --------------------------------------------------------------------------

def _batch(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 16, 16, generator=g), torch.arange(n) % 4


def test_mixup_mixes_each_image_with_the_batch_reversed_and_the_smoothed_labels_alike():
    x, y = _batch()
    out, targets = Regularise(4, smoothing=0.1, mixup=1.0)(x.clone(), y)
    lam = ((out - x.flip(0)) / (x - x.flip(0)))[0, 0, 0, 0].item()
    assert 0 < lam < 1 and torch.allclose(out, lam * x + (1 - lam) * x.flip(0), atol=1e-5)
    assert targets.shape == (8, 4) and torch.allclose(targets.sum(1), torch.ones(8))
    floor = 0.1 / 4  # the smoothing's share of every class
    mass = targets - floor
    own = mass[torch.arange(8), y] + mass[torch.arange(8), y.flip(0)] * (y != y.flip(0))
    assert torch.allclose(own, torch.full((8,), 0.9), atol=1e-6)  # the rest is the two mixed labels'


def test_cutmix_pastes_one_box_of_the_reversed_batch():
    x, y = _batch()
    out, _ = Regularise(4, smoothing=0.0, cutmix=1.0)(x.clone(), y)
    inside = (out == x.flip(0)).all(dim=(0, 1))  # (H, W): where every image shows its partner
    assert inside.any() and (out[:, :, ~inside] == x[:, :, ~inside]).all()
    rows, cols = inside.any(1).nonzero().flatten(), inside.any(0).nonzero().flatten()
    assert inside[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # one rectangle


def test_random_erasing_replaces_one_box_per_image_and_nothing_else():
    x, y = _batch()
    reg = Regularise(4, smoothing=0.0, erase=1.0, erase_mode="const")
    assert not reg.mixes
    out, targets = reg(x.clone(), y)
    assert torch.equal(targets, y)
    for before, after in zip(x, out):
        erased = (after != before).any(0)
        assert erased.any() and (after[:, erased] == 0).all()


# --- cross-replica BatchNorm ----------------------------------------------------------------------------------------

def test_cross_replica_batchnorm_is_batchnorm_over_every_ranks_images(tmp_path):
    mp.spawn(ranks.sync_bn, args=(str(tmp_path),), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert all(got[k] <= 1e-5 for k in ("y", "x_grad", "param_grad", "mean", "var")), got


def test_global_batchnorm_converts_every_timm_batchnorm_and_back(tiny_params):
    model = _tiny_model(tiny_params)
    count = sum(type(m) is BatchNormAct2d for m in model.modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    lightning.GlobalBatchNorm().apply(model)
    assert count and sum(type(m) is models.SyncBatchNormAct2d for m in model.modules()) == count
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    synced = model(x)
    lightning.GlobalBatchNorm().revert(model)
    assert sum(type(m) is BatchNormAct2d for m in model.modules()) == count
    assert torch.equal(model(x), synced) and model.state_dict().keys() == state.keys()


# --- the train stage with them on ---------------------------------------------------------------------------------

def _run_history(ws, key):
    client = mlflow.MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("effnet").experiment_id])
    return run, sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def test_regularised_accumulated_training_stops_early_and_exports_the_best_epochs_ema(tiny_params, shards_dir,
                                                                                        workspace):
    """Mixup + CutMix + random erasing + accumulation through the real stage, early stopping on val top-1 after
    one epoch without a better one: the bundle holds the EMA of the epoch with the best val top-1."""
    patience, epochs = 1, 3
    cfg = tiny_params.train.model_copy(update={
        "epochs": epochs, "accumulate_grad_batches": 2, "mixup": 0.8, "cutmix": 1.0, "random_erase": 0.5,
        "early_stop_patience": patience, "ema_decay": 0.9})
    params = tiny_params.model_copy(update={"train": cfg})
    trained = train.fit_model(params, "tiny", shards_dir)
    best = torch.load(workspace / cfg.checkpoint_dir / "tiny" / lightning.BEST, weights_only=True)
    assert isinstance(trained.module.train_loss, SoftTargetCrossEntropy)
    assert all(torch.equal(v, best["state_dict"][f"ema.module.{k}"])
               for k, v in trained.module.eval_model.state_dict().items())
    run, top1 = _run_history(workspace, "val/top1")
    ran = len(top1)
    best_epoch = max(range(ran), key=lambda e: (top1[e][1], -e))  # the first of the best
    assert best["epoch"] == best_epoch
    assert ran == epochs or ran == best_epoch + patience + 1  # it stopped once patience ran out
    trained_on = round(read_manifest(shards_dir)["splits"]["train"]["total"] * (1 - tiny_params.data.holdout))
    global_batch = 2 * cfg.batch_size
    assert trained.global_batch == global_batch and trained.steps == ran * (trained_on // global_batch)
    assert int(run.data.params["global_batch"]) == global_batch
    val_total = read_manifest(shards_dir)["splits"]["val"]["total"]
    assert [v for _, v in _run_history(workspace, "val/images")[1]] == [val_total] * ran


def test_max_time_stops_training_and_exports_the_last_ema(tiny_params, shards_dir, workspace):
    cfg = tiny_params.train.model_copy(update={"epochs": 1000, "max_time": "00:00:00:01"})
    params = tiny_params.model_copy(update={"train": cfg})
    result = train.run(params, "tiny", shards_dir, workspace / "trained")
    total = read_manifest(shards_dir)["splits"]["train"]["total"]
    assert 0 < result.steps < 1000 * (total // cfg.batch_size)
    assert models.weights_hash(models.load_bundle(result.bundle)[0]) == result.weights  # the EMA as it ended
