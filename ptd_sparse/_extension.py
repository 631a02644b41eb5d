"""Loads the compiled extension ptd_sparse._C and refuses a missing or stale one with one clear sentence.

Importing ptd_sparse never fails because of the extension: the `reference` backend needs none. The `cpu` and `cuda`
backends ask `extension_problem()` and report its sentence when they cannot run.
"""
from __future__ import annotations

import functools

import torch

BUILD_HINT = "build it with `pip install --no-build-isolation -e .` from the ptd-sparse source folder"


@functools.lru_cache(maxsize=None)
def extension_problem() -> str | None:
    """None when ptd_sparse._C is loaded and matches the running torch, else the reason it cannot be used."""
    try:
        from ptd_sparse import _C  # noqa: F401  (loading it registers the ptd_sparse_kernels operators)
    except ImportError as error:
        return f"the C++ extension ptd_sparse._C is missing or does not load ({error}); {BUILD_HINT}"
    built_for = _C.torch_version()
    if built_for != torch.__version__:
        return (f"the C++ extension ptd_sparse._C is stale: it was built for torch {built_for} but torch "
                f"{torch.__version__} is running; re{BUILD_HINT[1:]}")
    return None


def has_compiled_cuda() -> bool:
    """Whether the loaded extension carries the CUDA kernels."""
    if extension_problem() is not None:
        return False
    from ptd_sparse import _C

    return bool(_C.has_cuda())


def kernels():
    """The kernel-level operators (torch.ops.ptd_sparse_kernels), loading the extension first."""
    problem = extension_problem()
    if problem is not None:
        raise RuntimeError(problem)
    return torch.ops.ptd_sparse_kernels
