"""MaskedConv2d: a drop-in nn.Conv2d whose weight is multiplied by a `mask` buffer, run by the sparse kernels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptd_sparse.functional import masked_conv2d
from ptd_sparse.nn._masked import MaskedWeight


class MaskedConv2d(MaskedWeight, nn.Conv2d):
    """nn.Conv2d computing conv2d(input, weight * mask, bias). `mask` is a bool buffer of the weight's shape (all
    True at construction), saved in the state dict. The mask is compressed once per change (set_mask, in-place edits,
    load_state_dict) and reused by every call. Grouped and depthwise convolutions (groups > 1) run the same sparse
    kernels (the pattern indexes the full input-channel space, ptd_sparse.pattern).
    `backend` fixes the backend for this module (None: automatic, see ptd_sparse.backends)."""

    def __init__(self, *args, backend: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._register_mask()
        self.backend = backend

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, mask: Tensor | None = None, backend: str | None = None) -> "MaskedConv2d":
        """A MaskedConv2d with the configuration, weight and bias of `conv` (shared, not copied) and `mask`."""
        masked = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     conv.groups, conv.bias is not None, conv.padding_mode, device="meta", backend=backend)
        masked.weight = conv.weight
        masked.bias = conv.bias
        masked.mask = torch.ones(conv.weight.shape, dtype=torch.bool, device=conv.weight.device)
        if mask is not None:
            masked.set_mask(mask)
        return masked

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros" or isinstance(padding, str):
            # Explicit padding (non-zero modes, 'same'), as nn.Conv2d does, then an unpadded convolution.
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        return masked_conv2d(input, weight, self.mask, bias, self.stride, padding, self.dilation, self.groups,
                             backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", density={self.density:.4f}"
