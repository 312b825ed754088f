"""Importance sampling for LISA: weight-norm probabilities, the online estimate, the trainer."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lisa_jax import lora as lora_lib
from lisa_jax import model as M
from lisa_jax.checkpoints import Checkpoints
from lisa_jax.config import TrainConfig
from lisa_jax.importance import (OnlineImportance, load_probs, lora_delta_norms, parse_probs,
                                 probs_from_norms, save_probs, tree_change_norm,
                                 weight_change_norms)
from lisa_jax.lisa import lisa, maybe_resample
from lisa_jax.train import train

# ----------------------------------------------------------------------------- probs_from_norms

norms = st.lists(st.floats(0.0, 1e3, allow_nan=False), min_size=2, max_size=12)


@settings(max_examples=40, deadline=None)
@given(norms, st.floats(0.05, 1.0), st.floats(0.0, 0.3), st.data())
def test_probs_from_norms_floor_sum_cap_and_monotone(lora_n, frac, floor, data):
    L = len(lora_n)
    expected = max(frac * L, 0.5)
    full_n = data.draw(st.one_of(st.none(), st.lists(st.floats(0.1, 1e3), min_size=L,
                                                     max_size=L)))
    p = probs_from_norms(lora_n, full_n, expected=expected, floor=floor)
    assert p.shape == (L,)
    assert np.isclose(p.sum(), expected, rtol=1e-9, atol=1e-9)
    assert np.all(p >= min(floor, expected / L) - 1e-12) and np.all(p <= 1 + 1e-12)
    score = np.asarray(lora_n) / (np.asarray(full_n) if full_n is not None else 1.0)
    order = np.argsort(score, kind="stable")
    assert np.all(np.diff(p[order]) >= -1e-12)  # a larger score never gets a smaller p


def test_probs_from_norms_uses_the_lora_to_full_ratio():
    p = probs_from_norms([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 4.0, 1.0], expected=2, floor=0.0)
    assert p[0] == p[3] > p[1] > p[2]
    np.testing.assert_allclose(p[:3] / p[0], [1.0, 0.5, 0.25])
    q = probs_from_norms([1.0, 3.0], expected=1.0, floor=0.1)  # no full norms: ∝ LoRA norm
    np.testing.assert_allclose(q, [0.1 + 0.8 * 0.25, 0.1 + 0.8 * 0.75])
    # the floor is capped at the uniform γ/L, so any floor is accepted
    np.testing.assert_allclose(probs_from_norms([0.0, 0.0, 5.0, 0.0], expected=0.4, floor=0.5),
                               [0.1] * 4)


# ----------------------------------------------------------------------------- online


def test_online_importance_favors_large_gradient_norms_and_explores_unseen_layers():
    imp = OnlineImportance(6, expected=2, floor=0.05, decay=0.5)
    np.testing.assert_allclose(imp.probs(), [2 / 6] * 6)  # nothing seen: uniform
    imp.observe([0, 1], [1.0, 4.0])
    imp.observe([0, 1], [1.0, 4.0])
    p = imp.probs()
    assert p[1] > p[0] and np.isclose(p.sum(), 2)
    # unseen layers are scored at the mean of the seen ones: between the two
    assert np.allclose(p[2:], p[2]) and p[0] < p[2] < p[1]
    imp.observe([2], [10.0])
    assert imp.probs()[2] == imp.probs().max()
    # simulated LISA periods with true per-layer norms: the big layers get drawn more
    rng = np.random.default_rng(0)
    true = np.array([1.0, 1.0, 1.0, 1.0, 8.0, 8.0])
    imp, picks = OnlineImportance(6, expected=2, floor=0.05), np.zeros(6)
    for _ in range(300):
        active = np.flatnonzero(rng.random(6) < imp.probs())
        picks[active] += 1
        imp.observe(active, true[active] * rng.uniform(0.8, 1.2, active.size))
    assert picks[4:].min() > 3 * picks[:4].max() and picks[:4].min() > 0


def test_online_importance_state_round_trips_through_json():
    imp = OnlineImportance(5, expected=2, floor=0.1, decay=0.8)
    imp.observe([1, 3], [0.3, 2.5])
    imp.observe([3, 4], [np.float32(1.1), np.nan])  # non-finite norms are skipped
    state = json.loads(json.dumps(imp.state_dict()))
    other = OnlineImportance(5, expected=1, floor=0.0)
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.probs(), imp.probs())
    assert other.state_dict() == imp.state_dict() and other.counts == [0, 1, 0, 2, 0]
    with pytest.raises(ValueError, match="for 4 layers"):
        OnlineImportance(5, expected=2).load_state_dict({**state, "num_layers": 4})


# ----------------------------------------------------------------------------- weight norms


def test_weight_change_norms_equal_a_manual_computation(tiny_cfg):
    cfg = tiny_cfg(num_layers=3)
    before = M.init_params(cfg, jax.random.key(0))
    after = jax.tree.map(lambda x, n: x + 0.01 * n, before,
                         M.init_params(cfg, jax.random.key(1)))
    got = weight_change_norms(before, after)
    want = [np.sqrt(sum(np.sum((np.asarray(after["layers"][k][l], np.float64)
                                - np.asarray(before["layers"][k][l], np.float64)) ** 2)
                        for k in before["layers"])) for l in range(cfg.num_layers)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    d = np.asarray(after["embed"], np.float64) - np.asarray(before["embed"], np.float64)
    np.testing.assert_allclose(tree_change_norm(before["embed"], after["embed"]),
                               np.sqrt(np.sum(d * d)), rtol=1e-12)
    np.testing.assert_array_equal(weight_change_norms(before, before), np.zeros(3))


def test_lora_delta_norms_equal_the_norm_of_the_merged_delta(tiny_cfg):
    cfg = tiny_cfg(num_layers=3)
    params = M.init_params(cfg, jax.random.key(0))
    lora = lora_lib.init_lora(params["layers"], jax.random.key(1), rank=4,
                              targets=("wq", "wv", "w_down"))
    lora = {k: {"a": v["a"], "b": 0.1 * jax.random.normal(jax.random.key(i), v["b"].shape)}
            for i, (k, v) in enumerate(lora.items())}
    scale = lora_lib.lora_scale(4, 8.0)
    merged = lora_lib.merge_lora(params, lora, scale)
    np.testing.assert_allclose(lora_delta_norms(lora, scale), weight_change_norms(params, merged),
                               rtol=1e-4)


def test_save_and_load_probs(tmp_path):
    """(The trainer's reading of such a file: test_methods.py::
    test_lisa_probs_reads_a_file_written_by_save_probs_and_inline_numbers.)"""
    p = probs_from_norms([1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0], expected=2)
    save_probs(tmp_path / "p.json", p, {"gamma": 2, "source": "test"})
    q, meta = load_probs(tmp_path / "p.json")
    np.testing.assert_array_equal(p, q)
    assert meta == {"gamma": 2, "source": "test"}
    (tmp_path / "plain.json").write_text(json.dumps([0.5, 0.5]))
    assert load_probs(tmp_path / "plain.json")[0].tolist() == [0.5, 0.5]
    (tmp_path / "plain.txt").write_text("0.25 0.75\n")
    assert load_probs(tmp_path / "plain.txt")[0].tolist() == [0.25, 0.75]
    (tmp_path / "bad.json").write_text(json.dumps({"p": [0.5]}))
    with pytest.raises(ValueError, match="bad.json: a JSON object needs a 'probs' list"):
        load_probs(tmp_path / "bad.json")
    (tmp_path / "big.json").write_text(json.dumps([1.5]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_probs(tmp_path / "big.json")
    with pytest.raises(ValueError):
        parse_probs("0.5, half")


# ----------------------------------------------------------------------------- lisa override


def test_maybe_resample_with_probs_overrides_the_configured_probabilities():
    params = {"embed": jnp.ones((3, 2)), "layers": {"w": jnp.ones((4, 2, 2))}}
    grads = jax.tree.map(jnp.ones_like, params)
    tx = lisa(optax.adam(0.1), probs=[0.5] * 4, interval=2, key=0)
    state = tx.init(params)
    runs = {}
    for name, override in (("given", [1.0, 0.0, 1.0, 0.0]), ("none", None)):
        s, seen = state, []
        for t in range(6):
            s = maybe_resample(tx, s, params, override)
            seen.append(s.active.tolist())
            _, s = tx.update(grads, s, params)
        runs[name] = (seen, np.asarray(s.key))
    assert runs["given"][0][2:] == [[0, 2]] * 4  # every draw from step 2 on uses the override
    assert runs["given"][0][:2] == runs["none"][0][:2]  # within period 0: no draw, unchanged
    np.testing.assert_array_equal(runs["given"][1], runs["none"][1])  # same key stream
    with pytest.raises(ValueError, match="length 3"):
        tx.maybe_resample(state, params, [0.5] * 3)
    with pytest.raises(ValueError, match="Bernoulli"):
        maybe_resample(lisa(optax.adam(0.1), n_active=2), state, params, [0.5] * 4)


# ----------------------------------------------------------------------------- the trainer


def _online(model_dir, data_file, out, **kw):
    base = dict(model=model_dir, data=data_file, out=str(out), steps=6, lr=3e-3,
                batch_size=4, max_seq_len=64, lisa_layers=2, lisa_interval=2, save_every=100,
                eval_fraction=0.0, progress=False, export=False, lisa_importance="online",
                lisa_importance_decay=0.5, log_every=4)
    return TrainConfig(**{**base, **kw})


def _rows(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_trainer_online_importance_logs_changing_probs_and_resumes_exactly(model_dir, data_file,
                                                                          tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(_online(model_dir, data_file, a))["status"] == "finished"
    rows = _rows(a)
    probs = {r["step"]: r["layer_probs"] for r in rows if "layer_probs" in r}
    # logged at the first step and at every resample (period start), also between log_every
    assert sorted(probs) == [1, 3, 5]
    assert probs[1] == [0.5] * 4 and len({tuple(p) for p in probs.values()}) == 3
    assert all(np.isclose(sum(p), 2.0, atol=1e-5) and min(p) >= 0.05 - 1e-6
               for p in probs.values())

    assert train(_online(model_dir, data_file, b), halt_at=3)["status"] == "interrupted"
    assert train(_online(model_dir, data_file, b, resume=True))["steps"] == 6
    ck_a, ck_b = (Checkpoints(d / "checkpoints", 2) for d in (a, b))
    ra, rb = (c.read(6, "params", "meta") for c in (ck_a, ck_b))
    for x, y in zip(jax.tree.leaves(ra["params"]), jax.tree.leaves(rb["params"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert ra["meta"]["importance"] == rb["meta"]["importance"]
    assert ra["meta"]["active_layers"] == rb["meta"]["active_layers"]
    probs_b = {r["step"]: r["layer_probs"] for r in _rows(b) if "layer_probs" in r}
    assert probs_b == probs  # the resumed run drew with the same probabilities


# ----------------------------------------------------------------------------- outlier ratios


def test_owl_outlier_ratios_follow_the_formula_on_constructed_weights():
    """Layer ℓ's ratio: entries of all its matrices, pooled, with |W| > M · their mean |W|.
    Norm scales (one dimension per layer) are not counted."""
    from lisa_jax.importance import owl_outlier_ratios, owl_weights
    wq = np.ones((3, 4, 5), np.float32)        # 20 entries a layer
    w_up = np.ones((3, 5, 6), np.float32)      # 30 entries a layer
    wq[0, 0, :2] = 100.0                       # layer 0: two outliers
    w_up[1, 0, 0] = -60.0                      # layer 1: one (a magnitude), in the other matrix
    w_up[1, 1, 0] = 4.0                        # below M x mean, not an outlier
    norm = np.full((3, 5), 1e6, np.float32)    # would be outliers if counted
    layers = {"wq": jnp.asarray(wq), "w_up": jnp.asarray(w_up), "attn_norm": jnp.asarray(norm)}
    M_ = 5.0
    want = []
    for l in range(3):
        a = np.abs(np.concatenate([wq[l].ravel(), w_up[l].ravel()]).astype(np.float64))
        want.append(np.mean(a > M_ * a.mean()))
    got = owl_outlier_ratios(layers, threshold=M_)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got.tolist() == [2 / 50, 1 / 50, 0.0]
    # The mean is the layer's, over all its matrices: a matrix of larger weights stands out
    # (pooled mean 6.4, so its 10s exceed 1.5 x 6.4), where per-matrix means would find none.
    pooled = {"wq": jnp.ones((1, 4, 5)), "w_up": jnp.full((1, 5, 6), 10.0)}
    assert owl_outlier_ratios(pooled, threshold=1.5).tolist() == [30 / 50]
    p = owl_weights(3, "owl", got)
    np.testing.assert_allclose(p, [2 / 3, 1 / 3, 0.0])
    assert p.sum() == pytest.approx(1.0)
    for mode, expect in (("decrease", [3, 2, 1]), ("increase", [1, 2, 3])):
        np.testing.assert_allclose(owl_weights(3, mode), np.array(expect) / 6)
    with pytest.raises(ValueError, match="lower the threshold"):
        owl_weights(3, "owl", [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="positive"):
        owl_outlier_ratios(layers, threshold=0.0)


# ----------------------------------------------------------------------------- trainer samplers


def test_trainer_owl_sampler_draws_gamma_layers_by_the_loaded_models_outlier_ratios(
        model_dir, data_file, tmp_path, small, logged_layers):
    from lisa_jax import methods
    from lisa_jax.config import TrainError
    from lisa_jax.hf import load_hf
    from lisa_jax.importance import owl_outlier_ratios, owl_weights
    model = load_hf(model_dir)
    L = model.cfg.num_layers
    # The random model's weights are Gaussian: none lies 13 mean magnitudes out.
    cfg = small(model_dir, data_file, tmp_path / "x", lisa_sampler="owl")
    with pytest.raises(TrainError, match="lower --lisa-owl-threshold") as err:
        methods.method_for(cfg, model.cfg, model.params, methods.make_schedule(cfg, 8))
    assert "\n" not in str(err.value)
    want = owl_weights(L, "owl", owl_outlier_ratios(model.params["layers"], 2.5))
    assert np.all(want > 0) and len(set(want.round(6))) > 1
    out = tmp_path / "owl"
    train(small(model_dir, data_file, out, lisa_sampler="owl", lisa_owl_threshold=2.5,
                lisa_interval=1, steps=6, save_every=100))
    rows = _rows(out)
    np.testing.assert_allclose(rows[0]["layer_probs"], want, rtol=1e-5)
    assert all("layer_probs" not in r for r in rows[1:])
    actives = logged_layers(out)
    assert all(len(a) == 2 and a == sorted(set(a)) for a in actives.values())
    assert len({tuple(a) for a in actives.values()}) > 1


@pytest.mark.slow
def test_trainer_reshuffle_sampler_resumes_exactly_in_the_middle_of_a_cycle(
        model_dir, data_file, tmp_path, small, final_params, logged_layers):
    kw = dict(lisa_sampler="reshuffle", lisa_layers=1, lisa_interval=2, steps=10,
              save_every=3)
    a, b = tmp_path / "a", tmp_path / "b"
    train(small(model_dir, data_file, a, **kw))
    assert train(small(model_dir, data_file, b, **kw), halt_at=3)["status"] == "interrupted"
    train(small(model_dir, data_file, b, resume=True, **kw))
    layers_a = logged_layers(a)
    assert layers_a == logged_layers(b)
    per_period = [layers_a[s][0] for s in range(1, 9, 2)]  # 4 periods, one cycle of 4 layers
    assert sorted(per_period) == [0, 1, 2, 3]
    _, pa, _ = final_params(a)
    _, pb, _ = final_params(b)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
