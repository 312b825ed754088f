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
    try:
        rc = cli.main(args)
    except SystemExit as e:  # argparse's own errors exit from inside it
        rc = e.code
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
    ("per_layer_with_full", r"--layer-layout per_layer is for --method lisa in one process"),
    ("fsdp_prefetch_without_mesh", r"--fsdp-prefetch is for --method lisa on a --mesh with "
                                   r"fsdp \(e\.g\. --mesh fsdp=8\); drop it"),
    ("fsdp_prefetch_with_modules", r"--fsdp-prefetch gathers whole layers ahead; it does not "
                                   r"apply to --lisa-granularity matrix: drop one of them"),
    ("unknown_flag_in_yaml", r"unknown setting\(s\) bogus"),
    ("distributed_without_cluster",
     r"--distributed could not join the other processes .*--coordinator-address"),
    ("yaml_word_for_a_number", r"--batch-size takes a whole number, got 'four'"),
    ("lr_nan", r"--lr must be a positive number, got nan"),
    ("epochs_zero", r"--epochs must be positive, got 0.0"),
    ("out_is_a_file", r"--out .* is a file; pass --out a directory"),
    ("negative_lr", r"--lr must be a positive number, got -0.001"),  # reaches the check
    ("steps_not_a_number",
     r"argument --steps: invalid int value: 'abc'; see `lisa-jax train --help`"),
    ("unknown_flag", r"unrecognized arguments: --lisa-gamma 2; see `lisa-jax train --help`"),
    ("tokenizer_larger_than_model",
     r"the tokenizer of .* has \d+ tokens but the model's vocab_size is \d+"),
    ("second_data_file_missing", r"data file .*nope\.jsonl' not found; pass --data"),
    ("out_under_a_file", r"--out .*run/sub is under a file \(.*run\); pass --out a path whose "
                         r"parents are directories"),
    ("out_read_only", r"read-only file system creating the run directory .*; pass --out a "
                      r"directory on a writable file system"),
    ("out_not_writable", r"--out .* cannot be written \(read-only or not yours\); pass --out a "
                         r"directory you can write"),
    ("data_unreadable", r"permission denied reading .*d\.jsonl'; check that file \(--model, "
                        r"--data\)"),
    ("resume_nothing", r"nothing to resume in .*run; drop --resume to start a new run"),
    ("generate_empty_raw_prompt", r"--prompt is empty; --raw continues the prompt's text"),
    ("generate_nothing", r"nothing to generate for; pass --prompt TEXT or --messages FILE"),
    ("generate_raw_with_system", r"--raw uses the prompt as is.*drop --raw, or drop --system"),
    ("generate_zero_tokens", r"--max-new-tokens must be at least 1, got 0"),
    ("generate_top_p", r"--top-p must be in \(0, 1\], got 1.5"),
    ("generate_messages_missing", r"--messages file .*nope\.json' not found"),
    ("generate_messages_not_json", r"--messages file .* is not valid JSON \(line 1"),
    ("generate_messages_end_with_reply", r"must end with a user turn"),
    ("generate_messages_not_alternating",
     r"turn 2 after the system prompt is 'user' but should be 'assistant'"),
    ("generate_not_a_model", r"is neither an HF model directory .* nor a run directory"),
    ("export_out_is_a_file", r"--out .*hf\.txt is a file; pass --out a directory"),
    ("export_out_under_a_file", r"--out .*hf\.txt/x is under a file"),
    ("export_not_a_run", r"is not a run directory \(no config.yaml\); pass --run DIR"),
])
def test_bad_input_is_one_line_error(model_dir, data_file, tmp_path, capsys, monkeypatch, case,
                                     expect):
    out = tmp_path / "run"
    args = ["train", "--model", model_dir, "--data", data_file, "--out", str(out), "--steps",
            "2", "--no-progress"]
    gen = ["generate", "--model", model_dir]
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
    elif case == "fsdp_prefetch_without_mesh":
        args += ["--fsdp-prefetch"]
    elif case == "fsdp_prefetch_with_modules":
        args += ["--fsdp-prefetch", "--mesh", "fsdp=1", "--lisa-granularity", "matrix"]
    elif case == "distributed_without_cluster":
        args += ["--distributed"]
    elif case == "yaml_word_for_a_number":
        cfg = tmp_path / "c.yaml"
        cfg.write_text("batch_size: four\n")
        args += ["--config", str(cfg)]
    elif case == "steps_not_a_number":
        args[8] = "abc"
    elif case == "unknown_flag":
        args += ["--lisa-gamma", "2"]
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
    elif case == "out_under_a_file":
        out.write_text("x")
        args[6] = str(out / "sub")
    elif case == "out_read_only":  # what mkdir says on a read-only mount (root ignores modes)
        import errno
        import os
        real_mkdir = os.mkdir

        def mkdir(path, *a, **k):
            if str(path).startswith(str(tmp_path / "ro")):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real_mkdir(path, *a, **k)
        monkeypatch.setattr(os, "mkdir", mkdir)
        args[6] = str(tmp_path / "ro" / "run")
    elif case == "out_not_writable":
        import os
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **k: False if str(path) == str(out)
                            else real_access(path, mode, **k))
    elif case == "data_unreadable":
        import builtins
        import errno
        real_open = builtins.open

        def open_(file, *a, **k):
            if str(file) == data_file:
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real_open(file, *a, **k)
        monkeypatch.setattr(builtins, "open", open_)
    elif case == "resume_nothing":
        args += ["--resume"]
    elif case == "generate_empty_raw_prompt":
        args = gen + ["--prompt", "", "--raw"]
    elif case == "generate_nothing":
        args = gen
    elif case == "generate_raw_with_system":
        args = gen + ["--prompt", "w", "--raw", "--system", "be brief"]
    elif case == "generate_zero_tokens":
        args = gen + ["--prompt", "hi", "--max-new-tokens", "0"]
    elif case == "generate_top_p":
        args = gen + ["--prompt", "hi", "--temperature", "1", "--top-p", "1.5"]
    elif case == "generate_messages_missing":
        args = gen + ["--messages", str(tmp_path / "nope.json")]
    elif case == "generate_messages_not_json":
        (tmp_path / "m.json").write_text("[{role: user}]")
        args = gen + ["--messages", str(tmp_path / "m.json")]
    elif case == "generate_messages_end_with_reply":
        (tmp_path / "m.json").write_text(json.dumps(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]))
        args = gen + ["--messages", str(tmp_path / "m.json")]
    elif case == "generate_messages_not_alternating":
        (tmp_path / "m.json").write_text(json.dumps({"messages": [
            {"role": "system", "content": "s"}, {"role": "user", "content": "a"},
            {"role": "user", "content": "b"}]}))
        args = gen + ["--messages", str(tmp_path / "m.json")]
    elif case == "generate_not_a_model":
        args = ["generate", "--model", str(tmp_path), "--prompt", "hi"]
    elif case == "export_out_is_a_file":
        (tmp_path / "hf.txt").write_text("x")
        args = ["export", "--run", str(tmp_path), "--out", str(tmp_path / "hf.txt")]
    elif case == "export_out_under_a_file":
        (tmp_path / "hf.txt").write_text("x")
        args = ["export", "--run", str(tmp_path), "--out", str(tmp_path / "hf.txt" / "x")]
    elif case == "export_not_a_run":
        args = ["export", "--run", str(tmp_path), "--out", str(tmp_path / "hf")]
    rc, err = run_cli(args, capsys)
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    import re
    assert re.search(expect, err), err
    assert "Traceback" not in err


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


def test_debug_flag_or_env_shows_the_exception_and_a_fault_is_still_one_line(
        tmp_path, capsys, monkeypatch):
    """An input mistake is one line unless --debug (or LISA_JAX_DEBUG=1) asks for the
    exception itself; a fault of lisa-jax (not the input's) is one line too, exit status 1,
    naming --debug."""
    from lisa_jax.config import TrainError
    bad = ["train", "--model", str(tmp_path / "nope"), "--data", "x", "--out", str(tmp_path)]
    assert cli.main(bad) == 2
    with pytest.raises(TrainError, match="no config.json"):
        cli.main(bad + ["--debug"])
    monkeypatch.setenv("LISA_JAX_DEBUG", "1")
    with pytest.raises(TrainError, match="no config.json"):
        cli.main(bad)
    monkeypatch.delenv("LISA_JAX_DEBUG")
    assert "--debug" in cli.train_parser().format_help()
    capsys.readouterr()

    def broken(argv, debug=False):
        raise RuntimeError("a bug\nwith a second line")
    monkeypatch.setitem(cli.COMMANDS, "export", broken)
    assert cli.main(["export", "--run", "r", "--out", "o"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("error: unexpected RuntimeError: a bug; rerun with --debug (or "
                   "LISA_JAX_DEBUG=1) for the traceback, and please report it")
    with pytest.raises(RuntimeError):
        cli.main(["export", "--run", "r", "--out", "o", "--debug"])


def test_conversation_ids_render_as_training_renders_chat_records(model_dir):
    """A system prompt and several turns: the tokens up to the reply are those training gives a
    chat record before its last assistant turn; the plain template separates turns by eos."""
    from lisa_jax.prompts import conversation_ids, prompt_ids
    tok = data_lib.load_tokenizer(model_dir)
    turns = [{"role": "user", "content": "What is 2 plus 2?"},
             {"role": "assistant", "content": "4"},
             {"role": "user", "content": "And 3 plus 3?"}]
    ids = conversation_ids(tok, turns, system="Answer briefly.")
    full = data_lib.tokenize_record(tok, {"messages": [{"role": "system",
                                                        "content": "Answer briefly."},
                                                       *turns,
                                                       {"role": "assistant", "content": "6"}]})
    assert full.input_ids[:len(ids)].tolist() == ids.tolist()
    assert full.loss_mask[len(ids)] == 1 and full.loss_mask[len(ids) - 1] == 0
    assert tok.eos_token_id in ids.tolist()  # ends the first reply, before the second turn
    text = tok.decode(ids.tolist())
    assert text.index("Answer briefly") < text.index("2 plus 2") < text.index("3 plus 3")
    # One user turn and no system prompt: the same tokens as an instruction.
    assert conversation_ids(tok, turns[:1]).tolist() == prompt_ids(tok, turns[0]["content"]
                                                                   ).tolist()
    # A chat template: the prompt ends with the template's generation prompt.
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>"
                         "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    ids = conversation_ids(tok, turns, system="Answer briefly.")
    want = tok.apply_chat_template([{"role": "system", "content": "Answer briefly."}, *turns],
                                   tokenize=False, add_generation_prompt=True)
    bos = tok.bos_token if data_lib.tokenizer_adds_bos(tok) else ""  # as training adds it
    assert tok.decode(ids.tolist()).replace(" ", "") == (bos + want).replace(" ", "")


def test_generate_with_a_system_prompt_and_a_messages_file(model_dir, tmp_path, capsys):
    msgs = tmp_path / "chat.json"
    msgs.write_text(json.dumps([{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "hello"},
                                {"role": "user", "content": "What is 7 plus 5?"}]))
    rc = cli.main(["generate", "--model", model_dir, "--system", "Be brief.", "--prompt", "hi",
                   "--messages", str(msgs), "--max-new-tokens", "4"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    shown = [line for line in out.out.splitlines() if line.startswith(">>> ")]
    assert shown == [">>> hi", f">>> {msgs}: What is 7 plus 5?"]
