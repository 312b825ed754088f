"""Does a run repeat bit for bit? The same steps twice from the same start, per method, and the
step time, with or without XLA's deterministic GPU ops (what ``lisa-jax train --deterministic``
sets).

    python3 experiments/determinism.py --shape tinyllama-1.1b --out $OUT/plain.json
    python3 experiments/determinism.py --shape tinyllama-1.1b --deterministic \
        --out $OUT/deterministic.json

Each method (LISA on per-layer weights, full FT, LoRA) runs ``--steps`` steps from one random
start on one random batch sequence, twice in the process; the row says how many parameter
entries differ between the two ends, the largest difference, and the median step time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # experiments/common.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, uninstalled

import common  # noqa: E402
from lisa_jax.ops import DETERMINISTIC_XLA_FLAG  # noqa: E402  (jax starts no backend yet)


def run_twice(method: str, cfg, steps: int, batch_size: int, seq_len: int, lr: float):
    import jax
    import numpy as np
    import optax

    import lisa_jax
    from lisa_jax import layout

    def start():
        params = lisa_jax.init_params(cfg, jax.random.key(0))
        tx = optax.adamw(lr)
        if method == "lisa":
            tx = lisa_jax.lisa(tx, n_active=2, interval=5, key=0)
            state = tx.init(params)
            return layout.convert(params, "per_layer"), state, lisa_jax.make_lisa_step(cfg, tx)
        if method == "lora":
            lora = lisa_jax.init_lora(params["layers"], jax.random.key(1), 16)
            return params, (lora, tx.init(lora)), lisa_jax.make_lora_step(
                cfg, tx, lisa_jax.lora_scale(16, None))
        return params, tx.init(params), lisa_jax.make_plain_step(cfg, tx, remat="dots")

    ends, times = [], []
    for _ in range(2):
        params, state, step = start()
        for i in range(steps):
            batch = common.random_batch(cfg, batch_size, seq_len, seed=i)
            t0 = time.perf_counter()
            params, state, m = step(params, state, batch)
            jax.block_until_ready((params, state))
            if i >= 2:
                times.append(time.perf_counter() - t0)
        trained = state[0] if method == "lora" else layout.convert(params, "stacked")
        ends.append([np.asarray(x) for x in jax.tree.leaves(trained)])
        del params, state, step
    differ = sum(int(np.sum(a != b)) for a, b in zip(*ends))
    total = sum(a.size for a in ends[0])
    largest = max(float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
                  for a, b in zip(*ends))
    return dict(method=method, steps=steps, entries=total, entries_differing=differ,
                max_abs_diff=largest, ms=round(1e3 * statistics.median(times), 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_flags(ap, many=("method",), shape="tinyllama-1.1b", method=["lisa", "full",
                     "lora"], steps=12, batch_size=4, max_seq_len=1024, lr=1e-4)
    ap.add_argument("--deterministic", action="store_true",
                    help=f"run with XLA_FLAGS {DETERMINISTIC_XLA_FLAG}")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.deterministic:  # before jax starts its backends
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " +
                                   DETERMINISTIC_XLA_FLAG).strip()
    cfg = common.model_config(a.shape)
    rows = []
    for method in a.methods:
        row = dict(shape=a.shape, deterministic=a.deterministic,
                   **run_twice(method, cfg, a.steps, a.batch_size, a.max_seq_len, a.lr))
        print(row, flush=True)
        rows.append(row)
    common.write_json(a.out, dict(command=common.command_line(), rows=rows), device=True)


if __name__ == "__main__":
    main()
