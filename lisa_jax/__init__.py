"""lisa_jax: LISA fine-tuning (Layerwise Importance Sampled AdamW) in JAX/Flax/Optax."""
from lisa_jax.generate import generate
from lisa_jax.hf import load_hf, save_hf
from lisa_jax.lisa import LisaState, LisaTransformation, active_layers, lisa, maybe_resample
from lisa_jax.lora import apply_lora, init_lora, lora_scale, merge_lora
from lisa_jax.model import LlamaConfig, Model, forward, init_params
from lisa_jax.precision import MasterWeightsState, master_weights, stochastic_bf16_nu
from lisa_jax.sampling import (bernoulli_mask, expected_count, normalize_probs, sample_bernoulli,
                               sample_uniform)
from lisa_jax.step import (make_forward, make_lisa_step, make_lora_step, make_plain_step,
                           value_and_grad_accumulated)

__all__ = [
    # the optax transforms
    "lisa", "LisaState", "LisaTransformation", "active_layers", "maybe_resample",
    "master_weights", "MasterWeightsState", "stochastic_bf16_nu",
    # layer sampling
    "sample_uniform", "sample_bernoulli", "bernoulli_mask", "expected_count", "normalize_probs",
    # models and checkpoints
    "LlamaConfig", "Model", "init_params", "forward", "load_hf", "save_hf", "generate",
    # train steps
    "make_lisa_step", "make_plain_step", "make_lora_step", "make_forward",
    "value_and_grad_accumulated",
    # LoRA (the baseline)
    "init_lora", "apply_lora", "merge_lora", "lora_scale",
]

__version__ = "0.1.0"
