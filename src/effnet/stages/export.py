"""`effnet export`: a model (bundle or registry URI) to ONNX, parity-checked against PyTorch before it is written
(`effnet.onnx_export`): on the first `export.parity_images` readable images of `--images` (any predict source), or
on seeded synthetic images without it."""
from __future__ import annotations

from pathlib import Path

import torch

from effnet import onnx_export, serving
from effnet.config import ExportConfig
from effnet.data import sources, transforms
from effnet.errors import EffnetError


def run(cfg: ExportConfig, model_uri: str, out: Path, images: str | Path | None = None) -> onnx_export.Exported:
    source = sources.open_source(images)[0] if images is not None else None  # before the model loads
    model, spec = serving.load_model(model_uri)
    batch = None if source is None else first_images(source, spec, cfg.parity_images, str(images))
    return onnx_export.export(model, spec, out, cfg, batch)


def first_images(source: sources.Source, spec, n: int, name: str) -> torch.Tensor:
    """The first N images of SOURCE that decode, preprocessed for SPEC (uint8 NCHW); unreadable items skipped."""
    transform = transforms.eval_transform(spec.preprocessing, uint8=True)
    found: list[torch.Tensor] = []
    for batch in sources.Batches(source, transform, n):
        found += list(batch.images)
        if len(found) >= n:
            break
    if not found:
        raise EffnetError(f"--images {name}: no readable image")
    return torch.stack(found[:n])
