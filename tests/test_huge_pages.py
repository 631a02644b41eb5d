"""The float32 CPU kernels ask for transparent huge pages for their large outputs (csrc/cpu/huge_pages.h): faulting in
a fresh 200 MB output 4 KiB at a time cost a ResNet stem at batch 64 about half its time. Large outputs come from
buffers the calling thread's earlier outputs released (cpu_isa::output_tensor), never from one still held."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

import ptd_sparse._extension as extension
from ptd_sparse.pattern import SparseConvWeight

needs_extension = pytest.mark.skipif(extension.extension_problem() is not None, reason="needs the C++ extension")


def _huge_pages_on_request() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as setting:
            return "[never]" not in setting.read()
    except OSError:
        return False


@needs_extension
@pytest.mark.skipif(not sys.platform.startswith("linux") or not _huge_pages_on_request(),
                    reason="needs Linux with transparent huge pages (madvise, /proc/self/smaps)")
def test_large_outputs_ask_for_transparent_huge_pages():
    # csrc/cpu/huge_pages.h: an output of at least 32 MiB is advised MADV_HUGEPAGE before its first write, which
    # the kernel records as the flag "hg" of the mapping that holds it.
    x = torch.randn(1, 1, 363, 363)
    weight = torch.zeros(64, 1, 1, 1)
    weight[::3] = 1.0
    sparse = SparseConvWeight.from_dense(weight, weight != 0)
    out = torch.ops.ptd_sparse_kernels.conv_forward(x, sparse.values, sparse.pattern.row_ptr, sparse.pattern.col_idx,
                                                    [64, 1, 1, 1], None, [1, 1], [0, 0], [1, 1], False)
    assert out.nbytes >= 32 << 20
    torch.testing.assert_close(out, F.conv2d(x, weight))
    address, flags = out.data_ptr() + (4 << 20), None
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                flags = line.split()[1:]
                break
    assert flags is not None and "hg" in flags


def _large_layer():
    x = torch.randn(2, 2, 300, 300)
    weight = torch.randn(64, 2, 3, 3)
    sparse = SparseConvWeight.from_dense(weight, torch.rand(weight.shape) < 0.5)
    args = (sparse.values, sparse.pattern.row_ptr, sparse.pattern.col_idx, [64, 2, 3, 3], None, [1, 1], [1, 1],
            [1, 1], True)
    want = F.relu(F.conv2d(x, sparse.to_dense(), padding=1))
    return x, args, want


@needs_extension
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_large_outputs_reuse_released_buffers_and_never_held_ones(layout):
    # 2 x 64 x 300 x 300 floats (46 MB) is above the 32 MiB at which outputs come from the kept buffers.
    x, args, want = _large_layer()
    x = x.contiguous(memory_format=layout)
    forward = torch.ops.ptd_sparse_kernels.conv_forward
    first = forward(x, *args)
    assert first.nbytes >= 32 << 20 and first.is_contiguous(memory_format=layout) and first._base is None
    torch.testing.assert_close(first, want, atol=1e-4, rtol=1e-4)
    held = first.clone()
    second = forward(x, *args)  # the first is still held: a buffer of its own
    assert second.data_ptr() != first.data_ptr()
    torch.testing.assert_close(first, held, rtol=0, atol=0)
    address = second.data_ptr()
    del second
    third = forward(x, *args)  # the second's buffer, released
    assert third.data_ptr() == address and third.is_contiguous(memory_format=layout)
    torch.testing.assert_close(third, want, atol=1e-4, rtol=1e-4)
    # A view of an output holds its buffer too.
    corner = third[:, :, :10, :10]
    del third
    fourth = forward(x, *args)
    assert fourth.data_ptr() != address
    torch.testing.assert_close(corner, want[:, :, :10, :10], atol=1e-4, rtol=1e-4)
    pooled = torch.ops.ptd_sparse_kernels.max_pool2d(fourth, [1, 1], [1, 1], [0, 0], [1, 1])
    torch.testing.assert_close(pooled, fourth, rtol=0, atol=0)


@needs_extension
def test_an_output_moved_into_shared_memory_is_never_written_again():
    # Sending a tensor to another process moves its storage into shared memory in place; that process may still read
    # it after this one has let go, so the buffer is dropped from the kept ones.
    x, args, _ = _large_layer()
    forward = torch.ops.ptd_sparse_kernels.conv_forward
    out = forward(x, *args)
    out.share_memory_()
    shared = out.data_ptr()
    del out
    for _ in range(3):
        assert forward(x, *args).data_ptr() != shared
