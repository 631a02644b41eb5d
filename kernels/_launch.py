"""What every launch wrapper of the Triton kernels shares: the interpreter switch and the launch context."""
from __future__ import annotations

import os

import numpy
import torch
import triton

# TRITON_INTERPRET=1 runs the kernels on CPU tensors with numpy (tests); it is read once, as Triton itself does.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# PTD_TRITON_AUTOTUNE=0 skips autotuning on GPUs (each kernel runs its first, default configuration): test runs over
# many shapes then compile and benchmark one configuration instead of several per shape.
AUTOTUNE = os.environ.get("PTD_TRITON_AUTOTUNE", "1") != "0"


def configs(gpu: list[dict], interpreter: dict) -> list[triton.Config]:
    """Autotuning candidates: Hopper-oriented ones on a GPU, the first being the default; under the interpreter one
    large-block configuration, since there every program is a Python loop and fewer, larger programs are much faster
    (a single configuration is never benchmarked)."""
    if INTERPRET:
        return [triton.Config(interpreter, num_warps=4)]
    chosen = gpu if AUTOTUNE else gpu[:1]
    return [triton.Config({k: v for k, v in c.items() if k != "num_warps"}, num_warps=c["num_warps"])
            for c in chosen]


def tuning_bucket(*sizes: int) -> int:
    """One integer naming the power-of-two size class of each of `sizes`: the autotuners key on it, so shapes of the
    same class (the last, smaller batch of an epoch, say) reuse one tuning instead of benchmarking again."""
    bucket = 0
    for size in sizes:
        bucket = bucket * 64 + max(int(size), 1).bit_length()
    return bucket


def launch_context(device: torch.device):
    """The device guard on a GPU (kernels launch on the current device). Under the interpreter, numpy's warnings are
    silenced: lanes past the end of a row or block are padded (with -inf in the loss) and compute values that the
    kernels mask off, exactly as on a GPU, where nothing warns."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return numpy.errstate(all="ignore")
