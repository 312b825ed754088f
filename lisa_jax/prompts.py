"""Instructions rendered as training renders them, and the greedy samples a run shows: the
prompt tokens of an instruction up to its response (``lisa-jax generate`` uses them too), of a
conversation (a system prompt, several turns) up to its next reply, one greedy completion, and
the instructions a run samples before and after training.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lisa_jax import data as data_lib
from lisa_jax import model as M
from lisa_jax.config import TrainConfig, data_paths


def prompt_ids(tokenizer, record: dict | str) -> np.ndarray:
    """The tokens of an instruction (or an Alpaca record without output) rendered exactly as
    in training, up to the response."""
    record = {"instruction": record} if isinstance(record, str) else record
    ex = data_lib.tokenize_record(tokenizer, {**record, "output": ""})
    first_target = int(np.argmax(ex.loss_mask)) if ex.loss_mask.any() else len(ex.input_ids)
    return ex.input_ids[:first_target]


def conversation_ids(tokenizer, messages: list[dict], system: str | None = None) -> np.ndarray:
    """The tokens of a conversation up to the assistant's next reply, rendered exactly as
    training renders a chat record: through the tokenizer's chat template when it has one,
    else the plain template (each user turn an instruction, each earlier reply followed by
    eos). ``messages`` alternate user and assistant turns and end with the user's;
    ``system``: a system prompt put first (where the messages have none)."""
    msgs = [dict(m) for m in messages]
    if system and not (msgs and msgs[0]["role"] == "system"):
        msgs.insert(0, {"role": "system", "content": system})
    check_conversation(msgs)
    ex = data_lib.tokenize_record(tokenizer, {"messages": msgs + [{"role": "assistant",
                                                                   "content": ""}]})
    mask = np.asarray(ex.loss_mask, bool)
    if not mask.size or not mask[-1]:  # the empty reply rendered to nothing: all is prompt
        return ex.input_ids
    starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
    return ex.input_ids[:starts[-1]]


def check_conversation(messages: list[dict], where: str = "the conversation") -> None:
    """A ``ValueError`` naming the turn unless ``messages`` are an optional system turn, then
    user and assistant turns alternating, the last the user's, every content a string."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where} must be a non-empty list of messages with 'role' and "
                         "'content'")
    body = messages[1:] if isinstance(messages[0], dict) and \
        messages[0].get("role") == "system" else messages
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or \
                m.get("role") not in data_lib.ROLES:
            raise ValueError(f"{where}: message {i} must be an object with 'role' (system, "
                             "user or assistant) and 'content' (a string)")
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(f"{where}: turn {i + 1} after the system prompt is "
                             f"{m['role']!r} but should be {want!r} (turns alternate user, "
                             "assistant, ..., user)")
    if not body or body[-1]["role"] != "user":
        raise ValueError(f"{where} must end with a user turn (the reply is generated)")


def load_conversation(path: str) -> list[dict]:
    """``generate --messages FILE``: a JSON list of ``{"role", "content"}`` messages, or an
    object with such a list under ``messages``, ending with the user's turn."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--messages file {path!r} not found; pass a JSON file of messages")
    try:
        value = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--messages file {path!r} is not valid JSON (line {e.lineno}: "
                         f"{e.msg})")
    if isinstance(value, dict):
        value = value.get("messages")
    check_conversation(value, f"--messages file {path!r}")
    return value


def sample(model: M.Model, tokenizer, record: dict | str, max_new_tokens: int,
           model_dir: str | None = None) -> str:
    """Greedy completion of one instruction (or Alpaca record), stopped at any of the model's
    stop ids (``generate.stop_token_ids``)."""
    from lisa_jax.generate import generate, stop_token_ids, truncate_at_stop
    prompt = prompt_ids(tokenizer, record)
    stop = stop_token_ids(model.cfg, tokenizer, model_dir)
    out = generate(model, prompt[None], max_new_tokens=max_new_tokens, eos_token_id=stop,
                   pad_token_id=tokenizer.pad_token_id)
    new = truncate_at_stop(np.asarray(out)[0, len(prompt):], stop)
    return tokenizer.decode(list(new), skip_special_tokens=True).strip()


def sample_probes(cfg: TrainConfig) -> list[tuple[dict, str | None]]:
    """Instructions to generate for before and after training: ``--sample-prompt``, or for the
    demo the first held-out records (with their reference answers)."""
    if cfg.sample_prompt:
        return [({"instruction": cfg.sample_prompt}, None)]
    if not cfg.demo:
        return []
    _, held_out = data_lib.train_eval_split(data_lib.load_records(data_paths(cfg)),
                                            cfg.eval_fraction or None, seed=cfg.seed)
    alpaca = [r for r in held_out if "instruction" in r]  # the demo's records are Alpaca
    return [({"instruction": r["instruction"], "input": r.get("input", "")}, r["output"])
            for r in alpaca[:3]]


def shown(record: dict) -> str:
    """A record's instruction (and input) as a sample line quotes it."""
    return repr(record["instruction"] + (f" | {record['input']}" if record.get("input") else ""))
