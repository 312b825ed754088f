"""lisa_jax: LISA fine-tuning (Layerwise Importance Sampled AdamW) in JAX/Flax/Optax."""
from lisa_jax.model import LlamaConfig, Model, init_params
from lisa_jax.hf import load_hf, save_hf
from lisa_jax.generate import generate
from lisa_jax.lisa import (LisaState, LisaTransformation, active_layers, apply_view, lisa,
                           maybe_resample, resample, scatter_view, trainable_view, update_view)
from lisa_jax.precision import MasterWeightsState, master_weights
from lisa_jax.sampling import (bernoulli_mask, expected_count, normalize_probs, sample_bernoulli,
                               sample_uniform)

__version__ = "0.1.0"
