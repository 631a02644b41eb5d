"""Runs the float32 CPU kernels under one kernel set and compares them with float64 oracles; used by
tests/test_cpu_dispatch.py, one process per kernel set, since the set is chosen once per process (PTD_CPU_ISA).

Usage: python cpu_isa_worker.py ISA. Prints the kernel set in use and "ok", or fails with an AssertionError naming
the case. The cases reach every dispatched entry point (the forward on NCHW and on channels_last inputs): the wide
layout (rows of several passes and short rows of split taps, strides, dilation, bias and the fused ReLU; the
forward with a max-pool in its epilogue), the patch
layout (a few images on 4x4 maps and smaller),
the batch-innermost layout (small maps at batch >= 16), the tiled forward, data gradient and weight gradient (small
maps at batches that fill its image blocks; tiles of whole rows and of any positions, with and without chunks of
input channels), the wide and batch-innermost data-gradient and weight-gradient layouts,
and the KD loss's row kernel with class counts that leave partial vectors for 8 and 16 lanes, temperatures 1 and 4,
teacher -inf entries and half-precision rows.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import ptd_sparse
import ptd_sparse._extension as extension
from ptd_sparse.pattern import ConvPattern

ops = extension.kernels()


def close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 2e-5) -> None:
    want = want.detach()
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want.double(), atol=tol * scale, rtol=tol,
                               msg=lambda m: f"{extension.cpu_kernel_isa()}: {what}: {m}")


def pool_case(name, x, values, p, shape, bias, st, pad, dil, relu, want, pool):
    """conv_forward_max_pool against max_pool2d of the oracle, in NCHW and channels_last, int32 and int16 columns."""
    want_pooled = F.max_pool2d(want.detach(), *pool)
    compact = p.col_idx.to(torch.int16)
    for layout in (torch.contiguous_format, torch.channels_last):
        for columns in (p.col_idx, compact):
            got = ops.conv_forward_max_pool(x.contiguous(memory_format=layout), values, p.row_ptr, columns, shape,
                                            bias, st, pad, dil, relu, *pool)
            assert got.is_contiguous(memory_format=layout), f"{name}: the pooled output's layout"
            close(got, want_pooled, f"{name} forward + max-pool {pool} ({layout}, {columns.dtype})")


def conv_case(name, batch, c_in, c_out, size, kernel, stride, padding, dilation, density, seed, relu=False,
              half_rows_skip_half_channels=False, pool=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c_in, *size, generator=g)
    weight = torch.randn(c_out, c_in, kernel, kernel, generator=g)
    mask = torch.rand(weight.shape, generator=g) < density
    if half_rows_skip_half_channels:  # rows with no taps in whole chunks of input channels
        mask[::2, : c_in // 2] = False
    bias = torch.randn(c_out, generator=g)
    p = ConvPattern.from_mask(mask)
    values = p.gather(weight).contiguous()
    shape, st, pad, dil = list(weight.shape), [stride] * 2, [padding] * 2, [dilation] * 2

    x64 = x.double().requires_grad_()
    dense = (weight * mask).double().requires_grad_()
    want = F.conv2d(x64, dense, bias.double(), stride, padding, dilation)
    if relu:
        want = want.clamp_min(0)
    got = ops.conv_forward(x, values, p.row_ptr, p.col_idx, shape, bias, st, pad, dil, relu)
    close(got, want, f"{name} forward")
    # Every output is summed within one task, so the threads' split of the work never changes a bit of it.
    threads = torch.get_num_threads()
    for count in (1, max(2, threads)):
        torch.set_num_threads(count)
        assert torch.equal(ops.conv_forward(x, values, p.row_ptr, p.col_idx, shape, bias, st, pad, dil, relu), got), \
            f"{extension.cpu_kernel_isa()}: {name}: the forward with {count} threads"
    torch.set_num_threads(threads)
    # channels_last in, channels_last out: the packers and output writers of every layout read and write NHWC.
    got_nhwc = ops.conv_forward(x.contiguous(memory_format=torch.channels_last), values, p.row_ptr, p.col_idx, shape,
                                bias, st, pad, dil, relu)
    assert got_nhwc.is_contiguous(memory_format=torch.channels_last), f"{name}: the NHWC forward's output layout"
    close(got_nhwc, want, f"{name} forward NHWC")
    # col_idx in the compact int16 form an inference SparseConv2d holds on a CPU: the same kernels, the same bits.
    compact = p.col_idx.to(torch.int16)
    for layout_x, expected in ((x, got), (x.contiguous(memory_format=torch.channels_last), got_nhwc)):
        assert torch.equal(ops.conv_forward(layout_x, values, p.row_ptr, compact, shape, bias, st, pad, dil, relu),
                           expected), f"{extension.cpu_kernel_isa()}: {name}: forward with int16 col_idx"

    if pool is not None:  # (kernel_size, stride, padding, dilation) of a max-pool fused after the forward
        pool_case(name, x, values, p, shape, bias, st, pad, dil, relu, want, pool)
        return

    grad_out = torch.randn(want.shape, generator=g)
    want_x, want_w = torch.autograd.grad(want, (x64, dense), grad_out.double())
    got_x = ops.conv_backward_input(grad_out, values, p.col_idx, p.t_ptr, p.t_rows, p.t_perm, shape, list(x.shape),
                                    st, pad, dil) if not relu else None
    if got_x is not None:
        close(got_x, want_x, f"{name} grad_input")
        for count in (1, max(2, threads)):  # the data gradient, too, sums each input element within one task
            torch.set_num_threads(count)
            assert torch.equal(ops.conv_backward_input(grad_out, values, p.col_idx, p.t_ptr, p.t_rows, p.t_perm, shape,
                                                       list(x.shape), st, pad, dil), got_x), \
                f"{extension.cpu_kernel_isa()}: {name}: the data gradient with {count} threads"
        torch.set_num_threads(threads)
        got_v = ops.conv_backward_values(grad_out, x, p.row_ptr, p.col_idx, shape, st, pad, dil)
        close(got_v, want_w.reshape(-1)[p.flat_index], f"{name} grad_values")
        # The backward entry points widen a compact col_idx.
        assert torch.equal(ops.conv_backward_values(grad_out, x, p.row_ptr, compact, shape, st, pad, dil), got_v)
        assert torch.equal(ops.conv_backward_input(grad_out, values, compact, p.t_ptr, p.t_rows, p.t_perm, shape,
                                                   list(x.shape), st, pad, dil), got_x)


def kd_case(name, rows, classes, temperature, alpha, seed, dtype=torch.float32, minus_inf=False):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(rows, classes, generator=g) * 3).to(dtype).requires_grad_()
    t = torch.randn(rows, classes, generator=g) * 3
    if minus_inf:
        t[:, ::5] = float("-inf")
    t = t.to(dtype)
    y = torch.randint(0, classes, (rows,), generator=g)
    loss = ptd_sparse.kd_loss(s, t, y, temperature=temperature, alpha=alpha, backend="cpu")
    (grad,) = torch.autograd.grad(loss, s)
    s64 = s.detach().double().requires_grad_()
    want = ptd_sparse.kd_loss(s64, t.double(), y, temperature=temperature, alpha=alpha, backend="reference")
    (want_grad,) = torch.autograd.grad(want, s64)
    tol = 2e-5 if dtype == torch.float32 else 8e-3
    close(loss, want, f"{name} loss", tol)
    close(grad, want_grad, f"{name} grad", tol)


def main() -> None:
    isa = sys.argv[1]
    used = extension.cpu_kernel_isa()
    assert used == isa, f"PTD_CPU_ISA={isa} but the extension reports {used!r}"
    # Wide layout: long rows (several passes of 8 or 16 lanes) and short ones.
    conv_case("wide 3x3 s1", 2, 8, 6, (21, 19), 3, 1, 1, 1, 0.3, 1)
    conv_case("wide 3x3 s1 relu", 2, 8, 6, (21, 19), 3, 1, 1, 1, 0.3, 2, relu=True)
    conv_case("wide 3x3 s2 d2", 3, 5, 7, (17, 15), 3, 2, 2, 2, 0.4, 3)
    conv_case("wide 5x5 short rows", 2, 4, 4, (7, 6), 5, 1, 2, 1, 0.5, 4)
    conv_case("wide 1x1 dense", 2, 16, 16, (9, 9), 1, 1, 0, 1, 1.0, 5)
    # Strided packing copies only the phases some tap reads (one of four for a 1x1, stride 2; one of nine at stride
    # 3), a stem's 7x7, stride 2, padding 3 all of them.
    conv_case("wide 1x1 s2", 2, 24, 10, (15, 14), 1, 2, 0, 1, 0.6, 26)
    conv_case("wide 1x1 s3", 1, 5, 7, (11, 16), 1, 3, 0, 1, 0.6, 27)
    conv_case("wide 7x7 s2 p3", 2, 3, 8, (21, 18), 7, 2, 3, 1, 0.3, 28, relu=True)
    # A row of 1-3 vectors (AVX-512), whose taps are split between two sets of accumulators.
    conv_case("wide 5x5 map short row", 1, 8, 6, (5, 5), 3, 1, 1, 1, 0.4, 23)
    # Chunks of input channels on the wide layout (conv_f32.h, wide_channels_per_chunk): where an image's packed
    # input exceeds 32 KiB (for the data gradient, grad_output's), each thread runs its rows of an image chunk by
    # chunk. A 7x7 map of 320 channels at batch 1 (4 chunks, three blocks of NHWC rows), rows with empty chunks,
    # images split between threads (batch 3, stride 2: four phase planes a channel) and rows of several passes
    # (30x30), the fused ReLU and a fused pool.
    conv_case("wide 7x7 b1 channel chunks", 1, 320, 40, (7, 7), 3, 1, 1, 1, 0.1, 42)
    conv_case("wide 7x7 empty chunks", 1, 320, 24, (7, 7), 3, 1, 1, 1, 0.1, 43, half_rows_skip_half_channels=True)
    conv_case("wide 20x18 s2 chunks b3 relu", 3, 48, 20, (20, 18), 3, 2, 1, 1, 0.3, 44, relu=True)
    conv_case("wide 30x30 chunks several passes", 2, 40, 12, (30, 30), 3, 1, 1, 1, 0.3, 45)
    # The data gradient runs the wide layout over grad_output, chunked by output channel: 320 of them at 7x7.
    conv_case("wide 7x7 data gradient chunks", 1, 24, 320, (7, 7), 3, 1, 1, 1, 0.1, 47)
    # Patch layout (a few images on maps of 16 outputs or fewer): one vector of outputs, several (13 images of 3x3,
    # where the AVX2 and baseline copies take the wide layout), stride 2 with dilation, 20 rows (a partial block of
    # NHWC rows), the fused ReLU, 20 input channels (NHWC packing: a full block of channels and a partial one).
    conv_case("patches 4x4 b1", 1, 16, 12, (4, 4), 3, 1, 1, 1, 0.3, 19)
    conv_case("patches 4x4 b2 20 channels", 2, 20, 7, (4, 4), 3, 1, 1, 1, 0.3, 29)
    # One image of 8x8 outputs whose columns are each read by at least 32 taps (conv_f32.h, use_patches: the AVX-512
    # copy's patch path; the others, and 7x7 maps, the wide layout).
    conv_case("patches 8x8 b1 dense columns", 1, 4, 80, (8, 8), 3, 1, 1, 1, 0.9, 30, relu=True)
    conv_case("wide 7x7 b1 dense columns", 1, 3, 72, (7, 7), 3, 1, 1, 1, 0.95, 31)
    conv_case("patches 2x2 b5 relu", 5, 16, 9, (2, 2), 3, 1, 1, 1, 0.4, 20, relu=True)
    conv_case("patches 4x4 s2 d2", 3, 6, 5, (8, 8), 3, 2, 2, 2, 0.5, 21)
    conv_case("patches 3x3 b13", 13, 8, 20, (3, 3), 3, 1, 1, 1, 0.3, 22)
    # Batch-innermost layout: 6x6 and 4x4 maps at batch 16 and 20 (partial batch blocks).
    conv_case("batch-inner 6x6", 20, 8, 8, (6, 6), 3, 1, 1, 1, 0.3, 6)
    conv_case("batch-inner 4x4 relu", 16, 8, 8, (4, 4), 3, 1, 1, 1, 0.3, 7, relu=True)
    conv_case("batch-inner 4x4 s2", 17, 6, 5, (8, 8), 3, 2, 1, 1, 0.5, 8)
    # Tiled layout (batches that fill its 16/32/64-image blocks): several input-channel blocks and row chunks
    # (32 channels of 8x8 maps, 40 rows), a position count that leaves a remainder of its register block (7x7),
    # a partial last batch block (batch 120), stride 2 with dilation, bias and the fused ReLU.
    conv_case("tiled 8x8 channel blocks", 64, 32, 40, (8, 8), 3, 1, 1, 1, 0.2, 13)
    conv_case("tiled 7x7 relu partial block", 120, 12, 9, (7, 7), 3, 1, 1, 1, 0.3, 14, relu=True)
    conv_case("tiled 9x9 s2 d2", 64, 6, 5, (9, 9), 3, 2, 2, 2, 0.5, 15)
    # NHWC packing and tile writes transpose whole vectors of images x channels and do the rest element by element:
    # 24 input channels and 36 rows (a vector's worth and a remainder), 40 images (a last block of 8).
    conv_case("tiled 8x8 vector transposes", 40, 24, 36, (8, 8), 3, 1, 1, 1, 0.3, 25, relu=True)
    # Chunks of input channels (tiled_conv_f32.h, channels_per_chunk): taken where a task's rows read each channel's
    # window at least 80 times (nnz / (tasks per tile x C_in); here 150-1150 with two threads for the forward and
    # the data gradient), so these layers are split into 3-7 chunks; the second has rows with empty chunks.
    conv_case("tiled 8x8 channel chunks", 16, 64, 256, (8, 8), 3, 1, 1, 1, 0.5, 19)
    conv_case("tiled 8x8 empty chunks", 16, 64, 384, (8, 8), 3, 1, 1, 1, 0.12, 20, half_rows_skip_half_channels=True)
    conv_case("tiled 4x4 channel chunks relu", 32, 96, 128, (4, 4), 3, 1, 1, 1, 0.5, 21, relu=True)
    # Larger maps take the tiled forward and data gradient where rows hold >= 96 taps (conv_f32.h, tiled_map_suits):
    # row tiles of a whole 14-wide row (or 7-wide segments with 8-lane vectors), 16-wide segments of 32-wide rows,
    # and tiles of any positions on an 11x13 map.
    conv_case("tiled 14x14 long rows", 16, 20, 20, (14, 14), 3, 1, 1, 1, 0.6, 22)
    conv_case("tiled 32x32 long rows relu", 16, 24, 20, (32, 32), 3, 1, 1, 1, 0.6, 23, relu=True)
    conv_case("tiled 11x13 long rows", 16, 20, 20, (11, 13), 3, 1, 1, 1, 0.6, 24)
    # A 2x2 map: few (batch block, tile) pairs, so the rows are split across tasks too (with two threads or more).
    torch.set_num_threads(max(2, torch.get_num_threads()))
    conv_case("tiled 2x2 rows split", 64, 16, 9, (2, 2), 3, 1, 1, 1, 0.4, 16)
    # The forward with a max-pool in its epilogue (conv_forward_max_pool): a ResNet stem's pool on the wide layout
    # (20 channels: a partial block of NHWC planes), a 2x2 pool leaving an odd row and column out, a dilated pool of
    # unequal windows with padding, no relu, and full blocks of 16 NHWC planes pooled to rows of 16 and more (their
    # transposed writes); the tiled layout's 2x2 pools of row-pair tiles (on AVX-512 8x8, 4x4 and 2x2 maps, in the
    # AVX2 and baseline copies 4x4: the others run unfused there), a partial last batch block, chunks of input
    # channels; where the tiles are not row pairs (16x16 maps, rows of one segment) or the pool is not 2x2, the
    # operator runs the forward and the pool in turn.
    stem_pool, pool_2x2 = ([3, 3], [2, 2], [1, 1], [1, 1]), ([2, 2], [2, 2], [0, 0], [1, 1])
    conv_case("wide 7x7 s2 p3 + stem pool", 2, 3, 20, (23, 21), 7, 2, 3, 1, 0.3, 32, relu=True, pool=stem_pool)
    conv_case("wide 3x3 + 2x2 pool", 2, 8, 6, (21, 19), 3, 1, 1, 1, 0.3, 33, pool=pool_2x2)
    conv_case("wide 3x3 + dilated pool", 1, 5, 17, (19, 20), 3, 1, 1, 1, 0.4, 34, relu=True,
              pool=([3, 2], [1, 2], [1, 0], [2, 1]))
    conv_case("wide 3x3 + 2x2 pool, 32 channels", 1, 6, 32, (36, 34), 3, 1, 1, 1, 0.3, 41, relu=True, pool=pool_2x2)
    conv_case("wide 14x14 chunks + 2x2 pool", 1, 160, 20, (14, 14), 3, 1, 1, 1, 0.2, 46, relu=True, pool=pool_2x2)
    conv_case("tiled 8x8 + 2x2 pool", 64, 16, 20, (8, 8), 3, 1, 1, 1, 0.3, 35, relu=True, pool=pool_2x2)
    conv_case("tiled 8x8 + 2x2 pool partial block", 40, 16, 36, (8, 8), 3, 1, 1, 1, 0.3, 36, pool=pool_2x2)
    conv_case("tiled 4x4 + 2x2 pool chunks", 32, 96, 40, (4, 4), 3, 1, 1, 1, 0.5, 37, relu=True, pool=pool_2x2)
    conv_case("tiled 2x2 + 2x2 pool", 64, 16, 24, (2, 2), 3, 1, 1, 1, 0.4, 38, relu=True, pool=pool_2x2)
    conv_case("tiled 16x16 + 2x2 pool (unfused)", 16, 20, 20, (16, 16), 3, 1, 1, 1, 0.6, 39, pool=pool_2x2)
    conv_case("tiled 8x8 + stem pool (unfused)", 64, 16, 20, (8, 8), 3, 1, 1, 1, 0.3, 40, pool=stem_pool)
    # Under 256 outputs per tap (batch x output positions) the forward and the weight gradient read the taps from the
    # CSR arrays instead of a list (conv_f32.h, with_csr_taps): the cases above all list them except the wide short
    # rows, the strided wide case and the 1x1; these two take the tiled and the batch-innermost layouts that way.
    conv_case("tiled 2x2 csr taps", 60, 16, 9, (2, 2), 3, 1, 1, 1, 0.4, 17)
    conv_case("batch-inner 2x2 csr taps", 17, 8, 8, (2, 2), 3, 1, 1, 1, 0.4, 18)
    # The KD loss's row kernel: partial vectors (classes 37, 100), long rows (1000), T = 1 (one exponential shared).
    for classes in (1, 37, 100, 1000):
        for temperature, alpha in ((4.0, 0.9), (1.0, 0.5), (2.0, 1.0), (3.0, 0.0)):
            kd_case(f"kd {classes} T{temperature} a{alpha}", 9, classes, temperature, alpha, classes)
    kd_case("kd teacher -inf", 6, 53, 4.0, 0.7, 11, minus_inf=True)
    kd_case("kd bfloat16", 5, 77, 4.0, 0.7, 12, dtype=torch.bfloat16)
    print(used, "ok")


if __name__ == "__main__":
    main()
