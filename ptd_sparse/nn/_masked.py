"""What MaskedConv2d and MaskedLinear share: a bool `mask` buffer of the weight's shape and its upkeep."""
from __future__ import annotations

import torch
from torch import Tensor

from ptd_sparse import _format_checks


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

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Checked before anything is copied. copy_ would turn a float mask of 0.5s into True and cast any dtype
        # silently; a NaN weight poisons every output even where the mask is 0 (NaN * 0 is NaN).
        try:
            mask = state_dict.get(prefix + "mask")
            if mask is not None:
                check_mask(mask, tuple(self.weight.shape))
            for name in ("weight", "bias"):
                tensor = state_dict.get(prefix + name)
                if isinstance(tensor, Tensor) and tensor.is_floating_point():
                    _format_checks.check_finite(tensor.detach(), name)
        except (TypeError, ValueError) as error:
            raise type(error)(f"state dict of {type(self).__name__} {prefix.rstrip('.') or '(root)'}: {error}") \
                from None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @property
    def nnz(self) -> int:
        return int(self.mask.sum())

    @property
    def density(self) -> float:
        return self.nnz / self.mask.numel()


def check_mask(mask, shape: tuple[int, ...]) -> None:
    """A loaded mask: a tensor of the weight's shape, bool or holding only 0 and 1 (names the first other entry)."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected the weight's shape {shape}")
    if mask.dtype == torch.bool:
        return
    if mask.is_complex():
        raise TypeError(f"mask must be bool or real-valued 0/1, got dtype {mask.dtype}")
    bad = torch.nonzero(((mask != 0) & (mask != 1)).reshape(-1))
    if bad.numel():
        first = int(bad[0, 0])
        index = [int(i) for i in torch.unravel_index(torch.tensor(first), mask.shape)]
        raise ValueError(f"mask{index} = {mask.reshape(-1)[first].item()}; a mask must be bool or hold only 0 and 1")
