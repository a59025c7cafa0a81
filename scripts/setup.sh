#!/usr/bin/env bash
# Create .venv and install DeepFlow into it (sourced by quickstart.sh and test.sh).
#
# CPU machines get the CPU build of PyTorch (torch==2.13.0). With a CUDA GPU, install a CUDA
# build first, e.g. `DEEPFLOW_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${DEEPFLOW_TORCH:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.deepflow-installed
want="$(sha256sum pyproject.toml | cut -c1-16) $TORCH_SPEC"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "==> installing PyTorch ($TORCH_SPEC) and DeepFlow into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, pinned, so nothing later resolves an unpinned (multi-GB CUDA) build.
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q $TORCH_SPEC
  .venv/bin/python -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
