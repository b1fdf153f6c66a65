#!/usr/bin/env bash
# Reward-model benchmark (docs/BENCHMARKS.md, "Reward model"): step time and peak memory of
# reward-model steps on a KoGPT2-shaped GPT-2 (builtin:kogpt2-shape, random weights), 4 pairs
# (4 chosen + 4 rejected sequences of 128 random tokens in one batch), LoRA r=8 on c_attn + the
# scalar head, f32 on CPU, lorafit next to PyTorch + PEFT in the same run on the same machine.
#
#   scripts/bench/rm.sh           # ~6 minutes on a busy 2-core box
#
# Each tool runs in a fresh process per round (so each peak RSS is that run's alone), the two
# interleaved with alternating order, ROUNDS times; each process does 1 warm-up + STEPS timed steps.
#   lorafit: lorafit bench rm --model builtin:kogpt2-shape --batch 4 --seq 128 --steps STEPS
#            --targets c_attn --json                       (--batch counts pairs)
#   PEFT:    scripts/bench/peft_rm.py --model <the same folder> --pairs 4 --seq 128 --steps STEPS
#            --targets c_attn --threads 2
# Each round also measures the GEMM throughput of both libraries (as sft.sh). With GC=1, a second configuration with activation checkpointing in both tools.
# Environment: ROUNDS (3), STEPS (3), GC (0), and those of scripts/bench/common.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
BENCH=rm
ROUNDS=${ROUNDS:-3}
STEPS=${STEPS:-3}
GC=${GC:-0}
PAIRS=4
SEQ=128
source scripts/bench/common.sh

one() { # round tool gc
  local round=$1 tool=$2 gc=$3 flag=()
  [[ $gc == 1 ]] && flag=(--grad-checkpointing)
  local cfg
  cfg=$(printf '{"kind": "rm", "targets": "c_attn", "pairs": %d, "seq": %d, "gc": %s}' $PAIRS $SEQ "$([[ $gc == 1 ]] && echo true || echo false)")
  if [[ $tool == lorafit ]]; then
    record "$round" lorafit "$cfg" -- "$LORAFIT" bench rm --model "$MODEL" --batch $PAIRS --seq $SEQ \
      --steps "$STEPS" --targets c_attn --r 8 "${flag[@]}" --json
  else
    record "$round" peft "$cfg" -- "$PYTHON" scripts/bench/peft_rm.py --model "$DIR" --pairs $PAIRS --seq $SEQ \
      --steps "$STEPS" --targets c_attn --r 8 "${flag[@]}" --threads "$THREADS" --attn "$ATTN"
  fi
}

n=0
for round in $(seq 1 "$ROUNDS"); do
  gemm_round "$round"
  gcs=(0)
  [[ $GC == 1 ]] && gcs+=(1)
  for gc in "${gcs[@]}"; do
    if (( (round + n) % 2 == 0 )); then order="lorafit peft"; else order="peft lorafit"; fi
    n=$((n + 1))
    for tool in $order; do one "$round" "$tool" "$gc"; done
  done
done

CMD="scripts/bench/rm.sh"
[[ $ROUNDS != 3 || $STEPS != 3 || $GC != 0 || $THREADS != 2 || $ATTN != sdpa ]] && CMD="ROUNDS=$ROUNDS STEPS=$STEPS GC=$GC THREADS=$THREADS ATTN=$ATTN $CMD"
[[ -n "${LORAFIT_BIN:-}" ]] && CMD="LORAFIT_BIN=$LORAFIT_BIN $CMD"
summarize rm "$CMD"
