"""Process set-up (`effnet.env`): malloc keeps what torch frees, so a training or inference step does not fault its
large activations in again every time; and a user's own malloc tunables win."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# A layer's forward as the model runs it at batch 128: a 1x1 convolution to 96 channels at 37 px and its SiLU, each
# output 67 MB (over glibc's largest mmap threshold, 32 MiB), freed when the next pass makes its own; after
# env.configure(), the minor page faults of ten passes once three have run.
FAULTS = """
import json, resource, torch
from effnet import env
env.configure()
conv, x = torch.nn.Conv2d(16, 96, 1), torch.randn(128, 16, 37, 37)
with torch.inference_mode():
    for _ in range(3):
        torch.nn.functional.silu(conv(x))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.nn.functional.silu(conv(x))
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(**environ) -> int:
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True,
                         env={**os.environ, **environ})
    return json.loads(out.stdout.strip().splitlines()[-1])["faults"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc policy: Linux only")
def test_freed_memory_is_kept_for_the_next_step_unless_the_user_tunes_malloc():
    pages = 128 * 96 * 37 * 37 * 4 // os.sysconf("SC_PAGE_SIZE")  # one output's pages
    assert _faults() < pages // 10  # kept and reused: faulted in during the first passes only
    assert _faults(MALLOC_CHECK_="0") > 10 * pages  # a MALLOC_* tunable set: glibc's policy, mapped afresh each pass
