"""The Llama-family decoder block, described once: its parameter table and its stages.

A family is two lists here. ``LAYER_PARAMS`` and ``GLOBAL_PARAMS`` have one row per parameter:
its shape, its Hugging Face name and orientation, the dimension tensor parallelism splits, and
whether LoRA targets it and weight decay applies. ``STAGES`` is the layer's math as a chain of
small functions between named activations (``h -> x1 -> q, k, v -> o -> hm -> x2 -> a, b ->
out``). Everything else follows from the two: ``model`` builds parameters and runs the stages,
``hf`` maps names, ``sharding`` derives its rules, ``lora`` its targets, ``generate`` runs the
stages with a cache-aware attention, and the LISA backward (``stack_vjp``) differentiates each
stage with ``jax.vjp``: activation gradients always, weight gradients only for sampled layers.
A variant (a bias, q/k norms, another activation) is a row here and a line in its stage.

Shapes: B batch, S sequence, D hidden, F MLP width, N query heads, K kv heads, H head dim.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from lisa_jax import ops

Params = dict[str, Any]


def _always(cfg) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter leaf of the family (a layer leaf: one layer's slice, no layer axis)."""

    name: str
    shape: Callable[[Any], tuple[int, ...]]
    hf: str                  # HF tensor name (after "model.layers.{i}." for a layer leaf)
    transposed: bool = False  # HF stores Linear weights [out, in]; here they are [in, out]
    init: str = "normal"     # normal(0.02), ones or zeros
    tp_dim: int | None = None  # the dimension tensor parallelism splits
    heads: str | None = None   # what tp_dim is made of: "q" (query heads) or "kv" heads
    lora: bool = False        # a default LoRA target
    decay: bool = True        # AdamW's weight decay applies (not to norm scales and biases)
    present: Callable[[Any], bool] = _always

    @property
    def rank(self) -> int:
        return len(self.shape(_UNIT_SIZES))


# Every size a shape reads, 1: enough to learn a row's rank without a config.
_UNIT_SIZES = type("UnitSizes", (), {"__getattr__": lambda self, name: 1})()


def _d(c):
    return (c.hidden_size,)


LAYER_PARAMS = (
    Param("attn_norm", _d, "input_layernorm.weight", init="ones", decay=False),
    Param("wq", lambda c: (c.hidden_size, c.num_heads * c.head_dim), "self_attn.q_proj.weight",
          True, tp_dim=1, heads="q", lora=True),
    Param("wk", lambda c: (c.hidden_size, c.num_kv_heads * c.head_dim),
          "self_attn.k_proj.weight", True, tp_dim=1, heads="kv", lora=True),
    Param("wv", lambda c: (c.hidden_size, c.num_kv_heads * c.head_dim),
          "self_attn.v_proj.weight", True, tp_dim=1, heads="kv", lora=True),
    Param("wo", lambda c: (c.num_heads * c.head_dim, c.hidden_size), "self_attn.o_proj.weight",
          True, tp_dim=0, heads="q", lora=True),
    Param("mlp_norm", _d, "post_attention_layernorm.weight", init="ones", decay=False),
    Param("w_gate", lambda c: (c.hidden_size, c.intermediate_size), "mlp.gate_proj.weight",
          True, tp_dim=1, lora=True),
    Param("w_up", lambda c: (c.hidden_size, c.intermediate_size), "mlp.up_proj.weight", True,
          tp_dim=1, lora=True),
    Param("w_down", lambda c: (c.intermediate_size, c.hidden_size), "mlp.down_proj.weight",
          True, tp_dim=0, lora=True),
    Param("bq", lambda c: (c.num_heads * c.head_dim,), "self_attn.q_proj.bias", init="zeros",
          tp_dim=0, heads="q", decay=False, present=lambda c: c.attention_bias),
    Param("bk", lambda c: (c.num_kv_heads * c.head_dim,), "self_attn.k_proj.bias",
          init="zeros", tp_dim=0, heads="kv", decay=False, present=lambda c: c.attention_bias),
    Param("bv", lambda c: (c.num_kv_heads * c.head_dim,), "self_attn.v_proj.bias",
          init="zeros", tp_dim=0, heads="kv", decay=False, present=lambda c: c.attention_bias),
    # Qwen3: RMSNorm of each query and key head before RoPE.
    Param("q_norm", lambda c: (c.head_dim,), "self_attn.q_norm.weight", init="ones",
          decay=False, present=lambda c: c.qk_norm),
    Param("k_norm", lambda c: (c.head_dim,), "self_attn.k_norm.weight", init="ones",
          decay=False, present=lambda c: c.qk_norm),
)

GLOBAL_PARAMS = (
    Param("embed", lambda c: (c.vocab_size, c.hidden_size), "model.embed_tokens.weight",
          tp_dim=0),
    Param("final_norm", _d, "model.norm.weight", init="ones", decay=False),
    Param("lm_head", lambda c: (c.hidden_size, c.vocab_size), "lm_head.weight", True,
          tp_dim=1, present=lambda c: not c.tie_embeddings),
)

PARAMS_BY_NAME = {p.name: p for p in LAYER_PARAMS + GLOBAL_PARAMS}
LORA_TARGETS = tuple(p.name for p in LAYER_PARAMS if p.lora)


def layer_params(cfg) -> tuple[Param, ...]:
    """The rows of ``cfg``'s layer, in the order the layer's parameters are created."""
    return tuple(p for p in LAYER_PARAMS if p.present(cfg))


def global_params(cfg) -> tuple[Param, ...]:
    return tuple(p for p in GLOBAL_PARAMS if p.present(cfg))


# ----------------------------------------------------------------------------- model types


@dataclasses.dataclass(frozen=True)
class Family:
    """What an HF ``model_type`` adds to the table: its class name, defaults and the keys
    its ``config.json`` carries beyond the common ones. ``window(hf)`` reads the sliding
    window: ``(window, layer_types)`` as in transformers (``None, None``: full attention).
    ``fused``: checkpoint tensors holding several rows, concatenated along HF's output
    dimension (``(HF name after "model.layers.{i}.", row names in order)``); they are split
    on load and joined again on export."""

    architecture: str
    attention_bias: bool = False
    qk_norm: bool = False
    hf_extra: Callable[[Any], dict] = lambda cfg: {}
    hf_drop: Callable[[Any], tuple[str, ...]] = lambda cfg: ()
    window: Callable[[dict], tuple] = lambda hf: (None, None)
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()


SLIDING, FULL = "sliding_attention", "full_attention"


def sliding_layers(cfg) -> tuple[bool, ...]:
    """Per layer, whether it attends through the sliding window (``cfg.sliding_window``
    tokens, itself included): every layer when ``cfg.layer_types`` is None, else those typed
    ``sliding_attention``."""
    if cfg.sliding_window is None:
        return (False,) * cfg.num_layers
    if cfg.layer_types is None:
        return (True,) * cfg.num_layers
    return tuple(t == SLIDING for t in cfg.layer_types)


def _mistral_window(hf):
    """Mistral: every layer slides when ``sliding_window`` is set."""
    return hf.get("sliding_window"), None


def _qwen_window(hf):
    """Qwen2/Qwen3: only with ``use_sliding_window``, on the layers ``layer_types`` marks, or
    by default those from ``max_window_layers`` on (transformers' ``Qwen2Config``)."""
    if not hf.get("use_sliding_window", False) or hf.get("sliding_window") is None:
        return None, None
    types = hf.get("layer_types") or [
        SLIDING if i >= hf.get("max_window_layers", 28) else FULL
        for i in range(hf["num_hidden_layers"])]
    return hf["sliding_window"], types


def _mistral_extra(cfg):
    if cfg.layer_types is not None:
        raise ValueError(f"{cfg.model_type} slides on every layer or none; layer_types cannot "
                         f"be exported as {FAMILIES[cfg.model_type].architecture} (use qwen2)")
    return {"sliding_window": cfg.sliding_window}


def _qwen_window_extra(cfg):
    if cfg.sliding_window is None:
        return {"use_sliding_window": False}
    flags = sliding_layers(cfg)
    return {"use_sliding_window": True, "sliding_window": cfg.sliding_window,
            "max_window_layers": flags.index(True),
            "layer_types": [SLIDING if f else FULL for f in flags]}


FAMILIES = {
    "llama": Family("LlamaForCausalLM",
                    hf_extra=lambda cfg: {"attention_bias": cfg.attention_bias,
                                          "mlp_bias": False}),
    "mistral": Family("MistralForCausalLM", hf_extra=_mistral_extra, window=_mistral_window),
    # Qwen2Config has no head_dim: it is hidden // heads.
    "qwen2": Family("Qwen2ForCausalLM", attention_bias=True, hf_extra=_qwen_window_extra,
                    hf_drop=lambda cfg: ("head_dim",) if
                    cfg.head_dim * cfg.num_heads == cfg.hidden_size else (),
                    window=_qwen_window),
    "qwen3": Family("Qwen3ForCausalLM", qk_norm=True,
                    hf_extra=lambda cfg: {"attention_bias": cfg.attention_bias,
                                          **_qwen_window_extra(cfg)},
                    window=_qwen_window),
    # Phi-3: Llama with q/k/v in one tensor and gate/up in another; Mistral's window.
    "phi3": Family("Phi3ForCausalLM", hf_extra=_mistral_extra, window=_mistral_window,
                   hf_drop=lambda cfg: ("head_dim",) if
                   cfg.head_dim * cfg.num_heads == cfg.hidden_size else (),
                   fused=(("self_attn.qkv_proj.weight", ("wq", "wk", "wv")),
                          ("mlp.gate_up_proj.weight", ("w_gate", "w_up")))),
}


# ----------------------------------------------------------------------------- the stages
# Each stage is ``fn(cfg, lp, rope, *inputs) -> outputs`` on one layer's parameters ``lp``;
# ``rope`` is the (cos, sin) pair of the positions. The attention stage has no weights: its
# function is given by the caller (causal, masked, or over a KV cache).


class Stage(NamedTuple):
    fn: Callable | None  # None: the attention, supplied by the caller
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def _attn_norm(cfg, lp, rope, h_BxSxD):
    return (ops.rms_norm(h_BxSxD, lp["attn_norm"], cfg.rms_norm_eps),)


def _qkv(cfg, lp, rope, x_BxSxD):
    """Projections (and biases) and RoPE: q ``BxSxNxH``, k and v ``BxSxKxH``."""
    B, S, _ = x_BxSxD.shape
    q, k, v = x_BxSxD @ lp["wq"], x_BxSxD @ lp["wk"], x_BxSxD @ lp["wv"]
    if cfg.attention_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    q = q.reshape(B, S, cfg.num_heads, cfg.head_dim)
    k = k.reshape(B, S, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = ops.rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
        k = ops.rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
    cos, sin = rope
    q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
    return q, k, v.reshape(B, S, cfg.num_kv_heads, cfg.head_dim)


def _attn_out(cfg, lp, rope, h_BxSxD, o_BxSxNxH):
    B, S, _ = h_BxSxD.shape
    return (h_BxSxD + o_BxSxNxH.reshape(B, S, -1) @ lp["wo"],)


def _mlp_norm(cfg, lp, rope, hm_BxSxD):
    return (ops.rms_norm(hm_BxSxD, lp["mlp_norm"], cfg.rms_norm_eps),)


def _mlp_in(cfg, lp, rope, x_BxSxD):
    return x_BxSxD @ lp["w_gate"], x_BxSxD @ lp["w_up"]


def _mlp_out(cfg, lp, rope, hm_BxSxD, a_BxSxF, b_BxSxF):
    return (hm_BxSxD + ops.swiglu(a_BxSxF, b_BxSxF) @ lp["w_down"],)


STAGES = (
    Stage(_attn_norm, ("h",), ("x1",)),
    Stage(_qkv, ("x1",), ("q", "k", "v")),
    Stage(None, ("q", "k", "v"), ("o",)),
    Stage(_attn_out, ("h", "o"), ("hm",)),
    Stage(_mlp_norm, ("hm",), ("x2",)),
    Stage(_mlp_in, ("x2",), ("a", "b")),
    Stage(_mlp_out, ("hm", "a", "b"), ("out",)),
)

# What the LISA forward saves per layer, and so what its backward recomputes (the attention,
# weight-free, always runs its forward once more there):
#   "none": the layer input and every matmul output; only elementwise stages are recomputed.
#   "mlp":  the layer input, q, k, v and the mid-residual; the backward recomputes gate and up.
#   "full": only the layer input; the backward recomputes the whole layer forward.
SAVED = {"none": ("h", "q", "k", "v", "hm", "a", "b"), "mlp": ("h", "q", "k", "v", "hm"),
         "full": ("h",)}
REMAT_MODES = tuple(SAVED)


def per_layer(cfg, layer, fn):
    """``fn(sliding)`` for layer ``layer`` (``sliding``: a Python bool, so ``fn`` may pick
    static arguments): called once when every layer is alike or ``layer`` is a Python int, else
    under ``lax.cond`` on the traced index (a stacked scan's)."""
    flags = sliding_layers(cfg)
    if all(flags) or not any(flags):
        return fn(flags[0])
    if layer is None:
        raise ValueError("the layers differ in their attention (layer_types): pass the layer "
                         "index")
    if isinstance(layer, int):
        return fn(flags[layer])
    return jax.lax.cond(jnp.asarray(flags)[layer], lambda: fn(True), lambda: fn(False))


def _attend(cfg, q, k, v, mask_BxSxS, impl, layer):
    return per_layer(cfg, layer, lambda sliding: ops.attention(
        q, k, v, mask_BxSxS, impl, window=cfg.sliding_window if sliding else None))


def causal_attention(cfg, mask_BxSxS=None, layer=None):
    """The attention stage of training and plain forwards: ``(q, k, v) -> (o, None)``;
    ``layer`` (an int or a traced index) picks its sliding window where layers differ."""
    impl = ops.attention_impl(cfg)
    return lambda q, k, v: (_attend(cfg, q, k, v, mask_BxSxS, impl, layer), None)


def _run(cfg, lp, rope, env: dict, attend, stop: int = len(STAGES)) -> dict:
    """``env`` (named activations) completed by the stages before ``stop`` whose outputs it
    lacks; the attention's second result lands in ``env["attend"]``."""
    for stage in STAGES[:stop]:
        if all(name in env for name in stage.outputs):
            continue
        args = [env[name] for name in stage.inputs]
        if stage.fn is None:
            env["o"], env["attend"] = attend(*args)
        else:
            env.update(zip(stage.outputs, stage.fn(cfg, lp, rope, *args)))
    return env


def decoder_block(cfg, lp: Params, h_BxSxD, rope, attend):
    """One block with the attention stage ``attend(q, k, v) -> (o, extra)``; ``(out, extra)``
    (a KV cache's update, say)."""
    env = _run(cfg, lp, rope, {"h": h_BxSxD}, attend)
    return env["out"], env["attend"]


def decoder_layer(cfg, lp: Params, h_BxSxD, rope, mask_BxSxS=None, layer=None):
    """One pre-norm block on one layer's parameters ``lp`` (no layer axis); ``layer``, its
    index, is needed where the layers differ (``per_layer``)."""
    return decoder_block(cfg, lp, h_BxSxD, rope, causal_attention(cfg, mask_BxSxS, layer))[0]


def layer_forward(cfg, lp: Params, h_BxSxD, rope, remat: str, layer=None, mask_BxSxS=None):
    """``(out, saved)``: the block's output and the activations ``SAVED[remat]`` keeps;
    ``mask_BxSxS``: None (causal) or ``ops.Segments`` (packed rows)."""
    env = _run(cfg, lp, rope, {"h": h_BxSxD}, causal_attention(cfg, mask_BxSxS, layer))
    return env["out"], tuple(env[name] for name in SAVED[remat])


def _attention_with_pullback(cfg, layer, mask_BxSxS=None):
    impl = ops.attention_impl(cfg)
    return lambda q, k, v: jax.vjp(lambda q_, k_, v_: _attend(cfg, q_, k_, v_, mask_BxSxS,
                                                              impl, layer), q, k, v)


def _add(tree_a, tree_b):
    return tree_b if tree_a is None else jax.tree.map(lambda x, y: x + y, tree_a, tree_b)


def layer_backward(cfg, lp: Params, saved, rope, dy_BxSxD, remat: str,
                   weight_grads: bool = False, layer=None, mask_BxSxS=None):
    """``(dh, grads_or_parts)`` of one layer for the output cotangent ``dy``.

    With ``weight_grads``: ``grads`` holds the layer's weight gradients (``lp``'s structure).
    Without: only the activation gradient is computed, and ``parts`` (per weighted stage, its
    inputs and output cotangents: tensors the backward holds anyway) is what
    ``weight_grads_from_parts`` turns into the weight gradients, so that a caller deciding
    per layer under ``lax.cond`` pays nothing for a frozen one. ``mask_BxSxS``: the forward's
    (``ops.Segments`` for packed rows).
    """
    env = _run(cfg, lp, rope, dict(zip(SAVED[remat], saved)),
               _attention_with_pullback(cfg, layer, mask_BxSxS), stop=len(STAGES) - 1)
    cot = {"out": dy_BxSxD}
    grads, parts = None, []
    for stage in reversed(STAGES):
        g_out = tuple(cot.pop(name) for name in stage.outputs)
        args = tuple(env[name] for name in stage.inputs)
        if stage.fn is None:
            g_in = env["attend"](*g_out)
        elif weight_grads:
            _, pullback = jax.vjp(lambda p, *xs, f=stage.fn: f(cfg, p, rope, *xs), lp, *args)
            g_lp, *g_in = pullback(g_out)
            grads = _add(grads, g_lp)
        else:
            _, pullback = jax.vjp(lambda *xs, f=stage.fn: f(cfg, lp, rope, *xs), *args)
            g_in = pullback(g_out)
            parts.append((args, g_out))
        for name, g in zip(stage.inputs, g_in):
            cot[name] = cot[name] + g if name in cot else g
    return cot["h"], (grads if weight_grads else tuple(parts))


def weight_grads_from_parts(cfg, lp: Params, parts, rope, layer=None) -> Params:
    """One layer's weight gradients from ``layer_backward``'s ``parts`` (``layer``: its index,
    as for ``layer_backward``)."""
    weighted = [stage for stage in reversed(STAGES) if stage.fn is not None]
    grads = None
    for stage, (args, g_out) in zip(weighted, parts):
        _, pullback = jax.vjp(lambda p, f=stage.fn: f(cfg, p, rope, *args), lp)
        grads = _add(grads, pullback(g_out)[0])
    return grads
