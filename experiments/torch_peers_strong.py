"""Peer anchor: what a PyTorch user runs today for full FT, PEFT LoRA and LMFlow-style LISA,
eager, with torch.compile (--compile) or with Liger kernels (--liger: fused RoPE, RMSNorm,
SwiGLU and linear cross-entropy; `pip install --no-deps liger-kernel==0.8.5`).

One method per process so that peak memory is clean. Random weights at real shapes:
memory and speed do not depend on the values. Pure bf16 weights and AdamW (no fp32 master).
Prints one JSON line.

  python3 torch_peers_strong.py --shape llama2-7b --method lisa --gamma 2 --batch 4 --seq 1024 --liger

Run from experiments/bench_step.py (``--peer --peer-impl eager|liger|compile``) and
experiments/precision_h200.sh; without --liger and --compile it is experiments/torch_peers.py.
"""
import argparse, json, statistics, time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=256),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="tiny")
    p.add_argument("--method", choices=["full", "lora", "lisa", "forward"], default="lisa")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--gamma", type=int, default=2)
    p.add_argument("--interval", type=int, default=3)
    p.add_argument("--lisa-optimizer", choices=["recreate", "persistent"], default="recreate")
    p.add_argument("--lora-r", type=int, default=128)
    p.add_argument("--remat", action="store_true")
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
    cfg = LlamaConfig(max_position_embeddings=max(4096, a.seq), **SHAPES[a.shape])
    with torch.device(dev):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    if a.remat:
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
            r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.0,
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
            idx = torch.randperm(L, generator=gen)[: a.gamma].tolist()
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
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), device=dev)
    if dev == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    times, peaks = [], []
    for step in range(a.warmup + a.steps):
        if a.method == "lisa" and step > 0 and step % a.interval == 0:
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
    res = dict(peer="torch", shape=a.shape, method=a.method, batch=a.batch, seq=a.seq,
               gamma=a.gamma if a.method == "lisa" else None,
               lisa_optimizer=a.lisa_optimizer if a.method == "lisa" else None,
               lora_r=a.lora_r if a.method == "lora" else None, remat=a.remat,
               params=n_params, trainable=trainable, step_s=round(t, 4),
               tokens_per_s=round(a.batch * a.seq / t, 1), loss=float(out.loss.detach()),
               peak_gib=round(max(peaks) / 2**30, 2) if peaks else None,
               peak_gib_first_interval=round(peaks[a.interval - 1] / 2**30, 2) if peaks else None,
               torch=torch.__version__, compile=a.compile, liger=a.liger)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
