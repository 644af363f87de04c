"""ONNX export of a model, kept only when onnxruntime agrees with PyTorch on it.

The graph takes the normalised image batch at the model's published resolution, `input` float32 [N, 3, S, S] (N
dynamic), and returns `logits` [N, classes]. The file's metadata holds what a consumer needs besides: the class
names, the preprocessing (resize, crop, mean/std) and the parity figures.

TF 'same' padding is the known trap: it is asymmetric wherever a stride-2 layer meets an even-sized feature map, and
an exporter that gets it wrong gives a graph that runs and answers slightly wrong (timm issue #646, PR #1766). So
every export is checked: the same images through PyTorch and onnxruntime (CPU) must give the same top-1 for every
image and logits within `export.atol` (1e-4 in fp32), or the export fails with one line and nothing is written.

The exporter is torch.onnx's TorchScript one, at a pinned opset: on these models it is ~4x faster than the
torch.export-based one (the tiny model in 1.3 s against 5 s, b0 in 2.6 s against 6.8 s) and writes one file where
that one splits off the weights. torch deprecates it since 2.9 but ships it in the pinned 2.15; if it changes, the
parity check is there to say so.
"""
from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn

from effnet import io, models
from effnet.config import ExportConfig
from effnet.data import gpu
from effnet.errors import EffnetError

INPUT, OUTPUT = "input", "logits"
FILE = "model.onnx"  # the name register stores it under, beside the pyfunc's bundle


class Parity(BaseModel):
    images: int
    max_abs_diff: float  # max |logit difference| over every image and class
    max_abs_logit: float  # the logits' scale, for reading the difference against
    top1_agree: int  # images whose top-1 is the same


class Exported(BaseModel):
    path: Path
    opset: int
    input_shape: list[int | str]
    classes: list[str]
    parity: Parity


def export(model: nn.Module, spec: models.ModelSpec, out: Path, cfg: ExportConfig,
           images: torch.Tensor | None = None) -> Exported:
    """MODEL as ONNX at OUT, checked on IMAGES (uint8 NCHW at the spec's resolution; default: `synthetic` ones)."""
    model = model.eval().cpu().to(memory_format=torch.contiguous_format)
    x = normalised(spec, synthetic(cfg.parity_images, spec.img_size) if images is None else images)
    with io.atomic_file(out) as tmp:
        to_onnx(model, x[:1], tmp, cfg.opset)
        parity = check(model, tmp, x, cfg.atol)
        annotate(tmp, spec, parity, cfg.opset)
    return Exported(path=out, opset=cfg.opset, input_shape=["batch", 3, spec.img_size, spec.img_size],
                    classes=spec.classes, parity=parity)


@contextmanager
def exported(bundle: Path, cfg: ExportConfig) -> Iterator[Path]:
    """BUNDLE exported and checked into a temporary folder, for as long as the block runs (register logs it)."""
    model, spec = models.load_bundle(bundle)
    with tempfile.TemporaryDirectory(prefix="effnet-onnx-") as tmp:
        yield export(model, spec, Path(tmp) / FILE, cfg).path


def synthetic(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """N seeded uint8 NCHW images, SIZE px: smooth random colour fields with a little grain, closer to a photo's
    statistics than white noise (which drives activations, and so fp32 rounding, far past a photo's)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 6, generator=g) * 255
    fine = torch.randn(n, 3, size, size, generator=g) * 12
    return (F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False) + fine).clamp(0, 255).byte()


def normalised(spec: models.ModelSpec, images: torch.Tensor) -> torch.Tensor:
    pre = spec.preprocessing
    return gpu.normalize(images.cpu(), pre.mean, pre.std, channels_last=False)


def to_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    with warnings.catch_warnings():  # the exporter's deprecation notice, and tracing 'same' padding's shape math
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset, input_names=[INPUT],
                          output_names=[OUTPUT], dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})


def check(model: nn.Module, path: Path, x: torch.Tensor, atol: float) -> Parity:
    """X (normalised) through MODEL and through onnxruntime on the file at PATH; EffnetError past the bounds."""
    import onnxruntime as ort

    with torch.inference_mode():
        expected = model(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT], {INPUT: x.numpy()})[0]
    diff = float(np.abs(got - expected).max())
    parity = Parity(images=len(x), max_abs_diff=diff, max_abs_logit=float(np.abs(expected).max()),
                    top1_agree=int((got.argmax(1) == expected.argmax(1)).sum()))
    if diff > atol or parity.top1_agree < len(x):
        raise EffnetError(f"ONNX parity check failed: onnxruntime vs PyTorch on {len(x)} images: max |logit "
                          f"difference| {diff:.3g} (bound {atol:g}; logits up to {parity.max_abs_logit:.3g}), "
                          f"same top-1 on {parity.top1_agree}; nothing written")
    return parity


def annotate(path: Path, spec: models.ModelSpec, parity: Parity, opset: int) -> None:
    """Classes, preprocessing and parity into the file's metadata (`metadata_props`)."""
    import onnx

    proto = onnx.load(str(path))
    meta = {"classes": json.dumps(spec.classes), "preprocessing": spec.preprocessing.model_dump_json(),
            "variant": spec.variant, "parity": parity.model_dump_json(), "opset": str(opset),
            "input": f"{INPUT}: float32 [batch, 3, {spec.img_size}, {spec.img_size}], normalised"}
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))
