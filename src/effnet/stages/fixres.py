"""The `fixres` stage (Touvron et al. 2019, "Fixing the train-test resolution discrepancy").

RandomResizedCrop training makes objects look larger than a center crop at test time does; testing at a higher
resolution undoes that, once the model is adapted to the new statistics. As the paper does for EfficientNet:
fine-tune at the test resolution on training images with *test-time* preprocessing (resize + center crop, flip),
training only the classifier and re-estimating the last BatchNorm; everything else stays frozen.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from timm.layers import BatchNormAct2d

from effnet import lightning, models
from effnet.config import Params
from effnet.data import feed, transforms

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


class FixResResult(BaseModel):
    bundle: Path | None  # None on DDP ranks other than 0, which write nothing
    run_id: str | None  # the MLflow run (None on DDP ranks other than 0)
    img_size: int
    train_img_size: int


@dataclass
class Tuning:
    """The model set up for the fine-tune: frozen but for TRAINABLE (+ fixres.unfreeze), bn2 re-estimated."""

    module: lightning.Classifier
    spec: models.ModelSpec  # at the FixRes resolution
    train_img_size: int


def run(params: Params, variant_key: str, shards: str | Path, trained: Path, out: Path) -> FixResResult:
    """Fine-tune the TRAINED bundle at the FixRes resolution on SHARDS; write the new bundle to OUT."""
    cfg = params.fixres
    tuning = prepare(params, trained)
    pre = tuning.spec.preprocessing
    dm = feed.data_module(params, shards, pre, transforms.fixres_transform(pre, uint8=True), cfg.batch_size,
                          cfg.seed, lightning.speedups(params.train)["channels_last"], augment=False)
    logged = {**cfg.model_dump(), "img_size": pre.img_size, "train_img_size": tuning.train_img_size,
              "trainable": TRAINABLE + cfg.unfreeze}
    hardware = params.train.model_copy(update={"seed": cfg.seed})  # train's devices and precision; fixres's own recipe
    trainer = lightning.make_trainer(hardware, cfg.epochs)
    run_id = lightning.fit(trainer, tuning.module, dm, hardware, params.mlflow.experiment, f"fixres@{variant_key}",
                           logged)
    if trainer.is_global_zero:
        models.save_bundle(tuning.module.model, tuning.spec, out)
    return FixResResult(bundle=Path(out) if trainer.is_global_zero else None, run_id=run_id, img_size=pre.img_size,
                        train_img_size=tuning.train_img_size)


def prepare(params: Params, trained: Path) -> Tuning:
    """The trained bundle, its last BatchNorm reset to be re-estimated as an exact mean, wrapped for training only
    the classifier and that BatchNorm (plus `fixres.unfreeze`)."""
    model, spec = models.load_bundle(trained)
    size = fixres_size(params, spec.img_size)
    model.bn2.reset_running_stats()  # re-estimate from scratch, as the exact mean over the batches
    model.bn2.momentum = None
    model.bn2.__class__ = ExactMeanBatchNormAct2d
    module = lightning.Classifier(model, len(spec.classes),
                                  dict(opt="momentum", lr=params.fixres.lr, momentum=params.fixres.momentum,
                                       weight_decay=0.0),
                                  schedule=None, label_smoothing=0.0, trainable=TRAINABLE + params.fixres.unfreeze,
                                  **lightning.speedups(params.train))
    tuned = spec.model_copy(update={"preprocessing": spec.preprocessing.at(size)})
    return Tuning(module, tuned, spec.img_size)


def fixres_size(params: Params, train_size: int) -> int:
    return params.fixres.img_size or round(train_size * params.fixres.scale)
