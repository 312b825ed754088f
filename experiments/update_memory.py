"""Compiled memory of a full fine-tuning step with Adam's second moment in float32 and in bf16.

    python3 experiments/update_memory.py --shape llama2-7b --num-layers 2 \
        --out experiments/results/update_memory_cpu.json

Lowers and compiles (never runs) ``step.make_plain_step`` for the shape cut to ``--num-layers``
layers, batch 4 x 1024, bf16 weights with float32-precision updates (``master_weights``) and
Adam's first moment in bf16, its second in float32 or stochastically rounded bf16
(``stochastic_bf16_nu``), and reports XLA's memory analysis: arguments (parameters and state)
and scratch. ``--noise threefry`` draws the rounding's noise with ``jax.random.bits`` instead
of the package's fused hash, ``--noise none`` adds none (the scratch the rounding itself
needs). On the CPU it compiles in a minute or two; on a GPU the scratch is the device's.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import command_line, model_config, write_json  # noqa: E402

GIB = 2**30


def _noise(kind):
    import jax
    import jax.numpy as jnp
    if kind == "threefry":
        return lambda key, shape: jax.random.bits(key, shape, jnp.uint16).astype(jnp.uint32)
    return lambda key, shape: jnp.zeros(shape, jnp.uint32)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--noise", nargs="+", default=["hash", "threefry", "none"],
                    choices=["hash", "threefry", "none"])
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import optax

    from lisa_jax import model as M
    from lisa_jax import precision
    from lisa_jax import step as S

    cfg = dataclasses.replace(model_config(a.shape, "bfloat16"), num_layers=a.num_layers)
    params = jax.eval_shape(lambda k: M.init_params(cfg, k), jax.random.key(0))
    batch = {"input_ids": jax.ShapeDtypeStruct((a.batch_size, a.max_seq_len), jnp.int32)}
    hashed = precision._uniform_bits16
    rows = []
    for nu, noise in [("float32", None)] + [("bfloat16", n) for n in a.noise]:
        precision._uniform_bits16 = hashed if noise in (None, "hash") else _noise(noise)
        opt = optax.adamw(1e-5, mu_dtype=jnp.bfloat16)
        if nu == "bfloat16":
            opt = precision.stochastic_bf16_nu(opt)
        opt = precision.master_weights(opt)
        step = S.make_plain_step(cfg, opt, remat="dots")
        state = jax.eval_shape(opt.init, params)
        mem = step.lower(params, state, batch).compile().memory_analysis()
        rows.append(dict(nu_dtype=nu, noise=noise, arguments_gib=round(
            mem.argument_size_in_bytes / GIB, 3), scratch_gib=round(mem.temp_size_in_bytes / GIB, 3)))
        print(rows[-1], flush=True)
    precision._uniform_bits16 = hashed
    if a.out:
        write_json(a.out, dict(command=command_line(), shape=a.shape, num_layers=a.num_layers,
                               backend=jax.default_backend(), rows=rows), device=True)


if __name__ == "__main__":
    main()
