"""Whether a call is being traced or compiled: the inference modules (SparseConv2d, the max-pools) then take one
fixed, plain-PyTorch-or-operator path, so the traced, compiled or exported graph holds no timing-dependent choice."""
from __future__ import annotations

import torch


def tracing() -> bool:
    """Whether this call is being traced (torch.jit.trace) or compiled/exported (torch.compile, torch.export)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()
