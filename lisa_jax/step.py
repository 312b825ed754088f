"""Train steps: LISA (weight gradients only for the sampled layers), full fine-tuning, LoRA.

Every step is ``step(params, opt_state, batch) -> (params, opt_state, metrics)``, jitted with the
parameters and optimizer state donated, so the update happens in place. ``batch`` is a dict with
``input_ids [B, S]`` and optionally ``loss_mask [B, S]`` (1 where the token is a target) and
``segment_ids [B, S]`` (packed rows: 1, 2, ... per example, 0 for padding; attention stays
within an example and positions restart at each).

The LISA step
-------------
1. ``tx.prepare(state, params)`` resamples the active layers when a period starts (an executable
   of its own run before the step for a fixed ``n_active``; for ``probs`` the loop calls
   ``tx.maybe_resample`` first).
2. The loss is differentiated with respect to the *trainable view* only: the always-trained
   leaves and the ``G`` sampled slices of every layer leaf as ``[G, ...]`` arrays. The layer
   stack is ``stack_vjp.lisa_layers``, whose backward computes weight gradients for the sampled
   layers alone, so no ``L``-sized gradient tree is ever built.
3. The sampled layers' values are gathered once the gradients exist (so that they are not alive
   through the backward); ``tx.update_view`` runs the inner optimizer on the view, and the
   layout writes the sampled slices back into the (donated) parameters.

The same step takes either layer layout (``lisa_jax.layout``, decided when it is traced); on a
GPU one array per layer weight is faster (no copies of stacked slices) and what the trainer uses
there.

The executable depends only on the shapes, so each active-layer count compiles once; a new sample
of the same size reuses it.

Module-level sampling (``lisa(granularity="attn_mlp" | "matrix")``): each module group has its
own ``γ`` sampled layers; the view's leaves are gathered at their group's layers and the stack
is ``stack_vjp.lisa_layers_grouped``, whose backward computes a weight gradient only where
that (layer, module) is sampled. Shapes stay fixed, so one executable serves every sample.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from lisa_jax import layout
from lisa_jax import lora as lora_lib
from lisa_jax import model as M
from lisa_jax import ops
from lisa_jax.block import REMAT_MODES
from lisa_jax.stack_vjp import lisa_layers, lisa_layers_grouped

# Tokens per chunk of the LM loss: one chunk of float32 logits (4096 x vocab) is alive at a
# time; the backward recomputes each chunk's logits, one extra head matmul in all.
LOSS_CHUNK = 4096


def lm_loss_from_hidden(cfg: M.LlamaConfig, final_norm, head_DxV, h_BxSxD, input_ids_BxS,
                        loss_mask_BxS=None, chunk: int | None = LOSS_CHUNK):
    """Next-token loss from the last hidden states, computing logits ``chunk`` tokens at a time.

    Only one chunk of float32 logits is alive at once (the backward recomputes them), which at
    a large vocabulary saves much memory against materializing ``[B, S, V]``. Returns
    ``(mean loss, number of target tokens)``.
    """
    B, S, D = h_BxSxD.shape
    x = ops.rms_norm(h_BxSxD[:, :-1], final_norm, cfg.rms_norm_eps, cfg.norm_plus_one)
    x = x.reshape(-1, D)
    targets = input_ids_BxS[:, 1:].reshape(-1)
    if loss_mask_BxS is None:
        w = jnp.ones(targets.shape, jnp.float32)
    else:
        w = loss_mask_BxS[:, 1:].reshape(-1).astype(jnp.float32)
    T = x.shape[0]

    def nll_sum(x_c, t_c, w_c):
        # Logits stay in the compute dtype; token_nll upcasts inside its fused reductions.
        logits = x_c @ head_DxV
        if cfg.final_softcap is not None:  # Gemma: soft-capped, as model.logits
            logits = cfg.final_softcap * jnp.tanh(logits.astype(jnp.float32) / cfg.final_softcap)
        return jnp.sum(ops.token_nll(logits, t_c) * w_c)

    if chunk is None or T <= chunk:
        total = nll_sum(x, targets, w)
    else:
        pad = (-T) % chunk
        xs = (jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, chunk, D),
              jnp.pad(targets, (0, pad)).reshape(-1, chunk),
              jnp.pad(w, (0, pad)).reshape(-1, chunk))
        body = jax.checkpoint(lambda c, xs_: (c + nll_sum(*xs_), None))
        total = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)[0]
    n = jnp.sum(w)
    return total / jnp.maximum(n, 1.0), n


def _embed_and_rope(cfg, embed, batch, h_sharding=None):
    """Embeddings, RoPE tables and the attention mask (None, or ``ops.Segments`` when the
    batch is packed: ``segment_ids`` numbers each row's examples)."""
    ids = batch["input_ids"]
    B, S = ids.shape
    positions, mask = ops.positions_and_mask(None, S, B, batch.get("segment_ids"))
    rope = ops.rope_tables(cfg, positions)
    h = M.embed_tokens(cfg, embed, ids)
    if h_sharding is not None:  # several devices: keep the activations split along the batch
        h = jax.lax.with_sharding_constraint(h, h_sharding)
    return h, rope, mask


def plain_loss(cfg: M.LlamaConfig, params, batch, remat="none", loss_chunk=LOSS_CHUNK,
               h_sharding=None):
    """The loss by plain autodiff-able code (full fine-tuning, LoRA, and the reference path)."""
    ids = batch["input_ids"]
    h, rope, mask = _embed_and_rope(cfg, params["embed"], batch, h_sharding)
    h = M.run_layers(cfg, params["layers"], h, rope, mask, remat)
    return lm_loss_from_hidden(cfg, params["final_norm"], M.head_weight(params), h, ids,
                               batch.get("loss_mask"), loss_chunk)


def lisa_loss(cfg: M.LlamaConfig, view, layers, slot_L, batch, remat="none",
              loss_chunk=LOSS_CHUNK,
              h_sharding=None, groups=None, gather=None):
    """The loss as a function of the trainable view; the frozen layers enter as a constant
    (in either layout). ``groups``: module-level sampling (``layout.group_names``; ``slot_L``
    is then ``[N, L]``). ``gather``: each layer's weights gathered a layer ahead
    (``stack_vjp.lisa_layers``)."""
    ids = batch["input_ids"]
    h, (cos, sin), mask = _embed_and_rope(cfg, view["embed"], batch, h_sharding)
    if groups is None:
        h = lisa_layers(cfg, remat, view["layers"], layers, slot_L, h, cos, sin, mask, gather)
    else:
        h = lisa_layers_grouped(cfg, remat, groups, view["layers"], layers, slot_L, h, cos,
                                sin, mask)
    return lm_loss_from_hidden(cfg, view["final_norm"], M.head_weight(view), h, ids,
                               batch.get("loss_mask"), loss_chunk)


def value_and_grad_accumulated(loss_fn, x, batch):
    """``((loss, n_tokens), grads)`` of ``loss_fn(x, batch) -> (mean loss, n_tokens)``.

    A batch whose ``input_ids`` are ``[A, B, S]`` holds ``A`` micro-batches (gradient
    accumulation): they are run one after another under ``lax.scan`` and combined weighted by
    their target-token counts, which gives exactly the gradient of the token-mean loss over the
    whole ``A * B`` batch, with the activation memory of one micro-batch.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if batch["input_ids"].ndim == 2:
        return grad_fn(x, batch)

    def body(carry, micro):
        loss_sum, n_sum, g_sum = carry
        (loss, n), g = grad_fn(x, micro)
        g_sum = jax.tree.map(lambda acc, gi: acc + gi.astype(jnp.float32) * n, g_sum, g)
        return (loss_sum + loss * n, n_sum + n, g_sum), None

    zeros = jax.tree.map(lambda v: jnp.zeros(v.shape, jnp.float32), x)
    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
    (loss_sum, n, g_sum), _ = jax.lax.scan(body, init, batch)
    denom = jnp.maximum(n, 1.0)
    grads = jax.tree.map(lambda gs, v: (gs / denom).astype(v.dtype), g_sum, x)
    return (loss_sum / denom, n), grads


def _jit(step, donate_argnums, shardings):
    """``jax.jit`` of a step; with ``shardings`` (a ``lisa_jax.sharding.StepShardings``) jitted
    with its in/out shardings over a device mesh instead."""
    if shardings is None:
        return jax.jit(step, donate_argnums=donate_argnums)
    return shardings.jit(step, donate_argnums)


def _h_sharding(shardings):
    return None if shardings is None else shardings.activation


def _metrics(loss, n_tokens, grads):
    return {"loss": loss, "tokens": n_tokens, "grad_norm": optax.global_norm(grads)}


def _trained_and_constant(tx, params, opt_state):
    """``(layers, their layout, the trained leaves outside them, the constant ones)``.

    Leaves the transform freezes (``lisa(frozen=...)``) enter the loss as constants: no
    gradient is taken for them (a frozen embedding needs no scatter-add of its rows)."""
    layers = params["layers"]
    rest = {k: v for k, v in params.items() if k != "layers"}
    in_view = tx.view(rest, opt_state)
    const = {k: v for k, v in rest.items() if not jax.tree.leaves(in_view[k])}
    return layers, layout.of(layers), {k: v for k, v in rest.items() if k not in const}, const


def _shape_view(lay, layers, slots: int):
    """Zeros shaped as ``slots`` layers' view (``[slots, ...]`` per layer leaf): the stack's
    backward reads only the shapes of the sampled layers' view."""
    return jax.tree.map(lambda s: jnp.zeros((slots,) + s.shape[1:], s.dtype),
                        lay.template(layers))


def make_lisa_step(cfg: M.LlamaConfig, tx, remat: str = "none",
                   loss_chunk: int | None = LOSS_CHUNK, donate: bool = True,
                   shardings=None) -> Callable:
    """The fast LISA step for a transform made by ``lisa_jax.lisa`` (clipping, if any, is the
    transform's: ``lisa(..., clip_norm=c)`` clips by the norm of the trained gradients).

    ``shardings``: optional ``lisa_jax.sharding.StepShardings`` (several devices, SPMD).
    """
    if remat not in REMAT_MODES:
        raise ValueError(f"unknown remat {remat!r} for the LISA step; use one of "
                         f"{', '.join(REMAT_MODES)}")

    hs = _h_sharding(shardings)
    gather = None if shardings is None else shardings.layer_gather()
    if tx.config.groups is not None:
        return _prepared_first(tx, _jit(_grouped_lisa_step(cfg, tx, remat, loss_chunk, hs),
                                        (0, 1) if donate else (), shardings), donate,
                               shardings)

    def step(params, opt_state, batch):
        layers, lay, rest, const = _trained_and_constant(tx, params, opt_state)
        active = opt_state.active
        slot_L = layout.slot_of_layer(active, cfg.num_layers)
        view = {**rest, "layers": _shape_view(lay, layers, active.shape[0])}
        (loss, n), grads = value_and_grad_accumulated(
            lambda v, b: lisa_loss(cfg, {**const, **v}, layers, slot_L, b, remat, loss_chunk,
                                   hs, gather=gather),
            view, batch)
        grads, active_after = jax.lax.optimization_barrier((grads, active))
        none = dict.fromkeys(const)
        grads = {**grads, **none}
        view = {**rest, **none, "layers": lay.gather(layers, active_after)}
        metrics = _metrics(loss, n, grads)
        # Per sampled layer gradient norm (slot order = sorted active layers): the online
        # importance estimate feeds on it.
        metrics["layer_grad_norms"] = jnp.sqrt(sum(
            jnp.sum(jnp.square(g.astype(jnp.float32)), axis=tuple(range(1, g.ndim)))
            for g in jax.tree.leaves(grads["layers"])))
        updates, opt_state = tx.update_view(grads, opt_state, view)
        view = optax.apply_updates(view, updates)
        return ({**view, **const, "layers": lay.write_back(layers, view["layers"], active)},
                opt_state, metrics)

    return _prepared_first(tx, _jit(step, (0, 1) if donate else (), shardings), donate,
                           shardings)


def _grouped_lisa_step(cfg, tx, remat, loss_chunk, hs):
    """The LISA step with module groups (``lisa(granularity=...)``): as the layer step, each
    layer leaf's view being ``[G, ...]`` at its own group's layers (``active[n]``), the stack
    ``lisa_layers_grouped`` (weight gradients of the sampled modules only). Its
    ``layer_grad_norms`` are ``[N, G]``: per group and slot."""
    def step(params, opt_state, batch):
        layers, lay, rest, const = _trained_and_constant(tx, params, opt_state)
        names = layout.group_names(tx.config.groups, layers)
        active = opt_state.active
        slot_NxL = layout.slot_of_layer(active, cfg.num_layers)
        view = {**rest, "layers": _shape_view(lay, layers, active.shape[1])}
        (loss, n), grads = value_and_grad_accumulated(
            lambda v, b: lisa_loss(cfg, {**const, **v}, layers, slot_NxL, b, remat,
                                   loss_chunk, hs, groups=names),
            view, batch)
        grads, active_after = jax.lax.optimization_barrier((grads, active))
        none = dict.fromkeys(const)
        grads = {**grads, **none}
        view = {**rest, **none, "layers": layout.gather_groups(layers, active_after, names)}
        metrics = _metrics(loss, n, grads)
        metrics["layer_grad_norms"] = jnp.stack([jnp.sqrt(sum(
            jnp.sum(jnp.square(grads["layers"][k].astype(jnp.float32)),
                    axis=tuple(range(1, grads["layers"][k].ndim))) for k in group))
            for group in names])
        updates, opt_state = tx.update_view(grads, opt_state, view)
        view = optax.apply_updates(view, updates)
        return ({**view, **const,
                 "layers": layout.write_back_groups(layers, view["layers"], active, names)},
                opt_state, metrics)
    return step


def _prepared_first(tx, step, donate: bool, shardings):
    """``step`` behind ``tx.prepare`` run as an executable of its own (donating the state).

    Inside the step, the resample's ``lax.cond`` would produce the slots' state as a new
    buffer while the donated one waits for the step's output: two copies of the γ slots'
    moments through the backward pass. Apart, the step updates the state in place."""
    def prepare(opt_state, params):
        template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                layout.stacked_template(params))
        return tx.prepare(opt_state, template)

    donate_state = (0,) if donate else ()
    if shardings is None:
        prepare_jit = jax.jit(prepare, donate_argnums=donate_state)
    else:
        prepare_jit = jax.jit(prepare, donate_argnums=donate_state,
                              in_shardings=(shardings.state, shardings.params),
                              out_shardings=shardings.state)

    def run(params, opt_state, batch):
        if shardings is not None:
            params = jax.device_put(params, shardings.params)
            opt_state = jax.device_put(opt_state, shardings.state)
        return step(params, prepare_jit(opt_state, params), batch)

    jitted = getattr(step, "jitted", step)
    run.lower, run._cache_size = jitted.lower, jitted._cache_size
    run.prepare = prepare_jit
    return run


def make_plain_step(cfg: M.LlamaConfig, tx: optax.GradientTransformation, remat="none",
                    loss_chunk: int | None = LOSS_CHUNK, donate: bool = True,
                    shardings=None) -> Callable:
    """Full fine-tuning (or any optax transform fed a full gradient tree, LISA included).

    Clipping belongs in ``tx``: ``optax.chain(optax.clip_by_global_norm(c), adamw)``."""
    hs = _h_sharding(shardings)

    def step(params, opt_state, batch):
        (loss, n), grads = value_and_grad_accumulated(
            lambda p, b: plain_loss(cfg, p, b, remat, loss_chunk, hs), params, batch)
        metrics = _metrics(loss, n, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    return _jit(step, (0, 1) if donate else (), shardings)


def make_lora_step(cfg: M.LlamaConfig, tx: optax.GradientTransformation, scale: float,
                   remat="none", loss_chunk: int | None = LOSS_CHUNK,
                   donate: bool = True, shardings=None) -> Callable:
    """LoRA: ``state`` is ``(lora_params, opt_state)``; the base parameters stay frozen.

    ``step(params, (lora, opt_state), batch) -> (params, (lora, opt_state), metrics)``; only the
    adapters and their optimizer state are donated.
    """
    hs = _h_sharding(shardings)

    def loss_fn(lora, params, batch):
        layers = lora_lib.apply_lora(params["layers"], lora, scale)
        return plain_loss(cfg, {**params, "layers": layers}, batch, remat, loss_chunk, hs)

    def step(params, lora_state, batch):
        lora, opt_state = lora_state
        (loss, n), grads = value_and_grad_accumulated(
            lambda lo, b: loss_fn(lo, params, b), lora, batch)
        metrics = _metrics(loss, n, grads)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return params, (optax.apply_updates(lora, updates), opt_state), metrics

    return _jit(step, (1,) if donate else (), shardings)


def make_forward(cfg: M.LlamaConfig, loss_chunk: int | None = LOSS_CHUNK) -> Callable:
    """The loss alone (evaluation, and the forward-only benchmark row)."""
    return jax.jit(lambda params, batch: plain_loss(cfg, params, batch, "none", loss_chunk))
