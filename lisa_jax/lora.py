"""LoRA adapters for the stacked Llama layers: the baseline LISA is compared with.

A ``LoraWeight`` stands in for a frozen weight ``w`` in the layer's parameter dict and computes
``x @ w + scale * (x @ a) @ b`` when the layer code writes ``x @ w``: JAX arrays defer ``@`` to an
operand type they do not know, so the model's layer functions run unchanged. Only ``a`` and
``b`` are differentiated, so no weight gradient of ``w`` is ever computed.

>>> import jax, jax.numpy as jnp
>>> w = jnp.ones((4, 3)); lw = LoraWeight(w, jnp.ones((4, 2)), jnp.zeros((2, 3)), 2.0)
>>> bool(jnp.allclose(jnp.ones((1, 4)) @ lw, jnp.ones((1, 4)) @ w))   # b starts at zero
True
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lisa_jax import block

DEFAULT_TARGETS = block.LORA_TARGETS


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraWeight:
    w: jax.Array
    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(metadata=dict(static=True), default=1.0)

    def __rmatmul__(self, x):
        return x @ self.w + self.scale * ((x @ self.a) @ self.b)


def init_lora(layers, key, rank: int, targets=DEFAULT_TARGETS, dtype=None):
    """Adapters ``{name: {"a": [L, in, r], "b": [L, r, out]}}`` for the target weights.

    ``a`` is Kaiming-uniform as in PEFT, ``b`` zero, so the adapted model starts equal to the
    base model.
    """
    unknown = [t for t in targets if t not in layers]
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; choose from {sorted(layers)}")
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    lora = {}
    for i, name in enumerate(targets):
        w = layers[name]
        L, d_in, d_out = w.shape
        bound = 1.0 / jnp.sqrt(d_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), (L, d_in, rank), jnp.float32,
                               -bound, bound)
        lora[name] = {"a": a.astype(dtype or w.dtype), "b": jnp.zeros((L, rank, d_out),
                                                                      dtype or w.dtype)}
    return lora


def lora_scale(rank: int, alpha: float | None) -> float:
    return (alpha if alpha is not None else 2.0 * rank) / rank


def apply_lora(layers, lora, scale: float):
    """The layer dict with each target weight wrapped in a ``LoraWeight``."""
    out = dict(layers)
    for name, ab in lora.items():
        out[name] = LoraWeight(layers[name], ab["a"], ab["b"], scale)
    return out


def merge_lora(params, lora, scale: float):
    """Parameters with the adapters folded into the base weights (for export)."""
    layers = dict(params["layers"])
    for name, ab in lora.items():
        w = layers[name]
        delta = jnp.einsum("lir,lro->lio", ab["a"].astype(jnp.float32),
                           ab["b"].astype(jnp.float32)) * scale
        layers[name] = (w.astype(jnp.float32) + delta).astype(w.dtype)
    return {**params, "layers": layers}
