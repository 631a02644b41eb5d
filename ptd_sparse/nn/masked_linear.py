"""MaskedLinear: nn.Linear computing F.linear(input, weight * mask, bias). Classifier layers are pruned with the
convolutions (global pruning counts them); they are small, so they run on the dense masked path."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ptd_sparse.nn._masked import MaskedWeight


class MaskedLinear(MaskedWeight, nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._register_mask()

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.weight * self.mask, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", density={self.density:.4f}"
