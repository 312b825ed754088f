"""Llama-family decoder in Flax (Linen), with the transformer layers stored stacked.

Why Linen: its parameters are a plain nested dict, so optax, orbax, the LISA transform and the
custom-VJP train step (``lisa_jax.step``) all consume them directly, with no split/merge of
module state. The layers are run with ``nn.scan``, so every layer weight is one leaf with a
leading layer axis ``L`` -- the axis LISA samples from.

Parameter tree (``params``), shapes with the suffix convention of the code below
(V vocab, D hidden, F MLP width, N query heads, K kv heads, H head dim, L layers)::

    embed            VxD
    layers/attn_norm LxD
    layers/wq        LxDx(N*H)     layers/bq  Lx(N*H)   (attention_bias models only, e.g. Qwen2)
    layers/wk        LxDx(K*H)     layers/bk  Lx(K*H)
    layers/wv        LxDx(K*H)     layers/bv  Lx(K*H)
    layers/wo        Lx(N*H)xD
    layers/mlp_norm  LxD
    layers/w_gate    LxDxF
    layers/w_up      LxDxF
    layers/w_down    LxFxD
    final_norm       D
    lm_head          DxV           (absent when the embeddings are tied)

The math lives in plain functions (``rms_norm``, ``apply_rope``, ``attention``,
``decoder_layer``) so that the fast train step can reuse them in its hand-written backward.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The architecture, read from an HF ``config.json``; hashable so jit can key on it."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings),
    # ("linear", factor) or None. A tuple, not a dict, to stay hashable.
    rope_scaling: tuple | None = None
    tie_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 4096
    model_type: str = "llama"
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    # Parameters and activations; logits and the loss are always float32.
    dtype: str = "float32"
    # "auto": cuDNN flash attention on a GPU with 16-bit compute, XLA's otherwise.
    attention_impl: str = "auto"

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @classmethod
    def from_hf(cls, hf: dict, dtype: str = "float32") -> "LlamaConfig":
        model_type = hf.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        rope_scaling = None
        rs = hf.get("rope_scaling") or None
        rope_theta = hf.get("rope_theta")
        if rs is None and isinstance(hf.get("rope_parameters"), dict):
            # transformers 5 folds rope_theta and rope_scaling into rope_parameters.
            rs = dict(hf["rope_parameters"])
            rope_theta = rs.get("rope_theta", rope_theta)
        if rs is not None:
            kind = rs.get("rope_type", rs.get("type", "default"))
            if kind == "llama3":
                rope_scaling = ("llama3", float(rs["factor"]), float(rs["low_freq_factor"]),
                                float(rs["high_freq_factor"]),
                                int(rs["original_max_position_embeddings"]))
            elif kind == "linear":
                rope_scaling = ("linear", float(rs["factor"]))
            elif kind != "default":
                raise ValueError(f"unsupported rope scaling {kind!r}; supported: llama3, linear")
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            eos = tuple(eos)
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
            num_heads=num_heads, num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta or 10000.0), rope_scaling=rope_scaling,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            model_type=model_type, bos_token_id=hf.get("bos_token_id"), eos_token_id=eos,
            pad_token_id=hf.get("pad_token_id"), dtype=dtype)

    def to_hf(self) -> dict:
        """The ``config.json`` dict transformers needs to rebuild this architecture."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM"}[self.model_type]
        out = dict(
            architectures=[arch], model_type=self.model_type, vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
            tie_word_embeddings=self.tie_embeddings,
            max_position_embeddings=self.max_position_embeddings, hidden_act="silu",
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id,
            pad_token_id=self.pad_token_id,
            torch_dtype="bfloat16" if self.dtype == "bfloat16" else "float32")
        if self.model_type == "llama":
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = False
        if self.rope_scaling is not None:
            if self.rope_scaling[0] == "llama3":
                _, f, lo, hi, orig = self.rope_scaling
                out["rope_scaling"] = dict(rope_type="llama3", factor=f, low_freq_factor=lo,
                                           high_freq_factor=hi,
                                           original_max_position_embeddings=orig)
            else:
                out["rope_scaling"] = dict(rope_type="linear", factor=self.rope_scaling[1])
        return out

    def replace(self, **kw) -> "LlamaConfig":
        return dataclasses.replace(self, **kw)


# ----------------------------------------------------------------------------- building blocks


def rms_norm(x, scale, eps: float):
    """RMSNorm computed in float32, returned in ``x``'s dtype (as HF Llama does)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale * x32.astype(x.dtype)


def rope_inv_freq(cfg: LlamaConfig):
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


def rope_tables(cfg: LlamaConfig, positions_BxS):
    """cos/sin tables ``BxSxH`` (H = head dim, the halves repeated, as HF lays them out)."""
    ang = positions_BxS.astype(jnp.float32)[..., None] * rope_inv_freq(cfg)
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x_BxSxNxH, cos_BxSxH, sin_BxSxH):
    """Rotate-half RoPE (HF convention), in float32 and back to ``x``'s dtype."""
    x = x_BxSxNxH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rot = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_BxSxH[:, :, None, :], sin_BxSxH[:, :, None, :]
    return (x * cos + rot * sin).astype(x_BxSxNxH.dtype)


def attention_impl(cfg: LlamaConfig) -> str | None:
    """Which ``jax.nn.dot_product_attention`` implementation a causal, unmasked call uses."""
    if cfg.attention_impl != "auto":
        return cfg.attention_impl
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu and cfg.dtype in ("bfloat16", "float16") and cfg.head_dim % 8 == 0 \
            and cfg.head_dim <= 256:
        return "cudnn"
    return "xla"


def attention(q_BxSxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxSxS=None, impl: str = "xla"):
    """Causal grouped-query attention; ``mask_BxSxS`` (bool, True = attend) for padding.

    Without a mask the causal flag alone is used: right padding needs no mask, since no real
    token attends to a later (padding) one. That keeps the cuDNN flash path for training.
    """
    if mask_BxSxS is None:
        return jax.nn.dot_product_attention(q_BxSxNxH, k_BxSxKxH, v_BxSxKxH, is_causal=True,
                                            implementation=impl)
    # Masked calls (padding on the left, KV-cache decoding) use XLA's implementation, which
    # takes an arbitrary mask; they are not on the training hot path.
    return jax.nn.dot_product_attention(q_BxSxNxH, k_BxSxKxH, v_BxSxKxH,
                                        mask=mask_BxSxS[:, None], implementation="xla")


# Leaves AdamW does not decay: norm scales and biases (HF Trainer exempts LayerNorm weights and
# biases the same way). Matched by name, not by rank, since a stacked norm ``[L, D]`` has the
# rank of a matrix while one layer's slice of a matrix (a LISA slot) has the rank it always has.
NO_WEIGHT_DECAY = ("attn_norm", "mlp_norm", "final_norm", "bq", "bk", "bv")


def weight_decay_mask(params: Params):
    """``True`` at every leaf weight decay applies to: the embedding, the head, every projection
    and LoRA factor; ``False`` at norm scales and biases. The same for stacked layers, per-layer
    trees and one layer's slice.

    >>> import jax.numpy as jnp
    >>> weight_decay_mask({"embed": jnp.ones((4, 2)), "final_norm": jnp.ones(2),
    ...                    "layers": {"mlp_norm": jnp.ones((3, 2)), "wq": jnp.ones((3, 2, 2))}})
    {'embed': True, 'final_norm': False, 'layers': {'mlp_norm': False, 'wq': True}}
    """
    def decays(path, _):
        return not any(getattr(k, "key", None) in NO_WEIGHT_DECAY for k in path)
    return jax.tree_util.tree_map_with_path(decays, params)


def layer_params_names(cfg: LlamaConfig) -> tuple[str, ...]:
    names = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")
    if cfg.attention_bias:
        names += ("bq", "bk", "bv")
    return names


def qkv(cfg: LlamaConfig, lp: Params, x_BxSxD, cos, sin):
    """Projections and RoPE: q ``BxSxNxH``, k and v ``BxSxKxH``."""
    B, S, _ = x_BxSxD.shape
    q, k, v = x_BxSxD @ lp["wq"], x_BxSxD @ lp["wk"], x_BxSxD @ lp["wv"]
    if cfg.attention_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    q = apply_rope(q.reshape(B, S, cfg.num_heads, cfg.head_dim), cos, sin)
    k = apply_rope(k.reshape(B, S, cfg.num_kv_heads, cfg.head_dim), cos, sin)
    v = v.reshape(B, S, cfg.num_kv_heads, cfg.head_dim)
    return q, k, v


def mlp(lp: Params, x_BxSxD):
    return (jax.nn.silu(x_BxSxD @ lp["w_gate"]) * (x_BxSxD @ lp["w_up"])) @ lp["w_down"]


def decoder_layer(cfg: LlamaConfig, lp: Params, h_BxSxD, cos, sin, mask_BxSxS=None):
    """One pre-norm Llama block on one layer's parameters ``lp`` (no layer axis)."""
    B, S, D = h_BxSxD.shape
    x = rms_norm(h_BxSxD, lp["attn_norm"], cfg.rms_norm_eps)
    q, k, v = qkv(cfg, lp, x, cos, sin)
    o = attention(q, k, v, mask_BxSxS, attention_impl(cfg))
    h = h_BxSxD + o.reshape(B, S, -1) @ lp["wo"]
    x = rms_norm(h, lp["mlp_norm"], cfg.rms_norm_eps)
    return h + mlp(lp, x)


def positions_and_mask(attention_mask_BxS, seq_len: int, batch: int):
    """Positions and the attention mask for an optional ``[B, S]`` 0/1 padding mask."""
    if attention_mask_BxS is None:
        return jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len)), None
    m = attention_mask_BxS.astype(bool)
    positions = jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)
    causal = jnp.tril(jnp.ones((seq_len, seq_len), bool))
    mask = causal[None] & m[:, None, :]
    # A fully padded query row would give NaN; let it see itself (its output is ignored).
    mask = mask | jnp.eye(seq_len, dtype=bool)[None]
    return positions, mask


REMAT_POLICIES = {
    # What plain autodiff keeps per layer: everything, only the layer input ("full"), or the
    # outputs of matmuls without batch dimensions ("dots").
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def run_layers(cfg: LlamaConfig, layers: Params, h_BxSxD, cos, sin, mask_BxSxS=None,
               remat: bool | str = False):
    """All layers of the stack, scanned over the leading axis of ``layers``; or, for a
    sequence of per-layer trees (``lisa_jax.layer_list``), one after another.

    ``remat``: False/"none", True/"full" (recompute each layer in the backward) or "dots".
    """
    def body(h, lp):
        return decoder_layer(cfg, lp, h, cos, sin, mask_BxSxS), None
    mode = {False: "none", True: "full"}.get(remat, remat)
    if mode not in REMAT_POLICIES:
        raise ValueError(f"unknown remat {remat!r}; use one of {', '.join(REMAT_POLICIES)}")
    if mode != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[mode])
    if isinstance(layers, (list, tuple)):
        h = h_BxSxD
        for lp in layers:
            h = body(h, lp)[0]
        return h
    return jax.lax.scan(body, h_BxSxD, layers)[0]


def head_weight(params: Params):
    """The ``DxV`` output projection (the transposed embedding when tied)."""
    return params["embed"].T if "lm_head" not in params else params["lm_head"]


def logits_from_hidden(cfg: LlamaConfig, params: Params, h_BxSxD):
    x = rms_norm(h_BxSxD, params["final_norm"], cfg.rms_norm_eps)
    return (x @ head_weight(params)).astype(jnp.float32)


def forward(cfg: LlamaConfig, params: Params, input_ids_BxS, attention_mask_BxS=None,
            remat: bool = False):
    """Logits ``BxSxV`` in float32."""
    B, S = input_ids_BxS.shape
    positions, mask = positions_and_mask(attention_mask_BxS, S, B)
    cos, sin = rope_tables(cfg, positions)
    h = params["embed"][input_ids_BxS]
    h = run_layers(cfg, params["layers"], h, cos, sin, mask, remat)
    return logits_from_hidden(cfg, params, h)


@jax.custom_vjp
def token_nll(logits_BxSxV, labels_BxS):
    """Per-token negative log-likelihood, computed in float32 from logits of any float dtype.

    The backward is written out, ``(softmax - onehot) * g`` in one elementwise pass returning a
    cotangent in the logits' dtype: autodiff of logsumexp and take_along_axis would materialize
    float32 ``[tokens, vocab]`` buffers (the upcast logits and a scattered one-hot), about 1 GB
    at 4096 tokens and a 32k vocabulary.
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


# ----------------------------------------------------------------------------- Flax module


class DecoderLayer(nn.Module):
    """One block; under ``nn.scan`` its parameters gain the leading layer axis."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, h, cos, sin, mask):
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        D, F, N, K, H = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                         cfg.num_kv_heads, cfg.head_dim)
        init = nn.initializers.normal(0.02)
        lp = {
            "attn_norm": self.param("attn_norm", nn.initializers.ones, (D,), dt),
            "wq": self.param("wq", init, (D, N * H), dt),
            "wk": self.param("wk", init, (D, K * H), dt),
            "wv": self.param("wv", init, (D, K * H), dt),
            "wo": self.param("wo", init, (N * H, D), dt),
            "mlp_norm": self.param("mlp_norm", nn.initializers.ones, (D,), dt),
            "w_gate": self.param("w_gate", init, (D, F), dt),
            "w_up": self.param("w_up", init, (D, F), dt),
            "w_down": self.param("w_down", init, (F, D), dt),
        }
        if cfg.attention_bias:
            for name, width in (("bq", N * H), ("bk", K * H), ("bv", K * H)):
                lp[name] = self.param(name, nn.initializers.zeros, (width,), dt)
        return decoder_layer(cfg, lp, h, cos, sin, mask), None


class LlamaForCausalLM(nn.Module):
    """The Flax module; ``init`` gives the parameter tree documented above."""

    cfg: LlamaConfig
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids_BxS, attention_mask_BxS=None):
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        B, S = input_ids_BxS.shape
        embed = self.param("embed", nn.initializers.normal(0.02),
                           (cfg.vocab_size, cfg.hidden_size), dt)
        positions, mask = positions_and_mask(attention_mask_BxS, S, B)
        cos, sin = rope_tables(cfg, positions)
        layer = DecoderLayer
        if self.remat:
            layer = nn.remat(layer)
        stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                        length=cfg.num_layers)(cfg, name="layers")
        h, _ = stack(embed[input_ids_BxS], cos, sin, mask)
        final_norm = self.param("final_norm", nn.initializers.ones, (cfg.hidden_size,), dt)
        x = rms_norm(h, final_norm, cfg.rms_norm_eps)
        if cfg.tie_embeddings:
            w = embed.T
        else:
            w = self.param("lm_head", nn.initializers.normal(0.02),
                           (cfg.hidden_size, cfg.vocab_size), dt)
        return (x @ w).astype(jnp.float32)


def init_params(cfg: LlamaConfig, key) -> Params:
    """Random parameters (normal(0.02) weights, unit norms) in the documented layout."""
    ids = jnp.zeros((1, 2), jnp.int32)
    return LlamaForCausalLM(cfg).init(key, ids)["params"]


@dataclasses.dataclass
class Model:
    """A config and its parameters; call it for logits.

    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
    ...                   num_heads=2, num_kv_heads=1, head_dim=8)
    >>> model = Model(cfg, init_params(cfg, jax.random.key(0)))
    >>> model(jnp.zeros((1, 5), jnp.int32)).shape
    (1, 5, 32)
    """

    cfg: LlamaConfig
    params: Params

    def __call__(self, input_ids, attention_mask=None):
        ids = jnp.asarray(input_ids)
        am = None if attention_mask is None else jnp.asarray(attention_mask)
        return _jit_forward(self.cfg, self.params, ids, am)

    @property
    def num_layers(self) -> int:
        return self.cfg.num_layers


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(cfg, params, ids, am):
    return forward(cfg, params, ids, am)
