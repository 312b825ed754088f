"""LISA and LoRA on several GPUs (FSDP over a device mesh): per-GPU peak memory and tokens/s.

On the 2-GPU machine (two H200s), LLaMA-2-13B and -70B shapes on both GPUs, then 13B on one::

    python3 experiments/scale.py --shapes llama2-13b llama2-70b --methods lisa lora \
        --devices 2 --also-one-gpu llama2-13b --out experiments/results/scale_h200x2.json

On a CPU, the same code on 8 simulated devices with a tiny shape (a smoke test)::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python3 experiments/scale.py \
        --shapes tiny --out /tmp/scale_tiny.json

Each row (shape, method, devices) runs in its own process, so its peak memory is its own:
``device.memory_stats()["peak_bytes_in_use"]`` of every device of the mesh (null on a CPU).
Random weights are created straight into their sharded layout by one ``jax.jit`` with
``out_shardings`` (``lisa_jax.sharding.param_shardings``), never as a full copy on one device;
the optimizer state likewise (``init_sharded``). LISA: ``--lisa-layers`` (γ) sampled layers,
the fast step with ``remat="full"``; LoRA: rank ``--lora-rank`` on all seven projections, plain
autodiff with ``remat="full"``. ``--batch-size`` is the batch per data-parallel device (dp*fsdp of them) of
``--max-seq-len`` tokens each. tokens/s: global batch tokens over the median step time after
``--warmup`` steps. A row that does not fit is recorded with ``status: "oom"`` (another failure:
``"failed"`` or ``"timeout"``, with ``error``). bfloat16 on a GPU, float32 on a CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (SHAPES, add_flags, model_config, random_batch, spawn_row,  # noqa: E402
                    time_steps, write_json)
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def random_params(cfg, mesh):
    """Random parameters created directly in their shardings (one jitted init)."""
    import jax
    import jax.numpy as jnp

    import lisa_jax
    from lisa_jax import sharding as SH

    shapes = jax.eval_shape(lambda k: lisa_jax.init_params(cfg, k), jax.random.key(0))
    shardings = SH.param_shardings(cfg, shapes, mesh)

    def init(key):
        flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
        out = []
        for i, (path, s) in enumerate(flat):
            if "norm" in jax.tree_util.keystr(path):
                out.append(jnp.ones(s.shape, s.dtype))
            else:
                k = jax.random.fold_in(key, i)
                out.append((0.02 * jax.random.normal(k, s.shape, jnp.float32)).astype(s.dtype))
        return jax.tree.unflatten(treedef, out)

    return jax.jit(init, out_shardings=shardings)(jax.random.key(0))


def run_one(a) -> dict:
    """One row: build the sharded model, state and step; time it; report memory."""
    import jax
    import optax

    import lisa_jax
    from lisa_jax import layout
    from lisa_jax import lora as lora_lib
    from lisa_jax import sharding as SH
    from lisa_jax import step as S

    devices = jax.devices()[: a.devices] if a.devices else jax.devices()
    mesh = SH.make_mesh(a.mesh or f"fsdp={len(devices)}", devices=devices)
    on_cpu = devices[0].platform == "cpu"
    cfg = model_config(a.shape, a.dtype or ("float32" if on_cpu else "bfloat16"))
    t0 = time.perf_counter()
    params = random_params(cfg, mesh)
    jax.block_until_ready(params)
    init_s = time.perf_counter() - t0
    opt = optax.adamw(1e-5)
    if a.method == "lisa":
        tx = lisa_jax.lisa(opt, n_active=a.lisa_layers, interval=a.lisa_interval, key=0)
        state, sh = SH.init_sharded(tx.init, params, cfg, mesh)
        if a.fsdp_prefetch:  # each layer's all-gather issued a layer ahead
            sh = dataclasses.replace(sh, prefetch=True)
        if a.layer_layout == "per_layer":  # per-layer arrays, each sharded as its slice
            sh = dataclasses.replace(sh, params=SH.param_shardings(
                cfg, layout.per_layer_template(params), mesh))
            params = jax.device_put(layout.convert(params, "per_layer", donate=True), sh.params)
        step = S.make_lisa_step(cfg, tx, remat="full", shardings=sh)
    elif a.method == "lora":
        def init(p):
            lora = lora_lib.init_lora(p["layers"], jax.random.key(2), a.lora_rank)
            return lora, opt.init(lora)
        state, sh = SH.init_lora_sharded(init, params, cfg, mesh)
        step = S.make_lora_step(cfg, opt, lora_lib.lora_scale(a.lora_rank, None), remat="full",
                                shardings=sh)
    elif a.method == "full":
        state, sh = SH.init_sharded(opt.init, params, cfg, mesh)
        step = S.make_plain_step(cfg, opt, remat="full", shardings=sh)
    else:
        raise SystemExit(f"unknown method {a.method!r}")
    jax.block_until_ready(state)
    after_init = [(d.memory_stats() or {}).get("bytes_in_use") for d in devices]

    global_batch = a.batch_size * SH.data_parallel_size(mesh)
    batch = SH.shard_batch(random_batch(cfg, global_batch, a.max_seq_len), mesh)
    losses = []
    params, state, _, times = time_steps(step, params, state, batch, a.steps, a.warmup,
                                         each=lambda m: losses.append(float(m["loss"])))
    med = statistics.median(times)
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    gib = lambda b: None if b is None else round(b / 2**30, 2)  # noqa: E731
    n_params = sum(x.size for x in jax.tree.leaves(params))
    mesh_spec = str(SH.MeshConfig.parse(a.mesh or f"fsdp={len(devices)}"))
    return dict(
        shape=a.shape, method=a.method, devices=len(devices), mesh=mesh_spec, dtype=cfg.dtype,
        layer_layout=a.layer_layout if a.method == "lisa" else "stacked",
        fsdp_prefetch=a.fsdp_prefetch,
        gamma=a.lisa_layers if a.method == "lisa" else None,
        lora_r=a.lora_rank if a.method == "lora" else None, batch_per_device=a.batch_size,
        global_batch=global_batch, seq=a.max_seq_len, remat="full",
        params_b=round(n_params / 1e9, 3),
        init_s=round(init_s, 1), step_s_median=round(med, 4),
        step_s_all=[round(t, 4) for t in times],
        tokens_per_s=round(global_batch * a.max_seq_len / med, 1),
        tokens_per_s_per_device=round(global_batch * a.max_seq_len / med / len(devices), 1),
        peak_gib_per_device=[gib(p) for p in peaks],
        after_init_gib_per_device=[gib(b) for b in after_init],
        loss_first_last=[losses[0], losses[-1]], status="ok",
        backend=jax.default_backend(), jax=jax.__version__,
        device_kind=devices[0].device_kind)


def spawn(a, shape, method, devices) -> dict:
    """One row in a fresh process (its peak memory its own)."""
    cmd = [os.path.abspath(__file__), "--one", "--shapes", shape, "--method", method,
           "--devices", str(devices), "--batch-size", str(a.batch_size),
           "--max-seq-len", str(a.max_seq_len), "--lisa-layers", str(a.lisa_layers),
           "--lora-rank", str(a.lora_rank), "--warmup", str(a.warmup), "--steps", str(a.steps),
           "--lisa-interval", str(a.lisa_interval)]
    if a.mesh and devices == a.devices:
        cmd += ["--mesh", a.mesh]
    if a.dtype:
        cmd += ["--dtype", a.dtype]
    if a.fsdp_prefetch:
        cmd += ["--fsdp-prefetch"]
    cmd += ["--layer-layout", a.layer_layout]
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.97")
    return {"shape": shape, "method": method, "devices": devices, **spawn_row(cmd, a.timeout, env)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_flags(ap, shape=["llama2-13b", "llama2-70b"], method=["lisa", "lora"],
              many=("shape", "method"), choices=dict(method=("lisa", "lora", "full")))
    ap.add_argument("--devices", type=int, default=0, help="devices to use (0: all)")
    add_flags(ap, mesh=None, helps=dict(mesh='device mesh (default "fsdp=<devices>")'))
    ap.add_argument("--also-one-gpu", nargs="+", default=[], choices=sorted(SHAPES),
                    help="shapes also run on one device (the comparison rows)")
    add_flags(ap, batch_size=1, max_seq_len=1024, lisa_layers=2, lisa_interval=5, lora_rank=128,
              helps=dict(batch_size="sequences per data-parallel device"))
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    add_flags(ap, steps=5, dtype=None,
              helps=dict(steps="timed steps after the warm-up",
                         dtype="default: bfloat16 on GPU, float32 on CPU"))
    ap.add_argument("--fsdp-prefetch", action="store_true",
                    help="LISA: each layer's FSDP all-gather a layer ahead (the trainer's "
                         "--fsdp-prefetch)")
    ap.add_argument("--layer-layout", default="stacked", choices=["stacked", "per_layer"],
                    help="LISA: the layers as one stack or as per-layer arrays (the trainer's "
                         "--layer-layout)")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per row")
    ap.add_argument("--out", default=None, help="JSON file (written after every row)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    add_flags(ap, method=None, helps=dict(method=argparse.SUPPRESS))
    a = ap.parse_args(argv)

    if a.one:
        a.shape, = a.shapes
        print(json.dumps(run_one(a)))
        return 0

    plan = [(s, m, a.devices) for s in a.shapes for m in a.methods]
    plan += [(s, m, 1) for s in a.also_one_gpu for m in a.methods]
    result = {"argv": sys.argv[1:] if argv is None else argv, "rows": []}
    for shape, method, n in plan:
        row = spawn(a, shape, method, n)
        result["rows"].append(row)
        peaks = row.get("peak_gib_per_device")
        print(f"{shape:12s} {method:5s} devices={row.get('devices', n)} {row['status']:5s} "
              f"tok/s={row.get('tokens_per_s')} peak GiB/device={peaks} "
              f"{row.get('error', '')}", flush=True)
        if a.out:
            write_json(a.out, result)
    return 0 if all(r["status"] in ("ok", "oom") for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
