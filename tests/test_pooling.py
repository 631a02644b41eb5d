"""MaxPool2x2 computes nn.MaxPool2d(2) exactly (the extension's one-pass CPU kernel and the strided-views path it falls
back to), and sparsify puts it in place of the max-pools it can replace."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ptd_sparse import _extension, sparsify
from ptd_sparse.nn import MaxPool2x2, pooling
from ptd_sparse.pipeline.models import build_model
from ptd_sparse.pipeline.pruning import prune_to


@pytest.mark.parametrize("shape", [(3, 5, 8, 8), (2, 4, 7, 9), (1, 1, 2, 2), (6, 3, 2, 5), (4, 6, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_max_pool_2x2_equals_max_pool2d(shape, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    if x.numel() > 3:
        x.view(-1)[3] = float("nan")
        x.view(-1)[1] = float("-inf")
    torch.testing.assert_close(MaxPool2x2()(x), F.max_pool2d(x, 2), equal_nan=True, rtol=0, atol=0)


def test_too_small_input_is_refused_like_max_pool2d():
    x = torch.randn(6, 3, 1, 4)
    with pytest.raises(RuntimeError):
        F.max_pool2d(x, 2)
    with pytest.raises(ValueError, match=r"H, W >= 2, got shape \(6, 3, 1, 4\)"):
        MaxPool2x2()(x)


def test_only_exact_equivalents_are_replaced():
    assert MaxPool2x2.replaces(nn.MaxPool2d(2)) and MaxPool2x2.replaces(nn.MaxPool2d((2, 2), 2))
    for other in (nn.MaxPool2d(3), nn.MaxPool2d(2, 1), nn.MaxPool2d(2, padding=1), nn.MaxPool2d(2, ceil_mode=True),
                  nn.MaxPool2d(2, return_indices=True), nn.MaxPool2d(2, dilation=2), nn.AvgPool2d(2)):
        assert not MaxPool2x2.replaces(other)


def test_sparsify_replaces_the_pools_of_a_vgg_and_keeps_its_output():
    torch.manual_seed(0)
    model = build_model("vgg_fmnist", in_channels=1, image_size=28).eval()
    prune_to(model, 0.9)
    fast = sparsify(model)
    assert sum(isinstance(m, MaxPool2x2) for m in fast.modules()) == 3
    assert not any(isinstance(m, nn.MaxPool2d) for m in fast.modules())
    assert any(isinstance(m, nn.MaxPool2d) for m in sparsify(model, fast_pooling=False).modules())
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=1e-4)


needs_extension = pytest.mark.skipif(_extension.extension_problem() is not None, reason="needs the C++ extension")


@needs_extension
def test_contiguous_and_channels_last_cpu_inputs_take_the_one_pass_kernel():
    x = torch.randn(2, 3, 6, 6)
    assert pooling._runs_fused(x)
    assert pooling._runs_fused(x.contiguous(memory_format=torch.channels_last))
    assert not pooling._runs_fused(x[..., ::2])
    assert not pooling._runs_fused(x.clone().requires_grad_())
    with torch.no_grad():
        assert pooling._runs_fused(x.clone().requires_grad_())


@needs_extension
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (3, 2, 3, 3), (1, 2, 3)])
def test_the_kernel_takes_empty_batches_and_odd_sizes(shape):
    x = torch.randn(shape)
    torch.testing.assert_close(torch.ops.ptd_sparse_kernels.max_pool2x2(x), F.max_pool2d(x, 2), rtol=0, atol=0)


@needs_extension
def test_the_kernel_takes_zero_channels():
    # max_pool2d refuses a 4-d input without channels; the pool of nothing is empty.
    assert torch.ops.ptd_sparse_kernels.max_pool2x2(torch.randn(2, 0, 5, 5)).shape == (2, 0, 2, 2)


@needs_extension
def test_the_kernel_names_its_input_when_refusing_it():
    with pytest.raises(ValueError, match=r"max_pool2x2: input must be \[..., H, W\].*got shape \[4, 1, 4\]"):
        torch.ops.ptd_sparse_kernels.max_pool2x2(torch.randn(4, 1, 4))
    with pytest.raises(ValueError, match=r"got shape \[4, 4\]"):
        torch.ops.ptd_sparse_kernels.max_pool2x2(torch.randn(4, 4))


@needs_extension
def test_opcheck_of_the_kernel():
    torch.library.opcheck(torch.ops.ptd_sparse_kernels.max_pool2x2.default, (torch.randn(2, 3, 7, 6),))
    channels_last = torch.randn(2, 3, 7, 6).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.ptd_sparse_kernels.max_pool2x2.default, (channels_last,))


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 19, 9, 8), (1, 64, 4, 4), (0, 5, 4, 4), (2, 5, 3, 2)])
def test_the_kernel_pools_channels_last_in_channels_last(dtype, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    if x.numel():
        x[0, 0, 0, 0] = float("nan")  # propagates, as in max_pool2d
    out = torch.ops.ptd_sparse_kernels.max_pool2x2(x)
    # An empty tensor counts as NCHW-contiguous (ptd_sparse.conv_geometry.is_channels_last), as does its output.
    assert out.is_contiguous(memory_format=torch.channels_last if x.numel() else torch.contiguous_format)
    torch.testing.assert_close(out, F.max_pool2d(x.contiguous(), 2), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("layout", ["channels_last", "strided", "grad"])
def test_the_fallback_path_equals_max_pool2d(layout):
    x = torch.randn(3, 4, 9, 8, generator=torch.Generator().manual_seed(1))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(3, 4, 9, 16)[..., ::2]
    else:
        x.requires_grad_()
    out = MaxPool2x2()(x)
    torch.testing.assert_close(out, F.max_pool2d(x, 2), rtol=0, atol=0)
    if layout == "grad":  # no ties in random data: the gradient goes to each window's maximum, as max_pool2d's
        (got,) = torch.autograd.grad(out.sum(), x)
        (want,) = torch.autograd.grad(F.max_pool2d(x, 2).sum(), x)
        torch.testing.assert_close(got, want)
