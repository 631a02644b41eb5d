"""What a SparseConv2d holds: values, row_ptr and col_idx for inference (col_idx as int16 in eval mode on a CPU where
the weight's columns allow it, int32 in training mode, in state dicts and on other devices); the transposed view the
input gradient reads only while calls want gradients (derived on the first, dropped by eval()); the flat positions
never."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import device_backends, on_device, random_mask
from torch import nn
from torch.nn.utils import prune

import ptd_sparse
from ptd_sparse import _format_checks
from ptd_sparse.functional import sparse_conv2d_indexed
from ptd_sparse.nn import SparseConv2d
from ptd_sparse.nn.sparse_conv2d import DERIVED_INDEX_NAMES
from ptd_sparse.pattern import ConvPattern, transposed_view


def held_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of `module` itself, plus the index views it derived."""
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    if module._index_views is not None:
        tensors += list(module._index_views[1])
    return sum(t.numel() * t.element_size() for t in tensors)


def two_layer_model(generator) -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2))
    for conv in (model[0], model[2]):
        prune.custom_from_mask(conv, "weight", random_mask(conv.weight.shape, 0.2, generator))
    return model


@pytest.mark.parametrize("route", ["sparse", "measure", "density"])
def test_an_inference_model_holds_six_bytes_per_nonzero(generator, route):
    model = two_layer_model(generator)
    sparse = ptd_sparse.sparsify(model, routes=route)
    layers = [m for m in sparse.modules() if isinstance(m, SparseConv2d)]
    assert layers
    with torch.no_grad():
        for batch in (1, 5, 16):
            x = torch.randn(batch, 3, 12, 12, generator=generator)
            torch.testing.assert_close(sparse(x), model(x), atol=1e-4, rtol=1e-4)
    for layer in layers:
        assert {name for name, _ in layer.named_buffers(recurse=False)} == {"row_ptr", "col_idx"}
        assert layer._index_views is None
        c_out = layer.weight_shape[0]
        assert layer.col_idx.dtype == torch.int16
        assert held_bytes(layer) == 6 * layer.nnz + 4 * (c_out + 1) + 4 * c_out  # values, col_idx; row_ptr; bias
        assert not any(f"{name}" in layer.state_dict() for name in DERIVED_INDEX_NAMES)
        assert layer.state_dict()["col_idx"].dtype == torch.int32  # the canonical format on disk


def test_a_call_that_wants_gradients_derives_the_view_and_eval_drops_it(generator):
    conv = nn.Conv2d(5, 7, 3, padding=1)
    layer = SparseConv2d.from_conv(conv, random_mask(conv.weight.shape, 0.3, generator), backend="cpu")
    layer.eval()
    x = torch.randn(3, 5, 6, 6, generator=generator, requires_grad=True)
    with torch.no_grad():
        layer(x)
    assert layer._index_views is None
    out = layer(x)
    assert layer._index_views is not None
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    dense = layer.sparse_weight.to_dense().detach().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    F.conv2d(x_ref, dense, layer.bias.detach(), 1, 1).backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.values.grad, dense.grad.reshape(-1)[layer.sparse_weight.pattern.flat_index],
                               atol=1e-5, rtol=1e-5)
    view = layer._index_views[1]
    layer(x).sum().backward()  # the same pattern: the view is reused, not derived again
    assert layer._index_views[1] is view
    layer.train()
    assert layer._index_views is not None
    layer.eval()
    assert layer._index_views is None


def test_a_loaded_pattern_gets_a_new_view(generator):
    conv = nn.Conv2d(4, 6, 3, padding=1)
    layer = SparseConv2d.from_conv(conv, random_mask(conv.weight.shape, 0.3, generator), backend="cpu")
    other = SparseConv2d.from_conv(conv, random_mask(conv.weight.shape, 0.3, generator), backend="cpu")
    x = torch.randn(2, 4, 5, 5, generator=generator, requires_grad=True)
    layer(x).sum().backward()
    assert not torch.equal(layer.col_idx, other.col_idx)
    layer.load_state_dict(other.state_dict())
    x.grad = None
    layer(x).sum().backward()
    expected = x.detach().clone().requires_grad_()
    F.conv2d(expected, other.sparse_weight.to_dense().detach(), other.bias.detach(), 1, 1).sum().backward()
    torch.testing.assert_close(x.grad, expected.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("groups", [1, 2])
def test_the_derived_view_is_the_pattern_built_from_the_mask(generator, groups):
    mask = random_mask((8, 6 // groups, 3, 2), 0.35, generator)
    pattern = ConvPattern.from_mask(mask, groups)
    for got, want in zip(transposed_view(pattern.row_ptr, pattern.col_idx, pattern.shape),
                         (pattern.t_ptr, pattern.t_rows, pattern.t_perm), strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    full = ConvPattern._from_trusted_csr(pattern.shape, pattern.row_ptr, pattern.col_idx, groups)
    _format_checks.check_pattern(full.shape, *(getattr(full, n) for n in ConvPattern.index_names()), groups)
    assert torch.equal(full.flat_index, pattern.flat_index)


def test_state_dicts_that_hold_the_derived_indices_load_checked(generator):
    conv = nn.Conv2d(4, 6, 3, padding=1)
    mask = random_mask(conv.weight.shape, 0.4, generator)
    layer = SparseConv2d.from_conv(conv, mask)
    pattern = ConvPattern.from_mask(mask)
    with_derived = dict(layer.state_dict(), **{name: getattr(pattern, name) for name in DERIVED_INDEX_NAMES})
    fresh = SparseConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=1), random_mask(conv.weight.shape, 0.4, generator))
    fresh.load_state_dict(with_derived)
    assert set(fresh.state_dict()) == set(layer.state_dict())
    x = torch.randn(2, 4, 5, 5, generator=generator)
    torch.testing.assert_close(fresh(x), layer(x))
    corrupt = dict(with_derived, t_perm=with_derived["t_perm"].clone())
    corrupt["t_perm"][1] = corrupt["t_perm"][0]
    with pytest.raises(ValueError, match=r"SparseConv2d .*t_perm holds CSR position"):
        fresh.load_state_dict(corrupt)
    partial = dict(with_derived)
    del partial["t_rows"]
    with pytest.raises(ValueError, match=r"holds \['flat_index', 't_perm', 't_ptr'\] but not the rest"):
        fresh.load_state_dict(partial)


@pytest.mark.parametrize("backend", device_backends("sparse_conv2d"))
def test_every_backend_runs_a_call_without_the_view(backend, generator):
    conv = nn.Conv2d(3, 5, 3, padding=1, stride=2)
    layer = SparseConv2d.from_conv(conv, random_mask(conv.weight.shape, 0.3, generator), backend=backend)
    layer = layer.to(on_device(backend, torch.empty(0)).device)
    x = on_device(backend, torch.randn(2, 3, 7, 6, generator=generator))
    with torch.no_grad():
        out = layer(x)
    assert layer._index_views is None
    expected = F.conv2d(x, layer.sparse_weight.to_dense(), layer.bias, 2, 1)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", device_backends("sparse_conv2d"))
def test_the_input_gradient_refuses_an_empty_view(backend, generator):
    if backend == "reference":
        pytest.skip("the reference differentiates F.conv2d and reads no transposed view")
    pattern = ConvPattern.from_mask(random_mask((4, 3, 3, 3), 0.4, generator))
    x, values = on_device(backend, torch.randn(1, 3, 5, 5, generator=generator), torch.randn(pattern.nnz))
    pattern = pattern.to(x.device)
    absent = pattern.row_ptr.new_empty(0)
    out = sparse_conv2d_indexed(x.requires_grad_(), values, (pattern.row_ptr, pattern.col_idx, absent, absent, absent),
                                pattern.shape, pattern.density, padding=1, backend=backend)
    with pytest.raises((ValueError, RuntimeError), match="transposed view"):
        out.sum().backward()


def test_a_layer_that_runs_dense_holds_one_dense_form(generator, monkeypatch):
    from ptd_sparse.nn import measured_route

    # Timings that would pick a different dense form for each new bucket: the first takes the NCHW copy, later ones
    # are offered only that form and the sparse kernel.
    offered = []

    def fastest(routes, x):
        offered.append(tuple(routes))
        preference = (measured_route.DENSE,) if len(offered) == 1 else \
            (measured_route.DENSE_CHANNELS_LAST, measured_route.DENSE_PREPACKED, measured_route.DENSE)
        return next(route for route in preference if route in routes), {}

    monkeypatch.setattr(measured_route, "fastest", fastest)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    layer = SparseConv2d.from_conv(conv, random_mask(conv.weight.shape, 0.7, generator)).eval()
    with torch.no_grad():
        for batch, size in ((1, 6), (8, 6), (2, 12)):
            x = torch.randn(batch, 8, size, size, generator=generator)
            torch.testing.assert_close(layer(x), F.conv2d(x, layer.sparse_weight.to_dense(), layer.bias, 1, 1),
                                       atol=1e-4, rtol=1e-4)
    assert set(layer.routes.values()) == {measured_route.DENSE}
    assert all(set(routes) == {measured_route.SPARSE, measured_route.DENSE} for routes in offered[1:])
    assert layer._prepacked is None and list(layer._dense_cache[1]) == [False]


def test_the_compact_column_form_keeps_every_result_and_the_canonical_file(generator, tmp_path):
    conv = nn.Conv2d(6, 8, 3, padding=1)
    mask = random_mask(conv.weight.shape, 0.4, generator)
    layer = SparseConv2d.from_conv(conv, mask).eval()
    x = torch.randn(3, 6, 7, 7, generator=generator)
    dense = layer.sparse_weight.to_dense()
    assert layer.col_idx.dtype == torch.int16 and layer.sparse_weight.pattern.col_idx.dtype == torch.int32
    # Every inference route, and a call that wants gradients (which reads the int32 form, derived once).
    with torch.no_grad():
        for route in ("sparse", "dense", "dense_channels_last"):
            torch.testing.assert_close(layer._run(route, x), F.conv2d(x, dense, layer.bias, 1, 1), atol=1e-5,
                                       rtol=1e-5)
    layer.backend = "cpu"  # the sparse kernel whatever the density
    layer(x.requires_grad_()).sum().backward()
    layer.backend = None
    assert layer._index_views[1][0].dtype == torch.int32 and layer.values.grad is not None
    # Files hold int32, and whatever is loaded (copied in, or assigned) is held compactly again.
    path = tmp_path / "layer.pt"
    torch.save(layer.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert state["col_idx"].dtype == torch.int32 and torch.equal(state["col_idx"], layer.sparse_weight.pattern.col_idx)
    for assign in (False, True):
        other = SparseConv2d.from_conv(nn.Conv2d(6, 8, 3, padding=1), mask).eval()  # the same shapes, other values
        other.load_state_dict(state, assign=assign)
        assert other.col_idx.dtype == torch.int16 and torch.equal(other.col_idx, layer.col_idx)
        with torch.no_grad():
            torch.testing.assert_close(other(x), layer(x))
    # Another dtype (the generic loops, which widen it) and a copy.
    with torch.no_grad():
        torch.testing.assert_close(layer.double()(x.double()), F.conv2d(x.double(), dense.double(),
                                   layer.bias.double(), 1, 1))
    assert layer.col_idx.dtype == torch.int16 and copy.deepcopy(layer).col_idx.dtype == torch.int16
    # Training mode holds int32 (what the backward kernels read and DDP's gloo broadcast can send); eval compacts.
    assert layer.train().col_idx.dtype == torch.int32 and layer.eval().col_idx.dtype == torch.int16
    torch.save(layer, path)
    assert torch.load(path, weights_only=False).col_idx.dtype == torch.int16


@pytest.mark.parametrize("backend", device_backends("sparse_conv2d"))
def test_backends_other_than_the_cpu_kernels_read_int32_columns(backend, generator):
    conv = nn.Conv2d(5, 4, 3, padding=1)
    layer = SparseConv2d.from_conv(conv, random_mask(conv.weight.shape, 0.5, generator), backend=backend).eval()
    layer = layer.to(on_device(backend, torch.empty(0)).device)
    on_cpu = layer.col_idx.device.type == "cpu"
    assert layer.col_idx.dtype == (torch.int16 if on_cpu else torch.int32)  # a GPU's kernels read int32
    x = on_device(backend, torch.randn(2, 5, 6, 6, generator=generator))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.conv2d(x, layer.sparse_weight.to_dense(), layer.bias, 1, 1),
                                   atol=1e-4, rtol=1e-4)
    assert layer.cpu().col_idx.dtype == torch.int16


def test_weights_with_more_columns_than_int16_holds_keep_int32(generator):
    conv = nn.Conv2d(3700, 2, 3, padding=1, bias=False)  # 33300 columns
    layer = SparseConv2d.from_conv(conv, random_mask(conv.weight.shape, 0.01, generator))
    assert layer.col_idx.dtype == torch.int32 and int(layer.col_idx.max()) >= 2 ** 15
    x = torch.randn(1, 3700, 3, 3, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.conv2d(x, layer.sparse_weight.to_dense(), None, 1, 1), atol=1e-4,
                                   rtol=1e-4)
