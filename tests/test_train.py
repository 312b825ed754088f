"""The trainer and CLI: resume, interruption, checkpoints, bad input, the demo."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from lisa_jax import cli
from lisa_jax.train import TrainConfig, TrainError, _Checkpoints, load_config, train

def small(model_dir, data_file, out, **kw):
    base = dict(model=model_dir, data=data_file, out=str(out), steps=8, lr=3e-3,
                batch_size=4, max_seq_len=128, lisa_layers=2, lisa_interval=3, save_every=4,
                eval_every=4, eval_batches=2, progress=False, export=False)
    return TrainConfig(**{**base, **kw})


def final_params(run_dir):
    ck = _Checkpoints(Path(run_dir) / "checkpoints", 2)
    step = ck.latest()
    restored = ck.mngr.restore(step, args=ck.ocp.args.Composite(
        params=ck.ocp.args.StandardRestore(), meta=ck.ocp.args.JsonRestore()))
    return step, restored["params"], restored["meta"]


def logged_layers(run_dir):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["active_layers"] for r in rows if "active_layers" in r}


@pytest.mark.parametrize("method,layout,dtype", [
    ("lisa", "stacked", "float32"), ("lisa", "per_layer", "float32"), ("lora", "auto", "float32"),
    ("lisa", "per_layer", "bfloat16")])  # bfloat16: the masters' remainders resume too
def test_resume_after_interruption_is_bit_identical(model_dir, data_file, tmp_path, method,
                                                    layout, dtype):
    kw = dict(method=method, layer_layout=layout, dtype=dtype)
    straight = train(small(model_dir, data_file, tmp_path / "a", **kw))
    assert straight["status"] == "finished"
    halted = train(small(model_dir, data_file, tmp_path / "b", **kw), halt_at=5)
    assert halted["status"] == "interrupted" and halted["steps"] == 5
    resumed = train(small(model_dir, data_file, tmp_path / "b", resume=True, **kw))
    assert resumed["status"] == "finished" and resumed["steps"] == 8
    step_a, pa, meta_a = final_params(tmp_path / "a")
    step_b, pb, meta_b = final_params(tmp_path / "b")
    assert step_a == step_b == 8
    assert meta_a["data"] == meta_b["data"]
    for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if method == "lisa":
        la, lb = logged_layers(tmp_path / "a"), logged_layers(tmp_path / "b")
        assert la == lb and len({tuple(v) for v in la.values()}) > 1
    # The optimizer states too (LoRA's adapters, the masters' remainders, the moments).
    ca = _Checkpoints(tmp_path / "a" / "checkpoints", 2)
    cb = _Checkpoints(tmp_path / "b" / "checkpoints", 2)
    oa = ca.mngr.restore(8, args=ca.ocp.args.Composite(opt=ca.ocp.args.StandardRestore()))
    ob = cb.mngr.restore(8, args=cb.ocp.args.Composite(opt=cb.ocp.args.StandardRestore()))
    for a, b in zip(jax.tree.leaves(oa["opt"]), jax.tree.leaves(ob["opt"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if dtype == "bfloat16":
        assert any(np.asarray(x).dtype == np.int16 and np.abs(np.asarray(x)).max() > 0
                   for x in jax.tree.leaves(oa["opt"]))


def test_lisa_on_every_layer_equals_full_fine_tuning_with_decay_and_clipping(
        model_dir, data_file, tmp_path):
    """γ = L trains what full fine-tuning trains, with the same AdamW: weight decay spares the
    norm scales of both (a stacked norm ``[L, D]`` is no matrix), and both clip by the norm of
    every gradient."""
    kw = dict(steps=4, lr=1e-3, weight_decay=0.5, clip_norm=0.05, lisa_interval=100,
              remat="full", save_every=4)
    train(small(model_dir, data_file, tmp_path / "full", method="full", **kw))
    train(small(model_dir, data_file, tmp_path / "lisa", method="lisa", lisa_layers=4, **kw))
    _, pf, _ = final_params(tmp_path / "full")
    _, pl, _ = final_params(tmp_path / "lisa")
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(pf)[0], jax.tree.leaves(pl)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))


def test_resume_from_the_run_directory_alone_and_with_a_changed_step_count(
        model_dir, data_file, tmp_path, capsys):
    """``--out DIR --resume`` continues from the run's saved settings; a setting that may
    change (the step count) is applied, printed and saved in config.yaml."""
    out = tmp_path / "run"
    train(small(model_dir, data_file, out), halt_at=4)
    rc = cli.main(["train", "--out", str(out), "--resume", "--steps", "10"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "resuming with --steps 10 (was 8)" in captured.out + captured.err
    assert json.loads((out / "summary.json").read_text())["steps"] == 10
    assert load_config(str(out / "config.yaml")).steps == 10


def test_resume_refuses_a_fixed_setting_and_changes_nothing(model_dir, data_file, tmp_path,
                                                             capsys):
    out = tmp_path / "run"
    train(small(model_dir, data_file, out), halt_at=4)
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for flag, value in [("--lisa-layers", "3"), ("--batch-size", "2"), ("--seed", "1"),
                        ("--method", "full"), ("--dtype", "bfloat16")]:
        rc = cli.main(["train", "--out", str(out), "--resume", flag, value])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith(f"error: {flag} cannot change when resuming"), err
        assert len(err.splitlines()) == 1
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot


def test_a_second_run_into_the_same_out_is_refused_while_the_first_lives(
        model_dir, data_file, tmp_path, capsys):
    """A live run holds the lock (here a process holding it as a run would): another run into
    the same --out is refused, --overwrite included, and finds its directory untouched; once
    the holder is gone its lock file is simply taken over."""
    out = tmp_path / "run"
    train(small(model_dir, data_file, out, steps=2))
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    lock = tmp_path / ".run.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
        "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"), str(lock)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in ([], ["--overwrite"], ["--resume"]):
            rc, err = run_cli(["train", "--model", model_dir, "--data", data_file, "--out",
                               str(out), "--steps", "2", "--no-progress", *extra], capsys)
            assert rc == 2 and "another lisa-jax train is running into" in err, err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot
    finally:
        holder.kill()
        holder.wait()
    assert lock.exists()  # stale: its holder is dead
    rc, err = run_cli(["train", "--out", str(out), "--resume", "--steps", "3"], capsys)
    assert rc == 0, err


def test_resume_across_a_period_with_no_sampled_layer(model_dir, data_file, tmp_path):
    """Bernoulli LISA can sample no layer for a period; its state then holds zero-size arrays,
    which must checkpoint and resume like any other (orbax alone refuses them). Per-layer
    layout: it also has no sampled layer to gather or write back then."""
    kw = dict(lisa_probs="0.02,0.02,0.02,0.7", lisa_interval=2, save_every=2,
              layer_layout="per_layer")
    train(small(model_dir, data_file, tmp_path / "a", **kw))
    train(small(model_dir, data_file, tmp_path / "b", **kw), halt_at=4)
    train(small(model_dir, data_file, tmp_path / "b", resume=True, **kw))
    layers = logged_layers(tmp_path / "a")
    assert [] in layers.values() and layers == logged_layers(tmp_path / "b")
    _, pa, _ = final_params(tmp_path / "a")
    _, pb, _ = final_params(tmp_path / "b")
    for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_per_layer_layout_trains_as_the_stacked_one_and_shares_its_checkpoints(
        model_dir, data_file, tmp_path):
    """The per-layer layout (``--layer-layout per_layer``) is a layout, not another method: the
    same run in both layouts ends at the same weights (to float rounding: the programs
    differ), and a run interrupted in one layout resumes in the other."""
    train(small(model_dir, data_file, tmp_path / "s", layer_layout="stacked"))
    train(small(model_dir, data_file, tmp_path / "p", layer_layout="per_layer"))
    train(small(model_dir, data_file, tmp_path / "m", layer_layout="per_layer"), halt_at=5)
    resumed = train(small(model_dir, data_file, tmp_path / "m", layer_layout="stacked",
                          resume=True))
    assert resumed["status"] == "finished"
    _, ps, _ = final_params(tmp_path / "s")
    assert logged_layers(tmp_path / "s") == logged_layers(tmp_path / "p") == \
        logged_layers(tmp_path / "m")
    for run in ("p", "m"):
        _, p, _ = final_params(tmp_path / run)
        assert jax.tree.structure(p) == jax.tree.structure(ps)  # stacked on disk
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ps)):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            assert np.max(np.abs(a - b)) <= 1e-4 * np.max(np.abs(b)), run


def test_sigterm_saves_a_loadable_checkpoint_and_resume_finishes(model_dir, data_file,
                                                                  tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lisa_jax.cli", "train", "--model", model_dir, "--data",
           data_file, "--out", str(out), "--steps", "100000", "--save-every", "100000",
           "--batch-size", "4", "--max-seq-len", "128", "--no-progress", "--no-export"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n")
                                          >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    step, params, meta = final_params(out)
    assert step >= 3 and meta["step"] == step
    cfg = load_config(str(out / "config.yaml"), {"resume": True, "steps": step + 2,
                                                  "progress": False})
    assert train(cfg)["steps"] == step + 2


def test_corrupt_checkpoint_is_a_clear_error(model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    train(small(model_dir, data_file, out, steps=4))
    for f in (out / "checkpoints" / "4" / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(TrainError, match=r"checkpoint .*4 cannot be read.*--overwrite"):
        train(small(model_dir, data_file, out, steps=6, resume=True))


def test_nan_loss_stops_with_last_good_checkpoint_intact(model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    train(small(model_dir, data_file, out, steps=2, save_every=2))
    before = final_params(out)
    with pytest.raises(TrainError, match=r"loss is (nan|inf).*last good checkpoint: step 2"):
        train(small(model_dir, data_file, out, steps=40, save_every=1000, resume=True,
                    lr=1e9, clip_norm=0.0, schedule="constant"))
    after = final_params(out)
    assert after[0] == before[0] == 2
    for a, b in zip(jax.tree.leaves(before[1]), jax.tree.leaves(after[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def run_cli(args, capsys):
    rc = cli.main(args)
    captured = capsys.readouterr()
    return rc, captured.err.strip()


@pytest.mark.parametrize("case, expect", [
    ("missing_model", r"no config.json; pass --model"),
    ("missing_data", r"data file .* not found; pass --data"),
    ("malformed_jsonl", r"line 2"),
    ("missing_fields", r"record 1 .*output"),
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
    rc, err = run_cli(args, capsys)
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    import re
    assert re.search(expect, err), err


def test_output_dir_with_another_run_is_refused_and_untouched(model_dir, data_file, tmp_path,
                                                               capsys):
    out = tmp_path / "run"
    train(small(model_dir, data_file, out, steps=2))
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    rc, err = run_cli(["train", "--model", model_dir, "--data", data_file, "--out", str(out),
                       "--steps", "2", "--no-progress"], capsys)
    assert rc == 2 and "holds another run; pass --resume" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot


def test_yaml_numbers_pyyaml_reads_as_strings_are_typed(tmp_path):
    """PyYAML reads ``1e-5`` (no dot) and quoted numbers as strings; the config takes them as
    the settings' types."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text('lr: 1e-5\nbatch_size: "4"\nprogress: "no"\nlora_alpha: null\n')
    c = load_config(str(cfg))
    assert (c.lr, c.batch_size, c.progress, c.lora_alpha) == (1e-5, 4, False, None)
    assert isinstance(c.lr, float) and isinstance(c.batch_size, int)


def test_yaml_config_with_flag_overrides_is_saved_resolved(model_dir, data_file, tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"model: {model_dir}\ndata: {data_file}\nlr: 0.5\nsteps: 3\n")
    cfg = load_config(str(cfg_file), {"lr": 0.25, "out": str(tmp_path / "o")})
    assert cfg.lr == 0.25 and cfg.steps == 3 and cfg.model == model_dir
    cfg.progress, cfg.export, cfg.batch_size, cfg.max_seq_len = False, False, 4, 128
    train(cfg)
    import yaml
    saved = yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())
    assert saved["lr"] == 0.25 and saved["steps"] == 3
    assert saved["remat"] == "none"  # the method's default, written out


@pytest.mark.parametrize("method,expected", [("lisa", "none"), ("full", "dots"), ("lora", "dots")])
def test_default_remat_keeps_matmul_outputs_for_every_method(method, expected):
    """LISA's "none" and plain autodiff's "dots" both keep the matmul outputs and recompute
    the elementwise ops; a remat given explicitly is left alone."""
    from lisa_jax.train import TrainConfig, with_default_remat
    assert with_default_remat(TrainConfig(method=method)).remat == expected
    assert with_default_remat(TrainConfig(method=method, remat="full")).remat == "full"


def test_demo_trains_exports_and_transformers_loads_it(tmp_path, capsys):
    """The README's first command, end to end."""
    rc = cli.main(["train", "--demo", "--out", str(tmp_path / "demo"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = [json.loads(x) for x in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])  # the loss visibly falls
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["samples"] and all(smp["output"] for smp in summary["samples"])
    import torch
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "demo" / "hf")
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        ref = hf(ids).logits.numpy()
    from lisa_jax.hf import load_hf
    ours = np.asarray(load_hf(tmp_path / "demo" / "hf")(ids.numpy()))
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) < 1e-4
