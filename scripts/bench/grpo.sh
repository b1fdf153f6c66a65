#!/usr/bin/env bash
# GRPO benchmark (docs/BENCHMARKS.md, "GRPO"): one GRPO iteration, 2 prompts x group 4 x 64 new
# tokens, 64-token prompts, LoRA r=8 on c_attn,c_proj,c_fc, beta 0.04 (a reference pass),
# loss_type grpo, KoGPT2-shaped GPT-2 (builtin:kogpt2-shape, random weights), f32 on CPU:
# `lorafit grpo` next to TRL's GRPOTrainer with a PEFT model, no vLLM (scripts/bench/trl_grpo.py),
# measured in the same run on the same machine.
#
#   scripts/bench/grpo.sh          # ~5 minutes on a busy 2-core box
#
# Setup (not timed): 2 prompts of exactly 64 tokens under the model's tokenizer, and a regex
# reward (`#### <number>`) for both tools. Then ROUNDS times, interleaved with alternating order,
# each tool in a fresh process, 2 iterations each (the table reads the second: the first
# includes warm-up):
#   lorafit: lorafit grpo --model builtin:kogpt2-shape --data PROMPTS --config REWARDS
#            --set train.batch_size=2 --set grpo.group_size=4 --set grpo.max_new_tokens=64 ...
#            (via lorafit_grpo.py; iteration = the sum of its phase times)
#   TRL:     scripts/bench/trl_grpo.py --model <the same folder> --prompts-file PROMPTS --prompts 2
#            --group 4 --new-tokens 64 --iterations 2 (step = on_step_begin .. on_step_end)
# Both generate exactly 64 tokens per completion (TRL: min_new_tokens; lorafit: the random
# model does not emit eos within 64 tokens; the table shows the lengths).
# Environment: ROUNDS (2), and those of scripts/bench/common.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
BENCH=grpo
ROUNDS=${ROUNDS:-2}
source scripts/bench/common.sh

WORK=$OUT_DIR/grpo-work-$STAMP
mkdir -p "$WORK"
log "setup: prompts and the reward (not timed)"
"$PYTHON" - "$DIR" "$WORK/prompts.jsonl" <<'PY'
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
text = "The quick brown fox jumps over the lazy dog while the benchmark counts tokens. " * 8
with open(sys.argv[2], "w") as f:
    for i in range(2):
        ids = tok(f"{i} {text}")["input_ids"]
        n = 64
        while len(tok(tok.decode(ids[:n]))["input_ids"]) > 64:
            n -= 1
        f.write(json.dumps({"prompt": tok.decode(ids[:n])}) + "\n")
PY
printf '[[grpo.rewards]]\nkind = "regex"\npattern = "#### -?[0-9]+"\n' >"$WORK/rewards.toml"

CFG='{"kind": "grpo", "prompts": 2, "group": 4, "prompt_len": 64, "new_tokens": 64}'
one() { # round tool
  local round=$1 tool=$2
  if [[ $tool == lorafit ]]; then
    record "$round" lorafit "$CFG" -- "$PYTHON" scripts/bench/lorafit_grpo.py "$LORAFIT" "$WORK/grpo-$round" -- \
      --model "$MODEL" --data "$WORK/prompts.jsonl" --config "$WORK/rewards.toml" --set 'data.template="{prompt}"' \
      --set train.max_steps=2 --set train.batch_size=2 --set train.lr=1e-5 --set grpo.group_size=4 \
      --set grpo.max_new_tokens=64 --set grpo.max_prompt_len=64 --set grpo.top_k=0 --set grpo.beta=0.04 \
      --set 'grpo.loss_type="grpo"' --set grpo.sample_every=0 --set lora.r=8 --set lora.lora_alpha=16 \
      --set 'lora.target_modules=["c_attn","c_proj","c_fc"]'
  else
    record "$round" trl "$CFG" -- "$PYTHON" scripts/bench/trl_grpo.py --model "$DIR" --prompts-file "$WORK/prompts.jsonl" \
      --prompts 2 --group 4 --new-tokens 64 --iterations 2 --threads "$THREADS" --attn "$ATTN"
  fi
}

for round in $(seq 1 "$ROUNDS"); do
  if (( round % 2 == 0 )); then order="lorafit trl"; else order="trl lorafit"; fi
  for tool in $order; do one "$round" "$tool"; done
done

CMD="scripts/bench/grpo.sh"
[[ $ROUNDS != 2 || $THREADS != 2 || $ATTN != sdpa ]] && CMD="ROUNDS=$ROUNDS THREADS=$THREADS ATTN=$ATTN $CMD"
[[ -n "${LORAFIT_BIN:-}" ]] && CMD="LORAFIT_BIN=$LORAFIT_BIN $CMD"
"$PYTHON" scripts/bench/summarize_grpo.py "$RAW" --command "$CMD" --lorafit-version "$("$LORAFIT" --version)" --git "$GIT_DESC" | tee "$MD"
log "raw results: $RAW; table: $MD"
