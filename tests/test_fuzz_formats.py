"""Randomly corrupted sparse formats and state dicts on every backend that runs on this machine's CPU: every case
must raise a clear exception (ValueError, TypeError or RuntimeError with a message), never crash or return.

Each backend runs in its own process (tests/fuzz_formats_worker.py), so a crash (a segfault, heap corruption, an
abort) fails that backend's test with the process's exit status instead of killing pytest. The counts of corrupted
inputs and entry-point calls are printed (pytest -s) and checked. Under a minute in all on two CPU cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import runnable_backends

from ptd_sparse.backends import SPARSE_CONV

HERE = Path(__file__).resolve().parent
# Corrupted inputs per backend. Under Triton's interpreter each kernel launch is a Python loop, so fewer cases, and
# only one refused load in 25 is followed by a real forward on the backend (one in 5 elsewhere).
CASES = {"cpu": 3000, "reference": 2000, "triton": 400}
SEEDS = {"cpu": 0, "reference": 1, "triton": 2}


@pytest.mark.parametrize("backend", [p for p in runnable_backends(SPARSE_CONV) if p.values[0] in CASES])
def test_corrupted_formats_raise_clear_errors(backend):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(HERE / "fuzz_formats_worker.py"), backend, str(CASES[backend]),
                           str(SEEDS[backend])], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode >= 0, \
        f"the {backend} fuzz process crashed (signal {-done.returncode}):\n{done.stderr[-3000:]}"
    assert done.returncode == 0, f"corrupted inputs accepted on {backend}:\n{done.stderr[-3000:]}"
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nfuzz {backend}: {counts['cases']} corrupted inputs, {counts['calls']} refused calls, "
          f"{counts['forward_runs_after_refusal']} forwards after a refused load; by kind: {counts['kinds']}")
    assert counts["cases"] == CASES[backend] and counts["failures"] == 0
    assert counts["calls"] >= counts["cases"]
    assert len(counts["kinds"]) >= 17  # every kind of corruption was drawn
