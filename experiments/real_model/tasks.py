"""Three exact-match tasks of different kinds for the real model, and generic prompts for the
forgetting measure. Records are Alpaca-style ``{"instruction", "output", "task"}``.

* ``reverse``: a text transformation, the order of four to eight words reversed;
* ``arithmetic``: the sum of two numbers of two or three digits, in a fixed answer format;
* ``lookup``: find one item's count in a short inventory and answer in a fixed JSON form.

Held-out sets come from another seed and never repeat a training prompt.

    >>> r = make_records("lookup", 1, seed=0)[0]
    >>> r["task"], r["output"].startswith('{"item": ')
    ('lookup', True)
"""
from __future__ import annotations

import random

from word_reversal import WORDS

TASKS = ("reverse", "arithmetic", "lookup")


def _reverse(rng: random.Random) -> dict:
    words = rng.sample(WORDS, rng.randint(4, 8))
    return {"instruction": "Reverse the order of these words: " + " ".join(words),
            "output": " ".join(reversed(words))}


def _arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    return {"instruction": f"What is {a} + {b}? Reply in the form 'Answer: N'.",
            "output": f"Answer: {a + b}"}


def _lookup(rng: random.Random) -> dict:
    items = rng.sample(WORDS, rng.randint(4, 6))
    counts = [rng.randint(1, 99) for _ in items]
    k = rng.randrange(len(items))
    listing = ", ".join(f"{w}={c}" for w, c in zip(items, counts))
    return {"instruction": f"Inventory: {listing}. Reply with JSON giving the count of "
                           f"{items[k]}.",
            "output": f'{{"item": "{items[k]}", "count": {counts[k]}}}'}


_MAKERS = {"reverse": _reverse, "arithmetic": _arithmetic, "lookup": _lookup}


def make_records(task: str, n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """``n`` distinct records of ``task`` from ``seed``, none with a prompt in ``exclude``."""
    rng = random.Random(f"{task}-{seed}")
    out, seen = [], set(exclude)
    while len(out) < n:
        r = _MAKERS[task](rng)
        if r["instruction"] not in seen:
            seen.add(r["instruction"])
            out.append(dict(r, task=task))
    return out


def train_and_held_out(n_train: int, n_eval: int, seed: int = 0):
    """The training mixture (every task, interleaved) and each task's held-out records."""
    train, held_out = [], {}
    for task in TASKS:
        rows = make_records(task, n_train, seed)
        held_out[task] = make_records(task, n_eval, seed + 1000,
                                      exclude={r["instruction"] for r in rows})
        train += rows
    random.Random(seed).shuffle(train)
    return train, held_out


# Generic requests unrelated to the tasks: the base model's own greedy answers to them are the
# forgetting set (how much less likely a fine-tuned model finds what the base model said).
GENERIC_PROMPTS = (
    "Explain why the sky is blue.",
    "Write a short poem about the sea.",
    "What are three tips for staying healthy?",
    "Describe how a bicycle works.",
    "What is the capital of France, and what is it known for?",
    "Give me a recipe for a simple salad.",
    "Why do leaves change colour in autumn?",
    "Summarize the plot of Cinderella in two sentences.",
    "How do I make a cup of tea?",
    "What is photosynthesis?",
    "Suggest a name for a pet cat and explain your choice.",
    "What is the difference between weather and climate?",
    "Write a friendly email inviting a colleague to lunch.",
    "List some benefits of reading books.",
    "How does a rainbow form?",
    "What should I pack for a weekend camping trip?",
    "Explain what a computer program is to a child.",
    "Why is exercise important?",
    "Describe the water cycle.",
    "What are some good habits for studying?",
    "How do airplanes stay in the air?",
    "Write a haiku about winter.",
    "What is the moon made of?",
    "Give advice to someone starting their first job.",
    "Why do cats purr?",
    "Explain what gravity is.",
    "What is a healthy breakfast?",
    "How can I save money on groceries?",
    "Describe a sunset over the mountains.",
    "What are the planets of the solar system?",
    "How do bees make honey?",
    "Tell me a fun fact about elephants.",
)
