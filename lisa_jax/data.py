"""Instruction data: loading, rendering with loss masks, eval split and fixed-shape batches.

Pipeline::

    tok = load_tokenizer(model_dir)
    records = load_records("data.jsonl")                  # Alpaca or chat records
    train_recs, eval_recs = train_eval_split(records, eval_fraction=0.05, seed=0)
    train, stats = build_examples(train_recs, tok, max_seq_len=512)
    loader = DataLoader(train, batch_size=8, seed=0, pad_id=tok.pad_token_id)
    for batch in loader:                                   # endless, epoch after epoch
        batch["input_ids"], batch["loss_mask"]             # int32 [B, S]

``prepare_data`` does the middle three steps in one call.

Record forms (JSON list or JSONL, one object a line):

* Alpaca: ``{"instruction": ..., "input": optional, "output": ...}``
* chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``

Rendering uses the tokenizer's chat template when it has one, else the plain Alpaca template
(``PROMPT_TEMPLATE`` / ``PROMPT_TEMPLATE_NO_INPUT``, the response followed by eos). The prompt
and each response are tokenized separately and concatenated, so the boundary between masked and
trained tokens is exact. ``loss_mask[t] = 1`` marks token ``t`` as a target (the convention of
``lisa_jax.model.causal_lm_loss``): response tokens only, and for chat only assistant turns.

Batches are right padded (causal attention needs no mask for that: no real token attends to a
later pad) and their length ``S`` is rounded up to one of a few bucket lengths, so a jitted
step compiles only a few shapes. Sequence packing is deliberately not offered: the attention
path has no segment ids, so packed examples would attend across their boundaries.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
ROLES = ("system", "user", "assistant")
BUCKET_MULTIPLE = 64


# ----------------------------------------------------------------------------- loading


def load_records(path: str | Path) -> list[dict]:
    """Records from a JSON file holding a list, or a JSONL file (one object a line)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"data file {str(p)!r} not found; pass the path of a .json or .jsonl "
                         "file of instruction records")
    text = p.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: malformed JSON at line {e.lineno}: {e.msg}; the file must "
                             "hold one JSON list of records (or be JSONL)") from None
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: malformed JSONL at line {lineno}: {e.msg}; each line "
                                 "must be one complete JSON object") from None
    if not records:
        raise ValueError(f"{p}: no records found; the file must hold instruction records")
    for i, r in enumerate(records):
        validate_record(r, i)
    return records


def validate_record(record: Any, index: int) -> str:
    """``"alpaca"`` or ``"chat"``; a ValueError naming the record and what it lacks otherwise."""
    if not isinstance(record, dict):
        raise ValueError(f"record {index} is a {type(record).__name__}, not an object; each record "
                         "needs 'instruction' and 'output', or 'messages'")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"record {index}: 'messages' must be a non-empty list of "
                             "{role, content} objects")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"record {index}: message {j} is missing 'role' or 'content'")
            if m["role"] not in ROLES:
                raise ValueError(f"record {index}: message {j} has role {m['role']!r}; use one "
                                 f"of {', '.join(ROLES)}")
            if not isinstance(m["content"], str):
                raise ValueError(f"record {index}: message {j} 'content' must be a string")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"record {index}: 'messages' has no assistant turn to train on")
        return "chat"
    missing = [k for k in ("instruction", "output") if k not in record]
    if missing:
        raise ValueError(f"record {index} is missing {' and '.join(repr(k) for k in missing)}; "
                         "Alpaca records need 'instruction' and 'output' (chat records need "
                         "'messages')")
    for k in ("instruction", "input", "output"):
        if k in record and record[k] is not None and not isinstance(record[k], str):
            raise ValueError(f"record {index}: {k!r} must be a string")
    return "alpaca"


def load_tokenizer(model_dir: str | Path):
    """The model directory's tokenizer (local files only), with pad = eos if it has no pad."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load a tokenizer from {str(model_dir)!r} ({e}); the "
                         "directory needs tokenizer.json or the tokenizer's files") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"the tokenizer in {model_dir} has neither a pad nor an eos token; "
                             "add one to its tokenizer_config.json")
        tok.pad_token = tok.eos_token
    return tok


# ----------------------------------------------------------------------------- rendering


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized example: ``input_ids`` and ``loss_mask`` (1 = target token), int32 [T]."""

    input_ids: np.ndarray
    loss_mask: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)


def to_messages(record: dict) -> list[dict]:
    """Chat messages of a record (an Alpaca record becomes one user and one assistant turn)."""
    if "messages" in record:
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    user = record["instruction"]
    if record.get("input"):
        user = f"{user}\n\n{record['input']}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def render_plain(record: dict) -> list[tuple[str, bool]]:
    """``(text, is_target)`` segments in the plain Alpaca template; eos follows each target."""
    if "messages" not in record:
        if record.get("input"):
            prompt = PROMPT_TEMPLATE.format(instruction=record["instruction"],
                                            input=record["input"])
        else:
            prompt = PROMPT_TEMPLATE_NO_INPUT.format(instruction=record["instruction"])
        return [(prompt, False), (record["output"], True)]
    segs: list[tuple[str, bool]] = []
    pending = ""
    for m in record["messages"]:
        if m["role"] == "system":
            pending += m["content"] + "\n\n"
        elif m["role"] == "user":
            pending += PROMPT_TEMPLATE_NO_INPUT.format(instruction=m["content"])
        else:
            if not pending.endswith("### Response:\n"):
                pending += "### Response:\n"
            segs.append((pending, False))
            segs.append((m["content"], True))
            pending = ""
    return segs  # trailing turns after the last assistant reply carry no target


def render_chat_template(tokenizer, record: dict) -> list[tuple[str, bool]]:
    """``(text, is_target)`` segments from the tokenizer's chat template.

    Each assistant turn's text is the difference between the conversation rendered through it
    and the conversation before it rendered with the generation prompt, so it holds exactly what
    the template emits for that turn (its content and end-of-turn marker).
    """
    msgs = to_messages(record)
    render = lambda m, gen: tokenizer.apply_chat_template(  # noqa: E731
        m, tokenize=False, add_generation_prompt=gen)
    segs: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = render(msgs[:i], True)
        full = render(msgs[:i + 1], False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise ValueError("the tokenizer's chat template does not render conversations "
                             "incrementally, so assistant turns cannot be masked exactly; pass "
                             "use_chat_template=False to use the plain template")
        segs.append((prefix[len(done):], False))
        segs.append((full[len(prefix):], True))
        done = full
    return [(t, tgt) for t, tgt in segs if t]


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer(text)`` itself puts the BOS token first (``add_bos_token`` or its
    post-processor); Llama-3 and ChatML tokenizers, for instance, do not."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    # Asked of the tokenizer's behaviour rather than its add_bos_token attribute, which some
    # tokenizers leave unset while their post-processor adds BOS.
    probe = "a"
    with_special = tokenizer(probe)["input_ids"]
    without = tokenizer(probe, add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos] and without[:1] != [bos]


def tokenize_record(tokenizer, record: dict, use_chat_template: bool | None = None,
                    add_bos: bool | None = None) -> Example:
    """Render and tokenize one record, each segment on its own, and build its loss mask.

    BOS comes first when the tokenizer would add it to a plain ``tokenizer(text)`` call
    (``add_bos``: that answer, if already known), so training and generation from the same
    text agree; a chat template that writes the BOS itself is not given a second one.
    """
    if use_chat_template is None:
        use_chat_template = bool(getattr(tokenizer, "chat_template", None))
    if add_bos is None:
        add_bos = tokenizer_adds_bos(tokenizer)
    segs = render_chat_template(tokenizer, record) if use_chat_template else render_plain(record)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    mask: list[int] = []
    rendered_bos = bool(segs and tokenizer.bos_token
                        and segs[0][0].startswith(tokenizer.bos_token))
    if add_bos and not rendered_bos:
        ids.append(tokenizer.bos_token_id)
        mask.append(0)
    for text, is_target in segs:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        if is_target and not use_chat_template:
            piece = piece + [eos]
        ids += piece
        mask += [int(is_target)] * len(piece)
    return Example(np.asarray(ids, np.int32), np.asarray(mask, np.int32))


@dataclasses.dataclass
class DataStats:
    """What ``build_examples`` kept, dropped and truncated."""

    num_records: int = 0
    num_examples: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    max_len: int = 0
    mean_len: float = 0.0


def build_examples(records: Sequence[dict], tokenizer, max_seq_len: int,
                   truncate: bool = False,
                   use_chat_template: bool | None = None) -> tuple[list[Example], DataStats]:
    """Tokenized examples of ``records``; longer than ``max_seq_len`` ones are dropped (default)
    or cut to it (``truncate=True``; kept only if a target token survives)."""
    stats = DataStats(num_records=len(records))
    out: list[Example] = []
    add_bos = tokenizer_adds_bos(tokenizer) if records else False
    for i, r in enumerate(records):
        validate_record(r, i)
        ex = tokenize_record(tokenizer, r, use_chat_template, add_bos)
        if len(ex) > max_seq_len:
            if not truncate:
                stats.dropped_too_long += 1
                continue
            ex = Example(ex.input_ids[:max_seq_len], ex.loss_mask[:max_seq_len])
            stats.truncated += 1
        if not ex.loss_mask.any():
            stats.dropped_no_target += 1
            continue
        out.append(ex)
    if records and not out:
        if stats.dropped_too_long:
            raise ValueError(f"all {len(records)} examples are longer than max length "
                             f"{max_seq_len} tokens ({stats.dropped_too_long} dropped); raise "
                             "--max-seq-len or pass --truncate")
        raise ValueError(f"none of the {len(records)} examples has a response token left to "
                         "train on; raise --max-seq-len")
    if stats.dropped_too_long:
        log.warning("dropped %d of %d examples longer than %d tokens (raise --max-seq-len to "
                    "keep them)", stats.dropped_too_long, len(records), max_seq_len)
    stats.num_examples = len(out)
    if out:
        lens = [len(e) for e in out]
        stats.max_len, stats.mean_len = max(lens), float(np.mean(lens))
    return out, stats


# ----------------------------------------------------------------------------- splitting


def train_eval_split(items: Sequence, eval_fraction: float | None = None,
                     eval_size: int | None = None, seed: int = 0) -> tuple[list, list]:
    """A held-out split, deterministic in ``seed``; the two parts are disjoint and keep order."""
    n = len(items)
    if eval_size is not None and eval_fraction is not None:
        raise ValueError("give eval_size or eval_fraction, not both")
    if eval_fraction is not None:
        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
        k = int(round(n * eval_fraction))
        if eval_fraction > 0 and n > 1:
            k = max(k, 1)
    else:
        k = int(eval_size or 0)
    if k < 0 or (k >= n and k > 0):
        raise ValueError(f"eval split of {k} leaves no training data out of {n} examples; "
                         "lower --eval-size/--eval-fraction")
    held = set(np.random.default_rng([seed, 0x5EED]).permutation(n)[:k].tolist())
    train = [x for i, x in enumerate(items) if i not in held]
    ev = [x for i, x in enumerate(items) if i in held]
    return train, ev


@dataclasses.dataclass
class Splits:
    train: list[Example]
    eval: list[Example]
    stats: DataStats


def prepare_data(path: str | Path, tokenizer, max_seq_len: int,
                 eval_fraction: float | None = None, eval_size: int | None = None,
                 seed: int = 0, truncate: bool = False,
                 use_chat_template: bool | None = None) -> Splits:
    """Load, split (on records, so the split does not depend on ``max_seq_len``) and tokenize."""
    records = load_records(path)
    tr, ev = train_eval_split(records, eval_fraction, eval_size, seed)
    train, stats = build_examples(tr, tokenizer, max_seq_len, truncate, use_chat_template)
    evals, _ = (build_examples(ev, tokenizer, max_seq_len, truncate, use_chat_template)
                if ev else ([], None))
    return Splits(train, evals, stats)


# ----------------------------------------------------------------------------- batching


def bucket_lengths(max_seq_len: int, multiple: int = BUCKET_MULTIPLE) -> tuple[int, ...]:
    """Allowed batch lengths: multiples of ``multiple`` below ``max_seq_len``, then it."""
    out = list(range(multiple, max_seq_len, multiple))
    return tuple(out + [max_seq_len])


def pad_batch(examples: Sequence[Example], batch_size: int, seq_len: int,
              pad_id: int) -> dict[str, Any]:
    """Right-padded int32 arrays ``[batch_size, seq_len]``; missing rows are all padding."""
    ids = np.full((batch_size, seq_len), pad_id, np.int32)
    mask = np.zeros((batch_size, seq_len), np.int32)
    for r, ex in enumerate(examples):
        ids[r, :len(ex)] = ex.input_ids
        mask[r, :len(ex)] = ex.loss_mask
    return {"input_ids": ids, "loss_mask": mask,
            "num_tokens": int(sum(len(e) for e in examples)),
            "num_target_tokens": int(mask.sum()),
            "num_examples": len(examples)}


class DataLoader:
    """Deterministic, resumable stream of fixed-shape batches, epoch after epoch.

    Epoch ``e`` shuffles with ``(seed, e)``; within chunks of ``chunk_batches`` batches the
    examples are sorted by length (length bucketing), and the batches are shuffled again.
    Each batch is ``{"input_ids", "loss_mask"}`` (int32 ``[batch_size, S]``, right padded with
    ``pad_id``; ``S`` the smallest of ``buckets`` that fits) plus ``num_tokens`` (non-pad
    tokens), ``num_target_tokens`` and ``num_examples``, and ``epoch`` / ``step_in_epoch``.

    ``drop_last`` leaves ``len(examples) % batch_size`` examples out of each epoch, drawn at
    random with the epoch's shuffle (so a different few each epoch); otherwise the final
    partial batch is filled with all-pad rows (loss mask 0), keeping the batch shape fixed.

    ``state_dict()`` after ``k`` batches, loaded into a fresh loader over the same examples and
    settings, makes it yield exactly batch ``k + 1`` onwards.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int = 0,
                 pad_id: int = 0, max_seq_len: int | None = None,
                 buckets: Sequence[int] | None = None, chunk_batches: int = 16,
                 drop_last: bool = True, shuffle: bool = True, num_epochs: int | None = None):
        if not examples:
            raise ValueError("no examples to batch")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = int(pad_id)
        longest = max(len(e) for e in self.examples)
        if buckets is None:
            top = max_seq_len or -(-longest // BUCKET_MULTIPLE) * BUCKET_MULTIPLE
            buckets = bucket_lengths(top)
        self.buckets = tuple(sorted(set(int(b) for b in buckets)))
        if longest > self.buckets[-1]:
            raise ValueError(f"an example has {longest} tokens, more than the largest bucket "
                             f"{self.buckets[-1]}; raise --max-seq-len")
        self.chunk_batches = chunk_batches
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        n = len(self.examples)
        self.batches_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{n} examples make no full batch of {batch_size}; lower "
                             f"--batch-size to {n} or add examples")
        self.epoch = 0
        self.position = 0  # batches already yielded in this epoch
        self._plan_epoch: int | None = None
        self._plan: list[np.ndarray] = []

    # -- planning

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        """The example indices of each batch of ``epoch``, in order."""
        n, B = len(self.examples), self.batch_size
        lens = np.asarray([len(e) for e in self.examples])
        if not self.shuffle:
            order = np.arange(n)
            batches = [order[i:i + B] for i in range(0, n, B)]
        else:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(n)
            if self.drop_last:
                # Leave out the remainder before sorting by length: cut after the sort, it
                # would be the longest examples of the last chunk in every epoch.
                order = order[: n - n % B]
            chunk = B * self.chunk_batches
            sorted_order = np.concatenate([
                c[np.argsort(lens[c], kind="stable")]
                for c in (order[i:i + chunk] for i in range(0, len(order), chunk))])
            batches = [sorted_order[i:i + B] for i in range(0, len(sorted_order), B)]
        if self.drop_last and len(batches[-1]) < B:
            batches = batches[:-1]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def bucket_for(self, length: int) -> int:
        i = int(np.searchsorted(self.buckets, length))
        return self.buckets[i]

    def make_batch(self, idx: np.ndarray) -> dict[str, Any]:
        exs = [self.examples[i] for i in idx]
        S = self.bucket_for(max(len(e) for e in exs))
        return pad_batch(exs, self.batch_size, S, self.pad_id)

    # -- iteration

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        if self._plan_epoch != self.epoch:
            self._plan, self._plan_epoch = self.epoch_plan(self.epoch), self.epoch
        batch = self.make_batch(self._plan[self.position])
        batch["epoch"], batch["step_in_epoch"] = self.epoch, self.position
        self.position += 1
        return batch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def shapes(self) -> set[tuple[int, int]]:
        """Every batch shape this loader can produce (what a jitted step compiles for)."""
        return {(self.batch_size, b) for b in self.buckets}

    # -- resuming

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_examples": len(self.examples), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, mine in (("seed", self.seed), ("num_examples", len(self.examples)),
                          ("batch_size", self.batch_size)):
            if key in state and int(state[key]) != mine:
                raise ValueError(f"data state has {key}={state[key]} but this loader has "
                                 f"{mine}; resume with the same data and --{key.replace('_', '-')}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def eval_batches(examples: Sequence[Example], batch_size: int, pad_id: int = 0,
                 max_seq_len: int | None = None, max_batches: int | None = None,
                 seed: int = 0) -> list[dict[str, Any]]:
    """Eval examples in fixed-shape batches, length-sorted (last one filled with pad rows).

    Every example once when ``max_batches`` is None or the set fits in that many batches;
    otherwise a random sample of ``max_batches * batch_size`` examples, deterministic in
    ``seed``. Sampling rather than taking the first batches keeps the estimate over all
    lengths: the first length-sorted batches hold only the shortest examples.
    """
    if max_batches is not None:
        if max_batches < 0:
            raise ValueError(f"max_batches must be at least 0, got {max_batches}; lower "
                             "--eval-batches to 0 or more")
        limit = max_batches * batch_size
        if len(examples) > limit:
            picked = np.random.default_rng([seed, 0xE7A1]).choice(len(examples), limit,
                                                                   replace=False)
            examples = [examples[i] for i in np.sort(picked)]
    if not examples:
        return []
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    loader = DataLoader([examples[i] for i in order], batch_size, pad_id=pad_id,
                        max_seq_len=max_seq_len, drop_last=False, shuffle=False, num_epochs=1)
    return list(loader)
