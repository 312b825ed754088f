"""The LISA step with the frozen layers in fp8 and their full-precision weights on the host.

In a LISA period L − γ layers are constants: their forward and activation-gradient GEMMs can
run on fp8 tensor cores (``lisa_jax.fp8``), and their bfloat16 weights need not be on the
device at all. This step keeps on the device:

* the always-trained leaves (embedding, final norm, head) and the γ sampled layers, in the
  parameters' dtype, updated as by ``step.make_lisa_step`` (``tx`` as given: with
  ``master_weights`` inside, with float32 precision);
* one low-precision copy of every frozen layer (``frozen_precision="fp8"``: its matrices as
  :class:`lisa_jax.fp8.Fp8Weight`, norms as they are; ``"bf16"``: a plain copy, the same code
  path with no quantization, for tests and GPUs without fp8). A sampled layer has none: its
  copy would go stale, and it is made when the layer leaves the sample.

The layers' own weights (the *masters*) stay in host memory, one numpy tree per layer. At a
resample the finished period's trained layers come back to the host, those that leave the
trained set are quantized again (``fp8.Fp8Cache``: exactly those), and the new period's layers
go to the device. A master on the host changes only there, so a checkpoint or an export reads
the masters (:meth:`FrozenLisaStep.full_params`).

With ``overlap=True`` (the default) no transfer waits on the resample step: the next period's
sample is a function of the sampler key and the period alone, so it is drawn on the device when
a period starts, and the layers it brings in are sent over the period's last
``prefetch_steps`` calls (default 4), after each call's step is dispatched (the transfer runs beside the
step); the finished period's layers start their copy to the host at the resample and are
written into the masters one call later (``SplitParams.sync``; anything that reads
``split.masters`` or ``full_params`` syncs first). A layer that re-enters before its host copy
is written comes from the device copy. The values are the synchronous path's
(``overlap=False``) bit for bit; the cost is up to γ more layers on the device around a
resample (the incoming ones during the last steps of a period, the outgoing ones during the
first). With ``background_transfers=True`` both directions run in a thread of their own, so
that a copy slower than a step (pageable host memory) holds up neither the dispatch of the next
steps nor the host: the resample waits only for what it still needs.
With ``host_memory="pinned"`` (what the default ``"auto"`` picks where the device has such
memory) the masters are arrays in the device's page-locked host memory (JAX's ``pinned_host``
memory kind) instead of numpy: both directions are then DMA copies that run beside the step,
and a finished period's master is written as soon as its copy is started (reading it waits
for the copy). From pageable memory, starting the copy back to the host holds up the host
until the copy is done, at 7B longer than a step (README, "Frozen layers in fp8").
Page-locked memory cannot be swapped out: the host needs the masters' size free in RAM.

Inside the step every layer's forward and backward is a ``lax.cond`` on its slot: sampled
layers run on their slot of the ``[G, ...]`` view (and get weight gradients), frozen ones on
their copy (activation gradients only). The structure of the arguments never depends on the
sample, so the step compiles once per active-layer count.

fp8 needs fp8 tensor cores (CUDA compute capability 8.9 or later); ``allow_cpu=True`` runs the
same numerics on a CPU, where XLA computes float8 dots by upcasting (slow; for tests).

    >>> import jax, optax, lisa_jax
    >>> from lisa_jax import model as M
    >>> cfg = M.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3,
    ...                     num_heads=4, num_kv_heads=2, head_dim=8)
    >>> params = M.init_params(cfg, jax.random.key(0))
    >>> tx = lisa_jax.lisa(optax.adamw(1e-3), n_active=1, interval=2, key=0)
    >>> opt_state = tx.init(params)
    >>> step = make_frozen_lisa_step(cfg, tx, frozen_precision="fp8", allow_cpu=True)
    >>> split = step.place(params, opt_state)
    >>> batch = {"input_ids": jax.random.randint(jax.random.key(1), (2, 8), 0, 64)}
    >>> for _ in range(3):
    ...     split, opt_state, metrics = step(split, opt_state, batch)
    >>> bool(metrics["loss"] > 0), len(step.full_params(split)["layers"])
    (True, 3)
"""
from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lisa_jax import block, fp8_mlp, layout, ops
from lisa_jax import model as M
from lisa_jax import step as S
from lisa_jax.block import REMAT_MODES
from lisa_jax.fp8 import E4M3, Fp8Cache, Fp8Weight, quantize, quantize_layer

FROZEN_PRECISIONS = ("bf16", "fp8")
# where the masters live: numpy (pageable), the device's page-locked host memory, or (auto)
# the latter where the device has it
HOST_MEMORIES = ("auto", "pageable", "pinned")
# fp8 tensor cores: Ada (8.9), Hopper (9.0) and later.
MIN_COMPUTE_CAPABILITY = (8, 9)


def fp8_unsupported(device=None) -> str | None:
    """Why ``device`` (default: the first) cannot run fp8 GEMMs, or None when it can."""
    device = device or jax.devices()[0]
    if device.platform not in ("gpu", "cuda"):
        return f"a {device.platform} device"
    cc = getattr(device, "compute_capability", None)
    try:
        major, minor = (int(x) for x in str(cc).split(".")[:2])
    except (TypeError, ValueError):
        return None  # not a CUDA compute capability: let XLA decide
    if (major, minor) < MIN_COMPUTE_CAPABILITY:
        return f"{device.device_kind} (compute capability {cc})"
    return None


def check_fp8(device=None, allow_cpu: bool = False) -> None:
    """Raise a one-line ``ValueError`` naming the fix where fp8 GEMMs cannot run;
    ``allow_cpu``: a CPU passes (XLA emulates float8 dots there: for tests)."""
    device = device or jax.devices()[0]
    if allow_cpu and device.platform == "cpu":
        return
    why = fp8_unsupported(device)
    if why is not None:
        raise ValueError(f"--frozen-precision fp8 needs a GPU with fp8 tensor cores (Ada, "
                         f"Hopper or later: compute capability 8.9 and up), not {why}; use "
                         f"--frozen-precision bf16")


# ----------------------------------------------------------------------------- the layer stack


def _num_slots(active_GxP) -> int:
    leaves = jax.tree.leaves(active_GxP)
    return leaves[0].shape[0] if leaves else 0


def _slot(active_GxP, slot):
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, slot, 0, keepdims=False),
                        active_GxP)


# Whether frozen fp8 layers run their MLP as fp8_mlp.FrozenMlp (two fused row kernels between
# its GEMMs) rather than stage by stage (False: kept for comparisons, experiments/bench_fp8.py
# --mlp stages).
FUSED_MLP = True


def _frozen_mlp(cfg, lp, residuals):
    """The fused MLP of a frozen layer's copy ``lp`` (keeping its gate and up products in e4m3
    where ``residuals`` says so), or None (dense copies, other MLPs)."""
    if FUSED_MLP and isinstance(lp.get("w_gate"), Fp8Weight) and fp8_mlp.supports(cfg):
        return fp8_mlp.FrozenMlp(cfg, lp, residuals="fp8" if "a" in block.FP8_SAVED[residuals]
                                 else "bf16")
    return None


# ``residuals`` of the step: the activations a frozen layer keeps in e4m3 (block.FP8_SAVED),
# each with a scale per row as ``fp8.quantize`` makes an activation for a GEMM. The fused MLP's
# forward kernel writes its gate and up products so itself (in the pass that reads them
# anyway); the others are packed after the layer's forward and unpacked before its backward.
RESIDUAL_PRECISIONS = tuple(block.FP8_SAVED)


def _lean_at(remat, residuals) -> tuple[int, ...]:
    """Indices into ``block.SAVED[remat]`` of the activations saved in fp8."""
    kept = block.fp8_saved(remat, residuals)
    return tuple(i for i, n in enumerate(block.SAVED[remat]) if n in kept)


def _packed_at(mlp, lean_at, remat) -> tuple[int, ...]:
    """Of ``lean_at``, the entries a frozen layer packs after its forward: all but the gate and
    up products where its fused MLP (``mlp``) keeps those in fp8 itself."""
    names = block.SAVED[remat]
    return tuple(i for i in lean_at if mlp is None or names[i] not in ("a", "b"))


def _frozen_shapes(saved, mlp, remat, lean_at):
    """What a sampled layer returns in place of a frozen layer's saved activations (the two
    branches of a layer's ``lax.cond`` return one structure), nothing of it read: its own
    ``saved`` with the fp8 entries as stand-ins (packed ones as pairs, those the fused MLP
    keeps in fp8 as bare e4m3), and the fused MLP's row scales."""
    packed_at = _packed_at(mlp, lean_at, remat)
    stand_ins = tuple(jnp.zeros(x.shape, E4M3) if i in lean_at and i not in packed_at else p
                      for i, (x, p) in enumerate(zip(saved, _empty_pack(saved, packed_at))))
    return stand_ins + tuple(jnp.ones((*saved[0].shape[:-1], 1), jnp.float32)
                             for _ in (mlp.saves(block.SAVED[remat]) if mlp is not None else ()))


# The rows the packed activations are scaled by: "head" (each [..., H] of q, k and v, each token
# of the others) or "token" (q, k and v by token too, over all heads: fewer, longer rows; for
# comparisons, experiments/bench_fp8.py --qkv-scales).
QKV_SCALES = "head"


def _row_width(x) -> int:
    return x.shape[-1] if QKV_SCALES == "head" or x.ndim < 4 else x.shape[-2] * x.shape[-1]


def _scale_shape(x) -> tuple[int, ...]:
    return (*x.shape[:-1], 1) if _row_width(x) == x.shape[-1] else (*x.shape[:-2], 1, 1)


def _pack(saved, lean_at):
    """``saved`` with the entries at ``lean_at`` as ``(e4m3, scale per row)`` pairs."""
    def pack(x):
        q, scale = quantize(x.reshape(-1, _row_width(x)), axis=1)
        return q.reshape(x.shape), scale.reshape(_scale_shape(x))
    return tuple(pack(x) if i in lean_at else x for i, x in enumerate(saved))


def _empty_pack(saved, lean_at):
    """What a sampled layer leaves in its packed entries: nothing read (its exact activations
    are kept apart), in the packed shapes the frozen branch returns."""
    return tuple((jnp.zeros(x.shape, E4M3), jnp.ones(_scale_shape(x), jnp.float32))
                 if i in lean_at else x for i, x in enumerate(saved))


def _unpack(saved, lean_at, like):
    return tuple((x[0].astype(jnp.float32) * x[1]).astype(like) if i in lean_at else x
                 for i, x in enumerate(saved))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def mixed_layers(cfg, remat, residuals, active_GxP, frozen, slot_L, h_BxSxD, cos, sin,
                 mask=None):
    """All ``L`` layers: layer ``l`` on slot ``slot_L[l]`` of ``active_GxP`` (the sampled
    layers, ``[G, ...]`` leaves) or, where that is -1, on ``frozen[l]`` (its copy: fp8 or
    dense). Differentiable in ``h`` and ``active_GxP``; ``frozen`` gets no gradient.
    ``residuals``: which of the activations frozen layers save for the backward are kept in
    e4m3, half their bytes (``block.FP8_SAVED``: ``"bf16"`` none, ``"fp8"`` gate and up,
    ``"fp8_qkv"`` also q, k, v, ``"fp8_all"`` all); the sampled layers keep theirs exact."""
    return _forward(cfg, remat, residuals, active_GxP, frozen, slot_L, h_BxSxD, (cos, sin),
                    mask)[0]


def _forward(cfg, remat, residuals, active_GxP, frozen, slot_L, h, rope, mask):
    """``(out, saved per layer, the sampled layers' exact packed entries: [G, ...] each)``."""
    has_slots = _num_slots(active_GxP) > 0
    lean_at = _lean_at(remat, residuals)
    saved, exact = [], None
    for layer, lp in enumerate(frozen):
        mlp = _frozen_mlp(cfg, lp, residuals)

        def run(h, lp, layer=layer, mlp=mlp):
            return block.layer_forward(cfg, lp, h, rope, remat, layer, mask_BxSxS=mask,
                                       mlp=mlp)

        def frozen_run(h, exact, slot, run=run, lp=lp, mlp=mlp):
            h, s = run(h, lp)
            return h, _pack(s, _packed_at(mlp, lean_at, remat)), exact

        def sampled_run(h, exact, slot, layer=layer, mlp=mlp):
            h, s = block.layer_forward(cfg, _slot(active_GxP, slot), h, rope, remat, layer,
                                       mask_BxSxS=mask)
            exact = tuple(jax.lax.dynamic_update_index_in_dim(e, s[i], slot, 0)
                          for e, i in zip(exact, lean_at))
            return h, _frozen_shapes(s, mlp, remat, lean_at), exact

        if has_slots:
            if exact is None:  # shapes from a sampled layer's (traced, not run) forward
                shapes = jax.eval_shape(lambda h: block.layer_forward(
                    cfg, _slot(active_GxP, 0), h, rope, remat, 0, mask_BxSxS=mask)[1],
                    h) if lean_at else ()
                exact = tuple(jnp.zeros((_num_slots(active_GxP), *shapes[i].shape),
                                        shapes[i].dtype) for i in lean_at)
            h, s, exact = jax.lax.cond(slot_L[layer] >= 0, sampled_run, frozen_run, h, exact,
                                       jnp.maximum(slot_L[layer], 0))
        else:
            h, s, exact = frozen_run(h, (), 0)
        saved.append(s)
    return h, tuple(saved), exact or ()


def _mixed_fwd(cfg, remat, residuals, active_GxP, frozen, slot_L, h, cos, sin, mask=None):
    out, saved, exact = _forward(cfg, remat, residuals, active_GxP, frozen, slot_L, h,
                                 (cos, sin), mask)
    return out, (active_GxP, frozen, slot_L, saved, exact, cos, sin, mask)


def _mixed_bwd(cfg, remat, residuals, res, dy):
    """Every layer's activation backward (a frozen layer's on its copy: one GEMM per matrix),
    and the sampled layers' weight gradients written into their slots."""
    active_GxP, frozen, slot_L, saved, exact, cos, sin, mask = res
    rope = (cos, sin)
    lean_at = _lean_at(remat, residuals)
    grads = jax.tree.map(jnp.zeros_like, active_GxP)
    has_slots = _num_slots(active_GxP) > 0
    for layer in reversed(range(len(frozen))):
        # As layout.PerLayer.reverse: each layer's recompute waits for its output cotangent.
        saved_l, dy = jax.lax.optimization_barrier((saved[layer], dy))

        def frozen_bwd(grads, dy, slot, saved_l=saved_l, layer=layer):
            mlp = _frozen_mlp(cfg, frozen[layer], residuals)
            s = _unpack(saved_l, _packed_at(mlp, lean_at, remat), dy.dtype)
            return grads, block.layer_backward(cfg, frozen[layer], s, rope, dy, remat,
                                               layer=layer, mask_BxSxS=mask, mlp=mlp)[0]

        def trained_bwd(grads, dy, slot, saved_l=saved_l, layer=layer):
            lp = _slot(active_GxP, slot)
            s = list(saved_l[:len(block.SAVED[remat])])  # without the fused MLP's stand-ins
            for e, i in zip(exact, lean_at):
                s[i] = jax.lax.dynamic_index_in_dim(e, slot, 0, keepdims=False)
            dh, parts = block.layer_backward(cfg, lp, tuple(s), rope, dy, remat, layer=layer,
                                             mask_BxSxS=mask)
            g = block.weight_grads_from_parts(cfg, lp, parts, rope, layer)
            return {name: jax.lax.dynamic_update_index_in_dim(
                grads[name], g[name].astype(grads[name].dtype), slot, 0)
                for name in grads}, dh
        if has_slots:
            grads, dy = jax.lax.cond(slot_L[layer] >= 0, trained_bwd, frozen_bwd, grads, dy,
                                     jnp.maximum(slot_L[layer], 0))
        else:
            grads, dy = frozen_bwd(grads, dy, 0)
    return grads, None, None, dy, None, None, None


mixed_layers.defvjp(_mixed_fwd, _mixed_bwd)


def mixed_loss(cfg: M.LlamaConfig, view, frozen, slot_L, batch, remat="none",
               loss_chunk=S.LOSS_CHUNK, residuals="bf16"):
    """``step.lisa_loss`` with the frozen layers read from their copies ``frozen`` and the
    sampled ones from ``view["layers"]`` (``[G, ...]``); ``residuals`` as in
    :func:`mixed_layers`."""
    ids = batch["input_ids"]
    B, S_ = ids.shape
    positions, mask = ops.positions_and_mask(None, S_, B, batch.get("segment_ids"))
    cos, sin = ops.rope_tables(cfg, positions)
    h = M.embed_tokens(cfg, view["embed"], ids)
    h = mixed_layers(cfg, remat, residuals, view["layers"], frozen, slot_L, h, cos, sin,
                     mask)
    return S.lm_loss_from_hidden(cfg, view["final_norm"], M.head_weight(view), h, ids,
                                 batch.get("loss_mask"), loss_chunk)


# ----------------------------------------------------------------------------- the host side


@dataclasses.dataclass(eq=False)
class SplitParams:
    """The parameters of a :class:`FrozenLisaStep` run, split between device and host.

    ``rest``: the leaves outside the layers (device). ``active_GxP``: the sampled layers
    ``active`` (sorted), stacked (device). ``masters``: every layer's weights (host numpy, or
    arrays in pinned host memory; the sampled layers' as of their period's start; reading it
    first writes in the host copies still under way, :meth:`sync`). ``cache.copies``: the
    frozen layers' copies (device). ``count``/``period``: the host's mirror of the optimizer
    state's, to know when a resample is due without reading the device.
    ``pending``: ``(count, stacked layers, their indices, host copy)`` of finished periods
    whose copy to the host is under way (the host copy: a ``Future`` of it when a thread makes
    it, else None); ``prefetched``: ``(period, sample, {layer: device tree})``, the
    next period's incoming layers sent ahead; ``next_sample``: ``(period, device array)``, the
    sample drawn ahead for that period; ``checks``: ``(count, device bool)``, whether a
    sample drawn ahead was the transform's. A step updates it in place and returns it."""

    rest: dict
    active_GxP: Any
    active: tuple[int, ...]
    host_masters: list[dict]
    cache: Fp8Cache
    count: int
    period: int
    pending: list = dataclasses.field(default_factory=list)
    prefetched: Any = None
    next_sample: Any = None
    checks: list = dataclasses.field(default_factory=list)

    @property
    def masters(self) -> list[dict]:
        """Every layer's host weights, current (the host copies under way written in)."""
        self.sync()
        return self.host_masters

    @property
    def frozen(self) -> tuple:
        """Every layer's frozen copy as the step takes them: a sampled layer, which has none,
        gets another layer's (its branch never reads it; the arguments keep one structure)."""
        copies = self.cache.copies
        stand_in = copies[min(copies)]
        return tuple(copies.get(i, stand_in) for i in range(len(self.host_masters)))

    def block_until_ready(self):
        jax.block_until_ready((self.rest, self.active_GxP))
        return self

    def sync(self, before: int | None = None) -> None:
        """Write the finished periods' host copies into the masters (waiting for them), oldest
        first, and free their device arrays; ``before``: only those started before that
        count."""
        keep = []
        for entry in self.pending:
            count, old, layers, fetch = entry
            if before is not None and count >= before:
                keep.append(entry)
                continue
            if isinstance(fetch, dict):  # per-layer copies to pinned host memory, under way
                for i in layers:
                    self.host_masters[i] = fetch[i]
            else:
                host = fetch.result() if fetch is not None else jax.device_get(old)
                for j, i in enumerate(layers):
                    self.host_masters[i] = {k: v[j] for k, v in host.items()}
            for x in jax.tree.leaves(old):
                x.delete()
        self.pending = keep

    def latest_on_device(self, layer: int):
        """Layer ``layer``'s weights on the device where its newest value is there (a finished
        period's layer whose host copy is not written yet), else None."""
        for _, old, layers, _ in reversed(self.pending):
            if layer in layers:
                return _take(old, layers.index(layer))
        return None

    def full_params(self) -> dict:
        """The whole parameter tree as of now (for checkpoints and export): the device's
        leaves, and the layers per layer from the host masters with the sampled layers'
        current weights."""
        host = jax.device_get(self.active_GxP)
        layers = jax.device_get(list(self.masters))  # pinned host arrays as numpy
        for j, i in enumerate(self.active):
            layers[i] = {k: v[j] for k, v in host.items()}
        return {**self.rest, "layers": tuple(layers)}


class _Clock:
    """Host milliseconds spent in each part of a call (``ms``: part -> ms), for benchmarks
    that look for where a resample's time goes."""

    def __init__(self):
        self.ms, self._t = {}, time.perf_counter()

    def lap(self, part: str) -> None:
        t = time.perf_counter()
        self.ms[part] = round((t - self._t) * 1e3, 2)
        self._t = t


@jax.jit
def _take(active_GxP, slot):
    """Slot ``slot`` of the sampled layers (one executable for every slot)."""
    return _slot(active_GxP, slot)


@jax.jit
def _stack(rows):
    """Per-layer trees stacked into ``[G, ...]`` leaves."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *rows)


def _host_layers(layers, donate: bool, host=None,
                 fall_back: bool = False) -> tuple[list[dict], bool]:
    """One host tree per layer (either layout), copied a layer at a time, and whether they are
    in pinned memory; with ``donate`` each device layer is freed once copied (the device never
    holds two). ``host``: the pinned host memory's sharding (else numpy). Where the host
    refuses to page-lock a layer, ``fall_back`` keeps them all in numpy instead (else a
    one-line error)."""
    layers = layout.PER_LAYER.to(layers, donate=donate)
    out = []
    for lp in layers:
        if host is None:
            out.append(dict(jax.device_get(lp)))
        else:
            try:
                out.append(jax.block_until_ready(dict(jax.device_put(lp, host))))
            except RuntimeError as e:  # the runtime's out-of-memory for page-locked memory
                if not fall_back:
                    raise ValueError(f"the host did not page-lock the layers' weights "
                                     f"({str(e).splitlines()[0][:200]}); use "
                                     f"host_memory='pageable'") from None
                warnings.warn("the host did not page-lock the layers' weights: they stay in "
                              "pageable memory, and each resample waits for its copies")
                out = [dict(jax.device_get(x)) for x in out] + [dict(jax.device_get(lp))]
                host = None
        if donate:
            for x in jax.tree.leaves(lp):
                if isinstance(x, jax.Array):
                    x.delete()
    return out, host is not None


class FrozenLisaStep:
    """``step(split, opt_state, batch) -> (split, opt_state, metrics)``, the LISA step of
    ``step.make_lisa_step`` (same transform, same metrics) on :class:`SplitParams`.

    ``place(params, opt_state)`` makes the split (the layers go to the host, their copies to
    the device); ``full_params(split)`` gives the whole tree back (layers per layer, numpy);
    ``step_fn`` takes either (what a training loop that checkpoints trees calls).
    ``jitted`` is the step proper (one executable per active-layer count); before it, the
    transform's resample runs when the host's count says a period starts. ``overlap``: the
    next period's layers sent ahead and the finished period's brought back in the background
    (see the module docstring); False: both at the resample, synchronously.
    ``prefetch_steps``: over how many calls before a resample its incoming layers are sent (1:
    in the period's last call; the default 4 hides transfers longer than a step, holding those
    layers on the device longer). ``host_memory``: ``"pageable"`` (numpy masters), ``"pinned"``
    (arrays in the device's page-locked host memory; the module docstring says why) or
    ``"auto"`` (pinned where the device has it); ``self.host_memory`` is the one chosen.
    """

    def __init__(self, cfg: M.LlamaConfig, tx, remat: str = "none",
                 loss_chunk: int | None = S.LOSS_CHUNK, frozen_precision: str = "fp8",
                 allow_cpu: bool = False, fp8_copies: int = 1, donate: bool = True,
                 overlap: bool = True, prefetch_steps: int = 4,
                 background_transfers: bool = False, host_memory: str = "auto",
                 residuals: str = "bf16"):
        if remat not in REMAT_MODES:
            raise ValueError(f"unknown remat {remat!r} for the LISA step; use one of "
                             f"{', '.join(REMAT_MODES)}")
        if residuals not in RESIDUAL_PRECISIONS:
            raise ValueError(f"unknown residual precision {residuals!r}; use one of "
                             f"{', '.join(RESIDUAL_PRECISIONS)}")
        if residuals_error := block.fp8_residuals_error(remat, residuals):
            raise ValueError(residuals_error)
        if frozen_precision not in FROZEN_PRECISIONS:
            raise ValueError(f"unknown frozen precision {frozen_precision!r}; use one of "
                             f"{', '.join(FROZEN_PRECISIONS)}")
        if fp8_copies not in (1, 2):
            raise ValueError(f"fp8_copies is 1 (the forward's layout) or 2 (one per GEMM), "
                             f"not {fp8_copies}")
        config = getattr(tx, "config", None)
        if config is None or config.probs is not None or \
                getattr(config, "granularity", "layer") != "layer":
            raise ValueError("the frozen-precision LISA step takes lisa(...) sampling a fixed "
                             "number of whole layers (n_active or a fixed-count sampler), not "
                             "probs= or module granularity")
        if isinstance(prefetch_steps, bool) or not isinstance(prefetch_steps, int) or \
                prefetch_steps < 1:
            raise ValueError(f"prefetch_steps is an int >= 1 (calls ahead of a resample that "
                             f"its incoming layers are sent), not {prefetch_steps!r}")
        if host_memory not in HOST_MEMORIES:
            raise ValueError(f"unknown host memory {host_memory!r}; use one of "
                             f"{', '.join(HOST_MEMORIES)}")
        device = jax.devices()[0]
        has_pinned = "pinned_host" in {m.kind for m in device.addressable_memories()}
        if host_memory == "pinned" and not has_pinned:
            raise ValueError(f"{device.platform} has no pinned host memory; use "
                             f"host_memory='pageable'")
        self._auto_host = host_memory == "auto"
        if host_memory == "auto":
            host_memory = "pinned" if has_pinned else "pageable"
        self._device = jax.sharding.SingleDeviceSharding(device)
        self._host = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host") \
            if host_memory == "pinned" else None
        self.host_memory = host_memory
        if frozen_precision == "fp8":
            check_fp8(allow_cpu=allow_cpu)
        self.cfg, self.tx, self.remat, self.loss_chunk = cfg, tx, remat, loss_chunk
        self.residuals = residuals
        self.frozen_precision, self.interval = frozen_precision, int(config.interval)
        self.names = tuple(p.name for p in block.layer_params(cfg) if p.rank == 2)
        if frozen_precision == "fp8":
            names, both = self.names, fp8_copies == 2
            quantize = jax.jit(lambda lp: quantize_layer(lp, names, both))
            # Always from device arrays (a host master is sent first): one executable for
            # place's copies and a resample's, which quantizes the device's values.
            self.quantize = lambda lp: quantize(self._send(lp))
            self.quantize.jitted = quantize
        else:
            self.quantize = self._send
        self.donate, self.overlap, self.prefetch_steps = donate, overlap, prefetch_steps
        self.jitted = self._jit_step()
        self._prepare = {}
        if background_transfers and not overlap:
            raise ValueError("background_transfers runs the overlapped transfers in a thread; "
                             "it needs overlap=True")
        # one thread: the transfers keep their order (a layer sent is the one last written)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lisa-transfers") \
            if background_transfers else None
        sampler, key_impl, L = config.sampler, config.key_impl, cfg.num_layers
        # The draw tx.prepare makes for a period (lisa._next: the sampler on the stored key).
        self._predict_fn = lambda key, period: sampler.next(
            jax.random.wrap_key_data(key, impl=key_impl), period, L)[1]
        self._aot = {}
        # resamples whose incoming layers were sent ahead / sent at the resample; incoming
        # layers taken from a finished period's device copy (their host copy not written yet)
        self.stats = {"prefetched": 0, "fetched": 0, "from_device": 0}
        self.last_call_ms: dict = {}  # the last call's host time per part (_Clock)

    def _jit_step(self):
        # pinned: the layers come committed to the device (from pinned memory) and __call__
        # commits the state and batch; in_shardings places the rest there too
        return jax.jit(self._step, donate_argnums=(0, 1, 3) if self.donate else (),
                       **dict(in_shardings=self._device) if self._host else {})

    def _send(self, tree):
        """``tree`` (host or device) onto the device, in its default memory (from pinned host
        memory that takes the device's sharding; numpy goes uncommitted, as the rest)."""
        return jax.device_put(tree, self._device) if self._host is not None else \
            jax.device_put(tree)

    # -- the device step

    def _step(self, rest, active_GxP, frozen, opt_state, batch):
        cfg, tx = self.cfg, self.tx
        in_view = tx.view(rest, opt_state)
        const = {k: v for k, v in rest.items() if not jax.tree.leaves(in_view[k])}
        rest = {k: v for k, v in rest.items() if k not in const}
        slot_L = layout.slot_of_layer(opt_state.active, cfg.num_layers)
        (loss, n), grads = S.value_and_grad_accumulated(
            lambda v, b: mixed_loss(cfg, {**const, **v}, frozen, slot_L, b, self.remat,
                                    self.loss_chunk, self.residuals),
            {**rest, "layers": active_GxP}, batch)
        none = dict.fromkeys(const)
        grads = {**grads, **none}
        view = {**rest, **none, "layers": active_GxP}
        metrics = {"loss": loss, "tokens": n, "grad_norm": optax.global_norm(grads)}
        metrics["layer_grad_norms"] = jnp.sqrt(sum(
            jnp.sum(jnp.square(g.astype(jnp.float32)), axis=tuple(range(1, g.ndim)))
            for g in jax.tree.leaves(grads["layers"])))
        updates, opt_state = tx.update_view(grads, opt_state, view)
        view = optax.apply_updates(view, updates)
        new_rest = {**{k: view[k] for k in rest}, **const}
        return new_rest, view["layers"], opt_state, metrics

    def _prepare_for(self, split: SplitParams, opt_state):
        """The transform's resample (``tx.prepare``) for ``opt_state``'s active count, as an
        executable of its own (as in ``step.make_lisa_step``), compiled ahead of its first
        use so that no resample step pays for a compile."""
        G = int(opt_state.active.shape[0])
        if G not in self._prepare:
            template = {**jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                       split.rest),
                        "layers": {k: jax.ShapeDtypeStruct((len(split.host_masters),) + v.shape,
                                                           v.dtype)
                                   for k, v in split.host_masters[0].items()}}
            fn = jax.jit(lambda s: self.tx.prepare(s, template),
                         donate_argnums=(0,) if self.donate else ())
            self._prepare[G] = fn.lower(opt_state).compile()
        return self._prepare[G]

    def __call__(self, split: SplitParams, opt_state, batch):
        clock = _Clock()
        if split.count // self.interval != split.period:
            opt_state = self._prepare_for(split, opt_state)(opt_state)
            clock.lap("prepare")
            split.period = split.count // self.interval
            active = self._sample(split, opt_state)
            clock.lap("sample")
            self.resample(split, active)
            clock.lap("resample")
            if self.overlap:
                self._draw_ahead(split, opt_state, split.period + 1)
        if self._host is not None:  # every argument committed to the device: one trace
            opt_state, batch = self._send((opt_state, batch))
        rest, active_GxP, opt_state, metrics = self.jitted(
            split.rest, split.active_GxP, split.frozen, opt_state, batch)
        clock.lap("dispatch")
        split.rest, split.active_GxP, split.count = rest, active_GxP, split.count + 1
        if self.overlap:
            # After the step's dispatch, so that the host waits beside the step: the host
            # copies of earlier calls written in, and the next period's layers sent once its
            # resample is prefetch_steps calls away.
            self._settle(split, before=split.count - 1)
            clock.lap("settle")
            self._prefetch(split)
            clock.lap("prefetch")
        self.last_call_ms = clock.ms
        return split, opt_state, metrics

    # -- the host side

    def _sample(self, split: SplitParams, opt_state) -> tuple[int, ...]:
        """The prepared state's sample: the one drawn ahead where there is one (not read from
        the device, which would wait for the previous step; checked one call later)."""
        if self.overlap and split.next_sample is not None and \
                split.next_sample[0] == split.period:
            drawn = split.next_sample[1]
            pre = split.prefetched
            active = pre[1] if pre is not None and pre[0] == split.period else \
                tuple(int(i) for i in jax.device_get(drawn))
            same = self._compiled("same", opt_state.active, drawn)
            split.checks.append((split.count, same(opt_state.active, drawn)))
            return active
        return tuple(int(i) for i in jax.device_get(opt_state.active))

    def _draw_ahead(self, split: SplitParams, opt_state, period: int) -> None:
        """Draw period ``period``'s sample on the device now (read when it is needed)."""
        period_ = jnp.asarray(period, jnp.int32)
        predict = self._compiled("predict", opt_state.key, period_)
        split.next_sample = (period, predict(opt_state.key, period_))

    def _compiled(self, name: str, *args):
        """The draw ahead (``predict``) or its check (``same``), compiled for the arguments'
        shapes alone (a state from ``tx.init`` and one from a resample take one executable)."""
        key = (name,) + tuple((x.shape, x.dtype) for x in args)
        if key not in self._aot:
            fn = self._predict_fn if name == "predict" else jnp.array_equal
            self._aot[key] = jax.jit(fn).lower(
                *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in args)).compile()
        return self._aot[key]

    def _settle(self, split: SplitParams, before: int) -> None:
        split.sync(before=before)
        keep = []
        for count, ok in split.checks:
            if count >= before:
                keep.append((count, ok))
            elif not bool(ok):
                raise RuntimeError("the sample drawn ahead differs from the transform's: the "
                                   "sampler's draw depends on more than its key and the period")
        split.checks = keep

    def _prefetch(self, split: SplitParams) -> None:
        """Send the next period's incoming layers to the device (no wait) in the last
        ``prefetch_steps`` calls before its resample, spread evenly over them (with γ
        incoming layers and ``prefetch_steps=γ``, one a call)."""
        if split.next_sample is None:
            return
        period = split.next_sample[0]
        left = period * self.interval - split.count  # calls between this one and the resample
        if left >= self.prefetch_steps:
            return
        pre = split.prefetched
        if pre is None or pre[0] != period:
            active = tuple(int(i) for i in jax.device_get(split.next_sample[1]))
            pre = split.prefetched = (period, active, {})
        todo = [i for i in pre[1] if i not in split.active and i not in pre[2]]
        # in the thread, the master as it is now: sync replaces a master, never writes into it
        send = functools.partial(self._pool.submit, self._send) if self._pool else None
        for i in todo[:-(-len(todo) // (max(left, 0) + 1))]:
            pre[2][i] = self._incoming(split, i, send)

    def _incoming(self, split: SplitParams, i: int, send=None):
        """Layer ``i``'s newest weights, sent to the device (or taken there); ``send``: what
        sends a host master (default ``_send``; a thread's ``Future`` of it)."""
        lp = split.latest_on_device(i)
        if lp is None:
            return (send or self._send)(split.host_masters[i])
        self.stats["from_device"] += 1
        return lp

    def _to_device(self, split: SplitParams, active: tuple[int, ...], on_device=None):
        """The layers ``active`` stacked on the device; ``on_device[i]``: layer ``i``'s tree
        there already (a layer that stays sampled, or one sent ahead), else its newest value
        is sent."""
        on_device = on_device or {}
        first = split.host_masters[0]
        if not active:
            return {k: jnp.zeros((0,) + v.shape, v.dtype) for k, v in first.items()}
        rows = [on_device[i] if i in on_device else self._incoming(split, i) for i in active]
        return _stack(tuple(rows))

    def resample(self, split: SplitParams, active: tuple[int, ...]) -> None:
        """Move to the sample ``active``: fresh copies of the layers that leave the trained set
        (quantized from the device's values), the new layers to the device (sent ahead where
        they were), and the trained layers' weights to the host masters (started now; written
        in now without ``overlap``, else by a later call or read)."""
        pre, split.prefetched = split.prefetched, None
        if active == split.active:
            return
        old = split.active_GxP
        rows = {i: _take(old, j) for j, i in enumerate(split.active)}
        if self._host is not None:  # DMA copies, started now
            fetch = {i: jax.device_put(lp, self._host) for i, lp in rows.items()}
        else:
            for x in jax.tree.leaves(old):
                x.copy_to_host_async()
        source = list(split.host_masters)
        for i, lp in rows.items():
            source[i] = lp
        split.cache.refresh(source, active)
        on_device = {i: rows[i] for i in active if i in rows}
        if pre is not None and pre[0] == split.period and pre[1] == active:
            on_device.update({i: x.result() if isinstance(x, Future) else x
                              for i, x in pre[2].items()})
            self.stats["prefetched"] += 1
        else:
            self.stats["fetched"] += 1
        new = self._to_device(split, active, on_device)
        del rows, source, on_device, pre
        if self._host is None:
            fetch = self._pool.submit(jax.device_get, old) if self._pool else None
        split.pending.append((split.count, old, split.active, fetch))
        split.active_GxP, split.active = new, active
        if not self.overlap:
            split.sync()

    def write_back(self, split: SplitParams) -> None:
        """The sampled layers' current weights into the host masters (views of one host copy
        of the ``[G, ...]`` slots)."""
        split.sync()
        if self._host is not None:
            for j, i in enumerate(split.active):
                split.host_masters[i] = jax.device_put(_take(split.active_GxP, j), self._host)
            return
        host = jax.device_get(split.active_GxP)
        for j, i in enumerate(split.active):
            split.host_masters[i] = {k: v[j] for k, v in host.items()}

    def place(self, params, opt_state) -> SplitParams:
        """The split of ``params`` (either layout) for ``opt_state``'s sample. With ``donate``
        the device's layer arrays are freed once on the host (``params`` must not be used
        again)."""
        masters, pinned = _host_layers(params["layers"], self.donate, self._host,
                                       fall_back=self._auto_host)
        if self._host is not None and not pinned:  # auto, and the host said no
            self._host, self.host_memory = None, "pageable"
            self.jitted = self._jit_step()
        rest = self._send({k: v for k, v in params.items() if k != "layers"})
        cache = Fp8Cache(self.names, quantize=self.quantize)
        active = tuple(int(i) for i in jax.device_get(opt_state.active))
        cache.refresh(masters, active)
        count, period = (int(x) for x in jax.device_get((opt_state.count, opt_state.period)))
        split = SplitParams(rest, None, active, masters, cache, count, period)
        split.active_GxP = self._to_device(split, active)
        if active:  # compiled now, not in a resample
            jax.block_until_ready(_take(split.active_GxP, 0))
        self._prepare_for(split, opt_state)
        if self.overlap:
            self._draw_ahead(split, opt_state, max(period + 1, count // self.interval))
            self._compiled("same", opt_state.active, split.next_sample[1])  # compiled now
            self._prefetch(split)
        return split

    def full_params(self, split: SplitParams) -> dict:
        """``split.full_params()``: the whole tree, layers per layer (host numpy)."""
        return split.full_params()

    def step_fn(self, params, opt_state, batch):
        """The step on a :class:`SplitParams` or on a plain parameter tree, which is placed
        first (a run's first step, or one after a checkpoint made the split a tree again:
        the copies are then made afresh from the weights as they are)."""
        if not isinstance(params, SplitParams):
            params = self.place(params, opt_state)
        return self(params, opt_state, batch)


def make_frozen_lisa_step(cfg: M.LlamaConfig, tx, remat: str = "none",
                          loss_chunk: int | None = S.LOSS_CHUNK, frozen_precision: str = "fp8",
                          allow_cpu: bool = False, fp8_copies: int = 1,
                          donate: bool = True, overlap: bool = True,
                          prefetch_steps: int = 4,
                          background_transfers: bool = False,
                          host_memory: str = "auto", residuals: str = "bf16") -> FrozenLisaStep:
    """The LISA step with the frozen layers in ``frozen_precision`` (see the module
    docstring). ``fp8_copies``: 1 keeps each frozen matrix once in fp8 (1 byte a parameter;
    its backward GEMM reads it transposed), 2 once per GEMM, each in the layout cuBLASLt
    takes without a transpose (2 bytes a parameter, as much as bf16). ``allow_cpu``: fp8 on a
    CPU (emulated; for tests). ``overlap``: the resample's transfers hidden behind the steps of
    the period (see the module docstring; False: synchronous, the same values);
    ``prefetch_steps``: how many calls ahead of a resample its incoming layers are sent;
    ``background_transfers``: those transfers and the copies back to the host in a thread;
    ``host_memory``: ``"pageable"`` (numpy masters), ``"pinned"`` (page-locked host arrays) or
    ``"auto"`` (the default: pinned where the device has such memory, else pageable);
    ``residuals``: what the frozen layers save for their backward in e4m3 with a scale per
    row, half its bytes (``block.FP8_SAVED``): ``"bf16"`` nothing, ``"fp8"`` the gate and up
    activations, ``"fp8_qkv"`` those and q, k, v, ``"fp8_all"`` everything."""
    return FrozenLisaStep(cfg, tx, remat, loss_chunk, frozen_precision, allow_cpu, fp8_copies,
                          donate, overlap, prefetch_steps, background_transfers, host_memory,
                          residuals)
