"""KDLoss: the fused knowledge-distillation loss as a module (see ptd_sparse.kd_loss for the exact definition)."""
from __future__ import annotations

from torch import Tensor, nn

from ptd_sparse import _validation as check
from ptd_sparse._kd_contract import REDUCTIONS
from ptd_sparse.functional import DEFAULT_ALPHA, DEFAULT_TEMPERATURE, kd_loss


class KDLoss(nn.Module):
    """loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, target).

    forward(student_logits [N, C], teacher_logits [N, C], target [N] or None) -> loss.
    """

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE, alpha: float = DEFAULT_ALPHA,
                 reduction: str = "batchmean", ignore_index: int = -100, backend: str | None = None):
        super().__init__()
        self.temperature = check.temperature(temperature)
        self.alpha = check.alpha(alpha)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.backend = backend

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None) -> Tensor:
        return kd_loss(student_logits, teacher_logits, target, temperature=self.temperature, alpha=self.alpha,
                       reduction=self.reduction, ignore_index=self.ignore_index, backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, reduction={self.reduction!r}"
