#!/usr/bin/env bash
# lorafit (CUDA build) vs PyTorch + PEFT on one GPU, in one run. For a GPU machine with the
# NVIDIA driver, the CUDA 13 libraries and PyTorch (+ transformers, PEFT) but no Rust: the
# binary comes prebuilt by scripts/build-cuda.sh (target-cuda/dist/lorafit). See docs/CUDA.md.
#
#   bash scripts/gpu-bench.sh              # outputs under $OUT (else ./gpu-bench-out)
#
# Stages, in priority order (each under its own timeout, all under DEADLINE_S seconds overall;
# a stage that no longer fits is recorded as skipped; STAGES="..." runs a subset):
#   setup        find the CUDA 13 user-space libraries, nvidia-smi, `ldd -r` of the binary
#   smoke        lorafit bench sft on builtin:tiny-gpt2 on the GPU (plain and --quantize nf4)
#   correctness  eval NLL per line of data/eval_sample.txt: CPU f32 vs CUDA f32 (tiny GPT-2)
#   training-correctness  the same seeded SFT (20 steps), RM (10) and PPO (2 iterations) of every
#                family fixture in scripts/gpu/training-correctness.tsv (one line per fixture and
#                method) on CPU f32 and on CUDA f32, bf16, f16 (loss scaler), and one NF4 step:
#                per-step losses and final adapters compared (scripts/gpu/train_check.py)
#   kogpt2       SFT steps, KoGPT2 shape (builtin:kogpt2-shape), bf16, batch 8 x 512, LoRA r8 on
#                c_attn,c_proj,c_fc: lorafit bench sft, then PEFT (scripts/gpu/peft_bench.py)
#   ppo          lorafit sft (1 step) + rm (1 step) on the KoGPT2 shape, then ppo, 2 iterations of
#                8 prompts (timed per iteration)
#   grpo         lorafit grpo on the KoGPT2 shape (configs/grpo-arith.toml: rule rewards), 2
#                iterations of 2 prompts x group 4 x 64 new tokens (timed per iteration and phase)
#   dpo          lorafit sft (1 step) on the KoGPT2 shape, then dpo from it (sigmoid, 2 pairs per
#                step, 4 steps; lorafit-dpo: a reference pass per step, lorafit-dpo-precompute:
#                dpo.precompute_ref = true); DPO's CPU-vs-device check is in training-correctness
#   llama7b      a LLaMA-7B-shaped folder with random f16 weights made on the GPU (scripts/gpu/make_llama.py,
#                13.5 GB, in /dev/shm when it has room), then batch 1 x 512, checkpointing, LoRA r16 on
#                all 7 projections: lorafit f16 (llama7b-f16), PEFT f16 (llama7b-peft), lorafit NF4
#                (llama7b-nf4: `--quantize nf4`, through `lorafit sft` on synthetic rows if this build's
#                `bench sft` ignores --quantize)
#   families     Llama-3.2-1B- and Qwen3-0.6B-shaped random models, batch 1 x 512, LoRA r16 all-linear,
#                KO_DTYPE: lorafit bench sft, then PEFT (scripts/gpu/peft_bench.py)
# GPU memory: nvidia-smi's memory.used sampled every 100 ms during each process, minus the reading
# before it (the process's whole footprint, CUDA context included; same method for both tools).
# Targets reported against: KoGPT2 SFT >= 1.3x PEFT's tokens/s at <= 0.6x its GPU peak;
# 7B f16 LoRA SFT < 15 GiB; 7B NF4 < 6 GiB.
#
# DRY_RUN=1: the whole script on the CPU in a minute or two, so it cannot rot (.ci/run runs it):
# DEVICE=cpu, tiny sizes (builtin:tiny-gpt2 for the KoGPT2 stages, tests/fixtures/llama-a for the
# LLaMA ones), target/release/lorafit, no nvidia-smi needed, the "device" side of both correctness
# stages with LORAFIT_GENERIC_OPS=1 (CPU fast paths vs the generic code CUDA runs), PEFT stages
# skipped when $PYTHON lacks torch/transformers/peft, and STRICT=1 (exit 1 when a stage fails).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu-bench-out}"
mkdir -p "$OUT"
# The binary: LORAFIT_BIN, else scripts/build-cuda.sh's stripped one, else its carried xz copy.
DIST="$ROOT/target-cuda/dist"
BIN="${LORAFIT_BIN:-}"
DEADLINE_S="${DEADLINE_S:-575}"
STAGES="${STAGES:-setup smoke correctness training-correctness kogpt2 ppo grpo dpo llama7b families}"
PY="${PYTHON:-python3}"
if [ "${DRY_RUN:-0}" = 1 ]; then
  : "${DEVICE:=cpu}" "${LORAFIT_BIN:=$ROOT/target/release/lorafit}" "${KO_MODEL:=builtin:tiny-gpt2}" "${KO_BATCH:=1}"
  : "${KO_SEQ:=32}" "${KO_DTYPE:=f32}" "${L_MODEL:=tests/fixtures/llama-a}" "${L_SEQ:=32}" "${L_DTYPE:=f32}" "${STRICT:=1}"
  BIN="$LORAFIT_BIN"
fi
# Knobs for testing this script on a CPU box with tiny sizes (defaults are the real benchmark):
DEV="${DEVICE:-cuda}" KO_BATCH="${KO_BATCH:-8}" KO_SEQ="${KO_SEQ:-512}" KO_DTYPE="${KO_DTYPE:-bf16}"
L_SEQ="${L_SEQ:-512}" L_DTYPE="${L_DTYPE:-f16}"
KO="${KO_MODEL:-builtin:kogpt2-shape}"   # the KoGPT2-shaped model of the kogpt2 and ppo stages
L_MODEL="${L_MODEL:-}"                    # a LLaMA folder to use instead of make_llama.py's 7B shape
STRICT="${STRICT:-0}"                     # 1: exit 1 when a stage that ran failed
# The "device" side of the correctness stages: on the CPU (a dry run), the generic op branches.
DEV_ENV=(); [ "$DEV" = cpu ] && DEV_ENV=(LORAFIT_GENERIC_OPS=1)
read -r -a LLAMA_ARGS <<<"${LLAMA_ARGS:-}"
WORK="${WORK:-/tmp/gpu-bench}"
RESULTS="$OUT/results.jsonl"
LOG="$OUT/gpu-bench.log"
REPORT="$ROOT/scripts/gpu/report.py"
export LORAFIT_CACHE="$WORK/cache" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 RUST_LOG="${RUST_LOG:-info}"
mkdir -p "$WORK" "$LORAFIT_CACHE"
: >"$RESULTS"
exec > >(tee -a "$LOG") 2>&1
T_START=$SECONDS

say() { printf '\n=== [%4ds] %s\n' "$((SECONDS - T_START))" "$*"; }
want() { [[ " $STAGES " == *" $1 "* ]]; }
left() { echo $((DEADLINE_S - (SECONDS - T_START))); }
HAVE_SMI=0; command -v nvidia-smi >/dev/null && HAVE_SMI=1
gpu_mem() { [ "$HAVE_SMI" = 1 ] && nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 2>/dev/null | head -1 | tr -dc '0-9.'; }
note() { "$PY" "$REPORT" record --out "$RESULTS" --stage "$1" --rc "${2:-0}" --set "note=$3" >/dev/null; }

# measure STAGE CAP_S [record args...] -- command...
# Runs the command under min(CAP_S, time left), samples GPU memory meanwhile, records a result line.
measure() {
  local stage=$1 cap=$2; shift 2
  local rec=()
  while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do rec+=("$1"); shift; done
  shift
  local budget; budget=$(left)
  if [ "$budget" -lt 30 ]; then
    say "$stage: skipped ($budget s left of DEADLINE_S=$DEADLINE_S)"
    note "$stage" 125 "skipped: deadline"
    return 125
  fi
  [ "$cap" -lt "$budget" ] || cap=$budget
  say "$stage (timeout ${cap}s): $*"
  local base; base=$(gpu_mem); base=${base:-0}
  local sampler=""
  if [ "$HAVE_SMI" = 1 ]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 100 >"$WORK/$stage.mem" 2>/dev/null &
    sampler=$!
  else
    : >"$WORK/$stage.mem"
  fi
  local t0; t0=$(date +%s.%N)
  timeout --signal=TERM --kill-after=10 "$cap" "$@" >"$WORK/$stage.out" 2>"$WORK/$stage.err"
  local rc=$?
  local wall; wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  sleep 0.3
  [ -n "$sampler" ] && { kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null; }
  tail -n 25 "$WORK/$stage.err" | sed 's/\x1b\[[0-9;]*m//g; s/^/  | /'
  tail -n 3 "$WORK/$stage.out" | cut -c1-600 | sed 's/^/  > /'
  local extra=()
  [ "$rc" = 124 ] && extra=(--set "note=timed out after ${cap}s")
  "$PY" "$REPORT" record --out "$RESULTS" --stage "$stage" --rc "$rc" --wall "$wall" \
    --baseline-mib "$base" --samples "$WORK/$stage.mem" --stdout "$WORK/$stage.out" "${rec[@]}" "${extra[@]}"
  return "$rc"
}

# ---- setup ---------------------------------------------------------------------------------------
say "setup: $(date -u +%Y-%m-%dT%H:%M:%SZ), OUT=$OUT"
{
  if [ "$HAVE_SMI" = 1 ]; then
    nvidia-smi || echo "nvidia-smi failed"
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
  else
    echo "no nvidia-smi on PATH (DEVICE=$DEV)"
  fi
} 2>&1 | tee "$OUT/system.txt"
GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 2>/dev/null | head -1)"
DRIVER="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader -i 0 2>/dev/null | head -1)"
CAP_DEV="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader -i 0 2>/dev/null | head -1)"
if [ -z "$BIN" ] && [ -x "$ROOT/target-cuda/bin/lorafit" ]; then BIN="$ROOT/target-cuda/bin/lorafit"; fi
if [ -z "$BIN" ] && [ -f "$DIST/lorafit.xz" ]; then
  BIN="$WORK/lorafit"
  if command -v xz >/dev/null; then xz -dc "$DIST/lorafit.xz" >"$BIN"
  else "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$DIST/lorafit.xz" "$BIN"; fi
  chmod +x "$BIN"
  echo "unpacked $DIST/lorafit.xz -> $BIN"
fi
[ -n "$BIN" ] && [ -x "$BIN" ] || { echo "no lorafit binary: run scripts/build-cuda.sh and carry target-cuda/dist (or set LORAFIT_BIN)"; note setup 1 "no binary"; exit 1; }
echo "binary: $BIN"
cat "$DIST/BUILD-INFO.txt" 2>/dev/null | head -4 | tee -a "$OUT/system.txt"
BUILD_CAP="$(sed -n 's/.*compute capability: \([0-9a]*\);.*/\1/p' "$DIST/BUILD-INFO.txt" 2>/dev/null | head -1)"
if [ -n "$BUILD_CAP" ] && [ -n "$CAP_DEV" ] && [ "${BUILD_CAP%a}" != "${CAP_DEV/./}" ]; then
  echo "WARNING: the binary's kernels are for compute capability $BUILD_CAP, this GPU is $CAP_DEV: rebuild with scripts/build-cuda.sh ${CAP_DEV/./}"
fi

# PEFT: the image has one; carried wheels (.whl/, see docs/CUDA.md) replace it (e.g. to pin 0.21.2).
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
PYVERS="$("$PY" -c 'import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)' 2>&1 | tail -1)"
HAVE_PEFT=0; "$PY" -c 'import torch, transformers, peft' 2>/dev/null && HAVE_PEFT=1
[ "$HAVE_PEFT" = 1 ] || PYVERS="- - - (no torch/transformers/peft in $PY: $PYVERS)"
echo "python: $PYVERS"

# The CUDA 13 user-space libraries the binary needs, by soname: ldconfig's cache first, then the
# NVIDIA pip packages next to PyTorch (cu130 wheels: site-packages/nvidia/cu13/lib), then a CUDA
# toolkit, then anywhere. Never a .../stubs/ directory (those are link-time stubs).
NEEDED="$(readelf -d "$BIN" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')"
[ -n "$NEEDED" ] || NEEDED="libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13"
SITE_DIRS="$("$PY" -c 'import site, sys; print(" ".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null)"
LIBDIRS=""
add_dir() { case ":$LIBDIRS:" in *":$1:"*) ;; *) LIBDIRS="${LIBDIRS:+$LIBDIRS:}$1" ;; esac; }
echo "libraries:" | tee -a "$OUT/system.txt"
UNFOUND=""
for so in $NEEDED; do
  case "$so" in libc.so*|libm.so*|libgcc_s*|libstdc++*|ld-linux*|libpthread*|libdl*|librt*) continue ;; esac
  hit="$(ldconfig -p 2>/dev/null | awk -v s="$so" '$1 == s {print $NF}' | grep -v /stubs/ | head -1)"
  where=ldconfig
  if [ -z "$hit" ]; then
    where=site-packages
    for d in $SITE_DIRS; do
      [ -d "$d/nvidia" ] || continue
      hit="$(find "$d/nvidia" -name "$so" 2>/dev/null | grep -v /stubs/ | head -1)"
      [ -n "$hit" ] && break
    done
  fi
  if [ -z "$hit" ]; then
    where=toolkit
    hit="$(find /usr/local/cuda*/ /usr/local/nvidia/ /opt/ -name "$so" 2>/dev/null | grep -v /stubs/ | head -1)"
  fi
  if [ -n "$hit" ]; then
    [ "$where" = ldconfig ] || add_dir "$(dirname "$hit")"
    echo "  $so -> $hit ($where)" | tee -a "$OUT/system.txt"
  else
    UNFOUND="$UNFOUND $so"
  fi
done
if [ -n "$UNFOUND" ]; then  # one search of the whole filesystem for the rest
  args=(); for so in $UNFOUND; do args+=(-o -name "$so"); done
  found="$(timeout 60 find / -xdev \( "${args[@]:1}" \) -not -path '*/stubs/*' 2>/dev/null)"
  for so in $UNFOUND; do
    hit="$(echo "$found" | grep "/$so\$" | head -1)"
    if [ -n "$hit" ]; then add_dir "$(dirname "$hit")"; line="  $so -> $hit (filesystem)"; else line="  $so -> NOT FOUND"; fi
    echo "$line" | tee -a "$OUT/system.txt"
  done
fi
export LORAFIT_LD_LIBRARY_PATH="$LIBDIRS"
echo "LD_LIBRARY_PATH for lorafit: ${LIBDIRS:-(none needed)}" | tee -a "$OUT/system.txt"
# lorafit runs with these libraries; python (PyTorch) keeps its own. `env` execs the binary, so
# that `timeout` signals lorafit itself.
LDP="$LORAFIT_LD_LIBRARY_PATH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
LF=(env "LD_LIBRARY_PATH=$LDP" "$BIN")
LFD=(env "LD_LIBRARY_PATH=$LDP" "${DEV_ENV[@]}" "$BIN")   # the device side of a CPU-vs-device comparison
echo "ldd -r (missing libraries or symbols would show here):"
LD_LIBRARY_PATH="$LDP" ldd -r "$BIN" 2>&1 | tee -a "$OUT/system.txt" | sed 's/^/  /'
missing="$(LD_LIBRARY_PATH="$LDP" ldd -r "$BIN" 2>&1 | grep -cE 'not found|undefined symbol')"
VERSION="$("${LF[@]}" --version 2>&1 | head -1)"
echo "lorafit --version: $VERSION"
"$PY" "$REPORT" record --out "$RESULTS" --stage setup --rc "$missing" --set "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  --set "gpu=$GPU_NAME (compute capability $CAP_DEV)" --set "driver=$DRIVER" --set "lorafit_build=$(head -3 "$DIST/BUILD-INFO.txt" 2>/dev/null | tr '\n' ' ')" \
  --set "python=$PYVERS" --set "torch=$(echo "$PYVERS" | cut -d' ' -f1)" --set "transformers=$(echo "$PYVERS" | cut -d' ' -f2)" \
  --set "peft=$(echo "$PYVERS" | cut -d' ' -f3)" --set "libdirs=$LIBDIRS" --set "note=ldd -r problems: $missing" >/dev/null

finish() {
  say "report"
  "$PY" "$REPORT" table --in "$RESULTS" --out "$OUT/results.md" || true
  for s in "$WORK"/*.err; do [ -f "$s" ] && { echo "----- $(basename "$s")"; tail -n 40 "$s" | sed 's/\x1b\[[0-9;]*m//g'; }; done >"$OUT/stage-stderr.txt" 2>/dev/null
  say "done in $((SECONDS - T_START)) s; outputs: $(ls "$OUT" | tr '\n' ' ')"
}
trap finish EXIT

# ---- smoke ------------------------------------------------------------------------------------------
NF4_BENCH=0
if want smoke; then
  measure smoke 120 -- "${LF[@]}" bench sft --model builtin:tiny-gpt2 --device "$DEV" --dtype f32 --batch 2 --seq 64 --steps 2 --json \
    || { echo "lorafit cannot train on this GPU: stopping (see $LOG)"; exit 1; }
  measure smoke-nf4 60 -- "${LF[@]}" bench sft --model builtin:tiny-gpt2 --device "$DEV" --dtype f16 --quantize nf4 --batch 2 --seq 64 --steps 2 --json
  # Does this build's `bench sft` honour --quantize? (It reports it if so.)
  grep -q '"quantize"' "$WORK/smoke-nf4.out" 2>/dev/null && NF4_BENCH=1
  echo "bench sft honours --quantize: $NF4_BENCH"
fi

# ---- correctness ------------------------------------------------------------------------------------
if want correctness; then
  "${LF[@]}" eval --model builtin:tiny-gpt2 --device cpu --dtype f32 --data data/eval_sample.txt --json >"$WORK/eval-cpu.jsonl" 2>"$WORK/eval-cpu.err"
  measure correctness-cuda 60 -- "${LFD[@]}" eval --model builtin:tiny-gpt2 --device "$DEV" --dtype f32 --data data/eval_sample.txt --json
  cmp_note="$("$PY" - "$WORK/eval-cpu.jsonl" "$WORK/correctness-cuda.out" <<'EOF'
import json, sys
def load(p):
    try:
        return [json.loads(l) for l in open(p) if l.strip().startswith("{")]
    except OSError:
        return []
a, b = load(sys.argv[1]), load(sys.argv[2])
pairs = [(x.get("nll"), y.get("nll")) for x, y in zip(a, b) if x.get("nll") is not None and y.get("nll") is not None]
if not pairs or len(a) != len(b):
    print(f"could not compare ({len(a)} CPU lines, {len(b)} CUDA lines)")
else:
    d = max(abs(x - y) for x, y in pairs)
    print(f"{len(pairs)} lines, max |NLL cpu - NLL cuda| = {d:.2e} ({'OK' if d < 1e-3 else 'MISMATCH'}; f32 both)")
EOF
)"
  echo "CPU vs CUDA: $cmp_note"
  case "$cmp_note" in *OK*) note correctness 0 "$cmp_note" ;; *) note correctness 1 "$cmp_note" ;; esac
fi

# ---- training-correctness ---------------------------------------------------------------------------
# Every (fixture, method) of scripts/gpu/training-correctness.tsv, seeded, on CPU f32 and on the
# device in f32, bf16 and f16, plus one NF4 step: per-step losses and final adapters compared.
# The CPU reference chains run first, in parallel (a few seconds); then the device runs, one at a time.
if want training-correctness; then
  tc_env=(); for kv in "${DEV_ENV[@]}"; do tc_env+=(--device-env "$kv"); done
  rm -f "$WORK/tc-result.jsonl"
  measure training-correctness-runs 180 -- "$PY" scripts/gpu/train_check.py --bin "$BIN" --ld-path "$LDP" --device "$DEV" \
    --work "$WORK/tc" --results "$WORK/tc-result.jsonl" --dtypes "${TC_DTYPES:-f32 bf16 f16}" --run-timeout 60 "${tc_env[@]}"
  tc_rc=$?
  if [ -s "$WORK/tc-result.jsonl" ]; then
    cat "$WORK/tc-result.jsonl" >>"$RESULTS"   # the stage's line, with every check (report.py renders it)
  else
    note training-correctness "$tc_rc" "train_check.py wrote no result (rc $tc_rc): see stage-stderr.txt"
  fi
fi

KO_TARGETS=c_attn,c_proj,c_fc
# skip_peft STAGE: records a PEFT stage as skipped when $PY has no torch/transformers/peft.
skip_peft() { [ "$HAVE_PEFT" = 1 ] && return 1; say "$1: skipped (no torch/transformers/peft in $PY)"; note "$1" 125 "skipped: no torch/transformers/peft in $PY"; }
# ---- kogpt2 SFT: lorafit then PEFT --------------------------------------------------------------
if want kogpt2; then
  # Write the builtin model outside the timed process (on CPU, once).
  "${LF[@]}" eval --model "$KO" --device cpu --data data/eval_sample.txt >/dev/null 2>"$WORK/kogpt2-write.err" || true
  KO_DIR="$(ls -d "$LORAFIT_CACHE"/builtin/"${KO#builtin:}"-v* 2>/dev/null | head -1)"
  case "$KO" in builtin:*) ;; *) KO_DIR="$KO" ;; esac
  measure lorafit-kogpt2 150 -- "${LF[@]}" bench sft --model "$KO" --device "$DEV" --dtype "$KO_DTYPE" --batch "$KO_BATCH" --seq "$KO_SEQ" --steps 5 --targets "$KO_TARGETS" --r 8 --json
  if skip_peft peft-kogpt2; then
    :
  elif [ -n "$KO_DIR" ]; then
    measure peft-kogpt2 180 -- "$PY" scripts/gpu/peft_bench.py --device "$DEV" --model "$KO_DIR" --dtype "$KO_DTYPE" --batch "$KO_BATCH" --seq "$KO_SEQ" --steps 5 --targets "$KO_TARGETS" --r 8
  else
    note peft-kogpt2 1 "no $KO folder in $LORAFIT_CACHE (lorafit could not write it)"
  fi
fi

# ---- PPO on the KoGPT2 shape ------------------------------------------------------------------------
if want ppo; then
  P="$WORK/ppo"
  rm -rf "$P"; mkdir -p "$P"
  # The SFT and RM adapters only feed PPO: one small step each (batch 2, 128 tokens).
  common=(--model "$KO" --set model.device="$DEV" --set data.eval_fraction=0 --set train.log_every=1 --force
          --set train.batch_size=2 --set train.grad_accum=1 --set data.max_len=128)
  say "ppo: SFT and RM adapters (1 step each)"
  "${LF[@]}" sft --config configs/sft-kogpt2.toml "${common[@]}" --data data/sft_sample.json --out "$P/sft" --set train.max_steps=1 >"$P/sft.out" 2>"$P/sft.err" \
    && "${LF[@]}" rm --config configs/rm-kogpt2.toml "${common[@]}" --data data/rm_sample.json --sft-adapter "$P/sft" --out "$P/rm" --set train.max_steps=1 >"$P/rm.out" 2>"$P/rm.err"
  rc=$?
  if [ "$rc" = 0 ]; then
    measure lorafit-ppo 150 --ppo-metrics "$P/ppo" -- "${LF[@]}" ppo --config configs/ppo-kogpt2.toml --model "$KO" --set model.device="$DEV" --sft-adapter "$P/sft" \
      --reward-adapter "$P/rm" --data data/ppo_prompts.json --out "$P/ppo" --force --set train.max_steps=2 --set train.log_every=1 --set 'ppo.stop=[]'
  else
    tail -n 20 "$P/sft.err" "$P/rm.err" 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g'
    note lorafit-ppo "$rc" "SFT or RM adapter step failed"
  fi
fi
# ---- GRPO on the KoGPT2 shape -----------------------------------------------------------------------
if want grpo; then
  G="$WORK/grpo"
  rm -rf "$G"; mkdir -p "$G"
  measure lorafit-grpo 150 --ppo-metrics "$G/grpo" -- "${LF[@]}" grpo --config configs/grpo-arith.toml --model "$KO" --set model.device="$DEV" \
    --out "$G/grpo" --force --set train.max_steps=2 --set train.log_every=1 --set train.batch_size=2 --set grpo.group_size=4 \
    --set grpo.max_new_tokens=64 --set grpo.max_prompt_len=64 --set grpo.sample_every=0
fi
# ---- DPO on the KoGPT2 shape ------------------------------------------------------------------------
if want dpo; then
  P="$WORK/dpo"
  rm -rf "$P"; mkdir -p "$P"
  common=(--model "$KO" --set model.device="$DEV" --set data.eval_fraction=0 --set train.log_every=1 --force
          --set train.batch_size=2 --set train.grad_accum=1 --set data.max_len=256)
  say "dpo: SFT adapter (1 step)"
  "${LF[@]}" sft --config configs/sft-kogpt2.toml "${common[@]}" --data data/sft_sample.json --out "$P/sft" --set train.max_steps=1 >"$P/sft.out" 2>"$P/sft.err"
  rc=$?
  if [ "$rc" = 0 ]; then
    for pre in false true; do
      stage=lorafit-dpo; [ "$pre" = true ] && stage=lorafit-dpo-precompute
      measure "$stage" 120 -- "${LF[@]}" dpo --config configs/dpo-kogpt2.toml "${common[@]}" --sft-adapter "$P/sft" \
        --data data/dpo_pairs.jsonl --out "$P/$stage" --set train.max_steps=4 --set train.eval_every=0 --set train.save_every=0 \
        --set dpo.precompute_ref="$pre"
    done
  else
    tail -n 20 "$P/sft.err" 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g'
    note lorafit-dpo "$rc" "SFT adapter step failed"
  fi
fi
# ---- LLaMA-7B shape -----------------------------------------------------------------------------------
# Sub-stages: llama7b-f16 (lorafit), llama7b-peft (PEFT f16), llama7b-nf4 (lorafit, last: its load
# quantizes 6.5B weights on the CPU, which takes minutes); `llama7b` selects all three.
want llama7b && STAGES="$STAGES llama7b-f16 llama7b-peft llama7b-nf4"
if want llama7b-f16 || want llama7b-peft || want llama7b-nf4; then
  L_TARGETS=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
  shm_free=$(df -B1G --output=avail /dev/shm 2>/dev/null | tail -1 | tr -dc '0-9')
  if [ -n "$L_MODEL" ]; then L_DIR="$L_MODEL"
  elif [ "${shm_free:-0}" -ge 20 ]; then L_DIR=/dev/shm/llama7b-shape; else L_DIR="$WORK/llama7b-shape"; fi
  TOK="$(ls -d "$LORAFIT_CACHE"/builtin/tiny-gpt2-v*/tokenizer.json 2>/dev/null | head -1)"
  [ -n "$TOK" ] || { "${LF[@]}" eval --model builtin:tiny-gpt2 --device cpu --data data/eval_sample.txt >/dev/null 2>&1; TOK="$(ls -d "$LORAFIT_CACHE"/builtin/tiny-gpt2-v*/tokenizer.json | head -1)"; }
  if [ -n "$L_MODEL" ]; then
    note make-llama7b 0 "L_MODEL=$L_MODEL used as is"; made=1
  else
    measure make-llama7b 150 -- "$PY" scripts/gpu/make_llama.py --out "$L_DIR" --tokenizer "$TOK" "${LLAMA_ARGS[@]}" && made=1 || made=0
  fi
  if [ "$made" = 1 ]; then
    if want llama7b-f16; then
      measure lorafit-llama7b-f16 180 -- "${LF[@]}" bench sft --model "$L_DIR" --device "$DEV" --dtype "$L_DTYPE" --batch 1 --seq "$L_SEQ" --steps 3 --targets "$L_TARGETS" --r 16 --grad-checkpointing --json
    fi
    if want llama7b-peft && ! skip_peft peft-llama7b-f16; then
      measure peft-llama7b-f16 180 -- "$PY" scripts/gpu/peft_bench.py --device "$DEV" --model "$L_DIR" --dtype "$L_DTYPE" --batch 1 --seq "$L_SEQ" --steps 3 --targets "$L_TARGETS" --r 16 --grad-checkpointing
    fi
    if want llama7b-nf4 && [ "$NF4_BENCH" = 1 ]; then
      measure lorafit-llama7b-nf4 420 -- "${LF[@]}" bench sft --model "$L_DIR" --device "$DEV" --dtype "$L_DTYPE" --quantize nf4 --batch 1 --seq "$L_SEQ" --steps 3 --targets "$L_TARGETS" --r 16 --grad-checkpointing --json
    elif want llama7b-nf4; then
      # This build's bench sft ignores --quantize: time `lorafit sft` steps instead (rows of exactly
      # L_SEQ byte tokens, batch 1, the same LoRA, checkpointing; 1 warm-up + 3 timed steps).
      "$PY" -c "
import json, random
r = random.Random(0)
rows = [{'prompt': 'p', 'completion': ''.join(r.choice('abcdefghijklmnopqrstuvwxyz ') for _ in range($L_SEQ + 200))} for _ in range(8)]
json.dump(rows, open('$WORK/syn.json', 'w'))"
      measure lorafit-llama7b-nf4 420 --sft-metrics "$WORK/sft-nf4" --batch 1 --seq "$L_SEQ" --set "note=via lorafit sft (bench sft ignores --quantize in this build)" -- \
        "${LF[@]}" sft --model "$L_DIR" --data "$WORK/syn.json" --out "$WORK/sft-nf4" --force --set model.device="$DEV" --set model.dtype="$L_DTYPE" \
          --set model.quantize=nf4 --set 'data.template={prompt}' --set data.max_len="$L_SEQ" --set data.eval_fraction=0 \
          --set lora.r=16 --set lora.lora_alpha=32 --set 'lora.target_modules=["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]' \
          --set train.batch_size=1 --set train.grad_accum=1 --set train.max_steps=4 --set train.log_every=1 --set train.eval_every=0 \
          --set train.save_every=0 --set train.grad_checkpointing=true
    fi
  fi
  [ -n "$L_MODEL" ] || rm -rf "$L_DIR"
fi

# families (issue 12): Llama-3.2-1B- and Qwen3-0.6B-shaped random models (scripts/bench/make_family_model.py,
# f32 files loaded as KO_DTYPE), batch 1 x 512, LoRA r16 on all linear layers: lorafit bench sft, then PEFT.
# Alone: STAGES=families bash scripts/gpu-bench.sh
if want families; then
  for shape in llama-3.2-1b qwen3-0.6b; do
    if [ "${DRY_RUN:-0}" = 1 ]; then
      # Dry run: the committed tiny family fixtures of the same families, no torch needed.
      case "$shape" in llama-*) F_DIR=tests/fixtures/families/llama3 ;; *) F_DIR=tests/fixtures/families/qwen3 ;; esac; F_SEQ=32
      measure "lorafit-$shape" 150 -- "${LF[@]}" bench sft --model "$F_DIR" --device "$DEV" --dtype "$KO_DTYPE" --batch 1 --seq "$F_SEQ" --steps 1 --targets all-linear --r 16 --json
      skip_peft "peft-$shape" || measure "peft-$shape" 180 -- "$PY" scripts/gpu/peft_bench.py --device "$DEV" --model "$F_DIR" --dtype "$KO_DTYPE" --batch 1 --seq "$F_SEQ" --steps 1 --targets all-linear --r 16
      continue
    fi
    F_DIR="$WORK/$shape-shape"
    if measure "make-$shape" 150 -- "$PY" scripts/bench/make_family_model.py --shape "$shape" --out "$F_DIR"; then
      measure "lorafit-$shape" 150 -- "${LF[@]}" bench sft --model "$F_DIR" --device "$DEV" --dtype "$KO_DTYPE" --batch 1 --seq 512 --steps 3 --targets all-linear --r 16 --json
      measure "peft-$shape" 180 -- "$PY" scripts/gpu/peft_bench.py --device "$DEV" --model "$F_DIR" --dtype "$KO_DTYPE" --batch 1 --seq 512 --steps 3 --targets all-linear --r 16
    fi
    rm -rf "$F_DIR"
  done
fi

if [ "$STRICT" = 1 ]; then
  # A stage that ran and failed (rc not 0; 125 = skipped) fails the whole run.
  failed="$("$PY" -c 'import json, sys
bad = [r["stage"] + " (rc " + str(r.get("rc")) + ")" for r in map(json.loads, open(sys.argv[1])) if r.get("rc") not in (0, 125)]
print(" ".join(bad))' "$RESULTS")"
  if [ -n "$failed" ]; then say "STRICT: failed stages: $failed"; exit 1; fi
  say "STRICT: every stage that ran passed"
fi
exit 0
