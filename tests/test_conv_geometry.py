"""Every convolution route agrees with F.conv2d on which geometries exist: it raises exactly where F.conv2d raises
(the dilated kernel larger than the padded input), and otherwise returns F.conv2d's output shape.

C++ division rounds toward zero, so an output size computed as (H + 2P - span) / S + 1 from a negative numerator
larger than -S would come out as 1 instead of an error (a 3x3 input, 4x4 kernel and stride 2 would give a (1, 2, 1, 1)
output): the geometry check refuses such a kernel before dividing, and this table covers that case.
The raw operators (no Python validation in front of them), the custom operator of every backend, its fake kernel
(torch.compile) and the public functions are all checked against F.conv2d on one table.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, conv_call
from torch._subclasses.fake_tensor import FakeTensorMode

import ptd_sparse
from ptd_sparse import functional
from ptd_sparse.backends import SPARSE_CONV, unsupported_reasons
from ptd_sparse.conv_geometry import output_size
from ptd_sparse.pattern import ConvPattern

kernels = torch.ops.ptd_sparse_kernels

# (N, C_in, H, W, C_out, KH, KW, stride, padding, dilation)
GEOMETRIES = [
    (1, 1, 3, 3, 2, 4, 4, (2, 2), (0, 0), (1, 1)),  # numerator -1, which C++ division rounds toward zero to 0
    (1, 1, 3, 3, 2, 4, 4, (3, 3), (0, 0), (1, 1)),
    (1, 2, 5, 5, 3, 3, 3, (4, 4), (0, 0), (3, 3)),  # dilated span 7 > 5, stride 4
    (2, 1, 3, 3, 2, 4, 4, (1, 1), (0, 0), (1, 1)),
    (1, 1, 3, 3, 2, 5, 5, (2, 2), (0, 0), (1, 1)),
    (1, 1, 8, 3, 2, 3, 5, (1, 2), (0, 0), (1, 1)),  # only the width does not fit
    (1, 1, 3, 8, 2, 5, 3, (2, 1), (0, 0), (1, 1)),  # only the height does not fit
    (1, 1, 4, 4, 2, 3, 3, (2, 2), (0, 0), (2, 2)),
    (1, 1, 3, 3, 2, 4, 4, (2, 2), (1, 1), (1, 1)),  # padding makes it fit
    (1, 1, 2, 2, 2, 5, 5, (1, 1), (2, 2), (1, 1)),  # exactly
    (1, 1, 2, 2, 2, 5, 5, (2, 2), (1, 1), (1, 1)),
    (2, 3, 7, 6, 4, 3, 2, (2, 3), (1, 0), (2, 1)),
    (1, 1, 1, 1, 1, 1, 1, (1, 1), (0, 0), (1, 1)),
    (1, 1, 5, 5, 1, 5, 5, (7, 7), (0, 0), (1, 1)),
    (1, 2, 9, 9, 2, 3, 3, (4, 4), (0, 0), (4, 4)),  # span 9: fits exactly
    (1, 2, 9, 8, 2, 3, 3, (4, 4), (0, 0), (4, 4)),  # width 8 < span 9
    (0, 2, 6, 6, 3, 3, 3, (1, 1), (1, 1), (1, 1)),  # an empty batch
]
IDS = ["x".join(map(str, g[2:4])) + f"-k{g[5]}x{g[6]}-s{g[7][0]}{g[7][1]}-p{g[8][0]}{g[8][1]}-d{g[9][0]}{g[9][1]}"
       f"-n{g[0]}" for g in GEOMETRIES]


def case(geometry):
    n, c_in, h, w, c_out, kh, kw, stride, padding, dilation = geometry
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, c_in, h, w, generator=generator, dtype=torch.float64)
    mask = torch.rand(c_out, c_in, kh, kw, generator=generator) < 0.6
    mask.view(-1)[0] = True
    weight = torch.randn(c_out, c_in, kh, kw, generator=generator, dtype=torch.float64) * mask
    try:
        expected = F.conv2d(x, weight, None, stride, padding, dilation)
    except RuntimeError:
        expected = None
    return x, weight, mask, ConvPattern.from_mask(mask), list(stride), list(padding), list(dilation), expected


def agrees(expected, call) -> None:
    """`call` raises iff F.conv2d raised (expected is None), else returns F.conv2d's result."""
    if expected is None:
        with pytest.raises((ValueError, RuntimeError), match="smaller than the (dilated )?kernel|too small|Kernel "
                                                             "size can't be greater"):
            out = call()
            pytest.fail(f"returned an output of shape {tuple(out.shape)} where F.conv2d raises")
    else:
        out = call()
        assert out.shape == expected.shape
        assert_close(out, expected, out.dtype, "output")


def test_the_table_has_both_kinds():
    fits = [case(g)[-1] is not None for g in GEOMETRIES]
    assert 5 <= sum(fits) < len(fits) - 5


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_raw_compiled_operators_agree_with_conv2d(geometry):
    x, weight, mask, p, stride, padding, dilation, expected = case(geometry)
    values = p.gather(weight)
    shape = list(weight.shape)
    agrees(expected, lambda: kernels.conv_forward(x, values, p.row_ptr, p.col_idx, shape, None, stride, padding,
                                                  dilation))
    agrees(expected, lambda: kernels.sparse_conv2d(x, values, p.row_ptr, p.col_idx, p.t_ptr, p.t_rows, p.t_perm,
                                                   shape, None, stride, padding, dilation))
    # The backward kernels get a grad_output of the size the geometry gives (1 x 1 where it does not exist).
    grad = torch.ones(expected.shape if expected is not None else (x.shape[0], shape[0], 1, 1), dtype=x.dtype)

    def grad_input():
        return kernels.conv_backward_input(grad, values, p.col_idx, p.t_ptr, p.t_rows, p.t_perm, shape,
                                           list(x.shape), stride, padding, dilation)

    def grad_values():
        return kernels.conv_backward_values(grad, x, p.row_ptr, p.col_idx, shape, stride, padding, dilation)

    if expected is None:
        for call in (grad_input, grad_values):
            with pytest.raises(ValueError, match="smaller than the dilated kernel"):
                call()
    else:
        x_ref, w_ref = x.clone().requires_grad_(), weight.clone().requires_grad_()
        F.conv2d(x_ref, w_ref, None, stride, padding, dilation).backward(grad)
        assert_close(grad_input(), x_ref.grad, x.dtype, "grad_input")
        assert_close(grad_values(), p.gather(w_ref.grad), x.dtype, "grad_values")


def backends():
    available = ["reference", "cpu"]
    if not unsupported_reasons("triton", SPARSE_CONV, torch.device("cpu")):
        available.append("triton")
    return available


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_each_route_and_its_fake_kernel_agree_with_conv2d(geometry, backend):
    x, weight, mask, p, stride, padding, dilation, expected = case(geometry)
    if backend == "triton":
        x, weight = x.float(), weight.float()
        expected = None if expected is None else expected.float()
    values = p.gather(weight)

    def call(x=x, values=values):
        return conv_call(backend)(x, values, p.row_ptr, p.col_idx, p.t_ptr, p.t_rows, p.t_perm, list(weight.shape),
                                  None, stride, padding, dilation)

    agrees(expected, call)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_x, fake_values = mode.from_tensor(x), mode.from_tensor(values)
        if expected is None:
            with pytest.raises(ValueError, match="smaller than the dilated kernel"):
                call(fake_x, fake_values)
        else:
            assert call(fake_x, fake_values).shape == expected.shape


@pytest.mark.parametrize("backend", [None, "reference", "cpu", "dense"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_public_functions_agree_with_conv2d(geometry, backend):
    x, weight, mask, p, stride, padding, dilation, expected = case(geometry)
    sparse = ptd_sparse.SparseConvWeight.from_dense(weight, mask)
    agrees(expected, lambda: functional.sparse_conv2d(x, sparse, None, stride, padding, dilation, backend=backend))
    agrees(expected, lambda: functional.masked_conv2d(x, weight, mask, None, stride, padding, dilation,
                                                      backend=backend))


def test_python_output_size_is_floor_division_with_a_fit_check():
    assert output_size(3, 4, 2, 1, 1) == 1 and output_size(7, 3, 2, 1, 2) == 3
    with pytest.raises(ValueError, match="input size 3 with padding 0 is smaller than the dilated kernel \\(4\\)"):
        output_size(3, 4, 2, 0, 1)
