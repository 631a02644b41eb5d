"""The contract every backend of the KD loss shares: the reduction codes, the loss's shape and dtype, and the checks
of the values it is given. Defined here once; every Python module takes them from here.

The codes are what the operators receive (ptd_sparse/ops/, the C++ operators, the Triton kernels); csrc/kd_loss_checks.h
holds the same numbers for the C++ side, and the C++ kernels raise the same sentences (tests/test_kd_contract.py
checks both against this module). The value checks raise the messages every backend raises, so a user sees the same
error whichever backend ran.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ptd_sparse import debug_checks

REDUCTION_NONE, REDUCTION_SUM, REDUCTION_BATCHMEAN = 0, 1, 2
REDUCTIONS = {"none": REDUCTION_NONE, "sum": REDUCTION_SUM, "batchmean": REDUCTION_BATCHMEAN}


def reduction_code(reduction) -> int:
    """The operators' code of a reduction name ("none", "sum" or "batchmean")."""
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")
    return REDUCTIONS[reduction]


def loss_like(student_logits: Tensor, reduction: int) -> Tensor:
    """An empty loss of the shape and dtype every backend returns: [N] for REDUCTION_NONE, else []; float32, float64
    for float64 students."""
    torch._check(student_logits.dim() == 2, lambda: "student_logits must be 2-D")
    shape = (student_logits.shape[0],) if reduction == REDUCTION_NONE else ()
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    return student_logits.new_empty(shape, dtype=dtype)


def bad_rows(logits: Tensor) -> Tensor:
    """Mask of the rows holding NaN or +inf or having no finite entry."""
    return torch.isnan(logits).any(1) | torch.isposinf(logits).any(1) | (logits == float("-inf")).all(1)


def bad_logits_message(name: str, row: int) -> str:
    return (f"kd_loss: {name} row {row} holds NaN or +inf, or has no finite entry; "
            "logits must be finite or -inf")


def bad_target_message(value: int, row: int, classes: int, ignore_index: int) -> str:
    return (f"kd_loss: target has value {value} at row {row}; expected a class index in [0, {classes}) or "
            f"ignore_index = {ignore_index}")


def check_logits(logits: Tensor, name: str) -> None:
    """Logits [N, C] must be finite or -inf, with a finite entry in every row."""
    rows = torch.nonzero(bad_rows(logits)).reshape(-1)
    if rows.numel():
        raise ValueError(bad_logits_message(name, int(rows[0])))


def check_target(target: Tensor, classes: int, ignore_index: int) -> Tensor:
    """Mask of the rows that count; raises on a label outside [0, classes) that is not ignore_index."""
    valid = target != ignore_index
    out_of_range = valid & ((target < 0) | (target >= classes))
    rows = torch.nonzero(out_of_range).reshape(-1)
    if rows.numel():
        row = int(rows[0])
        raise ValueError(bad_target_message(int(target[row]), row, classes, ignore_index))
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
    bad = bad_rows(logits) | out_of_range | repeated | bad_rest
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
