"""Loads the compiled extension ptd_sparse._C once, at import, and refuses a missing or stale one with one clear
sentence.

Importing ptd_sparse never fails because of the extension: the `reference` backend needs none. The `cpu` and `cuda`
backends ask `extension_problem()` and report its sentence when they cannot run.
"""
from __future__ import annotations

import torch

BUILD_HINT = "build it with `pip install --no-build-isolation -e .` from the ptd-sparse source folder"


def _load() -> tuple[str | None, bool]:
    """(why the extension cannot be used or None, whether it carries CUDA kernels)."""
    try:
        from ptd_sparse import _C  # loading it registers the ptd_sparse_kernels operators
    except ImportError as error:
        return f"the C++ extension ptd_sparse._C is missing or does not load ({error}); {BUILD_HINT}", False
    built_for = _C.torch_version()
    if built_for != torch.__version__:
        return (f"the C++ extension ptd_sparse._C is stale: it was built for torch {built_for} but torch "
                f"{torch.__version__} is running; re{BUILD_HINT}"), False
    return None, bool(_C.has_cuda())


# Computed once so that the backend choice reads plain values (cheap, and transparent to torch.compile).
_PROBLEM, _HAS_CUDA = _load()


def extension_problem() -> str | None:
    """None when ptd_sparse._C is loaded and matches the running torch, else the reason it cannot be used."""
    return _PROBLEM


def has_compiled_cuda() -> bool:
    """Whether the loaded extension carries the CUDA kernels."""
    return _PROBLEM is None and _HAS_CUDA


def kernels():
    """The kernel-level operators (torch.ops.ptd_sparse_kernels); raises the extension's problem if it has one."""
    problem = extension_problem()
    if problem is not None:
        raise RuntimeError(problem)
    return torch.ops.ptd_sparse_kernels
