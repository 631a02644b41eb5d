"""Builds ptd_sparse and its extension ptd_sparse._C.

The C++ CPU kernels (csrc/*.cpp, csrc/cpu/) are always built. The CUDA kernels (csrc/cuda/*.cu) are built only when
the installed torch has CUDA, nvcc is found (CUDA_HOME) and PTD_SKIP_CUDA_BUILD is not set to 1. Triton kernels
(kernels/) are plain Python and are installed as the subpackage ptd_sparse.kernels.

Build against the torch you run with: `pip install --no-build-isolation .` (an isolated build fetches its own torch).
"""
import glob
import os

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


def extension():
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/autograd/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # The CPU kernels are written with portable vector types; -march lets the compiler use the widest vectors of the
    # building machine (AVX2/FMA, AVX-512). PTD_CPU_ARCH=x86-64-v2 (or any -march value) builds for other machines.
    arch = os.environ.get("PTD_CPU_ARCH", "native")
    cxx_flags = ["-O3", "-fopenmp", f"-march={arch}", f'-DPTD_TORCH_VERSION="{torch.__version__}"']
    # -fopenmp is needed in the extension itself: at::parallel_for expands to an OpenMP region in our own code.
    link_flags = ["-fopenmp"]
    sanitize = sanitizer_flags()  # last, so its -O1 wins over -O3
    cxx_flags, link_flags = cxx_flags + sanitize, link_flags + sanitize
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


setup(
    packages=find_packages(include=["ptd_sparse", "ptd_sparse.*"]) + ["ptd_sparse.kernels"],
    package_dir={"ptd_sparse.kernels": "kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
