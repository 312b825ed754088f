"""Time the fused fp8 MLP's row kernels (``lisa_jax.fp8_mlp``) alone, over launch shapes.

    python3 experiments/bench_fp8_mlp.py --shape llama2-7b --tokens 4096 \
        --out experiments/results/fp8_mlp_kernels_h200.json

Each row is one kernel (``gate_quantize``: forward; ``gate_grad_quantize``: backward; each
also as ``--frozen-residuals fp8`` runs it, with the gate and up products in e4m3) in
plain JAX (what XLA fuses of it) or in Pallas with ``rows`` rows a program, ``block`` columns
at a time and ``warps`` warps (and ``programs`` programs, each taking groups of rows in turn,
where fewer than the groups; ``stages``: Triton's pipeline stages), timed over ``--iters``
calls on random data of the shape's ``[tokens, intermediate_size]`` (the best of three runs
of ``--iters`` calls dispatched back to back); ``gb_s`` is the bytes it must move (each input
read once, each output written once) over its time. A launch shape the compiler refuses is
listed with its error.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import command_line, model_config, write_json  # noqa: E402


def _time(fn, args, iters, repeats=3):
    """Seconds a call, the best of ``repeats`` runs of ``iters`` calls dispatched back to back
    (the device's time, not the host's dispatch)."""
    import jax
    jax.block_until_ready(fn(*args))  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = [fn(*args) for _ in range(iters)]
        jax.block_until_ready(outs)
        best = min(best, (time.perf_counter() - t0) / iters)
        del outs
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--blocks", type=int, nargs="+", default=[1024, 2048, 4096, 16384])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--programs", type=int, nargs="+", default=[0],
                    help="programs at most, each taking groups of rows in turn (0: one a "
                         "group)")
    ap.add_argument("--stages", type=int, nargs="+", default=[1],
                    help="Triton's software pipeline stages")
    ap.add_argument("--max-elements", type=int, default=32768,
                    help="skip launch shapes with more than this many elements a row block")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from lisa_jax import fp8_mlp
    from lisa_jax.fp8 import E4M3

    cfg = model_config(a.shape)
    T, F = a.tokens, cfg.intermediate_size
    k = jax.random.split(jax.random.key(0), 8)
    bf = lambda i: jax.random.normal(k[i], (T, F), jnp.bfloat16)  # noqa: E731
    pos = lambda i, n: jax.random.uniform(k[i], (n,)) + 0.5  # noqa: E731
    fwd_args = (bf(0), bf(1), pos(2, T), pos(3, F), pos(4, F))
    bwd_args = (bf(5), pos(6, T), bf(0), bf(1), pos(2, T), pos(2, T), pos(3, F), pos(4, F))
    lean_args = (*bwd_args[:2], bf(0).astype(E4M3), bf(1).astype(E4M3), *bwd_args[4:])

    def forward(with_products):
        return lambda kind: jax.jit(lambda *x: fp8_mlp.gate_quantize(
            *x, cfg.hidden_act, kernels=kind, with_products=with_products))

    def backward(kind):
        return jax.jit(lambda dh, dr, a_, b_, ra, rb, ca, cb: fp8_mlp.gate_grad_quantize(
            dh, dr, None, a_, b_, ra, rb, ca, cb, None, None, cfg.hidden_act, E4M3,
            kernels=kind))
    # name: (the jitted kernel of an implementation, its arguments, the bytes it moves, which
    # of fp8_mlp.LAUNCH it runs with); "fp8 products": --frozen-residuals fp8's variants
    kernels = {
        "gate_quantize": (forward(False), fwd_args, 2 * T * F * 2 + T * F, 0),
        "gate_quantize, fp8 products": (forward(True), fwd_args, 2 * T * F * 2 + 3 * T * F, 0),
        "gate_grad_quantize": (backward, bwd_args, 3 * T * F * 2 + 2 * T * F, 1),
        "gate_grad_quantize, fp8 products": (backward, lean_args, T * F * 2 + 4 * T * F, 1),
    }
    rows = []
    for name, (make, args, nbytes, which) in kernels.items():
        s = _time(make("xla"), args, a.iters)
        rows.append(dict(kernel=name, impl="xla", us=round(s * 1e6, 1),
                         gb_s=round(nbytes / s / 1e9, 1)))
        print(rows[-1], flush=True)
        for r, block, warps, programs, stages in itertools.product(
                a.rows, a.blocks, a.warps, a.programs, a.stages):
            if r * block > a.max_elements or block > 2 * max(F, 1024):
                continue
            launch = (r, block, warps, programs, stages)
            fp8_mlp.LAUNCH = tuple(launch if i == which else other
                                   for i, other in enumerate(fp8_mlp.LAUNCH))
            row = dict(kernel=name, impl="pallas", rows=r, block=block, warps=warps,
                       programs=fp8_mlp.launch_grid(T, r, programs)[1],
                       stages=stages)
            try:
                s = _time(make("pallas"), args, a.iters)
                row.update(us=round(s * 1e6, 1), gb_s=round(nbytes / s / 1e9, 1))
            except Exception as e:  # noqa: BLE001 - a refused launch shape is a result
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            print(row, flush=True)
    best = {name: min((r for r in rows if r["kernel"] == name and "us" in r),
                      key=lambda r: r["us"]) for name in kernels}
    print("best:", best)
    if a.out:
        write_json(a.out, dict(command=command_line(), date=time.strftime("%Y-%m-%d"),
                               shape=a.shape, tokens=T, intermediate=F,
                               device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                               rows=rows, best=best))


if __name__ == "__main__":
    main()
