#!/usr/bin/env bash
# OUT=/path/to/out PEER_SITE=/path/with/liger_kernel bash experiments/speed_h200.sh [PHASE...]
#
# The speed table against the strongest PyTorch peer measured in the same job: lisa_jax and
# transformers + Liger kernels (experiments/torch_peers_strong.py --liger; Liger from
# `pip download --no-deps liger-kernel==0.8.5`, installed with `pip install --no-deps --target
# PEER_SITE`), batch 4 x 1024, bfloat16, on one GPU. Ours run as the trainer does in bf16:
# float32-precision updates (master weights), Adam's first moment in bf16 and its second in
# float32; the peer updates its bf16 weights in place (it has no master copy).
#
# Phases (default: table), each writing $OUT/<phase>*.json (or $OUT/extra/) and appending to
# $OUT/log.txt:
#   table     table7, then table8
#   table7    LLaMA-2-7B LISA gamma=2 (remat none and full), full FT, LoRA r128; the peer's rows
#             of each
#   table8    Llama-3-8B LISA gamma=2 (remat none and full); the peer's rows of each
#   peer7b    the peer's LLaMA-2-7B LISA gamma=2 row, remat none (what fp8 is compared with)
#   fp8       LLaMA-2-7B LISA gamma=2 with the frozen layers in fp8 (experiments/bench_fp8.py)
#             beside our bf16 row, remat none (REMATS to change), then its --check numerics
#   fp8k      the fp8 row over whole LISA periods, resamples overlapped with the steps: K=20
#             (60 steps, with our bf16 row) and K=5 (20 steps)
#   fp8hide   the fp8 row over whole K=20 periods with the resample's transfers hidden two
#             ways: 4 steps of prefetch, and those with background transfers
#   fp8pin    the fp8 row over whole K=20 periods with its masters in pinned host memory
#             (4 steps of prefetch, the default; and 1, as job 2026-12-01c measured)
#   fp8warm   the fp8 row over whole K=20 periods after every layer's sampled branch has run
#             once (--warm-every-layer), with pageable and with pinned masters; and unwarmed
#             under CUDA_MODULE_LOADING=EAGER
#   fp8gemm   the fp8 row over whole K=20 periods with the fp8 GEMMs writing their product in
#             float32 and in bfloat16 (--gemm-out), each profiled (extra/fp8_breakdown.*)
#   fp8layer  a layer's kernels: LLaMA-2-7B with 6 layers, fp8 with one copy per frozen matrix
#             (the backward transposes it) and two, profiled (extra/fp8_layer_breakdown.*)
#   fp8tiled  the fp8 row over whole K=20 periods, remat none and mlp (the one-copy backward's
#             transpose as one tiled kernel); then a layer's kernels (6 layers) with it and with
#             the transpose left to XLA, profiled (extra/fp8_transpose_breakdown.*)
#   fp8two    the fp8 row over whole K=20 periods with two copies per frozen matrix, with
#             remat none and mlp
#   fp8lean   the fp8 row over whole K=20 periods with --remat mlp, the resample's transfers
#             overlapped with the steps (the default) and made at the resample (--no-overlap:
#             no step runs while the device holds both periods' layers)
#   fp8mlp    the fp8 row over whole K=20 periods with --remat mlp (gate and up recomputed)
#   condfp8   the fp8 row over whole K=20 periods with XLA's default command buffers and with
#             conditionals recorded into them (CUDA graph conditional nodes: a lax.cond no
#             longer waits on the host for its predicate)
#   cond16    our bf16 LISA gamma=2 row, remat none, the same two ways
#   fp8kern   every kernel of the fp8 step: LLaMA-2-7B with 6 layers, profiled with its optimized
#             HLO (extra/fp8_kernels.*, extra/*.hlo.txt.gz); then the same 6 layers timed under
#             XLA's experimental Triton fusion flags (FUSION_FLAGS), one row each
#   fp8fused  the frozen layers' MLP as fp8_mlp.FrozenMlp against stage by stage: LLaMA-2-7B with
#             6 layers with its row kernels in Pallas (profiled: extra/fp8_fused_kernels.*), in
#             plain JAX, and stage by stage; then the fp8 row over whole K=20 periods, fused
#   fp8res    the fp8 row over whole K=20 periods, remat none, with the frozen layers' gate and
#             up activations saved in bf16 and in fp8 (--residuals fp8)
#   fp8qkv    the fp8 row over whole K=20 periods with --remat qkv (q, k, v recomputed in the
#             backward), with the gate and up products in fp8 (--residuals fp8) and in bf16
#   fp8prof   every kernel of the 32-layer fp8 step over whole K=20 periods, remat none and qkv,
#             both with --residuals fp8, profiled (extra/fp8_step_kernels.*)
#   fp8launch the fused MLP's row kernels timed alone over launch shapes, programs taking groups
#             of rows in turn or one a group (PROGRAMS), Triton's pipeline stages (STAGES)
#             (extra/fp8_mlp_kernels_programs.json); then the
#             fp8 row over whole K=20 periods, remat none, --residuals fp8, with the default
#             launch shapes and with the fastest of the sweep
#   fp8six    every kernel of the 6-layer fp8 step with --residuals fp8, profiled with its
#             optimized HLO (extra/fp8_six_kernels.*, extra/*.hlo.txt.gz)
#   fp8sync   the fp8 row over whole K=20 periods with --residuals fp8, remat qkv and none, the
#             resample's transfers made at the resample (--no-overlap: the device never holds
#             two periods' sampled layers)
#   fp8wide   the fp8 row over whole K=20 periods, remat none: --residuals fp8, then fp8_qkv
#             and fp8_all (q, k, v; and the layer inputs and mid-residuals too, in e4m3), both
#             with Adam's second moment in bfloat16 (--nu-dtype); then our bf16 LISA row with
#             the bfloat16 second moment
#   fp8scale  the fp8 row over whole K=20 periods, remat none, --residuals fp8_all with the bf16
#             second moment, q, k, v scaled per token and head (the default) and per token
#   fp8full   the peer's LLaMA-2-7B LISA gamma=2 rows (remat off and on) and the fp8 row with
#             --remat full over whole K=20 periods
#   fp8_8b    the peer's Llama-3-8B LISA gamma=2 row and the fp8 row over whole K=20 periods
#   module    LLaMA-2-7B module-level LISA (--lisa-granularity matrix and attn_mlp, gamma=2)
#   frozen8b  Llama-3-8B LISA gamma=2 with the embedding trained and frozen (--lisa-frozen embed)
#   packing   LLaMA-2-7B LISA gamma=2 useful tokens/s with and without --packing
# Then
#   python3 experiments/speed_table.py $OUT/*.json --out experiments/results/speed_h200.json
set -u -o pipefail
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to an output folder}"
mkdir -p "$OUT/extra"  # extra/: files that are not bench_step rows
export PYTHONPATH=${PEER_SITE:+$PEER_SITE:}${PYTHONPATH:-}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.94}
# rows that compile the same program read it from here (kept between calls on a warm machine)
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$(pwd)/.jaxcache}
OURS=(--batch-size 4 --max-seq-len 1024 --steps 10 --warmup 3 --timeout 240
      --update-dtype float32 --mu-dtype bfloat16 --layer-layouts per_layer)
PEER=(--peer --peer-impl liger --peer-steps 10 --peer-warmup 3)
COMMON=("${OURS[@]}" --lisa-layers 2 --remats none full --remat-lisa-layers 2
        --remat-methods lisa --lora-rank 128 "${PEER[@]}" --peer-lisa-layers 2 --peer-remat
        --peer-remat-methods lisa)
B=experiments/bench_step.py
COND_CMDBUF=--xla_gpu_enable_command_buffer=+CONDITIONAL
# a CPU smoke run of the phases: SHAPE7=tiny SHAPE8=tiny FP8_FLAGS=--allow-cpu
SHAPE7=${SHAPE7:-llama2-7b} SHAPE8=${SHAPE8:-llama3-8b}
FP8=(${FP8_FLAGS:-})
# bench_fp8.py's rows over whole K=20 periods (60 timed steps, three resamples) at LLaMA-2-7B,
# and the row's own flags after (a later --shape wins)
fp8_k20() {
  python3 experiments/bench_fp8.py --shape $SHAPE7 --lisa-layers 2 --batch-size 4 \
      --max-seq-len 1024 --steps 60 --warmup 3 --lisa-interval 20 --timeout 300 "$@" "${FP8[@]}"
}
# bench_fp8.py's fp8 row at LLaMA-2-7B cut to 6 layers (4 frozen): a layer's kernels at full
# width, compiled in seconds
fp8_six() {
  python3 experiments/bench_fp8.py --shape $SHAPE7 --num-layers 6 --lisa-layers 2 \
      --batch-size 4 --max-seq-len 1024 --steps 20 --warmup 3 --lisa-interval 20 \
      --remats none --variants fp8 --timeout 200 "${FP8[@]}" "$@"
}
phase() {
  local t0=$SECONDS
  echo "== $1 at $(date -u +%H:%M:%S)"
  case $1 in
    table)
      phase table7 && phase table8 ;;
    table7)
      python3 $B --shape $SHAPE7 "${COMMON[@]}" --methods lisa full lora \
          --peer-methods lisa full lora --label speed --out "$OUT/table_llama2-7b.json" ;;
    table8)
      python3 $B --shape $SHAPE8 "${COMMON[@]}" --methods lisa --peer-methods lisa \
          --label speed --out "$OUT/table_llama3-8b.json" ;;
    peer7b)
      python3 $B --shape $SHAPE7 "${OURS[@]}" --peer-only "${PEER[@]}" --peer-methods lisa \
          --peer-lisa-layers 2 --label speed --out "$OUT/peer7b.json" ;;
    fp8)
      python3 experiments/bench_fp8.py --shape $SHAPE7 --lisa-layers 2 --batch-size 4 \
          --max-seq-len 1024 --steps 10 --warmup 3 --lisa-interval 5 --remats ${REMATS:-none} \
          --label fp8 --timeout 240 "${FP8[@]}" --out "$OUT/fp8_llama2-7b.json"
      python3 experiments/bench_fp8.py --shape $SHAPE7 --check --batch-size 4 \
          --max-seq-len 1024 --timeout 200 "${FP8[@]}" --out "$OUT/extra/check_fp8.json" ;;
    fp8k)
      fp8_k20 --remats none --variants bf16 fp8 --label fp8_k20 --out "$OUT/fp8_k20.json"
      python3 experiments/bench_fp8.py --shape $SHAPE7 --lisa-layers 2 --batch-size 4 \
          --max-seq-len 1024 --steps 20 --warmup 3 --lisa-interval 5 --remats none \
          --variants fp8 --label fp8_k5 --timeout 240 "${FP8[@]}" --out "$OUT/fp8_k5.json" ;;
    fp8hide)
      for extra in "--prefetch-steps 4" "--prefetch-steps 4 --background-transfers"; do
        fp8_k20 --remats none --variants fp8 --label "fp8_k20 $extra" $extra \
            --out "$OUT/fp8_hide_$(echo $extra | tr -dc 'a-z0-9').json"
      done ;;
    fp8pin)
      for extra in "--prefetch-steps 4" "--prefetch-steps 1"; do
        fp8_k20 --remats none --variants fp8 --label "fp8_k20 pinned $extra" \
            --host-memory pinned $extra --out "$OUT/fp8_pin_$(echo $extra | tr -dc 'a-z0-9').json"
      done ;;
    fp8warm)
      # steady state: every layer's sampled branch run once before timing (its first run's
      # one-time cost is not a resample's), pageable and pinned; and, unwarmed, with CUDA
      # loading every kernel when the program loads (is that one-time cost lazy loading?)
      for extra in "--warm-every-layer" "--warm-every-layer --host-memory pinned" \
                   "--cuda-eager"; do
        local env=() flags=${extra/--cuda-eager/}
        [ "$extra" = "--cuda-eager" ] && env=(CUDA_MODULE_LOADING=EAGER)
        env "${env[@]}" python3 experiments/bench_fp8.py --shape $SHAPE7 --lisa-layers 2 \
            --batch-size 4 --max-seq-len 1024 --steps 60 --warmup 3 --lisa-interval 20 \
            --remats none --variants fp8 --label "fp8_k20 $extra" --timeout 300 $flags \
            "${FP8[@]}" --out "$OUT/fp8_warm_$(echo $extra | tr -dc 'a-z0-9').json"
      done ;;
    fp8gemm)
      for gemm in float32 input; do
        fp8_k20 --remats none --variants fp8 --gemm-out $gemm \
            --label "fp8_k20 gemm-out $gemm" --profile "$OUT/prof" --out "$OUT/fp8_gemm_$gemm.json"
      done
      python3 experiments/trace_breakdown.py "$OUT/prof" --out "$OUT/extra/fp8_breakdown"
      gzip -f "$OUT"/prof/*.hlo.txt && mv "$OUT"/prof/*.hlo.txt.gz "$OUT/extra/"
      rm -rf "$OUT/prof" ;;
    fp8layer)
      python3 experiments/bench_fp8.py --shape $SHAPE7 --num-layers 6 --lisa-layers 2 \
          --batch-size 4 --max-seq-len 1024 --steps 20 --warmup 3 --lisa-interval 20 \
          --remats none --variants fp8 --fp8-copies 1 2 --label "fp8 6 layers" --timeout 200 \
          --profile "$OUT/prof" "${FP8[@]}" --out "$OUT/fp8_6layers.json"
      python3 experiments/trace_breakdown.py "$OUT/prof" --out "$OUT/extra/fp8_layer_breakdown"
      gzip -f "$OUT"/prof/*copies1*.hlo.txt && mv "$OUT"/prof/*copies1*.hlo.txt.gz "$OUT/extra/"
      rm -rf "$OUT/prof" ;;
    fp8tiled)
      fp8_k20 --remats none mlp --variants fp8 --label "fp8_k20 tiled transpose" \
          --out "$OUT/fp8_k20_tiled.json"
      for t in tiled xla; do
        python3 experiments/bench_fp8.py --shape $SHAPE7 --num-layers 6 --lisa-layers 2 \
            --batch-size 4 --max-seq-len 1024 --steps 20 --warmup 3 --lisa-interval 20 \
            --remats none --variants fp8 --transpose $t --label "fp8 6 layers $t" \
            --timeout 200 --profile "$OUT/prof" "${FP8[@]}" --out "$OUT/fp8_6layers_$t.json"
      done
      python3 experiments/trace_breakdown.py "$OUT/prof" --out "$OUT/extra/fp8_transpose_breakdown"
      rm -rf "$OUT/prof" ;;
    fp8two)
      fp8_k20 --remats none mlp --variants fp8 --fp8-copies 2 --label "fp8_k20 two copies" \
          --out "$OUT/fp8_k20_two_copies.json" ;;
    fp8lean)
      phase fp8mlp
      fp8_k20 --remats mlp --variants fp8 --label "fp8_k20 remat mlp --no-overlap" \
          --no-overlap --out "$OUT/fp8_k20_remat_mlp_no_overlap.json" ;;
    fp8mlp)
      fp8_k20 --remats mlp --variants fp8 --label "fp8_k20 remat mlp" \
          --out "$OUT/fp8_k20_remat_mlp.json" ;;
    condfp8)
      fp8_k20 --remats none --variants fp8 --label "fp8_k20 default command buffers" \
          --out "$OUT/fp8_k20_cond_host.json"
      XLA_FLAGS="${XLA_FLAGS:-} $COND_CMDBUF" fp8_k20 --remats none --variants fp8 \
          --label "fp8_k20 conditional command buffers" --out "$OUT/fp8_k20_cond_graph.json" ;;
    fp8res)
      fp8_k20 --remats none --variants fp8 --label "fp8_k20 bf16 residuals" \
          --out "$OUT/fp8_k20_res16.json"
      fp8_k20 --remats none --variants fp8 --residuals fp8 --label "fp8_k20 fp8 residuals" \
          --out "$OUT/fp8_k20_res8.json" ;;
    fp8qkv)
      fp8_k20 --remats qkv --variants fp8 --residuals fp8 \
          --label "fp8_k20 remat qkv fp8 residuals" --out "$OUT/fp8_k20_qkv_res8.json"
      fp8_k20 --remats qkv --variants fp8 --label "fp8_k20 remat qkv" \
          --out "$OUT/fp8_k20_qkv.json" ;;
    fp8fused)
      fp8_six --label "fp8 6 layers fused" --profile "$OUT/prof" --out "$OUT/fp8_6_fused.json"
      python3 experiments/trace_breakdown.py "$OUT/prof" --top 400 \
          --out "$OUT/extra/fp8_fused_kernels"
      gzip -f "$OUT"/prof/*.hlo.txt && mv "$OUT"/prof/*.hlo.txt.gz "$OUT/extra/"
      rm -rf "$OUT/prof"
      fp8_six --label "fp8 6 layers fused, xla kernels" --mlp-kernels xla \
          --out "$OUT/extra/fp8_6_fused_xla.json"
      fp8_six --label "fp8 6 layers stages" --mlp stages --out "$OUT/extra/fp8_6_stages.json"
      fp8_k20 --remats none --variants fp8 --label "fp8_k20 fused mlp" \
          --out "$OUT/fp8_k20_fused.json" ;;
    fp8kern)
      fp8_six --label "fp8 6 layers" --profile "$OUT/prof" --out "$OUT/fp8_6layers.json"
      python3 experiments/trace_breakdown.py "$OUT/prof" --top 400 --out "$OUT/extra/fp8_kernels"
      gzip -f "$OUT"/prof/*.hlo.txt && mv "$OUT"/prof/*.hlo.txt.gz "$OUT/extra/"
      rm -rf "$OUT/prof"
      for flag in ${FUSION_FLAGS:-}; do
        XLA_FLAGS="${XLA_FLAGS:-} $flag" fp8_six --label "fp8 6 layers $flag" \
            --out "$OUT/extra/fp8_6layers_$(echo ${flag#--xla_gpu_} | tr -dc 'a-z0-9_').json"
      done ;;
    cond16)
      python3 $B --shape $SHAPE7 "${OURS[@]}" --methods lisa --lisa-layers 2 --remats none \
          --label "bf16 default command buffers" --out "$OUT/cond16_host.json"
      XLA_FLAGS="${XLA_FLAGS:-} $COND_CMDBUF" python3 $B --shape $SHAPE7 "${OURS[@]}" \
          --methods lisa --lisa-layers 2 --remats none \
          --label "bf16 conditional command buffers" --out "$OUT/cond16_graph.json" ;;
    fp8prof)
      for remat in none qkv; do
        fp8_k20 --remats $remat --variants fp8 --residuals fp8 \
            --label "fp8_k20 remat $remat fp8 residuals, profiled" --profile "$OUT/prof" \
            --out "$OUT/fp8_k20_prof_$remat.json"
      done
      python3 experiments/trace_breakdown.py "$OUT/prof" --top 400 \
          --out "$OUT/extra/fp8_step_kernels"
      rm -rf "$OUT/prof" ;;
    fp8launch)
      python3 experiments/bench_fp8_mlp.py --rows 1 2 --blocks 1024 --warps 4 8 \
          --programs ${PROGRAMS:-0 1024 512 256} --stages ${STAGES:-1} \
          --out "$OUT/extra/fp8_mlp_kernels_programs.json"
      local best
      best=$(python3 -c "import json, sys; rows = json.load(open(sys.argv[1]))['rows']
fastest = lambda k: min((r for r in rows if r['kernel'] == k and r['impl'] == 'pallas'
                         and 'us' in r), key=lambda r: r['us'])
print(*(fastest(k)[f] for k in ('gate_quantize, fp8 products',
      'gate_grad_quantize, fp8 products') for f in ('rows', 'block', 'warps', 'programs',
                                               'stages')))" \
          "$OUT/extra/fp8_mlp_kernels_programs.json")
      echo "fastest launch shapes (fp8 products): $best"
      fp8_k20 --remats none --variants fp8 --residuals fp8 \
          --label "fp8_k20 fp8 residuals, default launch" --out "$OUT/fp8_k20_launch_default.json"
      # shellcheck disable=SC2086
      fp8_k20 --remats none --variants fp8 --residuals fp8 --mlp-launch $best \
          --label "fp8_k20 fp8 residuals, launch $best" --out "$OUT/fp8_k20_launch_best.json" ;;
    fp8six)
      fp8_six --residuals fp8 --label "fp8 6 layers fp8 residuals" --profile "$OUT/prof" \
          --out "$OUT/fp8_6_res8.json"
      python3 experiments/trace_breakdown.py "$OUT/prof" --top 400 --out "$OUT/extra/fp8_six_kernels"
      gzip -f "$OUT"/prof/*.hlo.txt && mv "$OUT"/prof/*.hlo.txt.gz "$OUT/extra/"
      rm -rf "$OUT/prof" ;;
    fp8sync)
      for remat in qkv none; do
        fp8_k20 --remats $remat --variants fp8 --residuals fp8 --no-overlap \
            --label "fp8_k20 remat $remat fp8 residuals --no-overlap" \
            --out "$OUT/fp8_k20_sync_$remat.json"
      done ;;
    fp8wide)
      fp8_k20 --remats none --variants fp8 --residuals fp8 \
          --label "fp8_k20 remat none fp8 residuals" --out "$OUT/fp8_k20_wide_fp8.json"
      for res in fp8_qkv fp8_all; do
        fp8_k20 --remats none --variants fp8 --residuals $res --nu-dtype bfloat16 \
            --label "fp8_k20 remat none $res residuals, bf16 nu" \
            --out "$OUT/fp8_k20_wide_$res.json"
      done
      python3 $B --shape $SHAPE7 "${OURS[@]}" --methods lisa --lisa-layers 2 --remats none \
          --nu-dtype bfloat16 --label "bf16 nu" --out "$OUT/lisa7b_nu_bf16.json" ;;
    fp8scale)
      for scales in head token; do
        fp8_k20 --remats none --variants fp8 --residuals fp8_all --nu-dtype bfloat16 \
            --qkv-scales $scales --label "fp8_k20 remat none fp8_all, bf16 nu, qkv per $scales" \
            --out "$OUT/fp8_k20_scale_$scales.json"
      done ;;
    fp8full)
      # the peer's LISA gamma=2 rows without and with remat, and the fp8 row with --remat full
      # over whole K=20 periods
      python3 $B --shape $SHAPE7 "${OURS[@]}" --peer-only "${PEER[@]}" --peer-methods lisa \
          --peer-lisa-layers 2 --peer-remat --peer-remat-methods lisa --label speed \
          --out "$OUT/peer7b_remat.json"
      fp8_k20 --remats full --variants fp8 --label "fp8_k20 remat full" \
          --out "$OUT/fp8_k20_remat_full.json" ;;
    fp8_8b)
      python3 $B --shape $SHAPE8 "${OURS[@]}" --peer-only "${PEER[@]}" --peer-methods lisa \
          --peer-lisa-layers 2 --label speed --out "$OUT/peer8b.json"
      fp8_k20 --shape $SHAPE8 --remats none --variants fp8 --label fp8_k20 \
          --out "$OUT/fp8_k20_8b.json" ;;
    module)
      python3 $B --shape $SHAPE7 "${OURS[@]}" --methods lisa --lisa-layers 2 --remats none \
          --lisa-granularity matrix --label module --out "$OUT/module_matrix.json"
      python3 $B --shape $SHAPE7 "${OURS[@]}" --methods lisa --lisa-layers 2 --remats none \
          --lisa-granularity attn_mlp --label module --out "$OUT/module_attn_mlp.json" ;;
    frozen8b)
      python3 $B --shape $SHAPE8 "${OURS[@]}" --methods lisa --lisa-layers 2 --remats none \
          --label embed_trained --out "$OUT/frozen8b_trained.json"
      python3 $B --shape $SHAPE8 "${OURS[@]}" --methods lisa --lisa-layers 2 --remats none \
          --lisa-frozen embed --label embed_frozen --out "$OUT/frozen8b_frozen.json" ;;
    packing)
      python3 experiments/packing_speed.py --shape $SHAPE7 --lisa-layers 2 --batch-size 8 \
          --max-seq-len 1024 --dtype bfloat16 --steps 20 --timeout 240 \
          --out "$OUT/extra/packing_speed.json" ;;
    *) echo "unknown phase $1"; return 2 ;;
  esac
  echo "== $1 took $((SECONDS - t0)) s"
}
{
  nvidia-smi -L
  for p in "${@:-table}"; do phase "$p"; done
} 2>&1 | tee -a "$OUT/log.txt"
