"""fp8 copies of frozen weights: the GEMMs of a LISA period's frozen layers in 8-bit floats.

In a LISA period L − γ layers are constants, so their weights can be quantized once per
resample and their forward and activation-gradient GEMMs run on fp8 tensor cores (Hopper and
later: about twice the bf16 rate). A frozen weight needs no weight gradient, so its backward
is one GEMM, ``dx = dy @ Wᵀ``, and nothing of the forward's input is kept for it.

* :class:`Fp8Weight` holds a ``[D, O]`` weight twice in ``float8_e4m3fn``, once per use and
  each laid out with the contraction on its last axis (the "TN" layout cuBLASLt's fp8 GEMMs
  take, so no transpose runs per call), with one float32 scale per output channel of that use.
  ``from_dense(w, both=False)`` keeps the forward's copy only (1 byte a parameter instead of
  2): the backward then multiplies by it transposed, its scales applied to the incoming
  gradient's channels before that is quantized. ``x @ w`` works on it as on the dense weight
  (``__rmatmul__``), so a block written with ``@`` runs unchanged on quantized weights.
* Activations are quantized per token on the fly, and so are incoming gradients in the
  backward. Both are ``e4m3`` by default: with one scale per token a row's range is its own,
  so e5m2's wider range (what per-tensor recipes take it for) buys nothing here, while its
  2 mantissa bits raise the backward's error 1.6-fold (measured on SmolLM2-135M with real text: a
  frozen GEMM's ``dx`` is off by 5.8% with e5m2, 3.7% with e4m3; the sampled layers' gradient
  cosine 0.9865 → 0.9939 from the backward alone). ``grad_dtype="e5m2"`` keeps the
  per-tensor-recipe choice. Row and column scales factor out of the contraction and are applied
  to the GEMM's product, which it writes in the activation's dtype (``GEMM_OUT_DTYPE``).
* :class:`Fp8Cache` is the bookkeeping of a run: which layers' copies are current. A layer's
  copy is made again exactly when it leaves the trained set (its weights changed while it
  trained); frozen layers keep theirs, and the full-precision weights are never touched.

Per-tensor scales lose the channels far below a tensor's largest entry; per-channel weight
scales and per-token activation scales bound every channel's error by its own range (tested
in ``tests/test_fp8.py`` against a float32 reference).

    >>> import jax, jax.numpy as jnp
    >>> w = jax.random.normal(jax.random.key(0), (64, 32))
    >>> x = jax.random.normal(jax.random.key(1), (4, 64))
    >>> y = x @ Fp8Weight.from_dense(w)
    >>> y.shape, bool(jnp.linalg.norm(y - x @ w) < 0.06 * jnp.linalg.norm(x @ w))
    ((4, 32), True)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2
GRAD_DTYPES = {"e4m3": E4M3, "e5m2": E5M2}


def quantize(x, axis: int, dtype=E4M3):
    """``(q, scale)`` with ``x ≈ q * scale``: one float32 scale per slice along ``axis``
    (``scale`` keeps that axis with size 1), mapping each slice's largest magnitude to the
    largest finite value of ``dtype``; an all-zero slice gets scale 1."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axis, keepdims=True)
    scale = jnp.where(amax > 0, amax / float(jnp.finfo(dtype).max), 1.0)
    return (x.astype(jnp.float32) / scale).astype(dtype), scale


# The dtype fp8 GEMMs write their (unscaled) product in; None: the activation's own. In
# bfloat16 the product costs half the memory traffic of float32, and the scales applied to it
# afterwards fuse into whatever reads it (the rounding, 2^-9, is far inside fp8's 2^-4);
# float32 is kept for comparisons (experiments/bench_fp8.py --gemm-out).
GEMM_OUT_DTYPE = None


# How the one-copy backward gets its copy transposed (cuBLASLt's fp8 GEMMs take only TN):
# "tiled", as a transpose of bytes kept apart from the GEMM, which XLA emits as one tiled
# kernel; "xla", left to XLA, which folds the transpose into the GEMM operand's layout and
# then moves the bytes in a plain loop, several times slower (kept for comparisons:
# experiments/bench_fp8.py --transpose).
BACKWARD_TRANSPOSE = "tiled"


def _transposed(w_OxD):
    """``w`` as ``[D, O]``, its rows contiguous: the TN operand of ``dy @ w``."""
    u_OxD = jax.lax.bitcast_convert_type(w_OxD, jnp.uint8)
    u_DxO = jax.lax.optimization_barrier(u_OxD.T)
    return jax.lax.bitcast_convert_type(u_DxO, w_OxD.dtype)


def _product_dtype(like):
    return jnp.dtype(GEMM_OUT_DTYPE or like)


def tn_product(a_TxK, b_OxK, like):
    """``a @ bᵀ`` of two fp8 operands contracted on their last axis, before any scale:
    accumulated in float32 and written in the product dtype (``GEMM_OUT_DTYPE``, or
    ``like``'s)."""
    return jax.lax.dot_general(a_TxK, b_OxK, (((1,), (1,)), ((), ())),
                               preferred_element_type=_product_dtype(like))


def grad_scales(w: "Fp8Weight"):
    """``(pre, post)`` of ``dx = dy @ Wᵀ``: the channel scales that go onto ``dy`` before it
    is quantized (``[O]``, one copy: the forward copy's scales lie on this GEMM's contraction
    axis) and onto ``dx`` after (``[D]``, the backward's own copy); None where there are none."""
    return (w.fwd_scale_O, None) if w.bwd_DxO is None else (None, w.bwd_scale_D)


def quantize_grad(dy_TxO, w: "Fp8Weight"):
    """``(dq, scale_Tx1)``: the incoming gradient of ``x @ W`` quantized for ``dy @ Wᵀ``
    (``pre`` of :func:`grad_scales` applied, in ``w.grad_dtype``)."""
    pre = grad_scales(w)[0]
    x = dy_TxO if pre is None else dy_TxO.astype(jnp.float32) * pre[None, :]
    return quantize(x, axis=1, dtype=GRAD_DTYPES[w.grad_dtype])


def grad_product(dq_TxO, w: "Fp8Weight", like):
    """``dq @ Wᵀ`` before any scale, in the product dtype (``like``'s by default): on the
    backward's own copy, else on the forward copy transposed (``BACKWARD_TRANSPOSE``)."""
    if w.bwd_DxO is not None:
        return tn_product(dq_TxO, w.bwd_DxO, like)
    if BACKWARD_TRANSPOSE == "tiled":
        return tn_product(dq_TxO, _transposed(w.fwd_OxD), like)
    return jax.lax.dot_general(dq_TxO, w.fwd_OxD, (((1,), (0,)), ((), ())),
                               preferred_element_type=_product_dtype(like))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8Weight:
    """A frozen ``[D, O]`` weight in fp8, laid out for ``x @ W`` and for ``dy @ Wᵀ``."""

    fwd_OxD: jax.Array      # e4m3, rows are output channels of x @ W
    fwd_scale_O: jax.Array  # float32
    bwd_DxO: jax.Array | None = None      # e4m3, rows are output channels of dy @ Wᵀ
    bwd_scale_D: jax.Array | None = None  # float32
    # the format incoming gradients are quantized to in the backward (a key of GRAD_DTYPES)
    grad_dtype: str = dataclasses.field(default="e4m3", metadata=dict(static=True))

    def __post_init__(self):
        if self.grad_dtype not in GRAD_DTYPES:
            raise ValueError(f"grad_dtype is one of {', '.join(GRAD_DTYPES)}, not "
                             f"{self.grad_dtype!r}")

    @classmethod
    def from_dense(cls, w_DxO, both: bool = True, grad_dtype: str = "e4m3") -> "Fp8Weight":
        """``both``: also the backward's own copy (TN for ``dy @ Wᵀ``); without it the
        backward reads the forward's copy transposed. ``grad_dtype``: the incoming gradient's
        format in the backward (``"e4m3"`` or ``"e5m2"``)."""
        w_OxD = jnp.swapaxes(w_DxO, 0, 1)
        fwd, fwd_scale = quantize(w_OxD, axis=1)
        if not both:
            return cls(fwd, fwd_scale[:, 0], grad_dtype=grad_dtype)
        bwd, bwd_scale = quantize(w_DxO, axis=1)
        return cls(fwd, fwd_scale[:, 0], bwd, bwd_scale[:, 0], grad_dtype=grad_dtype)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.fwd_OxD.shape[1], self.fwd_OxD.shape[0])

    def dequantize(self, dtype=jnp.float32):
        """The dense ``[D, O]`` weight the forward GEMM sees."""
        return (self.fwd_OxD.astype(jnp.float32) * self.fwd_scale_O[:, None]).T.astype(dtype)

    def __rmatmul__(self, x):
        return fp8_matmul(x, self)


@jax.custom_vjp
def fp8_matmul(x_xD, w: Fp8Weight):
    """``x @ W`` for a frozen fp8 weight, in ``x``'s dtype; the gradient reaches ``x`` only."""
    return _forward(x_xD, w)


def _forward(x_xD, w: Fp8Weight):
    lead, D = x_xD.shape[:-1], x_xD.shape[-1]
    xq, sx = quantize(x_xD.reshape(-1, D), axis=1)
    y = tn_product(xq, w.fwd_OxD, x_xD.dtype).astype(jnp.float32) * sx * w.fwd_scale_O[None, :]
    return y.reshape(*lead, -1).astype(x_xD.dtype)


def _fwd(x_xD, w):
    return _forward(x_xD, w), (w, jnp.zeros((), x_xD.dtype))


def _bwd(res, dy_xO):
    w, like = res
    lead, O = dy_xO.shape[:-1], dy_xO.shape[-1]
    # dy's per-token scales factor out of the sum; so do the backward copy's channel scales
    dq, sd = quantize_grad(dy_xO.reshape(-1, O), w)
    dx = grad_product(dq, w, like.dtype).astype(jnp.float32) * sd
    post = grad_scales(w)[1]
    if post is not None:
        dx = dx * post[None, :]
    return dx.reshape(*lead, -1).astype(like.dtype), jax.tree.map(jnp.zeros_like, w)


fp8_matmul.defvjp(_fwd, _bwd)


def quantize_layer(lp: dict, names: Sequence[str], both: bool = True,
                   grad_dtype: str = "e4m3") -> dict:
    """``lp`` with the matrices named in ``names`` as :class:`Fp8Weight` (norms, biases and
    everything else as they are); ``both``, ``grad_dtype``: as in
    :meth:`Fp8Weight.from_dense`."""
    return {k: Fp8Weight.from_dense(v, both, grad_dtype) if k in names else v
            for k, v in lp.items()}


class Fp8Cache:
    """fp8 copies of a run's frozen layers, kept current across resamples.

    ``refresh(layers, active)`` is called with the full-precision per-layer parameters and the
    layers that train in the coming period. Layers that trained in the previous period and do
    not now are quantized again (their weights moved); layers without a copy are quantized
    once; every other copy is reused. A layer that trains has no copy (``copies`` holds the
    frozen layers only: the copy would go stale, and it is remade when the layer leaves),
    unless every layer trains: then each has one, so that a step has copies to take. Returns the per-layer parameters for the period: the trained
    layers' own (full precision), the others' fp8 copies. The input is not modified.

    >>> import numpy as np
    >>> layers = [{"w": np.eye(2, dtype=np.float32)} for _ in range(3)]
    >>> cache = Fp8Cache(("w",))
    >>> _ = cache.refresh(layers, active=[0]); sorted(cache.last_quantized)
    [1, 2]
    >>> _ = cache.refresh(layers, active=[1]); sorted(cache.last_quantized)
    [0]

    ``quantize(lp) -> copy`` makes a layer's copy (default: :func:`quantize_layer` on
    ``names``); a step passes a jitted one that also places the copy on the device.
    """

    def __init__(self, names: Sequence[str], quantize: Callable[[dict], Any] | None = None):
        self.names = tuple(names)
        self.quantize = quantize or (lambda lp: quantize_layer(lp, self.names))
        self.copies: dict[int, dict] = {}
        self.active: frozenset[int] = frozenset()
        self.last_quantized: frozenset[int] = frozenset()

    def refresh(self, layers: Sequence[dict], active: Sequence[int]) -> list[Any]:
        active = frozenset(int(i) for i in active)
        stale = {i for i in range(len(layers)) if i not in active
                 and (i not in self.copies or i in self.active)}
        if len(active) < len(layers):
            for i in active:
                self.copies.pop(i, None)
        else:  # every layer trains: a step still takes a copy of each (and reads none)
            stale |= {i for i in range(len(layers)) if i not in self.copies}
        for i in stale:
            self.copies[i] = self.quantize(layers[i])
        self.active, self.last_quantized = active, frozenset(stale)
        return [layers[i] if i in active else self.copies[i] for i in range(len(layers))]
