#!/usr/bin/env bash
# The Triton backend's tests on the CPU, through Triton's interpreter (TRITON_INTERPRET=1): sets up the environment
# (scripts/setup.sh), adds triton where the torch build brought none (the CPU torch 2.13.0 does not; the CUDA torch
# 2.14.1 brings triton 3.8), and runs every test whose name holds "triton" (about 1.5 minutes on 2 cores).
# PTD_TRITON_SPEC picks the triton to add (default triton==3.6.0, the GPU machine's). Triton 3.6's interpreter needs
# numpy < 2.3 (it converts one-element arrays to Python ints, which newer numpy refuses).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${PTD_VENV:-.venv}"
if ! "$VENV/bin/python" -c "import triton" 2>/dev/null; then
  "$VENV/bin/python" -m pip install --quiet "${PTD_TRITON_SPEC:-triton==3.6.0}"
fi
if "$VENV/bin/python" -c "import sys, triton; sys.exit(not triton.__version__.startswith('3.6'))"; then
  "$VENV/bin/python" -m pip install --quiet "numpy<2.3"
fi
TRITON_INTERPRET=1 exec "$VENV/bin/python" -m pytest -q -k triton "$@"
