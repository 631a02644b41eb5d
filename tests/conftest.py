"""Shared helpers: the backends under test, random masks of exact density, and the dtype tolerance table."""
from __future__ import annotations

import os

import pytest
import torch

from ptd_sparse.backends import unsupported_reasons

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
