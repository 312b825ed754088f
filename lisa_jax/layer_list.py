"""The per-layer parameter layout: ``params["layers"]`` as a tuple of ``L`` per-layer trees.

The library's canonical layout stacks each layer weight into one ``[L, ...]`` array (checkpoints,
the HF mapping, sharding rules and the LISA transform's full-tree ``update`` use it). On a GPU
that layout has a price in a train step: XLA copies a layer's slice out of the stack before
every cuBLAS or cuDNN call that reads it (about a tenth of a LLaMA-2-7B LISA step on an H200,
``experiments/results/step_breakdown_h200/``). With one array per layer weight there is
nothing to copy; the loop over the layers is unrolled instead, and the sampled layers, which a
list cannot index by a traced number, are reached through ``lax.switch``/``lax.cond``.

    >>> import jax, jax.numpy as jnp
    >>> params = {"embed": jnp.zeros((5, 2)), "layers": {"w": jnp.arange(3.0)[:, None]}}
    >>> per_layer = unstack(params)
    >>> [float(lp["w"][0]) for lp in per_layer["layers"]]
    [0.0, 1.0, 2.0]
    >>> gather(per_layer["layers"], jnp.array([2, 0]))["w"][:, 0].tolist()
    [2.0, 0.0]
    >>> bool((stack(per_layer)["layers"]["w"] == params["layers"]["w"]).all())
    True
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

Params = Any


def is_per_layer(params: Params) -> bool:
    """Whether ``params["layers"]`` is a sequence of per-layer trees (not stacked arrays)."""
    return isinstance(params.get("layers"), (list, tuple))


def unstack(params: Params, donate: bool = False) -> Params:
    """``params`` with each stacked layer leaf split into ``L`` per-layer arrays.

    ``donate``: free each stacked leaf once it is split (the caller must not use the stacked
    tree again), so that the conversion needs one leaf's memory more, not the layers' twice.
    """
    if is_per_layer(params):
        return params
    stacked = params["layers"]
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    leaves, treedef = jax.tree.flatten(stacked)
    split = []
    for x in leaves:
        split.append([x[i] for i in range(num_layers)])
        if donate and isinstance(x, jax.Array):
            jax.block_until_ready(split[-1])
            x.delete()
    layers = tuple(treedef.unflatten([s[i] for s in split]) for i in range(num_layers))
    return {**params, "layers": layers}


def stack(params: Params, donate: bool = False) -> Params:
    """The canonical layout again: every layer weight stacked into one ``[L, ...]`` array.

    ``donate``: free each layer's arrays of a leaf once that leaf is stacked (the caller must
    not use the per-layer tree again)."""
    if not is_per_layer(params):
        return params
    layers = params["layers"]
    treedef = jax.tree.structure(layers[0])
    per_leaf = zip(*(treedef.flatten_up_to(lp) for lp in layers))
    stacked = []
    for xs in per_leaf:
        stacked.append(jnp.stack(xs))
        if donate:
            jax.block_until_ready(stacked[-1])
            for x in xs:
                if isinstance(x, jax.Array):
                    x.delete()
    return {**params, "layers": treedef.unflatten(stacked)}


def stacked_shapes(layers: Sequence[Params]) -> Params:
    """``jax.ShapeDtypeStruct`` of each stacked leaf ``[L, ...]`` (a template for
    ``LisaTransformation.prepare``)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((len(layers),) + x.shape, x.dtype),
                        layers[0])


def gathered_shapes(layers: Sequence[Params], num_slots: int) -> Params:
    """``jax.ShapeDtypeStruct`` of each leaf of ``gather(layers, <num_slots indices>)``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((num_slots,) + x.shape, x.dtype),
                        layers[0])


def stacked_template(params: Params) -> Params:
    """``params`` as the LISA transform's ``prepare``/``maybe_resample`` take it: per-layer
    trees replaced by ``stacked_shapes`` (stacked params are returned as they are)."""
    if not is_per_layer(params):
        return params
    return {**params, "layers": stacked_shapes(params["layers"])}


def gather(layers: Sequence[Params], active_G) -> Params:
    """The layers at the traced indices ``active_G``, stacked into ``[G, ...]`` leaves.

    One ``lax.switch`` over the layers per slot: each copies one layer, and only that one."""
    branches = [lambda i=i: layers[i] for i in range(len(layers))]
    rows = [jax.lax.switch(active_G[j], branches) for j in range(active_G.shape[0])]
    if not rows:
        return jax.tree.map(lambda x: jnp.zeros((0,) + x.shape, x.dtype), layers[0])
    return jax.tree.map(lambda *xs: jnp.stack(xs), *rows)


def write_back(layers: Sequence[Params], view_GxP: Params, slot_L) -> tuple:
    """``layers`` with layer ``l`` replaced by ``view_GxP``'s slot ``slot_L[l]`` where that is
    not -1 (under ``lax.cond``: a frozen layer is not read or written)."""
    if all(x.shape[0] == 0 for x in jax.tree.leaves(view_GxP)):  # no sampled layer
        return tuple(layers)
    def take(lp, view, slot):
        return jax.tree.map(
            lambda x, v: jax.lax.dynamic_index_in_dim(v, slot, 0, keepdims=False)
            .astype(x.dtype), lp, view)

    def keep(lp, view, slot):
        return lp
    return tuple(jax.lax.cond(slot_L[i] >= 0, take, keep, lp, view_GxP, slot_L[i])
                 for i, lp in enumerate(layers))
