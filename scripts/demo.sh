#!/usr/bin/env bash
# The main job: sets up the environment (scripts/setup.sh), then runs the API example of the README.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${PTD_VENV:-.venv}"
exec "$VENV/bin/python" examples/quickstart.py "$@"
