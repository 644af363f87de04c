"""The benches' own logic, where it can be wrong without a GPU: the largest-batch search of bench/memory_bench.py,
what a bench's figures carry (date, machine, command); and the CPU bench end to end, small (slow)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
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


def test_a_bench_s_figures_carry_their_date_machine_and_command(monkeypatch):
    import datetime

    from common import provenance

    from effnet import tracking
    monkeypatch.setattr(sys, "argv", ["bench/cpu_bench.py", "--variant", "tf_efficientnet_b0"])
    got = provenance()
    assert got["command"] == "python bench/cpu_bench.py --variant tf_efficientnet_b0"
    assert got["machine"] == tracking.machine() and " cores, " in got["machine"]
    assert got["date"] == datetime.datetime.now(datetime.timezone.utc).date().isoformat()


def test_cpu_bench_takes_a_params_key_or_a_card_id_as_its_variant():
    from argparse import Namespace

    from cpu_bench import bench_params

    from effnet.errors import EffnetError

    params_yaml = BENCH.parent / "params.yaml"
    params, key = bench_params(Namespace(params=params_yaml, overrides=[], variant=None))
    assert key == next(iter(params.variants)) == "tf_efficientnet_tiny"  # the demo's, params.yaml's first
    args = Namespace(params=params_yaml, overrides=["train.batch_size=32"], variant="tf_efficientnet_b0")
    params, key = bench_params(args)
    assert key == "tf_efficientnet_b0" and params.variant(key).img_size == 224 and params.train.batch_size == 32
    assert "variants={tf_efficientnet_b0: {model: tf_efficientnet_b0}}" in args.overrides  # for its subprocesses
    params, key = bench_params(Namespace(params=params_yaml, overrides=[], variant="b0"))
    with pytest.raises(EffnetError, match="variants.b0: not in params"):
        params.variant(key)


@pytest.mark.slow
def test_cpu_bench_runs_every_row_and_writes_its_figures(tmp_path):
    """bench/cpu_bench.py --dry-run (tiny model and data, ~2 min): every row measured, the ratios computed, the
    JSON written."""
    out = tmp_path / "cpu_bench.json"
    subprocess.run([sys.executable, str(BENCH / "cpu_bench.py"), "--dry-run", "--out", str(out)], check=True,
                   timeout=900, capture_output=True)
    figures = json.loads(out.read_text())
    assert {"date", "machine", "command"} <= set(figures["env"]) and "--dry-run" in figures["env"]["command"]
    assert all(row["img_s"] > 0 for row in figures["rows"]) and len(figures["rows"]) >= 11
    ratios = figures["ratios"]
    assert {"effnet train / ceiling", "effnet train / timm loop", "evaluate loop / model inference"} <= set(ratios)
    assert 0 < ratios["bound: (ceiling step + loader over all cores) / ceiling"] < 1  # the loader's work costs
    assert 0 < ratios["bound: evaluate stage (model-only passes + its resizing over all cores) / model inference"] < 1
    by = {row["what"]: row for row in figures["rows"]}
    assert by["effnet train (steady state)"]["first_step_s"] > 0 and "loader alone (decode + augment, 1 process)" in by
    assert len(by[by["effnet train (steady state)"]["ref"]]["rounds"]) == 1  # the dry run's one round


@pytest.mark.slow
def test_the_noisy_student_benches_run_and_write_their_figures(tmp_path):
    """bench/pseudolabel_bench.py and bench/noisy_student.py --dry-run: the ratio against model-only inference, and
    teacher -> student 1 -> student 2 on digits, each figure with its provenance."""
    for bench in ("pseudolabel_bench", "noisy_student"):
        out = tmp_path / f"{bench}.json"
        subprocess.run([sys.executable, str(BENCH / f"{bench}.py"), "--dry-run", "--out", str(out)], check=True,
                       timeout=900, capture_output=True)
        figures = json.loads(out.read_text())
        assert {"date", "machine", "command"} <= set(figures)
    assert 0 < json.loads((tmp_path / "pseudolabel_bench.json").read_text())["cpu_bound"] <= 1
    rows = figures["results"]["digits"]
    assert [r["model"] for r in rows] == ["teacher", "student1", "student2"] and rows[2]["iteration"] == 2
