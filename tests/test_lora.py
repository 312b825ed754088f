"""lisa_jax.lora: the default targets are the table's LoRA rows; adapters start at the base
model, merge into it exactly as applied, and refuse bad targets and ranks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lisa_jax import block
from lisa_jax import lora as lora_lib
from lisa_jax import model as M


def test_default_targets_are_the_tables_lora_rows():
    assert lora_lib.DEFAULT_TARGETS == tuple(p.name for p in block.LAYER_PARAMS if p.lora)
    # Every projection of the layer: the transposed (HF Linear) rows.
    assert set(lora_lib.DEFAULT_TARGETS) == {p.name for p in block.LAYER_PARAMS
                                             if p.transposed}


def test_init_lora_shapes_and_start(tiny_cfg):
    cfg = tiny_cfg(num_layers=2)
    layers = M.init_params(cfg, jax.random.key(0))["layers"]
    lora = lora_lib.init_lora(layers, jax.random.key(1), rank=3)
    assert tuple(lora) == lora_lib.DEFAULT_TARGETS
    for name, ab in lora.items():
        L, d_in, d_out = layers[name].shape
        assert ab["a"].shape == (L, d_in, 3) and ab["b"].shape == (L, 3, d_out), name
        assert (np.asarray(ab["b"]) == 0).all()
        assert 0 < float(jnp.abs(ab["a"]).max()) <= 1 / np.sqrt(d_in)
    bf = lora_lib.init_lora(layers, jax.random.key(1), rank=2, targets=("wq",),
                            dtype=jnp.bfloat16)
    assert set(bf) == {"wq"} and bf["wq"]["a"].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"unknown LoRA targets \['attn_norm2'\]"):
        lora_lib.init_lora(layers, jax.random.key(1), 2, targets=("wq", "attn_norm2"))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        lora_lib.init_lora(layers, jax.random.key(1), 0)
    assert lora_lib.lora_scale(4, None) == 2.0 and lora_lib.lora_scale(4, 8.0) == 2.0
    assert lora_lib.lora_scale(8, 4.0) == 0.5


def _trained_adapters(layers, rank, seed=2):
    lora = lora_lib.init_lora(layers, jax.random.key(1), rank)
    return {name: {"a": ab["a"], "b": 0.05 * jax.random.normal(jax.random.fold_in(
        jax.random.key(seed), i), ab["b"].shape)} for i, (name, ab) in enumerate(lora.items())}


def test_lora_weight_computes_the_adapted_product(rel_err):
    w = jax.random.normal(jax.random.key(0), (6, 5))
    a = jax.random.normal(jax.random.key(1), (6, 2))
    b = jax.random.normal(jax.random.key(2), (2, 5))
    x = jax.random.normal(jax.random.key(3), (3, 4, 6))
    got = x @ lora_lib.LoraWeight(w, a, b, 1.5)
    assert rel_err(got, x @ (w + 1.5 * a @ b)) < 1e-5


@pytest.mark.parametrize("overrides", [{}, dict(attention_bias=True)], ids=["llama", "bias"])
def test_merge_lora_equals_applying_the_adapters(overrides, tiny_cfg, perturbed_params,
                                                 batch_for, rel_err):
    cfg = tiny_cfg(**overrides)
    p = perturbed_params(cfg)
    lora = _trained_adapters(p["layers"], rank=4)
    scale = lora_lib.lora_scale(4, 16.0)
    ids = batch_for(cfg)["input_ids"]
    merged = lora_lib.merge_lora(p, lora, scale)
    applied = {**p, "layers": lora_lib.apply_lora(p["layers"], lora, scale)}
    forward = jax.jit(M.forward, static_argnums=0)
    ours, ref = forward(cfg, merged, ids), forward(cfg, applied, ids)
    assert rel_err(ours, ref) < 1e-5
    assert rel_err(ref, forward(cfg, p, ids)) > 1e-3  # the adapters do change the model
    for name, w in merged["layers"].items():
        assert w.dtype == p["layers"][name].dtype
        if name not in lora:  # norms and biases untouched
            np.testing.assert_array_equal(w, p["layers"][name])
        else:
            delta = jnp.einsum("lir,lro->lio", lora[name]["a"], lora[name]["b"]) * scale
            assert rel_err(w, p["layers"][name] + delta) < 1e-6, name
    for name in ("embed", "final_norm", "lm_head"):
        assert merged[name] is p[name]


@pytest.mark.parametrize("variant", ["qwen2"])  # biases beside the adapted weights
def test_peft_adapter_loads_onto_the_hf_base_and_gives_the_merged_logits(
        variant, make_tiny_hf, tmp_path, rel_err):
    """``save_peft_adapter`` writes what ``peft.PeftModel.from_pretrained`` loads onto the HF
    base model: HF module names, ``r``, ``lora_alpha`` (PEFT scales by alpha / r) and the base
    model's path; the adapted torch model's logits are lisa_jax's merged model's."""
    import json

    import torch
    import transformers
    from peft import PeftModel

    from lisa_jax.hf import load_hf
    base_dir = make_tiny_hf(variant)
    model = load_hf(base_dir)
    lora = _trained_adapters(model.params["layers"], rank=4)
    scale = lora_lib.lora_scale(4, 12.0)
    ids = np.array([[1, 5, 9, 17, 33, 64, 100, 7]])
    ours = np.asarray(M.forward(model.cfg, lora_lib.merge_lora(model.params, lora, scale), ids))
    out = lora_lib.save_peft_adapter(lora, tmp_path / "adapter", 4, 12.0, base_dir)
    config = json.loads((tmp_path / "adapter" / lora_lib.PEFT_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == \
        (4, 12, base_dir)
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj",
                                               "gate_proj", "up_proj", "down_proj"])
    base = transformers.AutoModelForCausalLM.from_pretrained(
        config["base_model_name_or_path"], dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        plain = base(torch.tensor(ids)).logits.numpy()
        adapted = PeftModel.from_pretrained(base, out).eval()(torch.tensor(ids)).logits.numpy()
    assert rel_err(adapted, ours) < 1e-4
    assert rel_err(plain, ours) > 1e-2  # the adapters were loaded, not left at zero


def test_a_lora_run_exports_its_adapters_beside_the_merged_model(model_dir, data_file,
                                                                 tmp_path, small, rel_err):
    """The end of a LoRA run: hf/ (merged) and adapter/ (PEFT's format, on --model), which
    give the same logits."""
    import torch
    import transformers
    from peft import PeftModel

    from lisa_jax.hf import load_hf
    from lisa_jax.train import train
    out = tmp_path / "run"
    summary = train(small(model_dir, data_file, out, method="lora", lora_rank=2,
                          lora_alpha=3.0, steps=2, save_every=2, export=True))
    assert summary["adapter_dir"] == str(out / "adapter")
    ids = np.array([[1, 5, 9, 17, 33, 60, 7]])
    merged = load_hf(out / "hf")
    ours = np.asarray(merged(ids))
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        plain = base(torch.tensor(ids)).logits.numpy()
        peft = PeftModel.from_pretrained(base, summary["adapter_dir"]).eval()
        adapted = peft(torch.tensor(ids)).logits.numpy()
    assert rel_err(adapted, ours) < 1e-4 and rel_err(plain, ours) > 1e-4
    # `lisa-jax export --adapter DIR` writes the same adapters from the run's checkpoint.
    from safetensors.numpy import load_file

    from lisa_jax import cli
    assert cli.main(["export", "--run", str(out), "--out", str(tmp_path / "exp"), "--adapter",
                     str(tmp_path / "ad")]) == 0
    again = load_file(str(tmp_path / "ad" / lora_lib.PEFT_WEIGHTS))
    first = load_file(str(out / "adapter" / lora_lib.PEFT_WEIGHTS))
    assert sorted(again) == sorted(first) and len(first) == 2 * 7 * 4  # A, B; 7 targets; 4 layers
    for name in first:
        np.testing.assert_array_equal(again[name], first[name])
    assert (tmp_path / "ad" / lora_lib.PEFT_CONFIG).read_text() == \
        (out / "adapter" / lora_lib.PEFT_CONFIG).read_text()
