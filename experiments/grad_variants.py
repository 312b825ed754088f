"""Gradient-only timings that isolate where a LISA step's time goes (no optimizer).

    python3 experiments/grad_variants.py --shape llama2-7b --batch-size 4 --max-seq-len 1024

Rows, each as milliseconds, ratio to the forward, and XLA's temporary memory: the forward; the
plain-autodiff floor (embedding/norm/head gradients only, activation gradients through every
layer); full gradients; and the custom-VJP LISA gradients for ``--lisa-layers`` (γ) sampled
layers under each remat mode. One process: compile-time memory analysis, not peaks. ``--out``
also writes the rows as JSON, with the device and jax version.
"""
import argparse
import os
import statistics
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_flags, command_line, model_config, random_batch, time_calls,  # noqa: E402
                    write_json)

from lisa_jax import block, layout  # noqa: E402
from lisa_jax import model as M  # noqa: E402
from lisa_jax import step as S  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_flags(ap, shape="tiny", batch_size=4, max_seq_len=1024, lisa_layers=2, dtype=None,
              helps=dict(dtype="dtype of the parameters (default: bfloat16 on an accelerator)"))
    ap.add_argument("--reps", type=int, default=7, help="timed calls of each variant")
    ap.add_argument("--out", default=None, help="also write the rows to this JSON file")
    a = ap.parse_args()
    cfg = model_config(a.shape, a.dtype)
    params = jax.jit(lambda k: M.init_params(cfg, k))(jax.random.key(0))
    batch = random_batch(cfg, a.batch_size, a.max_seq_len)
    L = cfg.num_layers
    active = jnp.arange(a.lisa_layers, dtype=jnp.int32) * (L // max(a.lisa_layers, 1))
    slot = layout.slot_of_layer(active, L)
    rest = {k: v for k, v in params.items() if k != "layers"}
    view = {**rest, "layers": jax.tree.map(lambda x: x[active], params["layers"])}

    def floor(rest, layers, b):
        return jax.grad(lambda r: S.plain_loss(cfg, {**r, "layers": layers}, b)[0])(rest)

    def full(p, b):
        return jax.grad(lambda p_: S.plain_loss(cfg, p_, b)[0])(p)

    cases = {"forward": (lambda p, b: S.plain_loss(cfg, p, b)[0], (params, batch)),
             "floor": (floor, (rest, params["layers"], batch)),
             "full": (full, (params, batch))}
    for remat in block.REMAT_MODES:
        cases[f"lisa_{remat}"] = (
            lambda v, layers, s, b, remat=remat: jax.grad(
                lambda v_: S.lisa_loss(cfg, v_, layers, s, b, remat)[0])(v),
            (view, params["layers"], slot, batch))
    res, rows = {}, []
    for name, (f, args) in cases.items():
        try:
            f = jax.jit(f)
            mem = f.lower(*args).compile().memory_analysis()
            res[name] = statistics.median(time_calls(f, args, a.reps))
            temp = getattr(mem, "temp_size_in_bytes", 0) / 2**30
            print(f"{name:10s} {res[name] * 1e3:8.1f} ms  x{res[name] / res['forward']:5.2f} fwd"
                  f"  {a.batch_size * a.max_seq_len / res[name]:9.0f} tok/s  temp {temp:6.2f} GiB",
                  flush=True)
            rows.append(dict(variant=name, ms=round(res[name] * 1e3, 2),
                             vs_forward=round(res[name] / res["forward"], 3),
                             temp_gib=round(temp, 2)))
        except Exception as e:  # report and go on: one failing variant should not hide the rest
            print(f"{name:10s} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            rows.append(dict(variant=name, error=f"{type(e).__name__}: {str(e)[:300]}"))
    if a.out:
        write_json(a.out, dict(command=command_line(), shape=a.shape, batch=a.batch_size,
                               seq=a.max_seq_len, gamma=a.lisa_layers, dtype=cfg.dtype,
                               rows=rows), device=True)


if __name__ == "__main__":
    main()
