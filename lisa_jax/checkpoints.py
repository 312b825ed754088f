"""A run's checkpoints: orbax steps of (parameters, optimizer state, JSON metadata) in
``<run>/checkpoints``, written and read back by ``Checkpoints``.

The optimizer state is stored as its list of leaves and rebuilt with the tree structure of a
fresh state (a method's ``state_template``): the structure never changes, while the shapes may
(Bernoulli LISA samples a different number of layers per period), so no shaped template is needed
to restore it. Parameters are stored in the canonical stacked layout.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from lisa_jax.config import TrainError

ITEMS = ("params", "opt", "meta")


class Checkpoints:
    """orbax ``CheckpointManager`` over (params, optimizer state leaves, JSON metadata),
    keeping the latest ``keep`` steps."""

    def __init__(self, directory: Path, keep: int):
        import orbax.checkpoint as ocp
        self._ocp = ocp
        self.dir = Path(directory)
        self._mngr = ocp.CheckpointManager(
            self.dir.absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False))

    def latest(self) -> int | None:
        """The latest saved step, or ``None`` before the first."""
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        """Every step kept, oldest first."""
        return sorted(self._mngr.all_steps())

    def save(self, step: int, params, opt_state, meta: dict) -> None:
        ocp = self._ocp
        leaves = {f"{i:06d}": x for i, x in enumerate(jax.tree.leaves(opt_state))}
        # orbax refuses zero-size arrays, which Bernoulli LISA's state holds in a period with
        # no sampled layer: their shapes go into the metadata instead.
        empty = {k: [list(x.shape), str(x.dtype)] for k, x in leaves.items() if x.size == 0}
        leaves = {k: x for k, x in leaves.items() if k not in empty}
        meta = {**meta, "empty_opt_leaves": empty}
        self._mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt=ocp.args.StandardSave(leaves),
            meta=ocp.args.JsonSave(meta)), force=True)
        self._mngr.wait_until_finished()

    def restore(self, step: int, params_like, opt_like):
        """``(params, opt_state, meta)`` of ``step``: the parameters with the shapes and dtypes
        of ``params_like``, the optimizer state with the tree structure of ``opt_like``."""
        ocp = self._ocp
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, params_like)
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(
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

    def read(self, step: int, *items: str) -> dict:
        """The ``items`` of ``step`` (of ``ITEMS``; default all) as stored, with no template:
        ``params`` as saved, ``opt`` as its dict of non-empty leaves, ``meta`` as written (with
        ``empty_opt_leaves``). For inspecting a run, e.g. comparing two."""
        ocp = self._ocp
        unknown = sorted(set(items) - set(ITEMS))
        if unknown:
            raise ValueError(f"unknown checkpoint item(s) {', '.join(unknown)}; use "
                             f"{', '.join(ITEMS)}")
        kinds = {"params": ocp.args.StandardRestore, "opt": ocp.args.StandardRestore,
                 "meta": ocp.args.JsonRestore}
        return dict(self._mngr.restore(step, args=ocp.args.Composite(
            **{name: kinds[name]() for name in items or ITEMS})))
