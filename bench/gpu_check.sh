#!/usr/bin/env bash
# GPU check: the engine's and the response functions' exactness tests, and the scoring
# benchmark, on CUDA.
# Skips cleanly (exit 0, one line saying why) where CUDA is not available.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: skipped: torch $("$PY" -c 'import torch; print(torch.__version__)') sees no CUDA device"
    exit 0
fi
"$PY" -c 'import torch; print("gpu_check: CUDA device:", torch.cuda.get_device_name(0))'
"$PY" -m pytest tests/gpu -m gpu -q -p no:cacheprovider
"$PY" -m bench.scoring --device cuda --no-peers "$@"
