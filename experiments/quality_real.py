# python3 experiments/quality_real.py run --model .realmodel/hf --out experiments/results/quality_smollm2 --plan sweep --workers 8 --budget-s 560
"""The quality study on the real model (SmolLM2-135M-Instruct): full fine-tuning, LoRA and LISA
variants, each over a learning-rate sweep and then three seeds at its best rate, fine-tuned in
bfloat16 (float32-precision updates) on a mixture of three exact-match tasks
(``real_model/tasks.py``); greedy exact match per task on held-out prompts, forgetting, per-layer
weight-change norms, wall time.

    python3 experiments/quality_real.py run --model DIR --out OUT --plan sweep   # lr sweeps
    python3 experiments/quality_real.py run --model DIR --out OUT --plan seeds   # seeds 1, 2
    python3 experiments/quality_real.py run ... --only M1,M2 --more-seeds 3 4 5  # more seeds
    python3 experiments/quality_real.py summarize --out OUT                      # table, plots

``run`` keeps ``--workers`` runs going at once on the one device (each its own process),
starts no run after ``--budget-s`` minus the longest run seen so far and stops the ones still
going at ``--kill-after-s``, so it can be called again to go on: finished runs (rows of
``OUT/runs.jsonl``) are skipped. On one H200 a run takes 80–250 s with 10–13 at once. The first run of an ``OUT``
scores the base model and records its greedy answers to generic prompts: the forgetting of a
fine-tune is the rise of the per-token loss of those answers (base: 0). ``lisa_imp_norm``
samples layers with the probabilities of the paper's Figure 1 (``p ∝ ‖ΔW‖_LoRA / ‖ΔW‖_full``),
taken from the float32 runs ``fig1_lora`` and ``fig1_full`` once both have finished.

``summarize`` writes ``summary.json`` (one row per run and task, with ``method``, ``lr``,
``seed``, ``task``, ``exact_match``, ``forgetting``, ``steps``, ``gamma``, ``interval``,
``wall_s``), ``table.md``, ``figure1.png``, ``fp8_loss_curves.png`` (the loss curves of
the fp8 row and its bf16 twin), ``fp8_lean_loss_curves.png`` (the later fp8 rows') and
``fp8_all_loss_curves.png`` (Adam's second moment in bfloat16, alone and with every frozen
residual in e4m3).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "real_model"))
import common  # noqa: E402,F401  (the repository on sys.path when lisa_jax is not installed)
import tasks as task_lib  # noqa: E402

STEPS, BATCH, MAX_LEN, WARMUP = 1000, 16, 128, 50
TRAIN_PER_TASK, EVAL_PER_TASK, NEW_TOKENS = 2000, 100, 32
SEEDS = (0, 1, 2)

_LISA_LRS = (2e-4, 6e-4, 2e-3)
# 6e-5 (LoRA: 3e-4) added to each sweep whose best rate was its lowest
_LISA_LRS_LOW = (6e-5,) + _LISA_LRS
_LORA_LRS = (3e-4, 1e-3, 3e-3, 1e-2)
# name -> (trainer settings, learning rates of the sweep)
METHODS = {
    "full": (dict(method="full"), (3e-5, 1e-4, 3e-4)),
    "lora_r16": (dict(method="lora", lora_rank=16), _LORA_LRS),
    "lora_r64": (dict(method="lora", lora_rank=64), _LORA_LRS),
    **{f"lisa_g{g}_k{k}": (dict(method="lisa", lisa_layers=g, lisa_interval=k),
                           _LISA_LRS if (g, k) == (2, 5) else _LISA_LRS_LOW)
       for g in (2, 4, 8) for k in (5, 20)},
    "lisa_g2_k20_reset_all": (dict(method="lisa", lisa_layers=2, lisa_interval=20,
                                   lisa_reset="all"), _LISA_LRS),
    "lisa_online": (dict(method="lisa", lisa_layers=2, lisa_interval=20,
                         lisa_importance="online"), _LISA_LRS),
    "lisa_imp_norm": (dict(method="lisa", lisa_layers=2, lisa_interval=20), _LISA_LRS),
    # the embedding, final norm and head at a fifth of the layers' rate (--lisa-always-lr-scale:
    # at LISA's best rates, near full fine-tuning's), and a cosine that ends at a tenth of the
    # peak rather than at zero (do late periods train their layers?)
    **{f"lisa_g{g}_k20_eh0.2": (dict(method="lisa", lisa_layers=g, lisa_interval=20,
                                     lisa_always_lr_scale=0.2), _LISA_LRS_LOW) for g in (2, 8)},
    "lisa_g2_k20_floor0.1": (dict(method="lisa", lisa_layers=2, lisa_interval=20,
                                  min_lr_ratio=0.1), _LISA_LRS_LOW),
    # the frozen layers' GEMMs in fp8 (--frozen-precision fp8) against the same run in bf16,
    # at γ=2, K=20's best rate, on its seeds; both record their loss curves
    **{f"lisa_g2_k20_{p}": (dict(method="lisa", lisa_layers=2, lisa_interval=20,
                                 frozen_precision=p), (6e-4,)) for p in ("fp8", "bf16")},
    # the same fp8 row on its later code (each frozen layer's MLP as fp8_mlp.FrozenMlp), and
    # its leanest fast form: q, k, v recomputed in the backward, gate and up kept in e4m3
    "lisa_g2_k20_fp8_fused": (dict(method="lisa", lisa_layers=2, lisa_interval=20,
                                   frozen_precision="fp8"), (6e-4,)),
    "lisa_g2_k20_fp8_lean": (dict(method="lisa", lisa_layers=2, lisa_interval=20,
                                  frozen_precision="fp8", remat="qkv",
                                  frozen_residuals="fp8"), (6e-4,)),
    # Adam's second moment in stochastically rounded bfloat16 (--adam-nu-dtype), alone and
    # with fp8 frozen layers that keep every saved activation in e4m3 (the leanest --remat none)
    "lisa_g2_k20_nu_bf16": (dict(method="lisa", lisa_layers=2, lisa_interval=20,
                                 adam_nu_dtype="bfloat16"), (6e-4,)),
    "lisa_g2_k20_fp8_all": (dict(method="lisa", lisa_layers=2, lisa_interval=20,
                                 frozen_precision="fp8", frozen_residuals="fp8_all",
                                 adam_nu_dtype="bfloat16"), (6e-4,)),
    # the samplers against uniform γ=2, K=20, at its best rate and on its seeds
    **{f"lisa_{s}": (dict(method="lisa", lisa_layers=2, lisa_interval=20, lisa_sampler=s),
                     (6e-4,)) for s in ("owl", "reshuffle", "descending")},
}
# float32 runs for the weight-change norms (bfloat16 rounding of a merged LoRA export would
# swamp small changes), at the middle of their sweeps
FIGURE1 = {"fig1_full": dict(method="full", lr=1e-4), "fig1_lora": dict(method="lora",
                                                                       lora_rank=16, lr=3e-3)}


# ----------------------------------------------------------------------------- one run


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(row) + "\n")


def read_rows(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] \
        if path.exists() else []


def _model(model_dir: str, as_bfloat16: bool = False):
    import jax
    import jax.numpy as jnp

    from lisa_jax.hf import load_hf
    model = load_hf(model_dir)
    if as_bfloat16:  # what a bfloat16 fine-tune starts from
        model = type(model)(model.cfg, jax.tree.map(
            lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), model.params))
    return model


def greedy_replies(model, tok, stop, records: list[dict], new_tokens: int = NEW_TOKENS,
                   batch: int = 100) -> list[str]:
    """Greedy replies to ``records``' instructions (left-padded, length-sorted batches)."""
    from lisa_jax.generate import generate, truncate_at_stop
    from lisa_jax.prompts import prompt_ids

    pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
    prompts = [prompt_ids(tok, {"instruction": r["instruction"]}) for r in records]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies = [""] * len(prompts)
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        width = max(len(prompts[i]) for i in idx)
        ids = np.full((len(idx), width), pad, np.int32)
        mask = np.zeros_like(ids)
        for j, i in enumerate(idx):
            ids[j, width - len(prompts[i]):], mask[j, width - len(prompts[i]):] = prompts[i], 1
        out = np.asarray(generate(model, ids, max_new_tokens=new_tokens, attention_mask=mask,
                                  eos_token_id=stop, pad_token_id=pad))
        for j, i in enumerate(idx):
            kept = truncate_at_stop(out[j, width:].tolist(), stop)
            replies[i] = tok.decode(kept, skip_special_tokens=True).strip()
    return replies


def answer_nll(model, tok, records: list[dict]) -> float:
    """Mean per-token loss of ``records``' outputs given their instructions."""
    import jax

    from lisa_jax import data as data_lib
    from lisa_jax import step as step_lib
    examples, _ = data_lib.build_examples(records, tok, 512, truncate=True)
    loss = jax.jit(lambda p, b: step_lib.plain_loss(model.cfg, p, b))
    total = count = 0.0
    for b in data_lib.eval_batches(examples, 16, tok.pad_token_id or 0, 512):
        mean, n = loss(model.params, {k: b[k] for k in ("input_ids", "loss_mask")})
        total += float(mean) * float(n)
        count += float(n)
    return total / count


def layer_change_norms(before_dir: str, after_dir: str, num_layers: int) -> dict:
    """Frobenius norms of the weight change per layer, of the embedding and of the head."""
    from safetensors.numpy import load_file

    def tensors(d):
        out = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            out.update({k: v.astype(np.float32) for k, v in load_file(str(f)).items()})
        return out
    import ml_dtypes  # noqa: F401  (safetensors' bfloat16 arrays)
    before, after = tensors(before_dir), tensors(after_dir)
    layers = np.zeros(num_layers)
    other = {}
    for k, v in after.items():
        sq = float(np.sum((v - before[k]) ** 2))
        if k.startswith("model.layers."):
            layers[int(k.split(".")[2])] += sq
        else:
            other[k] = other.get(k, 0.0) + sq
    return {"layers": np.sqrt(layers).tolist(),
            "embed": float(np.sqrt(other.get("model.embed_tokens.weight", 0.0))),
            "head": float(np.sqrt(other.get("lm_head.weight", 0.0)))}


def score(replies: list[str], records: list[dict]) -> dict:
    exact = [r == x["output"] for r, x in zip(replies, records)]
    first = [r.split("\n")[0].strip() == x["output"] for r, x in zip(replies, records)]
    return {"exact_match": float(np.mean(exact)), "first_line": float(np.mean(first))}


def base_job(model_dir: str, out: Path) -> None:
    """Base scores per task, and the forgetting set: the base model's greedy answers."""
    from lisa_jax import data as data_lib
    from lisa_jax.generate import stop_token_ids

    held_out = json.loads((out / "held_out.json").read_text())
    tok = data_lib.load_tokenizer(model_dir)
    model = _model(model_dir, as_bfloat16=True)
    stop = stop_token_ids(model.cfg, tok, model_dir)
    records = [r for t in task_lib.TASKS for r in held_out[t]]
    replies = greedy_replies(model, tok, stop, records)
    generic = [{"instruction": p} for p in task_lib.GENERIC_PROMPTS]
    answers = greedy_replies(model, tok, stop, generic, new_tokens=96)  # whole answers
    forget = [dict(g, output=a) for g, a in zip(generic, answers)]
    (out / "forgetting_set.json").write_text(json.dumps(forget, indent=1))
    base_nll = answer_nll(model, tok, forget)
    (out / "base.json").write_text(json.dumps({"forgetting_nll": base_nll}))
    i = 0
    for t in task_lib.TASKS:
        n = len(held_out[t])
        _append(out / "runs.jsonl", dict(name="base", method="base", task=t, lr=None, seed=None,
                                         steps=0, gamma=None, interval=None, wall_s=0.0,
                                         forgetting=0.0,
                                         **score(replies[i:i + n], held_out[t]),
                                         replies=replies[i:i + 5]))
        i += n


def train_job(spec: dict, model_dir: str, out: Path) -> None:
    from lisa_jax import data as data_lib
    from lisa_jax.config import load_config
    from lisa_jax.generate import stop_token_ids
    from lisa_jax.train import train

    run = out / "runs" / spec["name"]
    settings = dict(spec["settings"])
    if spec["method"] == "lisa_imp_norm":
        settings["lisa_probs"] = str(out / "figure1_probs.json")
    cfg = load_config(None, dict(
        model=model_dir, data=str(out / "train.jsonl"), out=str(run), lr=spec["lr"],
        seed=spec["seed"], steps=spec["steps"], batch_size=BATCH, max_seq_len=MAX_LEN,
        warmup_steps=WARMUP, dtype=spec.get("dtype", "bfloat16"), eval_fraction=0.0,
        save_every=10**9, progress=False, overwrite=True, **settings))
    t0 = time.time()
    train(cfg)
    wall = time.time() - t0
    hf = str(run / "hf")
    steps_s = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    tok_s = [r["tokens_per_s"] for r in steps_s if "tokens_per_s" in r][10:]
    curve = [[r["step"], round(r["loss"], 4)] for r in steps_s if "loss" in r]
    tok = data_lib.load_tokenizer(hf)
    model = _model(hf)
    norms = layer_change_norms(model_dir, hf, model.cfg.num_layers)
    base_nll = json.loads((out / "base.json").read_text())["forgetting_nll"]
    forget = json.loads((out / "forgetting_set.json").read_text())
    forgetting = answer_nll(model, tok, forget) - base_nll
    held_out = json.loads((out / "held_out.json").read_text())
    records = [r for t in task_lib.TASKS for r in held_out[t]]
    replies = greedy_replies(model, tok, stop_token_ids(model.cfg, tok, hf), records)
    s = settings
    common_row = dict(name=spec["name"], method=spec["method"], lr=spec["lr"],
                      seed=spec["seed"], steps=spec["steps"], batch_size=BATCH,
                      dtype=spec.get("dtype", "bfloat16"),
                      gamma=s.get("lisa_layers") if s["method"] == "lisa" else None,
                      interval=s.get("lisa_interval") if s["method"] == "lisa" else None,
                      lora_rank=s.get("lora_rank"), wall_s=round(wall, 1),
                      median_tokens_per_s=float(np.median(tok_s)) if tok_s else None,
                      forgetting=forgetting, change_norms=norms, loss_curve=curve)
    i = 0
    for t in task_lib.TASKS:
        n = len(held_out[t])
        _append(out / "runs.jsonl", dict(common_row, task=t,
                                         **score(replies[i:i + n], held_out[t]),
                                         replies=replies[i:i + 3]))
        i += n
    import shutil
    for heavy in (hf, str(run / "checkpoints")):  # 0.3-1.4 GB a run; the rows keep the results
        shutil.rmtree(heavy, ignore_errors=True)


# ----------------------------------------------------------------------------- the plan


def _spec(method: str, lr: float, seed: int) -> dict:
    settings, _ = METHODS[method]
    return dict(name=f"{method}_lr{lr:g}_s{seed}", method=method, lr=lr, seed=seed,
                settings=settings)


def best_lrs(rows: list[dict]) -> dict[str, float]:
    """Each method's learning rate with the highest mean exact match over tasks (seed 0)."""
    runs: dict[tuple, list] = {}
    for r in rows:
        if r["method"] in METHODS and r["seed"] == 0:
            runs.setdefault((r["method"], r["lr"]), []).append(r)
    best: dict[str, tuple] = {}
    for (m, lr), v in runs.items():
        if len(v) != len(task_lib.TASKS):
            continue
        # ties (to a tenth of a percent) go to the rate that forgot less
        key = (round(float(np.mean([r["exact_match"] for r in v])), 3), -v[0]["forgetting"])
        if m not in best or key > best[m][1]:
            best[m] = (lr, key)
    return {m: lr for m, (lr, _) in best.items()}


def plan(kind: str, rows: list[dict], steps: int = STEPS,
         more_seeds: tuple[int, ...] = ()) -> list[dict]:
    """The runs of ``kind``; ``more_seeds``: seeds beyond ``SEEDS`` at each best rate."""
    return [dict(s, steps=steps) for s in _plan(kind, rows, SEEDS[1:] + tuple(more_seeds))]


def _plan(kind: str, rows: list[dict], seeds_after_0: tuple[int, ...]) -> list[dict]:
    figure1 = [dict(name=n, method=n, lr=s["lr"], seed=0, dtype="float32",
                    settings={k: v for k, v in s.items() if k != "lr"})
               for n, s in FIGURE1.items()]
    # the three families' central variants first, so a short budget still compares them
    order = ["full", "lora_r16", "lisa_g2_k20", "lisa_g4_k20", "lora_r64", "lisa_g8_k20",
             "lisa_g2_k20_reset_all", "lisa_online", "lisa_imp_norm", "lisa_owl",
             "lisa_reshuffle", "lisa_descending", "lisa_g2_k5", "lisa_g4_k5", "lisa_g8_k5",
             "lisa_g2_k20_eh0.2", "lisa_g8_k20_eh0.2", "lisa_g2_k20_floor0.1",
             "lisa_g2_k20_fp8", "lisa_g2_k20_bf16", "lisa_g2_k20_fp8_fused",
             "lisa_g2_k20_fp8_lean", "lisa_g2_k20_nu_bf16", "lisa_g2_k20_fp8_all"]
    sweep = figure1 + [_spec(m, lr, 0) for m in order for lr in METHODS[m][1]]
    swept = {(r["method"], r["lr"]) for r in rows if r["seed"] == 0}
    best = {m: lr for m, lr in best_lrs(rows).items()  # seeds once the whole sweep is in
            if all((m, x) in swept for x in METHODS[m][1])}
    # a method with one rate (the samplers) has its best rate before it has run
    best.update({m: METHODS[m][1][0] for m in order if len(METHODS[m][1]) == 1})
    seeds = [_spec(m, best[m], s) for m in order if m in best for s in seeds_after_0]
    if kind == "sweep":
        return sweep
    if kind == "seeds":
        return seeds
    # all: the central variants' seeds, then each further method's sweep followed by its
    # seeds when its best rate is known, so a short budget still completes whole methods
    central = [s for s in seeds if s["method"] in order[:4]]
    rest = [s for m in order for s in figure1 * (m == order[0])
            + [x for x in sweep if x["method"] == m] + [x for x in seeds if x["method"] == m]
            if s not in central]
    return central + rest


def prepare(out: Path, n_train: int = TRAIN_PER_TASK, n_eval: int = EVAL_PER_TASK) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if (out / "train.jsonl").exists():
        return
    train, held_out = task_lib.train_and_held_out(n_train, n_eval)
    (out / "held_out.json").write_text(json.dumps(held_out))
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))


def write_figure1_probs(out: Path, rows: list[dict]) -> bool:
    path = out / "figure1_probs.json"
    if path.exists():
        return True
    norms = {r["method"]: r["change_norms"]["layers"] for r in rows if r["method"] in FIGURE1}
    if len(norms) < 2:
        return False
    from lisa_jax.importance import probs_from_norms, save_probs
    probs = probs_from_norms(norms["fig1_lora"], norms["fig1_full"], expected=2.0)
    save_probs(path, probs, {"from": "fig1_lora / fig1_full per-layer weight-change norms"})
    return True


def run(a) -> None:
    out = Path(a.out)
    prepare(out, a.train_per_task, a.eval_per_task)
    # the device's memory split among the workers (STUDY_MEM_FRACTION of it in all)
    share = float(os.environ.get("STUDY_MEM_FRACTION", 0.9)) / a.workers
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=f"{share:.3f}")
    me = [sys.executable, __file__, "job", "--model", a.model, "--out", str(out)]
    t0 = time.time()
    if not (out / "base.json").exists():
        subprocess.run(me + ["--spec", json.dumps({"name": "base"})], env=env, check=True)
        print(f"base done at {time.time() - t0:.0f}s", flush=True)
    rows = read_rows(out / "runs.jsonl")
    done = {r["name"] for r in rows}
    queue = [s for s in plan(a.plan, rows, a.steps, tuple(a.more_seeds)) if s["name"] not in done
             and (not a.only or s["method"] in a.only.split(","))]
    running: dict[str, tuple] = {}
    longest = 0.0
    while queue or running:
        for name, (proc, started, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                longest = max(longest, time.time() - started)
                print(f"{name}: rc {proc.returncode} in {time.time() - started:.0f}s "
                      f"(at {time.time() - t0:.0f}s)", flush=True)
                del running[name]
        ready = write_figure1_probs(out, read_rows(out / "runs.jsonl"))
        late = time.time() - t0 > a.budget_s - max(longest, 60.0)
        startable = [s for s in queue if ready or s["method"] != "lisa_imp_norm"]
        while startable and len(running) < a.workers and not late:
            spec = startable.pop(0)
            queue.remove(spec)
            (out / "logs").mkdir(exist_ok=True)
            log = open(out / "logs" / f"{spec['name']}.log", "w")
            proc = subprocess.Popen(me + ["--spec", json.dumps(spec)], env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
            running[spec["name"]] = (proc, time.time(), log)
        if late and not running:
            break
        if a.kill_after_s and time.time() - t0 > a.kill_after_s:
            for name, (proc, _, log) in running.items():  # the finished runs' rows are kept
                proc.kill()
                log.close()
                queue.append({"name": name})
                print(f"{name}: stopped at {time.time() - t0:.0f}s, to run again", flush=True)
            break
        time.sleep(2)
    print(f"{len(queue)} runs left for the next call", flush=True)


# ----------------------------------------------------------------------------- the summary


def summarize(a) -> None:
    out = Path(a.out)
    rows = read_rows(out / "runs.jsonl")
    keep = ("method", "lr", "seed", "task", "exact_match", "first_line", "forgetting",
            "steps", "gamma", "interval", "lora_rank", "dtype", "wall_s",
            "median_tokens_per_s")
    (out / "summary.json").write_text(json.dumps([{k: r.get(k) for k in keep} for r in rows],
                                                 indent=1) + "\n")
    best = best_lrs(rows)
    lines = ["| method | best lr | " + " | ".join(task_lib.TASKS) +
             " | mean | forgetting | seeds | wall s |", "|---" * (len(task_lib.TASKS) + 6) + "|"]
    base = {r["task"]: r["exact_match"] for r in rows if r["method"] == "base"}
    if base:
        lines.append("| base model | – | " + " | ".join(f"{base[t]:.2f}" for t in
                                                         task_lib.TASKS) +
                     f" | {np.mean(list(base.values())):.2f} | 0 | – | – |")
    for m in METHODS:
        if m not in best:
            continue
        at = [r for r in rows if r["method"] == m and r["lr"] == best[m]]
        seeds = sorted({r["seed"] for r in at})
        cells = []
        for t in task_lib.TASKS:
            v = [r["exact_match"] for r in at if r["task"] == t]
            cells.append(f"{np.mean(v):.3f} ± {np.std(v):.3f}")
        per_seed = [np.mean([r["exact_match"] for r in at if r["seed"] == s]) for s in seeds]
        forget = [r["forgetting"] for r in at if r["task"] == task_lib.TASKS[0]]
        wall = [r["wall_s"] for r in at if r["task"] == task_lib.TASKS[0]]
        lines.append(f"| {m} | {best[m]:g} | " + " | ".join(cells) +
                     f" | {np.mean(per_seed):.3f} ± {np.std(per_seed):.3f} | "
                     f"{np.mean(forget):.3f} | {len(seeds)} | {np.mean(wall):.0f} |")
    sweep = ["", "| method | lr | " + " | ".join(task_lib.TASKS) + " | forgetting |",
             "|---" * (len(task_lib.TASKS) + 3) + "|"]
    for m in METHODS:
        for lr in METHODS[m][1]:
            at = {r["task"]: r for r in rows if r["method"] == m and r["lr"] == lr
                  and r["seed"] == 0}
            if len(at) == len(task_lib.TASKS):
                sweep.append(f"| {m} | {lr:g} | " + " | ".join(
                    f"{at[t]['exact_match']:.2f}" for t in task_lib.TASKS) +
                    f" | {at[task_lib.TASKS[0]]['forgetting']:.3f} |")
    (out / "table.md").write_text("\n".join(lines + sweep) + "\n")
    print("\n".join(lines + sweep))
    figure1(out, rows)
    loss_curves(out, rows, ("lisa_g2_k20_bf16", "lisa_g2_k20_fp8"), "fp8_loss_curves.png",
                "SmolLM2-135M-Instruct, LISA γ=2 K=20 at 6e-4: frozen layers in bf16 and fp8")
    loss_curves(out, rows,
                ("lisa_g2_k20_bf16", "lisa_g2_k20_fp8_fused", "lisa_g2_k20_fp8_lean"),
                "fp8_lean_loss_curves.png", "SmolLM2-135M-Instruct, LISA γ=2 K=20, 6e-4: bf16, "
                "fp8 fused, fp8 lean (remat qkv, fp8 residuals)")
    loss_curves(out, rows, ("lisa_g2_k20_bf16", "lisa_g2_k20_nu_bf16", "lisa_g2_k20_fp8_all"),
                "fp8_all_loss_curves.png", "SmolLM2-135M-Instruct, LISA γ=2 K=20, 6e-4: bf16, "
                "bf16 nu, fp8_all with bf16 nu")


def loss_curves(out: Path, rows: list[dict], methods: tuple[str, ...], name: str,
                title: str) -> None:
    """Each seed's training loss of ``methods`` overlaid (a 20-point moving mean)."""
    runs = {(r["method"], r["seed"]): r["loss_curve"] for r in rows
            if r["method"] in methods and r.get("loss_curve")}
    if not runs:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for (method, seed), curve in sorted(runs.items()):
        step, loss = np.array(curve).T
        w = min(20, len(loss))
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        ax.plot(step[w - 1:], smooth, color=f"C{methods.index(method)}", alpha=0.8,
                linestyle=("-", "--", ":")[seed % 3], label=f"{method}, seed {seed}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / name, dpi=120)


def figure1(out: Path, rows: list[dict]) -> None:
    norms = {r["method"]: r["change_norms"] for r in rows if r["method"] in FIGURE1}
    if len(norms) < 2:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    probs = json.loads((out / "figure1_probs.json").read_text())["probs"]
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for name, label in (("fig1_full", "full FT"), ("fig1_lora", "LoRA r16")):
        n = norms[name]
        # the head is the embedding (tied); LoRA leaves both frozen: no point on a log axis
        y = np.array([n["embed"]] + n["layers"] + [n["head"] or n["embed"]])
        ax.plot(range(-1, len(n["layers"]) + 1), np.where(y > 0, y, np.nan), marker="o",
                label=label)
    ax.set_ylabel("‖ΔW‖ (Frobenius)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("SmolLM2-135M-Instruct: weight change per layer (−1: embedding, L: head)")
    bx.bar(range(len(probs)), probs)
    bx.set_ylabel("p_ℓ ∝ ‖ΔW‖_LoRA / ‖ΔW‖_full")
    bx.set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(out / "figure1.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--plan", choices=("sweep", "seeds", "all"), default="all")
    r.add_argument("--workers", type=int, default=8)
    r.add_argument("--budget-s", type=float, default=560)
    r.add_argument("--kill-after-s", type=float, default=None,
                   help="stop the runs still going after this long (a device's time limit)")
    r.add_argument("--steps", type=int, default=STEPS)
    r.add_argument("--train-per-task", type=int, default=TRAIN_PER_TASK)
    r.add_argument("--eval-per-task", type=int, default=EVAL_PER_TASK)
    r.add_argument("--only", default="", help="comma-separated methods of the plan to run")
    r.add_argument("--more-seeds", type=int, nargs="*", default=[],
                   help="seeds beyond 0, 1, 2 for each method at its best rate (with --only: "
                        "settling a difference the three did not)")
    j = sub.add_parser("job")
    j.add_argument("--model", required=True)
    j.add_argument("--out", required=True)
    j.add_argument("--spec", required=True)
    s = sub.add_parser("summarize")
    s.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.cmd == "run":
        run(a)
    elif a.cmd == "summarize":
        summarize(a)
    else:
        spec = json.loads(a.spec)
        if spec["name"] == "base":
            base_job(a.model, Path(a.out))
        else:
            train_job(spec, a.model, Path(a.out))


if __name__ == "__main__":
    main()
