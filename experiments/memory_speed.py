"""The paper's memory table on our hardware: peak memory and tokens/s per method and shape.

    python3 experiments/memory_speed.py --shapes tinyllama-1.1b llama2-7b llama2-13b \
        --batch-size 1 4 --peer --out experiments/results/memory_speed

Rows per shape and batch size (``--max-seq-len`` tokens, bf16 on a GPU, random weights): full
fine-tuning, LoRA at each of ``--lora-rank``, LISA E+H (embedding, final norm and head only,
every layer frozen: the step of ``bench_step.py --one --method eh``) and E+H+γL at each of
``--lisa-layers``, and with ``--peer`` the PyTorch peer's full, LoRA and LISA at the first rank
and γ on the same shapes in the same job. Each row runs in its own process through
``bench_step.py --one`` (so its peak is its own).

The run resumes: rows already in
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
from common import SHAPES, add_flags, spawn_row, write_json  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def methods(a) -> list[tuple[str, dict]]:
    """Our rows of one shape and batch size: full, LoRA at each rank, E+H, LISA at each γ."""
    return [("full", {})] + [("lora", {"lora_r": r}) for r in a.lora_rank] + [("eh", {})] + \
        [("lisa", {"gamma": g}) for g in a.lisa_layers]


def peer_methods(a) -> list[tuple[str, dict]]:
    return [("full", {}), ("lora", {"lora_r": a.lora_rank[0]}),
            ("lisa", {"gamma": a.lisa_layers[0]})]


def order(row: dict) -> tuple:
    """Full FT, LoRA by rank, E+H, LISA by γ: the table's order of methods."""
    kinds = ("full", "lora", "eh", "lisa")
    return kinds.index(row["method"]), row.get("lora_r") or row.get("gamma") or 0


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
    shapes = list(SHAPES)
    ours = sorted((r for r in rows if r.get("impl") == "lisa_jax"),
                  key=lambda r: (shapes.index(r["shape"]), r["batch"], order(r)))
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
            seq = next((r["seq"] for r in sel if r.get("seq")), "?")
            axes[0][j].set_title(f"{shape}, batch {batch}×{seq}", fontsize=10)
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
    add_flags(ap, shape=["tinyllama-1.1b", "llama2-7b", "llama2-13b"], batch_size=[1, 4],
              max_seq_len=1024, steps=6, lora_rank=[128, 256, 512], lisa_layers=[2, 4],
              many=("shape", "batch_size", "lora_rank", "lisa_layers"))
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
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

    def run(args, base):
        if key(base) in done:
            return
        row = spawn_row(args, a.timeout)
        if row.get("status") not in (None, "oom"):
            return  # not kept: a failure other than memory is worth running again
        row = {**base, **row, "status": "ok"} if "status" not in row else \
            {**base, "status": "oom"}
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        write_json(path, result)

    bench = os.path.join(HERE, "bench_step.py")
    for shape in a.shapes:
        for batch in a.batch_size:
            common = ["--shape", shape, "--batch-size", str(batch),
                      "--max-seq-len", str(a.max_seq_len)]
            for method, kw in methods(a):
                args = [bench, "--one", "--method", method, *common, "--steps", str(a.steps),
                        "--warmup", str(a.warmup),
                        "--remat", "none" if method in ("lisa", "eh") else "dots",
                        "--lisa-layers", str(kw.get("gamma", 2)),
                        "--lora-rank", str(kw.get("lora_r", 128))]
                run(args, dict(impl="lisa_jax", shape=shape, batch=batch, method=method,
                               gamma=kw.get("gamma"), lora_r=kw.get("lora_r")))
            if a.peer:
                for method, kw in peer_methods(a):
                    args = [os.path.join(HERE, "torch_peers_strong.py"), "--method", method,
                            *common, "--lisa-layers", str(kw.get("gamma", 2)),
                            "--lora-rank", str(kw.get("lora_r", 128))]
                    run(args, dict(impl="torch", peer="torch", shape=shape, batch=batch,
                                   method=method, gamma=kw.get("gamma"), lora_r=kw.get("lora_r")))
    print(render(result, a.out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
