"""Checkpoints: what is saved comes back (zero-size optimizer leaves included), only the latest
are kept, a damaged or foreign one is a clear error, a damaged latest one falls back to the one
before, a save that fails on a full disk costs only the steps since the last one."""
import errno
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lisa_jax import cli
from lisa_jax.checkpoints import Checkpoints
from lisa_jax.config import TrainConfig, TrainError
from lisa_jax.train import train


def small(model_dir, data_file, out, **kw):
    base = dict(model=model_dir, data=data_file, out=str(out), steps=8, lr=3e-3,
                batch_size=4, max_seq_len=128, lisa_layers=2, lisa_interval=3, save_every=4,
                eval_every=4, eval_batches=2, progress=False, export=False)
    return TrainConfig(**{**base, **kw})


def test_corrupt_checkpoint_is_a_clear_error(model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    train(small(model_dir, data_file, out, steps=4))
    for f in (out / "checkpoints" / "4" / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(TrainError, match=r"checkpoint .*4 cannot be read.*--overwrite"):
        train(small(model_dir, data_file, out, steps=6, resume=True))


def test_save_and_restore_round_trip_with_zero_size_leaves_and_keep_the_latest(tmp_path):
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3, jnp.bfloat16)}
    opt = (jnp.zeros((0, 3)), {"m": jnp.full((2, 3), 0.5), "count": jnp.array(3, jnp.int32)})
    ck = Checkpoints(tmp_path / "ck", keep=2)
    assert ck.latest() is None and ck.all_steps() == []
    for step in (1, 2, 3):
        ck.save(step, params, opt, {"step": step, "data": {"pos": step}})
    assert ck.latest() == 3 and ck.all_steps() == [2, 3]
    template = jax.tree.map(jnp.zeros_like, opt)
    p, o, meta = ck.restore(3, params, template)
    assert meta == {"step": 3, "data": {"pos": 3}}
    for a, b in zip(jax.tree.leaves((p, o)), jax.tree.leaves((params, opt))):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    stored = ck.read(3)
    assert set(stored) == {"params", "opt", "meta"}
    assert len(stored["opt"]) == 2 and stored["meta"]["empty_opt_leaves"]
    with pytest.raises(TrainError, match="another method or model"):
        ck.restore(3, params, (template, jnp.zeros(1)))
    with pytest.raises(ValueError, match="unknown checkpoint item"):
        ck.read(3, "optimizer")


def metric_steps(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows]


def test_a_full_disk_during_a_save_is_one_line_and_costs_only_the_steps_since_the_last(
        model_dir, data_file, tmp_path, capsys, monkeypatch, partial_save):
    """ENOSPC in the middle of the save of step 4 (its temporary directory half written): a
    one-line error naming the fix, the checkpoint of step 2 kept (even with
    --keep-checkpoints 1), no half-written step left; --resume then redoes steps 3 and 4 and
    metrics.jsonl has one row per step."""
    import orbax.checkpoint as ocp
    out = tmp_path / "run"
    real = ocp.CheckpointManager.save

    def full_disk(self, step, *a, **k):
        if step == 4:
            tmp = partial_save(self.directory, step)
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "params"))
        return real(self, step, *a, **k)
    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    args = ["train", "--model", model_dir, "--data", data_file, "--out", str(out), "--steps",
            "6", "--save-every", "2", "--keep-checkpoints", "1", "--batch-size", "4",
            "--max-seq-len", "128", "--no-progress", "--no-export"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert re.fullmatch(r"error: no space left on device saving checkpoint step 4 in .*"
                        r"checkpoints \('.*'\); free space on that disk \(or lower "
                        r"--keep-checkpoints\), then continue with --resume \(the last "
                        r"complete checkpoint, step 2, is intact\)", err), err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2"]
    monkeypatch.setattr(ocp.CheckpointManager, "save", real)
    assert cli.main(["train", "--out", str(out), "--resume"]) == 0
    assert "resumed" in capsys.readouterr().out
    assert metric_steps(out) == [1, 2, 3, 4, 5, 6]
    assert Checkpoints(out / "checkpoints", 1).all_steps() == [6]


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before_with_a_warning(
        model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    train(small(model_dir, data_file, out, steps=4, save_every=2))
    for f in (out / "checkpoints" / "4" / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    capsys.readouterr()
    assert cli.main(["train", "--out", str(out), "--resume", "--steps", "6"]) == 0
    captured = capsys.readouterr()
    assert re.search(r"warning: checkpoint step 4 cannot be read \(.*\); moved it to "
                     r".*checkpoints\.damaged/4 and resuming from the one before, step 2",
                     captured.err), captured.err
    assert f"resumed {out} at step 2" in captured.out
    assert metric_steps(out) == [1, 2, 3, 4, 5, 6]
    assert Checkpoints(out / "checkpoints", 2).all_steps() == [4, 6]
