"""Instructions rendered as training renders them, and the greedy samples a run shows: the
prompt tokens of an instruction up to its response (``lisa-jax generate`` uses them too), one
greedy completion, and the instructions a run samples before and after training.
"""
from __future__ import annotations

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
