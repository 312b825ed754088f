"""lisa_jax.layout: conversions between the layouts, and gather and write-back in each."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lisa_jax import layout

L = 5


def stacked_params(seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return {"embed": jax.random.normal(k[0], (7, 3)),
            "layers": {"w": jax.random.normal(k[1], (L, 3, 4)),
                       "norm": jax.random.normal(k[2], (L, 3)).astype(jnp.bfloat16)}}


@pytest.mark.parametrize("donate", [False, True])
def test_converting_to_per_layer_and_back_gives_the_same_arrays(donate):
    p = stacked_params()
    want = jax.tree.map(np.asarray, p)
    per_layer = layout.convert(p, "per_layer", donate=donate)
    assert layout.of(per_layer["layers"]) is layout.PER_LAYER and len(per_layer["layers"]) == L
    assert p["layers"]["w"].is_deleted() == donate
    again = layout.convert(per_layer, "stacked", donate=donate)
    assert layout.of(again["layers"]) is layout.STACKED
    assert per_layer["layers"][0]["w"].is_deleted() == donate
    assert jax.tree.structure(again) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(want)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), b)


def test_stacked_template_has_the_stacked_shapes_and_no_values():
    for name in layout.LAYOUTS:
        params = layout.convert(stacked_params(), name)
        t = layout.stacked_template(params)
        assert t["layers"]["w"] == jax.ShapeDtypeStruct((L, 3, 4), jnp.float32)
        assert t["layers"]["norm"] == jax.ShapeDtypeStruct((L, 3), jnp.bfloat16)
        assert t["embed"] is params["embed"]


def test_an_unknown_layout_name_is_refused():
    with pytest.raises(ValueError, match="unknown layer layout 'rows'; use one of stacked"):
        layout.convert(stacked_params(), "rows")


@pytest.mark.parametrize("name", layout.LAYOUTS)
@settings(max_examples=15, deadline=None)
@given(active=st.lists(st.integers(0, L - 1), min_size=0, max_size=L, unique=True))
def test_gather_and_write_back_touch_exactly_the_sampled_layers(name, active):
    """Under jit with a traced sample, in either layout: gather returns the sampled layers in
    slot order; the write-back puts slot j at layer active[j] and leaves every other layer as
    it was."""
    p = stacked_params()
    layers = layout.convert(p, name)["layers"]
    lay = layout.of(layers)
    active = jnp.asarray(sorted(active), jnp.int32)
    view = jax.jit(lay.gather)(layers, active)
    np.testing.assert_array_equal(view["w"], p["layers"]["w"][active])
    new_view = jax.tree.map(lambda x: x + 1, view)
    out = layout.convert({"layers": jax.jit(lay.write_back)(layers, new_view, active)},
                         "stacked")["layers"]
    for i in range(L):
        for leaf in ("w", "norm"):
            want = (p["layers"][leaf][i] + 1 if i in set(active.tolist())
                    else p["layers"][leaf][i])
            assert out[leaf][i].dtype == p["layers"][leaf].dtype
            np.testing.assert_array_equal(out[leaf][i], want.astype(p["layers"][leaf].dtype))


@pytest.mark.parametrize("name", layout.LAYOUTS)
def test_grouped_gather_and_write_back_use_each_groups_own_layers(name):
    """Module groups (``w`` and ``norm`` apart): each leaf is gathered at and written back to
    its own group's layers, in either layout; ``slot_of_layer`` gives one row per group."""
    p = stacked_params()
    layers = layout.convert(p, name)["layers"]
    active_NxG = jnp.asarray([[0, 3], [1, 3]], jnp.int32)
    names = layout.group_names((("a", ("w", "absent")), ("b", ("norm",))), layers)
    assert names == (("w",), ("norm",))
    np.testing.assert_array_equal(layout.slot_of_layer(active_NxG, L),
                                  [[0, -1, -1, 1, -1], [-1, 0, -1, 1, -1]])
    view = jax.jit(layout.gather_groups, static_argnums=2)(layers, active_NxG, names)
    np.testing.assert_array_equal(view["w"], p["layers"]["w"][active_NxG[0]])
    np.testing.assert_array_equal(view["norm"], p["layers"]["norm"][active_NxG[1]])
    new_view = jax.tree.map(lambda x: x + 1, view)
    out = layout.convert({"layers": jax.jit(layout.write_back_groups, static_argnums=3)(
        layers, new_view, active_NxG, names)}, "stacked")["layers"]
    for leaf, rows in (("w", {0, 3}), ("norm", {1, 3})):
        for i in range(L):
            want = p["layers"][leaf][i] + 1 if i in rows else p["layers"][leaf][i]
            np.testing.assert_array_equal(out[leaf][i], want.astype(p["layers"][leaf].dtype))
