"""The Triton backend on one CUDA GPU against cuDNN/cuBLAS-backed PyTorch and torch eager, measured in the same run.

Sparse convolution (issue 4's targets): forward of the CIFAR VGG 3x3 layers at batch 128, float32, at 90% and 95%
sparsity, against F.conv2d on the dense weight with cuDNN in float32 without TF32 and with TF32; forward + backward
against cuDNN without TF32 as well. KD loss: forward + backward at (8192, 32000) and (8192, 128000) in bfloat16 against
the eager composition (kl_div on log_softmax + cross_entropy, autograd) and, when liger-kernel is installed, against
Liger's KL-divergence and cross-entropy losses composed the same way.

Times are medians of triton.testing.do_bench (CUDA events, after warm-up; the first call of each shape also runs the
autotuner, outside the timing). Usable as a library: `conv_rows()` and `kd_rows()` return one dict per case, which
bench/gpu_check can fold into its table; `python bench/bench_triton_gpu.py [--json out.json]` prints a table.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

import ptd_sparse
from ptd_sparse.pattern import ConvPattern

# (name, c_in, c_out, size) of the 3x3 convolutions of CIFAR VGG16 (stride 1, padding 1), one per distinct shape.
VGG_LAYERS = (("conv1_2", 64, 64, 32), ("conv2_1", 64, 128, 16), ("conv2_2", 128, 128, 16),
              ("conv3_1", 128, 256, 8), ("conv3_2", 256, 256, 8), ("conv4_1", 256, 512, 4),
              ("conv4_2", 512, 512, 4), ("conv5_2", 512, 512, 2))
DENSITIES = (0.05, 0.10)
KD_SHAPES = ((8192, 32000), (8192, 128000))
T, ALPHA = 4.0, 0.9


def _bench(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _random_mask(shape, density: float, generator: torch.Generator) -> torch.Tensor:
    numel = torch.Size(shape).numel()
    flat = torch.zeros(numel, dtype=torch.bool)
    flat[torch.randperm(numel, generator=generator)[:round(density * numel)]] = True
    return flat.reshape(shape)


def conv_rows(batch: int = 128, layers=VGG_LAYERS, densities=DENSITIES) -> list[dict]:
    """One dict per (layer, density): milliseconds of the Triton sparse forward and forward + backward, of cuDNN
    float32 without and with TF32, and the speed-ups the targets are stated in."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for name, c_in, c_out, size in layers:
        x = torch.randn(batch, c_in, size, size, generator=generator).cuda()
        weight = (torch.randn(c_out, c_in, 3, 3, generator=generator) / (9 * c_in) ** 0.5).cuda()
        for density in densities:
            mask = _random_mask(weight.shape, density, generator).cuda()
            pattern = ConvPattern.from_mask(mask)
            sparse = ptd_sparse.SparseConvWeight(pattern, pattern.gather(weight))
            dense = weight * mask

            def sparse_forward():
                return ptd_sparse.sparse_conv2d(x, sparse, padding=1, backend="triton")

            def dense_forward():
                return F.conv2d(x, dense, padding=1)

            expected = F.conv2d(x.double(), dense.double(), padding=1)
            error = float((sparse_forward().double() - expected).abs().max())
            row = {"layer": name, "c_in": c_in, "c_out": c_out, "size": size, "batch": batch, "density": density,
                   "max_abs_error": error}
            row["triton_fwd_ms"] = _bench(sparse_forward)
            torch.backends.cudnn.allow_tf32 = False
            row["cudnn_fp32_fwd_ms"] = _bench(dense_forward)
            torch.backends.cudnn.allow_tf32 = True
            row["cudnn_tf32_fwd_ms"] = _bench(dense_forward)
            torch.backends.cudnn.allow_tf32 = False

            x_grad = x.clone().requires_grad_()
            values = sparse.values.clone().requires_grad_()
            trained = ptd_sparse.SparseConvWeight(pattern, values)
            dense_param = dense.clone().requires_grad_()
            grad_out = torch.randn(batch, c_out, size, size, device="cuda")

            def sparse_step():
                out = ptd_sparse.sparse_conv2d(x_grad, trained, padding=1, backend="triton")
                torch.autograd.grad(out, (x_grad, values), grad_out)

            def dense_step():
                out = F.conv2d(x_grad, dense_param, padding=1)
                torch.autograd.grad(out, (x_grad, dense_param), grad_out)

            row["triton_fwd_bwd_ms"] = _bench(sparse_step)
            row["cudnn_fp32_fwd_bwd_ms"] = _bench(dense_step)
            row["speedup_vs_fp32"] = row["cudnn_fp32_fwd_ms"] / row["triton_fwd_ms"]
            row["speedup_vs_tf32"] = row["cudnn_tf32_fwd_ms"] / row["triton_fwd_ms"]
            row["target_met"] = (row["speedup_vs_fp32"] >= 2.0 and row["speedup_vs_tf32"] >= 1.0 if density <= 0.05
                                 else row["speedup_vs_fp32"] >= 1.5)
            rows.append(row)
    return rows


def _eager_kd(student, teacher, target):
    kl = F.kl_div(F.log_softmax(student.float() / T, 1), F.log_softmax(teacher.float() / T, 1),
                  reduction="batchmean", log_target=True)
    return ALPHA * T * T * kl + (1 - ALPHA) * F.cross_entropy(student.float(), target)


def _liger_kd():
    """Liger's KL-divergence and cross-entropy losses composed into the same loss, or None without liger-kernel."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss
    except ImportError:
        return None
    kl_div = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    cross_entropy = LigerCrossEntropyLoss()

    def loss(student, teacher, target):
        kl = kl_div(F.log_softmax(student / T, 1), F.log_softmax(teacher / T, 1))
        return ALPHA * T * T * kl + (1 - ALPHA) * cross_entropy(student, target)

    return loss


def kd_rows(shapes=KD_SHAPES, dtype=torch.bfloat16) -> list[dict]:
    """One dict per shape: milliseconds of forward + backward for the Triton kernel, torch eager and Liger."""
    generator = torch.Generator().manual_seed(0)
    liger = _liger_kd()
    rows = []
    for n, classes in shapes:
        student = (torch.randn(n, classes, generator=generator) * 3).to("cuda", dtype).requires_grad_()
        teacher = (torch.randn(n, classes, generator=generator) * 3).to("cuda", dtype)
        target = torch.randint(0, classes, (n,), generator=generator).cuda()

        def step(loss_fn):
            def run():
                student.grad = None
                loss_fn(student, teacher, target).backward()
            return run

        def fused(s, t, y):
            return ptd_sparse.kd_loss(s, t, y, temperature=T, alpha=ALPHA, backend="triton")

        row = {"rows": n, "classes": classes, "dtype": str(dtype).split(".")[-1]}
        row["triton_ms"] = _bench(step(fused))
        row["eager_ms"] = _bench(step(_eager_kd))
        row["liger_ms"] = _bench(step(liger)) if liger is not None else None
        row["speedup_vs_eager"] = row["eager_ms"] / row["triton_ms"]
        row["speedup_vs_liger"] = row["liger_ms"] / row["triton_ms"] if liger is not None else None
        rows.append(row)
        del student, teacher
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton_gpu: no CUDA device", file=sys.stderr)
        return 1
    device = torch.cuda.get_device_name()
    conv = conv_rows()
    print(f"sparse conv forward, batch 128, float32, on {device} (ms; speed-up = cuDNN time / Triton time)")
    print(f"{'layer':8} {'dens':>5} {'triton':>8} {'fp32':>8} {'tf32':>8} {'x fp32':>7} {'x tf32':>7} "
          f"{'fb triton':>9} {'fb fp32':>8} target")
    for r in conv:
        print(f"{r['layer']:8} {r['density']:5.2f} {r['triton_fwd_ms']:8.3f} {r['cudnn_fp32_fwd_ms']:8.3f} "
              f"{r['cudnn_tf32_fwd_ms']:8.3f} {r['speedup_vs_fp32']:7.2f} {r['speedup_vs_tf32']:7.2f} "
              f"{r['triton_fwd_bwd_ms']:9.3f} {r['cudnn_fp32_fwd_bwd_ms']:8.3f} {'met' if r['target_met'] else 'MISSED'}")
    kd = kd_rows()
    print(f"\nKD loss forward + backward, bfloat16, on {device} (ms)")
    for r in kd:
        liger = (f"{r['liger_ms']:.3f} (x{r['speedup_vs_liger']:.2f})" if r["liger_ms"] is not None
                 else "not installed")
        print(f"({r['rows']}, {r['classes']}): triton {r['triton_ms']:.3f}  eager {r['eager_ms']:.3f} "
              f"(x{r['speedup_vs_eager']:.2f})  liger {liger}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"device": device, "torch": torch.__version__, "conv": conv, "kd_loss": kd}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
