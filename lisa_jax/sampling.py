"""Layer samplers for LISA: pure functions, and the sampler objects ``lisa(sampler=...)`` takes.

The sampling rules that pick which transformer layers are trained in a period:

* :func:`sample_uniform` -- exactly ``n_active`` of ``num_layers`` layers, uniformly without
  replacement (the LISA paper's rule). Fixed output shape, so it runs inside ``jax.jit``.
* :func:`sample_weighted` -- exactly ``n_active`` layers without replacement, layer ``l``
  drawn with weight ``weights[l]`` at each pick (``numpy.random.choice(L, n, replace=False,
  p=weights)``, what OwLore does with its outlier-ratio probabilities). Fixed shape, jittable.
* :func:`ordered_window` -- BAdam-style ordered schedules: period ``p`` trains the next
  ``n_active`` layers of an order of the ``L`` layers (``ascending``, ``descending``, or a
  ``reshuffle``: a fresh random permutation per cycle), a pure function of a key and ``p``.
* :func:`sample_bernoulli` -- each layer ``l`` independently with probability ``probs[l]``; the
  number drawn varies (its mean is :func:`expected_count`). The output shape depends on the draw,
  so it runs on the host; :func:`bernoulli_mask` is the jit-friendly boolean-mask form.

:func:`normalize_probs` turns per-layer importance scores into such probabilities: every layer
keeps at least ``floor`` (no layer starves), none exceeds 1, and they sum to ``expected``.

All samplers return sorted, unique ``int32`` layer indices.

The sampler objects (:class:`Uniform`, :class:`Weighted`, :class:`Ordered`, :class:`Bernoulli`)
wrap these rules for ``lisa_jax.lisa(inner, sampler=...)``: each says whether its count is
fixed (it then draws inside ``jax.jit``, and a step never recompiles across periods) and how it
uses the sampler key carried in the LISA state (:meth:`Sampler.next`).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["sample_uniform", "sample_weighted", "ordered_window", "cycle_periods",
           "sample_bernoulli", "bernoulli_mask", "expected_count", "normalize_probs",
           "check_probs", "check_weights", "Sampler", "Uniform", "Weighted", "Ordered",
           "Bernoulli", "ORDERS"]

# Orders of the ordered (BAdam-style) schedules.
ORDERS = ("reshuffle", "ascending", "descending")


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


def sample_weighted(key, weights, n_active: int) -> jax.Array:
    """``n_active`` distinct layers drawn without replacement by ``weights``, sorted ``int32``.

    Each pick takes layer ``l`` with probability proportional to ``weights[l]`` among the
    layers not yet picked (``numpy.random.choice(L, n_active, replace=False, p=weights)``);
    so a layer's chance of being in the sample grows with its weight but is not proportional
    to it. ``weights`` must have at least ``n_active`` positive entries (see
    :func:`check_weights`). Fixed-shape: usable under ``jax.jit``.

    >>> import jax
    >>> sample_weighted(jax.random.key(0), [0.5, 0.0, 0.5, 0.0], 2).tolist()
    [0, 2]
    """
    w = jnp.asarray(weights, jnp.float32)
    idx = jax.random.choice(key, w.shape[0], (int(n_active),), replace=False, p=w / w.sum())
    return jnp.sort(idx).astype(jnp.int32)


def cycle_periods(num_layers: int, n_active: int) -> int:
    """Periods of one cycle of an ordered schedule: ``ceil(L / n_active)``.

    >>> cycle_periods(8, 2), cycle_periods(7, 2)
    (4, 4)
    """
    return -(-int(num_layers) // int(n_active))


def ordered_window(key, period, num_layers: int, n_active: int, order: str) -> jax.Array:
    """The layers an ordered schedule trains in ``period``: sorted ``int32[n_active]``.

    A cycle is :func:`cycle_periods` periods. Cycle ``c = period // P`` lays the ``L`` layers
    out in an order (``ascending`` 0..L-1; ``descending`` L-1..0; ``reshuffle``:
    ``jax.random.permutation(fold_in(key, c), L)``, a new order each cycle) and period ``w =
    period % P`` of the cycle trains positions ``[w γ, w γ + γ)`` of it, the last window of a
    cycle being the last ``γ`` positions. So every layer trains in every cycle, each exactly
    once when ``γ`` divides ``L`` (otherwise the last window repeats ``γ - L mod γ`` layers of
    the one before), and a period always trains ``γ`` distinct layers (the fixed count
    ``jit`` needs). ``period`` may be traced; the result depends on ``key`` and ``period`` only.

    >>> import jax
    >>> [ordered_window(jax.random.key(0), p, 5, 2, "descending").tolist() for p in range(4)]
    [[3, 4], [1, 2], [0, 1], [3, 4]]
    """
    num_layers, n_active = int(num_layers), int(n_active)
    if not 1 <= n_active <= num_layers:
        raise ValueError(f"n_active={n_active} must be in [1, {num_layers}] (the number of layers)")
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; use one of {', '.join(ORDERS)}")
    per_cycle = cycle_periods(num_layers, n_active)
    period = jnp.asarray(period, jnp.int32)
    cycle, window = period // per_cycle, period % per_cycle
    if order == "ascending":
        seq = jnp.arange(num_layers, dtype=jnp.int32)
    elif order == "descending":
        seq = jnp.arange(num_layers - 1, -1, -1, dtype=jnp.int32)
    else:
        seq = jax.random.permutation(jax.random.fold_in(key, cycle), num_layers)
    start = jnp.minimum(window * n_active, num_layers - n_active)
    return jnp.sort(jax.lax.dynamic_slice_in_dim(seq, start, n_active)).astype(jnp.int32)


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


def _per_layer(values, num_layers: int | None, name: str, one: str, many: str) -> np.ndarray:
    """``values`` as a float64 vector of one entry per layer, or a ValueError naming ``name``."""
    v = np.asarray(values, np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of per-layer {many}, got "
                         f"shape {v.shape}")
    if num_layers is not None and v.size != num_layers:
        raise ValueError(f"{name} has length {v.size} but the model has {num_layers} layers; "
                         f"pass one {one} per layer")
    return v


def check_probs(probs, num_layers: int | None = None) -> np.ndarray:
    """Validate per-layer probabilities; returns them as ``float32`` numpy, or raises ValueError."""
    p = _per_layer(probs, num_layers, "probs", "probability", "probabilities")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or np.any(p > 1):
        raise ValueError("probs must lie in [0, 1]; use normalize_probs(scores, expected=...) "
                         "to turn scores into probabilities")
    if not np.any(p > 0):
        raise ValueError("probs are all zero, so no layer could ever be trained; give at least "
                         "one layer a positive probability")
    return p.astype(np.float32)


def check_weights(weights, n_active: int | None = None,
                  num_layers: int | None = None) -> np.ndarray:
    """Validate per-layer selection weights of :func:`sample_weighted`; returns them normalized
    to sum 1 (``float64`` numpy), or raises ValueError."""
    w = _per_layer(weights, num_layers, "weights", "weight", "weights")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and non-negative")
    if n_active is not None and np.count_nonzero(w) < n_active:
        raise ValueError(f"only {np.count_nonzero(w)} layers have a positive weight, fewer than "
                         f"the {n_active} drawn each period; lower the number of layers or give "
                         f"more layers weight")
    if not np.any(w > 0):
        raise ValueError("weights are all zero, so no layer could ever be trained")
    return w / w.sum()


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


# ----------------------------------------------------------------------------- sampler objects


class Sampler:
    """How ``lisa`` picks a period's layers (subclasses below; pass one as ``lisa(sampler=...)``).

    ``n_active``: the fixed number of layers per period (``None`` where it varies: then the
    draw runs on the host and a jitted step compiles once per count). ``splits_key``: whether
    each draw consumes the state's key (``(key', draw) = split(key)``), or the key stays the
    schedule's for the whole run and the draw depends on it and the period alone.
    """

    splits_key = True

    def check(self, num_layers: int) -> None:
        """Raise ``ValueError`` (one line) if the sampler cannot serve ``num_layers`` layers."""
        if self.n_active is not None and self.n_active > num_layers:
            raise ValueError(f"n_active={self.n_active} exceeds the number of layers "
                             f"L={num_layers}; pass n_active <= {num_layers}")

    def draw(self, key, period, num_layers: int):
        """The sorted layer indices of ``period`` from ``key`` (a typed PRNG key)."""
        raise NotImplementedError

    def next(self, key, period, num_layers: int):
        """``(key to store, layers)``: the state's key after the draw of ``period``, and the
        draw itself."""
        if not self.splits_key:
            return key, self.draw(key, period, num_layers)
        key_next, draw_key = jax.random.split(key)
        return key_next, self.draw(draw_key, period, num_layers)


def _check_count(n_active) -> int:
    if isinstance(n_active, bool) or not isinstance(n_active, (int, np.integer)) or n_active < 1:
        raise ValueError(f"n_active={n_active!r} must be an int >= 1 (and <= L)")
    return int(n_active)


@dataclasses.dataclass(frozen=True, eq=False)
class Uniform(Sampler):
    """``n_active`` of ``L`` layers uniformly without replacement (the LISA paper's rule)."""

    n_active: int = 2

    def __post_init__(self):
        object.__setattr__(self, "n_active", _check_count(self.n_active))

    def draw(self, key, period, num_layers):
        return sample_uniform(key, num_layers, self.n_active)


@dataclasses.dataclass(frozen=True, eq=False)
class Weighted(Sampler):
    """``n_active`` layers without replacement, by per-layer ``weights`` (:func:`sample_weighted`;
    OwLore's outlier-ratio sampling: ``lisa_jax.importance.owl_weights``)."""

    n_active: int
    weights: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "n_active", _check_count(self.n_active))
        object.__setattr__(self, "weights", check_weights(self.weights, self.n_active))

    def check(self, num_layers):
        super().check(num_layers)
        check_weights(self.weights, self.n_active, num_layers)

    def draw(self, key, period, num_layers):
        return sample_weighted(key, self.weights, self.n_active)


@dataclasses.dataclass(frozen=True, eq=False)
class Ordered(Sampler):
    """BAdam-style ordered schedule (:func:`ordered_window`): ``order`` is one of ``ORDERS``.

    The key is not split: the run's order depends on the key given to ``lisa`` and on the
    period alone, so a restored state continues the same cycle exactly."""

    n_active: int
    order: str = "reshuffle"
    splits_key = False

    def __post_init__(self):
        object.__setattr__(self, "n_active", _check_count(self.n_active))
        if self.order not in ORDERS:
            raise ValueError(f"unknown order {self.order!r}; use one of {', '.join(ORDERS)}")

    def draw(self, key, period, num_layers):
        return ordered_window(key, period, num_layers, self.n_active, self.order)


@dataclasses.dataclass(frozen=True, eq=False)
class Bernoulli(Sampler):
    """Each layer independently with probability ``probs[l]`` (:func:`sample_bernoulli`); the
    count varies, so it draws on the host."""

    probs: np.ndarray
    n_active: None = dataclasses.field(default=None, init=False)

    def __post_init__(self):
        object.__setattr__(self, "probs", check_probs(self.probs))

    def check(self, num_layers):
        if self.probs.shape[0] != num_layers:
            raise ValueError(f"probs has length {self.probs.shape[0]} but the model has "
                             f"L={num_layers} layers; pass one probability per layer")

    def draw(self, key, period, num_layers):
        return jnp.asarray(sample_bernoulli(key, self.probs), jnp.int32)
