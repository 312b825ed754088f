"""Generate the bundled demo instruction set, ``lisa_jax/demo/instructions.jsonl``.

Reproduce the bundled file with::

    python experiments/make_demo_data.py --out lisa_jax/demo/instructions.jsonl

The records are short Alpaca-form tasks (reverse a list, add two numbers, give an opposite,
spell a word, compare numbers, ...) whose answer format a tiny model picks up in a few dozen
steps. The output is deterministic for a given ``--seed``.

``pretraining_sentences`` renders the same kinds of facts as plain prose ("The opposite of hot
is cold.") without the "### Instruction / ### Response" format; ``pretrain_demo.py`` mixes them
into the pretraining corpus so the demo model knows the vocabulary but not the format.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("old", "new"),
    ("day", "night"), ("open", "closed"), ("light", "dark"), ("happy", "sad"),
    ("high", "low"), ("wet", "dry"), ("full", "empty"), ("early", "late"), ("hard", "soft"),
    ("long", "short"), ("left", "right"), ("good", "bad"), ("rich", "poor"), ("in", "out"),
    ("near", "far"), ("true", "false"), ("yes", "no"), ("first", "last"), ("strong", "weak"),
    ("thick", "thin"), ("loud", "quiet"), ("clean", "dirty"), ("win", "lose"),
    ("start", "stop"), ("push", "pull"), ("before", "after"), ("always", "never"),
    ("inside", "outside"), ("above", "below"), ("heavy", "light"), ("young", "old"),
    ("buy", "sell"), ("give", "take"), ("black", "white"), ("north", "south"),
]

WORDS = [
    "cat", "dog", "sun", "tree", "book", "fish", "bird", "milk", "rain", "star", "moon",
    "cake", "door", "ship", "lamp", "frog", "hat", "cup", "pen", "box", "egg", "map", "red",
    "blue", "green", "apple", "house", "water", "bread", "chair", "table", "river", "stone",
    "cloud", "horse", "music", "paper", "plant", "snow", "wind", "king", "road", "ring",
    "sand", "wolf", "bear", "lion", "duck", "goat", "rose", "leaf", "salt", "corn", "hill",
]

COLORS = ["red", "blue", "green", "yellow", "black", "white", "pink", "brown"]


def _nums(rng: random.Random, k: int, hi: int = 9) -> list[int]:
    return [rng.randint(0, hi) for _ in range(k)]


def _join(xs) -> str:
    return " ".join(str(x) for x in xs)


def make_record(rng: random.Random) -> dict:
    """One random Alpaca-form record."""
    kind = rng.choice(["reverse", "add", "sub", "opposite", "spell", "larger", "smaller",
                       "sort", "count", "upper", "first", "reverse_in", "add_in"])
    if kind == "reverse":
        xs = _nums(rng, rng.randint(3, 5))
        return dict(instruction=f"Reverse the list: {_join(xs)}", output=_join(xs[::-1]))
    if kind == "reverse_in":
        xs = _nums(rng, rng.randint(3, 5))
        return dict(instruction="Reverse the list.", input=_join(xs), output=_join(xs[::-1]))
    if kind == "add":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        return dict(instruction=f"What is {a} plus {b}?", output=str(a + b))
    if kind == "add_in":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        return dict(instruction="Add the two numbers.", input=f"{a} {b}", output=str(a + b))
    if kind == "sub":
        a = rng.randint(0, 20)
        b = rng.randint(0, a)
        return dict(instruction=f"What is {a} minus {b}?", output=str(a - b))
    if kind == "opposite":
        a, b = rng.choice(OPPOSITES)
        if rng.random() < 0.5:
            a, b = b, a
        return dict(instruction=f"Give the opposite of: {a}", output=b)
    if kind == "spell":
        w = rng.choice(WORDS)
        return dict(instruction=f"Spell the word: {w}", output=" ".join(w))
    if kind in ("larger", "smaller"):
        a, b = rng.sample(range(0, 50), 2)
        ans = max(a, b) if kind == "larger" else min(a, b)
        return dict(instruction=f"Which is {kind}, {a} or {b}?", output=str(ans))
    if kind == "sort":
        xs = _nums(rng, rng.randint(3, 5))
        return dict(instruction=f"Sort the numbers: {_join(xs)}", output=_join(sorted(xs)))
    if kind == "count":
        ws = rng.sample(COLORS + WORDS[:12], rng.randint(1, 6))
        return dict(instruction=f"How many words are in: {' '.join(ws)}", output=str(len(ws)))
    if kind == "upper":
        w = rng.choice(WORDS)
        return dict(instruction=f"Write in capitals: {w}", output=w.upper())
    w = rng.choice(WORDS)
    return dict(instruction=f"What is the first letter of: {w}", output=w[0])


def make_records(n: int = 800, seed: int = 0) -> list[dict]:
    """``n`` distinct records, deterministic in ``seed``."""
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        r = make_record(rng)
        key = (r["instruction"], r.get("input", ""))
        if key in seen:
            continue
        seen.add(key)
        out.append(r)
    return out


def make_sentence(rng: random.Random) -> str:
    """One task fact as plain prose (no instruction/response format)."""
    kind = rng.choice(["reverse", "add", "sub", "opposite", "spell", "larger", "sort",
                       "count", "upper", "first"])
    if kind == "reverse":
        xs = _nums(rng, rng.randint(3, 5))
        return f"The list {_join(xs)} reversed is {_join(xs[::-1])}."
    if kind == "add":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        return f"{a} plus {b} is {a + b}."
    if kind == "sub":
        a = rng.randint(0, 20)
        b = rng.randint(0, a)
        return f"{a} minus {b} is {a - b}."
    if kind == "opposite":
        a, b = rng.choice(OPPOSITES)
        return f"The opposite of {a} is {b}, and the opposite of {b} is {a}."
    if kind == "spell":
        w = rng.choice(WORDS)
        return f"The word {w} is spelled {' '.join(w)}."
    if kind == "larger":
        a, b = rng.sample(range(0, 50), 2)
        return f"{max(a, b)} is larger than {min(a, b)}, and {min(a, b)} is smaller."
    if kind == "sort":
        xs = _nums(rng, rng.randint(3, 5))
        return f"Sorted, the numbers {_join(xs)} become {_join(sorted(xs))}."
    if kind == "count":
        ws = rng.sample(COLORS + WORDS[:12], rng.randint(1, 6))
        return f"There are {len(ws)} words in {' '.join(ws)}."
    if kind == "upper":
        w = rng.choice(WORDS)
        return f"In capitals, {w} is written {w.upper()}."
    w = rng.choice(WORDS)
    return f"The first letter of {w} is {w[0]}."


def pretraining_sentences(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [make_sentence(rng) for _ in range(n)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="lisa_jax/demo/instructions.jsonl")
    ap.add_argument("--n", type=int, default=800)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    recs = make_records(args.n, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {len(recs)} records to {out}")


if __name__ == "__main__":
    main()
