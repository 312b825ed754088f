"""lisa_jax.ops: RMSNorm's and SwiGLU's float32 backwards against float64 autodiff of the plain
formulas, the loss, RoPE and attention."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lisa_jax import ops

EPS = 1e-5
# bfloat16 keeps 8 significant bits: rounding a value to it moves it by at most 2**-8 of itself.
BF16_U = 2.0 ** -8

seeds = st.integers(0, 2**16)
log_scales = st.floats(-3.0, 3.0)  # x scaled by 10**s: eps matters at the small end


def f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def within_rounding(got, ref, dtype, atol_frac, roundings=1):
    """Every entry of ``got`` (``dtype``) within ``roundings`` roundings of ``ref`` to ``dtype``
    plus ``atol_frac`` of ``max |ref|`` (float32 arithmetic before the rounding)."""
    got, ref = f64(got), np.asarray(ref, np.float64)
    u = BF16_U if dtype == jnp.bfloat16 else 2.0 ** -23
    bound = roundings * u * np.abs(ref) + atol_frac * np.abs(ref).max()
    worst = float(np.max(np.abs(got - ref) - bound))
    assert worst <= 0, f"exceeds its bound by {worst:.3g} (max |ref| {np.abs(ref).max():.3g})"


def _inputs(shape, dtype, seed, scale=1.0, n=3):
    keys = jax.random.split(jax.random.key(seed), n)
    return [(scale * jax.random.normal(k, shape, jnp.float32)).astype(dtype) for k in keys]


# ----------------------------------------------------------------------------- RMSNorm


@functools.partial(jax.jit, static_argnums=2)
def _rms_vjp(x, scale, eps, dy):
    y, pullback = jax.vjp(lambda x_, s_: ops.rms_norm(x_, s_, eps), x, scale)
    return (y,) + pullback(dy)


def _rms_reference(x, scale, dy):
    """Float64 autodiff of ``scale * x / sqrt(mean(x^2) + eps)``."""
    with jax.enable_x64(True):
        def plain(x_, s_):
            return s_ * x_ / jnp.sqrt(jnp.mean(x_ * x_, axis=-1, keepdims=True) + EPS)
        args = [jnp.asarray(f64(a)) for a in (x, scale, dy)]
        y, pullback = jax.vjp(plain, args[0], args[1])
        dx, dscale = pullback(args[2])
        return np.asarray(y), np.asarray(dx), np.asarray(dscale)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@settings(max_examples=12, deadline=None)
@given(seed=seeds, log_scale=log_scales)
def test_rms_norm_forward_and_backward_equal_float64_autodiff(dtype, seed, log_scale):
    """The value, dx and dscale of the custom backward, each within its dtype's rounding of the
    float64 result: a backward taken in bfloat16 (autodiff of the 16-bit forward, whose scale
    gradient sums every token in 16 bits) or without eps fails."""
    x, dy, s = _inputs((3, 16, 64), dtype, seed, 10.0 ** log_scale)
    scale = (1.0 + 0.2 * s[0, 0].astype(jnp.float32)).astype(dtype)
    y, dx, dscale = _rms_vjp(x, scale, EPS, dy)
    assert y.dtype == dx.dtype == dscale.dtype == dtype
    ry, rdx, rdscale = _rms_reference(x, scale, dy)
    # The forward rounds twice, as HF's: the normalized input to x's dtype, then its product.
    within_rounding(y, ry, dtype, 1e-6, roundings=2.5)
    within_rounding(dx, rdx, dtype, 1e-5)
    within_rounding(dscale, rdscale, dtype, 1e-5)


def test_rms_norm_scale_gradient_sums_tokens_in_float32(rel_err):
    """Many tokens: a bfloat16 sum of the scale's gradient drifts by far more than its rounding."""
    x, dy, _ = _inputs((8, 512, 32), jnp.bfloat16, 0)
    scale = jnp.ones((32,), jnp.bfloat16)
    _, _, dscale = _rms_vjp(x, scale, EPS, dy)
    _, _, ref = _rms_reference(x, scale, dy)
    within_rounding(dscale, ref, jnp.bfloat16, 1e-5)


# ----------------------------------------------------------------------------- SwiGLU


@jax.jit
def _swiglu_vjp(a, b, g):
    y, pullback = jax.vjp(ops.swiglu, a, b)
    return (y,) + pullback(g)


def _swiglu_reference(a, b, g):
    with jax.enable_x64(True):
        args = [jnp.asarray(f64(v)) for v in (a, b, g)]
        y, pullback = jax.vjp(lambda a_, b_: a_ * jax.nn.sigmoid(a_) * b_, args[0], args[1])
        da, db = pullback(args[2])
        return np.asarray(y), np.asarray(da), np.asarray(db)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@settings(max_examples=12, deadline=None)
@given(seed=seeds, log_scale=st.floats(-1.0, 1.0))
def test_swiglu_backward_equals_float64_autodiff(dtype, seed, log_scale):
    """da and db within their dtype's rounding of float64 autodiff of ``silu(a) * b``: SiLU's
    derivative taken in bfloat16, or a wrong term of it, fails."""
    a, b, g = _inputs((4, 8, 96), dtype, seed, 10.0 ** log_scale)
    y, da, db = _swiglu_vjp(a, b, g)
    assert y.dtype == da.dtype == db.dtype == dtype
    ry, rda, rdb = _swiglu_reference(a, b, g)
    within_rounding(da, rda, dtype, 1e-6)
    within_rounding(db, rdb, dtype, 1e-6)
    # The forward is HF's: silu(a) * b in the inputs' dtype (bfloat16: sigmoid, a * sigmoid
    # and the product each rounded).
    within_rounding(y, ry, dtype, 1e-6, roundings=3.5)


# ----------------------------------------------------------------------------- loss


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_token_nll_and_its_backward_equal_float64_autodiff(dtype):
    logits = (3.0 * jax.random.normal(jax.random.key(0), (2, 9, 50))).astype(dtype)
    labels = jax.random.randint(jax.random.key(1), (2, 9), 0, 50)
    g = jax.random.uniform(jax.random.key(2), (2, 9))
    nll, pullback = jax.vjp(lambda x: ops.token_nll(x, labels), logits)
    (dlogits,) = pullback(g)
    assert nll.dtype == jnp.float32 and dlogits.dtype == dtype
    with jax.enable_x64(True):
        x64, g64 = jnp.asarray(f64(logits)), jnp.asarray(f64(g))
        lab = jnp.asarray(np.asarray(labels))

        def plain(x):
            return jax.nn.logsumexp(x, -1) - jnp.take_along_axis(x, lab[..., None], -1)[..., 0]
        ref, ref_pullback = jax.vjp(plain, x64)
        ref, (ref_d,) = np.asarray(ref), ref_pullback(g64)
    np.testing.assert_allclose(f64(nll), ref, rtol=1e-6, atol=1e-6)
    within_rounding(dlogits, np.asarray(ref_d), dtype, 1e-6)


def test_causal_lm_loss_predicts_the_next_token_where_the_target_is_marked():
    logits = jax.random.normal(jax.random.key(0), (2, 6, 11))
    ids = jax.random.randint(jax.random.key(1), (2, 6), 0, 11)
    mask = jnp.array([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    nll = np.asarray(jax.nn.logsumexp(logits[:, :-1], -1)
                     - jnp.take_along_axis(logits[:, :-1], ids[:, 1:, None], -1)[..., 0])
    w = np.asarray(mask[:, 1:], np.float64)
    np.testing.assert_allclose(ops.causal_lm_loss(logits, ids, mask),
                               (nll * w).sum() / w.sum(), rtol=1e-6)
    np.testing.assert_allclose(ops.causal_lm_loss(logits, ids), nll.mean(), rtol=1e-6)
    np.testing.assert_allclose(ops.causal_lm_loss(logits, ids, jnp.ones_like(ids)),
                               ops.causal_lm_loss(logits, ids), rtol=1e-6)
    assert float(ops.causal_lm_loss(logits, ids, jnp.zeros_like(ids))) == 0.0  # no target


# ----------------------------------------------------------------------------- RoPE


class _Rope:
    head_dim, rope_theta, rope_scaling = 8, 10000.0, None


def test_apply_rope_rotates_each_half_pair_by_position_times_frequency():
    cfg = _Rope()
    x = jax.random.normal(jax.random.key(0), (1, 5, 3, 8))
    pos = jnp.array([[0, 1, 2, 7, 30]])
    cos, sin = ops.rope_tables(cfg, pos)
    got = np.asarray(ops.apply_rope(x, cos, sin), np.float64)
    inv = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
    z = np.asarray(x[..., :4], np.float64) + 1j * np.asarray(x[..., 4:], np.float64)
    rotated = z * np.exp(1j * np.asarray(pos, np.float64)[0, :, None, None] * inv)
    np.testing.assert_allclose(got[..., :4], rotated.real, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[..., 4:], rotated.imag, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[:, 0], np.asarray(x[:, 0]))  # position 0: identity


def test_rope_scaling_linear_divides_and_llama3_keeps_high_frequencies():
    plain = np.asarray(ops.rope_inv_freq(_Rope()))
    lin = type("Lin", (_Rope,), {"rope_scaling": ("linear", 4.0)})()
    np.testing.assert_allclose(ops.rope_inv_freq(lin), plain / 4.0, rtol=1e-6)
    l3 = type("L3", (_Rope,), {"head_dim": 64, "rope_scaling": ("llama3", 8.0, 1.0, 4.0, 64)})()
    base = np.asarray(ops.rope_inv_freq(type("B", (_Rope,), {"head_dim": 64})()))
    got = np.asarray(ops.rope_inv_freq(l3))
    wavelen = 2 * np.pi / base
    high, low = wavelen < 64 / 4.0, wavelen > 64 / 1.0
    assert high.any() and low.any()
    np.testing.assert_allclose(got[high], base[high], rtol=1e-6)
    np.testing.assert_allclose(got[low], base[low] / 8.0, rtol=1e-6)
    mid = ~high & ~low
    assert ((got[mid] <= base[mid]) & (got[mid] >= base[mid] / 8.0)).all()


# ----------------------------------------------------------------------------- attention


def test_grouped_query_attention_equals_repeated_kv_heads_and_masks_agree(rel_err):
    q = jax.random.normal(jax.random.key(0), (2, 6, 4, 8))
    k, v = (jax.random.normal(jax.random.key(i), (2, 6, 2, 8)) for i in (1, 2))
    gqa = ops.attention(q, k, v)
    mha = ops.attention(q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2))
    assert rel_err(gqa, mha) < 1e-6
    positions, mask = ops.positions_and_mask(jnp.ones((2, 6), jnp.int32), 6, 2)
    np.testing.assert_array_equal(positions, np.broadcast_to(np.arange(6), (2, 6)))
    assert rel_err(ops.attention(q, k, v, mask), gqa) < 1e-6  # the causal mask, explicitly
    # Causal: a query never sees a later key.
    changed = ops.attention(q, k.at[:, 4:].add(1.0), v.at[:, 4:].add(1.0))
    np.testing.assert_allclose(changed[:, :4], gqa[:, :4], rtol=1e-6, atol=1e-6)


def test_positions_and_mask_for_left_padding():
    am = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions, mask = ops.positions_and_mask(am, 5, 2)
    np.testing.assert_array_equal(positions, [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    m = np.asarray(mask)
    assert not m[0, 3, :2].any() and m[0, 3, 2:4].all() and not m[0, 3, 4]
    assert m[0, 0, 0] and m[0, 0].sum() == 1  # a padded query sees only itself
    np.testing.assert_array_equal(m[1], np.tril(np.ones((5, 5), bool)))


def test_attention_impl_is_the_configs_unless_auto():
    cfg = type("C", (), {"attention_impl": "xla", "dtype": "bfloat16", "head_dim": 64})()
    assert ops.attention_impl(cfg) == "xla"
    cfg.attention_impl = "auto"
    want = "cudnn" if jax.default_backend() == "gpu" else "xla"
    assert ops.attention_impl(cfg) == want


def test_auto_attention_is_xla_under_deterministic_gpu_ops(monkeypatch):
    """XLA's deterministic GPU ops leave "auto" no cuDNN attention (it fails to compile in the
    LISA backward there), whatever the backend; without them a GPU in 16 bits takes cuDNN."""
    cfg = type("C", (), {"attention_impl": "auto", "dtype": "bfloat16", "head_dim": 64})()
    monkeypatch.setattr(ops.jax, "default_backend", lambda: "gpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=0")
    assert not ops.deterministic_gpu_ops() and ops.attention_impl(cfg) == "cudnn"
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=0 --xla_gpu_deterministic_ops=true")
    assert ops.deterministic_gpu_ops() and ops.attention_impl(cfg) == "xla"
