"""Peer anchor: what a PyTorch user runs today for full FT, PEFT LoRA and LMFlow-style LISA,
eager, with torch.compile (--compile) or with Liger kernels (--liger: fused RoPE, RMSNorm,
SwiGLU and linear cross-entropy; `pip install --no-deps liger-kernel==0.8.5`).

One method per process so that peak memory is clean. Random weights at real shapes:
memory and speed do not depend on the values. Pure bf16 weights and AdamW (no fp32 master).
Prints one JSON line.

    python3 experiments/torch_peers_strong.py --shape llama2-7b --method lisa --lisa-layers 2 \
        --batch-size 4 --max-seq-len 1024 --liger

Run from experiments/bench_step.py (``--peer --peer-impl eager|liger|compile``) and
experiments/precision_h200.sh; without --liger and --compile it is experiments/torch_peers.py.
Shapes are experiments/shapes.py's, with transformers' default rope theta (it changes no step
time).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_flags, hf_config_kwargs  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_flags(p, shape="tiny", method="lisa", batch_size=1, max_seq_len=128, steps=12,
              choices=dict(method=("full", "lora", "lisa", "forward")))
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    add_flags(p, lisa_layers=2, lisa_interval=3, lora_rank=128, remat="none",
              choices=dict(remat=("none", "full")),
              helps=dict(remat="full: gradient checkpointing of every layer"))
    p.add_argument("--lisa-optimizer", choices=["recreate", "persistent"], default="recreate")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--liger", action="store_true", help="Liger kernels (rope, rmsnorm, swiglu, fused linear CE)")
    a = p.parse_args()
    if a.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    cfg = LlamaConfig(max_position_embeddings=max(4096, a.max_seq_len),
                      **hf_config_kwargs(a.shape))
    with torch.device(dev):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    if a.remat == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    n_params = sum(p.numel() for p in model.parameters())
    layers = model.model.layers
    L = len(layers)

    def opt_over(params):
        params = [q for q in params if q.requires_grad]
        return torch.optim.AdamW(params, lr=1e-5, fused=(dev == "cuda"))

    if a.method == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(
            r=a.lora_rank, lora_alpha=2 * a.lora_rank, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        opt = opt_over(model.parameters())
    elif a.method == "full":
        opt = opt_over(model.parameters())
    elif a.method == "lisa":
        # LMFlow-style: embedding, final norm and LM head always train; gamma of L middle layers.
        gen = torch.Generator().manual_seed(1)

        def resample():
            for q in layers.parameters():
                q.requires_grad_(False)
            idx = torch.randperm(L, generator=gen)[: a.lisa_layers].tolist()
            for i in idx:
                for q in layers[i].parameters():
                    q.requires_grad_(True)
            return idx

        active = resample()
        opt = opt_over(model.parameters()) if a.lisa_optimizer == "recreate" else \
            torch.optim.AdamW(model.parameters(), lr=1e-5, fused=(dev == "cuda"))
    else:
        for q in model.parameters():
            q.requires_grad_(False)
        opt = None

    fwd = torch.compile(model) if a.compile else model
    trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
    ids = torch.randint(0, cfg.vocab_size, (a.batch_size, a.max_seq_len), device=dev)
    if dev == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    times, peaks = [], []
    for step in range(a.warmup + a.steps):
        if a.method == "lisa" and step > 0 and step % a.lisa_interval == 0:
            active = resample()
            if a.lisa_optimizer == "recreate":
                opt = opt_over(model.parameters())  # drops the old layers' moments
        t0 = time.perf_counter()
        if opt is None:
            with torch.no_grad():
                out = fwd(input_ids=ids, labels=ids)
        else:
            out = fwd(input_ids=ids, labels=ids)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if dev == "cuda":
            peaks.append(torch.cuda.max_memory_allocated())
    t = statistics.median(times[a.warmup:])
    res = dict(peer="torch", shape=a.shape, method=a.method, batch=a.batch_size,
               seq=a.max_seq_len, gamma=a.lisa_layers if a.method == "lisa" else None,
               lisa_optimizer=a.lisa_optimizer if a.method == "lisa" else None,
               lora_r=a.lora_rank if a.method == "lora" else None, remat=a.remat == "full",
               params=n_params, trainable=trainable, step_s=round(t, 4),
               tokens_per_s=round(a.batch_size * a.max_seq_len / t, 1), loss=float(out.loss.detach()),
               peak_gib=round(max(peaks) / 2**30, 2) if peaks else None,
               peak_gib_first_interval=(round(peaks[a.lisa_interval - 1] / 2**30, 2)
                                        if peaks else None),
               torch=torch.__version__, compile=a.compile, liger=a.liger)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
