"""fp8 frozen weights: the GEMMs against a float32 reference, the custom backward, the block on
quantized weights, and the re-quantization bookkeeping across resamples.

Error bounds: e4m3 keeps 3 mantissa bits, so a rounded value is off by at most 2^-4 of itself
(about 2^-3/√12 ≈ 3.6% in RMS); a product of two rounded operands is off by about √2 of that,
and over a long contraction with independent errors the relative error of the sum is the
same ≈ 5%. The backward quantizes incoming gradients to e4m3 as well (per token: the same
bound); e5m2 (2 mantissa bits, ``grad_dtype="e5m2"``) doubles the gradient operand's share
(≈ 8% together). The bounds below are those estimates with a margin, on fixed seeds.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lisa_jax import block, ops
from lisa_jax.fp8 import E4M3, Fp8Cache, Fp8Weight, fp8_matmul, quantize, quantize_layer


def _normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_quantize_maps_each_slices_largest_entry_to_the_format_maximum():
    x = _normal(0, (5, 7)) * jnp.arange(1, 6)[:, None]
    q, scale = quantize(x, axis=1)
    assert q.dtype == E4M3 and scale.shape == (5, 1)
    np.testing.assert_allclose(np.max(np.abs(np.asarray(q, np.float32)), axis=1), 448.0)
    q0, s0 = quantize(jnp.zeros((2, 3)), axis=1)  # an all-zero row stays zero, scale 1
    assert not np.asarray(q0, np.float32).any() and np.all(np.asarray(s0) == 1.0)


def test_forward_is_within_the_e4m3_bound_of_the_float_product():
    x, w = _normal(1, (3, 16, 256)), _normal(2, (256, 128))
    y = x @ Fp8Weight.from_dense(w)
    assert y.shape == (3, 16, 128) and y.dtype == x.dtype
    assert _rel(y, x @ w) < 0.06


def test_per_channel_scales_keep_small_channels_that_a_tensor_scale_loses():
    # output channels spanning five orders of magnitude, as in real weights with outliers
    w = _normal(3, (128, 64)) * jnp.logspace(-5, 0, 64)[None, :]
    x = _normal(4, (32, 128))
    ref = x @ w
    y = x @ Fp8Weight.from_dense(w)
    per_column = jnp.linalg.norm(y - ref, axis=0) / jnp.linalg.norm(ref, axis=0)
    assert float(per_column.max()) < 0.08
    q, s = quantize(w, axis=None)  # one scale for the whole tensor
    tensor_scaled = x @ (q.astype(jnp.float32) * s)
    lost = jnp.linalg.norm(tensor_scaled - ref, axis=0) / jnp.linalg.norm(ref, axis=0)
    assert float(lost[:4].min()) > 0.15  # the smallest channels, 1e-5 of the largest


def test_backward_reaches_the_input_only_and_is_within_the_e5m2_bound():
    x, w, dy = _normal(5, (8, 12, 256)), _normal(6, (256, 96)), _normal(7, (8, 12, 96))
    fw = Fp8Weight.from_dense(w)
    y, pull = jax.vjp(fp8_matmul, x, fw)
    dx, dw = pull(dy)
    assert _rel(dx, dy @ w.T) < 0.10
    assert all(not np.asarray(leaf, np.float32).any() for leaf in jax.tree.leaves(dw))
    g = jax.jit(jax.grad(lambda x: jnp.sum((x @ fw) * dy)))(x)  # the same through jit
    np.testing.assert_allclose(g, dx, rtol=1e-6, atol=1e-6)


def test_one_copy_backward_is_within_the_same_bound_and_halves_the_bytes():
    # only the forward's copy: dy is scaled by its per-channel scales, then quantized per token
    x, w, dy = _normal(5, (8, 12, 256)), _normal(6, (256, 96)), _normal(7, (8, 12, 96))
    w = w * jnp.logspace(-3, 0, 96)[None, :]  # channels of different ranges
    one, two = Fp8Weight.from_dense(w, both=False), Fp8Weight.from_dense(w)
    assert one.bwd_DxO is None and one.shape == two.shape == (256, 96)
    nbytes = lambda fw: sum(leaf.nbytes for leaf in jax.tree.leaves(fw))  # noqa: E731
    assert nbytes(one) < 0.51 * nbytes(two)
    np.testing.assert_array_equal(x @ one, x @ two)  # the same forward
    dx = jax.vjp(fp8_matmul, x, one)[1](dy)[0]
    assert _rel(dx, dy @ w.T) < 0.10
    g = jax.jit(jax.grad(lambda x: jnp.sum((x @ one) * dy)))(x)
    np.testing.assert_allclose(g, dx, rtol=1e-6, atol=1e-6)


def test_one_copy_backward_transposes_its_copy_apart_for_a_tn_gemm(monkeypatch):
    # cuBLASLt's fp8 GEMMs take TN only: the backward multiplies by the forward's copy
    # transposed. Left to XLA that transpose is folded into the GEMM operand's layout and run
    # as a slow byte loop; kept apart (behind a barrier) it is one tiled transpose kernel.
    x, w, dy = _normal(5, (4, 8, 64)), _normal(6, (64, 48)), _normal(7, (4, 8, 48))
    one = Fp8Weight.from_dense(w, both=False)
    from lisa_jax import fp8
    t = fp8._transposed(one.fwd_OxD)
    assert t.dtype == E4M3 and t.shape == (64, 48)
    np.testing.assert_array_equal(np.asarray(t, np.float32), np.asarray(one.fwd_OxD, np.float32).T)

    def backward(x, dy):
        return jax.vjp(fp8_matmul, x, one)[1](dy)[0]
    hlo = jax.jit(backward).lower(x, dy).as_text()
    dots = [ln for ln in hlo.splitlines() if "dot_general" in ln]
    assert len(dots) == 1 and "contracting_dims = [1] x [1]" in dots[0], dots  # TN
    assert "optimization_barrier" in hlo
    dx = backward(x, dy)
    monkeypatch.setattr(fp8, "BACKWARD_TRANSPOSE", "xla")
    left_to_xla = lambda x, dy: backward(x, dy)  # noqa: E731  (a fresh trace)
    hlo_xla = jax.jit(left_to_xla).lower(x, dy).as_text()
    assert "contracting_dims = [1] x [0]" in hlo_xla and "optimization_barrier" not in hlo_xla
    np.testing.assert_allclose(dx, jax.jit(left_to_xla)(x, dy), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("both", [True, False])
def test_backward_quantizes_gradients_to_e4m3_and_is_within_the_e4m3_bound(both):
    # per-token scales give each gradient row its own range, so the default e4m3 (3 mantissa
    # bits) halves e5m2's error; e5m2 stays available for per-tensor-style comparisons
    x, w, dy = _normal(5, (8, 12, 256)), _normal(6, (256, 96)), _normal(7, (8, 12, 96))
    w = w * jnp.logspace(-3, 0, 96)[None, :]
    ref = dy @ w.T
    fw = Fp8Weight.from_dense(w, both=both)
    assert fw.grad_dtype == "e4m3"
    dx = jax.vjp(fp8_matmul, x, fw)[1](dy)[0]
    assert _rel(dx, ref) < 0.04  # e5m2 here: 0.050 (one copy), 0.054 (two)
    f5 = Fp8Weight.from_dense(w, both=both, grad_dtype="e5m2")
    np.testing.assert_array_equal(x @ f5, x @ fw)  # the forward is the same
    dx5 = jax.vjp(fp8_matmul, x, f5)[1](dy)[0]
    assert 0.045 < _rel(dx5, ref) < 0.10
    assert quantize_layer({"w": w}, ("w",), both, "e5m2")["w"].grad_dtype == "e5m2"
    with pytest.raises(ValueError, match="grad_dtype"):
        Fp8Weight.from_dense(w, grad_dtype="e3m4")


def test_bfloat16_inputs_give_bfloat16_outputs_and_gradients():
    x, w = _normal(8, (4, 64)).astype(jnp.bfloat16), _normal(9, (64, 32))
    fw = Fp8Weight.from_dense(w)
    y, pull = jax.vjp(lambda x: x @ fw, x)
    assert y.dtype == jnp.bfloat16 and pull(jnp.ones_like(y))[0].dtype == jnp.bfloat16


@pytest.mark.parametrize("both", [True, False])
def test_bfloat16_gemms_write_their_product_in_bfloat16_within_its_rounding(both, monkeypatch):
    # the product in the activation's dtype halves the GEMM's output traffic against float32;
    # its one extra rounding (2^-9) must stay far inside fp8's error
    x, w = _normal(8, (4, 16, 64)).astype(jnp.bfloat16), _normal(9, (64, 96))
    dy = _normal(10, (4, 16, 96)).astype(jnp.bfloat16)
    fw = Fp8Weight.from_dense(w, both=both)

    def run(x, dy):
        y, pull = jax.vjp(fp8_matmul, x, fw)
        return y.astype(jnp.float32), pull(dy)[0].astype(jnp.float32)
    hlo = jax.jit(run).lower(x, dy).as_text()
    dots = [ln.split("->")[-1] for ln in hlo.splitlines() if "dot_general" in ln]
    assert len(dots) == 2 and all("xbf16>" in out for out in dots), dots  # forward, backward
    y, dx = run(x, dy)
    monkeypatch.setattr("lisa_jax.fp8.GEMM_OUT_DTYPE", jnp.float32)
    y32, dx32 = run(x, dy)
    assert 1e-4 < _rel(y, y32) < 2 ** -7 and 1e-4 < _rel(dx, dx32) < 2 ** -7
    ref = x.astype(jnp.float32) @ w
    assert _rel(y, ref) < 0.06 and _rel(dx, dy.astype(jnp.float32) @ w.T) < 0.06


def test_dequantize_is_the_weight_the_forward_multiplies_by():
    w = _normal(10, (48, 40))
    fw = Fp8Weight.from_dense(w)
    assert fw.shape == (48, 40)
    x = _normal(11, (6, 48))
    q, s = quantize(x, axis=1)
    x_seen = q.astype(jnp.float32) * s
    np.testing.assert_allclose(x @ fw, x_seen @ fw.dequantize(), rtol=2e-5, atol=2e-5)
    assert _rel(fw.dequantize(), w) < 0.05


def test_a_decoder_layer_on_fp8_matrices_follows_the_dense_one(tiny_cfg, perturbed_params):
    cfg = tiny_cfg()
    params = perturbed_params(cfg)
    lp = jax.tree.map(lambda v: v[1], params["layers"])
    B, S = 2, 10
    h = _normal(12, (B, S, cfg.hidden_size))
    rope = ops.rope_tables(cfg, jnp.broadcast_to(jnp.arange(S), (B, S)))
    matrices = [p.name for p in block.layer_params(cfg) if p.rank == 2]
    assert {"wq", "wo", "w_down"} <= set(matrices)
    quantized = quantize_layer(lp, matrices)
    assert all(isinstance(quantized[m], Fp8Weight) for m in matrices)
    @jax.jit
    def out_and_input_grad(lp, h):
        def loss(h):
            out = block.decoder_layer(cfg, lp, h, rope, layer=1)
            return jnp.sum(out ** 2), out
        return jax.grad(loss, has_aux=True)(h)[::-1]

    out, dh = out_and_input_grad(lp, h)
    out8, dh8 = out_and_input_grad(quantized, h)
    # the residual stream carries h itself; the layer's own contribution is what fp8 perturbs
    assert _rel(out8 - h, out - h) < 0.08
    assert _rel(dh8, dh) < 0.08


@pytest.mark.parametrize("schedule", [
    [[0, 1], [2, 3], [3, 0], [3, 0], [1, 2]],
    [[4], [4], [0], [1], [4]],
])
def test_cache_requantizes_exactly_the_layers_that_left_the_trained_set(schedule):
    L = 5
    masters = [{"w": np.full((4, 4), float(i), np.float32), "norm": np.ones(4, np.float32)}
                for i in range(L)]
    cache = Fp8Cache(("w",))
    previous: set[int] = set()
    copied: set[int] = set()
    for active in schedule:
        snapshot = [{k: v.copy() for k, v in lp.items()} for lp in masters]
        out = cache.refresh(masters, active)
        frozen = set(range(L)) - set(active)
        # a frozen layer is quantized when it just trained or has no copy yet, else reused
        assert cache.last_quantized == {i for i in frozen if i in previous or i not in copied}
        copied |= frozen
        for i in range(L):
            np.testing.assert_array_equal(masters[i]["w"], snapshot[i]["w"])  # untouched
            if i in active:
                assert out[i] is masters[i]
            else:
                assert isinstance(out[i]["w"], Fp8Weight) and out[i]["norm"] is masters[i]["norm"]
                # the copy is of the weights as they are now, not of an older period
                np.testing.assert_allclose(out[i]["w"].dequantize(), masters[i]["w"], rtol=0.07)
        for i in active:  # training moves the trained layers' weights
            masters[i] = {**masters[i], "w": masters[i]["w"] + 1.0}
        previous = set(active)
