"""The paper's memory table on our hardware: peak memory and tokens/s per method and shape.

    python3 experiments/memory_speed.py --shapes tinyllama-1.1b llama2-7b llama2-13b \
        --batches 1 4 --peer --out experiments/results/memory_speed

Rows per shape and batch (sequence 1024, bf16, random weights): full fine-tuning, LoRA at
ranks 128/256/512, LISA E+H (embedding, final norm and head only, every layer frozen: the
step of ``bench_step.py --one eh``), E+H+2L and E+H+4L (γ = 2 and 4), and with ``--peer`` the
PyTorch peer's full, LoRA r128 and LISA γ=2 on the same shapes in the same job. Each row runs in
its own process through ``bench_step.py --one`` (so its peak is its own).

About 25 s a row on an H200 (process start, init, compile, 8 steps): one shape with both
batches and the peer is 18 rows, about 8 minutes. The run resumes: rows already in
``--out``'s JSON (measured or out of memory) are skipped, so a job cut short by a time limit is
finished by running the same command again, and shapes can be split over jobs or GPUs
(``CUDA_VISIBLE_DEVICES``) writing the same folder one after another. A row that does not fit is
kept as ``"status": "oom"`` and shown as OOM.

Writes ``memory_speed.json`` (every row, written after each one), ``memory_speed.md`` (the
table) and ``memory_speed.png`` (peak memory and tokens/s bars) into ``--out``.
``--render DIR`` redraws the table and chart from an existing JSON without running anything.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import spawn  # noqa: E402
from shapes import SHAPES  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = [("full", {}), ("lora", {"lora_r": 128}), ("lora", {"lora_r": 256}),
           ("lora", {"lora_r": 512}), ("eh", {}), ("lisa", {"gamma": 2}), ("lisa", {"gamma": 4})]
PEER_METHODS = [("full", {}), ("lora", {"lora_r": 128}), ("lisa", {"gamma": 2})]


def label(row: dict) -> str:
    if row["method"] == "eh":
        return "LISA E+H"
    if row["method"] == "lisa":
        return f"LISA E+H+{row['gamma']}L"
    if row["method"] == "lora":
        return f"LoRA r{row['lora_r']}"
    return "full FT"


def key(row: dict) -> tuple:
    return (row.get("impl"), row["shape"], row["batch"], label(row))


def cell(row: dict | None) -> str:
    if row is None:
        return "| |"
    if row.get("status") == "oom":
        return "OOM | OOM |"
    return f"{row['tokens_per_s']:,.0f} | {row['peak_gib']} |"


def render(result: dict, out_dir: str) -> str:
    rows = result["rows"]
    lines = ["| shape | batch | method | ours tok/s | ours peak GiB | peer tok/s | peer peak GiB |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    order = [label(dict(method=m, **kw)) for m, kw in METHODS]
    shapes = list(SHAPES)
    ours = sorted((r for r in rows if r.get("impl") == "lisa_jax"),
                  key=lambda r: (shapes.index(r["shape"]), r["batch"], order.index(label(r))))
    for r in ours:
        peer = next((p for p in rows if p.get("peer") == "torch" and p["shape"] == r["shape"]
                     and p["batch"] == r["batch"] and label(p) == label(r)), None)
        lines.append(f"| {r['shape']} | {r['batch']} | {label(r)} | {cell(r)} {cell(peer)}")
    table = "\n".join(lines)
    with open(os.path.join(out_dir, "memory_speed.md"), "w") as f:
        runs = "\n".join(f"- `{c}` ({d})" for c, d in zip(result["commands"], result["dates"]))
        note = f"\n{result['note']}\n" if result.get("note") else ""
        f.write(f"# Peak memory and tokens/s\n\n{runs}\n{note}\n{table}\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        keys = sorted({(r["shape"], r["batch"]) for r in ours},
                      key=lambda k: (shapes.index(k[0]), k[1]))
        fig, axes = plt.subplots(2, len(keys), figsize=(4.2 * len(keys), 6.5), squeeze=False)
        width = 0.4
        for j, (shape, batch) in enumerate(keys):
            sel = [r for r in ours if r["shape"] == shape and r["batch"] == batch]
            peers = [next((p for p in rows if p.get("peer") == "torch" and p["shape"] == shape
                           and p["batch"] == batch and label(p) == label(r)), None) for r in sel]
            xs = list(range(len(sel)))
            for i, (metric, ylabel) in enumerate((("peak_gib", "peak GiB"),
                                                  ("tokens_per_s", "tokens/s"))):
                ax = axes[i][j]
                for x, r, p in zip(xs, sel, peers):
                    for dx, row, color in ((-width / 2, r, "tab:blue"),
                                           (width / 2, p, "tab:orange")):
                        if row is None:
                            continue
                        if row.get("status") == "oom":
                            ax.text(x + dx, 0, "OOM", rotation=90, ha="center", va="bottom",
                                    fontsize=7)
                        else:
                            ax.bar(x + dx, row[metric] or 0, width, color=color)
                ax.set_xticks(xs, [label(r) for r in sel], rotation=45, ha="right", fontsize=8)
                ax.set_ylabel(ylabel)
            axes[0][j].set_title(f"{shape}, batch {batch}×1024", fontsize=10)
        axes[0][0].legend(handles=[plt.Rectangle((0, 0), 1, 1, color="tab:blue"),
                                   plt.Rectangle((0, 0), 1, 1, color="tab:orange")],
                          labels=["lisa_jax", "PyTorch peer"], fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "memory_speed.png"), dpi=110)
    except ImportError:
        print("matplotlib is missing: no chart", flush=True)
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["tinyllama-1.1b", "llama2-7b", "llama2-13b"],
                    choices=sorted(SHAPES))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peer", action="store_true", help="also run the PyTorch peer")
    ap.add_argument("--timeout", type=float, default=240)
    ap.add_argument("--out", default="experiments/results/memory_speed")
    ap.add_argument("--render", default=None, help="only redraw from DIR/memory_speed.json")
    a = ap.parse_args(argv)
    if a.render:
        with open(os.path.join(a.render, "memory_speed.json")) as f:
            print(render(json.load(f), a.render))
        return 0
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "memory_speed.json")
    result = dict(commands=[], dates=[], rows=[])
    if os.path.exists(path):
        with open(path) as f:
            result = json.load(f)
    result["commands"].append(" ".join(["python3", *sys.argv]))
    result["dates"].append(time.strftime("%Y-%m-%d"))
    done = {key(r) for r in result["rows"]}

    def record(row):
        if row:
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(result, f, indent=1)
            os.replace(tmp, path)

    def run(args, base):
        if key(base) in done:
            return
        row = spawn(args, a.timeout, keep_failure=True)
        if row and "status" not in row:
            row["status"] = "ok"
        record({**base, **row} if row else None)

    bench = os.path.join(HERE, "bench_step.py")
    for shape in a.shapes:
        for batch in a.batches:
            common = ["--shape", shape, "--batch", str(batch), "--seq", str(a.seq),
                      "--steps", str(a.steps), "--warmup", str(a.warmup)]
            for method, kw in METHODS:
                args = [bench, "--one", method, *common,
                        "--remat", "none" if method in ("lisa", "eh") else "dots",
                        "--gamma", str(kw.get("gamma", 2)), "--lora-r", str(kw.get("lora_r", 128))]
                run(args, dict(impl="lisa_jax", shape=shape, batch=batch, method=method,
                               gamma=kw.get("gamma"), lora_r=kw.get("lora_r")))
            if a.peer:
                for method, kw in PEER_METHODS:
                    args = [os.path.join(HERE, "torch_peers_strong.py"), "--method", method,
                            "--shape", shape, "--batch", str(batch), "--seq", str(a.seq),
                            "--gamma", str(kw.get("gamma", 2)),
                            "--lora-r", str(kw.get("lora_r", 128))]
                    run(args, dict(impl="torch", peer="torch", shape=shape, batch=batch,
                                   method=method, gamma=kw.get("gamma"), lora_r=kw.get("lora_r")))
    print(render(result, a.out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
