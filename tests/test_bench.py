"""The benches' own logic, where it can be wrong without a GPU: the largest-batch search of bench/memory_bench.py."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from memory_bench import largest_fit  # noqa: E402


def test_largest_fit_finds_the_largest_multiple_of_the_step_in_few_tries():
    for cap in (16, 100, 4096):
        for limit in [0, 5, 8, 9, 31, 32, 33, 100, 257, 1000, 4095, 5000]:
            tried = []

            def fits(batch):
                tried.append(batch)
                return batch <= limit

            expected = min(limit, cap // 8 * 8) // 8 * 8
            assert largest_fit(fits, 32, step=8, cap=cap) == expected, (cap, limit)
            assert all(b % 8 == 0 and 0 < b <= cap for b in tried) and len(tried) <= 2 * cap.bit_length()
