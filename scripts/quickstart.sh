#!/usr/bin/env bash
# The main job on a fresh machine: set up, start DeepFlow with embedded defaults (SQLite and a
# local node), get SmolLM2-135M-Instruct, deploy it and stream its answer to a question.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
deepflow up
deepflow models pull smollm2-135m-instruct
deepflow deploy smollm2 --model smollm2-135m-instruct
deepflow chat smollm2 "${1:-What is the capital of France?}" --temperature 0
