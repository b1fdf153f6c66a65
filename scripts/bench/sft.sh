#!/usr/bin/env bash
# SFT benchmark (docs/BENCHMARKS.md, "SFT"): step time and peak memory of LoRA SFT steps on a
# KoGPT2-shaped GPT-2 (builtin:kogpt2-shape, 125M, vocab 51,200, random weights), f32 on CPU,
# lorafit next to PyTorch + PEFT, measured in the same run on the same machine, plus the
# machine's GEMM throughput (candle and torch) to say how close to the matmul floor a step runs.
#
#   scripts/bench/sft.sh          # ~15 minutes on a busy 2-core box
#
# Configurations: LoRA r=8 on c_attn, and on c_attn,c_proj,c_fc (all linear layers), batch 4 x 128
# and 1 x 512 tokens; and, with activation checkpointing in both tools, the c_attn ones
# (GC_CONFIGS). Each configuration runs in a fresh process per tool (so each peak RSS is that
# configuration's), the two tools interleaved with alternating order, ROUNDS times (checkpointing
# rows: the first GC_ROUNDS rounds); each process does 1 warm-up step + STEPS timed steps.
#   lorafit: lorafit bench sft --model builtin:kogpt2-shape --batch B --seq T --steps STEPS
#            --targets ... [--grad-checkpointing] --json
#   PEFT:    scripts/bench/peft_sft.py --model <the same folder> --batch B --seq T --steps STEPS
#            --targets ... [--grad-checkpointing] --threads 2
# Environment: ROUNDS (2), STEPS (3), GC_ROUNDS (1), and those of scripts/bench/common.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
BENCH=sft
ROUNDS=${ROUNDS:-2}
STEPS=${STEPS:-3}
GC_ROUNDS=${GC_ROUNDS:-1}
source scripts/bench/common.sh

CONFIGS=("c_attn 4 128" "c_attn 1 512" "c_attn,c_proj,c_fc 4 128" "c_attn,c_proj,c_fc 1 512")
GC_CONFIGS=("c_attn 4 128" "c_attn 1 512")

one() { # round tool targets batch seq gc
  local round=$1 tool=$2 targets=$3 batch=$4 seq=$5 gc=$6 flag=()
  [[ $gc == 1 ]] && flag=(--grad-checkpointing)
  local cfg
  cfg=$(printf '{"kind": "sft", "targets": "%s", "batch": %d, "seq": %d, "gc": %s}' "$targets" "$batch" "$seq" "$([[ $gc == 1 ]] && echo true || echo false)")
  if [[ $tool == lorafit ]]; then
    record "$round" lorafit "$cfg" -- "$LORAFIT" bench sft --model "$MODEL" --batch "$batch" --seq "$seq" \
      --steps "$STEPS" --targets "$targets" --r 8 "${flag[@]}" --json
  else
    record "$round" peft "$cfg" -- "$PYTHON" scripts/bench/peft_sft.py --model "$DIR" --batch "$batch" --seq "$seq" \
      --steps "$STEPS" --targets "$targets" --r 8 "${flag[@]}" --threads "$THREADS" --attn "$ATTN"
  fi
}

n=0
for round in $(seq 1 "$ROUNDS"); do
  gemm_round "$round"
  runs=()
  for c in "${CONFIGS[@]}"; do runs+=("$c 0"); done
  if (( round <= GC_ROUNDS )); then for c in "${GC_CONFIGS[@]}"; do runs+=("$c 1"); done; fi
  for r in "${runs[@]}"; do
    read -r targets batch seq gc <<<"$r"
    # Alternate which tool goes first so drifting background load hits both alike.
    if (( (round + n) % 2 == 0 )); then order="lorafit peft"; else order="peft lorafit"; fi
    n=$((n + 1))
    for tool in $order; do one "$round" "$tool" "$targets" "$batch" "$seq" "$gc"; done
  done
done

CMD="scripts/bench/sft.sh"
[[ $ROUNDS != 2 || $STEPS != 3 || $GC_ROUNDS != 1 || $THREADS != 2 || $ATTN != sdpa ]] && CMD="ROUNDS=$ROUNDS STEPS=$STEPS GC_ROUNDS=$GC_ROUNDS THREADS=$THREADS ATTN=$ATTN $CMD"
[[ -n "${LORAFIT_BIN:-}" ]] && CMD="LORAFIT_BIN=$LORAFIT_BIN $CMD"
summarize sft "$CMD"
