"""The sparse convolution: its Python operators, their one autograd rule, and its route table (ROUTES, at the end).

out = F.conv2d(input, W, bias, stride, padding, dilation) where W is the dense weight whose nonzeros are given in the
canonical CSR format (ptd_sparse.pattern). Gradients: input, values (the nonzeros only) and bias.

Schemas, and which backend each one serves:
- ptd_sparse_kernels::sparse_conv2d (C++, csrc/autograd/sparse_conv2d_autograd.cpp): the `cpu` and `cuda` backends.
  Its autograd and autocast rules are registered in C++, so an eager training step of the default CPU backend
  crosses no Python layer after the public function; its backward calls the kernel operators conv_backward_input
  and conv_backward_values directly.
- ptd_sparse::sparse_conv2d and ptd_sparse::sparse_conv2d_backward (torch.library.custom_op, here): the backends
  whose kernels are Python, `reference` and `triton`, chosen by the `backend` argument through ROUTES. Opaque to
  torch.compile, and opcheck-clean under the Triton interpreter.
- ptd_sparse::triton_sparse_conv2d and its backward (torch.library.triton_op, here): the `triton` backend while
  torch.compile traces a CUDA graph, so that the graph holds the Triton kernels themselves. Its opcheck fails under
  the interpreter (docs/design.md, section 6), which is why the custom op above stays for eager calls.

The gradient is one rule, written once per language: `autograd_rule` below for both Python schemas, and its C++
twin for the extension's schema. A Python rule on the extension's operator would put a Python autograd node on every
eager call of the default backends, and the C++ rule cannot run kernels that are Python functions chosen by name;
tests/test_native_ops.py checks that the two give the same gradients.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ptd_sparse import _format_checks
from ptd_sparse.conv_geometry import conv_output_shape
from ptd_sparse.native import sparse_conv2d as native
from ptd_sparse.ops.autocast import register_autocast
from ptd_sparse.ops.route import Route, python_kernels
from ptd_sparse.reference import sparse_conv2d as reference_kernels


def _triton_kernels():
    """The Triton kernels (kernels/sparse_conv2d.py, installed as ptd_sparse.kernels), imported by the first call:
    they import triton, which importing ptd_sparse must not need."""
    from ptd_sparse.kernels import sparse_conv2d as kernels
    return kernels


def _reference_kernels():
    return reference_kernels


@torch.library.custom_op("ptd_sparse::sparse_conv2d", mutates_args=())
def sparse_conv2d(input: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, t_ptr: Tensor, t_rows: Tensor,
                  t_perm: Tensor, weight_shape: List[int], bias: Optional[Tensor], stride: List[int],
                  padding: List[int], dilation: List[int], backend: str, relu: bool = False) -> Tensor:
    """input [N, C_in, H, W], values [nnz], CSR and transposed pattern (see ConvPattern) -> [N, C_out, OH, OW].
    relu=True applies max(0, .) in the kernel's epilogue (its gradient is masked by the saved output)."""
    _format_checks.check_sizes(weight_shape, row_ptr, col_idx, t_ptr, t_rows, t_perm, values)
    kernels = python_kernels(ROUTES, backend, "sparse_conv2d")
    return kernels.forward(input, values, row_ptr, col_idx, weight_shape, bias, stride, padding, dilation, relu)


@sparse_conv2d.register_fake
def _sparse_conv2d_fake(input, values, row_ptr, col_idx, t_ptr, t_rows, t_perm, weight_shape, bias, stride, padding,
                        dilation, backend, relu=False):
    return input.new_empty(conv_output_shape(input, weight_shape, stride, padding, dilation))


@torch.library.custom_op("ptd_sparse::sparse_conv2d_backward", mutates_args=())
def sparse_conv2d_backward(grad_output: Tensor, input: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor,
                           t_ptr: Tensor, t_rows: Tensor, t_perm: Tensor, weight_shape: List[int], stride: List[int],
                           padding: List[int], dilation: List[int], output_mask: List[bool],
                           backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_input [N, C_in, H, W], grad_values [nnz], grad_bias [C_out]); an output not asked for by output_mask
    comes back empty."""
    kernels = python_kernels(ROUTES, backend, "sparse_conv2d_backward")
    grads = kernels.backward(grad_output.contiguous(), input, values, row_ptr, col_idx, t_ptr, t_rows, t_perm,
                             weight_shape, stride, padding, dilation, output_mask)
    return tuple(g if g is not None else grad_output.new_empty(0) for g in grads)


@sparse_conv2d_backward.register_fake
def _sparse_conv2d_backward_fake(grad_output, input, values, row_ptr, col_idx, t_ptr, t_rows, t_perm, weight_shape,
                                 stride, padding, dilation, output_mask, backend):
    shapes = (input.shape, values.shape, (weight_shape[0],))
    return tuple(grad_output.new_empty(shape if wanted else (0,)) for shape, wanted in zip(shapes, output_mask))


@torch.library.triton_op("ptd_sparse::triton_sparse_conv2d", mutates_args=())
def triton_sparse_conv2d(input: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, t_ptr: Tensor,
                         t_rows: Tensor, t_perm: Tensor, weight_shape: List[int], bias: Optional[Tensor],
                         stride: List[int], padding: List[int], dilation: List[int], relu: bool) -> Tensor:
    """ptd_sparse::sparse_conv2d on the triton backend, traceable by torch.compile."""
    kernels = _triton_kernels()
    with kernels.traced_launches():
        return kernels.forward(input, values, row_ptr, col_idx, weight_shape, bias, stride, padding, dilation, relu)


@torch.library.triton_op("ptd_sparse::triton_sparse_conv2d_backward", mutates_args=())
def triton_sparse_conv2d_backward(grad_output: Tensor, input: Tensor, values: Tensor, row_ptr: Tensor,
                                  col_idx: Tensor, t_ptr: Tensor, t_rows: Tensor, t_perm: Tensor,
                                  weight_shape: List[int], stride: List[int], padding: List[int],
                                  dilation: List[int], output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """ptd_sparse::sparse_conv2d_backward on the triton backend, traceable by torch.compile."""
    kernels = _triton_kernels()
    with kernels.traced_launches():
        grads = kernels.backward(grad_output, input, values, row_ptr, col_idx, t_ptr, t_rows, t_perm, weight_shape,
                                 stride, padding, dilation, output_mask)
    return tuple(g if g is not None else grad_output.new_empty(0) for g in grads)


# Arguments every sparse convolution operator starts with, in this order: input, values, row_ptr, col_idx, t_ptr,
# t_rows, t_perm, weight_shape, bias, stride, padding, dilation; then operator-specific ones, then relu last.
_COMMON_ARGUMENTS = 12
_BIAS = 8


def autograd_rule(backward_op):
    """(setup_context, backward) of a Python sparse convolution operator: ptd_sparse::sparse_conv2d (which carries
    its backend name after dilation) and ptd_sparse::triton_sparse_conv2d. `backward_op(grad_output, input, values,
    row_ptr, col_idx, t_ptr, t_rows, t_perm, weight_shape, stride, padding, dilation, output_mask, *extra)` computes
    (grad_input, grad_values, grad_bias), where `extra` are the operator-specific arguments."""

    def setup_context(ctx, inputs, output):
        input, values, row_ptr, col_idx, t_ptr, t_rows, t_perm, weight_shape, bias, stride, padding, dilation = \
            inputs[:_COMMON_ARGUMENTS]
        ctx.relu = inputs[-1]
        ctx.extra = tuple(inputs[_COMMON_ARGUMENTS:-1])
        ctx.n_inputs = len(inputs)
        # With a fused ReLU the output is saved too: its sign masks the incoming gradient.
        ctx.save_for_backward(input, values, row_ptr, col_idx, t_ptr, t_rows, t_perm, output if ctx.relu else None)
        ctx.conv_args = (weight_shape, stride, padding, dilation)
        ctx.has_bias = bias is not None

    def backward(ctx, grad_output):
        input, values, row_ptr, col_idx, t_ptr, t_rows, t_perm, output = ctx.saved_tensors
        if ctx.relu:
            grad_output = grad_output * (output > 0)
        needs = ctx.needs_input_grad
        output_mask = [needs[0], needs[1], ctx.has_bias and needs[_BIAS]]
        # Gradients of sum() arrive as stride-0 views; the kernels read contiguous memory.
        grad_input, grad_values, grad_bias = backward_op(
            grad_output.contiguous(), input, values, row_ptr, col_idx, t_ptr, t_rows, t_perm, *ctx.conv_args,
            output_mask, *ctx.extra)
        grads = [None] * ctx.n_inputs
        grads[0] = grad_input if output_mask[0] else None
        grads[1] = grad_values if output_mask[1] else None
        grads[_BIAS] = grad_bias if output_mask[2] else None
        return tuple(grads)

    return setup_context, backward


_setup_context, _backward = autograd_rule(sparse_conv2d_backward)
sparse_conv2d.register_autograd(_backward, setup_context=_setup_context)
_setup_context, _backward = autograd_rule(triton_sparse_conv2d_backward)
triton_sparse_conv2d.register_autograd(_backward, setup_context=_setup_context)
# Under torch.autocast the convolution runs in the autocast dtype, like F.conv2d (the extension's operator has the
# same rule in C++).
register_autocast("ptd_sparse::sparse_conv2d", cast_to=None)
register_autocast("ptd_sparse::triton_sparse_conv2d", cast_to=None)


def _python_operator(backend: str):
    """ptd_sparse::sparse_conv2d on `backend`, with the arguments of a route's call."""

    def call(input, values, row_ptr, col_idx, t_ptr, t_rows, t_perm, weight_shape, bias, stride, padding, dilation,
             relu=False):
        return sparse_conv2d(input, values, row_ptr, col_idx, t_ptr, t_rows, t_perm, weight_shape, bias, stride,
                             padding, dilation, backend, relu)

    return call


_NATIVE = Route("ptd_sparse_kernels::sparse_conv2d", native.differentiable)
# Backend -> route. Every call takes (input, values, row_ptr, col_idx, t_ptr, t_rows, t_perm, weight_shape, bias,
# stride, padding, dilation, relu). The dense route (F.conv2d on the scattered weight) is no operator's backend: the
# public functions run it themselves.
ROUTES: dict[str, Route] = {
    "cpu": _NATIVE,
    "cuda": _NATIVE,
    "triton": Route("ptd_sparse::sparse_conv2d", _python_operator("triton"), kernels=_triton_kernels,
                    traced=Route("ptd_sparse::triton_sparse_conv2d", triton_sparse_conv2d), traced_on=("cuda",)),
    "reference": Route("ptd_sparse::sparse_conv2d", _python_operator("reference"), kernels=_reference_kernels),
}
