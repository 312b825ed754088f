"""LISA and LoRA on several GPUs (FSDP over a device mesh): per-GPU peak memory and tokens/s.

On the 2-GPU machine (two H200s), LLaMA-2-13B and -70B shapes on both GPUs, then 13B on one::

    python3 experiments/scale.py --shape llama2-13b,llama2-70b --methods lisa,lora \
        --devices 2 --also-one-gpu llama2-13b --out experiments/results/scale_h200x2.json

On a CPU, the same code on 8 simulated devices with a tiny shape (a smoke test)::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python3 experiments/scale.py \
        --shape tiny --out /tmp/scale_tiny.json

Each row (shape, method, devices) runs in its own process, so its peak memory is its own:
``device.memory_stats()["peak_bytes_in_use"]`` of every device of the mesh (null on a CPU).
Random weights are created straight into their sharded layout by one ``jax.jit`` with
``out_shardings`` (``lisa_jax.sharding.param_shardings``), never as a full copy on one device;
the optimizer state likewise (``init_sharded``). LISA: γ sampled layers, the fast step with
``remat="full"``; LoRA: rank ``--lora-r`` on all seven projections, plain autodiff with
``remat="full"``. ``--batch`` is the batch per data-parallel device (dp*fsdp of them; default 1
sequence of ``--seq`` 1024 tokens each). tokens/s: global batch tokens over the median step
time after ``--warmup`` steps. A row that does not fit is recorded with ``status: "oom"``.
bfloat16 on a GPU, float32 on a CPU. Runs on jax 0.10 and 0.11.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shapes import SHAPES  # noqa: E402
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def random_params(cfg, mesh):
    """Random parameters created directly in their shardings (one jitted init)."""
    import jax
    import jax.numpy as jnp

    from lisa_jax import model as M
    from lisa_jax import sharding as SH

    shapes = jax.eval_shape(lambda k: M.init_params(cfg, k), jax.random.key(0))
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
    from lisa_jax import lora as lora_lib
    from lisa_jax import model as M
    from lisa_jax import sharding as SH
    from lisa_jax import step as S

    devices = jax.devices()[: a.devices] if a.devices else jax.devices()
    mesh = SH.make_mesh(a.mesh or f"fsdp={len(devices)}", devices=devices)
    on_cpu = devices[0].platform == "cpu"
    cfg = M.LlamaConfig(**SHAPES[a.shape], dtype=a.dtype or ("float32" if on_cpu else "bfloat16"))
    t0 = time.perf_counter()
    params = random_params(cfg, mesh)
    jax.block_until_ready(params)
    init_s = time.perf_counter() - t0
    opt = optax.adamw(1e-5)
    if a.method == "lisa":
        tx = lisa_jax.lisa(opt, n_active=a.gamma, interval=a.interval, key=0)
        state, sh = SH.init_sharded(tx.init, params, cfg, mesh)
        step = S.make_lisa_step(cfg, tx, remat="full", shardings=sh)
    elif a.method == "lora":
        def init(p):
            lora = lora_lib.init_lora(p["layers"], jax.random.key(2), a.lora_r)
            return lora, opt.init(lora)
        state, sh = SH.init_lora_sharded(init, params, cfg, mesh)
        step = S.make_lora_step(cfg, opt, lora_lib.lora_scale(a.lora_r, None), remat="full",
                                shardings=sh)
    elif a.method == "full":
        state, sh = SH.init_sharded(opt.init, params, cfg, mesh)
        step = S.make_plain_step(cfg, opt, remat="full", shardings=sh)
    else:
        raise SystemExit(f"unknown method {a.method!r}")
    jax.block_until_ready(state)
    after_init = [(d.memory_stats() or {}).get("bytes_in_use") for d in devices]

    global_batch = a.batch * SH.data_parallel_size(mesh)
    ids = jax.random.randint(jax.random.key(1), (global_batch, a.seq), 0, cfg.vocab_size)
    batch = SH.shard_batch({"input_ids": ids}, mesh)
    times, losses = [], []
    for i in range(a.warmup + a.steps):
        t = time.perf_counter()
        params, state, metrics = step(params, state, batch)
        losses.append(float(metrics["loss"]))  # waits for the step
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    gib = lambda b: None if b is None else round(b / 2**30, 2)  # noqa: E731
    n_params = sum(x.size for x in jax.tree.leaves(params))
    mesh_spec = str(SH.MeshConfig.parse(a.mesh or f"fsdp={len(devices)}"))
    return dict(
        shape=a.shape, method=a.method, devices=len(devices), mesh=mesh_spec, dtype=cfg.dtype,
        gamma=a.gamma if a.method == "lisa" else None,
        lora_r=a.lora_r if a.method == "lora" else None, batch_per_device=a.batch,
        global_batch=global_batch, seq=a.seq, remat="full", params_b=round(n_params / 1e9, 3),
        init_s=round(init_s, 1), step_s_median=round(med, 4),
        step_s_all=[round(t, 4) for t in times], tokens_per_s=round(global_batch * a.seq / med, 1),
        tokens_per_s_per_device=round(global_batch * a.seq / med / len(devices), 1),
        peak_gib_per_device=[gib(p) for p in peaks],
        after_init_gib_per_device=[gib(b) for b in after_init],
        loss_first_last=[losses[0], losses[-1]], status="ok",
        backend=jax.default_backend(), jax=jax.__version__,
        device_kind=devices[0].device_kind)


def spawn(a, shape, method, devices) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", "--shape", shape, "--methods",
           method, "--devices", str(devices), "--batch", str(a.batch), "--seq", str(a.seq),
           "--gamma", str(a.gamma), "--lora-r", str(a.lora_r), "--warmup", str(a.warmup),
           "--steps", str(a.steps), "--interval", str(a.interval)]
    if a.mesh and devices == a.devices:
        cmd += ["--mesh", a.mesh]
    if a.dtype:
        cmd += ["--dtype", a.dtype]
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.97")
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
    base = dict(shape=shape, method=method, devices=devices,
                wall_s=round(time.perf_counter() - t, 1))
    if proc.returncode == 0:
        try:
            return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": base["wall_s"]}
        except (ValueError, IndexError):
            pass
    err = (proc.stderr or proc.stdout).strip().splitlines()
    text = "\n".join(err[-30:])
    oom = any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM"))
    last = next((l for l in reversed(err) if "Error" in l or "error" in l), err[-1] if err else "")
    return {**base, "status": "oom" if oom else "error", "error": last[-500:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama2-13b,llama2-70b",
                    help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--methods", default="lisa,lora", help="comma list of lisa, lora, full")
    ap.add_argument("--devices", type=int, default=0, help="devices to use (0: all)")
    ap.add_argument("--mesh", default=None, help='mesh spec (default "fsdp=<devices>")')
    ap.add_argument("--also-one-gpu", default="",
                    help="comma list of shapes also run on one device (the comparison rows)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per data-parallel device")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--gamma", type=int, default=2)
    ap.add_argument("--interval", type=int, default=5, help="LISA resample period (steps)")
    ap.add_argument("--lora-r", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per row")
    ap.add_argument("--out", default=None, help="JSON file (written after every row)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.one:
        a.method = a.methods
        print(json.dumps(run_one(a)))
        return 0

    plan = [(s, m, a.devices) for s in a.shape.split(",") if s for m in a.methods.split(",") if m]
    plan += [(s, m, 1) for s in a.also_one_gpu.split(",") if s
             for m in a.methods.split(",") if m]
    for s, _, _ in plan:
        if s not in SHAPES:
            raise SystemExit(f"unknown shape {s!r}; use one of {', '.join(SHAPES)}")
    result = {"argv": sys.argv[1:] if argv is None else argv, "rows": []}
    for shape, method, n in plan:
        row = spawn(a, shape, method, n)
        result["rows"].append(row)
        peaks = row.get("peak_gib_per_device")
        print(f"{shape:12s} {method:5s} devices={row.get('devices', n)} {row['status']:5s} "
              f"tok/s={row.get('tokens_per_s')} peak GiB/device={peaks} "
              f"{row.get('error', '')}", flush=True)
        if a.out:
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            with open(a.out, "w") as f:
                json.dump(result, f, indent=1)
    return 0 if all(r["status"] in ("ok", "oom") for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
