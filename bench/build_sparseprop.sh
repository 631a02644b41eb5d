#!/usr/bin/env bash
# Builds SparseProp (Nikdan et al., ICML 2023; github.com/IST-DASLab/sparseprop, the published CPU sparse-training
# kernels) from its source into a venv of its own, for bench/bench_sparse_training.py --sparseprop-python. It is never
# a dependency of ptd_sparse: the benchmark only runs bench/sparseprop_runner.py with that venv's python.
#
#   bash bench/build_sparseprop.sh SOURCE [VENV]      # VENV defaults to /tmp/sp/venv
#
# SOURCE is a checkout of the repository or a git directory of it (a bare mirror is fine): from a git directory only
# the files the build needs are exported, since the repository's example checkpoints (examples/models/*.pt) may be
# absent from a mirror and would break a plain checkout (git may then print "invalid object" for them; the export
# is still complete). The build is SparseProp's own setup.py, unchanged: it
# compiles the extension, imported as the top-level module `backend`, with -O3 -march=native -fopenmp -ffast-math
# (its kernels are AVX2 + FMA intrinsics; -march=native lets the compiler use what else this CPU has). torch 2.13.0 is
# the CPU build; setup.py shells out to `pip` and `python3`, so the venv's bin comes first on PATH.
set -euo pipefail
SOURCE=${1:?usage: build_sparseprop.sh SOURCE [VENV]}
VENV=${2:-/tmp/sp/venv}
SOURCE=$(cd "$SOURCE" && pwd)

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [ -f "$SOURCE/setup.py" ]; then
    cp -r "$SOURCE/setup.py" "$SOURCE/sparseprop" "$WORK/"
    cp "$SOURCE/README.md" "$SOURCE/LICENSE" "$SOURCE/MANIFEST.in" "$WORK/" 2>/dev/null || true
else
    echo "exporting setup.py and sparseprop/ from the git directory $SOURCE at $(git --git-dir="$SOURCE" rev-parse HEAD)"
    git --git-dir="$SOURCE" archive HEAD setup.py sparseprop README.md LICENSE MANIFEST.in | tar -x -C "$WORK"
fi

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
export PATH="$VENV/bin:$PATH"
python -m pip install --quiet "torch==2.13.0" pybind11 scipy numpy setuptools wheel
# --no-build-isolation: build against the venv's pybind11 (setup.py asks `python3 -m pybind11 --includes`).
python -m pip install --quiet --no-build-isolation --no-deps "$WORK"
cd /tmp
python - <<'PY'
import torch
import backend  # SparseProp's extension
from sparseprop.modules import SparseConv2d
print("SparseProp built:", backend.__file__, "torch", torch.__version__)
PY
