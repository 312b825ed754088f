"""The layer stack with a backward that computes weight gradients only for the sampled layers.

Plain autodiff of a layer stack computes (or at least allocates) a weight gradient for every
layer, even when only γ of L layers train; masking the result afterwards costs as much as full
fine-tuning. ``lisa_layers`` is a ``jax.custom_vjp`` over the whole stack instead:

* forward: every layer, saving per layer only what its backward needs (``block.SAVED``);
* backward: the activation gradient through every layer, and the weight gradients of the
  sampled layers alone, written into a ``γ``-slot buffer; no ``L``-sized gradient exists.

The layer math is ``lisa_jax.block``'s stages, each differentiated with ``jax.vjp``; how the
reverse pass loops over the layers is the layout's (``lisa_jax.layout``: activation-only loops
between the sampled layers when stacked, one ``lax.cond`` per layer when unrolled).

Module-level sampling (``lisa(granularity=...)``) is ``lisa_layers_grouped``: each module
group (a set of a layer's leaves, e.g. attention and MLP, or one weight matrix each) has its
own sampled layers and slots. Its backward still propagates the activation gradient through
every layer; a layer whose groups are partly sampled computes the weight gradients of its
sampled groups only (one ``lax.cond`` per group on that group's slot of the layer, each writing
into its group's slot buffer), so no weight GEMM runs for an unsampled module.

Shapes: B batch, S sequence, D hidden, L layers, G active slots (γ), N module groups.
"""
from __future__ import annotations

import functools

import jax

from lisa_jax import block, layout


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 9))
def lisa_layers(cfg, remat, active_GxP, layers, slot_L, h_BxSxD, cos, sin, mask=None,
                gather=None):
    """Run all ``L`` layers; differentiable in ``h`` and in the ``G`` sampled slices only.

    ``active_GxP``: the sampled layers' parameters (each leaf ``[G, ...]``); only its shapes
    are read, the values come from ``layers`` (either layout). ``slot_L[l]`` is the slot of
    layer ``l`` or -1 when it is frozen. The cotangent of ``active_GxP`` holds the sampled
    layers' weight gradients; ``layers`` gets none. ``mask``: None (causal) or
    ``ops.Segments`` (packed rows). ``gather``: None, or a layer's parameters as its
    computation takes them, made a layer ahead in the forward and the backward
    (``sharding.StepShardings.layer_gather``: FSDP's all-gather issued early).
    """
    return _forward(cfg, remat, layers, h_BxSxD, (cos, sin), mask, gather)[0]


def _forward(cfg, remat, layers, h, rope, mask=None, gather=None):
    def body(h, lp_and_index):
        lp, layer = lp_and_index
        return block.layer_forward(cfg, lp, h, rope, remat, layer, mask_BxSxS=mask)
    return layout.of(layers).scan(body, h, layers, gather)


def _lisa_layers_fwd(cfg, remat, active_GxP, layers, slot_L, h, cos, sin, mask=None,
                     gather=None):
    out, saved = _forward(cfg, remat, layers, h, (cos, sin), mask, gather)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), active_GxP)
    return out, (layers, slot_L, saved, cos, sin, shapes, mask)


def _lisa_layers_bwd(cfg, remat, gather, res, dy):
    layers, slot_L, saved, cos, sin, shapes, mask = res
    grads, dh = layout.of(layers).reverse(cfg, remat, layers, saved, slot_L, shapes, dy,
                                          (cos, sin), mask, gather)
    return grads, None, None, dh, None, None, None


lisa_layers.defvjp(_lisa_layers_fwd, _lisa_layers_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def lisa_layers_grouped(cfg, remat, groups, active_GxP, layers, slot_NxL, h_BxSxD, cos, sin,
                        mask=None):
    """``lisa_layers`` with module groups: ``groups[n]`` names group ``n``'s leaves (a tuple of
    tuples, each leaf in one group; ``layout.group_names``), ``slot_NxL[n, l]`` the slot of
    layer ``l`` in group ``n`` or -1. ``active_GxP``'s leaf ``x`` is ``[G, ...]`` over the
    layers its group samples; its cotangent holds those weight gradients."""
    return _forward(cfg, remat, layers, h_BxSxD, (cos, sin), mask)[0]


def _grouped_fwd(cfg, remat, groups, active_GxP, layers, slot_NxL, h, cos, sin, mask=None):
    out, saved = _forward(cfg, remat, layers, h, (cos, sin), mask)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), active_GxP)
    return out, (layers, slot_NxL, saved, cos, sin, shapes, mask)


def _grouped_bwd(cfg, remat, groups, res, dy):
    layers, slot_NxL, saved, cos, sin, shapes, mask = res
    grads, dh = layout.of(layers).reverse_groups(cfg, remat, layers, saved, slot_NxL, groups,
                                                 shapes, dy, (cos, sin), mask)
    return grads, None, None, dh, None, None, None


lisa_layers_grouped.defvjp(_grouped_fwd, _grouped_bwd)
