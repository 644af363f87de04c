"""Process set-up, done once by whoever starts the process (the CLI, the Prefect flow, the tests, the benches),
never as a side effect of importing a module: offline defaults for the tools' telemetry, MLflow's system metrics,
and the warnings known to be noise."""
from __future__ import annotations

import os
import warnings

# Offline by design; every stage's MLflow run gets system/* metrics (set MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false
# to turn them off). Values already in the environment win.
DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # predict/export fetch a bundle: their own bar is the one shown
}

NOISE = [
    # The EMA copy is in eval mode on purpose (it is only ever run for validation); so are FixRes's frozen layers.
    r"Found \d+ module\(s\) in eval mode",
    r"Checkpoint directory .* exists and is not empty",  # our run.json lives beside last.ckpt
    # torchvision 0.29 deprecates its decoders for TorchCodec; decode_jpeg is still the batched nvjpeg decoder.
    r"The image decoding and encoding capabilities of TorchVision",
    # Lightning looks for state on the loader itself; the training stream resumes through ShardDataModule's.
    r"You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable",
]


def configure() -> None:
    """Set the environment defaults and the warning filters (idempotent)."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    for message in NOISE:
        warnings.filterwarnings("ignore", message=message)
