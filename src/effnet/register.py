"""The `register` stage: log the final (FixRes) model to MLflow as a pyfunc and register it in the Model Registry,
one registered model per variant, the model card's figures and the measured accuracy as version tags.

Aliases: each new version becomes the challenger; it takes the champion alias only when its top-1 beats the
current champion's by `registry.margin` points (or there is no champion yet).
"""
from __future__ import annotations

import json
import os
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec
from PIL import Image

import effnet
from effnet import models, tracking
from effnet.config import Params
from effnet.data import transforms

# What the served model imports: pinned to the versions it was trained with.
SERVING_REQUIREMENTS = ["torch", "torchvision", "timm", "safetensors", "pillow", "numpy", "pandas", "pydantic",
                        "pyyaml", "mlflow"]


class EffnetPyfunc(mlflow.pyfunc.PythonModel):
    """Images in (a uint8 NHWC array, or a list of HWC arrays or image paths), class probabilities out
    (a DataFrame, one column per class name)."""

    def load_context(self, context):
        self.model, self.spec = models.load_bundle(Path(context.artifacts["bundle"]))
        self.transform = transforms.eval_transform(
            self.spec.model_dump(include={"img_size", "crop_pct", "interpolation", "mean", "std"}))

    @staticmethod
    def _image(item) -> Image.Image:
        if isinstance(item, (str, os.PathLike)):
            with Image.open(item) as img:
                return img.convert("RGB")
        return Image.fromarray(np.asarray(item, dtype=np.uint8)).convert("RGB")

    def predict(self, context, model_input, params=None):
        if isinstance(model_input, pd.DataFrame):
            model_input = model_input.iloc[:, 0].tolist()
        batch = torch.stack([self.transform(self._image(item)) for item in model_input])
        with torch.inference_mode():
            probs = self.model(batch).softmax(dim=1).numpy()
        return pd.DataFrame(probs, columns=self.spec.classes)


def signature(classes: list[str]) -> ModelSignature:
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
                          outputs=Schema([ColSpec("float", c) for c in classes]))


def promote(client: mlflow.MlflowClient, name: str, version_: str, top1: float, cfg) -> dict:
    """Challenger always; champion when it beats the current champion by the margin. Returns the decision."""
    client.set_registered_model_alias(name, cfg.challenger_alias, version_)
    try:
        champion = client.get_model_version_by_alias(name, cfg.alias)
        champion_top1 = float(champion.tags.get("measured_top1", "-inf"))
    except MlflowException:
        champion, champion_top1 = None, float("-inf")
    promoted = champion is None or top1 >= champion_top1 + cfg.margin
    if promoted:
        client.set_registered_model_alias(name, cfg.alias, version_)
    return {"promoted": promoted, "top1": top1, "champion_top1": champion_top1 if champion else None,
            "margin": cfg.margin, "previous_champion": champion.version if champion else None}


def run(params: Params, variant_key: str, bundle: Path, metrics_file: Path, out: Path) -> dict:
    _, spec = models.load_bundle(bundle)
    variant = spec.resolve()
    metrics = json.loads(Path(metrics_file).read_text())
    final = metrics["fixres"][f"res{spec.img_size}"]
    example = np.random.default_rng(0).integers(0, 256, (2, spec.img_size, spec.img_size, 3), dtype=np.uint8)
    mlflow.set_experiment(experiment_id=tracking.experiment(params.mlflow.experiment))
    tags = variant.card_tags() | {"variant": variant_key, "measured_top1": str(final["top1"]),
                                  "measured_top5": str(final["top5"]), "img_size": str(spec.img_size)}
    with mlflow.start_run(run_name=f"register@{variant_key}", tags={"stage": "register", "variant": variant_key}) as r:
        mlflow.log_metrics({"top1": final["top1"], "top5": final["top5"]})
        info = mlflow.pyfunc.log_model(
            name="model", python_model=EffnetPyfunc(), artifacts={"bundle": str(bundle)},
            code_paths=[str(Path(effnet.__file__).parent)], signature=signature(spec.classes),
            input_example=example, registered_model_name=variant_key,
            pip_requirements=[f"{p}=={version(p)}" for p in SERVING_REQUIREMENTS])
        client = mlflow.MlflowClient()
        mv = info.registered_model_version
        for k, v in tags.items():
            client.set_model_version_tag(variant_key, mv, k, v)
        client.update_model_version(variant_key, mv, description=f"{variant.name} (effnet), card: {tags}")
        decision = promote(client, variant_key, mv, final["top1"], params.registry)
        mlflow.log_dict(decision, "promotion.json")
    record = {"name": variant_key, "version": str(mv), "run_id": r.info.run_id, "model_uri": info.model_uri,
              **decision}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out)
    return record
