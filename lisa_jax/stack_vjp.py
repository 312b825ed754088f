"""The layer stack with a hand-written backward: weight gradients only for the sampled layers.

Plain autodiff of a scanned stack computes (or at least allocates) a weight gradient for every
layer, even when only γ of L layers train; masking the result afterwards costs as much as full
fine-tuning. ``lisa_stack`` is a ``jax.custom_vjp`` over the whole stack instead:

* forward: a scan over all L layers, saving per layer only what the backward needs (see
  ``REMAT_MODES``);
* backward: a reverse scan that always propagates the activation gradient, and computes the
  weight gradients of a layer only when that layer holds a slot (``lax.cond``), writing them
  into a ``γ``-slot gradient buffer carried through the scan. No ``L``-sized gradient exists.

``lisa_layer_list`` is the same over per-layer weights (``lisa_jax.layer_list``): the loop is
unrolled and each layer's weight gradients are computed under ``lax.cond`` on its slot.

The math is the layer of ``lisa_jax.model.decoder_layer``, whose building blocks it reuses, with
its backward written out by hand (RMSNorm, RoPE and SwiGLU are cheap and recomputed; attention
is differentiated with ``jax.vjp`` of ``model.attention``, which runs its forward once more in
the backward, a few percent of a layer at training lengths; under ``remat="full"`` that one
forward also serves the recomputed layer).

Shapes: B batch, S sequence, D hidden, F MLP width, N query heads, K kv heads, H head dim,
L layers, G active slots (γ).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from lisa_jax import model as M

# What the forward saves per layer, and so what the backward recomputes:
#   "none": the layer input and every matmul output (q, k, v, mid-residual, gate, up); only
#           elementwise ops and the attention forward are recomputed. Fastest.
#   "mlp":  the layer input, q, k, v and the mid-residual; the backward recomputes gate and up.
#   "full": only the layer input; the backward recomputes the whole layer forward.
REMAT_MODES = ("none", "mlp", "full")

# How the reverse pass is organized: "segments" (activation-only loops between the sampled
# layers) or "scan_cond" (one scan, weight gradients under lax.cond into a carried slot
# buffer). Both give the same gradients; the environment variable exists for benchmarks.
BACKWARD = os.environ.get("LISA_JAX_BACKWARD", "segments")


def _rms_stats(x, eps):
    """The normalized input (float32) and 1/rms, shared by RMSNorm's forward and backward."""
    x32 = x.astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return x32 * r, r


def _rms_backward(n32, r, scale, dy):
    """Input cotangent (float32) of ``scale * n`` with ``n = x * r`` (its scale's gradient is
    ``weight_grads_from_parts``'s)."""
    dn = dy.astype(jnp.float32) * scale.astype(jnp.float32)
    return r * (dn - n32 * jnp.mean(dn * n32, axis=-1, keepdims=True))


def _attention_vjp(cfg, q, k, v):
    """The attention output and its pullback (one attention forward, kept for the backward)."""
    impl = M.attention_impl(cfg)
    return jax.vjp(lambda q_, k_, v_: M.attention(q_, k_, v_, None, impl), q, k, v)


def _layer_forward(cfg, lp, h, cos, sin, remat, with_pullback=False):
    """``model.decoder_layer`` that also returns the residuals ``remat`` keeps.

    ``with_pullback``: also return the attention pullback (the backward's recompute uses it,
    so that attention runs forward once there, not twice)."""
    B, S, D = h.shape
    x1 = M.rms_norm(h, lp["attn_norm"], cfg.rms_norm_eps)
    q, k, v = M.qkv(cfg, lp, x1, cos, sin)
    if with_pullback:
        o, attn_pullback = _attention_vjp(cfg, q, k, v)
    else:
        o = M.attention(q, k, v, None, M.attention_impl(cfg))
    hm = h + o.reshape(B, S, -1) @ lp["wo"]
    x2 = M.rms_norm(hm, lp["mlp_norm"], cfg.rms_norm_eps)
    a, b = x2 @ lp["w_gate"], x2 @ lp["w_up"]
    out = hm + (jax.nn.silu(a) * b) @ lp["w_down"]
    saved = {"none": (h, q, k, v, hm, a, b), "mlp": (h, q, k, v, hm), "full": (h,)}[remat]
    if with_pullback:
        return out, saved, (o, attn_pullback)
    return out, saved


def _recompute(cfg, lp, saved, cos, sin, remat):
    """The full residual set (h, q, k, v, hm, a, b) from what ``remat`` saved, and the
    attention output and pullback: from the recomputed forward under ``remat="full"``, else
    from a fresh attention forward on the saved q, k, v."""
    if remat == "full":
        # The layer's own forward; its unused output projection is dead code XLA removes.
        _, residuals, attn = _layer_forward(cfg, lp, saved[0], cos, sin, "none",
                                            with_pullback=True)
        return residuals, attn
    if remat == "none":
        residuals = saved
    else:
        h, q, k, v, hm = saved
        x2 = M.rms_norm(hm, lp["mlp_norm"], cfg.rms_norm_eps)
        residuals = h, q, k, v, hm, x2 @ lp["w_gate"], x2 @ lp["w_up"]
    return residuals, _attention_vjp(cfg, *residuals[1:4])


def _contract(x_BxSxI, dy_BxSxO, dtype):
    """Weight gradient ``x^T dy`` summed over batch and sequence, accumulated in float32."""
    return jnp.einsum("bsi,bso->io", x_BxSxI, dy_BxSxO,
                      preferred_element_type=jnp.float32).astype(dtype)


def _layer_backward(cfg, lp, saved, cos, sin, dy, remat):
    """(dh, parts) of one layer for output cotangent ``dy``: the input's cotangent, and what
    ``weight_grads_from_parts`` contracts into the weight gradients, which a caller computes
    for sampled layers only."""
    (h, q, k, v, hm, a, b), (o, attn_pullback) = _recompute(cfg, lp, saved, cos, sin, remat)
    B, S, D = h.shape
    dt = h.dtype
    # MLP: out = hm + (silu(a) * b) @ w_down.
    dm = dy @ lp["w_down"].T
    a32, b32, dm32 = a.astype(jnp.float32), b.astype(jnp.float32), dm.astype(jnp.float32)
    sig = jax.nn.sigmoid(a32)
    silu = a32 * sig
    da = (dm32 * b32 * sig * (1 + a32 * (1 - sig))).astype(dt)
    db = (dm32 * silu).astype(dt)
    dx2 = da @ lp["w_gate"].T + db @ lp["w_up"].T
    n2, r2 = _rms_stats(hm, cfg.rms_norm_eps)
    dhm_norm = _rms_backward(n2, r2, lp["mlp_norm"], dx2)
    dhm = dy + dhm_norm.astype(dt)
    # Attention: hm = h + attn(q, k, v) @ wo.
    do = (dhm @ lp["wo"].T).reshape(B, S, cfg.num_heads, cfg.head_dim)
    dq, dk, dv = attn_pullback(do)
    # RoPE is a rotation: its transpose is the rotation by the negative angle.
    dq = M.apply_rope(dq, cos, -sin).reshape(B, S, -1)
    dk = M.apply_rope(dk, cos, -sin).reshape(B, S, -1)
    dv = dv.reshape(B, S, -1)
    dx1 = dq @ lp["wq"].T + dk @ lp["wk"].T + dv @ lp["wv"].T
    n1, r1 = _rms_stats(h, cfg.rms_norm_eps)
    dh_norm = _rms_backward(n1, r1, lp["attn_norm"], dx1)
    dh = dhm + dh_norm.astype(dt)

    # What the weight gradients are made of: tensors the activation backward holds anyway
    # (saved or matmul inputs and outputs); the elementwise rest is derived from them in
    # weight_grads_from_parts, so that a caller computing weight gradients conditionally
    # (``lax.cond``) pays nothing for frozen layers. Unused, and removed by XLA, otherwise.
    parts = dict(h=h, hm=hm, a=a, b=b, dq=dq, dk=dk, dv=dv, o=o.reshape(B, S, -1), dhm=dhm,
                 da=da, db=db, dy=dy, dx1=dx1, dx2=dx2)
    return dh, parts


def weight_grads_from_parts(cfg, lp, parts):
    """One layer's weight gradients from its backward's ``parts`` (``lp``: the layer's
    parameters; only its norm scales are read)."""
    dt = parts["h"].dtype
    n1, _ = _rms_stats(parts["h"], cfg.rms_norm_eps)
    n2, _ = _rms_stats(parts["hm"], cfg.rms_norm_eps)
    x1 = lp["attn_norm"] * n1.astype(dt)
    x2 = lp["mlp_norm"] * n2.astype(dt)
    m = (jax.nn.silu(parts["a"].astype(jnp.float32)) * parts["b"].astype(jnp.float32)).astype(dt)

    def norm_grad(dx, n32, like):  # sum over tokens of dRMSNorm/dscale
        return jnp.sum(dx.astype(jnp.float32) * n32, axis=(0, 1)).astype(like.dtype)
    g = {
        "attn_norm": norm_grad(parts["dx1"], n1, lp["attn_norm"]),
        "wq": _contract(x1, parts["dq"], lp["wq"].dtype),
        "wk": _contract(x1, parts["dk"], lp["wk"].dtype),
        "wv": _contract(x1, parts["dv"], lp["wv"].dtype),
        "wo": _contract(parts["o"], parts["dhm"], lp["wo"].dtype),
        "mlp_norm": norm_grad(parts["dx2"], n2, lp["mlp_norm"]),
        "w_gate": _contract(x2, parts["da"], lp["w_gate"].dtype),
        "w_up": _contract(x2, parts["db"], lp["w_up"].dtype),
        "w_down": _contract(m, parts["dy"], lp["w_down"].dtype),
    }
    if cfg.attention_bias:
        for name in ("bq", "bk", "bv"):
            g[name] = jnp.sum(parts["d" + name[1]], axis=(0, 1),
                              dtype=jnp.float32).astype(lp[name].dtype)
    return g


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def lisa_stack(cfg, remat, active_GxP, layers_LxP, slot_L, h_BxSxD, cos, sin):
    """Run all ``L`` layers; differentiable in ``h`` and in the ``G`` sampled slices only.

    ``active_GxP``: the sampled layers' parameters (each leaf ``[G, ...]``), equal in value to
    ``layers_LxP`` at their indices; ``slot_L[l]`` is the slot of layer ``l`` or -1 when it is
    frozen. The cotangent of ``active_GxP`` holds the sampled layers' weight gradients;
    ``layers_LxP`` gets none.
    """
    return _stack_forward(cfg, remat, layers_LxP, h_BxSxD, cos, sin)[0]


def _stack_forward(cfg, remat, layers_LxP, h, cos, sin):
    def body(h, lp):
        return _layer_forward(cfg, lp, h, cos, sin, remat)
    return jax.lax.scan(body, h, layers_LxP)


def _lisa_stack_fwd(cfg, remat, active_GxP, layers_LxP, slot_L, h, cos, sin):
    out, saved = _stack_forward(cfg, remat, layers_LxP, h, cos, sin)
    # active_GxP is not kept: its values are those of layers_LxP at the sampled indices; only
    # its shapes matter for the gradient buffer.
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), active_GxP)
    return out, (layers_LxP, slot_L, saved, cos, sin, shapes)


def _layer_at(tree, index):
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, 0, keepdims=False),
                        tree)


def _bwd_segments(cfg, remat, res, dy):
    """The reverse pass as ``G + 1`` activation-only loops split at the sampled layers.

    Between two sampled layers a ``fori_loop`` (dynamic bounds) runs the activation backward
    only; each sampled layer's backward, weight gradients included, runs once outside any loop
    with its slot known statically. Nothing is carried or selected per layer, so no ``lax.cond``
    and no gradient buffer passes through the loop. Needs slot ``j`` to hold the ``j``-th
    lowest sampled layer (``slot_of_layer`` of sorted indices does).
    """
    layers_LxP, slot_L, saved, cos, sin, shapes = res
    G = jax.tree.leaves(shapes)[0].shape[0] if jax.tree.leaves(shapes) else 0
    L = slot_L.shape[0]

    def down(dh, hi, lo):  # layers hi-1 .. lo, activation gradient only
        # One layer per iteration. Each iteration of this loop (its trip count is data) costs
        # a device-to-host round trip on a GPU; two layers per iteration saved 1 ms of 225 at
        # 7B but kept both layers' temporaries alive (+0.36 GiB at the peak).
        def body(i, dh):
            layer = hi - 1 - i
            return _layer_backward(cfg, _layer_at(layers_LxP, layer), _layer_at(saved, layer),
                                   cos, sin, dh, remat)[0]
        return jax.lax.fori_loop(0, hi - lo, body, dh)

    dh, hi, per_slot = dy, jnp.int32(L), [None] * G
    for j in reversed(range(G)):
        layer = jnp.argmax(slot_L == j).astype(jnp.int32)
        dh = down(dh, hi, layer + 1)
        lp = _layer_at(layers_LxP, layer)
        dh, parts = _layer_backward(cfg, lp, _layer_at(saved, layer), cos, sin, dh, remat)
        per_slot[j] = weight_grads_from_parts(cfg, lp, parts)
        hi = layer
    dh = down(dh, hi, jnp.int32(0))
    grads = {name: (jnp.stack([g[name] for g in per_slot]) if G else
                    jnp.zeros(shapes[name].shape, shapes[name].dtype)) for name in shapes}
    return grads, None, None, dh, None, None


def _lisa_stack_bwd(cfg, remat, res, dy):
    if BACKWARD == "segments":
        return _bwd_segments(cfg, remat, res, dy)
    return _bwd_scan_cond(cfg, remat, res, dy)


def _bwd_scan_cond(cfg, remat, res, dy):
    """The reverse pass as one scan over all layers, weight gradients under ``lax.cond``."""
    layers_LxP, slot_L, saved, cos, sin, shapes = res
    grads0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    num_slots = jax.tree.leaves(shapes)[0].shape[0] if jax.tree.leaves(shapes) else 0

    def body(carry, xs):
        dy, grads = carry
        lp, slot, saved_l = xs
        dh, parts = _layer_backward(cfg, lp, saved_l, cos, sin, dy, remat)
        if num_slots:
            def write(grads):
                g = weight_grads_from_parts(cfg, lp, parts)
                return {name: jax.lax.dynamic_update_index_in_dim(grads[name], g[name], slot, 0)
                        for name in grads}
            grads = jax.lax.cond(slot >= 0, write, lambda grads: grads, grads)
        return (dh, grads), None

    (dh, grads), _ = jax.lax.scan(body, (dy, grads0), (layers_LxP, slot_L, saved), reverse=True)
    return grads, None, None, dh, None, None


lisa_stack.defvjp(_lisa_stack_fwd, _lisa_stack_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def lisa_layer_list(cfg, remat, active_GxP, layers, slot_L, h_BxSxD, cos, sin):
    """``lisa_stack`` for layers held as a sequence of ``L`` per-layer trees (one array per
    layer weight, ``lisa_jax.layer_list``), the loop over them unrolled.

    Each layer's weights are whole arrays, so no library call (cuBLAS, cuDNN) needs a copy of a
    slice, which the stacked layout costs on a GPU. The backward computes every layer's weight
    gradients under ``lax.cond`` on its slot and writes them into the ``G``-slot buffer.
    """
    return _list_forward(cfg, remat, layers, h_BxSxD, cos, sin)[0]


def _list_forward(cfg, remat, layers, h, cos, sin):
    saved = []
    for lp in layers:
        h, s = _layer_forward(cfg, lp, h, cos, sin, remat)
        saved.append(s)
    return h, saved


def _lisa_layer_list_fwd(cfg, remat, active_GxP, layers, slot_L, h, cos, sin):
    out, saved = _list_forward(cfg, remat, layers, h, cos, sin)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), active_GxP)
    return out, (layers, slot_L, saved, cos, sin, shapes)


def _lisa_layer_list_bwd(cfg, remat, res, dy):
    layers, slot_L, saved, cos, sin, shapes = res
    grads = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    num_slots = jax.tree.leaves(shapes)[0].shape[0] if jax.tree.leaves(shapes) else 0
    # The branch reads only the norm scales' values; the other weights enter by dtype alone.
    dtypes = {name: jax.ShapeDtypeStruct(x.shape, x.dtype) for name, x in layers[0].items()}

    def write(grads, parts, norms, slot):
        g = weight_grads_from_parts(cfg, {**dtypes, **norms}, parts)
        return {name: jax.lax.dynamic_update_index_in_dim(grads[name], g[name], slot, 0)
                for name in grads}

    def skip(grads, parts, norms, slot):
        return grads
    for layer in reversed(range(len(layers))):
        lp = layers[layer]
        # The unrolled program lets XLA schedule any layer's recompute early, all of them
        # alive at once; the barrier makes each layer wait for its output cotangent.
        saved_l, dy = jax.lax.optimization_barrier((saved[layer], dy))
        dy, parts = _layer_backward(cfg, lp, saved_l, cos, sin, dy, remat)
        if num_slots:
            norms = {name: lp[name] for name in ("attn_norm", "mlp_norm")}
            grads = jax.lax.cond(slot_L[layer] >= 0, write, skip, grads, parts, norms,
                                 slot_L[layer])
    return grads, None, None, dy, None, None


lisa_layer_list.defvjp(_lisa_layer_list_fwd, _lisa_layer_list_bwd)


def slot_of_layer(active_G, num_layers: int):
    """``[L]`` int32: the slot holding each layer, -1 where the layer is frozen."""
    slots = jnp.full((num_layers,), -1, jnp.int32)
    return slots.at[active_G].set(jnp.arange(active_G.shape[0], dtype=jnp.int32))
