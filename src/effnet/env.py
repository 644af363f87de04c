"""Process set-up, done once by whoever starts the process (the CLI, the Prefect flow, the tests, the benches),
never as a side effect of importing a module: offline defaults for the tools' telemetry, MLflow's system metrics,
the warnings known to be noise, and glibc's malloc told to keep freed memory (`keep_freed_memory`)."""
from __future__ import annotations

import ctypes
import ctypes.util
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
    # MLflow retries a request 7 times over ~4 min (backoff 2 s, doubling) with a 120 s timeout each: a server that
    # is down stalled a stage for 4 min 26 s before its traceback. 3 retries over ~6 s (backoff 1 s, doubling) ride
    # out a restart; a longer outage is the stages' business (tracking.check at the start, an outbox in training).
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
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
    """Set the environment defaults, the warning filters and malloc's policy (idempotent)."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    for message in NOISE:
        warnings.filterwarnings("ignore", message=message)
    keep_freed_memory()


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory torch frees for the next step instead of handing it back to the kernel.
    By default it maps every block over its mmap threshold (dynamic, at most 32 MiB) afresh and unmaps it when
    freed, so each forward and backward pass on the CPU faults all of its large activations in again: 10-90
    thousand page faults a step for the demo's model, and the kernel's time for them was up to half of an
    inference pass (batch 128 at 74 px: 1.9x faster without; 30 cycles over the evaluate sweep's 12 shapes: 1.25x;
    a training step 4-10 %, and steadier). Here: no mmap'd blocks, and the heap's top is trimmed only past 2 GiB
    free. The cost: the process keeps its peak memory instead of handing it back (peak RSS 8-13 % higher in those
    runs, flat over time). Loader workers forked after this inherit it. Skipped where malloc is not glibc's, or
    where a MALLOC_* tunable (or GLIBC_TUNABLES) is set in the environment: glibc then does what the user set, and
    only that. Returns whether it was set."""
    if any(key.startswith("MALLOC_") and key.endswith("_") for key in os.environ) or "GLIBC_TUNABLES" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl...)
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
