"""A whole pruned network for inference: CIFAR VGG19 (random weights and BatchNorm statistics, pruned globally by
L1 magnitude) through ptd_sparse.sparsify against eager PyTorch on the same pruned weights and, when installed,
ONNX Runtime on the same model. All in one run, medians after warm-up, batch 64 and batch 1.

    GOMP_CPU_AFFINITY="0 1" OMP_NUM_THREADS=2 python bench/bench_network.py
(ONNX Runtime is optional: pip install onnx onnxruntime.) Neural Magic DeepSparse 1.8.0 needs numpy<2 and an old
onnx, so it lives in a separate venv: pass its python with --deepsparse-python (see bench/deepsparse_runner.py); it
then runs on the same ONNX export in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import nn

import ptd_sparse
from ptd_sparse.nn import MaskedConv2d, MaskedLinear
from ptd_sparse.pipeline.models import build_model
from ptd_sparse.pipeline.pruning import prune_to
from timing import median_ms  # bench/timing.py


def pruned_vgg19(sparsity: float) -> nn.Module:
    torch.manual_seed(0)
    model = build_model("vgg19", in_channels=3, num_classes=10, image_size=32).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    prune_to(model, sparsity)
    return model


def eager_dense(model: nn.Module) -> nn.Module:
    """The same pruned network as plain PyTorch layers (what users run without this package)."""
    dense = build_model("vgg19", in_channels=3, num_classes=10, image_size=32).eval()
    dense.load_state_dict(model.state_dict())
    for name, module in list(dense.named_modules()):
        if isinstance(module, (MaskedConv2d, MaskedLinear)):
            if isinstance(module, MaskedConv2d):
                plain = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                  module.padding, bias=module.bias is not None)
            else:
                plain = nn.Linear(module.in_features, module.out_features)
            with torch.no_grad():
                plain.weight.copy_(module.weight * module.mask)
                if module.bias is not None:
                    plain.bias.copy_(module.bias)
            parent_name, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent_name) if parent_name else dense, child, plain)
    return dense.eval()


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
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 1])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--deepsparse-python", help="python of a venv with deepsparse 1.8.0 (see deepsparse_runner)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "network.json")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    print(f"CIFAR VGG19, float32, torch {torch.__version__}, {threads} threads, "
          f"GOMP_CPU_AFFINITY={os.environ.get('GOMP_CPU_AFFINITY', 'unset')}")
    print(f"{'sparsity':>8} {'batch':>5} {'eager ms':>9} {'onnxrt ms':>9} {'dsparse ms':>10} {'ptd ms':>8} "
          f"{'vs eager':>8} {'vs onnxrt':>9} {'vs dsparse':>10} {'sparse layers':>13}")
    rows = []
    for sparsity in args.sparsities:
        model = pruned_vgg19(sparsity)
        dense = eager_dense(model)
        fast = ptd_sparse.sparsify(model)
        sparse_layers = sum(isinstance(m, ptd_sparse.nn.SparseConv2d) for m in fast.modules())
        for batch in args.batches:
            x = torch.randn(batch, 3, 32, 32)
            with torch.no_grad():
                torch.testing.assert_close(fast(x), dense(x), atol=1e-3, rtol=1e-3)
                eager_ms = median_ms(lambda: dense(x), args.warmup, args.repeats)
                ptd_ms = median_ms(lambda: fast(x), args.warmup, args.repeats)
            ort = onnxruntime_runner(dense, batch, threads)
            ort_ms = median_ms(lambda: ort(x.numpy()), args.warmup, args.repeats) if ort else float("nan")
            ds_ms = deepsparse_ms(args.deepsparse_python, dense, batch, threads, args.warmup, args.repeats)
            row = dict(sparsity=sparsity, batch=batch, eager_ms=eager_ms, onnxruntime_ms=ort_ms, deepsparse_ms=ds_ms,
                       ptd_ms=ptd_ms, speedup_vs_eager=eager_ms / ptd_ms, speedup_vs_onnxruntime=ort_ms / ptd_ms,
                       speedup_vs_deepsparse=ds_ms / ptd_ms, sparse_layers=sparse_layers)
            rows.append(row)
            print(f"{sparsity:>8.2f} {batch:>5} {eager_ms:>9.2f} {ort_ms:>9.2f} {ds_ms:>10.2f} {ptd_ms:>8.2f} "
                  f"{eager_ms / ptd_ms:>8.2f} {ort_ms / ptd_ms:>9.2f} {ds_ms / ptd_ms:>10.2f} {sparse_layers:>13}",
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": {"torch": torch.__version__, "threads": threads,
                                             "pinning": os.environ.get("GOMP_CPU_AFFINITY", "unset")},
                                    "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
