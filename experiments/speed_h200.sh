#!/usr/bin/env bash
# OUT=/path/to/out PEER_SITE=/path/with/liger_kernel bash experiments/speed_h200.sh
#
# The speed table against the strongest PyTorch peer measured in the same job: lisa_jax and
# transformers + Liger kernels (experiments/torch_peers_strong.py --liger; Liger from
# `pip download --no-deps liger-kernel==0.8.5`, installed with `pip install --no-deps --target
# PEER_SITE`), batch 4 x 1024, bfloat16, on one GPU. Rows (experiments/bench_step.py, one
# process each): at LLaMA-2-7B shape LISA gamma=2 with remat none and full, full FT and LoRA
# r128; at Llama-3-8B shape LISA gamma=2 with remat none and full, and with the embedding
# frozen (--lisa-frozen embed). Ours run as the trainer does in bf16: float32-precision updates
# (master weights), Adam's first moment in bf16 and its second in float32; the peer
# updates its bf16 weights in place (it has no master copy).
# Writes $OUT/llama2-7b.json, $OUT/llama3-8b.json, $OUT/log.txt, then
#   python3 experiments/speed_table.py $OUT/*.json --out experiments/results/speed_h200.json
set -u -o pipefail
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to an output folder}"
mkdir -p "$OUT"
export PYTHONPATH=${PEER_SITE:+$PEER_SITE:}${PYTHONPATH:-}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.94}
COMMON=(--batch-size 4 --max-seq-len 1024 --steps 10 --warmup 3 --timeout 240
        --update-dtype float32 --mu-dtype bfloat16 --lisa-layers 2 --remats none full --remat-lisa-layers 2
        --remat-methods lisa --layer-layouts per_layer --lora-rank 128
        --peer --peer-impl liger --peer-lisa-layers 2 --peer-remat --peer-remat-methods lisa
        --peer-steps 10 --peer-warmup 3)
{
  nvidia-smi -L
  python3 experiments/bench_step.py --shape llama2-7b "${COMMON[@]}" --methods lisa full lora \
      --peer-methods lisa full lora --label speed --out "$OUT/llama2-7b.json"
  python3 experiments/bench_step.py --shape llama3-8b "${COMMON[@]}" --methods lisa \
      --peer-methods lisa --label speed --out "$OUT/llama3-8b.json"
  python3 experiments/bench_step.py --shape llama3-8b "${COMMON[@]}" --methods lisa --remats none \
      --lisa-frozen embed --label frozen_embed --out "$OUT/llama3-8b_frozen_embed.json"
} 2>&1 | tee "$OUT/log.txt"
