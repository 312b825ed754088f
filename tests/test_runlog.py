"""The run directory and the run's log: a second run into a live run's directory is refused,
another run's directory is left alone, metrics rows, the progress line."""
import json
import os
import re
import subprocess
import sys

import pytest

from lisa_jax import cli, runlog
from lisa_jax.config import TrainConfig
from lisa_jax.train import train


def small(model_dir, data_file, out, **kw):
    base = dict(model=model_dir, data=data_file, out=str(out), steps=8, lr=3e-3,
                batch_size=4, max_seq_len=128, lisa_layers=2, lisa_interval=3, save_every=4,
                eval_every=4, eval_batches=2, progress=False, export=False)
    return TrainConfig(**{**base, **kw})


def run_cli(args, capsys):
    rc = cli.main(args)
    captured = capsys.readouterr()
    return rc, captured.err.strip()


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


def test_output_dir_with_another_run_is_refused_and_untouched(model_dir, data_file, tmp_path,
                                                               capsys):
    out = tmp_path / "run"
    train(small(model_dir, data_file, out, steps=2))
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    rc, err = run_cli(["train", "--model", model_dir, "--data", data_file, "--out", str(out),
                       "--steps", "2", "--no-progress"], capsys)
    assert rc == 2 and "holds another run; pass --resume" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot


def test_metrics_writer_appends_one_json_row_per_write(tmp_path):
    w = runlog.MetricsWriter(tmp_path)
    w.write(1, {"loss": 2.5, "active_layers": [0, 3]})
    w.write(1, {"eval_loss": 2.0})
    w.close()
    again = runlog.metrics_writer(tmp_path, main_process=True)
    again.write(2, {"loss": 1.5})
    again.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 2.5, "active_layers": [0, 3]},
                    {"step": 1, "eval_loss": 2.0}, {"step": 2, "loss": 1.5}]
    other = runlog.metrics_writer(tmp_path / "absent", main_process=False)
    other.write(3, {"loss": 1.0})  # the processes other than 0 write nothing
    other.close()
    assert not (tmp_path / "absent").exists()


def test_step_line_and_peak_memory():
    assert runlog.step_line(1.23456, 3e-4, 12345.6, [1, 2]) == \
        "loss 1.235 lr 3.00e-04 12,346 tok/s layers [1, 2]"
    assert runlog.step_line(1.0, 1e-3, 10.0, None) == "loss 1.000 lr 1.00e-03 10 tok/s"
    peak, kind = runlog.peak_memory_gib()
    assert peak > 0 and kind in ("device", "host RSS")


def test_metrics_are_strict_json_and_a_resume_keeps_the_rows_through_its_checkpoint(tmp_path):
    """No NaN literal (strict JSON readers refuse it): non-finite numbers are null. Resuming
    from step 2 drops the rows after it and a torn line a kill left, so the rerun steps have
    one row each."""
    w = runlog.MetricsWriter(tmp_path)
    for step in (1, 2, 3):
        w.write(step, {"loss": float("nan") if step == 3 else 1.0, "x": [float("inf"), 2.0]})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # killed mid-line
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text.splitlines()[2]) == {"step": 3, "loss": None, "x": [None, 2.0]}
    w = runlog.metrics_writer(tmp_path, main_process=True, resume_from=2)
    w.write(3, {"loss": 0.5})
    w.close()
    rows = [json.loads(x, parse_constant=lambda c: pytest.fail(c))
            for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2] == {"step": 3, "loss": 0.5}


def test_a_run_off_a_terminal_prints_loss_lines_its_trainable_view_and_the_data_warning_once(
        model_dir, data_file, tmp_path, capsys):
    """Into a pipe or file (here: captured) the run draws no bar (no carriage returns) but
    prints the loss every --log-every steps; the header names the trainable parameters and
    --deterministic on CPU; data whose responses are all empty is warned about once."""
    empty = tmp_path / "empty.jsonl"
    lines = [json.loads(x) for x in open(data_file)][:40]
    empty.write_text("".join(json.dumps({**r, "output": ""}) + "\n" for r in lines))
    rc = cli.main(["train", "--model", model_dir, "--data", str(empty), "--out",
                   str(tmp_path / "run"), "--steps", "4", "--log-every", "2", "--batch-size",
                   "4", "--max-seq-len", "128", "--no-export", "--eval-fraction", "0",
                   "--deterministic"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "\r" not in out + err
    steps = [line.split(":")[0] for line in out.splitlines() if line.startswith("step ")]
    assert steps == ["step 2/4", "step 4/4"], out
    assert re.search(r"^trainable: [\d.]+K of [\d.]+K parameters \([\d.]+%\): embedding, head, "
                     r"final norm and 2 of 4 layers at a time", out, re.M), out
    assert "deterministic: a no-op on CPU" in out
    assert err.count("warning: all 40 records have an empty response") == 1, err
    assert "UserWarning" not in err


def test_deterministic_sets_xla_flags_before_jax_starts(monkeypatch):
    """XLA reads XLA_FLAGS when JAX starts its backends: --deterministic adds the flag then; a
    user's own setting stands; a started CPU backend needs nothing."""
    cfg = TrainConfig(deterministic=True)
    monkeypatch.setattr(runlog, "_backends_started", lambda: False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    runlog.set_deterministic(cfg)
    assert os.environ["XLA_FLAGS"] == ("--xla_backend_optimization_level=0 "
                                       "--xla_gpu_deterministic_ops=true")
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=false")
    runlog.set_deterministic(cfg)
    assert os.environ["XLA_FLAGS"] == "--xla_gpu_deterministic_ops=false"
    monkeypatch.delenv("XLA_FLAGS")
    runlog.set_deterministic(TrainConfig())
    assert "XLA_FLAGS" not in os.environ
    monkeypatch.setattr(runlog, "_backends_started", lambda: True)  # CPU, already started
    runlog.set_deterministic(cfg)
    assert "XLA_FLAGS" not in os.environ


def test_the_deterministic_flag_reaches_xla_in_a_fresh_process(tmp_path):
    """``lisa-jax train --deterministic`` sets the flag before JAX's first computation, and
    XLA accepts it (on CPU as a no-op)."""
    code = ("import os, sys; from lisa_jax import cli; "
            "rc = cli.main(['train', '--deterministic', '--model', sys.argv[1], '--data', 'x', "
            "'--out', sys.argv[1]]); import jax.numpy as jnp; jnp.ones(2).sum().block_until_ready(); "
            "print(rc, os.environ.get('XLA_FLAGS'))")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "none")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "2 --xla_gpu_deterministic_ops=true", r.stderr[-2000:]
