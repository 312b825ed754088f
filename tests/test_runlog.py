"""The run directory and the run's log: a second run into a live run's directory is refused,
another run's directory is left alone, metrics rows, the progress line."""
import json
import subprocess
import sys

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
