"""``lisa-jax``: train | generate | export.

    lisa-jax train --demo --out runs/demo
    lisa-jax train --model DIR --data FILE --out runs/x --method lisa --lisa-layers 2
    lisa-jax train --config configs/demo.yaml --lr 2e-5  # YAML, then flags on top
    lisa-jax train --out runs/x --resume                 # continue a stopped run
    lisa-jax generate --model runs/x/hf --prompt "What is 7 plus 5?"
    lisa-jax generate --model runs/x/hf --system "Be brief." --messages chat.json
    lisa-jax export --run runs/x --out exported/         # latest checkpoint -> HF directory

A mistake in the input is one line, "error: ..." naming the flag to fix, with exit status 2;
--debug (or LISA_JAX_DEBUG=1) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from lisa_jax.config import (TrainConfig, TrainError, TrainInterrupted, choices, flag,
                             help_text, load_config, os_error_line, setting_type)
from lisa_jax.train import main_train

DEBUG_ENV = "LISA_JAX_DEBUG"
DEBUG_HELP = (f"show the traceback of an error instead of its one line (also: {DEBUG_ENV}=1 "
              "in the environment)")


class _Parser(argparse.ArgumentParser):
    """argparse with its own mistakes on one line too (a wrong type, an unknown flag)."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def _debug_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)


def debug_from_env() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def train_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lisa-jax train", description="Fine-tune with LISA, full "
                                "fine-tuning or LoRA.")
    p.add_argument("--config", help="a YAML file of settings (examples: configs/); flags "
                   "override it")
    _debug_flag(p)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        tp = setting_type(f.name)[0]
        # a default filled in by method (--lr) is said in the help text itself
        by_method = f.default is None and getattr(defaults, f.name) is not None
        help_ = help_text(f.name) + ("" if by_method else
                                     f" (default: {getattr(defaults, f.name)})")
        if f.name == "demo":  # --demo alone is the tiny demo; --demo smollm2 the real model
            p.add_argument("--no-demo", dest="demo", action="store_const", const=None,
                           default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            p.add_argument("--demo", nargs="?", const="tiny", default=argparse.SUPPRESS,
                           metavar="{" + ",".join(choices("demo")) + "}", help=help_)
        elif tp is bool:
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=help_)
        else:
            # The allowed values are shown, not enforced by argparse: the settings' checks
            # (config.check_config) name a wrong one in their own one-line error.
            allowed = choices(f.name)
            metavar = "{" + ",".join(allowed) + "}" if allowed else f.name.upper()
            p.add_argument(flag(f.name), type=tp, default=argparse.SUPPRESS, help=help_,
                           metavar=metavar)
    return p


def cmd_train(argv, debug: bool = False) -> int:
    args = vars(train_parser().parse_args(argv))
    args.pop("debug", None)
    path = args.pop("config", None)
    saved = Path(args.get("out", TrainConfig.out), "config.yaml")
    if path is None and args.get("resume") and saved.is_file():
        path = str(saved)  # `--out DIR --resume` continues from the run's own settings
    try:
        cfg = load_config(path, args)
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return main_train(cfg)


def _load_for_inference(path: str, dtype: str, adapter_to: str | None = None):
    """An HF directory, or a run directory (its latest checkpoint, LoRA merged); with
    ``adapter_to``, a LoRA run's adapters are also written there in PEFT's format."""
    import jax

    from lisa_jax import model as M
    from lisa_jax.checkpoints import Checkpoints
    from lisa_jax.hf import load_hf
    from lisa_jax.methods import method_for
    p = Path(path)
    if (p / "config.json").is_file():
        return load_hf(p, dtype=dtype), p
    if not (p / "config.yaml").is_file():
        raise TrainError(f"{path} is neither an HF model directory (config.json) nor a run "
                         "directory (config.yaml); pass one of those")
    cfg = load_config(str(p / "config.yaml"), {"resume": True, "progress": False})
    base = load_hf(cfg.model, dtype=cfg.dtype)
    ckpts = Checkpoints(p / "checkpoints", cfg.keep_checkpoints)
    step = ckpts.latest()
    if step is None:
        raise TrainError(f"run {path} has no checkpoint yet")
    method = method_for(cfg, base.cfg)
    params, state, _ = ckpts.restore(step, base.params, method.state_template(base.params))
    jax.block_until_ready(params)
    if adapter_to is not None and not method.save_adapter(adapter_to, state):
        raise TrainError(f"--adapter writes LoRA adapters, and run {path} is --method "
                         f"{cfg.method} (its export is the whole model); drop --adapter")
    return M.Model(base.cfg, method.export_params(params, state)), Path(cfg.model)


def cmd_generate(argv, debug: bool = False) -> int:
    p = _Parser(
        prog="lisa-jax generate",
        description="Generate from an HF directory or a run directory. Prompts are rendered as "
                    "training renders them: through the tokenizer's chat template when it has "
                    "one, else the plain '### Instruction:' template.")
    p.add_argument("--model", required=True, help="HF model directory or run directory")
    p.add_argument("--prompt", action="append", default=[],
                   help="an instruction (repeat for several, each answered on its own)")
    p.add_argument("--messages", action="append", default=[], metavar="FILE",
                   help="a conversation to continue: a JSON list of {\"role\", \"content\"} "
                        "messages (user and assistant alternating, ending with the user's "
                        "turn), or {\"messages\": [...]}; repeat for several")
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="a system prompt put before every prompt and conversation")
    p.add_argument("--raw", action="store_true", help="use the prompt as is, no template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    _debug_flag(p)
    a = p.parse_args(argv)
    import jax
    import numpy as np

    from lisa_jax import data as data_lib
    from lisa_jax.generate import generate, stop_token_ids, truncate_at_stop
    from lisa_jax.prompts import conversation_ids, load_conversation, prompt_ids
    try:
        _check_generate_args(a)
        conversations = [(path, load_conversation(path)) for path in a.messages]
        model, tok_dir = _load_for_inference(a.model, a.dtype)
        tok = data_lib.load_tokenizer(tok_dir)
        stop = stop_token_ids(model.cfg, tok, tok_dir)
        jobs = []  # (shown, prompt ids)
        for text in a.prompt:
            if a.raw:
                ids = np.asarray(tok(text)["input_ids"], np.int32)
                if not len(ids):
                    raise TrainError(f"--prompt {text!r} has no tokens; give --raw a prompt "
                                     "with text")
            elif a.system:
                ids = conversation_ids(tok, [{"role": "user", "content": text}], a.system)
            else:
                ids = prompt_ids(tok, text)
            jobs.append((text, ids))
        for path, msgs in conversations:
            jobs.append((f"{path}: {msgs[-1]['content']}", conversation_ids(tok, msgs, a.system)))
    except (TrainError, ValueError, FileNotFoundError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    for i, (text, ids) in enumerate(jobs):
        ids = np.asarray(ids, np.int32)
        out = generate(model, ids[None], max_new_tokens=a.max_new_tokens,
                       temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                       key=jax.random.key(a.seed + i), eos_token_id=stop,
                       pad_token_id=tok.pad_token_id)
        new = truncate_at_stop(np.asarray(out)[0, len(ids):], stop)
        print(f">>> {text}\n{tok.decode(new, skip_special_tokens=True).strip()}")
    return 0


def _check_generate_args(a) -> None:
    """The generate flags' one-line errors, before any model is loaded."""
    if not a.prompt and not a.messages:
        raise TrainError("nothing to generate for; pass --prompt TEXT or --messages FILE")
    if a.raw and (a.messages or a.system):
        raise TrainError("--raw uses the prompt as is, with no template for a system prompt "
                         "or turns; drop --raw, or drop --system and --messages")
    for text in a.prompt:
        if a.raw and not text.strip():
            raise TrainError("--prompt is empty; --raw continues the prompt's text, so give it "
                             "some (or drop --raw to answer an empty instruction)")
    if a.max_new_tokens < 1:
        raise TrainError(f"--max-new-tokens must be at least 1, got {a.max_new_tokens}")
    if not a.temperature >= 0:
        raise TrainError(f"--temperature must be 0 (greedy) or more, got {a.temperature}")
    if a.top_p is not None and not 0 < a.top_p <= 1:
        raise TrainError(f"--top-p must be in (0, 1], got {a.top_p}")
    if a.top_k is not None and a.top_k < 1:
        raise TrainError(f"--top-k must be at least 1, got {a.top_k}")


def cmd_export(argv, debug: bool = False) -> int:
    p = _Parser(prog="lisa-jax export",
                                description="Write a run's latest checkpoint as an HF directory.")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--out", required=True, help="HF directory to write")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--adapter", metavar="DIR", default=None,
                   help="LoRA runs: also write the adapters alone in PEFT's format into DIR "
                        "(adapter_config.json, adapter_model.safetensors)")
    _debug_flag(p)
    a = p.parse_args(argv)
    from lisa_jax.hf import save_hf
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        print(f"error: --out {a.out} is a file; pass --out a directory (new or empty; "
              "--overwrite replaces one with files)", file=sys.stderr)
        return 2
    under = next((d for d in out.parents if d.exists()), None)
    if under is not None and not under.is_dir():
        print(f"error: --out {a.out} is under a file ({under}); pass --out a path whose "
              "parents are directories", file=sys.stderr)
        return 2
    if out.exists() and any(out.iterdir()) and not a.overwrite:
        print(f"error: {a.out} is not empty; pass --overwrite to replace it", file=sys.stderr)
        return 2
    adapter = Path(a.adapter) if a.adapter else None
    if adapter is not None and adapter.exists() and not a.overwrite and (
            not adapter.is_dir() or any(adapter.iterdir())):
        print(f"error: --adapter {a.adapter} is not empty; pass --overwrite to replace it",
              file=sys.stderr)
        return 2
    try:
        cfg_path = Path(a.run) / "config.yaml"
        if not cfg_path.is_file():
            raise TrainError(f"{a.run} is not a run directory (no config.yaml); pass --run DIR "
                             "of a `lisa-jax train` run")
        model, tok_dir = _load_for_inference(a.run, load_config(str(cfg_path)).dtype,
                                             adapter_to=a.adapter)
    except (TrainError, ValueError, FileNotFoundError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    try:
        print(save_hf(model, a.out, tokenizer_from=tok_dir))
    except OSError as e:
        print(f"error: {os_error_line(e, f'writing --out {a.out}')}", file=sys.stderr)
        return 2
    return 0


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "export": cmd_export}


def _negative_numbers_attached(argv: list[str]) -> list[str]:
    """``--flag -1e-3`` as ``--flag=-1e-3``: argparse takes a value like ``-1e-3`` (an
    exponent) for an option of its own and stops."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and arg.startswith("-"):
            try:
                float(arg)
            except ValueError:
                pass
            else:
                out[-1] = f"{out[-1]}={arg}"
                continue
        out.append(arg)
    return out


def main(argv=None) -> int:
    """Run a command; whatever goes wrong is one line and a non-zero status (2: the input, 130:
    interrupted, 1: a fault of lisa-jax itself), unless --debug or LISA_JAX_DEBUG asks for the
    traceback."""
    argv = _negative_numbers_attached(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}; use one of {', '.join(COMMANDS)}",
                  file=sys.stderr)
            return 2
        print(__doc__.strip(), file=sys.stderr)
        return 0 if argv else 2
    debug = "--debug" in argv[1:] or debug_from_env()
    try:
        return COMMANDS[argv[0]](argv[1:], debug=debug)
    except KeyboardInterrupt:
        if debug:
            raise
        resume = "; a run continues from its last checkpoint with --resume" \
            if argv[0] == "train" else ""
        print(f"stopped: interrupted{resume}", file=sys.stderr)
        return 130
    except TrainInterrupted as e:  # stopped at once: what was kept and how to go on
        if debug:
            raise
        print(f"stopped: {e}", file=sys.stderr)
        return 130
    except TrainError as e:
        if debug:
            raise
        print(f"error: {_first_line(e, limit=None)}", file=sys.stderr)
        return 2
    except OSError as e:
        if debug:
            raise
        print(f"error: {os_error_line(e, f'in lisa-jax {argv[0]}')}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: still one line, with the way to the traceback
        if debug:
            raise
        print(f"error: unexpected {type(e).__name__}: {_first_line(e)}; rerun with --debug (or "
              f"{DEBUG_ENV}=1) for the traceback, and please report it", file=sys.stderr)
        return 1


def _first_line(e: BaseException, limit: int | None = 300) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
