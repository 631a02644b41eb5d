"""Builds ptd_sparse and its extension ptd_sparse._C.

The C++ CPU kernels (csrc/*.cpp, csrc/cpu/) are always built. The CUDA kernels (csrc/cuda/*.cu) are built only when
the installed torch has CUDA, nvcc is found (CUDA_HOME) and PTD_SKIP_CUDA_BUILD is not set to 1. Triton kernels
(kernels/) are plain Python and are installed as the subpackage ptd_sparse.kernels.

Build against the torch you run with: `pip install --no-build-isolation .` (an isolated build fetches its own torch).

Portability: the extension is compiled for a baseline every x86-64 CPU of the last fifteen years runs (x86-64-v2);
its float32 hot kernels are compiled again for AVX2+FMA and AVX-512 and chosen at run time
(csrc/cpu/isa/dispatch.h), so one build runs, fast, on any CPU. PTD_NATIVE=1 compiles everything for the building
CPU instead (-march=native: such a build may die with an illegal instruction elsewhere); PTD_CPU_ARCH=<value> sets
the baseline's -march explicitly (x86-64-v3, znver4, ...).

Release wheels: `pip wheel --no-build-isolation --no-deps . -w dist` (or `python -m build --wheel --no-isolation`).
The extension loads only with the torch it was compiled against, so the wheel's metadata requires exactly that torch
release (torch==X.Y.Z) and its version carries the torch build as a local label, as torch extensions do:
0.1.0+torch2.14.1.cu130 (CUDA kernels built), 0.1.0+torch2.14.1.cu130.cpuonly (a CUDA torch, CUDA kernels skipped),
0.1.0+torch2.13.0.cpu (a CPU torch). The library carries no debug information (-g0) unless PTD_SANITIZE=1.
"""
import glob
import os
import platform
import re

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    if os.environ.get("PTD_SKIP_CUDA_BUILD", "0") == "1":
        return False
    cuda_sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    return bool(cuda_sources) and torch.version.cuda is not None and CUDA_HOME is not None


def pip_cuda_include_dirs() -> list[str]:
    """Header folders of the pip-installed CUDA libraries (nvidia/cu13/include holds cusparse.h, cublas_v2.h, ...):
    the CUDA builds of torch include them from their own headers, and a bare toolkit may not ship them all."""
    try:
        import nvidia
    except ImportError:
        return []
    return sorted(d for base in nvidia.__path__ for d in glob.glob(os.path.join(base, "*", "include")))


def sanitizer_flags() -> list[str]:
    """PTD_SANITIZE=1 (scripts/sanitize.sh): the C++ kernels built with AddressSanitizer and UBSan, for tests only.
    Undefined behaviour aborts instead of printing and going on, so a test run cannot pass over it."""
    if os.environ.get("PTD_SANITIZE", "0") != "1":
        return []
    return ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g", "-O1"]


def is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def cpu_arch_flags() -> list[str]:
    """The -march (or -mcpu) of the extension's ordinary code; the AVX2 and AVX-512 copies of the hot kernels are
    compiled on top of it with target pragmas whatever it is.

    Default: x86-64-v2 (SSE4.2, POPCNT) on x86-64, the compiler's own default elsewhere (aarch64 and others get no
    x86 flag). PTD_NATIVE=1: the building CPU's every extension. PTD_CPU_ARCH=<value>: -march=<value>."""
    native = os.environ.get("PTD_NATIVE", "0")
    if native not in ("0", "1"):
        raise ValueError(f"PTD_NATIVE must be 0 or 1, got {native!r}")
    arch = os.environ.get("PTD_CPU_ARCH", "")
    if native == "1" and arch and arch != "native":
        raise ValueError(f"PTD_NATIVE=1 and PTD_CPU_ARCH={arch} ask for two different -march values; set only one")
    if native == "1" or arch == "native":
        # On Arm, GCC's spelling of "the building CPU" (architecture and tuning) is -mcpu=native.
        return ["-mcpu=native"] if platform.machine().lower() in ("aarch64", "arm64") else ["-march=native"]
    if arch:
        return [f"-march={arch}"]
    return ["-march=x86-64-v2"] if is_x86_64() else []


def base_version() -> str:
    """The package version, kept once: ptd_sparse.__version__."""
    text = open(os.path.join(ROOT, "ptd_sparse", "__init__.py")).read()
    return re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE).group(1)


def torch_requirement() -> str:
    """The torch release this build loads with: the extension refuses any other (ptd_sparse._extension)."""
    return f"torch=={torch.__version__.split('+')[0]}"


def wheel_version(cuda_kernels: bool) -> str:
    """base version + local label naming the torch build: torch 2.14.1+cu130 -> 0.1.0+torch2.14.1.cu130."""
    label = "torch" + torch.__version__.replace("+", ".")
    if torch.version.cuda is not None and not cuda_kernels:
        label += ".cpuonly"
    return f"{base_version()}+{label}"


def extension():
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/autograd/*.cpp") + glob.glob("csrc/cpu/*.cpp")
                         + glob.glob("csrc/cpu/isa/*.cpp"))
    sanitize = sanitizer_flags()
    # The flags that decide how and for which CPUs the code is compiled; they are compiled into the build
    # (ptd_sparse._C.build_flags()). The sanitizer's come last, so its -O1 wins over -O3.
    code_flags = ["-O3"] + cpu_arch_flags() + sanitize
    cxx_flags = code_flags + ["-fopenmp", f'-DPTD_TORCH_VERSION="{torch.__version__}"',
                              f'-DPTD_BUILD_FLAGS="{" ".join(code_flags)}"']
    if not sanitize:
        # After Python's own CFLAGS (which hold -g): debug information is most of the library's size (50 of 53 MB).
        cxx_flags.append("-g0")
    # -fopenmp is needed in the extension itself: at::parallel_for expands to an OpenMP region in our own code.
    link_flags = ["-fopenmp"] + sanitize
    if want_cuda():
        cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
        # Without a visible GPU (CI, build machines) torch would compile for every architecture it knows; build for
        # Ampere and Hopper (A100, H100/H200) unless TORCH_CUDA_ARCH_LIST says otherwise.
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        return CUDAExtension(
            "ptd_sparse._C",
            cpp_sources + cuda_sources,
            include_dirs=pip_cuda_include_dirs(),
            extra_compile_args={"cxx": cxx_flags + ["-DWITH_CUDA"], "nvcc": ["-O3", "-DWITH_CUDA", "-lineinfo"]},
            extra_link_args=link_flags,
        )
    return CppExtension("ptd_sparse._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)


# The top-level folder kernels/ (the Triton kernels, plain Python) is the subpackage ptd_sparse.kernels: in a wheel
# (build_py copies it there) and in an editable install (setuptools' editable finder maps the name to the folder), so
# the package imports it with a plain `import ptd_sparse.kernels` either way. A source checkout is used through
# `pip install -e .` (docs/install.md).
PACKAGE_DIR = {"ptd_sparse.kernels": "kernels"}


def packages() -> list[str]:
    return find_packages(where=ROOT, include=["ptd_sparse", "ptd_sparse.*"]) + list(PACKAGE_DIR)


# Guarded so that tests can import this file and inspect extension() without building (setuptools runs it as
# __main__, `python setup.py` too).
if __name__ == "__main__":
    setup(
        version=wheel_version(want_cuda()),
        install_requires=[torch_requirement(), "numpy", "safetensors", "tqdm", "matplotlib"],
        packages=packages(),
        package_dir=PACKAGE_DIR,
        ext_modules=[extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )
