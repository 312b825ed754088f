"""A frozen fp8 layer's MLP: three fp8 GEMMs and two fused row kernels between them.

Run stage by stage (``block._mlp_in``, ``block._mlp_out`` on :class:`lisa_jax.fp8.Fp8Weight`
matrices), a frozen layer's MLP makes several passes over ``[tokens, F]`` arrays that one pass
each way can do: the gate and up products are scaled and written again before the gated
product reads them, the gated product is written and then read twice (its per-token maximum,
then its quantization), and in the backward the gated product's gradient is written in float32
before each half is read again to be quantized. :class:`FrozenMlp` keeps the raw products of
the gate and up GEMMs (what the GEMM wrote, before its row and column scales) and fuses the
rest into two kernels, each over whole rows (a few a program):

* :func:`gate_quantize`: ``silu(a) * b`` (or Gemma's tanh GELU) from the raw products and
  their scales, quantized to e4m3 per token for the down GEMM (and, where the backward is to
  read them in fp8, the raw products too, in the same pass: ``residuals="fp8"``);
* :func:`gate_grad_quantize`: the gated product's gradients for ``a`` and ``b`` from the down
  GEMM's raw activation gradient, each scaled for and quantized per token for its own GEMM.

On a GPU they are Pallas (Triton) kernels; elsewhere, or with ``KERNELS = "xla"``, the same
arithmetic in plain JAX (``"interpret"`` runs the kernels in Pallas's interpreter: tests).

    >>> import jax, jax.numpy as jnp
    >>> k = jax.random.split(jax.random.key(0), 3)
    >>> a, b = (jax.random.normal(key, (4, 48), jnp.bfloat16) for key in k[:2])
    >>> ones_T, ones_F = jnp.ones(4), jnp.ones(48)
    >>> q, scale = gate_quantize(a, b, ones_T, ones_F, ones_F, "silu", kernels="interpret")
    >>> ref = jax.nn.silu(a.astype(jnp.float32)) * b.astype(jnp.float32)
    >>> err = jnp.abs(q.astype(jnp.float32) * scale[:, None] - ref).max()
    >>> bool(err < 0.07 * jnp.abs(ref).max())
    True
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lisa_jax import fp8
from lisa_jax.fp8 import E4M3, GRAD_DTYPES, Fp8Weight

ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
# "auto": Pallas kernels on a GPU, plain JAX elsewhere; "pallas", "xla", "interpret" force one
# (experiments/bench_fp8.py --mlp-kernels compares them)
KERNELS = "auto"
KERNEL_CHOICES = ("auto", "pallas", "xla", "interpret")
_GELU_C = math.sqrt(2 / math.pi)


def supports(cfg) -> bool:
    """Whether a layer of ``cfg`` can run :class:`FrozenMlp` (a gated MLP with the residual
    added straight after the down projection)."""
    return cfg.hidden_act in ACTIVATIONS and not cfg.sandwich_norm


def _act_and_grad(a, act: str):
    """``(act(a), act'(a))`` in float32."""
    if act == "silu":
        sig = 1 / (1 + jnp.exp(-a))
        return a * sig, sig * (1 + a * (1 - sig))
    inner = _GELU_C * (a + 0.044715 * a * a * a)
    t = jnp.tanh(inner)
    grad = 0.5 * (1 + t) + 0.5 * a * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * a * a)
    return 0.5 * a * (1 + t), grad


def _scale(amax, dtype):
    return jnp.where(amax > 0, amax / float(jnp.finfo(dtype).max), 1.0)


# ----------------------------------------------------------------------------- plain JAX


def _scaled_products(a_raw, b_raw, row_a, row_b, col_a, col_b):
    a = a_raw.astype(jnp.float32) * row_a[:, None] * col_a[None, :]
    b = b_raw.astype(jnp.float32) * row_b[:, None] * col_b[None, :]
    return a, b


def _quantize_rows(x_TxF, dtype):
    scale = _scale(jnp.max(jnp.abs(x_TxF), axis=1), dtype)
    return (x_TxF / scale[:, None]).astype(dtype), scale


def _gate_quantize_xla(a_raw, b_raw, row_T, col_a, col_b, act, with_products):
    a, b = _scaled_products(a_raw, b_raw, row_T, row_T, col_a, col_b)
    out = _quantize_rows(_act_and_grad(a, act)[0] * b, E4M3)
    if with_products:
        out += (*_quantize_rows(a_raw.astype(jnp.float32), E4M3),
                *_quantize_rows(b_raw.astype(jnp.float32), E4M3))
    return out


def _grads(dh_raw, dh_row, dh_col, a, b, act):
    dh = dh_raw.astype(jnp.float32) * dh_row[:, None]
    if dh_col is not None:
        dh = dh * dh_col[None, :]
    f, f_grad = _act_and_grad(a, act)
    return dh * b * f_grad, dh * f


def _gate_grad_quantize_xla(dh_raw, dh_row, dh_col, a_raw, b_raw, row_a, row_b, col_a, col_b,
                            pre_a, pre_b, act, dtype):
    a, b = _scaled_products(a_raw, b_raw, row_a, row_b, col_a, col_b)
    da, db = _grads(dh_raw, dh_row, dh_col, a, b, act)
    pre_a, pre_b = (col_a if pre_a is None else pre_a), (col_b if pre_b is None else pre_b)
    return (*_quantize_rows(da * pre_a[None, :], dtype),
            *_quantize_rows(db * pre_b[None, :], dtype))


# ----------------------------------------------------------------------------- Pallas kernels


def _pallas():
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt
    return pl, plt


def _row_kernel(compute, kinds, n_out, F, rows, block, dtype, groups_a_program=1,
                programs=1):
    """A kernel over groups of ``rows`` rows: ``compute(**values) -> n_out float32 chunks`` of
    the inputs' values (``kinds``: name -> "row" for a ``[T, F]`` input, "token" for ``[T]``,
    "channel" for ``[F]``); each output is quantized to ``dtype`` with its own scale a row.
    A program takes ``groups_a_program`` groups, one after another, ``programs`` apart."""
    pl, plt = _pallas()
    n_chunks = -(-F // block)

    def kernel(*refs):
        first = pl.program_id(0)
        if groups_a_program == 1:
            group(refs, first)
        else:  # the programs that run at once share one stretch of rows
            def body(i, carry):
                group(refs, first + i * programs)
                return carry
            jax.lax.fori_loop(0, groups_a_program, body, 0)

    def group(refs, g):
        ins, outs = dict(zip(kinds, refs[:len(kinds)])), refs[len(kinds):]
        rs = pl.ds(g * rows, rows)

        def values(c):
            cs = pl.ds(c * block, block)
            mask_C = c * block + jnp.arange(block) < F

            def load(name):
                ref, kind = ins[name], kinds[name]
                if kind == "token":
                    return ref[rs][:, None]
                if kind == "channel":
                    return plt.load(ref.at[cs], mask=mask_C, other=0)[None, :]
                if jnp.dtype(ref.dtype).itemsize > 1:
                    return plt.load(ref.at[rs, cs], mask=mask_C[None, :], other=0) \
                        .astype(jnp.float32)
                # Triton has no fill value of an 8-bit float: the masked lanes are zeroed after
                x = plt.load(ref.at[rs, cs], mask=mask_C[None, :]).astype(jnp.float32)
                return jnp.where(mask_C[None, :], x, 0.0)
            return compute(**{name: load(name) for name in kinds}), mask_C

        if n_chunks == 1:
            chunks, mask_C = values(0)
            amaxes = [jnp.max(jnp.abs(x), axis=1) for x in chunks]
        else:  # the rows' maxima first, then their quantization (read again, from L2)
            def body(c, amaxes):
                chunks, _ = values(c)
                return tuple(jnp.maximum(m, jnp.max(jnp.abs(x), axis=1))
                             for m, x in zip(amaxes, chunks))
            amaxes = jax.lax.fori_loop(0, n_chunks, body,
                                       (jnp.zeros((rows,), jnp.float32),) * n_out)
        scales = [_scale(m, dtype) for m in amaxes]

        def store(c, chunks, mask_C):
            for j, (x, s) in enumerate(zip(chunks, scales)):
                plt.store(outs[2 * j].at[rs, pl.ds(c * block, block)],
                          (x / s[:, None]).astype(dtype), mask=mask_C[None, :])

        if n_chunks == 1:
            store(0, chunks, mask_C)
        else:
            def body(c, carry):
                store(c, *values(c))
                return carry
            jax.lax.fori_loop(0, n_chunks, body, 0)
        for j, s in enumerate(scales):
            outs[2 * j + 1][rs] = s
    return kernel


# The kernels' launch shapes, forward and backward: (rows a group, a power of two dividing
# the tokens, else 1; columns a chunk, a power of two: a row wider than one chunk is read
# twice, its maximum first; warps a program; programs at most, 0: one a group, else each
# takes several groups in turn; Triton's pipeline stages). experiments/bench_fp8_mlp.py times
# the choices (experiments/results/fp8_mlp_kernels_h200.json; fewer programs and more
# stages: fp8_mlp_kernels_programs_h200.json, fp8_mlp_kernels_stages_h200.json).
LAUNCH = ((2, 1024, 4, 0, 1), (1, 1024, 4, 0, 1))


def grid_of(groups: int, programs: int) -> int:
    """How many programs take ``groups`` groups of rows: the most, at most ``programs`` (0:
    no bound), that divides ``groups``, so that each takes as many."""
    if programs <= 0 or programs >= groups:
        return groups
    return max(d for d in range(1, programs + 1) if groups % d == 0)


def launch_grid(T: int, rows: int, programs: int) -> tuple[int, int]:
    """``(rows a group, programs)`` of a launch over ``T`` rows: ``rows`` where it divides
    ``T``, else 1."""
    rows = rows if T % rows == 0 else 1
    return rows, grid_of(T // rows, programs)


def _call_rows(compute, args: dict, kinds: dict, n_out, dtype, interpret, launch):
    pl, plt = _pallas()
    T, F = next(v for k, v in args.items() if kinds[k] == "row").shape
    rows, block, num_warps, programs, num_stages = launch
    block = min(pl.next_power_of_2(F), block)
    rows, grid = launch_grid(T, rows, programs)
    out_shape = tuple(s for _ in range(n_out) for s in
                      (jax.ShapeDtypeStruct((T, F), dtype),
                       jax.ShapeDtypeStruct((T,), jnp.float32)))
    return pl.pallas_call(
        _row_kernel(compute, kinds, n_out, F, rows, block, dtype, T // rows // grid, grid),
        out_shape=out_shape, grid=(grid,), interpret=interpret, name="fp8_gated_rows",
        compiler_params=None if interpret else plt.CompilerParams(num_warps=num_warps,
                                                                  num_stages=num_stages),
    )(*(args[k] for k in kinds))


def _gate_quantize_pallas(a_raw, b_raw, row_T, col_a, col_b, act, with_products,
                          interpret=False):
    def compute(a_raw, b_raw, row, col_a, col_b):
        a, b = a_raw * row * col_a, b_raw * row * col_b
        return (_act_and_grad(a, act)[0] * b,) + ((a_raw, b_raw) if with_products else ())
    kinds = dict(a_raw="row", b_raw="row", row="token", col_a="channel", col_b="channel")
    return _call_rows(compute, dict(a_raw=a_raw, b_raw=b_raw, row=row_T, col_a=col_a,
                                    col_b=col_b), kinds, 3 if with_products else 1, E4M3,
                      interpret, LAUNCH[0])


def _gate_grad_quantize_pallas(dh_raw, dh_row, dh_col, a_raw, b_raw, row_a, row_b, col_a,
                               col_b, pre_a, pre_b, act, dtype, interpret=False):
    args = dict(dh_raw=dh_raw, dh_row=dh_row, dh_col=dh_col, a_raw=a_raw, b_raw=b_raw,
                row_a=row_a, row_b=row_b, col_a=col_a, col_b=col_b, pre_a=pre_a, pre_b=pre_b)
    args = {k: v for k, v in args.items() if v is not None}
    kinds = {k: "row" if k in ("dh_raw", "a_raw", "b_raw") else
             "token" if k in ("dh_row", "row_a", "row_b") else "channel" for k in args}

    def compute(dh_raw, dh_row, a_raw, b_raw, row_a, row_b, col_a, col_b, dh_col=None,
                pre_a=None, pre_b=None):
        a, b = a_raw * row_a * col_a, b_raw * row_b * col_b
        dh = dh_raw * dh_row if dh_col is None else dh_raw * dh_row * dh_col
        f, f_grad = _act_and_grad(a, act)
        return (dh * b * f_grad * (col_a if pre_a is None else pre_a),
                dh * f * (col_b if pre_b is None else pre_b))
    return _call_rows(compute, args, kinds, 2, dtype, interpret, LAUNCH[1])


# ----------------------------------------------------------------------------- the two steps


def _kernels(kernels: str | None) -> str:
    kernels = kernels or KERNELS
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels is one of {', '.join(KERNEL_CHOICES)}, not {kernels!r}")
    if kernels == "auto":
        return "pallas" if jax.devices()[0].platform in ("gpu", "cuda") else "xla"
    return kernels


def gate_quantize(a_raw_TxF, b_raw_TxF, row_T, col_a_F, col_b_F, act: str,
                  kernels: str | None = None, with_products: bool = False):
    """``(q, scale_T)``: ``act(a) * b`` with ``a = a_raw * row * col_a`` (and ``b`` alike),
    quantized to e4m3 with one scale per row, as ``fp8.quantize`` would quantize it (computed
    in float32 from the raw products, with no rounding in between). ``with_products``:
    ``(q, scale_T, qa, sa_T, qb, sb_T)``, the raw products themselves quantized to e4m3 per row
    as well (``a_raw ≈ qa * sa``), read in the same pass."""
    kind = _kernels(kernels)
    if kind == "xla":
        return _gate_quantize_xla(a_raw_TxF, b_raw_TxF, row_T, col_a_F, col_b_F, act,
                                  with_products)
    return _gate_quantize_pallas(a_raw_TxF, b_raw_TxF, row_T, col_a_F, col_b_F, act,
                                 with_products, interpret=kind == "interpret")


def gate_grad_quantize(dh_raw_TxF, dh_row_T, dh_col_F, a_raw_TxF, b_raw_TxF, row_a_T, row_b_T,
                       col_a_F, col_b_F, pre_a_F, pre_b_F, act: str, dtype=E4M3,
                       kernels: str | None = None):
    """``(qa, sa_T, qb, sb_T)``: the gradients of ``act(a) * b`` for ``a`` and ``b`` (``a =
    a_raw * row_a * col_a``, ``b`` alike; ``a_raw`` bf16, or e4m3 as :func:`gate_quantize`
    quantized it) given its gradient ``dh = dh_raw * dh_row * dh_col``, times ``pre_a``
    (``pre_b``) on their channels, each quantized to ``dtype`` per row. ``dh_col`` None: ones;
    ``pre_a`` (``pre_b``) None: ``col_a`` (``col_b``), the one-copy backward's (the forward
    copy's scales lie on its contraction axis)."""
    kind = _kernels(kernels)
    args = (dh_raw_TxF, dh_row_T, dh_col_F, a_raw_TxF, b_raw_TxF, row_a_T, row_b_T, col_a_F,
            col_b_F, pre_a_F, pre_b_F, act, dtype)
    if kind == "xla":
        return _gate_grad_quantize_xla(*args)
    return _gate_grad_quantize_pallas(*args, interpret=kind == "interpret")


RESIDUALS = ("bf16", "fp8")


class FrozenMlp:
    """The MLP stages of ``block`` for a layer whose ``w_gate``, ``w_up`` and ``w_down`` are
    :class:`Fp8Weight` (``block.layer_forward(..., mlp=)``, ``block.layer_backward(...,
    mlp=)``): ``forward(x2) -> (y, named)`` keeps ``a`` and ``b``, the raw gate and up
    products, and ``sa`` and ``sb``, their row scales (``[B, S, 1]``); ``backward(named, dy)
    -> dx2`` takes them back. ``residuals="fp8"`` keeps the products in e4m3, quantized per
    token by the forward's kernel (half the bytes, and half what the backward's kernel reads);
    ``"bf16"`` as the GEMMs wrote them. No weight gradient: the weights are constants."""

    def __init__(self, cfg, lp: dict, kernels: str | None = None, residuals: str = "bf16"):
        if not supports(cfg):
            raise ValueError(f"the fused fp8 MLP takes a gated MLP ({', '.join(ACTIVATIONS)}) "
                             f"without sandwich norms, not hidden_act={cfg.hidden_act!r}"
                             f"{' with sandwich norms' if cfg.sandwich_norm else ''}")
        if residuals not in RESIDUALS:
            raise ValueError(f"residuals is one of {', '.join(RESIDUALS)}, not {residuals!r}")
        self.act, self.kernels, self.residuals = cfg.hidden_act, kernels, residuals
        self.w_gate, self.w_up, self.w_down = lp["w_gate"], lp["w_up"], lp["w_down"]
        for w in (self.w_gate, self.w_up, self.w_down):
            if not isinstance(w, Fp8Weight):
                raise ValueError("the fused fp8 MLP takes a layer's fp8 copies, not dense "
                                 "weights")

    @staticmethod
    def saves(remat_saved: tuple[str, ...]) -> tuple[str, ...]:
        """What it keeps beside ``block.SAVED[remat]``: the raw products' row scales, where
        those products are kept."""
        return ("sa", "sb") if "a" in remat_saved else ()

    def forward(self, x2_BxSxD):
        B, S, D = x2_BxSxD.shape
        like = x2_BxSxD.dtype
        xq, sx = fp8.quantize(x2_BxSxD.reshape(-1, D), axis=1)
        a_raw = fp8.tn_product(xq, self.w_gate.fwd_OxD, like)
        b_raw = fp8.tn_product(xq, self.w_up.fwd_OxD, like)
        lean = self.residuals == "fp8"
        hq, sh, *products = gate_quantize(a_raw, b_raw, sx[:, 0], self.w_gate.fwd_scale_O,
                                          self.w_up.fwd_scale_O, self.act, self.kernels,
                                          with_products=lean)
        y = fp8.tn_product(hq, self.w_down.fwd_OxD, like).astype(jnp.float32) \
            * sh[:, None] * self.w_down.fwd_scale_O[None, :]
        if lean:  # a_raw ≈ qa * sa: the row scales fold into the products' own
            qa, sa, qb, sb = products
            a_raw, b_raw, sa, sb = qa, qb, sa * sx[:, 0], sb * sx[:, 0]
        else:
            sa = sb = sx[:, 0]
        F = a_raw.shape[-1]
        return y.reshape(B, S, D).astype(like), {"a": a_raw.reshape(B, S, F),
                                                 "b": b_raw.reshape(B, S, F),
                                                 "sa": sa.reshape(B, S, 1),
                                                 "sb": sb.reshape(B, S, 1)}

    @staticmethod
    def _ones_or(pre, F):
        """``pre`` of ``fp8.grad_scales`` as the kernel takes it: None (one copy: the channel
        scales are the forward copy's, which it has) or, with the backward's own copy, ones."""
        return None if pre is not None else jnp.ones((F,), jnp.float32)

    def backward(self, named: dict, dy_BxSxD):
        B, S, D = dy_BxSxD.shape
        like = dy_BxSxD.dtype
        a_raw, b_raw = (named[k].reshape(B * S, -1) for k in ("a", "b"))
        sa_T, sb_T = (named[k].reshape(-1) for k in ("sa", "sb"))
        F = a_raw.shape[-1]
        dq, sd = fp8.quantize_grad(dy_BxSxD.reshape(-1, D), self.w_down)
        dh_raw = fp8.grad_product(dq, self.w_down, like)
        dh_col = fp8.grad_scales(self.w_down)[1]
        pre_a, post_a = fp8.grad_scales(self.w_gate)
        pre_b, post_b = fp8.grad_scales(self.w_up)
        qa, sa, qb, sb = gate_grad_quantize(
            dh_raw, sd[:, 0], dh_col, a_raw, b_raw, sa_T, sb_T, self.w_gate.fwd_scale_O,
            self.w_up.fwd_scale_O, self._ones_or(pre_a, F), self._ones_or(pre_b, F), self.act,
            GRAD_DTYPES[self.w_gate.grad_dtype], self.kernels)
        dx = fp8.grad_product(qa, self.w_gate, like).astype(jnp.float32) * sa[:, None]
        if post_a is not None:
            dx = dx * post_a[None, :]
        dx_b = fp8.grad_product(qb, self.w_up, like).astype(jnp.float32) * sb[:, None]
        if post_b is not None:
            dx_b = dx_b * post_b[None, :]
        return (dx + dx_b).reshape(B, S, D).astype(like)

