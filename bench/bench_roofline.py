"""Roofline of the sparse convolution kernel: nonzero multiply-adds per second and their share of this CPU's peak.

The peak is measured in the same run by a large float32 matrix product (torch.mm, 2048^3, oneDNN/MKL near the FMA
peak of the cores given), the reference DESIGN.md names: the fastest of three before and three after the layers, since
on a shared machine a busy moment only ever lowers it (one sgemm measured 67.5 GMAC/s in a run where others gave
85-91). Beside each layer, F.conv2d's own rate on the dense weight (its multiply-adds, zeros included), which on
oneDNN can pass the sgemm's. Each layer (the 3x3 layers of the CIFAR VGG19 and ResNet18)
is timed through the raw forward operator (torch.ops.ptd_sparse_kernels.conv_forward: no Python around it) for
every CPU kernel copy this build and CPU have (PTD_CPU_ISA is read once per process, so each copy runs in a process
of its own), beside F.conv2d on the dense weight in the same process. Medians after warm-up.

Two more ceilings, measured per kernel copy in its worker (bench/fma_ceiling.cpp, compiled there with that copy's
vector width): the multiply-adds a second of the kernel's own inner loop, one broadcast weight and a block of FMAs
that each load an input vector, with its inputs in L1 and in L2, beside the same loop with two and four FMAs per
vector loaded from L1. Where a core loads fewer vectors a cycle than it runs FMAs, that loop, and so any kernel that
loads one input vector per nonzero multiply-add, stays below the ceiling of the level its loads come from; each
layer's share of the L1 ceiling is printed beside its share of the peak. Last, the kernel's loop as a chunked task
runs it (rows of listed (offset, value) taps, each row's accumulators reloaded from its tile), from L1 and from L2:
what the forward's inner loop gives alone, without packing, tap lists or writing the outputs.

    GOMP_CPU_AFFINITY="0 1" OMP_NUM_THREADS=2 python bench/bench_roofline.py [--batches 64 1] [--densities 0.1 0.05]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_vector_extensions  # noqa: E402
from timing import median_ms  # noqa: E402

# (name, channels in = out, map size): the 3x3 layers of CIFAR VGG19 (64@32 .. 512@2) and ResNet18 (64@32 .. 512@4).
LAYERS = [("vgg/resnet 64@32x32", 64, 32), ("vgg/resnet 128@16x16", 128, 16), ("vgg/resnet 256@8x8", 256, 8),
          ("vgg/resnet 512@4x4", 512, 4), ("vgg 512@2x2", 512, 2)]


def sgemm_gmacs(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    return size ** 3 / median_ms(lambda: torch.mm(a, b), 2, repeats) / 1e6


def layer_case(channels: int, size: int, batch: int, density: float):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=generator)
    weight = torch.randn(channels, channels, 3, 3, generator=generator)
    mask = torch.rand(weight.shape, generator=generator) < density
    return x, weight * mask, mask


# Per kernel copy: the -m flags, floats per vector and register block of csrc/cpu/isa/kernels_<isa>.cpp.
CEILING_BUILDS = {"avx512": (["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx2", "-mfma"], 16, 16),
                  "avx2": (["-mavx2", "-mfma"], 8, 12), "baseline": ([], 4, 12)}


# Inputs per thread of the ceilings' loops: within any of the machines' L1 (32-48 KiB), and beyond it within L2.
L1_KIB, L2_KIB = 16, 512
# Taps per output row and chunk of the kernel-shaped loop (tap_rows): about what the tiled forward's chunks hold at
# density 0.1 (csrc/cpu/tiled_conv_f32.h: at least kMinChunkTaps = 16 a row).
TAPS_PER_ROW = 18


def load_fed_ceilings(isa: str) -> dict:
    """GMAC/s of bench/fma_ceiling.cpp's loops for this kernel copy, all threads: one vector load per FMA (the sparse
    kernel's inner loop) from L1 and from L2, and two and four FMAs per vector loaded from L1. Compiled on first use
    (torch.utils.cpp_extension, ninja; about half a minute)."""
    from torch.utils.cpp_extension import load

    flags, lanes, accumulators = CEILING_BUILDS[isa]
    module = load(name=f"ptd_fma_ceiling_{isa}", sources=[str(Path(__file__).with_name("fma_ceiling.cpp"))],
                  extra_cflags=["-O2", "-fopenmp", *flags, f"-DPTD_CEILING_LANES={lanes}",
                                f"-DPTD_CEILING_ACCUMULATORS={accumulators}"],
                  extra_ldflags=["-fopenmp"], verbose=False)  # at::parallel_for is OpenMP in torch's CPU builds
    return {"l1": module.one_load_per_fma_gmacs(L1_KIB), "l2": module.one_load_per_fma_gmacs(L2_KIB),
            "two_fmas_per_load": module.two_fmas_per_load_gmacs(L1_KIB),
            "four_fmas_per_load": module.four_fmas_per_load_gmacs(L1_KIB),
            "tap_rows_l1": module.tap_rows_gmacs(L1_KIB, TAPS_PER_ROW),
            "tap_rows_l2": module.tap_rows_gmacs(L2_KIB, TAPS_PER_ROW)}


def measure_layers(batches, densities, repeats: int) -> list[dict]:
    """Rows for this process's kernel copy."""
    from ptd_sparse import _C
    from ptd_sparse.pattern import SparseConvWeight

    rows = []
    for batch in batches:
        for density in densities:
            for name, channels, size in LAYERS:
                x, weight, mask = layer_case(channels, size, batch, density)
                sparse = SparseConvWeight.from_dense(weight, mask)
                p = sparse.pattern
                args = (x, sparse.values, p.row_ptr, p.col_idx, list(p.shape), None, [1, 1], [1, 1], [1, 1], False)
                op = torch.ops.ptd_sparse_kernels.conv_forward
                warmup = 2 if batch > 1 else 5
                sparse_ms = median_ms(lambda: op(*args), warmup, repeats)
                dense_ms = median_ms(lambda: F.conv2d(x, weight, None, 1, 1), warmup, repeats)
                macs = sparse.nnz * batch * size * size
                dense_macs = weight.numel() * batch * size * size
                rows.append({"isa": _C.cpu_kernel_isa(), "layer": name, "batch": batch, "density": density,
                             "sparse_ms": sparse_ms, "dense_ms": dense_ms, "gmacs": macs / sparse_ms / 1e6,
                             "dense_gmacs": dense_macs / dense_ms / 1e6})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 1])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.05])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--isas", nargs="+", default=None, help="kernel copies to run (default: all this CPU runs)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        from ptd_sparse import _C

        print(json.dumps({"ceilings": load_fed_ceilings(_C.cpu_kernel_isa()),
                          "rows": measure_layers(args.batches, args.densities, args.repeats)}))
        return

    from ptd_sparse import _C

    isas = args.isas or list(_C.cpu_kernel_isas())
    peaks = [sgemm_gmacs() for _ in range(3)]
    rows, ceilings = [], {}
    for isa in isas:
        command = [sys.executable, __file__, "--worker", "--repeats", str(args.repeats), "--batches",
                   *map(str, args.batches), "--densities", *map(str, args.densities)]
        result = subprocess.run(command, env={**os.environ, "PTD_CPU_ISA": isa}, capture_output=True, text=True,
                                check=True)
        report = json.loads(result.stdout.strip().splitlines()[-1])
        rows += report["rows"]
        ceilings[isa] = report["ceilings"]
    peaks += [sgemm_gmacs() for _ in range(3)]
    peak = max(peaks)
    print(f"CPU: {cpu_vector_extensions()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"peak (2048^3 sgemm, fastest of 6 in this run): {peak:.1f} GMAC/s "
          f"(all: {', '.join(f'{p:.1f}' for p in peaks)})")
    for isa, ceiling in ceilings.items():
        print(f"load-fed ceilings, {isa} copy (bench/fma_ceiling.cpp): one vector load per FMA from L1 "
              f"{ceiling['l1']:.1f} GMAC/s ({100 * ceiling['l1'] / peak:.1f}% of peak), from L2 {ceiling['l2']:.1f} "
              f"({100 * ceiling['l2'] / peak:.1f}%); two FMAs per load {ceiling['two_fmas_per_load']:.1f}, four "
              f"{ceiling['four_fmas_per_load']:.1f}; the kernel's own loop (rows of {TAPS_PER_ROW} listed taps, each "
              f"row's tile reloaded; tiles and taps streamed as in the kernel) with its input windows in L1 "
              f"{ceiling['tap_rows_l1']:.1f} ({100 * ceiling['tap_rows_l1'] / peak:.1f}%), in L2 "
              f"{ceiling['tap_rows_l2']:.1f} ({100 * ceiling['tap_rows_l2'] / peak:.1f}%)")
    print(f"{'isa':8} {'layer':22} {'batch':>5} {'density':>7} {'sparse ms':>10} {'GMAC/s':>7} {'of peak':>7} "
          f"{'of L1 ceil':>10} {'F.conv2d ms':>11} {'its GMAC/s':>10} {'speed-up':>8}")
    for row in rows:
        ceiling = ceilings[row["isa"]]["l1"]
        print(f"{row['isa']:8} {row['layer']:22} {row['batch']:5d} {row['density']:7.2f} {row['sparse_ms']:10.3f} "
              f"{row['gmacs']:7.1f} {100 * row['gmacs'] / peak:6.1f}% {100 * row['gmacs'] / ceiling:9.1f}% "
              f"{row['dense_ms']:11.3f} {row['dense_gmacs']:10.1f} {row['dense_ms'] / row['sparse_ms']:7.2f}x")


if __name__ == "__main__":
    main()
