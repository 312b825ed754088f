"""Shared fixtures: tiny random Hugging Face checkpoints written with ``save_pretrained``.

Variants (``HF_VARIANTS``), all float32, 2-3 layers, hidden 32-64, vocab 128-256:

* ``llama2``  -- Llama 2 style, multi-head attention (``num_key_value_heads == heads``);
* ``llama3``  -- Llama 3.2 style: ``rope_scaling`` llama3, tied embeddings, GQA;
* ``gqa``     -- TinyLlama style grouped-query attention (8 heads, 2 kv heads);
* ``qwen2``   -- ``Qwen2ForCausalLM`` (q/k/v biases);
* ``mistral`` -- ``MistralForCausalLM`` without a sliding window;
* ``qwen3``   -- ``Qwen3ForCausalLM`` (RMSNorm of each query and key head, head_dim given);
* ``mistral_window`` -- ``mistral`` with a sliding window of 4 tokens on every layer;
* ``qwen2_window``   -- ``qwen2`` with a window of 4 from layer 1 on (``max_window_layers``);
* ``phi3``    -- ``Phi3ForCausalLM`` (fused ``qkv_proj`` and ``gate_up_proj``), window of 8;
* ``gemma3``  -- ``Gemma3ForCausalLM`` (text): sliding (window 4) and full layers, linear rope
  scaling on the full ones, query_pre_attn_scalar, soft-capped logits, tied embeddings.

Weights are drawn with a fixed torch seed at a scale that gives peaked next-token
distributions (so greedy decoding has no near-ties); norm weights and biases get nonzero
random values (transformers initialises them to one and zero), so their mapping is tested.

Fixtures: ``make_tiny_hf(variant, sharded=False, dtype="float32", tokenizer=False)`` builds
(once per session) and returns a checkpoint directory; ``tiny_llama_dir`` is the Llama 2
style one with a small word-level tokenizer; ``tiny_llama_sharded_dir`` the same weights in
several safetensors shards; ``torch_reference(path)`` the transformers model of a directory
(eager attention, eval mode, float32). A test with an ``hf_variant`` argument is run for
every variant.

Tiny models without Hugging Face (``TINY``, ``BLOCK_VARIANTS``): ``tiny_cfg(**overrides)`` a
``LlamaConfig`` (vocab 64, hidden 32, MLP 48, 6 layers, 4 heads, 2 kv heads, head dim 8),
``perturbed_params(cfg, seed=0)`` its random parameters with non-trivial norms and biases,
``batch_for(cfg, B=2, S_=12, seed=3, masked=True)`` a batch, ``rel_err(a, b)`` the largest
absolute difference relative to the largest ``|b|``. They are plain functions of this module
(the subprocess ``test_sharding.py`` imports them) handed to tests as session fixtures, since
pytest's importlib mode lets no test module import ``conftest``. A test with a
``block_variant`` argument gets the ``BLOCK_VARIANTS`` overrides of each variant of the block:
every one differs from the base in one detail.
"""
from __future__ import annotations

import glob
import math
import os

import pytest
from hypothesis import settings as hypothesis_settings

# The tests compile many small programs and run each only a few times: on CPU, skip LLVM's
# optimisation passes (XLA's own graph passes still run; results can differ from an optimised
# build in the last bits, e.g. through FMA contraction), which cuts compile time about 3x.
# Not done on GPU hosts, or with LISA_JAX_TEST_XLA_OPT=1.
if (os.environ.get("LISA_JAX_TEST_XLA_OPT", "0") != "1" and not glob.glob("/dev/nvidia[0-9]*")
        and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()

# Many tests compile the same programs (the trainer's steps for one tiny model, the same step
# under several checks): JAX's persistent compilation cache, fresh for each session and shared
# with the subprocesses tests start (through the environment), compiles each program once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lisa_jax_test_xla_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# One process compiles hundreds of programs; XLA's CPU backend keeps each one's machine code
# mapped while its function lives, and a suite that keeps them all grows past the kernel's
# limit on memory mappings (vm.max_map_count, 65530 by default), where the next compilation
# crashes. Each test module drops the compiled programs at its end (the persistent cache
# above makes a later recompilation of the same program a disk read).
@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    yield
    import jax
    jax.clear_caches()


# Hypothesis draws the same examples on every run, so a test's outcome never depends on luck
# (a failure seen once is seen every time). LISA_JAX_HYPOTHESIS_PROFILE=explore draws fresh
# random examples, for hunting new counterexamples locally.
hypothesis_settings.register_profile("derandomized", derandomize=True)
hypothesis_settings.register_profile("explore", derandomize=False)
hypothesis_settings.load_profile(os.environ.get("LISA_JAX_HYPOTHESIS_PROFILE", "derandomized"))

HF_VARIANTS = ("llama2", "llama3", "gqa", "qwen2", "mistral", "qwen3", "mistral_window",
               "qwen2_window", "phi3", "gemma3")

_COMMON = dict(bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)


def _hf_config(variant: str):
    import transformers

    if variant == "llama2":
        return transformers.LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
            **_COMMON)
    if variant == "llama3":
        return transformers.LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rope_theta=500000.0, tie_word_embeddings=True,
            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                              high_freq_factor=4.0, original_max_position_embeddings=32),
            **_COMMON)
    if variant == "gqa":
        return transformers.LlamaConfig(
            vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
            **_COMMON)
    if variant in ("qwen2", "qwen2_window"):
        window = dict(use_sliding_window=True, sliding_window=4, max_window_layers=1) \
            if variant == "qwen2_window" else {}
        return transformers.Qwen2Config(
            vocab_size=192, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rope_theta=1000000.0, **window, **_COMMON)
    if variant in ("mistral", "mistral_window"):
        return transformers.MistralConfig(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
            sliding_window=4 if variant == "mistral_window" else None, **_COMMON)
    if variant == "qwen3":
        return transformers.Qwen3Config(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256, rope_theta=1000000.0, use_sliding_window=False,
            tie_word_embeddings=False, **_COMMON)
    if variant == "phi3":
        return transformers.Phi3Config(
            vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            sliding_window=8, pad_token_id=None, **_COMMON)
    if variant == "gemma3":
        return transformers.Gemma3TextConfig(
            vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256, sliding_window=4, query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={"full_attention": dict(rope_type="linear", factor=4.0,
                                                    rope_theta=1000000.0),
                             "sliding_attention": dict(rope_type="default", rope_theta=10000.0)},
            final_logit_softcapping=30.0, pad_token_id=None, **_COMMON)
    raise KeyError(variant)


def _randomize(model, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    unit = 0.0 if model.config.model_type == "gemma3_text" else 1.0  # Gemma scales by 1 + w
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(unit + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif name == "lm_head.weight":
                p.copy_(3.0 / math.sqrt(p.shape[1]) * torch.randn(p.shape, generator=g))
            else:  # Linear [out, in]
                p.copy_(1.0 / math.sqrt(p.shape[1]) * torch.randn(p.shape, generator=g))


def build_hf_model(variant: str, seed: int = 0):
    """A random transformers model of ``variant`` (float32, eval mode)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = _hf_config(variant)
    cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
           "mistral": transformers.MistralForCausalLM,
           "qwen3": transformers.Qwen3ForCausalLM,
           "phi3": transformers.Phi3ForCausalLM,
           "gemma3_text": transformers.Gemma3ForCausalLM}[cfg.model_type]
    model = cls(cfg).eval()
    _randomize(model, seed)
    return model


def save_tiny_tokenizer(out_dir: str, vocab_size: int) -> None:
    """A word-level tokenizer over ``<unk> <s> </s> w3 w4 ...`` (no download needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(out_dir)


def build_hf_checkpoint(variant: str, out_dir: str, sharded: bool = False,
                        dtype: str = "float32", tokenizer: bool = False, seed: int = 0) -> str:
    """Write a tiny random checkpoint of ``variant`` to ``out_dir``; sharded into several
    safetensors files (with an index) when ``sharded``."""
    import torch

    model = build_hf_model(variant, seed)
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    kw = {"max_shard_size": "40KB"} if sharded else {}
    model.save_pretrained(out_dir, **kw)
    if tokenizer:
        save_tiny_tokenizer(out_dir, model.config.vocab_size)
    if sharded:
        assert os.path.isfile(os.path.join(out_dir, "model.safetensors.index.json"))
    return out_dir


def pytest_generate_tests(metafunc):
    """A test taking ``hf_variant`` runs once per entry of ``HF_VARIANTS``; one taking
    ``block_variant`` once per entry of ``BLOCK_VARIANTS`` (with that entry's overrides)."""
    if "hf_variant" in metafunc.fixturenames:
        metafunc.parametrize("hf_variant", HF_VARIANTS)
    if "block_variant" in metafunc.fixturenames:
        metafunc.parametrize("block_variant", list(BLOCK_VARIANTS.values()),
                             ids=list(BLOCK_VARIANTS))


@pytest.fixture(scope="session")
def make_tiny_hf(tmp_path_factory):
    """``make(variant, sharded=False, dtype="float32", tokenizer=False) -> directory``, built
    once per session and argument set."""
    cache: dict[tuple, str] = {}

    def make(variant: str, sharded: bool = False, dtype: str = "float32",
             tokenizer: bool = False) -> str:
        key = (variant, sharded, dtype, tokenizer)
        if key not in cache:
            name = f"{variant}-{'sharded' if sharded else 'single'}-{dtype}" + \
                ("-tok" if tokenizer else "")
            out = str(tmp_path_factory.mktemp(name))
            cache[key] = build_hf_checkpoint(variant, out, sharded, dtype, tokenizer)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(make_tiny_hf) -> str:
    """A Llama 2 style checkpoint (MHA, 2 layers, hidden 64, vocab 128) with a tokenizer."""
    return make_tiny_hf("llama2", tokenizer=True)


@pytest.fixture(scope="session")
def tiny_llama_sharded_dir(make_tiny_hf) -> str:
    """The ``tiny_llama_dir`` weights, split into several safetensors shards plus the index."""
    return make_tiny_hf("llama2", sharded=True, tokenizer=True)


@pytest.fixture(scope="session")
def torch_reference():
    """``ref(path) -> transformers model`` (float32, eager attention, eval), cached per path."""
    cache: dict[str, object] = {}

    def ref(path: str):
        if path not in cache:
            import torch
            import transformers

            cache[path] = transformers.AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, attn_implementation="eager").eval()
        return cache[path]

    return ref


# ----------------------------------------------------------------------------- tiny models

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=6, num_heads=4,
            num_kv_heads=2, head_dim=8)

# Each variant of the block differs from the base (Llama with GQA) in one detail.
BLOCK_VARIANTS = {
    "gqa": {},
    "mha": dict(num_kv_heads=4),                                # one kv head per query head
    "bias": dict(attention_bias=True),                          # Qwen2's q/k/v biases
    "rope_llama3": dict(rope_scaling=("llama3", 8.0, 1.0, 4.0, 8)),
    "tied": dict(tie_embeddings=True),                          # no lm_head
    "qk_norm": dict(qk_norm=True),                              # Qwen3's per-head q/k norms
    "window": dict(sliding_window=3),                           # Mistral's, on every layer
    "window_mixed": dict(sliding_window=3,                      # Qwen2's, on some layers
                         layer_types=("full_attention", "sliding_attention") * 3),
    # Gemma 3, all its details at once: 1 + w norms, four per layer, q/k norms, GeGLU, its
    # score scale, the sliding layers' own rope θ, soft-capped logits, scaled embeddings.
    "gemma3": dict(qk_norm=True, norm_plus_one=True, sandwich_norm=True, scale_embeddings=True,
                   hidden_act="gelu_pytorch_tanh", attn_scalar=12, rope_local_theta=100.0,
                   final_softcap=5.0, sliding_window=3, tie_embeddings=True,
                   layer_types=("sliding_attention", "full_attention") * 3),
}


def tiny_config(**overrides):
    """The tiny ``LlamaConfig`` (``TINY``) with ``overrides``."""
    from lisa_jax import model as M
    return M.LlamaConfig(**{**TINY, **overrides})


_PERTURBED: dict = {}


def perturbed_params(cfg, seed: int = 0):
    """Random weights with non-trivial norms and biases (init makes them ones and zeros).

    Made once per ``(cfg, seed)`` and handed out as a fresh copy each call (a step may donate
    it): the Flax init runs its layer scan eagerly, a compilation of its own each time, in most
    of the tests."""
    import jax
    import jax.numpy as jnp
    try:
        key = (cfg, seed)
        hash(key)
    except TypeError:
        return _perturbed_params(cfg, seed)
    if key not in _PERTURBED:
        _PERTURBED[key] = _perturbed_params(cfg, seed)
    return jax.tree.map(jnp.copy, _PERTURBED[key])


def _perturbed_params(cfg, seed: int):
    import jax

    from lisa_jax import model as M
    p = M.init_params(cfg, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                        for x, k in zip(leaves, keys)])


def batch_for(cfg, B: int = 2, S_: int = 12, seed: int = 3, masked: bool = True) -> dict:
    """``input_ids [B, S_]`` and (``masked``) a ``loss_mask`` that is 1 from ``S_ // 3`` on."""
    import jax
    import jax.numpy as jnp
    ids = jax.random.randint(jax.random.key(seed), (B, S_), 0, cfg.vocab_size)
    out = {"input_ids": ids}
    if masked:
        out["loss_mask"] = (jnp.arange(S_)[None] >= S_ // 3).astype(jnp.int32).repeat(B, 0)
    return out


def relative_error(a, b) -> float:
    """``max |a - b| / max |b|`` in float64."""
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.fixture(scope="session", name="tiny_cfg")
def tiny_cfg_fixture():
    """``tiny_cfg(**overrides) -> LlamaConfig``."""
    return tiny_config


@pytest.fixture(scope="session", name="perturbed_params")
def perturbed_params_fixture():
    """``perturbed_params(cfg, seed=0) -> params``."""
    return perturbed_params


@pytest.fixture(scope="session", name="batch_for")
def batch_for_fixture():
    """``batch_for(cfg, B=2, S_=12, seed=3, masked=True) -> batch``."""
    return batch_for


def write_partial_save(directory, step: int):
    """What a save of ``step`` cut short leaves in the checkpoint ``directory``: orbax's
    temporary directory of that step, half written. Returns its path."""
    from pathlib import Path
    tmp = Path(str(directory)) / f"{step}.orbax-checkpoint-tmp-1"
    tmp.mkdir()
    (tmp / "params").write_text("partial")
    return tmp


@pytest.fixture(scope="session", name="partial_save")
def partial_save_fixture():
    """``partial_save(directory, step) -> Path``: a save of ``step`` cut short."""
    return write_partial_save


@pytest.fixture(scope="session", name="rel_err")
def rel_err_fixture():
    """``rel_err(a, b) -> float``: ``max |a - b| / max |b|``."""
    return relative_error


# ----------------------------------------------------------------------------- trainer inputs

@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A random 4-layer model with the bundled tokenizer: an HF directory (trainer tests)."""
    import json

    import jax

    from lisa_jax import model as M
    from lisa_jax.hf import save_hf
    from lisa_jax.config import DEMO_DIR
    vocab = json.loads((DEMO_DIR / "model" / "tokenizer.json").read_text())
    V = len(vocab["model"]["vocab"]) + len(vocab.get("added_tokens", []))
    cfg = M.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=4,
                        num_heads=4, num_kv_heads=2, head_dim=8, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0)
    out = tmp_path_factory.mktemp("model")
    save_hf(M.Model(cfg, M.init_params(cfg, jax.random.key(0))), out / "m",
            tokenizer_from=DEMO_DIR / "model")
    return str(out / "m")


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    """The first 200 bundled demo instructions (trainer tests)."""
    from lisa_jax.config import DEMO_DIR
    out = tmp_path_factory.mktemp("data") / "d.jsonl"
    lines = (DEMO_DIR / "instructions.jsonl").read_text().splitlines()[:200]
    out.write_text("\n".join(lines) + "\n")
    return str(out)


# ----------------------------------------------------------------------------- trainer runs

@pytest.fixture(scope="session")
def small():
    """``small(model_dir, data_file, out, **settings)``: the TrainConfig of a short run."""
    from lisa_jax.config import TrainConfig

    def make(model_dir, data_file, out, **kw):
        base = dict(model=model_dir, data=data_file, out=str(out), steps=8, lr=3e-3,
                    batch_size=4, max_seq_len=128, lisa_layers=2, lisa_interval=3,
                    save_every=4, eval_every=4, eval_batches=2, progress=False, export=False)
        return TrainConfig(**{**base, **kw})
    return make


@pytest.fixture(scope="session")
def final_params():
    """``final_params(run_dir) -> (step, params, meta)`` of a run's latest checkpoint."""
    from pathlib import Path

    from lisa_jax.checkpoints import Checkpoints

    def read(run_dir):
        ck = Checkpoints(Path(run_dir) / "checkpoints", 2)
        step = ck.latest()
        restored = ck.read(step, "params", "meta")
        return step, restored["params"], restored["meta"]
    return read


@pytest.fixture(scope="session")
def logged_layers():
    """``logged_layers(run_dir) -> {step: active layers}`` from a run's metrics.jsonl."""
    import json
    from pathlib import Path

    def read(run_dir):
        rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["active_layers"] for r in rows if "active_layers" in r}
    return read
