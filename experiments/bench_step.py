"""Step time, tokens/s and peak device memory of every training method, against the PyTorch peer.

    python3 experiments/bench_step.py --shape llama2-7b --batch-size 4 --max-seq-len 1024 \
        --out experiments/results/bench_step_h200.json

Each measurement runs in its own process so that its peak memory is its own
(``device.memory_stats()["peak_bytes_in_use"]``). Rows: forward only; the gradient floor of any
LISA step under plain autodiff (embedding, final norm and head gradients, activation gradients
through every layer, no layer weight gradient, no optimizer); the paper's E+H (the LISA step
with no sampled layer: AdamW on embedding, final norm and head); full fine-tuning; LoRA; LISA with
γ active layers; each with and without rematerialization. With ``--peer`` the PyTorch peer
(transformers + PEFT + LMFlow-style LISA) runs in the same job on the same shapes, and each of
our rows is printed with its ratio to the peer's row of the same method. Random weights: speed
and memory do not depend on the values.

The peer is ``experiments/torch_peers_strong.py``; ``--peer-impl`` picks how it runs: ``liger``
(the default: Liger kernels for RoPE, RMSNorm, SwiGLU and the fused linear cross-entropy; needs
``liger_kernel`` importable), ``compile`` (``torch.compile``) or ``eager`` (plain transformers,
the peer of earlier results). ``--update-dtype float32`` gives every method's optimizer fp32
master weights when the parameters are 16-bit (``lisa_jax.master_weights(opt)``; for
LISA inside: ``lisa(master_weights(opt), ...)``); ``bfloat16`` updates the bf16 weights in place
(rows record it as ``update_precision`` ``fp32`` / ``bf16``).
``--label`` is copied into every row, so that the JSONs of several invocations (a package
before and after a change, say: experiments/precision_h200.sh) can be merged. Each row records
``impl`` (``lisa_jax`` or ``torch``), ``ms`` (median step), ``tokens_per_s``, ``peak_gib`` and
``wall_s`` (its process, start to end).

LISA rows run on one array per layer weight (``--layer-layouts per_layer``, what the trainer
uses on one GPU; ``lisa_jax.layout``) and/or on the stacked ``[L, ...]`` arrays (``stacked``);
``--lisa-layers`` lists the γ of the LISA rows; ``--lisa-granularity attn_mlp`` or ``matrix``
makes them module-level (each module group of a layer draws its own γ layers, MISA-style; rows
record ``granularity``). One row by hand: ``python3
experiments/bench_step.py --one --method lisa --lisa-layers 2 --remat none --layer-layout
per_layer``; ``--method floor_unstacked`` is the gradient floor over one array per layer weight
(the floor of the per-layer LISA rows). ``--profile DIR`` also writes each row's trace and optimized
HLO; ``experiments/trace_breakdown.py DIR`` sums the traces per kernel class.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_flags, command_line, forward_flags, model_config,  # noqa: E402
                    profile_steps, random_batch, spawn_row, time_steps, write_json)

HERE = os.path.dirname(os.path.abspath(__file__))
S_LOSS_CHUNK = 4096  # lisa_jax.step.LOSS_CHUNK, without importing jax in the driver
PEER_SCRIPT = os.path.join(HERE, "torch_peers_strong.py")
# --peer-impl -> the peer script's flags (eager: torch_peers_strong.py without flags).
PEER_IMPLS = {"eager": [], "liger": ["--liger"], "compile": ["--compile"]}
TRAINING = ("full", "lora", "eh", "lisa")  # the methods with an optimizer
METHODS = ("forward", "floor", "floor_unstacked", "eh", "full", "lora", "lisa")
# --update-dtype -> the rows' update_precision (the field the result tables read)
PRECISION = {"float32": "fp32", "bfloat16": "bf16"}


def run_one(a) -> dict:
    """Build the model and step for one method, time it, return one row."""
    import jax
    import jax.numpy as jnp
    import optax

    import lisa_jax
    from lisa_jax import layout
    from lisa_jax import lora as lora_lib
    from lisa_jax import model as M
    from lisa_jax import step as S

    cfg = model_config(a.shape, a.dtype)
    params = jax.jit(lambda k: M.init_params(cfg, k))(jax.random.key(0))
    batch = random_batch(cfg, a.batch_size, a.max_seq_len)
    # sgd isolates the optimizer's share of a step (variant rows; the peer uses AdamW).
    mu_dtype = getattr(a, "mu_dtype", None)
    opt = optax.adamw(1e-5, mu_dtype=mu_dtype) if a.inner == "adamw" else optax.sgd(1e-5)
    nu_dtype = getattr(a, "nu_dtype", "float32")
    if nu_dtype == "bfloat16":
        from lisa_jax.precision import stochastic_bf16_nu
        opt = stochastic_bf16_nu(opt)
    precision = PRECISION[getattr(a, "update_dtype", "bfloat16")]
    sixteen_bit = jnp.dtype(cfg.dtype).itemsize < 4
    master = precision == "fp32" and sixteen_bit and a.method in TRAINING
    if master:
        # Imported only here, so that the script runs on copies of the package without it.
        try:
            from lisa_jax import master_weights
        except ImportError:
            from lisa_jax.precision import master_weights
        opt = master_weights(opt)  # LISA: lisa(master_weights(opt)); LoRA: on the adapters
    state = None
    remat = a.remat
    # Full FT and LoRA run plain autodiff: its remat policies (model.REMAT_POLICIES) are none,
    # dots (keep matmul outputs) and full; LISA's "mlp" maps to full there.
    plain_remat = remat if remat in M.REMAT_POLICIES else "full"
    chunk = a.loss_chunk or None

    def rest_of(p):  # every parameter but the layers
        return {k: v for k, v in p.items() if k != "layers"}

    if a.method == "forward":
        fwd = S.make_forward(cfg, chunk)
        step = lambda p, s, b: (p, s, {"loss": fwd(p, b)})  # noqa: E731
    elif a.method in ("floor", "floor_unstacked"):
        if a.method == "floor_unstacked":
            # The floor with the peer's layout: one array per layer weight and the layer loop
            # unrolled, so that no layer's slice of a stacked array is copied for a library call.
            params = layout.convert(params, "per_layer")

        def floor(p, b):
            return jax.grad(lambda r: S.plain_loss(cfg, {**r, "layers": p["layers"]}, b,
                                                   loss_chunk=chunk)[0])(rest_of(p))
        floor = jax.jit(floor)
        step = lambda p, s, b: (p, s, {"loss": floor(p, b)})  # noqa: E731
    elif a.method == "full":
        state = opt.init(params)
        step = S.make_plain_step(cfg, opt, remat=plain_remat, loss_chunk=chunk)
    elif a.method == "lora":
        lora = lora_lib.init_lora(params["layers"], jax.random.key(2), a.lora_rank)
        state = (lora, opt.init(lora))
        step = S.make_lora_step(cfg, opt, lora_lib.lora_scale(a.lora_rank, None),
                                remat=plain_remat, loss_chunk=chunk)
    elif a.method == "eh":
        # The paper's "E+H": embedding, final norm and head trained with AdamW, every layer
        # frozen. The LISA stack with no slot: activation gradients only, no layer weight grad.
        state = opt.init(rest_of(params))
        no_slot = jnp.zeros((0,), jnp.int32)

        def eh_step(p, s, b):
            empty = jax.tree.map(lambda x: jnp.zeros((0,) + x.shape[1:], x.dtype), p["layers"])
            slot_L = layout.slot_of_layer(no_slot, cfg.num_layers)
            (loss, _), g = jax.value_and_grad(
                lambda r: S.lisa_loss(cfg, {**r, "layers": empty}, p["layers"], slot_L, b,
                                      remat, chunk), has_aux=True)(rest_of(p))
            updates, s = opt.update(g, s, rest_of(p))
            return {**p, **optax.apply_updates(rest_of(p), updates)}, s, {"loss": loss}
        step = jax.jit(eh_step, donate_argnums=(0, 1))
    elif a.method == "lisa":
        frozen = tuple(k for k in (getattr(a, "lisa_frozen", "") or "").split(",") if k)
        kw = dict(frozen=frozen) if frozen else {}  # only then: older packages lack frozen=
        if _granularity(a) != "layer":  # module-level sampling: each group draws γ layers
            kw["granularity"] = _granularity(a)
        tx = lisa_jax.lisa(opt, n_active=a.lisa_layers, interval=a.lisa_interval, key=0, **kw)
        state = tx.init(params)
        if a.layer_layout == "per_layer":
            params = layout.convert(params, "per_layer", donate=True)
        step = S.make_lisa_step(cfg, tx, remat=remat, loss_chunk=chunk)
    else:
        raise ValueError(a.method)
    params, state, _, (compile_s,) = time_steps(step, params, state, batch, 1)
    params, state, _, times = time_steps(step, params, state, batch, a.steps, a.warmup)
    t = statistics.median(times)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    if a.profile:
        profile_step(a, step, params, state, batch)
    return dict(impl="lisa_jax", label=getattr(a, "label", None), shape=a.shape,
                method=a.method, batch=a.batch_size, seq=a.max_seq_len,
                gamma=(a.lisa_layers if a.method == "lisa" else
                       0 if a.method == "eh" else None),
                lora_r=a.lora_rank if a.method == "lora" else None, remat=remat,
                step_s=round(t, 4), step_s_min=round(min(times), 4), ms=round(t * 1e3, 1),
                tokens_per_s=round(a.batch_size * a.max_seq_len / t, 1),
                peak_gib=round(peak / 2**30, 2) if peak else None, peak_bytes=peak,
                compile_s=round(compile_s, 1), dtype=cfg.dtype, jax=jax.__version__,
                loss_chunk=chunk, inner=a.inner,
                layout=a.layer_layout if a.method == "lisa" else None,
                granularity=_granularity(a) if a.method == "lisa" else None,
                frozen=(getattr(a, "lisa_frozen", "") or None) if a.method == "lisa" else None,
                update_precision=(None if a.method not in TRAINING else
                                  precision if sixteen_bit else "fp32"),
                master_weights=master, **_moment_dtypes(state),
                lisa_jax_dir=os.path.dirname(os.path.abspath(lisa_jax.__file__)),
                device=str(jax.devices()[0].device_kind))


def _moment_dtypes(state) -> dict:
    """The dtypes Adam's moments are kept in, read from the optimizer ``state`` (``None``
    where it has none: sgd, the rows without an optimizer)."""
    import jax
    import optax
    out = {}
    for name in ("mu", "nu"):
        found = optax.tree_utils.tree_get_all_with_path(state, name) if state is not None else []
        dtypes = sorted({leaf.dtype.name for _, sub in found for leaf in jax.tree.leaves(sub)})
        out[f"{name}_dtype"] = "/".join(dtypes) or None
    return out


def _granularity(a) -> str:
    """What the LISA rows sample: ``layer``, or module groups (``attn_mlp``, ``matrix``)."""
    return getattr(a, "lisa_granularity", None) or "layer"


def profile_step(a, step, params, state, batch, steps: int = 3):
    """Write a trace of ``steps`` steps (perfetto JSON; open in ui.perfetto.dev) and the
    optimized HLO of the step under ``a.profile``, to see where a step's time goes."""
    import jax

    name = f"{a.method}{a.lisa_layers if a.method == 'lisa' else ''}_{a.remat}"
    if a.method == "lisa" and a.layer_layout != "stacked":
        name += f"_{a.layer_layout}"
    if a.method == "lisa" and _granularity(a) != "layer":
        name += f"_{_granularity(a)}"
    hlo = step.lower(params, state, batch).compile().as_text() if hasattr(step, "lower") \
        else None
    profile_steps(a.profile, name, hlo,
                  lambda c: jax.block_until_ready(step(c[0], c[1], batch)), (params, state),
                  steps)


def plan(a) -> list[dict]:
    """Forward, floor, then every method without remat (LISA at every γ), then the remat
    variants (LISA at ``--remat-lisa-layers`` only: remat changes memory, not how it scales in
    γ)."""
    # Full FT and LoRA without layer remat keep the matmul outputs ("dots"), as LISA's "none"
    # does, and as the trainer does by default.
    rows = [dict(method="forward", remat="none"), dict(method="floor", remat="none"),
            dict(method="eh", remat="none"),
            dict(method="full", remat="dots"), dict(method="lora", remat="dots")]
    rows += [dict(method="lisa", gamma=g, remat="none", layout=lay)
             for lay in a.layer_layouts for g in a.lisa_layers]
    for remat in a.remats:
        if remat == "none":
            continue
        variants = []
        if remat == "full":
            variants += [dict(method="full", remat=remat), dict(method="lora", remat=remat)]
        variants += [dict(method="lisa", gamma=g, remat=remat, layout=lay)
                     for lay in a.layer_layouts for g in a.remat_lisa_layers]
        remat_methods = getattr(a, "remat_methods", None)
        rows += [r for r in variants if remat_methods is None or r["method"] in remat_methods]
    return rows


def peer_plan(a) -> list[dict]:
    """The peer's rows: each of ``--peer-methods`` without remat (LISA at
    ``--peer-lisa-layers``), then with ``--peer-remat`` those of ``--peer-remat-methods`` with
    remat (LISA at ``--remat-lisa-layers``); the forward has no remat row."""
    rows = []
    for remat in ([False, True] if a.peer_remat else [False]):
        for method in a.peer_methods:
            if remat and (method == "forward" or
                          (a.peer_remat_methods and method not in a.peer_remat_methods)):
                continue
            gammas = ((a.remat_lisa_layers if remat else a.peer_lisa_layers)
                      if method == "lisa" else [2])
            rows += [dict(method=method, gamma=g, remat=remat) for g in gammas]
    return rows


def peer_args(a, r: dict) -> list[str]:
    """The peer script's command line for one row of ``peer_plan``."""
    return [PEER_SCRIPT, "--shape", a.shape, "--method", r["method"],
            "--batch-size", str(a.batch_size), "--max-seq-len", str(a.max_seq_len),
            "--lisa-layers", str(r["gamma"]), "--lora-rank", str(a.lora_rank)] + \
        (["--remat", "full"] if r["remat"] else []) + \
        (["--steps", str(a.peer_steps)] if a.peer_steps else []) + \
        (["--warmup", str(a.peer_warmup)] if a.peer_warmup is not None else []) + \
        PEER_IMPLS[a.peer_impl]


def peer_row(a, row: dict) -> dict:
    """A peer script's JSON line with the fields our rows carry."""
    row = {"impl": "torch", "label": a.label, **row}
    row.setdefault("liger", a.peer_impl == "liger")
    row.setdefault("compile", a.peer_impl == "compile")
    row["update_precision"] = "bf16"  # pure bf16 weights, fused AdamW (no fp32 master)
    row["ms"] = round(row["step_s"] * 1e3, 1)
    return row


def peer_name(p: dict) -> str:
    return "liger" if p.get("liger") else "compile" if p.get("compile") else "eager"


def table(rows: list[dict], peers: list[dict]) -> str:
    def peer_for(r):
        for p in peers:
            layer_remat = r["remat"] not in ("none", "dots")  # the peer's remat flag
            if p["method"] == r["method"] and p.get("remat") == layer_remat and \
                    (r["method"] != "lisa" or p.get("gamma") == r.get("gamma")):
                return p
        return None
    def method_of(r):  # module-level LISA rows name their granularity
        return r["method"] + (f"/{r['granularity']}" if r.get("granularity") not in
                              (None, "layer") else "")
    w = max([8] + [len(method_of(r)) for r in rows])
    out = [f"peer: torch {peer_name(peers[0])}"] if peers else []
    out += [f"{'method':{w}s} {'layout':9s} {'γ/r':>4s} {'remat':>5s} {'upd':>4s} {'step ms':>8s} "
            f"{'tok/s':>9s} {'peak GiB':>8s} | {'peer tok/s':>10s} {'peer GiB':>8s} "
            f"{'speed×':>6s} {'mem×':>5s}"]
    for r in rows:
        p = peer_for(r)
        g = r.get("gamma") or r.get("lora_r") or ""
        line = (f"{method_of(r):{w}s} {r.get('layout') or '':9s} {str(g):>4s} {r['remat']:>5s} "
                f"{r.get('update_precision') or '':>4s} {r['step_s'] * 1e3:8.1f} "
                f"{r['tokens_per_s']:9.0f} {r['peak_gib'] or float('nan'):8.2f} | ")
        if p:
            mem = (r["peak_gib"] / p["peak_gib"] if r.get("peak_gib") and p.get("peak_gib")
                   else float("nan"))
            line += (f"{p['tokens_per_s']:10.0f} {p['peak_gib'] or float('nan'):8.2f} "
                     f"{r['tokens_per_s'] / p['tokens_per_s']:6.2f} {mem:5.2f}")
        out.append(line)
    for p in peers:
        if not any(peer_for(r) is p for r in rows):
            out.append(f"peer {p['method']:8s} γ={p.get('gamma')} remat={p.get('remat')}: "
                       f"{p['step_s'] * 1e3:.1f} ms, {p['tokens_per_s']:.0f} tok/s, "
                       f"{p['peak_gib']} GiB")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_flags(ap, shape="tiny", batch_size=4, max_seq_len=1024, steps=10)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    add_flags(ap, lisa_interval=5, lisa_layers=[1, 2, 4, 8], many=("lisa_layers",),
              helps=dict(lisa_interval="LISA K: resamples happen in timing",
                         lisa_layers="γ of the LISA rows (with --one: the one γ)"))
    add_flags(ap, remat=["none", "mlp", "full"], many=("remat",),
              helps=dict(remat="LISA: none qkv mlp full; full FT and LoRA rows use per-layer remat"))
    ap.add_argument("--remat-lisa-layers", type=int, nargs="+", default=[2],
                    help="γ of the LISA rows with the --remats variants")
    ap.add_argument("--remat-methods", nargs="+", default=None,
                    help="only these methods get the --remats variants (default: full lora "
                         "lisa; full FT and LoRA have one, remat full)")
    add_flags(ap, layer_layout=["per_layer"], many=("layer_layout",),
              helps=dict(layer_layout="LISA rows: layer weights as one array per layer (the "
                                      "trainer's on one device) and/or stacked [L, ...] arrays"))
    add_flags(ap, lora_rank=128)
    ap.add_argument("--inner", default="adamw", choices=["adamw", "sgd"],
                    help="optimizer of the training rows (sgd: to isolate AdamW's cost)")
    ap.add_argument("--loss-chunk", type=int, default=S_LOSS_CHUNK,
                    help="tokens per chunk of the LM loss (0: no chunking)")
    add_flags(ap, dtype=None, update_dtype="bfloat16",
              helps=dict(dtype="dtype of the parameters (default: bfloat16 on an accelerator)"))
    ap.add_argument("--lisa-frozen", default="",
                    help="LISA rows: comma-separated parameters outside the layers that stay "
                         "frozen (lisa(frozen=...): no optimizer state, no gradient), e.g. "
                         "embed; the trainer's --lisa-always names what trains instead")
    ap.add_argument("--lisa-granularity", default="layer",
                    choices=["layer", "attn_mlp", "matrix"],
                    help="LISA rows: what is sampled, whole layers or module groups (each "
                         "group draws its own γ layers; lisa(granularity=...))")
    ap.add_argument("--mu-dtype", default=None, choices=["bfloat16", "float32"],
                    help="dtype of AdamW's first moment (default: that of what it updates)")
    ap.add_argument("--nu-dtype", default="float32", choices=["bfloat16", "float32"],
                    help="dtype of AdamW's second moment (bfloat16: stochastically rounded)")
    ap.add_argument("--label", default=None,
                    help="free text copied into every row (e.g. before / after)")
    add_flags(ap, method=None, many=("method",), choices=dict(method=METHODS),
              helps=dict(method="restrict to these methods"))
    ap.add_argument("--peer", action="store_true", help="also run the PyTorch peer")
    ap.add_argument("--peer-only", action="store_true",
                    help="run only the peer's rows (implies --peer)")
    ap.add_argument("--peer-impl", default="liger", choices=sorted(PEER_IMPLS),
                    help="the peer: transformers with Liger kernels, torch.compile or eager")
    ap.add_argument("--peer-methods", nargs="+", default=["forward", "full", "lora", "lisa"])
    ap.add_argument("--peer-remat", action="store_true", help="peer rows with remat too")
    ap.add_argument("--peer-remat-methods", nargs="+", default=None,
                    help="with --peer-remat: only these methods (default: all but forward)")
    ap.add_argument("--peer-lisa-layers", type=int, nargs="+", default=[2],
                    help="γ of the peer's LISA rows")
    ap.add_argument("--peer-steps", type=int, default=None,
                    help="timed steps of the peer (default: the peer script's)")
    ap.add_argument("--peer-warmup", type=int, default=None,
                    help="untimed steps of the peer (default: the peer script's)")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", default=None,
                    help="folder: also write a trace and the optimized HLO of each row's step")
    ap.add_argument("--one", action="store_true",
                    help="run one row in this process: --method, --lisa-layers, --remat, "
                         "--layer-layout")
    add_flags(ap, method="lisa", remat="none", layer_layout="per_layer",
              helps=dict(method=argparse.SUPPRESS, remat=argparse.SUPPRESS,
                         layer_layout=argparse.SUPPRESS))
    a = ap.parse_args()
    if a.one:
        if len(a.lisa_layers) != 1:
            ap.error("--one takes one --lisa-layers")
        a.lisa_layers = a.lisa_layers[0]
        print(json.dumps(run_one(a)), flush=True)
        return
    common = forward_flags(a, "shape", "batch_size", "max_seq_len", "steps", "warmup",
                           "lisa_interval", "lora_rank", "loss_chunk", "inner", "update_dtype",
                           "mu_dtype", "nu_dtype", "lisa_frozen", "lisa_granularity", "label",
                           "dtype", "profile")
    a.peer = a.peer or a.peer_only
    if a.peer and a.peer_impl == "liger" and importlib.util.find_spec("liger_kernel") is None:
        sys.exit("--peer-impl liger: liger_kernel is not importable (pip install --no-deps "
                 "liger-kernel==0.8.5, or put its folder on PYTHONPATH); or --peer-impl eager")
    rows, peers, failed = [], [], []

    def save():  # after every row, so that a cut-off job keeps what it measured
        if a.out:
            write_json(a.out, dict(command=command_line(), date=time.strftime("%Y-%m-%d"),
                                   label=a.label, update_precision=PRECISION[a.update_dtype],
                                   peer_impl=a.peer_impl if a.peer else None,
                                   rows=rows, peer_rows=peers, failed=failed))

    def failure(spec: dict, impl: str, got: dict):  # an OOM or another failure, kept
        failed.append(dict(impl=impl, label=a.label, shape=a.shape, **spec,
                           status=got["status"]))
        save()

    for r in ([] if a.peer_only else plan(a)):
        if a.methods and r["method"] not in a.methods:
            continue
        args = [__file__, "--one", "--method", r["method"], "--remat", r["remat"],
                "--lisa-layers", str(r.get("gamma", 2)),
                "--layer-layout", r.get("layout", "stacked"), *common]
        row = spawn_row(args, a.timeout)
        if "status" not in row:
            print(json.dumps(row), flush=True)
            rows.append(row)
            save()
        else:
            failure(r, "lisa_jax", row)
    if a.peer:
        for r in peer_plan(a):
            row = spawn_row(peer_args(a, r), a.timeout)
            if "status" not in row:
                row = peer_row(a, row)
                print(json.dumps(row), flush=True)
                peers.append(row)
                save()
            else:
                failure(r, "torch", row)
    print(table(rows, peers), flush=True)
    for f in failed:
        print(f"{f['status']}: {f['impl']} {f['method']} γ={f.get('gamma')} "
              f"remat={f['remat']}", flush=True)


if __name__ == "__main__":
    main()
