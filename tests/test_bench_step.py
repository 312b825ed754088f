"""experiments/bench_step.py: every row it can measure runs at a toy size and reports itself."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(EXPERIMENTS))  # bench_step imports its neighbours (shapes, ...)
    try:
        spec = importlib.util.spec_from_file_location("bench_step", EXPERIMENTS / "bench_step.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(EXPERIMENTS))


def _args(method, **kw):
    a = dict(shape="tiny", batch=2, seq=16, steps=2, warmup=1, interval=2, lora_r=4,
             inner="adamw", loss_chunk=4096, dtype=None, method=method, gamma=2, remat="none",
             profile=None)
    a.update(kw)
    return argparse.Namespace(**a)


@pytest.mark.parametrize("method", ["forward", "floor", "floor_unstacked", "eh", "full", "lora",
                                    "lisa", "lisa_unstacked"])
def test_every_row_runs(bench, method):
    row = bench.run_one(_args(method))
    assert row["method"] == method and row["tokens_per_s"] > 0 and row["step_s"] > 0
    assert row["gamma"] == {"lisa": 2, "lisa_unstacked": 2, "eh": 0}.get(method)


def test_profile_writes_the_trace_and_the_optimized_hlo(bench, tmp_path):
    bench.run_one(_args("lisa", profile=str(tmp_path)))
    assert "HloModule" in (tmp_path / "lisa2_none.hlo.txt").read_text()
    traces = list((tmp_path / "lisa2_none_trace").rglob("perfetto_trace.json.gz"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
