"""GPU benchmarks of every GPU backend, each against its baselines measured in the same run (called by
bench/gpu_check; runs alone too: python bench/gpu_bench.py --json out.json).

Sparse convolution, CIFAR VGG layers at batch 128, at 90% and 95% sparsity:
  forward of each backend (fp32, and bf16) against cuDNN (F.conv2d on the dense weight) in fp32 with TF32 off, fp32
  with TF32 on, and bf16; backward (data + weight gradients) against cuDNN's dense backward in fp32, TF32 off.
  Also the density crossover against cuDNN with PyTorch's default (TF32 on) for backends.DENSE_CROSSOVER.
KD loss forward + backward (alpha 0.95, T 10, batchmean, labels) in bf16 at (8192, 32000) and (8192, 128000):
  each backend against eager PyTorch (log_softmax + kl_div + cross_entropy) and Liger-Kernel's kl_div + cross_entropy
  (when installed), with the peak extra memory of each.
Times are medians of CUDA-event-timed repeats after warm-up, in milliseconds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import ptd_sparse
from ptd_sparse.backends import KD_LOSS, SPARSE_CONV, unsupported_reasons

VGG_LAYERS = [(64, 32), (128, 16), (256, 8), (512, 4), (512, 2)]  # (channels, spatial size) of CIFAR VGG
BATCH = 128
LOSS_SHAPES = [(8192, 32000), (8192, 128000)]


def gpu_ms(fn, warmup: int = 3, repeats: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gpu_backends(op: str) -> list[str]:
    return [b for b in ("cuda", "triton") if not unsupported_reasons(b, op, torch.device("cuda"))]


def cudnn_forward(x, weight, tf32: bool):
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        return gpu_ms(lambda: F.conv2d(x, weight, None, 1, 1))
    finally:
        torch.backends.cudnn.allow_tf32 = True


def cudnn_backward_ms(x, weight) -> float:
    """Data + weight gradients of the dense convolution in fp32 with TF32 off."""
    torch.backends.cudnn.allow_tf32 = False
    try:
        x = x.detach().requires_grad_()
        weight = weight.detach().requires_grad_()
        out = F.conv2d(x, weight, None, 1, 1)
        grad = torch.randn_like(out)
        return gpu_ms(lambda: torch.autograd.grad(out, (x, weight), grad, retain_graph=True))
    finally:
        torch.backends.cudnn.allow_tf32 = True


def sparse_forward_ms(x, sparse, backend) -> float:
    return gpu_ms(lambda: ptd_sparse.sparse_conv2d(x, sparse, None, 1, 1, backend=backend))


def sparse_backward_ms(x, sparse, backend) -> float:
    x = x.detach().requires_grad_()
    values = sparse.values.detach().requires_grad_()
    weight = ptd_sparse.SparseConvWeight(sparse.pattern, values)
    out = ptd_sparse.sparse_conv2d(x, weight, None, 1, 1, backend=backend)
    grad = torch.randn_like(out)
    return gpu_ms(lambda: torch.autograd.grad(out, (x, values), grad, retain_graph=True))


def random_sparse_weight(channels: int, density: float, dtype) -> tuple[torch.Tensor, ptd_sparse.SparseConvWeight]:
    weight = torch.randn(channels, channels, 3, 3, device="cuda") / (9 * channels) ** 0.5
    mask = torch.rand(weight.shape, device="cuda") < density
    dense = (weight * mask).to(dtype)
    return dense, ptd_sparse.SparseConvWeight.from_dense(dense, mask)


def conv_benchmarks(backends: list[str]) -> list[dict]:
    rows = []
    for channels, size in VGG_LAYERS:
        x32 = torch.randn(BATCH, channels, size, size, device="cuda")
        for sparsity in (0.90, 0.95):
            dense32, sparse32 = random_sparse_weight(channels, 1 - sparsity, torch.float32)
            dense16, sparse16 = dense32.bfloat16(), ptd_sparse.SparseConvWeight(sparse32.pattern,
                                                                                sparse32.values.bfloat16())
            x16 = x32.bfloat16()
            row = {"layer": f"{channels}@{size}x{size}", "sparsity": sparsity, "batch": BATCH,
                   "cudnn_fp32_ms": cudnn_forward(x32, dense32, tf32=False),
                   "cudnn_tf32_ms": cudnn_forward(x32, dense32, tf32=True),
                   "cudnn_bf16_ms": cudnn_forward(x16, dense16, tf32=True),
                   "cudnn_backward_fp32_ms": cudnn_backward_ms(x32, dense32)}
            for backend in backends:
                row[f"{backend}_fp32_ms"] = sparse_forward_ms(x32, sparse32, backend)
                row[f"{backend}_bf16_ms"] = sparse_forward_ms(x16, sparse16, backend)
                row[f"{backend}_backward_fp32_ms"] = sparse_backward_ms(x32, sparse32, backend)
            rows.append(row)
            print(f"  conv {row['layer']} at {sparsity:.0%}: " + ", ".join(
                f"{k[:-3]} {v:.3f}" for k, v in row.items() if k.endswith("_ms")), flush=True)
    return rows


def crossover(backends: list[str]) -> dict:
    """Highest density at which each backend's forward still beats cuDNN with PyTorch's defaults (TF32 on), on the
    128@16x16 layer at batch 128, fp32."""
    x = torch.randn(BATCH, 128, 16, 16, device="cuda")
    result = {}
    for backend in backends:
        wins = []
        for density in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5):
            dense, sparse = random_sparse_weight(128, density, torch.float32)
            if sparse_forward_ms(x, sparse, backend) < cudnn_forward(x, dense, tf32=True):
                wins.append(density)
        result[backend] = max(wins) if wins else 0.0
    return result


def eager_kd_loss(s, t, y, T, alpha):
    kl = F.kl_div(F.log_softmax(s.float() / T, 1), F.log_softmax(t.float() / T, 1), reduction="batchmean",
                  log_target=True)
    return alpha * T * T * kl + (1 - alpha) * F.cross_entropy(s.float(), y)


def liger_kd_loss():
    """Liger-Kernel's composition of the same loss (its kl_div on log-probabilities + its cross entropy), or the
    reason it cannot run."""
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy, liger_kl_div
    except Exception as error:  # not installed, or built for another triton
        return None, f"liger-kernel unavailable: {error}"

    def loss(s, t, y, T, alpha):
        kl = liger_kl_div(F.log_softmax(s.float() / T, 1), F.log_softmax(t.float() / T, 1), reduction="batchmean",
                          log_target=True)
        return alpha * T * T * kl + (1 - alpha) * liger_cross_entropy(s, y)

    return loss, None


def loss_step(fn, s, t, y):
    def step():
        student = s.detach().requires_grad_()
        fn(student, t, y).backward()
    return step


def peak_extra_mb(step) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def loss_benchmarks(backends: list[str]) -> list[dict]:
    T, alpha = 10.0, 0.95
    liger, liger_problem = liger_kd_loss()
    rows = []
    for n, c in LOSS_SHAPES:
        s = torch.randn(n, c, device="cuda", dtype=torch.bfloat16) * 3
        t = torch.randn(n, c, device="cuda", dtype=torch.bfloat16) * 3
        y = torch.randint(0, c, (n,), device="cuda")
        candidates = {"eager": lambda s_, t_, y_: eager_kd_loss(s_, t_, y_, T, alpha)}
        if liger is not None:
            candidates["liger"] = lambda s_, t_, y_: liger(s_, t_, y_, T, alpha)
        for backend in backends:
            candidates[backend] = (lambda b: lambda s_, t_, y_: ptd_sparse.kd_loss(
                s_, t_, y_, temperature=T, alpha=alpha, backend=b))(backend)
        row = {"shape": f"{n}x{c}", "dtype": "bfloat16"}
        if liger_problem:
            row["liger_note"] = liger_problem
        for name, fn in candidates.items():
            step = loss_step(fn, s, t, y)
            try:
                row[f"{name}_ms"] = gpu_ms(step, warmup=2, repeats=5)
                row[f"{name}_peak_extra_mb"] = peak_extra_mb(step)
            except torch.OutOfMemoryError:
                row[f"{name}_ms"] = None
                row[f"{name}_note"] = "out of memory"
            torch.cuda.empty_cache()
        rows.append(row)
        print(f"  kd_loss {row['shape']}: " + ", ".join(
            f"{k[:-3]} {v:.2f}" for k, v in row.items() if k.endswith("_ms") and v is not None), flush=True)
    return rows


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def print_table(result: dict) -> None:
    print(f"\n# GPU benchmarks on {result['device']} (torch {result['torch']}, triton {result['triton']})")
    print("\nSparse conv forward, batch 128: speed-up of each backend over cuDNN (fp32 no TF32 / TF32 / bf16 vs "
          "backend bf16), and backward (data + weight) over cuDNN fp32 no TF32")
    backends = result["conv_backends"]
    header = "| layer | sparsity | cuDNN fp32 ms | TF32 ms | bf16 ms | " + " | ".join(
        f"{b} ms | {b} vs fp32 | {b} vs TF32 | {b} bf16 vs bf16 | {b} bwd vs cuDNN bwd" for b in backends) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in result["conv"]:
        cells = [r["layer"], f"{r['sparsity']:.0%}", f"{r['cudnn_fp32_ms']:.3f}", f"{r['cudnn_tf32_ms']:.3f}",
                 f"{r['cudnn_bf16_ms']:.3f}"]
        for b in backends:
            cells += [f"{r[f'{b}_fp32_ms']:.3f}", f"{ratio(r['cudnn_fp32_ms'], r[f'{b}_fp32_ms']):.2f}x",
                      f"{ratio(r['cudnn_tf32_ms'], r[f'{b}_fp32_ms']):.2f}x",
                      f"{ratio(r['cudnn_bf16_ms'], r[f'{b}_bf16_ms']):.2f}x",
                      f"{ratio(r['cudnn_backward_fp32_ms'], r[f'{b}_backward_fp32_ms']):.2f}x"]
        print("| " + " | ".join(cells) + " |")
    print(f"\nMeasured density crossover vs cuDNN (TF32 on), 128@16x16: {result['crossover']}")
    print("\nKD loss forward + backward, bf16, T=10, alpha=0.95: ms (peak extra MB)")
    for r in result["loss"]:
        parts = [f"{k[:-3]} {r[k]:.2f} ms ({r.get(k[:-3] + '_peak_extra_mb', float('nan')):.0f} MB)"
                 for k in r if k.endswith("_ms") and r[k] is not None]
        speedups = [f"{b}: {ratio(r.get('eager_ms'), r.get(f'{b}_ms')):.2f}x eager" +
                    (f", {ratio(r['liger_ms'], r[f'{b}_ms']):.2f}x liger" if r.get("liger_ms") else "")
                    for b in result["loss_backends"] if r.get(f"{b}_ms")]
        print(f"- {r['shape']}: " + "; ".join(parts) + " | " + "; ".join(speedups) + (
            f" | {r['liger_note']}" if "liger_note" in r else ""))


def main(argv=None) -> int:
    # cuDNN baselines at their best: let it pick the fastest algorithm for each shape (the timings warm up first).
    torch.backends.cudnn.benchmark = True
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path("bench/results/gpu_bench.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device", file=sys.stderr)
        return 2
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    started = time.time()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton_version,
              "conv_backends": gpu_backends(SPARSE_CONV), "loss_backends": gpu_backends(KD_LOSS)}
    print(f"gpu_bench on {result['device']}; conv backends {result['conv_backends']}, loss backends "
          f"{result['loss_backends']}", flush=True)
    result["conv"] = conv_benchmarks(result["conv_backends"])
    result["crossover"] = crossover(result["conv_backends"])
    result["loss"] = loss_benchmarks(result["loss_backends"])
    result["seconds"] = time.time() - started
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print_table(result)
    print(f"\nwrote {args.json} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
