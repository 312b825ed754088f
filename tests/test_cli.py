"""The lisa-jax command line: generate stops at every stop id of the tokenizer and the model's
configs; a mistyped command is a one-line error."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import lisa_jax
from lisa_jax import cli
from lisa_jax import data as data_lib

PROMPT = "w3 w4"
NEW = 12


def free_run(model_dir):
    """The greedy continuation of PROMPT with no stop id, and the first step whose token is
    neither the tokenizer's eos nor seen before (a second eos id the model will emit)."""
    model = lisa_jax.load_hf(model_dir)
    tok = data_lib.load_tokenizer(model_dir)
    ids = np.asarray(tok(PROMPT)["input_ids"], np.int32)
    new = np.asarray(lisa_jax.generate(model, ids[None], max_new_tokens=NEW,
                                       eos_token_id=()))[0, len(ids):].tolist()
    step = next(k for k in range(3, NEW)
                if new[k] != tok.eos_token_id and new[k] not in new[:k])
    return tok, new, step


@pytest.mark.parametrize("listed_in", ["generation_config.json", "config.json"])
def test_generate_stops_at_a_second_eos_id(tiny_llama_dir, tmp_path, capsys, listed_in):
    tok, new, step = free_run(tiny_llama_dir)
    assert tok.eos_token_id not in new[:step]
    d = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    with open(d / listed_in) as f:
        cfg = json.load(f)
    with open(d / listed_in, "w") as f:
        json.dump({**cfg, "eos_token_id": [tok.eos_token_id, new[step]]}, f)
    rc = cli.main(["generate", "--model", str(d), "--prompt", PROMPT, "--raw",
                   "--max-new-tokens", str(NEW)])
    assert rc == 0
    want = tok.decode(new[:step], skip_special_tokens=True).strip()
    assert capsys.readouterr().out == f">>> {PROMPT}\n{want}\n"


def test_a_mistyped_command_is_named_in_a_one_line_error(capsys):
    assert cli.main(["trian", "--demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown command 'trian'; use one of train, generate, export"
