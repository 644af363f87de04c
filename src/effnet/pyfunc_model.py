"""The registered model's code, logged with each version as MLflow "models from code": `mlflow.pyfunc.load_model`
runs this file (with the effnet package stored beside it) instead of unpickling an object, and
`mlflow.models.set_model` hands it the model. Its inputs and outputs are described in `effnet.pyfunc`."""
from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import torch

from effnet import models
from effnet.data import images, transforms
from effnet.pyfunc import bad_input, batch_items


class EffnetPyfunc(mlflow.pyfunc.PythonModel):
    """Images in (see effnet.pyfunc), class probabilities out (a DataFrame, one column per class name)."""

    def load_context(self, context):
        self.model, self.spec = models.load_bundle(Path(context.artifacts["bundle"]))
        self.transform = transforms.eval_transform(self.spec.preprocessing)

    def predict(self, context, model_input, params=None):
        tensors = []
        for i, item in enumerate(batch_items(model_input)):
            try:
                tensors.append(self.transform(images.load(item)))
            except images.ImageError as e:
                raise bad_input(f"item {i}: {e}") from None
        with torch.inference_mode():
            probs = self.model(torch.stack(tensors)).softmax(dim=1).numpy()
        return pd.DataFrame(probs, columns=self.spec.classes)


mlflow.models.set_model(EffnetPyfunc())
