"""A run's checkpoints: orbax steps of (parameters, optimizer state, JSON metadata) in
``<run>/checkpoints``, written and read back by ``Checkpoints``.

The optimizer state is stored as its list of leaves and rebuilt with the tree structure of a
fresh state (a method's ``state_template``): the structure never changes, while the shapes may
(Bernoulli LISA samples a different number of layers per period), so no shaped template is needed
to restore it. Parameters are stored in the canonical stacked layout.

A save is atomic: orbax writes a step into ``<step>.orbax-checkpoint-tmp-*`` and renames it
when complete, and drops the oldest kept step only after that. A save that fails (a full disk)
or is cut short (a second Ctrl-C) leaves the earlier checkpoints as they were and its temporary
directory is removed. ``restore_latest`` falls back from a damaged latest step to the newest one
that reads, moving the damaged one aside into ``<run>/checkpoints.damaged/``.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

from lisa_jax.config import TrainError, os_error_line

ITEMS = ("params", "opt", "meta")
TMP_MARK = ".orbax-checkpoint-tmp"


class DamagedCheckpoint(TrainError):
    """A checkpoint step whose files cannot be read; ``cause``: why, in a few words."""

    def __init__(self, message: str, cause: str):
        super().__init__(message)
        self.cause = cause


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
        if jax.process_index() == 0:
            self._remove_unfinished()  # of a save killed in an earlier process

    def _remove_unfinished(self, step: int | None = None) -> None:
        """Delete the temporary directories of unfinished saves (of ``step``, or all)."""
        prefix = f"{step}{TMP_MARK}" if step is not None else None
        for d in self.dir.glob(f"*{TMP_MARK}*"):
            if prefix is None or d.name.startswith(prefix):
                shutil.rmtree(d, ignore_errors=True)

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
        last = self.latest()
        try:
            self._mngr.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt=ocp.args.StandardSave(leaves),
                meta=ocp.args.JsonSave(meta)), force=True)
            self._mngr.wait_until_finished()
        except BaseException as e:  # a failed or interrupted save leaves nothing half-written
            if jax.process_index() == 0:
                self._remove_unfinished(step)
            if not isinstance(e, Exception):
                raise  # KeyboardInterrupt: the caller says what was kept
            kept = (f"the last complete checkpoint, step {last}, is intact" if last is not None
                    else "no checkpoint was complete yet")
            if isinstance(e, OSError):
                line = os_error_line(e, f"saving checkpoint step {step} in {self.dir}")
            else:
                cause = _first_line(e)
                os_cause = _os_cause(e)
                line = (os_error_line(os_cause, f"saving checkpoint step {step} in {self.dir}")
                        if os_cause else f"checkpoint step {step} could not be written in "
                        f"{self.dir} ({cause}); check the disk, then continue with --resume")
            raise TrainError(f"{line} ({kept})") from e

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
            cause = _first_line(e)
            raise DamagedCheckpoint(f"checkpoint {self.dir / str(step)} cannot be read "
                                    f"({cause}); delete that step directory to fall back to an "
                                    "earlier one, or start again with --overwrite", cause)
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

    def restore_latest(self, params_like, opt_like, warn: Callable[[str], None]):
        """``(step, params, opt_state, meta)`` of the newest step that reads (``None`` when
        there is none). A damaged step is moved aside into ``checkpoints.damaged/`` with a
        ``warn``ing, so the run falls back to the one before: it loses the steps between the
        two, not the run. With no readable step left, the first damage is the error."""
        first_error = None
        for step in reversed(self.all_steps()):
            try:
                return (step, *self.restore(step, params_like, opt_like))
            except DamagedCheckpoint as e:
                first_error = first_error or e
                earlier = [s for s in self.all_steps() if s < step]
                if not earlier:
                    break
                aside = self.dir.parent / f"{self.dir.name}.damaged" / str(step)
                if jax.process_index() == 0:
                    aside.parent.mkdir(parents=True, exist_ok=True)
                    if aside.exists():
                        shutil.rmtree(aside)
                    shutil.move(str(self.dir / str(step)), str(aside))
                self._mngr.reload()
                warn(f"warning: checkpoint step {step} cannot be read ({e.cause[:120]}); moved "
                     f"it to {aside} and resuming from the one before, step {earlier[-1]}")
        if first_error is not None:
            raise first_error
        return None

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


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:200]


def _os_cause(e: BaseException) -> OSError | None:
    """The ``OSError`` behind an exception orbax wrapped, if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    return None
