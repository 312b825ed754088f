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
