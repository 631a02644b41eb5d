"""Resident weight bytes of a sparsified network, beside the dense model's: after sparsify, and after inference calls
at each batch size (which may build the dense copies of the layers whose route is dense).

Counted: every parameter and buffer (each storage once), plus what SparseConv2d derives: the dense copies per layout
and the prepacked oneDNN weight of its dense routes (the latter counted at its element count x 4 bytes), and the
transposed index view of calls that want gradients (none here: inference only).

    GOMP_CPU_AFFINITY="0 1" OMP_NUM_THREADS=2 python bench/bench_memory.py [--prunings global0.9 global0.95]
        [--routes measure sparse]

--routes: the sparsify route policies to compare ("measure", the default one, picks the fastest route per layer and
shape bucket and keeps one dense form for each layer that runs dense; "sparse" keeps only the nonzeros).
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

import ptd_sparse
from bench_network import eager_dense, pruned_model
from machine import cpu_vector_extensions  # bench/machine.py
from ptd_sparse.nn import SparseConv2d


def resident_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    for module in model.modules():
        if isinstance(module, SparseConv2d):
            if module._dense_cache is not None:
                tensors += list(module._dense_cache[1].values())
            if module._index_views is not None:
                tensors += list(module._index_views[1])
            if module._prepacked is not None:
                total += module._prepacked[1].numel() * 4  # an opaque oneDNN tensor: no storage to look at
    for tensor in tensors:
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vgg19"])
    parser.add_argument("--prunings", nargs="+", default=["global0.9", "global0.95"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--routes", nargs="+", default=["measure", "sparse"])
    args = parser.parse_args()
    print(f"CPU: {cpu_vector_extensions()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':8} {'pruning':11} {'routes':8} {'dense MB':>9} {'sparsified MB':>15} "
          + " ".join(f"{'after b' + str(b):>13}" for b in args.batches) + "  (share of dense)")
    for name in args.models:
        for pruning in args.prunings:
            pruned = pruned_model(name, pruning)
            dense = resident_bytes(eager_dense(pruned))
            for routes in args.routes:
                model = ptd_sparse.sparsify(pruned, routes=routes)
                after = [resident_bytes(model)]
                with torch.no_grad():
                    for batch in args.batches:
                        model(torch.randn(batch, 3, 32, 32))
                        after.append(resident_bytes(model))
                shares = " ".join(f"{b / 1e6:6.1f} {100 * b / dense:5.1f}%" for b in after[1:])
                print(f"{name:8} {pruning:11} {routes:8} {dense / 1e6:9.1f} {after[0] / 1e6:8.1f} "
                      f"{100 * after[0] / dense:5.1f}% {shares}")


if __name__ == "__main__":
    main()
