"""Fused KD loss (forward + backward) against the eager PyTorch composition, measured in the same run.

Baseline: alpha * T^2 * kl_div(log_softmax(s/T), log_softmax(t/T), batchmean, log_target) + (1 - alpha) *
cross_entropy(s, y), differentiated by autograd. Candidate: ptd_sparse.kd_loss on the chosen backend. Reports median
times, the speed-up, and the peak memory each path adds beyond its inputs (resident-set high-water mark of a fresh
process; it includes the gradient that stays in student.grad).

    GOMP_CPU_AFFINITY="0 1" OMP_NUM_THREADS=2 python bench/bench_kd_loss.py
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import ptd_sparse
from timing import median_ms  # bench/timing.py

SHAPES = ((256, 100), (128, 1000), (8192, 32000))
T, ALPHA = 4.0, 0.9


def eager(student, teacher, target):
    kl = F.kl_div(F.log_softmax(student / T, 1), F.log_softmax(teacher / T, 1), reduction="batchmean",
                  log_target=True)
    return ALPHA * T * T * kl + (1 - ALPHA) * F.cross_entropy(student, target)


def fused(backend):
    def run(student, teacher, target):
        return ptd_sparse.kd_loss(student, teacher, target, temperature=T, alpha=ALPHA, backend=backend)
    return run


def step(loss_fn, student, teacher, target):
    student.grad = None
    loss_fn(student, teacher, target).backward()


def peak_extra_bytes(path: str, rows: int, classes: int, dtype: str, backend: str) -> int:
    """Peak resident memory one forward + backward adds beyond its inputs, measured in a fresh process (the CPU
    allocator keeps no statistics): the high-water mark after the step minus the resident size before it."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_kd_loss as b; "
            f"b.child_memory({path!r}, {rows}, {classes}, {dtype!r}, {backend!r})")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child_memory(path: str, rows: int, classes: int, dtype: str, backend: str) -> None:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(rows, classes, generator=generator).to(getattr(torch, dtype)).requires_grad_()
    teacher = torch.randn(rows, classes, generator=generator).to(getattr(torch, dtype))
    target = torch.randint(0, classes, (rows,), generator=generator)
    loss_fn = eager if path == "eager" else fused(backend)
    tiny = torch.randn(2, 3).requires_grad_()
    step(loss_fn, tiny, torch.randn(2, 3), torch.zeros(2, dtype=torch.long))  # library start-up, not the loss
    before = resident_bytes()
    step(loss_fn, student, teacher, target)
    print(max(0, high_water_bytes() - before))


def high_water_bytes() -> int:
    """VmHWM of this process. (ru_maxrss would not do: Linux carries it over from the parent across exec.)"""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kd_loss.json")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"T={T}, alpha={ALPHA}, {args.dtype}, backend {args.backend}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, GOMP_CPU_AFFINITY={os.environ.get('GOMP_CPU_AFFINITY', 'unset')}")
    print(f"{'rows x classes':>16} {'eager ms':>9} {'fused ms':>9} {'speed-up':>8} {'eager peak MB':>13} "
          f"{'fused peak MB':>13} {'grad MB':>8}")
    rows = []
    for n, c in SHAPES:
        generator = torch.Generator().manual_seed(0)
        student = torch.randn(n, c, generator=generator).to(dtype).requires_grad_()
        teacher = torch.randn(n, c, generator=generator).to(dtype)
        target = torch.randint(0, c, (n,), generator=generator)
        repeats = max(3, args.repeats // (3 if n * c > 1e8 else 1))
        eager_ms = median_ms(lambda: step(eager, student, teacher, target), args.warmup, repeats)
        fused_ms = median_ms(lambda: step(fused(args.backend), student, teacher, target), args.warmup, repeats)
        eager_peak = peak_extra_bytes("eager", n, c, args.dtype, args.backend)
        fused_peak = peak_extra_bytes("fused", n, c, args.dtype, args.backend)
        grad_bytes = student.numel() * student.element_size()
        row = dict(rows=n, classes=c, eager_ms=eager_ms, fused_ms=fused_ms, speedup=eager_ms / fused_ms,
                   eager_peak_bytes=eager_peak, fused_peak_bytes=fused_peak, grad_bytes=grad_bytes)
        rows.append(row)
        print(f"{f'{n} x {c}':>16} {eager_ms:>9.2f} {fused_ms:>9.2f} {eager_ms / fused_ms:>8.2f} "
              f"{eager_peak / 2**20:>13.1f} {fused_peak / 2**20:>13.1f} {grad_bytes / 2**20:>8.1f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(backend=args.backend, dtype=args.dtype, torch=torch.__version__, threads=torch.get_num_threads(),
                pinning=os.environ.get("GOMP_CPU_AFFINITY", "unset"),
                max_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
