"""What machine a benchmark ran on, printed beside its table: the CPU's model and the vector extensions that matter
for the kernels (their figures differ by instruction set: runtime dispatch picks AVX2 or AVX-512 copies)."""
from __future__ import annotations

from pathlib import Path


def cpu_vector_extensions() -> str:
    """The CPU's model and its SIMD extensions that matter for these kernels (from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "amx_tile")
    return f"{model}; " + (" ".join(f for f in wanted if f in flags) or "no AVX2")
