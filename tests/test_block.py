"""lisa_jax.block: the parameter table against the parameters and the stages; the per-stage
backward (``layer_backward``) against autodiff of the layer."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lisa_jax import block, ops
from lisa_jax import model as M


class ReadRecording(dict):
    """One layer's parameters that note which of them the stages read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, name):
        self.read.add(name)
        return super().__getitem__(name)


def rope_for(cfg, B, S):
    return ops.rope_tables(cfg, jnp.broadcast_to(jnp.arange(S), (B, S)))


def layer_inputs(cfg, params, seed=5, B=2, S=7):
    h = jax.random.normal(jax.random.key(seed), (B, S, cfg.hidden_size), cfg.jnp_dtype)
    dy = jax.random.normal(jax.random.key(seed + 1), (B, S, cfg.hidden_size), cfg.jnp_dtype)
    lp = {name: x[1] for name, x in params["layers"].items()}
    return lp, h, dy, rope_for(cfg, B, S)


# ----------------------------------------------------------------------------- the table


def test_init_params_has_one_leaf_per_present_row_with_its_shape_and_init(block_variant,
                                                                         tiny_cfg):
    cfg = tiny_cfg(**block_variant)
    p = M.init_params(cfg, jax.random.key(0))
    layer_rows, global_rows = block.layer_params(cfg), block.global_params(cfg)
    assert set(p["layers"]) == {r.name for r in layer_rows}
    assert set(p) - {"layers"} == {r.name for r in global_rows}
    leaves = [(r, p["layers"][r.name], (cfg.num_layers,)) for r in layer_rows] + \
        [(r, p[r.name], ()) for r in global_rows]
    for row, x, lead in leaves:
        assert x.shape == lead + row.shape(cfg), row.name
        assert x.dtype == cfg.jnp_dtype, row.name
        assert row.rank == len(row.shape(cfg)), row.name
        x = np.asarray(x)
        assert row.init_for(cfg) == ("zeros" if row.init == "ones" and cfg.norm_plus_one
                                     else row.init), row.name
        if row.init_for(cfg) == "ones":
            assert (x == 1).all(), row.name
        elif row.init_for(cfg) == "zeros":
            assert (x == 0).all(), row.name
        else:
            assert row.init == "normal"
            assert abs(x.std() - 0.02) < 0.004 and abs(x.mean()) < 0.004, row.name
    # Absent rows are exactly the variant's: biases without attention_bias, q/k norms without
    # qk_norm, the MLP's own input and output norms without sandwich_norm, lm_head when tied.
    absent = {r.name for r in block.LAYER_PARAMS + block.GLOBAL_PARAMS} - \
        {r.name for r in layer_rows + global_rows}
    assert absent == ({"bq", "bk", "bv"} if not cfg.attention_bias else set()) | \
        ({"q_norm", "k_norm"} if not cfg.qk_norm else set()) | \
        ({"ffn_norm", "ffn_out_norm"} if not cfg.sandwich_norm else set()) | \
        ({"lm_head"} if cfg.tie_embeddings else set())


def test_the_stages_read_every_present_layer_row_and_no_other(block_variant, tiny_cfg):
    cfg = tiny_cfg(**block_variant)
    p = M.init_params(cfg, jax.random.key(0))
    lp, h, _, rope = layer_inputs(cfg, p)
    recording = ReadRecording(lp)
    out = block.decoder_layer(cfg, recording, h, rope, layer=1)
    assert out.shape == h.shape
    assert recording.read == {r.name for r in block.layer_params(cfg)}


def test_stages_form_a_chain_from_h_to_out_and_saved_names_are_activations():
    made = {"h"}
    for stage in block.STAGES:
        assert set(stage.inputs) <= made, stage
        assert not set(stage.outputs) & made, stage  # each activation is made once
        made |= set(stage.outputs)
    assert block.STAGES[-1].outputs == ("out",)
    assert sum(stage.fn is None for stage in block.STAGES) == 1  # one attention stage
    assert block.REMAT_MODES == tuple(block.SAVED)
    for mode, saved in block.SAVED.items():
        assert saved[0] == "h" and set(saved) <= made - {"out"}, mode
    # Each mode keeps less than "none"; "full" the least. "qkv" and "mlp" each drop one
    # GEMM stage's outputs (q, k, v; gate and up) and keep the other's.
    assert set(block.SAVED["full"]) < set(block.SAVED["mlp"]) < set(block.SAVED["none"])
    assert set(block.SAVED["full"]) < set(block.SAVED["qkv"]) < set(block.SAVED["none"])
    assert set(block.SAVED["none"]) - set(block.SAVED["qkv"]) == {"q", "k", "v"}
    assert set(block.SAVED["none"]) - set(block.SAVED["mlp"]) == {"a", "b"}


def test_table_names_are_unique_and_lora_and_decay_roles_are_consistent():
    rows = block.LAYER_PARAMS + block.GLOBAL_PARAMS
    assert len({r.name for r in rows}) == len(rows) == len(block.PARAMS_BY_NAME)
    assert block.LORA_TARGETS == tuple(r.name for r in block.LAYER_PARAMS if r.lora)
    for r in rows:
        if r.lora:  # LoRA adapts a layer's matrix, which decays
            assert r in block.LAYER_PARAMS and r.rank == 2 and r.decay, r.name
        if r.init in ("ones", "zeros"):  # norm scales and biases do not decay
            assert not r.decay, r.name
        if r.tp_dim is not None:
            assert 0 <= r.tp_dim < r.rank, r.name
        if r.heads is not None:
            assert r.heads in ("q", "kv") and r.tp_dim is not None, r.name


# ----------------------------------------------------------------------------- the backward


@functools.partial(jax.jit, static_argnums=(0, 1))
def _backward_both_ways(cfg, remat, lp, h, dy, rope, layer):
    """The LISA pieces at a traced layer index (a stacked scan's), the reference at layer 1
    (``lp`` is layer 1's slice) given as a Python int."""
    out, saved = block.layer_forward(cfg, lp, h, rope, remat, layer)
    dh_w, grads = block.layer_backward(cfg, lp, saved, rope, dy, remat, weight_grads=True,
                                       layer=layer)
    dh_p, parts = block.layer_backward(cfg, lp, saved, rope, dy, remat, layer=layer)
    from_parts = block.weight_grads_from_parts(cfg, lp, parts, rope, layer)
    ref_out, pullback = jax.vjp(lambda p_, h_: block.decoder_layer(cfg, p_, h_, rope, layer=1),
                                lp, h)
    ref_grads, ref_dh = pullback(dy)
    return dict(out=out, saved=saved, dh_w=dh_w, grads=grads, dh_p=dh_p, parts=parts,
                from_parts=from_parts, ref_out=ref_out, ref_grads=ref_grads, ref_dh=ref_dh)


@pytest.mark.parametrize("remat", block.REMAT_MODES)
def test_layer_backward_equals_autodiff_of_decoder_layer(remat, block_variant, tiny_cfg,
                                                         perturbed_params, rel_err):
    """For every remat mode: ``layer_forward`` is the layer; ``layer_backward`` gives the
    input and weight gradients of ``jax.vjp`` of ``decoder_layer``, and its activation-only
    form gives the same input gradient and parts from which ``weight_grads_from_parts``
    gives the same weight gradients."""
    cfg = tiny_cfg(**block_variant)
    lp, h, dy, rope = layer_inputs(cfg, perturbed_params(cfg))
    r = _backward_both_ways(cfg, remat, lp, h, dy, rope, jnp.int32(1))
    np.testing.assert_array_equal(r["out"], r["ref_out"])
    assert len(r["saved"]) == len(block.SAVED[remat])
    np.testing.assert_array_equal(r["saved"][0], h)
    assert len(r["parts"]) == sum(stage.fn is not None for stage in block.STAGES)
    assert rel_err(r["dh_w"], r["ref_dh"]) < 1e-5
    np.testing.assert_array_equal(r["dh_p"], r["dh_w"])
    assert set(r["grads"]) == set(r["from_parts"]) == set(lp)
    for name in lp:
        assert r["grads"][name].shape == lp[name].shape, name
        assert rel_err(r["grads"][name], r["ref_grads"][name]) < 1e-5, name
        assert rel_err(r["from_parts"][name], r["grads"][name]) < 1e-6, name


def test_decoder_block_takes_the_attention_stage_from_the_caller(tiny_cfg, perturbed_params):
    """``decoder_block``'s attention is the caller's: the causal one gives ``decoder_layer``,
    and what the attention returns beside ``o`` comes back."""
    cfg = tiny_cfg()
    lp, h, _, rope = layer_inputs(cfg, perturbed_params(cfg))
    out, extra = block.decoder_block(cfg, lp, h, rope, block.causal_attention(cfg))
    np.testing.assert_array_equal(out, block.decoder_layer(cfg, lp, h, rope))
    assert extra is None
    seen = {}

    def attend(q, k, v):
        seen.update(q=q.shape, k=k.shape, v=v.shape)
        return jnp.zeros_like(q), "extra"
    out, extra = block.decoder_block(cfg, lp, h, rope, attend)
    B, S, _ = h.shape
    assert extra == "extra"
    assert seen == dict(q=(B, S, cfg.num_heads, cfg.head_dim),
                        k=(B, S, cfg.num_kv_heads, cfg.head_dim),
                        v=(B, S, cfg.num_kv_heads, cfg.head_dim))
    # With a zero attention output the block is h + mlp(h).
    x2 = ops.rms_norm(h, lp["mlp_norm"], cfg.rms_norm_eps)
    mlp = ops.swiglu(x2 @ lp["w_gate"], x2 @ lp["w_up"]) @ lp["w_down"]
    np.testing.assert_allclose(out, h + mlp, rtol=1e-6, atol=1e-6)


def test_a_sliding_layer_sees_only_its_window_and_a_full_layer_everything(tiny_cfg,
                                                                         perturbed_params):
    """With a window of W, a sliding layer's output at position t does not depend on the
    inputs before t - W + 1; a full layer's does. The layer index picks the kind, a Python
    int or a traced one alike, and is required where the layers differ."""
    W = 3
    cfg = tiny_cfg(sliding_window=W, layer_types=("full_attention", "sliding_attention") * 3)
    lp, h, _, rope = layer_inputs(cfg, perturbed_params(cfg))
    h2 = h.at[:, 0].add(1.0)
    for layer, sliding in ((0, False), (1, True)):
        for index in (layer, jnp.int32(layer)):
            f = jax.jit(lambda x, i: block.decoder_layer(cfg, lp, x, rope, layer=i))
            changed = np.abs(np.asarray(f(h2, index) - f(h, index))).max(axis=(0, 2)) > 0
            assert changed[:W].all()
            assert changed[W:].any() != sliding, (layer, index)
    with pytest.raises(ValueError, match="pass the layer index"):
        block.decoder_layer(cfg, lp, h, rope)

