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
#
# The flags are the trainer's names (--batch-size, --max-seq-len, --lisa-layers, ...), SHAPE_ARGS
# too; a benchmark before the change that predates them gets them translated to its own
# (--batch, --seq, --gammas, ...).
set -u -o pipefail
export PYTHONUNBUFFERED=1

ROOT=$(pwd)
SHAPE=(--shape llama2-7b --batch-size 4 --max-seq-len 1024 --steps 10 --warmup 3 --timeout 240)
[ -n "${SHAPE_ARGS:-}" ] && read -r -a SHAPE <<<"$SHAPE_ARGS"
ROWS=(--methods lisa lora full --lisa-layers 2 --remats none full --remat-lisa-layers 2
      --remat-methods lisa --layer-layouts per_layer stacked --lora-rank 128
      --update-dtype float32)
AGAIN=(--methods lisa --lisa-layers 2 --remats none --layer-layouts per_layer
       --update-dtype float32)
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.94}
PP=${PYTHONPATH:-}
: "${OUT:?set OUT to an output folder}"
[ -d .before/lisa_jax ] || { echo "no .before/lisa_jax: make it (see the header)"; exit 2; }
mkdir -p "$OUT"

old_flags() {  # the flags given, in the spelling of bench_step.py before the trainer's names
  local x prev=
  for x in "$@"; do
    local y=$x
    case $x in
      --batch-size) y=--batch ;; --max-seq-len) y=--seq ;; --lisa-interval) y=--interval ;;
      --lisa-layers) y=--gammas ;; --remat-lisa-layers) y=--remat-gammas ;;
      --peer-lisa-layers) y=--peer-gammas ;; --layer-layouts) y=--layouts ;;
      --lora-rank) y=--lora-r ;; --update-dtype) y=--update-precision ;;
    esac
    if [ "$prev" = --update-dtype ]; then
      case $x in float32) y=fp32 ;; bfloat16) y=bf16 ;; esac
    fi
    printf '%s\n' "$y"
    prev=$x
  done
}

run() {  # label, package root, benchmark script, rows...
  local label=$1 root=$2 script=$3 t0=$SECONDS
  shift 3
  local args=("${SHAPE[@]}" "$@")
  python3 "$script" --help 2>/dev/null | grep -q -e --batch-size ||
    mapfile -t args < <(old_flags "${args[@]}")
  echo "== $label: lisa_jax from $root"
  PYTHONPATH="$root${PP:+:$PP}" python3 "$script" "${args[@]}" --label "$label" \
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
