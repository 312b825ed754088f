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
             profile=None, layout="stacked")
    a.update(kw)
    return argparse.Namespace(**a)


@pytest.mark.parametrize("method,layout", [
    ("forward", None), ("floor", None), ("floor_unstacked", None), ("eh", None), ("full", None),
    ("lora", None), ("lisa", "stacked"), ("lisa", "per_layer")])
def test_every_row_runs(bench, method, layout):
    row = bench.run_one(_args(method, layout=layout or "stacked"))
    assert row["method"] == method and row["tokens_per_s"] > 0 and row["step_s"] > 0
    assert row["gamma"] == {"lisa": 2, "eh": 0}.get(method)
    assert row["layout"] == layout


def test_plan_runs_lisa_in_each_layout_asked_for(bench):
    a = argparse.Namespace(gammas=[1, 2], remats=["none", "full"], remat_gammas=[2],
                           layouts=["per_layer", "stacked"])
    lisa_rows = [(r["gamma"], r["remat"], r["layout"]) for r in bench.plan(a)
                 if r["method"] == "lisa"]
    assert lisa_rows == [(1, "none", "per_layer"), (2, "none", "per_layer"),
                         (1, "none", "stacked"), (2, "none", "stacked"),
                         (2, "full", "per_layer"), (2, "full", "stacked")]


def test_profile_writes_the_trace_and_the_optimized_hlo(bench, tmp_path):
    bench.run_one(_args("lisa", profile=str(tmp_path)))
    assert "HloModule" in (tmp_path / "lisa2_none.hlo.txt").read_text()
    traces = list((tmp_path / "lisa2_none_trace").rglob("perfetto_trace.json.gz"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
