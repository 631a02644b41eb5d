"""Sparse convolution against dense F.conv2d (oneDNN on CPU) on the CIFAR VGG 3x3 layers, across densities.

For each layer and density: forward time of F.conv2d on the dense masked weight (the baseline, measured in the same
run), of ptd_sparse's sparse kernel, and of forward + backward for both. Medians after warm-up; ratios are
baseline / candidate (> 1 means ptd_sparse is faster). Writes a table to stdout and JSON to bench/results/.

Pin threads on shared virtual machines, or two threads may share a core and every figure is off:
    GOMP_CPU_AFFINITY="0 1" OMP_NUM_THREADS=2 python bench/bench_sparse_conv2d.py
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import ptd_sparse
from timing import median_ms  # bench/timing.py

# (channels, spatial size) of the 3x3 layers of CIFAR VGG, one per resolution.
VGG_LAYERS = ((64, 32), (128, 16), (256, 8), (512, 4), (512, 2))


@dataclass(frozen=True)
class Row:
    layer: str
    density: float
    dense_forward_ms: float
    sparse_forward_ms: float
    forward_speedup: float
    dense_train_ms: float
    sparse_train_ms: float
    train_speedup: float


def measure(channels: int, size: int, density: float, batch: int, backend: str, warmup: int, repeats: int) -> Row:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=generator)
    weight = torch.randn(channels, channels, 3, 3, generator=generator)
    mask = torch.rand(weight.shape, generator=generator) < density
    dense_weight = weight * mask
    x_train = x.clone().requires_grad_()
    w_train = weight.clone().requires_grad_()
    grad_out = torch.randn(batch, channels, size, size, generator=generator)

    def dense_forward():
        with torch.no_grad():
            F.conv2d(x, dense_weight, padding=1)

    def sparse_forward():
        with torch.no_grad():
            ptd_sparse.masked_conv2d(x, weight, mask, padding=1, backend=backend)

    def dense_train():
        out = F.conv2d(x_train, w_train * mask, padding=1)
        torch.autograd.grad(out, (x_train, w_train), grad_out)

    def sparse_train():
        out = ptd_sparse.masked_conv2d(x_train, w_train, mask, padding=1, backend=backend)
        torch.autograd.grad(out, (x_train, w_train), grad_out)

    timings = [median_ms(fn, warmup, repeats) for fn in (dense_forward, sparse_forward, dense_train, sparse_train)]
    return Row(f"{channels}x{channels}@{size}x{size}", density, timings[0], timings[1], timings[0] / timings[1],
               timings[2], timings[3], timings[2] / timings[3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02])
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="indices into the VGG layer list (default: all)")
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sparse_conv2d.json")
    args = parser.parse_args()

    layers = [VGG_LAYERS[i] for i in args.layers] if args.layers else VGG_LAYERS
    rows = []
    header = (f"{'layer':>16} {'density':>7} {'dense fwd ms':>12} {'sparse fwd ms':>13} {'fwd x':>6} "
              f"{'dense f+b ms':>12} {'sparse f+b ms':>13} {'f+b x':>6}")
    print(f"batch {args.batch}, float32, backend {args.backend}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, GOMP_CPU_AFFINITY={os.environ.get('GOMP_CPU_AFFINITY', 'unset')}")
    print(header)
    for channels, size in layers:
        for density in args.densities:
            row = measure(channels, size, density, args.batch, args.backend, args.warmup, args.repeats)
            rows.append(row)
            print(f"{row.layer:>16} {row.density:>7.2f} {row.dense_forward_ms:>12.2f} {row.sparse_forward_ms:>13.2f} "
                  f"{row.forward_speedup:>6.2f} {row.dense_train_ms:>12.2f} {row.sparse_train_ms:>13.2f} "
                  f"{row.train_speedup:>6.2f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"batch": args.batch, "backend": args.backend, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
            "pinning": os.environ.get("GOMP_CPU_AFFINITY", "unset")}
    args.out.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
