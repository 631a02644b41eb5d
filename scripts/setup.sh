#!/usr/bin/env bash
# Sets up everything ptd-sparse needs in a virtual environment (default .venv; PTD_VENV overrides): the pinned torch,
# the build and test tools, and the package itself with its C++ extension compiled against that torch.
# Idempotent: rerunning it only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${PTD_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
# The torch build is pinned so that no requirement pulls another one by accident. Where a CUDA toolkit is found
# (CUDA_HOME, or nvcc in /usr/local/cuda), the CUDA 13.0 build torch==2.14.1 is installed and the extension's CUDA
# kernels are compiled and linked (they need no GPU to build; it pulls triton, whose kernels the tests run through
# the interpreter). Otherwise torch==2.13.0, the small CPU build. On this project's machines both install from
# local disk. PTD_TORCH_SPEC overrides the choice.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  DEFAULT_TORCH_SPEC="torch==2.14.1"
else
  DEFAULT_TORCH_SPEC="torch==2.13.0"
fi
TORCH_SPEC="${PTD_TORCH_SPEC:-$DEFAULT_TORCH_SPEC}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade "pip>=23" 2>/dev/null || true
"$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
"$VENV/bin/python" -m pip install --quiet "setuptools>=64" wheel ninja numpy pytest pytest-benchmark expecttest safetensors tqdm matplotlib
# --no-build-isolation: compile against the torch installed above, not one fetched into an isolated build env.
# The build is skipped when nothing it depends on changed since the last one: the sources, the torch it was built
# for, and the variables that choose its code (PTD_NATIVE, PTD_CPU_ARCH, PTD_SKIP_CUDA_BUILD; setup.py). A
# -march=native build also depends on the CPU it was made on, so its stamp holds this CPU's flags. The extension is
# rebuilt, too, when it refuses to load here (ptd_sparse._extension: another torch, CPU features this CPU lacks).
build_stamp() {
  local choices="PTD_NATIVE=${PTD_NATIVE:-0} PTD_CPU_ARCH=${PTD_CPU_ARCH:-} PTD_SKIP_CUDA_BUILD=${PTD_SKIP_CUDA_BUILD:-0}"
  if [ "${PTD_NATIVE:-0}" = "1" ] || [ "${PTD_CPU_ARCH:-}" = "native" ]; then
    choices="$choices $(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || uname -m)"
  fi
  (cat setup.py pyproject.toml; find csrc -type f | sort | xargs cat; echo "$choices"
   "$VENV/bin/python" -c 'import torch; print(torch.__version__)') | sha256sum | cut -d' ' -f1
}
STAMP="$VENV/.ptd_build_stamp"
CURRENT="$(build_stamp)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$CURRENT" ] || ! "$VENV/bin/python" -c \
    "import sys, ptd_sparse._extension as e; sys.exit(e.extension_problem() is not None)" 2>/dev/null; then
  "$VENV/bin/python" -m pip install --quiet --no-build-isolation -e .
  echo "$CURRENT" > "$STAMP"
fi
# The optional extras (pyproject.toml), installed where they can be; their tests skip where they are absent.
# torchvision and timm go in with --no-deps: their requirements on torch would let pip swap the pinned build for
# another. torchvision 0.29 is built for torch 2.14 only (there is no build for the CPU torch 2.13.0 here), and timm
# needs torchvision. PTD_SKIP_EXTRAS=1 skips them all.
if [ "${PTD_SKIP_EXTRAS:-0}" != "1" ]; then
  "$VENV/bin/python" -c "import onnx, onnxruntime, tensorboard" 2>/dev/null \
    || "$VENV/bin/python" -m pip install --quiet onnx onnxruntime tensorboard \
    || echo "setup: the export and tensorboard extras could not be installed; their tests will skip" >&2
  case "$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')" in
    2.14.1*)
      "$VENV/bin/python" -c "import torchvision, timm" 2>/dev/null \
        || { "$VENV/bin/python" -m pip install --quiet --no-deps "torchvision==0.29.1" "timm>=1.0" \
             && "$VENV/bin/python" -m pip install --quiet pyyaml huggingface_hub; } \
        || echo "setup: torchvision and timm could not be installed; their tests will skip" >&2 ;;
    *) echo "setup: no torchvision build pairs with this torch; the torchvision and timm tests will skip" >&2 ;;
  esac
fi
"$VENV/bin/python" -c "
import torch, ptd_sparse, ptd_sparse._extension as e
assert e.extension_problem() is None, e.extension_problem()
cuda = 'with its CUDA kernels' if e.has_compiled_cuda() else 'CPU kernels only'
assert not (torch.version.cuda and '${CUDA_HOME:-}' and '${PTD_SKIP_CUDA_BUILD:-0}' != '1') or e.has_compiled_cuda(), \
    'torch has CUDA and a toolkit was found, but the extension was built without its CUDA kernels'
print('ptd_sparse', ptd_sparse.__version__, 'ready in', '$VENV', '(torch', torch.__version__ + ',', cuda + ')')"
