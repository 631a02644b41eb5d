#!/usr/bin/env bash
# The main job: sets up the environment (scripts/setup.sh) and Fashion-MNIST, then runs the default prune-then-
# distill pipeline (`ptd run`, configs/default.toml: 3 seeds per student) into runs/default. Extra arguments go to
# `ptd run` (for example --seeds 5, or --set distill.epochs=8; on a machine shared with other busy processes,
# --set run.threads=1 avoids two OpenMP threads spin-waiting for each other, see docs/results.md). An interrupted run
# resumes when started again. Output to a file or a pipe is one line per epoch, not a redrawn progress bar.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${PTD_VENV:-.venv}"
FASHION_MNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FASHION_MNIST" ]; then
  if [ "$(id -u)" = "0" ]; then
    (apt-get install -y dataset-fashion-mnist || (apt-get update && apt-get install -y dataset-fashion-mnist)) >/dev/null
  else
    sudo apt-get install -y dataset-fashion-mnist >/dev/null
  fi
fi
# Two pinned threads: on shared virtual machines unpinned threads can land on one core.
export GOMP_CPU_AFFINITY="${GOMP_CPU_AFFINITY:-0 1}"
exec "$VENV/bin/ptd" run --config configs/default.toml --out runs/default "$@"
