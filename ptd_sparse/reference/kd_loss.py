"""Reference KD loss: the formula written with PyTorch's softmax functions, loss and gradient computed explicitly.

Accumulates in float32 (float64 for float64 students), like the fused kernels, and raises the same errors.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ptd_sparse import debug_checks

REDUCTIONS = {"none": 0, "sum": 1, "batchmean": 2}


def bad_rows(logits: Tensor) -> Tensor:
    """Mask of the rows holding NaN or +inf or having no finite entry."""
    return torch.isnan(logits).any(1) | torch.isposinf(logits).any(1) | (logits == float("-inf")).all(1)


def first_bad_row(logits: Tensor) -> int | None:
    """First row holding NaN or +inf or having no finite entry, else None."""
    rows = torch.nonzero(bad_rows(logits)).reshape(-1)
    return int(rows[0]) if rows.numel() else None


def check_logits(logits: Tensor, name: str) -> None:
    row = first_bad_row(logits)
    if row is not None:
        raise ValueError(f"kd_loss: {name} row {row} holds NaN or +inf, or has no finite entry; "
                         "logits must be finite or -inf")


def check_target(target: Tensor, classes: int, ignore_index: int) -> Tensor:
    """Mask of the rows that count; raises on a label outside [0, classes) that is not ignore_index."""
    valid = target != ignore_index
    out_of_range = valid & ((target < 0) | (target >= classes))
    rows = torch.nonzero(out_of_range).reshape(-1)
    if rows.numel():
        row = int(rows[0])
        raise ValueError(f"kd_loss: target has value {int(target[row])} at row {row}; expected a class index in "
                         f"[0, {classes}) or ignore_index = {ignore_index}")
    return valid


def check_topk_teacher(indices: Tensor, logits: Tensor, rest_mass: Tensor, classes: int) -> None:
    """The top-k teacher's own contract (ptd_sparse.TopKTeacher): k distinct class indices in range per row, logits
    finite or -inf with a finite entry per row, and a rest mass in [0, 1) that is 0 when k covers every class.

    Runs on every call of every backend, so the checks are row masks on the teacher's device. On the CPU (and on any
    device under PTD_DEBUG_CHECKS=1) one host read says whether any failed, and only then are the offending row and
    value looked up for the ValueError; on a GPU they end in a device-side assert instead, without a synchronisation
    (ptd_sparse.debug_checks)."""
    out_of_range = ((indices < 0) | (indices >= classes)).any(1)
    ordered = indices.sort(dim=1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(1)
    bad_rest = ~((rest_mass >= 0) & (rest_mass < 1))
    if indices.shape[1] == classes:
        bad_rest |= rest_mass != 0
    bad_logits = bad_rows(logits)
    bad = bad_logits | out_of_range | repeated | bad_rest
    if not debug_checks.synchronous(indices):
        debug_checks.assert_none(bad, "kd_loss: the top-k teacher has NaN or +inf logits, an index out of range, a "
                                      "class listed twice in a row, or a rest mass outside [0, 1)")
        return
    if not bool(bad.any()):
        return
    check_logits(logits, "teacher.logits")
    if bool(out_of_range.any()):
        low, high = int(indices.min()), int(indices.max())
        raise ValueError(f"kd_loss: teacher.indices holds {low if low < 0 else high}; expected class indices in "
                         f"[0, {classes})")
    if bool(repeated.any()):
        raise ValueError(f"kd_loss: teacher.indices row {int(repeated.nonzero()[0, 0])} lists a class twice; the k "
                         "classes of a row must be distinct")
    row = int(bad_rest.nonzero()[0, 0])
    raise ValueError(f"kd_loss: teacher.rest_mass is {float(rest_mass[row])} at row {row}; expected a probability "
                     f"in [0, 1), and 0 when k equals the number of classes ({classes})")


def topk_teacher_probabilities(indices: Tensor, logits: Tensor, rest_mass: Tensor, classes: int,
                               temperature: float, dtype: torch.dtype) -> Tensor:
    """The dense teacher distribution a top-k teacher stands for: (1 - rest) * softmax(logits / T) on the listed
    classes, rest / (C - k) on every other class."""
    rows, k = logits.shape
    rest = rest_mass.to(dtype)
    spread = rest / (classes - k) if classes > k else torch.zeros_like(rest)
    probs = spread[:, None].expand(rows, classes).clone()
    listed = (1 - rest)[:, None] * torch.softmax(logits.to(dtype) / temperature, dim=1)
    return probs.scatter(1, indices.long(), listed)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None, temperature: float, alpha: float,
            reduction: int, ignore_index: int, compute_grad: bool) -> tuple[Tensor, Tensor]:
    """(loss, grad of the reduced loss w.r.t. student_logits, or an empty tensor when compute_grad is False)."""
    acc_dtype = _accumulation_dtype(student_logits)
    check_logits(student_logits, "student_logits")
    check_logits(teacher_logits, "teacher_logits")
    log_p_teacher = torch.log_softmax(teacher_logits.to(acc_dtype) / float(temperature), dim=1)
    return _loss_and_grad(student_logits, log_p_teacher.exp(), log_p_teacher, target, temperature, alpha, reduction,
                          ignore_index, compute_grad)


def kd_loss_topk(student_logits: Tensor, teacher_indices: Tensor, teacher_logits: Tensor, teacher_rest_mass: Tensor,
                 target: Tensor | None, temperature: float, alpha: float, reduction: int, ignore_index: int,
                 compute_grad: bool) -> tuple[Tensor, Tensor]:
    """kd_loss with the teacher given as its top-k classes (ptd_sparse.TopKTeacher); same outputs. The teacher's
    values were checked by the operator (check_topk_teacher), once for every backend."""
    acc_dtype = _accumulation_dtype(student_logits)
    classes = student_logits.shape[1]
    check_logits(student_logits, "student_logits")
    p_teacher = topk_teacher_probabilities(teacher_indices, teacher_logits, teacher_rest_mass, classes,
                                           float(temperature), acc_dtype)
    return _loss_and_grad(student_logits, p_teacher, p_teacher.log(), target, temperature, alpha, reduction,
                          ignore_index, compute_grad)


def _accumulation_dtype(student_logits: Tensor) -> torch.dtype:
    return torch.float64 if student_logits.dtype == torch.float64 else torch.float32


def _loss_and_grad(student_logits: Tensor, p_teacher: Tensor, log_p_teacher: Tensor, target: Tensor | None,
                   temperature: float, alpha: float, reduction: int, ignore_index: int,
                   compute_grad: bool) -> tuple[Tensor, Tensor]:
    """The loss and its gradient for a dense teacher distribution p_teacher (and its log) at temperature T."""
    acc_dtype = p_teacher.dtype
    s = student_logits.to(acc_dtype)
    rows, classes = s.shape
    valid = torch.ones(rows, dtype=torch.bool, device=s.device)
    if target is not None:
        valid = check_target(target, classes, ignore_index)
    counted = int(valid.sum())
    scale = 1.0 / max(counted, 1) if reduction == REDUCTIONS["batchmean"] else 1.0

    T = float(temperature)
    log_p_student = torch.log_softmax(s / T, dim=1)
    row_loss = torch.zeros(rows, dtype=acc_dtype, device=s.device)
    grad = torch.zeros_like(s)
    if alpha != 0:
        # 0 * log 0 = 0: classes the teacher rules out (-inf) contribute nothing.
        kl_terms = torch.where(p_teacher > 0, p_teacher * (log_p_teacher - log_p_student), torch.zeros_like(s))
        row_loss += alpha * T * T * kl_terms.sum(1)
        grad += alpha * T * (log_p_student.exp() - p_teacher)
    if target is not None and alpha != 1:
        log_p_hard = torch.log_softmax(s, dim=1)
        labels = torch.where(valid, target.long(), torch.zeros_like(target, dtype=torch.long))
        row_loss += (1 - alpha) * -log_p_hard.gather(1, labels[:, None])[:, 0]
        one_hot = torch.nn.functional.one_hot(labels, classes).to(acc_dtype)
        grad += (1 - alpha) * (log_p_hard.exp() - one_hot)
    row_loss = torch.where(valid, row_loss, torch.zeros_like(row_loss))
    grad = torch.where(valid[:, None], grad * scale, torch.zeros_like(grad))

    if reduction == REDUCTIONS["none"]:
        loss = row_loss
    else:
        loss = row_loss.sum() * (scale if reduction == REDUCTIONS["batchmean"] else 1.0)
    if not compute_grad:
        return loss, student_logits.new_empty(0)
    return loss, grad.to(student_logits.dtype)
