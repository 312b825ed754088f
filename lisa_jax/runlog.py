"""A run's directory and what the run reports into it and onto the terminal: the directory's
check, creation and lock, the processes' roles (process 0 alone writes and prints, the others wait
at barriers), lines and the progress bar, ``metrics.jsonl`` with TensorBoard scalars beside it,
``config.yaml``, ``summary.json`` and the peak memory of the run.
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
import sys
from pathlib import Path
from typing import Callable

import jax
import yaml

from lisa_jax.config import TrainConfig, TrainError, os_error_line
from lisa_jax.ops import DETERMINISTIC_XLA_FLAG

# ----------------------------------------------------------------------------- processes


def is_main(cfg: TrainConfig) -> bool:
    """Process 0 writes the run's files and prints; with one process, always."""
    return not cfg.distributed or jax.process_index() == 0


def barrier(cfg: TrainConfig, name: str) -> None:
    if cfg.distributed and jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def init_distributed(cfg: TrainConfig) -> None:
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


# ----------------------------------------------------------------------------- determinism


def _backends_started() -> bool:
    from jax._src import xla_bridge
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if started else bool(getattr(xla_bridge, "_backends", None))


def set_deterministic(cfg: TrainConfig) -> None:
    """``--deterministic``: put XLA's deterministic GPU ops into ``XLA_FLAGS``, which XLA reads
    once, when JAX starts its backends; so this must run before the first JAX computation of
    the process (``lisa-jax train`` calls it first). Where JAX has already started a GPU
    backend without the flag, a one-line error says how to set it; on CPU nothing is needed."""
    if not cfg.deterministic:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_deterministic_ops" in flags:
        return  # the user's own setting stands
    if _backends_started():
        if jax.default_backend() == "gpu":
            raise TrainError("--deterministic must be set before JAX starts, but this process "
                             "already runs JAX on the GPU; pass it to `lisa-jax train`, or set "
                             f"XLA_FLAGS={DETERMINISTIC_XLA_FLAG} before starting Python")
        return
    os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_XLA_FLAG}".strip()


def deterministic_note(cfg: TrainConfig) -> str | None:
    """The header's line about ``--deterministic`` (``None`` when not asked for)."""
    if not cfg.deterministic:
        return None
    backend = jax.default_backend()
    if backend == "gpu":
        return (f"deterministic: XLA_FLAGS has {DETERMINISTIC_XLA_FLAG} (deterministic GPU "
                "ops: the same run on the same GPU model and software repeats bit for bit)")
    return (f"deterministic: a no-op on {backend.upper()} (its XLA ops already repeat bit for "
            "bit on the same machine and software)")


# ----------------------------------------------------------------------------- the directory


def _check_out_path(out: Path) -> None:
    """``--out`` names a directory, new or existing, and no part of it is a file."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file; pass --out a directory (new or a run's)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise TrainError(f"--out {out} is under a file ({parent}); pass --out a path "
                                 "whose parents are directories")
            break


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainError(os_error_line(e, f"creating the run directory {path}"))
    if not os.access(path, os.W_OK):  # a read-only mount says so here even to root
        raise TrainError(f"--out {path} cannot be written (read-only or not yours); pass --out "
                         "a directory you can write")


def has_run(out: Path) -> bool:
    """Whether ``out`` holds a run (its settings or checkpoints)."""
    return (out / "config.yaml").exists() or (out / "checkpoints").exists()


def prepare_out_dir(cfg: TrainConfig) -> Path:
    """Check and create the run directory. Several processes: every one checks (so all raise
    the same error), then process 0 alone clears and creates it while the others wait.

    A run directory, with checkpoints or none yet (a run stopped before its first save), is
    continued by ``--resume``: a plain rerun into it says so."""
    out = Path(cfg.out)
    _check_out_path(out)
    if has_run(out) and not (cfg.resume or cfg.overwrite):
        raise TrainError(f"{out} holds another run; pass --resume to continue it or "
                         "--overwrite to replace it")
    if cfg.resume and not has_run(out):
        raise TrainError(f"nothing to resume in {out}; drop --resume to start a new run")
    barrier(cfg, "checked the run directory")
    if is_main(cfg):
        if cfg.overwrite and not cfg.resume and out.exists():
            shutil.rmtree(out)
        _make_dir(out)
    barrier(cfg, "created the run directory")
    return out


@contextlib.contextmanager
def run_lock(cfg: TrainConfig):
    """Hold ``.<out>.lock`` beside the run directory (process 0) for the whole run, so that a
    second run into the same ``--out`` is refused, ``--overwrite`` included (the lock sits
    outside the directory it would delete). The lock is the kernel's: a dead process's lock
    is free again, so a stale lock file is simply taken over."""
    if not is_main(cfg):
        yield
        return
    out = Path(cfg.out)
    _check_out_path(out)
    path = out.parent / f".{out.name}.lock"
    _make_dir(out.parent)
    try:
        f = open(path, "a+")
    except OSError as e:
        raise TrainError(os_error_line(e, f"creating the run directory's lock {path}"))
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


def write_config(out: Path, cfg: TrainConfig) -> None:
    """``config.yaml``: the resolved settings, which ``--resume`` reads back."""
    with open(out / "config.yaml", "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)


def write_summary(out: Path, summary: dict) -> None:
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=1)


# ----------------------------------------------------------------------------- reporting


def printer(main_process: bool) -> Callable[..., None]:
    """``say(*parts, file=None)``: one line on the terminal (above the progress bar), process 0
    only; ``file=sys.stderr`` for warnings."""
    from tqdm.auto import tqdm

    def say(*parts, file=None):
        if main_process:
            tqdm.write(" ".join(str(x) for x in parts), file=file)
    return say


def shows_bar(cfg: TrainConfig, main_process: bool) -> bool:
    """Whether the run draws a progress bar: ``--progress`` on a terminal, process 0. Into a
    file or a pipe a bar's carriage returns pile up, so the run prints loss lines instead."""
    stream = sys.stderr  # where tqdm draws
    return bool(cfg.progress and main_process and hasattr(stream, "isatty") and stream.isatty())


def progress_bar(total: int, initial: int, show: bool, desc: str):
    """The run's tqdm bar over the optimizer steps (hidden when not ``show``)."""
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not show, dynamic_ncols=True, desc=desc)


def loss_line(step: int, total: int, loss: float, lr: float, tokens_per_s: float,
              active: list[int] | None) -> str:
    """The line a run without a progress bar prints every ``--log-every`` steps."""
    return f"step {step}/{total}: " + step_line(loss, lr, tokens_per_s, active)


def step_line(loss: float, lr: float, tokens_per_s: float, active: list[int] | None) -> str:
    """The progress bar's text after a step."""
    return (f"loss {loss:.3f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s"
            + (f" layers {active}" if active is not None else ""))


def strict_json(value):
    """``value`` with every non-finite float as ``None``: JSON has no NaN or Infinity, and
    Python's ``json`` would write the non-standard ``NaN`` literal that strict readers refuse."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def keep_rows_through(path: Path, step: int) -> int:
    """Drop the rows of ``metrics.jsonl`` after ``step`` (the checkpoint a run resumes from,
    whose later steps run again) and any torn line a killed run left; returns how many rows
    went. The file is replaced at once (a kill now leaves the old or the new one)."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            keep = isinstance(row, dict) and int(row.get("step", 0)) <= step
        except (ValueError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += bool(line.strip())
    if dropped or not path.read_text().endswith("\n"):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(x + "\n" for x in kept))
        os.replace(tmp, path)
    return dropped


WANDB_ID = "wandb_id"  # the run directory's file holding its wandb run id


def check_reporting(cfg: TrainConfig) -> None:
    """``--report-to wandb`` needs the ``wandb`` package: a one-line error before the run
    starts when it is missing."""
    if cfg.report_to != "wandb":
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise TrainError("--report-to wandb needs the wandb package; pip install "
                         "'lisa_jax[wandb]' (or wandb), or drop --report-to") from None


def _wandb_run(out: Path, cfg: TrainConfig, resumed: bool):
    """The run's wandb run, named after ``--out``: its id is kept in ``<out>/wandb_id`` so a
    resumed run continues the same wandb run; files go to ``<out>/wandb/`` (where
    ``WANDB_MODE=offline`` leaves them for ``wandb sync``)."""
    import secrets

    import wandb
    id_file = out / WANDB_ID
    run_id = id_file.read_text().strip() if resumed and id_file.is_file() else ""
    if not run_id:
        run_id = secrets.token_hex(8)
        id_file.write_text(run_id + "\n")
    run = wandb.init(project=cfg.wandb_project, name=out.absolute().name, id=run_id,
                     resume="allow", dir=str(out))
    # A resumed run may have changed settings (a lower --lr, more --steps): they replace the
    # saved ones, as in config.yaml.
    run.config.update(dataclasses.asdict(cfg), allow_val_change=True)
    return run


def _scalars(row: dict) -> dict:
    """The finite numbers of a row (what TensorBoard and wandb plot)."""
    return {k: v for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class MetricsWriter:
    """metrics.jsonl, plus TensorBoard scalars when tensorboardX is available (and wandb with
    ``--report-to wandb``): one strict JSON row per step written (non-finite numbers as
    ``null``). ``resume_from``: the step a resumed run restarts after; rows and TensorBoard
    events of later steps are dropped, so each step has one row however often the run was
    killed and resumed (wandb keeps the rows it has and takes the repeated steps' again only
    past its last)."""

    def __init__(self, out: Path, resume_from: int | None = None,
                 cfg: TrainConfig | None = None):
        path = out / "metrics.jsonl"
        if resume_from is not None:
            keep_rows_through(path, resume_from)
        self.f = open(path, "a")
        try:
            from tensorboardX import SummaryWriter
            purge = resume_from + 1 if resume_from is not None else None
            self.tb = SummaryWriter(str(out / "tb"), purge_step=purge)
        except ImportError:
            self.tb = None
        self.wandb = None
        if cfg is not None and cfg.report_to == "wandb":
            self.wandb = _wandb_run(out, cfg, resumed=resume_from is not None)

    def write(self, step: int, row: dict) -> None:
        self.f.write(json.dumps(strict_json({"step": step, **row}), allow_nan=False) + "\n")
        self.f.flush()
        scalars = _scalars(row)
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None and scalars and step >= (self.wandb.step or 0):
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class NoWriter:
    """The writer of the processes other than 0."""

    def write(self, step: int, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def metrics_writer(out: Path, main_process: bool, resume_from: int | None = None,
                   cfg: TrainConfig | None = None) -> MetricsWriter | NoWriter:
    return MetricsWriter(out, resume_from, cfg) if main_process else NoWriter()


def peak_memory_gib() -> tuple[float | None, str]:
    """``(GiB, kind)``: the device's peak bytes in use where the backend reports them (GPU,
    TPU), else the process's peak resident memory on the host."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30, "device"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "host RSS"
