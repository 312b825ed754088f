"""The training loop: resume, interruption, divergence, the demo end to end."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lisa_jax import cli
from lisa_jax.checkpoints import Checkpoints
from lisa_jax.config import TrainError, load_config
from lisa_jax.train import train


@pytest.mark.parametrize("method,layout,dtype,nu", [
    ("lisa", "stacked", "float32", "float32"),
    pytest.param("lisa", "per_layer", "float32", "float32", marks=pytest.mark.slow),
    ("lora", "auto", "float32", "float32"),
    # the masters' remainders resume too (and, with nu in bfloat16, its stochastic rounding)
    pytest.param("lisa", "per_layer", "bfloat16", "float32", marks=pytest.mark.slow),
    ("lisa", "per_layer", "bfloat16", "bfloat16")])
def test_resume_after_interruption_is_bit_identical(model_dir, data_file, tmp_path, method,
                                                    layout, dtype, nu, small, final_params,
                                                    logged_layers):
    kw = dict(method=method, layer_layout=layout, dtype=dtype, adam_nu_dtype=nu)
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
    ca = Checkpoints(tmp_path / "a" / "checkpoints", 2)
    cb = Checkpoints(tmp_path / "b" / "checkpoints", 2)
    oa = ca.read(8, "opt")
    ob = cb.read(8, "opt")
    for a, b in zip(jax.tree.leaves(oa["opt"]), jax.tree.leaves(ob["opt"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if dtype == "bfloat16":
        assert any(np.asarray(x).dtype == np.int16 and np.abs(np.asarray(x)).max() > 0
                   for x in jax.tree.leaves(oa["opt"]))
    if nu == "bfloat16":  # the second moments are what was saved: bfloat16, and moving
        assert any(np.asarray(x).dtype == jnp.bfloat16 and np.asarray(x, np.float32).max() > 0
                   for x in jax.tree.leaves(oa["opt"]))
        assert not any(np.asarray(x).dtype == np.float32 and np.asarray(x).size > 1
                       for x in jax.tree.leaves(oa["opt"]))


def test_resume_from_the_run_directory_alone_and_with_a_changed_step_count(
        model_dir, data_file, tmp_path, capsys, small):
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
                                                             capsys, small):
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


@pytest.mark.slow
def test_resume_across_a_period_with_no_sampled_layer(model_dir, data_file, tmp_path, small,
                                                      final_params, logged_layers):
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


def test_sigterm_saves_a_loadable_checkpoint_and_resume_finishes(model_dir, data_file,
                                                                  tmp_path, final_params):
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


def test_nan_loss_stops_with_last_good_checkpoint_intact(model_dir, data_file, tmp_path,
                                                        monkeypatch, small, final_params):
    out = tmp_path / "run"
    train(small(model_dir, data_file, out, steps=2, save_every=2))
    before = final_params(out)
    # A run that diverges. Huge steps alone need not give NaN: RMSNorm's float32 square
    # overflows to a zero output and zero gradients, a dead but finite model. So the loss of
    # the resumed run's steps is made NaN outright.
    from lisa_jax import ops
    token_nll = ops.token_nll
    monkeypatch.setattr(ops, "token_nll", lambda logits, labels: token_nll(logits, labels)
                        * jnp.float32(jnp.nan))
    with pytest.raises(TrainError, match=r"loss is (nan|inf).*last good checkpoint: step 2"):
        train(small(model_dir, data_file, out, steps=40, save_every=1000, resume=True,
                    lr=1e9, clip_norm=0.0, schedule="constant"))
    after = final_params(out)
    assert after[0] == before[0] == 2
    for a, b in zip(jax.tree.leaves(before[1]), jax.tree.leaves(after[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_demo_trains_exports_and_transformers_loads_it(tmp_path):
    """The README's first command, end to end, as a process of its own: with XLA's CPU code
    optimised as a user's run has it (this suite compiles without LLVM's passes, which makes
    the demo's 150 steps half again as slow)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if "xla_backend_optimization_level" not in f]
    env = dict(os.environ, XLA_FLAGS=" ".join(flags))
    proc = subprocess.run([sys.executable, "-m", "lisa_jax.cli", "train", "--demo", "--out",
                           str(tmp_path / "demo"), "--no-progress"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
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



@pytest.mark.parametrize("cut", [2, 4])  # the first save (no checkpoint yet), the second
def test_a_second_ctrl_c_during_a_save_stops_at_once_and_the_run_resumes(
        model_dir, data_file, tmp_path, capsys, monkeypatch, partial_save, cut):
    """Ctrl-C twice while step ``cut`` is being saved (its temporary directory half written):
    the run stops at once, exit status 130, one line naming the last complete checkpoint; the
    half-written step is gone and the earlier one kept (--keep-checkpoints 1). A plain rerun
    and --resume agree: the directory holds the run, --resume continues it (from step 0 when
    it had no checkpoint yet), and metrics.jsonl ends with one row per step."""
    import orbax.checkpoint as ocp
    out = tmp_path / "run"
    real = ocp.CheckpointManager.save

    def interrupted(self, step, *a, **k):
        if step == cut:
            partial_save(self.directory, step)
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return real(self, step, *a, **k)
    monkeypatch.setattr(ocp.CheckpointManager, "save", interrupted)
    args = ["train", "--model", model_dir, "--data", data_file, "--out", str(out), "--steps",
            "6", "--save-every", "2", "--keep-checkpoints", "1", "--batch-size", "4",
            "--max-seq-len", "128", "--no-progress", "--no-export"]
    assert cli.main(args) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("SIGINT: stopping after this step with a checkpoint"), err
    kept = ("the last checkpoint, step 2, is intact; continue from it with --resume" if cut == 4
            else "no checkpoint was saved yet; --resume starts the run again at step 0")
    assert err[1:] == [f"stopped: stopped at once at step {cut} during the save of step {cut}, "
                       f"which was discarded: {kept}"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == \
        (["2"] if cut == 4 else [])
    monkeypatch.setattr(ocp.CheckpointManager, "save", real)
    assert cli.main(args) == 2
    assert "holds another run; pass --resume to continue it" in capsys.readouterr().err
    assert cli.main(["train", "--out", str(out), "--resume"]) == 0
    said = capsys.readouterr().out
    assert (f"resumed {out} at step 2" if cut == 4 else "the run starts again at step 0") in said
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert Checkpoints(out / "checkpoints", 1).all_steps() == [6]


class _FakeWandbRun:
    def __init__(self, **kw):
        self.kw, self.logged, self.step, self.finished = kw, [], 0, False
        self.config = _FakeWandbConfig()

    def log(self, row, step):
        assert step >= self.step  # wandb drops a step below its last
        self.logged.append((step, row))
        self.step = step

    def finish(self):
        self.finished = True


class _FakeWandbConfig(dict):
    def update(self, values, allow_val_change=False):
        assert allow_val_change  # a resumed run's changed settings replace the saved ones
        super().update(values)


def test_report_to_wandb_logs_the_rows_and_a_resumed_run_continues_its_wandb_run(
        model_dir, data_file, tmp_path, small, monkeypatch, capsys):
    import types
    runs = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: runs.append(_FakeWandbRun(**kw)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    kw = dict(steps=3, save_every=1, eval_every=2, report_to="wandb", wandb_project="proj")
    train(small(model_dir, data_file, out, **kw), halt_at=1)
    train(small(model_dir, data_file, out, resume=True, **kw))
    assert len(runs) == 2 and all(r.finished for r in runs)
    assert runs[0].kw["id"] == runs[1].kw["id"] == (out / "wandb_id").read_text().strip()
    assert [r.kw["project"] for r in runs] == ["proj"] * 2 and runs[0].kw["name"] == "run"
    assert runs[0].kw["resume"] == "allow" and runs[0].config["lr"] == 3e-3
    rows = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text()
                                      .splitlines())}
    logged = {step: row for r in runs for step, row in r.logged}
    assert sorted(logged) == [1, 2, 3] and sorted(s for s, _ in runs[1].logged) == [2, 3]
    for step, row in logged.items():
        assert row["loss"] == rows[step]["loss"]
        assert "active_layers" not in row  # lists are not scalars
    assert logged[2]["eval_loss"] == rows[2]["eval_loss"]
    # Asked for and not installed: one line naming the fix, before anything is written.
    monkeypatch.setitem(sys.modules, "wandb", None)
    rc = cli.main(["train", "--model", model_dir, "--data", data_file, "--out",
                   str(tmp_path / "none"), "--report-to", "wandb"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == ("error: --report-to wandb needs the wandb package; pip install "
                               "'lisa_jax[wandb]' (or wandb), or drop --report-to")
    assert not (tmp_path / "none").exists()


def test_report_to_wandb_offline_writes_the_run_for_wandb_sync(model_dir, data_file, tmp_path,
                                                              small, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train(small(model_dir, data_file, out, steps=2, save_every=2, report_to="wandb"))
    run_id = (out / "wandb_id").read_text().strip()
    assert list((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
