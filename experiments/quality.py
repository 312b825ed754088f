"""Quality of LISA vs LoRA vs full fine-tuning on real text, at equal steps, several seeds.

GPU run (one GPU; ``--budget-s`` time-boxes it)::

    python experiments/quality.py --out experiments/results/quality

CPU smoke run::

    python experiments/quality.py --tiny --out /tmp/quality_tiny

What it does
------------
1. Corpus: the ``*.py`` files of Python's standard library (PSF license; tests excluded). Each
   module goes by a hash of its name to PRETRAIN (75 %), PRETRAIN-EVAL (5 %, held-out text of
   the pretraining distribution) or FINETUNE (20 %); the three sets share no module.
2. Tokenizer: byte-level BPE (``--vocab``; ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2) trained on the
   first ``--tok-train-chars`` characters of PRETRAIN.
3. Pretraining: a Llama from scratch (``--hidden``, ``--layers``, ``--heads``,
   ``--intermediate``, ``--vocab``) on random ``--max-seq-len``-token windows of PRETRAIN, AdamW
   ``--pretrain-lr``, warmup + cosine, batch ``--pretrain-batch-size``; ``--pretrain-steps``,
   cut short after ``--pretrain-budget-s`` (the steps actually done are recorded).
4. Task (another distribution): for each function with a docstring in the FINETUNE modules,
   instruction ``Write the function `name(args)`: <first docstring line>``, output = the body
   (docstring removed), in ``lisa_jax.data``'s plain template, loss on the output tokens only,
   truncated to ``--max-seq-len`` tokens. ``--ft-test`` pairs are held out.
5. Fine-tuning from the same pretrained weights, ``--steps`` steps of batch ``--batch-size``
   for every method of ``--methods``, seeds 0..``--seeds``-1 (the seed sets the data order,
   the LoRA init and the LISA sampling key); AdamW with a short linear warmup then cosine,
   clip 1.0, no weight decay:

   * ``full``: every parameter, lr ``--lr-full``;
   * ``lora``: rank ``--lora-rank``, alpha 2 * rank, all seven projections (embedding/head
     frozen), lr ``--lr-lora``;
   * ``lisa``: ``--lisa-layers`` (γ) layers drawn uniformly every ``--lisa-interval`` steps,
     embedding, head and final norm always trained, lr ``--lr-lisa``;
   * ``lisa_imp``: LISA with per-layer probabilities (Bernoulli, γ expected) from the static
     weight-norm rule ``p_ℓ ∝ ‖ΔW_ℓ^LoRA‖ / ‖ΔW_ℓ^full‖`` (``importance.probs_from_norms``,
     floor 0.05), measured on a short probe (``--probe-steps`` steps of LoRA and of full
     fine-tuning, own data order, not reused below); same lr as ``lisa``.
6. Reported per method (mean ± sample std over seeds): loss on the held-out task pairs
   (response tokens) and on held-out PRETRAIN-EVAL windows (forgetting), against the base model.
   Files in ``--out``: ``quality.json`` (every number, setting and wall time),
   ``quality.md`` (table), ``quality_curves.png`` (train loss vs step, mean over seeds).

``--budget-s`` caps the whole run: a seed round that would not fit is skipped and listed in
``quality.json`` under ``skipped``.

Parameters are float32 by default also on the GPU (``--dtype bfloat16`` is there, with plain
bfloat16 updates): in pure bfloat16 an AdamW step of 1e-4 is below half an ulp of most weights,
which would turn full fine-tuning (and LISA) into a near no-op while LoRA's zero-initialised
``B`` is unaffected -- a confound, not a finding.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import math
import os
import platform
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_flags, write_json  # noqa: E402

from lisa_jax import data as data_lib  # noqa: E402
from lisa_jax import importance as imp_lib  # noqa: E402
from lisa_jax import lora as lora_lib  # noqa: E402
from lisa_jax import model as M  # noqa: E402
from lisa_jax import step as step_lib  # noqa: E402
from lisa_jax import lisa  # noqa: E402

SPECIALS = ["<pad>", "<s>", "</s>"]
SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages",
             "idlelib", "turtledemo"}
METHODS = ("full", "lora", "lisa", "lisa_imp")
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def elapsed() -> float:
    return time.perf_counter() - T0


# ----------------------------------------------------------------------------- corpus


def split_of(module: str) -> str:
    """PRETRAIN / PRETRAIN-EVAL / FINETUNE by a hash of the module name (machine independent)."""
    h = int.from_bytes(hashlib.sha256(module.encode()).digest()[:8], "big") % 100
    return "finetune" if h < 20 else ("pretrain_eval" if h < 25 else "pretrain")


def stdlib_modules() -> dict[str, str]:
    """``{module name: source}`` of the standard library's ``*.py`` files, tests excluded."""
    root = sysconfig.get_paths()["stdlib"]
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for f in sorted(filenames):
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
            try:
                out[name] = Path(path).read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
    return out


def capped(texts: list[str], max_chars: int) -> list[str]:
    out, n = [], 0
    for t in texts:
        if n >= max_chars:
            break
        out.append(t[:max_chars - n])
        n += len(out[-1])
    return out


def function_records(sources: list[str], max_output_chars: int = 2000) -> list[dict]:
    """Instruction/output pairs: a function's signature and docstring line -> its body."""
    recs = []
    for src in sources:
        try:
            tree = ast.parse(src)
        except (SyntaxError, ValueError):
            continue
        lines = src.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(node.body) < 2:
                continue
            first = doc.strip().splitlines()[0].strip()[:200]
            if not first:
                continue
            body = textwrap.dedent("\n".join(lines[node.body[1].lineno - 1:node.end_lineno]))
            body = body.strip("\n")[:max_output_chars]
            if not body.strip():
                continue
            try:
                args = ast.unparse(node.args)
            except Exception:  # pragma: no cover - exotic syntax
                continue
            recs.append({"instruction": f"Write the function `{node.name}({args})`: {first}",
                         "output": body})
    return recs


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>")
    return tok, hf


def token_stream(tok, texts: list[str], eos: int) -> np.ndarray:
    enc = tok.encode_batch(texts, add_special_tokens=False)
    parts = []
    for e in enc:
        parts.append(np.asarray(e.ids, np.int32))
        parts.append(np.asarray([eos], np.int32))
    return np.concatenate(parts)


# ----------------------------------------------------------------------------- helpers


def copy_tree(t):
    return jax.tree.map(jnp.copy, t)


def fixed_batch(examples, batch: int, seq: int, pad: int) -> dict:
    b = data_lib.pad_batch(examples, batch, seq, pad)
    return {"input_ids": jnp.asarray(b["input_ids"]), "loss_mask": jnp.asarray(b["loss_mask"])}


def schedule(lr: float, steps: int, warmup: int, final_frac: float = 0.1):
    warmup = max(1, min(warmup, steps - 1)) if steps > 1 else 1
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1),
                                              lr * final_frac)


class Evaluator:
    """Token-weighted mean loss over fixed-shape batches (one compile per shape)."""

    def __init__(self, cfg, batches):
        self.fwd = step_lib.make_forward(cfg)
        self.batches = batches

    def __call__(self, params) -> float:
        tot, n = 0.0, 0.0
        outs = [self.fwd(params, b) for b in self.batches]
        for loss, cnt in jax.device_get(outs):
            tot += float(loss) * float(cnt)
            n += float(cnt)
        return tot / max(n, 1.0)


def mean_std(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None, None
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--out", default="experiments/results/quality")
    a("--tiny", action="store_true", help="shrink everything: a CPU smoke run")
    a("--budget-s", type=float, default=400.0, help="wall-clock cap of the whole run")
    add_flags(p, dtype="float32")
    a("--max-pretrain-chars", type=int, default=24_000_000)
    a("--tok-train-chars", type=int, default=4_000_000)
    a("--vocab", type=int, default=4096)
    a("--hidden", type=int, default=512)
    a("--layers", type=int, default=8)
    a("--heads", type=int, default=8)
    a("--intermediate", type=int, default=2048)
    add_flags(p, max_seq_len=256, helps=dict(max_seq_len="tokens per window and per example"))
    a("--pretrain-steps", type=int, default=1500)
    a("--pretrain-batch-size", type=int, default=32)
    a("--pretrain-lr", type=float, default=1e-3)
    a("--pretrain-budget-s", type=float, default=150.0)
    a("--pretrain-eval-windows", type=int, default=256)
    a("--max-ft-records", type=int, default=20000)
    a("--ft-test", type=int, default=256)
    add_flags(p, steps=150, batch_size=32, method=list(METHODS), many=("method",),
              choices=dict(method=METHODS),
              helps=dict(steps="fine-tuning steps of every method",
                         batch_size="fine-tuning examples per step"))
    a("--eval-batch-size", type=int, default=64)
    a("--seeds", type=int, default=3, help="fine-tuning runs per method, seeds 0, 1, ...")
    a("--lr-full", type=float, default=1e-4)
    a("--lr-lora", type=float, default=1e-3)
    a("--lr-lisa", type=float, default=2e-4)
    add_flags(p, lora_rank=16, lisa_layers=2, lisa_interval=10)
    a("--probe-steps", type=int, default=40)
    a("--log-every", type=int, default=50)
    args = p.parse_args(argv)
    if args.tiny:  # smaller defaults; flags given explicitly still win
        p.set_defaults(
            max_pretrain_chars=400_000, tok_train_chars=200_000, vocab=512, hidden=64, layers=4,
            heads=4, intermediate=128, max_seq_len=128, pretrain_steps=60, pretrain_batch_size=8,
            pretrain_budget_s=20.0, pretrain_lr=3e-3, pretrain_eval_windows=32,
            max_ft_records=400, ft_test=32, steps=12, batch_size=8, eval_batch_size=16,
            probe_steps=6, lisa_interval=4, log_every=20, budget_s=90.0)
        args = p.parse_args(argv)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(args.methods))
    log(f"devices: {jax.devices()}  jax {jax.__version__}  python {platform.python_version()}")
    wall = {}
    skipped = []

    S = args.max_seq_len

    # -- corpus and tokenizer
    t = time.perf_counter()
    mods = stdlib_modules()
    by_split = {"pretrain": [], "pretrain_eval": [], "finetune": []}
    for name in sorted(mods, key=lambda n: hashlib.sha256(n.encode()).hexdigest()):
        by_split[split_of(name)].append(name)
    pre_texts = capped([mods[n] for n in by_split["pretrain"]], args.max_pretrain_chars)
    pre_eval_texts = capped([mods[n] for n in by_split["pretrain_eval"]],
                            max(args.max_pretrain_chars // 10, 100_000))
    log(f"stdlib: {len(mods)} modules -> pretrain {len(by_split['pretrain'])}, pretrain_eval "
        f"{len(by_split['pretrain_eval'])}, finetune {len(by_split['finetune'])}; pretrain text "
        f"{sum(map(len, pre_texts)) / 1e6:.1f}M chars")
    tok, hf_tok = train_tokenizer(capped(pre_texts, args.tok_train_chars), args.vocab)
    pad_id, bos_id, eos_id = (tok.token_to_id(s) for s in SPECIALS)
    stream = token_stream(tok, pre_texts, eos_id)
    eval_stream = token_stream(tok, pre_eval_texts, eos_id)
    log(f"tokenizer: vocab {tok.get_vocab_size()}; pretrain tokens {stream.size / 1e6:.2f}M, "
        f"pretrain-eval tokens {eval_stream.size / 1e6:.2f}M")

    records = function_records([mods[n] for n in by_split["finetune"]])
    records = records[:args.max_ft_records]
    tr_recs, te_recs = data_lib.train_eval_split(records, eval_size=args.ft_test, seed=0)
    ft_train, ft_stats = data_lib.build_examples(tr_recs, hf_tok, S, truncate=True)
    ft_test, _ = data_lib.build_examples(te_recs, hf_tok, S, truncate=True)
    log(f"task: {len(records)} function records -> train {len(ft_train)} examples (mean "
        f"{ft_stats.mean_len:.0f} tokens, {ft_stats.truncated} truncated), test {len(ft_test)}")
    wall["data_s"] = time.perf_counter() - t

    EB = args.eval_batch_size

    # -- model
    cfg = M.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=args.hidden,
                        intermediate_size=args.intermediate, num_layers=args.layers,
                        num_heads=args.heads, num_kv_heads=args.heads,
                        head_dim=args.hidden // args.heads, max_position_embeddings=S,
                        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
                        dtype=args.dtype)
    params = M.init_params(cfg, jax.random.key(1234))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    log(f"model: {n_params / 1e6:.1f}M parameters, {cfg}")

    test_batches = [fixed_batch(ft_test[i:i + EB], EB, S, pad_id)
                    for i in range(0, len(ft_test), EB)]
    n_win = min(args.pretrain_eval_windows, max(1, (eval_stream.size - 1) // S))
    starts = np.linspace(0, eval_stream.size - S - 1, n_win).astype(np.int64)
    wins = np.stack([eval_stream[s:s + S] for s in starts])
    pe_batches = []
    for i in range(0, n_win, EB):
        ids = np.full((EB, S), pad_id, np.int32)
        mask = np.zeros((EB, S), np.int32)
        chunk = wins[i:i + EB]
        ids[:len(chunk)], mask[:len(chunk)] = chunk, 1
        pe_batches.append({"input_ids": jnp.asarray(ids), "loss_mask": jnp.asarray(mask)})
    ft_eval = Evaluator(cfg, test_batches)
    pre_eval = Evaluator(cfg, pe_batches)
    ft_eval.fwd = pre_eval.fwd  # one jitted forward (same shapes: one compile)

    # -- pretraining
    t = time.perf_counter()
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        schedule(args.pretrain_lr, args.pretrain_steps, max(10, args.pretrain_steps // 20)),
        b2=0.95, weight_decay=0.1))
    pstep = step_lib.make_plain_step(cfg, tx)
    opt = tx.init(params)
    rng = np.random.default_rng(0)
    B = args.pretrain_batch_size
    pre_curve = []
    done = 0
    pending = []
    for i in range(args.pretrain_steps):
        st = rng.integers(0, stream.size - S, B)
        ids = jnp.asarray(np.stack([stream[s:s + S] for s in st]))
        params, opt, m = pstep(params, opt, {"input_ids": ids})
        pending.append(m["loss"])
        done = i + 1
        if done % args.log_every == 0 or done == args.pretrain_steps:
            vals = [float(x) for x in jax.device_get(pending)]
            pre_curve += vals
            pending = []
            dt = time.perf_counter() - t
            log(f"pretrain step {done}/{args.pretrain_steps} loss {np.mean(vals[-10:]):.3f} "
                f"({dt:.0f}s)")
            if dt > args.pretrain_budget_s and done < args.pretrain_steps:
                log(f"pretraining time box {args.pretrain_budget_s:.0f}s reached: stopping at "
                    f"step {done}")
                skipped.append(f"pretraining stopped at step {done} of {args.pretrain_steps} "
                               f"(time box)")
                break
    pre_curve += [float(x) for x in jax.device_get(pending)]
    del opt
    wall["pretrain_s"] = time.perf_counter() - t
    base_ft, base_pe = ft_eval(params), pre_eval(params)
    log(f"pretrained ({done} steps, {wall['pretrain_s']:.0f}s): task test loss {base_ft:.4f}, "
        f"pretrain-eval loss {base_pe:.4f}")
    base = params

    # -- fine-tuning machinery (one jitted step per method, shared across seeds)
    T = args.steps
    warm = min(10, max(1, T // 10))
    lr = {"full": args.lr_full, "lora": args.lr_lora, "lisa": args.lr_lisa,
          "lisa_imp": args.lr_lisa}
    inner = {k: optax.adamw(schedule(v, T, warm), weight_decay=0.0) for k, v in lr.items()}
    for k in ("full", "lora"):  # LISA clips the trained gradients itself (clip_norm below)
        inner[k] = optax.chain(optax.clip_by_global_norm(1.0), inner[k])
    scale = lora_lib.lora_scale(args.lora_rank, None)
    steps = {"full": step_lib.make_plain_step(cfg, inner["full"]),
             "lora": step_lib.make_lora_step(cfg, inner["lora"], scale)}
    K, G = args.lisa_interval, args.lisa_layers
    lisa_kw = dict(interval=K, clip_norm=1.0)
    steps["lisa"] = step_lib.make_lisa_step(cfg, lisa(inner["lisa"], n_active=G, **lisa_kw))

    def loader(seed):
        return data_lib.DataLoader(ft_train, args.batch_size, seed=seed, pad_id=pad_id,
                                   buckets=(S,))

    def batch_of(b):
        return {"input_ids": jnp.asarray(b["input_ids"]), "loss_mask": jnp.asarray(b["loss_mask"])}

    def run(method, seed, n_steps, probs=None):
        """Fine-tune a copy of the base model; returns (params for eval, losses, extra)."""
        dl = loader(seed)
        losses, extra = [], {}
        if method == "full":
            p = copy_tree(base)
            state = inner["full"].init(p)
        elif method == "lora":
            p = base
            ad = lora_lib.init_lora(base["layers"], jax.random.key(seed), args.lora_rank)
            state = (ad, inner["lora"].init(ad))
        elif method == "lisa":
            p = copy_tree(base)
            state = lisa(inner["lisa"], n_active=G, key=seed, **lisa_kw).init(p)
        else:
            p = copy_tree(base)
            tx_s = lisa(inner["lisa_imp"], probs=probs, key=seed, **lisa_kw)
            state = tx_s.init(p)
            extra["active_counts"] = []
        fn = steps[method]
        for i in range(n_steps):
            if method == "lisa_imp":
                if i % K == 0:
                    state = tx_s.maybe_resample(state, p)
                    extra["active_counts"].append(int(state.active.shape[0]))
            p, state, m = fn(p, state, batch_of(next(dl)))
            losses.append(m["loss"])
            if i == 0:
                jax.block_until_ready(m["loss"])
                t_first = time.perf_counter()
        losses = [float(x) for x in jax.device_get(losses)]
        # Steady-state time of the run (its first step, which compiles, left out), for budgeting.
        extra["steady_s"] = (time.perf_counter() - t_first) * n_steps / max(n_steps - 1, 1)
        if method == "lora":
            extra["adapters"] = state[0]
            p = lora_lib.merge_lora(base, state[0], scale)
        return p, losses, extra

    results = {m: [] for m in methods}
    probs, probe = None, {}
    if "lisa_imp" in methods:
        t = time.perf_counter()
        pf, lf, _ = run("full", 10_000, args.probe_steps)
        _, ll, ex = run("lora", 10_000, args.probe_steps)
        full_norms = imp_lib.weight_change_norms(base, pf)
        lora_norms = imp_lib.lora_delta_norms(ex["adapters"], scale)
        probs = imp_lib.probs_from_norms(lora_norms, full_norms, expected=G, floor=0.05)
        del pf
        probe = {"steps": args.probe_steps, "full_norms": full_norms.tolist(),
                 "lora_norms": lora_norms.tolist(), "probs": probs.tolist(),
                 "wall_s": time.perf_counter() - t}
        steps["lisa_imp"] = step_lib.make_lisa_step(
            cfg, lisa(inner["lisa_imp"], probs=probs, **lisa_kw))
        log(f"importance probe ({args.probe_steps} steps each of full and LoRA, "
            f"{probe['wall_s']:.0f}s): p = {np.round(probs, 3).tolist()}")

    t_ft = time.perf_counter()
    round_s = []
    for seed in range(args.seeds):
        t_round = time.perf_counter()
        if seed > 0:
            est = round_s[-1]
            if elapsed() + est + 5.0 > args.budget_s:
                msg = (f"seeds {seed}..{args.seeds - 1} skipped: {elapsed():.0f}s elapsed, a seed "
                       f"round takes ~{est:.0f}s, budget {args.budget_s:.0f}s")
                log(msg)
                skipped.append(msg)
                break
        t_est = 0.0  # this round's time without compilation: the next round's estimate
        for method in methods:
            t1 = time.perf_counter()
            p, losses, extra = run(method, seed, T, probs)
            t2 = time.perf_counter()
            row = {"seed": seed, "train_losses": losses, "test_loss": ft_eval(p),
                   "pretrain_eval_loss": pre_eval(p)}
            row["eval_s"] = time.perf_counter() - t2
            row["wall_s"] = time.perf_counter() - t1
            if "active_counts" in extra:
                row["active_counts"] = extra["active_counts"]
            results[method].append(row)
            t_est += extra["steady_s"] + row["eval_s"]
            del p
            log(f"seed {seed} {method:8s}: train {np.mean(losses[-10:]):.4f}  task test "
                f"{row['test_loss']:.4f}  pretrain-eval {row['pretrain_eval_loss']:.4f}  "
                f"({row['wall_s']:.1f}s)")
        round_s.append(t_est)
        log(f"seed round {seed}: {time.perf_counter() - t_round:.0f}s ({t_est:.0f}s without "
            f"compilation)")
    wall["finetune_s"] = time.perf_counter() - t_ft

    # -- report
    summary = {}
    for m in methods:
        rs = results[m]
        if not rs:
            continue
        te, te_sd = mean_std([r["test_loss"] for r in rs])
        pe, pe_sd = mean_std([r["pretrain_eval_loss"] for r in rs])
        summary[m] = {"test_loss": te, "test_loss_std": te_sd, "pretrain_eval_loss": pe,
                      "pretrain_eval_loss_std": pe_sd, "seeds": len(rs),
                      "final_train_loss": float(np.mean([np.mean(r["train_losses"][-10:])
                                                         for r in rs])),
                      "lr": lr[m], "mean_run_s": float(np.mean([r["wall_s"] for r in rs]))}
    names = {"base": "pretrained (no fine-tuning)", "full": "full fine-tuning",
             "lora": f"LoRA r{args.lora_rank}", "lisa": f"LISA uniform γ={G}",
             "lisa_imp": f"LISA importance (E γ={G})"}
    lines = [f"| method | lr | seeds | task test loss | pretrain-eval loss (forgetting) | "
             f"final train loss |", "|---|---|---|---|---|---|",
             f"| {names['base']} | - | - | {base_ft:.4f} | {base_pe:.4f} | - |"]
    for m, s in summary.items():
        lines.append(f"| {names[m]} | {s['lr']:g} | {s['seeds']} | {s['test_loss']:.4f} ± "
                     f"{s['test_loss_std']:.4f} | {s['pretrain_eval_loss']:.4f} ± "
                     f"{s['pretrain_eval_loss_std']:.4f} | {s['final_train_loss']:.4f} |")
    table = "\n".join(lines)

    def val(m):
        return f"{summary[m]['test_loss']:.4f}" if m in summary else "n/a"

    ranked = sorted(summary, key=lambda m: summary[m]["test_loss"])
    sentence = (f"LISA uniform held-out loss {val('lisa')} vs LoRA {val('lora')} vs full "
                f"{val('full')} (LISA importance {val('lisa_imp')}; pretrained {base_ft:.4f}): "
                f"best is {names[ranked[0]] if ranked else 'n/a'} after {T} steps of batch "
                f"{args.batch_size}, mean over {min(len(v) for v in results.values() if v) if ranked else 0} "
                f"seed(s).")
    if ranked and len(ranked) > 1:
        a, b = summary[ranked[0]], summary[ranked[1]]
        gap = b["test_loss"] - a["test_loss"]
        spread = max(a["test_loss_std"], b["test_loss_std"])
        sentence += (f" The gap to the runner-up ({names[ranked[1]]}) is {gap:.4f}, "
                     f"{'larger' if gap > spread else 'not larger'} than the seed spread "
                     f"({spread:.4f}).")

    # curves
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        axes[0].plot(np.arange(1, len(pre_curve) + 1), pre_curve, lw=0.8)
        axes[0].set(title=f"pretraining ({n_params / 1e6:.0f}M params)", xlabel="step",
                    ylabel="train loss", yscale="log")
        for m in summary:
            c = np.mean([r["train_losses"] for r in results[m]], axis=0)
            k = max(1, T // 30)
            sm = np.convolve(c, np.ones(k) / k, mode="valid")
            axes[1].plot(np.arange(k, T + 1), sm, label=f"{names[m]} (lr {lr[m]:g})")
        axes[1].axhline(base_ft, color="gray", ls=":", label="pretrained, task test loss")
        axes[1].set(title="fine-tuning train loss (mean over seeds)", xlabel="step",
                    ylabel="loss on response tokens")
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "quality_curves.png", dpi=120)
        plt.close(fig)
    except Exception as e:  # the numbers matter more than the picture
        log(f"plot failed: {e!r}")

    wall["total_s"] = elapsed()
    report = {
        "settings": {k: v for k, v in vars(args).items()},
        "corpus": {"modules": {k: len(v) for k, v in by_split.items()},
                   "pretrain_chars": sum(map(len, pre_texts)),
                   "pretrain_tokens": int(stream.size), "pretrain_eval_tokens": int(eval_stream.size),
                   "pretrain_eval_windows": int(n_win), "ft_records": len(records),
                   "ft_train_examples": len(ft_train), "ft_test_examples": len(ft_test),
                   "ft_truncated": ft_stats.truncated, "ft_mean_len": ft_stats.mean_len},
        "model": {"config": {k: v for k, v in vars(cfg).items()}, "params": n_params},
        "pretrain": {"steps_done": done, "final_loss": float(np.mean(pre_curve[-20:])),
                     "curve": pre_curve, "test_loss": base_ft, "pretrain_eval_loss": base_pe},
        "importance_rule": "static: p ∝ ||ΔW_LoRA|| / ||ΔW_full|| from probe runs "
                           "(importance.probs_from_norms, floor 0.05), Bernoulli sampling",
        "importance_probe": probe,
        "summary": summary, "runs": results, "skipped": skipped, "wall_s": wall,
        "table": table, "sentence": sentence,
    }
    write_json(str(out_dir / "quality.json"), report, device=True)
    (out_dir / "quality.md").write_text(
        f"# LISA vs LoRA vs full fine-tuning (stdlib functions task)\n\n{table}\n\n{sentence}\n\n"
        f"Skipped: {skipped or 'nothing'}. Wall: "
        f"{', '.join(f'{k} {v:.0f}s' for k, v in wall.items())}.\n")
    written = ["quality.json", "quality.md"] + \
        (["quality_curves.png"] if (out_dir / "quality_curves.png").exists() else [])
    log(f"wrote {out_dir}/{', '.join(written)} (total {wall['total_s']:.0f}s)")
    print(table, flush=True)
    print(sentence, flush=True)
    return report


if __name__ == "__main__":
    main()
