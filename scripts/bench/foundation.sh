#!/usr/bin/env bash
# Foundation benchmark (docs/BENCHMARKS.md): load time, peak memory and greedy generation speed of
# a KoGPT2-shaped GPT-2 (builtin:kogpt2-shape: 12 layers x 768, vocab 51,200, random weights) on
# CPU, lorafit next to transformers, measured in the same run on the same machine.
#
#   scripts/bench/foundation.sh            # ~8-12 minutes on a 2-core box
#
# Every configuration (dtype f32|bf16 x batch 1|8, 16 prompt tokens, 64 new tokens) runs in a
# fresh process per tool (so each peak RSS is that configuration's), the two tools interleaved
# (the order alternates), ROUNDS times; each process reports the median of REPEATS generate calls.
# The table shows medians over rounds [min-max] and the ratio lorafit / transformers.
#
# Environment: ROUNDS (3), REPEATS (3), THREADS (2), PYTHON (/root/venv-ref/bin/python, needs
# torch + transformers, see scripts/fixtures/requirements.txt), ATTN (sdpa|eager, transformers'
# attention; default sdpa), LORAFIT_CACHE (where the builtin model is written), OUT_DIR
# (target/bench), LORAFIT_BIN (use this lorafit binary instead of building this checkout). Raw JSON lines and the Markdown go to $OUT_DIR/foundation-<utc time>.{jsonl,md}.
set -euo pipefail
cd "$(dirname "$0")/../.."

BENCH=foundation
ROUNDS=${ROUNDS:-3}
REPEATS=${REPEATS:-3}
PROMPT_LEN=16
NEW_TOKENS=64
MODEL=builtin:kogpt2-shape
source scripts/bench/common.sh

run_one() { # tool dtype batch round -> appends one JSON line to $RAW
  local tool=$1 dtype=$2 batch=$3 round=$4 out rc=0 load0 t0 t1
  load0=$(cut -d' ' -f1 /proc/loadavg)
  t0=$(date +%s.%N)
  if [[ $tool == lorafit ]]; then
    out=$(timeout 600 "$LORAFIT" bench generate --model "$MODEL" --dtype "$dtype" --batch "$batch" \
      --prompt-len $PROMPT_LEN --new-tokens $NEW_TOKENS --repeats "$REPEATS" --json 2>/dev/null | tail -n1) || rc=$?
  else
    out=$(timeout 600 "$PYTHON" scripts/bench/hf_generate.py --model "$DIR" --dtype "$dtype" --batch "$batch" \
      --prompt-len $PROMPT_LEN --new-tokens $NEW_TOKENS --repeats "$REPEATS" --attn "$ATTN" \
      --threads "$THREADS" 2>/dev/null | tail -n1) || rc=$?
  fi
  t1=$(date +%s.%N)
  [[ $rc == 0 && $out == "{"* ]] || out=null
  printf '{"round": %d, "tool": "%s", "dtype": "%s", "batch": %d, "rc": %d, "loadavg_before": %s, "wall_s": %s, "result": %s}\n' \
    "$round" "$tool" "$dtype" "$batch" "$rc" "$load0" "$(awk "BEGIN{printf \"%.2f\", $t1 - $t0}")" "$out" >>"$RAW"
  log "round $round $tool $dtype batch $batch: rc $rc, $(awk "BEGIN{printf \"%.1f\", $t1 - $t0}") s"
}

n=0
for round in $(seq 1 "$ROUNDS"); do
  for dtype in f32 bf16; do
    for batch in 1 8; do
      # Alternate which tool goes first so drifting background load hits both alike.
      if (( (round + n) % 2 == 0 )); then order="lorafit transformers"; else order="transformers lorafit"; fi
      n=$((n + 1))
      for tool in $order; do run_one "$tool" "$dtype" "$batch" "$round"; done
    done
  done
done

T_END=$(date +%s)
CMD="scripts/bench/foundation.sh"
[[ $ROUNDS != 3 || $REPEATS != 3 || $THREADS != 2 || $ATTN != sdpa ]] && CMD="ROUNDS=$ROUNDS REPEATS=$REPEATS THREADS=$THREADS ATTN=$ATTN $CMD"
[[ -n "${LORAFIT_BIN:-}" ]] && CMD="LORAFIT_BIN=$LORAFIT_BIN $CMD"
"$PYTHON" scripts/bench/summarize.py "$RAW" --command "$CMD" --attn "$ATTN" --threads "$THREADS" \
  --elapsed-s $((T_END - T_START)) --lorafit-version "$("$LORAFIT" --version)" \
  --git "$GIT_DESC" \
  --rustc "$(rustc --version)" --candle "$(grep -A1 '^name = "candle-core"' Cargo.lock | sed -n 's/version = "\(.*\)"/\1/p')" \
  | tee "$MD"
log "raw results: $RAW; table: $MD"
