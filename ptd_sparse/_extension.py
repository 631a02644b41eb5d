"""Loads the compiled extension ptd_sparse._C once, at import, and refuses a missing or stale one (built for another
torch, or compiled for CPU features this CPU lacks) with one clear sentence.

Importing ptd_sparse never fails because of the extension: the `reference` backend needs none. The `cpu` and `cuda`
backends ask `extension_problem()` and report its sentence when they cannot run.
"""
from __future__ import annotations

import torch

BUILD_HINT = "build it with `pip install --no-build-isolation -e .` from the ptd-sparse source folder"


def _problem_of(module) -> str | None:
    """Why a loaded extension module cannot be used here, or None: built for another torch, or compiled (-march) for
    CPU features this CPU lacks (a PTD_NATIVE=1 build moved to an older CPU: its first kernel would die with an
    illegal instruction instead of this sentence)."""
    built_for = module.torch_version()
    if built_for != torch.__version__:
        return (f"the C++ extension ptd_sparse._C is stale: it was built for torch {built_for} but torch "
                f"{torch.__version__} is running; re{BUILD_HINT}")
    missing = list(module.missing_cpu_features())
    if missing:
        return (f"the C++ extension ptd_sparse._C was compiled for another CPU (flags {module.build_flags()}): this "
                f"CPU lacks {', '.join(missing)}; re{BUILD_HINT} without PTD_NATIVE=1 (a portable build runs "
                f"everywhere and picks the fastest kernels at run time)")
    return None


def _load() -> tuple[str | None, bool]:
    """(why the extension cannot be used or None, whether it carries CUDA kernels)."""
    try:
        from ptd_sparse import _C  # loading it registers the ptd_sparse_kernels operators
    except ImportError as error:
        return f"the C++ extension ptd_sparse._C is missing or does not load ({error}); {BUILD_HINT}", False
    problem = _problem_of(_C)
    return problem, problem is None and bool(_C.has_cuda())


# Computed once so that the backend choice reads plain values (cheap, and transparent to torch.compile).
_PROBLEM, _HAS_CUDA = _load()


def extension_problem() -> str | None:
    """None when ptd_sparse._C is loaded and matches the running torch, else the reason it cannot be used."""
    return _PROBLEM


def has_compiled_cuda() -> bool:
    """Whether the loaded extension carries the CUDA kernels."""
    return _PROBLEM is None and _HAS_CUDA


def cpu_kernel_isa() -> str:
    """The float32 CPU kernel set the extension runs on this CPU: "avx512", "avx2" or "baseline" (the best this CPU
    supports, unless the environment variable PTD_CPU_ISA, read once per process, names a lower one). Raises
    ValueError for a PTD_CPU_ISA this CPU or build cannot honour, RuntimeError without a usable extension."""
    _require()
    from ptd_sparse import _C
    return _C.cpu_kernel_isa()


def cpu_kernel_isas() -> list[str]:
    """The float32 CPU kernel sets this build has and this CPU can run, lowest first."""
    _require()
    from ptd_sparse import _C
    return list(_C.cpu_kernel_isas())


def build_flags() -> str:
    """The compiler flags the extension's CPU code was built with (optimisation and -march; see setup.py)."""
    _require()
    from ptd_sparse import _C
    return _C.build_flags()


def _require() -> None:
    problem = extension_problem()
    if problem is not None:
        raise RuntimeError(problem)


def kernels():
    """The kernel-level operators (torch.ops.ptd_sparse_kernels); raises the extension's problem if it has one."""
    _require()
    return torch.ops.ptd_sparse_kernels


def kernel_operator(name: str):
    """torch.ops.ptd_sparse_kernels.<name> (its one overload), looked up once, so that a call pays the dispatcher
    alone; without a usable extension, a function that raises the extension's problem when called."""
    if _PROBLEM is None:
        return getattr(torch.ops.ptd_sparse_kernels, name).default

    def unavailable(*args, **kwargs):
        _require()

    return unavailable
