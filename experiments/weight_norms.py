"""Per-layer weight-change norms of LoRA vs full fine-tuning (the LISA paper's Figure 1), and the
importance-sampling probabilities derived from them.

    python experiments/weight_norms.py                       # on the CPU
    python experiments/weight_norms.py --steps 200 --lisa-layers 2 --out experiments/results
    lisa-jax train --demo --out runs/static --lisa-probs experiments/results/weight_norms.json

The bundled demo model (4 layers, pretrained on standard-library docstrings) is fine-tuned on
the bundled instructions twice from the same start, on the same batches, for the same number
of steps: once with LoRA (``--lora-rank``, ``--lora-alpha``, all seven projection matrices;
embedding and head frozen, as in PEFT) and once fully (AdamW). Per layer we take the Frobenius norm of the weight
change (LoRA: the merged delta ``scale · A B``, via ``importance.lora_delta_norms``; full: the
change of all the layer's weights), plus the embedding and the LM head as the first and last
bars. The probabilities ``p_ℓ ∝ ‖ΔW_ℓ^LoRA‖ / ‖ΔW_ℓ^full‖`` normalized to γ (``--lisa-layers``)
expected layers, each at least ``--lisa-importance-floor`` (``importance.probs_from_norms``) are written with the norms to ``weight_norms.json`` (readable
by ``--lisa-probs``), the bar chart to ``weight_norms.png``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_flags  # noqa: E402

from lisa_jax import data as data_lib  # noqa: E402
from lisa_jax import lora as lora_lib  # noqa: E402
from lisa_jax import step as step_lib  # noqa: E402
from lisa_jax.hf import load_hf  # noqa: E402
from lisa_jax.importance import (lora_delta_norms, probs_from_norms, save_probs,  # noqa: E402
                                 tree_change_norm, weight_change_norms)

DEMO = Path(__file__).resolve().parents[1] / "lisa_jax" / "demo"


def batches(tokenizer, steps: int, batch_size: int, max_seq_len: int, seed: int):
    splits = data_lib.prepare_data(DEMO / "instructions.jsonl", tokenizer, max_seq_len,
                                   eval_fraction=None, seed=seed)
    loader = data_lib.DataLoader(splits.train, batch_size, seed=seed,
                                 pad_id=tokenizer.pad_token_id, max_seq_len=max_seq_len)
    out = []
    for _ in range(steps):
        b = next(loader)
        out.append({"input_ids": b["input_ids"], "loss_mask": b["loss_mask"]})
    return out


def run_full(mcfg, params, data, lr):
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.0))
    step = step_lib.make_plain_step(mcfg, tx, donate=False)
    p, s, losses = params, tx.init(params), []
    for b in data:
        p, s, m = step(p, s, b)
        losses.append(float(m["loss"]))
    return p, losses


def run_lora(mcfg, params, data, lr, rank, alpha, seed):
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.0))
    scale = lora_lib.lora_scale(rank, alpha)
    adapters = lora_lib.init_lora(params["layers"], jax.random.key(seed), rank)
    step = step_lib.make_lora_step(mcfg, tx, scale, donate=False)
    state, losses = (adapters, tx.init(adapters)), []
    for b in data:
        _, state, m = step(params, state, b)
        losses.append(float(m["loss"]))
    return state[0], scale, losses


def plot(path, names, lora_bars, full_bars, probs, gamma):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = np.arange(len(names))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax1.bar(x - 0.2, lora_bars, 0.4, label="LoRA (merged delta)")
    ax1.bar(x + 0.2, full_bars, 0.4, label="full fine-tuning")
    ax1.set_xticks(x, names, rotation=0)
    ax1.set_yscale("log")
    ax1.set_ylabel("‖ΔW‖_F (log)")
    ax1.set_title("weight change per layer (LoRA: embedding and head frozen)")
    ax1.legend(fontsize=8)
    L = len(probs)
    xl = np.arange(L)
    ax2.bar(xl, probs, 0.6, color="tab:green", label="p_ℓ ∝ ‖ΔW^LoRA‖ / ‖ΔW^full‖")
    ax2.axhline(gamma / L, color="k", ls="--", lw=1, label=f"uniform γ/L = {gamma / L:.2f}")
    ax2.set_xticks(xl, [f"L{i}" for i in xl])
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("sampling probability")
    ax2.set_title(f"derived LISA probabilities (γ = {gamma:g})")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_flags(ap, steps=100, batch_size=16, max_seq_len=128)
    ap.add_argument("--lr-full", type=float, default=3e-4, help="learning rate of full FT")
    ap.add_argument("--lr-lora", type=float, default=2e-3, help="learning rate of LoRA")
    add_flags(ap, lora_rank=8, lora_alpha=16.0, lisa_layers=2,
              helps=dict(lisa_layers="γ: expected layers of the derived probabilities"))
    ap.add_argument("--lisa-importance-floor", type=float, default=0.05,
                    help="the least probability of any layer")
    add_flags(ap, seed=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = ap.parse_args(argv)
    t0 = time.perf_counter()

    model = load_hf(DEMO / "model")
    mcfg, base = model.cfg, model.params
    tokenizer = data_lib.load_tokenizer(DEMO / "model")
    data = batches(tokenizer, a.steps, a.batch_size, a.max_seq_len, a.seed)

    full, full_losses = run_full(mcfg, base, data, a.lr_full)
    adapters, scale, lora_losses = run_lora(mcfg, base, data, a.lr_lora, a.lora_rank,
                                            a.lora_alpha, a.seed)

    full_layers = weight_change_norms(base, full)
    lora_layers = lora_delta_norms(adapters, scale)
    merged = lora_lib.merge_lora(base, adapters, scale)
    check = weight_change_norms(base, merged)  # the same norms from the materialized merge
    assert np.allclose(check, lora_layers, rtol=1e-3), (check, lora_layers)
    full_embed = tree_change_norm(base["embed"], full["embed"])
    full_head = tree_change_norm(base["lm_head"], full["lm_head"])
    probs = probs_from_norms(lora_layers, full_layers, expected=a.lisa_layers,
                             floor=a.lisa_importance_floor)
    elapsed = time.perf_counter() - t0

    L = mcfg.num_layers
    names = ["embed"] + [f"L{i}" for i in range(L)] + ["head"]
    lora_bars = [0.0] + lora_layers.tolist() + [0.0]
    full_bars = [full_embed] + full_layers.tolist() + [full_head]
    print(f"{a.steps} steps of {a.batch_size} examples, demo model ({L} layers); "
          f"loss full {np.mean(full_losses[:5]):.3f} -> {np.mean(full_losses[-5:]):.3f}, "
          f"LoRA {np.mean(lora_losses[:5]):.3f} -> {np.mean(lora_losses[-5:]):.3f}")
    print(f"{'':7s} {'LoRA ‖ΔW‖':>10s} {'full ‖ΔW‖':>10s} {'ratio':>8s} "
          f"{'p (γ=' + f'{a.lisa_layers:g})':>8s}")
    for i, n in enumerate(names):
        ratio = lora_bars[i] / full_bars[i] if full_bars[i] else float("nan")
        p = f"{probs[i - 1]:8.3f}" if 0 < i <= L else f"{'-':>8s}"
        print(f"{n:7s} {lora_bars[i]:10.4f} {full_bars[i]:10.4f} {ratio:8.4f} {p}")
    print(f"elapsed {elapsed:.0f} s")

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": "lisa_jax/demo/model", "num_layers": L, "steps": a.steps,
            "batch_size": a.batch_size, "lr_full": a.lr_full, "lr_lora": a.lr_lora,
            "lora_rank": a.lora_rank, "lora_alpha": a.lora_alpha, "gamma": a.lisa_layers,
            "floor": a.lisa_importance_floor,
            "rule": "p ∝ lora_norm / full_norm (importance.probs_from_norms)",
            "lora_layer_norms": lora_layers.tolist(), "full_layer_norms": full_layers.tolist(),
            "full_embed_norm": full_embed, "full_head_norm": full_head,
            "lora_embed_norm": 0.0, "lora_head_norm": 0.0,
            "loss_full": [full_losses[0], full_losses[-1]],
            "loss_lora": [lora_losses[0], lora_losses[-1]], "elapsed_s": round(elapsed, 1)}
    save_probs(out / "weight_norms.json", probs, meta)
    plot(out / "weight_norms.png", names, lora_bars, full_bars, probs, a.lisa_layers)
    print(f"wrote {out / 'weight_norms.json'} and {out / 'weight_norms.png'}")


if __name__ == "__main__":
    main()
