"""Gradient-only timings that isolate where a LISA step's time goes (no optimizer).

    python3 experiments/grad_variants.py --shape llama2-7b --batch 4 --seq 1024

Rows, each as milliseconds, ratio to the forward, and XLA's temporary memory: the forward; the
plain-autodiff floor (embedding/norm/head gradients only, activation gradients through every
layer); full gradients; and the custom-VJP LISA gradients for γ sampled layers under each remat
mode. One process: compile-time memory analysis, not peaks.
"""
import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shapes import SHAPES  # noqa: E402

from lisa_jax import model as M  # noqa: E402
from lisa_jax import step as S  # noqa: E402
from lisa_jax.stack_vjp import REMAT_MODES, slot_of_layer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--gamma", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    dtype = "bfloat16" if jax.default_backend() != "cpu" else "float32"
    cfg = M.LlamaConfig(**SHAPES[a.shape], dtype=dtype)
    params = jax.jit(lambda k: M.init_params(cfg, k))(jax.random.key(0))
    batch = {"input_ids": jax.random.randint(jax.random.key(1), (a.batch, a.seq), 0,
                                             cfg.vocab_size)}
    L = cfg.num_layers
    active = jnp.arange(a.gamma, dtype=jnp.int32) * (L // max(a.gamma, 1))
    slot = slot_of_layer(active, L)
    rest = {k: v for k, v in params.items() if k != "layers"}
    view = {**rest, "layers": jax.tree.map(lambda x: x[active], params["layers"])}

    def floor(rest, layers, b):
        return jax.grad(lambda r: S.plain_loss(cfg, {**r, "layers": layers}, b)[0])(rest)

    def full(p, b):
        return jax.grad(lambda p_: S.plain_loss(cfg, p_, b)[0])(p)

    cases = {"forward": (lambda p, b: S.plain_loss(cfg, p, b)[0], (params, batch)),
             "floor": (floor, (rest, params["layers"], batch)),
             "full": (full, (params, batch))}
    for remat in REMAT_MODES:
        cases[f"lisa_{remat}"] = (
            lambda v, layers, s, b, remat=remat: jax.grad(
                lambda v_: S.lisa_loss(cfg, v_, layers, s, b, remat)[0])(v),
            (view, params["layers"], slot, batch))
    res = {}
    for name, (f, args) in cases.items():
        try:
            f = jax.jit(f)
            mem = f.lower(*args).compile().memory_analysis()
            jax.block_until_ready(f(*args))
            ts = []
            for _ in range(a.reps):
                t = time.perf_counter()
                jax.block_until_ready(f(*args))
                ts.append(time.perf_counter() - t)
            res[name] = statistics.median(ts)
            temp = getattr(mem, "temp_size_in_bytes", 0) / 2**30
            print(f"{name:10s} {res[name] * 1e3:8.1f} ms  x{res[name] / res['forward']:5.2f} fwd"
                  f"  {a.batch * a.seq / res[name]:9.0f} tok/s  temp {temp:6.2f} GiB", flush=True)
        except Exception as e:  # report and go on: one failing variant should not hide the rest
            print(f"{name:10s} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
