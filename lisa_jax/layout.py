"""Where the layer weights live: stacked ``[L, ...]`` arrays, or one tree per layer.

``params["layers"]`` is either a dict of stacked leaves (the canonical layout: checkpoints,
the HF mapping, sharding rules and the LISA transform's full-tree ``update`` use it) or a tuple
of ``L`` per-layer trees. On a GPU the stacked layout has a price in a train step: XLA copies
a layer's slice out of the stack before every cuBLAS or cuDNN call that reads it; with one
array per layer weight there is nothing to copy, and the layer loop is unrolled instead.

Both layouts offer the same operations, so call sites never ask which one they hold:
``of(layers)`` gives the layout, and ``scan``, ``gather``, ``write_back``, ``template`` and the
LISA ``reverse`` pass work on either. ``convert`` is the one conversion between them. Module-level
sampling (module groups, each with its own sampled layers) has ``reverse_groups``,
``gather_groups`` and ``write_back_groups``.

    >>> import jax, jax.numpy as jnp
    >>> params = {"embed": jnp.zeros((5, 2)), "layers": {"w": jnp.arange(3.0)[:, None]}}
    >>> per_layer = convert(params, "per_layer")
    >>> [float(lp["w"][0]) for lp in per_layer["layers"]]
    [0.0, 1.0, 2.0]
    >>> of(per_layer["layers"]).gather(per_layer["layers"], jnp.array([0, 2]))["w"][:, 0].tolist()
    [0.0, 2.0]
    >>> bool((convert(per_layer, "stacked")["layers"]["w"] == params["layers"]["w"]).all())
    True
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from lisa_jax import block

Params = Any
LAYOUTS = ("stacked", "per_layer")


def _num_slots(shapes) -> int:
    leaves = jax.tree.leaves(shapes)
    return leaves[0].shape[0] if leaves else 0


class Stacked:
    """Every layer weight one ``[L, ...]`` array; loops are ``lax.scan``/``fori_loop``."""

    name = "stacked"

    def num_layers(self, layers) -> int:
        return jax.tree.leaves(layers)[0].shape[0]

    def at(self, layers, index):
        """Layer ``index`` (a traced number is fine) of ``layers`` or of per-layer outputs."""
        return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, 0, keepdims=False),
                            layers)

    def scan(self, fn: Callable, carry, layers, gather=None):
        """``fn(carry, (layer_params, index)) -> (carry, y)`` over the layers in order;
        ``(carry, ys)`` with ``ys`` stacked. ``gather``: a layer's parameters as the layer
        uses them (``sharding.StepShardings.layer_gather``: all-gathered over ``fsdp``), made
        one iteration ahead, so that the next layer's gather can run beside this layer."""
        L = self.num_layers(layers)
        if gather is None:
            return jax.lax.scan(fn, carry, (layers, jnp.arange(L)))

        def body(c, i):
            carry, lp = c
            ahead = gather(self.at(layers, jnp.minimum(i + 1, L - 1)))
            carry, y = fn(carry, (lp, i))
            return (carry, ahead), y
        (carry, _), ys = jax.lax.scan(body, (carry, gather(self.at(layers, 0))), jnp.arange(L))
        return carry, ys

    def template(self, layers):
        """``jax.ShapeDtypeStruct`` of every stacked leaf ``[L, ...]``."""
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), layers)

    def gather(self, layers, active_G):
        """The layers at the sorted indices ``active_G``, stacked into ``[G, ...]`` leaves."""
        return jax.tree.map(lambda x: x[active_G], layers)

    def write_back(self, layers, view_GxP, active_G):
        """``layers`` with the rows ``active_G`` replaced by ``view_GxP``'s slots."""
        return jax.tree.map(
            lambda x, v: x.at[active_G].set(v.astype(x.dtype), indices_are_sorted=True,
                                            unique_indices=True), layers, view_GxP)

    def to(self, layers, donate: bool = False):
        """``layers`` in this layout. ``donate``: free each source array once it is copied
        (the caller must not use ``layers`` again), so the conversion needs one leaf's memory
        more, not the layers' twice."""
        if not isinstance(layers, (list, tuple)):
            return layers
        treedef = jax.tree.structure(layers[0])
        stacked = []
        for xs in zip(*(treedef.flatten_up_to(lp) for lp in layers)):
            stacked.append(jnp.stack(xs))
            if donate:
                jax.block_until_ready(stacked[-1])
                for x in xs:
                    if isinstance(x, jax.Array):
                        x.delete()
        return treedef.unflatten(stacked)

    def reverse(self, cfg, remat, layers, saved, slot_L, shapes, dy, rope, mask=None,
                gather=None):
        """The LISA backward over all layers: ``(slot gradients [G, ...], dh)``.

        ``G + 1`` activation-only ``fori_loop``s split at the sampled layers; each sampled
        layer's backward, weight gradients included, runs once outside any loop with its slot
        known statically, so nothing is carried or selected per layer. Slot ``j`` holds the
        ``j``-th lowest sampled layer. ``gather``: as in :meth:`scan`, each layer's parameters
        gathered one layer ahead (carried through the loops).
        """
        G, L = _num_slots(shapes), slot_L.shape[0]
        # With gather, the loops carry the next layer down already gathered (layer 0 again at
        # the bottom, unused); without, they carry nothing and slice each layer where used.
        def ahead(layer):  # what the loops carry for the layer below ``layer``
            return None if gather is None else \
                gather(self.at(layers, jnp.maximum(layer - 1, 0)))

        def params(lp, layer):  # the parameters of ``layer``, given what was carried
            return self.at(layers, layer) if gather is None else lp
        first = None if gather is None else gather(self.at(layers, L - 1))

        def down(dh, lp, hi, lo):  # layers hi-1 .. lo, activation gradient only
            # One layer per iteration: two per iteration keep both layers' temporaries alive
            # at the peak for little time saved (experiments/results/).
            def body(i, c):
                dh, lp = c
                layer = hi - 1 - i
                nxt = ahead(layer)
                dh = block.layer_backward(cfg, params(lp, layer), self.at(saved, layer), rope,
                                          dh, remat, layer=layer, mask_BxSxS=mask)[0]
                return dh, nxt
            return jax.lax.fori_loop(0, hi - lo, body, (dh, lp))

        dh, lp, hi, per_slot = dy, first, jnp.int32(L), [None] * G
        for j in reversed(range(G)):
            layer = jnp.argmax(slot_L == j).astype(jnp.int32)
            dh, lp = down(dh, lp, hi, layer + 1)
            nxt = ahead(layer)
            dh, per_slot[j] = block.layer_backward(cfg, params(lp, layer),
                                                   self.at(saved, layer), rope, dh, remat,
                                                   weight_grads=True, layer=layer,
                                                   mask_BxSxS=mask)
            lp, hi = nxt, layer
        dh, _ = down(dh, lp, hi, jnp.int32(0))
        if not G:
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), dh
        return jax.tree.map(lambda *gs: jnp.stack(gs), *per_slot), dh

    def reverse_groups(self, cfg, remat, layers, saved, slot_NxL, groups, shapes, dy, rope,
                       mask=None):
        """The module-level LISA backward: ``(slot gradients [G, ...], dh)``.

        One ``fori_loop`` down the layers: each layer's activation backward, then per module
        group a ``lax.cond`` on the group's slot of that layer (``slot_NxL[n, l]``) computing
        that group's weight gradients alone (``block.weight_grads_from_parts(names=...)``)
        into its slot buffer; a layer with no group sampled computes no weight gradient."""
        L = slot_NxL.shape[1]
        grads = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def body(i, carry):
            dh, grads = carry
            layer = L - 1 - i
            lp = self.at(layers, layer)
            dh, parts = block.layer_backward(cfg, lp, self.at(saved, layer), rope, dh, remat,
                                             layer=layer, mask_BxSxS=mask)
            return dh, _write_groups(cfg, grads, parts, lp, slot_NxL[:, layer], groups, rope,
                                     layer)
        dh, grads = jax.lax.fori_loop(0, L, body, (dy, grads))
        return grads, dh


class PerLayer:
    """``L`` per-layer trees; loops are unrolled, a traced layer index is reached through
    ``lax.switch``/``lax.cond``."""

    name = "per_layer"

    def num_layers(self, layers) -> int:
        return len(layers)

    def scan(self, fn: Callable, carry, layers, gather=None):
        ys = []
        for i, lp in enumerate(layers):  # unrolled: XLA orders the gathers
            carry, y = fn(carry, (gather(lp) if gather else lp, i))
            ys.append(y)
        return carry, tuple(ys)

    def template(self, layers):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct((len(layers),) + x.shape, x.dtype),
                            layers[0])

    def gather(self, layers, active_G):
        """One ``lax.switch`` over the layers per slot: each copies one layer, only that."""
        branches = [lambda i=i: layers[i] for i in range(len(layers))]
        rows = [jax.lax.switch(active_G[j], branches) for j in range(active_G.shape[0])]
        if not rows:
            return jax.tree.map(lambda x: jnp.zeros((0,) + x.shape, x.dtype), layers[0])
        return jax.tree.map(lambda *xs: jnp.stack(xs), *rows)

    def write_back(self, layers, view_GxP, active_G):
        """Layer ``l`` replaced by its slot where it holds one (under ``lax.cond``: a frozen
        layer is neither read nor written)."""
        if not active_G.shape[0]:
            return tuple(layers)
        slot_L = slot_of_layer(active_G, len(layers))

        def take(lp, view, slot):
            return jax.tree.map(
                lambda x, v: jax.lax.dynamic_index_in_dim(v, slot, 0, keepdims=False)
                .astype(x.dtype), lp, view)

        def keep(lp, view, slot):
            return lp
        return tuple(jax.lax.cond(slot_L[i] >= 0, take, keep, lp, view_GxP, slot_L[i])
                     for i, lp in enumerate(layers))

    def to(self, layers, donate: bool = False):
        if isinstance(layers, (list, tuple)):
            return tuple(layers)
        num_layers = jax.tree.leaves(layers)[0].shape[0]
        leaves, treedef = jax.tree.flatten(layers)
        split = []
        for x in leaves:
            split.append([x[i] for i in range(num_layers)])
            if donate and isinstance(x, jax.Array):
                jax.block_until_ready(split[-1])
                x.delete()
        return tuple(treedef.unflatten([s[i] for s in split]) for i in range(num_layers))

    def reverse(self, cfg, remat, layers, saved, slot_L, shapes, dy, rope, mask=None,
                gather=None):
        """The LISA backward, unrolled: every layer's activation backward, and its weight
        gradients under ``lax.cond`` on its slot, written into the ``G``-slot buffer."""
        grads = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        has_slots = _num_slots(shapes) > 0

        def write(grads, parts, lp, slot, layer):
            g = block.weight_grads_from_parts(cfg, lp, parts, rope, layer)
            return {name: jax.lax.dynamic_update_index_in_dim(grads[name], g[name], slot, 0)
                    for name in grads}

        def skip(grads, parts, lp, slot, layer):
            return grads
        for layer in reversed(range(len(layers))):
            lp = gather(layers[layer]) if gather else layers[layer]
            # The unrolled program lets XLA schedule any layer's recompute early, all of them
            # alive at once; the barrier makes each layer wait for its output cotangent.
            saved_l, dy = jax.lax.optimization_barrier((saved[layer], dy))
            dy, parts = block.layer_backward(cfg, lp, saved_l, rope, dy, remat, layer=layer,
                                             mask_BxSxS=mask)
            if has_slots:
                grads = jax.lax.cond(slot_L[layer] >= 0, functools.partial(write, layer=layer),
                                     functools.partial(skip, layer=layer), grads, parts, lp,
                                     slot_L[layer])
        return grads, dy

    def reverse_groups(self, cfg, remat, layers, saved, slot_NxL, groups, shapes, dy, rope,
                       mask=None):
        """The module-level LISA backward, unrolled: every layer's activation backward, and per
        module group a ``lax.cond`` on the group's slot of that layer computing that group's
        weight gradients alone into its slot buffer. A layer with some groups sampled computes
        the weight GEMMs of those groups only."""
        grads = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        for layer in reversed(range(len(layers))):
            lp = layers[layer]
            saved_l, dy = jax.lax.optimization_barrier((saved[layer], dy))
            dy, parts = block.layer_backward(cfg, lp, saved_l, rope, dy, remat, layer=layer,
                                             mask_BxSxS=mask)
            grads = _write_groups(cfg, grads, parts, lp, slot_NxL[:, layer], groups, rope,
                                  layer)
        return grads, dy


def _write_groups(cfg, grads, parts, lp, slot_N, groups, rope, layer):
    """``grads`` (slot buffers ``[G, ...]`` by leaf name) with one layer's weight gradients
    written for each group ``n`` holding it (``slot_N[n] >= 0``), under one ``lax.cond`` per
    group: an unsampled group of the layer costs no weight GEMM."""
    grads = dict(grads)
    for n, names in enumerate(groups):
        if not names or not grads[names[0]].shape[0]:
            continue

        def write(sub, parts, lp, slot, names=names):
            g = block.weight_grads_from_parts(cfg, lp, parts, rope, layer, names=names)
            return {name: jax.lax.dynamic_update_index_in_dim(sub[name], g[name], slot, 0)
                    for name in sub}

        def skip(sub, parts, lp, slot):
            return sub
        sub = {name: grads[name] for name in names}
        grads.update(jax.lax.cond(slot_N[n] >= 0, write, skip, sub, parts, lp, slot_N[n]))
    return grads


STACKED, PER_LAYER = Stacked(), PerLayer()
_BY_NAME = {STACKED.name: STACKED, PER_LAYER.name: PER_LAYER}


def of(layers):
    """The layout ``layers`` (``params["layers"]``) is in."""
    return PER_LAYER if isinstance(layers, (list, tuple)) else STACKED


def convert(params: Params, name: str, donate: bool = False) -> Params:
    """``params`` with its layers in layout ``name`` ("stacked" or "per_layer")."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown layer layout {name!r}; use one of {', '.join(LAYOUTS)}")
    return {**params, "layers": _BY_NAME[name].to(params["layers"], donate)}


def stacked_template(params: Params) -> Params:
    """``params`` with its layers as ``jax.ShapeDtypeStruct``s ``[L, ...]``: the full-size
    tree the LISA transform's ``prepare``/``maybe_resample`` take, in either layout."""
    return {**params, "layers": of(params["layers"]).template(params["layers"])}


def per_layer_template(params: Params) -> Params:
    """``params`` with its layers as one tree of ``jax.ShapeDtypeStruct``s per layer: the
    shapes a step on the per-layer layout takes (its shardings on a mesh, say)."""
    full = stacked_template(params)["layers"]
    num_layers = jax.tree.leaves(full)[0].shape[0]
    one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), full)
    return {**params, "layers": (one,) * num_layers}


def slot_of_layer(active_G, num_layers: int):
    """``[L]`` int32: the slot holding each layer, -1 where the layer is frozen. For module
    groups' indices ``active_NxG``: ``[N, L]``, one row per group."""
    if active_G.ndim == 2:
        return jax.vmap(lambda a: slot_of_layer(a, num_layers))(active_G)
    slots = jnp.full((num_layers,), -1, jnp.int32)
    return slots.at[active_G].set(jnp.arange(active_G.shape[0], dtype=jnp.int32))


def group_names(groups, layers) -> tuple[tuple[str, ...], ...]:
    """Per module group (``lisa``'s ``(name, leaf names)`` pairs), the names of its leaves
    that ``layers`` (either layout) holds."""
    present = of(layers).template(layers).keys()
    return tuple(tuple(n for n in names if n in present) for _, names in groups)


def _sub(layers, names):
    if isinstance(layers, (list, tuple)):
        return tuple({n: lp[n] for n in names} for lp in layers)
    return {n: layers[n] for n in names}


def gather_groups(layers, active_NxG, names):
    """Module-level ``gather``: each group's leaves (``names[n]``) at its own sorted layer
    indices ``active_NxG[n]``; one dict of ``[G, ...]`` leaves."""
    lay, out = of(layers), {}
    for n, group in enumerate(names):
        if group:
            out.update(lay.gather(_sub(layers, group), active_NxG[n]))
    return out


def write_back_groups(layers, view_GxP, active_NxG, names):
    """Module-level ``write_back``: each group's leaves written at its own layers (a frozen
    module is neither read nor written in the per-layer layout)."""
    lay = of(layers)
    if lay is STACKED:
        out = dict(layers)
        for n, group in enumerate(names):
            if group:
                out.update(lay.write_back(_sub(layers, group), _sub(view_GxP, group),
                                          active_NxG[n]))
        return out
    out = [dict(lp) for lp in layers]
    for n, group in enumerate(names):
        if group:
            for lp, new in zip(out, lay.write_back(_sub(layers, group), _sub(view_GxP, group),
                                                   active_NxG[n])):
                lp.update(new)
    return tuple(out)
