"""What the experiment scripts share: the trainer's flag names, model shapes, random batches,
timed step loops, one-row subprocesses and result JSONs.

    from common import add_flags, model_config
    add_flags(ap, shape="tiny", lisa_layers=[1, 2], batch_size=4, many=("lisa_layers",))

Importing it imports neither jax nor lisa_jax: a driver that spawns one process per row must not
take the device itself (XLA would claim its memory in the parent).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shapes import SHAPES  # noqa: E402


def _find_lisa_jax() -> None:
    """Let a script run from a checkout without an install: the repository joins the path
    last, when no lisa_jax is importable otherwise (PYTHONPATH and an install come first)."""
    import importlib.util
    try:
        found = importlib.util.find_spec("lisa_jax") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


_find_lisa_jax()

# The trainer's settings the scripts take, under its names (lisa_jax/config.py's TrainConfig;
# a flag is the field's name with dashes): (type, help, choices).
FLAGS = {
    "shape": (str, "model shape (experiments/shapes.py), random weights", tuple(sorted(SHAPES))),
    "method": (str, "training method", ()),
    "lisa_layers": (int, "γ: layers trained at a time", ()),
    "lisa_interval": (int, "K: steps between resamples of the trained layers", ()),
    "batch_size": (int, "examples per batch", ()),
    "max_seq_len": (int, "tokens per example", ()),
    "lora_rank": (int, "LoRA: rank of the adapters", ()),
    "lora_alpha": (float, "LoRA: scale numerator, adapters scaled by alpha/rank", ()),
    "steps": (int, "timed (or trained) steps", ()),
    "seed": (int, "seed of the data order, the sampler and the initialization", ()),
    "lr": (float, "peak learning rate of AdamW", ()),
    "dtype": (str, "dtype of the parameters", ("float32", "bfloat16")),
    "update_dtype": (str, "float32: 16-bit parameters get float32 master weights in the "
                          "optimizer (lisa_jax.master_weights); bfloat16: plain bfloat16 updates",
                     ("float32", "bfloat16")),
    "remat": (str, "rematerialization: LISA none|qkv|mlp|full; full/lora none|dots|full", ()),
    "layer_layout": (str, "LISA's layer weights: one array per layer weight or stacked [L, ...]",
                     ("per_layer", "stacked")),
    "mesh": (str, "device mesh, e.g. fsdp=8 or fsdp=4,tp=2", ()),
}
# A setting swept over several values takes a list; these are then spelled in the plural.
PLURAL = {"shape": "shapes", "method": "methods", "remat": "remats",
          "layer_layout": "layer_layouts"}


def flag(name: str, many: bool = False) -> str:
    """``--lisa-layers`` for ``lisa_layers``; ``--methods`` for a list of ``method``."""
    return "--" + (PLURAL.get(name, name) if many else name).replace("_", "-")


def forward_flags(args: argparse.Namespace, *names: str) -> list[str]:
    """The command-line flags that pass ``args``' values of ``names`` on to a child process
    (``--max-seq-len 1024``); a value that is None or empty is left out (the child's default).

    >>> forward_flags(argparse.Namespace(max_seq_len=1024, label=None), "max_seq_len", "label")
    ['--max-seq-len', '1024']
    """
    out = []
    for name in names:
        value = getattr(args, name)
        if value is not None and value != "":
            out += [flag(name), str(value)]
    return out


def add_flags(ap: argparse.ArgumentParser, many=(), choices=None, helps=None, **defaults):
    """Add the trainer-named flags ``defaults`` names, with those defaults, to ``ap``.

    Names in ``many`` take a list (``nargs="+"``; plural where ``PLURAL`` has one); ``choices``
    and ``helps`` replace a flag's allowed values and help text."""
    choices, helps = choices or {}, helps or {}
    for name, default in defaults.items():
        kind, help_, allowed = FLAGS[name]
        kw = dict(type=kind, default=default, help=helps.get(name, help_))
        allowed = choices.get(name, allowed)
        if allowed:
            kw["choices"] = allowed
        if name in many:
            kw["nargs"] = "+"
        ap.add_argument(flag(name, name in many), **kw)
    return ap


def default_dtype() -> str:
    """bfloat16 on an accelerator, float32 on a CPU (imports jax: not for a driver)."""
    import jax
    return "bfloat16" if jax.default_backend() != "cpu" else "float32"


def model_config(shape: str, dtype: str | None = None, **overrides):
    """``lisa_jax.LlamaConfig`` of ``shape`` (experiments/shapes.py)."""
    from lisa_jax import LlamaConfig
    return LlamaConfig(**{**SHAPES[shape], "dtype": dtype or default_dtype(), **overrides})


def hf_config_kwargs(shape: str) -> dict:
    """``transformers.LlamaConfig`` keyword arguments of ``shape`` (transformers' rope theta)."""
    s = SHAPES[shape]
    return dict(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_layers"],
                num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
                head_dim=s["head_dim"])


def random_batch(cfg, batch_size: int, seq_len: int, seed: int = 1) -> dict:
    """``{"input_ids": [batch_size, seq_len]}`` of random tokens."""
    import jax
    ids = jax.random.randint(jax.random.key(seed), (batch_size, seq_len), 0, cfg.vocab_size)
    return {"input_ids": ids}


def time_steps(step, params, state, batch, steps: int, warmup: int = 0, each=None):
    """Run ``warmup`` untimed then ``steps`` timed steps ``step(params, state, batch) ->
    (params, state, metrics)``, each waited for; ``each(metrics)`` after every step.
    Returns ``(params, state, metrics, seconds of each timed step)``."""
    import jax
    times, metrics = [], None
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        params, state, metrics = step(params, state, batch)
        jax.block_until_ready((params, state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if each is not None:
            each(metrics)
    return params, state, metrics, times


def time_calls(fn, args, reps: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``reps`` calls ``fn(*args)`` after ``warmup`` untimed ones."""
    import jax
    times = []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


OOM_MARKS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OutOfMemoryError")


def profile_steps(directory: str, name: str, hlo_text: str | None, run, carry, steps: int = 3):
    """Under ``directory``: ``name.hlo.txt`` (the step's optimized HLO, where given) and a trace
    of ``steps`` calls of ``run(carry) -> carry`` in ``name_trace`` (perfetto JSON; open in
    ui.perfetto.dev; experiments/trace_breakdown.py sums it). ``run`` makes one step and waits
    for it, as the timed steps do. Returns the last carry."""
    import jax

    os.makedirs(directory, exist_ok=True)
    if hlo_text is not None:
        with open(os.path.join(directory, f"{name}.hlo.txt"), "w") as f:
            f.write(hlo_text)
    with jax.profiler.trace(os.path.join(directory, f"{name}_trace"),
                            create_perfetto_trace=True):
        for _ in range(steps):
            carry = run(carry)
    return carry


def spawn_row(args: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run ``python3 args...`` in a fresh process (its peak memory its own); its last stdout
    line starting with ``{`` is the JSON row, returned with ``wall_s``. A failed process gives
    ``{"status": "oom" | "timeout" | "failed", "error": its last lines}``."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                           timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        print("  timed out:", " ".join(args), flush=True)
        return {"status": "timeout", "error": f"more than {timeout} s"}
    wall = round(time.perf_counter() - t0, 1)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode == 0 and lines:
        return {**json.loads(lines[-1]), "wall_s": wall}
    text = (p.stderr or "") + (p.stdout or "")
    tail = " / ".join(text.strip().splitlines()[-3:])[:400]
    print("  failed:", " ".join(args), "|", tail, flush=True)
    oom = any(s in text for s in OOM_MARKS)
    return {"status": "oom" if oom else "failed", "error": tail, "wall_s": wall}


def device_info() -> dict:
    """jax's version, the backend and the devices of this process (imports jax)."""
    import platform

    import jax
    devices = jax.devices()
    return dict(jax=jax.__version__, python=platform.python_version(),
                backend=jax.default_backend(), device=str(devices[0].device_kind),
                devices=len(devices))


def command_line() -> str:
    """This process's command line, to be run again."""
    return " ".join(["python3", *sys.argv])


def write_json(path: str, payload: dict, device: bool = False) -> None:
    """Write ``payload`` (with ``device``: plus ``environment``, this process's
    ``device_info()``) to ``path`` whole or not at all, making its folder."""
    if device:
        payload = {**payload, "environment": device_info()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)
