"""The numerics every decoder block is made of: RMSNorm, RoPE, SwiGLU, attention and the LM loss.

Plain functions of arrays (a config only where a model constant is read), shared by the
forward, the LISA backward (which differentiates them with ``jax.vjp``) and cached decoding.
RMSNorm and SwiGLU carry their own backward, computed in float32 from inputs of any float dtype:
autodiff of their 16-bit forward would reduce the norm scale's gradient over every token in 16
bits and take SiLU's derivative in 16 bits.

Shapes: B batch, S sequence, D hidden, N query heads, K kv heads, H head dim, V vocabulary.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


# ----------------------------------------------------------------------------- RMSNorm


def _rms_stats(x, eps):
    """The normalized input (float32) and 1/rms."""
    x32 = x.astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return x32 * r, r


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def rms_norm(x, scale, eps: float, plus_one: bool = False):
    """RMSNorm computed in float32, returned in ``x``'s dtype (as HF Llama does). ``plus_one``
    (Gemma): the scale is ``1 + scale``, applied in float32 before the cast."""
    if plus_one:
        return (_rms_stats(x, eps)[0] * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
    return scale * _rms_stats(x, eps)[0].astype(x.dtype)


def _rms_norm_fwd(x, scale, eps, plus_one):
    return rms_norm(x, scale, eps, plus_one), (x, scale)


def _rms_norm_bwd(eps, plus_one, res, dy):
    x, scale = res
    n32, r = _rms_stats(x, eps)
    dy32 = dy.astype(jnp.float32)
    dn = dy32 * (scale.astype(jnp.float32) + (1.0 if plus_one else 0.0))
    dx = r * (dn - n32 * jnp.mean(dn * n32, axis=-1, keepdims=True))
    lead = tuple(range(x.ndim - scale.ndim))
    dscale = jnp.sum(dy32 * n32, axis=lead)
    return dx.astype(x.dtype), dscale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


# ----------------------------------------------------------------------------- SwiGLU


@jax.custom_vjp
def swiglu(a, b):
    """``silu(a) * b`` (in the inputs' dtype, as HF computes it)."""
    return jax.nn.silu(a) * b


def _swiglu_fwd(a, b):
    return swiglu(a, b), (a, b)


def _swiglu_bwd(res, g):
    a, b = res
    a32, b32, g32 = a.astype(jnp.float32), b.astype(jnp.float32), g.astype(jnp.float32)
    sig = jax.nn.sigmoid(a32)
    da = g32 * b32 * sig * (1 + a32 * (1 - sig))
    db = g32 * a32 * sig
    return da.astype(a.dtype), db.astype(b.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def _gelu_tanh(a):
    return jax.nn.gelu(a, approximate=True)


@jax.custom_vjp
def geglu(a, b):
    """``gelu_tanh(a) * b`` (Gemma's ``gelu_pytorch_tanh`` gate), like ``swiglu``: in the
    inputs' dtype, with a float32 backward."""
    return _gelu_tanh(a) * b


def _geglu_fwd(a, b):
    return geglu(a, b), (a, b)


def _geglu_bwd(res, g):
    a, b = res
    a32, b32, g32 = a.astype(jnp.float32), b.astype(jnp.float32), g.astype(jnp.float32)
    act, pullback = jax.vjp(_gelu_tanh, a32)
    return pullback(g32 * b32)[0].astype(a.dtype), (g32 * act).astype(b.dtype)


geglu.defvjp(_geglu_fwd, _geglu_bwd)


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(cfg):
    """Inverse frequencies of the rotary embedding, with Llama-3 / linear scaling applied."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    if cfg.rope_scaling is None:
        return inv
    if cfg.rope_scaling[0] == "linear":
        return inv / cfg.rope_scaling[1]
    _, factor, low_ff, high_ff, orig = cfg.rope_scaling
    low_wavelen = orig / low_ff
    high_wavelen = orig / high_ff
    wavelen = 2 * math.pi / inv
    smooth = (orig / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * inv / factor + smooth * inv
    inv_scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, inv_scaled)


def rope_tables(cfg, positions_BxS):
    """cos/sin tables ``BxSxH`` (H = head dim, the halves repeated, as HF lays them out).

    With ``cfg.rope_local_theta`` (Gemma 3: sliding-window layers rotate with their own θ,
    unscaled) each table is ``2xBxSxH``: the full layers' first, the sliding layers' second."""
    def tables(inv):
        ang = positions_BxS.astype(jnp.float32)[..., None] * inv
        ang = jnp.concatenate([ang, ang], axis=-1)
        return jnp.cos(ang), jnp.sin(ang)
    if getattr(cfg, "rope_local_theta", None) is None:
        return tables(rope_inv_freq(cfg))
    hd = cfg.head_dim
    local = 1.0 / (cfg.rope_local_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    (cos, sin), (cos_l, sin_l) = tables(rope_inv_freq(cfg)), tables(local)
    return jnp.stack([cos, cos_l]), jnp.stack([sin, sin_l])


def apply_rope(x_BxSxNxH, cos_BxSxH, sin_BxSxH):
    """Rotate-half RoPE (HF convention), in float32 and back to ``x``'s dtype."""
    x = x_BxSxNxH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rot = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_BxSxH[:, :, None, :], sin_BxSxH[:, :, None, :]
    return (x * cos + rot * sin).astype(x_BxSxNxH.dtype)


# ----------------------------------------------------------------------------- attention


DETERMINISTIC_XLA_FLAG = "--xla_gpu_deterministic_ops=true"


def deterministic_gpu_ops() -> bool:
    """Whether XLA runs with its deterministic GPU ops (``lisa-jax train --deterministic``)."""
    return DETERMINISTIC_XLA_FLAG in os.environ.get("XLA_FLAGS", "")


def attention_impl(cfg) -> str | None:
    """Which ``jax.nn.dot_product_attention`` implementation a causal, unmasked call uses.

    "auto" takes cuDNN's fused attention on a GPU with 16-bit compute, except under XLA's
    deterministic GPU ops: there the LISA backward's cuDNN attention fails to compile, and
    XLA's own attention repeats bit for bit."""
    if cfg.attention_impl != "auto":
        return cfg.attention_impl
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu and cfg.dtype in ("bfloat16", "float16") and cfg.head_dim % 8 == 0 \
            and cfg.head_dim <= 256 and not deterministic_gpu_ops():
        return "cudnn"
    return "xla"


class Segments(NamedTuple):
    """Packed rows (``--packing``): ``ids_BxS[b, t]`` numbers the example token ``t`` belongs to
    (1, 2, ... within a row; 0 for padding). Passed where a mask goes, it makes attention causal
    within each example and never across two."""

    ids_BxS: Any


def segment_positions(segment_ids_BxS):
    """Each token's position within its example: 0 at the first token of every segment.

    >>> segment_positions(jnp.array([[1, 1, 1, 2, 2, 0]])).tolist()
    [[0, 1, 2, 0, 1, 0]]
    """
    ids = segment_ids_BxS
    idx = jnp.arange(ids.shape[-1])
    starts = jnp.concatenate([jnp.ones_like(ids[:, :1], bool), ids[:, 1:] != ids[:, :-1]], 1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def attention(q_BxSxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxSxS=None, impl: str = "xla",
              window: int | None = None, scale: float | None = None):
    """Causal grouped-query attention; ``mask_BxSxS`` (bool, True = attend) for padding, or
    ``Segments`` for packed rows.

    Without a mask the causal flag alone is used: right padding needs no mask, since no real
    token attends to a later (padding) one. That keeps the cuDNN flash path for training.
    Packed rows keep ``impl`` too: the same-segment mask goes with the causal flag to
    ``jax.nn.dot_product_attention``, which hands it to cuDNN's fused kernel as a bias.

    ``window`` (Mistral's, Qwen2's and Gemma's sliding window): each query sees only the
    ``window`` latest keys, itself included, as ``local_window_size`` (which keeps cuDNN's
    fused kernel); it counts indices, so queries and keys must share them (not a KV cache's).
    ``scale``: of the scores, 1/sqrt(head dim) when None (Gemma's ``query_pre_attn_scalar``).
    """
    local = None if window is None else (window - 1, 0)
    if mask_BxSxS is None:
        return jax.nn.dot_product_attention(q_BxSxNxH, k_BxSxKxH, v_BxSxKxH, is_causal=True,
                                            implementation=impl,
                                            local_window_size=local, scale=scale)
    if isinstance(mask_BxSxS, Segments):
        ids = mask_BxSxS.ids_BxS
        same = ids[:, None, :, None] == ids[:, None, None, :]
        return jax.nn.dot_product_attention(q_BxSxNxH, k_BxSxKxH, v_BxSxKxH, mask=same,
                                            is_causal=True, implementation=impl,
                                            local_window_size=local, scale=scale)
    # Masked calls (padding on the left, KV-cache decoding) use XLA's implementation, which
    # takes an arbitrary mask; they are not on the training hot path.
    return jax.nn.dot_product_attention(q_BxSxNxH, k_BxSxKxH, v_BxSxKxH,
                                        mask=mask_BxSxS[:, None], implementation="xla",
                                        local_window_size=local, scale=scale)


def positions_and_mask(attention_mask_BxS, seq_len: int, batch: int, segment_ids_BxS=None):
    """Positions and the attention mask for an optional ``[B, S]`` 0/1 padding mask, or for
    packed rows' ``segment_ids_BxS`` (positions restart at each example; ``Segments``)."""
    if segment_ids_BxS is not None:
        return segment_positions(segment_ids_BxS), Segments(segment_ids_BxS)
    if attention_mask_BxS is None:
        return jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len)), None
    m = attention_mask_BxS.astype(bool)
    positions = jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)
    causal = jnp.tril(jnp.ones((seq_len, seq_len), bool))
    mask = causal[None] & m[:, None, :]
    # A fully padded query row would give NaN; let it see itself (its output is ignored).
    mask = mask | jnp.eye(seq_len, dtype=bool)[None]
    return positions, mask


# ----------------------------------------------------------------------------- loss


@jax.custom_vjp
def token_nll(logits_BxSxV, labels_BxS):
    """Per-token negative log-likelihood, computed in float32 from logits of any float dtype.

    The backward is written out, ``(softmax - onehot) * g`` in one elementwise pass returning a
    cotangent in the logits' dtype: autodiff of logsumexp and take_along_axis would materialize
    float32 ``[tokens, vocab]`` buffers (the upcast logits and a scattered one-hot).
    """
    return _token_nll_fwd(logits_BxSxV, labels_BxS)[0]


def _token_nll_fwd(logits, labels):
    x32 = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(x32, axis=-1)
    picked = jnp.take_along_axis(x32, labels[..., None], axis=-1)[..., 0]
    return logz - picked, (logits, labels, logz)


def _token_nll_bwd(res, g):
    logits, labels, logz = res
    probs = jnp.exp(logits.astype(jnp.float32) - logz[..., None])
    onehot = jnp.arange(logits.shape[-1]) == labels[..., None]
    d = (probs - onehot.astype(jnp.float32)) * g[..., None].astype(jnp.float32)
    return d.astype(logits.dtype), None


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


def causal_lm_loss(logits_BxSxV, input_ids_BxS, loss_mask_BxS=None):
    """Mean next-token NLL over positions whose *target* has ``loss_mask`` 1.

    ``loss_mask_BxS[b, t]`` marks whether token ``t`` is a target (so position ``t-1`` predicts
    it); ``None`` trains on every token.
    """
    nll = token_nll(logits_BxSxV[:, :-1], input_ids_BxS[:, 1:])
    if loss_mask_BxS is None:
        return jnp.mean(nll)
    w = loss_mask_BxS[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)
