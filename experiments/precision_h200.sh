#!/usr/bin/env bash
# Step time and peak memory at LLaMA-2-7B shape, batch 4 x 1024, bf16, on one GPU: lisa_jax
# before a change (bf16 updates) and after it (fp32 master weights), and the PyTorch peer with
# Liger kernels, in one job. From the repository root, with OUT set to an output folder:
#
#   OUT=/path/to/out bash experiments/precision_h200.sh [before] [after] [mu16] [peer] [all]
#   bash experiments/precision_h200.sh table DIR...   # only the table, from DIR/*.json (no GPU)
#
# It needs two folders beside the working tree (carried to the GPU machine):
#   .whl/liger_kernel-0.8.5-py3-none-any.whl   (the peer; installed under /tmp/site)
#   .before/lisa_jax/                          (the package before the change), made with
#       rm -rf .before && mkdir .before && git archive <commit> lisa_jax | tar -x -C .before \
#         && echo <commit> > .before/COMMIT
#
# Rows (bench_step.py, one process each): LISA γ=2 remat none and remat full (per-layer
# weights), LoRA r128 and full FT (remat dots, the trainer's default); the peer: LISA γ=2
# without and with gradient checkpointing, LoRA r128, full FT. Writes $OUT/before.json,
# $OUT/after.json, $OUT/peer.json and $OUT/log.txt, then a markdown table of our rows with
# their ratios to the peer's row of the same method and remat.
set -u -o pipefail
export PYTHONUNBUFFERED=1

ROOT=$(pwd)
SHAPE=(--shape llama2-7b --batch-size 4 --max-seq-len 1024 --steps 10 --warmup 3 --timeout 240)
OURS=(--methods lisa lora full --lisa-layers 2 --remats none full --remat-lisa-layers 2
      --remat-methods lisa --layer-layouts per_layer --lora-rank 128)
PEER_IMPL=${PEER_IMPL:-liger}  # eager or compile: the peer without Liger (no wheel needed)
PEER=(--peer-only --peer-impl "$PEER_IMPL" --peer-methods lisa lora full --peer-lisa-layers 2
      --peer-remat --peer-remat-methods lisa --remat-lisa-layers 2 --lora-rank 128
      --peer-steps 10 --peer-warmup 3)
# SHAPE_ARGS replaces the shape and step flags (a toy run on a CPU, say).
[ -n "${SHAPE_ARGS:-}" ] && read -r -a SHAPE <<<"$SHAPE_ARGS"
# Full FT with fp32 updates holds fp32 Adam moments and int16 master remainders beside the bf16
# weights: XLA's pool may take nearly all of the card, not its default share (before and after).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.94}
PP=${PYTHONPATH:-}

table() {  # the markdown table of every *.json in the folders given
  python3 - "$@" <<'EOF'
import glob, json, os, sys

ours, peers, failed = [], [], []
for d in sys.argv[1:]:
    for f in sorted(glob.glob(os.path.join(d, "*.json"))):
        try:
            j = json.load(open(f))
        except (OSError, ValueError):
            continue
        for r in j.get("rows", []) + j.get("peer_rows", []):
            (peers if r.get("impl") == "torch" else ours).append(r)
        failed += j.get("failed", [])

def peer_for(r):
    hits = [p for p in peers if p["method"] == r["method"] and p.get("remat") ==
            (r["remat"] not in ("none", "dots")) and
            (r["method"] != "lisa" or p.get("gamma") == r.get("gamma")) and
            (r["method"] != "lora" or p.get("lora_r") == r.get("lora_r"))]
    return (sorted(hits, key=lambda p: not p.get("liger")) or [None])[0]  # Liger first

def key(r):
    return (r["method"], r.get("gamma"), r.get("lora_r"), r["remat"], r.get("layout"))

def f(x, fmt):
    return format(x, fmt) if isinstance(x, (int, float)) else ""

def ratio(x, y, key, op=lambda a, b: a / b):
    return op(x[key], y[key]) if x and y and x.get(key) and y.get(key) else None

before = {key(r): r for r in ours if r.get("label") == "before"}
print("| label | method | γ/r | remat | updates | ms | tok/s | peak GiB | peer ms | peer GiB "
      "| speed× peer | mem× peer | speed× before | Δ GiB before |")
print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in sorted(ours, key=lambda r: (key(r)[0], str(key(r)), r.get("label") != "before")):
    p, b = peer_for(r), before.get(key(r))
    b = b if b is not None and b is not r else None
    cells = [r.get("label") or "", r["method"], r.get("gamma") or r.get("lora_r") or "",
             r["remat"], r.get("update_precision") or "", f(r["ms"], ".1f"),
             f(r["tokens_per_s"], ",.0f"), f(r.get("peak_gib"), ".2f"),
             f(p and p["ms"], ".1f"), f(p and p.get("peak_gib"), ".2f"),
             f(ratio(r, p, "tokens_per_s"), ".2f"), f(ratio(r, p, "peak_gib"), ".2f"),
             f(ratio(r, b, "tokens_per_s"), ".3f"),
             f(ratio(r, b, "peak_gib", lambda a, b: a - b), "+.2f")]
    print("| " + " | ".join(map(str, cells)) + " |")
print()
print("| peer | method | γ/r | remat | ms | tok/s | peak GiB |")
print("|---|---|---|---|---:|---:|---:|")
for p in peers:
    impl = "liger" if p.get("liger") else "compile" if p.get("compile") else "eager"
    print(f"| torch {impl} | {p['method']} | {p.get('gamma') or p.get('lora_r') or ''} "
          f"| {p.get('remat')} | {p['ms']:.1f} | {p['tokens_per_s']:,.0f} "
          f"| {f(p.get('peak_gib'), '.2f')} |")
for x in failed:
    print(f"\n{x['status']}: {x['impl']} {x.get('label') or ''} {x['method']} "
          f"γ={x.get('gamma')} remat={x['remat']}")
EOF
}

if [ "${1:-}" = table ]; then
  shift
  table "${@:-${OUT:-.}}"
  exit
fi
: "${OUT:?set OUT to an output folder}"
[ -f experiments/bench_step.py ] || { echo "run from the repository root"; exit 2; }
mkdir -p "$OUT"
PHASES=("$@")
[ ${#PHASES[@]} -eq 0 ] && PHASES=(all)
for p in "${PHASES[@]}"; do
  case $p in before|after|mu16|peer) ;; all) PHASES=(before after mu16 peer) ;;
    *) echo "unknown phase $p: before after mu16 peer all table"; exit 2 ;; esac
done

has() { local x; for x in "${PHASES[@]}"; do [ "$x" = "$1" ] && return 0; done; return 1; }

# Where lisa_jax comes from under PYTHONPATH=$1, and whether it has master_weights.
which_pkg() {
  (cd / && PYTHONPATH=$1 python3 -c 'import os, lisa_jax
try:
    from lisa_jax.precision import master_weights as mw  # noqa: F401
    has = True
except ImportError:
    has = hasattr(lisa_jax, "master_weights")
print(os.path.dirname(lisa_jax.__file__), "master_weights:", has)')  # not from the cwd
}

main() {
  echo "== $(date -u +%FT%TZ) phases: ${PHASES[*]};" \
    "commit $(git rev-parse --short HEAD 2>/dev/null || echo ?)"
  nvidia-smi -L || true
  python3 -c 'import jax; print("jax", jax.__version__, jax.devices())' || return 1
  local t0 info pp_before="$ROOT/.before${PP:+:$PP}" pp_after="$ROOT${PP:+:$PP}"
  if has before; then
    t0=$SECONDS
    [ -d .before/lisa_jax ] || { echo "no .before/lisa_jax: make it (see the header)"; return 1; }
    echo "== before: .before at $(cat .before/COMMIT 2>/dev/null || echo '(no COMMIT file)')"
    info=$(which_pkg "$pp_before") && echo "$info" || return 1
    [[ $info == "$ROOT/.before/lisa_jax "* ]] ||
      { echo "lisa_jax does not come from .before"; return 1; }
    PYTHONPATH=$pp_before python3 experiments/bench_step.py "${SHAPE[@]}" "${OURS[@]}" \
      --label before --update-dtype bfloat16 --out "$OUT/before.json"
    echo "== before: $((SECONDS - t0)) s"
  fi
  if has after; then
    t0=$SECONDS
    echo "== after: the working tree's lisa_jax"
    info=$(which_pkg "$pp_after") && echo "$info" || return 1
    [[ $info == "$ROOT/lisa_jax master_weights: True" ]] ||
      { echo "the working tree's lisa_jax has no master_weights"; return 1; }
    PYTHONPATH=$pp_after python3 experiments/bench_step.py "${SHAPE[@]}" "${OURS[@]}" \
      --label after --update-dtype float32 --out "$OUT/after.json"
    echo "== after: $((SECONDS - t0)) s"
  fi
  if has mu16; then  # the LISA rows again, with AdamW's first moment in bfloat16
    t0=$SECONDS
    PYTHONPATH=$pp_after python3 experiments/bench_step.py "${SHAPE[@]}" "${OURS[@]}" \
      --methods lisa --label after-mu16 --update-dtype float32 --mu-dtype bfloat16 \
      --out "$OUT/after_mu16.json"
    echo "== mu16: $((SECONDS - t0)) s"
  fi
  if has peer; then
    t0=$SECONDS
    if [ "$PEER_IMPL" = liger ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "the Liger wheel did not install"; return 1; }
      # /tmp/site holds liger_kernel alone (--no-deps): it shadows nothing.
      PYTHONPATH="$pp_after:/tmp/site" python3 -c 'import torch, transformers, peft, triton
import liger_kernel.transformers as lk
print("torch", torch.__version__, "transformers", transformers.__version__, "peft",
      peft.__version__, "triton", triton.__version__, "liger_kernel", lk.__file__)' || return 1
    fi
    PYTHONPATH="$pp_after:/tmp/site" python3 experiments/bench_step.py "${SHAPE[@]}" "${PEER[@]}" \
      --label peer --out "$OUT/peer.json"
    echo "== peer: $((SECONDS - t0)) s"
  fi
  echo "== $(date -u +%FT%TZ) done in $SECONDS s"
  table "$OUT"
}

main 2>&1 | tee -a "$OUT/log.txt"
