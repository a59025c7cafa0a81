#!/usr/bin/env bash
# Fine-tune SmolLM2-135M-Instruct on the bundled demo dataset (docs/examples/fine-tune-demo.jsonl,
# which teaches it the name of DeepFlow's mascot), deploy the result and ask it, timing each step.
# Starts the platform if it is not running; extra arguments go to `deepflow finetune create`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
question="What is the name of DeepFlow's mascot?"
start=$SECONDS
step() { printf '\n== %s (%ds so far)\n' "$1" $((SECONDS - start)); }

step "start the platform and get the base model"
deepflow up
deepflow models pull smollm2-135m-instruct

step "the base model, before"
deepflow deployments get smollm2 >/dev/null 2>&1 || deepflow deploy smollm2 --model smollm2-135m-instruct
deepflow chat smollm2 "$question" --temperature 0 --max-tokens 40

step "fine-tune"
model=$(deepflow finetune create --model smollm2-135m-instruct \
    --file docs/examples/fine-tune-demo.jsonl --suffix mascot --follow --json "$@" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["fine_tuned_model"])')
echo "fine-tuned model: $model"

step "deploy it and ask again"
deepflow deployments delete mascot >/dev/null 2>&1 || true
deepflow deploy mascot --model "$model"
deepflow chat mascot "$question" --temperature 0 --max-tokens 40

step "done"
