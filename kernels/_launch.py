"""What every launch wrapper of the Triton kernels shares: the interpreter switch and the launch context."""
from __future__ import annotations

import os

import numpy
import torch

# TRITON_INTERPRET=1 runs the kernels on CPU tensors with numpy (tests); it is read once, as Triton itself does.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def launch_context(device: torch.device):
    """The device guard on a GPU (kernels launch on the current device). Under the interpreter, numpy's warnings are
    silenced: lanes past the end of a row or block are padded (with -inf in the loss) and compute values that the
    kernels mask off, exactly as on a GPU, where nothing warns."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return numpy.errstate(all="ignore")
