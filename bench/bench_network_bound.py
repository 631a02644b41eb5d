"""How fast a pruned network could run on this CPU at best, from the two ceilings of bench_roofline.py: the
multiply-adds a second of a large sgemm (the FMA peak, what oneDNN's dense convolutions approach) and of the sparse
kernel's inner loop with one vector load per FMA, all loads from L1 (bench/fma_ceiling.cpp, the load-fed ceiling).
Each convolution takes the faster of its dense multiply-adds at the peak and its nonzero ones at the load-fed ceiling
(what a per-layer route choice between oneDNN and any sparse kernel that loads one input vector per nonzero
multiply-add from L1 could reach);
everything else (pools, ReLUs, the classifier, Python) counts as free. The sum is a lower bound on the network's
time, so eager / bound and best dense / bound are upper bounds on the speed-ups the issue's whole-network targets ask
for. A second, nearer bound takes the kernel's own loop instead (rows of listed taps with their tiles reloaded, inputs
in L1: fma_ceiling.cpp's tap_rows), the most this kernel design could give with every input load served by L1.
Printed beside the eager and best dense times measured in the same run; the speed-ups ptd_sparse reaches are
bench_network.py's and bench_byo_model.py's.

Models: the CIFAR VGGs of bench_network.py (the authors' 79% and global 90% / 95%) and the torchvision-style
ResNet18 at 224 x 224 of bench_byo_model.py (global 90%).

    GOMP_CPU_AFFINITY="0 1" OMP_NUM_THREADS=2 python bench/bench_network_bound.py [--batches 64 1]
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_byo_model import pruned_user_model  # noqa: E402
from bench_network import best_dense_forms, eager_dense, pruned_model  # noqa: E402
from bench_roofline import load_fed_ceilings, sgemm_gmacs  # noqa: E402
from machine import cpu_vector_extensions  # noqa: E402
from timing import median_ms  # noqa: E402

# (label, builder, input size): the networks the whole-network targets name.
NETWORKS = [("CIFAR VGG19 79%", lambda: pruned_model("vgg19", "authors"), 32),
            ("CIFAR VGG19 90%", lambda: pruned_model("vgg19", "global0.9"), 32),
            ("CIFAR VGG19 95%", lambda: pruned_model("vgg19", "global0.95"), 32),
            ("CIFAR VGG11 90%", lambda: pruned_model("vgg11", "global0.9"), 32),
            ("CIFAR VGG11 95%", lambda: pruned_model("vgg11", "global0.95"), 32),
            ("ResNet18 224 90%", lambda: pruned_user_model("resnet18", "global0.9"), 224)]


def convolution_macs(model: nn.Module, size: int) -> list[tuple[int, int]]:
    """(dense, nonzero) multiply-adds of each convolution of `model` for one size x size image."""
    positions = {}
    def record(module, _, out):
        positions[module] = out.shape[-2] * out.shape[-1]

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return [(m.weight.numel() * count, int((m.weight != 0).sum()) * count) for m, count in positions.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 1])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")  # best_dense_forms' torch.jit
    from ptd_sparse import _C

    isa = _C.cpu_kernel_isa()
    peak = max(sgemm_gmacs() for _ in range(3))
    ceilings = load_fed_ceilings(isa)
    ceiling, kernel_loop = ceilings["l1"], ceilings["tap_rows_l1"]
    print(f"CPU: {cpu_vector_extensions()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"peak (2048^3 sgemm, fastest of 3) {peak:.1f} GMAC/s; load-fed ceiling ({isa} copy, L1) {ceiling:.1f} "
          f"GMAC/s "
          f"({100 * ceiling / peak:.1f}% of peak): a layer runs sparse at best below density {ceiling / peak:.2f}; the "
          f"kernel's own loop from L1 {kernel_loop:.1f} GMAC/s ({100 * kernel_loop / peak:.1f}%)")
    print(f"{'network':18} {'batch':>5} {'convs at peak':>13} {'bound':>8} {'kernel bound':>12} {'eager':>8} "
          f"{'best dense':>10} {'eager/bound':>11} {'dense/bound':>11} {'eager/kernel b.':>15}  (ms)")
    for label, build, size in NETWORKS:
        model = build()
        dense = eager_dense(model)  # weight * mask as plain layers: the zeros are in the weights
        macs = convolution_macs(dense, size)
        for batch in args.batches:
            at_peak_ms = sum(d for d, _ in macs) * batch / peak / 1e6
            bound_ms = sum(min(d / peak, nz / ceiling) for d, nz in macs) * batch / 1e6
            kernel_bound_ms = sum(min(d / peak, nz / kernel_loop) for d, nz in macs) * batch / 1e6
            x = torch.randn(batch, 3, size, size)
            with torch.no_grad():
                eager_ms = median_ms(lambda: dense(x), 2, args.repeats)
                best_ms = min(median_ms(lambda: run(x), 2, args.repeats) for run in best_dense_forms(dense, x).values())
            print(f"{label:18} {batch:5d} {at_peak_ms:13.2f} {bound_ms:8.2f} {kernel_bound_ms:12.2f} {eager_ms:8.2f} "
                  f"{best_ms:10.2f} {eager_ms / bound_ms:10.2f}x {best_ms / bound_ms:10.2f}x "
                  f"{eager_ms / kernel_bound_ms:14.2f}x", flush=True)


if __name__ == "__main__":
    main()
