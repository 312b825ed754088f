"""lisa_jax.generate: KV-cache decoding against transformers' generate, sampling and EOS."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lisa_jax
from lisa_jax.generate import sample_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

NEW = 20
EOS = 2  # every tiny checkpoint's eos_token_id (and the pad id used after it)


def hf_greedy(ref, ids, mask):
    with torch.no_grad():
        out = ref.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                           max_new_tokens=NEW, do_sample=False, pad_token_id=EOS)
    return out.numpy()


def assert_same_tokens(ours, theirs):
    """transformers stops once every row has hit EOS; we always return max_new tokens."""
    ours = np.asarray(ours)
    assert ours.shape[1] >= theirs.shape[1]
    np.testing.assert_array_equal(ours[:, :theirs.shape[1]], theirs)
    assert (ours[:, theirs.shape[1]:] == EOS).all()


def test_greedy_matches_transformers(hf_variant, make_tiny_hf, torch_reference):
    path = make_tiny_hf(hf_variant)
    model = lisa_jax.load_hf(path)
    ref = torch_reference(path)
    rng = np.random.RandomState(5)
    V = model.cfg.vocab_size

    ids1 = rng.randint(3, V, size=(1, 7))
    ours1 = lisa_jax.generate(model, ids1, max_new_tokens=NEW)
    assert ours1.shape == (1, 7 + NEW)
    assert_same_tokens(ours1, hf_greedy(ref, ids1, np.ones_like(ids1)))

    ids2 = rng.randint(3, V, size=(2, 9))
    mask2 = np.ones_like(ids2)
    mask2[1, :3] = 0
    ids2[1, :3] = EOS
    ours2 = lisa_jax.generate(model, ids2, max_new_tokens=NEW, attention_mask=mask2)
    assert ours2.shape == (2, 9 + NEW)
    assert_same_tokens(ours2, hf_greedy(ref, ids2, mask2))
    # the padded row continues exactly as it does on its own
    alone = hf_greedy(ref, ids2[1:, 3:], mask2[1:, 3:])
    n = alone.shape[1] - 6
    np.testing.assert_array_equal(np.asarray(ours2)[1, 9:9 + n], alone[0, 6:])


def test_cache_agrees_with_full_forward(tiny_llama_dir):
    """Greedy tokens are the argmax of a cache-free forward over the generated sequence."""
    model = lisa_jax.load_hf(tiny_llama_dir)
    ids = np.random.RandomState(6).randint(3, 128, size=(2, 6))
    mask = np.ones_like(ids)
    mask[0, :2] = 0
    out = np.asarray(lisa_jax.generate(model, ids, max_new_tokens=10, attention_mask=mask,
                                       eos_token_id=()))
    full_mask = np.concatenate([mask, np.ones((2, 10), mask.dtype)], axis=1)
    logits = np.asarray(model(out, attention_mask=full_mask))
    np.testing.assert_array_equal(logits[:, 5:-1].argmax(-1), out[:, 6:])


def test_eos_stops_each_row(tiny_llama_dir):
    model = lisa_jax.load_hf(tiny_llama_dir)
    ids = np.random.RandomState(7).randint(3, 128, size=(2, 6))
    free = np.asarray(lisa_jax.generate(model, ids, max_new_tokens=10, eos_token_id=()))
    stop = int(free[0, 6 + 3])  # row 0 emits this token at step 3
    out = np.asarray(lisa_jax.generate(model, ids, max_new_tokens=10, eos_token_id=[stop, 127],
                                       pad_token_id=0))
    for row in range(2):
        gen = free[row, 6:]
        hits = np.flatnonzero(np.isin(gen, [stop, 127]))
        end = hits[0] + 1 if hits.size else len(gen)
        np.testing.assert_array_equal(out[row, 6:6 + end], gen[:end])
        assert (out[row, 6 + end:] == 0).all()
    assert (out[0, 6 + 4:] == 0).all()


def test_sampling(tiny_llama_dir):
    model = lisa_jax.load_hf(tiny_llama_dir)
    ids = np.random.RandomState(8).randint(3, 128, size=(2, 6))
    greedy = np.asarray(lisa_jax.generate(model, ids, max_new_tokens=10, eos_token_id=()))
    key = jax.random.key(0)
    kw = dict(max_new_tokens=10, eos_token_id=(), key=key)
    # top_k=1 and a tiny top_p both reduce sampling to argmax
    np.testing.assert_array_equal(
        lisa_jax.generate(model, ids, temperature=0.7, top_k=1, **kw), greedy)
    np.testing.assert_array_equal(
        lisa_jax.generate(model, ids, temperature=0.7, top_p=1e-6, **kw), greedy)
    a = np.asarray(lisa_jax.generate(model, ids, temperature=2.0, **kw))
    b = np.asarray(lisa_jax.generate(model, ids, temperature=2.0, **kw))
    kw["key"] = jax.random.key(1)
    c = np.asarray(lisa_jax.generate(model, ids, temperature=2.0, **kw))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != greedy).any()
    np.testing.assert_array_equal(a[:, :6], ids)


def test_sample_logits_filters():
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]] * 4000))
    keys = jax.random.split(jax.random.key(0), 1)[0]
    draw = lambda **kw: np.asarray(sample_logits(logits, keys, jnp.float32(1.0), **kw))
    assert set(draw(top_k=2)) == {1, 3}
    assert set(draw(top_p=0.7)) == {1, 3}          # 0.5 + 0.3 reaches 0.7
    assert set(draw(top_p=0.85)) == {1, 3, 2}      # 0.8 < 0.85: the 0.15 token is needed
    freq = np.bincount(draw(), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.05, 0.5, 0.15, 0.3], atol=0.03)
    np.testing.assert_array_equal(draw(greedy=True), 1)


def test_bf16_generate(make_tiny_hf):
    model = lisa_jax.load_hf(make_tiny_hf("qwen2"), dtype=jnp.bfloat16)
    ids = np.array([[5, 6, 7], [0, 8, 9]])
    out = np.asarray(lisa_jax.generate(model, ids, max_new_tokens=6,
                                       attention_mask=np.array([[1, 1, 1], [0, 1, 1]])))
    assert out.shape == (2, 9) and out.dtype == np.int32
    assert ((out >= 0) & (out < model.cfg.vocab_size)).all()


def test_generate_errors(tiny_llama_dir):
    model = lisa_jax.load_hf(tiny_llama_dir)
    ids = np.array([[5, 6, 7]])
    with pytest.raises(ValueError, match="left-padded"):
        lisa_jax.generate(model, ids, attention_mask=np.array([[1, 1, 0]]))
    with pytest.raises(ValueError, match="key=jax.random.key"):
        lisa_jax.generate(model, ids, temperature=1.0)
    with pytest.raises(ValueError, match="top_p"):
        lisa_jax.generate(model, ids, temperature=1.0, top_p=1.5, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"\[0, 128\)"):
        lisa_jax.generate(model, np.array([[5, 200]]))
    out = lisa_jax.generate(model, np.array([5, 6, 7]), max_new_tokens=0)
    np.testing.assert_array_equal(out, [5, 6, 7])


def test_stop_token_ids_join_tokenizer_config_and_generation_config(tiny_llama_dir, tmp_path):
    import dataclasses
    import json
    import shutil

    from lisa_jax import data as data_lib
    from lisa_jax.generate import stop_token_ids, truncate_at_stop

    d = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    with open(d / "generation_config.json") as f:
        gen = json.load(f)
    with open(d / "generation_config.json", "w") as f:
        json.dump({**gen, "eos_token_id": [2, 9]}, f)
    model = lisa_jax.load_hf(d)
    tok = data_lib.load_tokenizer(d)
    assert stop_token_ids(model.cfg, tok) == (2,)
    assert stop_token_ids(model.cfg, tok, d) == (2, 9)
    listed = dataclasses.replace(model.cfg, eos_token_id=(11, 2))
    assert stop_token_ids(listed, tok, d) == (2, 11, 9)  # each once, the tokenizer's first
    assert stop_token_ids(listed, None) == (11, 2)
    assert truncate_at_stop([5, 6, 9, 2, 7], (2, 9)) == [5, 6]
    assert truncate_at_stop(np.array([5, 6]), (2, 9)) == [5, 6]
