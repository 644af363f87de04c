"""The registered model's Python face: an MLflow pyfunc over a model bundle, with its signature and the pinned
requirements it is served with.

`mlflow.pyfunc.load_model(uri).predict(x)` takes x a uint8 NHWC array (the signature), or a 1-D object array of
image paths or of HWC arrays of any sizes, e.g. `np.array(paths, dtype=object)` (MLflow's schema check lets such
"ragged" arrays through a tensor signature; a plain Python list, or a DataFrame, it rejects before the model sees
it: wrap a list in `np.array(..., dtype=object)`). The result is a DataFrame of class probabilities, one column per
class name.
"""
from __future__ import annotations

import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec
from PIL import Image

from effnet import models
from effnet.data import transforms

# What the served model imports: pinned to the versions it was trained with.
SERVING_REQUIREMENTS = ["torch", "torchvision", "timm", "safetensors", "pillow", "numpy", "pandas", "pydantic",
                        "pyyaml", "mlflow"]


class EffnetPyfunc(mlflow.pyfunc.PythonModel):
    """Images in (a uint8 NHWC array, or a 1-D object array of HWC arrays or image paths; called directly, also a
    list or a DataFrame with a `path` column), class probabilities out (a DataFrame, one column per class name)."""

    def load_context(self, context):
        self.model, self.spec = models.load_bundle(Path(context.artifacts["bundle"]))
        self.transform = transforms.eval_transform(self.spec.preprocessing)

    @staticmethod
    def _image(item) -> Image.Image:
        if isinstance(item, (str, os.PathLike)):
            with Image.open(item) as img:
                return img.convert("RGB")
        return Image.fromarray(np.asarray(item, dtype=np.uint8)).convert("RGB")

    def predict(self, context, model_input, params=None):
        if isinstance(model_input, pd.DataFrame):
            column = "path" if "path" in model_input.columns else model_input.columns[0]
            model_input = model_input[column].tolist()
        batch = torch.stack([self.transform(self._image(item)) for item in model_input])
        with torch.inference_mode():
            probs = self.model(batch).softmax(dim=1).numpy()
        return pd.DataFrame(probs, columns=self.spec.classes)


def signature(classes: list[str]) -> ModelSignature:
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
                          outputs=Schema([ColSpec("float", c) for c in classes]))
