"""Using what the pipeline publishes: a model from wherever it lives, and the batched inference loop.

`load_model(uri)` takes a model bundle folder, an MLflow model folder, or an MLflow URI (`models:/<name>@<alias>`,
`models:/<name>/<version>`, `runs:/<run_id>/model`, or any artifact URI of a logged model). A registered model
carries its bundle as the pyfunc's `bundle` artifact, and that is all that is read: not the pickled pyfunc, not
the code stored beside it. A URI that does not resolve fails in one line naming it.

`Predictor` runs the model on its device (CUDA when there is one) in channels_last (on the CPU too: oneDNN's
depthwise convolutions are ~1.3x faster in it) and fp32: uint8 batches in, top-k classes and probabilities out.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from effnet import models, tracking
from effnet.data import gpu
from effnet.data.sources import Batch
from effnet.errors import EffnetError

BUNDLE_ARTIFACT = "bundle"  # the pyfunc's artifact that holds the model bundle (stages/register.py)
URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")  # scheme:/..., as MLflow's URIs; not a Windows drive letter
FORMS = ("a bundle folder, an MLflow model folder, models:/<name>@<alias>, models:/<name>/<version> or "
         "runs:/<run_id>/<path>")


def load_model(uri: str | Path) -> tuple[nn.Module, models.ModelSpec]:
    """The model (eval mode, CPU) and its spec from URI (any of the forms above)."""
    path = Path(uri)
    if (path / "model.json").is_file():
        return models.load_bundle(path)
    if (path / "MLmodel").is_file():
        return _from_mlflow(path.resolve().as_uri(), str(uri))
    if URI.match(str(uri)):
        return _from_mlflow(str(uri), str(uri))
    raise EffnetError(f"model not found: {uri} (expected {FORMS})")


def _from_mlflow(root: str, uri: str) -> tuple[nn.Module, models.ModelSpec]:
    """The bundle inside the MLflow model at ROOT, downloaded to a temporary folder and loaded from there."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    try:
        if uri.startswith(("models:/", "runs:/")):
            tracking.connect(existing=True)
        if root.startswith("models:/"):
            from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
            root = ModelsArtifactRepository.get_underlying_uri(root)
        with tempfile.TemporaryDirectory(prefix="effnet-model-") as tmp:
            mlmodel = Model.load(mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/MLmodel", dst_path=tmp))
            artifacts = mlmodel.flavors.get("python_function", {}).get("artifacts", {})
            if BUNDLE_ARTIFACT not in artifacts:
                raise EffnetError(f"not an effnet model (its pyfunc has no '{BUNDLE_ARTIFACT}' artifact)")
            bundle = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{root}/{artifacts[BUNDLE_ARTIFACT]['path']}", dst_path=tmp)
            return models.load_bundle(Path(bundle))
    except MlflowException as e:
        raise EffnetError(f"model {uri}: {e.message.strip().splitlines()[0]}") from None
    except EffnetError as e:
        raise EffnetError(f"model {uri}: {e}") from None
    except OSError as e:  # an artifact URI that names nothing
        raise EffnetError(f"model {uri}: {e.strerror or e}") from None


def resolve_device(device: str = "auto") -> torch.device:
    """'auto': CUDA when there is a device, else the CPU; otherwise the torch device named."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as e:
        raise EffnetError(f"device {device!r}: {e}") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise EffnetError(f"device {device!r}: no CUDA device here")
    return chosen


def columns(k: int) -> dict[str, type]:
    """The output row: the item's name, its top-k classes and probabilities (best first), why it has none."""
    ranked = {f"{what}_{i}": kind for i in range(1, k + 1) for what, kind in (("class", str), ("prob", float))}
    return {"path": str, **ranked, "error": str}


class Predictor:
    """MODEL on DEVICE: uint8 NCHW batches (the spec's preprocessing, before normalisation) -> top-k rows."""

    def __init__(self, model: nn.Module, spec: models.ModelSpec, device: torch.device, topk: int = 5):
        self.device, self.spec = device, spec
        self.k = min(topk, len(spec.classes))
        self.model = model.eval().to(device, memory_format=torch.channels_last)

    @torch.inference_mode()
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, classes) on the CPU."""
        pre = self.spec.preprocessing
        x = gpu.normalize(x.to(self.device, non_blocking=True), pre.mean, pre.std, channels_last=True)
        return self.model(x).float().softmax(dim=1).cpu()

    def rows(self, batch: Batch) -> list[dict]:
        """One row per item of BATCH, in order: top-k for an image, the reason for an item that is none."""
        top = self.probabilities(batch.images).topk(self.k, dim=1) if len(batch.images) else None
        ranked = iter(zip(top.indices.tolist(), top.values.tolist()) if top is not None else [])
        rows = []
        for name, error in zip(batch.names, batch.errors):
            indices, probs = next(ranked) if error is None else ([None] * self.k, [None] * self.k)
            row = {"path": name}
            for i, (c, p) in enumerate(zip(indices, probs), start=1):
                row[f"class_{i}"] = None if c is None else self.spec.classes[c]
                row[f"prob_{i}"] = None if p is None else round(p, 6)
            rows.append(row | {"error": error})
        return rows
