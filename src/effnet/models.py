"""Model factory over timm, the model bundle that stages hand to each other, and the cross-replica BatchNorm layer
`train.sync_bn` swaps in under DDP.

A bundle is a folder with `model.safetensors` (weights only: nothing is unpickled when it is loaded) and
`model.json` (the ModelSpec: which variant, the classes, and the `Preprocessing` it expects).
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import timm
import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
from pydantic import BaseModel, ConfigDict, model_serializer, model_validator
from safetensors.torch import load_file, save_file
from timm.layers import BatchNormAct2d
from timm.models._efficientnet_builder import _init_weight_goog
from timm.models.efficientnet import _gen_efficientnet
from torch import nn

from effnet import io, variants
from effnet.errors import EffnetError

log = logging.getLogger(__name__)
TF_BN_EPS = 1e-3  # TF's BatchNorm epsilon; timm's tf_* models use it with 'same' padding


class Preprocessing(BaseModel):
    """What a model expects of its input: timm's eval transform (shorter side to img_size / crop_pct, center crop
    img_size, `interpolation`) and normalisation by mean/std. Training augments at the same img_size."""

    model_config = ConfigDict(frozen=True)
    img_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def at(self, img_size: int) -> Preprocessing:
        """The same preprocessing at another resolution (FixRes, the evaluate sweep)."""
        return self.model_copy(update={"img_size": img_size})


class ModelSpec(BaseModel):
    """Everything needed to rebuild a trained model and feed it: stored beside its weights (`model.json`, whose
    preprocessing keys stay flat, as bundles have always been written)."""

    variant: str
    model: str | None = None  # card ID, or None with phi
    phi: float | None = None
    classes: list[str]
    preprocessing: Preprocessing

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, data: Any) -> Any:
        if isinstance(data, dict) and "preprocessing" not in data:
            keys = Preprocessing.model_fields
            data = {k: v for k, v in data.items() if k not in keys} | {
                "preprocessing": {k: v for k, v in data.items() if k in keys}}
        return data

    @model_serializer
    def _flat(self) -> dict:
        return {"variant": self.variant, "model": self.model, "phi": self.phi, "classes": self.classes,
                **self.preprocessing.model_dump()}

    @property
    def img_size(self) -> int:
        return self.preprocessing.img_size

    def resolve(self) -> variants.Variant:
        return variants.resolve(self.model, self.phi)


def build(variant: variants.Variant, num_classes: int, drop_rate: float | None = None,
          drop_path_rate: float | None = None, bn_momentum: float | None = None, pretrained: bool = False) -> nn.Module:
    """A timm TF-EfficientNet for `variant`: TF BatchNorm eps, 'same' padding, the recipe's dropout and drop-path.

    bn_momentum is in TF terms (0.99 -> PyTorch 0.01), as the card gives it. The model carries the pretrained
    config (mean/std) of the timm checkpoint the card's row describes (`variant.arch`, name.tag).
    """
    kwargs = dict(
        num_classes=num_classes,
        drop_rate=variant.dropout if drop_rate is None else drop_rate,
        drop_path_rate=variant.drop_path_rate if drop_path_rate is None else drop_path_rate,
        # TF's moving-average decay -> PyTorch momentum (rounded: 1 - 0.99 is 0.010000000000000009 in floats)
        bn_momentum=round(1.0 - (variant.recipe.bn_momentum if bn_momentum is None else bn_momentum), 9),
        bn_eps=TF_BN_EPS,
        pad_type="same",
    )
    if variant.phi is None:
        return timm.create_model(variant.arch, pretrained=pretrained, **kwargs)
    if pretrained:
        raise EffnetError(f"{variant.name}: no pretrained weights exist for a compound-scaled variant")
    # The card's compound scaling through timm's own EfficientNet generator (what tf_efficientnet_b0 calls).
    arch, _, tag = variant.arch.partition(".")
    return _gen_efficientnet(arch, channel_multiplier=variant.width, depth_multiplier=variant.depth,
                             pretrained_cfg=tag or None, **kwargs)


def measure(variant: variants.Variant, num_classes: int = 1000, img_size: int | None = None) -> dict:
    """Parameters and multiply-adds of the built model at `img_size` (default: the variant's), counted on the
    meta device: no memory, no compute, so even L2 is cheap. GMACs are FlopCounterMode's FLOPs / 2 (it counts
    a multiply-add as 2): convolutions and the classifier, the way the paper counts B0's 0.39 B. (The card's
    FLOPs figures run ~1.27x these: B0 0.489, B7 48 against 0.386 and 37.7.)"""
    from torch.utils.flop_counter import FlopCounterMode
    size = img_size or variant.img_size
    with torch.device("meta"):
        model = build(variant, num_classes).eval()
        x = torch.empty(1, 3, size, size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return dict(params=sum(p.numel() for p in model.parameters()), gmacs=counter.get_total_flops() / 2 / 1e9)


def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], logit_std: float = 2.0,
              residual_scale: float = 0.1) -> nn.Module:
    """A model with random weights made to behave numerically like a trained one, for tests and benches that compare
    logits. Fresh BatchNorm statistics (mean 0, variance 1) shrink the activations block after block, to logits near
    1e-5 against which any comparison is vacuous; and at full scale, random residual branches make a deep model
    chaotic (L2's fp32 and fp64 logits differ by whole units), where no parity bound means anything. So: each
    residual branch's last BatchNorm scaled by RESIDUAL_SCALE (small corrections, as trained branches are), the
    statistics measured on BATCHES, and the classifier scaled to logits of standard deviation LOGIT_STD on the
    last batch (an ImageNet-trained EfficientNet's are about 2)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    with torch.no_grad():
        for block in model.modules():
            if getattr(block, "has_skip", False):  # timm's blocks with a residual connection
                [*_, last] = (m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
                last.weight.mul_(residual_scale)
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # the exact mean over the batches
        model.train()
        for x in batches:
            model(x)
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        scale = logit_std / model.eval()(x).std().item()
        head = model.get_classifier()
        head.weight.mul_(scale)
        head.bias.mul_(scale)
    return model


def preprocessing(model: nn.Module, variant: variants.Variant, img_size: int | None = None) -> Preprocessing:
    """timm's preprocessing for the model (mean/std of its pretrained config) at the variant's crop."""
    cfg = timm.data.resolve_data_config(model=model)
    return Preprocessing(img_size=img_size or variant.img_size, crop_pct=variant.crop_pct,
                         interpolation=variant.interpolation, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))


HEAD_PREFIX = "classifier."


def _body_shapes(state: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items() if not k.startswith(HEAD_PREFIX)}


@cache
def _card_body_shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    """Every card variant's tensor names and shapes, classifier left out (built on the meta device: cheap)."""
    out = {}
    for name, v in variants.table().items():
        with torch.device("meta"):
            out[name] = _body_shapes(build(v, num_classes=1).state_dict())
    return out


def apparent_variant(state: dict) -> str | None:
    """The card variant whose architecture a state dict fits (any classifier size), or None."""
    shapes = _body_shapes(state)
    return next((name for name, own in _card_body_shapes().items() if own == shapes), None)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """Tensors only: safetensors, or a .pth/.pt/.bin read with weights_only=True (a {'state_dict': ...} or
    {'model': ...} checkpoint is unwrapped, a DataParallel 'module.' prefix dropped)."""
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unreadable, or a pickle that is more than weights
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EffnetError(f"cannot read weights file {path} (weights only): {why}") from e
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EffnetError(f"weights file {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: nn.Module, path: str | Path, variant_name: str) -> None:
    """Load a local safetensors or .pth state dict (weights only). A classifier of another size is re-initialised.

    Weights of another architecture fail with one line naming the file, what the file looks like, and the variant.
    """
    path = Path(path)
    if not path.is_file():
        raise EffnetError(f"weights file not found: {path}")
    state = _read_state(path)
    own = model.state_dict()
    theirs, ours = _body_shapes(state), _body_shapes(own)
    if theirs != ours:
        mismatched = sum(1 for k in theirs.keys() & ours.keys() if theirs[k] != ours[k])
        missing, unexpected = len(ours.keys() - theirs.keys()), len(theirs.keys() - ours.keys())
        looks = apparent_variant(state)
        what = f"{looks} weights" if looks else "weights of none of the card's variants"
        raise EffnetError(f"weights file {path} holds {what}, not {variant_name} "
                          f"({mismatched} mismatched, {missing} missing, {unexpected} unexpected tensors)")
    head = {k: tuple(v.shape) for k, v in own.items() if k.startswith(HEAD_PREFIX)}
    if {k: tuple(state[k].shape) for k in head if k in state} != head:
        file_classes = state["classifier.weight"].shape[0] if "classifier.weight" in state else "no"
        log.warning("%s: classifier has %s classes, the data has %s: re-initialising the classifier",
                    path.name, file_classes, own["classifier.weight"].shape[0])
        state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
        _init_weight_goog(model.get_classifier())  # timm's (and TF's) initialisation of a fresh classifier
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) - set(head) or unexpected:
        raise EffnetError(f"weights file {path} does not fit {variant_name}: "
                          f"{len(missing)} missing, {len(unexpected)} unexpected tensors")


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict as contiguous CPU tensors: what a bundle holds."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def weights_hash(model: nn.Module) -> str:
    """sha256 of the model's weights and buffers, names and bytes in name order: equal hashes, equal bundles'
    tensors (what a run's ranks, or two runs, can compare without writing a file)."""
    h = hashlib.sha256()
    for name, t in sorted(cpu_state(model).items()):
        h.update(name.encode() + b"\0" + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_bundle(model: nn.Module, spec: ModelSpec, out: Path) -> None:
    """Write the bundle whole or not at all (`io.atomic_dir`)."""
    state = cpu_state(model)
    with io.atomic_dir(out) as tmp:
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "model.json").write_text(spec.model_dump_json(indent=2))


def load_bundle(path: Path) -> tuple[nn.Module, ModelSpec]:
    path = Path(path)
    if not (path / "model.json").is_file():
        raise EffnetError(f"not a model bundle (no model.json): {path}")
    spec = ModelSpec.model_validate(json.loads((path / "model.json").read_text()))
    model = build(spec.resolve(), num_classes=len(spec.classes))
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.eval(), spec


class SyncBatchNormAct2d(BatchNormAct2d):
    """timm's BatchNormAct2d with its training statistics taken over the global batch, every rank's images (the TPU
    recipe's cross-replica BatchNorm). Each rank's count, mean and sum of squared deviations are all-gathered (a
    differentiable all_gather, so gradients flow through the statistics to every rank, as SyncBatchNorm's do) and
    combined (Chan et al.'s parallel variance). Unlike torch's SyncBatchNorm, which refuses CPU modules, it runs
    on any device and backend (gloo too). Same parameters, buffers and eval forward as the layer it replaces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c, xf = x.shape[1], x.float()
        mean = xf.mean(dim=(0, 2, 3))
        local = torch.cat([mean.new_full((1,), xf.numel() / c), mean,
                           (xf - mean[None, :, None, None]).square().sum(dim=(0, 2, 3))])
        stats = torch.stack(dist_nn.all_gather(local))  # (ranks, 1 + 2C)
        counts, means, m2s = stats[:, :1], stats[:, 1:c + 1], stats[:, c + 1:]
        n = counts.sum()
        mean = (counts * means).sum(0) / n
        var = (m2s + counts * (means - mean).square()).sum(0) / n
        if self.track_running_stats:
            with torch.no_grad():  # as F.batch_norm updates them: momentum weighs the new value, variance unbiased
                self.num_batches_tracked.add_(1)
                weight = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked.item()
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), weight)
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), weight)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return self.act(self.drop(y.to(x.dtype)))
