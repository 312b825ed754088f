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

Shapes: B batch, S sequence, D hidden, L layers, G active slots (γ).
"""
from __future__ import annotations

import functools

import jax

from lisa_jax import block, layout


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def lisa_layers(cfg, remat, active_GxP, layers, slot_L, h_BxSxD, cos, sin, mask=None):
    """Run all ``L`` layers; differentiable in ``h`` and in the ``G`` sampled slices only.

    ``active_GxP``: the sampled layers' parameters (each leaf ``[G, ...]``); only its shapes
    are read, the values come from ``layers`` (either layout). ``slot_L[l]`` is the slot of
    layer ``l`` or -1 when it is frozen. The cotangent of ``active_GxP`` holds the sampled
    layers' weight gradients; ``layers`` gets none. ``mask``: None (causal) or
    ``ops.Segments`` (packed rows).
    """
    return _forward(cfg, remat, layers, h_BxSxD, (cos, sin), mask)[0]


def _forward(cfg, remat, layers, h, rope, mask=None):
    def body(h, lp_and_index):
        lp, layer = lp_and_index
        return block.layer_forward(cfg, lp, h, rope, remat, layer, mask_BxSxS=mask)
    return layout.of(layers).scan(body, h, layers)


def _lisa_layers_fwd(cfg, remat, active_GxP, layers, slot_L, h, cos, sin, mask=None):
    out, saved = _forward(cfg, remat, layers, h, (cos, sin), mask)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), active_GxP)
    return out, (layers, slot_L, saved, cos, sin, shapes, mask)


def _lisa_layers_bwd(cfg, remat, res, dy):
    layers, slot_L, saved, cos, sin, shapes, mask = res
    grads, dh = layout.of(layers).reverse(cfg, remat, layers, saved, slot_L, shapes, dy,
                                          (cos, sin), mask)
    return grads, None, None, dh, None, None, None


lisa_layers.defvjp(_lisa_layers_fwd, _lisa_layers_bwd)
