"""The max-pool fused after a sparse convolution: the kernel operator conv_forward_max_pool (the pool in the wide
layout's epilogue, a 2x2 pool in the tiled layout's, the two operators in turn elsewhere) equals max_pool2d of the forward on every input it takes and
names what it refuses; SparseConv2d's `max_pool` applies the pool on every route, and sparsify moves the max-pool
that is a Conv-BN(-ReLU) chain's only reader into the convolution."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from conftest import random_mask
from torch import nn
from torch.nn.utils import prune

import ptd_sparse
from ptd_sparse import _extension
from ptd_sparse.conv_geometry import is_channels_last
from ptd_sparse.nn import MaxPool2d, SparseConv2d
from ptd_sparse.pattern import ConvPattern

pytestmark = pytest.mark.skipif(_extension.extension_problem() is not None, reason="needs the C++ extension")

STEM_POOL = ([3, 3], [2, 2], [1, 1], [1, 1])
# dtype -> (rtol, atol) against float64 F.conv2d then max_pool2d: float32 sums in a different order; the half types
# round the forward's output once, the pool selects among those values.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12), torch.bfloat16: (2e-2, 5e-2)}


def op():
    return torch.ops.ptd_sparse_kernels.conv_forward_max_pool.default


def layer(generator, c_in=3, c_out=20, kernel=7, stride=2, padding=3, dilation=1, density=0.3):
    """(weight, mask, bias, pattern) of a random pruned convolution."""
    weight = torch.randn(c_out, c_in, kernel, kernel, generator=generator)
    mask = random_mask(weight.shape, density, generator)
    bias = torch.randn(c_out, generator=generator)
    return weight, mask, bias, ConvPattern.from_mask(mask)


def expected(x, weight, mask, bias, stride, padding, dilation, relu, pool):
    out = F.conv2d(x.double(), (weight * mask).double(), bias.double() if bias is not None else None, stride,
                   padding, dilation)
    return F.max_pool2d(out.clamp_min(0) if relu else out, *pool)


def call(x, weight, mask, bias, p, stride, padding, dilation, relu, pool, dtype=torch.float32, columns=None):
    return op()(x.to(dtype), p.gather(weight).to(dtype).contiguous(), p.row_ptr,
                p.col_idx if columns is None else columns, list(weight.shape),
                bias.to(dtype) if bias is not None else None, [stride] * 2, [padding] * 2, [dilation] * 2, relu,
                *pool)


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("case", [
    # (batch, c_in, c_out, size, kernel, stride, padding, dilation, density, pool)
    (2, 3, 20, (29, 27), 7, 2, 3, 1, 0.3, STEM_POOL),  # a ResNet stem: the wide layout, fused
    (3, 5, 7, (17, 15), 3, 1, 1, 1, 0.5, ([2, 2], [2, 2], [0, 0], [1, 1])),  # odd map: last row and column left out
    (1, 4, 9, (13, 16), 3, 1, 2, 2, 0.4, ([3, 2], [1, 2], [1, 0], [2, 1])),  # unequal, dilated, padded windows
    (0, 4, 9, (13, 16), 3, 1, 1, 1, 0.4, STEM_POOL),  # an empty batch
    (2, 4, 6, (9, 8), 3, 1, 1, 1, 0.0, STEM_POOL),  # no nonzeros: the bias, pooled
    (2, 4, 6, (9, 8), 3, 1, 1, 1, 1.0, ([2, 2], [2, 2], [0, 0], [1, 1])),  # every weight kept
    (32, 16, 12, (8, 8), 3, 1, 1, 1, 0.4, ([2, 2], [2, 2], [0, 0], [1, 1])),  # tiled: each row-pair tile pooled
    (40, 16, 12, (4, 4), 3, 1, 1, 1, 0.4, ([2, 2], [2, 2], [0, 0], [1, 1])),  # tiled, a partial last batch block
    (16, 20, 8, (16, 16), 3, 1, 1, 1, 0.6, ([2, 2], [2, 2], [0, 0], [1, 1])),  # tiled in rows: the two in turn
    (32, 16, 12, (8, 8), 3, 1, 1, 1, 0.4, STEM_POOL),  # tiled, not a 2x2 pool: the two in turn
])
def test_the_operator_equals_max_pool2d_of_the_forward(generator, dtype, layout, relu, case):
    batch, c_in, c_out, size, kernel, stride, padding, dilation, density, pool = case
    weight, mask, bias, p = layer(generator, c_in, c_out, kernel, stride, padding, dilation, density)
    x = torch.randn(batch, c_in, *size, generator=generator).contiguous(memory_format=layout)
    got = call(x, weight, mask, bias, p, stride, padding, dilation, relu, pool, dtype)
    want = expected(x.to(dtype), weight.to(dtype).to(weight.dtype), mask, bias, stride, padding, dilation, relu, pool)
    assert got.dtype == dtype and got.shape == want.shape
    # The layout the two operators would give: channels_last in, channels_last out.
    assert is_channels_last(got) == is_channels_last(want.contiguous(memory_format=layout))
    rtol, atol = TOLERANCES[dtype]
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * scale)


def test_non_contiguous_inputs_and_compact_columns_give_the_same_values(generator):
    weight, mask, bias, p = layer(generator)
    x = torch.randn(2, 3, 31, 30, generator=generator)[:, :, 1:, 2:]  # a view, not contiguous
    want = call(x.contiguous(), weight, mask, bias, p, 2, 3, 1, True, STEM_POOL)
    torch.testing.assert_close(call(x, weight, mask, bias, p, 2, 3, 1, True, STEM_POOL), want, rtol=0, atol=0)
    compact = p.col_idx.to(torch.int16)
    torch.testing.assert_close(call(x, weight, mask, bias, p, 2, 3, 1, True, STEM_POOL, columns=compact), want,
                               rtol=0, atol=0)
    nhwc = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(call(nhwc, weight, mask, bias, p, 2, 3, 1, True, STEM_POOL, columns=compact), want,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_nan_propagates_as_through_max_pool2d(generator, layout):
    weight, mask, bias, p = layer(generator)
    bias[4] = float("nan")  # one whole output plane NaN, before and after the relu
    x = torch.randn(2, 3, 25, 25, generator=generator)
    x[1, 0, 10, 10] = float("nan")  # the outputs whose nonzero taps read it (the sparse forward skips the zeros)
    x = x.contiguous(memory_format=layout)
    values = p.gather(weight).contiguous()
    for relu in (False, True):
        got = call(x, weight, mask, bias, p, 2, 3, 1, relu, STEM_POOL)
        forward = torch.ops.ptd_sparse_kernels.conv_forward(x, values, p.row_ptr, p.col_idx, list(weight.shape),
                                                            bias, [2, 2], [3, 3], [1, 1], relu)
        assert got[:, 4].isnan().all() and got[1].isnan().sum() > got[0].isnan().sum()
        torch.testing.assert_close(got, F.max_pool2d(forward, *STEM_POOL), rtol=1e-6, atol=1e-6, equal_nan=True)


def test_opcheck_of_the_operator(generator):
    weight, mask, bias, p = layer(generator, c_out=6)
    values = p.gather(weight).contiguous()
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 3, 19, 17, generator=generator).contiguous(memory_format=layout)
        torch.library.opcheck(op(), (x, values, p.row_ptr, p.col_idx, list(weight.shape), bias, [2, 2], [3, 3],
                                     [1, 1], True, *STEM_POOL))


def test_the_operator_names_what_it_refuses(generator):
    weight, mask, bias, p = layer(generator)
    x = torch.randn(2, 3, 21, 21, generator=generator)
    with pytest.raises(ValueError, match=r"pool_kernel_size must be two integers >= 1, got \[0, 3\]"):
        call(x, weight, mask, bias, p, 2, 3, 1, True, ([0, 3], [2, 2], [1, 1], [1, 1]))
    with pytest.raises(ValueError, match="pool_padding must be at most half of pool_kernel_size"):
        call(x, weight, mask, bias, p, 2, 3, 1, True, ([3, 3], [2, 2], [2, 1], [1, 1]))
    with pytest.raises(ValueError, match=r"convolution's 11x11 output is smaller than the pool's window"):
        call(x, weight, mask, bias, p, 2, 3, 1, True, ([12, 12], [2, 2], [0, 0], [1, 1]))
    with pytest.raises(ValueError, match="input has 4 channels"):  # the forward's own checks, as conv_forward's
        call(torch.randn(2, 4, 21, 21), weight, mask, bias, p, 2, 3, 1, True, STEM_POOL)


class Stem(nn.Module):
    """A torchvision-style stem and head: 7x7 stride-2 convolution, BatchNorm, ReLU, 3x3 stride-2 max-pool."""

    def __init__(self, pool=None):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 7, 2, 3, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.pool = pool if pool is not None else nn.MaxPool2d(3, 2, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.bn(self.conv(x)))).mean((2, 3)))


def pruned_stem(pool=None) -> Stem:
    torch.manual_seed(0)
    model = Stem(pool).eval()
    prune.l1_unstructured(model.conv, "weight", 0.8)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("routes", ["sparse", "dense", "measure"])
def test_sparsify_fuses_a_stem_pool_and_keeps_the_output(routes):
    model = pruned_stem()
    fast = ptd_sparse.sparsify(model, routes=routes)
    assert isinstance(fast.pool, nn.Identity) and isinstance(fast.relu, nn.Identity)
    assert isinstance(fast.conv.max_pool, MaxPool2d) and fast.conv.max_pool.kernel_size == (3, 3)
    x = torch.randn(3, 3, 40, 36)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(fast(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last)), want, atol=1e-5,
                                   rtol=1e-5)
    # Without fast pooling the model keeps torch's pool, unfused.
    plain = ptd_sparse.sparsify(model, fast_pooling=False)
    assert isinstance(plain.pool, nn.MaxPool2d) and plain.conv.max_pool is None


def test_pools_that_are_not_the_only_reader_or_not_exact_stay_unfused():
    class TwoReaders(Stem):
        def forward(self, x):
            y = self.relu(self.bn(self.conv(x)))
            return self.fc(self.pool(y).mean((2, 3)) + y.mean((2, 3)))

    two_readers = TwoReaders().eval()
    prune.l1_unstructured(two_readers.conv, "weight", 0.8)
    for model in (pruned_stem(nn.MaxPool2d(3, 2, 1, ceil_mode=True)), two_readers):
        fast = ptd_sparse.sparsify(model, routes="sparse")
        assert fast.conv.max_pool is None and not isinstance(fast.pool, nn.Identity)
        x = torch.randn(2, 3, 33, 30)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-5)


def test_an_untraceable_model_keeps_its_pools_unfused():
    """Without the fx trace nothing shows that a pool is the ReLU's only reader (a forward may run features[:3]):
    the nn.Sequential fallback folds BatchNorm and ReLU and leaves the pools as (fast) modules."""
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.MaxPool2d(3, 1, 1))

        def forward(self, x):
            if x.sum() > float("inf"):  # data-dependent control flow: fx cannot trace it
                return x
            return self.body(x)

    torch.manual_seed(0)
    model = Untraceable().eval()
    for index in (0, 4):
        prune.l1_unstructured(model.body[index], "weight", 0.7)
    fast = ptd_sparse.sparsify(model, routes="sparse")
    assert [type(m).__name__ for m in fast.body] == ["SparseConv2d", "Identity", "Identity", "MaxPool2x2",
                                                      "SparseConv2d", "Identity", "MaxPool2d"]
    assert fast.body[0].max_pool is None and fast.body[4].max_pool is None
    x = torch.randn(2, 3, 15, 13)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-5)


def test_the_module_pools_on_calls_that_want_gradients_and_in_compiled_graphs(generator):
    conv = nn.Conv2d(3, 8, 5, 2, 2)
    mask = random_mask(conv.weight.shape, 0.3, generator)
    sparse = SparseConv2d.from_conv(conv, mask, route="sparse")
    sparse.relu = True
    sparse.max_pool = MaxPool2d(3, 2, 1)
    x = torch.randn(2, 3, 23, 21, generator=generator, requires_grad=True)
    out = sparse(x)
    want_x = x.detach().clone().requires_grad_(True)
    weight = (conv.weight * mask).detach().requires_grad_(True)
    want = F.max_pool2d(F.relu(F.conv2d(want_x, weight, conv.bias.detach(), 2, 2)), 3, 2, 1)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    grad = torch.randn(want.shape, generator=generator)
    out.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(x.grad, want_x.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sparse.values.grad, weight.grad.reshape(-1)[ConvPattern.from_mask(mask).flat_index],
                               atol=1e-4, rtol=1e-4)
    sparse.eval()
    with torch.no_grad():
        eager = sparse(x.detach())
        compiled = torch.compile(sparse, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x.detach()), eager, atol=1e-5, rtol=1e-5)


def test_max_pool_takes_only_the_pool_the_fused_operator_computes(generator):
    conv = nn.Conv2d(3, 8, 3, padding=1)
    sparse = SparseConv2d.from_conv(conv, random_mask(conv.weight.shape, 0.3, generator))
    with pytest.raises(TypeError, match="max_pool must be a ptd_sparse.nn.MaxPool2d or None, got MaxPool2d"):
        sparse.max_pool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
    sparse.max_pool = MaxPool2d.of(nn.MaxPool2d(3, 2, 1))
    sparse.max_pool = None
    assert sparse.max_pool is None


def test_the_fused_pool_survives_copies_saves_and_old_pickles(generator):
    fast = ptd_sparse.sparsify(pruned_stem(), routes="sparse")
    x = torch.randn(2, 3, 30, 30, generator=generator)
    with torch.no_grad():
        want = fast(x)
        for twin in (copy.deepcopy(fast), torch.load(_saved(fast), weights_only=False)):
            assert isinstance(twin.conv.max_pool, MaxPool2d)
            torch.testing.assert_close(twin(x), want, rtol=0, atol=0)
        # A state dict loads into a fresh sparsify of the same model: the pool holds no state.
        fresh = ptd_sparse.sparsify(pruned_stem(), routes="sparse")
        fresh.load_state_dict(fast.state_dict())
        torch.testing.assert_close(fresh(x), want, rtol=0, atol=0)
        # A module pickled before pools were fused has no max_pool: it loads without one.
        old = copy.deepcopy(fast.conv)
        del old._modules["max_pool"]
        state = old.__getstate__()
        revived = SparseConv2d.__new__(SparseConv2d)
        revived.__setstate__(state)
        assert revived.max_pool is None


def _saved(model: nn.Module) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return buffer
