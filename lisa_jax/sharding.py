"""Training on several devices with JAX SPMD: a ("dp", "fsdp", "tp") mesh and partition rules.

Nothing here communicates by hand: parameters, optimizer state and batches are placed as
``jax.Array`` s with a ``NamedSharding`` each, the train step is jitted with matching
``in_shardings``/``out_shardings`` (parameters and optimizer state still donated), and XLA's
SPMD partitioner inserts the all-gathers and reduce-scatters.

Usage, one host with several GPUs::

    lisa-jax train --model DIR --data FILE --mesh fsdp=8            # ZeRO-3 style
    lisa-jax train --model DIR --data FILE --mesh fsdp=4,tp=2       # plus Megatron TP

or from Python::

    from lisa_jax import sharding as SH
    mesh = SH.make_mesh("fsdp=4,tp=2")
    model = load_hf(path, dtype="bfloat16", shardings=SH.hf_shardings(path, mesh))
    tx = lisa(optax.adamw(1e-5), n_active=2)
    state, step_sh = SH.init_sharded(tx.init, model.params, model.cfg, mesh)
    step = make_lisa_step(model.cfg, tx, remat="full", shardings=step_sh)
    params, state, metrics = step(model.params, state, SH.shard_batch(batch, mesh))

Several hosts: start the same program on every host and call ``jax.distributed.initialize()``
(coordinator address, process count and id from the arguments or the cluster environment)
before anything else touches JAX; ``jax.devices()`` then lists the devices of all hosts and
``make_mesh`` spans them (put "tp" within a host: it is the innermost mesh axis). Then:

* ``load_hf(path, shardings=hf_shardings(path, mesh))`` builds every leaf with
  ``jax.make_array_from_callback``: each process reads from the safetensors files only the
  blocks its own devices hold (every host needs the checkpoint directory, e.g. on a shared
  file system);
* every process passes the same global batch to the step; ``shard_batch`` keeps on each device
  only its slice;
* ``save_hf`` is called on every process: each tensor is gathered with all of them taking part
  and process 0 writes the directory.

``tests/test_sharding.py`` runs this with two processes of four CPU devices each. Randomly
initialised parameters (``init_params`` under ``jax.jit(..., out_shardings=param_shardings(...))``)
need no change.

Partition rules (``param_shardings``; axes of size 1 are left out of the specs)
------------------------------------------------------------------------------
====================================  ==============  ===========================================
leaf (shape)                          "tp"            "fsdp"
====================================  ==============  ===========================================
embed            V x D                dim 0 (vocab)   largest other dim divisible by fsdp (D)
lm_head          D x V                dim 1 (vocab)   D
layers/wq,wk,wv  L x D x (heads*H)    dim 2 (out)     largest non-layer, non-tp dim (D)
layers/w_gate,w_up  L x D x F         dim 2 (out)     D
layers/wo        L x (N*H) x D        dim 1 (in)      D
layers/w_down    L x F x D            dim 1 (in)      D
layers/bq,bk,bv  L x (heads*H)        dim 1           --
layers/*_norm    L x D                --              D
final_norm       D                    --              D
LoRA a  L x in x r                    in, for wo/w_down   largest remaining dim
LoRA b  L x r x out                   out, for wq..w_up   largest remaining dim
====================================  ==============  ===========================================

The layer axis ``L`` is never sharded: LISA gathers the sampled layers along it, and the frozen
layers stream through a scan over it, so both stay local. TP on a head dimension needs the head
count (N, or K for wk/wv/bk/bv) divisible by tp; a dim that does not divide is not sharded on
that axis (replicated). With tp=1 the FSDP dim is the largest divisible non-layer dim of any
kind. Batches are sharded on ("dp", "fsdp") along the batch dim; parameters are replicated
over "dp". Optimizer state leaves follow the parameter they mirror, found by path: AdamW
moments have the parameter's spec; LISA slot moments ``[γ, ...]`` the layer leaf's (leading axis
unsharded); counts, the sampler key and the active indices are replicated, so every device
draws the same layers.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lisa_jax import block
from lisa_jax import model as M

AXES = ("dp", "fsdp", "tp")
BATCH_AXES = ("dp", "fsdp")

LAYER_KEY = "layers"


class ShardingError(ValueError):
    """A bad mesh spec or a batch that does not divide over the mesh; one line."""


# XLA:CPU's concurrency-optimized scheduler can leave independent collectives of a program
# unordered; devices simulated as threads on a few cores then reach them in different orders
# and wait for each other until the rendezvous times out (seen: LISA on fsdp=8 over 8 CPU
# devices, in most runs). Without it the collectives keep one order. Only XLA:CPU reads it.
CPU_COLLECTIVES_IN_ORDER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def order_cpu_collectives() -> None:
    """On CPU devices (``JAX_PLATFORMS=cpu`` or simulated ones in ``XLA_FLAGS``), add
    ``CPU_COLLECTIVES_IN_ORDER`` to ``XLA_FLAGS`` unless that flag is set there already.
    Accelerator hosts are left alone. Takes effect only if JAX has not yet initialized its
    backends (call it before first use)."""
    flags = os.environ.get("XLA_FLAGS", "")
    on_cpu = (os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu"
              or "xla_force_host_platform_device_count" in flags)
    if on_cpu and CPU_COLLECTIVES_IN_ORDER.split("=")[0] not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + CPU_COLLECTIVES_IN_ORDER).strip()


# ----------------------------------------------------------------------------- mesh


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the ("dp", "fsdp", "tp") axes; parsed from ``"fsdp=4,tp=2"`` (missing: 1)."""

    dp: int = 1
    fsdp: int = 1
    tp: int = 1

    @classmethod
    def parse(cls, spec: "str | MeshConfig") -> "MeshConfig":
        if isinstance(spec, MeshConfig):
            return spec
        sizes: dict[str, int] = {}
        for part in str(spec).replace(" ", "").split(","):
            if not part:
                continue
            name, eq, value = part.partition("=")
            if name not in AXES or not eq:
                raise ShardingError(f"bad mesh spec {spec!r}: {part!r} is not AXIS=SIZE with "
                                    f"AXIS one of {', '.join(AXES)} (e.g. 'fsdp=4,tp=2')")
            if name in sizes:
                raise ShardingError(f"bad mesh spec {spec!r}: axis {name!r} given twice")
            try:
                size = int(value)
            except ValueError:
                size = 0
            if size < 1:
                raise ShardingError(f"bad mesh spec {spec!r}: size of {name!r} must be an "
                                    f"integer >= 1, got {value!r}")
            sizes[name] = size
        if not sizes:
            raise ShardingError(f"bad mesh spec {spec!r}: give at least one AXIS=SIZE, e.g. "
                                "'fsdp=8' or 'fsdp=4,tp=2'")
        return cls(**sizes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.dp, self.fsdp, self.tp)

    @property
    def size(self) -> int:
        return self.dp * self.fsdp * self.tp

    def __str__(self) -> str:
        return ",".join(f"{a}={s}" for a, s in zip(AXES, self.shape) if s > 1) or "fsdp=1"


def make_mesh(spec: "str | MeshConfig", devices=None) -> Mesh:
    """A ``Mesh`` with axes ("dp", "fsdp", "tp") over ``devices`` (default: all of them).

    The product of the sizes must equal the device count. Axis types are "auto" (sharding
    propagated by the compiler), whatever the JAX default.
    """
    mc = MeshConfig.parse(spec)
    devices = list(jax.devices() if devices is None else devices)
    if mc.size != len(devices):
        raise ShardingError(f"mesh {spec!s} has {mc.dp}*{mc.fsdp}*{mc.tp} = {mc.size} devices "
                            f"but there are {len(devices)} ({devices[0].platform}); the product "
                            f"of the axis sizes must equal the device count")
    try:
        from jax.experimental import mesh_utils
        arr = mesh_utils.create_device_mesh(mc.shape, devices=devices)
    except Exception:  # pragma: no cover - topologies mesh_utils does not know
        arr = np.array(devices, dtype=object).reshape(mc.shape)
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is not None:
        try:
            return Mesh(arr, AXES, axis_types=(axis_type.Auto,) * len(AXES))
        except TypeError:  # pragma: no cover - older signature
            pass
    return Mesh(arr, AXES)


def _sizes(mesh: Mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.devices.shape))


# ----------------------------------------------------------------------------- rules


def _names(path) -> tuple[str, ...]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    return tuple(out)


def _heads_ok(cfg: M.LlamaConfig | None, kind: str | None, tp: int) -> bool:
    if cfg is None or kind is None:
        return True
    return (cfg.num_heads if kind == "q" else cfg.num_kv_heads) % tp == 0


def leaf_spec(cfg: M.LlamaConfig | None, names: tuple[str, ...], shape, mesh: Mesh,
              layer_axis: bool | None = None) -> P:
    """The ``PartitionSpec`` of one parameter-like leaf (see the module docstring's table).

    ``names``: the leaf's path as strings, e.g. ``("layers", "wq")``, ``("embed",)`` or a LoRA
    adapter's ``("wq", "a")``. ``layer_axis``: whether dim 0 is the layer axis (default: when
    ``"layers"`` is in the path, or for LoRA adapters).
    """
    sizes = _sizes(mesh)
    tp, fsdp = sizes.get("tp", 1), sizes.get("fsdp", 1)
    shape = tuple(shape)
    nd = len(shape)
    spec: list[Any] = [None] * nd
    if nd == 0:
        return P()
    # A LoRA adapter ("a" or "b" under a weight's name) or a parameter: its row of the block's
    # table says which dim of the weight tensor parallelism splits.
    lora = (len(names) >= 2 and names[-1] in ("a", "b") and
            getattr(block.PARAMS_BY_NAME.get(names[-2]), "lora", False))
    if layer_axis is None:
        # a stacked layer leaf ("layers", "wq") has the layer axis; one of the per-layer
        # layout's ("layers", "3", "wq") is a single layer's
        at = names.index(LAYER_KEY) if LAYER_KEY in names else None
        one_layer = at is not None and at + 1 < len(names) and names[at + 1].isdigit()
        layer_axis = (at is not None and not one_layer) or lora
    first = 1 if layer_axis else 0
    row = block.PARAMS_BY_NAME.get(names[-2] if lora else (names[-1] if names else ""))

    # Tensor parallelism (Megatron): column-parallel weights split their output dim (a LoRA
    # adapter's b), row-parallel ones their input dim (a LoRA adapter's a).
    tp_dim, kind = None, None
    if row is not None and row.tp_dim is not None:
        column = row.tp_dim == row.rank - 1
        if lora:
            if (names[-1] == "b") == column:
                tp_dim, kind = (nd - 1 if column else first), row.heads
        elif nd == first + row.rank:
            tp_dim, kind = first + row.tp_dim, row.heads
    if tp > 1 and tp_dim is not None and shape[tp_dim] % tp == 0 and _heads_ok(cfg, kind, tp):
        spec[tp_dim] = "tp"

    # FSDP: the largest remaining (non-layer, non-tp) dim divisible by the fsdp size.
    if fsdp > 1:
        cands = [d for d in range(first, nd) if spec[d] is None and shape[d] % fsdp == 0]
        if cands:
            spec[max(cands, key=lambda d: (shape[d], -d))] = "fsdp"
    return P(*spec)


def param_specs(cfg: M.LlamaConfig | None, params_or_shapes, mesh: Mesh):
    """Pytree of ``PartitionSpec`` for a parameter tree (arrays or ``ShapeDtypeStruct`` s)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: leaf_spec(cfg, _names(p), np.shape(x), mesh), params_or_shapes)


def param_shardings(cfg: M.LlamaConfig | None, params_or_shapes, mesh: Mesh):
    """Pytree of ``NamedSharding`` for a parameter tree (arrays or ``ShapeDtypeStruct`` s)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(cfg, params_or_shapes, mesh),
                        is_leaf=lambda x: isinstance(x, P))


def lora_shardings(cfg: M.LlamaConfig | None, lora, mesh: Mesh):
    """``NamedSharding`` s of LoRA adapters ``{name: {"a": [L, in, r], "b": [L, r, out]}}``."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, leaf_spec(cfg, _names(p), np.shape(x), mesh, True)),
        lora)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_spec(mesh: Mesh, ndim: int = 2) -> P:
    """``input_ids``/``loss_mask`` ``[B, S]`` (or ``[A, B, S]`` with accumulation): the batch
    dim on ("dp", "fsdp")."""
    sizes = _sizes(mesh)
    axes = tuple(a for a in BATCH_AXES if sizes.get(a, 1) > 1)
    ax = None if not axes else axes[0] if len(axes) == 1 else axes
    spec = [None] * ndim
    spec[ndim - 2] = ax
    return P(*spec)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(mesh, ndim))


def data_parallel_size(mesh: Mesh) -> int:
    sizes = _sizes(mesh)
    return sizes.get("dp", 1) * sizes.get("fsdp", 1)


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    n = data_parallel_size(mesh)
    if batch_size % n:
        raise ShardingError(f"batch size {batch_size} does not divide over dp*fsdp = {n} "
                            f"devices of the mesh; use a multiple of {n}")


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """The batch's arrays placed with the batch dim (second to last) on ("dp", "fsdp")."""
    out = {}
    for k, v in batch.items():
        nd = np.ndim(v)
        if nd >= 2:
            check_batch_size(np.shape(v)[nd - 2], mesh)
            out[k] = jax.device_put(v, batch_sharding(mesh, nd))
        else:
            out[k] = v
    return out


# ----------------------------------------------------------------------------- optimizer state


def opt_state_shardings(state_like, params_like, mesh: Mesh, ref_shardings=None,
                        cfg: M.LlamaConfig | None = None):
    """``NamedSharding`` s of an optimizer state, each leaf following the parameter it mirrors.

    ``state_like``: the state or its ``jax.eval_shape``. ``params_like``: the tree the state was
    made for (parameters, or LoRA adapters); ``ref_shardings``: its shardings (default:
    ``param_shardings``). A state leaf whose path ends with a parameter's path (e.g.
    ``.mu["layers"]["wq"]`` or ``.slot_state[0].mu["layers"]["wq"]``) and whose shape is that
    parameter's, or for a layer leaf the same but for the leading axis (LISA slots ``[γ, ...]``),
    gets the parameter's spec; anything else (counts, keys, active indices, schedule state)
    is replicated.
    """
    if ref_shardings is None:
        ref_shardings = param_shardings(cfg, params_like, mesh)
    ref: dict[tuple[str, ...], tuple[tuple[int, ...], Any]] = {}
    p_flat = jax.tree_util.tree_flatten_with_path(params_like)[0]
    s_flat = jax.tree.leaves(ref_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, x), sh in zip(p_flat, s_flat):
        ref[_names(path)] = (tuple(np.shape(x)), sh)
    rep = replicated(mesh)

    def pick(path, leaf):
        names, shape = _names(path), tuple(np.shape(leaf))
        for n in range(len(names), 0, -1):
            hit = ref.get(names[-n:])
            if hit is None:
                continue
            pshape, sh = hit
            leading_free = len(sh.spec) == 0 or sh.spec[0] is None
            if shape == pshape or (len(shape) == len(pshape) >= 1 and shape[1:] == pshape[1:]
                                   and leading_free):
                return NamedSharding(mesh, sh.spec)
            return rep
        return rep

    return jax.tree_util.tree_map_with_path(pick, state_like)


# ----------------------------------------------------------------------------- steps


@dataclasses.dataclass(frozen=True, eq=False)
class StepShardings:
    """What a sharded train step is jitted with; pass as ``make_*_step(..., shardings=)``.

    ``params``/``state``: pytrees of ``NamedSharding`` (the step's first two arguments and
    outputs), ``mesh`` for the batch and the metrics (replicated), ``activation``: the sharding
    the hidden states are constrained to after the embedding (the batch dim on ("dp", "fsdp")).
    """

    mesh: Mesh
    params: Any
    state: Any
    prefetch: bool = False

    def layer_gather(self) -> Callable | None:
        """With ``prefetch`` on an ``fsdp`` mesh: the function that gives one layer's
        parameters all-gathered over ``fsdp`` (a ``tp`` split kept), which the LISA step
        applies a layer ahead of its use (``stack_vjp.lisa_layers``), so that XLA can run the
        gather beside the layer before; else None (GSPMD gathers where a weight is used)."""
        if not self.prefetch or _sizes(self.mesh).get("fsdp", 1) == 1:
            return None
        layers = self.params["layers"]
        per_layer = isinstance(layers, (list, tuple))

        def gathered(sh: NamedSharding) -> NamedSharding:
            spec = tuple(sh.spec) if per_layer else tuple(sh.spec)[1:]
            return NamedSharding(self.mesh, P(*(None if a == "fsdp" else a for a in spec)))
        targets = jax.tree.map(gathered, layers[0] if per_layer else layers)
        return lambda lp: jax.lax.with_sharding_constraint(lp, targets)

    @property
    def activation(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(batch_spec(self.mesh, 2)[0], None, None))

    def jit(self, step: Callable, donate_argnums=()) -> Callable:
        """``jax.jit`` with in/out shardings; the returned function first places its inputs
        (a no-op for arrays already placed, so donation still reuses them; a reshard after e.g.
        restoring a checkpoint), the batch with ``shard_batch``."""
        rep = replicated(self.mesh)
        jitted = jax.jit(step, donate_argnums=donate_argnums,
                         in_shardings=(self.params, self.state, None),
                         out_shardings=(self.params, self.state, rep))
        mesh, p_sh, s_sh = self.mesh, self.params, self.state

        def run(params, state, batch):
            params = jax.device_put(params, p_sh)
            state = jax.device_put(state, s_sh)
            return jitted(params, state, shard_batch(batch, mesh))

        run.jitted = jitted
        run.shardings = self
        return run


def init_sharded(init_fn: Callable, params, cfg: M.LlamaConfig | None, mesh: Mesh,
                 traceable: bool = True, ref: tuple | None = None):
    """``(state, StepShardings)``: ``init_fn(params)`` created straight into its shardings.

    ``traceable``: the state is computed by one ``jax.jit`` with ``out_shardings`` (no full copy
    on one device); otherwise (``lisa(probs=...)``, whose init runs on the host) eagerly, then
    placed. ``params`` should already be placed (``param_shardings``). ``ref``: ``(tree,
    shardings)`` the state mirrors when it is not ``params`` (LoRA: see ``init_lora_sharded``).
    """
    p_sh = param_shardings(cfg, params, mesh)
    ref_tree, ref_sh = ref if ref is not None else (params, p_sh)
    if traceable:
        shapes = jax.eval_shape(init_fn, params)
        s_sh = opt_state_shardings(shapes, ref_tree, mesh, ref_sh, cfg)
        state = jax.jit(init_fn, out_shardings=s_sh)(params)
    else:
        state = init_fn(params)
        s_sh = opt_state_shardings(state, ref_tree, mesh, ref_sh, cfg)
        state = jax.device_put(state, s_sh)
    return state, StepShardings(mesh, p_sh, s_sh)


def init_lora_sharded(init_fn: Callable, params, cfg: M.LlamaConfig | None, mesh: Mesh):
    """``init_sharded`` for a LoRA state ``(adapters, opt_state) = init_fn(params)``: the
    adapters follow ``lora_shardings``, their moments the adapters."""
    lora_shapes = jax.eval_shape(init_fn, params)[0]
    l_sh = lora_shardings(cfg, lora_shapes, mesh)
    return init_sharded(init_fn, params, cfg, mesh, ref=(lora_shapes, l_sh))


def hf_shardings(cfg_or_path: "M.LlamaConfig | str | os.PathLike", mesh: Mesh):
    """``(leaf_path, shape, dtype) -> NamedSharding`` for ``load_hf(..., shardings=)``, so each
    leaf lands in its ``param_shardings`` layout as soon as it is read (``cfg_or_path``: the
    model's config, or its directory)."""
    if isinstance(cfg_or_path, M.LlamaConfig):
        cfg = cfg_or_path
    else:
        from lisa_jax.hf import read_hf_config
        cfg = M.LlamaConfig.from_hf(read_hf_config(os.fspath(cfg_or_path)))

    def fn(leaf_path, shape, dtype):
        return NamedSharding(mesh, leaf_spec(cfg, tuple(leaf_path), shape, mesh))

    return fn


def describe(tree) -> dict[str, str]:
    """``{"layers/wq": "(None, 'fsdp', 'tp')", ...}``: the spec of every leaf of a placed tree."""
    return {"/".join(_names(p)): str(tuple(x.sharding.spec))
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
