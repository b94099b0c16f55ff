#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its dev tools into it.
# torch is pinned to the CPU build in pyproject.toml; see README for CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[dev]"
