"""The fine-tuning loop: ``train(TrainConfig(...))`` is what ``lisa-jax train`` runs. It loads the
data and model, starts or resumes the method's state, steps, evaluates, checkpoints, and at the
end exports; the pieces are the settings (``config``), the methods (``methods``), checkpoints
(``checkpoints``), the run directory and its log (``runlog``) and samples (``prompts``).

A run directory holds::

    config.yaml        the resolved configuration
    metrics.jsonl      one strict JSON row per logged step (its evaluation included; non-finite
                       numbers as null); a resumed run drops the rows after its checkpoint
    tb/                TensorBoard event files (when tensorboardX is installed)
    checkpoints/       orbax checkpoints: parameters, optimizer state (with the LISA sampler's
                       key and active layers), data position, step, best evaluation so far
    eval_replies.jsonl the last evaluation's replies to --eval-data, scored, one per record
    best/              with --keep-best: the best evaluation's export, hf/ (and LoRA's
                       adapter/), and best.json (metric, value, step)
    hf/                the fine-tuned model as an HF directory (at the end)
    adapter/           LoRA: the adapters alone in PEFT's format (at the end)

Everything that decides the run's future is in the checkpoint, so ``--resume`` continues the
same run: same batches, same sampled layers, bit-identical parameters. Ctrl-C (or SIGTERM)
finishes the step and saves; a second one stops at once, discarding a save in progress, and
the run resumes from its last complete checkpoint (or from step 0 when it had none yet). A
damaged latest checkpoint is moved aside with a warning and the one before it is used.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
import warnings
from typing import Any, Callable

import jax
import numpy as np

from lisa_jax import data as data_lib
from lisa_jax import evaluate as eval_lib
from lisa_jax import methods
from lisa_jax import model as M
from lisa_jax import prompts
from lisa_jax import runlog
from lisa_jax.checkpoints import Checkpoints
from lisa_jax.config import (TrainConfig, TrainError, TrainInterrupted, check_config,
                             data_paths, data_weights, os_error_line, resume_changes,
                             with_default_remat)


def train(cfg: TrainConfig, halt_at: int | None = None) -> dict:
    """Run (or resume) a fine-tuning run; returns its summary.

    ``halt_at``: stop after that step as an interruption would (checkpoint, then return), for
    tests of resuming.
    """
    cfg = with_default_remat(cfg)
    runlog.set_deterministic(cfg)  # before JAX starts its backends
    if cfg.mesh or cfg.distributed:
        from lisa_jax import sharding as SH
        SH.order_cpu_collectives()  # before JAX's backends start
    runlog.init_distributed(cfg)  # first: joining must come before JAX uses a device
    check_config(cfg)
    runlog.check_reporting(cfg)
    with runlog.run_lock(cfg):
        try:
            return _run(cfg, halt_at)
        except OSError as e:  # a full disk, a file made unreadable during the run, ...
            raise TrainError(_os_error(e, cfg)) from e


def _os_error(e: OSError, cfg: TrainConfig) -> str:
    """The one line of an ``OSError``: writing the run directory, or reading an input."""
    from pathlib import Path
    out = Path(cfg.out).absolute()
    path = Path(e.filename).absolute() if e.filename else None
    if path is not None and out not in path.parents and path != out:
        what = (e.strerror or type(e).__name__).rstrip(".")
        return (f"{what[0].lower() + what[1:]} reading {e.filename!r}; check that file "
                "(--model, --data) and its permissions")
    return os_error_line(e, "writing the run")


@dataclasses.dataclass
class _Inputs:
    """The data and model of a run."""
    tokenizer: Any
    splits: Any
    model: M.Model
    loader: data_lib.DataLoader
    mesh: Any


def _load_inputs(cfg: TrainConfig, say: Callable) -> _Inputs:
    """The data and model. What the data module warns about (e.g. all responses empty, as a
    Python warning and again as a count in its log) is said once, as a line of the run."""
    import logging
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)
    data_log = logging.getLogger(data_lib.__name__)
    keep, propagate = Keep(logging.WARNING), data_log.propagate
    data_log.addHandler(keep)
    data_log.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            inputs = _read_inputs(cfg)
    finally:
        data_log.removeHandler(keep)
        data_log.propagate = propagate
    ours = {os.path.abspath(m.__file__) for m in (data_lib, sys.modules[__name__])}
    lines: list[str] = []
    for w in caught:
        if os.path.abspath(w.filename) in ours and issubclass(w.category, UserWarning):
            lines.append(str(w.message))
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    for r in records:
        line = r.getMessage()
        # "N of N records have an empty response" repeats the all-empty warning.
        if not ("empty response" in line and any("empty response" in x for x in lines)):
            lines.append(line)
    for line in dict.fromkeys(lines):
        say(f"warning: {line}", file=sys.stderr)
    return inputs


def _read_inputs(cfg: TrainConfig) -> _Inputs:
    from lisa_jax.hf import load_hf
    try:
        tokenizer = data_lib.load_tokenizer(cfg.model)
        chat = data_lib.use_chat_template(tokenizer, cfg.chat_template)
        splits = data_lib.prepare_data(data_paths(cfg), tokenizer, cfg.max_seq_len,
                                       eval_fraction=cfg.eval_fraction or None, seed=cfg.seed,
                                       truncate=cfg.truncate, use_chat_template=chat,
                                       train_on_inputs=cfg.train_on_inputs)
        weights = data_weights(cfg)
        mesh = shardings = None
        if cfg.mesh:
            from lisa_jax import sharding as SH
            mesh = SH.make_mesh(cfg.mesh)
            SH.check_batch_size(cfg.batch_size, mesh)
            shardings = SH.hf_shardings(cfg.model, mesh)
        model = load_hf(cfg.model, dtype=cfg.dtype, shardings=shardings)
        data_lib.check_vocab(tokenizer, model.cfg.vocab_size)
        loader = data_lib.DataLoader(splits.train, cfg.batch_size, seed=cfg.seed,
                                     pad_id=tokenizer.pad_token_id, max_seq_len=cfg.max_seq_len,
                                     packing=cfg.packing, weights=weights,
                                     sources=splits.train_sources if weights else None,
                                     source_names=data_paths(cfg))
    except (ValueError, FileNotFoundError) as e:
        raise TrainError(str(e).splitlines()[0])
    return _Inputs(tokenizer, splits, model, loader, mesh)


@dataclasses.dataclass
class _Steps:
    """What the steps of a run share: the run's parts, and where they report."""
    cfg: TrainConfig
    method: methods.Method
    loader: data_lib.DataLoader
    ckpts: Checkpoints
    schedule: Callable
    total: int
    mesh: Any
    eval_sets: list
    answers: eval_lib.AnswerEval | None
    best: eval_lib.BestTracker | None
    out: Any
    writer: Any
    bar: Any
    say: Callable
    show_bar: bool = False
    saving: int | None = None  # the step being saved, while a save runs


@dataclasses.dataclass
class _Progress:
    """What changes from step to step."""
    params: Any
    step: int
    last_saved: int | None
    tokens_seen: int = 0
    status: str = "finished"


def _run(cfg: TrainConfig, halt_at: int | None) -> dict:
    """``train`` once the settings are checked and the run directory is locked."""
    out = runlog.prepare_out_dir(cfg)
    changes = resume_changes(cfg, out) if cfg.resume else {}
    main_process = runlog.is_main(cfg)
    say = runlog.printer(main_process)
    for name, (old, new) in changes.items():
        say(f"resuming with --{name.replace('_', '-')} {new!r} (was {old!r})")

    inputs = _load_inputs(cfg, say)
    mcfg, params, loader = inputs.model.cfg, inputs.model.params, inputs.loader
    # A seeded sample across all lengths (not the shortest examples) when the set is larger.
    eval_sets = data_lib.eval_batches(inputs.splits.eval, cfg.batch_size,
                                      inputs.tokenizer.pad_token_id, cfg.max_seq_len,
                                      max_batches=cfg.eval_batches, seed=cfg.seed)
    # Greedy sampling runs on one device's copy of the model: skipped across processes.
    probes = [] if cfg.distributed and jax.process_count() > 1 else prompts.sample_probes(cfg)
    answers = None
    if cfg.eval_data and jax.process_count() > 1:
        raise TrainError("--eval-data generates on one process; drop it with --distributed "
                         "over several processes (the held-out loss still runs)")
    if cfg.eval_data:
        from lisa_jax.generate import stop_token_ids
        try:
            stop = stop_token_ids(mcfg, inputs.tokenizer, cfg.model)
        except ValueError as e:
            raise TrainError(str(e).splitlines()[0])
        answers = eval_lib.AnswerEval(cfg, inputs.tokenizer, stop)
    if cfg.keep_best == "eval_loss" and not eval_sets:
        raise TrainError("--keep-best eval_loss needs held-out examples, and --eval-fraction "
                         f"{cfg.eval_fraction} of {len(inputs.splits.train)} leaves none; raise "
                         "--eval-fraction or keep another metric")
    best = eval_lib.BestTracker(cfg.keep_best, cfg.early_stop_patience) \
        if cfg.keep_best else None
    steps_per_epoch = max(len(loader) // cfg.grad_accum, 1)
    total = cfg.steps or max(int(math.ceil(cfg.epochs * steps_per_epoch)), 1)
    schedule = methods.make_schedule(cfg, total)
    method = methods.method_for(cfg, mcfg, params, schedule, inputs.mesh)

    ckpts = Checkpoints(out / "checkpoints", cfg.keep_checkpoints)
    start = 0
    if cfg.resume:
        found = ckpts.restore_latest(params, method.state,
                                     warn=lambda line: say(line, file=sys.stderr))
        if found is not None:
            start, params, method.state, meta = found
            loader.load_state_dict(meta["data"])
            method.load_checkpoint_meta(meta)
            say(f"resumed {out} at step {start}")
            if best is not None and not best.load_state_dict(meta.get("best")) \
                    and meta.get("best"):
                say(f"the checkpoint kept the best {meta['best']['metric']}; this run keeps "
                    f"the best {best.metric} from here on")
            if best is not None:
                _note_later_best(out, start, say)
        else:  # stopped before its first checkpoint: its settings are all there is
            say(f"no checkpoint yet in {out / 'checkpoints'}: the run starts again at step 0")
    if main_process:
        runlog.write_config(out, cfg)

    n_params = sum(x.size for x in jax.tree.leaves(params))
    n_trained, trained = method.trainable(params)
    say(f"model {cfg.model}: {mcfg.model_type}, {mcfg.num_layers} layers, "
        f"{n_params / 1e6:.1f}M parameters, {cfg.dtype}; method {cfg.method}"
        + method.description())
    say(f"trainable: {methods.count_text(n_trained)} of {methods.count_text(n_params)} "
        f"parameters ({100 * n_trained / max(n_params, 1):.3g}%): {trained}")
    note = runlog.deterministic_note(cfg)
    if note:
        say(note)
    say(f"data {cfg.data}: {len(inputs.splits.train)} train / {len(inputs.splits.eval)} eval "
        f"examples ({inputs.splits.stats.dropped_too_long} dropped as longer than "
        f"{cfg.max_seq_len} tokens); {total} steps of {cfg.batch_size}×{cfg.grad_accum} "
        + ("packed rows (several examples each)" if cfg.packing else "examples"))

    if probes and start == 0:
        before = M.Model(mcfg, method.model_params(params))
        for record, _ in probes:
            text = prompts.sample(before, inputs.tokenizer, record, cfg.sample_tokens, cfg.model)
            say(f"before: {prompts.shown(record)} -> {text!r}")
        del before
    progress = _Progress(methods.to_layout(params, cfg, training=True), start, start or None)

    show_bar = runlog.shows_bar(cfg, main_process)
    run = _Steps(cfg, method, loader, ckpts, schedule, total, inputs.mesh, eval_sets,
                 answers=answers, best=best, out=out,
                 writer=runlog.metrics_writer(out, main_process,
                                              resume_from=start if cfg.resume else None,
                                              cfg=cfg),
                 bar=runlog.progress_bar(total, start, show_bar, cfg.method),
                 say=say, show_bar=show_bar)

    # Ctrl-C / SIGTERM: finish the step, checkpoint, exit. A second signal exits at once; a
    # save it cuts short is discarded (checkpoints.Checkpoints.save), the earlier ones stay.
    stop = {"signal": None}

    def on_signal(signum, frame):
        if stop["signal"] is not None:
            raise KeyboardInterrupt
        stop["signal"] = signum
        kept = (f"step {progress.last_saved}" if progress.last_saved else "none yet")
        say(f"{signal.Signals(signum).name}: stopping after this step with a checkpoint (again "
            f"to stop at once, keeping the last checkpoint: {kept})", file=sys.stderr)
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    t_start = time.perf_counter()
    if best is not None and best.should_stop and progress.step < total:
        progress.status = "early_stopped"  # resumed after it stopped: nothing more to do
        say(f"the run stopped early at step {progress.step} ({best.stop_line()}); raise "
            "--early-stop-patience to go on")
    try:
        while progress.step < total and progress.status != "early_stopped":
            _step(run, progress)
            if progress.status == "early_stopped":
                say(f"early stop at step {progress.step}: {best.stop_line()}")
                if progress.last_saved != progress.step:
                    _save(run, progress)
                break
            if stop["signal"] is not None or (halt_at is not None and progress.step >= halt_at):
                if progress.last_saved != progress.step:
                    _save(run, progress)
                progress.status = "interrupted"
                break
    except KeyboardInterrupt:
        last = ckpts.latest()
        cut = (f" during the save of step {run.saving}, which was discarded"
               if run.saving is not None else "")
        kept = (f"the last checkpoint, step {last}, is intact; continue from it with --resume"
                if last is not None else "no checkpoint was saved yet; --resume starts the run "
                "again at step 0")
        raise TrainInterrupted(f"stopped at once at step {progress.step}{cut}: {kept}")
    finally:
        run.bar.close()
        run.writer.close()
        for s, h in handlers.items():
            signal.signal(s, h)

    elapsed = time.perf_counter() - t_start
    peak, peak_kind = runlog.peak_memory_gib()
    summary = {"status": progress.status, "steps": progress.step, "time_s": round(elapsed, 1),
               "tokens": progress.tokens_seen,
               "peak_memory_gib": round(peak, 2) if peak else None,
               "peak_memory_kind": peak_kind, "out": str(out)}
    if best is not None and best.best_step is not None:
        summary["best"] = {"metric": best.metric, "value": best.best, "step": best.best_step,
                           "dir": str(out / BEST_DIR)}
    if progress.status == "interrupted":
        say(f"interrupted at step {progress.step}: checkpoint saved in {out / 'checkpoints'}; "
            "continue with --resume")
        return summary
    params = methods.to_layout(progress.params, cfg, training=False)  # what samples, exports read
    final = M.Model(mcfg, method.model_params(params))
    if cfg.export:
        from lisa_jax.hf import save_hf
        summary["hf_dir"] = save_hf(final, out / "hf", tokenizer_from=cfg.model)
        data_lib.export_chat_template(out / "hf", inputs.tokenizer, cfg.chat_template)
        adapter = method.save_adapter(out / "adapter", method.state)
        if adapter:
            summary["adapter_dir"] = adapter
    if probes:
        summary["samples"] = [
            {"prompt": prompts.shown(record), "expected": expected,
             "output": prompts.sample(final, inputs.tokenizer, record, cfg.sample_tokens,
                                      cfg.model)}
            for record, expected in probes]
    if main_process:
        runlog.write_summary(out, summary)
    return summary


def _step(run: _Steps, progress: _Progress) -> None:
    """One optimizer step, then its metrics, evaluation and checkpoint as they fall due."""
    cfg, method = run.cfg, run.method
    micro = [next(run.loader) for _ in range(cfg.grad_accum)]
    batch = _stack_micro(micro)
    if run.mesh is not None:
        from lisa_jax import sharding as SH
        batch = SH.shard_batch(batch, run.mesh)
    extra = method.before_step(progress.params)
    t0 = time.perf_counter()
    progress.params, metrics = method.step(progress.params, batch)
    loss = float(metrics["loss"])  # synchronizes: the step is done
    dt = time.perf_counter() - t0
    progress.step += 1
    step = progress.step
    if not math.isfinite(loss):
        progress.status = "diverged"
        where = f"step {progress.last_saved}" if progress.last_saved else "no checkpoint yet"
        raise TrainError(f"loss is {loss} at step {step}; stopped without saving (last "
                         f"good checkpoint: {where}); lower --lr or raise --clip-norm "
                         "strictness")
    n_tok = int(sum(int(b["num_tokens"]) for b in micro))
    progress.tokens_seen += n_tok
    method.after_step(metrics)
    active = method.active()
    lr = float(run.schedule(step - 1))
    logged = step % cfg.log_every == 0 or step == run.total
    row: dict = {}  # the step's one row of metrics.jsonl
    if logged:
        row = {"loss": loss, "lr": lr, "grad_norm": float(metrics["grad_norm"]),
               "tokens": n_tok, "tokens_per_s": n_tok / dt, "epoch": micro[-1]["epoch"]}
        if active is not None:
            row["active_layers"] = active
        row.update(extra)
    elif extra:
        row = {**extra, "active_layers": active}
    run.bar.update(1)
    run.bar.set_postfix_str(runlog.step_line(loss, lr, n_tok / dt, active))
    if logged and not run.show_bar:
        run.say(runlog.loss_line(step, run.total, loss, lr, n_tok / dt, active))
    if (run.eval_sets or run.answers) and (step % cfg.eval_every == 0 or step == run.total):
        _evaluate(run, progress, row)
    if row:
        run.writer.write(step, row)
    if step % cfg.save_every == 0 or step == run.total:
        _save(run, progress)


def _evaluate(run: _Steps, progress: _Progress, row: dict) -> None:
    """The step's evaluation into ``row``: the held-out loss, the answers to --eval-data (their
    replies into eval_replies.jsonl), and --keep-best's export when it is the best yet."""
    cfg, method, step = run.cfg, run.method, progress.step
    if run.eval_sets:
        row["eval_loss"] = method.eval_loss(progress.params, run.eval_sets)
    if run.answers is not None:
        model = M.Model(method.mcfg, method.model_params(progress.params))
        scores, replies = run.answers(model)
        del model
        row.update(scores)
        if runlog.is_main(cfg):
            run.answers.write_replies(run.out, step, replies)
    run.say(eval_lib.summary_line(step, row, run.answers.scorers if run.answers else None))
    if run.best is None:
        return
    if run.best.update(step, row):
        _export_best(run, progress)
        run.say(f"step {step}: best {run.best.metric} so far ({run.best.best:.6g}), exported "
                f"to {run.out / BEST_DIR}")
    elif run.best.should_stop:
        progress.status = "early_stopped"


BEST_DIR = "best"


def _note_later_best(out, start: int, say: Callable) -> None:
    """A run killed after exporting a best evaluation but before its next checkpoint resumes
    from a checkpoint that does not know it: ``best/`` stays (and is replaced when a repeated
    evaluation does better than the checkpoint's best, as the same one does on a CPU)."""
    import json
    info = out / BEST_DIR / "best.json"
    try:
        step = int(json.loads(info.read_text())["step"]) if info.is_file() else 0
    except (ValueError, KeyError, TypeError):
        return
    if step > start:
        say(f"warning: {out / BEST_DIR} holds step {step}, after the checkpoint of step {start}; "
            "it is replaced when an evaluation beats the checkpoint's best", file=sys.stderr)


def _export_best(run: _Steps, progress: _Progress) -> None:
    """``best/``: the model of this step as an HF directory (``hf/``, LoRA merged), LoRA's
    adapters (``adapter/``) and ``best.json``, built beside it and renamed into place, so
    ``best/`` is always one whole export."""
    import json
    import shutil
    from pathlib import Path

    from lisa_jax.atomic_dir import fresh_dir, replace_dir
    from lisa_jax.hf import save_hf
    cfg, method, out = run.cfg, run.method, Path(run.out)
    main = runlog.is_main(cfg)
    tmp = Path(fresh_dir(str(out), f".{BEST_DIR}.tmp-")) if main else out / f".{BEST_DIR}.tmp"
    params = methods.to_layout(progress.params, cfg, training=False)
    try:
        save_hf(M.Model(method.mcfg, method.model_params(params)), tmp / "hf",
                tokenizer_from=cfg.model)
        method.save_adapter(tmp / "adapter", method.state)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        progress.params = methods.to_layout(params, cfg, training=True)
    if not main:
        return
    (tmp / "best.json").write_text(json.dumps(
        {"metric": run.best.metric, "value": run.best.best, "step": progress.step}, indent=1))
    replace_dir(tmp, out / BEST_DIR)


def _save(run: _Steps, progress: _Progress) -> None:
    """Checkpoint the current step. Checkpoints hold the canonical, stacked layout: a per-layer
    run restacks on the device leaf by leaf (one leaf of extra memory, a copy at memory
    bandwidth), saves, and splits again."""
    meta = {"step": progress.step, "data": run.loader.state_dict(),
            **run.method.checkpoint_meta(),
            "best": run.best.state_dict() if run.best is not None else None}
    progress.params = methods.to_layout(progress.params, run.cfg, training=False)
    run.saving = progress.step  # until the save is complete (an interruption reads it)
    try:
        run.ckpts.save(progress.step, progress.params, run.method.state, meta)
    finally:
        progress.params = methods.to_layout(progress.params, run.cfg, training=True)
    run.saving = None
    progress.last_saved = progress.step


def _stack_micro(batches: list[dict]) -> dict:
    """``A`` loader batches as one ``[A, B, S]`` batch (padded to the longest ``S``); packed
    batches keep their ``segment_ids`` (padding is segment 0)."""
    keys = [k for k in ("input_ids", "loss_mask", "segment_ids") if k in batches[0]]
    if len(batches) == 1:
        return {k: batches[0][k] for k in keys}
    S = max(b["input_ids"].shape[1] for b in batches)

    def pad(x):  # right padding: under causal attention no real token sees it
        return np.pad(x, ((0, 0), (0, S - x.shape[1])))
    return {k: np.stack([pad(b[k]) for b in batches]) for k in keys}


def main_train(cfg: TrainConfig) -> int:
    """``lisa-jax train``: run and print the summary (errors are ``lisa_jax.cli.main``'s)."""
    s = train(cfg)
    print(f"done: {s['steps']} steps in {s['time_s']} s, {s['tokens']:,} tokens, peak "
          f"{s['peak_memory_kind']} memory {s['peak_memory_gib']} GiB")
    if "hf_dir" in s:
        print(f"exported: {s['hf_dir']}" + (f" (adapters alone, PEFT's format: "
                                            f"{s['adapter_dir']})" if "adapter_dir" in s
                                            else ""))
    if "best" in s:
        b = s["best"]
        print(f"best: {b['metric']} {b['value']:.6g} at step {b['step']}, exported to "
              f"{b['dir']}")
    for smp in s.get("samples", []):
        expected = f"  (reference: {smp['expected']!r})" if smp["expected"] else ""
        print(f"after:  {smp['prompt']} -> {smp['output']!r}{expected}")
    return 130 if s["status"] == "interrupted" else 0

