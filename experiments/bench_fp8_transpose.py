"""How fast an fp8 weight is transposed on the device, per way of writing it in JAX.

    python3 experiments/bench_fp8_transpose.py --out experiments/results/fp8_transpose_h200.json

The fp8 step keeps one copy of each frozen matrix, laid out for the forward GEMM; cuBLASLt's
fp8 GEMMs take only the "TN" layout, so the backward's GEMM needs that copy transposed, every
step. Ways timed, each on LLaMA-2-7B's matrix shapes (microseconds per matrix, median of
``--reps`` calls over ``--batch`` distinct matrices; and the bandwidth that is, reading and
writing one byte per entry):

* ``plain``: ``w.T``, XLA's transpose of 1-byte elements;
* ``words``: the matrix as 32-bit words (4 entries of a row each) transposed, then each word's
  four bytes spread over four rows (shifts);
* ``words_apart``: the same with the word transpose made its own kernel
  (``optimization_barrier``);
* ``halfwords``: as ``words`` with 16-bit words.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_json  # noqa: E402

SHAPES = {"wq_wk_wv_wo": (4096, 4096), "w_gate_w_up": (11008, 4096), "w_down": (4096, 11008)}


def ways():
    import jax
    import jax.numpy as jnp

    def spread(words_WxO, width, dtype, D, O):
        shifts = jnp.arange(0, 8 * width, 8, dtype=words_WxO.dtype)
        b = (words_WxO[:, None, :] >> shifts[None, :, None]).astype(jnp.uint8)
        return jax.lax.bitcast_convert_type(b.reshape(D, O), dtype)

    def by_words(w, width, apart):
        O, D = w.shape
        u = jax.lax.bitcast_convert_type(w.reshape(O, D // width, width),
                                         {4: jnp.uint32, 2: jnp.uint16}[width])
        t = u.T
        if apart:
            t = jax.lax.optimization_barrier(t)
        return spread(t, width, w.dtype, D, O)

    return {"plain": lambda w: w.T,
            "words": lambda w: by_words(w, 4, False),
            "words_apart": lambda w: by_words(w, 4, True),
            "halfwords": lambda w: by_words(w, 2, False)}


def main():
    import jax
    import jax.numpy as jnp
    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--scale", type=int, default=1, help="divide every shape by this (CPU)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = []
    for name, (O, D) in SHAPES.items():
        O, D = O // a.scale, D // a.scale
        ws = [jax.random.normal(jax.random.key(i), (O, D), jnp.float32).astype(
            jnp.float8_e4m3fn) for i in range(a.batch)]
        ref = np.asarray(ws[0].astype(jnp.float32)).T
        for way, fn in ways().items():
            f = jax.jit(lambda ws, fn=fn: [fn(w) for w in ws])
            out = f(ws)
            ok = bool(np.array_equal(np.asarray(out[0].astype(jnp.float32)), ref))
            times = []
            for _ in range(a.reps):
                t0 = time.perf_counter()
                jax.block_until_ready(f(ws))
                times.append(time.perf_counter() - t0)
            us = statistics.median(times) / a.batch * 1e6
            rows.append(dict(matrix=name, shape=[O, D], way=way, exact=ok, us=round(us, 1),
                             gb_per_s=round(2 * O * D / us / 1e3, 1)))
            print(json.dumps(rows[-1]), flush=True)
    if a.out:
        write_json(a.out, dict(command=" ".join(sys.argv), date=time.strftime("%Y-%m-%d"),
                               device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                               rows=rows), device=True)


if __name__ == "__main__":
    main()
