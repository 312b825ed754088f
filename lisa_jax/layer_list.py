"""Transitional: the per-layer layout's old entry points, now ``lisa_jax.layout``'s."""
from lisa_jax import layout


def is_per_layer(params) -> bool:
    return layout.of(params.get("layers")) is layout.PER_LAYER


def unstack(params, donate: bool = False):
    return layout.convert(params, "per_layer", donate)


def stack(params, donate: bool = False):
    return layout.convert(params, "stacked", donate)


stacked_template = layout.stacked_template
