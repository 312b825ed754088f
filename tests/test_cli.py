"""The lisa-jax command line: generate stops at every stop id of the tokenizer and the model's
configs; export writes a run's latest checkpoint; bad input and a mistyped command are one-line
errors."""
from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

import lisa_jax
from lisa_jax import cli
from lisa_jax import data as data_lib
from lisa_jax.config import TrainConfig
from lisa_jax.train import train

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


def run_cli(args, capsys):
    rc = cli.main(args)
    captured = capsys.readouterr()
    return rc, captured.err.strip()


@pytest.mark.parametrize("case, expect", [
    ("missing_model", r"no config.json; pass --model"),
    ("missing_data", r"data file .* not found; pass --data"),
    ("malformed_jsonl", r"line 2"),
    ("missing_fields", r"line 2 of .*bad\.jsonl is missing 'output'"),
    ("all_too_long", r"longer than max length .*--max-seq-len"),
    ("gamma_too_large", r"--lisa-layers 9 is out of range: the model has 4 layers"),
    ("unknown_method", r"unknown method 'sft'; use --method lisa, full or lora"),
    ("per_layer_with_full", r"--layer-layout per_layer is for --method lisa on one device"),
    ("unknown_flag_in_yaml", r"unknown setting\(s\) bogus"),
    ("distributed_without_cluster",
     r"--distributed could not join the other processes .*--coordinator-address"),
    ("yaml_word_for_a_number", r"--batch-size takes a whole number, got 'four'"),
    ("lr_nan", r"--lr must be a positive number, got nan"),
    ("epochs_zero", r"--epochs must be positive, got 0.0"),
    ("out_is_a_file", r"--out .* is a file; pass --out a directory"),
    ("negative_lr", r"--lr must be a positive number, got -0.001"),  # reaches the check
    ("tokenizer_larger_than_model",
     r"the tokenizer of .* has \d+ tokens but the model's vocab_size is \d+"),
    ("second_data_file_missing", r"data file .*nope\.jsonl' not found; pass --data"),
])
def test_bad_input_is_one_line_error(model_dir, data_file, tmp_path, capsys, case, expect):
    out = tmp_path / "run"
    args = ["train", "--model", model_dir, "--data", data_file, "--out", str(out), "--steps",
            "2", "--no-progress"]
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"instruction": "a", "output": "b"})
    if case == "missing_model":
        args[2] = str(tmp_path / "nope")
    elif case == "missing_data":
        args[4] = str(tmp_path / "nope.jsonl")
    elif case == "malformed_jsonl":
        bad.write_text(good + "\n{not json\n")
        args[4] = str(bad)
    elif case == "missing_fields":
        bad.write_text(good + "\n" + json.dumps({"instruction": "x"}) + "\n")
        args[4] = str(bad)
    elif case == "all_too_long":
        args += ["--max-seq-len", "4"]
    elif case == "gamma_too_large":
        args += ["--lisa-layers", "9"]
    elif case == "unknown_method":
        args += ["--method", "sft"]
    elif case == "per_layer_with_full":
        args += ["--method", "full", "--layer-layout", "per_layer"]
    elif case == "distributed_without_cluster":
        args += ["--distributed"]
    elif case == "yaml_word_for_a_number":
        cfg = tmp_path / "c.yaml"
        cfg.write_text("batch_size: four\n")
        args += ["--config", str(cfg)]
    elif case == "negative_lr":
        args += ["--lr", "-1e-3"]
    elif case == "out_is_a_file":
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("x")
    elif case == "lr_nan":
        args += ["--lr", "nan"]
    elif case == "epochs_zero":
        args = args[:7] + ["--no-progress", "--epochs", "0"]  # no --steps
    elif case == "unknown_flag_in_yaml":
        cfg = tmp_path / "c.yaml"
        cfg.write_text("bogus: 1\n")
        args += ["--config", str(cfg)]
    elif case == "tokenizer_larger_than_model":
        import jax

        from lisa_jax.hf import load_hf, save_hf
        from lisa_jax.model import Model, init_params
        tokens = len(data_lib.load_tokenizer(model_dir))
        cfg = dataclasses.replace(load_hf(model_dir).cfg, vocab_size=tokens - 1)
        args[2] = save_hf(Model(cfg, init_params(cfg, jax.random.key(0))), tmp_path / "small",
                          tokenizer_from=model_dir)
    elif case == "second_data_file_missing":
        args[4] = data_file + "," + str(tmp_path / "nope.jsonl")
    rc, err = run_cli(args, capsys)
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    import re
    assert re.search(expect, err), err



@pytest.mark.parametrize("method", ["lisa", "lora"])
def test_export_writes_the_latest_checkpoint_as_the_run_exported_it(model_dir, data_file,
                                                                    tmp_path, capsys, method):
    """``lisa-jax export`` restores the run's latest checkpoint (LoRA: adapters merged) into
    the same HF directory the run wrote at its end."""
    run = tmp_path / "run"
    train(TrainConfig(model=model_dir, data=data_file, out=str(run), method=method, steps=3,
                      lr=3e-3, batch_size=4, max_seq_len=128, save_every=3, eval_batches=1,
                      progress=False))
    capsys.readouterr()  # the run's own lines
    assert cli.main(["export", "--run", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "hf")
    ours, theirs = lisa_jax.load_hf(tmp_path / "hf"), lisa_jax.load_hf(run / "hf")
    for a, b in zip(jax.tree.leaves(ours.params), jax.tree.leaves(theirs.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert cli.main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
