"""Same configuration, same seeds, same bytes: a run's results depend on neither timings nor interruptions.

Two runs of one small configuration (teacher, one pruning target, the teacher-logit cache, students) are compared
file by file: checkpoints, caches, designs and the summary must be byte-identical. In the second run every route
measurement is forced to pick the slowest route (the reverse of what the machine's timings say), so anything whose
numbers depended on which route won would differ. Then a third run is killed with SIGKILL at several points
(teacher training, a pruning round, cache writing, distillation) and resumed each time; it must end identical too.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pipeline_helpers import fake_fashion_mnist, tiny_run_overrides

from ptd_sparse import cli
from ptd_sparse.nn import measured_route

# Files that record when or how fast something ran, or the run's own folder (not what it computed).
TIMING_FILES = {"metrics.jsonl", "summary.md", "config.json"}
TIMING_SUFFIXES = {".png", ".log", ".lock"}


def overrides(root: Path) -> list[str]:
    settings = tiny_run_overrides(root) + ["prune.targets=[0.59]", "cache.enabled=true", "cache.chunk=64",
                                           "run.seeds=1", "distill.epochs=2"]
    return [part for override in settings for part in ("--set", override)]


def run_files(out: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file that holds a result."""
    files = {}
    for path in sorted(out.rglob("*")):
        if path.is_file() and path.name not in TIMING_FILES and path.suffix not in TIMING_SUFFIXES:
            files[str(path.relative_to(out))] = path.read_bytes()
    return files


def without_timings(value):
    """A JSON value with its timing fields (seconds, timestamps, throughput) left out."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items()
                if not any(word in k for word in ("seconds", "time", "per_s", "started", "finished", "host", "pid"))}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def assert_same_results(first: Path, second: Path) -> None:
    a, b = run_files(first), run_files(second)
    assert sorted(a) == sorted(b)
    assert any(name.endswith("logits.bin") for name in a), "the configuration must write a logit cache"
    for name in a:
        if name.endswith(".json"):
            assert without_timings(json.loads(a[name])) == without_timings(json.loads(b[name])), name
        else:
            assert a[name] == b[name], f"{name} differs between the two runs"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return fake_fashion_mnist(tmp_path_factory.mktemp("data"), train=300, test=60)


@pytest.fixture(scope="module")
def reference_run(data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "reference"
    assert cli.main(["run", "--out", str(out)] + overrides(data_root)) == 0
    return out


def test_route_timings_do_not_change_any_result(reference_run, data_root, tmp_path, monkeypatch):
    original = measured_route.fastest

    def slowest(routes, input):
        _, seconds = original(routes, input)
        return max(seconds, key=seconds.get), seconds

    monkeypatch.setattr(measured_route, "fastest", slowest)
    out = tmp_path / "reversed"
    assert cli.main(["run", "--out", str(out)] + overrides(data_root)) == 0
    assert_same_results(reference_run, out)
    routes = json.loads(next(out.rglob("routes.json")).read_text())
    assert routes and set(routes.values()) <= {"sparse", "dense"}  # recorded, and from the density rule


def test_sigkills_at_every_stage_then_resume_give_the_same_results(reference_run, data_root, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "ptd_sparse.cli", "run", "--out", str(out)] + overrides(data_root)
    # Kill when each of these appears (a stage has started writing), then start the same command again.
    kill_points = ["teacher/state.pt", "prune/**/state.pt", "cache/**/chunks/*.json", "students/**/state.pt"]
    for pattern in kill_points:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while process.poll() is None and time.time() < deadline and not list(out.glob(pattern)):
            time.sleep(0.02)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()
    finish = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finish.returncode == 0, finish.stderr[-3000:]
    assert_same_results(reference_run, out)
