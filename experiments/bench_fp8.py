"""Step time, tokens/s and peak device memory of the LISA step with fp8 frozen layers
(``lisa_jax.fp8_step``), beside the bf16 LISA step of the same job; ``--check``: its numerics.

    python3 experiments/bench_fp8.py --shape llama2-7b --lisa-layers 2 --batch-size 4 \\
        --max-seq-len 1024 --remats none full --out OUT/fp8_llama2-7b.json
    python3 experiments/bench_fp8.py --shape llama2-7b --check --out OUT/fp8_check.json

Each row runs in its own process (its peak memory its own), as in experiments/bench_step.py,
whose rows these are in schema (``precision``: ``bf16`` or ``fp8``, which
experiments/speed_table.py reads). The bf16 row *is* ``bench_step.py --one --method lisa
--layer-layout per_layer`` run by this driver; the fp8 rows hold every layer's fp8 copy and the
γ sampled layers on the device, the bf16 masters in host memory (``host_gib``); their random
weights are made a layer at a time and kept on the host, so the whole bf16 model is never on
the device (with ``--hf`` it is, while loading). The optimizer
is the trainer's in bf16 (``--update-dtype float32 --mu-dtype bfloat16``: float32-precision
updates, Adam's first moment in bf16) unless told otherwise.

Resamples (every ``--lisa-interval`` steps K) fall inside the timed steps. The fp8 step moves
a resample's transfers off the resample step (``fp8_step``'s ``overlap``: the incoming layers
are sent in the period's last step, the outgoing ones written to the host in its first), so
``ms`` and ``tokens_per_s`` are the median step's among those that carry none of that (the
period's 3rd to (K-1)th steps; any but the resample step where K < 4), and ``resample_ms`` is
the median over the timed whole periods of what a period costs beyond K such steps (the
resample, the transfers and any wait on them, wherever in the period they fall);
``amortized_ms``/``tokens_per_s_amortized`` spread that over the period, and
``amortized_mean_ms`` is the plain mean step of the whole periods. ``resample_step_ms``: the
resample step's own extra time; ``resample_ms_by_period``: each whole period's, in order;
``period_ms``: the median step at each position in the period; ``call_parts_ms``: at the
period's positions 0, 1 and 2, the median host time of each part of a call
(``FrozenLisaStep.last_call_ms``: the resample's prepare, sample and transfers, the step's
dispatch, the settling of earlier copies, the prefetch) and ``wait``, the time from the
call's return to the step's end.
``memory_gib``: the arrays held across steps by role (``held``) and the compiled step's
accounting (``step``: ``temp`` is one step's activations, gradients and other temporaries);
``peak_gib`` is the device's high-water mark over the run, resamples included.
``--profile DIR`` then traces three more steps and writes the step's optimized HLO there
(``python3 experiments/trace_breakdown.py DIR`` sums the trace by kernel class).
``--gemm-out float32`` has the fp8 GEMMs write their product in float32 (the default: in
the activations' dtype); ``--transpose xla`` leaves the one-copy backward's transpose to XLA.
``--mlp stages`` runs the frozen layers' MLP stage by stage instead of as
``fp8_mlp.FrozenMlp`` (``--mlp-kernels xla``: its row kernels in plain JAX).
``--residuals fp8`` has the frozen layers save their gate and up activations in fp8 (with
``--check``: against the dense step's bf16 ones). ``--num-layers N`` cuts the shape to N
layers: a layer's kernels at full width, compiled in seconds instead of minutes (fp8 rows
only).
Time at least two whole periods (``--steps`` ≥ 3K); with fewer, ``resample_ms`` falls back to
``resample_step_ms`` (``resample_basis``). ``--no-overlap`` times the synchronous resample
(every transfer in the resample step); ``--prefetch-steps N`` sends the incoming layers N steps
ahead (``transfers``: how many resamples found them sent ahead); ``--host-memory pinned`` keeps
the masters in page-locked host memory.

``--check`` runs no timing: at the shape (random weights, random tokens) for ``--check-steps``
batches and samples, the loss and the gradients of the sampled layers (and the embedding and
head) with the frozen layers in fp8 against the same with them dense, as cosines and relative
errors. Random weights say little about a trained model's numerics; ``--hf DIR`` loads real
weights instead. CPU smoke (fp8 emulated, well under a minute):

    python3 experiments/bench_fp8.py --shape tiny --batch-size 2 --max-seq-len 64 --steps 3 \\
        --warmup 1 --lisa-interval 2 --allow-cpu
    python3 experiments/bench_fp8.py --shape tiny --check --batch-size 2 --max-seq-len 64 \\
        --allow-cpu
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_flags, command_line, forward_flags, model_config,  # noqa: E402
                    profile_steps, random_batch, spawn_row, write_json)

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH_STEP = os.path.join(HERE, "bench_step.py")
PRECISION = {"float32": "fp32", "bfloat16": "bf16"}


def _optimizer(a, cfg):
    import jax.numpy as jnp
    import optax

    from lisa_jax.precision import master_weights
    opt = optax.adamw(1e-5, mu_dtype=a.mu_dtype)
    if a.nu_dtype == "bfloat16":
        from lisa_jax.precision import stochastic_bf16_nu
        opt = stochastic_bf16_nu(opt)
    master = a.update_dtype == "float32" and jnp.dtype(cfg.dtype).itemsize < 4
    return (master_weights(opt) if master else opt), master


def _depth(a) -> dict:
    """``--num-layers``: the shape's layers cut to that many (a layer's kernels, compiled
    fast)."""
    return dict(num_layers=a.num_layers) if a.num_layers else {}


def _model(a):
    """``(cfg, params)``: random weights at ``--shape``, or the ``--hf`` directory's."""
    import jax

    from lisa_jax import model as M
    if a.hf:
        from common import default_dtype

        from lisa_jax import hf
        model = hf.load_hf(a.hf, a.dtype or default_dtype())
        return model.cfg, model.params
    cfg = model_config(a.shape, a.dtype, **_depth(a))
    return cfg, jax.jit(lambda k: M.init_params(cfg, k))(jax.random.key(0))


def _model_on_host(a):
    """``(cfg, params, template)`` for a timed row: random weights made one layer at a time
    on the device and kept on the host (the device never holds the whole model, so the row's
    peak is the step's), and the stacked template ``tx.init`` reads (shapes only: its layer
    leaves are zero-strided host arrays)."""
    import dataclasses

    import jax
    import numpy as np

    from lisa_jax import model as M
    if a.hf:
        cfg, params = _model(a)
        template = {**{k: v for k, v in params.items() if k != "layers"},
                    "layers": params["layers"]}
        return cfg, params, template
    cfg = model_config(a.shape, a.dtype, **_depth(a))
    one = dataclasses.replace(cfg, num_layers=1)
    init = jax.jit(lambda k: M.init_params(one, k))
    layers, rest = [], None
    for i in range(cfg.num_layers):
        p = init(jax.random.key(i))
        layers.append({k: np.asarray(jax.device_get(v[0])) for k, v in p["layers"].items()})
        for v in p["layers"].values():
            v.delete()
        if rest is None:
            rest = {k: v for k, v in p.items() if k != "layers"}
        else:
            jax.tree.map(lambda x: x.delete(), {k: v for k, v in p.items() if k != "layers"})
    template = {**rest, "layers": {k: np.broadcast_to(np.zeros((), v.dtype),
                                                      (cfg.num_layers,) + v.shape)
                                   for k, v in layers[0].items()}}
    return cfg, {**rest, "layers": tuple(layers)}, template


def _warm_every_layer(step, split, state, batch):
    """Run the step once with each layer among the sampled ones (ceil(L/γ) steps, each on a
    forged sample; the run's own sample, count and key are kept), so that the timed resamples
    are the first use of no layer's sampled branch. Each layer's branch is its own code in the
    unrolled step, and its first run pays one-time costs (code loaded, a branch first taken)
    that a long run pays once per layer, not at every resample. Returns its seconds, those of
    its first step (the compilation) and the state to go on with (the given one is
    donated)."""
    import jax
    import jax.numpy as jnp

    t0 = time.perf_counter()
    L, G = len(split.host_masters), len(split.active)
    kept = jax.tree.map(jnp.copy, (state.count, state.key, state.period, state.active))
    first_s = None
    for start in range(0, L, G):
        group = sorted({(start + j) % L for j in range(G)})
        forged = state._replace(active=jnp.asarray(group, state.active.dtype))
        split.rest, split.active_GxP, state, _ = step.jitted(
            split.rest, split.active_GxP, split.frozen, forged, batch)
        if first_s is None:  # the step's compilation
            jax.block_until_ready(state)
            first_s = time.perf_counter() - t0
    count, key, period, active = kept
    state = state._replace(count=count, key=key, period=period, active=active)
    jax.block_until_ready((split.rest, split.active_GxP, state))
    return time.perf_counter() - t0, first_s, state


def _gib(tree) -> float:
    import jax
    return round(sum(x.nbytes for x in jax.tree.leaves(tree)) / 2**30, 3)


def memory_breakdown(split, state, batch, compiled) -> dict:
    """Where the device memory of a step goes: the arrays that live across steps, by role,
    and the compiled step's own accounting (arguments, outputs, the temporaries of one step:
    activations, gradients, the loss's chunks), in GiB."""
    held = dict(rest=_gib(split.rest), sampled_layers=_gib(split.active_GxP),
                frozen_copies=_gib(list(split.cache.copies.values())),
                optimizer_state=_gib(state), batch=_gib(batch))
    analysis = compiled.memory_analysis()
    if analysis is None:
        return dict(held=held)
    step_gib = {k: round(getattr(analysis, f"{k}_size_in_bytes") / 2**30, 3)
                for k in ("argument", "output", "alias", "temp", "generated_code")}
    return dict(held=held, step=step_gib)


def _step_and_wait(step, batch):
    """``(split, state) -> (split, state)``: one step, waited for."""
    import jax

    def run(carry):
        split, state, metrics = step(*carry, batch)
        jax.block_until_ready((split.rest, split.active_GxP, state, metrics))
        return split, state
    return run


def _set_switches(a) -> None:
    """The fp8 modules' comparison switches, as the flags say."""
    import jax.numpy as jnp

    from lisa_jax import fp8, fp8_mlp, fp8_step

    fp8.GEMM_OUT_DTYPE = None if a.gemm_out == "input" else jnp.dtype(a.gemm_out)
    fp8.BACKWARD_TRANSPOSE = a.transpose
    fp8_step.FUSED_MLP = a.mlp == "fused"
    fp8_step.QKV_SCALES = a.qkv_scales
    fp8_mlp.KERNELS = a.mlp_kernels
    if a.mlp_launch:
        fp8_mlp.LAUNCH = (tuple(a.mlp_launch[:5]), tuple(a.mlp_launch[5:]))


def run_one(a) -> dict:
    """One fp8 (or host-bf16) row: place, compile, time; resample steps timed apart."""
    import jax
    import jax.numpy as jnp

    import lisa_jax
    from lisa_jax import fp8, fp8_mlp, fp8_step

    _set_switches(a)

    cfg, params, template = _model_on_host(a)
    opt, master = _optimizer(a, cfg)
    tx = lisa_jax.lisa(opt, n_active=a.lisa_layers, interval=a.lisa_interval, key=0)
    state = tx.init(template)
    del template
    chunk = a.loss_chunk or None
    step = fp8_step.make_frozen_lisa_step(cfg, tx, remat=a.remat, loss_chunk=chunk,
                                          frozen_precision=a.frozen_precision,
                                          allow_cpu=a.allow_cpu, fp8_copies=a.fp8_copies,
                                          overlap=not a.no_overlap,
                                          prefetch_steps=a.prefetch_steps,
                                          background_transfers=a.background_transfers,
                                          host_memory=a.host_memory, residuals=a.residuals)
    t0 = time.perf_counter()
    split = step.place(params, state)
    jax.block_until_ready(split.frozen)
    place_s = time.perf_counter() - t0
    del params
    batch = random_batch(cfg, a.batch_size, a.max_seq_len)
    K = a.lisa_interval
    warm_s = warm_compile_s = None
    if a.warm_every_layer:
        warm_s, warm_compile_s, state = _warm_every_layer(step, split, state, batch)
    times, resampled, counts, parts = [], [], [], []
    compile_s = None
    for i in range(1 + a.warmup + a.steps):
        period, count = split.period, split.count
        t0 = time.perf_counter()
        split, state, metrics = step(split, state, batch)
        t1 = time.perf_counter()
        jax.block_until_ready((split.rest, split.active_GxP, state, metrics))
        dt = time.perf_counter() - t0
        if i == 0:
            compile_s = warm_compile_s or dt  # (warmed: the first step is in the warm-up)
        elif i > a.warmup:
            times.append(dt)
            resampled.append(split.period != period)
            counts.append(count)
            # the call's host time per part, and the wait for the step after it
            parts.append({**step.last_call_ms, "wait": round((t0 + dt - t1) * 1e3, 2)})
    pos = [c % K for c in counts]
    plain = [x for x, p in zip(times, pos) if 2 <= p <= K - 2] or \
        [x for x, r in zip(times, resampled) if not r] or times
    t = statistics.median(plain)
    extra = [x - t for x, r in zip(times, resampled) if r]
    resample_step_s = statistics.median(extra) if extra else None
    periods = {}
    for x, c in zip(times, counts):
        periods.setdefault(c // K, []).append(x)
    whole = [v for v in periods.values() if len(v) == K]
    # each whole period's cost beyond K plain steps, in order (the first resample of a run
    # may pay one-time costs the later ones do not)
    extra_by_period = [round((sum(v) - K * t) * 1e3, 1) for v in whole]
    if whole:
        resample_s, basis = statistics.median(sum(v) - K * t for v in whole), "period"
        mean_s = statistics.mean(x for v in whole for x in v)
    else:
        resample_s, basis, mean_s = resample_step_s, "step", None
    amortized = t + (resample_s or 0.0) / K
    by_pos = [[x for x, p in zip(times, pos) if p == q] for q in range(K)]
    # where the time of the period's first two calls (the resample's, and the one that writes
    # its host copies in) and of a plain call goes: each part's median in ms
    parts_by_pos = {}
    for q in sorted({0, 1 % K, 2 % K}):
        rows = [d for d, p in zip(parts, pos) if p == q]
        parts_by_pos[q] = {k: round(statistics.median(d.get(k, 0.0) for d in rows), 2)
                           for k in dict.fromkeys(k for d in rows for k in d)}
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    # the step as it ran, compiled once more (a cache hit where the compilation cache is on)
    compiled = step.jitted.lower(split.rest, split.active_GxP, split.frozen, state,
                                 batch).compile()
    memory = memory_breakdown(split, state, batch, compiled)
    if a.profile:  # three more steps, traced
        name = f"{a.frozen_precision}_{a.remat}_copies{a.fp8_copies}_gemm_{a.gemm_out}" \
            f"_{a.transpose}_L{cfg.num_layers}" + {"bf16": "", "fp8": "_res8"}.get( \
                a.residuals, f"_res_{a.residuals}") \
            + ("" if a.mlp == "fused" else f"_mlp_{a.mlp}") \
            + ("" if a.mlp_kernels == "auto" else f"_{a.mlp_kernels}")
        split, state = profile_steps(a.profile, name, compiled.as_text(),
                                     _step_and_wait(step, batch), (split, state))
    host = sum(v.nbytes for lp in split.masters for v in lp.values())
    tokens = a.batch_size * a.max_seq_len
    return dict(impl="lisa_jax", label=a.label, shape=a.shape if not a.hf else a.hf,
                num_layers=cfg.num_layers,
                method="lisa", batch=a.batch_size, seq=a.max_seq_len, gamma=a.lisa_layers,
                lora_r=None, remat=a.remat, step_s=round(t, 4), step_s_min=round(min(times), 4),
                ms=round(t * 1e3, 1), tokens_per_s=round(tokens / t, 1),
                peak_gib=round(peak / 2**30, 2) if peak else None, peak_bytes=peak,
                compile_s=round(compile_s, 1), dtype=cfg.dtype, jax=jax.__version__,
                loss_chunk=chunk, inner="adamw", layout="per_layer", frozen=None,
                update_precision=PRECISION[a.update_dtype] if master or
                cfg.dtype == "float32" else "bf16",
                master_weights=master, mu_dtype=a.mu_dtype, nu_dtype=a.nu_dtype,
                precision="fp8" if a.frozen_precision == "fp8" else "bf16",
                frozen_precision=a.frozen_precision, host_masters=True,
                fp8_copies=a.fp8_copies if a.frozen_precision == "fp8" else None,
                lisa_interval=a.lisa_interval, timed_steps=len(times),
                timed_resamples=int(sum(resampled)),
                resample_ms=round(resample_s * 1e3, 1) if resample_s is not None else None,
                resample_basis=basis, timed_periods=len(whole),
                resample_ms_by_period=extra_by_period,
                resample_step_ms=round(resample_step_s * 1e3, 1)
                if resample_step_s is not None else None,
                period_ms=[round(statistics.median(v) * 1e3, 1) if v else None for v in by_pos],
                call_parts_ms=parts_by_pos,
                amortized_ms=round(amortized * 1e3, 1),
                amortized_mean_ms=round(mean_s * 1e3, 1) if mean_s is not None else None,
                overlap=not a.no_overlap, prefetch_steps=a.prefetch_steps,
                background_transfers=a.background_transfers, host_memory=step.host_memory,
                transfers=dict(step.stats),
                tokens_per_s_amortized=round(tokens / amortized, 1),
                place_s=round(place_s, 1), host_gib=round(host / 2**30, 2),
                memory_gib=memory, gemm_out=a.gemm_out, residuals=a.residuals,
                qkv_scales=a.qkv_scales, mlp=a.mlp,
                mlp_kernels=a.mlp_kernels, mlp_launch=[list(x) for x in fp8_mlp.LAUNCH],
                transpose=a.transpose if a.fp8_copies == 1 else None,
                warm_every_layer=a.warm_every_layer,
                cuda_module_loading=os.environ.get("CUDA_MODULE_LOADING"),
                warm_s=round(warm_s, 1) if warm_s is not None else None,
                loss=float(metrics["loss"]),
                lisa_jax_dir=os.path.dirname(os.path.abspath(lisa_jax.__file__)),
                device=str(jax.devices()[0].device_kind))


def _stats(a_, b_) -> dict:
    import numpy as np
    a_, b_ = (np.ravel(np.asarray(x, np.float64)) for x in (a_, b_))
    denom = np.sqrt((a_ @ a_) * (b_ @ b_))
    return dict(cos=float(a_ @ b_ / denom) if denom else None,
                rel=float(np.linalg.norm(a_ - b_) / max(np.linalg.norm(b_), 1e-30)),
                norm_ratio=float(np.linalg.norm(a_) / max(np.linalg.norm(b_), 1e-30)))


def run_check(a) -> dict:
    """The loss and gradients with fp8 frozen layers against dense ones (same weights)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lisa_jax import block, fp8_step, layout
    from lisa_jax.fp8 import quantize_layer

    fp8_step.check_fp8(allow_cpu=a.allow_cpu)
    _set_switches(a)
    cfg, params = _model(a)
    params = layout.convert(params, "per_layer", donate=True)
    names = tuple(p.name for p in block.layer_params(cfg) if p.rank == 2)
    dense = params["layers"]
    q = jax.jit(lambda lp: quantize_layer(lp, names, a.fp8_copies == 2))
    fp8 = tuple(q(lp) for lp in dense)
    rest = {k: v for k, v in params.items() if k != "layers"}
    chunk = a.loss_chunk or None

    @functools.partial(jax.jit, static_argnums=5)
    def grads(rest, active_GxP, frozen, active, batch, residuals="bf16"):
        slot_L = layout.slot_of_layer(active, cfg.num_layers)
        return jax.value_and_grad(lambda v: fp8_step.mixed_loss(
            cfg, v, frozen, slot_L, batch, a.remat, chunk, residuals)[0])(
            {**rest, "layers": active_GxP})

    @jax.jit
    def next_token(rest, active_GxP, frozen, active, batch):
        """Log-probabilities of the next token at every position (float32)."""
        from lisa_jax import model as M
        from lisa_jax import ops
        ids = batch["input_ids"]
        B, S_ = ids.shape
        slot_L = layout.slot_of_layer(active, cfg.num_layers)
        positions, mask = ops.positions_and_mask(None, S_, B, batch.get("segment_ids"))
        cos, sin = ops.rope_tables(cfg, positions)
        h = M.embed_tokens(cfg, rest["embed"], ids)
        h = fp8_step.mixed_layers(cfg, a.remat, "bf16", active_GxP, frozen, slot_L, h, cos,
                                  sin, mask)
        x = ops.rms_norm(h, rest["final_norm"], cfg.rms_norm_eps, cfg.norm_plus_one)
        return jax.nn.log_softmax((x @ M.head_weight(rest)).astype(jnp.float32), -1)

    def all_tokens(lp, lp8, batch):
        """Mean next-token KL(dense || fp8) and both losses over every target token (the
        masked loss of a small batch is a few dozen tokens: one fp8 rounding pattern's
        sample, and a different compilation of the same numerics draws another)."""
        ids = batch["input_ids"]
        if "loss_mask" in batch:  # text rows: every position up to a row's last target
            m = batch["loss_mask"].astype(jnp.int32)
            w = jnp.cumsum(m[:, ::-1], axis=1)[:, ::-1][:, 1:] > 0
        else:
            w = jnp.ones((ids.shape[0], ids.shape[1] - 1), bool)
        w = w.astype(jnp.float32)
        t = ids[:, 1:, None]

        def nll(p):
            return float(jnp.sum(-jnp.take_along_axis(p[:, :-1], t, -1)[..., 0] * w) / jnp.sum(w))
        kl = jnp.sum(jnp.exp(lp) * (lp - lp8), -1)[:, :-1]
        return dict(kl_all=float(jnp.sum(kl * w) / jnp.sum(w)), loss_all=nll(lp),
                    loss_all_fp8=nll(lp8), tokens_all=int(jnp.sum(w)))

    rng = np.random.default_rng(0)
    text = _text_batches(a) if a.data else None
    out = []
    for i in range(a.check_steps):
        active = np.sort(rng.choice(cfg.num_layers, a.lisa_layers, replace=False))
        act = jax.tree.map(lambda *xs: jnp.stack(xs), *[dense[j] for j in active])
        batch = text[i % len(text)] if text else random_batch(cfg, a.batch_size, a.max_seq_len,
                                                                seed=100 + i)
        ids = jnp.asarray(active, jnp.int32)
        loss, g = grads(rest, act, dense, ids, batch)
        loss8, g8 = grads(rest, act, fp8, ids, batch, a.residuals)  # dense: bf16 residuals
        row = dict(step=i, active=active.tolist(), loss=float(loss), loss_fp8=float(loss8),
                   loss_rel=abs(float(loss8) / float(loss) - 1))
        row.update(all_tokens(next_token(rest, act, dense, ids, batch),
                              next_token(rest, act, fp8, ids, batch), batch))
        row["loss_all_rel"] = abs(row["loss_all_fp8"] / row["loss_all"] - 1)
        per = {k: _stats(g8["layers"][k], g["layers"][k]) for k in names}
        per.update({k: _stats(g8[k], g[k]) for k in rest})
        row["grads"] = per
        row["min_layer_cos"] = min(v["cos"] for k, v in per.items() if k in names)
        row["max_layer_rel"] = max(v["rel"] for k, v in per.items() if k in names)
        print(json.dumps({k: v for k, v in row.items() if k != "grads"}), flush=True)
        out.append(row)
    return dict(command=command_line(), date=time.strftime("%Y-%m-%d"), label=a.label,
                shape=a.shape if not a.hf else a.hf, batch=a.batch_size, seq=a.max_seq_len,
                gamma=a.lisa_layers, remat=a.remat, fp8_copies=a.fp8_copies, dtype=cfg.dtype,
                residuals=a.residuals, mlp=a.mlp, mlp_kernels=a.mlp_kernels,
                checks=out, loss_rel_max=max(r["loss_rel"] for r in out),
                min_layer_cos=min(r["min_layer_cos"] for r in out),
                max_layer_rel=max(r["max_layer_rel"] for r in out),
                kl_all_mean=float(np.mean([r["kl_all"] for r in out])),
                loss_all_rel_max=max(r["loss_all_rel"] for r in out),
                device=str(jax.devices()[0].device_kind), jax=jax.__version__)


def _text_batches(a) -> list[dict]:
    """``--data``'s records as the trainer tokenizes them (``--hf``'s tokenizer), in batches."""
    import jax

    from lisa_jax import data as data_lib
    tok = data_lib.load_tokenizer(a.hf)
    examples, _ = data_lib.build_examples(data_lib.load_records(a.data), tok, a.max_seq_len,
                                          truncate=True)
    return [{k: jax.device_put(b[k]) for k in ("input_ids", "loss_mask")}
            for b in data_lib.eval_batches(examples, a.batch_size, tok.pad_token_id or 0,
                                           a.max_seq_len, max_batches=a.check_steps)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_flags(ap, shape="tiny", batch_size=4, max_seq_len=1024, steps=10, lisa_layers=2,
              lisa_interval=5,
              helps=dict(lisa_interval="LISA K: resamples happen in timing"))
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    add_flags(ap, remat=["none"], many=("remat",), choices=dict(remat=("none", "qkv", "mlp", "full")))
    ap.add_argument("--variants", nargs="+", default=["bf16", "fp8"],
                    choices=["bf16", "fp8", "host_bf16"],
                    help="rows: bf16 (bench_step.py's LISA row), fp8 (frozen layers fp8, "
                         "masters on the host), host_bf16 (the same split, frozen copies bf16)")
    ap.add_argument("--fp8-copies", type=int, nargs="+", default=[1], choices=[1, 2],
                    help="fp8 rows: 1 copy per frozen matrix (1 byte a parameter; the "
                         "backward reads it transposed) and/or 2 (one per GEMM, TN each)")
    ap.add_argument("--loss-chunk", type=int, default=4096,
                    help="tokens per chunk of the LM loss (0: no chunking)")
    add_flags(ap, dtype=None, update_dtype="float32",
              helps=dict(dtype="dtype of the parameters (default: bfloat16 on an accelerator)"))
    ap.add_argument("--mu-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--nu-dtype", default="float32", choices=["bfloat16", "float32"],
                    help="dtype of AdamW's second moment (bfloat16: stochastically rounded)")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="fp8 on a CPU (XLA emulates it; for smoke runs)")
    ap.add_argument("--check", action="store_true",
                    help="no timing: fp8 against dense loss and sampled-layer gradients")
    ap.add_argument("--check-steps", type=int, default=4, help="--check: batches (and samples)")
    ap.add_argument("--hf", default=None, help="an HF model directory instead of --shape")
    ap.add_argument("--num-layers", type=int, default=None,
                    help="the shape with this many layers (its kernels, compiled faster)")
    ap.add_argument("--data", default=None, help="--check with --hf: batches of these records "
                    "(any file lisa-jax train --data reads) instead of random tokens")
    ap.add_argument("--label", default=None, help="free text copied into every row")
    ap.add_argument("--timeout", type=float, default=540)
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--frozen-precision", default="fp8", choices=["bf16", "fp8"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--no-overlap", action="store_true",
                    help="fp8 rows: the resample's transfers synchronous, in the resample step")
    ap.add_argument("--background-transfers", action="store_true",
                    help="fp8 rows: the overlapped transfers made by a thread of their own")
    ap.add_argument("--prefetch-steps", type=int, default=4,
                    help="fp8 rows: calls ahead of a resample that its incoming layers are sent")
    ap.add_argument("--host-memory", default="auto", choices=["auto", "pageable", "pinned"],
                    help="fp8 rows: the masters as numpy (pageable) or in pinned host memory "
                         "(auto: pinned where the device has it)")
    ap.add_argument("--gemm-out", default="input", choices=["input", "float32"],
                    help="fp8 rows: the dtype fp8 GEMMs write their product in (input: the "
                         "activations', bfloat16)")
    ap.add_argument("--transpose", default="tiled", choices=["tiled", "xla"],
                    help="fp8 rows with one copy: how the backward transposes it (xla: left "
                         "to XLA, as before)")
    ap.add_argument("--residuals", default="bf16",
                    choices=["bf16", "fp8", "fp8_qkv", "fp8_all"],
                    help="fp8 rows and --check: what frozen layers save for their backward in "
                         "e4m3 (a scale per token; --frozen-residuals): nothing, gate and up, "
                         "those and q, k, v, or everything")
    ap.add_argument("--qkv-scales", default="head", choices=["head", "token"],
                    help="--residuals fp8_qkv and fp8_all: q, k, v scaled per token and head, "
                         "or per token over all heads (fp8_step.QKV_SCALES)")
    ap.add_argument("--mlp", default="fused", choices=["fused", "stages"],
                    help="fp8 rows and --check: frozen layers' MLP as fp8_mlp.FrozenMlp (two "
                         "fused row kernels) or stage by stage, as before")
    ap.add_argument("--mlp-kernels", default="auto", choices=["auto", "pallas", "xla"],
                    help="the fused MLP's row kernels (auto: Pallas on a GPU)")
    ap.add_argument("--mlp-launch", type=int, nargs=10, default=None,
                    metavar=("ROWS", "BLOCK", "WARPS", "PROGRAMS", "STAGES") * 2,
                    help="the Pallas row kernels' launch shapes, forward then backward "
                         "(fp8_mlp.LAUNCH; default: its own)")
    ap.add_argument("--profile", default=None,
                    help="fp8 rows: after timing, a trace of 3 steps and the step's optimized "
                         "HLO in this folder (experiments/trace_breakdown.py reads it)")
    ap.add_argument("--warm-every-layer", action="store_true",
                    help="fp8 rows: before timing, run the step once with each layer sampled, "
                         "so that no timed resample is the first use of a layer's branch")
    a = ap.parse_args()
    if a.check:
        a.remat, a.fp8_copies = a.remats[0], a.fp8_copies[0]
        result = run_check(a)
        if a.out:
            write_json(a.out, result, device=True)
        print(f"fp8 vs dense: loss rel ≤ {result['loss_rel_max']:.2e}, sampled-layer gradient "
              f"cosine ≥ {result['min_layer_cos']:.5f}, rel err ≤ {result['max_layer_rel']:.4f};"
              f" every token: loss rel ≤ {result['loss_all_rel_max']:.2e}, next-token KL "
              f"{result['kl_all_mean']:.4f}",
              flush=True)
        return
    if a.one:
        a.remat, a.fp8_copies = a.remats[0], a.fp8_copies[0]
        print(json.dumps(run_one(a)), flush=True)
        return
    if a.num_layers and "bf16" in a.variants:
        raise SystemExit("--num-layers is for the fp8 and host_bf16 rows; leave bf16 out of "
                         "--variants")
    common = forward_flags(a, "shape", "batch_size", "max_seq_len", "steps", "warmup",
                           "lisa_interval", "lisa_layers", "loss_chunk", "update_dtype",
                           "mu_dtype", "nu_dtype", "label", "dtype")
    rows, failed = [], []

    def save():
        if a.out:
            write_json(a.out, dict(command=command_line(), date=time.strftime("%Y-%m-%d"),
                                   label=a.label, update_precision=PRECISION[a.update_dtype],
                                   rows=rows, peer_rows=[], failed=failed))

    for remat in a.remats:
        plan = []
        if "bf16" in a.variants:
            plan.append(("bf16", [BENCH_STEP, "--one", "--method", "lisa", "--remat", remat,
                                  "--layer-layout", "per_layer", "--inner", "adamw", *common]))
        for variant, copies in ([("fp8", c) for c in a.fp8_copies] if "fp8" in a.variants
                                else []) + ([("host_bf16", 1)] if "host_bf16" in a.variants
                                            else []):
            plan.append((variant, [__file__, "--one", "--remats", remat, "--fp8-copies",
                                   str(copies), "--frozen-precision",
                                   "fp8" if variant == "fp8" else "bf16", *common] +
                         (["--allow-cpu"] if a.allow_cpu else []) +
                         (["--no-overlap"] if a.no_overlap else []) +
                         (["--background-transfers"] if a.background_transfers else []) +
                         (["--warm-every-layer"] if a.warm_every_layer else []) +
                         (["--num-layers", str(a.num_layers)] if a.num_layers else []) +
                         ["--prefetch-steps", str(a.prefetch_steps),
                          "--host-memory", a.host_memory, "--gemm-out", a.gemm_out,
                          "--transpose", a.transpose, "--residuals", a.residuals,
                          "--qkv-scales", a.qkv_scales,
                          "--mlp", a.mlp, "--mlp-kernels", a.mlp_kernels] +
                         (["--mlp-launch", *map(str, a.mlp_launch)] if a.mlp_launch else []) +
                         (["--profile", a.profile] if a.profile else []) +
                         (["--hf", a.hf] if a.hf else [])))
        for variant, args in plan:
            row = spawn_row(args, a.timeout)
            if "status" in row:
                failed.append(dict(variant=variant, remat=remat, **row))
            else:
                row.setdefault("precision", "bf16")
                print(json.dumps(row), flush=True)
                rows.append(row)
            save()
    base = {r["remat"]: r for r in rows if r.get("frozen_precision") is None}
    print(f"{'precision':9s} {'copies':>6s} {'remat':>5s} {'step ms':>8s} {'amort ms':>8s} "
          f"{'tok/s':>9s} {'peak GiB':>8s} {'host GiB':>8s} {'resample ms':>11s} "
          f"{'speed×bf16':>10s} {'mem×bf16':>8s}")
    for r in rows:
        b = base.get(r["remat"])
        sp = b["step_s"] / r["step_s"] if b else float("nan")
        mem = r["peak_gib"] / b["peak_gib"] if b and r.get("peak_gib") and b.get("peak_gib") \
            else float("nan")
        name = {None: "bf16", "bf16": "host_bf16"}.get(r.get("frozen_precision"), "fp8")
        print(f"{name:9s} {str(r.get('fp8_copies') or ''):>6s} "
              f"{r['remat']:>5s} {r['ms']:8.1f} {r.get('amortized_ms') or r['ms']:8.1f} "
              f"{r['tokens_per_s']:9.0f} {r['peak_gib'] or float('nan'):8.2f} "
              f"{r.get('host_gib') or 0:8.2f} {r.get('resample_ms') or 0:11.1f} "
              f"{sp:10.2f} {mem:8.2f}", flush=True)
    for f in failed:
        print(f"{f['status']}: {f['variant']} remat={f['remat']}: {f.get('error')}", flush=True)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
