#!/usr/bin/env bash
# The C++ kernels under AddressSanitizer and UBSan: builds the extension with PTD_SANITIZE=1 (setup.py adds
# -fsanitize=address,undefined) into a temporary copy of the sources, never into this checkout, and runs the tests
# of the C++ backend against it: tests/test_sparse_conv2d.py and tests/test_kd_loss.py (-k cpu) and the format fuzz
# test (tests/test_fuzz_formats.py, whose worker processes inherit the sanitizer). Python itself is not
# instrumented, so libasan is preloaded. Any out-of-bounds access, use after free or undefined behaviour in the
# kernels aborts the process that hit it, and the tests fail. Usage: bash scripts/sanitize.sh [extra pytest args]
# Environment: PTD_VENV (default .venv); PTD_SANITIZE_DIR=folder builds there and keeps it (else a temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
VENV="${PTD_VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PY="$VENV/bin/python"
if [ -n "${PTD_SANITIZE_DIR:-}" ]; then  # a folder kept between runs: the build is incremental
  WORK="$PTD_SANITIZE_DIR"
  mkdir -p "$WORK"
else
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/ptd-sanitize.XXXXXX")"
  trap 'rm -rf "$WORK"' EXIT
fi
echo "sanitize: building in $WORK"

mkdir -p "$WORK/src"
rm -rf "$WORK/src/csrc" "$WORK/src/kernels" "$WORK/src/ptd_sparse" "$WORK/src/tests"
cp -rp csrc kernels ptd_sparse tests setup.py pyproject.toml README.md "$WORK/src/"  # -p: unchanged files stay built
find "$WORK/src" \( -name "_C*.so" -o -name __pycache__ \) -prune -exec rm -rf {} +
(cd "$WORK/src" && PTD_SANITIZE=1 PTD_SKIP_CUDA_BUILD=1 "$PY" setup.py -q build_ext --inplace > "$WORK/build.log" 2>&1) \
  || { tail -40 "$WORK/build.log"; echo "sanitize: the build failed (log above)"; exit 1; }
SO="$(ls "$WORK"/src/ptd_sparse/_C*.so)"
nm -D "$SO" | grep __asan_init > /dev/null || { echo "sanitize: $SO is not instrumented"; exit 1; }

ASAN_RUNTIME="$(gcc -print-file-name=libasan.so)"
[ -e "$ASAN_RUNTIME" ] || { echo "sanitize: libasan.so not found (gcc -print-file-name=libasan.so)"; exit 1; }
# libstdc++ too: the interpreter does not link it, and ASan's __cxa_throw interceptor must find it at start-up, or
# the first C++ exception (importing triton, say) aborts with "CHECK failed ... real___cxa_throw".
PRELOAD="$ASAN_RUNTIME $(gcc -print-file-name=libstdc++.so)"
# detect_leaks=0: the interpreter and torch keep allocations until exit by design, which LeakSanitizer would report.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
cd "$WORK/src"
LD_PRELOAD="$PRELOAD" PYTHONPATH="$WORK/src" "$PY" -m pytest -q -p no:cacheprovider -k cpu \
  tests/test_sparse_conv2d.py tests/test_kd_loss.py tests/test_fuzz_formats.py "$@"
