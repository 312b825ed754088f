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
import os
import resource
import shutil
from pathlib import Path
from typing import Callable

import jax
import yaml

from lisa_jax.config import TrainConfig, TrainError

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


# ----------------------------------------------------------------------------- the directory


def prepare_out_dir(cfg: TrainConfig) -> Path:
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
    barrier(cfg, "checked the run directory")
    if is_main(cfg):
        if cfg.overwrite and not cfg.resume and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
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


def write_config(out: Path, cfg: TrainConfig) -> None:
    """``config.yaml``: the resolved settings, which ``--resume`` reads back."""
    with open(out / "config.yaml", "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)


def write_summary(out: Path, summary: dict) -> None:
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=1)


# ----------------------------------------------------------------------------- reporting


def printer(main_process: bool) -> Callable[..., None]:
    """``say(*parts)``: one line on the terminal (above the progress bar), process 0 only."""
    from tqdm.auto import tqdm

    def say(*parts):
        if main_process:
            tqdm.write(" ".join(str(x) for x in parts))
    return say


def progress_bar(total: int, initial: int, show: bool, desc: str):
    """The run's tqdm bar over the optimizer steps (hidden when not ``show``)."""
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not show, dynamic_ncols=True, desc=desc)


def step_line(loss: float, lr: float, tokens_per_s: float, active: list[int] | None) -> str:
    """The progress bar's text after a step."""
    return (f"loss {loss:.3f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s"
            + (f" layers {active}" if active is not None else ""))


class MetricsWriter:
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


class NoWriter:
    """The writer of the processes other than 0."""

    def write(self, step: int, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def metrics_writer(out: Path, main_process: bool) -> MetricsWriter | NoWriter:
    return MetricsWriter(out) if main_process else NoWriter()


def peak_memory_gib() -> tuple[float | None, str]:
    """``(GiB, kind)``: the device's peak bytes in use where the backend reports them (GPU,
    TPU), else the process's peak resident memory on the host."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30, "device"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "host RSS"
