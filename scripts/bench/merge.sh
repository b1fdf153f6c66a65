#!/usr/bin/env bash
# Merge benchmark (docs/BENCHMARKS.md): time and peak memory of folding a rank-8 LoRA adapter
# into a KoGPT2-shaped GPT-2 (builtin:kogpt2-shape, f32 safetensors) and writing it as f16,
# `lorafit merge` next to PEFT's merge_and_unload + save_pretrained, in the same run on the same
# machine; then checks that the two merged models agree.
#
#   scripts/bench/merge.sh            # ~1 minute on a quiet 2-core box; prints the Markdown section
#
# One adapter (scripts/bench/merge_check.py adapter: PEFT's get_peft_model + save_pretrained, r 8,
# alpha 16, c_attn, c_proj, c_fc, seeded, lora_B randomised) is read by both tools. Each merge runs
# in a fresh process under /usr/bin/time (wall time, max RSS), the two tools interleaved (the order
# alternates) ROUNDS times, each output folder removed and `sync` run before each process:
#
#   lorafit: lorafit merge --model DIR --adapter ADAPTER --out OUT --dtype f16 --force
#   PEFT:    scripts/bench/peft_merge.py --model DIR --adapter ADAPTER --out OUT --threads THREADS
#
# Each round also runs `lorafit --version` under /usr/bin/time: lorafit's RSS before any work.
# After the rounds, merge_check.py compare reads both outputs of the last round against a
# float64 merge of the base and the adapter.
#
# Environment: ROUNDS (3), THREADS (2), PYTHON (/root/venv-ref/bin/python, needs torch +
# transformers + peft, see scripts/fixtures/requirements.txt), LORAFIT_CACHE (where the builtin
# model is written), OUT_DIR (target/bench), LORAFIT_BIN (use this lorafit binary instead of
# building this checkout; LORAFIT_GIT describes it). Raw JSON lines and the Markdown go to
# $OUT_DIR/merge-<utc time>.{jsonl,md}; the adapter and the outputs to $OUT_DIR/merge-work/.
set -euo pipefail
cd "$(dirname "$0")/../.."

BENCH=merge
ROUNDS=${ROUNDS:-3}
source scripts/bench/common.sh
ERR="$OUT_DIR/$BENCH-$STAMP.stderr"
WORK="$OUT_DIR/merge-work"

log "making the adapter"
mkdir -p "$WORK"
ADAPTER=$WORK/adapter
rm -rf "$ADAPTER"
ADAPTER_INFO=$("$PYTHON" scripts/bench/merge_check.py adapter --model "$DIR" --out "$ADAPTER" --r 8 --alpha 16 --seed 0 2>>"$ERR" | tail -n1)
# Both tools read the base and the adapter from a warm page cache: the time is parse, merge,
# cast and write, not reading the disk.
cat "$DIR/model.safetensors" "$ADAPTER"/* >/dev/null

# run_one TOOL ROUND: one merge in a fresh process; appends one JSON line to $RAW.
run_one() {
  local tool=$1 round=$2 out=$WORK/out-$1 rc=0 load0 res tf=$WORK/time.txt of=$WORK/stdout.txt
  rm -rf "$out" "$tf" "$of"
  sync
  load0=$(cut -d' ' -f1 /proc/loadavg)
  if [[ $tool == lorafit ]]; then
    /usr/bin/time -f '%e %M' -o "$tf" timeout 600 "$LORAFIT" merge --model "$DIR" --adapter "$ADAPTER" --out "$out" \
      --dtype f16 --force >"$of" 2>>"$ERR" || rc=$?
  else
    /usr/bin/time -f '%e %M' -o "$tf" timeout 600 "$PYTHON" scripts/bench/peft_merge.py --model "$DIR" --adapter "$ADAPTER" \
      --out "$out" --threads "$THREADS" >"$of" 2>>"$ERR" || rc=$?
  fi
  res=$(jq -c . "$of" 2>/dev/null | tail -n1) || true
  [[ $rc == 0 && $res == "{"* ]] || res=null
  read -r wall kib < <(tail -n1 "$tf")
  printf '{"round": %d, "tool": "%s", "rc": %d, "loadavg_before": %s, "wall_s": %s, "maxrss_bytes": %d, "result": %s}\n' \
    "$round" "$tool" "$rc" "$load0" "$wall" $((kib * 1024)) "$res" >>"$RAW"
  log "round $round $tool: rc $rc, $wall s, max RSS $((kib / 1024)) MiB"
}

for round in $(seq 1 "$ROUNDS"); do
  /usr/bin/time -f '%M' -o "$WORK/time.txt" "$LORAFIT" --version >/dev/null
  printf '{"round": %d, "tool": "lorafit-version", "rc": 0, "maxrss_bytes": %d}\n' "$round" $(($(tail -n1 "$WORK/time.txt") * 1024)) >>"$RAW"
  if (( round % 2 == 1 )); then order="lorafit peft"; else order="peft lorafit"; fi
  for tool in $order; do run_one "$tool" "$round"; done
done

log "comparing the outputs of round $ROUNDS"
CHECK=$("$PYTHON" scripts/bench/merge_check.py compare --model "$DIR" --adapter "$ADAPTER" \
  --lorafit "$WORK/out-lorafit" --peft "$WORK/out-peft" 2>>"$ERR" | tail -n1)
printf '{"tool": "check", "adapter": %s, "result": %s}\n' "${ADAPTER_INFO:-null}" "${CHECK:-null}" >>"$RAW"

CMD="scripts/bench/merge.sh"
[[ $ROUNDS != 3 || $THREADS != 2 ]] && CMD="ROUNDS=$ROUNDS THREADS=$THREADS $CMD"
[[ -n "${LORAFIT_BIN:-}" ]] && CMD="LORAFIT_BIN=$LORAFIT_BIN $CMD"
"$PYTHON" scripts/bench/summarize_merge.py "$RAW" --command "$CMD" --threads "$THREADS" \
  --elapsed-s $(($(date +%s) - T_START)) --lorafit-version "$("$LORAFIT" --version)" --git "$GIT_DESC" \
  --rustc "$(rustc --version)" \
  --candle "$(grep -A1 '^name = "candle-core"' Cargo.lock | sed -n 's/version = "\(.*\)"/\1/p')" | tee "$MD"
log "raw results: $RAW; table: $MD"
