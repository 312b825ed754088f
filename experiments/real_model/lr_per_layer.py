"""How much learning rate each layer gets under LISA in the real-model study's runs.

    python3 experiments/real_model/lr_per_layer.py \
        --out experiments/results/quality_smollm2/lr_per_layer.json

A layer trained at steps t gets sum_t lr(t); full fine-tuning gives every layer the whole
schedule's sum. This replays the study's samples (the trainer's transform with its seed, 30
layers, 1,000 steps, warmup 50, cosine) without a model, and reports per layer the sum as a
fraction of full fine-tuning's, for each γ and K of the study and seeds 0-2: its mean (γ/L by
construction), the least and largest layer, and what the last periods get (the question
whether a period late in a decaying schedule trains its layers at all).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, uninstalled


def samples(gamma: int, interval: int, seed: int, layers: int, steps: int) -> np.ndarray:
    """``[steps, layers]`` 0/1: which layers the trainer's transform trains at each step."""
    import jax
    import jax.numpy as jnp
    import optax

    from lisa_jax import lisa

    tx = lisa(optax.sgd(0.0), n_active=gamma, interval=interval, key=seed)
    params = {"embed": jnp.zeros((1,)), "layers": {"w": jnp.zeros((layers, 1))}}
    state = tx.init(params)
    grads = jax.tree.map(jnp.zeros_like, params)
    step = jax.jit(lambda s: tx.update(grads, s, params)[1])
    out = np.zeros((steps, layers), np.int8)
    for t in range(steps):
        state = step(state)
        out[t, np.asarray(state.active)] = 1
    return out


def lr_per_step(steps: int, warmup: int, min_lr_ratio: float = 0.0) -> np.ndarray:
    """The trainer's schedule at lr 1 (``methods.make_schedule``)."""
    from lisa_jax.config import TrainConfig
    from lisa_jax.methods import make_schedule

    cfg = TrainConfig(lr=1.0, warmup_steps=warmup, min_lr_ratio=min_lr_ratio,
                      schedule="cosine", method="lisa")
    sched = make_schedule(cfg, steps)
    return np.asarray([float(sched(t)) for t in range(steps)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--gammas", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--intervals", type=int, nargs="+", default=[5, 20])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    lr = lr_per_step(a.steps, a.warmup)
    whole = lr.sum()
    rows = []
    for gamma in a.gammas:
        for k in a.intervals:
            for seed in a.seeds:
                active = samples(gamma, k, seed, a.layers, a.steps)
                share = (active * lr[:, None]).sum(0) / whole  # per layer, of full FT's
                visits = [int(np.sum(np.diff(np.r_[0, active[:, i]]) == 1))
                          for i in range(a.layers)]
                last = slice(a.steps - 5 * k, a.steps)  # the last five periods
                rows.append(dict(
                    gamma=gamma, interval=k, seed=seed, mean=float(share.mean()),
                    min=float(share.min()), max=float(share.max()),
                    min_over_mean=float(share.min() / share.mean()),
                    max_over_mean=float(share.max() / share.mean()),
                    layers_under_half_mean=int(np.sum(share < 0.5 * share.mean())),
                    visits_min=min(visits), visits_max=max(visits),
                    last_five_periods_lr_share=float(lr[last].sum() / whole)))
                r = rows[-1]
                print(f"γ={gamma} K={k:2d} seed {seed}: per-layer share of full FT's lr sum "
                      f"{r['mean']:.3f} (min {r['min']:.3f}, max {r['max']:.3f}; "
                      f"{r['layers_under_half_mean']} layers under half the mean), visits "
                      f"{r['visits_min']}-{r['visits_max']}; the last five periods hold "
                      f"{r['last_five_periods_lr_share']:.4f} of the schedule", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(dict(
            command=" ".join(["python3"] + sys.argv), steps=a.steps, warmup=a.warmup,
            layers=a.layers, schedule="cosine", rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
