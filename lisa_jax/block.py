"""The Llama-family decoder block, described once: its parameter table and its stages.

A family is two lists here. ``LAYER_PARAMS`` and ``GLOBAL_PARAMS`` have one row per parameter:
its shape, its Hugging Face name and orientation, the dimension tensor parallelism splits, and
whether LoRA targets it and weight decay applies. ``STAGES`` is the layer's math as a chain of
small functions between named activations (``h -> x1 -> q, k, v -> o -> hm -> x2 -> a, b ->
out``). Everything else follows from the two: ``model`` builds parameters and runs the stages,
``hf`` maps names, ``sharding`` derives its rules, ``lora`` its targets, ``generate`` runs the
stages with a cache-aware attention, and the LISA backward (``stack_vjp``) differentiates each
stage with ``jax.vjp``: activation gradients always, weight gradients only for sampled layers
(or, sampling modules, ``MODULE_GROUPS``, for the sampled modules' leaves).
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

    def init_for(self, cfg) -> str:
        """``init`` for ``cfg``: a norm scale ("ones") is zeros where the scale is ``1 + w``
        (Gemma), so that it starts as the identity either way."""
        return "zeros" if self.init == "ones" and cfg.norm_plus_one else self.init


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
    # Gemma 3: the attention's and the MLP's outputs are normalized too ("sandwich" norms).
    # There HF's post_attention_layernorm (mlp_norm's tensor) normalizes the attention output
    # and pre_feedforward_layernorm the MLP input.
    Param("ffn_norm", _d, "pre_feedforward_layernorm.weight", init="ones", decay=False,
          present=lambda c: c.sandwich_norm),
    Param("ffn_out_norm", _d, "post_feedforward_layernorm.weight", init="ones", decay=False,
          present=lambda c: c.sandwich_norm),
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

# Module groups of module-level sampling (``lisa(granularity=...)``, MISA): per granularity,
# ``(group, layer leaves)`` pairs that partition every family's layer leaves; a group samples
# its own layers, so its leaves of one layer train together. A norm or bias goes with the
# matrix it feeds or follows (``mlp_norm``, HF's post_attention_layernorm, with the MLP).
MODULE_GROUPS = {
    "attn_mlp": (("attn", ("attn_norm", "wq", "wk", "wv", "wo", "bq", "bk", "bv", "q_norm",
                           "k_norm")),
                 ("mlp", ("mlp_norm", "w_gate", "w_up", "w_down", "ffn_norm", "ffn_out_norm"))),
    "matrix": (("wq", ("wq", "bq", "q_norm", "attn_norm")), ("wk", ("wk", "bk", "k_norm")),
               ("wv", ("wv", "bv")), ("wo", ("wo",)),
               ("w_gate", ("w_gate", "mlp_norm", "ffn_norm")), ("w_up", ("w_up",)),
               ("w_down", ("w_down", "ffn_out_norm"))),
}
GRANULARITIES = ("layer",) + tuple(MODULE_GROUPS)


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
    norm_plus_one: bool = False
    sandwich_norm: bool = False
    scale_embeddings: bool = False
    hf_extra: Callable[[Any], dict] = lambda cfg: {}
    hf_drop: Callable[[Any], tuple[str, ...]] = lambda cfg: ()
    window: Callable[[dict], tuple] = lambda hf: (None, None)
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()
    rope: Callable[[dict], tuple] = lambda hf: _rope(hf)


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


def _rope(hf):
    """``(rope parameters or None, theta, local theta)``: the scaling dict (``rope_scaling``,
    or transformers 5's ``rope_parameters``), θ, and no separate θ for sliding layers."""
    rs, theta = hf.get("rope_scaling") or None, hf.get("rope_theta")
    if rs is None and isinstance(hf.get("rope_parameters"), dict):
        rs = dict(hf["rope_parameters"])  # transformers 5 folds rope_theta in
        theta = rs.get("rope_theta", theta)
    return rs, theta, None


def _gemma_rope(hf):
    """Gemma 3: the full layers' parameters and θ, and the sliding layers' own θ
    (``rope_parameters`` per layer type in transformers 5; ``rope_theta``,
    ``rope_scaling`` and ``rope_local_base_freq`` before)."""
    rp = hf.get("rope_parameters")
    if isinstance(rp, dict) and (FULL in rp or SLIDING in rp):
        full, local = dict(rp.get(FULL) or {}), dict(rp.get(SLIDING) or {})
    else:
        full, local = dict(hf.get("rope_scaling") or {}), {}
        full.setdefault("rope_theta", hf.get("rope_theta", 1e6))
        local["rope_theta"] = hf.get("rope_local_base_freq", 1e4)
    if local.get("rope_type", "default") != "default":
        raise ValueError(f"rope scaling {local['rope_type']!r} on the sliding layers is not "
                         "supported; only on the full ones")
    return full, full.get("rope_theta", 1e6), float(local.get("rope_theta", 1e4))


def _gemma_window(hf):
    """Gemma 3: ``layer_types``, or every ``sliding_window_pattern``-th layer full."""
    pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
    types = hf.get("layer_types") or [FULL if (i + 1) % pattern == 0 else SLIDING
                                      for i in range(hf["num_hidden_layers"])]
    return hf.get("sliding_window"), types


def rope_scaling_hf(cfg) -> dict | None:
    """``cfg.rope_scaling`` as transformers spells it."""
    if cfg.rope_scaling is None:
        return None
    if cfg.rope_scaling[0] == "llama3":
        _, f, lo, hi, orig = cfg.rope_scaling
        return dict(rope_type="llama3", factor=f, low_freq_factor=lo, high_freq_factor=hi,
                    original_max_position_embeddings=orig)
    return dict(rope_type="linear", factor=cfg.rope_scaling[1])


def _gemma_extra(cfg):
    if cfg.rope_local_theta is None:
        raise ValueError("a Gemma 3 config needs rope_local_theta (the sliding layers' θ)")
    full = {"rope_type": "default", **(rope_scaling_hf(cfg) or {}), "rope_theta": cfg.rope_theta}
    return {"hidden_activation": cfg.hidden_act, "query_pre_attn_scalar": cfg.attn_scalar,
            "final_logit_softcapping": cfg.final_softcap, "attn_logit_softcapping": None,
            "use_bidirectional_attention": False, "sliding_window": cfg.sliding_window,
            "layer_types": [SLIDING if f else FULL for f in sliding_layers(cfg)],
            "rope_parameters": {FULL: full, SLIDING: {"rope_type": "default",
                                                      "rope_theta": cfg.rope_local_theta}}}


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
    # Gemma 3 (text): norms with scale 1 + w, four per layer and q/k norms, the embedding
    # scaled by sqrt(hidden), GeGLU, its own score scale, sliding and full layers with their
    # own rope θ, soft-capped logits.
    "gemma3_text": Family("Gemma3ForCausalLM", qk_norm=True, norm_plus_one=True,
                          sandwich_norm=True, scale_embeddings=True, window=_gemma_window,
                          rope=_gemma_rope, hf_extra=_gemma_extra,
                          hf_drop=lambda cfg: ("hidden_act", "rope_theta", "rope_scaling")),
}


# ----------------------------------------------------------------------------- the stages
# Each stage is ``fn(cfg, lp, rope, *inputs) -> outputs`` on one layer's parameters ``lp``;
# ``rope`` is the (cos, sin) pair of the positions. The attention stage has no weights: its
# function is given by the caller (causal, masked, or over a KV cache).


class Stage(NamedTuple):
    fn: Callable | None  # None: the attention, supplied by the caller
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def norm(cfg, x, scale):
    """The family's RMSNorm (scale ``1 + w`` in float32 for Gemma)."""
    return ops.rms_norm(x, scale, cfg.rms_norm_eps, cfg.norm_plus_one)


def _attn_norm(cfg, lp, rope, h_BxSxD):
    return (norm(cfg, h_BxSxD, lp["attn_norm"]),)


def _qkv(cfg, lp, rope, x_BxSxD):
    """Projections (and biases) and RoPE: q ``BxSxNxH``, k and v ``BxSxKxH``."""
    B, S, _ = x_BxSxD.shape
    q, k, v = x_BxSxD @ lp["wq"], x_BxSxD @ lp["wk"], x_BxSxD @ lp["wv"]
    if cfg.attention_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    q = q.reshape(B, S, cfg.num_heads, cfg.head_dim)
    k = k.reshape(B, S, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = norm(cfg, q, lp["q_norm"])
        k = norm(cfg, k, lp["k_norm"])
    cos, sin = rope
    q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
    return q, k, v.reshape(B, S, cfg.num_kv_heads, cfg.head_dim)


def _attn_out(cfg, lp, rope, h_BxSxD, o_BxSxNxH):
    B, S, _ = h_BxSxD.shape
    y = o_BxSxNxH.reshape(B, S, -1) @ lp["wo"]
    if cfg.sandwich_norm:
        y = norm(cfg, y, lp["mlp_norm"])
    return (h_BxSxD + y,)


def _mlp_norm(cfg, lp, rope, hm_BxSxD):
    return (norm(cfg, hm_BxSxD, lp["ffn_norm" if cfg.sandwich_norm else "mlp_norm"]),)


def _mlp_in(cfg, lp, rope, x_BxSxD):
    return x_BxSxD @ lp["w_gate"], x_BxSxD @ lp["w_up"]


def _mlp_out(cfg, lp, rope, hm_BxSxD, a_BxSxF, b_BxSxF):
    gated = ops.geglu if cfg.hidden_act == "gelu_pytorch_tanh" else ops.swiglu
    y = gated(a_BxSxF, b_BxSxF) @ lp["w_down"]
    if cfg.sandwich_norm:
        y = norm(cfg, y, lp["ffn_out_norm"])
    return (hm_BxSxD + y,)


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
#   "qkv":  the layer input, the mid-residual, gate and up; the backward recomputes q, k, v.
#   "mlp":  the layer input, q, k, v and the mid-residual; the backward recomputes gate and up.
#   "full": only the layer input; the backward recomputes the whole layer forward.
SAVED = {"none": ("h", "q", "k", "v", "hm", "a", "b"), "qkv": ("h", "hm", "a", "b"),
         "mlp": ("h", "q", "k", "v", "hm"), "full": ("h",)}
REMAT_MODES = tuple(SAVED)

# Of those, what a frozen fp8 layer keeps in e4m3 with a scale per row (per token; per token
# and head for q, k, v) under each ``--frozen-residuals``: none, the MLP's gate and up (the
# widest), those and q, k, v, or all of them; sampled layers keep theirs exact.
FP8_SAVED = {"bf16": (), "fp8": ("a", "b"), "fp8_qkv": ("q", "k", "v", "a", "b"),
             "fp8_all": ("h", "q", "k", "v", "hm", "a", "b")}


# The saved activations as a message names them.
SAVED_WORDS = {"h": "input", "q": "q", "k": "k", "v": "v", "hm": "mid-residual", "a": "gate",
               "b": "up"}


def fp8_saved(remat: str, residuals: str) -> tuple[str, ...]:
    """Of ``SAVED[remat]``, what frozen fp8 layers keep in e4m3 under ``residuals``."""
    return tuple(n for n in SAVED[remat] if n in FP8_SAVED[residuals])


def fp8_residuals_error(remat: str, residuals: str) -> str | None:
    """Why ``--frozen-residuals residuals`` keeps nothing in fp8 under ``--remat remat``, in
    one line naming the fix, or None where it keeps something (or is bf16)."""
    if residuals == "bf16" or fp8_saved(remat, residuals):
        return None
    kept = ", ".join(SAVED_WORDS[n] for n in FP8_SAVED[residuals])
    modes = [m for m in SAVED if fp8_saved(m, residuals)]
    fix = " or ".join(modes) if len(modes) < 3 else ", ".join(modes[:-1]) + " or " + modes[-1]
    return (f"--frozen-residuals {residuals} keeps the frozen layers' {kept} in fp8, and "
            f"--remat {remat} keeps none of them; use --remat {fix}, or --frozen-residuals bf16")


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


def attention_scale(cfg) -> float | None:
    """The scores' scale: ``attn_scalar ** -0.5`` (Gemma), else None (1/sqrt(head dim))."""
    return None if cfg.attn_scalar is None else float(cfg.attn_scalar) ** -0.5


def layer_rope(cfg, rope, layer):
    """Layer ``layer``'s (cos, sin): where sliding layers have their own θ (``ops.rope_tables``
    gives ``2xBxSxH`` tables), the second for a sliding layer, the first for a full one."""
    if cfg.rope_local_theta is None:
        return rope
    cos, sin = rope
    return per_layer(cfg, layer, lambda sliding: (cos[int(sliding)], sin[int(sliding)]))


def _attend(cfg, q, k, v, mask_BxSxS, impl, layer):
    return per_layer(cfg, layer, lambda sliding: ops.attention(
        q, k, v, mask_BxSxS, impl, window=cfg.sliding_window if sliding else None,
        scale=attention_scale(cfg)))


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


def decoder_block(cfg, lp: Params, h_BxSxD, rope, attend, layer=None):
    """One block with the attention stage ``attend(q, k, v) -> (o, extra)``; ``(out, extra)``
    (a KV cache's update, say)."""
    env = _run(cfg, lp, layer_rope(cfg, rope, layer), {"h": h_BxSxD}, attend)
    return env["out"], env["attend"]


def decoder_layer(cfg, lp: Params, h_BxSxD, rope, mask_BxSxS=None, layer=None):
    """One pre-norm block on one layer's parameters ``lp`` (no layer axis); ``layer``, its
    index, is needed where the layers differ (``per_layer``)."""
    return decoder_block(cfg, lp, h_BxSxD, rope, causal_attention(cfg, mask_BxSxS, layer),
                         layer)[0]


# The MLP's stages (gate and up; the gated down projection and the residual add), which a
# caller may run as one operation instead: ``mlp=`` of ``layer_forward`` and ``layer_backward``
# takes an object with ``forward(x2) -> (y, named)`` (the MLP's output before the residual add,
# and the activations it keeps: ``a`` and ``b`` in its own terms, and any of its own, which
# ``saves(SAVED[remat])`` names), ``backward(named, dy) -> dx2``; ``fp8_mlp.FrozenMlp`` is one.
MLP_STAGES = 2


def _saved_names(remat, mlp) -> tuple[str, ...]:
    return SAVED[remat] + (mlp.saves(SAVED[remat]) if mlp is not None else ())


def layer_forward(cfg, lp: Params, h_BxSxD, rope, remat: str, layer=None, mask_BxSxS=None,
                  mlp=None):
    """``(out, saved)``: the block's output and the activations ``SAVED[remat]`` keeps (and
    those ``mlp`` keeps, where given; see ``MLP_STAGES``); ``mask_BxSxS``: None (causal) or
    ``ops.Segments`` (packed rows)."""
    rope = layer_rope(cfg, rope, layer)
    attend = causal_attention(cfg, mask_BxSxS, layer)
    if mlp is None:
        env = _run(cfg, lp, rope, {"h": h_BxSxD}, attend)
    else:
        env = _run(cfg, lp, rope, {"h": h_BxSxD}, attend, stop=len(STAGES) - MLP_STAGES)
        y, named = mlp.forward(env["x2"])
        env.update(named, out=env["hm"] + y)
    return env["out"], tuple(env[name] for name in _saved_names(remat, mlp))


def _attention_with_pullback(cfg, layer, mask_BxSxS=None):
    impl = ops.attention_impl(cfg)
    return lambda q, k, v: jax.vjp(lambda q_, k_, v_: _attend(cfg, q_, k_, v_, mask_BxSxS,
                                                              impl, layer), q, k, v)


def _add(tree_a, tree_b):
    return tree_b if tree_a is None else jax.tree.map(lambda x, y: x + y, tree_a, tree_b)


def layer_backward(cfg, lp: Params, saved, rope, dy_BxSxD, remat: str,
                   weight_grads: bool = False, layer=None, mask_BxSxS=None, mlp=None):
    """``(dh, grads_or_parts)`` of one layer for the output cotangent ``dy``.

    With ``weight_grads``: ``grads`` holds the layer's weight gradients (``lp``'s structure).
    Without: only the activation gradient is computed, and ``parts`` (per weighted stage, its
    inputs and output cotangents: tensors the backward holds anyway) is what
    ``weight_grads_from_parts`` turns into the weight gradients, so that a caller deciding
    per layer under ``lax.cond`` pays nothing for a frozen one. ``mask_BxSxS``: the forward's
    (``ops.Segments`` for packed rows). ``mlp``: the forward's (its activation gradient only).
    """
    if mlp is not None and weight_grads:
        raise ValueError("a fused MLP has no weight gradients: it runs frozen layers")
    rope = layer_rope(cfg, rope, layer)
    env = _run(cfg, lp, rope, dict(zip(_saved_names(remat, mlp), saved)),
               _attention_with_pullback(cfg, layer, mask_BxSxS),
               stop=len(STAGES) - (1 if mlp is None else MLP_STAGES))
    stages, cot = STAGES, {"out": dy_BxSxD}
    if mlp is not None:
        if "a" not in env:  # remat mlp or full: the MLP's kept activations are recomputed
            env.update(mlp.forward(env["x2"])[1])
        stages, cot = STAGES[:-MLP_STAGES], {"hm": dy_BxSxD, "x2": mlp.backward(env, dy_BxSxD)}
    grads, parts = None, []
    for stage in reversed(stages):
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


def weight_grads_from_parts(cfg, lp: Params, parts, rope, layer=None,
                            names: tuple[str, ...] | None = None) -> Params:
    """One layer's weight gradients from ``layer_backward``'s ``parts`` (``layer``: its index,
    as for ``layer_backward``).

    ``names``: only these leaves' gradients (a dict of them), the rest of ``lp`` entering as
    constants, so that a module-level backward computes the weight GEMMs of the sampled
    modules only; stages that read none of them are skipped."""
    weighted = [stage for stage in reversed(STAGES) if stage.fn is not None]
    rope = layer_rope(cfg, rope, layer)
    grads = None
    if names is None:
        for stage, (args, g_out) in zip(weighted, parts):
            _, pullback = jax.vjp(lambda p, f=stage.fn: f(cfg, p, rope, *args), lp)
            grads = _add(grads, pullback(g_out)[0])
        return grads
    sub = {name: lp[name] for name in names}
    for stage, (args, g_out) in zip(weighted, parts):
        read: set[str] = set()
        _, pullback = jax.vjp(lambda p, f=stage.fn: f(cfg, _Reads({**lp, **p}, read), rope,
                                                      *args), sub)
        if read & sub.keys():  # a stage reading none of them adds no gradient
            grads = _add(grads, pullback(g_out)[0])
    return grads if grads is not None else jax.tree.map(jnp.zeros_like, sub)


class _Reads(dict):
    """A layer's parameters noting the leaves a stage reads (into ``read``): its forward, traced
    once by ``jax.vjp``, tells which of them it has gradients for."""

    def __init__(self, params, read: set):
        super().__init__(params)
        self.read = read

    def __getitem__(self, name):
        self.read.add(name)
        return super().__getitem__(name)
