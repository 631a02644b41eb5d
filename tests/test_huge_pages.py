"""The float32 CPU kernels ask for transparent huge pages for their large outputs (csrc/cpu/huge_pages.h): faulting in
a fresh 200 MB output 4 KiB at a time cost a ResNet stem at batch 64 about half its time."""
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
