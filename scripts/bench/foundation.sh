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

ROUNDS=${ROUNDS:-3}
REPEATS=${REPEATS:-3}
THREADS=${THREADS:-2}
PYTHON=${PYTHON:-/root/venv-ref/bin/python}
ATTN=${ATTN:-sdpa}
OUT_DIR=${OUT_DIR:-target/bench}
PROMPT_LEN=16
NEW_TOKENS=64
MODEL=builtin:kogpt2-shape
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT_DIR"
RAW="$OUT_DIR/foundation-$STAMP.jsonl"
MD="$OUT_DIR/foundation-$STAMP.md"
: >"$RAW"

log() { echo "[foundation] $*" >&2; }

export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
T_START=$(date +%s)

# The commit the measured lorafit was built from (+dirty: with uncommitted changes), taken now.
GIT_DESC="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo +dirty)"
if [[ -n "${LORAFIT_BIN:-}" ]]; then
  LORAFIT=$LORAFIT_BIN # e.g. a build of another checkout, to compare against the same reference
  GIT_DESC="not this checkout: $LORAFIT_BIN"
else
  log "building lorafit (release)"
  cargo build --release --quiet
  LORAFIT=target/release/lorafit
fi

# Write the builtin model once (outside any timed process), then find its folder as lorafit does.
log "materialising $MODEL"
"$LORAFIT" bench generate --model "$MODEL" --new-tokens 1 --repeats 1 --json >/dev/null
if [[ -n "${LORAFIT_CACHE:-}" ]]; then CACHE=$LORAFIT_CACHE
elif [[ -n "${XDG_CACHE_HOME:-}" ]]; then CACHE=$XDG_CACHE_HOME/lorafit
else CACHE=$HOME/.cache/lorafit; fi
DIR=$CACHE/builtin/kogpt2-shape-v1
[[ -f $DIR/model.safetensors ]] || { echo "no model at $DIR" >&2; exit 1; }
# Both tools then read the weights from a warm page cache: load time is parse + copy, not disk.
cat "$DIR/model.safetensors" >/dev/null
"$PYTHON" -c 'import torch, transformers' || { echo "$PYTHON cannot import torch + transformers" >&2; exit 1; }

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
