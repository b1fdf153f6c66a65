#!/usr/bin/env bash
# Where an SFT step's time goes, lorafit and PyTorch + PEFT side by side (docs/BENCHMARKS.md,
# "Where a step's time goes, side by side (issue 17)"):
#   lorafit bench sft --profile --json            (src/prof.rs: our ops' scopes, getrusage per phase)
#   scripts/bench/torch_profile_sft.py --json     (torch.profiler on peft_sft.py's step, same kinds)
# back to back on the same configuration, each after its own unprofiled timed steps and its own GEMM
# peak (same shape), then one Markdown table: per phase and op kind, lorafit ms | PEFT ms | ratio,
# and each kind's GFLOP/s as a share of its tool's GEMM peak; with the CPU (lscpu model, family,
# SIMD flags) and the load average before each run.
#
#   scripts/bench/profile_sft.sh [--batch 4] [--seq 128] [--targets c_attn] [--steps 3]
#   scripts/bench/profile_sft.sh --batch 1 --seq 512 --targets c_attn,c_proj,c_fc
#
# Environment: as scripts/bench/common.sh (THREADS 2, PYTHON, MODEL builtin:kogpt2-shape,
# LORAFIT_BIN, LORAFIT_CACHE, OUT_DIR target/bench). torch runs with OMP_WAIT_POLICY=PASSIVE.
set -euo pipefail
cd "$(dirname "$0")/../.."
BATCH=4 SEQ=128 TARGETS=c_attn STEPS=3
while [[ $# -gt 0 ]]; do
  case $1 in
    --batch) BATCH=$2; shift 2 ;;
    --seq) SEQ=$2; shift 2 ;;
    --targets) TARGETS=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    *) echo "unknown flag $1 (expected --batch, --seq, --targets, --steps)" >&2; exit 2 ;;
  esac
done
BENCH=profile-sft
source scripts/bench/common.sh

LF_OUT="$OUT_DIR/$BENCH-$STAMP-lorafit.json"
PT_OUT="$OUT_DIR/$BENCH-$STAMP-peft.json"
ERR="$OUT_DIR/$BENCH-$STAMP.stderr"
LF_CMD=("$LORAFIT" bench sft --model "$MODEL" --batch "$BATCH" --seq "$SEQ" --targets "$TARGETS" --steps "$STEPS" --profile --json)
PT_CMD=("$PYTHON" scripts/bench/torch_profile_sft.py --model "$DIR" --batch "$BATCH" --seq "$SEQ" --targets "$TARGETS" --steps "$STEPS" --threads "$THREADS" --attn "$ATTN" --json)

LOAD_LF=$(cut -d' ' -f1-3 /proc/loadavg)
log "lorafit: ${LF_CMD[*]} (load $LOAD_LF)"
"${LF_CMD[@]}" 2>>"$ERR" | grep '^{' | tail -n1 >"$LF_OUT"
LOAD_PT=$(cut -d' ' -f1-3 /proc/loadavg)
log "peft: ${PT_CMD[*]} (load $LOAD_PT)"
OMP_WAIT_POLICY=PASSIVE "${PT_CMD[@]}" 2>>"$ERR" | grep '^{' | tail -n1 >"$PT_OUT"

CPU_MODEL=$(lscpu | sed -n 's/^Model name: *//p' | head -n1)
CPU_FAMILY=$(lscpu | sed -n 's/^CPU family: *//p' | head -n1)
CPU_FLAGS=$(lscpu | sed -n 's/^Flags: *//p' | tr ' ' '\n' | grep -E '^(avx|avx2|fma|avx512f|avx512_bf16|avx512_vnni|amx_tile|amx_bf16)$' | tr '\n' ' ' | sed 's/ $//')
MACHINE="Machine: $CPU_MODEL (family $CPU_FAMILY; $(nproc) CPUs visible; SIMD flags: $CPU_FLAGS), $THREADS threads per tool; $(date -u '+%Y-%m-%d %H:%M UTC'); lorafit $GIT_DESC, $("$PYTHON" -c 'import torch, peft; print(f"torch {torch.__version__}, peft {peft.__version__}")')."
"$PYTHON" scripts/bench/summarize_profile.py "$LF_OUT" "$PT_OUT" \
  --command "scripts/bench/profile_sft.sh --batch $BATCH --seq $SEQ --targets $TARGETS --steps $STEPS" \
  --config "$MODEL, $BATCH x $SEQ, LoRA r 8 on $TARGETS, f32 CPU" \
  --machine "$MACHINE" --load-lorafit "$LOAD_LF" --load-peft "$LOAD_PT" | tee "$MD"
log "raw: $LF_OUT $PT_OUT; table: $MD; stderr: $ERR"
