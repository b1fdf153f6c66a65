#!/usr/bin/env bash
# GGUF export benchmark (docs/BENCHMARKS.md): `lorafit export` next to llama.cpp's own path,
# convert_hf_to_gguf.py (f16) + llama-quantize, from the same Hugging Face folder, in one run on one
# machine: wall time, peak memory (max RSS, the larger of llama.cpp's two processes), file sizes.
#
#   LLAMA_CPP_DIR=/root/llama-src/llama_cpp_python-0.3.36/vendor/llama.cpp scripts/bench/export.sh
#
# Models (scripts/bench/export_models.py, random, GPT-2's tokenizer): kogpt2-shape (GPT-2 12 x 768,
# vocab 51,200, f32) and llama-1b-shape (Llama-3.2-1B's shape, bf16, tied). Quant types: q8_0 and
# q4_k_m. For q8_0 llama.cpp's converter can also write q8_0 directly: the faster of its two paths
# is the baseline. Each process runs under /usr/bin/time with the weights in the page cache.
#
#   lorafit:   lorafit export --model DIR --quant Q --out OUT.gguf --force
#   llama.cpp: llamacpp_convert.py DIR --outtype f16 --outfile F16.gguf   (convert_hf_to_gguf.py)
#              llamacpp_quantize.py F16.gguf OUT.gguf Q THREADS           (llama_model_quantize)
#
# Environment: LLAMA_CPP_DIR (the sdist's vendor/llama.cpp), PYTHON (/root/venv-ref/bin/python with
# llama-cpp-python, scripts/fixtures/requirements-gguf.txt), THREADS (2), ROUNDS (1), MODELS, QUANTS,
# OUT_DIR (target/bench). Raw JSON lines and the Markdown go to $OUT_DIR/export-<utc time>.{jsonl,md}.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${LLAMA_CPP_DIR:?set LLAMA_CPP_DIR to the llama.cpp tree of the llama-cpp-python sdist (vendor/llama.cpp)}"
export LLAMA_CPP_DIR
PYTHON=${PYTHON:-/root/venv-ref/bin/python}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-1}
MODELS=${MODELS:-"kogpt2-shape llama-1b-shape"}
QUANTS=${QUANTS:-"q8_0 q4_k_m"}
OUT_DIR=${OUT_DIR:-target/bench}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
WORK=$OUT_DIR/export-work
RAW=$OUT_DIR/export-$STAMP.jsonl
ERR=$OUT_DIR/export-$STAMP.stderr
mkdir -p "$WORK"
: >"$RAW"
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
log() { echo "[export] $*" >&2; }

log "building lorafit (release)"
cargo build --release --quiet
LORAFIT=$OUT_DIR/lorafit-$STAMP
cp target/release/lorafit "$LORAFIT"
GIT_DESC="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock || echo +dirty)"
log "making the models"
"$PYTHON" scripts/bench/export_models.py --out "$WORK/models" 2>>"$ERR"

# timed CMD...: runs CMD under /usr/bin/time; prints "wall_s max_rss_bytes rc cpu_s" (cpu = user + sys).
timed() {
  local tf=$WORK/time.txt rc=0
  sync
  /usr/bin/time -f '%e %M %U %S' -o "$tf" timeout 1800 "$@" >/dev/null 2>>"$ERR" || rc=$?
  read -r wall kib usr sys < <(tail -n1 "$tf")
  echo "$wall $((kib * 1024)) $rc $(awk -v u="$usr" -v s="$sys" 'BEGIN { printf "%.2f", u + s }')"
}
size() { stat -c %s "$1" 2>/dev/null || echo 0; }

for model in $MODELS; do
  D=$WORK/models/$model
  for quant in $QUANTS; do
    for round in $(seq 1 "$ROUNDS"); do
      load0=$(cut -d' ' -f1 /proc/loadavg)
      rm -f "$WORK"/*.gguf
      cat "$D/model.safetensors" >/dev/null
      read -r ow orss orc ocpu < <(timed "$LORAFIT" export --model "$D" --quant "$quant" --out "$WORK/ours.gguf" --force)
      osize=$(size "$WORK/ours.gguf")
      cat "$D/model.safetensors" >/dev/null
      read -r cw crss crc ccpu < <(timed "$PYTHON" scripts/fixtures/llamacpp_convert.py "$D" --outtype f16 --outfile "$WORK/theirs-f16.gguf")
      read -r qw qrss qrc qcpu < <(timed "$PYTHON" scripts/bench/llamacpp_quantize.py "$WORK/theirs-f16.gguf" "$WORK/theirs.gguf" "$quant" "$THREADS")
      tsize=$(size "$WORK/theirs.gguf")
      direct=null
      if [[ $quant == q8_0 ]]; then
        rm -f "$WORK/theirs-f16.gguf"
        cat "$D/model.safetensors" >/dev/null
        read -r dw drss drc dcpu < <(timed "$PYTHON" scripts/fixtures/llamacpp_convert.py "$D" --outtype q8_0 --outfile "$WORK/theirs-direct.gguf")
        direct=$(printf '{"wall_s": %s, "cpu_s": %s, "maxrss_bytes": %d, "rc": %d, "bytes": %d}' "$dw" "$dcpu" "$drss" "$drc" "$(size "$WORK/theirs-direct.gguf")")
      fi
      printf '{"model": "%s", "quant": "%s", "round": %d, "loadavg_before": %s, "lorafit": {"wall_s": %s, "cpu_s": %s, "maxrss_bytes": %d, "rc": %d, "bytes": %d}, "convert_f16": {"wall_s": %s, "cpu_s": %s, "maxrss_bytes": %d, "rc": %d}, "quantize": {"wall_s": %s, "cpu_s": %s, "maxrss_bytes": %d, "rc": %d, "bytes": %d}, "convert_direct": %s}\n' \
        "$model" "$quant" "$round" "$load0" "$ow" "$ocpu" "$orss" "$orc" "$osize" "$cw" "$ccpu" "$crss" "$crc" "$qw" "$qcpu" "$qrss" "$qrc" "$tsize" "$direct" >>"$RAW"
      log "$model $quant round $round: lorafit ${ow}s (cpu ${ocpu}s) $((orss >> 20)) MiB; llama.cpp convert ${cw}s (cpu ${ccpu}s) $((crss >> 20)) MiB + quantize ${qw}s (cpu ${qcpu}s) $((qrss >> 20)) MiB"
    done
  done
done
rm -f "$WORK"/*.gguf

CMD="LLAMA_CPP_DIR=\$LLAMA_CPP_DIR scripts/bench/export.sh"
[[ $ROUNDS != 1 || $THREADS != 2 ]] && CMD="ROUNDS=$ROUNDS THREADS=$THREADS $CMD"
"$PYTHON" - "$RAW" "$CMD" "$GIT_DESC" "$THREADS" >"$OUT_DIR/export-$STAMP.md" <<'PY'
import json, statistics, sys, platform, os
raw, cmd, git, threads = sys.argv[1:5]
rows = [json.loads(l) for l in open(raw)]
med = lambda xs: statistics.median(xs)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
mem = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal"))) >> 20
print(f"Command: `{cmd}` (lorafit {git}, llama.cpp 0c1e57098 via llama-cpp-python 0.3.36; {threads} threads; {cpu}, {os.cpu_count()} cores, {mem} GiB)")
print(f"Load average before each round: {', '.join(str(r['loadavg_before']) for r in rows)}\n")
print("| model | quant | lorafit wall | llama.cpp wall (convert + quantize) | ratio | CPU time ratio | lorafit peak | llama.cpp peak | ratio | lorafit file | llama.cpp file | size diff |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for key in dict.fromkeys((r["model"], r["quant"]) for r in rows):
    rs = [r for r in rows if (r["model"], r["quant"]) == key and r["lorafit"]["rc"] == 0 and r["convert_f16"]["rc"] == 0 and r["quantize"]["rc"] == 0]
    if not rs:
        print(f"| {key[0]} | {key[1]} | failed |"); continue
    ow = med([r["lorafit"]["wall_s"] for r in rs]); orss = max(r["lorafit"]["maxrss_bytes"] for r in rs)
    tw2 = med([r["convert_f16"]["wall_s"] + r["quantize"]["wall_s"] for r in rs])
    trss2 = max(max(r["convert_f16"]["maxrss_bytes"], r["quantize"]["maxrss_bytes"]) for r in rs)
    tw, trss, how = tw2, trss2, f"{med([r['convert_f16']['wall_s'] for r in rs]):.1f} + {med([r['quantize']['wall_s'] for r in rs]):.1f} s"
    ocpu = med([r["lorafit"]["cpu_s"] for r in rs]); tcpu = med([r["convert_f16"]["cpu_s"] + r["quantize"]["cpu_s"] for r in rs])
    tbytes = rs[0]["quantize"]["bytes"]
    d = [r["convert_direct"] for r in rs if r["convert_direct"] and r["convert_direct"]["rc"] == 0]
    if d and med([x["wall_s"] for x in d]) < tw2:
        tw, trss, how = med([x["wall_s"] for x in d]), max(x["maxrss_bytes"] for x in d), f"direct q8_0 conversion {med([x['wall_s'] for x in d]):.1f} s"
        tcpu = med([x["cpu_s"] for x in d])
        tbytes = d[0]["bytes"]
    ob = rs[0]["lorafit"]["bytes"]
    mib = lambda b: f"{b / 2**20:,.0f} MiB"
    print(f"| {key[0]} | {key[1]} | {ow:.1f} s | {tw:.1f} s ({how}) | {ow / tw:.2f}x | {ocpu / tcpu:.2f}x | {mib(orss)} | {mib(trss)} | {orss / trss:.2f}x | {mib(ob)} | {mib(tbytes)} | {100 * (ob - tbytes) / tbytes:+.2f}% |")
PY
cat "$OUT_DIR/export-$STAMP.md"
