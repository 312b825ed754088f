"""Layer samplers: shapes, ranges, statistics, probability normalization."""
import jax
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from lisa_jax import sampling
from lisa_jax.sampling import (expected_count, normalize_probs, sample_bernoulli,
                               sample_uniform)

FAST = settings(max_examples=25, deadline=None)


@settings(max_examples=12, deadline=None)
@given(num_layers=st.integers(1, 12), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_uniform_gives_n_distinct_sorted_indices_in_range(num_layers, data, seed):
    n = data.draw(st.integers(1, num_layers))
    idx = np.asarray(sample_uniform(jax.random.key(seed), num_layers, n))
    assert idx.shape == (n,) and idx.dtype == np.int32
    assert np.all(np.diff(idx) > 0)  # sorted and distinct
    assert idx.min() >= 0 and idx.max() < num_layers


def test_uniform_is_unbiased_over_layers():
    # Every layer is picked with probability n/L (a sampler that favours low indices fails).
    keys = jax.random.split(jax.random.key(1), 4000)
    idx = np.asarray(jax.vmap(lambda k: sample_uniform(k, 8, 3))(keys))
    freq = np.bincount(idx.ravel(), minlength=8) / len(keys)
    np.testing.assert_allclose(freq, 3 / 8, atol=0.03)


def test_uniform_is_jittable_and_deterministic_in_key():
    f = jax.jit(sample_uniform, static_argnums=(1, 2))
    a = f(jax.random.key(3), 10, 4)
    np.testing.assert_array_equal(a, sample_uniform(jax.random.key(3), 10, 4))
    assert not np.array_equal(a, f(jax.random.key(4), 10, 4)) or \
        not np.array_equal(a, f(jax.random.key(5), 10, 4))


@settings(max_examples=15, deadline=None)
@given(probs=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=8),
       seed=st.integers(0, 2**31 - 1))
def test_bernoulli_indices_sorted_unique_in_range_and_respect_0_and_1(probs, seed):
    idx = sample_bernoulli(jax.random.key(seed), probs)
    p = np.asarray(probs)
    assert idx.dtype == np.int32 and idx.ndim == 1
    assert np.all(np.diff(idx) > 0)
    assert np.all((idx >= 0) & (idx < len(probs)))
    assert set(np.flatnonzero(p == 1.0)) <= set(idx.tolist())
    assert not set(np.flatnonzero(p == 0.0)) & set(idx.tolist())


def test_bernoulli_mean_count_matches_expected_count():
    probs = np.array([0.1, 0.9, 0.5, 0.25, 0.75, 0.3])
    keys = jax.random.split(jax.random.key(0), 4000)
    masks = np.asarray(jax.vmap(lambda k: sampling.bernoulli_mask(k, probs))(keys))
    assert expected_count(probs) == pytest.approx(2.8)
    assert masks.sum(1).mean() == pytest.approx(expected_count(probs), abs=0.06)
    np.testing.assert_allclose(masks.mean(0), probs, atol=0.03)


def check_normalized(scores, expected, floor):
    n = len(scores)
    p = normalize_probs(scores, expected=expected, floor=floor)
    assert p.shape == (n,)
    assert np.all(p >= floor - 1e-9) and np.all(p <= 1.0 + 1e-9)
    assert p.sum() == pytest.approx(expected, rel=1e-6, abs=1e-6)


@st.composite
def scores_expected_floor(draw):
    scores = draw(st.lists(st.floats(0.0, 1e3), min_size=1, max_size=32))
    n = len(scores)
    expected = draw(st.floats(0.05, float(n)))
    floor = draw(st.floats(0.0, expected / n))
    return scores, expected, floor


@FAST
@given(case=scores_expected_floor())
# Subnormal scores: once the large layers are capped, the budget left goes to them.
@example(case=([1.0, 5e-324], 1.9, 0.2))
@example(case=([1.0, 5e-324], 1.5, 0.0))
@example(case=([5e-324, 1.0, 5e-324], 2.5, 0.3))
@example(case=([5e-324, 5e-324, 1e-320], 2.5, 0.1))  # every score subnormal
@example(case=([2.2250738585072014e-308, 5e-324, 1e-310], 2.0, 0.0))
@example(case=([1e3, 5e-324, 0.0, 1e-320], 3.5, 0.1))
@example(case=([1e300, 1e-300, 5e-324, 0.0], 3.0, 0.05))
@example(case=([1.7e308, 1.7e308, 1.7e308], 1.0, 0.0))  # the sum of the scores overflows
def test_normalize_probs_within_floor_and_one_and_sums_to_expected(case):
    check_normalized(*case)


def test_normalize_probs_is_monotone_in_score_and_caps_at_one():
    p = normalize_probs([0.0, 1.0, 2.0, 100.0], expected=2.0, floor=0.05)
    assert p[3] == 1.0 and p[0] == pytest.approx(0.05)
    assert p[0] < p[1] < p[2] < p[3]
    assert p.sum() == pytest.approx(2.0)


def test_normalize_probs_all_zero_scores_is_uniform():
    np.testing.assert_allclose(normalize_probs(np.zeros(4), expected=2.0), 0.5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(scores=[1.0, -1.0], expected=1.0), "non-negative"),
    (dict(scores=[1.0, 1.0], expected=3.0), "expected"),
    (dict(scores=[1.0, 1.0], expected=1.0, floor=0.6), "floor"),
    (dict(scores=[[1.0]], expected=1.0), "1-D"),
])
def test_normalize_probs_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        normalize_probs(**kwargs)


@pytest.mark.parametrize("probs, n, match", [
    ([0.5, 0.5], 3, "length"),
    ([0.5, 1.5], None, r"\[0, 1\]"),
    ([0.0, 0.0], None, "all zero"),
])
def test_check_probs_bad_input(probs, n, match):
    with pytest.raises(ValueError, match=match):
        sampling.check_probs(probs, n)


def test_uniform_bad_n_active():
    with pytest.raises(ValueError, match="n_active"):
        sample_uniform(jax.random.key(0), 4, 5)


# ----------------------------------------------------------------------------- weighted


def test_weighted_draws_n_distinct_layers_and_never_a_zero_weight_one():
    w = np.array([0.4, 0.0, 0.3, 0.2, 0.0, 0.1])
    f = jax.jit(lambda k: sampling.sample_weighted(k, w, 3))
    for seed in range(20):
        idx = np.asarray(f(jax.random.key(seed)))
        assert idx.shape == (3,) and idx.dtype == np.int32 and np.all(np.diff(idx) > 0)
        assert not {1, 4} & set(idx.tolist())


def test_weighted_inclusion_frequencies_follow_sequential_draws_without_replacement():
    # Two picks without replacement: P(l in S) = w_l + sum_{j != l} w_j w_l / (1 - w_j). A
    # sampler drawing with replacement, or with inclusion probabilities 2 w_l, fails.
    w = np.array([0.5, 0.25, 0.15, 0.1])
    want = np.array([w[l] + sum(w[j] * w[l] / (1 - w[j]) for j in range(4) if j != l)
                     for l in range(4)])
    keys = jax.random.split(jax.random.key(2), 4000)
    idx = np.asarray(jax.vmap(lambda k: sampling.sample_weighted(k, w, 2))(keys))
    assert np.all(idx[:, 0] != idx[:, 1])
    np.testing.assert_allclose(np.bincount(idx.ravel(), minlength=4) / len(keys), want,
                               atol=0.03)


@pytest.mark.parametrize("weights, n, match", [
    ([0.5, 0.0, 0.0], 2, "only 1 layers have a positive weight"),
    ([0.5, -0.1], None, "non-negative"),
    ([0.0, 0.0], None, "all zero"),
    ([[1.0]], None, "1-D"),
])
def test_check_weights_bad_input(weights, n, match):
    with pytest.raises(ValueError, match=match) as err:
        sampling.check_weights(weights, n)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- ordered


@settings(max_examples=12, deadline=None, derandomize=True)
@given(num_layers=st.integers(1, 9), data=st.data(), order=st.sampled_from(sampling.ORDERS),
       seed=st.integers(0, 2**16))
def test_ordered_windows_cover_every_layer_once_a_cycle_with_a_fixed_count(num_layers, data,
                                                                           order, seed):
    gamma = data.draw(st.integers(1, num_layers))
    per_cycle = sampling.cycle_periods(num_layers, gamma)
    key = jax.random.key(seed)
    for cycle in range(3):
        windows = [np.asarray(sampling.ordered_window(key, cycle * per_cycle + w, num_layers,
                                                      gamma, order))
                   for w in range(per_cycle)]
        for idx in windows:
            assert idx.shape == (gamma,) and idx.dtype == np.int32
            assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < num_layers
        seen = np.concatenate(windows)
        assert set(seen.tolist()) == set(range(num_layers))  # every layer, every cycle
        if num_layers % gamma == 0:  # ... each exactly once
            assert sorted(seen.tolist()) == list(range(num_layers))
        else:  # the last window repeats gamma - L mod gamma layers, no more
            assert len(seen) - num_layers == gamma - num_layers % gamma


def test_ascending_and_descending_walk_the_layers_in_order():
    key = jax.random.key(0)
    up = [sampling.ordered_window(key, p, 6, 2, "ascending").tolist() for p in range(4)]
    down = [sampling.ordered_window(key, p, 6, 2, "descending").tolist() for p in range(4)]
    assert up == [[0, 1], [2, 3], [4, 5], [0, 1]]
    assert down == [[4, 5], [2, 3], [0, 1], [4, 5]]


def test_reshuffle_draws_a_new_order_per_cycle_from_the_key_alone():
    def cycle_orders(seed, cycles=4):
        f = jax.jit(lambda k, p: sampling.ordered_window(k, p, 8, 2, "reshuffle"))
        return [tuple(tuple(np.asarray(f(jax.random.key(seed), c * 4 + w)).tolist())
                      for w in range(4)) for c in range(cycles)]
    a = cycle_orders(1)
    assert len(set(a)) == len(a)  # the windows of each cycle differ from cycle to cycle
    assert cycle_orders(1) == a and cycle_orders(2) != a  # a function of the key and period


def test_sampler_objects_state_their_count_and_key_use():
    assert sampling.Uniform(2).n_active == 2 and sampling.Uniform(2).splits_key
    assert sampling.Weighted(1, [1.0, 3.0]).weights.tolist() == [0.25, 0.75]
    assert not sampling.Ordered(2, "ascending").splits_key
    assert sampling.Bernoulli([0.5, 0.5]).n_active is None
    with pytest.raises(ValueError, match="unknown order"):
        sampling.Ordered(2, "sideways")
    with pytest.raises(ValueError, match="n_active"):
        sampling.Ordered(0)
