"""The training methods, LISA, full fine-tuning and LoRA, behind one interface and picked by name
from ``METHODS``. A method owns what differs between them: the optimizer it builds from a run's
settings and learning-rate schedule, the optimizer state that optimizer keeps (created in its
shardings on a mesh), the compiled step that advances parameters and state, a template of that
state to restore a checkpoint into (no schedule or run needed), what its checkpoints record
beside the state, and the parameters a run evaluates, samples from and exports (LoRA merges its
adapters in). ``to_layout`` is the one place where parameters change between the layout a step
trains on and the canonical stacked one.

    >>> sorted(METHODS)
    ['full', 'lisa', 'lora']
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lisa_jax import fp8_step
from lisa_jax import importance as imp_lib
from lisa_jax import layout
from lisa_jax import lora as lora_lib
from lisa_jax import model as M
from lisa_jax import sampling
from lisa_jax import step as step_lib
from lisa_jax.config import TrainConfig, TrainError, always_parts, with_default_remat
from lisa_jax.lisa import active_layers, lisa
from lisa_jax.precision import master_weights, stochastic_bf16_nu

# ----------------------------------------------------------------------------- layouts


def per_layer_layout(cfg: TrainConfig) -> bool:
    """Whether the run trains on per-layer arrays (``--layer-layout``; auto: LISA on one GPU,
    where the stacked layout costs a copy of a layer's slice before each library call)."""
    if cfg.layer_layout != "auto":
        return cfg.layer_layout == "per_layer"
    return (METHODS[cfg.method].trains_per_layer and not cfg.mesh and not cfg.distributed
            and jax.default_backend() == "gpu")


def to_layout(params, cfg: TrainConfig, training: bool):
    """``params`` in the layout this run's step trains on (``training``), or in the canonical
    stacked one that checkpoints, sampling and export read. Converts leaf by leaf on the device,
    freeing each converted leaf (the caller must not use ``params`` again). A
    ``--frozen-precision fp8`` run's split parameters become the bf16 tree (its step places a
    tree again when it next runs)."""
    if isinstance(params, fp8_step.SplitParams):
        params = params.full_params()
    if training and per_layer_layout(cfg):
        return layout.convert(params, "per_layer", donate=True)
    return layout.convert(params, "stacked", donate=True)


# ----------------------------------------------------------------------------- optimizers


def make_schedule(cfg: TrainConfig, total_steps: int):
    """The learning rate of each step: linear warmup, then ``--schedule`` to the last step."""
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


# An optimizer's state has a step count where its learning rate is a schedule, whichever the
# schedule: a state template takes this one instead of the run's.
_ANY_SCHEDULE = optax.constant_schedule(0.0)


def adamw(cfg: TrainConfig, schedule, outside_layers_scale: float = 1.0
          ) -> optax.GradientTransformation:
    """The run's AdamW (every method's inner optimizer), bfloat16 runs with float32-precision
    updates unless ``--update-dtype bfloat16``; ``outside_layers_scale`` multiplies the
    learning rate of every leaf outside ``layers``."""
    # bfloat16 runs keep Adam's first moment in bfloat16 (b1 = 0.9 moves it by a tenth a
    # step, far above its rounding) and the second in float32 (b2 = 0.999 moves it by a
    # thousandth, which bfloat16 rounds away): see experiments/results/precision_h200.
    mu_dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else None
    inner = optax.adamw(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, mu_dtype=mu_dtype,
                        weight_decay=cfg.weight_decay, mask=M.weight_decay_mask)
    if cfg.adam_nu_dtype == "bfloat16":
        inner = stochastic_bf16_nu(inner, seed=cfg.seed)
    if outside_layers_scale != 1.0:
        inner = optax.chain(inner, scale_outside_layers(outside_layers_scale))
    if cfg.dtype == "bfloat16" and cfg.update_dtype == "float32":
        inner = master_weights(inner)
    return inner


def scale_outside_layers(factor: float) -> optax.GradientTransformation:
    """Updates of the leaves outside ``layers`` times ``factor``, the layers' as they are.

    After AdamW it is a learning rate of ``factor`` times the schedule's for those leaves (its
    step and its decoupled weight decay are both proportional to the learning rate).

    >>> tx = scale_outside_layers(0.5)
    >>> u, _ = tx.update({"embed": jnp.ones(2), "layers": jnp.ones(2)}, tx.init(None))
    >>> u["embed"].tolist(), u["layers"].tolist()
    ([0.5, 0.5], [1.0, 1.0])
    """
    def update(updates, state, params=None):
        del params
        return {k: v if k == "layers" else jax.tree.map(lambda u: u * factor, v)
                for k, v in updates.items()}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _clipped(cfg: TrainConfig, inner: optax.GradientTransformation):
    """``inner`` behind clipping by the global norm of the whole gradient tree."""
    clip = cfg.clip_norm or None
    return optax.chain(optax.clip_by_global_norm(clip), inner) if clip else inner


def lisa_probs(spec: str, num_layers: int) -> list[float]:
    """``--lisa-probs``: a file (JSON list, JSON ``{"probs": [...]}`` as written by
    ``importance.save_probs``, or whitespace/comma separated) or ``"p0,p1,..."``."""
    text = Path(spec).read_text() if Path(spec).is_file() else spec
    try:
        probs, _ = imp_lib.parse_probs(text)
    except ValueError:
        raise TrainError(f"--lisa-probs {spec!r} is neither a file nor a list of numbers")
    if len(probs) != num_layers:
        raise TrainError(f"--lisa-probs has {len(probs)} values but the model has {num_layers} "
                         "layers; give one probability per layer")
    return probs


def _init_state(init, params, mcfg, mesh, traceable=True, lora=False):
    """``(init(params), step shardings)``: on a mesh the state is created in its shardings
    (``lisa_jax.sharding``), else as is with ``None``."""
    if mesh is None:
        return init(params), None
    from lisa_jax import sharding as SH
    if lora:
        return SH.init_lora_sharded(init, params, mcfg, mesh)
    return SH.init_sharded(init, params, mcfg, mesh, traceable)


# ----------------------------------------------------------------------------- methods


class Method:
    """A training method for a run's settings ``cfg`` and model ``mcfg``.

    Given the parameters and a learning-rate ``schedule`` (and the device ``mesh``, if any), it
    is ready to train: ``state`` holds the optimizer state and ``step_fn(params, state, batch)
    -> (params, state, metrics)`` is the compiled step. Without them it serves a checkpoint:
    ``state_template`` and ``export_params``.
    """

    name: ClassVar[str]
    trains_per_layer: ClassVar[bool] = False  # whether its step takes the per-layer layout

    def __init__(self, cfg: TrainConfig, mcfg: M.LlamaConfig, params=None, schedule=None,
                 mesh=None):
        self.cfg, self.mcfg = cfg, mcfg
        self.remat = with_default_remat(cfg).remat
        self.importance: imp_lib.OnlineImportance | None = None
        if params is not None:
            self.state, self.step_fn = self._start(self.optimizer(schedule), params, mesh)
            self._eval = jax.jit(lambda p, b: step_lib.plain_loss(mcfg, p, b))

    # What each method defines.

    def optimizer(self, schedule) -> optax.GradientTransformation:
        """The method's optimizer with learning rate ``schedule``."""
        raise NotImplementedError

    def _start(self, tx, params, mesh):
        """``(state, step_fn)`` for optimizer ``tx``."""
        raise NotImplementedError

    def state_template(self, params):
        """A fresh optimizer state's structure (shapes, where they do not depend on a draw) for
        ``Checkpoints.restore``; needs no schedule."""
        return jax.eval_shape(self.optimizer(_ANY_SCHEDULE).init, params)

    def export_params(self, params, state):
        """The parameters to evaluate, sample from and export, of ``params`` and the optimizer
        ``state`` (LoRA merges the adapters it holds)."""
        return params

    def save_adapter(self, out_dir, state) -> str | None:
        """Write what the method trains beside the base model, in the format of its usual
        tools (LoRA: a PEFT adapter directory), into ``out_dir``; ``None`` where the method
        trains the model itself (its export is the whole model)."""
        return None

    def description(self) -> str:
        """What the run prints about the method after its name."""
        return ""

    def trainable(self, params) -> tuple[int, str]:
        """``(count, what)``: how many parameters a step trains and which (the run's header
        shows them); full fine-tuning: all."""
        return _size(params), "all parameters"

    # Hooks of the loop; by default nothing happens.

    def before_step(self, params) -> dict:
        """Host-side work before a step; returns fields to log with the step."""
        return {}

    def after_step(self, metrics) -> None:
        """Host-side work once a step's metrics are known."""

    def active(self) -> list[int] | None:
        """The layers the next step trains, where the method trains some only."""
        return None

    def checkpoint_meta(self) -> dict:
        """What a checkpoint records beside the state (JSON)."""
        return {"method": self.name, "active_layers": self.active(),
                "importance": self.importance.state_dict() if self.importance else None}

    def load_checkpoint_meta(self, meta: dict) -> None:
        if self.importance is not None and meta.get("importance"):
            self.importance.load_state_dict(meta["importance"])

    # The same for every method.

    def step(self, params, batch):
        """One optimizer step: ``(params, metrics)``, the state advanced in place."""
        params, self.state, metrics = self.step_fn(params, self.state, batch)
        return params, metrics

    def model_params(self, params):
        """The parameters to evaluate, sample from and export (LoRA merged in)."""
        if isinstance(params, fp8_step.SplitParams):  # --frozen-precision fp8: a bf16 copy
            params = layout.convert(params.full_params(), "stacked")
        return self.export_params(params, self.state)

    def eval_loss(self, params, batches) -> float:
        p = self.model_params(params)
        total = n = 0.0
        for b in batches:
            loss, cnt = self._eval(p, {"input_ids": b["input_ids"], "loss_mask": b["loss_mask"]})
            total += float(loss) * float(cnt)
            n += float(cnt)
        return total / max(n, 1.0)


# --lisa-always's parts and the parameters they name.
_ALWAYS_KEYS = {"embed": "embed", "norm": "final_norm", "head": "lm_head"}


def lisa_frozen(cfg: TrainConfig, mcfg: M.LlamaConfig) -> tuple[str, ...]:
    """The parameters outside the layers that ``--lisa-always`` leaves frozen. A tied model's
    embedding is its head (one matrix): both parts or neither."""
    parts = always_parts(cfg)
    if mcfg.tie_embeddings:
        if ("embed" in parts) != ("head" in parts):
            given, other = ("embed", "head") if "embed" in parts else ("head", "embed")
            raise TrainError(f"--lisa-always {cfg.lisa_always!r}: this model ties its "
                             f"embedding and head (one matrix), so {given} cannot train while "
                             f"{other} is frozen; name both embed and head, or neither "
                             "(freezing both)")
        keys = {"embed": "embed", "norm": "final_norm", "head": "embed"}
    else:
        keys = _ALWAYS_KEYS
    trained = {keys[p] for p in parts}
    return tuple(dict.fromkeys(k for k in keys.values() if k not in trained))


class Lisa(Method):
    """LISA: a few sampled layers trained at a time (``lisa_jax.lisa``), uniformly, by OwLore's
    weights or a BAdam-style order (``--lisa-sampler``), with ``--lisa-probs`` or with online
    importance (Bernoulli sampling, drawn on the host)."""

    name = "lisa"
    trains_per_layer = True

    def __init__(self, cfg, mcfg, params=None, schedule=None, mesh=None):
        self._sampler_weights = None
        if params is not None and cfg.lisa_sampler == "owl":  # from the loaded weights
            try:
                ratios = imp_lib.owl_outlier_ratios(params["layers"], cfg.lisa_owl_threshold)
                self._sampler_weights = imp_lib.owl_weights(mcfg.num_layers, "owl", ratios)
            except ValueError as e:
                if "all zero" not in str(e):
                    raise TrainError(f"--lisa-sampler owl: {e}")
                raise TrainError(f"--lisa-sampler owl: no layer has weights above "
                                 f"--lisa-owl-threshold {cfg.lisa_owl_threshold:g} times its "
                                 "mean magnitude, so every outlier ratio is 0; lower "
                                 "--lisa-owl-threshold")
        super().__init__(cfg, mcfg, params, schedule, mesh)

    def _sampler(self):
        """The fixed-count sampler of ``--lisa-sampler`` (not uniform)."""
        cfg, num_layers = self.cfg, self.mcfg.num_layers
        name = cfg.lisa_sampler
        if name in sampling.ORDERS:
            return sampling.Ordered(cfg.lisa_layers, name)
        if name == "owl":
            # Without the loaded weights (a checkpoint's state template) only shapes matter.
            weights = self._sampler_weights
            if weights is None:
                weights = np.full(num_layers, 1.0 / num_layers)
        else:
            weights = imp_lib.owl_weights(num_layers, name)
        try:
            return sampling.Weighted(cfg.lisa_layers, weights)
        except ValueError as e:  # fewer layers with outliers than --lisa-layers
            raise TrainError(f"--lisa-sampler {name}: {e} (--lisa-layers "
                             f"{cfg.lisa_layers}; or lower --lisa-owl-threshold)")

    def optimizer(self, schedule):
        cfg, num_layers = self.cfg, self.mcfg.num_layers
        # LISA clips by the norm of the trained gradients (the transform's clip_norm).
        frozen = lisa_frozen(cfg, self.mcfg)
        kw = dict(interval=cfg.lisa_interval, key=cfg.seed, reset=cfg.lisa_reset,
                  clip_norm=cfg.clip_norm or None, frozen=frozen or None)
        if cfg.lisa_granularity != "layer":  # module groups, each drawing its own γ layers
            kw["granularity"] = cfg.lisa_granularity
        if cfg.lisa_probs:
            kw["probs"] = lisa_probs(cfg.lisa_probs, num_layers)
        else:
            if not 1 <= cfg.lisa_layers <= num_layers:
                raise TrainError(f"--lisa-layers {cfg.lisa_layers} is out of range: the "
                                 f"model has {num_layers} layers; use 1 to {num_layers}")
            if cfg.lisa_sampler == "uniform":
                kw["n_active"] = cfg.lisa_layers
            else:
                kw["sampler"] = self._sampler()
        try:
            if cfg.lisa_importance == "online":  # Bernoulli mode, from uniform γ/L
                kw.setdefault("probs", [cfg.lisa_layers / num_layers] * num_layers)
                kw.pop("n_active", None)
                self.importance = imp_lib.OnlineImportance(
                    num_layers, cfg.lisa_layers, cfg.lisa_importance_floor,
                    cfg.lisa_importance_decay)
            return lisa(adamw(cfg, schedule, cfg.lisa_always_lr_scale), **kw)
        except ValueError as e:
            raise TrainError(str(e))

    def _start(self, tx, params, mesh):
        self.tx = tx
        state, shardings = _init_state(tx.init, params, self.mcfg, mesh,
                                       traceable=self._draws_in_jit(tx))
        if self.cfg.frozen_precision != "bf16":  # fp8 copies of the frozen layers
            try:
                frozen = fp8_step.make_frozen_lisa_step(
                    self.mcfg, tx, self.remat, frozen_precision=self.cfg.frozen_precision,
                    residuals=self.cfg.frozen_residuals)
            except ValueError as e:
                raise TrainError(str(e))
            return state, frozen.step_fn
        if shardings is not None:
            from lisa_jax import sharding as SH
            if per_layer_layout(self.cfg):  # per-layer arrays, each sharded as its slice
                shardings = dataclasses.replace(shardings, params=SH.param_shardings(
                    self.mcfg, layout.per_layer_template(params), shardings.mesh))
            shardings = dataclasses.replace(shardings, prefetch=self.cfg.fsdp_prefetch)
        return state, step_lib.make_lisa_step(self.mcfg, tx, self.remat, shardings=shardings)

    @staticmethod
    def _draws_in_jit(tx) -> bool:
        """Uniform sampling draws inside ``jit``; Bernoulli (``probs``) on the host."""
        return tx.config.probs is None

    def state_template(self, params):
        tx = self.optimizer(_ANY_SCHEDULE)
        return jax.eval_shape(tx.init, params) if self._draws_in_jit(tx) else tx.init(params)

    def description(self) -> str:
        cfg, num_layers = self.cfg, self.mcfg.num_layers
        how = "" if cfg.lisa_sampler == "uniform" else f" by {cfg.lisa_sampler}"
        if cfg.lisa_granularity != "layer":
            how += f" per {cfg.lisa_granularity} module group"
        return (f" (γ={cfg.lisa_layers if not cfg.lisa_probs else 'p_ℓ'} of {num_layers} "
                f"layers{how}, resample every {cfg.lisa_interval} steps)")

    def trainable(self, params) -> tuple[int, str]:
        """The view LISA trains: every leaf outside the layers (embedding, head, final norm)
        and γ of the L layers (their weights and norms); with ``--lisa-probs`` or online
        importance γ varies by period, and the count is its mean."""
        cfg, num_layers = self.cfg, self.mcfg.num_layers
        per_layer = _size(params["layers"]) / num_layers
        frozen = lisa_frozen(cfg, self.mcfg)
        rest = {k: v for k, v in params.items() if k != "layers" and k not in frozen}
        if cfg.lisa_probs:
            gamma = sum(lisa_probs(cfg.lisa_probs, num_layers))
        else:
            gamma = cfg.lisa_layers
        names = {"embed": "embedding", "lm_head": "head", "final_norm": "final norm"}
        if self.mcfg.tie_embeddings:
            names["embed"] = "embedding (tied head)"
        parts = [names[k] for k in names if k in rest] + [k for k in rest if k not in names]
        exact = not cfg.lisa_probs and cfg.lisa_importance == "none"
        count = int(round(_size(rest) + gamma * per_layer))
        layers = (f"{gamma:g}" if exact else f"on average {gamma:.3g}") + f" of {num_layers}"
        trained = f"{', '.join(parts)} and " if parts else ""
        if cfg.lisa_granularity != "layer":
            return count, (f"{trained}{layers} layers at a time in each "
                           f"{cfg.lisa_granularity} module group")
        return count, (f"{trained}{layers} layers at a time (their weights and norms)")

    def before_step(self, params) -> dict:
        """Bernoulli LISA resamples here (its shapes change), with the online importance
        estimate's probabilities when there is one; they are logged as ``layer_probs``."""
        if self._draws_in_jit(self.tx):
            # A weighted sampler's weights are logged with the run's first step (no device
            # sync: the step count is not read).
            weights = getattr(self.tx.config.sampler, "weights", None)
            if weights is not None and not getattr(self, "_weights_logged", False):
                self._weights_logged = True
                return {"layer_probs": [round(float(p), 6) for p in weights]}
            return {}
        extra = {}
        count, period = int(self.state.count), int(self.state.period)
        starts = count // self.tx.config.interval != period
        probs = self.importance.probs() if self.importance is not None and starts else None
        if starts or count == 0:
            used = probs if probs is not None else self.tx.config.probs
            extra["layer_probs"] = [round(float(p), 6) for p in used]
        self.state = self.tx.maybe_resample(self.state, layout.stacked_template(params),
                                            probs)
        return extra

    def after_step(self, metrics) -> None:
        if self.importance is not None:
            self.importance.observe(self.active(), np.asarray(metrics["layer_grad_norms"]))

    def active(self) -> list[int] | list[list[int]]:
        """The sampled layers; with module groups one list per group."""
        return np.asarray(active_layers(self.state)).astype(int).tolist()


class Full(Method):
    """Full fine-tuning: every parameter trained by the clipped AdamW."""

    name = "full"

    def optimizer(self, schedule):
        return _clipped(self.cfg, adamw(self.cfg, schedule))

    def _start(self, tx, params, mesh):
        state, shardings = _init_state(tx.init, params, self.mcfg, mesh)
        return state, step_lib.make_plain_step(self.mcfg, tx, self.remat, shardings=shardings)


class LoRA(Method):
    """LoRA: frozen parameters, trained low-rank adapters; the state is ``(adapters,
    optimizer state)``, and the adapters are merged into what is exported."""

    name = "lora"

    def optimizer(self, schedule):
        return _clipped(self.cfg, adamw(self.cfg, schedule))

    def _init_fn(self, tx):
        targets = tuple(t for t in self.cfg.lora_targets.split(",") if t)

        def init(params):
            adapters = lora_lib.init_lora(params["layers"], jax.random.key(self.cfg.seed),
                                          self.cfg.lora_rank, targets=targets)
            return adapters, tx.init(adapters)
        return init

    def _start(self, tx, params, mesh):
        try:
            state, shardings = _init_state(self._init_fn(tx), params, self.mcfg, mesh,
                                           lora=True)
        except ValueError as e:
            raise TrainError(str(e))
        return state, step_lib.make_lora_step(self.mcfg, tx, self.scale, self.remat,
                                              shardings=shardings)

    def trainable(self, params) -> tuple[int, str]:
        adapters = self.state[0] if hasattr(self, "state") else self.state_template(params)[0]
        targets = ", ".join(t for t in self.cfg.lora_targets.split(",") if t)
        return _size(adapters), (f"LoRA adapters of rank {self.cfg.lora_rank} on {targets} "
                                 "(the model frozen)")

    @property
    def scale(self) -> float:
        return lora_lib.lora_scale(self.cfg.lora_rank, self.cfg.lora_alpha)

    def state_template(self, params):
        try:
            return jax.eval_shape(self._init_fn(self.optimizer(_ANY_SCHEDULE)), params)
        except ValueError as e:
            raise TrainError(str(e))

    def export_params(self, params, state):
        return lora_lib.merge_lora(params, state[0], self.scale)

    def save_adapter(self, out_dir, state) -> str:
        """The adapters in PEFT's format, for ``peft.PeftModel.from_pretrained`` on the base
        model ``--model`` (named by its absolute path)."""
        base = str(Path(self.cfg.model).absolute()) if self.cfg.model else None
        return lora_lib.save_peft_adapter(state[0], out_dir, self.cfg.lora_rank,
                                          self.cfg.lora_alpha, base)


def _size(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def count_text(n: float) -> str:
    """A parameter count in a few digits: ``count_text(6_738_415_616) == '6.74B'``."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{int(n)}"


# Every value of --method (config.choices("method")) names one.
METHODS: dict[str, type[Method]] = {m.name: m for m in (Lisa, Full, LoRA)}


def method_for(cfg: TrainConfig, mcfg: M.LlamaConfig, params=None, schedule=None,
               mesh=None) -> Method:
    """The method ``cfg.method`` names (see ``Method`` for the arguments)."""
    return METHODS[cfg.method](cfg, mcfg, params, schedule, mesh)
