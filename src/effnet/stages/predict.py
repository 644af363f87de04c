"""`effnet predict`: top-k classes per image of a folder, a CSV/TSV of paths, an image file or shards, with a model
from a bundle or the registry, one row per image as CSV, TSV, JSON lines or Parquet (the format from the output's
suffix; CSV on standard output by default).

The model's own preprocessing at its published resolution; loader workers decode and crop (uint8), the device
normalises and runs the batch; rows stream out as batches finish, so memory stays flat in the number of images. An
item that is not a usable image gets a row with the reason (and no classes). Everything a user can get wrong (the
source, the output format, the model URI) fails in one line before any image is read.
"""
from __future__ import annotations

import time
from pathlib import Path

from pydantic import BaseModel

from effnet import console, serving, tables
from effnet.config import PredictConfig
from effnet.data import sources, transforms


class PredictResult(BaseModel):
    model: str
    out: str  # the file written, or "-" for standard output
    images: int  # rows written
    failed: int  # rows with an error instead of classes
    seconds: float
    images_per_second: float
    device: str


def run(cfg: PredictConfig, model_uri: str, source: str | Path, out: Path | None = None,
        fmt: str | None = None) -> PredictResult:
    """Predict every item of SOURCE with the model at MODEL_URI; rows to OUT (None: standard output) as FMT
    (None: from OUT's suffix)."""
    fmt = tables.format_of(out, fmt)
    items, total = sources.open_source(source)
    device = serving.resolve_device(cfg.device)
    predictor = serving.Predictor(*serving.load_model(model_uri), device, cfg.topk)
    transform = transforms.eval_transform(predictor.spec.preprocessing, uint8=True)
    loader = sources.loader(items, transform, cfg.batch_size, cfg.num_workers, pin_memory=device.type == "cuda")
    done = failed = 0
    start = time.perf_counter()
    with tables.writer(out, fmt, serving.columns(predictor.k)) as write, console.progress("predict") as bar:
        task = bar.add_task("predict", total=total)
        for batch in loader:
            write(predictor.rows(batch))
            done, failed = done + len(batch.names), failed + sum(e is not None for e in batch.errors)
            bar.advance(task, len(batch.names))
    seconds = time.perf_counter() - start
    return PredictResult(model=str(model_uri), out=str(out) if out else "-", images=done, failed=failed,
                         seconds=round(seconds, 3), images_per_second=round(done / seconds, 2), device=str(device))
