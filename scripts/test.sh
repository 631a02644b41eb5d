#!/usr/bin/env bash
# The test command: sets up the environment (scripts/setup.sh), then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${PTD_VENV:-.venv}"
# Triton kernels run on CPU tensors through Triton's interpreter, so the triton backend is tested wherever triton is
# installed (the CUDA torch build brings it; scripts/test_triton.sh adds it to a CPU-only setup).
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
exec "$VENV/bin/python" -m pytest -q "$@"
