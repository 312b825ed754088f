"""experiments/trace_breakdown.py on a synthetic trace whose answer is known by construction."""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "trace_breakdown.py"


def _load():
    spec = importlib.util.spec_from_file_location("trace_breakdown", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_trace(path: Path, kernels, host_steps=()):
    """A perfetto trace with a host process and a GPU process holding ``kernels``
    ``(stream, start, duration, name)`` in units of 0.1 ms; ``host_steps [(call, return)]``:
    the python thread's calls of the step and the returns of their ``block_until_ready``."""
    events = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
              {"ph": "M", "pid": 7, "name": "process_name", "args": {"name": "/host:CPU"}},
              {"ph": "M", "pid": 7, "tid": 3, "name": "thread_name", "args": {"name": "python3"}}]
    for call, ret in host_steps:
        events += [{"ph": "X", "pid": 7, "tid": 3, "ts": call * 100, "dur": 50.0,
                    "name": "PjitFunction(step)"},
                   {"ph": "X", "pid": 7, "tid": 3, "ts": call * 100 + 1, "dur": 20.0,
                    "name": "PjitFunction(step)"},  # the same call, nested, as traces show it
                   {"ph": "X", "pid": 7, "tid": 3, "ts": call * 100 + 60,
                    "dur": (ret - call) * 100 - 60, "name": "$api.py:2757 block_until_ready"}]
    events += [{"ph": "X", "pid": 1, "tid": stream, "ts": ts * 100, "dur": dur * 100,
                "name": name} for stream, ts, dur, name in kernels]
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_breakdown_classes_busy_and_idle(tmp_path):
    tb = _load()
    # One step: a matmul, a slice copy on a second stream overlapping it, an idle gap of 5 ms,
    # a device-to-host copy (counted, not timed), attention, an in-place update, a fusion.
    kernels = [(14, 0.0, 100.0, "nvjet_sm90_tst_128x256_64x4_2x1_v_bz_NNT"),
               (20, 60.0, 80.0, "memcpy128"),                 # overlaps 40 us, extends to 140
               (14, 190.0, 5.0, "MemcpyD2H"),                 # idle 140..190 before it
               (14, 195.0, 30.0, "cudnn_generated_fort_native_sdpa_sm90_flash_fprop"),
               (14, 225.0, 10.0, "loop_dynamic_update_slice_fusion_3"),
               (14, 235.0, 20.0, "gemm_fusion_dot_45"),
               (14, 255.0, 15.0, "loop_dynamic_slice_fusion_1"),
               (14, 270.0, 30.0, "input_reduce_fusion_2")]
    trace = tmp_path / "prof" / "lisa2_none_trace" / "plugins" / "profile" / "run" / \
        "perfetto_trace.json.gz"
    _write_trace(trace, kernels, host_steps=[(-10.0, 310.0)])  # 1 ms before, 1 ms after
    row = tb.breakdown(str(trace), steps=1)
    assert row["cublas_matmul"] == pytest.approx(10.0)
    assert row["slice_copies"] == pytest.approx(8.0 + 1.5)
    assert row["cudnn_attention"] == pytest.approx(3.0)
    assert row["in_place_updates"] == pytest.approx(1.0)
    assert row["triton_matmul"] == pytest.approx(2.0)
    assert row["other_fusions"] == pytest.approx(3.0)
    assert row["device_to_host_copies"] == 1
    assert row["busy"] == pytest.approx(25.0)  # overlapping kernels are not counted twice
    assert row["wall"] == pytest.approx(32.0)
    assert row["idle"] == pytest.approx(7.0)  # the 5 ms gap and the 2 ms around the kernels
    # the costliest kernels, by name, longest first (the device-to-host copy is not one)
    top = row["top_kernels"]
    assert top[0][:3] == ["nvjet_sm90_tst_128x256_64x4_2x1_v_bz_NNT", "cublas_matmul",
                          pytest.approx(10.0)]
    assert [t[0] for t in top[1:3]] == ["memcpy128",
                                        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop"]
    assert len(top) == 7 and "MemcpyD2H" not in [t[0] for t in top]
    assert [t[3] for t in top] == [1.0] * 7

    # Without the host's events the step is the kernels' extent.
    bare = tmp_path / "bare" / "perfetto_trace.json.gz"
    _write_trace(bare, kernels)
    assert tb.breakdown(str(bare), steps=1)["idle"] == pytest.approx(5.0)

    # Two such steps, 40 ms apart: the same figures per step.
    two = tmp_path / "two" / "perfetto_trace.json.gz"
    _write_trace(two, kernels + [(k[0], k[1] + 400.0, k[2], k[3]) for k in kernels],
                 host_steps=[(-10.0, 310.0), (390.0, 710.0)])
    row2 = tb.breakdown(str(two), steps=2)
    assert (row2["busy"], row2["idle"], row2["cublas_matmul"]) == pytest.approx((25.0, 11.0, 10.0))
    # (the second step's window starts where the first ended: 8 ms more host time in it)

    out = tmp_path / "bd"
    tb.main([str(tmp_path / "prof"), "--steps", "1", "--out", str(out)])
    saved = json.loads(Path(str(out) + ".json").read_text())
    assert saved["lisa2_none"]["idle"] == pytest.approx(7.0)
    assert "| lisa2_none |" in Path(str(out) + ".md").read_text()


def test_breakdown_without_traces_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="no traces under .*bench_step.py --profile"):
        _load().main([str(tmp_path)])
