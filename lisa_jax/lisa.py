"""LISA as an optax transformation: train every non-layer leaf, and a sampled subset of layers.

``lisa(inner, ...)`` wraps a *per-leaf* optax transformation ``inner`` (typically
``optax.adamw(schedule)``; any whose update of a leaf depends on that leaf alone). Leaves whose path contains ``layers`` (default: the key
``"layers"``) are stacked along a leading layer axis ``L``; in each period of ``interval``
steps only the sampled layers of that axis are trained, all other leaves every step.

State layout (:class:`LisaState`)
---------------------------------
* ``count``  int32 ``[]``: global step (number of updates applied so far).
* ``key``    uint32 raw key data of the sampler key (``jax.random.key_data``), so checkpoints
  need no special handling; split once per resample (an ordered schedule keeps it: its
  windows are a function of the key and the period).
* ``period`` int32 ``[]``: the period ``count // interval`` that ``active`` was drawn for.
* ``active`` int32 ``[g]``: the sampled layer indices, sorted.
* ``slot_state``: ``jax.vmap(inner.init)`` of the *slot view* (layer leaves gathered at
  ``active``, leading axis ``g``). Each slot has its own count, so a newly sampled layer starts
  with zero moments and fresh bias correction, as if AdamW had just been created for it.
  Memory scales with ``g``, not ``L``.
* ``rest_state``: ``inner.init`` of the always-trained leaves (layer leaves, and the leaves
  ``frozen=`` names, replaced by ``None``: a frozen leaf has no state).

Samplers (``lisa_jax.sampling``): ``n_active=γ`` is ``sampler=Uniform(γ)``; ``Weighted(γ, w)``
(OwLore) and ``Ordered(γ, order)`` (BAdam-style) draw a fixed count inside ``jit`` too;
``probs=p`` is ``Bernoulli(p)``, drawn on the host (below).

Module-level sampling
---------------------
``granularity="attn_mlp"`` or ``"matrix"`` (or ``groups={name: leaf names}``) samples modules
instead of whole layers (MISA-style): every layer leaf belongs to one module group
(``block.MODULE_GROUPS``: a layer's attention and MLP, or each weight matrix with the norms and
biases beside it), and each group draws its own ``n_active`` layers every period, uniformly.
``active`` is then ``[N, γ]`` (row ``n``: group ``n``'s sorted layers) and ``slot_state`` a tuple
of ``N`` slot states, group ``n``'s being ``vmap(inner.init)`` of its leaves at its layers: the
state holds ``γ`` slices of each group's leaves (``γ`` layers' worth in all, as at layer
granularity), each module its own count, so a module kept across a resample keeps its moments
and one newly sampled starts fresh. A view's layer leaf is gathered at its group's layers. The
fast step's backward computes a weight gradient only where that (layer, module) is sampled
(``stack_vjp.lisa_layers_grouped``). Uniform sampling only; the default, ``"layer"``, keeps the
layer-level state (``active [g]``) and code paths.

Resampling and resets
---------------------
The first sample is drawn by ``init`` (period 0); a new one whenever ``count // interval``
moves past ``period``. With ``reset="sampled"`` a layer that stays active keeps its moments
(they move to its new slot), a newly sampled layer gets a fresh ``inner.init`` state, and the
always-trained leaves keep theirs. With ``reset="all"`` all moments restart every period.
"Moments" are the NamedTuple nodes of the inner state that hold a param-shaped field (e.g.
``ScaleByAdamState(count, mu, nu)``); every other node (e.g. ``ScaleByScheduleState.count``,
``InjectHyperparamsState.count``/``hyperparams``) is kept, so learning-rate schedules follow
the global step and never restart.

``inner`` must be per-leaf: it is run separately on the always-trained leaves and, under
``jax.vmap``, on each slot, so a statistic over several leaves would be taken per part.
Elementwise optimizers (AdamW, Lion), factored ones (Adafactor: per-matrix row and column
moments) and per-matrix ones (``optax.contrib.muon``) qualify; with ``n_active = L`` and no
resample ``lisa(inner)`` is ``inner`` on the model with one tree per layer
(``tests/test_lisa.py``). ``lisa`` refuses an ``inner`` holding a known cross-leaf optax
transformation (``CROSS_LEAF``: ``clip_by_global_norm``, line searches, L-BFGS, Prodigy,
D-Adaptation, ...): clip with ``clip_norm=`` or chain outside.

Clipping: ``lisa(..., clip_norm=c)`` clips by the global norm of the *trained* gradients (the
always-trained leaves and the sampled slices), which is what the fast step computes and what
LMFlow's LISA does. ``optax.chain(optax.clip_by_global_norm(c), lisa(...))`` clips by the norm
of the whole tree it is given instead: fed plain-autodiff gradients, that includes the frozen
layers' gradients (which LISA then drops), so it scales the trained gradients down further.

bfloat16 parameters: ``lisa(precision.master_weights(optax.adamw(lr)))`` updates the trained
view with float32 precision, keeping 16 extra bits for the always-trained leaves and the slots
only (``lisa_jax.precision``).

Contract for a fast train step
------------------------------
``tx.update(grads, state, params)`` is exactly::

    state = tx.prepare(state, params)        # resample if a period starts (in-graph, lax.cond)
    vg = tx.view(grads, state)               # layer leaves gathered at state.active -> [g, ...]
    vp = tx.view(params, state)
    vu, state = tx.update_view(vg, state, vp)   # inner on rest leaves, vmap(inner) on slots
    updates = tx.scatter(vu, state, like=grads) # full size, exactly 0 at frozen layers

A fast step (all inside one ``jax.jit``, fixed ``n_active``) calls ``tx.prepare`` first, then
builds ``vp = tx.view(params, state)``, computes the gradient w.r.t. ``vp`` only (no full-size
gradient tree), calls ``tx.update_view`` and writes the slices back with
``tx.apply_view(params, vu, state)`` (or its own ``.at[active]`` writes). ``update_view``
assumes ``state`` is prepared; ``prepare`` is idempotent. ``params`` passed to ``prepare``
only serve as the template (shapes, dtypes) for fresh ``inner.init`` states; grads work too.

Bernoulli mode (``probs=``): the number of active layers changes the state's shapes, so it
cannot be resampled inside ``jit``. Call ``maybe_resample(tx, opt_state, params)`` on the host
before each step (it finds the LisaState anywhere inside e.g. an ``optax.chain`` or
``optax.MultiSteps`` state; a no-op within a period). Eager (untraced) ``tx.update`` does this
itself. A jitted step compiles once per distinct active count; if it sees a state that was not
prepared at a period boundary it raises at run time. ``maybe_resample(..., probs=p)`` draws
with ``p`` instead of the configured probabilities (adaptive importance sampling).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lisa_jax import sampling

__all__ = ["LisaState", "LisaTransformation", "lisa", "active_layers", "maybe_resample",
           "check_per_leaf", "CROSS_LEAF"]

RESET_MODES = ("sampled", "all")


class LisaState(NamedTuple):
    """State of :func:`lisa`; see the module docstring."""

    count: jax.Array
    key: jax.Array
    period: jax.Array
    active: jax.Array
    slot_state: Any
    rest_state: Any


@dataclasses.dataclass(frozen=True, eq=False)
class _Config:
    inner: optax.GradientTransformation
    pred: Callable[[Any, Any], bool]
    layers_desc: str
    n_active: int | None
    probs: np.ndarray | None
    interval: int
    key: Any  # int seed, typed PRNG key or raw uint32 key data, as given
    key_impl: Any  # PRNG implementation of the sampler key (None: the default)
    reset: str
    clip_norm: float | None = None
    sampler: Any = None  # a lisa_jax.sampling.Sampler
    frozen: Callable[[Any, Any], bool] | None = None
    frozen_desc: str = ""
    # Module-level sampling: ((group, leaf names), ...), or None (whole layers).
    groups: tuple[tuple[str, tuple[str, ...]], ...] | None = None
    granularity: str = "layer"


# ----------------------------------------------------------------------------- tree helpers

def _key_name_pred(name: str):
    def pred(path, leaf):
        for k in path:
            for attr in ("key", "name"):
                if getattr(k, attr, None) == name:
                    return True
        return False
    return pred


def _split(cfg: _Config, tree):
    """(leaves, mask, treedef) of a params-like tree; the mask is True at a layer leaf, False
    at an always-trained one and None at a frozen one (``frozen=``)."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    mask = [True if cfg.pred(p, x) else
            None if cfg.frozen is not None and cfg.frozen(p, x) else False
            for p, x in with_path]
    return [x for _, x in with_path], mask, treedef


def _part(treedef, leaves, mask, want_layers: bool, fn=lambda x: x):
    """The tree with only layer (or only non-layer) leaves kept (mapped by fn), others None."""
    return treedef.unflatten([fn(x) if m == want_layers else None for x, m in zip(leaves, mask)])


def _none_or_masked(x):
    return x is None or isinstance(x, optax.MaskedNode)


def _param_shaped(x, ptd) -> bool:
    try:
        return jax.tree_util.tree_structure(x, is_leaf=_none_or_masked) == ptd
    except Exception:  # pragma: no cover - exotic nodes
        return False


def _is_namedtuple(x) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _walk(fresh, old, rest, ptd, on_param, on_other, on_master):
    """Rebuild an inner state: NamedTuple nodes with a param-shaped field go to ``on_param``
    (fresh, old); the field a NamedTuple class names as its ``WEIGHTS_FIELD`` (weights, not
    moments, e.g. ``precision.MasterWeightsState.remainder``: never reset) to ``on_master``
    (fresh, old), its other fields walked on; everything else to ``on_other`` (fresh, old,
    rest) at its leaves/subtrees."""
    walk = lambda f, o, r: _walk(f, o, r, ptd, on_param, on_other, on_master)  # noqa: E731
    weights = getattr(type(fresh), "WEIGHTS_FIELD", None) if _is_namedtuple(fresh) else None
    if weights is not None:
        return type(fresh)(*(on_master(f, o) if name == weights else walk(f, o, r)
                             for name, f, o, r in zip(fresh._fields, fresh, old, rest)))
    if _param_shaped(fresh, ptd):  # a bare param-shaped subtree: moments too
        return on_param(fresh, old)
    if _is_namedtuple(fresh):
        if any(_param_shaped(f, ptd) for f in fresh):
            return on_param(fresh, old)
        return type(fresh)(*(walk(f, o, r) for f, o, r in zip(fresh, old, rest)))
    if isinstance(fresh, (tuple, list)):
        return type(fresh)(walk(f, o, r) for f, o, r in zip(fresh, old, rest))
    if isinstance(fresh, dict):
        return type(fresh)((k, walk(fresh[k], old[k], rest[k])) for k in fresh)
    return on_other(fresh, old, rest)


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _wrap_key(cfg: _Config, data):
    return jax.random.wrap_key_data(data, impl=cfg.key_impl)


def _first_key(cfg: _Config):
    key = cfg.key
    if isinstance(key, (int, np.integer)):
        return jax.random.key(int(key), impl=cfg.key_impl)
    if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32), impl=cfg.key_impl)


# ----------------------------------------------------------------------------- per-leaf inner

# optax transformations whose update takes a statistic over several leaves (a global norm, dot
# products over the tree, a line search or a scalar step size estimated from all of them).
# Inside ``lisa`` the always-trained leaves and each slot are updated apart, so such a
# statistic would be taken per part: ``lisa`` refuses them as ``inner``.
CROSS_LEAF = frozenset({
    "clip_by_global_norm", "per_example_global_norm_clip", "normalize_by_update_norm",
    "scale_by_lbfgs", "lbfgs", "scale_by_polyak", "polyak_sgd", "scale_by_zoom_linesearch",
    "scale_by_backtracking_linesearch", "differentially_private_aggregate", "dpsgd", "prodigy",
    "dadapt_adamw", "mechanize", "scale_by_dog", "scale_by_dowg",
    "sam", "normalize", "momo", "momo_adam", "hutchinson_estimator_diag_hessian"})


def _cross_leaf_parts(obj, seen, depth=0):
    """Names of ``CROSS_LEAF`` optax functions reachable from ``obj`` through closures,
    containers and partials (how optax combinators hold the transformations they wrap)."""
    if depth > 40 or id(obj) in seen:
        return []
    seen.add(id(obj))
    found = []
    if callable(obj) and hasattr(obj, "__qualname__"):
        head = obj.__qualname__.split(".")[0]
        if head in CROSS_LEAF and str(getattr(obj, "__module__", "")).startswith("optax"):
            found.append(head)
    children = []
    if isinstance(obj, (tuple, list)):
        children = list(obj)
    elif isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, functools.partial):
        children = [obj.func, *obj.args, *obj.keywords.values()]
    elif callable(obj):
        children = [c.cell_contents for c in (getattr(obj, "__closure__", None) or ())
                    if _has_contents(c)] + [getattr(obj, "__wrapped__", None)]
    for child in children:
        if child is not None and (callable(child) or isinstance(child, (tuple, list, dict))):
            found += _cross_leaf_parts(child, seen, depth + 1)
    return found


def _has_contents(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


def check_per_leaf(inner) -> None:
    """Raise a one-line ``ValueError`` if ``inner`` holds a known cross-leaf optax
    transformation (``CROSS_LEAF``, e.g. ``optax.clip_by_global_norm``).

    ``lisa`` runs ``inner`` on the always-trained leaves and on each slot apart, so it takes any
    transformation whose update of a leaf depends on that leaf's gradient, parameter and state
    alone (AdamW, Lion, Adafactor's factored moments, Muon's per-matrix orthogonalization);
    a statistic over several leaves would be taken per part. The check finds the known ones
    through optax's combinators (chain, masked, inject_hyperparams, ...); a transformation of
    your own that takes one must stay outside ``lisa`` likewise.
    """
    found = sorted(set(_cross_leaf_parts(inner, set())))
    if not found:
        return
    name = found[0]
    if name in ("clip_by_global_norm", "per_example_global_norm_clip"):
        fix = ("clip with lisa(..., clip_norm=c) (the norm of the trained gradients; the "
               "trainer's --clip-norm) or outside: optax.chain(optax.clip_by_global_norm(c), "
               "lisa(...))")
    else:
        fix = "chain it outside lisa, or use a per-leaf transformation as inner"
    raise ValueError(f"inner holds optax.{name}, which takes a statistic over several leaves; "
                     f"lisa updates the always-trained leaves and each sampled layer apart, so "
                     f"it would be taken per part: {fix}")


# ----------------------------------------------------------------------------- core

def _num_layers(cfg: _Config, leaves, mask) -> int:
    sizes = {}
    for x, m in zip(leaves, mask):
        if m:
            shape = tuple(x.shape) if isinstance(x, jax.ShapeDtypeStruct) else np.shape(x)
            if len(shape) == 0:
                raise ValueError(f"a leaf selected by layers={cfg.layers_desc} is a scalar; layer "
                                 f"leaves need a leading layer axis L")
            sizes.setdefault(shape[0], shape)
    if not sizes:
        raise ValueError(f"no parameter leaf matches layers={cfg.layers_desc}; pass "
                         f"layers=<a key name in the stacked layer leaves' paths> or a callable "
                         f"(path, leaf) -> bool")
    if len(sizes) > 1:
        raise ValueError(f"layer leaves have different leading sizes {sorted(sizes)}; every leaf "
                         f"selected by layers={cfg.layers_desc} must be stacked along a leading "
                         f"layer axis of one size L")
    return int(next(iter(sizes)))


def _next(cfg: _Config, key, period, num_layers: int):
    """``(key to store, active)`` for ``period`` from the typed key ``key``."""
    if cfg.probs is not None:  # Bernoulli, maybe with probabilities given to maybe_resample
        return sampling.Bernoulli(cfg.probs).next(key, period, num_layers)
    return cfg.sampler.next(key, period, num_layers)


def _check_config_against(cfg: _Config, num_layers: int):
    cfg.sampler.check(num_layers)


def _checked_num_layers(cfg: _Config, leaves, mask, treedef) -> int:
    """The layer count of a split tree, after the checks every ``init`` makes of it."""
    if treedef.num_nodes == 1:
        raise ValueError("params must be a pytree container (e.g. a dict), not a bare array; "
                         "wrap it, e.g. {'layers': array}")
    num_layers = _num_layers(cfg, leaves, mask)
    _check_config_against(cfg, num_layers)
    if cfg.frozen is not None and None not in mask:
        raise ValueError(f"no leaf outside the layers matches frozen={cfg.frozen_desc}; pass "
                         f"frozen=<key names of leaves that stay fixed> or a callable")
    return num_layers


def _init(cfg: _Config, params):
    if cfg.groups is not None:  # module-level sampling
        return _grouped_init(cfg, params)
    if cfg.probs is not None and any(_is_traced(x) for x in jax.tree.leaves(params)):
        raise ValueError("lisa(probs=...).init runs on the host (the number of sampled layers "
                         "sets the state's shapes); call it outside jax.jit / jax.eval_shape")
    leaves, mask, treedef = _split(cfg, params)
    num_layers = _checked_num_layers(cfg, leaves, mask, treedef)
    key_next, active = _next(cfg, _first_key(cfg), jnp.zeros([], jnp.int32), num_layers)
    slot_view = _part(treedef, leaves, mask, True, lambda x: x[active])
    return LisaState(
        count=jnp.zeros([], jnp.int32),
        key=jax.random.key_data(key_next),
        period=jnp.zeros([], jnp.int32),
        active=active,
        slot_state=jax.vmap(cfg.inner.init)(slot_view),
        rest_state=cfg.inner.init(_part(treedef, leaves, mask, False)),
    )


def _rest_state_after_resample(cfg: _Config, state: LisaState, treedef, leaves, mask):
    """The always-trained leaves' state at a resample: kept, unless ``reset="all"`` (then
    fresh moments; counts and schedule state kept)."""
    rest_state = state.rest_state
    if cfg.reset != "all":
        return rest_state
    rest_params = _part(treedef, leaves, mask, False)
    rest_ptd = jax.tree_util.tree_structure(rest_params, is_leaf=_none_or_masked)
    return _walk(cfg.inner.init(rest_params), rest_state, rest_state, rest_ptd,
                 lambda f, o: f, lambda f, o, r: o, lambda f, o: o)


def _resample_now(cfg: _Config, state: LisaState, params) -> LisaState:
    """Draw the next active set (unconditionally) and carry/reset the inner states."""
    if cfg.groups is not None:  # module-level sampling
        return _grouped_resample_now(cfg, state, params)
    leaves, mask, treedef = _split(cfg, params)
    num_layers = _num_layers(cfg, leaves, mask)
    period = (state.count // cfg.interval).astype(jnp.int32)
    key_next, new_active = _next(cfg, _wrap_key(cfg, state.key), period, num_layers)
    g_old, g_new = state.active.shape[0], new_active.shape[0]

    rest_state = _rest_state_after_resample(cfg, state, treedef, leaves, mask)

    slot_view = _part(treedef, leaves, mask, True, lambda x: _rows(x, new_active))
    slot_ptd = jax.tree_util.tree_structure(slot_view, is_leaf=_none_or_masked)
    fresh = jax.vmap(cfg.inner.init)(slot_view)

    if g_old > 0 and g_new > 0:
        # A layer sampled again in the next period moves from its old slot to its new one.
        eq = new_active[:, None] == state.active[None, :]
        kept, src = eq.any(axis=1), jnp.argmax(eq, axis=1)

        def carry(f_node, o_node):
            def one(f, o):
                k = kept.reshape((-1,) + (1,) * (f.ndim - 1))
                return jnp.where(k, o[src], f).astype(f.dtype)
            return jax.tree.map(one, f_node, o_node)
    else:
        def carry(f_node, o_node):
            return f_node

    def on_param(f_node, o_node):  # moments: carried for kept layers unless reset="all"
        return carry(f_node, o_node) if cfg.reset == "sampled" else f_node

    if g_old == g_new:
        def on_other(f, o, r):  # counts of schedules, hyperparams, ...: unchanged
            return o
    else:  # probs mode, new slot count: take them from the always-trained leaves' state
        def on_other(f, o, r):
            return jax.tree.map(lambda x: jnp.broadcast_to(x, (g_new,) + jnp.shape(x)), r)

    slot_state = _walk(fresh, state.slot_state, rest_state, slot_ptd, on_param, on_other, carry)
    return LisaState(
        count=state.count,
        key=jax.random.key_data(key_next),
        period=period,
        active=new_active,
        slot_state=slot_state,
        rest_state=rest_state,
    )


def _rows(x, active):
    """``x[active]``; zeros of that shape for a ``jax.ShapeDtypeStruct`` template leaf."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jnp.zeros((active.shape[0],) + tuple(x.shape[1:]), x.dtype)
    return x[active]


def _due(cfg: _Config, state: LisaState):
    return state.count // cfg.interval != state.period


def _prepare(cfg: _Config, state: LisaState, params) -> LisaState:
    traced = _is_traced(state.count) or _is_traced(state.period)
    if not traced and not bool(_due(cfg, state)):
        return state
    if cfg.probs is not None:
        if traced:  # shapes can't change under jit: the state must come prepared (host-side)
            return state
        return _resample_now(cfg, state, params)
    if not traced:
        return _resample_now(cfg, state, params)
    if cfg.reset == "all":  # the always-trained leaves' moments restart too
        return jax.lax.cond(_due(cfg, state), lambda s: _resample_now(cfg, s, params),
                            lambda s: s, state)
    # A resample changes the sampler and the slots only. The always-trained leaves' state
    # (embedding and head moments: the larger part at LLaMA shapes) stays outside the cond,
    # which would otherwise hold a second copy of it through the whole step.
    rest = state.rest_state

    def resample(s):
        return _resample_now(cfg, s._replace(rest_state=rest), params)._replace(rest_state=None)
    out = jax.lax.cond(_due(cfg, state), resample, lambda s: s, state._replace(rest_state=None))
    return out._replace(rest_state=rest)


def _raise_unprepared(count, period):
    raise RuntimeError(
        f"lisa(probs=...): step {int(count)} starts a new period but the state still holds the "
        f"sample of period {int(period)}; call lisa_jax.maybe_resample(tx, opt_state, params) "
        f"outside jax.jit before each step")


def _view(cfg: _Config, tree, state: LisaState):
    if tree is None:
        return None
    if cfg.groups is not None:  # module-level sampling
        return _grouped_view(cfg, tree, state)
    leaves, mask, treedef = _split(cfg, tree)
    return treedef.unflatten([x[state.active] if m else None if m is None else x
                              for x, m in zip(leaves, mask)])


def _update_view(cfg: _Config, view_grads, state: LisaState, view_params=None):
    if cfg.groups is not None:  # module-level sampling
        return _grouped_update_view(cfg, view_grads, state, view_params)
    if cfg.probs is not None and _is_traced(state.count):
        jax.lax.cond(_due(cfg, state),
                     lambda: jax.debug.callback(_raise_unprepared, state.count, state.period),
                     lambda: None)
    if cfg.clip_norm:
        view_grads = optax.clip_by_global_norm(cfg.clip_norm).update(
            view_grads, optax.EmptyState())[0]
    leaves, mask, treedef = _split(cfg, view_grads)
    p_leaves = (treedef.flatten_up_to(view_params) if view_params is not None
                else [None] * len(leaves))
    rest_u, rest_state = cfg.inner.update(
        _part(treedef, leaves, mask, False), state.rest_state,
        None if view_params is None else _part(treedef, p_leaves, mask, False))
    slot_u, slot_state = jax.vmap(cfg.inner.update)(
        _part(treedef, leaves, mask, True), state.slot_state,
        None if view_params is None else _part(treedef, p_leaves, mask, True))
    ru, su = treedef.flatten_up_to(rest_u), treedef.flatten_up_to(slot_u)
    updates = treedef.unflatten([s if m else r for r, s, m in zip(ru, su, mask)])
    new_state = state._replace(count=optax.safe_int32_increment(state.count),
                               slot_state=slot_state, rest_state=rest_state)
    return updates, new_state


def _scatter(cfg: _Config, view_updates, state: LisaState, like):
    if cfg.groups is not None:  # module-level sampling
        return _grouped_scatter(cfg, view_updates, state, like)
    like_leaves, mask, treedef = _split(cfg, like)
    out = []
    for u, l, m in zip(treedef.flatten_up_to(view_updates), like_leaves, mask):
        if m is None:  # frozen: no update was computed
            u = jnp.zeros(jnp.shape(l), l.dtype)
        elif m:
            u = jnp.zeros(jnp.shape(l), u.dtype).at[state.active].set(
                u, indices_are_sorted=True, unique_indices=True)
        out.append(u)
    return treedef.unflatten(out)


def _apply_view(cfg: _Config, params, view_updates, state: LisaState):
    if cfg.groups is not None:  # module-level sampling
        return _grouped_apply_view(cfg, params, view_updates, state)
    leaves, mask, treedef = _split(cfg, params)
    u_leaves = treedef.flatten_up_to(view_updates)
    out = []
    for p, u, m in zip(leaves, u_leaves, mask):
        if m is None or u is None:  # frozen
            out.append(p)
        elif m:
            rows = (p[state.active] + u).astype(p.dtype)
            out.append(p.at[state.active].set(rows, indices_are_sorted=True,
                                              unique_indices=True))
        else:
            out.append(jnp.asarray(p + u).astype(p.dtype))
    return treedef.unflatten(out)


def _update(cfg: _Config, grads, state: LisaState, params=None):
    state = _prepare(cfg, state, params if params is not None else grads)
    view_updates, state = _update_view(cfg, _view(cfg, grads, state), state,
                                       _view(cfg, params, state))
    return _scatter(cfg, view_updates, state, grads), state


# ----------------------------------------------------------------------------- module groups
# Module-level sampling (``granularity=`` / ``groups=``): every layer leaf belongs to one
# group; group ``n`` samples its own ``γ`` layers (``active[n]``) and has its own slots
# (``slot_state[n]``: ``vmap(inner.init)`` of its leaves at those layers), so a module kept
# across a resample keeps its moments and count while a newly sampled one starts fresh, and
# the state holds ``γ`` slices of each group's leaves: ``γ`` layers' worth in all.


def _split_groups(cfg: _Config, tree):
    """``_split``'s ``(leaves, mask, treedef)`` and each leaf's group index (None outside
    the layers), or a one-line ValueError for a layer leaf in no group."""
    with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
    leaves, mask, treedef = _split(cfg, tree)
    gidx = []
    for (path, _), m in zip(with_path, mask):
        if not m:
            gidx.append(None)
            continue
        keys = {getattr(k, attr, None) for k in path for attr in ("key", "name")}
        found = [n for n, (_, names) in enumerate(cfg.groups) if keys & set(names)]
        if not found:
            raise ValueError(
                f"layer leaf {jax.tree_util.keystr(path)} is in no module group of "
                f"{_groups_desc(cfg)}; pass groups={{name: (leaf names, ...)}} naming every "
                f"layer leaf, or granularity='layer'")
        gidx.append(found[0])
    return leaves, mask, treedef, gidx


def _groups_desc(cfg: _Config) -> str:
    if cfg.granularity != "layer":
        return f"granularity={cfg.granularity!r}"
    return "groups=" + repr({g: names for g, names in cfg.groups})


def _gpart(treedef, leaves, mask, gidx, n: int, fn=lambda x: x):
    """The tree with only group ``n``'s layer leaves kept (mapped by fn), others None."""
    return treedef.unflatten([fn(x) if m and g == n else None
                              for x, m, g in zip(leaves, mask, gidx)])


def _grouped_next(cfg: _Config, key, period, num_layers: int):
    """``(key to store, active [N, γ])``: one uniform draw per group from one split of the
    state's key (one group draws with the key a layer-level draw takes, so that it samples
    what whole-layer LISA samples)."""
    key_next, draw = jax.random.split(key)
    keys = jax.random.split(draw, len(cfg.groups)) if len(cfg.groups) > 1 else [draw]
    return key_next, jnp.stack([cfg.sampler.draw(keys[n], period, num_layers)
                                for n in range(len(cfg.groups))])


def _grouped_init(cfg: _Config, params):
    leaves, mask, treedef, gidx = _split_groups(cfg, params)
    num_layers = _checked_num_layers(cfg, leaves, mask, treedef)
    empty = [g for n, (g, _) in enumerate(cfg.groups) if n not in gidx]
    if empty:
        raise ValueError(f"module group {empty[0]!r} of {_groups_desc(cfg)} holds no layer "
                         f"leaf; name leaves the layers have, or drop the group")
    key_next, active = _grouped_next(cfg, _first_key(cfg), jnp.zeros([], jnp.int32),
                                     num_layers)
    slot_state = tuple(
        jax.vmap(cfg.inner.init)(_gpart(treedef, leaves, mask, gidx, n,
                                        lambda x, n=n: x[active[n]]))
        for n in range(len(cfg.groups)))
    return LisaState(
        count=jnp.zeros([], jnp.int32),
        key=jax.random.key_data(key_next),
        period=jnp.zeros([], jnp.int32),
        active=active,
        slot_state=slot_state,
        rest_state=cfg.inner.init(_part(treedef, leaves, mask, False)),
    )


def _grouped_resample_now(cfg: _Config, state: LisaState, params) -> LisaState:
    """``_resample_now`` per group: a module sampled again moves to its new slot with its
    moments (``reset="sampled"``), a newly sampled one starts fresh."""
    leaves, mask, treedef, gidx = _split_groups(cfg, params)
    num_layers = _num_layers(cfg, leaves, mask)
    period = (state.count // cfg.interval).astype(jnp.int32)
    key_next, new_active = _grouped_next(cfg, _wrap_key(cfg, state.key), period, num_layers)

    rest_state = _rest_state_after_resample(cfg, state, treedef, leaves, mask)

    slot_states = []
    for n in range(len(cfg.groups)):
        old_a, new_a = state.active[n], new_active[n]
        slot_view = _gpart(treedef, leaves, mask, gidx, n, lambda x: _rows(x, new_a))
        slot_ptd = jax.tree_util.tree_structure(slot_view, is_leaf=_none_or_masked)
        eq = new_a[:, None] == old_a[None, :]
        kept, src = eq.any(axis=1), jnp.argmax(eq, axis=1)

        def carry(f_node, o_node, kept=kept, src=src):
            def one(f, o):
                k = kept.reshape((-1,) + (1,) * (f.ndim - 1))
                return jnp.where(k, o[src], f).astype(f.dtype)
            return jax.tree.map(one, f_node, o_node)

        def on_param(f_node, o_node, carry=carry):
            return carry(f_node, o_node) if cfg.reset == "sampled" else f_node
        slot_states.append(_walk(jax.vmap(cfg.inner.init)(slot_view), state.slot_state[n],
                                 rest_state, slot_ptd, on_param, lambda f, o, r: o, carry))
    return LisaState(count=state.count, key=jax.random.key_data(key_next), period=period,
                     active=new_active, slot_state=tuple(slot_states), rest_state=rest_state)


def _grouped_view(cfg: _Config, tree, state: LisaState):
    leaves, mask, treedef, gidx = _split_groups(cfg, tree)
    return treedef.unflatten([x[state.active[g]] if m else None if m is None else x
                              for x, m, g in zip(leaves, mask, gidx)])


def _grouped_update_view(cfg: _Config, view_grads, state: LisaState, view_params=None):
    if cfg.clip_norm:
        view_grads = optax.clip_by_global_norm(cfg.clip_norm).update(
            view_grads, optax.EmptyState())[0]
    leaves, mask, treedef, gidx = _split_groups(cfg, view_grads)
    p_leaves = (treedef.flatten_up_to(view_params) if view_params is not None
                else [None] * len(leaves))
    rest_u, rest_state = cfg.inner.update(
        _part(treedef, leaves, mask, False), state.rest_state,
        None if view_params is None else _part(treedef, p_leaves, mask, False))
    out = treedef.flatten_up_to(rest_u)
    slot_states = []
    for n in range(len(cfg.groups)):
        u, st = jax.vmap(cfg.inner.update)(
            _gpart(treedef, leaves, mask, gidx, n), state.slot_state[n],
            None if view_params is None else _gpart(treedef, p_leaves, mask, gidx, n))
        slot_states.append(st)
        out = [s if m and g == n else r
               for r, s, m, g in zip(out, treedef.flatten_up_to(u), mask, gidx)]
    new_state = state._replace(count=optax.safe_int32_increment(state.count),
                               slot_state=tuple(slot_states), rest_state=rest_state)
    return treedef.unflatten(out), new_state


def _grouped_scatter(cfg: _Config, view_updates, state: LisaState, like):
    like_leaves, mask, treedef, gidx = _split_groups(cfg, like)
    out = []
    for u, l, m, g in zip(treedef.flatten_up_to(view_updates), like_leaves, mask, gidx):
        if m is None:
            u = jnp.zeros(jnp.shape(l), l.dtype)
        elif m:
            u = jnp.zeros(jnp.shape(l), u.dtype).at[state.active[g]].set(
                u, indices_are_sorted=True, unique_indices=True)
        out.append(u)
    return treedef.unflatten(out)


def _grouped_apply_view(cfg: _Config, params, view_updates, state: LisaState):
    leaves, mask, treedef, gidx = _split_groups(cfg, params)
    out = []
    for p, u, m, g in zip(leaves, treedef.flatten_up_to(view_updates), mask, gidx):
        if m is None or u is None:
            out.append(p)
        elif m:
            rows = (p[state.active[g]] + u).astype(p.dtype)
            out.append(p.at[state.active[g]].set(rows, indices_are_sorted=True,
                                                 unique_indices=True))
        else:
            out.append(jnp.asarray(p + u).astype(p.dtype))
    return treedef.unflatten(out)


# ----------------------------------------------------------------------------- public API

class LisaTransformation(optax.GradientTransformation):
    """``optax.GradientTransformation`` (``init``, ``update``) returned by :func:`lisa`, with the
    pieces of ``update`` exposed for a fast train step: ``prepare``, ``view``, ``update_view``,
    ``scatter``, ``apply_view``; and ``maybe_resample`` for Bernoulli mode."""

    def __new__(cls, init, update, config: _Config):
        self = super().__new__(cls, init, update)
        self.config = config
        return self

    def __getnewargs__(self):
        return (self.init, self.update, self.config)

    def prepare(self, state: LisaState, params) -> LisaState:
        """Resample if ``state.count`` starts a new period (``lax.cond`` under jit, fixed shapes
        for ``n_active``); otherwise return ``state``. Idempotent. ``params``: full-size tree
        (or grads) used as template for fresh inner states. Its layer leaves may be
        ``jax.ShapeDtypeStruct``s ``[L, ...]`` (a step whose layers are not stacked): fresh
        states are then ``inner.init`` of zeros, the same for every optimizer whose state
        starts from the shapes alone (AdamW, SGD with momentum, Lion, ...)."""
        return _prepare(self.config, state, params)

    def view(self, tree, state: LisaState):
        """``tree`` with every layer leaf gathered at ``state.active`` (leading dim ``g``)."""
        return _view(self.config, tree, state)

    def update_view(self, view_grads, state: LisaState, view_params=None):
        """``(view_updates, new_state)``: ``inner`` on the always-trained leaves and
        ``vmap(inner.update)`` on the slots; increments ``count``. ``state`` must be prepared."""
        return _update_view(self.config, view_grads, state, view_params)

    def scatter(self, view_updates, state: LisaState, like):
        """Full-size updates shaped like ``like``: layer slices at ``state.active`` from
        ``view_updates``, exactly 0 at frozen layers."""
        return _scatter(self.config, view_updates, state, like)

    def apply_view(self, params, view_updates, state: LisaState):
        """``optax.apply_updates(params, scatter(view_updates, ...))`` touching only the active
        layer slices."""
        return _apply_view(self.config, params, view_updates, state)

    def maybe_resample(self, opt_state, params, probs=None):
        """Host-side: prepare every LisaState inside ``opt_state`` (see :func:`maybe_resample`;
        ``probs`` overrides the configured probabilities for a draw made now)."""
        return maybe_resample(self, opt_state, params, probs)


def lisa(
    inner: optax.GradientTransformation,
    *,
    n_active: int | None = None,
    probs=None,
    interval: int = 20,
    key=0,
    layers: str | Callable[[Any, Any], bool] = "layers",
    reset: str = "sampled",
    clip_norm: float | None = None,
    sampler: sampling.Sampler | None = None,
    frozen: str | tuple[str, ...] | Callable[[Any, Any], bool] | None = None,
    granularity: str = "layer",
    groups: dict[str, tuple[str, ...]] | None = None,
) -> LisaTransformation:
    """LISA: train all non-layer leaves, and a sampled subset of the stacked layers, with ``inner``.

    Args:
      inner: an elementwise optax transformation, e.g. ``optax.adamw(schedule)``, or
        ``precision.master_weights(...)`` of one for bfloat16 parameters.
        Per-slot ``inner`` sees one layer's slice (no layer axis), so a callable weight-decay
        mask like ``lambda p: jax.tree.map(lambda x: x.ndim > 1, p)`` exempts the norms.
      n_active: number of layers trained per period, drawn uniformly without replacement.
      probs: per-layer probabilities ``[L]``; each layer is drawn independently (the count
        varies; may be 0). Host-side resampling: see :func:`maybe_resample`. At most one of
        ``n_active``/``probs``; with neither, ``n_active=2``.
      interval: steps per period ``K``; resampled at step 0, K, 2K, ...
      key: int seed or PRNG key of the sampler; the run's sequence of samples depends only on it.
      layers: a key name anywhere in a leaf's path, or a callable ``(path, leaf) -> bool`` (it
        must not depend on the leading layer size: it is also applied to the ``[g, ...]`` views).
        Selected leaves are stacked along a leading axis ``L``; every other leaf is always trained.
      reset: ``"sampled"`` (a newly sampled layer starts fresh, kept layers and always-trained
        leaves keep their moments) or ``"all"`` (every moment restarts each period). Schedules
        follow the global step either way.
      clip_norm: clip by the global norm of the trained gradients (see the module docstring);
        ``None`` or 0: no clipping.
      sampler: a ``lisa_jax.sampling.Sampler`` instead of ``n_active``/``probs``:
        ``Uniform(n)`` (what ``n_active=n`` means), ``Weighted(n, weights)`` (``n`` layers
        without replacement by weight: OwLore, ``importance.owl_weights``), ``Ordered(n,
        order)`` (BAdam-style: the next ``n`` layers of an ascending, descending or
        per-cycle reshuffled order each period) or ``Bernoulli(probs)`` (what ``probs``
        means). Every sampler but Bernoulli draws a fixed count inside ``jit``.
      frozen: leaves outside the layers that do not train (a key name, several, or a callable
        ``(path, leaf) -> bool``), e.g. ``("embed",)``: they get no ``inner`` state, an update
        of exactly zero, and ``None`` in ``view`` (so a fast step takes no gradient for them).
        Default: every leaf outside the layers trains every step.
      granularity: what is sampled: ``"layer"`` (whole layers, the default), or module groups
        of the Llama-family layer (MISA-style; ``block.MODULE_GROUPS``): ``"attn_mlp"`` (the
        attention and the MLP of a layer apart) or ``"matrix"`` (each weight matrix, with the
        norms and biases beside it). Each group samples its own ``n_active`` layers every
        period, uniformly; ``active`` is then ``[N, n_active]`` (one row per group) and the
        slots' state is one per group, ``n_active`` slices of each group's leaves.
      groups: module groups of your own instead, ``{name: (leaf key names, ...)}``: every
        layer leaf's path must hold a name of exactly one group.

    Returns:
      A :class:`LisaTransformation`, usable anywhere an ``optax.GradientTransformation`` is.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lisa_jax
      >>> params = {"embed": jnp.ones((4, 2)), "layers": {"w": jnp.ones((6, 2, 2))}}
      >>> tx = lisa_jax.lisa(optax.adamw(1e-2), n_active=2, interval=3, key=0)
      >>> state = tx.init(params)
      >>> active = lisa_jax.active_layers(state)
      >>> active.shape, active.dtype.name
      ((2,), 'int32')
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = jax.jit(tx.update)(grads, state, params)
      >>> moved = jnp.flatnonzero((updates["layers"]["w"] != 0).any(axis=(1, 2)))
      >>> moved.tolist() == active.tolist(), bool((updates["embed"] != 0).all())
      (True, True)
      >>> params = optax.apply_updates(params, updates)
    """
    if n_active is not None and probs is not None:
        raise ValueError("pass either n_active (uniform sampling) or probs (Bernoulli per layer), "
                         "not both")
    if sampler is not None:
        if n_active is not None or probs is not None:
            raise ValueError("pass either sampler=... or n_active/probs (shorthands for "
                             "sampling.Uniform(n_active) and sampling.Bernoulli(probs)), not both")
        if not isinstance(sampler, sampling.Sampler):
            raise ValueError(f"sampler must be a lisa_jax.sampling.Sampler (Uniform, Weighted, "
                             f"Ordered, Bernoulli), got {type(sampler).__name__}")
        if isinstance(sampler, sampling.Bernoulli):
            probs = sampler.probs
        else:
            n_active = sampler.n_active
    check_per_leaf(inner)
    if reset not in RESET_MODES:
        raise ValueError(f"unknown reset={reset!r}; use one of {', '.join(RESET_MODES)}")
    if isinstance(interval, bool) or not isinstance(interval, (int, np.integer)) or interval < 1:
        raise ValueError(f"interval={interval!r} must be an int >= 1 (steps per sampling period)")
    if probs is not None:
        probs = sampling.check_probs(probs)
        if sampler is None:
            sampler = sampling.Bernoulli(probs)
    else:
        if n_active is None:
            n_active = 2
        if isinstance(n_active, bool) or not isinstance(n_active, (int, np.integer)) \
                or n_active < 1:
            raise ValueError(f"n_active={n_active!r} must be an int >= 1 (and <= L)")
        n_active = int(n_active)
        if sampler is None:
            sampler = sampling.Uniform(n_active)
    if isinstance(layers, str):
        pred, desc = _key_name_pred(layers), repr(layers)
    elif callable(layers):
        pred, desc = layers, getattr(layers, "__name__", "<callable>")
    else:
        raise ValueError(f"layers must be a key name or a callable (path, leaf) -> bool, "
                         f"got {type(layers).__name__}")
    key_impl = None
    if not isinstance(key, (int, np.integer)):
        if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
            key_impl = jax.random.key_impl(key)
        elif jnp.shape(key) != (2,):
            raise ValueError("key must be an int seed, a jax.random.key(...) or a raw "
                             "jax.random.PRNGKey(...)")
    if clip_norm is not None and not clip_norm >= 0:
        raise ValueError(f"clip_norm={clip_norm!r} must be >= 0 (0 or None: no clipping)")
    frozen_pred, frozen_desc = None, ""
    if frozen is not None:
        names = (frozen,) if isinstance(frozen, str) else frozen
        if callable(names):
            frozen_pred, frozen_desc = names, getattr(names, "__name__", "<callable>")
        elif isinstance(names, (tuple, list)) and all(isinstance(n, str) for n in names):
            preds = [_key_name_pred(n) for n in names]
            frozen_pred = lambda path, leaf: any(f(path, leaf) for f in preds)  # noqa: E731
            frozen_desc = repr(tuple(names))
        else:
            raise ValueError(f"frozen must be a key name, a tuple of them or a callable (path, "
                             f"leaf) -> bool, got {type(frozen).__name__}")
    group_table = _check_groups(granularity, groups, sampler)
    cfg = _Config(inner=inner, pred=pred, layers_desc=desc, n_active=n_active, probs=probs,
                  interval=int(interval), key=key, key_impl=key_impl, reset=reset,
                  clip_norm=float(clip_norm) if clip_norm else None, sampler=sampler,
                  frozen=frozen_pred, frozen_desc=frozen_desc, groups=group_table,
                  granularity=granularity)

    def init(params):
        return _init(cfg, params)

    def update(updates, state, params=None):
        return _update(cfg, updates, state, params)

    return LisaTransformation(init, update, cfg)


def _check_groups(granularity, groups, sampler):
    """The module groups of ``granularity``/``groups`` as ``((name, leaf names), ...)``, None
    for whole layers; a one-line ValueError for a bad value or a sampler other than uniform."""
    from lisa_jax import block
    if granularity not in block.GRANULARITIES:
        raise ValueError(f"unknown granularity={granularity!r}; use one of "
                         f"{', '.join(block.GRANULARITIES)} (or groups={{name: leaf names}})")
    if groups is not None and granularity != "layer":
        raise ValueError(f"pass either granularity={granularity!r} or groups=..., not both")
    if groups is None and granularity == "layer":
        return None
    if groups is None:
        table = block.MODULE_GROUPS[granularity]
    else:
        if not isinstance(groups, dict) or not groups or not all(
                isinstance(g, str) and isinstance(names, (tuple, list)) and names
                and all(isinstance(n, str) for n in names) for g, names in groups.items()):
            raise ValueError("groups must be a non-empty dict {group name: (leaf key names, "
                             "...)}, each group naming at least one leaf")
        table = tuple((g, tuple(names)) for g, names in groups.items())
        seen = {}
        for g, names in table:
            for n in names:
                if n in seen:
                    raise ValueError(f"leaf {n!r} is in module groups {seen[n]!r} and {g!r}; "
                                     f"name each leaf in one group")
                seen[n] = g
    if type(sampler) is not sampling.Uniform:
        how = "probs=" if isinstance(sampler, sampling.Bernoulli) else \
            f"sampler={type(sampler).__name__}"
        raise ValueError(f"module-level sampling draws each group's layers uniformly "
                         f"(n_active=γ); {how} works at granularity='layer' only: drop it, "
                         f"or sample whole layers")
    return table


def _lisa_states_map(fn, opt_state):
    return jax.tree.map(lambda s: fn(s) if isinstance(s, LisaState) else s, opt_state,
                        is_leaf=lambda s: isinstance(s, LisaState))


def active_layers(state) -> jax.Array:
    """Sorted ``int32`` indices of the layers sampled for the current period (module-level
    sampling: ``[N, γ]``, one row per module group).

    ``state`` is a :class:`LisaState` or any optimizer state containing one (chain, MultiSteps).
    """
    found = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, LisaState))
             if isinstance(s, LisaState)]
    if not found:
        raise ValueError("no LisaState in this optimizer state; pass the state of lisa(...)")
    return found[0].active


def maybe_resample(tx: LisaTransformation, opt_state, params, probs=None):
    """Host-side preparation before a (jitted) step; needed in Bernoulli (``probs``) mode.

    Replaces every :class:`LisaState` inside ``opt_state`` (e.g. within ``optax.chain`` or
    ``optax.MultiSteps`` states) by its prepared version: at a period boundary the Bernoulli
    sample is drawn from the state's key and the state gets the new shapes (moments carried or
    reset as documented); otherwise it is returned unchanged. Also fine for ``n_active``.

    ``probs``: per-layer probabilities ``[L]`` used instead of the ones given to ``lisa(probs=
    ...)`` for a draw made by this call (adaptive importance sampling: the probabilities may
    change from period to period). Only for a Bernoulli-mode ``tx``; the draw still consumes
    the state's key, so a run is reproducible from its seed and its sequence of ``probs``.
    Without a draw (within a period) ``probs`` is unused.
    """
    cfg = tx.config
    if probs is not None:
        if cfg.probs is None:
            raise ValueError("maybe_resample(..., probs=...) needs a transformation made with "
                             "lisa(probs=...) (Bernoulli mode); this one samples n_active "
                             "layers uniformly")
        cfg = dataclasses.replace(cfg, probs=sampling.check_probs(probs, cfg.probs.shape[0]))
    return _lisa_states_map(lambda s: _prepare(cfg, s, params), opt_state)
