"""Useful (non-pad) tokens per second of the LISA step with and without packing (``--packing``),
on lengths drawn like an instruction set's (many under 256 tokens, a long tail).

    python3 experiments/packing_speed.py --shape llama2-7b --lisa-layers 2 --batch-size 8 \
        --max-seq-len 1024 --out experiments/results/packing_speed_h200.json
    python3 experiments/packing_speed.py --shape tiny --steps 3 --warmup 1 --batch-size 2 \
        --max-seq-len 256 --examples 64 --out /tmp/packing_smoke.json     # CPU smoke check

Each row (``unpacked``, ``packed``) runs in its own process (its peak memory its own) through
the trainer's own pieces: ``lisa_jax.data.DataLoader`` over random-token examples of the drawn
lengths (unpacked: one example a row, right padded to the smallest bucket, multiples of
``--bucket-multiple``; packed: best-fit rows of up to ``--max-seq-len`` with segment ids), and
``lisa_jax.step.make_lisa_step`` (AdamW inside LISA, γ = ``--lisa-layers``). Every batch shape
of the stream is compiled first, untimed; then ``--steps`` consecutive batches of the stream are
timed, each waited for. A row records ``useful_tokens_per_s`` (non-pad tokens / time),
``target_tokens_per_s`` (tokens with loss), ``examples_per_s``, ``pad_fraction``, the median
step, the shapes compiled and the peak device memory; the JSON's ``speedup`` is packed over
unpacked useful tokens/s.

Lengths: ``round(exp(N(log(--median-len), --len-sigma)))`` clipped to ``[16, --max-seq-len]``,
seeded; the defaults (median 150, sigma 0.9) put about 70% of the examples under 256
tokens, as in Alpaca-style sets. ``--loss-fraction`` of each example (its end) is the response.

Attention: ``--attention-impl auto`` is the trainer's choice (cuDNN's fused attention on a GPU
in bfloat16; packed rows pass their same-segment mask with the causal flag to
``jax.nn.dot_product_attention``, which cuDNN takes as a bias). When a row fails under auto it
runs again with XLA's attention, and the row says so (``attention_fallback``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_flags, command_line, model_config, spawn_row, time_steps,  # noqa: E402
                    write_json)

MODES = ("unpacked", "packed")


def draw_lengths(n: int, median: float, sigma: float, max_len: int, seed: int) -> list[int]:
    import numpy as np
    rng = np.random.default_rng([seed, 0x1E4])
    lens = np.exp(rng.normal(np.log(median), sigma, n)).round().astype(int)
    return np.clip(lens, 16, max_len).tolist()


def length_stats(lens: list[int]) -> dict:
    import numpy as np
    a = np.asarray(lens)
    return dict(n=len(a), mean=round(float(a.mean()), 1), median=float(np.median(a)),
                p90=float(np.percentile(a, 90)), max=int(a.max()),
                under_256=round(float((a < 256).mean()), 3))


def run_one(a) -> dict:
    """One row: the loader's stream in mode ``a.one``, its shapes compiled, steps timed."""
    import jax
    import numpy as np
    import optax

    import lisa_jax
    from lisa_jax import data
    from lisa_jax import layout
    from lisa_jax import model as M
    from lisa_jax import ops
    from lisa_jax import step as S

    overrides = {} if a.attention_impl == "auto" else {"attention_impl": a.attention_impl}
    cfg = model_config(a.shape, a.dtype, **overrides)
    rng = np.random.default_rng(a.seed)
    examples = []
    for n in draw_lengths(a.examples, a.median_len, a.len_sigma, a.max_seq_len, a.seed):
        mask = (np.arange(n) >= n - max(1, int(n * a.loss_fraction))).astype(np.int32)
        examples.append(data.Example(rng.integers(0, cfg.vocab_size, n).astype(np.int32), mask))
    buckets = data.bucket_lengths(a.max_seq_len, a.bucket_multiple)
    loader = data.DataLoader(examples, a.batch_size, seed=a.seed, max_seq_len=a.max_seq_len,
                             buckets=buckets, packing=a.one == "packed")
    stream = [next(loader) for _ in range(a.steps)]
    keys = ("input_ids", "loss_mask", "segment_ids")
    device_batches = [{k: jax.device_put(b[k]) for k in keys if k in b} for b in stream]

    params = jax.jit(lambda k: M.init_params(cfg, k))(jax.random.key(0))
    tx = lisa_jax.lisa(optax.adamw(1e-5), n_active=a.lisa_layers, interval=a.lisa_interval,
                       key=0)
    state = tx.init(params)
    check = attention_check(cfg, params, device_batches[0]) if a.one == "packed" else None
    if a.layer_layout == "per_layer":
        params = layout.convert(params, "per_layer", donate=True)
    step = S.make_lisa_step(cfg, tx, remat=a.remat)

    shapes = sorted({b["input_ids"].shape for b in device_batches})
    compile_s = 0.0
    for shape in shapes:  # every shape of the timed stream, compiled (and run once) untimed
        first = next(b for b in device_batches if b["input_ids"].shape == shape)
        params, state, _, (t,) = time_steps(step, params, state, first, 1)
        compile_s += t
    params, state, _, _ = time_steps(step, params, state, device_batches[0], a.warmup)
    times = []
    for b in device_batches:
        params, state, _, (t,) = time_steps(step, params, state, b, 1)
        times.append(t)
    total = sum(times)
    useful = sum(int(b["num_tokens"]) for b in stream)
    targets = sum(int(b["num_target_tokens"]) for b in stream)
    slots = sum(int(np.prod(b["input_ids"].shape)) for b in stream)
    n_ex = sum(int(b["num_examples"]) for b in stream)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return dict(mode=a.one, shape=a.shape, method="lisa", gamma=a.lisa_layers, remat=a.remat,
                layout=a.layer_layout, batch=a.batch_size, max_seq_len=a.max_seq_len,
                bucket_multiple=a.bucket_multiple, steps=a.steps, dtype=cfg.dtype,
                attention=ops.attention_impl(cfg), examples_in_steps=n_ex,
                useful_tokens=useful, target_tokens=targets, token_slots=slots,
                pad_fraction=round(1 - useful / slots, 4),
                useful_tokens_per_s=round(useful / total, 1),
                target_tokens_per_s=round(targets / total, 1),
                examples_per_s=round(n_ex / total, 2),
                step_s=round(statistics.median(times), 4), time_s=round(total, 3),
                shapes=[list(s) for s in shapes], compile_s=round(compile_s, 1),
                peak_gib=round(peak / 2**30, 2) if peak else None,
                jax=jax.__version__, device=str(jax.devices()[0].device_kind),
                **({"attention_check": check} if check else {}))


def attention_check(cfg, params, batch) -> dict:
    """The packed batch's loss under the trainer's attention and under XLA's (the masked path
    the CPU tests check against examples run one by one): where the first is cuDNN's fused
    kernel, equal losses say it keeps to each example's segment."""
    import dataclasses

    from lisa_jax import ops
    from lisa_jax import step as S
    feed = {k: batch[k] for k in ("input_ids", "loss_mask", "segment_ids")}
    xla = dataclasses.replace(cfg, attention_impl="xla")
    got = {ops.attention_impl(c): float(S.make_forward(c)(params, feed)[0]) for c in (cfg, xla)}
    a, b = got.get(ops.attention_impl(cfg)), got["xla"]
    return dict(losses=got, rel_diff=abs(a - b) / max(abs(b), 1e-9))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_flags(ap, shape="llama2-7b", lisa_layers=2, lisa_interval=20, batch_size=8,
              max_seq_len=1024, steps=20, seed=0, dtype=None, remat="none",
              layer_layout="per_layer")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    ap.add_argument("--examples", type=int, default=4096,
                    help="examples drawn (the stream's epoch)")
    ap.add_argument("--median-len", type=float, default=150.0,
                    help="median example length in tokens")
    ap.add_argument("--len-sigma", type=float, default=0.9,
                    help="spread of the log-normal lengths")
    ap.add_argument("--loss-fraction", type=float, default=0.5,
                    help="the share of each example (its end) that is response")
    ap.add_argument("--bucket-multiple", type=int, default=64,
                    help="unpacked batches are padded to a multiple of this, as the trainer's "
                         "(each length one compile)")
    ap.add_argument("--attention-impl", default="auto", choices=("auto", "xla", "cudnn"))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per row")
    ap.add_argument("--out", required=True, help="the JSON written")
    ap.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        import json
        print(json.dumps(run_one(a)), flush=True)
        return 0
    lens = draw_lengths(a.examples, a.median_len, a.len_sigma, a.max_seq_len, a.seed)
    print(f"lengths: {length_stats(lens)}", flush=True)
    base = [a for a in (argv if argv is not None else sys.argv[1:])]
    rows = []
    for mode in a.modes:
        args = [os.path.abspath(__file__), *base, "--one", mode]
        row = spawn_row(args, a.timeout)
        if row.get("status") in ("failed", "oom") and a.attention_impl == "auto":
            print(f"  {mode} failed with attention auto; again with xla", flush=True)
            row = {**spawn_row(args + ["--attention-impl", "xla"], a.timeout),
                   "attention_fallback": row.get("error")}
        row.setdefault("mode", mode)
        rows.append(row)
        if "useful_tokens_per_s" in row:
            print(f"{mode:>9}: {row['useful_tokens_per_s']:>10.1f} useful tokens/s, "
                  f"pad {100 * row['pad_fraction']:.1f}%, step {row['step_s'] * 1e3:.1f} ms, "
                  f"{row['examples_per_s']:.1f} examples/s, attention {row['attention']}",
                  flush=True)
    by = {r["mode"]: r for r in rows}
    speedup = None
    if all("useful_tokens_per_s" in by.get(m, {}) for m in MODES):
        speedup = round(by["packed"]["useful_tokens_per_s"] /
                        by["unpacked"]["useful_tokens_per_s"], 3)
        print(f"packed / unpacked useful tokens/s: {speedup}", flush=True)
    write_json(a.out, {"command": command_line(), "lengths": length_stats(lens),
                       "rows": rows, "speedup": speedup})
    return 0 if all("useful_tokens_per_s" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
