"""Model factory over timm, and the model bundle that stages hand to each other.

A bundle is a folder with `model.safetensors` (weights only: nothing is unpickled when it is loaded) and
`model.json` (the ModelSpec: which variant, the classes, and the preprocessing it expects).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import timm
import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file
from timm.models.efficientnet import _gen_efficientnet
from torch import nn

from effnet import variants
from effnet.errors import EffnetError

log = logging.getLogger(__name__)
TF_BN_EPS = 1e-3  # TF's BatchNorm epsilon; timm's tf_* models use it with 'same' padding


class ModelSpec(BaseModel):
    """Everything needed to rebuild a trained model and feed it: stored beside its weights."""

    variant: str
    model: str | None = None  # card ID, or None with phi
    phi: float | None = None
    classes: list[str]
    img_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def resolve(self) -> variants.Variant:
        return variants.resolve(self.model, self.phi)


def build(variant: variants.Variant, num_classes: int, drop_rate: float | None = None,
          drop_path_rate: float | None = None, bn_momentum: float | None = None, pretrained: bool = False) -> nn.Module:
    """A timm TF-EfficientNet for `variant`: TF BatchNorm eps, 'same' padding, the recipe's dropout and drop-path.

    bn_momentum is in TF terms (0.99 -> PyTorch 0.01), as the card gives it.
    """
    kwargs = dict(
        num_classes=num_classes,
        drop_rate=variant.dropout if drop_rate is None else drop_rate,
        drop_path_rate=variant.drop_path_rate if drop_path_rate is None else drop_path_rate,
        bn_momentum=1.0 - (variant.recipe.bn_momentum if bn_momentum is None else bn_momentum),
    )
    if variant.phi is None:
        return timm.create_model(variant.arch, pretrained=pretrained, **kwargs)
    if pretrained:
        raise EffnetError(f"{variant.name}: no pretrained weights exist for a compound-scaled variant")
    # The card's compound scaling through timm's own EfficientNet generator (what tf_efficientnet_b0 calls).
    return _gen_efficientnet(variant.arch, channel_multiplier=variant.width, depth_multiplier=variant.depth,
                             bn_eps=TF_BN_EPS, pad_type="same", **kwargs)


def data_config(model: nn.Module, variant: variants.Variant, img_size: int | None = None) -> dict:
    """timm's preprocessing for the model (mean/std of its pretrained config) at the variant's crop."""
    cfg = timm.data.resolve_data_config(model=model)
    return dict(img_size=img_size or variant.img_size, crop_pct=variant.crop_pct,
                interpolation=variant.interpolation, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))


def load_weights(model: nn.Module, path: str | Path, variant_name: str) -> None:
    """Load a local safetensors or .pth state dict (weights only). A classifier of another size is re-initialised."""
    path = Path(path)
    if not path.is_file():
        raise EffnetError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = model.state_dict()
    head = {k for k in state if k.startswith("classifier.")}
    if any(k in own and own[k].shape != state[k].shape for k in head):
        log.warning("%s: classifier has %s classes, data has %s: re-initialising the classifier",
                    path.name, state["classifier.weight"].shape[0], own["classifier.weight"].shape[0])
        state = {k: v for k, v in state.items() if k not in head}
    body_mismatch = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing, unexpected = set(own) - set(state) - head, set(state) - set(own)
    if body_mismatch or missing or unexpected:
        raise EffnetError(f"weights file {path} does not fit variant {variant_name} "
                          f"({len(body_mismatch)} mismatched, {len(missing)} missing, {len(unexpected)} unexpected tensors)")
    model.load_state_dict(state, strict=False)


def save_bundle(model: nn.Module, spec: ModelSpec, out: Path) -> None:
    """Write the bundle to a temporary folder and rename it into place: never a half-written bundle."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"))
    (tmp / "model.json").write_text(spec.model_dump_json(indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def load_bundle(path: Path) -> tuple[nn.Module, ModelSpec]:
    path = Path(path)
    if not (path / "model.json").is_file():
        raise EffnetError(f"not a model bundle (no model.json): {path}")
    spec = ModelSpec.model_validate(json.loads((path / "model.json").read_text()))
    model = build(spec.resolve(), num_classes=len(spec.classes))
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.eval(), spec
