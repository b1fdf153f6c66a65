#!/usr/bin/env bash
# Type-check (and with --build, build) lorafit with `--features cuda` on a machine with no GPU and
# no system CUDA. Run it before resolving any change to src/ops/, src/model/ or the training loop:
# code behind `cfg(feature = "cuda")` and candle's CUDA API are checked nowhere else (CI builds
# the CPU binary only).
#
#   scripts/check-cuda.sh [--build] [COMPUTE_CAP]   # 90 = H100/H200 (default), 89, 86, 80, ...
#
#   1. scripts/cuda-env.sh: the pinned CUDA 13.0 pip toolkit (cached in target-cuda/cuda-toolkit/),
#      its environment, and the link-only stub libraries (exactly what scripts/build-cuda.sh uses);
#   2. `cargo check --release --features cuda --all-targets` into target-cuda/ (lib, binary, tests,
#      benches). Fails on an error and on any warning in lorafit's own code under that feature.
#      The first run compiles candle-kernels' PTX with nvcc (20+ minutes on 2 shared cores); later
#      runs take seconds to a minute. `--release` and the same RUSTFLAGS as build-cuda.sh share
#      cargo's cache with it, so a check then a build does the nvcc work once;
#   3. with --build: scripts/build-cuda.sh (the stripped binary and target-cuda/dist/ to carry).
#
# Heavy steps run under `nice -n 19` (NICE=0 to turn that off). See docs/CUDA.md.
set -euo pipefail

BUILD=0
CAP_ARG=""
for a in "$@"; do
  case "$a" in
    --build) BUILD=1 ;;
    -h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) CAP_ARG="$a" ;;
  esac
done
CAP="${CAP_ARG:-${CUDA_COMPUTE_CAP:-90}}"
case "$CAP" in
  [0-9][0-9] | [0-9][0-9][0-9] | [0-9][0-9]a | [0-9][0-9][0-9]a) ;;
  *) echo "usage: $0 [--build] [COMPUTE_CAP]   (e.g. 90, 89, 86, 80; got '$CAP')" >&2; exit 2 ;;
esac

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG_TAG=check-cuda
# shellcheck source=scripts/cuda-env.sh
source "$SCRIPT_DIR/cuda-env.sh"

# ---- 2. cargo check -------------------------------------------------------------------------------
log "cargo check --release --features cuda --all-targets  (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
t0=$(date +%s)
msgs="$(mktemp)"
trap 'rm -f "$msgs"' EXIT
set +e
nice_ cargo check --release --features cuda --all-targets 2>&1 | tee "$msgs"
rc=${PIPESTATUS[0]}
set -e
t1=$(date +%s)
if [ "$rc" != 0 ]; then
  echo "check-cuda: FAILED: cargo check --features cuda (exit $rc, $((t1 - t0)) s)" >&2
  exit "$rc"
fi
# cargo prints "warning: `lorafit` (lib) generated N warnings" for the crate's own warnings only.
if grep -qE '^warning: `lorafit` \(.*\) generated [0-9]+ warning' "$msgs"; then
  echo "check-cuda: FAILED: lorafit has warnings under --features cuda (above)" >&2
  exit 1
fi
log "cargo check --features cuda passed in $((t1 - t0)) s"

# ---- 3. build when asked ----------------------------------------------------------------------------
if [ "$BUILD" = 1 ]; then
  exec "$SCRIPT_DIR/build-cuda.sh" "$CAP"
fi
echo "check-cuda: OK (compute capability $CAP; scripts/check-cuda.sh --build makes the binary to carry)"
