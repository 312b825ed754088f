"""Autoregressive decoding with a KV cache: one prefill pass over the prompt, then one token per
step inside a ``jax.lax.while_loop`` (which exits early once every row has produced EOS).

The cache holds keys and values of every layer, ``[L, B, T, K, H]`` with ``T = S +
max_new_tokens``; step ``i`` writes its key/value at index ``S + i`` with
``lax.dynamic_update_slice``. Prompts of different lengths are left-padded, with
``attention_mask`` marking the real tokens: positions come from its cumulative sum (as in
transformers' ``generate``) and padded keys are masked out. The layer is ``block``'s stages
with a cache-aware attention stage; only the cache bookkeeping lives here.

>>> import jax, jax.numpy as jnp
>>> from lisa_jax.model import LlamaConfig, Model, init_params
>>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
...                   num_heads=2, num_kv_heads=1, head_dim=8)
>>> model = Model(cfg, init_params(cfg, jax.random.key(0)))
>>> generate(model, jnp.array([[5, 6, 7]]), max_new_tokens=4, eos_token_id=()).shape
(1, 7)
"""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from lisa_jax import layout
from lisa_jax.block import attention_scale, decoder_block, sliding_layers
from lisa_jax.model import LlamaConfig, Model, Params, embed_tokens, logits_from_hidden
from lisa_jax.ops import attention, rope_tables


def _cached_attention(cfg, cache_k, cache_v, layer, index, key_valid_BxT):
    """The attention stage over a KV cache: ``S`` new tokens at cache index ``index`` onwards.

    ``cache_k``/``cache_v`` are the whole ``[L, B, T, K, H]`` caches; this layer's new keys and
    values are written at ``[layer, :, index:index+S]`` and the queries attend to every earlier
    valid cache entry (``key_valid_BxT``: False for left padding), on a sliding-window layer
    only to the ``cfg.sliding_window`` latest. Returns ``(o, (cache_k, cache_v))``.
    """
    def attend(q, k, v):
        S, T = q.shape[1], cache_k.shape[2]
        start = (layer, 0, index, 0, 0)
        ck = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), start)
        cv = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), start)
        k_all = jax.lax.dynamic_index_in_dim(ck, layer, 0, keepdims=False)
        v_all = jax.lax.dynamic_index_in_dim(cv, layer, 0, keepdims=False)
        q_idx = index + jnp.arange(S)
        kv_idx = jnp.arange(T)
        seen = kv_idx[None, :] <= q_idx[:, None]
        if cfg.sliding_window is not None:  # cache indices count as transformers' mask does
            in_window = kv_idx[None, :] > q_idx[:, None] - cfg.sliding_window
            seen &= in_window | ~jnp.asarray(sliding_layers(cfg))[layer]
        mask = seen[None] & key_valid_BxT[:, None, :]
        # A padded query sees no valid key; let it see itself (its output is never used).
        mask = mask | (kv_idx[None, :] == q_idx[:, None])[None]
        o = attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask,
                      scale=attention_scale(cfg))
        return o, (ck, cv)
    return attend


def forward_cached(cfg: LlamaConfig, params: Params, ids_BxS, positions_BxS, cache_k, cache_v,
                   index, key_valid_BxT):
    """Run ``ids`` (at cache index ``index``) through every layer; float32 logits of the last
    position ``BxV`` and the updated caches."""
    rope = rope_tables(cfg, positions_BxS)

    def body(carry, lp_and_index):
        h, ck, cv = carry
        lp, layer = lp_and_index
        h, (ck, cv) = decoder_block(cfg, lp, h, rope,
                                    _cached_attention(cfg, ck, cv, layer, index,
                                                      key_valid_BxT), layer)
        return (h, ck, cv), None

    h = embed_tokens(cfg, params["embed"], ids_BxS)
    (h, cache_k, cache_v), _ = layout.of(params["layers"]).scan(
        body, (h, cache_k, cache_v), params["layers"])
    return logits_from_hidden(cfg, params, h[:, -1:])[:, 0], cache_k, cache_v


def sample_logits(logits_BxV, key, temperature, top_k: int | None = None,
                  top_p: float | None = None, greedy: bool = False):
    """Next token ``B`` from float32 logits: argmax when ``greedy``, else softmax sampling at
    ``temperature`` restricted to the ``top_k`` most likely tokens and then to the smallest set
    whose probability reaches ``top_p`` (nucleus)."""
    if greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = logits_BxV.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    if top_p is not None:
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        drop = mass_before >= top_p
        drop = drop.at[:, 0].set(False)
        sorted_logits = jnp.where(drop, -jnp.inf, sorted_logits)
    choice = jax.random.categorical(key, sorted_logits, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new", "greedy", "top_k", "use_top_p",
                                             "eos", "pad"))
def _generate(cfg, params, ids, mask, key, temperature, top_p, *, max_new, greedy, top_k,
              use_top_p, eos, pad):
    B, S = ids.shape
    T = S + max_new
    shape = (cfg.num_layers, B, T, cfg.num_kv_heads, cfg.head_dim)
    cache_k = jnp.zeros(shape, cfg.jnp_dtype)
    cache_v = jnp.zeros(shape, cfg.jnp_dtype)
    key_valid = jnp.concatenate([mask.astype(bool), jnp.ones((B, max_new), bool)], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)
    eos_ids = jnp.asarray(eos, jnp.int32)

    def is_eos(tok):
        return jnp.any(tok[:, None] == eos_ids[None, :], axis=-1) if eos else \
            jnp.zeros(tok.shape, bool)

    def pick(logits, key):
        return sample_logits(logits, key, temperature, top_k, top_p if use_top_p else None,
                             greedy)

    logits, cache_k, cache_v = forward_cached(cfg, params, ids, positions, cache_k, cache_v, 0,
                                              key_valid)
    key, sub = jax.random.split(key)
    tok = pick(logits, sub)
    done = is_eos(tok)
    out = jnp.full((B, max_new), pad, jnp.int32).at[:, 0].set(tok)
    pos = positions[:, -1] + 1

    def cond(state):
        i, _, done, *_ = state
        return (i < max_new) & ~jnp.all(done)

    def body(state):
        i, tok, done, out, ck, cv, pos, key = state
        logits, ck, cv = forward_cached(cfg, params, tok[:, None], pos[:, None], ck, cv,
                                        S + i - 1, key_valid)
        key, sub = jax.random.split(key)
        new = jnp.where(done, pad, pick(logits, sub))
        out = jax.lax.dynamic_update_slice(out, new[:, None], (0, i))
        return i + 1, new, done | is_eos(new), out, ck, cv, pos + 1, key

    state = (jnp.int32(1), tok, done, out, cache_k, cache_v, pos, key)
    out = jax.lax.while_loop(cond, body, state)[3]
    return jnp.concatenate([ids, out], axis=1)


def generate(model: Model, input_ids, max_new_tokens: int = 20, attention_mask=None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             key=None, eos_token_id=None, pad_token_id=None):
    """Prompt plus ``max_new_tokens`` new tokens, ``[B, S + max_new_tokens]`` int32.

    Greedy when ``temperature`` is 0, else sampling (with ``key``, a ``jax.random.key``) at that
    temperature, optionally restricted by ``top_k`` and ``top_p``. Prompts of unequal length
    must be left-padded, with ``attention_mask`` (1 = real token). A row stops at its first
    ``eos_token_id`` (an int or a sequence; ``None`` uses the model config's, ``()`` never
    stops) and is filled with ``pad_token_id`` after it (default: the config's pad token, else
    the first EOS id, else 0). A 1-D prompt gives a 1-D result.
    """
    cfg = model.cfg
    ids = np.asarray(input_ids)
    squeeze = ids.ndim == 1
    if squeeze:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, time] with time >= 1, got shape "
                         f"{list(np.shape(input_ids))}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise ValueError(f"input_ids must lie in [0, {cfg.vocab_size}), got "
                         f"[{ids.min()}, {ids.max()}]")
    if attention_mask is None:
        mask = np.ones(ids.shape, np.int32)
    else:
        mask = np.asarray(attention_mask)
        if squeeze and mask.ndim == 1:
            mask = mask[None]
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {list(mask.shape)} differs from input_ids "
                             f"shape {list(ids.shape)}")
        mask = (mask != 0).astype(np.int32)
        if not mask[:, -1].all() or (np.diff(mask, axis=1) < 0).any():
            raise ValueError("attention_mask must be left-padded (zeros only before the prompt, "
                             "the last column all ones); pad prompts on the left for generation")
    max_new = int(max_new_tokens)
    if max_new < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and int(top_k) < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    greedy = temperature == 0
    if not greedy and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key: pass "
                         "key=jax.random.key(seed)")

    if eos_token_id is None:
        eos_token_id = cfg.eos_token_id
    if eos_token_id is None:
        eos = ()
    elif isinstance(eos_token_id, (int, np.integer)):
        eos = (int(eos_token_id),)
    else:
        eos = tuple(int(e) for e in eos_token_id)
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else \
            (eos[0] if eos else 0)

    if max_new == 0:
        out = jnp.asarray(ids, jnp.int32)
        return out[0] if squeeze else out
    if key is None:
        key = jax.random.key(0)
    out = _generate(cfg, model.params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask), key,
                    jnp.float32(temperature if not greedy else 1.0),
                    jnp.float32(top_p if top_p is not None else 1.0),
                    max_new=max_new, greedy=greedy,
                    top_k=None if (greedy or top_k is None) else int(top_k),
                    use_top_p=(not greedy and top_p is not None and top_p < 1.0),
                    eos=eos, pad=int(pad_token_id))
    return out[0] if squeeze else out


def stop_token_ids(model_cfg: LlamaConfig, tokenizer=None, model_dir=None) -> tuple[int, ...]:
    """Every token id that ends a generation, each once: the tokenizer's eos, then the eos
    ids of the model config, then those of ``model_dir``'s ``generation_config.json`` (if
    given and present). Instruct checkpoints end turns with ids the tokenizer's eos misses
    (Llama 3 Instruct's end-of-turn), which their configs list."""
    ids: list[int] = []

    def add(value):
        if value is None:
            return
        for e in [value] if isinstance(value, (int, np.integer)) else value:
            if int(e) not in ids:
                ids.append(int(e))

    add(getattr(tokenizer, "eos_token_id", None))
    add(model_cfg.eos_token_id)
    if model_dir is not None:
        path = os.path.join(os.fspath(model_dir), "generation_config.json")
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    add(json.load(f).get("eos_token_id"))
            except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as e:
                raise ValueError(f"{path} is not a readable generation config ({e}); fix or "
                                 "remove it") from None
    return tuple(ids)


def truncate_at_stop(tokens, stop_ids) -> list[int]:
    """The generated ``tokens`` before the first of ``stop_ids``, as a list."""
    tokens = np.asarray(tokens).tolist()
    stops = set(int(s) for s in stop_ids)
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[:i]
    return tokens
