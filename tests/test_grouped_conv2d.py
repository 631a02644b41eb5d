"""Grouped and depthwise sparse convolution: the canonical format over the full input-channel space
(ptd_sparse.pattern), every backend against F.conv2d(groups=g) in float64, forward and all gradients, gradcheck and
opcheck, and the modules (MaskedConv2d, SparseConv2d) that run them. The cuda and triton cases run on CUDA tensors
where a GPU exists (conftest.device_for); the oracle always runs on the CPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (assert_close, conv_call, device_backends, device_for, gradcheck_options, moved_to, on_device,
                      opcheck_conv_route, random_mask)
from torch import nn

import ptd_sparse
from ptd_sparse import functional
from ptd_sparse.backends import SPARSE_CONV
from ptd_sparse.nn import MaskedConv2d, SparseConv2d, measured_route
from ptd_sparse.pattern import ConvPattern

BACKENDS = device_backends(SPARSE_CONV)
CPU = torch.device("cpu")

# (groups, C_in, C_out): two groups, four groups of odd widths, depthwise, depthwise with a channel multiplier,
# and groups=1 as the control.
GROUPINGS = [(2, 4, 6), (4, 12, 8), (5, 5, 5), (3, 3, 6), (1, 3, 5)]


def grouped_oracle(x, weight, mask, bias, stride, padding, dilation, groups, grad_out):
    """Forward and gradients in float64 on the CPU, whatever device the inputs are on."""
    x, weight, mask, bias, grad_out = moved_to(CPU, x, weight, mask, bias, grad_out)
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_() if bias is not None else None
    out = F.conv2d(x64, w64 * mask.double(), b64, stride, padding, dilation, groups)
    inputs = (x64, w64) + ((b64,) if bias is not None else ())
    return out, torch.autograd.grad(out, inputs, grad_out.double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups,c_in,c_out", GROUPINGS, ids=lambda v: str(v))
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("kernel,stride,padding,dilation", [(3, 1, 1, 1), (3, 2, 0, 2), (1, 1, 0, 1), (5, 2, 2, 1)])
def test_grouped_matches_f_conv2d(backend, groups, c_in, c_out, density, kernel, stride, padding, dilation,
                                  generator):
    x, weight, mask, bias = on_device(backend, torch.randn(3, c_in, 11, 9, generator=generator),
                                      torch.randn(c_out, c_in // groups, kernel, kernel, generator=generator),
                                      random_mask((c_out, c_in // groups, kernel, kernel), density, generator),
                                      torch.randn(c_out, generator=generator))
    for tensor in (x, weight, bias):
        tensor.requires_grad_()
    out = ptd_sparse.masked_conv2d(x, weight, mask, bias, stride, padding, dilation, groups, backend=backend)
    grad_out = on_device(backend, torch.randn(out.shape, generator=generator))
    expected, expected_grads = grouped_oracle(x, weight, mask, bias, stride, padding, dilation, groups, grad_out)
    assert_close(out.cpu(), expected, torch.float32, "output")
    grads = torch.autograd.grad(out, (x, weight, bias), grad_out)
    for name, got, want in zip(("grad_input", "grad_weight", "grad_bias"), grads, expected_grads):
        assert got.shape == want.shape
        assert_close(got.cpu(), want, torch.float32, name)
    assert not grads[1][~mask].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_depthwise_in_other_dtypes(backend, dtype, generator):
    device = device_for(backend)
    x = torch.randn(2, 8, 10, 10, generator=generator).to(device, dtype).requires_grad_()
    weight = torch.randn(8, 1, 3, 3, generator=generator).to(device, dtype).requires_grad_()
    mask = random_mask(weight.shape, 0.5, generator).to(device)
    out = ptd_sparse.masked_conv2d(x, weight, mask, None, 1, 1, 1, 8, backend=backend)
    grad_out = torch.randn(out.shape, generator=generator).to(device, dtype)
    expected, expected_grads = grouped_oracle(x, weight, mask, None, 1, 1, 1, 8, grad_out)
    assert out.dtype == dtype and out.device == x.device
    assert_close(out.cpu(), expected, dtype, "output")
    for name, got, want in zip(("grad_input", "grad_weight"), torch.autograd.grad(out, (x, weight), grad_out),
                               expected_grads):
        assert_close(got.cpu(), want, dtype, name)


def grouped_pattern(generator, groups=3, c_in=6, c_out=9, density=0.4, dtype=torch.float64, device=CPU):
    weight = torch.randn(c_out, c_in // groups, 3, 3, generator=generator, dtype=dtype).to(device)
    return weight, ConvPattern.from_mask(random_mask(weight.shape, density, generator).to(device), groups)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64_grouped(backend, generator):
    weight, pattern = grouped_pattern(generator, device=device_for(backend))
    values = pattern.gather(weight).requires_grad_()
    x, bias = on_device(backend, torch.randn(2, 6, 7, 6, generator=generator, dtype=torch.float64),
                        torch.randn(9, generator=generator, dtype=torch.float64))
    x.requires_grad_()
    bias.requires_grad_()

    def conv(x, values, bias):
        return conv_call(backend)(x, values, pattern.row_ptr, pattern.col_idx, pattern.t_ptr, pattern.t_rows,
                                  pattern.t_perm, list(pattern.shape), bias, [2, 1], [1, 1], [1, 2])

    assert torch.autograd.gradcheck(conv, (x, values, bias), **gradcheck_options(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_grouped(backend, generator):
    for groups, c_in, c_out, batch in ((3, 6, 9, 2), (4, 4, 4, 1), (2, 4, 2, 0)):
        weight, p = grouped_pattern(generator, groups, c_in, c_out, 0.5, torch.float32, device_for(backend))
        x = on_device(backend, torch.randn(batch, c_in, 7, 6, generator=generator)).requires_grad_()
        values = p.gather(weight).requires_grad_()
        opcheck_conv_route(backend, x, values, p, None, [1, 1], [1, 1], [1, 1])


def test_grouped_pattern_indexes_the_full_input_space(generator):
    groups, c_in, c_out = 3, 6, 9
    weight = torch.randn(c_out, c_in // groups, 3, 3, generator=generator)
    mask = random_mask(weight.shape, 0.5, generator)
    pattern = ConvPattern.from_mask(mask, groups)
    assert pattern.shape == (c_out, c_in, 3, 3) and pattern.weight_shape == (c_out, c_in // groups, 3, 3)
    assert pattern.density == pytest.approx(mask.float().mean().item())
    # The CSR is exactly that of the block-diagonal dense weight of the grouped convolution.
    block = torch.zeros(c_out, c_in, 3, 3, dtype=torch.bool)
    per_group_out, per_group_in = c_out // groups, c_in // groups
    for g in range(groups):
        rows, cols = slice(g * per_group_out, (g + 1) * per_group_out), slice(g * per_group_in, (g + 1) * per_group_in)
        block[rows, cols] = mask[rows]
    full = ConvPattern.from_mask(block)
    for name in ("row_ptr", "col_idx", "t_ptr", "t_rows", "t_perm"):
        assert torch.equal(getattr(pattern, name), getattr(full, name)), name
    # flat_index counts in the grouped weight: gather and scatter round-trip through it.
    values = pattern.gather(weight)
    assert torch.equal(values, weight[mask])
    assert torch.equal(pattern.scatter(values), weight * mask)
    # Validation accepts the pattern and refuses a column outside its row's group.
    ConvPattern(pattern.shape, *(getattr(pattern, n) for n in ConvPattern.index_names()), groups=groups)
    with pytest.raises(ValueError, match="flat_index"):  # counted in the full weight, not the grouped one
        ConvPattern(full.shape, *(getattr(full, n) for n in ConvPattern.index_names()), groups=groups)
    all_ones = ConvPattern.from_mask(torch.ones(c_out, c_in, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="outside the input channels"):
        ConvPattern(all_ones.shape, *(getattr(all_ones, n) for n in ConvPattern.index_names()), groups=groups)


def test_bad_groups_are_refused(generator):
    weight = torch.randn(6, 2, 3, 3, generator=generator)
    mask = torch.ones_like(weight, dtype=torch.bool)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    with pytest.raises(ValueError, match="groups"):
        ptd_sparse.masked_conv2d(x, weight, mask, groups=4)  # 4 does not divide C_out = 6
    with pytest.raises(ValueError, match="groups"):
        ptd_sparse.masked_conv2d(x, weight, mask, groups=0)
    with pytest.raises(ValueError, match="channels"):
        ptd_sparse.masked_conv2d(x, weight, mask, groups=3)  # the input has 4 channels, the weight expects 6
    with pytest.raises(ValueError, match="groups"):
        ConvPattern.from_mask(mask, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_conv2d_module_runs_grouped_layers_sparse(backend, generator, monkeypatch):
    conv = MaskedConv2d(8, 8, 3, padding=1, groups=8, bias=True, backend=backend).to(device_for(backend))
    conv.set_mask(on_device(backend, random_mask(conv.weight.shape, 0.5, generator)))
    calls = []
    original = functional._run_sparse_conv
    monkeypatch.setattr(functional, "_run_sparse_conv",
                        lambda *a, **k: calls.append(a[8]) or original(*a, **k))
    x = on_device(backend, torch.randn(2, 8, 9, 9, generator=generator)).requires_grad_()
    out = conv(x)
    assert calls == [backend]
    reference = F.conv2d(x, conv.weight * conv.mask, conv.bias, 1, 1, 1, 8)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert not conv.weight.grad[~conv.mask].any()


def test_sparse_conv2d_grouped_every_route_and_state_dict(generator):
    conv = nn.Conv2d(12, 24, 3, stride=2, padding=1, groups=4)
    mask = random_mask(conv.weight.shape, 0.3, generator)
    sparse = SparseConv2d.from_conv(conv, mask)
    assert sparse.groups == 4 and sparse.weight_shape == (24, 12, 3, 3)
    x = torch.randn(3, 12, 10, 10, generator=generator)
    expected = F.conv2d(x, conv.weight.detach() * mask, conv.bias.detach(), 2, 1, 1, 4)
    with torch.no_grad():
        for route in measured_route.ROUTES:
            torch.testing.assert_close(sparse._run(route, x), expected, atol=1e-5, rtol=1e-5, msg=route)
        torch.testing.assert_close(sparse(x), expected, atol=1e-5, rtol=1e-5)  # the measured choice
    assert set(sparse.routes.values()) <= set(measured_route.ROUTES) and sparse.routes
    torch.testing.assert_close(sparse.sparse_weight.to_dense(), conv.weight.detach() * mask)
    copy = SparseConv2d.from_conv(conv, mask)
    copy.load_state_dict(sparse.state_dict())
    state = sparse.state_dict()
    state["col_idx"] = state["col_idx"].clone()
    last_of_row_0 = int(state["row_ptr"][1]) - 1
    assert last_of_row_0 >= 0
    state["col_idx"][last_of_row_0] = 11 * 9  # an input channel of the last group, in row 0 (of the first group)
    with pytest.raises(ValueError, match="outside the input channels"):
        copy.load_state_dict(state)
