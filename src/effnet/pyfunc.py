"""The registered model's Python face: an MLflow pyfunc over a model bundle, with its signature and the pinned
requirements it is served with.

`mlflow.pyfunc.load_model(uri).predict(x)` and `mlflow models serve` take a batch of images in any of these forms:
a uint8 NHWC array; a list or 1-D array of items, each base64 text of an encoded image (JPEG, PNG, ...; a `data:`
URL too), encoded bytes, an image path, or an HWC array of any size; a DataFrame or dict whose `image` (or `path`)
column holds such items. Over HTTP that is `{"inputs": ["<base64>", ...]}` or `{"dataframe_split": {"columns":
["image"], "data": [["<base64>"], ...]}}`. The result is a DataFrame of class probabilities, one column per class.

The model is logged as MLflow "models from code": `MODEL_CODE` (pyfunc_model.py, which defines `EffnetPyfunc` and
hands it to `mlflow.models.set_model`) is stored with each version and run to load it, with the effnet package from
the version's code; nothing is unpickled, so loading a version runs no code the store could have changed.

The signature declares the outputs only: MLflow enforces an input schema before the model sees the data, and no
schema of its lets both arrays and base64 text through (a tensor schema refuses text, a column schema arrays). The
model checks its input itself, and a bad batch (empty, a wrong shape, an item that is not an image) raises an
MlflowException with INVALID_PARAMETER_VALUE, which the scoring server answers with a 400 naming the item.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema

# What the served model imports: pinned to the versions it was trained with.
SERVING_REQUIREMENTS = ["torch", "torchvision", "timm", "safetensors", "pillow", "numpy", "pandas", "pydantic",
                        "pyyaml", "mlflow"]
COLUMNS = ("image", "path")  # the columns a DataFrame (or dict) input is read from, in this order
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")  # the model's code, logged with each version


def bad_input(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def batch_items(model_input) -> list:
    """The images of a request, in any of the module's forms, as a list of items for `images.load`."""
    if isinstance(model_input, (pd.DataFrame, dict)):
        names = list(model_input.keys())
        column = next((c for c in COLUMNS if c in names), names[0] if len(names) == 1 else None)
        if column is None:
            raise bad_input(f"expected an 'image' (base64 or bytes) or 'path' column, got columns {names}")
        model_input = model_input[column]
    if isinstance(model_input, (str, bytes)):
        model_input = [model_input]
    if isinstance(model_input, np.ndarray) and model_input.ndim not in (1, 4):
        raise bad_input(f"expected a batch: an N x H x W x 3 array or a list of images, got an array of shape "
                        f"{model_input.shape}")
    items = list(model_input)
    if not items:
        raise bad_input("empty batch: send at least one image")
    return items


def signature(classes: list[str]) -> ModelSignature:
    return ModelSignature(outputs=Schema([ColSpec("float", c) for c in classes]))
