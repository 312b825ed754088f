"""Where a step's device time goes, from the traces of ``bench_step.py --profile DIR``.

    python3 experiments/bench_step.py --shape llama2-7b --batch-size 4 --max-seq-len 1024 \
        --methods eh lisa --lisa-layers 2 --remats none --profile /tmp/prof
    python3 experiments/trace_breakdown.py /tmp/prof --out experiments/results/step_breakdown_h200

Each row's trace (perfetto JSON, three steps) is summed per kernel class, per step: cuBLAS
matmuls, Triton matmul fusions, cuDNN attention, copies of slices (what XLA moves when a loop
over stacked layers hands one layer's weights or saved activations to a library call), in-place
updates, other fused kernels, and the device's idle time in the step's wall time (launches, host
round trips, e.g. the device-to-host copies that decide a loop of unknown trip count). Kernels
inside CUDA graph control flow are not seen by the profiler; their time shows up as idle.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_json  # noqa: E402

TOP_KERNELS = 40
CLASSES = ("cublas_matmul", "triton_matmul", "cudnn_attention", "slice_copies", "in_place_updates",
           "other_fusions", "memset")


def kernel_class(name: str) -> str:
    if name.startswith(("nvjet", "sm90_xmma", "cutlass")) or ("gemm" in name
                                                              and "fusion" not in name):
        return "cublas_matmul"
    if name.startswith(("gemm_fusion", "triton_gemm")):
        return "triton_matmul"
    if "sdpa" in name or "cudnn" in name:
        return "cudnn_attention"
    if "memcpy" in name.lower() or "dynamic_slice_fusion" in name:  # (D2H counted apart)
        return "slice_copies"
    if "dynamic_update_slice" in name or "scatter" in name:
        return "in_place_updates"
    if name.startswith("Memset"):
        return "memset"
    return "other_fusions"


def _step_windows(events, kernels, steps):
    """``[(start, end)]`` of the last ``steps`` steps as the timing loop sees them: each ends
    when the ``block_until_ready`` after the step returns and starts where the previous one
    ended (the first: at the host's first call of a jitted function). Without host events,
    the kernels' extent is one window."""
    thread_names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
                    if e.get("ph") == "M" and e["name"] == "thread_name"}
    host = [e for e in events if e.get("ph") == "X"
            and thread_names.get((e["pid"], e["tid"]), "").startswith("python")]
    calls = sorted(e["ts"] for e in host if e["name"].startswith("PjitFunction"))
    ends = sorted(e["ts"] + e["dur"] for e in host if "block_until_ready" in e["name"])
    if calls and len(ends) >= steps:
        starts = [calls[0]] + ends[:-1]
        return list(zip(starts, ends))[-steps:]
    return [(kernels[0][0], max(end for _, end, _ in kernels))]


def breakdown(trace_path: str, steps: int, top: int = TOP_KERNELS) -> dict:
    """Milliseconds per step by kernel class; ``busy`` (some kernel running), ``idle`` (the rest
    of the step's wall time: launches, host round trips) and ``wall``; device-to-host copies;
    ``top_kernels``, the ``top`` kernels that take the most time."""
    events = json.load(gzip.open(trace_path))["traceEvents"]
    device_pids = {e["pid"] for e in events if e.get("ph") == "M" and e["name"] == "process_name"
                   and "GPU" in e["args"]["name"]}
    kernels = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                     if e.get("ph") == "X" and e["pid"] in device_pids)
    if not kernels:
        raise SystemExit(f"{trace_path}: no device kernels (a CPU trace?)")
    per_class, per_name, calls = collections.Counter(), collections.Counter(), collections.Counter()
    d2h = 0
    for start, end, name in kernels:
        if "MemcpyD2H" in name:
            d2h += 1
            continue
        per_class[kernel_class(name)] += end - start
        per_name[name] += end - start
        calls[name] += 1
    windows = _step_windows(events, kernels, steps)
    busy = wall = 0.0
    for lo, hi in windows:
        wall += hi - lo
        covered = lo
        for start, end, _ in kernels:  # union of kernel intervals over all streams
            start, end = max(start, covered), min(end, hi)
            if end > start:
                busy += end - start
                covered = end
    ms = lambda us: round(us / 1e3 / steps, 2)  # noqa: E731
    row = {c: ms(per_class[c]) for c in CLASSES}
    row.update(busy=ms(busy), idle=ms(wall - busy), wall=ms(wall),
               device_to_host_copies=d2h // steps)
    # the kernels that take the most time: [name, its class, ms per step, calls per step]
    row["top_kernels"] = [[name[:160], kernel_class(name), ms(t), round(calls[name] / steps, 1)]
                          for name, t in per_name.most_common(top)]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("profile_dir", help="the --profile folder of bench_step.py")
    ap.add_argument("--steps", type=int, default=3, help="steps in each trace (bench_step: 3)")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    ap.add_argument("--top", type=int, default=TOP_KERNELS,
                    help="how many of the costliest kernels each row lists")
    a = ap.parse_args(argv)
    rows = {}
    for trace_dir in sorted(glob.glob(os.path.join(a.profile_dir, "*_trace"))):
        traces = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*",
                                               "perfetto_trace.json.gz")))
        if traces:
            name = os.path.basename(trace_dir)[:-len("_trace")]
            rows[name] = breakdown(traces[-1], a.steps, a.top)
    if not rows:
        raise SystemExit(f"no traces under {a.profile_dir}; run bench_step.py --profile first")
    cols = list(CLASSES) + ["busy", "idle", "wall", "device_to_host_copies"]
    lines = ["| row | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(str(r[c]) for c in cols) + " |")
    table = "\n".join(lines)
    print("ms per step\n" + table)
    if a.out:
        write_json(a.out + ".json", rows)
        with open(a.out + ".md", "w") as f:
            f.write("Device time per step (ms) by kernel class, from `bench_step.py --profile`.\n\n"
                    + table + "\n")


if __name__ == "__main__":
    main()
