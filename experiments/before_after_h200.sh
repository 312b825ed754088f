#!/usr/bin/env bash
# Step time and peak memory of a change at LLaMA-2-7B shape, batch 4 x 1024, bf16 with float32
# master weights, on one GPU: the package before the change and the working tree's, the same
# rows in one job. From the repository root, with OUT set to an output folder:
#
#   OUT=/path/to/out bash experiments/before_after_h200.sh
#   bash experiments/precision_h200.sh table DIR   # the table again, from DIR/*.json (no GPU)
#
# It needs, beside the working tree (carried to the GPU machine), the package and the benchmark
# before the change:
#   rm -rf .before && mkdir .before && git archive <commit> lisa_jax experiments/bench_step.py \
#     experiments/shapes.py | tar -x -C .before && echo <commit> > .before/COMMIT
#
# Rows (bench_step.py, one process each): LISA γ=2 with remat none and full in both layer
# layouts, LoRA r128 and full FT (remat dots). The LISA γ=2 per-layer row runs twice more at
# the end (before, then after) to show the drift between runs. Writes $OUT/before.json,
# $OUT/after.json, $OUT/before_again.json, $OUT/after_again.json and $OUT/log.txt.
set -u -o pipefail
export PYTHONUNBUFFERED=1

ROOT=$(pwd)
SHAPE=(--shape llama2-7b --batch 4 --seq 1024 --steps 10 --warmup 3 --timeout 240)
[ -n "${SHAPE_ARGS:-}" ] && read -r -a SHAPE <<<"$SHAPE_ARGS"
ROWS=(--methods lisa lora full --gammas 2 --remats none full --remat-gammas 2
      --remat-methods lisa --layouts per_layer stacked --lora-r 128 --update-precision fp32)
AGAIN=(--methods lisa --gammas 2 --remats none --layouts per_layer --update-precision fp32)
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.94}
PP=${PYTHONPATH:-}
: "${OUT:?set OUT to an output folder}"
[ -d .before/lisa_jax ] || { echo "no .before/lisa_jax: make it (see the header)"; exit 2; }
mkdir -p "$OUT"

run() {  # label, package root, benchmark script, rows...
  local label=$1 root=$2 script=$3 t0=$SECONDS
  shift 3
  echo "== $label: lisa_jax from $root"
  PYTHONPATH="$root${PP:+:$PP}" python3 "$script" "${SHAPE[@]}" "$@" --label "$label" \
    --out "$OUT/$label.json"
  echo "== $label: $((SECONDS - t0)) s"
}

main() {
  echo "== $(date -u +%FT%TZ) before: $(cat .before/COMMIT 2>/dev/null || echo ?)," \
    "after: $(git rev-parse --short HEAD 2>/dev/null || echo ?) and the working tree"
  nvidia-smi -L || true
  run before "$ROOT/.before" .before/experiments/bench_step.py "${ROWS[@]}"
  run after "$ROOT" experiments/bench_step.py "${ROWS[@]}"
  run before_again "$ROOT/.before" .before/experiments/bench_step.py "${AGAIN[@]}"
  run after_again "$ROOT" experiments/bench_step.py "${AGAIN[@]}"
  echo "== $(date -u +%FT%TZ) done in $SECONDS s"
  bash experiments/precision_h200.sh table "$OUT"
}

main 2>&1 | tee -a "$OUT/log.txt"
