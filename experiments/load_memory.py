"""Peak host memory of ``lisa_jax.load_hf`` on a sharded ~1 GB checkpoint, against its size.

    python experiments/load_memory.py [--keep DIR]

Builds a random float32 Llama with transformers (hidden 1024, 12 layers, MLP 4096, vocab
32000: ~268M parameters, ~1.07 GB), saves it with ``max_shard_size="200MB"`` into a temporary
directory, then in a fresh subprocess (on the CPU backend) imports lisa_jax, records the
resident set size, runs ``load_hf`` and reports the peak RSS (``getrusage`` maxrss, and
``/usr/bin/time -v`` when present) against the checkpoint's bytes.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

CHILD = r"""
import os, resource, sys, time
import jax
import lisa_jax

def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
jax.numpy.zeros(1).block_until_ready()
base = rss()
t = time.time()
model = lisa_jax.load_hf(sys.argv[1])
jax.block_until_ready(model.params)
dt = time.time() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
n = sum(x.size for x in jax.tree.leaves(model.params))
print(f"BASE {base} PEAK {peak} AFTER {rss()} PARAMS {n} SECONDS {dt:.2f}")
"""


def build(out_dir: str) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096,
                                   num_hidden_layers=12, num_attention_heads=16,
                                   num_key_value_heads=16)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir, max_shard_size="200MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", help="build (or reuse) the checkpoint here instead of a temp dir")
    args = ap.parse_args()
    tmp = None
    if args.keep:
        ckpt = args.keep
        if not os.path.isfile(os.path.join(ckpt, "config.json")):
            build(ckpt)
    else:
        tmp = tempfile.mkdtemp(prefix="load_memory-")
        ckpt = os.path.join(tmp, "ckpt")
        build(ckpt)
    try:
        files = [f for f in os.listdir(ckpt) if f.endswith(".safetensors")]
        size = sum(os.path.getsize(os.path.join(ckpt, f)) for f in files)
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        cmd = [sys.executable, "-c", CHILD, ckpt]
        timed = os.path.exists("/usr/bin/time")
        if timed:
            cmd = ["/usr/bin/time", "-v"] + cmd
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        m = re.search(r"BASE (\d+) PEAK (\d+) AFTER (\d+) PARAMS (\d+) SECONDS ([\d.]+)",
                      res.stdout)
        base, peak, after, n = (int(m.group(i)) for i in range(1, 5))
        gb = 1e9
        print(f"checkpoint: {len(files)} shards, {size / gb:.3f} GB, {n / 1e6:.1f}M params")
        print(f"RSS after imports (baseline): {base / gb:.3f} GB")
        print(f"peak RSS during load_hf:      {peak / gb:.3f} GB  (getrusage maxrss)")
        print(f"RSS after load_hf:            {after / gb:.3f} GB")
        print(f"peak - baseline: {(peak - base) / gb:.3f} GB = "
              f"{(peak - base) / size:.2f} x checkpoint; load took {m.group(5)} s")
        if timed:
            t = re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr)
            kb = int(t.group(1))
            print(f"/usr/bin/time -v maximum resident set size: {kb * 1024 / gb:.3f} GB")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
