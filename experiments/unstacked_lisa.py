"""LISA's gradient on the PyTorch peer's layout: one array per layer weight (a measured prototype).

    python3 experiments/bench_step.py --one lisa_unstacked --gamma 2 --shape llama2-7b

``lisa_jax`` stores each layer weight as one ``[L, ...]`` array, so that the sampled layers are
one dynamic index away. On a GPU that layout costs XLA a copy of every layer's slice before each
cuBLAS or cuDNN call (`experiments/results/step_breakdown_h200/`). This prototype measures what
the other layout would give: the layers are a Python list, the loop over them is unrolled, and
since a list cannot be indexed by a traced layer number, the backward writes, for every layer,
what the weight gradients are contracted from into a ``G + 1``-slot buffer at the layer's slot
(frozen layers at the extra slot, overwritten each time); the sampled layers' weight gradients
are contracted from the buffer after the loop. Gathering the sampled layers for the optimizer and
writing them back happen on the host, which knows the sample (``maybe_resample`` style).

Not part of the library: checkpoints, sharding and the transform's in-graph resampling all assume
the stacked layout. ``tests/test_step.py`` checks these gradients against the library's.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lisa_jax.stack_vjp import _layer_backward, _layer_forward, weight_grads_from_parts


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def unstacked_stack(cfg, active_GxP, layers, slot_L, h_BxSxD, cos, sin):
    """All layers of the list ``layers``; differentiable in ``h`` and the ``G`` sampled layers
    (``active_GxP``, equal in value to ``layers`` at the sampled indices; ``slot_L`` as in
    ``lisa_jax.stack_vjp.lisa_stack``)."""
    return _forward(cfg, layers, h_BxSxD, cos, sin)[0]


def _forward(cfg, layers, h, cos, sin):
    saved = []
    for lp in layers:
        h, s = _layer_forward(cfg, lp, h, cos, sin, "none")
        saved.append(s)
    return h, saved


def _fwd(cfg, active_GxP, layers, slot_L, h, cos, sin):
    out, saved = _forward(cfg, layers, h, cos, sin)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), active_GxP)
    return out, (layers, slot_L, saved, cos, sin, shapes)


def _bwd(cfg, res, dy):
    layers, slot_L, saved, cos, sin, shapes = res
    G = jax.tree.leaves(shapes)[0].shape[0]
    buffers = None
    for layer in reversed(range(len(layers))):
        dy, parts = _layer_backward(cfg, layers[layer], saved[layer], cos, sin, dy, "none")
        if buffers is None:
            buffers = {k: jnp.zeros((G + 1,) + v.shape, v.dtype) for k, v in parts.items()}
        slot = jnp.where(slot_L[layer] >= 0, slot_L[layer], G)
        buffers = {k: jax.lax.dynamic_update_index_in_dim(buffers[k], parts[k], slot, 0)
                   for k in buffers}
    per_slot = [weight_grads_from_parts(cfg, layers[0], {k: v[j] for k, v in buffers.items()})
                for j in range(G)]
    grads = {name: jnp.stack([g[name] for g in per_slot]) for name in shapes}
    return grads, None, None, dy, None, None


unstacked_stack.defvjp(_fwd, _bwd)
