"""MaxPool2x2 computes nn.MaxPool2d(2) exactly (the extension's one-pass CPU kernel and the strided-views path it falls
back to), MaxPool2d any other floor-mode max-pool (the extension's window kernel, torch's max_pool2d elsewhere), and
sparsify puts them in place of the max-pools they can replace."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from ptd_sparse import _extension, sparsify
from ptd_sparse.nn import MaxPool2d, MaxPool2x2, SparseConv2d, pooling
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
    # Each pool is a Conv-BN-ReLU chain's only reader: it moves into the convolution (tests/test_fused_max_pool.py).
    fused = [m.max_pool for m in fast.modules() if isinstance(m, SparseConv2d) and m.max_pool is not None]
    assert len(fused) == 3 and all(pool.kernel_size == (2, 2) for pool in fused)
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


# --- MaxPool2d: any window --------------------------------------------------------------------------------------

WINDOWS = [  # (kernel_size, stride, padding, dilation): ResNet's stem pool first, then edges of the window arithmetic
    (3, 2, 1, 1), (3, 1, 1, 1), (2, 1, 0, 1), (1, 1, 0, 1), (1, 3, 0, 1), (4, 3, 2, 1), (2, 2, 1, 3), (3, 3, 0, 2),
    ((3, 2), (1, 2), (1, 0), (2, 1)), ((1, 4), (2, 3), (0, 2), (1, 1)),
]


def _with_specials(x):
    flat = x.view(-1)
    if flat.numel() > 7:
        flat[7] = float("nan")  # propagates, as in max_pool2d
        flat[2] = float("-inf")
    return x


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "chw"])
def test_max_pool2d_equals_torch_max_pool2d(window, dtype, layout):
    shape = {"nchw": (2, 5, 11, 9), "channels_last": (3, 19, 10, 7), "chw": (4, 8, 13)}[layout]
    x = _with_specials(torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    pool = MaxPool2d(*window)
    out = pool(x)
    if _extension.extension_problem() is None:
        assert pooling._runs_fused(x)
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                             torch.contiguous_format)
    torch.testing.assert_close(out, F.max_pool2d(x, *window), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("layout", ["strided", "grad"])
def test_max_pool2d_fallback_equals_max_pool2d(layout):
    x = torch.randn(2, 3, 9, 16, generator=torch.Generator().manual_seed(4))
    if layout == "strided":
        x = x[..., ::2]
    else:
        x.requires_grad_()
    assert not pooling._runs_fused(x)
    out = MaxPool2d(3, 2, 1)(x)
    torch.testing.assert_close(out, F.max_pool2d(x, 3, 2, 1), rtol=0, atol=0)
    if layout == "grad":
        (got,) = torch.autograd.grad(out.sum(), x)
        (want,) = torch.autograd.grad(F.max_pool2d(x, 3, 2, 1).sum(), x)
        torch.testing.assert_close(got, want)


def test_max_pool2d_copies_the_module_it_replaces():
    assert MaxPool2d.replaces(nn.MaxPool2d(3, 2, 1)) and MaxPool2d.replaces(nn.MaxPool2d(2))
    for other in (nn.MaxPool2d(3, ceil_mode=True), nn.MaxPool2d(3, return_indices=True), nn.AvgPool2d(3)):
        assert not MaxPool2d.replaces(other)
    pool = MaxPool2d.of(nn.MaxPool2d((3, 2), stride=None, padding=(1, 0), dilation=(1, 2)))
    assert (pool.kernel_size, pool.stride, pool.padding, pool.dilation) == ((3, 2), (3, 2), (1, 0), (1, 2))
    assert "kernel_size=(3, 2), stride=(3, 2)" in repr(pool)
    with pytest.raises(ValueError, match="module must be an nn.MaxPool2d in floor mode"):
        MaxPool2d.of(nn.MaxPool2d(2, ceil_mode=True))


@needs_extension
@pytest.mark.parametrize("shape", [(0, 3, 8, 8), (2, 0, 8, 8), (1, 1, 1, 1), (1, 2, 3, 2)])
def test_the_window_kernel_takes_empty_and_tiny_inputs(shape):
    x = torch.randn(shape)
    got = torch.ops.ptd_sparse_kernels.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1])
    assert got.shape == (shape[0], shape[1], (shape[2] - 1) // 2 + 1, (shape[3] - 1) // 2 + 1)
    if x.numel():
        torch.testing.assert_close(got, F.max_pool2d(x, 3, 2, 1), rtol=0, atol=0)


@pytest.mark.parametrize("shape, window", [((1, 2, 1, 4), (2, 2, 0, 1)), ((1, 1, 1, 1), (2, 2, 0, 1)),
                                           ((1, 3, 2, 1), (2, 2, 0, 1)), ((1, 2, 2, 2), (3, 2, 0, 1)),
                                           ((2, 3, 5, 2), (2, 1, 0, 2))])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_a_window_larger_than_the_input_is_refused_as_by_torch(shape, window, layout):
    # The span in + 2 * padding - dilation * (kernel - 1) - 1 is negative: no output (a truncating division gave one,
    # which read past the input).
    x = torch.randn(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError):
        F.max_pool2d(x, *window)
    with pytest.raises((ValueError, RuntimeError), match="smaller than the window|too small"):
        MaxPool2d(*window)(x)
    if _extension.extension_problem() is None:
        with pytest.raises(ValueError, match=r"input of shape .* is smaller than the window"):
            torch.ops.ptd_sparse_kernels.max_pool2d(x, *([v, v] for v in window))


def test_max_pool2d_takes_the_argument_forms_nn_max_pool2d_takes():
    x = torch.randn(2, 3, 9, 8)
    for module in (nn.MaxPool2d([3]), nn.MaxPool2d(3, stride=()), nn.MaxPool2d((3, 2), stride=[2], padding=[1]),
                   nn.MaxPool2d(2, padding=[0, 0], dilation=[1, 1])):
        torch.testing.assert_close(MaxPool2d.of(module)(x), module(x), rtol=0, atol=0)


@needs_extension
def test_a_window_wholly_in_the_padding_gives_minus_infinity_as_torch():
    x = torch.randn(1, 2, 2, 2)  # kernel 2, dilation 3, padding 1: output 0's window reads input -1 and 2 only
    got = torch.ops.ptd_sparse_kernels.max_pool2d(x, [2, 2], [1, 1], [1, 1], [3, 3])
    torch.testing.assert_close(got, F.max_pool2d(x, 2, 1, 1, 3), rtol=0, atol=0)
    assert torch.isneginf(got).all()


@needs_extension
def test_the_window_kernel_names_what_it_refuses():
    op = torch.ops.ptd_sparse_kernels.max_pool2d
    x = torch.randn(1, 2, 6, 6)
    with pytest.raises(ValueError, match=r"kernel_size must be two integers >= 1, got \[0, 3\]"):
        op(x, [0, 3], [1, 1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="stride must be two integers >= 1"):
        op(x, [3, 3], [0, 1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="dilation must be two integers >= 1"):
        op(x, [3, 3], [1, 1], [0, 0], [1, 0])
    with pytest.raises(ValueError, match="padding must be at most half of kernel_size"):
        op(x, [3, 3], [1, 1], [2, 2], [1, 1])
    with pytest.raises(ValueError, match=r"input of shape \[1, 2, 6, 6\] is smaller than the window"):
        op(x, [4, 4], [1, 1], [0, 0], [2, 2])
    with pytest.raises(ValueError, match=r"input must be \[..., H, W\].*got shape \[6, 6\]"):
        op(torch.randn(6, 6), [2, 2], [2, 2], [0, 0], [1, 1])


@needs_extension
def test_opcheck_of_the_window_kernel():
    op = torch.ops.ptd_sparse_kernels.max_pool2d.default
    for x in (torch.randn(2, 3, 9, 7), torch.randn(2, 3, 9, 7).contiguous(memory_format=torch.channels_last)):
        torch.library.opcheck(op, (x, [3, 3], [2, 2], [1, 1], [1, 1]))


class _Stem(nn.Module):
    """A torchvision-style stem: 7x7 stride-2 convolution, BatchNorm, ReLU, 3x3 stride-2 max-pool, then a head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 7, 2, 3, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.bn(self.conv(x)))).mean((2, 3)))


def test_sparsify_replaces_a_stem_pool_and_bakes_the_prune_masks_of_what_it_keeps():
    torch.manual_seed(0)
    model = _Stem().eval()
    prune.l1_unstructured(model.conv, "weight", 0.8)
    prune.l1_unstructured(model.fc, "weight", 0.5)
    fast = sparsify(model, routes="sparse")
    # The pool reads the ReLU alone: it moves into the convolution (tests/test_fused_max_pool.py).
    assert isinstance(fast.pool, nn.Identity)
    pool = fast.conv.max_pool
    assert isinstance(pool, MaxPool2d) and (pool.kernel_size, pool.padding) == ((3, 3), (1, 1))
    # The head keeps weight_orig * weight_mask as its plain weight, with no hook recomputing it per forward.
    assert not fast.fc._forward_pre_hooks and not hasattr(fast.fc, "weight_mask")
    assert isinstance(fast.fc.weight, nn.Parameter)
    torch.testing.assert_close(fast.fc.weight, model.fc.weight_orig * model.fc.weight_mask, rtol=0, atol=0)
    assert hasattr(model.fc, "weight_mask") and model.fc._forward_pre_hooks  # the caller's model is untouched
    x = torch.randn(3, 3, 40, 36)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-5)
