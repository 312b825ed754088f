"""lisa_jax: LISA fine-tuning (Layerwise Importance Sampled AdamW) in JAX/Flax/Optax."""
from lisa_jax.model import LlamaConfig, Model, init_params

__version__ = "0.1.0"
from lisa_jax.hf import load_hf, save_hf
from lisa_jax.generate import generate
