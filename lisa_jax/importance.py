"""Per-layer importance for LISA: sampling probabilities ``p_ℓ`` that are not uniform.

LISA's Algorithm 1 samples layer ``ℓ`` with probability ``p_ℓ``; the reference implementation
uses ``p_ℓ = γ / L`` for every layer. This module supplies two non-uniform rules:

* **Static, from weight norms** (the paper's motivation, its Figure 1): fine-tune once with LoRA
  and once fully, measure how far each layer's weights moved, and sample layer ``ℓ`` in
  proportion to ``‖ΔW_ℓ^LoRA‖ / ‖ΔW_ℓ^full‖`` (:func:`probs_from_norms`). The result is
  written with :func:`save_probs` and read by the trainer's ``--lisa-probs FILE``::

      python experiments/weight_norms.py          # writes experiments/results/weight_norms.json
      lisa-jax train --demo --out runs/static --lisa-probs experiments/results/weight_norms.json

* **Online, from gradient norms** (:class:`OnlineImportance`): during LISA training keep an
  exponential moving average of each sampled layer's gradient norm, and at every period
  boundary redraw the layers with probabilities proportional to it (layers never seen yet are
  scored at the mean of the seen ones; a floor keeps every layer in play)::

      lisa-jax train --demo --out runs/online --lisa-importance online \\
          [--lisa-importance-floor 0.05] [--lisa-importance-decay 0.9]

  The probabilities are logged as ``layer_probs`` in ``metrics.jsonl`` at each resample, and
  the estimator's state is stored in every checkpoint, so ``--resume`` stays exact.

* **Static, from outlier ratios** (OwLore: Li et al., "OwLore: Outlier-weighed Layerwise
  Sampled Low-Rank Projection for Memory-Efficient LLM Fine-tuning", 2024): layers with more
  weight outliers are sampled more (:func:`owl_outlier_ratios`, :func:`owl_weights`); the
  trainer's ``--lisa-sampler owl`` computes them from the loaded weights and draws ``γ``
  layers without replacement by them each period (``--lisa-owl-threshold M``). OwLore's
  fixed ``decrease``/``increase`` weights are ``--lisa-sampler decrease|increase``.

In the first two cases the probabilities are normalized by :func:`lisa_jax.sampling.normalize_probs`:
they sum to ``γ`` (``--lisa-layers``, the expected number of trained layers per period), each
lies in ``[floor, 1]``. The floor is capped at the uniform value ``γ / L``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lisa_jax import sampling

__all__ = ["weight_change_norms", "tree_change_norm", "lora_delta_norms", "probs_from_norms",
           "OnlineImportance", "save_probs", "load_probs", "parse_probs", "owl_outlier_ratios",
           "owl_weights", "OWL_THRESHOLD", "OWL_MODES"]


# ----------------------------------------------------------------------------- weight norms


def _layer_sq_norms(before, after, num_layers: int | None = None) -> np.ndarray:
    """Per leading-index sum of squared differences over every leaf pair (float64)."""
    b_leaves, treedef = jax.tree.flatten(before)
    a_leaves = treedef.flatten_up_to(after)
    out = None
    for b, a in zip(b_leaves, a_leaves):
        if np.shape(b) != np.shape(a):
            raise ValueError(f"leaf shapes differ: {np.shape(b)} vs {np.shape(a)}")
        L = np.shape(b)[0]
        if out is None:
            out = np.zeros(L, np.float64)
        elif L != out.shape[0]:
            raise ValueError(f"layer leaves have different leading sizes {out.shape[0]} and {L}")
        for l in range(L):  # one layer slice at a time: float64 copies stay small
            d = np.asarray(a[l], np.float64) - np.asarray(b[l], np.float64)
            out[l] += float(np.vdot(d, d))
    if out is None:
        raise ValueError("no leaves to compare")
    return out


def weight_change_norms(params_before, params_after, layers: str = "layers") -> np.ndarray:
    """``[L]`` float64: the Frobenius norm of ``after - before`` over all leaves of layer ``ℓ``.

    ``params_*`` are model parameter dicts whose ``layers`` entry holds the stacked layer leaves
    (leading axis ``L``); differences are taken in float64, one layer slice at a time.
    """
    return np.sqrt(_layer_sq_norms(params_before[layers], params_after[layers]))


def tree_change_norm(before, after) -> float:
    """The Frobenius norm of ``after - before`` over all leaves of a tree (e.g. the embedding)."""
    total = 0.0
    b_leaves, treedef = jax.tree.flatten(before)
    for b, a in zip(b_leaves, treedef.flatten_up_to(after)):
        d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
        total += float(np.vdot(d, d))
    return math.sqrt(total)


def lora_delta_norms(lora, scale: float) -> np.ndarray:
    """``[L]`` float64: ``sqrt(Σ_targets ‖scale · A_ℓ B_ℓ‖²_F)``, the norm of the merged delta.

    ``lora``: adapters ``{target: {"a": [L, in, r], "b": [L, r, out]}}`` (``lora.init_lora``).
    Uses ``‖AB‖²_F = Σ (AᵀA) ∘ (BBᵀ)`` on ``r × r`` Gram matrices, so no ``in × out`` delta is
    ever formed; equals :func:`weight_change_norms` of ``lora.merge_lora``'s result up to
    rounding.
    """
    out = None
    for name in sorted(lora):
        a, b = lora[name]["a"], lora[name]["b"]
        L = np.shape(a)[0]
        if out is None:
            out = np.zeros(L, np.float64)
        for l in range(L):
            al, bl = np.asarray(a[l], np.float64), np.asarray(b[l], np.float64)
            out[l] += float(np.sum((al.T @ al) * (bl @ bl.T)))
    if out is None:
        raise ValueError("no LoRA targets")
    return abs(scale) * np.sqrt(np.maximum(out, 0.0))


def _floor_for(floor: float, expected: float, num_layers: int) -> float:
    return min(float(floor), float(expected) / num_layers)


def probs_from_norms(lora_norms, full_norms=None, expected: float = 2.0,
                     floor: float = 0.05) -> np.ndarray:
    """Per-layer sampling probabilities from weight-change norms (float64 ``[L]``).

    ``p_ℓ ∝ lora_norms[ℓ] / full_norms[ℓ]`` when ``full_norms`` is given (a layer whose full
    fine-tuning norm is 0 gets score 0), else ``p_ℓ ∝ lora_norms[ℓ]``; normalized with
    :func:`lisa_jax.sampling.normalize_probs` to ``sum(p) == expected`` (γ) and
    ``min(floor, γ/L) <= p_ℓ <= 1``.

    >>> probs_from_norms([1.0, 1.0, 2.0, 4.0], expected=2.0, floor=0.1).round(3).tolist()
    [0.3, 0.3, 0.5, 0.9]
    """
    s = np.asarray(lora_norms, np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"lora_norms must be a non-empty 1-D array, got shape {s.shape}")
    if full_norms is not None:
        f = np.asarray(full_norms, np.float64)
        if f.shape != s.shape:
            raise ValueError(f"full_norms has shape {f.shape}, lora_norms {s.shape}; give one "
                             "norm per layer for both")
        if np.any(f < 0) or not np.all(np.isfinite(f)):
            raise ValueError("full_norms must be finite and non-negative")
        s = np.where(f > 0, s / np.where(f > 0, f, 1.0), 0.0)
    return sampling.normalize_probs(s, expected, _floor_for(floor, expected, s.size))


# ----------------------------------------------------------------------------- outliers

# OwLore's released layer scores for LLaMA-2 (metric_cache/llama2_7b_ratio_13.txt in
# pixeli99/OwLore) are outlier ratios at M = 13; OWL (Yin et al., 2023) tried M in 3..10.
OWL_THRESHOLD = 13.0
OWL_MODES = ("owl", "decrease", "increase")


def owl_outlier_ratios(layers, threshold: float = OWL_THRESHOLD) -> np.ndarray:
    """``[L]`` float64: each layer's outlier ratio, the weight-only variant of OWL's metric.

    OWL (and OwLore after it) scores the entries of a layer's weight matrices by
    ``A_ij = |W_ij| · ‖X_j‖₂`` (``X`` the matrix's input activations on calibration data) and
    calls the layer's outlier ratio the fraction of entries of all its matrices, taken
    together, with ``A_ij > M · mean(A)``, the mean over those same entries. Without
    activations the score is ``|W_ij|`` alone, which is what this computes: for layer ``ℓ``
    with matrices ``W¹ … Wᵏ`` (the layer's leaves with two or more dimensions per layer: its
    projections, not its norm scales or biases),

        ratio_ℓ = #{(m, i, j): |Wᵐ_ij| > M · mean_{m,i,j} |Wᵐ_ij|} / Σ_m size(Wᵐ).

    ``layers``: the stacked layer leaves (each ``[L, ...]``; a dict such as
    ``params["layers"]``); reduced on the device one leaf at a time, in float32.
    """
    threshold = float(threshold)
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"the outlier threshold M={threshold} must be a positive number")
    mats = [x for x in jax.tree.leaves(layers) if np.ndim(x) >= 3]
    if not mats:
        raise ValueError("no weight matrices among the layer leaves (each [L, rows, cols])")
    per_layer = lambda f: jax.jit(lambda x: f(x).reshape(x.shape[0], -1).sum(1))  # noqa: E731
    abs_sum = per_layer(lambda x: jnp.abs(x.astype(jnp.float32)))
    total = sum(np.asarray(abs_sum(x), np.float64) for x in mats)
    size = sum(int(np.prod(np.shape(x)[1:])) for x in mats)
    cut = jnp.asarray(threshold * total / size, jnp.float32)
    over = jax.jit(lambda x, c: (jnp.abs(x.astype(jnp.float32))
                                 > c.reshape((-1,) + (1,) * (x.ndim - 1)))
                   .reshape(x.shape[0], -1).sum(1, dtype=jnp.int32))
    count = sum(np.asarray(over(x, cut), np.float64) for x in mats)
    return count / size


def owl_weights(num_layers: int, mode: str = "owl", ratios=None) -> np.ndarray:
    """``[L]`` float64 selection weights summing to 1, as OwLore's ``lisa_prob_mode`` makes them.

    ``owl``: ``ratios / sum(ratios)`` (``ratios`` from :func:`owl_outlier_ratios`);
    ``decrease``: ``∝ L, L-1, …, 1`` (the first layers most); ``increase``: ``∝ 1, …, L``.
    OwLore draws ``γ`` layers without replacement by them
    (``lisa_jax.sampling.Weighted``).

    >>> owl_weights(3, "decrease").round(3).tolist()
    [0.5, 0.333, 0.167]
    >>> owl_weights(3, "owl", [0.0, 0.01, 0.03]).tolist()
    [0.0, 0.25, 0.75]
    """
    if mode == "decrease":
        w = np.arange(num_layers, 0, -1, dtype=np.float64)
    elif mode == "increase":
        w = np.arange(1, num_layers + 1, dtype=np.float64)
    elif mode == "owl":
        if ratios is None:
            raise ValueError("owl weights need the outlier ratios (owl_outlier_ratios)")
        w = np.asarray(ratios, np.float64)
        if w.shape != (num_layers,):
            raise ValueError(f"{w.size} outlier ratios for {num_layers} layers")
        if not np.any(w > 0):
            raise ValueError("no layer has weights above M times its mean magnitude, so the "
                             "outlier ratios are all zero; lower the threshold M")
    else:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(OWL_MODES)}")
    return w / w.sum()


# ----------------------------------------------------------------------------- online


class OnlineImportance:
    """Online per-layer importance from the gradient norms of the sampled layers.

    ``observe(active_layers, layer_grad_norms)`` after each LISA step (the step's metric
    ``layer_grad_norms``, slot order = sorted active layers) updates an exponential moving
    average ``ema[ℓ] ← decay · ema[ℓ] + (1 - decay) · ‖g_ℓ‖`` (the first observation sets it).
    ``probs()`` scores each layer by its average (layers never observed: the mean of the
    observed ones, so they are explored; with no observation at all: uniform) and normalizes
    to ``sum == expected`` with ``min(floor, expected/L) <= p <= 1``.

    The state is plain floats/lists (``state_dict`` / ``load_state_dict``), for JSON
    checkpoint metadata.

    >>> imp = OnlineImportance(4, expected=2, floor=0.1)
    >>> imp.probs().tolist()
    [0.5, 0.5, 0.5, 0.5]
    >>> imp.observe([0, 2], [1.0, 3.0])
    >>> imp.probs().round(3).tolist()   # layers 1 and 3 unseen: scored at the mean, 2.0
    [0.3, 0.5, 0.7, 0.5]
    """

    def __init__(self, num_layers: int, expected: float, floor: float = 0.05,
                 decay: float = 0.9):
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers} must be >= 1")
        if not 0 < expected <= num_layers:
            raise ValueError(f"expected={expected} must be in (0, {num_layers}]")
        if not 0 <= decay < 1:
            raise ValueError(f"decay={decay} must be in [0, 1)")
        if floor < 0:
            raise ValueError(f"floor={floor} must be >= 0")
        self.num_layers = int(num_layers)
        self.expected = float(expected)
        self.floor = _floor_for(floor, expected, num_layers)
        self.decay = float(decay)
        self.ema: list[float | None] = [None] * self.num_layers
        self.counts: list[int] = [0] * self.num_layers

    def observe(self, active_layers, layer_grad_norms) -> None:
        """Fold one step's per-layer gradient norms into the averages (non-finite ones are
        skipped)."""
        active = [int(i) for i in np.asarray(active_layers).reshape(-1)]
        norms = np.asarray(layer_grad_norms, np.float64).reshape(-1)
        if len(active) != norms.size:
            raise ValueError(f"{len(active)} active layers but {norms.size} gradient norms")
        for l, g in zip(active, norms.tolist()):
            if not 0 <= l < self.num_layers:
                raise ValueError(f"layer {l} out of range [0, {self.num_layers})")
            if not math.isfinite(g):
                continue
            prev = self.ema[l]
            self.ema[l] = g if prev is None else self.decay * prev + (1 - self.decay) * g
            self.counts[l] += 1

    def scores(self) -> np.ndarray:
        """``[L]`` float64: the averages, unobserved layers at the mean of the observed."""
        seen = [v for v in self.ema if v is not None]
        fill = float(np.mean(seen)) if seen else 1.0
        return np.array([fill if v is None else v for v in self.ema], np.float64)

    def probs(self) -> np.ndarray:
        """``[L]`` float64 probabilities for the next draw."""
        s = self.scores()
        if not np.any(s > 0):
            s = np.ones_like(s)
        return sampling.normalize_probs(s, self.expected, self.floor)

    def state_dict(self) -> dict:
        return {"num_layers": self.num_layers, "expected": self.expected, "floor": self.floor,
                "decay": self.decay, "ema": list(self.ema), "counts": list(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_layers"]) != self.num_layers:
            raise ValueError(f"importance state is for {state['num_layers']} layers, this model "
                             f"has {self.num_layers}")
        self.expected = float(state["expected"])
        self.floor = float(state["floor"])
        self.decay = float(state["decay"])
        self.ema = [None if v is None else float(v) for v in state["ema"]]
        self.counts = [int(c) for c in state["counts"]]


# ----------------------------------------------------------------------------- files


def save_probs(path, probs, meta: dict | None = None) -> None:
    """Write ``{"probs": [...], "meta": {...}}`` (JSON); ``--lisa-probs FILE`` reads it."""
    p = sampling.check_probs(probs)
    payload = {"probs": [float(x) for x in np.asarray(probs, np.float64)], "meta": meta or {}}
    assert len(payload["probs"]) == p.size
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=1) + "\n")


def parse_probs(text: str) -> tuple[list[float], dict]:
    """``(probs, meta)`` as written in ``text``: :func:`save_probs`'s JSON object, a JSON list,
    or numbers separated by whitespace or commas (as ``--lisa-probs`` takes them). Not checked
    as probabilities (:func:`lisa_jax.sampling.check_probs` does that); ``ValueError`` for text
    that is none of these.

    >>> parse_probs("0.5, 0.25 1")
    ([0.5, 0.25, 1.0], {})
    >>> parse_probs('{"probs": [0.5, 0.5], "meta": {"gamma": 1}}')
    ([0.5, 0.5], {'gamma': 1})
    """
    try:
        if not text.strip().startswith(("[", "{")):
            return [float(x) for x in text.replace(",", " ").split()], {}
        data = json.loads(text)
        if isinstance(data, dict):
            if "probs" not in data:
                raise ValueError("a JSON object needs a 'probs' list")
            probs, meta = data["probs"], data.get("meta", {})
        else:
            probs, meta = data, {}
        return [float(p) for p in probs], meta
    except TypeError as e:  # e.g. a number where the list belongs
        raise ValueError(f"not a list of probabilities ({e})")


def load_probs(path) -> tuple[np.ndarray, dict]:
    """``(probs float64 [L], meta)`` from a file :func:`parse_probs` reads (:func:`save_probs`'s
    format, a plain JSON list, or separated numbers), checked as probabilities."""
    try:
        probs, meta = parse_probs(Path(path).read_text())
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    sampling.check_probs(probs)
    return np.asarray(probs, np.float64), meta
