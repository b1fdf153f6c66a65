#!/usr/bin/env bash
# Build lorafit with `--features cuda` on a machine with no GPU and no system CUDA.
#
#   scripts/build-cuda.sh [COMPUTE_CAP]     # 90 = H100/H200 (default), 89 = RTX 40xx, 86 = RTX 30xx, 80 = A100
#
# What it does (idempotent: a second run reuses the venv, the stubs and cargo's cache):
#   1. a venv (.venv-cuda/) with NVIDIA's pinned CUDA 13.0 pip wheels: nvcc, crt, nvvm, runtime, cccl;
#   2. PATH / CUDA_HOME / CUDA_COMPUTE_CAP / CUDARC_CUDA_VERSION pointing at them;
#   3. link-only stub libraries for the CUDA libraries cudarc links against (libcuda, cuBLAS,
#      cuBLASLt, cuRAND, NVRTC), one empty function per symbol cudarc declares, each with the real
#      library's soname, so the binary records the real sonames and the device's real libraries
#      are loaded at run time. They live in target-cuda/cuda-stubs/ and must never be shipped;
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

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${LORAFIT_CUDA_VENV:-$ROOT/.venv-cuda}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target-cuda}"
STUBS="$CARGO_TARGET_DIR/cuda-stubs"
DIST="$CARGO_TARGET_DIR/dist"
NICE="${NICE-19}"
nice_() { if [ -n "$NICE" ] && [ "$NICE" != 0 ]; then nice -n "$NICE" "$@"; else "$@"; fi; }
log() { printf '[build-cuda] %s\n' "$*" >&2; }

# The CUDA 13.0 toolkit wheels. Pinned: cudarc reads the CUDA version from `nvcc --version` and
# knows 11.4..13.4 only (13.5 makes its build script panic), and PTX from a newer nvcc than the
# device's driver is refused at load time (the device machines run a CUDA 13.0 driver, 580.x).
WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)
CUDA_MM=13.0          # must match the nvcc wheel above
CUDARC_VER=13000      # the same, as cudarc's CUDARC_CUDA_VERSION

for tool in python3 gcc g++ cargo readelf strip nm xz; do
  command -v "$tool" >/dev/null || { echo "build-cuda: '$tool' not found on PATH" >&2; exit 1; }
done

# ---- 1. venv with the toolkit wheels ---------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
need_install=0
for w in "${WHEELS[@]}"; do
  have="$("$PY" -m pip show "${w%%==*}" 2>/dev/null | sed -n 's/^Version: //p' || true)"
  [ "$have" = "${w##*==}" ] || need_install=1
done
if [ "$need_install" = 1 ]; then
  log "pip install ${WHEELS[*]}"
  nice_ "$PY" -m pip install --disable-pip-version-check -q "${WHEELS[@]}"
else
  log "toolkit wheels already installed in $VENV"
fi
CU="$("$PY" - <<'EOF'
import os, sysconfig
p = os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu13")
print(p)
EOF
)"
[ -x "$CU/bin/nvcc" ] || { echo "build-cuda: no nvcc at $CU/bin/nvcc (wheel layout changed?)" >&2; exit 1; }

# ---- 2. environment ---------------------------------------------------------------------------
export PATH="$CU/bin:$PATH"
export CUDA_HOME="$CU" CUDA_PATH="$CU" CUDA_ROOT="$CU" CUDA_TOOLKIT_ROOT_DIR="$CU"
export CUDA_COMPUTE_CAP="$CAP"
export CUDARC_CUDA_VERSION="$CUDARC_VER"
unset NVCC || true
NVCC_REL="$(nvcc --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')"
[ "$NVCC_REL" = "$CUDA_MM" ] || { echo "build-cuda: nvcc on PATH reports CUDA '$NVCC_REL', expected $CUDA_MM ($(command -v nvcc))" >&2; exit 1; }
log "nvcc $CU/bin/nvcc (CUDA $NVCC_REL), compute capability $CAP"

# ---- 3. link-only stubs -----------------------------------------------------------------------
CUDARC_SRC="$(cargo metadata --format-version 1 --features cuda 2>/dev/null \
  | "$PY" -c 'import json,sys,os; m=json.load(sys.stdin); print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"]=="cudarc"))' || true)"
if [ -z "$CUDARC_SRC" ] || [ ! -d "$CUDARC_SRC/src" ]; then
  log "cargo fetch (cudarc sources)"
  nice_ cargo fetch
  CUDARC_SRC="$(cargo metadata --format-version 1 --features cuda \
    | "$PY" -c 'import json,sys,os; m=json.load(sys.stdin); print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"]=="cudarc"))')"
fi
log "cudarc sources: $CUDARC_SRC"
CUDART_REAL="$(ls "$CU"/lib/libcudart.so.13* 2>/dev/null | head -1)"
[ -n "$CUDART_REAL" ] || { echo "build-cuda: no libcudart.so.13 under $CU/lib" >&2; exit 1; }

mkdir -p "$STUBS"
# module dir in cudarc/src : link name : soname of the real library
STUB_LIBS=(
  "driver:cuda:libcuda.so.1"
  "cublas:cublas:libcublas.so.13"
  "cublaslt:cublasLt:libcublasLt.so.13"
  "curand:curand:libcurand.so.10"
  "nvrtc:nvrtc:libnvrtc.so.13"
)
stamp_src="$(cd "$CUDARC_SRC" && cat "$ROOT/scripts/build-cuda.sh" src/{driver,cublas,cublaslt,curand,nvrtc}/sys/mod.rs | sha256sum | cut -c1-16)"
if [ "$(cat "$STUBS/.stamp" 2>/dev/null)" != "$stamp_src" ]; then
  for entry in "${STUB_LIBS[@]}"; do
    IFS=: read -r module name soname <<<"$entry"
    modrs="$CUDARC_SRC/src/$module/sys/mod.rs"
    # The extern "C" declarations: `fn name(args) -> ret;` on one line (bindgen output).
    grep -oE '^[[:space:]]+fn [A-Za-z_][A-Za-z0-9_]*\(.*;[[:space:]]*$' "$modrs" \
      | sed -E 's/^[[:space:]]+fn ([A-Za-z_][A-Za-z0-9_]*)\(.*/\1/' | sort -u >"$STUBS/$name.symbols"
    n="$(wc -l <"$STUBS/$name.symbols")"
    [ "$n" -gt 5 ] || { echo "build-cuda: found only $n symbols in $modrs" >&2; exit 1; }
    {
      echo "/* link-only stub for $soname, generated by scripts/build-cuda.sh from cudarc's $module/sys. NEVER SHIP. */"
      sed 's/.*/void &(void) {}/' "$STUBS/$name.symbols"
    } >"$STUBS/$name.c"
    gcc -shared -fPIC -O0 -w -Wl,-soname,"$soname" -o "$STUBS/lib$name.so" "$STUBS/$name.c"
    log "stub lib$name.so ($soname): $n symbols"
  done
  echo "$stamp_src" >"$STUBS/.stamp"
else
  log "stubs up to date in $STUBS"
fi
# cudart is real (from the wheel): candle-kernels links libmoe.a against it. The link-time name
# libcudart.so points at the wheel's libcudart.so.13, whose soname is what the binary records.
ln -sfn "$CUDART_REAL" "$STUBS/libcudart.so"

# ---- 4. cargo build ---------------------------------------------------------------------------
export RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-L native=$STUBS"
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
