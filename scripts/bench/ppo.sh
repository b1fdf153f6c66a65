#!/usr/bin/env bash
# PPO benchmark (docs/BENCHMARKS.md, "PPO"): the time of each phase of one PPO iteration
# (generate, score, logprobs, update) and the peak memory, 4 prompts x 64 prompt tokens, 32 new
# tokens, KoGPT2-shaped GPT-2 (builtin:kogpt2-shape, random weights), f32 on CPU: `lorafit ppo`
# next to a PyTorch + PEFT loop doing the same work (scripts/bench/peft_ppo.py), measured in the
# same run on the same machine.
#
#   scripts/bench/ppo.sh          # ~8 minutes on a busy 2-core box
#
# Setup (not timed): an SFT adapter and a reward model for the builtin model, one optimizer step
# each on data/sft_sample.json and data/rm_sample.json (lorafit sft / lorafit rm, r=8 on c_attn),
# and a prompts file whose prompts render to more than 64 tokens (cut to the last 64).
# Then ROUNDS times, interleaved with alternating order, each tool in a fresh process:
#   lorafit: lorafit ppo --model builtin:kogpt2-shape --sft-adapter SFT --reward-adapter RM
#            --data PROMPTS --set train.max_steps=2 --set train.batch_size=4
#            --set ppo.max_prompt_len=64 --set ppo.max_new_tokens=32 --set ppo.minibatch_size=4
#            --set ppo.ppo_epochs=1 --set ppo.top_k=0 --set ppo.stop=[] (via lorafit_ppo.py)
#   PEFT:    scripts/bench/peft_ppo.py --model <the same folder> --prompts 4 --prompt-len 64
#            --new-tokens 32 --iterations 2 --threads 2
# The table reads the second iteration of each process (the first includes warm-up).
# Environment: ROUNDS (3), and those of scripts/bench/common.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
BENCH=ppo
ROUNDS=${ROUNDS:-3}
source scripts/bench/common.sh

WORK=$OUT_DIR/ppo-work-$STAMP
mkdir -p "$WORK"
TEMPLATE='data.template="Q: {prompt}\nA:"'
log "setup: SFT adapter, reward model, prompts (not timed)"
"$LORAFIT" sft --model "$MODEL" --data data/sft_sample.json --out "$WORK/sft" --force --set train.max_steps=1 \
  --set train.batch_size=1 --set data.max_len=128 --set data.eval_fraction=0 --set "$TEMPLATE" >/dev/null 2>>"$OUT_DIR/$BENCH-$STAMP.stderr"
"$LORAFIT" rm --model "$MODEL" --data data/rm_sample.json --out "$WORK/rm" --force --set train.max_steps=1 \
  --set train.batch_size=1 --set data.max_len=128 --set data.eval_fraction=0 --set "$TEMPLATE" >/dev/null 2>>"$OUT_DIR/$BENCH-$STAMP.stderr"
"$PYTHON" - "$WORK/prompts.json" <<'PY'
import json, sys
text = "The quick brown fox jumps over the lazy dog while the benchmark counts tokens. " * 2
json.dump([{"prompt": f"{text}{i}"} for i in range(8)], open(sys.argv[1], "w"))
PY

CFG='{"kind": "ppo", "prompts": 4, "prompt_len": 64, "new_tokens": 32}'
one() { # round tool
  local round=$1 tool=$2
  if [[ $tool == lorafit ]]; then
    record "$round" lorafit "$CFG" -- "$PYTHON" scripts/bench/lorafit_ppo.py "$LORAFIT" "$WORK/ppo-$round" -- \
      --model "$MODEL" --sft-adapter "$WORK/sft" --reward-adapter "$WORK/rm" --data "$WORK/prompts.json" \
      --set "$TEMPLATE" --set train.max_steps=2 --set train.batch_size=4 --set ppo.max_prompt_len=64 \
      --set ppo.max_new_tokens=32 --set ppo.minibatch_size=4 --set ppo.ppo_epochs=1 --set ppo.top_k=0 --set 'ppo.stop=[]'
  else
    record "$round" peft "$CFG" -- "$PYTHON" scripts/bench/peft_ppo.py --model "$DIR" --prompts 4 --prompt-len 64 \
      --new-tokens 32 --iterations 2 --threads "$THREADS" --attn "$ATTN"
  fi
}

for round in $(seq 1 "$ROUNDS"); do
  if (( round % 2 == 0 )); then order="lorafit peft"; else order="peft lorafit"; fi
  for tool in $order; do one "$round" "$tool"; done
done

CMD="scripts/bench/ppo.sh"
[[ $ROUNDS != 3 || $THREADS != 2 || $ATTN != sdpa ]] && CMD="ROUNDS=$ROUNDS THREADS=$THREADS ATTN=$ATTN $CMD"
[[ -n "${LORAFIT_BIN:-}" ]] && CMD="LORAFIT_BIN=$LORAFIT_BIN $CMD"
summarize ppo "$CMD"
