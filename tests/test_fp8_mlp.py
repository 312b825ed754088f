"""The fused fp8 MLP of frozen layers: its Pallas row kernels against their plain-JAX
arithmetic (to the last rounding, in Pallas's interpreter), their lowering to Triton for a GPU, and the
MLP against the dense one and the stage-by-stage fp8 one.

Error bounds as in ``test_fp8.py``: about 5% relative for a product of e4m3 operands; the
fused MLP chains three GEMMs, so its output and gradient are held to 10% and a cosine of 0.99.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lisa_jax import block, fp8_mlp
from lisa_jax.fp8_mlp import RESIDUALS
from lisa_jax.fp8 import E4M3, E5M2, quantize, quantize_layer


def _normal(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _positive(seed, shape):
    return jax.random.uniform(jax.random.key(seed), shape) + 0.5


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _cos(a, b):
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def _same(got, want):
    """The same quantized values and scales, up to how two compilations of one float32
    expression may round: scales one float32 rounding apart; values equal but for a few
    entries one fp8 step apart, or far below their row's top (a tanh GELU's gradient far left
    of zero is ``1 + tanh``, a difference of nearly equal numbers: its last bits follow the
    tanh's)."""
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        if g.ndim == 2:
            step = 2.0 ** -jnp.finfo(g.dtype).nmant  # one step, relative
            g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
            off = g != w
            assert off.mean() <= 0.01, f"{off.sum()} of {off.size} values differ"
            top = np.max(np.abs(w), axis=1, keepdims=True)
            assert np.all(np.abs(g - w) <= np.maximum(np.abs(w) * step, top / 1024))
        else:
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6)


def test_the_grid_divides_the_groups_among_at_most_the_programs_asked_for():
    for groups in (1, 7, 24, 2048, 4096):
        for programs in (0, 1, 3, 5, 264, 512, 5000):
            grid = fp8_mlp.grid_of(groups, programs)
            assert groups % grid == 0
            assert grid == groups if programs in (0, 5000) or programs >= groups \
                else grid <= programs
    assert fp8_mlp.grid_of(2048, 264) == 256 and fp8_mlp.grid_of(24, 5) == 4


# T == F: a token vector and a channel vector of the same length must not be confused
@pytest.mark.parametrize("act,block_cols,rows,T,programs", [
    ("silu", 16384, 1, 8, 0),            # the whole row at once
    ("silu", 16, 4, 48, 0),              # three column chunks, four rows a group
    ("silu", 16, 2, 48, 5),              # 24 groups, 4 programs taking 6 each in turn
    ("gelu_pytorch_tanh", 16, 1, 8, 3),  # 8 groups, 2 programs
    ("gelu_pytorch_tanh", 16384, 2, 8, 0)])
def test_row_kernels_compute_their_plain_jax_arithmetic(act, block_cols, rows, T, programs,
                                                        monkeypatch):
    monkeypatch.setattr(fp8_mlp, "LAUNCH", ((rows, block_cols, 4, programs, 1),) * 2)
    F = 48
    a, b = _normal(0, (T, F), jnp.bfloat16), _normal(1, (T, F), jnp.bfloat16) * 3
    row, col_a, col_b = _positive(2, (T,)), _positive(3, (F,)), _positive(4, (F,))
    fwd = (a, b, row, col_a, col_b, act)
    _same(fp8_mlp.gate_quantize(*fwd, kernels="interpret"),
          fp8_mlp.gate_quantize(*fwd, kernels="xla"))
    lean = fp8_mlp.gate_quantize(*fwd, kernels="interpret", with_products=True)
    _same(lean, fp8_mlp.gate_quantize(*fwd, kernels="xla", with_products=True))
    dh, dh_row = _normal(5, (T, F), jnp.bfloat16), _positive(6, (T,))
    row_b = _positive(10, (T,))
    for extra, dtype in (((None, None, None), E4M3),  # the one-copy backward's inputs
                         ((_positive(7, (F,)), _positive(8, (F,)), _positive(9, (F,))), E5M2)):
        dh_col, pre_a, pre_b = extra
        for a_, b_ in ((a, b), (lean[2], lean[4])):  # bf16 products, and e4m3 ones
            bwd = (dh, dh_row, dh_col, a_, b_, row, row_b, col_a, col_b, pre_a, pre_b, act,
                   dtype)
            got = fp8_mlp.gate_grad_quantize(*bwd, kernels="interpret")
            _same(got, fp8_mlp.gate_grad_quantize(*bwd, kernels="xla"))
            assert got[0].dtype == dtype and got[1].shape == (T,)


def test_the_products_are_quantized_as_fp8_quantize_quantizes_them():
    """``with_products`` gives the forward's own products in e4m3 (what the backward of
    ``--frozen-residuals fp8`` reads), as ``fp8.quantize`` per token; the gated product is
    unchanged by asking for them."""
    T, F = 6, 40
    a, b = _normal(0, (T, F), jnp.bfloat16) * 5, _normal(1, (T, F), jnp.bfloat16)
    args = (a, b, _positive(2, (T,)), _positive(3, (F,)), _positive(4, (F,)), "silu")
    q, s, qa, sa, qb, sb = fp8_mlp.gate_quantize(*args, kernels="interpret",
                                                 with_products=True)
    _same((q, s), fp8_mlp.gate_quantize(*args, kernels="interpret"))
    for got_q, got_s, x in ((qa, sa, a), (qb, sb, b)):
        want_q, want_s = quantize(x, axis=1)
        _same((got_q, got_s), (want_q, want_s[:, 0]))
        assert got_q.dtype == E4M3


def test_row_kernels_quantize_each_row_to_the_format_maximum():
    T, F = 4, 40
    a = _normal(0, (T, F), jnp.bfloat16) * jnp.asarray([1e-3, 1.0, 30.0, 0.0])[:, None]
    b = _normal(1, (T, F), jnp.bfloat16)
    q, scale = fp8_mlp.gate_quantize(a, b, jnp.ones(T), jnp.ones(F), jnp.ones(F), "silu",
                                     kernels="interpret")
    top = np.max(np.abs(np.asarray(q, np.float32)), axis=1)
    np.testing.assert_array_equal(top[:3], 448.0)  # rows a thousandfold apart, each at full range
    assert top[3] == 0 and float(scale[3]) == 1.0  # an all-zero row: zeros, scale 1
    ref = jax.nn.silu(a.astype(jnp.float32)) * b.astype(jnp.float32)
    for t in range(3):
        assert _rel(q[t].astype(jnp.float32) * scale[t], ref[t]) < 0.05


@pytest.mark.parametrize("F", [11008, 28672])  # one chunk a row, and two
def test_row_kernels_lower_to_triton_for_a_gpu(F):
    """Triton takes loads and stores of power-of-two sizes only, among other limits the
    interpreter does not check: lowering for CUDA (no GPU needed) checks them."""
    T, f32 = 256, jnp.float32
    spec = lambda *s, d=jnp.bfloat16: jax.ShapeDtypeStruct(s, d)  # noqa: E731
    texts = []
    for with_products in (False, True):
        fwd = jax.jit(lambda *x: fp8_mlp.gate_quantize(*x, "silu", kernels="pallas",
                                                       with_products=with_products))
        texts.append(fwd.trace(spec(T, F), spec(T, F), spec(T, d=f32), spec(F, d=f32),
                               spec(F, d=f32)).lower(lowering_platforms=("cuda",)).as_text())
    bwd = jax.jit(lambda dh, dr, a, b, ra, rb, ca, cb: fp8_mlp.gate_grad_quantize(
        dh, dr, None, a, b, ra, rb, ca, cb, None, None, "gelu_pytorch_tanh", kernels="pallas"))
    for products in (jnp.bfloat16, E4M3):
        texts.append(bwd.trace(spec(T, F), spec(T, d=f32), spec(T, F, d=products),
                               spec(T, F, d=products), spec(T, d=f32), spec(T, d=f32),
                               spec(F, d=f32), spec(F, d=f32)).lower(
            lowering_platforms=("cuda",)).as_text())
    for t in texts:
        assert "triton_kernel_call" in t or "__gpu$xla.gpu.triton" in t


def _layer(tiny_cfg, act, seed=0):
    cfg = tiny_cfg(hidden_size=64, intermediate_size=96, hidden_act=act)
    D, F = cfg.hidden_size, cfg.intermediate_size
    lp = {"w_gate": _normal(seed, (D, F)) / 8, "w_up": _normal(seed + 1, (D, F)) / 8,
          "w_down": _normal(seed + 2, (F, D)) / 10}
    return cfg, lp


def _dense_mlp(cfg, lp, x):
    a, b = x @ lp["w_gate"], x @ lp["w_up"]
    f = jax.nn.silu(a) if cfg.hidden_act == "silu" else jax.nn.gelu(a, approximate=True)
    return (f * b) @ lp["w_down"]


@pytest.mark.parametrize("act,both,residuals", [
    ("silu", False, "bf16"), ("silu", True, "bf16"), ("gelu_pytorch_tanh", False, "bf16"),
    ("silu", False, "fp8")])
def test_frozen_mlp_follows_the_dense_mlp_within_the_fp8_bound(act, both, residuals,
                                                               tiny_cfg):
    cfg, lp = _layer(tiny_cfg, act)
    x, dy = _normal(10, (2, 12, 64)), _normal(11, (2, 12, 64))
    mlp = fp8_mlp.FrozenMlp(cfg, quantize_layer(lp, tuple(lp), both), kernels="interpret",
                            residuals=residuals)
    y, named = mlp.forward(x)
    y_ref, pullback = jax.vjp(lambda x_: _dense_mlp(cfg, lp, x_), x)
    assert y.shape == x.shape and _rel(y, y_ref) < 0.1 and _cos(y, y_ref) > 0.99
    assert set(named) == {"a", "b", "sa", "sb"} and named["sa"].shape == (2, 12, 1)
    assert named["a"].dtype == (E4M3 if residuals == "fp8" else x.dtype)
    # a and b are the raw GEMM products: times their row and column scales, the projections
    gate = named["a"].astype(jnp.float32) * named["sa"] * mlp.w_gate.fwd_scale_O
    up = named["b"].astype(jnp.float32) * named["sb"] * mlp.w_up.fwd_scale_O
    assert _rel(gate, x @ lp["w_gate"]) < 0.06 and _rel(up, x @ lp["w_up"]) < 0.06
    dx, dx_ref = mlp.backward(named, dy), pullback(dy)[0]
    assert dx.shape == x.shape and _rel(dx, dx_ref) < 0.1 and _cos(dx, dx_ref) > 0.99


def test_frozen_mlp_agrees_with_the_stage_by_stage_fp8_mlp(tiny_cfg):
    cfg, lp = _layer(tiny_cfg, "silu", seed=3)
    q = quantize_layer(lp, tuple(lp), False)
    x, dy = _normal(12, (2, 12, 64)), _normal(13, (2, 12, 64))

    def stages(x_):
        a, b = block._mlp_in(cfg, q, None, x_)
        return block._mlp_out(cfg, q, None, jnp.zeros_like(x_), a, b)[0]

    y_ref, pullback = jax.vjp(stages, x)
    mlp = fp8_mlp.FrozenMlp(cfg, q, kernels="xla")
    y, named = mlp.forward(x)
    dx = mlp.backward(named, dy)
    # the same fp8 GEMMs; only the rounding between them differs (none here, bf16 there)
    assert _rel(y, y_ref) < 0.02 and _rel(dx, pullback(dy)[0]) < 0.03
    assert _rel(y, _dense_mlp(cfg, lp, x)) < 0.1


def test_fp8_residuals_leave_the_forward_exact_and_the_backward_within_the_fp8_bound(
        tiny_cfg):
    """``residuals="fp8"`` changes only what the backward reads: the output is bit-identical,
    the input gradient within e4m3's rounding of the products of the bf16-residual one."""
    cfg, lp = _layer(tiny_cfg, "silu", seed=5)
    q = quantize_layer(lp, tuple(lp), False)
    x, dy = _normal(14, (2, 12, 64), jnp.bfloat16), _normal(15, (2, 12, 64), jnp.bfloat16)
    exact, lean = (fp8_mlp.FrozenMlp(cfg, q, kernels="xla", residuals=r) for r in RESIDUALS)
    (y, named), (y_lean, named_lean) = exact.forward(x), lean.forward(x)
    np.testing.assert_array_equal(np.asarray(y_lean), np.asarray(y))
    assert named_lean["a"].nbytes * 2 == named["a"].nbytes
    dx, dx_lean = exact.backward(named, dy), lean.backward(named_lean, dy)
    assert 0 < _rel(dx_lean, dx) < 0.05 and _cos(dx_lean, dx) > 0.998


def test_frozen_mlp_is_refused_in_one_line_where_it_does_not_apply(tiny_cfg):
    cfg, lp = _layer(tiny_cfg, "silu")
    with pytest.raises(ValueError, match="fp8 copies, not dense weights"):
        fp8_mlp.FrozenMlp(cfg, lp)
    sandwich = tiny_cfg(sandwich_norm=True)
    assert not fp8_mlp.supports(sandwich)
    with pytest.raises(ValueError, match="without sandwich norms") as e:
        fp8_mlp.FrozenMlp(sandwich, quantize_layer(lp, tuple(lp)))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="residuals is one of"):
        fp8_mlp.FrozenMlp(cfg, quantize_layer(lp, tuple(lp)), residuals="e4m3")
    with pytest.raises(ValueError, match="kernels is one of"):
        fp8_mlp.gate_quantize(*(jnp.ones((2, 4)),) * 2, jnp.ones(2), jnp.ones(4), jnp.ones(4),
                              "silu", kernels="cuda")
