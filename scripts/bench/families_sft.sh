#!/usr/bin/env bash
# Model-family SFT benchmark (docs/BENCHMARKS.md, "Model families"): one LoRA SFT step of a
# Llama-3.2-1B-shaped model (vocab 128,256, hidden 2,048, 16 layers, 32 / 8 heads, tied) and a
# Qwen3-0.6B-shaped one (vocab 151,936, 28 layers, q/k norms, tied), random f32 weights
# (scripts/bench/make_family_model.py), batch 1 x 512, LoRA r=16 on all linear layers, CPU:
# lorafit next to PyTorch + PEFT in the same run, each configuration in a fresh process per tool,
# the tools interleaved with alternating order, ROUNDS times; 1 warm-up + STEPS timed steps each.
#   lorafit: lorafit bench sft --model DIR --batch 1 --seq 512 --steps STEPS --targets all-linear --r 16 --json
#   PEFT:    scripts/bench/peft_sft_family.py --model DIR --batch 1 --seq 512 --steps STEPS --targets all-linear --r 16
#
#   scripts/bench/families_sft.sh        # ~30 min on 2 cores; needs ~12 GB RAM and 8 GB of disk
#
# Environment: ROUNDS (2), STEPS (2), SHAPES ("llama-3.2-1b qwen3-0.6b"), MODES ("plain"; add
# "checkpointing" for both tools with activation checkpointing: lorafit --grad-checkpointing, PEFT
# gradient_checkpointing_enable), FAMILY_DIR (where the
# model folders are written, default $OUT_DIR/family-models), and those of scripts/bench/common.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
BENCH=families
ROUNDS=${ROUNDS:-2}
STEPS=${STEPS:-2}
SHAPES=${SHAPES:-"llama-3.2-1b qwen3-0.6b"}
MODES=${MODES:-plain}
MODEL=builtin:tiny-gpt2 # common.sh writes a builtin; the shapes below are folders of their own
source scripts/bench/common.sh
FAMILY_DIR=${FAMILY_DIR:-$OUT_DIR/family-models}
B=1 T=512 R=16 TARGETS=all-linear

for shape in $SHAPES; do
  log "writing the $shape-shaped folder (once)"
  "$PYTHON" scripts/bench/make_family_model.py --shape "$shape" --out "$FAMILY_DIR/$shape"
  cat "$FAMILY_DIR/$shape"/*.safetensors >/dev/null # both tools read from a warm page cache
done

n=0
for round in $(seq 1 "$ROUNDS"); do
  for shape in $SHAPES; do
    for mode in $MODES; do
      dir=$FAMILY_DIR/$shape
      ckpt=(); ck=false
      [[ $mode == checkpointing ]] && { ckpt=(--grad-checkpointing); ck=true; }
      cfg=$(printf '{"kind": "sft", "shape": "%s", "targets": "%s", "batch": %d, "seq": %d, "r": %d, "grad_checkpointing": %s}' "$shape" "$TARGETS" "$B" "$T" "$R" "$ck")
      if (( (round + n) % 2 == 0 )); then order="lorafit peft"; else order="peft lorafit"; fi
      n=$((n + 1))
      for tool in $order; do
        if [[ $tool == lorafit ]]; then
          record "$round" lorafit "$cfg" -- "$LORAFIT" bench sft --model "$dir" --batch "$B" --seq "$T" --steps "$STEPS" \
            --targets "$TARGETS" --r "$R" "${ckpt[@]}" --json
        else
          record "$round" peft "$cfg" -- "$PYTHON" scripts/bench/peft_sft_family.py --model "$dir" --batch "$B" --seq "$T" \
            --steps "$STEPS" --targets "$TARGETS" --r "$R" --threads "$THREADS" --attn "$ATTN" "${ckpt[@]}"
        fi
      done
    done
  done
done

CMD="scripts/bench/families_sft.sh"
[[ $ROUNDS != 2 || $STEPS != 2 || $THREADS != 2 || $ATTN != sdpa ]] && CMD="ROUNDS=$ROUNDS STEPS=$STEPS THREADS=$THREADS ATTN=$ATTN $CMD"
[[ $MODES != plain ]] && CMD="MODES=\"$MODES\" $CMD"
[[ $SHAPES != "llama-3.2-1b qwen3-0.6b" ]] && CMD="SHAPES=\"$SHAPES\" $CMD"
"$PYTHON" scripts/bench/summarize_families.py "$RAW" --command "$CMD" --threads "$THREADS" --attn "$ATTN" \
  --elapsed-s $(($(date +%s) - T_START)) --lorafit-version "$("$LORAFIT" --version)" --git "$GIT_DESC" \
  --rustc "$(rustc --version)" --candle "$(grep -A1 '^name = "candle-core"' Cargo.lock | sed -n 's/version = "\(.*\)"/\1/p')" | tee "$MD"
log "raw results: $RAW; table: $MD"
