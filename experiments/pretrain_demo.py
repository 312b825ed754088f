"""Pretrain the tiny demo Llama bundled in ``lisa_jax/demo/model/`` from scratch, on the CPU.

Reproduce the bundled weights (Python 3.11 standard library, the default flags)::

    python experiments/make_demo_data.py --out lisa_jax/demo/instructions.jsonl
    python experiments/pretrain_demo.py --out lisa_jax/demo/model

Corpus, built at run time so nothing needs downloading and the derived weights may be
redistributed: the docstrings of the Python standard library's modules, classes and functions
(PSF license), plus prose sentences rendered from the demo task generator ("The opposite of hot
is cold.", "7 plus 5 is 12."). The model thereby knows the vocabulary and the facts but has
never seen the "### Instruction / ### Response" prompt format, which fine-tuning then teaches.

The tokenizer is a byte-level BPE trained on the same corpus plus the demo instructions (their
text only matters for the merges; the model never trains on them here), with the special tokens
``<pad>`` (0), ``<s>`` (1) and ``</s>`` (2) and no chat template.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import add_flags  # noqa: E402
from make_demo_data import pretraining_sentences  # noqa: E402

from lisa_jax import LlamaConfig, Model, forward, init_params, save_hf  # noqa: E402
from lisa_jax.ops import causal_lm_loss  # noqa: E402

SPECIALS = ["<pad>", "<s>", "</s>"]
SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages"}


# ----------------------------------------------------------------------------- corpus


def stdlib_docstrings(min_chars: int = 40) -> list[str]:
    """Docstrings of the standard library's top-level modules and their packages, in path order."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for name in sorted(sys.stdlib_module_names):
        path = os.path.join(root, name + ".py")
        if os.path.isfile(path):
            files.append(path)
        pkg = os.path.join(root, name)
        if os.path.isdir(pkg):
            for dirpath, dirnames, filenames in os.walk(pkg):
                dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
                files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    docs = []
    for path in files:
        try:
            tree = ast.parse(Path(path).read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    docs.append(doc)
    return docs


def task_paragraphs(n_sentences: int, seed: int = 1, per_paragraph: int = 8) -> list[str]:
    s = pretraining_sentences(n_sentences, seed)
    return [" ".join(s[i:i + per_paragraph]) for i in range(0, len(s), per_paragraph)]


def instruction_texts(path: Path) -> list[str]:
    """The demo instructions as plain text, for the tokenizer's merges only."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        out.append("### Instruction:\n" + r["instruction"] + "\n\n### Input:\n" + r.get("input", "")
                   + "\n\n### Response:\n" + r["output"])
    return out


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    # Encoding starts with <s>, as every pretraining document does (token_stream), so
    # that fine-tuning and prompting see the model's own document start.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", clean_up_tokenization_spaces=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    # A minimal, explicit config that any transformers version loads as the fast tokenizer.
    (out_dir / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", add_bos_token=False, add_eos_token=False,
        clean_up_tokenization_spaces=False, model_max_length=1024), indent=2) + "\n")
    for extra in ("special_tokens_map.json", "chat_template.jinja"):
        if (out_dir / extra).exists():
            (out_dir / extra).unlink()
    return fast


# ----------------------------------------------------------------------------- saving


def save_model(cfg: LlamaConfig, params, out_dir: Path):
    save_hf(Model(cfg, params), str(out_dir), tokenizer_from=str(out_dir))
    return "lisa_jax.save_hf"


def check_with_transformers(cfg: LlamaConfig, params, out_dir: Path, ids: np.ndarray):
    """Load the saved directory with transformers and compare its logits to ours."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("torch not installed; skipped the transformers check")
        return None
    model = AutoModelForCausalLM.from_pretrained(str(out_dir), torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    ours = np.asarray(forward(cfg, params, jnp.asarray(ids)))
    err = float(np.max(np.abs(theirs - ours)))
    print(f"transformers logits max |diff| = {err:.2e}")
    assert err < 1e-3, err
    return err


# ----------------------------------------------------------------------------- training


def token_stream(tok, texts: list[str]) -> np.ndarray:
    """``<s> text </s>`` for every text, concatenated."""
    enc = tok(texts, add_special_tokens=False)["input_ids"]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    return np.concatenate([np.asarray([bos] + e + [eos], np.int32) for e in enc])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="lisa_jax/demo/model")
    ap.add_argument("--instructions", default="lisa_jax/demo/instructions.jsonl")
    ap.add_argument("--vocab-size", type=int, default=1536)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=512)
    add_flags(ap, max_seq_len=128, batch_size=32, steps=1000, lr=3e-3, seed=0,
              helps=dict(max_seq_len="tokens per pretraining window"))
    ap.add_argument("--task-sentences", type=int, default=40000)
    args = ap.parse_args(argv)
    out = Path(args.out)

    t0 = time.time()
    docs = stdlib_docstrings()
    tasks = task_paragraphs(args.task_sentences, seed=args.seed + 1)
    corpus = docs + tasks
    print(f"corpus: {len(docs)} docstrings ({sum(map(len, docs)) / 1e6:.2f}M chars), "
          f"{len(tasks)} task paragraphs ({sum(map(len, tasks)) / 1e6:.2f}M chars)")
    tok = train_tokenizer(corpus + instruction_texts(Path(args.instructions)),
                          args.vocab_size, out)
    stream = token_stream(tok, corpus)
    print(f"tokenizer: vocab {len(tok)}; corpus {len(stream) / 1e6:.2f}M tokens "
          f"({time.time() - t0:.0f}s)")

    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, rms_norm_eps=1e-5, max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    params = init_params(cfg, jax.random.key(args.seed))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"model: {n_params / 1e6:.2f}M parameters")

    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(100, args.steps // 10),
                                               args.steps, end_value=args.lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(sched, b1=0.9, b2=0.98, weight_decay=0.05))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, ids):
        loss, grads = jax.value_and_grad(lambda p: causal_lm_loss(forward(cfg, p, ids), ids))(
            params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(args.seed)
    S, B = args.max_seq_len, args.batch_size
    t1, ema = time.time(), None
    for i in range(args.steps):
        starts = rng.integers(0, len(stream) - S, size=B)
        ids = np.stack([stream[s:s + S] for s in starts])
        params, opt_state, loss = step(params, opt_state, jnp.asarray(ids))
        if i % 50 == 0 or i == args.steps - 1:
            loss = float(loss)
            ema = loss if ema is None else 0.5 * ema + 0.5 * loss
            print(f"step {i:5d}  loss {loss:.3f}  {time.time() - t1:.0f}s", flush=True)
    train_s = time.time() - t1

    how = save_model(cfg, params, out)
    print(f"saved to {out} with the {how}; training {train_s:.0f}s, total {time.time() - t0:.0f}s")
    check_with_transformers(cfg, params, out, stream[:2 * 64].reshape(2, 64))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"model directory: {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
