"""Checkpoints: what is saved comes back (zero-size optimizer leaves included), only the latest
are kept, a damaged or foreign one is a clear error."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
