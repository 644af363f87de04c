"""The `fixres` stage (Touvron et al. 2019, "Fixing the train-test resolution discrepancy").

RandomResizedCrop training makes objects look larger than a center crop at test time does; testing at a higher
resolution undoes that, once the model is adapted to the new statistics. As the paper does for EfficientNet:
fine-tune at the test resolution on training images with *test-time* preprocessing (resize + center crop, flip),
training only the classifier and re-estimating the last BatchNorm; everything else stays frozen.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d

from effnet import models
from effnet.config import Params
from effnet.data import transforms
from effnet.train import Classifier, fit, shard_data, speedups

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


def fixres_size(params: Params, train_size: int) -> int:
    return params.fixres.img_size or round(train_size * params.fixres.scale)


def run(params: Params, variant_key: str, shards: Path, trained: Path, out: Path) -> Path:
    cfg = params.fixres
    model, spec = models.load_bundle(trained)
    train_size, size = spec.img_size, fixres_size(params, spec.img_size)
    spec = spec.model_copy(update={"img_size": size})
    dc = spec.model_dump(include={"img_size", "crop_pct", "interpolation", "mean", "std"})
    model.bn2.reset_running_stats()  # re-estimate from scratch, as the exact mean over the batches
    model.bn2.momentum = None
    model.bn2.__class__ = ExactMeanBatchNormAct2d
    dm = shard_data(params, shards, dc, transforms.fixres_transform(dc, uint8=True), cfg.batch_size, cfg.seed,
                    augment=False)
    module = Classifier(model, len(spec.classes), dict(opt="momentum", lr=cfg.lr, momentum=cfg.momentum,
                                                       weight_decay=0.0),
                        schedule=None, label_smoothing=0.0, trainable=TRAINABLE + cfg.unfreeze,
                        **speedups(params.train))
    train_cfg = params.train.model_copy(update={"seed": cfg.seed})
    fit(module, dm, train_cfg, cfg.epochs, params.mlflow.experiment, f"fixres@{variant_key}",
        {**cfg.model_dump(), "img_size": size, "train_img_size": train_size, "trainable": TRAINABLE + cfg.unfreeze})
    models.save_bundle(model, spec, out)
    return Path(out)
