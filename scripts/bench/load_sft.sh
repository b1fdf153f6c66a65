#!/usr/bin/env bash
# Steady under load (docs/BENCHMARKS.md, "Steady under load (issue 17)"): how much an SFT step of
# each tool slows down when another process keeps one core busy, lorafit next to PyTorch + PEFT.
#
#   scripts/bench/load_sft.sh          # ~6 minutes on a quiet 2-core box
#
# Per round, for each load in LOADS (0: idle; N: N busy cores) and each tool (the order alternating
# from one load to the next), one fresh process:
#   lorafit: lorafit bench sft --model builtin:kogpt2-shape --batch 4 --seq 128 --targets c_attn
#            --steps STEPS --json                                   (RAYON_NUM_THREADS=2)
#   PEFT:    scripts/bench/peft_sft.py --model <the same folder> --batch 4 --seq 128 --targets c_attn
#            --steps STEPS --threads 2                              (OMP_WAIT_POLICY=PASSIVE)
# Load N = N spinning processes (`sh -c 'while :; do :; done'`, at this script's nice level) started
# before the measured process and killed after it, so both tools meet the same load. The table: the
# median step of each tool per load, the lorafit / PEFT ratio per load, each tool's loaded / idle
# slowdown, and the loaded ratio / idle ratio (issue 17's target: at most 1.10). The user + system
# CPU seconds of each process (from /usr/bin/time) show time burnt waiting rather than working.
# On a shared machine: before each process the script waits (QUIET_MAX_S, 240 s, at most) until the
# rest of the machine uses under QUIET_CPUS (0.3) cores over 2 s, and it records the CPU time that
# processes other than the measured one and its spinners took while it ran ("outside load", cores);
# the tables are printed for all processes and for those whose outside load stayed under
# MAX_OUTSIDE (0.3 cores).
# Environment: ROUNDS (4), STEPS (3), LOADS ("0 1"), ARGS (the shape flags of both tools),
# LORAFIT_BINS ("LABEL=PATH ...": several lorafit builds, e.g. before and after a change, each a row
# of the tables, all interleaved with PEFT in the same rounds), and those of scripts/bench/common.sh
# (LORAFIT_BIN, THREADS, PYTHON, OUT_DIR, ...).
set -euo pipefail
cd "$(dirname "$0")/../.."
BENCH=load-sft
ROUNDS=${ROUNDS:-4}
STEPS=${STEPS:-3}
LOADS=${LOADS:-0 1}
ARGS=${ARGS:---batch 4 --seq 128 --targets c_attn}
source scripts/bench/common.sh
BINS=(${LORAFIT_BINS:-lorafit=$LORAFIT})
export OMP_WAIT_POLICY=PASSIVE # torch's OpenMP threads sleep instead of spinning when idle (issue 17)

QUIET_CPUS=${QUIET_CPUS:-0.3}
QUIET_MAX_S=${QUIET_MAX_S:-240}
MAX_OUTSIDE=${MAX_OUTSIDE:-0.3}
TCK=$(getconf CLK_TCK)

SPINNERS=()
SPIN_CPU=0 # CPU seconds the last spinners used
spin_start() { local i; for ((i = 0; i < $1; i++)); do sh -c 'while :; do :; done' & SPINNERS+=($!); done; sleep 0.2; }
spin_stop() {
  local p j=0
  for p in "${SPINNERS[@]}"; do j=$((j + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done
  SPIN_CPU=$(awk "BEGIN{print $j / $TCK}")
  for p in "${SPINNERS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  SPINNERS=()
}
trap spin_stop EXIT
# busy_s: CPU seconds the whole machine has been busy (user, nice, system, irq, softirq, steal).
busy_s() { awk -v t="$TCK" '/^cpu /{print ($2 + $3 + $4 + $7 + $8 + $9) / t}' /proc/stat; }
# wait_quiet: until the machine uses under QUIET_CPUS cores over 2 s (QUIET_MAX_S at most); sets WAITED.
wait_quiet() {
  local b0 b1 t0=$SECONDS
  while :; do
    b0=$(busy_s); sleep 2; b1=$(busy_s)
    awk "BEGIN{exit !(($b1 - $b0) / 2 < $QUIET_CPUS)}" && break
    (( SECONDS - t0 >= QUIET_MAX_S )) && break
  done
  WAITED=$((SECONDS - t0))
}

# one ROUND LOAD TOOL: one measured process under LOAD spinners; appends a JSON line to $RAW.
one() {
  local round=$1 load=$2 tool=$3 out rc=0 load0 t0 t1 b0 b1 cpu tf outside
  tf=$(mktemp)
  # shellcheck disable=SC2086
  if [[ $tool == *=* ]]; then cmd=("${tool#*=}" bench sft --model "$MODEL" $ARGS --steps "$STEPS" --json)
  else cmd=("$PYTHON" scripts/bench/peft_sft.py --model "$DIR" $ARGS --steps "$STEPS" --threads "$THREADS" --attn "$ATTN"); fi
  wait_quiet
  load0=$(cut -d' ' -f1 /proc/loadavg)
  spin_start "$load"
  b0=$(busy_s)
  t0=$(date +%s.%N)
  out=$(/usr/bin/time -f '%U %S' -o "$tf" timeout 600 "${cmd[@]}" 2>>"$OUT_DIR/$BENCH-$STAMP.stderr" | grep '^{' | tail -n1) || rc=$?
  t1=$(date +%s.%N)
  b1=$(busy_s)
  spin_stop
  cpu=$(awk '{printf "%.2f", $1 + $2}' "$tf" 2>/dev/null || echo 0); rm -f "$tf"
  outside=$(awk "BEGIN{o = ($b1 - $b0 - ${cpu:-0} - $SPIN_CPU) / ($t1 - $t0); printf \"%.2f\", o < 0 ? 0 : o}")
  [[ $rc == 0 && $out == "{"* ]] || out=null
  printf '{"round": %d, "tool": "%s", "load": %d, "rc": %d, "loadavg_before": %s, "waited_s": %d, "wall_s": %.2f, "cpu_s": %s, "spinner_cpu_s": %s, "outside_cores": %s, "result": %s}\n' \
    "$round" "${tool%%=*}" "$load" "$rc" "$load0" "$WAITED" "$(awk "BEGIN{print $t1 - $t0}")" "${cpu:-0}" "$SPIN_CPU" "$outside" "$out" >>"$RAW"
  log "round $round load $load ${tool%%=*}: rc $rc, $(awk "BEGIN{printf \"%.1f\", $t1 - $t0}") s (waited $WAITED s for quiet; load average before $load0; outside load $outside cores)"
}

n=0
for round in $(seq 1 "$ROUNDS"); do
  for load in $LOADS; do
    if (( n % 2 == 0 )); then order="${BINS[*]} peft"; else order="peft ${BINS[*]}"; fi
    n=$((n + 1))
    for tool in $order; do one "$round" "$load" "$tool"; done
  done
done

CMD="scripts/bench/load_sft.sh"
[[ $ROUNDS != 4 || $STEPS != 3 || $LOADS != "0 1" ]] && CMD="ROUNDS=$ROUNDS STEPS=$STEPS LOADS='$LOADS' $CMD"
[[ -n "${LORAFIT_BIN:-}" ]] && CMD="LORAFIT_BIN=$LORAFIT_BIN $CMD"
[[ -n "${LORAFIT_BINS:-}" ]] && CMD="LORAFIT_BINS='$LORAFIT_BINS' $CMD"
{
  echo "Command: \`$CMD\` ($ROUNDS rounds, 1 warm-up + $STEPS timed steps per process, ARGS='$ARGS', $THREADS threads each, $(( ($(date +%s) - T_START) / 60 )) min in all)  "
  echo "Date: $(date -u '+%Y-%m-%d %H:%M') UTC  "
  echo "Machine: $(lscpu | sed -n 's/^Model name: *//p'), family $(lscpu | sed -n 's/^CPU family: *//p'), $(nproc) cores available ($(grep -o -w -e avx2 -e avx512f /proc/cpuinfo | sort -u | tr '\n' ' ')), Linux $(uname -r)  "
  for b in "${BINS[@]}"; do echo "${b%%=*}: $("${b#*=}" --version), \`${b#*=}\`  "; done
  [[ -z "${LORAFIT_BINS:-}" ]] && echo "(git $GIT_DESC)"
  echo
  "$PYTHON" - "$RAW" "$MAX_OUTSIDE" <<'PY'
import json, statistics as st, sys
all_rows = [json.loads(l) for l in open(sys.argv[1])]
max_outside = float(sys.argv[2])
loads = sorted({r["load"] for r in all_rows})
builds = list(dict.fromkeys(r["tool"] for r in all_rows if r["tool"] != "peft"))
def name(load):
    return "idle" if load == 0 else f"{load} busy core{'s' if load > 1 else ''}"

def tables(rows):
    def steps(tool, load):
        return [s for r in rows if r["tool"] == tool and r["load"] == load and r["result"] for s in r["result"]["step_s_all"]]
    def per_wall(key, tool, load):
        v = [r[key] / (r["wall_s"] if key == "cpu_s" else 1) for r in rows if r["tool"] == tool and r["load"] == load and r["result"]]
        return f"{st.median(v):.2f}" if v else "-"
    def cell(t, l):
        v = steps(t, l)
        return f"{st.median(v):.2f} [{min(v):.2f}-{max(v):.2f}] ({len(v)})" if v else "-"
    med = {(t, l): st.median(steps(t, l)) for t in builds + ["peft"] for l in loads if steps(t, l)}
    print("| lorafit build | load | lorafit step, s: median [min-max] (steps) | PEFT step, s: median [min-max] (steps) | lorafit / PEFT | per round: median [min-max] | CPU s per wall s: lorafit, PEFT | outside load, cores: lorafit, PEFT |")
    print("|---|---|---|---|---|---|---|---|")
    for b in builds:
        for l in loads:
            per = []
            for rd in sorted({r["round"] for r in rows}):
                a = [r for r in rows if r["round"] == rd and r["load"] == l and r["result"]]
                lf = [r["result"]["step_s_median"] for r in a if r["tool"] == b]
                pf = [r["result"]["step_s_median"] for r in a if r["tool"] == "peft"]
                if lf and pf:
                    per.append(lf[0] / pf[0])
            pr = f"{st.median(per):.2f} [{min(per):.2f}-{max(per):.2f}]" if per else "-"
            ratio = f"**{med[(b, l)] / med[('peft', l)]:.2f}**" if (b, l) in med and ("peft", l) in med else "-"
            print(f"| {b} | {name(l)} | {cell(b, l)} | {cell('peft', l)} | {ratio} | {pr} | {per_wall('cpu_s', b, l)}, {per_wall('cpu_s', 'peft', l)} | {per_wall('outside_cores', b, l)}, {per_wall('outside_cores', 'peft', l)} |")
    print()
    if 0 in loads:
        print("| lorafit build | load | lorafit slowdown (loaded / idle) | PEFT slowdown (loaded / idle) | loaded ratio / idle ratio (target <= 1.10) |")
        print("|---|---|---|---|---|")
        for b in builds:
            for l in loads:
                if l == 0 or any(k not in med for k in [(b, 0), ("peft", 0), (b, l), ("peft", l)]):
                    continue
                sl, sp = med[(b, l)] / med[(b, 0)], med[("peft", l)] / med[("peft", 0)]
                print(f"| {b} | {name(l)} | {sl:.2f} | {sp:.2f} | **{sl / sp:.2f}** |")
        print()

la = [r["loadavg_before"] for r in all_rows]
out = [r["outside_cores"] for r in all_rows]
print(f"1-min load average before each process: median {st.median(la):.2f}, max {max(la):.2f} (the spinners included); "
      f"outside load while each ran: median {st.median(out):.2f} cores, max {max(out):.2f}")
print()
quiet = [r for r in all_rows if r["outside_cores"] <= max_outside]
print(f"**Processes that ran with under {max_outside} cores of outside load** ({len(quiet)} of {len(all_rows)}):")
print()
tables(quiet)
print(f"All {len(all_rows)} processes:")
print()
tables(all_rows)
PY
} | tee "$MD"
log "raw results: $RAW; table: $MD"
