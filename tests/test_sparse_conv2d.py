"""Masked sparse convolution: every backend against the float64 oracle F.conv2d(input, weight * mask), forward and
all three gradients, over geometries (kernel size, stride, padding, dilation, odd sizes), densities, batches, layouts
and dtypes. The cuda and triton cases run on CUDA tensors where a GPU exists (conftest.device_for); the oracle always
runs on the CPU."""
from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import (assert_close, conv_call, device_backends, device_for, gradcheck_options, moved_to, on_device,
                      opcheck_conv_route, random_mask)

import ptd_sparse
from ptd_sparse.backends import SPARSE_CONV, unsupported_reasons
from ptd_sparse.pattern import ConvPattern

BACKENDS = device_backends(SPARSE_CONV)
CPU = torch.device("cpu")
DENSITIES = (0.0, 0.01, 0.1, 0.5, 1.0)


def geometries():
    """Every kernel size x stride x padding x dilation, on odd spatial sizes large enough for the dilated kernel."""
    for kernel, stride, padding, dilation in itertools.product((1, 3, 5), (1, 2), (0, 1, 2), (1, 2)):
        span = dilation * (kernel - 1) + 1
        yield pytest.param(kernel, stride, padding, dilation, (span + 4, span + 2),
                           id=f"k{kernel}-s{stride}-p{padding}-d{dilation}")


def oracle(x, weight, mask, bias, stride, padding, dilation, grad_out):
    """Forward and gradients of F.conv2d(x, weight * mask, bias) in float64 via autograd."""
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_() if bias is not None else None
    out = F.conv2d(x64, w64 * mask.double(), b64, stride, padding, dilation)
    inputs = (x64, w64) + ((b64,) if bias is not None else ())
    grads = torch.autograd.grad(out, inputs, grad_out.double(), allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(i) for g, i in zip(grads, inputs)]
    return out, grads


def run_case(backend, x, weight, mask, bias, stride, padding, dilation, dtype, generator):
    """The backend on device_for(backend) (inputs already there keep their layout) against the oracle on the CPU."""
    device = device_for(backend)
    x = x.to(device, dtype).requires_grad_()
    weight = weight.to(device, dtype).requires_grad_()
    bias = bias.to(device, dtype).requires_grad_() if bias is not None else None
    mask = mask.to(device)
    out = ptd_sparse.masked_conv2d(x, weight, mask, bias, stride, padding, dilation, backend=backend)
    grad_out = torch.randn(out.shape, generator=generator).to(device, dtype)
    expected_out, expected_grads = oracle(*moved_to(CPU, x, weight, mask, bias), stride, padding, dilation,
                                          grad_out.cpu())
    assert out.shape == expected_out.shape and out.dtype == dtype and out.device == x.device
    assert_close(out.cpu(), expected_out, dtype, "output")
    inputs = (x, weight) + ((bias,) if bias is not None else ())
    grads = torch.autograd.grad(out, inputs, grad_out)
    for name, got, want in zip(("grad_input", "grad_weight", "grad_bias"), grads, expected_grads):
        assert got.dtype == dtype
        assert_close(got.cpu(), want, dtype, name)
    # The weight gradient is exactly zero where the mask is zero.
    assert not grads[1][~mask].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("kernel,stride,padding,dilation,size", list(geometries()))
def test_matches_oracle_over_geometry_and_density(backend, density, kernel, stride, padding, dilation, size,
                                                  generator):
    c_in, c_out = 3, 5  # channel counts that are multiples of nothing useful
    x = torch.randn(3, c_in, *size, generator=generator)
    weight = torch.randn(c_out, c_in, kernel, kernel, generator=generator)
    mask = random_mask(weight.shape, density, generator)
    bias = torch.randn(c_out, generator=generator)
    run_case(backend, x, weight, mask, bias, stride, padding, dilation, torch.float32, generator)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("kernel,stride,padding,dilation", [(3, 1, 1, 1), (5, 2, 2, 1), (3, 2, 0, 2), (1, 1, 0, 1)])
def test_matches_oracle_in_every_dtype(backend, dtype, kernel, stride, padding, dilation, generator):
    x = torch.randn(2, 7, 13, 10, generator=generator)
    weight = torch.randn(11, 7, kernel, kernel, generator=generator)
    mask = random_mask(weight.shape, 0.3, generator)
    run_case(backend, x, weight, mask, torch.randn(11, generator=generator), stride, padding, dilation, dtype,
             generator)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [0, 1, 5])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_batch_sizes_and_optional_bias(backend, batch, with_bias, generator):
    x = torch.randn(batch, 4, 9, 7, generator=generator)
    weight = torch.randn(6, 4, 3, 3, generator=generator)
    mask = random_mask(weight.shape, 0.2, generator)
    bias = torch.randn(6, generator=generator) if with_bias else None
    run_case(backend, x, weight, mask, bias, 1, 1, 1, torch.float32, generator)


def channels_last(x):
    return x.contiguous(memory_format=torch.channels_last)


def strided_view(x):
    """Same values, non-contiguous: every other column of a twice-as-wide tensor."""
    wide = x.new_zeros(*x.shape[:-1], 2 * x.shape[-1])
    wide[..., ::2] = x
    return wide[..., ::2]


def transposed_view(x):
    return x.transpose(2, 3).contiguous().transpose(2, 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", [channels_last, strided_view, transposed_view], ids=lambda f: f.__name__)
def test_non_contiguous_inputs(backend, layout, generator):
    x = layout(on_device(backend, torch.randn(3, 5, 11, 9, generator=generator)))
    weight = layout(on_device(backend, torch.randn(8, 5, 3, 3, generator=generator)))
    assert not x.is_contiguous()
    mask = random_mask(weight.shape, 0.25, generator)
    run_case(backend, x, weight, mask, torch.randn(8, generator=generator), 2, 1, 1, torch.float32, generator)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_grad_output_from_sum(backend, generator):
    """The gradient of .sum() arrives as an expanded view with stride 0."""
    x, weight = on_device(backend, torch.randn(2, 3, 8, 8, generator=generator),
                          torch.randn(4, 3, 3, 3, generator=generator))
    x.requires_grad_()
    weight.requires_grad_()
    mask = on_device(backend, random_mask(weight.shape, 0.5, generator))
    ptd_sparse.masked_conv2d(x, weight, mask, padding=1, backend=backend).sum().backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    F.conv2d(x_ref, w_ref * mask, padding=1).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight.grad, w_ref.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbatched_input(backend, generator):
    x, weight, mask = on_device(backend, torch.randn(3, 9, 9, generator=generator),
                                torch.randn(4, 3, 3, 3, generator=generator),
                                random_mask((4, 3, 3, 3), 0.4, generator))
    out = ptd_sparse.masked_conv2d(x, weight, mask, padding=1, backend=backend)
    torch.testing.assert_close(out, F.conv2d(x, weight * mask, padding=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_conv2d_trains_values(backend, generator):
    weight, mask = on_device(backend, torch.randn(6, 4, 3, 3, generator=generator),
                             random_mask((6, 4, 3, 3), 0.3, generator))
    sparse = ptd_sparse.SparseConvWeight.from_dense(weight, mask)
    sparse.values.requires_grad_()
    x = on_device(backend, torch.randn(2, 4, 10, 10, generator=generator))
    out = ptd_sparse.sparse_conv2d(x, sparse, stride=2, padding=1, backend=backend)
    grad_out = on_device(backend, torch.randn(out.shape, generator=generator))
    (grad_values,) = torch.autograd.grad(out, sparse.values, grad_out)
    dense = weight.clone().requires_grad_()
    expected = F.conv2d(x, dense * mask, stride=2, padding=1)
    (grad_dense,) = torch.autograd.grad(expected, dense, grad_out)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_values, grad_dense.reshape(-1)[sparse.pattern.flat_index], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 2, 2), (2, 0, 1)])
def test_gradcheck_float64(backend, stride, padding, dilation, generator):
    weight, mask, x, bias = on_device(backend, torch.randn(4, 3, 3, 3, generator=generator, dtype=torch.float64),
                                      random_mask((4, 3, 3, 3), 0.4, generator),
                                      torch.randn(2, 3, 8, 7, generator=generator, dtype=torch.float64),
                                      torch.randn(4, generator=generator, dtype=torch.float64))
    pattern = ConvPattern.from_mask(mask)
    values = pattern.gather(weight).requires_grad_()
    x.requires_grad_()
    bias.requires_grad_()

    def conv(x, values, bias):
        return conv_call(backend)(x, values, pattern.row_ptr, pattern.col_idx, pattern.t_ptr, pattern.t_rows,
                                  pattern.t_perm, list(pattern.shape), bias, [stride] * 2, [padding] * 2,
                                  [dilation] * 2)

    assert torch.autograd.gradcheck(conv, (x, values, bias), **gradcheck_options(backend))


def op_samples(generator, device):
    for density, batch, bias in ((0.3, 2, True), (0.0, 1, False), (1.0, 0, True)):
        weight = torch.randn(5, 3, 3, 3, generator=generator).to(device)
        pattern = ConvPattern.from_mask(random_mask(weight.shape, density, generator).to(device))
        x = torch.randn(batch, 3, 7, 6, generator=generator).to(device).requires_grad_()
        values = pattern.gather(weight).requires_grad_()
        b = torch.randn(5, generator=generator).to(device).requires_grad_() if bias else None
        yield x, values, pattern, b


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, generator):
    for x, values, p, bias in op_samples(generator, device_for(backend)):
        opcheck_conv_route(backend, x, values, p, bias, [2, 1], [1, 1], [1, 2])


# BACKENDS holds pytest parameters, not names: the condition asks the backends module directly.
NATIVE_CPU = pytest.mark.skipif(bool(unsupported_reasons("cpu", SPARSE_CONV, CPU)), reason="needs the C++ extension")


@NATIVE_CPU
def test_the_cpu_operators_take_compact_int16_columns(generator):
    # The form an inference SparseConv2d holds on a CPU: the same results as int32 (forward and, widened, both
    # backwards), opcheck-clean, and its corruptions refused by name.
    for x, values, p, bias in op_samples(generator, CPU):
        compact = SimpleNamespace(row_ptr=p.row_ptr, col_idx=p.col_idx.to(torch.int16), t_ptr=p.t_ptr,
                                  t_rows=p.t_rows, t_perm=p.t_perm, shape=p.shape)
        opcheck_conv_route("cpu", x, values, compact, bias, [2, 1], [1, 1], [1, 2])
        args = (list(p.shape), bias, [2, 1], [1, 1], [1, 2], False)
        kernels = torch.ops.ptd_sparse_kernels
        x, values = x.detach(), values.detach()
        assert torch.equal(kernels.conv_forward(x, values, p.row_ptr, compact.col_idx, *args),
                           kernels.conv_forward(x, values, p.row_ptr, p.col_idx, *args))
    bad = compact.col_idx.clone()
    bad[0] = p.shape[1] * p.shape[2] * p.shape[3]
    with pytest.raises(ValueError, match=r"col_idx\[0\] = \d+ is out of range"):
        torch.ops.ptd_sparse_kernels.conv_forward(x, values, p.row_ptr, bad, *args)
    with pytest.raises(ValueError, match="col_idx must be a 1-D int32 tensor \\(or int16 on the CPU\\), got Char"):
        torch.ops.ptd_sparse_kernels.conv_forward(x, values, p.row_ptr, p.col_idx.to(torch.int8), *args)


@NATIVE_CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("batch,size", [(1, 11), (20, 4), (64, 2), (0, 5)])
def test_channels_last_in_channels_last_out(dtype, batch, size, generator):
    """The native forward keeps a channels_last input's layout (as F.conv2d does): float32 through the NHWC packers
    and writers of the wide (batch 1), batch-innermost (20) and tiled (64) layouts, other dtypes through the NCHW
    loops and a copy; an empty batch too. 20 input and 19 output channels leave partial channel blocks."""
    weight = torch.randn(19, 20, 3, 3, generator=generator)
    mask = random_mask(weight.shape, 0.3, generator)
    x = torch.randn(batch, 20, size, size, generator=generator).to(dtype).contiguous(memory_format=torch.channels_last)
    p = ConvPattern.from_mask(mask)
    values, bias = p.gather(weight).to(dtype), torch.randn(19, generator=generator).to(dtype)
    out = torch.ops.ptd_sparse_kernels.sparse_conv2d(x, values, p.row_ptr, p.col_idx, p.t_ptr, p.t_rows, p.t_perm,
                                                    list(p.shape), bias, [1, 1], [1, 1], [1, 1], True)
    want = F.conv2d(x.contiguous().double(), (weight * mask).double(), bias.double(), padding=1).relu()
    # An empty batch is contiguous in both layouts; like F.conv2d's, its output carries NCHW strides.
    assert out.dtype == dtype and (out.is_contiguous(memory_format=torch.channels_last) or not batch)
    assert_close(out, want, dtype, "channels_last output")
    if batch:
        opcheck_conv_route("cpu", x, values, p, bias, [1, 1], [1, 1], [1, 1], relu=True)


def test_dense_route_agrees_with_the_op_reference(generator):
    """masked_conv2d(backend='dense') takes the dense masked path; the op's reference must agree with it."""
    weight = torch.randn(5, 3, 3, 3, generator=generator)
    mask = random_mask(weight.shape, 0.3, generator)
    x = torch.randn(2, 3, 9, 9, generator=generator)
    dense_path = ptd_sparse.masked_conv2d(x, weight, mask, padding=1, backend="dense")
    op_path = ptd_sparse.sparse_conv2d(x, ptd_sparse.SparseConvWeight.from_dense(weight, mask), padding=1,
                                       backend="reference")
    torch.testing.assert_close(dense_path, op_path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_treats_the_op_as_opaque(backend, generator):
    weight, mask, x = on_device(backend, torch.randn(5, 3, 3, 3, generator=generator),
                                random_mask((5, 3, 3, 3), 0.3, generator), torch.randn(2, 3, 9, 9, generator=generator))

    def fn(x, weight):
        return torch.relu(ptd_sparse.masked_conv2d(x, weight, mask, padding=1, backend=backend))

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=False)
    torch.testing.assert_close(compiled(x, weight), fn(x, weight))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size,kernel,stride,padding,dilation", [
    ((4, 4), 3, 1, 1, 1), ((2, 2), 3, 1, 1, 1), ((7, 5), 3, 2, 1, 1), ((6, 6), 3, 1, 2, 2), ((5, 5), 1, 1, 0, 1)])
@pytest.mark.parametrize("batch", [37, 20])
def test_many_images_of_small_maps(backend, size, kernel, stride, padding, dilation, batch, generator):
    """Batches of >= 16 images on small maps take the CPU backend's batch-innermost layout. Neither batch is a
    multiple of its blocks of images; with 8-float vectors 37 takes the narrow block (16 images, two positions per
    register block, 25 positions leave one over) and 20 the wide one (32 images)."""
    x = torch.randn(batch, 6, *size, generator=generator)
    weight = torch.randn(9, 6, kernel, kernel, generator=generator)
    mask = random_mask(weight.shape, 0.3, generator)
    run_case(backend, x, weight, mask, torch.randn(9, generator=generator), stride, padding, dilation,
             torch.float32, generator)


@NATIVE_CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("relu,with_bias", [(True, True), (False, True), (False, False)])
def test_a_pattern_without_nonzeros_gives_the_bias(dtype, memory_format, relu, with_bias, generator):
    """Global pruning empties whole layers (the 512-channel layers of VGG19 at 95%): the forward is the bias, relu'd
    where asked, in the input's layout, and the input gradient is zero."""
    mask = torch.zeros(7, 6, 3, 3, dtype=torch.bool)
    p = ConvPattern.from_mask(mask)
    x = torch.randn(64, 6, 4, 4, generator=generator).to(dtype).contiguous(memory_format=memory_format)
    values = torch.zeros(0, dtype=dtype)
    bias = torch.randn(7, generator=generator).to(dtype) if with_bias else None
    out = torch.ops.ptd_sparse_kernels.conv_forward(x, values, p.row_ptr, p.col_idx, list(p.shape), bias, [1, 1],
                                                    [1, 1], [1, 1], relu)
    want = torch.zeros(64, 7, 4, 4, dtype=dtype) + (bias.view(1, 7, 1, 1) if with_bias else 0)
    torch.testing.assert_close(out, want.relu() if relu else want, atol=0, rtol=0)
    assert out.is_contiguous(memory_format=memory_format)
    grad_input = torch.ops.ptd_sparse_kernels.conv_backward_input(
        torch.randn(64, 7, 4, 4, generator=generator).to(dtype), values, p.col_idx, p.t_ptr, p.t_rows, p.t_perm,
        list(p.shape), list(x.shape), [1, 1], [1, 1], [1, 1])
    assert grad_input.shape == x.shape and not grad_input.any()


@NATIVE_CPU
def test_packing_buffers_are_never_shared_between_live_calls(generator):
    """The float32 kernels reuse their packing buffers across calls (csrc/cpu/isa/dispatch.h, packing_buffer): calls
    from several Python threads at once, and the weight gradient's two packed operands, must each get their own."""
    import concurrent.futures

    ops = torch.ops.ptd_sparse_kernels
    mask = random_mask((16, 12, 3, 3), 0.4, generator)
    p = ConvPattern.from_mask(mask)
    weight = torch.randn(16, 12, 3, 3, generator=generator)
    values = p.gather(weight)
    inputs = [torch.randn(batch, 12, size, size, generator=generator) for batch, size in
              ((64, 8), (3, 21), (32, 4), (1, 30), (64, 8), (17, 6))]
    grads = [torch.randn(x.shape[0], 16, x.shape[2], x.shape[3], generator=generator) for x in inputs]

    def step(index):
        x, grad_out = inputs[index], grads[index]
        out = ops.conv_forward(x, values, p.row_ptr, p.col_idx, list(p.shape), None, [1, 1], [1, 1], [1, 1], False)
        grad_values = ops.conv_backward_values(grad_out, x, p.row_ptr, p.col_idx, list(p.shape), [1, 1], [1, 1],
                                               [1, 1])
        return out, grad_values

    serial = [step(i) for i in range(len(inputs))]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        parallel = list(pool.map(step, [i % len(inputs) for i in range(4 * len(inputs))]))
    for i, (out, grad_values) in enumerate(parallel):
        want_out, want_grad = serial[i % len(inputs)]
        torch.testing.assert_close(out, want_out, atol=0, rtol=0)
        torch.testing.assert_close(grad_values, want_grad, atol=0, rtol=0)
    x64 = inputs[0].double().requires_grad_()
    w64 = (weight * mask).double().requires_grad_()
    out64 = F.conv2d(x64, w64, padding=1)
    (grad_w,) = torch.autograd.grad(out64, w64, grads[0].double())
    assert_close(serial[0][0], out64, torch.float32, "output")
    assert_close(serial[0][1], grad_w.reshape(-1)[p.flat_index], torch.float32, "grad_values")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("batch,size", [(3, (9, 7)), (40, (4, 4))])
def test_fused_relu_forward_and_backward(backend, dtype, batch, size, generator):
    weight, mask, x, bias = on_device(backend, torch.randn(6, 5, 3, 3, generator=generator, dtype=dtype),
                                      random_mask((6, 5, 3, 3), 0.3, generator),
                                      torch.randn(batch, 5, *size, generator=generator, dtype=dtype),
                                      torch.randn(6, generator=generator, dtype=dtype))
    sparse = ptd_sparse.SparseConvWeight.from_dense(weight, mask)
    sparse.values.requires_grad_()
    x.requires_grad_()
    bias.requires_grad_()
    fused = ptd_sparse.sparse_conv2d(x, sparse, bias, padding=1, backend=backend, relu=True)
    expected = torch.relu(F.conv2d(x, sparse.to_dense(), bias, padding=1))
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    grad_out = on_device(backend, torch.randn(fused.shape, generator=generator, dtype=dtype))
    got = torch.autograd.grad(fused, (x, sparse.values, bias), grad_out)
    want = torch.autograd.grad(expected, (x, sparse.values, bias), grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    if dtype == torch.float64 and batch < 10:
        pattern = sparse.pattern

        def conv(x, values):
            return conv_call(backend)(x, values, pattern.row_ptr, pattern.col_idx, pattern.t_ptr, pattern.t_rows,
                                      pattern.t_perm, list(pattern.shape), None, [1, 1], [1, 1], [1, 1], True)

        assert torch.autograd.gradcheck(conv, (x.detach()[:1].requires_grad_(), sparse.values),
                                         **gradcheck_options(backend))
        opcheck_conv_route(backend, x, sparse.values, pattern, bias, [1, 1], [1, 1], [1, 1], relu=True)
