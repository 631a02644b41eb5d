"""Shared helpers: the backends under test, random masks of exact density, and the dtype tolerance table."""
from __future__ import annotations

import os

import pytest
import torch

from ptd_sparse.backends import unsupported_reasons
from ptd_sparse.ops import kd_loss as kd_loss_ops
from ptd_sparse.ops import sparse_conv2d as conv_ops

# Every backend that can run on this machine's CPU tensors. `reference` is the oracle the others are compared with;
# it is tested itself against plain F.conv2d / the eager loss composition in float64.
ALL_BACKENDS = ("reference", "cpu", "cuda", "triton")


def runnable_backends(op: str, device: str = "cpu") -> list:
    """Every backend as a pytest parameter for tensors on `device`, skipped with its reasons where it cannot run."""
    params = []
    for name in ALL_BACKENDS:
        reasons = unsupported_reasons(name, op, torch.device(device))
        marks = [pytest.mark.skip(reason="; ".join(reasons))] if reasons else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def conv_call(backend: str):
    """What the public functions call for a sparse convolution on `backend` (ptd_sparse/ops/sparse_conv2d.py, ROUTES):
    (input, values, row_ptr, col_idx, t_ptr, t_rows, t_perm, weight_shape, bias, stride, padding, dilation,
    relu=False) -> output, differentiable."""
    return conv_ops.ROUTES[backend].call


def runs_python_operator(backend: str) -> bool:
    """Whether `backend` runs on the Python operators (ptd_sparse::*), which take its name as their `backend`
    argument; the others run the extension's operators (ptd_sparse_kernels::*)."""
    return conv_ops.ROUTES[backend].kernels is not None


def loss_kernels(backend: str):
    """(kd_loss, kd_loss_topk) of `backend` below autograd, each returning (loss, grad_student) for the arguments
    (student, teacher..., target, temperature, alpha, reduction, ignore_index, compute_grad): the extension's kernel
    operators for the native backends, the Python operators with the backend's name for the others."""
    if not runs_python_operator(backend):
        return torch.ops.ptd_sparse_kernels.kd_loss, torch.ops.ptd_sparse_kernels.kd_loss_topk
    return (lambda *args: kd_loss_ops.kd_loss(*args, backend)), (lambda *args: kd_loss_ops.kd_loss_topk(*args, backend))


def opcheck_conv_route(backend, x, values, p, bias, stride, padding, dilation, relu=False):
    """opcheck of the operators a backend's route runs: ptd_sparse::sparse_conv2d and its backward with the backend's
    name, or the extension's ptd_sparse_kernels::sparse_conv2d and the backward kernels its C++ autograd calls."""
    common = (x, values, p.row_ptr, p.col_idx, p.t_ptr, p.t_rows, p.t_perm, list(p.shape), bias, stride, padding,
              dilation)
    out = conv_call(backend)(*common).detach()
    grad_out = on_device(backend, torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(0)))
    if runs_python_operator(backend):
        torch.library.opcheck(conv_ops.sparse_conv2d, common + (backend, relu))
        backward_args = (grad_out, x.detach(), values.detach(), p.row_ptr, p.col_idx, p.t_ptr, p.t_rows, p.t_perm,
                         list(p.shape), stride, padding, dilation, [True, True, bias is not None], backend)
        torch.library.opcheck(conv_ops.sparse_conv2d_backward, backward_args)
        return
    kernels = torch.ops.ptd_sparse_kernels
    torch.library.opcheck(kernels.sparse_conv2d.default, common + (relu,))
    torch.library.opcheck(kernels.conv_backward_input.default, (grad_out, values.detach(), p.col_idx, p.t_ptr,
                                                                p.t_rows, p.t_perm, list(p.shape), list(x.shape),
                                                                stride, padding, dilation))
    torch.library.opcheck(kernels.conv_backward_values.default, (grad_out, x.detach(), p.row_ptr, p.col_idx,
                                                                 list(p.shape), stride, padding, dilation))


def opcheck_loss_route(routes, backend, student, teacher, target, temperature, alpha, reduction):
    """opcheck of the operator a backend's route runs (ROUTES or TOPK_ROUTES of ptd_sparse/ops/kd_loss.py), and for
    the extension's operators of the kernel operator their C++ autograd calls."""
    route = routes[backend]
    namespace, name = route.operator.split("::")
    common = (student, *teacher, target, temperature, alpha, reduction, -100)
    if runs_python_operator(backend):
        torch.library.opcheck(getattr(getattr(torch.ops, namespace), name).default, common + (True, backend))
        return
    torch.library.opcheck(getattr(getattr(torch.ops, namespace), name).default, common)
    kernel = loss_kernels(backend)[0 if len(teacher) == 1 else 1]
    torch.library.opcheck(kernel.default, (student.detach(),) + common[1:] + (True,))


HAS_GPU = torch.cuda.is_available()
GPU_BACKENDS = ("cuda", "triton")


def device_for(backend: str) -> torch.device:
    """The device of a backend-parametrised test's tensors: a GPU for the cuda and triton backends where one exists
    (so their cases run on CUDA tensors), else the CPU (where cuda skips and triton runs under TRITON_INTERPRET=1)."""
    return torch.device("cuda") if backend in GPU_BACKENDS and HAS_GPU else torch.device("cpu")


def device_backends(op: str) -> list:
    """Every backend as a pytest parameter for tensors on device_for(backend), skipped with its reasons where it
    cannot run there."""
    params = []
    for name in ALL_BACKENDS:
        reasons = unsupported_reasons(name, op, device_for(name))
        if reasons and name == "cuda" and not HAS_GPU:
            reasons = ["no CUDA device on this machine"] + reasons
        marks = [pytest.mark.skip(reason="; ".join(reasons))] if reasons else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def on_device(backend: str, *tensors):
    """The tensors (None and TopKTeacher allowed) moved to device_for(backend); one value for one argument."""
    return moved_to(device_for(backend), *tensors)


def moved_to(device, *tensors):
    """The tensors (None and TopKTeacher allowed) moved to `device`; one value for one argument."""

    def move(value):
        if value is None:
            return None
        if isinstance(value, tuple):  # a TopKTeacher (a NamedTuple of tensors or None)
            return type(value)(*(move(part) for part in value))
        return value.to(device)

    moved = tuple(move(value) for value in tensors)
    return moved[0] if len(moved) == 1 else moved


# (atol, rtol) of a backend's result in a dtype against the float64 oracle, relative to the result's magnitude.
# float16/bfloat16 rows follow the rule "about twice PyTorch's own error in that precision": 10 bits and 7 bits of
# mantissa give unit roundoffs of 4.9e-4 and 3.9e-3; sums of a few hundred products lose a few more bits.
TOLERANCE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (8e-3, 8e-3),
    torch.bfloat16: (6e-2, 6e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    atol, rtol = TOLERANCE[dtype]
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def random_mask(shape, density: float, generator: torch.Generator) -> torch.Tensor:
    """A bool mask with exactly round(density * numel) True entries at random positions."""
    numel = 1
    for size in shape:
        numel *= size
    keep = round(density * numel)
    flat = torch.zeros(numel, dtype=torch.bool)
    flat[torch.randperm(numel, generator=generator)[:keep]] = True
    return flat.reshape(shape)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """Tests choose backends explicitly; a PTD_BACKEND in the caller's environment must not leak in."""
    if "PTD_BACKEND" in os.environ:
        monkeypatch.delenv("PTD_BACKEND")


@pytest.fixture(autouse=True)
def _float32_convolutions_without_tf32():
    """On a GPU, F.conv2d in float32 runs TF32 (a 10-bit mantissa) by default; tests that compare with F.conv2d on
    the GPU need its float32 result."""
    if not HAS_GPU:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def gradcheck_options(backend: str) -> dict:
    """Options for torch.autograd.gradcheck. The Triton interpreter runs every kernel program as a Python loop, so a
    full numerical Jacobian (two forward calls per input element) takes minutes; fast mode compares the analytical
    and numerical gradients along random projections instead, with a couple of forward calls per input."""
    return {"fast_mode": True} if backend == "triton" else {}
