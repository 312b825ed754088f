"""lisa_jax.model: the config's HF round trip, the forward against the Flax module, remat and
layouts in ``run_layers``, and the weight-decay mask from the block's table."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lisa_jax import block, layout
from lisa_jax import model as M


@functools.partial(jax.jit, static_argnums=0)
def _forward_both_ways(cfg, params, ids, am):
    flax_out = M.LlamaForCausalLM(cfg).apply({"params": params}, ids, am)
    return M.forward(cfg, params, ids, am), flax_out


def test_forward_equals_the_flax_module_and_model_call(block_variant, tiny_cfg,
                                                       perturbed_params, batch_for, rel_err):
    cfg = tiny_cfg(**block_variant)
    p = perturbed_params(cfg)
    ids = batch_for(cfg)["input_ids"]
    am = jnp.ones_like(ids).at[0, :3].set(0)
    for mask in (None, am):
        ours, flax_out = _forward_both_ways(cfg, p, ids, mask)
        assert ours.dtype == jnp.float32 and ours.shape == ids.shape + (cfg.vocab_size,)
        assert rel_err(ours, flax_out) < 1e-6
    np.testing.assert_array_equal(M.Model(cfg, p)(ids), _forward_both_ways(cfg, p, ids, None)[0])


def test_tied_head_is_the_transposed_embedding(tiny_cfg, perturbed_params):
    cfg = tiny_cfg(tie_embeddings=True)
    p = perturbed_params(cfg)
    assert "lm_head" not in p
    np.testing.assert_array_equal(M.head_weight(p), p["embed"].T)
    untied = perturbed_params(tiny_cfg())
    assert M.head_weight(untied) is untied["lm_head"]


@functools.partial(jax.jit, static_argnums=(0, 3))
def _value_and_grads(cfg, layers, h, remat, rope):
    def loss(layers, h):
        return jnp.sum(jnp.sin(M.run_layers(cfg, layers, h, rope, remat=remat)))
    return jax.value_and_grad(loss, argnums=(0, 1))(layers, h)


def test_run_layers_remat_and_layout_change_nothing_but_memory(tiny_cfg, perturbed_params,
                                                               rel_err):
    cfg = tiny_cfg()
    p = perturbed_params(cfg)
    h = jax.random.normal(jax.random.key(0), (2, 9, cfg.hidden_size))
    from lisa_jax import ops
    rope = ops.rope_tables(cfg, jnp.broadcast_to(jnp.arange(9), (2, 9)))
    ref_v, (ref_gl, ref_gh) = _value_and_grads(cfg, p["layers"], h, False, rope)
    for remat in (True, "full", "dots"):
        v, (gl, gh) = _value_and_grads(cfg, p["layers"], h, remat, rope)
        assert rel_err(v, ref_v) < 1e-6 and rel_err(gh, ref_gh) < 1e-5, remat
        for name in gl:
            assert rel_err(gl[name], ref_gl[name]) < 1e-5, (remat, name)
    per_layer = layout.convert(p, "per_layer")["layers"]
    v, (gl, gh) = _value_and_grads(cfg, per_layer, h, False, rope)
    assert rel_err(v, ref_v) < 1e-6 and rel_err(gh, ref_gh) < 1e-5
    stacked = layout.convert({"layers": gl}, "stacked")["layers"]
    for name in stacked:
        assert rel_err(stacked[name], ref_gl[name]) < 1e-5, name
    with pytest.raises(ValueError, match="unknown remat 'mlp'; use one of none, full, dots"):
        M.run_layers(cfg, p["layers"], h, rope, remat="mlp")


# ----------------------------------------------------------------------------- the config


@pytest.mark.parametrize("model_type", M.SUPPORTED_MODEL_TYPES)
@pytest.mark.parametrize("rope_scaling", [None, ("linear", 2.0), ("llama3", 8.0, 1.0, 4.0, 32)],
                         ids=["plain", "linear", "llama3"])
def test_config_survives_to_hf_and_from_hf(model_type, rope_scaling, tiny_cfg):
    family = block.FAMILIES[model_type]
    switches = {k: getattr(family, k) for k in ("attention_bias", "qk_norm", "norm_plus_one",
                                                "sandwich_norm", "scale_embeddings")}
    if family.norm_plus_one:  # Gemma 3
        switches.update(hidden_act="gelu_pytorch_tanh", attn_scalar=24, rope_local_theta=1e4,
                        final_softcap=30.0, sliding_window=3,
                        layer_types=("sliding_attention", "full_attention") * 3)
    cfg = tiny_cfg(model_type=model_type, rope_scaling=rope_scaling, **switches,
                   eos_token_id=(2, 7), tie_embeddings=model_type == "llama")
    hf = cfg.to_hf()
    assert hf["architectures"] == [block.FAMILIES[model_type].architecture]
    assert hf["eos_token_id"] == [2, 7]
    assert M.LlamaConfig.from_hf(hf) == cfg
    # transformers 5 writes rope_theta and rope_scaling inside rope_parameters.
    if rope_scaling is not None and "rope_parameters" not in hf:
        moved = {k: v for k, v in hf.items() if k not in ("rope_theta", "rope_scaling")}
        moved["rope_parameters"] = {**hf["rope_scaling"], "rope_theta": hf["rope_theta"]}
        assert M.LlamaConfig.from_hf(moved) == cfg


def test_from_hf_defaults_and_errors():
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4)
    cfg = M.LlamaConfig.from_hf(base)
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.model_type, cfg.attention_bias) == \
        (8, 4, "llama", False)
    assert M.LlamaConfig.from_hf({**base, "model_type": "qwen2"}).attention_bias
    assert M.LlamaConfig.from_hf(base, dtype="bfloat16").jnp_dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        M.LlamaConfig.from_hf({**base, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="unsupported rope scaling 'yarn'"):
        M.LlamaConfig.from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


# ----------------------------------------------------------------------------- weight decay


@pytest.mark.parametrize("overrides", [dict(attention_bias=True), dict(tie_embeddings=True),
                                       dict(qk_norm=True)], ids=["bias", "tied", "qk_norm"])
def test_weight_decay_mask_is_false_exactly_at_the_tables_no_decay_rows(overrides, tiny_cfg):
    cfg = tiny_cfg(**overrides)
    params = M.init_params(cfg, jax.random.key(0))
    for name in layout.LAYOUTS:
        p = layout.convert(params, name)
        mask = M.weight_decay_mask(p)
        assert jax.tree.structure(mask) == jax.tree.structure(p)
        for path, decays in jax.tree_util.tree_flatten_with_path(mask)[0]:
            leaf = path[-1].key
            assert decays is block.PARAMS_BY_NAME[leaf].decay, (name, path)
    one_layer = {k: v[0] for k, v in params["layers"].items()}
    assert M.weight_decay_mask(one_layer) == {k: block.PARAMS_BY_NAME[k].decay
                                              for k in one_layer}
    # LoRA adapters decay (they sit under a decaying matrix's name).
    assert M.weight_decay_mask({"wq": {"a": jnp.ones((2, 3, 1)), "b": jnp.ones((2, 1, 3))}}) == \
        {"wq": {"a": True, "b": True}}



GEMMA3 = dict(qk_norm=True, norm_plus_one=True, sandwich_norm=True, scale_embeddings=True,
              hidden_act="gelu_pytorch_tanh", attn_scalar=12, rope_local_theta=100.0,
              final_softcap=5.0, sliding_window=3, tie_embeddings=True,
              layer_types=("sliding_attention", "full_attention") * 3)


@pytest.mark.parametrize("overrides", [pytest.param({}, marks=pytest.mark.slow), GEMMA3],
                         ids=["gqa", "gemma3"])
def test_train_step_losses_equal_the_forwards(overrides, tiny_cfg, perturbed_params, batch_for,
                                              rel_err):
    """The train steps' losses (the plain path and LISA's, chunked or not) are the model's:
    Gemma's scaled embedding, final norm and soft-capped logits included."""
    from lisa_jax import ops, step
    from lisa_jax.layout import slot_of_layer
    cfg = tiny_cfg(**overrides)
    p = perturbed_params(cfg)
    batch = batch_for(cfg)
    ids = batch["input_ids"]
    want = ops.causal_lm_loss(M.forward(cfg, p, ids), ids, batch["loss_mask"])
    active = jnp.array([1, 4])
    view = {**p, "layers": jax.tree.map(lambda x: x[active], p["layers"])}
    for chunk in (None, 7):
        plain = jax.jit(lambda: step.plain_loss(cfg, p, batch, loss_chunk=chunk)[0])()
        lisa = jax.jit(lambda: step.lisa_loss(cfg, view, p["layers"],
                                              slot_of_layer(active, cfg.num_layers), batch,
                                              loss_chunk=chunk)[0])()
        assert rel_err(plain, want) < 1e-6 and rel_err(lisa, want) < 1e-6, chunk
