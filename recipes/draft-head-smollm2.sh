#!/usr/bin/env bash
# A draft head for SmolLM2-135M-Instruct (docs/BENCHMARKS.md, "Speculative decoding with a draft head"): the run
# that made the head measured there, on one H100 (about 11 minutes in all, 8 of them the model answering 24,000
# prompts). On a CPU the same commands work, at about 500 tokens/s of training.
#   bash recipes/draft-head-smollm2.sh [ALPACA_JSONL] [OUT]
#   pocketlm run smollm2 "Hello" --draft OUT/head
set -euo pipefail
DATA=${1:-../shared/data/alpaca/alpaca_data.jsonl}
OUT=${2:-out/draft}
# 1. the model's own greedy answers to 24,000 Alpaca prompts (no repetition penalty), and a head trained on them
pocketlm train-draft --target smollm2 --data "$DATA" -o "$OUT/plain" --target-answers 24000 --generate-batch 512 \
  --repetition-penalty 1.0 --epochs 5 --eval-every 300
# 2. 12,000 more answers under the repetition penalty run and chat apply by default (1.1)
pocketlm train-draft --target smollm2 --data "$DATA" -o "$OUT/penalized" --target-answers 12000 --generate-batch 512 \
  --max-new-tokens 200 --epochs 5 --eval-every 250
# 3. the head used: both sets of answers, one step per proposal (the CPU's best --draft-tokens is 1)
cat "$OUT/plain/target_answers.jsonl" "$OUT/penalized/target_answers.jsonl" > "$OUT/answers.jsonl"
pocketlm train-draft --target smollm2 --data "$OUT/answers.jsonl" -o "$OUT/head" --unroll 1 --epochs 4 --eval-every 400
