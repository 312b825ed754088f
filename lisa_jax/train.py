"""The fine-tuning loop: config, data, steps, progress, metrics, checkpoints, resume, export.

``train(TrainConfig(...))`` is what ``lisa-jax train`` runs. A run directory holds::

    config.yaml        the resolved configuration
    metrics.jsonl      one line per logged step (and per evaluation)
    tb/                TensorBoard event files (when tensorboardX is installed)
    checkpoints/       orbax checkpoints: parameters, optimizer state (with the LISA sampler's
                       key and active layers), data position, step
    hf/                the fine-tuned model as an HF directory (at the end)

Everything that decides the run's future is in the checkpoint, so ``--resume`` continues the
same run: same batches, same sampled layers, bit-identical parameters.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import resource
import shutil
import signal
import sys
import time
import typing
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from lisa_jax import data as data_lib
from lisa_jax import importance as imp_lib
from lisa_jax import layer_list
from lisa_jax import lora as lora_lib
from lisa_jax import model as M
from lisa_jax import step as step_lib
from lisa_jax.lisa import active_layers, lisa
from lisa_jax.precision import master_weights

DEMO_DIR = Path(__file__).parent / "demo"
METHODS = ("lisa", "full", "lora")
SCHEDULES = ("cosine", "linear", "constant")
LAYER_LAYOUTS = ("auto", "per_layer", "stacked")


class TrainError(Exception):
    """A problem with the user's input or run directory: printed as one line, no traceback."""


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run; each is also a ``--flag`` (underscores become dashes)."""

    model: str | None = None            # an HF model directory
    data: str | None = None             # a JSON/JSONL instruction file
    out: str = "runs/run"               # the run directory
    demo: bool = False                  # the bundled tiny model and instruction set
    method: str = "lisa"                # lisa | full | lora
    # LISA
    lisa_layers: int = 2                # γ: layers trained at a time
    lisa_interval: int = 20             # K: steps between resamples
    lisa_probs: str | None = None       # per-layer probabilities: a file or "p0,p1,..."
    lisa_reset: str = "sampled"         # sampled | all
    lisa_importance: str = "none"       # none | online: p_ℓ from running per-layer grad norms
    lisa_importance_floor: float = 0.05  # online: least probability per layer (at most γ/L)
    lisa_importance_decay: float = 0.9  # online: moving-average decay of the grad norms
    # LoRA
    lora_rank: int = 16
    lora_alpha: float | None = None     # default 2 * rank
    lora_targets: str = ",".join(lora_lib.DEFAULT_TARGETS)
    # optimization
    lr: float = 1e-5
    schedule: str = "cosine"            # cosine | linear | constant, after linear warmup
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    clip_norm: float = 1.0              # 0 disables
    grad_accum: int = 1
    batch_size: int = 8
    max_seq_len: int = 512
    truncate: bool = False              # cut over-long examples instead of dropping them
    steps: int | None = None            # total optimizer steps; default: from epochs
    epochs: float = 1.0
    seed: int = 0
    dtype: str = "float32"              # float32 | bfloat16
    # float32: trained parameters are updated with float32 precision (for bfloat16 parameters,
    # lisa_jax.precision keeps 16 more bits of each trained parameter: 2 bytes each);
    # bfloat16: plain bfloat16 updates, which lose every step under half a bfloat16 spacing.
    update_dtype: str = "float32"
    # LISA: none | mlp | full; full/LoRA: none | dots | full. Default: LISA none (its own
    # backward keeps the matmul outputs), full/LoRA dots (plain autodiff keeping the matmul
    # outputs: at LLaMA-2-7B shape 19 GiB leaner than keeping everything, and no slower).
    remat: str | None = None
    # LISA on one device: auto | per_layer | stacked. per_layer trains on one array per layer
    # weight (lisa_jax.layer_list), which spares a GPU the copies of stacked slices (LLaMA-2-7B
    # on an H200: 227 -> 213 ms a step); auto picks it on a GPU. Checkpoints and exports are
    # stacked either way.
    layer_layout: str = "auto"
    mesh: str | None = None             # several devices: "fsdp=N,tp=M" (also dp=N); None: one
    # several hosts: one process per host, joined by jax.distributed.initialize (the three
    # below left None: detected from the cluster, e.g. SLURM, Open MPI, Kubernetes, Cloud TPU)
    distributed: bool = False
    coordinator_address: str | None = None  # "host:port" of process 0
    num_processes: int | None = None
    process_id: int | None = None
    # evaluation, logging, checkpoints
    eval_fraction: float = 0.05
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 1
    save_every: int = 100
    keep_checkpoints: int = 2
    export: bool = True                 # write the HF directory at the end
    sample_prompt: str | None = None    # an instruction to generate for at the end
    sample_tokens: int = 48
    progress: bool = True
    resume: bool = False
    overwrite: bool = False

    @classmethod
    def fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}


# Settings for `--demo`: the bundled model (4 layers) learns the instruction format in about
# half a minute of CPU time. Flags given on the command line still win.
DEMO_PRESET = dict(model=str(DEMO_DIR / "model"), data=str(DEMO_DIR / "instructions.jsonl"),
                   method="lisa", lisa_layers=2, lisa_interval=20, lr=3e-3, warmup_steps=20,
                   schedule="cosine", weight_decay=0.0, batch_size=16, max_seq_len=128,
                   steps=300, eval_every=100, eval_batches=4, save_every=100, log_every=1)


def load_config(path: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults < demo preset (with ``demo``) < YAML file < ``overrides`` (the command line)."""
    values: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise TrainError(f"config file {path!r} not found")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise TrainError(f"config file {path!r} is not valid YAML: {e}".splitlines()[0])
        if not isinstance(loaded, dict):
            raise TrainError(f"config file {path!r} must hold a mapping of settings")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    values.update(overrides or {})
    unknown = sorted(set(values) - set(TrainConfig.fields()))
    if unknown:
        raise TrainError(f"unknown setting(s) {', '.join(unknown)}; see `lisa-jax train --help`")
    values = {k: _typed(k, v) for k, v in values.items()}
    if values.get("demo"):
        values = {**DEMO_PRESET, **values}
    return TrainConfig(**values)


def setting_type(name: str) -> tuple[type, bool]:
    """``(type, whether None is allowed)`` of setting ``name``: ``(int, True)`` for
    ``int | None``."""
    hint = typing.get_type_hints(TrainConfig)[name]
    args = typing.get_args(hint)
    rest = [a for a in args if a is not type(None)]
    return (rest[0] if rest else hint), type(None) in args


def _typed(name: str, value):
    """``value`` as the type of setting ``name``: YAML reads ``1e-5`` (no dot) and quoted
    numbers as strings, which are converted here; what cannot be converted is a one-line
    error naming the flag."""
    tp, optional = setting_type(name)
    flag = "--" + name.replace("_", "-")
    if value is None:
        if optional:
            return None
        raise TrainError(f"{flag} needs a value (got an empty setting)")
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).strip().lower() in ("true", "yes", "on", "1"):
                return True
            if str(value).strip().lower() in ("false", "no", "off", "0"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            number = float(value) if isinstance(value, str) else value
            if float(number) != int(number):
                raise ValueError
            return int(number)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError, OverflowError):
        kind = {bool: "true or false", int: "a whole number", float: "a number"}.get(tp, "text")
        raise TrainError(f"{flag} takes {kind}, got {value!r}")
    return value


# ----------------------------------------------------------------------------- validation


def with_default_remat(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``remat`` filled in for its method when not given."""
    if cfg.remat is not None:
        return cfg
    return dataclasses.replace(cfg, remat="none" if cfg.method == "lisa" else "dots")


def _check_config(cfg: TrainConfig) -> None:
    """``cfg`` (its remat already resolved by ``with_default_remat``) is usable."""
    if cfg.method not in METHODS:
        raise TrainError(f"unknown method {cfg.method!r}; use --method lisa, full or lora")
    if cfg.schedule not in SCHEDULES:
        raise TrainError(f"unknown schedule {cfg.schedule!r}; use one of {', '.join(SCHEDULES)}")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise TrainError(f"unknown dtype {cfg.dtype!r}; use --dtype float32 or bfloat16")
    if cfg.update_dtype not in ("float32", "bfloat16"):
        raise TrainError(f"unknown --update-dtype {cfg.update_dtype!r}; use float32 or bfloat16")
    if cfg.update_dtype == "bfloat16" and cfg.dtype != "bfloat16":
        raise TrainError("--update-dtype bfloat16 is for --dtype bfloat16 runs; drop it (a "
                         "float32 model is updated in float32)")
    modes = step_lib.REMAT_MODES if cfg.method == "lisa" else tuple(M.REMAT_POLICIES)
    if cfg.remat not in modes:
        raise TrainError(f"--remat {cfg.remat} is not a mode of --method {cfg.method}; use one "
                         f"of {', '.join(modes)}")
    for name in ("batch_size", "grad_accum", "max_seq_len", "lisa_interval", "log_every",
                 "eval_every", "save_every", "eval_batches"):
        if getattr(cfg, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.layer_layout not in LAYER_LAYOUTS:
        raise TrainError(f"unknown --layer-layout {cfg.layer_layout!r}; use one of "
                         f"{', '.join(LAYER_LAYOUTS)}")
    if cfg.layer_layout == "per_layer" and (cfg.method != "lisa" or cfg.mesh or cfg.distributed):
        raise TrainError("--layer-layout per_layer is for --method lisa on one device; drop it "
                         "(or use --layer-layout stacked) with other methods or with --mesh")
    if cfg.steps is not None and cfg.steps < 1:
        raise TrainError("--steps must be at least 1")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise TrainError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.steps is None and not (math.isfinite(cfg.epochs) and cfg.epochs > 0):
        raise TrainError(f"--epochs must be positive, got {cfg.epochs} (or give --steps N)")
    if not cfg.model:
        raise TrainError("no model given; pass --model DIR (an HF model directory) or --demo")
    if not cfg.data:
        raise TrainError("no data given; pass --data FILE (JSON/JSONL instructions) or --demo")
    if not Path(cfg.model, "config.json").is_file():
        raise TrainError(f"model directory {cfg.model!r} has no config.json; pass --model DIR "
                         "of an HF model (config.json, *.safetensors, tokenizer files)")
    if not Path(cfg.data).is_file():
        raise TrainError(f"data file {cfg.data!r} not found; pass --data FILE (JSON or JSONL)")


def parse_probs(spec: str, num_layers: int) -> list[float]:
    """``--lisa-probs``: a file (JSON list, JSON ``{"probs": [...]}`` as written by
    ``importance.save_probs``, or whitespace/comma separated) or ``"p0,p1,..."``."""
    text = Path(spec).read_text() if Path(spec).is_file() else spec
    try:
        probs = json.loads(text) if text.strip().startswith(("[", "{")) else \
            [float(x) for x in text.replace(",", " ").split()]
        if isinstance(probs, dict):
            probs = probs["probs"]
    except (ValueError, KeyError, TypeError):
        raise TrainError(f"--lisa-probs {spec!r} is neither a file nor a list of numbers")
    if len(probs) != num_layers:
        raise TrainError(f"--lisa-probs has {len(probs)} values but the model has {num_layers} "
                         "layers; give one probability per layer")
    return [float(p) for p in probs]


# Settings a resumed run keeps: they decide what its checkpoint's state means and which
# batches come next. The others (steps or epochs, the optimizer's hyperparameters, e.g. a
# lower --lr after a divergence, evaluation, saving, logging, remat, layout, devices) may
# change on --resume; each change is printed and saved in config.yaml.
FIXED_ON_RESUME = (
    "model", "data", "method", "lisa_layers", "lisa_interval", "lisa_probs", "lisa_reset",
    "lisa_importance", "lisa_importance_floor", "lisa_importance_decay", "lora_rank",
    "lora_alpha", "lora_targets", "grad_accum", "batch_size", "max_seq_len", "truncate",
    "seed", "dtype", "update_dtype", "eval_fraction")


def resume_changes(cfg: TrainConfig, out: Path) -> dict[str, tuple]:
    """``{setting: (saved, given)}`` where ``cfg`` differs from the run's saved config.yaml;
    a setting of ``FIXED_ON_RESUME`` that differs is a one-line error (nothing is written)."""
    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        return {}
    saved = with_default_remat(load_config(str(saved_path)))
    changes = {}
    for name in TrainConfig.fields():
        old, new = getattr(saved, name), getattr(cfg, name)
        if name in ("model", "data") and old and new:
            same = Path(old).resolve() == Path(new).resolve()
        else:
            same = old == new
        if same or name in ("resume", "overwrite"):
            continue
        flag = "--" + name.replace("_", "-")
        if name in FIXED_ON_RESUME:
            raise TrainError(f"{flag} cannot change when resuming (the run in {out} has "
                             f"{old!r}, given {new!r}); drop {flag}, or start a new run in "
                             "another --out")
        changes[name] = (old, new)
    return changes


def _prepare_out_dir(cfg: TrainConfig) -> Path:
    """Check and create the run directory. Several processes: every one checks (so all raise
    the same error), then process 0 alone clears and creates it while the others wait."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file; pass --out a directory (new or a run's)")
    has_run = (out / "config.yaml").exists() or (out / "checkpoints").exists()
    if has_run and not (cfg.resume or cfg.overwrite):
        raise TrainError(f"{out} holds another run; pass --resume to continue it or "
                         "--overwrite to replace it")
    if cfg.resume and not has_run:
        raise TrainError(f"nothing to resume in {out}; drop --resume to start a new run")
    _barrier(cfg, "checked the run directory")
    if _is_main(cfg):
        if cfg.overwrite and not cfg.resume and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    _barrier(cfg, "created the run directory")
    return out


def _is_main(cfg: TrainConfig) -> bool:
    """Process 0 writes the run's files and prints; with one process, always."""
    return not cfg.distributed or jax.process_index() == 0


def _barrier(cfg: TrainConfig, name: str) -> None:
    if cfg.distributed and jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _init_distributed(cfg: TrainConfig) -> None:
    """Join the other hosts' processes (``--distributed``), before JAX touches a device."""
    if not cfg.distributed or jax.distributed.is_initialized():
        return
    try:
        jax.distributed.initialize(coordinator_address=cfg.coordinator_address,
                                   num_processes=cfg.num_processes, process_id=cfg.process_id)
    except (ValueError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainError(f"--distributed could not join the other processes ({msg[:200]}); "
                         "give --coordinator-address, --num-processes and --process-id, or "
                         "start under a cluster launcher JAX detects (SLURM, Open MPI, ...)")


# ----------------------------------------------------------------------------- pieces


def make_schedule(cfg: TrainConfig, total_steps: int):
    warm = min(cfg.warmup_steps, max(total_steps - 1, 0))
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(cfg.lr, end, max(total_steps - warm, 1))
    else:
        main = optax.cosine_decay_schedule(cfg.lr, max(total_steps - warm, 1),
                                           alpha=cfg.min_lr_ratio)
    if warm == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), main], [warm])


def per_layer_layout(cfg: TrainConfig) -> bool:
    """Whether the run trains on per-layer arrays (``--layer-layout``; auto: LISA on one GPU,
    where the stacked layout costs a copy of a layer's slice before each library call)."""
    if cfg.layer_layout != "auto":
        return cfg.layer_layout == "per_layer"
    return (cfg.method == "lisa" and not cfg.mesh and not cfg.distributed
            and jax.default_backend() == "gpu")


def _init_state(init, params, mcfg, mesh, traceable=True, lora=False):
    """``(init(params), step shardings)``: on a mesh the state is created in its shardings
    (``lisa_jax.sharding``), else as is with ``None``."""
    if mesh is None:
        return init(params), None
    from lisa_jax import sharding as SH
    if lora:
        return SH.init_lora_sharded(init, params, mcfg, mesh)
    return SH.init_sharded(init, params, mcfg, mesh, traceable)


class Method:
    """One training method's state and compiled functions, behind one interface."""

    def __init__(self, cfg: TrainConfig, mcfg: M.LlamaConfig, params, schedule, mesh=None):
        self.cfg, self.mcfg = cfg, mcfg
        # bfloat16 runs keep Adam's first moment in bfloat16 (b1 = 0.9 moves it by a tenth a
        # step, far above its rounding) and the second in float32 (b2 = 0.999 moves it by a
        # thousandth, which bfloat16 rounds away): see experiments/results/precision_h200.
        mu_dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else None
        inner = optax.adamw(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, mu_dtype=mu_dtype,
                            weight_decay=cfg.weight_decay, mask=M.weight_decay_mask)
        if cfg.dtype == "bfloat16" and cfg.update_dtype == "float32":
            inner = master_weights(inner)
        clip = cfg.clip_norm or None
        # LISA clips by the norm of the trained gradients (the transform's clip_norm); full
        # FT and LoRA train everything their gradient tree holds.
        clipped = optax.chain(optax.clip_by_global_norm(clip), inner) if clip else inner
        remat = with_default_remat(cfg).remat
        self.tx = None
        self.importance = None  # online importance estimate (--lisa-importance online)
        self.log_extra: dict = {}  # logged with the next step's metrics (layer_probs)
        if cfg.lisa_importance not in ("none", "online"):
            raise TrainError(f"unknown --lisa-importance {cfg.lisa_importance!r}; use none or "
                             "online")
        if cfg.method == "lisa":
            kw = dict(interval=cfg.lisa_interval, key=cfg.seed, reset=cfg.lisa_reset,
                      clip_norm=clip)
            if cfg.lisa_probs:
                kw["probs"] = parse_probs(cfg.lisa_probs, mcfg.num_layers)
            else:
                if not 1 <= cfg.lisa_layers <= mcfg.num_layers:
                    raise TrainError(f"--lisa-layers {cfg.lisa_layers} is out of range: the "
                                     f"model has {mcfg.num_layers} layers; use 1 to "
                                     f"{mcfg.num_layers}")
                kw["n_active"] = cfg.lisa_layers
            try:
                if cfg.lisa_importance == "online":  # Bernoulli mode, from uniform γ/L
                    L = mcfg.num_layers
                    kw.setdefault("probs", [cfg.lisa_layers / L] * L)
                    kw.pop("n_active", None)
                    self.importance = imp_lib.OnlineImportance(
                        L, cfg.lisa_layers, cfg.lisa_importance_floor, cfg.lisa_importance_decay)
                self.tx = lisa(inner, **kw)
            except ValueError as e:
                raise TrainError(str(e))
            self.state, sh = _init_state(self.tx.init, params, mcfg, mesh,
                                         traceable=self.tx.config.probs is None)
            self.step_fn = step_lib.make_lisa_step(mcfg, self.tx, remat, shardings=sh)
        elif cfg.method == "full":
            self.state, sh = _init_state(clipped.init, params, mcfg, mesh)
            self.step_fn = step_lib.make_plain_step(mcfg, clipped, remat, shardings=sh)
        else:
            targets = tuple(t for t in cfg.lora_targets.split(",") if t)
            def init(p):
                adapters = lora_lib.init_lora(p["layers"], jax.random.key(cfg.seed),
                                              cfg.lora_rank, targets=targets)
                return adapters, clipped.init(adapters)
            try:
                self.state, sh = _init_state(init, params, mcfg, mesh, lora=True)
            except ValueError as e:
                raise TrainError(str(e))
            self.lora_scale = lora_lib.lora_scale(cfg.lora_rank, cfg.lora_alpha)
            self.step_fn = step_lib.make_lora_step(mcfg, clipped, self.lora_scale, remat,
                                                   shardings=sh)
        self._eval = jax.jit(lambda p, b: step_lib.plain_loss(mcfg, p, b))

    def before_step(self, params):
        """Host-side work before a step: Bernoulli LISA resamples here (its shapes change),
        with the online importance estimate's probabilities when there is one."""
        if self.tx is not None and self.tx.config.probs is not None:
            count, period = int(self.state.count), int(self.state.period)
            starts = count // self.tx.config.interval != period
            probs = self.importance.probs() if self.importance is not None and starts else None
            if starts or count == 0:
                used = probs if probs is not None else self.tx.config.probs
                self.log_extra["layer_probs"] = [round(float(p), 6) for p in used]
            self.state = self.tx.maybe_resample(self.state, layer_list.stacked_template(params),
                                                probs)

    def active(self) -> list[int] | None:
        if self.tx is None:
            return None
        return [int(i) for i in np.asarray(active_layers(self.state))]

    def model_params(self, params):
        """The parameters to evaluate, sample from and export (LoRA merged in)."""
        if self.cfg.method == "lora":
            return lora_lib.merge_lora(params, self.state[0], self.lora_scale)
        return params

    def eval_loss(self, params, batches) -> float:
        p = self.model_params(params)
        total = n = 0.0
        for b in batches:
            loss, cnt = self._eval(p, {"input_ids": b["input_ids"], "loss_mask": b["loss_mask"]})
            total += float(loss) * float(cnt)
            n += float(cnt)
        return total / max(n, 1.0)


def _stack_micro(batches: list[dict]) -> dict:
    """``A`` loader batches as one ``[A, B, S]`` batch (padded to the longest ``S``)."""
    if len(batches) == 1:
        return {"input_ids": batches[0]["input_ids"], "loss_mask": batches[0]["loss_mask"]}
    S = max(b["input_ids"].shape[1] for b in batches)

    def pad(x):  # right padding: under causal attention no real token sees it
        return np.pad(x, ((0, 0), (0, S - x.shape[1])))
    ids = np.stack([pad(b["input_ids"]) for b in batches])
    mask = np.stack([pad(b["loss_mask"]) for b in batches])
    return {"input_ids": ids, "loss_mask": mask}


class _Checkpoints:
    """orbax ``CheckpointManager`` over (params, optimizer state leaves, JSON metadata).

    The optimizer state is stored as its list of leaves and rebuilt with the tree structure of a
    fresh state: the structure never changes, while the shapes may (Bernoulli LISA samples a
    different number of layers per period), so no shaped template is needed to restore it.
    """

    def __init__(self, directory: Path, keep: int):
        import orbax.checkpoint as ocp
        self.ocp = ocp
        self.dir = directory
        self.mngr = ocp.CheckpointManager(
            directory.absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False))

    def latest(self) -> int | None:
        return self.mngr.latest_step()

    def save(self, step: int, params, opt_state, meta: dict) -> None:
        ocp = self.ocp
        leaves = {f"{i:06d}": x for i, x in enumerate(jax.tree.leaves(opt_state))}
        # orbax refuses zero-size arrays, which Bernoulli LISA's state holds in a period with
        # no sampled layer: their shapes go into the metadata instead.
        empty = {k: [list(x.shape), str(x.dtype)] for k, x in leaves.items() if x.size == 0}
        leaves = {k: x for k, x in leaves.items() if k not in empty}
        meta = {**meta, "empty_opt_leaves": empty}
        self.mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt=ocp.args.StandardSave(leaves),
            meta=ocp.args.JsonSave(meta)), force=True)
        self.mngr.wait_until_finished()

    def restore(self, step: int, params_like, opt_like):
        ocp = self.ocp
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, params_like)
        try:
            out = self.mngr.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract),
                opt=ocp.args.StandardRestore(),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types for damaged directories
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrainError(f"checkpoint {self.dir / str(step)} cannot be read ({msg[:200]}); "
                             "delete that step directory to fall back to an earlier one, or "
                             "start again with --overwrite")
        treedef = jax.tree.structure(opt_like)
        stored = {k: jnp.asarray(v) for k, v in out["opt"].items()}
        for k, (shape, dtype) in out["meta"].pop("empty_opt_leaves", {}).items():
            stored[k] = jnp.zeros(shape, dtype)
        leaves = [stored[k] for k in sorted(stored)]
        if len(leaves) != treedef.num_leaves:
            raise TrainError(f"checkpoint {self.dir / str(step)} holds an optimizer state of "
                             f"another method or model ({len(leaves)} leaves, expected "
                             f"{treedef.num_leaves}); resume with the run's own settings")
        return out["params"], jax.tree.unflatten(treedef, leaves), out["meta"]


class _Writer:
    """metrics.jsonl, plus TensorBoard scalars when tensorboardX is available."""

    def __init__(self, out: Path):
        self.f = open(out / "metrics.jsonl", "a")
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(out / "tb"))
        except ImportError:
            self.tb = None

    def write(self, step: int, row: dict) -> None:
        self.f.write(json.dumps({"step": step, **row}) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()


class _NoWriter:
    """The writer of the processes other than 0."""

    def write(self, step: int, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _peak_memory_gib() -> tuple[float | None, str]:
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30, "device"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "host RSS"


def _sample_probes(cfg: TrainConfig) -> list[tuple[dict, str | None]]:
    """Instructions to generate for before and after training: ``--sample-prompt``, or for the
    demo the first held-out records (with their reference answers)."""
    if cfg.sample_prompt:
        return [({"instruction": cfg.sample_prompt}, None)]
    if not cfg.demo:
        return []
    _, held_out = data_lib.train_eval_split(data_lib.load_records(cfg.data),
                                            cfg.eval_fraction or None, seed=cfg.seed)
    return [({"instruction": r["instruction"], "input": r.get("input", "")}, r["output"])
            for r in held_out[:3]]


def _show(record: dict) -> str:
    return repr(record["instruction"] + (f" | {record['input']}" if record.get("input") else ""))


def prompt_ids(tokenizer, record: dict | str) -> np.ndarray:
    """The tokens of an instruction (or an Alpaca record without output) rendered exactly as
    in training, up to the response."""
    record = {"instruction": record} if isinstance(record, str) else record
    ex = data_lib.tokenize_record(tokenizer, {**record, "output": ""})
    first_target = int(np.argmax(ex.loss_mask)) if ex.loss_mask.any() else len(ex.input_ids)
    return ex.input_ids[:first_target]


def sample(model: M.Model, tokenizer, record: dict | str, max_new_tokens: int,
           model_dir: str | None = None) -> str:
    """Greedy completion of one instruction (or Alpaca record), stopped at any of the model's
    stop ids (``generate.stop_token_ids``)."""
    from lisa_jax.generate import generate, stop_token_ids, truncate_at_stop
    prompt = prompt_ids(tokenizer, record)
    stop = stop_token_ids(model.cfg, tokenizer, model_dir)
    out = generate(model, prompt[None], max_new_tokens=max_new_tokens, eos_token_id=stop,
                   pad_token_id=tokenizer.pad_token_id)
    new = truncate_at_stop(np.asarray(out)[0, len(prompt):], stop)
    return tokenizer.decode(list(new), skip_special_tokens=True).strip()


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, halt_at: int | None = None) -> dict:
    """Run (or resume) a fine-tuning run; returns its summary.

    ``halt_at``: stop after that step as an interruption would (checkpoint, then return), for
    tests of resuming.
    """
    cfg = with_default_remat(cfg)
    if cfg.mesh or cfg.distributed:
        from lisa_jax import sharding as SH
        SH.order_cpu_collectives()  # before JAX's backends start
    _init_distributed(cfg)  # first: joining must come before JAX uses a device
    _check_config(cfg)
    with _run_lock(cfg):
        return _run(cfg, halt_at)


@contextlib.contextmanager
def _run_lock(cfg: TrainConfig):
    """Hold ``.<out>.lock`` beside the run directory (process 0) for the whole run, so that a
    second run into the same ``--out`` is refused, ``--overwrite`` included (the lock sits
    outside the directory it would delete). The lock is the kernel's: a dead process's lock
    is free again, so a stale lock file is simply taken over."""
    if not _is_main(cfg):
        yield
        return
    out = Path(cfg.out)
    path = out.parent / f".{out.name}.lock"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
    except OSError as e:
        raise TrainError(f"cannot create the run directory's lock {path} ({e.strerror}); pass "
                         "--out a directory you can write")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise TrainError(f"another lisa-jax train is running into {out} ({holder}); wait "
                             "for it to end, or pass another --out")
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the lock


def _run(cfg: TrainConfig, halt_at: int | None) -> dict:
    """``train`` once the settings are checked and the run directory is locked."""
    from tqdm.auto import tqdm

    from lisa_jax.hf import load_hf, save_hf

    out = _prepare_out_dir(cfg)
    changes = resume_changes(cfg, out) if cfg.resume else {}
    main_process = _is_main(cfg)

    def say(*a):
        if main_process:
            tqdm.write(" ".join(str(x) for x in a))
    for name, (old, new) in changes.items():
        say(f"resuming with --{name.replace('_', '-')} {new!r} (was {old!r})")

    # Data and model.
    try:
        tokenizer = data_lib.load_tokenizer(cfg.model)
        splits = data_lib.prepare_data(cfg.data, tokenizer, cfg.max_seq_len,
                                       eval_fraction=cfg.eval_fraction or None, seed=cfg.seed,
                                       truncate=cfg.truncate)
        mesh = None
        if cfg.mesh:
            from lisa_jax import sharding as SH
            mesh = SH.make_mesh(cfg.mesh)
            SH.check_batch_size(cfg.batch_size, mesh)
        model = load_hf(cfg.model, dtype=cfg.dtype,
                        shardings=SH.hf_shardings(cfg.model, mesh) if mesh else None)
        loader = data_lib.DataLoader(splits.train, cfg.batch_size, seed=cfg.seed,
                                     pad_id=tokenizer.pad_token_id, max_seq_len=cfg.max_seq_len)
    except (ValueError, FileNotFoundError) as e:
        raise TrainError(str(e).splitlines()[0])
    mcfg, params = model.cfg, model.params
    # A seeded sample across all lengths (not the shortest examples) when the set is larger.
    eval_sets = data_lib.eval_batches(splits.eval, cfg.batch_size, tokenizer.pad_token_id,
                                      cfg.max_seq_len, max_batches=cfg.eval_batches,
                                      seed=cfg.seed)
    # Greedy sampling runs on one device's copy of the model: skipped across processes.
    probes = [] if cfg.distributed and jax.process_count() > 1 else _sample_probes(cfg)
    steps_per_epoch = max(len(loader) // cfg.grad_accum, 1)
    total = cfg.steps or max(int(math.ceil(cfg.epochs * steps_per_epoch)), 1)
    schedule = make_schedule(cfg, total)
    method = Method(cfg, mcfg, params, schedule, mesh)

    # Resume or start.
    ckpts = _Checkpoints(out / "checkpoints", cfg.keep_checkpoints)
    start = 0
    if cfg.resume and ckpts.latest() is not None:
        start = ckpts.latest()
        params, method.state, meta = ckpts.restore(start, params, method.state)
        loader.load_state_dict(meta["data"])
        if method.importance is not None and meta.get("importance"):
            method.importance.load_state_dict(meta["importance"])
        say(f"resumed {out} at step {start}")
    elif cfg.resume:
        raise TrainError(f"no checkpoint in {out / 'checkpoints'} to resume; drop --resume")
    if main_process:
        with open(out / "config.yaml", "w") as f:
            yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)

    n_params = sum(x.size for x in jax.tree.leaves(params))
    say(f"model {cfg.model}: {mcfg.model_type}, {mcfg.num_layers} layers, "
        f"{n_params / 1e6:.1f}M parameters, {cfg.dtype}; method {cfg.method}"
        + (f" (γ={cfg.lisa_layers if not cfg.lisa_probs else 'p_ℓ'} of {mcfg.num_layers} "
           f"layers, resample every {cfg.lisa_interval} steps)" if cfg.method == "lisa" else ""))
    say(f"data {cfg.data}: {len(splits.train)} train / {len(splits.eval)} eval examples "
        f"({splits.stats.dropped_too_long} dropped as longer than {cfg.max_seq_len} tokens); "
        f"{total} steps of {cfg.batch_size}×{cfg.grad_accum} examples")

    if probes and start == 0:
        before = M.Model(mcfg, method.model_params(params))
        for record, _ in probes:
            text = sample(before, tokenizer, record, cfg.sample_tokens, cfg.model)
            say(f"before: {_show(record)} -> {text!r}")
        del before
    if per_layer_layout(cfg):
        params = layer_list.unstack(params, donate=True)

    # Ctrl-C / SIGTERM: finish the step, checkpoint, exit. A second signal exits at once.
    stop = {"signal": None}

    def on_signal(signum, frame):
        if stop["signal"] is not None:
            raise KeyboardInterrupt
        stop["signal"] = signum
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    writer = _Writer(out) if main_process else _NoWriter()
    bar = tqdm(total=total, initial=start, disable=not (cfg.progress and main_process),
               dynamic_ncols=True, desc=cfg.method)
    t_start = time.perf_counter()
    tokens_seen = 0
    last_saved = start if start else None
    status = "finished"
    step = start

    def save(step):
        nonlocal params
        meta = {"step": step, "data": loader.state_dict(), "method": cfg.method,
                "active_layers": method.active(),
                "importance": method.importance.state_dict() if method.importance else None}
        if not layer_list.is_per_layer(params):
            ckpts.save(step, params, method.state, meta)
            return
        # Checkpoints hold the canonical, stacked layout: restack on the device leaf by leaf
        # (one leaf of extra memory, a copy at memory bandwidth), save, and split again.
        params = layer_list.stack(params, donate=True)
        try:
            ckpts.save(step, params, method.state, meta)
        finally:
            params = layer_list.unstack(params, donate=True)

    try:
        while step < total:
            micro = [next(loader) for _ in range(cfg.grad_accum)]
            batch = _stack_micro(micro)
            if mesh is not None:
                batch = SH.shard_batch(batch, mesh)
            method.before_step(params)
            t0 = time.perf_counter()
            params, method.state, metrics = method.step_fn(params, method.state, batch)
            loss = float(metrics["loss"])  # synchronizes: the step is done
            dt = time.perf_counter() - t0
            step += 1
            if not math.isfinite(loss):
                status = "diverged"
                where = f"step {last_saved}" if last_saved else "no checkpoint yet"
                raise TrainError(f"loss is {loss} at step {step}; stopped without saving (last "
                                 f"good checkpoint: {where}); lower --lr or raise --clip-norm "
                                 "strictness")
            n_tok = int(sum(int(b["num_tokens"]) for b in micro))
            tokens_seen += n_tok
            active = method.active()
            if method.importance is not None:
                method.importance.observe(active, np.asarray(metrics["layer_grad_norms"]))
            extra, method.log_extra = method.log_extra, {}
            if step % cfg.log_every == 0 or step == total:
                row = {"loss": loss, "lr": float(schedule(step - 1)),
                       "grad_norm": float(metrics["grad_norm"]), "tokens": n_tok,
                       "tokens_per_s": n_tok / dt, "epoch": micro[-1]["epoch"]}
                if active is not None:
                    row["active_layers"] = active
                writer.write(step, {**row, **extra})
            elif extra:
                writer.write(step, {**extra, "active_layers": active})
            bar.update(1)
            bar.set_postfix_str(f"loss {loss:.3f} lr {float(schedule(step - 1)):.2e} "
                                f"{n_tok / dt:,.0f} tok/s"
                                + (f" layers {active}" if active is not None else ""))
            if eval_sets and (step % cfg.eval_every == 0 or step == total):
                ev = method.eval_loss(params, eval_sets)
                writer.write(step, {"eval_loss": ev})
                say(f"step {step}: eval loss {ev:.4f}")
            if step % cfg.save_every == 0 or step == total:
                save(step)
                last_saved = step
            if stop["signal"] is not None or (halt_at is not None and step >= halt_at):
                if last_saved != step:
                    save(step)
                    last_saved = step
                status = "interrupted"
                break
    finally:
        bar.close()
        writer.close()
        for s, h in handlers.items():
            signal.signal(s, h)

    elapsed = time.perf_counter() - t_start
    peak, peak_kind = _peak_memory_gib()
    summary = {"status": status, "steps": step, "time_s": round(elapsed, 1),
               "tokens": tokens_seen, "peak_memory_gib": round(peak, 2) if peak else None,
               "peak_memory_kind": peak_kind, "out": str(out)}
    if status == "interrupted":
        say(f"interrupted at step {step}: checkpoint saved in {out / 'checkpoints'}; continue "
            f"with --resume")
        return summary
    params = layer_list.stack(params, donate=True)  # sampling and export read stacked layers
    final = M.Model(mcfg, method.model_params(params))
    if cfg.export:
        summary["hf_dir"] = save_hf(final, out / "hf", tokenizer_from=cfg.model)
    if probes:
        summary["samples"] = [
            {"prompt": _show(record), "expected": expected,
             "output": sample(final, tokenizer, record, cfg.sample_tokens, cfg.model)}
            for record, expected in probes]
    if main_process:
        with open(out / "summary.json", "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def main_train(cfg: TrainConfig) -> int:
    """``lisa-jax train``: run and print the summary; one-line errors for bad input."""
    try:
        s = train(cfg)
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: {s['steps']} steps in {s['time_s']} s, {s['tokens']:,} tokens, peak "
          f"{s['peak_memory_kind']} memory {s['peak_memory_gib']} GiB")
    if "hf_dir" in s:
        print(f"exported: {s['hf_dir']}")
    for smp in s.get("samples", []):
        expected = f"  (reference: {smp['expected']!r})" if smp["expected"] else ""
        print(f"after:  {smp['prompt']} -> {smp['output']!r}{expected}")
    return 130 if s["status"] == "interrupted" else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_train(load_config(None, {"demo": True, "out": os.environ.get("OUT", "runs/demo")})))
