"""lisa_jax.stack_vjp: ``lisa_layers``'s forward is the model's layers, its backward gives the
sampled layers' weight gradients and the activation gradient of plain autodiff."""
import jax
import jax.numpy as jnp
import pytest

from lisa_jax import layout as layout_lib
from lisa_jax import model as M
from lisa_jax import ops
from lisa_jax.block import REMAT_MODES
from lisa_jax.layout import slot_of_layer
from lisa_jax.stack_vjp import lisa_layers

LAYOUTS = ["stacked", "per_layer"]
L = 6  # the tiny config's layer count


@pytest.fixture(scope="module")
def check_stack_gradients(tiny_cfg, perturbed_params, batch_for, rel_err):
    """``check(cfg, remat, active, layout, reference_layout)``: ``lisa_layers`` against
    ``run_layers`` autodiff (over the layers in ``reference_layout``), forward output, the
    sampled slices' weight gradients and the input gradient. The reference depends on
    ``(cfg, reference_layout)`` alone (the same parameters and batch each time): it is computed
    once for each and reused across the sampled layers, layouts and remat modes checked."""
    references = {}

    def check(cfg, remat, active, layout="stacked", reference_layout="stacked", gather=None):
        assert cfg.num_layers == L
        p = perturbed_params(cfg)
        ids = batch_for(cfg)["input_ids"]
        cos, sin = ops.rope_tables(cfg, jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape))
        h0 = p["embed"][ids]
        active = jnp.array(active)

        def ref(layers, h):
            return jnp.sum(jnp.sin(M.run_layers(cfg, layers, h, (cos, sin))))

        layers = layout_lib.convert(p, layout)["layers"]

        def fast(act, h):
            out = lisa_layers(cfg, remat, act, layers, slot_of_layer(active, L), h, cos, sin,
                              None, gather)
            return jnp.sum(jnp.sin(out))

        if (cfg, reference_layout) not in references:
            ref_layers = layout_lib.convert(p, reference_layout)["layers"]
            g_layers, g_h = jax.jit(jax.grad(ref, argnums=(0, 1)))(ref_layers, h0)
            g_layers = layout_lib.convert({"layers": g_layers}, "stacked")["layers"]
            out_ref = jax.jit(lambda: M.run_layers(cfg, ref_layers, h0, (cos, sin)))()
            references[cfg, reference_layout] = g_layers, g_h, out_ref
        g_layers, g_h, out_ref = references[cfg, reference_layout]
        act = jax.tree.map(lambda x: x[active], p["layers"])
        out_fast = jax.jit(lambda: lisa_layers(cfg, remat, act, layers,
                                               slot_of_layer(active, L), h0, cos, sin, None,
                                               gather))()
        assert rel_err(out_fast, out_ref) < 1e-6  # the forward is the model's own layer
        g_act, g_h2 = jax.jit(jax.grad(fast, argnums=(0, 1)))(act, h0)
        assert set(g_act) == set(p["layers"])
        for name in g_act:
            assert g_act[name].shape == act[name].shape
            assert rel_err(g_act[name], g_layers[name][active]) < 1e-5, name
        assert rel_err(g_h2, g_h) < 1e-5
    return check


# Biases under every remat mode but for the default run's none and qkv (the mode that
# recomputes the biased projections) in `pytest -m slow`.
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias,remat", [
    *[pytest.param(False, r, id=f"llama-{r}") for r in REMAT_MODES],
    *[pytest.param(True, r, id=f"qwen2-bias-{r}",
                   marks=() if r in ("none", "qkv") else pytest.mark.slow) for r in REMAT_MODES]])
def test_stack_vjp_gradients_equal_autodiff_for_sampled_layers(remat, bias, layout, tiny_cfg,
                                                               check_stack_gradients):
    check_stack_gradients(tiny_cfg(attention_bias=bias), remat, [1, 4], layout)


@pytest.mark.parametrize("layout,remat,active", [
    ("stacked", "none", [1, 4]), ("stacked", "full", [0, 5]), ("per_layer", "none", [2, 3])])
def test_layers_gathered_a_layer_ahead_give_autodiffs_gradients(layout, remat, active, tiny_cfg,
                                                                check_stack_gradients):
    """FSDP's prefetch (``gather``, applied to each layer's parameters a layer ahead and carried
    through the forward scan and the backward's loops): each layer still computes with its own
    parameters, at the bottom and the top of the stack too."""
    calls = []

    def gather(lp):  # what the step applies on a mesh is a sharding constraint: values kept
        calls.append(1)
        return jax.tree.map(lambda x: x + 0.0, lp)
    check_stack_gradients(tiny_cfg(), remat, active, layout, gather=gather)
    assert calls


GEMMA3 = dict(qk_norm=True, norm_plus_one=True, sandwich_norm=True, scale_embeddings=True,
              hidden_act="gelu_pytorch_tanh", attn_scalar=12, rope_local_theta=100.0,
              final_softcap=5.0)


# Gemma 3's test config has the two layer kinds too; the plain windowed runs are slow-marked.
@pytest.mark.parametrize("family,remat,layout", [
    pytest.param("window", "none", "stacked", marks=pytest.mark.slow),
    pytest.param("window", "mlp", "per_layer", marks=pytest.mark.slow),
    ("gemma3", "none", "stacked"), ("gemma3", "full", "per_layer")])
def test_stack_vjp_with_sliding_window_layers(family, remat, layout, tiny_cfg,
                                              check_stack_gradients):
    """Layers of two kinds (window 3 on layers 1, 3, 5; batches of 12 tokens): each layer's
    backward takes its own kind, from the traced index of a stacked loop or an unrolled one;
    Gemma 3's sandwich norms, GeGLU and per-kind rope tables in the same backward. (Gemma's
    unrolled reference is unrolled too: its scanned and unrolled forwards, the same math,
    round apart by 1e-6 over six layers, its norms magnifying the small layer outputs.)"""
    cfg = tiny_cfg(sliding_window=3, layer_types=("full_attention", "sliding_attention") * 3,
                   **(GEMMA3 if family == "gemma3" else {}))
    check_stack_gradients(cfg, remat, [1, 2, 5], layout,
                          layout if family == "gemma3" else "stacked")


# The frozen runs between sampled layers (top, middle, bottom) have every length from 0 to 5:
# the stacked backward walks each run in a loop whose trip count is the run's length; the
# per-layer backward decides each layer's weight gradients under lax.cond.
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("active", [[0, 5], [2, 3], [5], [0, 1, 2]])
def test_stack_vjp_gradients_for_every_frozen_run_length(active, layout, tiny_cfg,
                                                         check_stack_gradients):
    check_stack_gradients(tiny_cfg(), "none", active, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stack_vjp_with_no_sampled_layer_gives_only_activation_gradient(
        layout, tiny_cfg, perturbed_params, batch_for, rel_err):
    cfg = tiny_cfg()
    p = perturbed_params(cfg)
    ids = batch_for(cfg)["input_ids"]
    cos, sin = ops.rope_tables(cfg, jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape))
    h0 = p["embed"][ids]
    act = jax.tree.map(lambda x: x[:0], p["layers"])
    layers = layout_lib.convert(p, layout)["layers"]
    slots = slot_of_layer(jnp.zeros((0,), jnp.int32), L)

    def fast(act, h):
        return jnp.sum(lisa_layers(cfg, "none", act, layers, slots, h, cos, sin) ** 2)
    g_act, g_h = jax.jit(jax.grad(fast, argnums=(0, 1)))(act, h0)
    g_ref = jax.jit(jax.grad(lambda h: jnp.sum(M.run_layers(cfg, p["layers"], h,
                                                            (cos, sin)) ** 2)))(h0)
    assert rel_err(g_h, g_ref) < 1e-5
    assert all(g.shape[0] == 0 for g in jax.tree.leaves(g_act))


def test_stack_vjp_gives_frozen_layers_no_gradient(tiny_cfg, perturbed_params, batch_for):
    """``layers`` is read for its values only: its cotangent is zero even for sampled layers
    (their gradients go to the slots), so nothing L-sized is accumulated."""
    cfg = tiny_cfg()
    p = perturbed_params(cfg)
    ids = batch_for(cfg)["input_ids"]
    cos, sin = ops.rope_tables(cfg, jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape))
    active = jnp.array([2])
    act = jax.tree.map(lambda x: x[active], p["layers"])

    def loss(act, layers):
        return jnp.sum(lisa_layers(cfg, "none", act, layers, slot_of_layer(active, L),
                                   p["embed"][ids], cos, sin) ** 2)
    g_act, g_layers = jax.jit(jax.grad(loss, argnums=(0, 1)))(act, p["layers"])
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_layers))
    assert all(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(g_act))


def test_remat_modes_are_the_blocks():
    from lisa_jax import block
    assert REMAT_MODES == block.REMAT_MODES == ("none", "qkv", "mlp", "full")
