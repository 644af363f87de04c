"""The `fixres` stage (Touvron et al. 2019, "Fixing the train-test resolution discrepancy"; its EfficientNet
results in "FixEfficientNet", 2020).

RandomResizedCrop training makes objects look larger than a center crop at test time does; testing at a higher
resolution undoes that, once the model is adapted to the new statistics. The stage:

1. chooses on data, never on val (which `evaluate` selects on afterwards), but on the training images no stage
   trains on (`data.holdout`): for each candidate resolution (`fixres.img_size: auto`: train resolution x
   `fixres.candidates`) and each BatchNorm scope (the last one, as the paper; or every one) it re-estimates those
   BatchNorm statistics there, on the other training images with test-time preprocessing, and scores top-1; the
   best wins, ties to the smaller resolution and the last BatchNorm only;
2. fine-tunes there as the paper does: test-time preprocessing plus a flip, the classifier trained (SGD,
   `fixres.lr`) and the last BatchNorm re-estimated (`fixres.unfreeze` adds modules); everything else frozen;
3. keeps the fine-tune only if it scores at least as well on the held-out images; else exports the adapted model.

Which scope wins depends on the model: on the demo shapes every BatchNorm re-estimated gains points at every
resolution; on scikit-learn's digits it loses three at the train resolution, where the last one alone loses none.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from pytorch_lightning.utilities import rank_zero_only
from timm.layers import BatchNormAct2d
from torch import nn

from effnet import inference, lightning, models, tracking
from effnet.config import Params
from effnet.data import feed, transforms
from effnet.data.manifest import in_holdout, read_manifest
from effnet.data.held_splits import HeldSplit

log = logging.getLogger(__name__)
TRAINABLE = ["classifier", "bn2"]  # timm EfficientNet: the head and the BatchNorm right before pooling


class ExactMeanBatchNormAct2d(BatchNormAct2d):
    """BatchNorm's momentum=None (running statistics = the exact mean over all batches so far), kept in tensors:
    timm's version reads 1 / num_batches_tracked as a Python float, which breaks the torch.compile graph and
    recompiles it at every step. Same state_dict as the layer it replaces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=1)
            weight = 1.0 / self.num_batches_tracked
            self.running_mean.lerp_(mean, weight)
            self.running_var.lerp_(var, weight)
        x = F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return self.act(self.drop(x))


SCOPES = ("last", "all")  # which BatchNorms are re-estimated at the new resolution: bn2 (the paper's), or every one


class Choice(BaseModel):
    """The fine-tune's resolution and BatchNorm scope, and how they were chosen."""

    img_size: int
    scope: str  # one of SCOPES
    how: str  # auto | fixed | scale, and why a fallback was taken
    scores: dict[str, dict[int, float]] = {}  # held-out top-1 (%): scope -> resolution -> score


class FixResResult(BaseModel):
    bundle: Path | None  # None on DDP ranks other than 0, which write nothing
    run_id: str | None  # the MLflow run (None on DDP ranks other than 0)
    img_size: int
    train_img_size: int
    choice: Choice
    holdout_top1: dict[str, float] = {}  # before and after the fine-tune, when there is a held-out set
    fine_tuned: bool  # False: the fine-tune did worse on the held-out images, so the adapted model is exported


@dataclass
class Tuning:
    """The model set up for the fine-tune: frozen but for TRAINABLE (+ fixres.unfreeze), bn2 to be re-estimated."""

    module: lightning.Classifier
    spec: models.ModelSpec  # at the FixRes resolution
    train_img_size: int


def run(params: Params, variant_key: str, shards: str | Path, trained: Path, out: Path) -> FixResResult:
    """Fine-tune the TRAINED bundle at the FixRes resolution on SHARDS; write the new bundle to OUT."""
    cfg = params.fixres
    rank_zero_only(tracking.check)()  # the one process that logs: a store that is down stops it here, in seconds
    model, spec = models.load_bundle(trained)
    choice = choose(params, model, spec, shards)
    pre = spec.preprocessing.at(choice.img_size)
    adapt_batchnorm(model, pre, shards, params, choice.scope)
    adapted = copy.deepcopy(model.state_dict())
    tuning = prepare(params, model, spec, choice.img_size)
    dm = feed.data_module(params, shards, pre, transforms.fixres_transform(pre, uint8=True), cfg.batch_size,
                          cfg.seed, lightning.speed_settings(params.train)["channels_last"], augment=False)
    logged = {**cfg.model_dump(), "img_size": pre.img_size, "train_img_size": spec.img_size,
              "trainable": TRAINABLE + cfg.unfreeze, "chosen_by": choice.how, "batchnorm_scope": choice.scope}
    hardware = params.train.model_copy(update={"seed": cfg.seed})  # train's devices and precision; fixres's own recipe
    trainer = lightning.make_trainer(hardware, cfg.epochs)
    run_id = lightning.fit(trainer, tuning.module, dm, hardware, params.mlflow.experiment, f"fixres@{variant_key}",
                           logged)
    if not trainer.is_global_zero:  # rank 0 alone judges the fine-tune and writes the bundle
        return FixResResult(bundle=None, run_id=run_id, img_size=pre.img_size, train_img_size=spec.img_size,
                            choice=choice, fine_tuned=True)
    holdout, fine_tuned = {}, True
    if choice.scores:  # a held-out set to check the fine-tune on: keep it only where it helps
        holdout = {"adapted": choice.scores[choice.scope][choice.img_size],
                   "fine_tuned": holdout_top1(tuning.module.model, pre, shards, params)}
        fine_tuned = holdout["fine_tuned"] >= holdout["adapted"]
        if not fine_tuned:
            log.warning("fixres: the fine-tune scored %.2f %% on the held-out images, below the adapted model's "
                        "%.2f %%: exporting the adapted model", holdout["fine_tuned"], holdout["adapted"])
            tuning.module.model.load_state_dict(adapted)
    if run_id:
        log_choice(run_id, choice, holdout, fine_tuned)
    models.save_bundle(tuning.module.model, tuning.spec, out)
    return FixResResult(bundle=Path(out), run_id=run_id, img_size=pre.img_size, train_img_size=spec.img_size,
                        choice=choice, holdout_top1=holdout, fine_tuned=fine_tuned)


def choose(params: Params, model: nn.Module, spec: models.ModelSpec, shards: str | Path) -> Choice:
    """The resolutions to try (`fixres.img_size`: a number as it is; None: train resolution x scale; auto: train
    resolution x each of `fixres.candidates`) and, with enough held-out training images, for each of them each
    BatchNorm scope, scored on those images after the re-estimation: the best wins (ties: the smaller resolution,
    then the last BatchNorm only). Without enough held-out images: the paper's scope, and auto takes the scale."""
    cfg, train_size = params.fixres, spec.img_size
    fallback = round(train_size * cfg.scale)
    if cfg.img_size == "auto":
        how, sizes = "auto", sorted({round(train_size * c) for c in cfg.candidates})
    else:
        how, sizes = ("scale", [fallback]) if cfg.img_size is None else ("fixed", [cfg.img_size])
    held = int(read_manifest(shards)["splits"]["train"]["total"] * params.data.holdout)
    if held < cfg.min_holdout:
        if how == "auto":
            log.warning("fixres.img_size: auto needs at least fixres.min_holdout = %d training images held out of "
                        "training (data.holdout), this data holds out %d: using train resolution x fixres.scale = "
                        "%d px", cfg.min_holdout, held, fallback)
            how, sizes = f"scale (too few held out: {held} < {cfg.min_holdout})", [fallback]
        return Choice(img_size=sizes[0], scope="last", how=how)
    scores: dict[str, dict[int, float]] = {scope: {} for scope in SCOPES}
    images = held_images(params, shards)  # each is read once per candidate: decoded once
    for size in sizes:
        pre = spec.preprocessing.at(size)
        for scope in SCOPES:
            candidate = copy.deepcopy(model)
            adapt_batchnorm(candidate, pre, shards, params, scope, images["trained_on"])
            scores[scope][size] = holdout_top1(candidate, pre, shards, params, images["held_out"])
            log.info("fixres: %d px, %s BatchNorm re-estimated: held-out top-1 %.2f %%", size, scope,
                     scores[scope][size])
    best = max(((scope, size) for scope in SCOPES for size in sizes),
               key=lambda c: (scores[c[0]][c[1]], -c[1], -SCOPES.index(c[0])))
    return Choice(img_size=best[1], scope=best[0], how=how, scores=scores)


def held_images(params: Params, shards: str | Path) -> dict[str, HeldSplit | None]:
    """The images `adapt_batchnorm` ("trained_on") and `holdout_top1` ("held_out") read, held in memory where they
    fit (with CPU decoding; else None: streamed)."""
    if feed.resolve_decode(params.data.decode, params.train.accelerator) != "cpu":
        return {"trained_on": None, "held_out": None}
    fraction, limit = params.data.holdout, _max_batches(params) * params.evaluate.batch_size
    return {name: HeldSplit.load(shards, "train", keep, limit, params.data.hold_mb)
            for name, keep in (("trained_on", lambda key: not in_holdout(key, fraction)),
                               ("held_out", lambda key: in_holdout(key, fraction)))}


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, pre: models.Preprocessing, shards: str | Path, params: Params,
                    scope: str = "all", held: HeldSplit | None = None) -> None:
    """The running statistics of the last BatchNorm (scope "last") or of every one ("all") re-estimated at PRE's
    resolution, as the exact mean over the training images (not those held out; HELD: those images in memory)
    with test-time preprocessing; weights untouched, the model left in eval mode."""
    norms = [model.bn2] if scope == "last" else [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    trained_on = params.data.holdout
    for _ in inference.forward(**_source(model, pre, shards, params), split="train",
                               keep=lambda key: not in_holdout(key, trained_on), max_batches=_max_batches(params),
                               held=held):
        pass
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()


def holdout_top1(model: nn.Module, pre: models.Preprocessing, shards: str | Path, params: Params,
                 held: HeldSplit | None = None) -> float:
    """Top-1 (%) on the training images no stage trains on (`data.holdout`; HELD: those images in memory)."""
    held_out = params.data.holdout
    return inference.accuracy(**_source(model, pre, shards, params), split="train",
                              keep=lambda key: in_holdout(key, held_out), max_batches=_max_batches(params),
                              held=held)["top1"]


def log_choice(run_id: str, choice: Choice, holdout: dict[str, float], fine_tuned: bool) -> None:
    """The choice as curves (held-out top-1 against resolution, one per BatchNorm scope) and the fine-tune's check."""
    for scope, by_size in choice.scores.items():
        tracking.log_curve(run_id, f"choice.{scope}_bn.holdout_top1", by_size)
    if holdout:
        tracking.log_curve(run_id, "holdout_top1.fine_tuned", {0: holdout["adapted"], 1: holdout["fine_tuned"]})
        tracking.log_curve(run_id, "fine_tuned", {0: float(fine_tuned)})


def _source(model: nn.Module, pre: models.Preprocessing, shards: str | Path, params: Params) -> dict:
    """The arguments `inference.accuracy` and `forward` share, for MODEL on this machine (CUDA when the Trainer
    would use it, the configured data path)."""
    fed, device = feed.for_inference(params, pre)
    return dict(model=model, pre=pre, shards=shards, batch_size=params.evaluate.batch_size,
                num_workers=params.data.num_workers, feed=fed, device=device)


def _max_batches(params: Params) -> int:
    return -(-params.fixres.max_images // params.evaluate.batch_size)


def prepare(params: Params, model: nn.Module, spec: models.ModelSpec, img_size: int) -> Tuning:
    """MODEL wrapped for the fine-tune at IMG_SIZE: the last BatchNorm reset, to be re-estimated as an exact mean,
    and only it and the classifier (plus `fixres.unfreeze`) trained."""
    model.bn2.reset_running_stats()
    model.bn2.momentum = None
    model.bn2.__class__ = ExactMeanBatchNormAct2d
    speed = lightning.speed_settings(params.train)
    module = lightning.Classifier(model, len(spec.classes),
                                  dict(opt="momentum", lr=params.fixres.lr, momentum=params.fixres.momentum,
                                       weight_decay=0.0),
                                  schedule=None, label_smoothing=0.0, trainable=TRAINABLE + params.fixres.unfreeze,
                                  compile=speed["compile"], channels_last=speed["channels_last"])
    tuned = spec.model_copy(update={"preprocessing": spec.preprocessing.at(img_size)})
    return Tuning(module, tuned, spec.img_size)
