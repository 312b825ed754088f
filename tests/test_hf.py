"""lisa_jax.hf against transformers: logits, gradients, round trips, dtypes and bad input."""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lisa_jax
from lisa_jax import block
from lisa_jax.model import forward
from lisa_jax.ops import causal_lm_loss

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def left_padded(vocab: int, seed: int = 0):
    """Two rows of 12: the first with 4 left pads, the second full."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, vocab, size=(2, 12))
    mask = np.ones_like(ids)
    mask[0, :4] = 0
    ids[0, :4] = 0
    return ids, mask


def torch_logits(ref, ids, mask=None):
    kw = {}
    if mask is not None:
        m = torch.tensor(mask)
        kw = dict(attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        return ref(torch.tensor(ids), **kw).logits.numpy()


# ----------------------------------------------------------------------------- logits


def test_logits_match_transformers(hf_variant, make_tiny_hf, torch_reference, rel_err):
    path = make_tiny_hf(hf_variant)
    model = lisa_jax.load_hf(path)
    ids = np.random.RandomState(1).randint(0, model.cfg.vocab_size, size=(2, 12))
    err = rel_err(model(ids), torch_logits(torch_reference(path), ids))
    print(f"\n[{hf_variant}] logits rel err (no mask): {err:.2e}")
    assert err < 1e-4


def test_logits_match_transformers_left_padded(hf_variant, make_tiny_hf, torch_reference, rel_err):
    path = make_tiny_hf(hf_variant)
    model = lisa_jax.load_hf(path)
    ids, mask = left_padded(model.cfg.vocab_size)
    ours = np.asarray(model(ids, attention_mask=mask))
    ref = torch_logits(torch_reference(path), ids, mask)
    real = mask.astype(bool)
    err = rel_err(ours[real], ref[real])
    print(f"\n[{hf_variant}] logits rel err (left padded): {err:.2e}")
    assert err < 1e-4
    # The padded row's real tokens see the same thing as the unpadded prompt.
    alone = np.asarray(model(ids[:1, 4:]))
    assert rel_err(ours[0, 4:], alone[0]) < 1e-4


def test_sharded_checkpoint_loads_same_params(tiny_llama_dir, tiny_llama_sharded_dir):
    files = os.listdir(tiny_llama_sharded_dir)
    assert sum(f.endswith(".safetensors") for f in files) > 1
    a = lisa_jax.load_hf(tiny_llama_dir)
    b = lisa_jax.load_hf(tiny_llama_sharded_dir)
    assert a.cfg == b.cfg
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_param_layout(make_tiny_hf):
    tied = lisa_jax.load_hf(make_tiny_hf("llama3"))
    assert "lm_head" not in tied.params and tied.cfg.tie_embeddings
    assert tied.cfg.rope_scaling[0] == "llama3"
    qwen = lisa_jax.load_hf(make_tiny_hf("qwen2"))
    cfg = qwen.cfg
    assert {"bq", "bk", "bv"} <= set(qwen.params["layers"])
    assert qwen.params["layers"]["wk"].shape == (cfg.num_layers, cfg.hidden_size,
                                                  cfg.num_kv_heads * cfg.head_dim)
    assert qwen.params["lm_head"].shape == (cfg.hidden_size, cfg.vocab_size)
    ref = transformers.AutoModelForCausalLM.from_pretrained(make_tiny_hf("qwen2"))
    bias = ref.model.layers[1].self_attn.k_proj.bias.detach().numpy()
    assert np.abs(bias).max() > 0
    np.testing.assert_array_equal(np.asarray(qwen.params["layers"]["bk"][1]), bias)


def test_shardings_hook(tiny_llama_dir):
    calls = []
    dev = jax.devices()[0]

    def shardings(path, shape, dtype):
        calls.append((path, tuple(shape), jnp.dtype(dtype).name))
        return jax.sharding.SingleDeviceSharding(dev) if path[0] == "layers" else None

    model = lisa_jax.load_hf(tiny_llama_dir, "float32", shardings=shardings)
    got = {c[0]: c[1] for c in calls}
    assert len(calls) == len(jax.tree.leaves(model.params))
    assert got[("layers", "wq")] == tuple(model.params["layers"]["wq"].shape)
    assert got[("embed",)] == (128, 64)
    assert all(c[2] == "float32" for c in calls)


# ----------------------------------------------------------------------------- gradients


def test_grads_match_torch(hf_variant, make_tiny_hf, rel_err, tmp_path):
    path = make_tiny_hf(hf_variant)
    model = lisa_jax.load_hf(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager")
    ref.train()
    ids = np.random.RandomState(2).randint(0, model.cfg.vocab_size, size=(2, 10))
    t_ids = torch.tensor(ids)
    loss_t = ref(t_ids, labels=t_ids).loss
    loss_t.backward()

    cfg = model.cfg
    loss_j, grads = jax.jit(jax.value_and_grad(
        lambda p: causal_lm_loss(forward(cfg, p, jnp.asarray(ids)), jnp.asarray(ids))))(
        model.params)
    assert abs(float(loss_j) - loss_t.item()) < 1e-5 * abs(loss_t.item())

    # Every parameter's gradient, by HF name: ours written as a checkpoint (fused tensors
    # joined as the family's checkpoints hold them) against torch's .grad of each.
    from safetensors.numpy import load_file
    lisa_jax.save_hf(lisa_jax.Model(cfg, grads), tmp_path / "grads")
    ours = load_file(tmp_path / "grads" / "model.safetensors")
    theirs = {name: p.grad.numpy() for name, p in ref.named_parameters()}
    assert set(theirs) == set(ours)
    errs = {name: rel_err(ours[name], g) for name, g in theirs.items()}
    worst = max(errs, key=errs.get)
    print(f"\n[{hf_variant}] grad rel err: max {errs[worst]:.2e} ({worst})")
    assert errs[worst] < 1e-4, errs


# ----------------------------------------------------------------------------- round trips


def assert_state_dicts_identical(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def test_save_hf_roundtrip_bit_exact(hf_variant, make_tiny_hf, tmp_path):
    path = make_tiny_hf(hf_variant)
    out = tmp_path / "saved"
    lisa_jax.save_hf(lisa_jax.load_hf(path), out)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json",
                                       "model.safetensors"]
    orig = transformers.AutoModelForCausalLM.from_pretrained(path)
    again = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(again) is type(orig)
    assert_state_dicts_identical(orig, again)
    for key in ("tie_word_embeddings", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "rope_parameters", "vocab_size", "sliding_window", "use_sliding_window",
                "max_window_layers", "layer_types"):
        assert getattr(again.config, key, None) == getattr(orig.config, key, None), key
    # and back: the config survives a second load
    assert lisa_jax.load_hf(out).cfg == lisa_jax.load_hf(path).cfg


def test_save_hf_sharded_roundtrip(tiny_llama_sharded_dir, tmp_path):
    out = tmp_path / "sharded"
    model = lisa_jax.load_hf(tiny_llama_sharded_dir)
    lisa_jax.save_hf(model, out, tokenizer_from=tiny_llama_sharded_dir, max_shard_size="30KB")
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    with open(out / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == set(shards)
    sizes = sum(os.path.getsize(out / s) for s in shards)
    assert 0 < index["metadata"]["total_size"] <= sizes
    orig = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_sharded_dir)
    again = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert_state_dicts_identical(orig, again)
    # tokenizer and generation config came along
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("w5 w7")["input_ids"][-2:] == [5, 7]
    with open(out / "generation_config.json") as f:
        gen = json.load(f)
    assert gen["bos_token_id"] == 1 and gen["eos_token_id"] == 2
    loaded = lisa_jax.load_hf(out)
    for x, y in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_hf_replaces_existing_and_cleans_up(tiny_llama_dir, tmp_path, monkeypatch):
    model = lisa_jax.load_hf(tiny_llama_dir)
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    lisa_jax.save_hf(model, out)
    assert not (out / "stale.txt").exists()
    assert os.listdir(tmp_path) == ["ckpt"]  # no temp dirs left beside it

    # A failure half way leaves the previous checkpoint untouched and no temp dir behind.
    import safetensors.numpy

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        lisa_jax.save_hf(model, out)
    assert os.listdir(tmp_path) == ["ckpt"]
    assert (out / "model.safetensors").exists()


def test_save_hf_keeps_generation_config_eos_list(tiny_llama_dir, tmp_path):
    # An instruct checkpoint stops at several ids; its model config names only one of them.
    src = shutil.copytree(tiny_llama_dir, tmp_path / "src")
    _edit_json(src, "generation_config.json", eos_token_id=[2, 7], temperature=0.6)
    out = lisa_jax.save_hf(lisa_jax.load_hf(src), tmp_path / "out", tokenizer_from=src)
    with open(os.path.join(out, "generation_config.json")) as f:
        gen = json.load(f)
    assert gen["eos_token_id"] == [2, 7] and gen["temperature"] == 0.6
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == [2, 7]
    # A model config with a list of eos ids keeps the list in both files.
    listed = shutil.copytree(tiny_llama_dir, tmp_path / "listed")
    _edit_config(listed, eos_token_id=[2, 9])
    model = lisa_jax.load_hf(listed)
    assert model.cfg.eos_token_id == (2, 9)
    out = lisa_jax.save_hf(model, tmp_path / "out2")
    for name in ("config.json", "generation_config.json"):
        with open(os.path.join(out, name)) as f:
            assert json.load(f)["eos_token_id"] == [2, 9], name


def test_save_hf_directory_has_the_mode_mkdir_gives(tiny_llama_dir, tmp_path):
    import stat

    model = lisa_jax.load_hf(tiny_llama_dir)
    previous = os.umask(0o022)
    try:
        os.mkdir(tmp_path / "reference")
        (tmp_path / "reference" / "file").write_text("")
        out = lisa_jax.save_hf(model, tmp_path / "ckpt", tokenizer_from=tiny_llama_dir)
        again = lisa_jax.save_hf(model, tmp_path / "ckpt")  # replacing an existing one
    finally:
        os.umask(previous)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    want = mode(tmp_path / "reference")
    assert want == 0o755
    assert again == out
    assert mode(out) == want
    for fn in ("model.safetensors", "config.json", "generation_config.json"):
        assert mode(os.path.join(out, fn)) == mode(tmp_path / "reference" / "file"), fn


# ----------------------------------------------------------------------------- dtypes


def test_bf16_load(tiny_llama_dir, torch_reference, rel_err):
    model = lisa_jax.load_hf(tiny_llama_dir, dtype=jnp.bfloat16)
    assert model.cfg.dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(model.params))
    ids = np.random.RandomState(3).randint(0, 128, size=(2, 12))
    logits = model(ids)
    assert logits.dtype == jnp.float32
    err = rel_err(logits, torch_logits(torch_reference(tiny_llama_dir), ids))
    print(f"\n[llama2] bf16 logits rel err: {err:.2e}")
    assert err < 0.1
    assert lisa_jax.load_hf(tiny_llama_dir, "bf16").cfg.dtype == "bfloat16"


def test_bf16_checkpoint_roundtrip(make_tiny_hf, tmp_path):
    path = make_tiny_hf("qwen2", dtype="bfloat16")
    # bf16 -> float32 is exact
    wide = lisa_jax.load_hf(path, dtype="float32")
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    w = ref.model.layers[0].self_attn.q_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(wide.params["layers"]["wq"][0]), w.T)
    # bf16 kept as bf16 and written back bit-exact
    model = lisa_jax.load_hf(path, dtype="bfloat16")
    lisa_jax.save_hf(model, tmp_path / "bf16")
    with open(tmp_path / "bf16" / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16",
                                                              dtype=torch.bfloat16)
    assert_state_dicts_identical(ref, again)


# ----------------------------------------------------------------------------- bad input


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_json(path, name, **changes):
    with open(os.path.join(path, name)) as f:
        values = json.load(f)
    values.update(changes)
    with open(os.path.join(path, name), "w") as f:
        json.dump(values, f)


def _edit_config(path, **changes):
    _edit_json(path, "config.json", **changes)


def _rewrite_weights(path, edit):
    from safetensors.numpy import load_file, save_file

    fn = os.path.join(path, "model.safetensors")
    tensors = load_file(fn)
    edit(tensors)
    save_file(tensors, fn, metadata={"format": "pt"})


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def test_error_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        lisa_jax.load_hf(tmp_path / "nope")
    assert "not a directory" in _one_line(e)


def test_error_no_config(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        lisa_jax.load_hf(tmp_path)
    msg = _one_line(e)
    assert "no config.json" in msg and str(tmp_path) in msg


def test_error_no_weights(tiny_llama_dir, tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(os.path.join(tiny_llama_dir, "config.json"), d)
    with pytest.raises(FileNotFoundError) as e:
        lisa_jax.load_hf(d)
    assert "no model.safetensors or model.safetensors.index.json" in _one_line(e)
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as e:
        lisa_jax.load_hf(d)
    assert "pytorch_model.bin" in _one_line(e) and "safetensors" in _one_line(e)


def test_error_missing_shard(tiny_llama_sharded_dir, tmp_path):
    d = _copy(tiny_llama_sharded_dir, tmp_path / "ckpt")
    os.remove(sorted(d.glob("model-*.safetensors"))[1])
    with pytest.raises(FileNotFoundError) as e:
        lisa_jax.load_hf(d)
    assert "shard files that are not there" in _one_line(e)


def test_error_corrupt_weights(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "ckpt")
    fn = d / "model.safetensors"
    os.truncate(fn, os.path.getsize(fn) - 1000)
    with pytest.raises(ValueError) as e:
        lisa_jax.load_hf(d)
    msg = _one_line(e)
    assert "not a readable safetensors file" in msg and "model.safetensors" in msg


def _hf_sliding_layers(path):
    """Per layer, whether transformers' model of ``path`` attends through a window."""
    c = transformers.AutoConfig.from_pretrained(path)
    if c.sliding_window is None:
        return (False,) * c.num_hidden_layers
    types = getattr(c, "layer_types", None) or ["sliding_attention"] * c.num_hidden_layers
    return tuple(t == "sliding_attention" for t in types)


def test_sliding_window_is_read_as_transformers_reads_it(make_tiny_hf, tmp_path):
    """Mistral's window is on every layer; Qwen2's only with ``use_sliding_window``, on the
    layers ``layer_types`` marks or else from ``max_window_layers`` on; a bad one is an error."""
    cases = [("mistral_window", {}), ("mistral", {}), ("qwen2_window", {}),
             ("qwen2_window", dict(use_sliding_window=False)),
             ("qwen2_window", dict(layer_types=None, max_window_layers=0)),
             ("qwen2_window", dict(layer_types=None, max_window_layers=2)),
             ("qwen2", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1))]
    seen = set()
    for i, (variant, edits) in enumerate(cases):
        d = _copy(make_tiny_hf(variant), tmp_path / str(i))
        _edit_config(d, **edits)
        if edits.get("layer_types", 0) is None:
            with open(d / "config.json") as f:
                values = json.load(f)
            values.pop("layer_types")
            with open(d / "config.json", "w") as f:
                json.dump(values, f)
        cfg = lisa_jax.load_hf(d).cfg
        want = _hf_sliding_layers(d)
        assert block.sliding_layers(cfg) == want, (variant, edits)
        if any(want):
            assert cfg.sliding_window == transformers.AutoConfig.from_pretrained(d).sliding_window
        seen.add(want)
    assert {(True, True), (False, False), (False, True)} <= seen
    d = _copy(make_tiny_hf("mistral_window"), tmp_path / "bad")
    _edit_config(d, sliding_window=0)
    with pytest.raises(ValueError) as e:
        lisa_jax.load_hf(d)
    assert "sliding_window must be a positive integer" in _one_line(e)
    d = _copy(make_tiny_hf("qwen2_window"), tmp_path / "bad_types")
    _edit_config(d, layer_types=["sliding_attention"])
    with pytest.raises(ValueError) as e:
        lisa_jax.load_hf(d)
    assert "layer_types must name 2 layers" in _one_line(e)


def test_error_unsupported_model_type(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "ckpt")
    _edit_config(d, model_type="gpt2")
    with pytest.raises(ValueError) as e:
        lisa_jax.load_hf(d)
    msg = _one_line(e)
    assert "'gpt2'" in msg and "llama, mistral, qwen2" in msg


def test_error_missing_and_unexpected_tensors(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "ckpt")

    def edit(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        for i in range(2):
            del t[f"model.layers.{i}.self_attn.k_proj.weight"]
        t["model.layers.0.mlp.up_proj.bias"] = np.zeros(128, np.float32)

    _rewrite_weights(d, edit)
    with pytest.raises(ValueError) as e:
        lisa_jax.load_hf(d)
    msg = _one_line(e)
    assert "missing 3 tensor(s)" in msg
    assert "model.layers.1.mlp.up_proj.weight" in msg
    assert "model.layers.0.self_attn.k_proj.weight" in msg
    assert "unexpected 1 tensor(s): model.layers.0.mlp.up_proj.bias" in msg


def test_error_many_missing_tensors_are_summarised(make_tiny_hf, tmp_path):
    # Qwen2 weights under a config that says Llama without biases: 6 unexpected biases.
    d = _copy(make_tiny_hf("qwen2"), tmp_path / "ckpt")
    _edit_config(d, model_type="llama", attention_bias=False)
    with pytest.raises(ValueError) as e:
        lisa_jax.load_hf(d)
    msg = _one_line(e)
    assert "unexpected 6 tensor(s)" in msg and "(6 in all)" in msg
    assert "model.layers.0.self_attn.k_proj.bias" in msg


def test_error_shape_mismatch(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "ckpt")
    _edit_config(d, intermediate_size=96)
    with pytest.raises(ValueError) as e:
        lisa_jax.load_hf(d)
    msg = _one_line(e)
    assert "model.layers.0.mlp.gate_proj.weight" in msg
    assert "[128, 64]" in msg and "[96, 64]" in msg


def test_error_bad_dtype_and_shard_size(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError) as e:
        lisa_jax.load_hf(tiny_llama_dir, dtype="int8")
    assert "float32, bfloat16 or float16" in _one_line(e)
    model = lisa_jax.load_hf(tiny_llama_dir)
    with pytest.raises(ValueError) as e:
        lisa_jax.save_hf(model, tmp_path / "x", max_shard_size="lots")
    assert "max_shard_size" in _one_line(e)
    with pytest.raises(FileNotFoundError) as e:
        lisa_jax.save_hf(model, tmp_path / "x", tokenizer_from=tmp_path / "none")
    assert "tokenizer_from" in _one_line(e)
    assert not (tmp_path / "x").exists()


def _shard_map(model, out, max_shard_size):
    """``{tensor: shard file}`` and ``{shard file: bytes of its tensors}`` of a save."""
    from safetensors.numpy import load_file

    lisa_jax.save_hf(model, out, max_shard_size=max_shard_size)
    index = out / "model.safetensors.index.json"
    if not index.exists():
        return {name: "model.safetensors" for name in load_file(out / "model.safetensors")}, \
            {"model.safetensors": None}
    weight_map = json.loads(index.read_text())["weight_map"]
    sizes = {fn: sum(a.nbytes for a in load_file(out / fn).values())
             for fn in set(weight_map.values())}
    return weight_map, sizes


def test_max_shard_size_units_and_greedy_shards(tiny_llama_dir, tmp_path):
    """``max_shard_size`` is bytes (an int) or a number with a decimal (KB, MB, GB) or binary
    (KiB, MiB, GiB) unit; the tensors fill each shard up to it, in order."""
    model = lisa_jax.load_hf(tiny_llama_dir)
    maps = {}
    for i, size in enumerate([32000, 32768, 40000, "32KB", "32KiB", "0.032768MB", "40 kb",
                              "2GB", "500MiB"]):
        maps[size] = _shard_map(model, tmp_path / str(i), size)
    for limit in (32000, 32768, 40000):
        weight_map, sizes = maps[limit]
        shards = sorted(sizes)
        assert len(shards) > 2
        for fn in shards:  # full up to the limit, or one tensor larger than it
            assert sizes[fn] <= limit or list(weight_map.values()).count(fn) == 1, (limit, fn)
        for a, b in zip(shards, shards[1:]):  # the next shard's tensors did not fit
            assert sizes[a] + sizes[b] > limit, (limit, a, b)
    assert maps["32KB"][0] == maps[32000][0] != maps["32KiB"][0] == maps[32768][0]
    assert maps["0.032768MB"][0] == maps[32768][0] and maps["40 kb"][0] == maps[40000][0]
    assert set(maps["2GB"][1]) == set(maps["500MiB"][1]) == {"model.safetensors"}


@pytest.mark.parametrize("overrides", [{}, dict(attention_bias=True), dict(tie_embeddings=True),
                                       dict(model_type="qwen3", qk_norm=True)],
                         ids=["llama", "bias", "tied", "qk_norm"])
def test_saved_tensor_names_and_orientation_come_from_the_block_table(
        overrides, tiny_cfg, tmp_path):
    """save_hf writes exactly one tensor per present row of ``block``'s table (a layer row once
    per layer, under ``model.layers.{i}.``), HF-oriented: ``transposed`` rows reversed."""
    from safetensors.numpy import load_file

    from lisa_jax.model import Model, init_params
    cfg = tiny_cfg(num_layers=2, **overrides)
    lisa_jax.save_hf(Model(cfg, init_params(cfg, jax.random.key(0))), tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    want = {p.hf: p for p in block.global_params(cfg)}
    want.update({f"model.layers.{i}.{p.hf}": p for p in block.layer_params(cfg)
                 for i in range(cfg.num_layers)})
    assert set(tensors) == set(want)
    for name, row in want.items():
        shape = row.shape(cfg)
        assert tensors[name].shape == (shape[::-1] if row.transposed else shape), name
    assert ("lm_head.weight" in tensors) != cfg.tie_embeddings
    assert ("model.layers.0.self_attn.q_proj.bias" in tensors) == cfg.attention_bias


def test_hf_names_in_the_block_table_are_unique():
    names = [p.name for p in block.LAYER_PARAMS + block.GLOBAL_PARAMS]
    hf_names = [p.hf for p in block.LAYER_PARAMS] + [p.hf for p in block.GLOBAL_PARAMS]
    assert len(set(names)) == len(names)
    assert len(set(hf_names)) == len(hf_names)
    assert not any(p.hf.startswith("model.layers") for p in block.LAYER_PARAMS)


def test_phi3_fused_tensors_split_on_load_and_rope_variants_refused(make_tiny_hf, tmp_path):
    """Phi-3's ``qkv_proj`` is q, k and v stacked along the output dimension, ``gate_up_proj``
    gate then up: loaded as the table's separate rows, read the same through the sharded
    loader; RoPE on part of each head and longrope are refused in one line."""
    from safetensors.numpy import load_file
    path = make_tiny_hf("phi3")
    model = lisa_jax.load_hf(path)
    cfg, lp = model.cfg, model.params["layers"]
    t = load_file(os.path.join(path, "model.safetensors"))
    qkv = t["model.layers.1.self_attn.qkv_proj.weight"]
    gate_up = t["model.layers.1.mlp.gate_up_proj.weight"]
    nq, nk = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    F = cfg.intermediate_size
    for name, want in (("wq", qkv[:nq]), ("wk", qkv[nq:nq + nk]), ("wv", qkv[nq + nk:]),
                       ("w_gate", gate_up[:F]), ("w_up", gate_up[F:])):
        np.testing.assert_array_equal(np.asarray(lp[name][1]), want.T, err_msg=name)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    sharded = lisa_jax.load_hf(path, shardings=lambda *a: dev)
    for x, y in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for i, (edits, words) in enumerate([
            (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                   "partial_rotary_factor": 0.5}), "partial_rotary_factor=0.5"),
            (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                                   "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}),
             "unsupported rope scaling 'longrope'")]):
        d = _copy(path, tmp_path / str(i))
        _edit_config(d, **edits)
        with pytest.raises(ValueError) as e:
            lisa_jax.load_hf(d)
        assert words in _one_line(e)


def test_gemma3_config_is_read_as_transformers_reads_it(make_tiny_hf, tmp_path):
    """Gemma 3's layer kinds (``layer_types``, or every ``sliding_window_pattern``-th layer
    full), θ per kind (transformers 5's ``rope_parameters`` or the older ``rope_theta`` and
    ``rope_local_base_freq``), its score scale and soft-cap; what is not implemented (attention
    soft-capping, bidirectional attention, another activation) is a one-line error."""
    path = make_tiny_hf("gemma3")
    cfg = lisa_jax.load_hf(path).cfg
    assert block.sliding_layers(cfg) == _hf_sliding_layers(path) == (True, False, True)
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling) == \
        (1e6, 1e4, ("linear", 4.0))
    assert (cfg.attn_scalar, cfg.final_softcap, cfg.tie_embeddings) == (24, 30.0, True)
    d = _copy(path, tmp_path / "old")
    with open(d / "config.json") as f:
        values = json.load(f)
    for key in ("layer_types", "rope_parameters"):
        values.pop(key)
    values.update(sliding_window_pattern=3, rope_theta=5e5, rope_local_base_freq=2e3)
    with open(d / "config.json", "w") as f:
        json.dump(values, f)
    old = lisa_jax.load_hf(d).cfg
    assert block.sliding_layers(old) == _hf_sliding_layers(d) == (True, True, False)
    ref = transformers.AutoConfig.from_pretrained(d).rope_parameters
    assert (old.rope_theta, old.rope_local_theta) == \
        (ref["full_attention"]["rope_theta"], ref["sliding_attention"]["rope_theta"])
    spelled = _copy(path, tmp_path / "hidden_act")  # the activation under Gemma 1's key
    _edit_config(spelled, hidden_activation=None, hidden_act="gelu_pytorch_tanh")
    assert lisa_jax.load_hf(spelled).cfg == cfg
    for i, (edits, words) in enumerate([
            (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping=50.0 is not supported"),
            (dict(use_bidirectional_attention=True), "use_bidirectional_attention=true"),
            (dict(hidden_activation="gelu"), "hidden_activation 'gelu' is not supported")]):
        bad = _copy(path, tmp_path / str(i))
        _edit_config(bad, **edits)
        with pytest.raises(ValueError) as e:
            lisa_jax.load_hf(bad)
        assert words in _one_line(e)
