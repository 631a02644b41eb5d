"""MaskedConv2d, SparseConv2d, sparsify and the canonical CSR format."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from conftest import device_backends, device_for, on_device, random_mask
from torch import nn

import ptd_sparse
from ptd_sparse import _extension, functional
from ptd_sparse.backends import DENSE_CROSSOVER, SPARSE_CONV
from ptd_sparse.conv_geometry import is_channels_last
from ptd_sparse.nn import MaskedConv2d, SparseConv2d, activation_layout, measured_route
from ptd_sparse.nn.pooling import MaxPool2x2
from ptd_sparse.pattern import ConvPattern, SparseConvWeight

BACKENDS = device_backends(SPARSE_CONV)  # cuda and triton on CUDA tensors where a GPU exists


def test_csr_format_is_canonical(generator):
    weight = torch.zeros(3, 2, 2, 2)
    weight[0, 1, 0, 1] = 1.5  # column (1 * 2 + 0) * 2 + 1 = 5
    weight[2, 0, 1, 0] = -2.0  # column 2
    weight[2, 1, 1, 1] = 3.0  # column 7
    sparse = SparseConvWeight.from_dense(weight)
    assert sparse.pattern.row_ptr.tolist() == [0, 1, 1, 3]
    assert sparse.pattern.col_idx.tolist() == [5, 2, 7]
    assert sparse.values.tolist() == [1.5, -2.0, 3.0]
    assert sparse.pattern.row_ptr.dtype == torch.int32 and sparse.pattern.col_idx.dtype == torch.int32
    assert sparse.nnz == 3 and sparse.density == pytest.approx(3 / 24)
    assert torch.equal(sparse.to_dense(), weight)
    # Transposed view by input channel: channel 0 holds entry 1 (row 2), channel 1 entries 0 and 2 (rows 0, 2).
    assert sparse.pattern.t_ptr.tolist() == [0, 1, 3]
    assert sparse.pattern.t_perm.tolist() == [1, 0, 2]
    assert sparse.pattern.t_rows.tolist() == [2, 0, 2]


@pytest.mark.parametrize("density", [0.0, 0.01, 0.5, 1.0])
def test_from_dense_with_mask_round_trips(density, generator):
    weight = torch.randn(7, 5, 3, 3, generator=generator)
    mask = random_mask(weight.shape, density, generator)
    sparse = SparseConvWeight.from_dense(weight, mask)
    assert sparse.nnz == int(mask.sum())
    assert torch.equal(sparse.to_dense(), weight * mask)
    assert torch.equal(SparseConvWeight.from_dense(weight, mask.float()).to_dense(), weight * mask)
    moved = sparse.to(dtype=torch.float64)
    assert moved.dtype == torch.float64 and moved.nnz == sparse.nnz


def test_pattern_errors():
    with pytest.raises(ValueError, match="mask must be boolean or hold only 0 and 1"):
        ConvPattern.from_mask(torch.full((2, 2, 3, 3), 0.5))
    with pytest.raises(ValueError, match="mask must be a 4-D tensor"):
        ConvPattern.from_mask(torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask has shape"):
        SparseConvWeight.from_dense(torch.randn(2, 2, 3, 3), torch.ones(2, 2, 1, 1))
    with pytest.raises(ValueError, match="values must be 1-D with nnz = 36"):
        SparseConvWeight(ConvPattern.from_mask(torch.ones(2, 2, 3, 3)), torch.zeros(5))


def test_mask_is_compressed_once_per_change(monkeypatch, generator):
    calls = []
    original = ConvPattern.from_mask.__func__

    def counting(cls, mask, groups=1):
        calls.append(1)
        return original(cls, mask, groups)

    monkeypatch.setattr(ConvPattern, "from_mask", classmethod(counting))
    conv = MaskedConv2d(3, 4, 3, padding=1)
    conv.set_mask(random_mask(conv.weight.shape, 0.3, generator))
    x = torch.randn(2, 3, 8, 8, generator=generator)
    for _ in range(3):
        conv(x).sum().backward()
    assert len(calls) == 1
    conv.set_mask(random_mask(conv.weight.shape, 0.1, generator))
    out = conv(x)
    assert len(calls) == 2
    torch.testing.assert_close(out, F.conv2d(x, conv.weight * conv.mask, conv.bias, padding=1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, padding="same"),
    dict(kernel_size=4, padding="same"),  # asymmetric 'same'
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=(3, 1), stride=(2, 1), padding=(1, 0), bias=False),
    dict(kernel_size=3, padding=1, groups=2),  # dense masked path
], ids=["pad1", "same", "same_even", "reflect", "rect", "groups2"])
def test_masked_conv2d_is_a_drop_in_conv2d(backend, config, generator):
    device = device_for(backend)
    conv = nn.Conv2d(4, 6, **config).to(device)
    masked = MaskedConv2d(4, 6, backend=backend, **config).to(device)
    masked.load_state_dict(conv.state_dict(), strict=False)
    mask = random_mask(masked.weight.shape, 0.35, generator).to(device)
    masked.set_mask(mask)
    with torch.no_grad():
        conv.weight.mul_(mask)
    x = torch.randn(3, 4, 9, 8, generator=generator).to(device)
    out, expected = masked(x), conv(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(masked.weight.grad, conv.weight.grad * mask, atol=1e-4, rtol=1e-5)
    assert not masked.weight.grad[~mask].any()


def test_masked_conv2d_state_dict_round_trip(generator):
    conv = MaskedConv2d(3, 5, 3, padding=1)
    conv.set_mask(random_mask(conv.weight.shape, 0.2, generator))
    buffer = io.BytesIO()
    torch.save(conv.state_dict(), buffer)
    buffer.seek(0)
    restored = MaskedConv2d(3, 5, 3, padding=1)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(1, 3, 6, 6, generator=generator)
    torch.testing.assert_close(restored(x), conv(x))
    assert restored.mask.dtype == torch.bool and restored.nnz == conv.nnz
    assert "density=0.2" in repr(restored)


def test_masked_conv2d_from_conv_shares_parameters(generator):
    conv = nn.Conv2d(3, 4, 3)
    masked = MaskedConv2d.from_conv(conv, random_mask(conv.weight.shape, 0.5, generator))
    assert masked.weight is conv.weight
    with pytest.raises(ValueError, match="mask must have the weight's shape"):
        masked.set_mask(torch.ones(4, 3, 1, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_conv2d_module(backend, generator):
    conv = nn.Conv2d(5, 7, 3, stride=2, padding="valid").to(device_for(backend))
    mask = on_device(backend, random_mask(conv.weight.shape, 0.25, generator))
    sparse = SparseConv2d.from_conv(conv, mask, backend=backend)
    x = on_device(backend, torch.randn(2, 5, 11, 11, generator=generator))
    torch.testing.assert_close(sparse(x), F.conv2d(x, conv.weight * mask, conv.bias, stride=2), atol=1e-5,
                               rtol=1e-5)
    assert sparse.nnz == int(mask.sum())
    restored = SparseConv2d.from_conv(conv, mask)
    restored.load_state_dict(sparse.state_dict())
    with pytest.raises(ValueError, match="symmetric zero padding"):
        SparseConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))


@pytest.mark.skipif(_extension.extension_problem() is not None, reason="the C++ extension is not built")
def test_sparse_conv2d_inference_calls_take_the_forward_operator(generator, monkeypatch):
    """Inference calls on the CPU kernel skip the public function's checks and autograd layer (SparseConv2d's
    _runs_forward_only); their results, layouts and errors stay those of the public function."""
    from ptd_sparse.native import sparse_conv2d as native

    conv = nn.Conv2d(6, 10, 3, padding=1, bias=True)
    mask = random_mask(conv.weight.shape, 0.3, generator)
    sparse = SparseConv2d.from_conv(conv, mask, route="sparse").eval()
    sparse.relu = True
    assert sparse.col_idx.dtype == torch.int16  # the compact columns, read as they are
    calls = []
    direct = native.forward_only
    monkeypatch.setattr(native, "forward_only", lambda *args: calls.append(1) or direct(*args))
    x = torch.randn(3, 6, 9, 7, generator=generator)
    want = F.relu(F.conv2d(x, conv.weight * mask, conv.bias, padding=1))
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), want, atol=1e-5, rtol=1e-5)
        out = sparse(x.contiguous(memory_format=torch.channels_last))
        assert is_channels_last(out)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        narrow = x[:, :, :, 1:]  # not contiguous
        torch.testing.assert_close(sparse(narrow), F.relu(F.conv2d(narrow, conv.weight * mask, conv.bias, padding=1)),
                                   atol=1e-5, rtol=1e-5)
        assert sparse(x[:0]).shape == (0, 10, 9, 7)
        # The operator checks the geometry itself, naming the argument.
        with pytest.raises(ValueError, match="input has 5 channels"):
            sparse(torch.randn(2, 5, 8, 8))
        assert len(calls) == 5
        # Anything else takes the public function, with its messages.
        with pytest.raises(TypeError, match="dtype"):
            sparse(x.double())
        torch.testing.assert_close(sparse(x[0]), want[0], atol=1e-5, rtol=1e-5)  # 3-D: unbatched
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert sparse(x).dtype == torch.bfloat16
    assert len(calls) == 5
    x.requires_grad_(True)
    sparse(x).sum().backward()  # a call that wants gradients keeps the differentiable operator
    assert len(calls) == 5 and x.grad is not None


class SmallNet(nn.Module):
    def __init__(self, conv=nn.Conv2d):
        super().__init__()
        self.features = nn.Sequential(conv(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      conv(8, 8, 3, padding=1, groups=2), nn.ReLU(),
                                      conv(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def randomize_batch_norm(model, generator):
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.randn(module.num_features, generator=generator))
            module.bias.data.copy_(torch.randn(module.num_features, generator=generator))


def test_sparsify_folds_batch_norm_and_fuses_relu(generator):
    model = SmallNet(MaskedConv2d).eval()
    randomize_batch_norm(model, generator)
    for module in model.modules():
        if isinstance(module, MaskedConv2d):
            module.set_mask(random_mask(module.weight.shape, 0.1, generator))
    sparse = ptd_sparse.sparsify(model)
    kinds = [type(m).__name__ for m in sparse.features]
    assert kinds[:4] == ["SparseConv2d", "Identity", "Identity", "SparseConv2d"]  # conv+BN+ReLU fused; groups=2 too
    assert sparse.features[0].relu and sparse.features[3].groups == 2 and not sparse.features[3].relu
    assert kinds[5] == "SparseConv2d" and not sparse.features[5].relu
    assert isinstance(model.features[0], MaskedConv2d)  # the original is untouched
    x = torch.randn(2, 3, 12, 12, generator=generator)
    torch.testing.assert_close(sparse(x), model(x), atol=1e-4, rtol=1e-4)


def test_sparsify_leaves_dense_or_sparse_to_measurement(generator):
    """No density constant decides: every pruned layer becomes a SparseConv2d whose inference calls take the route
    measured fastest on their first call (here a 90%-dense layer), with the model's output either way."""
    model = SmallNet(MaskedConv2d).eval()
    randomize_batch_norm(model, generator)
    model.features[0].set_mask(random_mask(model.features[0].weight.shape, 0.9, generator))
    sparse = ptd_sparse.sparsify(model)
    layer = sparse.features[0]
    assert isinstance(layer, SparseConv2d) and layer.relu
    x = torch.randn(2, 3, 12, 12, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), model(x), atol=1e-4, rtol=1e-4)
    assert list(layer.routes.values())[0] in measured_route.ROUTES


def test_measured_routes_agree_and_are_measured_once_per_bucket(generator, monkeypatch):
    from ptd_sparse.nn import measured_route

    conv = nn.Conv2d(6, 8, 3, padding=1)
    layer = SparseConv2d.from_conv(conv, random_mask(conv.weight.shape, 0.4, generator))
    layer.relu = True
    measured = []
    original = measured_route.fastest
    monkeypatch.setattr(measured_route, "fastest", lambda routes, x: measured.append(x.shape) or original(routes, x))
    x = torch.randn(3, 6, 9, 9, generator=generator)
    expected = torch.relu(F.conv2d(x, layer.sparse_weight.to_dense(), layer.bias, padding=1))
    with torch.no_grad():
        for route in measured_route.ROUTES:
            torch.testing.assert_close(layer._run(route, x), expected, atol=1e-5, rtol=1e-5)
        layer(x)
        layer(x[:2].clone())  # batch 2 is another bucket (2), batch 3 and 4 share one (4)
        layer(torch.cat([x, x[:1]]))
    assert [s[0] for s in measured] == [3, 2] and len(layer.routes) == 2
    # Calls that want gradients are not measured: the sparse kernel trains the values.
    out = layer(x)
    out.sum().backward()
    assert layer.values.grad is not None and len(measured) == 2
    assert measured_route.batch_bucket(1) == 1 and measured_route.batch_bucket(5) == 8
    assert measured_route.batch_bucket(256) == 256 and measured_route.batch_bucket(0) == 0


def test_every_route_keeps_the_callers_layout(generator):
    """A route never hands back a layout other than its input's: a channels_last route after an NCHW layer (or the
    sparse kernel, which writes NCHW, inside a channels_last network) would make the layers around it pay for
    layout copies that the route's measurement did not count."""
    from ptd_sparse.nn import measured_route

    conv = nn.Conv2d(6, 8, 3, padding=1)
    layer = SparseConv2d.from_conv(conv, random_mask(conv.weight.shape, 0.4, generator))
    x = torch.randn(2, 6, 7, 7, generator=generator)
    expected = F.conv2d(x, layer.sparse_weight.to_dense(), layer.bias, padding=1)
    with torch.no_grad():
        for route in measured_route.ROUTES:
            out = layer._run(route, x)
            assert out.is_contiguous(), route
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
            out = layer._run(route, x.contiguous(memory_format=torch.channels_last))
            assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous(), route
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        # The prepacked weight was reordered for the first input's shape; another shape runs on it too.
        other = torch.randn(5, 6, 11, 10, generator=generator)
        if measured_route.prepacked_route_available(other):
            torch.testing.assert_close(layer._run(measured_route.DENSE_PREPACKED, other),
                                       F.conv2d(other, layer.sparse_weight.to_dense(), layer.bias, padding=1),
                                       atol=1e-5, rtol=1e-5)


def test_sparsify_torch_prune_model(generator):
    torch.manual_seed(0)
    model = SmallNet().eval()
    randomize_batch_norm(model, generator)
    convs = [(m, "weight") for m in model.modules() if isinstance(m, nn.Conv2d)]
    prune.global_unstructured(convs, pruning_method=prune.L1Unstructured, amount=0.9)
    sparse = ptd_sparse.sparsify(model)
    sparse_layers = [m for m in sparse.modules() if isinstance(m, SparseConv2d)]
    assert len(sparse_layers) == len(convs)  # the grouped convolution too
    assert sum(m.nnz for m in sparse_layers) == sum(int(c.weight_mask.sum()) for c, _ in convs)
    x = torch.randn(2, 3, 12, 12, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("routes", ["measure", "sparse", "dense", "dense_prepacked"])
def test_sparsify_channels_last_keeps_every_activation_nhwc(generator, routes):
    """memory_format=torch.channels_last: the model converts its input once, and every layer (sparse kernel, dense
    routes, the max-pool fused into the first one, a grouped layer) reads and writes NHWC, with the model's output."""
    model = nn.Sequential(MaskedConv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          MaskedConv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
                          MaskedConv2d(8, 16, 3, stride=2, padding=1)).eval()
    randomize_batch_norm(model, generator)
    for module in model:
        if isinstance(module, MaskedConv2d):
            module.set_mask(random_mask(module.weight.shape, 0.3, generator))
    sparse = ptd_sparse.sparsify(model, routes=routes, memory_format=torch.channels_last)
    seen = []
    for module in sparse:
        if isinstance(module, (SparseConv2d, MaxPool2x2)):
            module.register_forward_hook(lambda m, args, out: seen.append((type(m).__name__, args[0], out)))
    x = torch.randn(3, 3, 12, 12, generator=generator)  # NCHW in
    with torch.no_grad():
        out = sparse(x)
        torch.testing.assert_close(out, model(x), atol=1e-4, rtol=1e-4)
    assert [name for name, _, _ in seen] == ["SparseConv2d", "SparseConv2d", "SparseConv2d"]
    assert sparse[0].max_pool is not None and isinstance(sparse[3], nn.Identity)
    for name, given, produced in seen:
        assert is_channels_last(given) and is_channels_last(produced), name
    assert is_channels_last(out)
    activation_layout.keep_channels_last(sparse)  # a second call adds no second hook
    assert len(sparse._forward_pre_hooks) == 1


def test_sparsify_refuses_an_unknown_memory_format():
    with pytest.raises(ValueError, match="memory_format must be None, torch.contiguous_format or torch.channels_last"):
        ptd_sparse.sparsify(nn.Sequential(nn.Conv2d(3, 4, 3)), memory_format=torch.channels_last_3d)


def test_sparsify_rejects_non_modules():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ptd_sparse.sparsify("not a model")


def test_functional_pattern_cache_follows_in_place_mask_edits(generator):
    weight = torch.randn(4, 3, 3, 3, generator=generator)
    mask = random_mask(weight.shape, 0.5, generator)
    first = functional.pattern_of(mask)
    assert functional.pattern_of(mask) is first
    mask[0].zero_()
    second = functional.pattern_of(mask)
    assert second is not first and second.nnz == int(mask.sum())


# --- bad input to the convolution --------------------------------------------------------------------------------

def test_conv_errors(generator):
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    mask = torch.ones_like(w, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask has shape"):
        ptd_sparse.masked_conv2d(x, w, mask[:, :2])
    with pytest.raises(ValueError, match="input has 5 channels"):
        ptd_sparse.masked_conv2d(torch.randn(2, 5, 8, 8), w, mask)
    with pytest.raises(ValueError, match="input must be 3-D or 4-D"):
        ptd_sparse.masked_conv2d(torch.randn(8, 8), w, mask)
    with pytest.raises(TypeError, match="input has dtype torch.float64 but weight has dtype torch.float32"):
        ptd_sparse.masked_conv2d(x.double(), w, mask)
    with pytest.raises(TypeError, match="weight must have dtype"):
        ptd_sparse.masked_conv2d(x, w.long(), mask)
    with pytest.raises(ValueError, match="bias must have C_out = 4 entries"):
        ptd_sparse.masked_conv2d(x, w, mask, torch.zeros(3))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        ptd_sparse.masked_conv2d(x, w, mask, stride=0)
    with pytest.raises(ValueError, match="padding must be an int or a pair of ints"):
        ptd_sparse.masked_conv2d(x, w, mask, padding=(1, 1, 1))
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        ptd_sparse.masked_conv2d(torch.randn(1, 3, 4, 4), w, mask, dilation=3)
    with pytest.raises(ValueError, match="mask must be boolean or hold only 0 and 1"):
        ptd_sparse.masked_conv2d(x, w, torch.full_like(w, 2.0))
    with pytest.raises(ValueError, match="mask is on meta but weight is on cpu"):
        ptd_sparse.masked_conv2d(x, w, mask.to("meta"))
    with pytest.raises(TypeError, match="sparse_weight must be a ptd_sparse.SparseConvWeight"):
        ptd_sparse.sparse_conv2d(x, w)


def test_sparse_conv2d_with_dense_copy_picks_by_batch(generator, monkeypatch):
    """Between the small-batch and the large-batch crossover the layer keeps both forms and picks per call."""
    from ptd_sparse import backends

    conv = nn.Conv2d(6, 8, 3, padding=1)
    mask = random_mask(conv.weight.shape, 0.25, generator)
    layer = SparseConv2d.from_conv(conv, mask)
    layer.relu = True
    layer.keep_dense_copy()
    monkeypatch.setitem(backends.SMALL_BATCH_CROSSOVER, "cpu", 0.2)
    monkeypatch.setitem(backends.DENSE_CROSSOVER, "cpu", 0.3)
    calls = []
    original = F.conv2d
    monkeypatch.setattr("ptd_sparse.nn.sparse_conv2d.F.conv2d", lambda *a, **k: calls.append(1) or original(*a, **k))
    for batch in (1, 16):
        x = torch.randn(batch, 6, 7, 7, generator=generator)
        expected = torch.relu(original(x, conv.weight * mask, conv.bias, padding=1))
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert len(calls) == 1  # batch 1 went dense, batch 16 sparse
