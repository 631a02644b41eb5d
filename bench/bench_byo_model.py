"""A user's own model for inference: the torchvision-style ResNet18 (and MobileNetV2) of examples/user_models.py,
random weights and BatchNorm statistics, pruned with torch.nn.utils.prune (the authors' seven rounds of 20%: 79%, or
global L1 90% in one step), through ptd_sparse.sparsify (Conv-BN(-ReLU) found in the fx trace, grouped and depthwise
layers sparse too; timed in the caller's NCHW, with memory_format=torch.channels_last, and that form through
ptd_sparse.fuse_graph (ReLUs and residual additions fused); the fastest form counts)
against the same pruned network in eager PyTorch and in the best dense form PyTorch offers (BatchNorm folded,
torch.jit.freeze + optimize_for_inference, NCHW and channels_last). One run, every form timed
round-robin (the machine may be shared), medians after warm-up, ratios of medians; ImageNet-size input (224 x 224,
1000 classes) by default.

    GOMP_CPU_AFFINITY="0 1" OMP_NUM_THREADS=2 python bench/bench_byo_model.py --batches 1 64
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune

import ptd_sparse
from bench_network import best_dense_forms, eager_dense, sparsity_of  # bench/
from machine import cpu_vector_extensions  # bench/machine.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import user_models  # noqa: E402

FACTORIES = {"resnet18": user_models.resnet18, "mobilenet_v2": user_models.mobilenet_v2}


def pruned_user_model(name: str, pruning: str) -> nn.Module:
    torch.manual_seed(0)
    model = FACTORIES[name](num_classes=1000).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    layers = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if pruning == "authors":
        for _ in range(7):
            prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=0.2)
    else:
        prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=float(pruning[6:]))
    return model


def interleaved_medians_ms(runs: dict, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median ms of each run on x, timed round-robin (one call of each per round, after one warm-up each), so that a
    change of the machine's load during the measurement (it is shared) hits every form alike."""
    for run in runs.values():
        run(x)
    samples = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run(x)
            samples[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(times) for name, times in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18"], choices=sorted(FACTORIES))
    parser.add_argument("--prunings", nargs="+", default=["authors", "global0.9"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "byo_model.json")
    args = parser.parse_args()
    print(f"float32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"GOMP_CPU_AFFINITY={os.environ.get('GOMP_CPU_AFFINITY', 'unset')}; CPU: {cpu_vector_extensions()}")
    print(f"{'model':>12} {'pruning':>10} {'sparsity':>8} {'batch':>5} {'eager':>9} {'best dense':>10} {'ptd':>9} "
          f"{'ptd cl':>9} {'ptd fused':>9} {'vs eager':>8} {'vs dense':>8}  (ms; ratios are speed-ups of the fastest "
          f"ptd_sparse form)")
    rows = []
    for name in args.models:
        for pruning in args.prunings:
            model = pruned_user_model(name, pruning)
            dense = eager_dense(model)
            fast = ptd_sparse.sparsify(model)
            fast_cl = ptd_sparse.sparsify(model, memory_format=torch.channels_last)
            fused_cl = ptd_sparse.fuse_graph(fast_cl, example_input=torch.randn(1, 3, args.size, args.size))
            sparsity = sparsity_of(model)
            for batch in args.batches:
                x = torch.randn(batch, 3, args.size, args.size)
                with torch.no_grad():
                    fast(x), fast_cl(x), fused_cl(x)  # the first call of a batch size measures each layer's route
                    for form in (fast, fast_cl, fused_cl):
                        torch.testing.assert_close(form(x), dense(x), atol=1e-3, rtol=1e-3)
                    runs = {"eager": dense, **best_dense_forms(dense, x), "ptd": fast, "ptd cl": fast_cl,
                            "ptd fused": fused_cl}
                    measured = interleaved_medians_ms(runs, x, args.repeats)
                eager_ms, nchw_ms, cl_ms = measured.pop("eager"), measured.pop("ptd"), measured.pop("ptd cl")
                fused_ms = measured.pop("ptd fused")
                ptd_ms = min(nchw_ms, cl_ms, fused_ms)
                form_ms = measured
                best_dense_ms = min(eager_ms, *form_ms.values())
                routes = {}
                for module in fast.modules():
                    if isinstance(module, ptd_sparse.nn.SparseConv2d) and module.routes:
                        key = min((k for k in module.routes if k[0] >= batch), key=lambda k: k[0])
                        kind = "depthwise" if module.groups > 1 else "conv"
                        routes[f"{kind} {module.routes[key]}"] = routes.get(f"{kind} {module.routes[key]}", 0) + 1
                rows.append(dict(model=name, pruning=pruning, sparsity=round(sparsity, 4), batch=batch,
                                 size=args.size, eager_ms=eager_ms, dense_forms_ms=form_ms,
                                 best_dense_ms=best_dense_ms, ptd_ms=ptd_ms, ptd_nchw_ms=nchw_ms,
                                 ptd_channels_last_ms=cl_ms, ptd_fused_graph_ms=fused_ms, routes=routes,
                                 speedup_vs_eager=eager_ms / ptd_ms, speedup_vs_best_dense=best_dense_ms / ptd_ms))
                print(f"{name:>12} {pruning:>10} {sparsity:>8.3f} {batch:>5} {eager_ms:>9.2f} {best_dense_ms:>10.2f} "
                      f"{nchw_ms:>9.2f} {cl_ms:>9.2f} {fused_ms:>9.2f} {eager_ms / ptd_ms:>8.2f} "
                      f"{best_dense_ms / ptd_ms:>8.2f}  "
                      f"routes {routes}",
                      flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu_vector_extensions(), "torch": torch.__version__, "rows": rows},
                                   indent=1))


if __name__ == "__main__":
    main()
