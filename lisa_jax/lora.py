"""LoRA adapters for the stacked Llama layers: the baseline LISA is compared with.

A ``LoraWeight`` stands in for a frozen weight ``w`` in the layer's parameter dict and computes
``x @ w + scale * (x @ a) @ b`` when the layer code writes ``x @ w``: JAX arrays defer ``@`` to an
operand type they do not know, so the model's layer functions run unchanged. Only ``a`` and
``b`` are differentiated, so no weight gradient of ``w`` is ever computed.

>>> import jax, jax.numpy as jnp
>>> w = jnp.ones((4, 3)); lw = LoraWeight(w, jnp.ones((4, 2)), jnp.zeros((2, 3)), 2.0)
>>> bool(jnp.allclose(jnp.ones((1, 4)) @ lw, jnp.ones((1, 4)) @ w))   # b starts at zero
True
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (bfloat16 for safetensors' numpy backend)
import numpy as np

from lisa_jax import block

DEFAULT_TARGETS = block.LORA_TARGETS


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraWeight:
    w: jax.Array
    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(metadata=dict(static=True), default=1.0)

    def __rmatmul__(self, x):
        return x @ self.w + self.scale * ((x @ self.a) @ self.b)


def init_lora(layers, key, rank: int, targets=DEFAULT_TARGETS, dtype=None):
    """Adapters ``{name: {"a": [L, in, r], "b": [L, r, out]}}`` for the target weights.

    ``a`` is Kaiming-uniform as in PEFT, ``b`` zero, so the adapted model starts equal to the
    base model.
    """
    unknown = [t for t in targets if t not in layers]
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; choose from {sorted(layers)}")
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    lora = {}
    for i, name in enumerate(targets):
        w = layers[name]
        L, d_in, d_out = w.shape
        bound = 1.0 / jnp.sqrt(d_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), (L, d_in, rank), jnp.float32,
                               -bound, bound)
        lora[name] = {"a": a.astype(dtype or w.dtype), "b": jnp.zeros((L, rank, d_out),
                                                                      dtype or w.dtype)}
    return lora


def lora_scale(rank: int, alpha: float | None) -> float:
    return (alpha if alpha is not None else 2.0 * rank) / rank


def apply_lora(layers, lora, scale: float):
    """The layer dict with each target weight wrapped in a ``LoraWeight``."""
    out = dict(layers)
    for name, ab in lora.items():
        out[name] = LoraWeight(layers[name], ab["a"], ab["b"], scale)
    return out


def merge_lora(params, lora, scale: float):
    """Parameters with the adapters folded into the base weights (for export)."""
    layers = dict(params["layers"])
    for name, ab in lora.items():
        w = layers[name]
        delta = jnp.einsum("lir,lro->lio", ab["a"].astype(jnp.float32),
                           ab["b"].astype(jnp.float32)) * scale
        layers[name] = (w.astype(jnp.float32) + delta).astype(w.dtype)
    return {**params, "layers": layers}


# ----------------------------------------------------------------------------- PEFT's format

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def peft_modules(targets) -> dict[str, str]:
    """Our target name -> its HF module path in a layer (``wq`` -> ``self_attn.q_proj``), from
    the block's table."""
    rows = {p.name: p for p in block.LAYER_PARAMS}
    out = {}
    for name in targets:
        hf = rows[name].hf
        if not hf.endswith(".weight") or not rows[name].transposed:
            raise ValueError(f"LoRA target {name!r} ({hf}) is not a Linear weight; PEFT adapts "
                             "Linear modules only")
        out[name] = hf[:-len(".weight")]
    return out


def _host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def peft_state_dict(lora) -> dict[str, np.ndarray]:
    """The adapters as PEFT saves them: ``base_model.model.model.layers.{i}.<module>.lora_A
    .weight`` ``[r, in]`` and ``lora_B.weight`` ``[out, r]`` (torch's Linear orientation)."""
    tensors = {}
    for name, module in peft_modules(lora).items():
        a, b = _host(lora[name]["a"]), _host(lora[name]["b"])  # [L, in, r], [L, r, out]
        for i in range(a.shape[0]):
            prefix = f"base_model.model.model.layers.{i}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    return tensors


def peft_config(lora, rank: int, alpha: float | None, base_model: str | None) -> dict:
    """``adapter_config.json`` of the adapters: PEFT scales by ``lora_alpha / r`` as
    ``lora_scale`` does."""
    alpha = alpha if alpha is not None else 2.0 * rank
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": int(rank), "lora_alpha": float(alpha) if alpha % 1 else int(alpha),
            "target_modules": sorted({m.rsplit(".", 1)[-1]
                                      for m in peft_modules(lora).values()}),
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "inference_mode": True, "modules_to_save": None,
            "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}, "revision": None}


def save_peft_adapter(lora, out_dir, rank: int, alpha: float | None,
                      base_model: str | None = None) -> str:
    """Write the adapters as a PEFT adapter directory (``adapter_config.json`` and
    ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(base, out_dir)``
    loads onto the HF base model ``base_model``. Built beside ``out_dir`` and renamed into
    place (an existing ``out_dir`` is replaced); several processes: call it on every one,
    process 0 writes. Returns ``out_dir``."""
    import json
    import os
    import shutil

    from safetensors.numpy import save_file

    from lisa_jax.atomic_dir import fresh_dir, replace_dir
    tensors = peft_state_dict(lora)
    config = peft_config(lora, rank, alpha, base_model)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if jax.process_index() != 0:
        return out_dir
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = fresh_dir(parent, f".{os.path.basename(out_dir)}.tmp-")
    try:
        save_file(tensors, os.path.join(tmp, PEFT_WEIGHTS), metadata={"format": "pt"})
        os.chmod(os.path.join(tmp, PEFT_WEIGHTS), os.stat(tmp).st_mode & 0o666)
        with open(os.path.join(tmp, PEFT_CONFIG), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir

