"""Whole pruned networks for inference: CIFAR VGG19 and ResNet18 (random weights and BatchNorm statistics) through
ptd_sparse.sparsify (in the caller's NCHW layout, and with memory_format=torch.channels_last: "ptd cl"), against the
same pruned weights in eager PyTorch, in the best dense form PyTorch offers on the
CPU (BatchNorm folded, frozen and optimised for inference by torch.jit, oneDNN), and, when installed, ONNX Runtime
and Neural Magic DeepSparse. All in one run, medians after warm-up, ratios of medians; the ratios take the faster
of the two ptd_sparse forms (both are in the JSON).

Pruning: "authors" is how Park & No prune (torch.nn.utils.prune.global_unstructured, L1, seven rounds of 20%: 79%);
"global 0.9" / "global 0.95" prune by global L1 magnitude in one step (early layers stay 45-78% sparse).

    GOMP_CPU_AFFINITY="0 1" OMP_NUM_THREADS=2 python bench/bench_network.py
    GOMP_CPU_AFFINITY="0 1" OMP_NUM_THREADS=2 python bench/bench_network.py --models vgg19 --prunings global0.9 \
        --batches 64 1 --deepsparse-python /tmp/ds/venv/bin/python
(ONNX Runtime is optional: pip install onnx onnxruntime.) DeepSparse 1.8.0 needs numpy<2 and an old onnx, so it lives
in a separate venv: pass its python with --deepsparse-python (see bench/deepsparse_runner.py); it then runs on the
same ONNX export in the same run.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune

import ptd_sparse
from ptd_sparse.nn import MaskedConv2d, MaskedLinear
from ptd_sparse.pipeline.models import build_model
from ptd_sparse.pipeline.pruning import prune_to
from machine import cpu_vector_extensions  # bench/machine.py
from timing import median_ms  # bench/timing.py

PRUNINGS = ("authors", "global0.9", "global0.95")


def pruned_model(name: str, pruning: str) -> nn.Module:
    """`name` with random weights and BatchNorm statistics, pruned as `pruning` says (MaskedConv2d masks, or the
    weight_orig/weight_mask of torch.nn.utils.prune for "authors")."""
    torch.manual_seed(0)
    model = build_model(name, in_channels=3, num_classes=10, image_size=32).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    if pruning == "authors":
        model = eager_dense(model)  # plain nn.Conv2d / nn.Linear, as the authors' code has them
        layers = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        for _ in range(7):
            prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=0.2)
    else:
        prune_to(model, float(pruning.removeprefix("global")))
    return model


def eager_dense(model: nn.Module) -> nn.Module:
    """A copy of the pruned `model` as plain PyTorch layers holding weight * mask (what users run without this
    package): torch.nn.utils.prune's masks baked in, MaskedConv2d / MaskedLinear replaced by nn.Conv2d / nn.Linear."""
    # torch.nn.utils.prune's computed `weight` is a non-leaf tensor, which deepcopy refuses: copy it detached (the
    # prune hook recomputes it from weight_orig * weight_mask anyway).
    memo = {id(m.weight): m.weight.detach().clone() for m in model.modules() if hasattr(m, "weight_mask")}
    plain_model = copy.deepcopy(model, memo).eval()
    for name, module in list(plain_model.named_modules()):
        if hasattr(module, "weight_mask"):
            prune.remove(module, "weight")
        elif isinstance(module, (MaskedConv2d, MaskedLinear)):
            if isinstance(module, MaskedConv2d):
                plain = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                  module.padding, module.dilation, module.groups, bias=module.bias is not None)
            else:
                plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                plain.weight.copy_(module.weight * module.mask)
                if module.bias is not None:
                    plain.bias.copy_(module.bias)
            parent_name, _, child = name.rpartition(".")
            setattr(plain_model.get_submodule(parent_name) if parent_name else plain_model, child, plain)
    return plain_model


def best_dense_forms(dense: nn.Module, example: torch.Tensor) -> dict:
    """The dense forms PyTorch offers for CPU inference: BatchNorm folded and frozen by torch.jit with
    optimize_for_inference (oneDNN), in NCHW and in channels_last."""
    forms = {}
    with torch.no_grad():
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(dense, example).eval()))
        forms["jit frozen"] = lambda x: frozen(x)
        channels_last = dense.to(memory_format=torch.channels_last)
        traced_cl = torch.jit.trace(channels_last, example.contiguous(memory_format=torch.channels_last))
        frozen_cl = torch.jit.optimize_for_inference(torch.jit.freeze(traced_cl.eval()))
        forms["jit frozen channels_last"] = lambda x: frozen_cl(x.contiguous(memory_format=torch.channels_last))
    return forms


def export_onnx(model: nn.Module, batch: int) -> Path:
    path = Path(tempfile.mkdtemp()) / "vgg19.onnx"
    torch.onnx.export(model, (torch.randn(batch, 3, 32, 32),), str(path), input_names=["x"], dynamo=False,
                      opset_version=13)  # DeepSparse 1.8 reads opsets up to 19
    return path


def deepsparse_ms(python: str | None, model: nn.Module, batch: int, threads: int, warmup: int,
                  repeats: int) -> float:
    """DeepSparse's median time for the same model, run in its own venv by bench/deepsparse_runner.py."""
    if not python:
        return float("nan")
    runner = Path(__file__).parent / "deepsparse_runner.py"
    result = subprocess.run([python, str(runner), str(export_onnx(model, batch)), str(batch), str(threads),
                             str(warmup), str(repeats)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["median_ms"]


def onnxruntime_runner(model: nn.Module, batch: int, threads: int):
    try:
        import onnxruntime
    except ImportError:
        return None
    path = export_onnx(model, batch)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Its idle threads must not spin on the cores after a run: the forms timed after it would pay for them.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})


def sparsity_of(model: nn.Module) -> float:
    masks = [m.mask for m in model.modules() if isinstance(m, (MaskedConv2d, MaskedLinear))]
    masks += [m.weight_mask for m in model.modules() if hasattr(m, "weight_mask")]
    return 1 - sum(int(mask.sum()) for mask in masks) / sum(mask.numel() for mask in masks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vgg19", "resnet18"])
    parser.add_argument("--prunings", nargs="+", default=list(PRUNINGS), choices=PRUNINGS)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--seconds", type=float, default=1.0, help="rough time budget per measured form and batch")
    parser.add_argument("--deepsparse-python", help="python of a venv with deepsparse 1.8.0 (see deepsparse_runner)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "network.json")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    machine = cpu_vector_extensions()
    print(f"float32, torch {torch.__version__}, {threads} threads, "
          f"GOMP_CPU_AFFINITY={os.environ.get('GOMP_CPU_AFFINITY', 'unset')}; CPU: {machine}")
    print(f"{'model':>8} {'pruning':>10} {'sparsity':>8} {'batch':>5} {'eager':>8} {'best dense':>10} "
          f"{'onnxrt':>8} {'dsparse':>8} {'ptd':>8} {'ptd cl':>8} {'vs eager':>8} {'vs dense':>8} {'vs onnxrt':>9} "
          f"{'vs dsparse':>10}  (ms; ratios are speed-ups of ptd_sparse)")
    rows = []
    for name in args.models:
        for pruning in args.prunings:
            model = pruned_model(name, pruning)
            dense = eager_dense(model)
            fast = ptd_sparse.sparsify(model)
            fast_cl = ptd_sparse.sparsify(model, memory_format=torch.channels_last)
            sparsity = sparsity_of(model)
            for batch in args.batches:
                x = torch.randn(batch, 3, 32, 32)
                with torch.no_grad():
                    fast(x), fast_cl(x)  # the first call of a batch size measures each layer's route
                    torch.testing.assert_close(fast(x), dense(x), atol=1e-3, rtol=1e-3)
                    torch.testing.assert_close(fast_cl(x), dense(x), atol=1e-3, rtol=1e-3)
                    probe = median_ms(lambda: dense(x), 1, 1)
                    repeats = max(3, min(30, int(args.seconds * 1e3 / max(probe, 1e-3))))
                    eager_ms = median_ms(lambda: dense(x), 2, repeats)
                    forms = best_dense_forms(dense, x)
                    form_ms = {form: median_ms(lambda: run(x), 2, repeats) for form, run in forms.items()}
                    nchw_ms = median_ms(lambda: fast(x), 2, repeats)
                    cl_ms = median_ms(lambda: fast_cl(x), 2, repeats)
                ptd_ms = min(nchw_ms, cl_ms)
                best_form = min(form_ms, key=form_ms.get)
                dense_ms = min(eager_ms, form_ms[best_form])
                ort = onnxruntime_runner(dense, batch, threads)
                ort_ms = median_ms(lambda: ort(x.numpy()), 2, repeats) if ort else float("nan")
                ds_ms = deepsparse_ms(args.deepsparse_python, dense, batch, threads, 2, repeats)
                routes = {}
                for module in fast.modules():
                    if isinstance(module, ptd_sparse.nn.SparseConv2d):
                        # The bucket of this batch (the smallest measured at or above it), whichever batch was
                        # measured first.
                        keys = [k for k in module.routes if k[0] >= batch]
                        route = module.routes[min(keys, key=lambda k: k[0])] if keys else "?"
                        routes[route] = routes.get(route, 0) + 1
                row = dict(model=name, pruning=pruning, sparsity=round(sparsity, 4), batch=batch, eager_ms=eager_ms,
                           dense_forms_ms=form_ms, best_dense_ms=dense_ms, onnxruntime_ms=ort_ms,
                           deepsparse_ms=ds_ms, ptd_ms=ptd_ms, ptd_nchw_ms=nchw_ms, ptd_channels_last_ms=cl_ms,
                           routes=routes,
                           speedup_vs_eager=eager_ms / ptd_ms, speedup_vs_best_dense=dense_ms / ptd_ms,
                           speedup_vs_onnxruntime=ort_ms / ptd_ms, speedup_vs_deepsparse=ds_ms / ptd_ms)
                rows.append(row)
                print(f"{name:>8} {pruning:>10} {sparsity:>8.3f} {batch:>5} {eager_ms:>8.2f} {dense_ms:>10.2f} "
                      f"{ort_ms:>8.2f} {ds_ms:>8.2f} {nchw_ms:>8.2f} {cl_ms:>8.2f} {eager_ms / ptd_ms:>8.2f} "
                      f"{dense_ms / ptd_ms:>8.2f} {ort_ms / ptd_ms:>9.2f} {ds_ms / ptd_ms:>10.2f}  routes {routes}",
                      flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": {"torch": torch.__version__, "threads": threads, "cpu": machine,
                                             "pinning": os.environ.get("GOMP_CPU_AFFINITY", "unset")},
                                    "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
