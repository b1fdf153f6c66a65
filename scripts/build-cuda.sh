#!/usr/bin/env bash
# Build lorafit with `--features cuda` on a machine with no GPU and no system CUDA.
#
#   scripts/build-cuda.sh [COMPUTE_CAP]     # 90 = H100/H200 (default), 89 = RTX 40xx, 86 = RTX 30xx, 80 = A100
#
# What it does (idempotent: a second run reuses the venv, the stubs and cargo's cache):
#   1-3. scripts/cuda-env.sh (shared with scripts/check-cuda.sh): NVIDIA's pinned CUDA 13.0 pip
#      wheels in a venv cached under target-cuda/cuda-toolkit/, the environment pointing at them,
#      and link-only stub libraries (target-cuda/cuda-stubs/, never shipped) for the CUDA libraries
#      cudarc links against, so the binary records the real sonames;
#   4. `cargo build --release --features cuda` into target-cuda/ (never the main target/);
#   5. a stripped copy, target-cuda/bin/lorafit, and target-cuda/dist/ = lorafit.xz (the same,
#      xz-compressed: what to carry to a GPU machine) + BUILD-INFO.txt; prints sizes and sonames.
#
# Heavy steps run under `nice -n 19` (NICE=0 to turn that off). See docs/CUDA.md.
set -euo pipefail

CAP="${1:-${CUDA_COMPUTE_CAP:-90}}"
case "$CAP" in
  [0-9][0-9] | [0-9][0-9][0-9] | [0-9][0-9]a | [0-9][0-9][0-9]a) ;;
  *) echo "usage: $0 [COMPUTE_CAP]   (e.g. 90, 89, 86, 80; got '$CAP')" >&2; exit 2 ;;
esac

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG_TAG=build-cuda
# shellcheck source=scripts/cuda-env.sh
source "$SCRIPT_DIR/cuda-env.sh"

# ---- 4. cargo build ---------------------------------------------------------------------------
log "cargo build --release --features cuda  (CARGO_TARGET_DIR=$CARGO_TARGET_DIR, RUSTFLAGS=$RUSTFLAGS)"
t0=$(date +%s)
nice_ cargo build --release --features cuda --bin lorafit
t1=$(date +%s)
BIN="$CARGO_TARGET_DIR/release/lorafit"
[ -x "$BIN" ] || { echo "build-cuda: $BIN not built" >&2; exit 1; }

# ---- 5. stripped copy, compressed copy to carry, report ------------------------------------------
# The stripped binary is ~61 MiB (mostly candle's PTX and kernels), too close to the device tool's
# 64 MiB limit on what travels (working tree included); xz brings it to ~9 MB.
OUTBIN="$CARGO_TARGET_DIR/bin/lorafit"
mkdir -p "$DIST" "$(dirname "$OUTBIN")"
if [ ! -x "$OUTBIN" ] || [ "$BIN" -nt "$OUTBIN" ] || [ ! -f "$DIST/lorafit.xz" ]; then
  rm -f "$OUTBIN" "$DIST/lorafit.xz" "$DIST/lorafit"
  cp "$BIN" "$OUTBIN"
  strip "$OUTBIN"
  log "xz -6 $OUTBIN -> $DIST/lorafit.xz"
  nice_ xz -T2 -6 -c "$OUTBIN" >"$DIST/lorafit.xz.tmp" && mv "$DIST/lorafit.xz.tmp" "$DIST/lorafit.xz"
fi
needed="$(readelf -d "$OUTBIN" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
# The stubs must not be what the binary loads at run time: no RPATH/RUNPATH into them.
if readelf -d "$OUTBIN" | grep -qE 'R(UN)?PATH'; then
  echo "build-cuda: the binary has an RPATH/RUNPATH; refusing (the stubs must never be loaded)" >&2
  readelf -d "$OUTBIN" | grep -E 'R(UN)?PATH' >&2
  exit 1
fi
size_b="$(stat -c %s "$OUTBIN")"
xz_b="$(stat -c %s "$DIST/lorafit.xz")"
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
{
  echo "lorafit $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?') built $(date -u +%Y-%m-%dT%H:%M:%SZ) (this run's cargo step: $((t1 - t0)) s)"
  echo "features: cuda; compute capability: $CAP; nvcc: CUDA $NVCC_REL (pip wheels ${WHEELS[*]})"
  echo "size: $size_b bytes ($(mib "$size_b")) stripped; lorafit.xz $xz_b bytes ($(mib "$xz_b")); sha256 $(sha256sum "$OUTBIN" | cut -c1-16)"
  echo "needs (sonames): $needed"
  echo "CUDA symbols it imports (libcuda, cuBLAS, cuRAND, cudart):"
  nm -D --undefined-only "$OUTBIN" | awk '{print $NF}' | grep -E '^(cu|nvrtc|curand)' | sort -u | tr '\n' ' ' || true
  echo
} >"$DIST/BUILD-INFO.txt"

log "cargo build took $((t1 - t0)) s"
echo "binary:   $OUTBIN  ($(mib "$size_b"), $size_b bytes, stripped; unstripped: $BIN)"
echo "carry:    $DIST  (lorafit.xz $(mib "$xz_b") + BUILD-INFO.txt; scripts/gpu-bench.sh unpacks it)"
echo "needs:    $needed"
echo "ldd (here the CUDA libraries are 'not found': the GPU machine provides them):"
ldd "$OUTBIN" | sed 's/^/  /' || true
echo "Never carry $STUBS. See docs/CUDA.md."
