#!/usr/bin/env bash
# Quality of the 4-bit (NF4) frozen base: per-file perplexity of stories260K (a real
# pretrained tiny LLaMA, ../shared/assets) on its own golden text, f32 / f16 / NF4 bases.
#   bash scripts/bench/nf4_quality.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q
model=../shared/assets/stories260K
text=$(mktemp)
python3 -c "
import json; g = json.load(open('$model/golden.json'))
print('\n'.join(l for l in g['greedy_from_bos']['text'].split('\n') if l.strip()))" > "$text"
echo "| base | perplexity over $(wc -l < "$text") lines |"
echo "|---|---|"
for cfg in "f32 none" "f16 none" "f32 nf4" "f16 nf4"; do
  set -- $cfg
  ppl=$(target/release/lorafit eval --model "$model" --data "$text" --dtype "$1" --quantize "$2" 2>/dev/null | tail -1)
  echo "| $1, quantize=$2 | ${ppl#perplexity } |"
done
rm -f "$text"
