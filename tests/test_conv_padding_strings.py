"""padding="same" and "valid" in masked_conv2d and sparse_conv2d, as F.conv2d takes them: odd and even kernels
(an even kernel's 'same' padding is asymmetric), dilations, groups, strides with 'valid', forward and every
gradient, on every backend that runs here; and every one of PyTorch's own conv2d samples (its OpInfo) through
masked_conv2d with an all-ones mask."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, random_mask, runnable_backends

import ptd_sparse
from ptd_sparse.backends import SPARSE_CONV
from ptd_sparse.pattern import SparseConvWeight

BACKENDS = runnable_backends(SPARSE_CONV)
# F.conv2d (the oracle) warns that an even kernel's asymmetric 'same' padding copies the input.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

# (kernel, dilation, groups, stride): odd, even and mixed kernels; 'same' is asymmetric where dilation * (k - 1)
# is odd.
CASES = [((3, 3), 1, 1, 1), ((2, 2), 1, 1, 1), ((2, 3), (1, 2), 1, 1), ((4, 1), 3, 2, 1), ((1, 1), 1, 1, 1),
         ((4, 4), 2, 2, 1), ((3, 2), 1, 3, 1)]
VALID_STRIDES = [1, 2, (2, 1)]


def oracle(x, weight, mask, bias, stride, padding, dilation, groups):
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_()
    out = F.conv2d(x64, w64 * mask.double(), b64, stride, padding, dilation, groups)
    grad_out = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
    return out, torch.autograd.grad(out, (x64, w64, b64), grad_out), grad_out


def inputs(kernel, groups, generator):
    c_in, c_out = 2 * groups, 3 * groups
    x = torch.randn(2, c_in, 11, 12, generator=generator)
    weight = torch.randn(c_out, 2, *kernel, generator=generator)
    mask = random_mask(weight.shape, 0.5, generator)
    bias = torch.randn(c_out, generator=generator)
    return x, weight, mask, bias


def run_and_compare(function, x, weight, mask, bias, stride, padding, dilation, groups, what):
    x = x.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    bias = bias.clone().requires_grad_()
    out = function(x, weight, bias)
    expected, grads, grad_out = oracle(x, weight, mask, bias, stride, padding, dilation, groups)
    assert out.shape == expected.shape, what
    assert_close(out, expected, torch.float32, what)
    got = torch.autograd.grad(out, (x, weight, bias), grad_out.float(), allow_unused=True)
    for name, actual, want in zip(("input", "weight", "bias"), got, grads):
        if name == "weight" and actual is not None:
            actual = actual * mask  # sparse_conv2d's values carry the weight's gradient at the kept positions only
        assert_close(actual, want * (mask if name == "weight" else 1), torch.float32, f"{what} grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel,dilation,groups,stride", CASES, ids=str)
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_masked_conv2d_string_padding(backend, kernel, dilation, groups, stride, padding, generator):
    x, weight, mask, bias = inputs(kernel, groups, generator)
    strides = [stride] if padding == "same" else VALID_STRIDES
    for stride in strides:
        run_and_compare(lambda x, w, b: ptd_sparse.masked_conv2d(x, w, mask, b, stride, padding, dilation, groups,
                                                                 backend=backend),
                        x, weight, mask, bias, stride, padding, dilation, groups, f"{backend} {padding} s{stride}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel,dilation,groups,stride", CASES, ids=str)
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_sparse_conv2d_string_padding(backend, kernel, dilation, groups, stride, padding, generator):
    x, weight, mask, bias = inputs(kernel, groups, generator)
    x = x.requires_grad_()
    sparse = SparseConvWeight.from_dense(weight, mask, groups=groups)
    sparse.values.requires_grad_()
    bias = bias.clone().requires_grad_()
    out = ptd_sparse.sparse_conv2d(x, sparse, bias, 1, padding, dilation, backend=backend)
    expected, grads, grad_out = oracle(x, weight, mask, bias, 1, padding, dilation, groups)
    assert_close(out, expected, torch.float32, f"{backend} {padding}")
    grad_x, grad_values, grad_bias = torch.autograd.grad(out, (x, sparse.values, bias), grad_out.float())
    assert_close(grad_x, grads[0], torch.float32, "grad input")
    assert_close(grad_values, sparse.pattern.gather(grads[1]), torch.float32, "grad values")
    assert_close(grad_bias, grads[2], torch.float32, "grad bias")


def test_unbatched_input_with_same_padding(generator):
    x, weight, mask, bias = inputs((2, 2), 1, generator)
    out = ptd_sparse.masked_conv2d(x[0], weight, mask, bias, padding="same")
    assert_close(out, F.conv2d(x[0], weight * mask, bias, padding="same"), torch.float32, "unbatched")


def test_same_with_stride_is_refused_as_f_conv2d_refuses_it(generator):
    x, weight, mask, bias = inputs((3, 3), 1, generator)
    with pytest.raises(RuntimeError, match="padding='same' is not supported for strided convolutions"):
        F.conv2d(x, weight, bias, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding='same' is not supported for strided convolutions"):
        ptd_sparse.masked_conv2d(x, weight, mask, bias, stride=(1, 2), padding="same")
    with pytest.raises(ValueError, match="padding='same' is not supported for strided convolutions"):
        ptd_sparse.sparse_conv2d(x, SparseConvWeight.from_dense(weight, mask), bias, stride=2, padding="same")


def test_unknown_padding_strings_are_refused(generator):
    x, weight, mask, bias = inputs((3, 3), 1, generator)
    for padding in ("SAME", "full", ""):
        with pytest.raises(ValueError, match="padding must be an int, a pair of ints, 'same' or 'valid'"):
            ptd_sparse.masked_conv2d(x, weight, mask, bias, padding=padding)


def conv2d_opinfo_samples(dtype):
    common = pytest.importorskip("torch.testing._internal.common_methods_invocations")
    (op,) = [op for op in common.op_db if op.name == "nn.functional.conv2d"]
    return list(op.sample_inputs("cpu", dtype, requires_grad=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_pytorch_conv2d_sample_passes_through_masked_conv2d(dtype):
    samples = conv2d_opinfo_samples(dtype)
    strings = 0
    for index, sample in enumerate(samples):
        weight, bias = sample.args[0], sample.args[1] if len(sample.args) > 1 else None
        strings += isinstance(sample.kwargs.get("padding"), str)
        mask = torch.ones_like(weight, dtype=torch.bool)
        leaves = [t for t in (sample.input, weight, bias) if t is not None]
        out = ptd_sparse.masked_conv2d(sample.input, weight, mask, bias, **sample.kwargs)
        expected = F.conv2d(sample.input, weight, bias, **sample.kwargs)
        assert_close(out, expected, dtype, f"sample {index} {sample.kwargs}")
        grad_out = torch.randn_like(expected)
        got = torch.autograd.grad(out, leaves, grad_out)
        want = torch.autograd.grad(expected, leaves, grad_out)
        for a, b in zip(got, want):
            assert_close(a, b, dtype, f"sample {index} {sample.kwargs} gradient")
    assert len(samples) >= 20 and strings >= 4  # the samples with string padding are among them
