"""Layer samplers for LISA, as pure functions.

Two sampling modes pick which transformer layers are trained in a period:

* :func:`sample_uniform` -- exactly ``n_active`` of ``num_layers`` layers, uniformly without
  replacement (the LISA paper's rule). Fixed output shape, so it runs inside ``jax.jit``.
* :func:`sample_bernoulli` -- each layer ``l`` independently with probability ``probs[l]``; the
  number drawn varies (its mean is :func:`expected_count`). The output shape depends on the draw,
  so it runs on the host; :func:`bernoulli_mask` is the jit-friendly boolean-mask form.

:func:`normalize_probs` turns per-layer importance scores into such probabilities: every layer
keeps at least ``floor`` (no layer starves), none exceeds 1, and they sum to ``expected``.

All samplers return sorted, unique ``int32`` layer indices.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["sample_uniform", "sample_bernoulli", "bernoulli_mask", "expected_count",
           "normalize_probs", "check_probs"]


def sample_uniform(key, num_layers: int, n_active: int) -> jax.Array:
    """``n_active`` distinct layer indices in ``[0, num_layers)``, uniform, sorted, ``int32[n_active]``.

    Pure and fixed-shape: usable under ``jax.jit`` with a traced ``key``.

    >>> import jax
    >>> idx = sample_uniform(jax.random.key(0), 8, 3)
    >>> idx.shape, idx.dtype.name, bool((idx[1:] > idx[:-1]).all())
    ((3,), 'int32', True)
    """
    num_layers, n_active = int(num_layers), int(n_active)
    if not 1 <= n_active <= num_layers:
        raise ValueError(f"n_active={n_active} must be in [1, {num_layers}] (the number of layers)")
    perm = jax.random.permutation(key, num_layers)
    return jnp.sort(perm[:n_active]).astype(jnp.int32)


def bernoulli_mask(key, probs) -> jax.Array:
    """Boolean ``[L]`` mask: layer ``l`` is set with probability ``probs[l]``, independently."""
    probs = jnp.asarray(probs, jnp.float32)
    return jax.random.bernoulli(key, probs)


def sample_bernoulli(key, probs) -> np.ndarray:
    """Indices of the layers drawn by :func:`bernoulli_mask`: sorted ``int32``, length varies.

    Host-side (the length depends on the draw); may be empty.

    >>> import jax
    >>> sample_bernoulli(jax.random.key(0), [1.0, 0.0, 1.0]).tolist()
    [0, 2]
    """
    mask = np.asarray(bernoulli_mask(key, probs))
    return np.flatnonzero(mask).astype(np.int32)


def expected_count(probs) -> float:
    """Mean number of layers drawn per period by :func:`sample_bernoulli` (``sum(probs)``).

    >>> expected_count([0.5, 0.25, 1.0])
    1.75
    """
    return float(np.sum(np.asarray(probs, np.float64)))


def check_probs(probs, num_layers: int | None = None) -> np.ndarray:
    """Validate per-layer probabilities; returns them as ``float32`` numpy, or raises ValueError."""
    p = np.asarray(probs, np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"probs must be a non-empty 1-D sequence of per-layer probabilities, "
                         f"got shape {p.shape}")
    if num_layers is not None and p.size != num_layers:
        raise ValueError(f"probs has length {p.size} but the model has {num_layers} layers; "
                         f"pass one probability per layer")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or np.any(p > 1):
        raise ValueError("probs must lie in [0, 1]; use normalize_probs(scores, expected=...) "
                         "to turn scores into probabilities")
    if not np.any(p > 0):
        raise ValueError("probs are all zero, so no layer could ever be trained; give at least "
                         "one layer a positive probability")
    return p.astype(np.float32)


def normalize_probs(scores, expected: float, floor: float = 0.0) -> np.ndarray:
    """Per-layer probabilities from non-negative ``scores``: ``floor <= p <= 1``, ``sum(p) == expected``.

    Each layer gets ``floor`` plus a share of the remaining budget proportional to its score;
    layers that would exceed 1 are capped at 1 and their excess is redistributed among the
    others (water filling). Layers whose scores are all zero share leftover budget equally.
    So :func:`sample_bernoulli` with the result draws ``expected`` layers on average, and
    every layer has at least a ``floor`` chance per period.

    Args:
      scores: ``[L]`` non-negative finite scores (e.g. gradient norms per layer).
      expected: target ``sum(p)``, the mean number of active layers; ``0 < expected <= L``.
      floor: minimum probability per layer; ``0 <= floor <= expected / L``.

    Returns:
      ``float64`` numpy ``[L]``.

    >>> normalize_probs([1.0, 1.0, 8.0, 0.0], expected=2.0, floor=0.1).round(3).tolist()
    [0.45, 0.45, 1.0, 0.1]
    """
    s = np.asarray(scores, np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D array, got shape {s.shape}")
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError("scores must be finite and non-negative")
    n = s.size
    expected = float(expected)
    floor = float(floor)
    if not 0 < expected <= n:
        raise ValueError(f"expected={expected} must be in (0, {n}] (the number of layers)")
    if not 0 <= floor <= expected / n:
        raise ValueError(f"floor={floor} must be in [0, expected/L = {expected / n:g}]")
    p = np.full(n, floor)
    capped = np.zeros(n, bool)
    for _ in range(n + 1):
        free = ~capped
        budget = expected - capped.sum() - floor * free.sum()
        if budget <= 0 or not free.any():
            break
        w = np.where(free, s, 0.0)
        top = w.max()
        # Weights relative to the largest free score: their sum cannot overflow, and a
        # subnormal score keeps its share (budget times a subnormal rounds to a few ulps).
        w = w / top if top > 0 else free.astype(np.float64)  # all zero: equal shares
        p = np.where(capped, 1.0, floor + budget * (w / w.sum()))
        over = free & (p > 1.0)
        if not over.any():
            break
        capped |= over
    return np.clip(np.where(capped, 1.0, p), floor, 1.0)
