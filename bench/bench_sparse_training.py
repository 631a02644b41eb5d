"""Sparse training of one 3x3 layer: forward + backward (input gradient and weight gradient, the latter at the unmasked
positions only) of ptd_sparse against dense autograd, and against SparseProp (Nikdan et al., ICML 2023, the published
CPU sparse-training kernels) when its venv is given.

For each layer (CIFAR VGG and ResNet18 3x3 layers, and ResNet18's ImageNet-size 64@56x56 and 512@7x7), density and
batch, the time of one training step of the layer (rounds alternate between the candidates, so drift on a shared
machine hits all alike; the figure is the median over rounds of each round's median):
  dense      F.conv2d(x, w * mask) with torch autograd (oneDNN), gradients of x and w; the baseline, same run;
  ptd mask   ptd_sparse.masked_conv2d(x, w, mask, backend="cpu") with autograd (w's gradient is zero off the mask);
  ptd csr    ptd_sparse.sparse_conv2d(x, SparseConvWeight) whose `values` [nnz] is the trained tensor, as SparseProp's
             W_val is;
  SparseProp its SparseConv2d module on NCHW input, in bench/sparseprop_runner.py, a process running in SparseProp's
             own venv (built by bench/build_sparseprop.sh) and answering this one; the faster of its two kernels
             (vectorised over the batch or over the output columns) per case.
Every case is first checked against dense autograd (output, input gradient, weight gradient); a mismatch stops the run,
so the times compare correct computations. Ratios: dense / ptd (> 1: ptd is faster than dense) and SparseProp / ptd
(> 1: ptd is faster than SparseProp; the target is >= 1.2). Table to stdout, JSON to bench/results/.

Pin threads on shared virtual machines, or two threads may share a core and every figure is off:
    GOMP_CPU_AFFINITY="0 1" OMP_NUM_THREADS=2 python bench/bench_sparse_training.py --batches 16 64 \\
        [--sparseprop-python /tmp/sp/venv/bin/python]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

import ptd_sparse
from ptd_sparse.files import write_json
from machine import cpu_vector_extensions  # bench/machine.py
from conv_cases import case_tensors  # bench/conv_cases.py
from timing import call_times_ms  # bench/timing.py

HERE = Path(__file__).resolve().parent
# (name, channels, spatial size, networks): 3x3, stride 1, padding 1, as many input as output channels. CIFAR VGG and
# CIFAR ResNet18 share their first four shapes.
LAYERS = (
    ("64@32x32", 64, 32, "VGG, ResNet18 (CIFAR)"),
    ("128@16x16", 128, 16, "VGG, ResNet18 (CIFAR)"),
    ("256@8x8", 256, 8, "VGG, ResNet18 (CIFAR)"),
    ("512@4x4", 512, 4, "VGG, ResNet18 (CIFAR)"),
    ("512@2x2", 512, 2, "VGG (CIFAR)"),
    ("64@56x56", 64, 56, "ResNet18 (ImageNet)"),
    ("512@7x7", 512, 7, "ResNet18 (ImageNet)"),
)
TOLERANCE = 1e-3  # largest difference from dense autograd, relative to the tensor's largest magnitude (float32)
TARGET = 1.2  # the target for SparseProp time / ptd time


@dataclass(frozen=True)
class Row:
    layer: str
    networks: str
    batch: int
    density: float
    dense_ms: float
    ptd_masked_ms: float
    ptd_csr_ms: float
    dense_over_ptd: float  # dense / ptd masked
    max_error_ptd: float
    sparseprop_ms: float | None = None
    sparseprop_vectorised_over: str | None = None
    sparseprop_over_ptd: float | None = None  # SparseProp / ptd masked
    sparseprop_over_ptd_csr: float | None = None
    max_error_sparseprop: float | None = None
    # The fastest single call of each candidate (dense, masked, csr, sparseprop): on a machine shared with other
    # work the least disturbed call, a second view beside the medians.
    fastest_ms: dict | None = None


def relative_error(pairs) -> float:
    """Largest |a - b| / max|b| over (candidate, reference) pairs."""
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in pairs)


class SparseProp:
    """bench/sparseprop_runner.py running in SparseProp's venv, answering one request a line (see its main())."""

    def __init__(self, python: str):
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        self.process = subprocess.Popen([python, str(HERE / "sparseprop_runner.py")], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"bench/sparseprop_runner.py ended (exit status {self.process.wait()}) on {request}; "
                               "its error is printed above")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def measure(name: str, channels: int, size: int, networks: str, batch: int, density: float, warmup: int,
            repeats: int, rounds: int, sparseprop: SparseProp | None) -> Row:
    """Checks every candidate against dense autograd, then times them in `rounds` alternating rounds (so drift on a
    shared machine hits all alike); each figure is the median over rounds of a round's median of `repeats` calls."""
    x, weight, mask, grad_out = case_tensors(batch, channels, size, density)
    x_train = x.clone().requires_grad_()
    w_train = weight.clone().requires_grad_()
    csr = ptd_sparse.SparseConvWeight.from_dense(weight, mask)
    csr.values.requires_grad_()

    def dense():
        out = F.conv2d(x_train, w_train * mask, padding=1)
        return torch.autograd.grad(out, (x_train, w_train), grad_out), out

    def ptd_masked():
        out = ptd_sparse.masked_conv2d(x_train, w_train, mask, padding=1, backend="cpu")
        return torch.autograd.grad(out, (x_train, w_train), grad_out), out

    def ptd_csr():
        out = ptd_sparse.sparse_conv2d(x_train, csr, padding=1, backend="cpu")
        return torch.autograd.grad(out, (x_train, csr.values), grad_out), out

    (grad_x, grad_w), out = dense()
    (grad_x_m, grad_w_m), out_m = ptd_masked()
    (grad_x_c, grad_values), out_c = ptd_csr()
    error = relative_error(((out_m, out), (grad_x_m, grad_x), (grad_w_m, grad_w),
                            (out_c, out), (grad_x_c, grad_x), (grad_values, csr.pattern.gather(grad_w))))
    if error > TOLERANCE:
        raise RuntimeError(f"{name} batch {batch} density {density}: ptd_sparse differs from dense autograd by "
                           f"{error:.2e} (relative), more than {TOLERANCE}; not timing a wrong computation")
    if sparseprop is not None:
        prepared = sparseprop.ask(op="case", case=[batch, channels, size, density])
        if prepared["nnz"] != int(mask.sum()):
            raise RuntimeError(f"{name}: SparseProp's runner drew a mask of {prepared['nnz']} nonzeros, this process "
                               f"{int(mask.sum())}: the two torch builds draw different random numbers")
        if prepared["max_abs_error"] > TOLERANCE:
            raise RuntimeError(f"{name} batch {batch} density {density}: SparseProp differs from dense autograd by "
                               f"{prepared['max_abs_error']:.2e} (relative); not timing a wrong computation")
    rounds_ms = {key: [] for key in ("dense", "masked", "csr", "batch", "columns")}  # a list of call times a round
    for _ in range(rounds):
        for key, fn in (("dense", dense), ("masked", ptd_masked), ("csr", ptd_csr)):
            rounds_ms[key].append(call_times_ms(fn, warmup, repeats))
        if sparseprop is not None:
            for key, times in sparseprop.ask(op="time", warmup=warmup, repeats=repeats).items():
                rounds_ms[key].append(times)
    ms = {key: median_of_round_medians(times) for key, times in rounds_ms.items() if times}
    fastest = {key: min(min(times) for times in values) for key, values in rounds_ms.items() if values}
    row = Row(name, networks, batch, density, ms["dense"], ms["masked"], ms["csr"], ms["dense"] / ms["masked"],
              error, fastest_ms={key: fastest[key] for key in ("dense", "masked", "csr")})
    if sparseprop is None:
        return row
    over = min(("batch", "columns"), key=ms.get)
    return replace(row, sparseprop_ms=ms[over], sparseprop_vectorised_over=over,
                   sparseprop_over_ptd=ms[over] / ms["masked"], sparseprop_over_ptd_csr=ms[over] / ms["csr"],
                   max_error_sparseprop=prepared["max_abs_error"],
                   fastest_ms={**row.fastest_ms, "sparseprop": min(fastest["batch"], fastest["columns"])})


def median_of_round_medians(rounds: list[list[float]]) -> float:
    """The figure of one candidate: the median over rounds of each round's median call time."""
    return statistics.median(statistics.median(times) for times in rounds)


def format_row(row: Row) -> str:
    text = (f"{row.layer:>10} {row.batch:>5} {row.density:>7.2f} {row.dense_ms:>9.2f} {row.ptd_masked_ms:>9.2f} "
            f"{row.ptd_csr_ms:>9.2f} {row.dense_over_ptd:>7.2f}")
    if row.sparseprop_ms is not None:
        verdict = "yes" if max(row.sparseprop_over_ptd, row.sparseprop_over_ptd_csr) >= TARGET else "no"
        text += (f" {row.sparseprop_ms:>9.2f} {row.sparseprop_vectorised_over:>7} {row.sparseprop_over_ptd:>7.2f} "
                 f"{row.sparseprop_over_ptd_csr:>7.2f} {verdict:>6} "
                 f"{row.fastest_ms['sparseprop'] / min(row.fastest_ms['masked'], row.fastest_ms['csr']):>8.2f}")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.05])
    parser.add_argument("--layers", nargs="+", default=None, choices=[name for name, *_ in LAYERS],
                        help="layers to run (default: all)")
    parser.add_argument("--sparseprop-python", default=None,
                        help="python of SparseProp's venv (bench/build_sparseprop.sh); without it, no SparseProp")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before each round")
    parser.add_argument("--repeats", type=int, default=3, help="calls timed per round (their median)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (the median over rounds)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "sparse_training.json")
    args = parser.parse_args()
    if any(not 0.0 < d <= 1.0 for d in args.densities):
        parser.error(f"--densities must lie in (0, 1], got {args.densities}")
    if min(args.repeats, args.rounds) < 1 or args.warmup < 0:
        parser.error("--repeats and --rounds must be positive, --warmup not negative")
    if any(b < 1 for b in args.batches):
        parser.error(f"--batches must be positive, got {args.batches}")

    layers = [layer for layer in LAYERS if args.layers is None or layer[0] in args.layers]
    machine = cpu_vector_extensions()
    print(f"{machine}; float32; torch {torch.__version__}; {torch.get_num_threads()} threads; "
          f"GOMP_CPU_AFFINITY={os.environ.get('GOMP_CPU_AFFINITY', 'unset')}")
    header = (f"{'layer':>10} {'batch':>5} {'density':>7} {'dense ms':>9} {'ptd mask':>9} {'ptd csr':>9} "
              f"{'dense/ptd':>7}")
    if args.sparseprop_python:
        header += f" {'SP ms':>9} {'SP over':>7} {'SP/mask':>7} {'SP/csr':>7} {'>=1.2x':>6} {'min SP/':>8}"
    print("forward + backward (input and weight gradients) of one 3x3 layer, median ms; ptd = ptd_sparse backend cpu;")
    print("SP = SparseProp (over: its faster kernel); >=1.2x: SparseProp / the faster ptd form >= 1.2; min SP/: the "
          "same ratio of the fastest single calls")
    print(header)
    rows = []
    sparseprop = SparseProp(args.sparseprop_python) if args.sparseprop_python else None
    try:
        for batch in args.batches:
            for name, channels, size, networks in layers:
                for density in args.densities:
                    row = measure(name, channels, size, networks, batch, density, args.warmup, args.repeats,
                                  args.rounds, sparseprop)
                    rows.append(row)
                    print(format_row(row), flush=True)
    finally:
        if sparseprop is not None:
            sparseprop.close()
    meta = {"machine": machine, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "pinning": os.environ.get("GOMP_CPU_AFFINITY", "unset"), "warmup": args.warmup, "repeats": args.repeats,
            "rounds": args.rounds,
            "sparseprop_python": args.sparseprop_python, "target_sparseprop_over_ptd": TARGET}
    write_json(args.out, {"meta": meta, "rows": [asdict(r) for r in rows]})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
