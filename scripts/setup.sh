#!/usr/bin/env bash
# Sets up everything ptd-sparse needs in a virtual environment (default .venv; PTD_VENV overrides): the pinned torch,
# the build and test tools, and the package itself with its C++ extension compiled against that torch.
# Idempotent: rerunning it only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${PTD_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
# torch 2.13.0 is the small CPU build (on this project's machines it installs from local disk); pin it so no
# requirement pulls a multi-GB CUDA build by accident.
TORCH_SPEC="${PTD_TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade "pip>=23" 2>/dev/null || true
"$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
"$VENV/bin/python" -m pip install --quiet "setuptools>=64" wheel ninja numpy pytest pytest-benchmark expecttest safetensors tqdm matplotlib
# --no-build-isolation: compile against the torch installed above, not one fetched into an isolated build env.
# The build is skipped when neither the sources nor the torch it was built for changed since the last one.
STAMP="$VENV/.ptd_build_stamp"
CURRENT="$( (cat setup.py pyproject.toml; find csrc -type f | sort | xargs cat; "$VENV/bin/python" -c 'import torch; print(torch.__version__)') | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$CURRENT" ] || ! "$VENV/bin/python" -c "import ptd_sparse._C" 2>/dev/null; then
  "$VENV/bin/python" -m pip install --quiet --no-build-isolation -e .
  echo "$CURRENT" > "$STAMP"
fi
"$VENV/bin/python" -c "import ptd_sparse, ptd_sparse._extension as e; assert e.extension_problem() is None, e.extension_problem(); print('ptd_sparse', ptd_sparse.__version__, 'ready in', '$VENV')"
