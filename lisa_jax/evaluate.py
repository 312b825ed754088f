"""Evaluation by answers: records with reference replies (``--eval-data``) answered greedily,
in left-padded batches, each reply stopped at the model's stop ids (``generate.stop_token_ids``)
and scored against its reference by one or several scorers (``--eval-scorer``); and the run's
best evaluation by one metric (``--keep-best``), with early stopping
(``--early-stop-patience``).

Scorers take ``(reply, reference)`` and return a number (``True`` counts 1): the built-ins
``exact`` (the stripped reply is the stripped reference), ``contains`` (the reference is in the
reply) and ``first_line`` (the reply's first line is the reference), or ``module:function``
(``path/to/file.py:function`` too) for a user's own. A run logs the mean of each as ``eval_<name>`` (and ``eval_stopped``, the
fraction of replies that ended with a stop id within ``--eval-max-new-tokens``).

    >>> [s.metric for s in scorers("exact,first_line")]
    ['eval_exact', 'eval_first_line']
    >>> SCORERS["exact"](" 4 ", "4"), SCORERS["contains"]("It is 4.", "4")
    (1.0, 1.0)
    >>> SCORERS["first_line"]("4\\nbecause 2 + 2 = 4", "4")
    1.0
    >>> t = BestTracker("eval_loss", patience=2)
    >>> [t.update(step, {"eval_loss": v}) for step, v in [(1, 2.0), (2, 1.5), (3, 1.7), (4, 1.6)]]
    [True, True, False, False]
    >>> t.best_step, t.best, t.should_stop
    (2, 1.5, True)
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lisa_jax.config import TrainConfig, TrainError, flag

# ----------------------------------------------------------------------------- scorers


def exact(reply: str, reference: str) -> float:
    """1 when the reply, stripped of surrounding white space, is the reference."""
    return float(reply.strip() == reference.strip())


def contains(reply: str, reference: str) -> float:
    """1 when the (stripped) reference occurs in the reply."""
    return float(reference.strip() in reply)


def first_line(reply: str, reference: str) -> float:
    """1 when the reply's first line is the reference (a model that answers, then goes on)."""
    lines = reply.strip().split("\n")
    return float(lines[0].strip() == reference.strip())


SCORERS: dict[str, Callable[[str, str], Any]] = {
    "exact": exact, "contains": contains, "first_line": first_line}
# Metric names a scorer may not take: the loss and the stop fraction are logged beside them.
_RESERVED = ("loss", "stopped")


@dataclasses.dataclass(frozen=True)
class Scorer:
    """A scorer of ``--eval-scorer``: its metric name (``eval_<name>``) and function."""
    name: str
    fn: Callable[[str, str], Any]

    @property
    def metric(self) -> str:
        return f"eval_{self.name}"


def scorers(spec: str) -> list[Scorer]:
    """The scorers of ``--eval-scorer`` (comma-separated built-in names or
    ``module:function``); a one-line ``TrainError`` for one that does not resolve."""
    out: list[Scorer] = []
    for part in [p.strip() for p in str(spec).split(",") if p.strip()]:
        if part in SCORERS:
            out.append(Scorer(part, SCORERS[part]))
            continue
        module, sep, name = part.rpartition(":")
        if not sep or not module or not name:
            raise TrainError(f"unknown --eval-scorer {part!r}; use {', '.join(SCORERS)} or "
                             "module:function (a function of (reply, reference) -> number)")
        try:
            fn = getattr(_user_module(module), name)
        except FileNotFoundError:
            raise TrainError(f"--eval-scorer {part!r}: file {module!r} not found; name a "
                             "Python file or an importable module") from None
        except ImportError as e:
            raise TrainError(f"--eval-scorer {part!r}: module {module!r} cannot be imported "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                             "put it on PYTHONPATH or name an installed module") from None
        except AttributeError:
            raise TrainError(f"--eval-scorer {part!r}: module {module!r} has no {name!r}; name "
                             "a function of (reply, reference) -> number") from None
        if not callable(fn):
            raise TrainError(f"--eval-scorer {part!r} is not a function; name a function of "
                             "(reply, reference) -> number")
        out.append(Scorer(name, fn))
    if not out:
        raise TrainError(f"--eval-scorer is empty; use {', '.join(SCORERS)} or module:function")
    names = [s.name for s in out]
    for s in out:
        if s.name in _RESERVED:
            raise TrainError(f"--eval-scorer {s.name!r} would be logged as eval_{s.name}, which "
                             "the run logs itself; rename the function")
        if names.count(s.name) > 1:
            raise TrainError(f"--eval-scorer names {s.name!r} twice; give each scorer once")
    return out


def _user_module(module: str):
    """``module`` by name (importable: on ``PYTHONPATH`` or installed) or by its file
    (``scores.py``, ``path/to/scores.py``)."""
    if not module.endswith(".py"):
        return importlib.import_module(module)
    path = Path(module)
    if not path.is_file():
        raise FileNotFoundError(module)
    spec = importlib.util.spec_from_file_location(f"lisa_jax_scorer_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # the file's own error, as an import error of it
        raise ImportError(f"{type(e).__name__}: {e}") from e
    return mod


# ----------------------------------------------------------------------------- settings


def metric_names(cfg: TrainConfig) -> list[str]:
    """The evaluation metrics a run with ``cfg`` logs (what ``--keep-best`` may name)."""
    names = ["eval_loss"] if cfg.eval_fraction else []
    if cfg.eval_data:
        names += [s.metric for s in scorers(cfg.eval_scorer)] + ["eval_stopped"]
    return names


def lower_is_better(metric: str) -> bool:
    """Losses improve downwards, scores upwards."""
    return metric.endswith("loss")


def check_eval_settings(cfg: TrainConfig, paths: bool = True) -> None:
    """The evaluation settings are usable (``config.check_config`` calls this); ``paths``: the
    ``--eval-data`` files exist too."""
    if cfg.eval_data:
        scorers(cfg.eval_scorer)
        if paths:
            for path in eval_data_paths(cfg):
                if not Path(path).exists():
                    raise TrainError(f"eval data file {path!r} not found; pass --eval-data FILE "
                                     "(records with reference outputs, in a --data format)")
    if cfg.early_stop_patience < 0:
        raise TrainError(f"--early-stop-patience must be 0 (off) or more, got "
                         f"{cfg.early_stop_patience}")
    if cfg.early_stop_patience and not cfg.keep_best:
        raise TrainError("--early-stop-patience needs --keep-best METRIC, the metric it watches "
                         "(e.g. --keep-best eval_loss)")
    if cfg.keep_best:
        known = metric_names(cfg)
        if cfg.keep_best not in known:
            if cfg.keep_best == "eval_loss":
                why = "the run has no held-out loss (--eval-fraction 0); raise --eval-fraction"
            elif cfg.keep_best.startswith("eval_") and not cfg.eval_data:
                why = (f"{cfg.keep_best} comes from answers to --eval-data; pass --eval-data "
                       "FILE")
            else:
                why = f"this run logs {', '.join(known) or 'no evaluation metric'}"
            raise TrainError(f"--keep-best {cfg.keep_best!r} is not a metric of this run: "
                             f"{why}")
    if cfg.eval_data and cfg.distributed and cfg.num_processes not in (None, 1):
        raise TrainError("--eval-data generates on one process; drop it with --distributed "
                         "over several processes (the held-out loss still runs)")


def eval_data_paths(cfg: TrainConfig) -> list[str]:
    """The files ``--eval-data`` names (several joined by commas, as ``--data``)."""
    if not cfg.eval_data:
        return []
    if Path(cfg.eval_data).exists() or "," not in cfg.eval_data:
        return [cfg.eval_data]
    return [p for p in cfg.eval_data.split(",") if p]


# ----------------------------------------------------------------------------- items


@dataclasses.dataclass
class Item:
    """One evaluation question: its prompt tokens (rendered as in training), how it is shown,
    and the reference reply."""
    prompt: np.ndarray
    shown: str
    reference: str


def item_of(tokenizer, record: dict, where: str = "the record") -> Item:
    """The question and reference of a checked record: an Alpaca record's instruction (and
    input) and output; a chat record's conversation up to its last assistant turn, which is
    the reference."""
    from lisa_jax import data as data_lib
    from lisa_jax.prompts import conversation_ids, prompt_ids
    record = data_lib.normalize_record(record, where)
    if "messages" not in record:
        shown = record["instruction"] + (f" | {record['input']}" if record.get("input") else "")
        prompt = prompt_ids(tokenizer, {"instruction": record["instruction"],
                                        "input": record.get("input") or ""})
        return Item(np.asarray(prompt, np.int32), shown, record["output"])
    msgs = record["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    if not last or msgs[last - 1]["role"] != "user":
        raise TrainError(f"{where}: the reference reply (the last assistant turn) must follow a "
                         "user turn, the question it answers")
    try:
        prompt = conversation_ids(tokenizer, msgs[:last])
    except ValueError as e:
        raise TrainError(f"{where}: {e}".splitlines()[0]) from None
    return Item(np.asarray(prompt, np.int32), msgs[last - 1]["content"], msgs[last]["content"])


def load_items(paths, tokenizer, max_examples: int | None = None) -> list[Item]:
    """The first ``max_examples`` records of the ``--eval-data`` files as questions."""
    from lisa_jax import data as data_lib
    try:
        records = data_lib.load_records(paths)
    except data_lib.DataError as e:
        raise TrainError(f"--eval-data: {str(e).splitlines()[0]}") from None
    if max_examples is not None:
        records = records[:max_examples]
    if not records:
        raise TrainError(f"--eval-data {', '.join(map(str, paths))} holds no records; give it "
                         "records with reference outputs")
    try:
        return [item_of(tokenizer, r, f"record {i + 1} of --eval-data")
                for i, r in enumerate(records)]
    except data_lib.DataError as e:
        raise TrainError(f"--eval-data: {str(e).splitlines()[0]}") from None


# ----------------------------------------------------------------------------- generation

WIDTH_MULTIPLE = 16  # prompt widths are padded to a multiple: few shapes, few compilations


def greedy_replies(model, tokenizer, prompts: list[np.ndarray], max_new_tokens: int,
                   batch_size: int = 16, stop_ids=None, model_dir=None) -> list[tuple[str, bool]]:
    """``(reply, stopped)`` per prompt: greedy generation in left-padded batches of
    ``batch_size`` rows (shortest prompts together), each reply cut at the first stop id
    (``stop_ids``; default ``generate.stop_token_ids`` of the model, tokenizer and
    ``model_dir``) and decoded without special tokens; ``stopped``: a stop id came within
    ``max_new_tokens``. Every batch has ``batch_size`` rows and a width that is a multiple of
    ``WIDTH_MULTIPLE``, so an evaluation compiles a few programs and the next reuses them."""
    from lisa_jax.generate import generate, stop_token_ids, truncate_at_stop
    if not prompts:
        return []
    stop = tuple(stop_ids) if stop_ids is not None else \
        stop_token_ids(model.cfg, tokenizer, model_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        (stop[0] if stop else 0)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies: dict[int, tuple[str, bool]] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        filled = rows + [rows[0]] * (batch_size - len(rows))  # fixed rows; extras dropped
        width = -(-max(len(prompts[i]) for i in rows) // WIDTH_MULTIPLE) * WIDTH_MULTIPLE
        ids = np.full((batch_size, width), pad, np.int32)
        mask = np.zeros_like(ids)
        for j, i in enumerate(filled):
            p = np.asarray(prompts[i], np.int32)
            ids[j, width - len(p):], mask[j, width - len(p):] = p, 1
        out = np.asarray(generate(model, ids, max_new_tokens=max_new_tokens,
                                  attention_mask=mask, eos_token_id=stop, pad_token_id=pad))
        for j, i in enumerate(rows):
            new = out[j, width:].tolist()
            kept = truncate_at_stop(new, stop)
            replies[i] = (tokenizer.decode(kept, skip_special_tokens=True).strip(),
                          len(kept) < len(new))
    return [replies[i] for i in range(len(prompts))]


def score(items: list[Item], replies: list[tuple[str, bool]],
          scorer_list: list[Scorer]) -> tuple[dict[str, float], list[dict]]:
    """``(means, rows)``: ``eval_<scorer>`` and ``eval_stopped`` over the items, and one row
    per item (prompt, reference, reply, stopped and each scorer's value)."""
    rows = []
    for n, (item, (reply, stopped)) in enumerate(zip(items, replies), 1):
        row = {"prompt": item.shown, "reference": item.reference, "reply": reply,
               "stopped": stopped}
        for s in scorer_list:
            try:
                value = float(s.fn(reply, item.reference))
            except Exception as e:  # a user's scorer: say which and on what
                msg = str(e).splitlines()[0] if str(e) else ""
                raise TrainError(f"--eval-scorer {s.name!r} failed on record {n} of "
                                 f"--eval-data ({type(e).__name__}: {msg[:200]}); fix the "
                                 "scorer (it takes reply and reference strings and returns a "
                                 "number)") from None
            row[s.name] = value
        rows.append(row)
    means = {s.metric: float(np.mean([r[s.name] for r in rows])) for s in scorer_list}
    means["eval_stopped"] = float(np.mean([r["stopped"] for r in rows]))
    return means, rows


class AnswerEval:
    """A run's evaluation by answers: the ``--eval-data`` questions, read once, and their
    scorers; calling it with a model answers and scores them."""

    REPLIES = "eval_replies.jsonl"

    def __init__(self, cfg: TrainConfig, tokenizer, stop_ids):
        self.cfg, self.tokenizer, self.stop = cfg, tokenizer, tuple(stop_ids)
        self.scorers = scorers(cfg.eval_scorer)
        self.items = load_items(eval_data_paths(cfg), tokenizer, cfg.eval_max_examples)

    def __call__(self, model) -> tuple[dict[str, float], list[dict]]:
        replies = greedy_replies(model, self.tokenizer, [it.prompt for it in self.items],
                                 self.cfg.eval_max_new_tokens,
                                 min(self.cfg.batch_size, len(self.items)), self.stop)
        return score(self.items, replies, self.scorers)

    @classmethod
    def write_replies(cls, out: Path, step: int, rows: list[dict]) -> Path:
        """The replies of the evaluation at ``step`` as ``<out>/eval_replies.jsonl``, replacing
        the previous evaluation's at once."""
        path = Path(out) / cls.REPLIES
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        return path


def summary_line(step: int, row: dict, scorer_list: list[Scorer] | None) -> str:
    """``step 8: eval loss 2.1234, exact 0.250, stopped 0.900``: what an evaluation prints."""
    parts = []
    if "eval_loss" in row:
        parts.append(f"eval loss {row['eval_loss']:.4f}")
    for s in scorer_list or ():
        parts.append(f"{s.name} {row[s.metric]:.3f}")
    if scorer_list:
        parts.append(f"stopped {row['eval_stopped']:.3f}")
    return f"step {step}: " + ", ".join(parts)


# ----------------------------------------------------------------------------- best


class BestTracker:
    """The best value of one metric over a run's evaluations, at which step, and how many
    evaluations since it improved (early stopping after ``patience``; 0: never). Its state
    goes into each checkpoint, so a resumed run keeps both."""

    def __init__(self, metric: str, patience: int = 0):
        self.metric, self.patience = metric, int(patience)
        self.lower = lower_is_better(metric)
        self.best: float | None = None
        self.best_step: int | None = None
        self.since = 0  # evaluations since the best

    def improves(self, value: float) -> bool:
        if value is None or not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value < self.best if self.lower else value > self.best

    def update(self, step: int, row: dict) -> bool:
        """Take the evaluation ``row`` of ``step``; whether it is a new best."""
        value = row.get(self.metric)
        if self.improves(value):
            self.best, self.best_step, self.since = float(value), step, 0
            return True
        self.since += 1
        return False

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.since >= self.patience

    def state_dict(self) -> dict:
        return {"metric": self.metric, "best": self.best, "best_step": self.best_step,
                "since": self.since}

    def load_state_dict(self, state: dict | None) -> bool:
        """Continue from a checkpoint's state; ``False`` (nothing taken) when it tracked
        another metric or none."""
        if not state or state.get("metric") != self.metric:
            return False
        self.best, self.best_step = state["best"], state["best_step"]
        self.since = int(state["since"])
        return True

    def stop_line(self) -> str:
        return (f"no improvement of {self.metric} in {self.since} evaluations "
                f"({flag('early_stop_patience')} {self.patience}); best {self.best:.6g} at "
                f"step {self.best_step}")
