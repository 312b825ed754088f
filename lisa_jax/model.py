"""The Llama family as a model: its config, parameters (Flax), forward pass and a callable model.

The block itself (parameter table and stages) is ``lisa_jax.block``; this module builds the
parameters from the table with Flax Linen (whose parameters are a plain nested dict that
optax, orbax and the LISA transform consume directly) and runs the layers through the layout
(``lisa_jax.layout``: stacked ``[L, ...]`` arrays scanned, or one tree per layer).

Parameter tree (``params``), shapes with the suffix convention (V vocab, D hidden, F MLP width,
N query heads, K kv heads, H head dim, L layers)::

    embed            VxD
    layers/attn_norm LxD
    layers/wq        LxDx(N*H)     layers/bq  Lx(N*H)   (attention_bias models only, e.g. Qwen2)
    layers/wk        LxDx(K*H)     layers/bk  Lx(K*H)
    layers/wv        LxDx(K*H)     layers/bv  Lx(K*H)
    layers/wo        Lx(N*H)xD
    layers/q_norm    LxH   layers/k_norm LxH     (qk_norm models: Qwen3, Gemma 3)
    layers/mlp_norm  LxD   (Gemma 3: the attention output's norm)
    layers/ffn_norm  LxD   layers/ffn_out_norm LxD   (Gemma 3: the MLP's input and output)
    layers/w_gate    LxDxF
    layers/w_up      LxDxF
    layers/w_down    LxFxD
    final_norm       D
    lm_head          DxV           (absent when the embeddings are tied)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lisa_jax import block, layout, ops

SUPPORTED_MODEL_TYPES = tuple(block.FAMILIES)

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
    qk_norm: bool = False  # Qwen3: RMSNorm of each query and key head
    # Sliding-window attention: a query sees the ``sliding_window`` latest tokens, itself
    # included, on every layer (``layer_types`` None) or on those ``layer_types`` (one
    # "sliding_attention" or "full_attention" per layer) marks. None: full attention.
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    # Gemma 3: norm scales 1 + w, the attention's and MLP's outputs normalized too, the
    # embedding scaled by sqrt(hidden), the MLP's gate ("silu" or "gelu_pytorch_tanh"), the
    # scores scaled by attn_scalar ** -0.5 (None: head_dim's), the sliding layers' own rope θ,
    # and logits soft-capped to (-final_softcap, final_softcap).
    norm_plus_one: bool = False
    sandwich_norm: bool = False
    scale_embeddings: bool = False
    hidden_act: str = "silu"
    attn_scalar: float | None = None
    rope_local_theta: float | None = None
    final_softcap: float | None = None
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
        family = block.FAMILIES[model_type]
        rope_scaling = None
        rs, rope_theta, rope_local_theta = family.rope(hf)
        partial = (rs or {}).get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        if partial != 1.0:
            raise ValueError(f"partial_rotary_factor={partial} (RoPE on part of each head) is "
                             "not supported; only 1.0")
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
        window, layer_types = _window(*family.window(hf), hf["num_hidden_layers"])
        act = "silu"  # swish is its other name (hf.read_hf_config refuses the rest)
        if family.norm_plus_one:  # Gemma 3
            act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
            if act != "gelu_pytorch_tanh":
                raise ValueError(f"hidden_activation {act!r} is not supported for {model_type}; "
                                 "only gelu_pytorch_tanh")
            if hf.get("attn_logit_softcapping") is not None:
                raise ValueError(f"attn_logit_softcapping={hf['attn_logit_softcapping']} is not "
                                 "supported (the fused attention kernels have no soft-capping "
                                 "of scores); set it to null")
            if hf.get("use_bidirectional_attention"):
                raise ValueError("use_bidirectional_attention=true is not supported (causal "
                                 "language models only); set it to false")
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
            num_heads=num_heads, num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta or 10000.0), rope_scaling=rope_scaling,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", family.attention_bias)),
            qk_norm=family.qk_norm,
            sliding_window=window, layer_types=layer_types,
            norm_plus_one=family.norm_plus_one, sandwich_norm=family.sandwich_norm,
            scale_embeddings=family.scale_embeddings, hidden_act=act,
            attn_scalar=hf.get("query_pre_attn_scalar") if family.norm_plus_one else None,
            rope_local_theta=rope_local_theta,
            final_softcap=hf.get("final_logit_softcapping"),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            model_type=model_type, bos_token_id=hf.get("bos_token_id"), eos_token_id=eos,
            pad_token_id=hf.get("pad_token_id"), dtype=dtype)

    def to_hf(self) -> dict:
        """The ``config.json`` dict transformers needs to rebuild this architecture."""
        family = block.FAMILIES[self.model_type]
        out = dict(
            architectures=[family.architecture], model_type=self.model_type,
            vocab_size=self.vocab_size,
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
        if self.rope_scaling is not None:
            out["rope_scaling"] = block.rope_scaling_hf(self)
        out.update(family.hf_extra(self))
        for key in family.hf_drop(self):
            out.pop(key, None)
        return out


def _window(window, layer_types, num_layers: int):
    """``(sliding_window, layer_types)`` in one spelling: ``(None, None)`` when no layer
    slides, ``layer_types`` None when every layer does."""
    if window is None:
        return None, None
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"sliding_window must be a positive integer or null, got {window!r}")
    if layer_types is None:
        return window, None
    kinds = (block.SLIDING, block.FULL)
    if len(layer_types) != num_layers or not set(layer_types) <= set(kinds):
        raise ValueError(f"layer_types must name {num_layers} layers, each one of "
                         f"{', '.join(kinds)}; got {list(layer_types)}")
    if block.SLIDING not in layer_types:
        return None, None
    return window, (None if block.FULL not in layer_types else tuple(layer_types))


def weight_decay_mask(params: Params):
    """``True`` at every leaf weight decay applies to (``block.Param.decay``): the embedding,
    the head, every projection and LoRA factor; ``False`` at norm scales and biases. The same
    for stacked layers, per-layer trees and one layer's slice: matched by name, not by rank.

    >>> import jax.numpy as jnp
    >>> weight_decay_mask({"embed": jnp.ones((4, 2)), "final_norm": jnp.ones(2),
    ...                    "layers": {"mlp_norm": jnp.ones((3, 2)), "wq": jnp.ones((3, 2, 2))}})
    {'embed': True, 'final_norm': False, 'layers': {'mlp_norm': False, 'wq': True}}
    """
    def decays(path, _):
        names = [getattr(k, "key", None) for k in path]
        return all(block.PARAMS_BY_NAME[n].decay for n in names if n in block.PARAMS_BY_NAME)
    return jax.tree_util.tree_map_with_path(decays, params)


REMAT_POLICIES = {
    # What plain autodiff keeps per layer: everything, only the layer input ("full"), or the
    # outputs of matmuls without batch dimensions ("dots").
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def run_layers(cfg: LlamaConfig, layers: Params, h_BxSxD, rope, mask_BxSxS=None,
               remat: bool | str = False):
    """All layers, in either layout (``lisa_jax.layout``), for plain autodiff.

    ``remat``: False/"none", True/"full" (recompute each layer in the backward) or "dots".
    """
    def body(h, lp_and_index):
        lp, layer = lp_and_index
        return block.decoder_layer(cfg, lp, h, rope, mask_BxSxS, layer), None
    mode = {False: "none", True: "full"}.get(remat, remat)
    if mode not in REMAT_POLICIES:
        raise ValueError(f"unknown remat {remat!r}; use one of {', '.join(REMAT_POLICIES)}")
    if mode != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[mode])
    return layout.of(layers).scan(body, h_BxSxD, layers)[0]


def head_weight(params: Params):
    """The ``DxV`` output projection (the transposed embedding when tied)."""
    return params["embed"].T if "lm_head" not in params else params["lm_head"]


def embed_tokens(cfg: LlamaConfig, embed_VxD, ids_BxS):
    """The input embeddings; Gemma's scaled by sqrt(hidden), in the embedding's dtype (as HF
    does)."""
    h = embed_VxD[ids_BxS]
    if cfg.scale_embeddings:
        h = h * jnp.asarray(cfg.hidden_size ** 0.5, h.dtype)
    return h


def logits(cfg: LlamaConfig, final_norm_D, head_DxV, h_BxSxD):
    """Float32 logits from the last hidden states: final norm, head, and Gemma's
    ``final_softcap * tanh(logits / final_softcap)``."""
    x = block.norm(cfg, h_BxSxD, final_norm_D)
    out = (x @ head_DxV).astype(jnp.float32)
    if cfg.final_softcap is not None:
        out = cfg.final_softcap * jnp.tanh(out / cfg.final_softcap)
    return out


def logits_from_hidden(cfg: LlamaConfig, params: Params, h_BxSxD):
    return logits(cfg, params["final_norm"], head_weight(params), h_BxSxD)


def forward(cfg: LlamaConfig, params: Params, input_ids_BxS, attention_mask_BxS=None,
            remat: bool = False, segment_ids_BxS=None):
    """Logits ``BxSxV`` in float32; ``segment_ids_BxS`` for packed rows (``ops.Segments``)."""
    B, S = input_ids_BxS.shape
    positions, mask = ops.positions_and_mask(attention_mask_BxS, S, B, segment_ids_BxS)
    rope = ops.rope_tables(cfg, positions)
    h = embed_tokens(cfg, params["embed"], input_ids_BxS)
    h = run_layers(cfg, params["layers"], h, rope, mask, remat)
    return logits_from_hidden(cfg, params, h)


# ----------------------------------------------------------------------------- Flax module

_INIT = {"normal": nn.initializers.normal(0.02), "ones": nn.initializers.ones,
         "zeros": nn.initializers.zeros}


def _declare(module: nn.Module, cfg: LlamaConfig, rows) -> Params:
    return {p.name: module.param(p.name, _INIT[p.init_for(cfg)], p.shape(cfg), cfg.jnp_dtype)
            for p in rows}


class DecoderLayer(nn.Module):
    """One block; under ``nn.scan`` its parameters gain the leading layer axis."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, h, cos, sin, mask, layer):
        lp = _declare(self, self.cfg, block.layer_params(self.cfg))
        return block.decoder_layer(self.cfg, lp, h, (cos, sin), mask, layer), None


class LlamaForCausalLM(nn.Module):
    """The Flax module; ``init`` gives the parameter tree documented above."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, input_ids_BxS, attention_mask_BxS=None):
        cfg = self.cfg
        rows = {p.name: p for p in block.global_params(cfg)}
        embed = _declare(self, cfg, [rows["embed"]])["embed"]
        B, S = input_ids_BxS.shape
        positions, mask = ops.positions_and_mask(attention_mask_BxS, S, B)
        cos, sin = ops.rope_tables(cfg, positions)
        stack = nn.scan(DecoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
                        length=cfg.num_layers)(cfg, name="layers")
        h, _ = stack(embed_tokens(cfg, embed, input_ids_BxS), cos, sin, mask,
                     jnp.arange(cfg.num_layers))
        head = _declare(self, cfg, [r for n, r in rows.items() if n != "embed"])
        w = head["lm_head"] if "lm_head" in head else embed.T
        return logits(cfg, head["final_norm"], w, h)


def init_params(cfg: LlamaConfig, key) -> Params:
    """Random parameters (normal(0.02) weights, unit norms, zero biases) in the documented
    layout."""
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


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(cfg, params, ids, am):
    return forward(cfg, params, ids, am)
