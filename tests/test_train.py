"""The train stage's recipe machinery: EMA weights exported, checkpoints, exact resume after kill -9 or SIGTERM (on
one process and on two ranks), NaN stop, and the speed settings predicting what plain fp32 does."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file
from timm.utils import ModelEmaV3

from effnet import cli, inference, models, variants
from effnet.lightning import Ema
from effnet.stages import train
from tests.conftest import REPO, kill_tree, result_json, stop, torchrun, train_args, write_tiny_params


def test_the_ema_is_the_exported_model_and_checkpoints_go_after_success(tiny_params, shards_dir, workspace):
    params = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(
        update={"ema_decay": 0.5, "checkpoint_every_n_steps": 2})})
    trained = train.fit_model(params, "tiny", shards_dir)
    checkpoints = workspace / params.train.checkpoint_dir / "tiny"
    assert (checkpoints / "last.ckpt").is_file()  # until the bundle is safe
    train.write(trained, params, workspace / "trained")
    saved = load_file(str(workspace / "trained" / "model.safetensors"))
    ema, raw = trained.module.ema.module.state_dict(), trained.module.model.state_dict()
    assert all(torch.equal(saved[k], ema[k]) for k in saved)
    assert any(not torch.equal(saved[k], raw[k]) for k in saved if raw[k].is_floating_point())
    assert not checkpoints.exists()  # removed once the bundle is written


def test_the_ema_follows_the_model_as_timms_does_after_the_model_moves_too():
    """`Ema` keeps its lists of the two models' tensors between steps: its average is timm's, exactly, step after
    step (weights and BatchNorm statistics), and still after both models move (a dtype change replaces buffers)."""
    torch.manual_seed(0)
    model = models.build(variants.resolve(phi=-6), 4)
    ours, timms = Ema(model, decay=0.9, use_warmup=True), ModelEmaV3(model, decay=0.9, use_warmup=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, 7):
        if step == 4:
            for m in (model, ours, timms):
                m.to(torch.float64)
        x = torch.randn(4, 3, 32, 32, dtype=next(model.parameters()).dtype)
        model.train()(x).logsumexp(1).mean().backward()  # moves the weights and the BatchNorm statistics
        opt.step()
        opt.zero_grad()
        for ema in (ours, timms):
            ema.update(model, step=step)
        got, want = ours.module.state_dict(), timms.module.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(ours.module.state_dict()["conv_stem.weight"], model.state_dict()["conv_stem.weight"])
    assert ours.module.bn1.running_mean.dtype == torch.float64


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tiny_params, shards_dir, workspace,
                                                                          capsys):
    """Adam with a 1e30 step makes the weights overflow after the first update: the second loss is NaN. The loss
    is only read on the host at the logging interval (50 steps here: later than the NaN) and before a checkpoint
    is written (every step here): the run stops at the first checkpoint after the NaN, without writing it."""
    params = write_tiny_params(workspace / "params.yaml")
    rc = cli.main(["train", str(shards_dir), "trained", "--params", str(params), "--variant", "tiny",
                   "--set", "train.lr=1e30", "--set", "train.warmup_epochs=0",
                   "--set", "train.checkpoint_every_n_steps=1", "--set", "train.log_every_n_steps=50"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("effnet: error:")]
    assert rc == 2 and len(err) == 1
    assert "loss is not finite" in err[0] and "last good checkpoint kept" in err[0]
    ckpt = torch.load(workspace / ".effnet/checkpoints/tiny/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] >= 1 and not (workspace / "trained").exists()
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values() if t.is_floating_point())


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is not None, reason="torch_xla here: tests/test_xla.py")
def test_tpu_without_torch_xla_stops_in_one_line_naming_the_lock_to_install(shards_dir, workspace, capsys):
    """The main lock's environment has no torch_xla (its torch is not the one torch_xla is built for)."""
    params = write_tiny_params(workspace / "params.yaml")
    rc = cli.main(train_args(shards_dir, params, "train.accelerator=tpu"))
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("effnet: error: train.accelerator=tpu needs torch_xla") and "requirements-xla.lock" in err[0]
    assert not (workspace / "trained").exists() and not (workspace / ".effnet").exists()


def _train_cmd(shards, params, *sets):
    return [sys.executable, "-m", "effnet", *train_args(shards, params, *sets)]


def _history(ws, key):
    client = mlflow.MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("effnet").experiment_id])
    return runs, {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, key)}


# Exact resume: 3 epochs of 6 batches (96 tiny images, batch 16), a checkpoint every 4 steps, so the first one is
# mid-epoch; 2 loader workers (they own the augmentations' RNG), so the 5th batch's worker is the second: the
# resumed round robin must start there.
EPOCHS, EVERY, PER_EPOCH = 3, 4, 96 // 16
RESUME_SETS = [f"train.epochs={EPOCHS}", f"train.checkpoint_every_n_steps={EVERY}", "train.lr=0.003",
               "data.num_workers=2", "data.holdout=0"]  # holdout 0: all 96 images reach training
TWO_RANKS = ["train.accelerator=cpu", "train.devices=2", "train.strategy=ddp", "train.batch_size=8"]


def _interrupted(cmd, ws, how):
    """Start CMD in WS, interrupt it once its first checkpoint is there (kill -9 of every process, kill -9 of one
    rank of two, or SIGTERM to the process group, as SLURM sends it), then run CMD again to the end. Returns the
    interrupted run's exit status, its checkpoint's step and stderr, and the rerun's result."""
    ws.mkdir()
    proc = subprocess.Popen(cmd, cwd=ws, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    ckpt = ws / ".effnet/checkpoints/tiny/last.ckpt"
    try:
        while not ckpt.exists() and proc.poll() is None:
            time.sleep(0.02)
        if how == "kill -9":
            kill_tree(proc)
        elif how == "kill -9 one rank":  # one of torchrun's two workers: the other stops, and torchrun with it
            import psutil
            ranks = [p for p in psutil.Process(proc.pid).children() if "effnet" in " ".join(p.cmdline())]
            max(ranks, key=lambda p: p.pid).kill()
        else:
            os.killpg(proc.pid, signal.SIGTERM)
        err = proc.communicate(timeout=300)[1]
    finally:
        stop(proc)
    step = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
    rerun = subprocess.run(cmd, cwd=ws, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not ckpt.parent.exists()
    return proc.returncode, step, err, result_json(rerun.stdout)


def _uninterrupted(cmd, ws):
    ws.mkdir()
    done = subprocess.run(cmd, cwd=ws, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return result_json(done.stdout)


def _assert_one_finished_run_of_every_step(ws, total):
    found, loss = _history(ws, "train/loss")
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    # Every step logged (at most the one logged just after the checkpoint the kill interrupted is missing).
    assert set(loss) <= set(range(total)) and len(set(range(total)) - set(loss)) <= 1 and max(loss) == total - 1


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
def test_an_interrupted_run_resumed_exports_the_uninterrupted_runs_weights_bit_for_bit(shards_dir, tmp_path, how):
    """Killed (-9) mid-epoch, or stopped by SIGTERM (which saves a checkpoint at the next step and exits 143), then
    run again: one MLflow run, and the same bundle, bit for bit, as a run never interrupted."""
    params = write_tiny_params(tmp_path / "params.yaml")
    cmd = _train_cmd(shards_dir, params, *RESUME_SETS) + ["--curves", "curves.json"]
    whole = _uninterrupted(cmd, tmp_path / "whole")
    rc, step, err, resumed = _interrupted(cmd, tmp_path / "interrupted", how)
    # Mid-epoch, whichever signal: SIGTERM never stops at an epoch's last batch (validation comes first).
    assert 0 < step < EPOCHS * PER_EPOCH and step % PER_EPOCH, "not interrupted mid-epoch"
    if how == "SIGTERM":
        lines = [line for line in err.splitlines() if line.startswith("effnet: error:")]
        assert rc == 143 and len(lines) == 1 and "SIGTERM" in lines[0] and step >= EVERY, err[-2000:]
    assert resumed["steps"] == whole["steps"] == EPOCHS * PER_EPOCH
    assert resumed["weights"] == whole["weights"]
    interrupted = load_file(str(tmp_path / "interrupted/trained/model.safetensors"))
    uninterrupted = load_file(str(tmp_path / "whole/trained/model.safetensors"))
    assert all(torch.equal(interrupted[k], uninterrupted[k]) for k in uninterrupted)
    _assert_one_finished_run_of_every_step(tmp_path / "interrupted", EPOCHS * PER_EPOCH)
    # the curves too: the epochs before the checkpoint, and the mean loss of the epoch it cut, came back with it
    assert (tmp_path / "interrupted/curves.json").read_text() == (tmp_path / "whole/curves.json").read_text()


@pytest.mark.slow
def test_two_ranks_interrupted_mid_epoch_resume_bit_for_bit(shards_dir, tmp_path):
    """The same on two ranks (torchrun, gloo), killed -9 (every process), one rank killed -9 (the other stops at its
    next collective), then stopped by SIGTERM (torchrun passes it on to both ranks, which stop at the same step):
    each rank's stream, RNGs and position come back from the checkpoint rank 0 wrote."""
    params = write_tiny_params(tmp_path / "params.yaml")
    cmd = torchrun("--standalone", "--nproc-per-node", "2") + train_args(shards_dir, params, *RESUME_SETS,
                                                                          *TWO_RANKS)
    whole = _uninterrupted(cmd, tmp_path / "whole")
    for how in ("kill -9", "kill -9 one rank", "SIGTERM"):
        ws = tmp_path / how.replace(" ", "")
        _, step, err, resumed = _interrupted(cmd, ws, how)
        assert 0 < step < EPOCHS * PER_EPOCH and step % PER_EPOCH, "not interrupted mid-epoch"
        if how == "SIGTERM":
            stopped = [line for line in err.splitlines() if line.startswith("effnet: error: stopped by SIGTERM")]
            assert len(stopped) == 2 and len(set(stopped)) == 1, err[-3000:]  # both ranks, at the same step
        assert resumed["world_size"] == 2 and resumed["weights"] == whole["weights"], how
        _assert_one_finished_run_of_every_step(ws, EPOCHS * PER_EPOCH)


def test_the_train_stage_repeats_bit_for_bit(tiny_params, shards_dir, tmp_path):
    """Two runs with the same params and data (and loader workers, which own the augmentation RNG) export the
    same weights and the same training curves: what `dvc repro` of an unchanged stage promises. The curves have
    one row per epoch, its val top-1 the one logged to MLflow."""
    weights, curves = [], []
    for name in ("first", "second"):
        ws = tmp_path / name
        ws.mkdir()
        params = write_tiny_params(ws / "params.yaml")
        cmd = _train_cmd(shards_dir, params, "data.num_workers=1", "train.epochs=2") + ["--curves", "curves.json"]
        done = subprocess.run(cmd, cwd=ws, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        weights.append(load_file(str(ws / "trained" / "model.safetensors")))
        curves.append(json.loads((ws / "curves.json").read_text()))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert curves[0] == curves[1] and [row["epoch"] for row in curves[0]] == [1, 2]
    _, val = _history(tmp_path / "first", "val/top1")
    assert [row["val_top1"] for row in curves[0]] == [round(100 * v, 4) for _, v in sorted(val.items())]
    assert all(0 < row["train_loss"] < 10 for row in curves[0])


def agreement(bundle, shards, splits=("val",)) -> dict[tuple[bool, bool], float]:
    """Top-1 agreement of BUNDLE's model with itself in NCHW fp32 over SPLITS, for each (channels_last, bf16)."""
    from effnet.data.feed import DeviceFeed

    model, spec = models.load_bundle(bundle)
    pre = spec.preprocessing

    def top1(channels_last: bool, bf16: bool) -> torch.Tensor:
        feed = DeviceFeed(pre.mean, pre.std, channels_last=channels_last)
        return torch.cat([logits.argmax(1) for split in splits
                          for logits, _ in inference.forward(model, pre, shards, 64, 0, feed, split=split, bf16=bf16)])

    reference = top1(channels_last=False, bf16=False)
    assert len(reference) >= 200
    return {(cl, bf16): (top1(cl, bf16) == reference).float().mean().item()
            for cl, bf16 in ((True, False), (False, True), (True, True))}


def test_channels_last_predicts_what_nchw_predicts(pipeline):
    """channels_last (the CPU's default) changes the order of the arithmetic, not the answers: the pipeline's trained
    model agrees with itself in NCHW on >= 99.5 % of the real val and test images (the digit scans). bf16 is held
    to that on the demo's trained model (the next test): this 3-epoch model, barely above chance, has near-ties
    that bf16's 3 significant digits flip (5 of 356)."""
    agrees = agreement(pipeline.repo / "models/tiny/trained", pipeline.repo / "data/shards", ("val", "test"))
    assert agrees[True, False] >= 0.995, agrees


@pytest.mark.slow
def test_channels_last_and_bf16_predict_what_nchw_fp32_predicts_on_the_demo(tmp_path, monkeypatch):
    """The demo's model as `make demo` trains it (params.yaml as shipped, ~6 min on 2 cores): in channels_last, in
    bf16 autocast (the GPU's default) and in both, its top-1 agrees with NCHW fp32's on >= 99.5 % of the 400 demo
    val images."""
    from effnet import config
    from effnet.stages import demo_data, shard

    monkeypatch.chdir(tmp_path)
    params = config.load(REPO / "params.yaml", ["train.progress_bar=false"])
    folder = demo_data.run(params.demo_data, tmp_path / "demo").out
    shards = Path(shard.run(params.shard, folder, tmp_path / "shards").out)
    key = next(iter(params.variants))
    train.run(params, key, shards, tmp_path / "trained")
    agrees = agreement(tmp_path / "trained", shards)
    assert min(agrees.values()) >= 0.995, agrees
