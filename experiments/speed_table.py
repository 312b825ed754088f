"""The speed results file from experiments/bench_step.py JSONs: one row per measurement in a
fixed schema, and the table of each of our rows against the peer's row of the same job.

    python3 experiments/speed_table.py OUT/*.json --out experiments/results/speed_h200.json

Rows carry ``impl`` (``lisa_jax`` / ``torch``), ``liger`` and ``compile`` (torch rows),
``shape``, ``method``, ``gamma``, ``remat`` (``none``/``full``; torch: false/true),
``precision`` (ours: ``bf16``, or ``fp8`` for frozen layers in fp8), ``granularity`` (ours, LISA:
``layer`` or the module groups sampled), ``update``
(``fp32`` master updates or plain ``bf16``), ``tokens_per_s``, ``peak_gib`` and ``job``: the
files given in one invocation are one job (one device call), so ratios are only taken between
rows of the same job.
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path


def _row(r: dict, job: str, label: str | None) -> dict:
    torch = r.get("impl") == "torch"
    remat = r.get("remat")
    return {
        "impl": "torch" if torch else "lisa_jax", "job": job, "label": label,
        "liger": bool(r.get("liger")) if torch else None,
        "compile": bool(r.get("compile")) if torch else None,
        "shape": r["shape"], "method": r["method"], "gamma": r.get("gamma"),
        "lora_rank": r.get("lora_r"),
        "remat": bool(remat) if torch else ("none" if remat in (None, "none") else remat),
        "precision": None if torch else r.get("precision", "bf16"),
        "update": r.get("update_precision"),
        "frozen": r.get("lisa_frozen") or r.get("frozen") or None,
        "granularity": None if torch or r["method"] != "lisa" else r.get("granularity", "layer"),
        "tokens_per_s": r["tokens_per_s"], "peak_gib": r["peak_gib"], "ms": r.get("ms"),
        # fp8 rows: the resample's cost (trained layers to the host, re-quantized) and the
        # host memory their bf16 weights take
        **{k: r[k] for k in ("resample_ms", "lisa_interval", "amortized_ms",
                             "tokens_per_s_amortized", "host_gib", "prefetch_steps",
                             "background_transfers", "host_memory", "warm_every_layer",
                             "resample_ms_by_period", "cuda_module_loading", "gemm_out",
                             "transpose", "memory_gib", "fp8_copies", "label", "residuals",
                             "mlp", "mlp_kernels", "nu_dtype", "qkv_scales") if k in r},
    }


def peer_of(row: dict, rows: list[dict]) -> dict | None:
    """The torch row of the same job, shape, method, γ and remat (``full`` ↔ True)."""
    want_remat = row["remat"] == "full"  # "dots" keeps every matmul output: no checkpointing
    for p in rows:
        if (p["impl"] == "torch" and p["job"] == row["job"] and p["shape"] == row["shape"]
                and p["method"] == row["method"] and p["gamma"] == row["gamma"]
                and p["remat"] == want_remat):
            return p
    return None


def table(rows: list[dict]) -> str:
    out = ["| shape | method | remat | ours tok/s, GiB | HF + Liger tok/s, GiB | speed | memory |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        p = peer_of(r, rows) if r["impl"] == "lisa_jax" else None
        if p is None:
            continue
        name = r["method"] + (f" γ={r['gamma']}" if r["gamma"] else "") + \
            (f" (frozen {r['frozen']})" if r["frozen"] else "") + \
            (f", {r['granularity']}" if r["granularity"] not in (None, "layer") else "") + \
            (f", frozen layers {r['precision']}" if r["precision"] not in (None, "bf16") else "")
        out.append(f"| {r['shape']} | {name} | {r['remat']} | {r['tokens_per_s'] / 1e3:.1f}k, "
                   f"{r['peak_gib']:.2f} | {p['tokens_per_s'] / 1e3:.1f}k, {p['peak_gib']:.2f} | "
                   f"{r['tokens_per_s'] / p['tokens_per_s']:.2f}× | "
                   f"{r['peak_gib'] / p['peak_gib']:.2f}× |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--job", default=None, help="the job id (default: the first file's date "
                    "and folder)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    docs = [json.loads(Path(f).read_text()) for f in a.files]
    job = a.job or f"{docs[0].get('date', datetime.date.today().isoformat())}:" \
                   f"{Path(a.files[0]).parent.name}"
    rows = [_row(dict(r, lisa_frozen=d.get("lisa_frozen") or r.get("lisa_frozen")), job,
                 d.get("label"))
            for d in docs for r in d.get("rows", []) + d.get("peer_rows", [])]
    if a.out:
        Path(a.out).write_text(json.dumps({"command": [d.get("command") for d in docs],
                                           "date": docs[0].get("date"), "rows": rows},
                                          indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
