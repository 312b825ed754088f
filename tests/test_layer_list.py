"""lisa_jax.layer_list: the per-layer layout's conversions, gather and write-back."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lisa_jax import layer_list

L = 5


def stacked_params(seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return {"embed": jax.random.normal(k[0], (7, 3)),
            "layers": {"w": jax.random.normal(k[1], (L, 3, 4)),
                       "norm": jax.random.normal(k[2], (L, 3)).astype(jnp.bfloat16)}}


@pytest.mark.parametrize("donate", [False, True])
def test_unstack_then_stack_gives_the_same_arrays(donate):
    p = stacked_params()
    want = jax.tree.map(np.asarray, p)
    per_layer = layer_list.unstack(p, donate=donate)
    assert layer_list.is_per_layer(per_layer) and len(per_layer["layers"]) == L
    assert p["layers"]["w"].is_deleted() == donate
    again = layer_list.stack(per_layer, donate=donate)
    assert per_layer["layers"][0]["w"].is_deleted() == donate
    assert jax.tree.structure(again) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(want)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), b)


def test_stacked_template_has_the_stacked_shapes_and_no_values():
    per_layer = layer_list.unstack(stacked_params())
    t = layer_list.stacked_template(per_layer)
    assert t["layers"]["w"] == jax.ShapeDtypeStruct((L, 3, 4), jnp.float32)
    assert t["layers"]["norm"] == jax.ShapeDtypeStruct((L, 3), jnp.bfloat16)
    assert t["embed"] is per_layer["embed"]


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(0, L - 1), min_size=0, max_size=L, unique=True))
def test_gather_and_write_back_touch_exactly_the_sampled_layers(active):
    """Under jit with a traced sample: gather returns the sampled layers in slot order; the
    write-back puts slot j at layer active[j] and leaves every other layer as it was."""
    p = stacked_params()
    layers = layer_list.unstack(p)["layers"]
    active = jnp.asarray(sorted(active), jnp.int32)
    view = jax.jit(layer_list.gather)(layers, active)
    np.testing.assert_array_equal(view["w"], p["layers"]["w"][active])
    slot_L = jnp.full((L,), -1, jnp.int32).at[active].set(jnp.arange(active.shape[0]))
    new_view = jax.tree.map(lambda x: x + 1, view)
    out = jax.jit(layer_list.write_back)(layers, new_view, slot_L)
    for i in range(L):
        for name in ("w", "norm"):
            want = (p["layers"][name][i] + 1 if i in set(active.tolist())
                    else p["layers"][name][i])
            assert out[i][name].dtype == layers[i][name].dtype
            np.testing.assert_array_equal(out[i][name], want.astype(layers[i][name].dtype))
