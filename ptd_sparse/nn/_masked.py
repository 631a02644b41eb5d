"""What MaskedConv2d and MaskedLinear share: a bool `mask` buffer of the weight's shape and its upkeep."""
from __future__ import annotations

import torch
from torch import Tensor


class MaskedWeight:
    """Mixin for an nn module with `weight`; call _register_mask() in __init__."""

    def _register_mask(self) -> None:
        self.register_buffer("mask", torch.ones(self.weight.shape, dtype=torch.bool, device=self.weight.device))

    @torch.no_grad()
    def set_mask(self, mask: Tensor) -> None:
        """Replace the mask (any dtype; nonzero means keep) and zero the pruned weights."""
        if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(self.weight.shape):
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"mask must have the weight's shape {tuple(self.weight.shape)}, got {shape}")
        self.mask.copy_(mask != 0)
        self.weight.mul_(self.mask)

    @property
    def nnz(self) -> int:
        return int(self.mask.sum())

    @property
    def density(self) -> float:
        return self.nnz / self.mask.numel()
