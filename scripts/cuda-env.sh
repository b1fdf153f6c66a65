# Sourced by scripts/build-cuda.sh and scripts/check-cuda.sh (not run on its own): the CUDA 13.0
# toolkit from pinned pip wheels and the link-only stub libraries, with the environment that
# `cargo check|build --features cuda` needs on a machine with no GPU and no system CUDA.
#
# Before sourcing, set CAP (the compute capability: 90, 89, 86, 80, ...) and LOG_TAG (log prefix).
# After it: ROOT (the repo, also the working directory), CARGO_TARGET_DIR (target-cuda/ unless
# set), VENV (the toolkit venv, cached in $CARGO_TARGET_DIR/cuda-toolkit/ unless LORAFIT_CUDA_VENV
# is set), PY, CU (the toolkit: bin/nvcc, include/, lib/), STUBS, DIST, WHEELS, NVCC_REL,
# PATH/CUDA_HOME/CUDA_COMPUTE_CAP/CUDARC_CUDA_VERSION/RUSTFLAGS exported, and nice_ / log.
#
#   1. a venv with NVIDIA's pinned CUDA 13.0 pip wheels: nvcc, crt, nvvm, runtime, cccl;
#   2. PATH / CUDA_HOME / CUDA_COMPUTE_CAP / CUDARC_CUDA_VERSION pointing at them;
#   3. link-only stub libraries for the CUDA libraries cudarc links against (libcuda, cuBLAS,
#      cuBLASLt, cuRAND, NVRTC), one empty function per symbol cudarc declares, each with the real
#      library's soname, so a binary records the real sonames and the device's real libraries are
#      loaded at run time. They live in $CARGO_TARGET_DIR/cuda-stubs/ and must never be shipped.
#      RUSTFLAGS gets `-L native=<stubs>`: check and build use the same flags, so they share
#      cargo's cache (candle-kernels' nvcc work is done once for both).
# Heavy steps run under `nice -n 19` (NICE=0 to turn that off). See docs/CUDA.md.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target-cuda}"
# The toolkit (~1 GB of wheels) is cached beside the build it serves; `rm -rf target-cuda` drops both.
VENV="${LORAFIT_CUDA_VENV:-$CARGO_TARGET_DIR/cuda-toolkit/venv}"
STUBS="$CARGO_TARGET_DIR/cuda-stubs"
DIST="$CARGO_TARGET_DIR/dist"
NICE="${NICE-19}"
nice_() { if [ -n "$NICE" ] && [ "$NICE" != 0 ]; then nice -n "$NICE" "$@"; else "$@"; fi; }
log() { printf '[%s] %s\n' "${LOG_TAG:-cuda-env}" "$*" >&2; }

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
  command -v "$tool" >/dev/null || { echo "${LOG_TAG:-cuda-env}: '$tool' not found on PATH" >&2; exit 1; }
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
[ -x "$CU/bin/nvcc" ] || { echo "${LOG_TAG:-cuda-env}: no nvcc at $CU/bin/nvcc (wheel layout changed?)" >&2; exit 1; }

# ---- 2. environment ---------------------------------------------------------------------------
export PATH="$CU/bin:$PATH"
export CUDA_HOME="$CU" CUDA_PATH="$CU" CUDA_ROOT="$CU" CUDA_TOOLKIT_ROOT_DIR="$CU"
export CUDA_COMPUTE_CAP="$CAP"
export CUDARC_CUDA_VERSION="$CUDARC_VER"
unset NVCC || true
NVCC_REL="$(nvcc --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')"
[ "$NVCC_REL" = "$CUDA_MM" ] || { echo "${LOG_TAG:-cuda-env}: nvcc on PATH reports CUDA '$NVCC_REL', expected $CUDA_MM ($(command -v nvcc))" >&2; exit 1; }
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
[ -n "$CUDART_REAL" ] || { echo "${LOG_TAG:-cuda-env}: no libcudart.so.13 under $CU/lib" >&2; exit 1; }

mkdir -p "$STUBS"
# module dir in cudarc/src : link name : soname of the real library
STUB_LIBS=(
  "driver:cuda:libcuda.so.1"
  "cublas:cublas:libcublas.so.13"
  "cublaslt:cublasLt:libcublasLt.so.13"
  "curand:curand:libcurand.so.10"
  "nvrtc:nvrtc:libnvrtc.so.13"
)
stamp_src="$(cd "$CUDARC_SRC" && cat "$ROOT/scripts/cuda-env.sh" src/{driver,cublas,cublaslt,curand,nvrtc}/sys/mod.rs | sha256sum | cut -c1-16)"
if [ "$(cat "$STUBS/.stamp" 2>/dev/null)" != "$stamp_src" ]; then
  for entry in "${STUB_LIBS[@]}"; do
    IFS=: read -r module name soname <<<"$entry"
    modrs="$CUDARC_SRC/src/$module/sys/mod.rs"
    # The extern "C" declarations: `fn name(args) -> ret;` on one line (bindgen output).
    grep -oE '^[[:space:]]+fn [A-Za-z_][A-Za-z0-9_]*\(.*;[[:space:]]*$' "$modrs" \
      | sed -E 's/^[[:space:]]+fn ([A-Za-z_][A-Za-z0-9_]*)\(.*/\1/' | sort -u >"$STUBS/$name.symbols"
    n="$(wc -l <"$STUBS/$name.symbols")"
    [ "$n" -gt 5 ] || { echo "${LOG_TAG:-cuda-env}: found only $n symbols in $modrs" >&2; exit 1; }
    {
      echo "/* link-only stub for $soname, generated by scripts/cuda-env.sh from cudarc's $module/sys. NEVER SHIP. */"
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
# Exactly once (check-cuda.sh --build sources this twice): other flags would change every crate's
# hash and rebuild everything, candle-kernels' nvcc work included.
case " ${RUSTFLAGS:-} " in
  *" -L native=$STUBS "*) ;;
  *) export RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-L native=$STUBS" ;;
esac
