"""The `evaluate` stage: top-1/top-5 on the val shards with each model's own preprocessing (resize by crop pct,
center crop, bicubic), for every model at every model's resolution: the FixRes comparison in one table."""
from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import torch
from torchmetrics.classification import MulticlassAccuracy

from effnet import models, tracking
from effnet.config import Params
from effnet.data import transforms
from effnet.data.stream import eval_loader


@torch.inference_mode()
def accuracy(model: torch.nn.Module, dc: dict, shards: Path, batch_size: int, num_workers: int) -> dict[str, float]:
    """Top-1 and top-5 (in %) of `model` over the val split at data config `dc`."""
    n = model.get_classifier().out_features
    top1, top5 = MulticlassAccuracy(n, average="micro"), MulticlassAccuracy(n, top_k=min(5, n), average="micro")
    model.eval()
    for x, y, _ in eval_loader(shards, transforms.eval_transform(dc), batch_size, num_workers):
        logits = model(x)
        top1.update(logits, y)
        top5.update(logits, y)
    return {"top1": round(100 * top1.compute().item(), 4), "top5": round(100 * top5.compute().item(), 4)}


def run(params: Params, variant_key: str, shards: Path, bundles: dict[str, Path], out: Path) -> dict:
    """Evaluate each bundle (label -> folder) at each bundle's resolution; write OUT (JSON) and log to MLflow."""
    loaded = {label: models.load_bundle(path) for label, path in bundles.items()}
    sizes = sorted({spec.img_size for _, spec in loaded.values()})
    metrics = {}
    for label, (model, spec) in loaded.items():
        for size in sizes:
            dc = spec.model_dump(include={"crop_pct", "interpolation", "mean", "std"}) | {"img_size": size}
            metrics.setdefault(label, {})[f"res{size}"] = accuracy(model, dc, shards, params.evaluate.batch_size,
                                                                   params.data.num_workers)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(tmp, out)
    mlflow.set_experiment(experiment_id=tracking.experiment(params.mlflow.experiment))
    with mlflow.start_run(run_name=f"evaluate@{variant_key}", tags={"stage": "evaluate", "variant": variant_key}):
        mlflow.log_metrics({f"{label}.{res}.{k}": v for label, by_res in metrics.items()
                            for res, m in by_res.items() for k, v in m.items()})
    return metrics
