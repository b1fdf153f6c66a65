# Shared by scripts/bench/{foundation,sft,rm,ppo,merge}.sh (sourced, not run): settings, the lorafit binary, the
# builtin model's folder, and one-JSON-line-per-process recording. See docs/BENCHMARKS.md.
#
# Environment: ROUNDS, THREADS (2), PYTHON (/root/venv-ref/bin/python: torch + transformers + peft,
# see scripts/fixtures/requirements.txt), ATTN (sdpa|eager, transformers' attention; default sdpa),
# LORAFIT_CACHE (where the builtin model is written), OUT_DIR (target/bench), LORAFIT_BIN (use this
# lorafit binary instead of building this checkout; LORAFIT_GIT describes it in the table).

THREADS=${THREADS:-2}
PYTHON=${PYTHON:-/root/venv-ref/bin/python}
ATTN=${ATTN:-sdpa}
OUT_DIR=${OUT_DIR:-target/bench}
MODEL=${MODEL:-builtin:kogpt2-shape} # another builtin only to smoke-test the scripts
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT_DIR"

export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
T_START=$(date +%s)

log() { echo "[$BENCH] $*" >&2; }

# The lorafit binary: a copy of this checkout's release build (so that edits others make to the
# tree while the benchmark runs cannot change what is measured), or $LORAFIT_BIN.
GIT_DESC="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo +dirty)"
if [[ -n "${LORAFIT_BIN:-}" ]]; then
  LORAFIT=$LORAFIT_BIN
  GIT_DESC=${LORAFIT_GIT:-"not this checkout: $LORAFIT_BIN"}
else
  log "building lorafit (release)"
  cargo build --release --quiet
  LORAFIT=$OUT_DIR/lorafit-$STAMP
  cp target/release/lorafit "$LORAFIT"
fi

# Write the builtin model once (outside any timed process), then find its folder as lorafit does.
log "materialising $MODEL"
"$LORAFIT" bench generate --model "$MODEL" --new-tokens 1 --repeats 1 --json >/dev/null
if [[ -n "${LORAFIT_CACHE:-}" ]]; then CACHE=$LORAFIT_CACHE
elif [[ -n "${XDG_CACHE_HOME:-}" ]]; then CACHE=$XDG_CACHE_HOME/lorafit
else CACHE=$HOME/.cache/lorafit; fi
DIR=$CACHE/builtin/${MODEL#builtin:}-v1
[[ -f $DIR/model.safetensors ]] || { echo "no model at $DIR" >&2; exit 1; }
cat "$DIR/model.safetensors" >/dev/null # both tools read the weights from a warm page cache
"$PYTHON" -c 'import torch, transformers, peft' || { echo "$PYTHON cannot import torch + transformers + peft" >&2; exit 1; }

RAW="$OUT_DIR/$BENCH-$STAMP.jsonl"
MD="$OUT_DIR/$BENCH-$STAMP.md"
: >"$RAW"

# record ROUND TOOL CONFIG_JSON -- COMMAND...: runs COMMAND (RECORD_TIMEOUT_S, 600 s, at most), appends
# {"round", "tool", "config", "rc", "loadavg_before", "wall_s", "result"} to $RAW, where result
# is the last JSON line the command printed (null when it failed). Stderr goes to $OUT_DIR/*.stderr.
record() {
  local round=$1 tool=$2 config=$3 out rc=0 load0 t0 t1
  shift 4
  load0=$(cut -d' ' -f1 /proc/loadavg)
  t0=$(date +%s.%N)
  out=$(timeout "${RECORD_TIMEOUT_S:-600}" "$@" 2>>"$OUT_DIR/$BENCH-$STAMP.stderr" | grep '^{' | tail -n1) || rc=$?
  t1=$(date +%s.%N)
  [[ $rc == 0 && $out == "{"* ]] || out=null
  printf '{"round": %d, "tool": "%s", "config": %s, "rc": %d, "loadavg_before": %s, "wall_s": %s, "result": %s}\n' \
    "$round" "$tool" "$config" "$rc" "$load0" "$(awk "BEGIN{printf \"%.2f\", $t1 - $t0}")" "$out" >>"$RAW"
  log "round $round $tool $config: rc $rc, $(awk "BEGIN{printf \"%.1f\", $t1 - $t0}") s"
}

# gemm_round ROUND: the GEMM ceiling of this machine at the shape of a c_fc forward over 2,048
# tokens (2048 x 768 x 3072), candle (lorafit bench gemm) and torch, in the same round as the
# steps it bounds. Each prints one JSON line per layout; all are kept.
gemm_round() {
  local round=$1 load0 line
  load0=$(cut -d' ' -f1 /proc/loadavg)
  { "$LORAFIT" bench gemm --model "$MODEL" --repeats 30 --json 2>>"$OUT_DIR/$BENCH-$STAMP.stderr" | sed 's/^/lorafit /'
    "$PYTHON" scripts/bench/torch_gemm.py --repeats 30 --threads "$THREADS" 2>>"$OUT_DIR/$BENCH-$STAMP.stderr" | sed 's/^/torch /'
  } | while read -r tool line; do
    printf '{"round": %d, "tool": "%s", "config": {"kind": "gemm"}, "rc": 0, "loadavg_before": %s, "wall_s": 0, "result": %s}\n' \
      "$round" "$tool" "$load0" "$line" >>"$RAW"
  done
  log "round $round gemm done"
}

# summarize KIND COMMAND: the Markdown section from $RAW, to stdout and $MD.
summarize() {
  local kind=$1 cmd=$2
  "$PYTHON" scripts/bench/summarize_train.py "$kind" "$RAW" --command "$cmd" --threads "$THREADS" --attn "$ATTN" \
    --elapsed-s $(($(date +%s) - T_START)) --lorafit-version "$("$LORAFIT" --version)" --git "$GIT_DESC" \
    --rustc "$(rustc --version)" \
    --candle "$(grep -A1 '^name = "candle-core"' Cargo.lock | sed -n 's/version = "\(.*\)"/\1/p')" | tee "$MD"
  log "raw results: $RAW; table: $MD"
}
