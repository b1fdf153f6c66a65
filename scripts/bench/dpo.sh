#!/usr/bin/env bash
# DPO benchmark (docs/BENCHMARKS.md, "DPO"): the time and peak memory of DPO steps on a
# KoGPT2-shaped GPT-2 (builtin:kogpt2-shape, random weights), 2 pairs per step, each sequence
# 256 tokens (a 128-token prompt, a 127-token completion + eos; the builtin tokenizer is
# byte-level, so 1 ASCII character = 1 token), LoRA r=8 on every linear layer (c_attn, c_proj,
# c_fc), f32 on CPU, sigmoid loss, beta 0.1, no dropout (TRL's disable_dropout): lorafit next to
# TRL 1.16's DPOTrainer with a PEFT model (reference = the adapter disabled) in the same run.
#
#   scripts/bench/dpo.sh          # ~10 minutes on a busy 2-core box
#
# Each tool runs in a fresh process per round, interleaved with alternating order, ROUNDS times;
# each process does 1 warm-up + STEPS timed steps:
#   lorafit:         scripts/bench/lorafit_dpo.py: lorafit dpo --model builtin:kogpt2-shape --data PAIRS
#                    --set data.template="{prompt}" ... (the step = time_reference_s + time_update_s)
#   lorafit precomp: the same with dpo.precompute_ref = true (the step runs the policy only)
#   TRL:             scripts/bench/trl_dpo.py --model <the same folder> --data PAIRS --pairs 2 --steps STEPS
# Environment: ROUNDS (2), STEPS (3), and those of scripts/bench/common.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
BENCH=dpo
ROUNDS=${ROUNDS:-2}
STEPS=${STEPS:-3}
PAIRS=2
source scripts/bench/common.sh
"$PYTHON" -c 'import trl' || { echo "$PYTHON cannot import trl" >&2; exit 1; }

DATA=$OUT_DIR/dpo-pairs-$STAMP.jsonl
"$PYTHON" - "$DATA" <<'PY'
import json, random, sys
r = random.Random(0)
text = lambda n: "".join(r.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(n))
with open(sys.argv[1], "w") as f:
    for _ in range(8):
        f.write(json.dumps({"prompt": text(128), "chosen": text(127), "rejected": text(127)}) + "\n")
PY

one() { # round tool
  local round=$1 tool=$2
  local cfg
  cfg=$(printf '{"kind": "dpo", "pairs": %d, "seq": 256, "tool_config": "%s"}' $PAIRS "$tool")
  case $tool in
    lorafit|lorafit-precompute)
      local pre=false; [[ $tool == lorafit-precompute ]] && pre=true
      record "$round" "$tool" "$cfg" -- "$PYTHON" scripts/bench/lorafit_dpo.py "$LORAFIT" "$OUT_DIR/dpo-run-$STAMP" -- \
        --model "$MODEL" --data "$DATA" --set 'data.template="{prompt}"' --set data.max_len=512 --set data.eval_fraction=0 \
        --set 'lora.target_modules=["c_attn","c_proj","c_fc"]' --set lora.r=8 --set lora.lora_alpha=16 --set lora.lora_dropout=0.0 \
        --set train.batch_size=$PAIRS --set train.max_steps=$((STEPS + 1)) --set train.lr=1e-4 --set 'train.schedule="constant"' \
        --set train.group_by_length=false --set train.save_every=0 --set dpo.precompute_ref=$pre ;;
    trl)
      record "$round" trl "$cfg" -- "$PYTHON" scripts/bench/trl_dpo.py --model "$DIR" --data "$DATA" --pairs $PAIRS \
        --steps "$STEPS" --targets c_attn,c_proj,c_fc --r 8 --threads "$THREADS" --attn "$ATTN" ;;
  esac
}

for round in $(seq 1 "$ROUNDS"); do
  if (( round % 2 == 1 )); then order="trl lorafit lorafit-precompute"; else order="lorafit-precompute lorafit trl"; fi
  for tool in $order; do one "$round" "$tool"; done
done

CMD="scripts/bench/dpo.sh"
[[ $ROUNDS != 2 || $STEPS != 3 || $THREADS != 2 ]] && CMD="ROUNDS=$ROUNDS STEPS=$STEPS THREADS=$THREADS $CMD"
"$PYTHON" - "$RAW" "$CMD" "$(lscpu | sed -n 's/^Model name: *//p')" "$(lscpu | sed -n 's/^CPU family: *//p')" "$GIT_DESC" <<'PY' | tee "$MD"
import json, statistics, sys
raw, cmd, cpu, family, git = sys.argv[1:6]
rows = [json.loads(l) for l in open(raw)]
by = {}
for r in rows:
    if r["result"]:
        by.setdefault(r["tool"], []).append(r)
med = lambda t, k: statistics.median(r["result"][k] for r in by.get(t, [])) if by.get(t) else float("nan")
loads = [r["loadavg_before"] for r in rows]
trl = by.get("trl", [{}])[0].get("result") or {}
print(f"### DPO step: KoGPT2 shape, 2 pairs x 256 tokens, LoRA r=8 on c_attn/c_proj/c_fc, CPU f32\n")
print(f"Command: `{cmd}` (lorafit {git}; TRL {trl.get('trl', '1.16.0')}, torch {trl.get('torch', '?')}, transformers {trl.get('transformers', '?')}, peft {trl.get('peft', '?')}).")
print(f"Machine: {cpu} (CPU family {family}), {len(set(r['round'] for r in rows))} rounds, 1-minute load average before each process: "
      f"min {min(loads):.2f}, median {statistics.median(loads):.2f}, max {max(loads):.2f} (2 threads per tool; a shared machine).\n")
print("| tool | step (median) | peak RSS | step vs TRL | peak RSS vs TRL |")
print("|---|---|---|---|---|")
ts, tm = med("trl", "step_s_median"), med("trl", "peak_rss_bytes")
for t, name in [("trl", "TRL DPOTrainer + PEFT (reference: adapter disabled)"), ("lorafit", "lorafit dpo"), ("lorafit-precompute", "lorafit dpo, precompute_ref = true")]:
    s, m = med(t, "step_s_median"), med(t, "peak_rss_bytes")
    print(f"| {name} | {s:.2f} s | {m / 2**20:.0f} MiB | {s / ts:.2f}x | {m / tm:.2f}x |")
s0, s1 = med("lorafit", "step_s_median"), med("lorafit-precompute", "step_s_median")
print(f"\nprecompute_ref saves {100 * (1 - s1 / s0):.0f}% of a lorafit step ({s0:.2f} s -> {s1:.2f} s; the reference pass alone: "
      f"{med('lorafit', 'reference_s_median'):.2f} s).")
print(f"Per process step times: " + "; ".join(f"{t}: " + ", ".join(f"{r['result']['step_s_median']:.2f}" for r in rs) for t, rs in by.items()))
PY
log "raw results: $RAW; table: $MD"
