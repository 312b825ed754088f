"""``lisa-jax``: train | generate | export.

    lisa-jax train --demo --out runs/demo
    lisa-jax train --model DIR --data FILE --out runs/x --method lisa --lisa-layers 2
    lisa-jax train --config run.yaml --lr 2e-5          # YAML, then flags on top
    lisa-jax generate --model runs/x/hf --prompt "What is 7 plus 5?"
    lisa-jax export --run runs/x --out exported/        # latest checkpoint -> HF directory
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from lisa_jax.config import (TrainConfig, TrainError, choices, flag, help_text, load_config,
                             setting_type)
from lisa_jax.train import main_train


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lisa-jax train", description="Fine-tune with LISA, full "
                                "fine-tuning or LoRA.")
    p.add_argument("--config", help="a YAML file of settings; flags override it")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        tp = setting_type(f.name)[0]
        help_ = help_text(f.name) + f" (default: {getattr(defaults, f.name)})"
        if tp is bool:
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


def cmd_train(argv) -> int:
    args = vars(train_parser().parse_args(argv))
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


def _load_for_inference(path: str, dtype: str):
    """An HF directory, or a run directory (its latest checkpoint, LoRA merged)."""
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
    return M.Model(base.cfg, method.export_params(params, state)), Path(cfg.model)


def cmd_generate(argv) -> int:
    p = argparse.ArgumentParser(prog="lisa-jax generate",
                                description="Generate from an HF directory or a run directory.")
    p.add_argument("--model", required=True, help="HF model directory or run directory")
    p.add_argument("--prompt", required=True, action="append",
                   help="an instruction (repeat for several)")
    p.add_argument("--raw", action="store_true", help="use the prompt as is, no template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    a = p.parse_args(argv)
    import jax
    import numpy as np

    from lisa_jax import data as data_lib
    from lisa_jax.generate import generate, stop_token_ids, truncate_at_stop
    from lisa_jax.prompts import prompt_ids
    try:
        model, tok_dir = _load_for_inference(a.model, a.dtype)
        tok = data_lib.load_tokenizer(tok_dir)
        stop = stop_token_ids(model.cfg, tok, tok_dir)
    except (TrainError, ValueError, FileNotFoundError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    for i, text in enumerate(a.prompt):
        ids = np.asarray(tok(text)["input_ids"], np.int32) if a.raw else prompt_ids(tok, text)
        out = generate(model, ids[None], max_new_tokens=a.max_new_tokens,
                       temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                       key=jax.random.key(a.seed + i), eos_token_id=stop,
                       pad_token_id=tok.pad_token_id)
        new = truncate_at_stop(np.asarray(out)[0, len(ids):], stop)
        print(f">>> {text}\n{tok.decode(new, skip_special_tokens=True).strip()}")
    return 0


def cmd_export(argv) -> int:
    p = argparse.ArgumentParser(prog="lisa-jax export",
                                description="Write a run's latest checkpoint as an HF directory.")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--out", required=True, help="HF directory to write")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    from lisa_jax.hf import save_hf
    if Path(a.out).exists() and any(Path(a.out).iterdir()) and not a.overwrite:
        print(f"error: {a.out} is not empty; pass --overwrite to replace it", file=sys.stderr)
        return 2
    try:
        cfg_path = Path(a.run) / "config.yaml"
        if not cfg_path.is_file():
            raise TrainError(f"{a.run} is not a run directory (no config.yaml); pass --run DIR "
                             "of a `lisa-jax train` run")
        model, tok_dir = _load_for_inference(a.run, load_config(str(cfg_path)).dtype)
    except (TrainError, ValueError, FileNotFoundError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(save_hf(model, a.out, tokenizer_from=tok_dir))
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
    argv = _negative_numbers_attached(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}; use one of {', '.join(COMMANDS)}",
                  file=sys.stderr)
            return 2
        print(__doc__.strip(), file=sys.stderr)
        return 0 if argv else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
