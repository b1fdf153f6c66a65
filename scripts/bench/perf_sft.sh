#!/usr/bin/env bash
# Where the CPU time of a lorafit SFT step goes (docs/BENCHMARKS.md, "SFT", the profile):
# `perf record -g` of `lorafit bench sft` (1 warm-up + STEPS steps, model load included), then
# the samples' self time grouped into GEMM kernels, thread-pool spin-waits, kernel time (page
# faults and zeroing of fresh buffers, unmapping, scheduling), libm transcendental functions
# (GELU's tanh and its backward's powf), and the rest of candle's element-wise work.
#
#   scripts/bench/perf_sft.sh [extra lorafit bench sft flags]   # e.g. --batch 1 --seq 512
#
# Needs perf (Debian: apt-get install linux-perf) with perf_event_paranoid <= 2.
# Environment: STEPS (3), THREADS (2), LORAFIT_BIN, LORAFIT_CACHE, OUT_DIR (target/bench), and
# CANDLE_BARRIER_POOL_SPIN_LIMIT / CANDLE_NUM_THREADS / MALLOC_* to try candle's and glibc's knobs;
# LOAD=N keeps N other cores busy (spinning `sh` processes at this script's nice level) while
# lorafit runs (docs/BENCHMARKS.md, "Steady under load").
set -euo pipefail
cd "$(dirname "$0")/../.."
STEPS=${STEPS:-3}
THREADS=${THREADS:-2}
OUT_DIR=${OUT_DIR:-target/bench}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT_DIR"
if [[ -n "${LORAFIT_BIN:-}" ]]; then LORAFIT=$LORAFIT_BIN; else cargo build --release --quiet; LORAFIT=target/release/lorafit; fi
export RAYON_NUM_THREADS=$THREADS
DATA=$OUT_DIR/perf-sft-$STAMP.data
ARGS=(bench sft --model builtin:kogpt2-shape --batch 4 --seq 128 --targets c_attn --steps "$STEPS" --json "$@")
echo "command: perf record -F 499 -g -o $DATA $LORAFIT ${ARGS[*]}" >&2
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
SPINNERS=()
for ((i = 0; i < ${LOAD:-0}; i++)); do sh -c 'while :; do :; done' & SPINNERS+=($!); done
trap 'for p in "${SPINNERS[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
(( ${LOAD:-0} > 0 )) && echo "with $LOAD busy core(s) of outside load" >&2
perf record -F 499 -g -o "$DATA" "$LORAFIT" "${ARGS[@]}" 2>/dev/null | tail -n1
for p in "${SPINNERS[@]}"; do kill "$p" 2>/dev/null || true; done
perf report -i "$DATA" --no-children --sort symbol --stdio -g none 2>/dev/null | python3 -c '
import re, sys
groups = [
    ("GEMM kernels (gemm crate microkernels and packing)", re.compile(r"gemm_f32|gemm_common|gemm::")),
    ("thread-pool spin-waits (candle barrier pool, rayon idle)", re.compile(r"BarrierGuard|__rust_begin_short_backtrace|rayon_core|spin_loop|sched_yield")),
    ("libm: tanhf / expm1f / powf / expf / logf (GELU, its backward, softmax)", re.compile(r"tanhf|expm1f|powf|expf|logf|__exp|__log")),
    ("memset / memcpy", re.compile(r"memset|memmove|memcpy")),
    ("candle element-wise, reductions, copies, index ops", re.compile(r"candle_core|candle_nn|lorafit")),
]
tot = {}
kernel = 0.0
other = 0.0
for line in sys.stdin:
    m = re.match(r"\s+([\d.]+)%\s+\[(.)\]\s+(.*)", line)
    if not m:
        continue
    pct, space, sym = float(m.group(1)), m.group(2), m.group(3)
    if space == "k":
        kernel += pct
        continue
    for name, rx in groups:
        if rx.search(sym):
            tot[name] = tot.get(name, 0.0) + pct
            break
    else:
        other += pct
print("| where the samples are (self time, all threads) | share |")
print("|---|---|")
for name, _ in groups:
    print(f"| {name} | {tot.get(name, 0.0):.0f}% |")
print(f"| kernel: page faults + zeroing of fresh buffers, munmap, scheduling | {kernel:.0f}% |")
print(f"| other (allocator, Rust std, ...) | {other:.0f}% |")
'
echo "top symbols: perf report -i $DATA --no-children --sort symbol --stdio -g none | head -60" >&2
