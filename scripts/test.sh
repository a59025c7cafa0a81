#!/usr/bin/env bash
# The test suite on a fresh machine: set up, then run every test that needs no GPU
# (unit tests, end-to-end tests with real processes, the real SmolLM2 test).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec python -m pytest -m "not gpu" "$@"
