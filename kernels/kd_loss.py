"""Triton kernel of the fused KD loss: loss and gradient with respect to the student logits in one kernel.

loss_row = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)   (0 for ignored rows)
grad_row = scale * (alpha * T * (softmax(s/T) - softmax(t/T)) + (1 - alpha) * (softmax(s) - onehot(y)))

A program owns BLOCK_R rows (several short rows, or one long row) and sweeps their classes twice, BLOCK_C at a time:
1. an online pass keeps, per row, the running maxima of s and t and, relative to them, the normalisers of
   softmax(s/T), softmax(s) and softmax(t/T) and the teacher-weighted sum sum_c e_t * ((t - m_t) - (s - m_s)) / T
   that KL needs; all are rescaled when a maximum grows, so nothing is ever exponentiated above 0. The same pass
   flags NaN, +inf and rows with no finite entry (the host raises the reference's ValueError for the first one).
2. the gradient pass recomputes the three softmaxes from those statistics and writes the gradient once.
No [rows, classes] temporaries beyond the gradient itself. Accumulation in float32 (float64 for float64 students).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import INTERPRET, launch_context

REDUCTION_NONE, REDUCTION_SUM, REDUCTION_BATCHMEAN = 0, 1, 2
# Flags written per row: which input made the row invalid.
BAD_STUDENT, BAD_TEACHER, BAD_TARGET = 1, 2, 4
# Rows of at most this many classes are processed several to a program (one [BLOCK_R, BLOCK_C] tile).
SHORT_ROW = 1024 if INTERPRET else 2048
# Elements of one tile for short rows: on a GPU enough to keep 4-8 warps busy; under the interpreter large, since
# every program is a Python loop and fewer programs are much faster.
TILE = 1 << 16 if INTERPRET else 4096


@triton.jit
def _kd_loss_kernel(
    s_ptr,  # [rows, C] student logits, unit stride along classes
    t_ptr,  # [rows, C] teacher logits, unit stride along classes
    target_ptr,  # [rows] integer labels (unused without target)
    scale_ptr,  # [1] ACC: gradient scale (1 / counted rows for batchmean, else 1)
    loss_ptr,  # [rows] ACC: loss of each row (0 for ignored rows)
    grad_ptr,  # [rows, C] contiguous, student dtype (unused without WRITE_GRAD)
    flags_ptr,  # int32 [rows]: BAD_STUDENT | BAD_TEACHER | BAD_TARGET
    rows, C, s_row_stride, t_row_stride, inv_T, T, alpha, ignore_index,
    HAS_TARGET: tl.constexpr, KL_TERM: tl.constexpr, CE_TERM: tl.constexpr, WRITE_GRAD: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rows
    r64 = r.to(tl.int64)
    s_rows = s_ptr + r64 * s_row_stride
    t_rows = t_ptr + r64 * t_row_stride
    neg_inf = float("-inf")
    m_s = tl.full([BLOCK_R], neg_inf, ACC)
    m_t = tl.full([BLOCK_R], neg_inf, ACC)
    z_s_T = tl.zeros([BLOCK_R], ACC)  # sum exp((s - m_s) / T)
    z_s_1 = tl.zeros([BLOCK_R], ACC)  # sum exp(s - m_s)
    z_t = tl.zeros([BLOCK_R], ACC)  # sum exp((t - m_t) / T)
    cross = tl.zeros([BLOCK_R], ACC)  # sum exp((t - m_t) / T) * ((t - m_t) - (s - m_s)) / T
    bad_s = tl.zeros([BLOCK_R], tl.int32)
    bad_t = tl.zeros([BLOCK_R], tl.int32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        ok = r_ok[:, None] & (c < C)[None, :]
        s = tl.load(s_rows[:, None] + c[None, :], mask=ok, other=neg_inf).to(ACC)
        t = tl.load(t_rows[:, None] + c[None, :], mask=ok, other=neg_inf).to(ACC)
        bad_s = tl.maximum(bad_s, tl.max(((s != s) | (s == float("inf"))).to(tl.int32), axis=1))
        bad_t = tl.maximum(bad_t, tl.max(((t != t) | (t == float("inf"))).to(tl.int32), axis=1))
        new_m_s = tl.maximum(m_s, tl.max(s, axis=1))
        new_m_t = tl.maximum(m_t, tl.max(t, axis=1))
        # Shifts that stay finite while a row has seen only -inf (its sums are then 0 and stay 0).
        shift_s = tl.where(new_m_s == neg_inf, 0.0, new_m_s)
        shift_t = tl.where(new_m_t == neg_inf, 0.0, new_m_t)
        seen_s = m_s != neg_inf
        seen_t = m_t != neg_inf
        grow_s = tl.where(seen_s, m_s - shift_s, 0.0)  # <= 0: how far the running maximum moved
        grow_t = tl.where(seen_t, m_t - shift_t, 0.0)
        e_t = tl.exp((t - shift_t[:, None]) * inv_T)
        if KL_TERM:
            e_s_T = tl.exp((s - shift_s[:, None]) * inv_T)
            z_s_T = tl.where(seen_s, z_s_T * tl.exp(grow_s * inv_T), 0.0) + tl.sum(e_s_T, axis=1)
            # Terms are relative to the maxima: moving them adds (grow_t - grow_s) / T to every earlier term.
            cross = tl.where(seen_t, (cross + z_t * (grow_t - grow_s) * inv_T) * tl.exp(grow_t * inv_T), 0.0)
            term = e_t * ((t - shift_t[:, None]) - (s - shift_s[:, None])) * inv_T
            cross += tl.sum(tl.where(t == neg_inf, 0.0, term), axis=1)
        if CE_TERM:
            z_s_1 = tl.where(seen_s, z_s_1 * tl.exp(grow_s), 0.0) + tl.sum(tl.exp(s - shift_s[:, None]), axis=1)
        z_t = tl.where(seen_t, z_t * tl.exp(grow_t * inv_T), 0.0) + tl.sum(e_t, axis=1)
        m_s = new_m_s
        m_t = new_m_t
    bad_s = tl.maximum(bad_s, (m_s == neg_inf).to(tl.int32))
    bad_t = tl.maximum(bad_t, (m_t == neg_inf).to(tl.int32))
    flags = bad_s * 1 + bad_t * 2  # BAD_STUDENT, BAD_TEACHER
    valid = r_ok
    label = tl.zeros([BLOCK_R], tl.int64)
    if HAS_TARGET:
        label = tl.load(target_ptr + r, mask=r_ok, other=0).to(tl.int64)
        valid = r_ok & (label != ignore_index)
        out_of_range = valid & ((label < 0) | (label >= C))
        flags += out_of_range.to(tl.int32) * 4  # BAD_TARGET
        label = tl.where(out_of_range | (label == ignore_index), 0, label)
    loss = tl.zeros([BLOCK_R], ACC)
    if KL_TERM:
        loss += alpha * T * T * (cross / z_t - tl.log(z_t) + tl.log(z_s_T))
    if CE_TERM:
        s_label = tl.load(s_rows + label, mask=valid, other=0).to(ACC)
        loss += (1 - alpha) * (tl.log(z_s_1) - (s_label - m_s))
    tl.store(loss_ptr + r, tl.where(valid, loss, 0.0), mask=r_ok)
    tl.store(flags_ptr + r, flags, mask=r_ok)

    if WRITE_GRAD:
        coef = tl.where(valid, tl.load(scale_ptr).to(ACC), 0.0)
        shift_s = tl.where(m_s == neg_inf, 0.0, m_s)
        shift_t = tl.where(m_t == neg_inf, 0.0, m_t)
        kl_s = coef * alpha * T / z_s_T  # factors of softmax(s/T), softmax(t/T) and softmax(s) in the gradient
        kl_t = coef * alpha * T / z_t
        ce_s = coef * (1 - alpha) / z_s_1
        g_rows = grad_ptr + r64 * C
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            ok = r_ok[:, None] & (c < C)[None, :]
            s = tl.load(s_rows[:, None] + c[None, :], mask=ok, other=neg_inf).to(ACC)
            g = tl.zeros([BLOCK_R, BLOCK_C], ACC)
            if KL_TERM:
                t = tl.load(t_rows[:, None] + c[None, :], mask=ok, other=neg_inf).to(ACC)
                g += kl_s[:, None] * tl.exp((s - shift_s[:, None]) * inv_T)
                g -= kl_t[:, None] * tl.exp((t - shift_t[:, None]) * inv_T)
            if CE_TERM:
                g += ce_s[:, None] * tl.exp(s - shift_s[:, None])
                g -= tl.where(c[None, :] == label[:, None], (coef * (1 - alpha))[:, None], 0.0)
            tl.store(g_rows[:, None] + c[None, :], g.to(grad_ptr.dtype.element_ty), mask=ok)


LONG_ROW_CONFIGS = ([triton.Config({"BLOCK_C": 1024}, num_warps=4)] if INTERPRET else
                    [triton.Config({"BLOCK_C": block}, num_warps=warps)
                     for block, warps in ((2048, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16))])
_kd_loss_long_rows = triton.autotune(configs=LONG_ROW_CONFIGS, key=["C", "HAS_TARGET", "KL_TERM", "CE_TERM",
                                                                    "WRITE_GRAD"])(_kd_loss_kernel)


def _raise_for_flags(flags: Tensor, student: Tensor, teacher: Tensor, target: Tensor | None, ignore_index: int):
    """The reference's errors, in its order: student rows first, then teacher rows, then labels."""
    for bit, name in ((BAD_STUDENT, "student_logits"), (BAD_TEACHER, "teacher_logits")):
        rows = torch.nonzero(flags & bit).reshape(-1)
        if rows.numel():
            raise ValueError(f"kd_loss: {name} row {int(rows[0])} holds NaN or +inf, or has no finite entry; "
                             "logits must be finite or -inf")
    rows = torch.nonzero(flags & BAD_TARGET).reshape(-1)
    if rows.numel():
        row = int(rows[0])
        raise ValueError(f"kd_loss: target has value {int(target[row])} at row {row}; expected a class index in "
                         f"[0, {student.shape[1]}) or ignore_index = {ignore_index}")


def _unit_class_stride(logits: Tensor) -> Tensor:
    return logits if logits.stride(1) == 1 else logits.contiguous()


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None, temperature: float, alpha: float,
            reduction: int, ignore_index: int, compute_grad: bool) -> tuple[Tensor, Tensor]:
    """student_logits, teacher_logits [N, C]; target [N] or None -> (loss [] or [N] float32 (float64 for float64
    students), grad_student [N, C] in the student's dtype or an empty tensor when compute_grad is False)."""
    rows, classes = student_logits.shape
    acc_dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    device = student_logits.device
    grad = torch.empty((rows, classes) if compute_grad else (0,), dtype=student_logits.dtype, device=device)
    if rows == 0:
        loss = torch.zeros((0,) if reduction == REDUCTION_NONE else (), dtype=acc_dtype, device=device)
        return loss, grad
    s = _unit_class_stride(student_logits)
    t = _unit_class_stride(teacher_logits)
    has_target = target is not None
    if has_target:
        target = target.contiguous()
        counted = (target != ignore_index).sum()
    else:
        counted = torch.tensor(rows, device=device)
    if reduction == REDUCTION_BATCHMEAN:
        scale = 1.0 / counted.clamp(min=1).to(acc_dtype).reshape(1)
    else:
        scale = torch.ones(1, dtype=acc_dtype, device=device)
    row_loss = torch.empty(rows, dtype=acc_dtype, device=device)
    flags = torch.empty(rows, dtype=torch.int32, device=device)
    T = float(temperature)
    args = (s, t, target if has_target else flags, scale, row_loss, grad if compute_grad else row_loss, flags,
            rows, classes, s.stride(0), t.stride(0), 1.0 / T, T, float(alpha), int(ignore_index))
    options = dict(HAS_TARGET=has_target, KL_TERM=alpha != 0, CE_TERM=has_target and alpha != 1,
                   WRITE_GRAD=bool(compute_grad), ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32)
    with launch_context(device):
        if classes <= SHORT_ROW:
            block_c = triton.next_power_of_2(classes)
            block_r = max(1, min(TILE // block_c, triton.next_power_of_2(rows)))
            _kd_loss_kernel[(triton.cdiv(rows, block_r),)](*args, **options, BLOCK_R=block_r, BLOCK_C=block_c,
                                                           num_warps=4)
        else:
            _kd_loss_long_rows[(rows,)](*args, **options, BLOCK_R=1)
    # One host synchronisation: errors must be raised by the call that saw them.
    if bool(flags.any()):
        _raise_for_flags(flags, s, t, target, ignore_index)
    if reduction == REDUCTION_NONE:
        loss = row_loss
    elif reduction == REDUCTION_SUM:
        loss = row_loss.sum()
    else:
        loss = row_loss.sum() * scale[0]
    return loss, grad
