"""experiments/bench_step.py: every row it can measure runs at a toy size and reports itself."""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
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
    a = dict(shape="tiny", batch_size=2, max_seq_len=16, steps=2, warmup=1, lisa_interval=2,
             lora_rank=4, inner="adamw", loss_chunk=4096, dtype=None, method=method,
             lisa_layers=2, remat="none", profile=None, layer_layout="stacked",
             update_dtype="bfloat16", label="t")
    a.update(kw)
    return argparse.Namespace(**a)


@pytest.mark.parametrize("method,layout", [
    ("forward", None), ("floor", None), ("floor_unstacked", None), ("eh", None), ("full", None),
    ("lora", None), ("lisa", "stacked"), ("lisa", "per_layer")])
def test_every_row_runs(bench, method, layout):
    row = bench.run_one(_args(method, layer_layout=layout or "stacked"))
    assert row["method"] == method and row["tokens_per_s"] > 0 and row["step_s"] > 0
    assert row["gamma"] == {"lisa": 2, "eh": 0}.get(method)
    assert row["layout"] == layout
    assert row["impl"] == "lisa_jax" and row["label"] == "t" and row["ms"] > 0
    assert row["shape"] == "tiny" and row["remat"] == "none" and row["master_weights"] is False
    # float32 parameters on the CPU: updates are fp32 whatever is asked; no optimizer, no field
    assert row["update_precision"] == (None if method.startswith(("forward", "floor"))
                                       else "fp32")
    # Adam's moments as the state keeps them (float32 parameters: float32)
    moments = None if method.startswith(("forward", "floor")) else "float32"
    assert row["mu_dtype"] == row["nu_dtype"] == moments


def test_plan_runs_lisa_in_each_layout_asked_for(bench):
    a = argparse.Namespace(lisa_layers=[1, 2], remats=["none", "full"], remat_lisa_layers=[2],
                           layer_layouts=["per_layer", "stacked"])
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


def test_plan_gives_remat_variants_only_to_remat_methods(bench):
    a = argparse.Namespace(lisa_layers=[2], remats=["none", "full"], remat_lisa_layers=[2],
                           layer_layouts=["per_layer"], remat_methods=["lisa"])
    rows = [(r["method"], r.get("gamma"), r["remat"]) for r in bench.plan(a)
            if r["method"] in ("full", "lora", "lisa")]
    assert rows == [("full", None, "dots"), ("lora", None, "dots"), ("lisa", 2, "none"),
                    ("lisa", 2, "full")]


def _peer_ns(**kw):
    a = dict(shape="tiny", batch_size=2, max_seq_len=16, lora_rank=4,
             peer_methods=["lisa", "lora", "full"], peer_remat=True,
             peer_remat_methods=["lisa"], peer_lisa_layers=[2], remat_lisa_layers=[2],
             peer_steps=None, peer_warmup=None, peer_impl="liger", label="after")
    a.update(kw)
    return argparse.Namespace(**a)


def test_peer_plan_and_command_line_per_impl(bench):
    a = _peer_ns()
    rows = bench.peer_plan(a)
    assert [(r["method"], r["remat"]) for r in rows] == [
        ("lisa", False), ("lora", False), ("full", False), ("lisa", True)]
    args = bench.peer_args(a, rows[-1])
    assert args[0].endswith("torch_peers_strong.py") and "--liger" in args
    assert args[args.index("--remat") + 1] == "full"
    assert [args[args.index(f) + 1] for f in ("--batch-size", "--max-seq-len", "--lisa-layers",
                                              "--lora-rank")] == ["2", "16", "2", "4"]
    assert "--steps" not in args  # the peer script's own defaults unless asked
    args = bench.peer_args(_peer_ns(peer_impl="compile", peer_steps=5, peer_warmup=0), rows[0])
    assert "--compile" in args and "--liger" not in args and "--remat" not in args
    assert args[args.index("--steps") + 1] == "5" and args[args.index("--warmup") + 1] == "0"
    eager = bench.peer_args(_peer_ns(peer_impl="eager"), rows[0])
    assert not {"--compile", "--liger"} & set(eager)
    assert bench.peer_plan(_peer_ns(peer_remat_methods=None, peer_methods=["forward", "lisa"])) \
        == [dict(method="forward", gamma=2, remat=False), dict(method="lisa", gamma=2, remat=False),
            dict(method="lisa", gamma=2, remat=True)]


def test_peer_rows_carry_the_common_fields_and_the_table_names_the_peer(bench):
    raw = dict(peer="torch", shape="tiny", method="lisa", gamma=2, remat=False, step_s=0.25,
               tokens_per_s=128.0, peak_gib=2.0, compile=False, liger=True)
    p = bench.peer_row(_peer_ns(), raw)
    assert (p["impl"], p["label"], p["ms"], p["liger"], p["compile"], p["update_precision"]) == \
        ("torch", "after", 250.0, True, False, "bf16")
    ours = dict(method="lisa", layout="per_layer", gamma=2, remat="none", step_s=0.125,
                tokens_per_s=256.0, peak_gib=1.0, update_precision="fp32")
    text = bench.table([ours], [p])
    assert text.splitlines()[0] == "peer: torch liger"
    assert text.splitlines()[2].split()[-2:] == ["2.00", "0.50"]  # speed× and mem×


def test_fp32_updates_wrap_the_optimizer_inside_lisa(bench, monkeypatch):
    """With 16-bit parameters, --update-dtype float32 hands lisa() the master_weights
    transform (a stand-in here: the package's own may not exist yet)."""
    import optax

    import lisa_jax
    wrapped, seen = [], []

    def master_weights(inner):
        wrapped.append(optax.GradientTransformation(inner.init, inner.update))
        return wrapped[-1]
    real_lisa = lisa_jax.lisa

    def lisa(inner, **kw):
        seen.append(inner)
        return real_lisa(inner, **kw)
    monkeypatch.setattr(lisa_jax, "master_weights", master_weights, raising=False)
    monkeypatch.setattr(lisa_jax, "lisa", lisa)
    row = bench.run_one(_args("lisa", dtype="bfloat16", update_dtype="float32", steps=1))
    assert len(wrapped) == 1 and seen == wrapped
    assert row["master_weights"] is True and row["update_precision"] == "fp32"
    row = bench.run_one(_args("full", dtype="bfloat16", update_dtype="bfloat16", steps=1))
    assert len(wrapped) == 1 and row["master_weights"] is False
    assert row["update_precision"] == "bf16"
    # no master: optax keeps both moments in the parameters' bfloat16, whatever no flag says
    assert row["mu_dtype"] == row["nu_dtype"] == "bfloat16"


def test_fp32_updates_with_the_package_master_weights(bench):
    import lisa_jax
    if not (hasattr(lisa_jax, "master_weights") or
            importlib.util.find_spec("lisa_jax.precision") is not None):
        pytest.skip("lisa_jax.master_weights is not in this copy of the package")
    row = bench.run_one(_args("lisa", dtype="bfloat16", update_dtype="float32", steps=1,
                              layer_layout="per_layer"))
    assert row["master_weights"] is True and row["tokens_per_s"] > 0
    assert row["mu_dtype"] == row["nu_dtype"] == "float32"  # the masters' dtype


def test_failed_rows_are_kept_in_the_json(tmp_path):
    out = tmp_path / "b.json"
    p = _main("--shape", "tiny", "--batch-size", "2", "--max-seq-len", "16", "--steps", "1",
              "--warmup", "0", "--methods", "lisa", "--lisa-layers", "8", "--remats", "none",
              "--label", "x",
              "--out", str(out))  # γ=8 > the 4 layers of tiny
    assert p.returncode == 0 and "failed: lisa_jax lisa γ=8 remat=none" in p.stdout
    d = json.loads(out.read_text())
    assert d["rows"] == [] and d["failed"] == [dict(
        impl="lisa_jax", label="x", shape="tiny", method="lisa", gamma=8, remat="none",
        layout="per_layer", status="failed")]


def _main(*argv, timeout=300):
    return subprocess.run([sys.executable, str(EXPERIMENTS / "bench_step.py"), *argv],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None,
                    reason="liger_kernel is installed")
def test_liger_peer_without_liger_fails_in_one_line():
    p = _main("--peer-only", "--peer-impl", "liger", timeout=60)
    assert p.returncode != 0 and p.stdout == ""
    assert p.stderr.strip().count("\n") == 0 and "liger_kernel is not importable" in p.stderr


@pytest.mark.slow
def test_driver_labels_our_rows_and_the_eager_peer(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "b.json"
    p = _main("--shape", "tiny", "--batch-size", "2", "--max-seq-len", "16", "--steps", "1",
              "--warmup", "0", "--methods", "lisa", "--lisa-layers", "2", "--remats", "none",
              "--label", "before",
              "--peer", "--peer-impl", "eager", "--peer-methods", "lisa", "--peer-steps", "1",
              "--peer-warmup", "0", "--out", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["label"] == "before" and d["peer_impl"] == "eager"
    (r,), (q,) = d["rows"], d["peer_rows"]
    assert (r["impl"], r["label"], r["method"], r["gamma"]) == ("lisa_jax", "before", "lisa", 2)
    assert (q["impl"], q["label"], q["liger"], q["compile"]) == ("torch", "before", False, False)
    assert r["wall_s"] > 0 and q["wall_s"] > 0 and q["ms"] > 0
    assert "peer: torch eager" in p.stdout


def test_module_level_lisa_rows_through_the_driver(tmp_path):
    """``--lisa-granularity matrix`` reaches each row's process: its LISA rows sample weight
    matrices and say so (in the JSON and the table)."""
    out = tmp_path / "b.json"
    p = _main("--shape", "tiny", "--batch-size", "2", "--max-seq-len", "16", "--steps", "1",
              "--warmup", "0", "--methods", "lisa", "--lisa-layers", "1", "--remats", "none",
              "--lisa-granularity", "matrix", "--out", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    (r,) = json.loads(out.read_text())["rows"]
    assert (r["method"], r["gamma"], r["granularity"], r["layout"]) == (
        "lisa", 1, "matrix", "per_layer")
    assert r["step_s"] > 0 and "lisa/matrix" in p.stdout
