#!/usr/bin/env bash
# The test command: sets up the environment (scripts/setup.sh), then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${PTD_VENV:-.venv}"
exec "$VENV/bin/python" -m pytest -q "$@"
