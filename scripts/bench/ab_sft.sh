#!/usr/bin/env bash
# A/B of lorafit builds or environment knobs on one SFT configuration (docs/BENCHMARKS.md, "SFT"):
# each variant in a fresh process, interleaved, ROUNDS times; a table of step times (median of
# all timed steps [min-max], fastest step) and peak RSS, relative to the first variant.
#
#   scripts/bench/ab_sft.sh 'default::' 'malloc::MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824' \
#                           'x86-v4::BIN=/path/to/lorafit-built-with-gemm-x86-v4'
#
# A variant is LABEL::ENV ASSIGNMENTS (BIN=... picks the lorafit binary; default: LORAFIT_BIN or
# this checkout's release build). Environment: ROUNDS (3), STEPS (3), THREADS (2), ARGS (the
# bench sft flags; default --batch 4 --seq 128 --targets c_attn), LORAFIT_CACHE.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-3}
STEPS=${STEPS:-3}
THREADS=${THREADS:-2}
ARGS=${ARGS:---batch 4 --seq 128 --targets c_attn}
OUT_DIR=${OUT_DIR:-target/bench}
mkdir -p "$OUT_DIR"
RAW=$OUT_DIR/ab-sft-$(date -u +%Y%m%dT%H%M%SZ).jsonl
: >"$RAW"
if [[ -n "${LORAFIT_BIN:-}" ]]; then DEFAULT_BIN=$LORAFIT_BIN; else cargo build --release --quiet; DEFAULT_BIN=target/release/lorafit; fi
export RAYON_NUM_THREADS=$THREADS
n=0
for round in $(seq 1 "$ROUNDS"); do
  variants=("$@")
  if (( round % 2 == 0 )); then # alternate the order
    rev=(); for ((i = ${#variants[@]} - 1; i >= 0; i--)); do rev+=("${variants[i]}"); done; variants=("${rev[@]}")
  fi
  for v in "${variants[@]}"; do
    label=${v%%::*}
    envs=${v#*::}
    bin=$DEFAULT_BIN
    env_args=()
    for kv in $envs; do
      if [[ $kv == BIN=* ]]; then bin=${kv#BIN=}; else env_args+=("$kv"); fi
    done
    load0=$(cut -d' ' -f1 /proc/loadavg)
    # shellcheck disable=SC2086
    out=$(env "${env_args[@]}" "$bin" bench sft --model builtin:kogpt2-shape $ARGS --steps "$STEPS" --json 2>/dev/null | tail -n1) || out=null
    printf '{"round": %d, "variant": "%s", "loadavg_before": %s, "result": %s}\n' "$round" "$label" "$load0" "$out" >>"$RAW"
    echo "[ab] round $round $label done" >&2
  done
done
echo "Command: \`scripts/bench/ab_sft.sh$(printf " '%s'" "$@")\` (ARGS='$ARGS', $ROUNDS rounds, $STEPS timed steps per process, $(date -u +%Y-%m-%d\ %H:%M) UTC, load average median $(python3 -c "import json,statistics;print(statistics.median(json.loads(l)['loadavg_before'] for l in open('$RAW')))"))"
echo
python3 - "$RAW" "$@" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
labels = [v.split("::")[0] for v in sys.argv[2:]]
print("| variant | step time, s: median [min-max] | fastest step, s | median / first variant | peak RSS, MiB |")
print("|---|---|---|---|---|")
base = None
for lab in labels:
    st = [s for r in rows if r["variant"] == lab and r["result"] for s in r["result"]["step_s_all"]]
    rss = [r["result"]["peak_rss_bytes"] for r in rows if r["variant"] == lab and r["result"]]
    if not st:
        print(f"| {lab} | failed | - | - | - |")
        continue
    med = statistics.median(st)
    base = base or med
    print(f"| {lab} | {med:.2f} [{min(st):.2f}-{max(st):.2f}] | {min(st):.2f} | {med / base:.2f} | {statistics.median(rss) / 2**20:,.0f} |")
PY
