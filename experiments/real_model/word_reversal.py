"""Fine-tune the real model on word reversal with each method and learning rate; greedy exact
match on held-out prompts.

    python3 experiments/real_model/word_reversal.py --model models/smollm2-135m-instruct \
        --methods lisa lora full --lr lisa=5e-4,2e-3 lora=1e-3 full=1e-4 --steps 400 \
        --batch-size 16 --out runs/word_reversal

Each prompt asks to reverse the order of three to six words; the answer is the words reversed.
A reply counts as an exact match when the generation, stopped at the model's stop tokens
(``<|im_end|>`` for a ChatML model), is the answer; "first line" when its first line is; and
"stopped" when the model emitted a stop token within the budget. Writes one JSON row per run to
``OUT/results.jsonl`` and the replies to ``OUT/<run>/replies.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, uninstalled

WORDS = ("apple river stone cloud window purple spider planet garden silver candle forest "
         "mirror rocket violin tiger ocean pencil castle desert lemon marble thunder whisper "
         "bridge dragon feather harbor jungle lantern meadow needle orbit pepper quartz saddle "
         "tunnel umbrella velvet walnut yellow zebra anchor basket cactus dolphin engine falcon "
         "glacier hammer island jacket kettle ladder magnet").split()


def make_records(n: int, seed: int, min_words: int = 3, max_words: int = 6) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(min_words, max_words))
        out.append({"instruction": "Reverse the order of these words: " + " ".join(words),
                    "output": " ".join(reversed(words))})
    return out


def write_jsonl(path: str, rows) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def evaluate(model_dir: str, records: list[dict], max_new_tokens: int, batch: int = 50):
    """Greedy replies to ``records`` (left-padded batches, ``lisa_jax.evaluate``) and their
    scores: exact, first_line and stopped."""
    from lisa_jax import data as data_lib
    from lisa_jax import evaluate as ev
    from lisa_jax.hf import load_hf

    tok = data_lib.load_tokenizer(model_dir)
    model = load_hf(model_dir)
    items = [ev.item_of(tok, {"instruction": r["instruction"], "output": r["output"]})
             for r in records]
    replies = ev.greedy_replies(model, tok, [it.prompt for it in items], max_new_tokens,
                                min(batch, len(items)), model_dir=model_dir)
    means, scored = ev.score(items, replies, ev.scorers("exact,first_line"))
    rows = [dict(prompt=r["instruction"], answer=r["output"], reply=x["reply"],
                 exact=bool(x["exact"]), first_line=bool(x["first_line"]),
                 stopped=x["stopped"]) for r, x in zip(records, scored)]
    scores = dict(exact=means["eval_exact"], first_line=means["eval_first_line"],
                  stopped=means["eval_stopped"])
    return scores, rows


def train_with_cli(src: str, settings: dict) -> None:
    """``lisa-jax train`` of the package in ``src`` (an older version, say) with ``settings``
    as flags; its HF export lands in ``OUT/hf`` as this version's does."""
    flags = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, os.path.abspath(value) if key in ("model", "data", "out")
                      else str(value)]
    here = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    path = [os.path.abspath(src)] + [p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p and os.path.abspath(p) != here]
    # run from src: ``python -m`` puts the working directory first on the path
    subprocess.run([sys.executable, "-m", "lisa_jax.cli", "train", *flags], check=True,
                   cwd=src, env=dict(os.environ, PYTHONPATH=os.pathsep.join(path)))


def parse_lrs(specs: list[str]) -> dict[str, list[float]]:
    """``lisa=5e-4,2e-3 lora=1e-3`` -> {"lisa": [5e-4, 2e-3], "lora": [1e-3]}."""
    out = {}
    for spec in specs:
        method, _, values = spec.partition("=")
        out[method] = [float(v) for v in values.split(",") if v]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--methods", nargs="+", default=["lisa", "lora", "full"])
    ap.add_argument("--lr", nargs="+", required=True, help="METHOD=LR[,LR...] per method")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-seq-len", type=int, default=128)
    ap.add_argument("--warmup-steps", type=int, default=20)
    ap.add_argument("--lisa-layers", type=int, default=2)
    ap.add_argument("--lisa-interval", type=int, default=10)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--train-records", type=int, default=360)
    ap.add_argument("--eval-records", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0, help="the data's seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    ap.add_argument("--words", type=int, nargs=2, default=[3, 6], metavar=("MIN", "MAX"),
                    help="words per prompt")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--extra", nargs="*", default=[], help="KEY=VALUE trainer settings for "
                    "every run (e.g. lisa_reset=all)")
    ap.add_argument("--train-src", help="a folder holding another version of the lisa_jax "
                    "package (git archive REV lisa_jax): train with its CLI, score with this one")
    a = ap.parse_args()

    from lisa_jax.config import load_config
    from lisa_jax.train import train

    os.makedirs(a.out, exist_ok=True)
    data = os.path.join(a.out, "train.jsonl")
    write_jsonl(data, make_records(a.train_records, a.seed, *a.words))
    held_out = make_records(a.eval_records, a.seed + 1, *a.words)
    extra = dict(kv.partition("=")[::2] for kv in a.extra)  # typed by load_config
    results = os.path.join(a.out, "results.jsonl")
    if "base" in a.methods:
        scores, rows = evaluate(a.model, held_out, a.max_new_tokens)
        print("base", scores, flush=True)
        with open(results, "a") as f:
            f.write(json.dumps(dict(method="base", words=a.words, **scores)) + "\n")
    for method in [m for m in a.methods if m != "base"]:
        for lr, seed in [(lr, s) for lr in parse_lrs(a.lr).get(method, []) for s in a.seeds]:
            name = f"{method}_lr{lr:g}_seed{seed}"
            run = os.path.join(a.out, name)
            t0 = time.time()
            settings = dict(
                model=a.model, data=data, out=run, method=method, lr=lr, steps=a.steps,
                batch_size=a.batch_size, max_seq_len=a.max_seq_len,
                warmup_steps=a.warmup_steps, lisa_layers=a.lisa_layers,
                lisa_interval=a.lisa_interval, lora_rank=a.lora_rank, seed=seed,
                dtype=a.dtype, eval_fraction=0.0, save_every=10**9, progress=False,
                overwrite=True, **extra)
            if a.train_src:
                summary = train_with_cli(a.train_src, settings)
            else:
                summary = train(load_config(None, settings))
            train_s = time.time() - t0
            scores, rows = evaluate(os.path.join(run, "hf"), held_out, a.max_new_tokens)
            write_jsonl(os.path.join(run, "replies.jsonl"), rows)
            row = dict(method=method, lr=lr, seed=seed, words=a.words, steps=a.steps,
                       batch_size=a.batch_size,
                       train_s=round(train_s, 1), final_loss=summary.get("final_loss")
                       if isinstance(summary, dict) else None, **extra, **scores)
            print(name, row, flush=True)
            with open(results, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
