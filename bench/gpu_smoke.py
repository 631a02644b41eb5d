"""End-to-end smoke of the GPU training path, the first step of bench/gpu_check.

Runs `ptd run` at toy size on the GPU with the pipeline's GPU defaults (bfloat16 autocast, channels_last): once
with the teacher live in distillation, once with the teacher-logit cache; then `ptd train` under torchrun with one
rank per visible GPU (at most 2, NCCL). Each step runs in its own process with a time limit. Prints one line per step
and, first, every failure with the end of its output; writes the outcome as JSON.

    python bench/gpu_smoke.py --json OUT/gpu_smoke.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from pipeline_helpers import fake_fashion_mnist, tiny_run_overrides  # noqa: E402


def ptd(command: str, out: Path, data: Path, *extra: str) -> list[str]:
    overrides = tiny_run_overrides(data) + ["run.device=\"cuda\"", "prune.targets=[0.59]"] + list(extra)
    return [command, "--out", str(out)] + [item for o in overrides for item in ("--set", o)]


def run_step(name: str, command: list[str], timeout: int) -> dict:
    started = time.time()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        ok, tail = result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    except subprocess.TimeoutExpired as error:
        ok, tail = False, f"timed out after {timeout} s\n" + str(error.stdout or "")[-2000:]
    return {"step": name, "ok": ok, "seconds": round(time.time() - started, 1), "tail": tail}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "gpu_smoke.json")
    parser.add_argument("--timeout", type=int, default=90, help="seconds per step")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="ptd_gpu_smoke_"))
    data = fake_fashion_mnist(work / "data", train=600, test=200)
    cli = [sys.executable, "-m", "ptd_sparse.cli"]
    ranks = min(torch.cuda.device_count(), 2)
    steps = [
        ("ptd run, live teacher, bf16 autocast, channels_last", cli + ptd("run", work / "live", data)),
        ("ptd run, teacher-logit cache, bf16 autocast, channels_last",
         cli + ptd("run", work / "cached", data, "cache.enabled=true")),
        (f"ptd train under torchrun, {ranks} rank(s), NCCL",
         [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
          "-m", "ptd_sparse.cli"] + ptd("train", work / "ddp", data)),
    ]
    results = [run_step(name, command, args.timeout) for name, command in steps]
    for failed in (r for r in results if not r["ok"]):
        print(f"gpu_smoke FAILED: {failed['step']} ({failed['seconds']} s)\n{failed['tail']}\n")
    for r in results:
        print(f"gpu_smoke {'ok    ' if r['ok'] else 'FAILED'} {r['seconds']:6.1f} s  {r['step']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "steps": results}, indent=1))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
