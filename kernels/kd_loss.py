"""Triton kernel of the fused KD loss: loss and gradient with respect to the student logits in one kernel.

loss_row = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)   (0 for ignored rows)
grad_row = scale * (alpha * T * (softmax(s/T) - softmax(t/T)) + (1 - alpha) * (softmax(s) - onehot(y)))

A program owns BLOCK_R rows (several short rows, or one long row) and sweeps their classes twice, BLOCK_C at a time:
1. an online pass keeps, per row, the running maxima of s and t and, relative to them, the normalisers of
   softmax(s/T), softmax(s) and softmax(t/T) and the teacher-weighted sum sum_c e_t * ((t - m_t) - (s - m_s)) / T
   that KL needs; all are rescaled when a maximum grows, so nothing is ever exponentiated above 0. The same pass
   flags NaN, +inf and rows with no finite entry (on the CPU and under PTD_DEBUG_CHECKS=1 the host raises the
   shared contract's ValueError for the first one; on a GPU a device-side assert reports them without a
   synchronisation).
2. the gradient pass recomputes the three softmaxes from those statistics and writes the gradient once.
No [rows, classes] temporaries beyond the gradient itself. Accumulation in float32 (float64 for float64 students).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ptd_sparse import debug_checks
from ptd_sparse._kd_contract import (REDUCTION_BATCHMEAN, REDUCTION_NONE, REDUCTION_SUM, bad_logits_message,
                                     bad_target_message)

from ._launch import INTERPRET, configs, launch_context

# Flags written per row: which input made the row invalid.
BAD_STUDENT, BAD_TEACHER, BAD_TARGET = 1, 2, 4
# Rows of at most this many classes are processed several to a program (one [BLOCK_R, BLOCK_C] tile).
SHORT_ROW = 1024 if INTERPRET else 2048
# Elements of one tile for short rows, and rows per tile. On a GPU (sm_90 builds, 4 warps) larger tiles, or more
# than 4 rows in one, exceed 255 registers per thread and spill (checked with cuobjdump --dump-resource-usage);
# under the interpreter tiles are large, since every program is a Python loop and fewer programs are much faster.
TILE = 1 << 16 if INTERPRET else 2048
MAX_TILE_ROWS = 1 << 16 if INTERPRET else 4


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
            # A rescale that underflows to 0 drops the earlier terms (never inf * 0), and a class whose teacher
            # probability is 0 adds nothing even where the student is -inf.
            rescale_t = tl.exp(grow_t * inv_T)
            cross = tl.where(seen_t & (rescale_t > 0), (cross + z_t * (grow_t - grow_s) * inv_T) * rescale_t, 0.0)
            term = e_t * ((t - shift_t[:, None]) - (s - shift_s[:, None])) * inv_T
            cross += tl.sum(tl.where(e_t > 0, term, 0.0), axis=1)
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


@triton.jit
def _kd_loss_topk_kernel(
    s_ptr,  # [rows, C] student logits, unit stride along classes
    index_ptr,  # [rows, k] int32/int64: the teacher's listed classes, distinct per row
    l_ptr,  # [rows, k] the teacher's logits of those classes
    rest_ptr,  # float32 [rows]: the teacher's mass outside the listed classes
    target_ptr,  # [rows] integer labels (unused without target)
    scale_ptr,  # [1] ACC: gradient scale (1 / counted rows for batchmean, else 1)
    loss_ptr,  # [rows] ACC: loss of each row (0 for ignored rows)
    grad_ptr,  # [rows, C] contiguous, student dtype (unused without WRITE_GRAD)
    flags_ptr,  # int32 [rows]: BAD_STUDENT | BAD_TARGET (the teacher was checked by the operator)
    rows, C, K, s_row_stride, index_row_stride, index_col_stride, l_row_stride, l_col_stride,
    inv_unlisted, inv_T, T, alpha, ignore_index,
    HAS_TARGET: tl.constexpr, KL_TERM: tl.constexpr, CE_TERM: tl.constexpr, WRITE_GRAD: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The teacher is p_i = (1 - r) softmax(l / T)_i on its k listed classes and u = r / (C - k) on the others.
    With sum_c p_c = 1, KL = sum_c p_c log p_c - sum_c p_c (s_c - m_s) / T + log z_s_T, and
    sum_c p_c (s_c - m_s) = u * sum_c (s_c - m_s) + sum_listed (p_i - u)(s_i - m_s): one sweep over the student
    row, two short sweeps over the k listed classes, then the gradient sweep, in which every class first gets
    u as its teacher probability and the listed classes are then overwritten with their exact values."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rows
    r64 = r.to(tl.int64)
    s_rows = s_ptr + r64 * s_row_stride
    neg_inf = float("-inf")
    m_s = tl.full([BLOCK_R], neg_inf, ACC)
    z_s_T = tl.zeros([BLOCK_R], ACC)
    z_s_1 = tl.zeros([BLOCK_R], ACC)
    sum_s = tl.zeros([BLOCK_R], ACC)  # sum_c (s_c - m_s), for the classes the teacher does not list
    seen = tl.zeros([BLOCK_R], ACC)  # classes counted in sum_s so far
    bad_s = tl.zeros([BLOCK_R], tl.int32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        ok = r_ok[:, None] & (c < C)[None, :]
        s = tl.load(s_rows[:, None] + c[None, :], mask=ok, other=neg_inf).to(ACC)
        bad_s = tl.maximum(bad_s, tl.max(((s != s) | (s == float("inf"))).to(tl.int32), axis=1))
        new_m_s = tl.maximum(m_s, tl.max(s, axis=1))
        shift_s = tl.where(new_m_s == neg_inf, 0.0, new_m_s)
        was_seen = m_s != neg_inf
        grow_s = tl.where(was_seen, m_s - shift_s, 0.0)
        z_s_T = tl.where(was_seen, z_s_T * tl.exp(grow_s * inv_T), 0.0) + tl.sum(tl.exp((s - shift_s[:, None]) * inv_T),
                                                                              axis=1)
        if CE_TERM:
            z_s_1 = tl.where(was_seen, z_s_1 * tl.exp(grow_s), 0.0) + tl.sum(tl.exp(s - shift_s[:, None]), axis=1)
        sum_s = tl.where(was_seen, sum_s + seen * grow_s, 0.0) + tl.sum(tl.where(ok, s - shift_s[:, None], 0.0),
                                                                        axis=1)
        seen += tl.sum(ok.to(ACC), axis=1)
        m_s = new_m_s
    bad_s = tl.maximum(bad_s, (m_s == neg_inf).to(tl.int32))
    shift_s = tl.where(m_s == neg_inf, 0.0, m_s)
    rest = tl.load(rest_ptr + r, mask=r_ok, other=0).to(ACC)
    spread = rest * inv_unlisted  # u = r / (C - k): the probability of an unlisted class (0 when k = C)
    index_rows = index_ptr + r64 * index_row_stride
    l_rows = l_ptr + r64 * l_row_stride

    # The listed classes: softmax(l / T) by an online pass, then the teacher's entropy and cross terms.
    m_l = tl.full([BLOCK_R], neg_inf, ACC)
    z_l = tl.zeros([BLOCK_R], ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        ok = r_ok[:, None] & (k < K)[None, :]
        l = tl.load(l_rows[:, None] + k[None, :] * l_col_stride, mask=ok, other=neg_inf).to(ACC)
        new_m_l = tl.maximum(m_l, tl.max(l, axis=1))
        shift_l = tl.where(new_m_l == neg_inf, 0.0, new_m_l)
        z_l = tl.where(m_l != neg_inf, z_l * tl.exp((m_l - shift_l) * inv_T), 0.0) + tl.sum(
            tl.exp((l - shift_l[:, None]) * inv_T), axis=1)
        m_l = new_m_l
    shift_l = tl.where(m_l == neg_inf, 0.0, m_l)
    log_listed = tl.log(1 - rest) - tl.log(z_l)  # log p_i = log_listed + (l_i - m_l) / T
    if KL_TERM:
        entropy = tl.where(spread > 0, rest * tl.log(tl.where(spread > 0, spread, 1.0)), 0.0)
        cross = tl.where(spread > 0, spread * sum_s, 0.0)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            ok = r_ok[:, None] & (k < K)[None, :]
            l = tl.load(l_rows[:, None] + k[None, :] * l_col_stride, mask=ok, other=neg_inf).to(ACC)
            cls = tl.load(index_rows[:, None] + k[None, :] * index_col_stride, mask=ok, other=0).to(tl.int64)
            s = tl.load(s_rows[:, None] + cls, mask=ok, other=0).to(ACC)
            log_p = log_listed[:, None] + (l - shift_l[:, None]) * inv_T
            p = tl.exp(log_p)
            listed = ok & (l != neg_inf)
            entropy += tl.sum(tl.where(listed, p * log_p, 0.0), axis=1)
            cross += tl.sum(tl.where(ok, (p - spread[:, None]) * (s - shift_s[:, None]), 0.0), axis=1)
    flags = bad_s * 1  # BAD_STUDENT
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
        loss += alpha * T * T * (entropy - cross * inv_T + tl.log(z_s_T))
    if CE_TERM:
        s_label = tl.load(s_rows + label, mask=valid, other=0).to(ACC)
        loss += (1 - alpha) * (tl.log(z_s_1) - (s_label - m_s))
    tl.store(loss_ptr + r, tl.where(valid, loss, 0.0), mask=r_ok)
    tl.store(flags_ptr + r, flags, mask=r_ok)

    if WRITE_GRAD:
        coef = tl.where(valid, tl.load(scale_ptr).to(ACC), 0.0)
        kl_s = coef * alpha * T / z_s_T
        kl_u = coef * alpha * T * spread
        ce_s = coef * (1 - alpha) / z_s_1
        g_rows = grad_ptr + r64 * C
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            ok = r_ok[:, None] & (c < C)[None, :]
            s = tl.load(s_rows[:, None] + c[None, :], mask=ok, other=neg_inf).to(ACC)
            g = tl.zeros([BLOCK_R, BLOCK_C], ACC)
            if KL_TERM:
                g += kl_s[:, None] * tl.exp((s - shift_s[:, None]) * inv_T) - kl_u[:, None]
            if CE_TERM:
                g += ce_s[:, None] * tl.exp(s - shift_s[:, None])
                g -= tl.where(c[None, :] == label[:, None], (coef * (1 - alpha))[:, None], 0.0)
            tl.store(g_rows[:, None] + c[None, :], g.to(grad_ptr.dtype.element_ty), mask=ok)
        if KL_TERM:
            # Every thread's store above must land before the listed classes are overwritten.
            tl.debug_barrier()
            for k0 in range(0, K, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                ok = r_ok[:, None] & (k < K)[None, :]
                l = tl.load(l_rows[:, None] + k[None, :] * l_col_stride, mask=ok, other=neg_inf).to(ACC)
                cls = tl.load(index_rows[:, None] + k[None, :] * index_col_stride, mask=ok, other=0).to(tl.int64)
                s = tl.load(s_rows[:, None] + cls, mask=ok, other=neg_inf).to(ACC)
                p = tl.exp(log_listed[:, None] + (l - shift_l[:, None]) * inv_T)
                g = kl_s[:, None] * tl.exp((s - shift_s[:, None]) * inv_T) - (coef * alpha * T)[:, None] * p
                if CE_TERM:
                    g += ce_s[:, None] * tl.exp(s - shift_s[:, None])
                    g -= tl.where(cls == label[:, None], (coef * (1 - alpha))[:, None], 0.0)
                tl.store(g_rows[:, None] + cls, g.to(grad_ptr.dtype.element_ty), mask=ok)


# Rows longer than SHORT_ROW: one row per program, the class block tuned per class count.
LONG_ROW_CONFIGS = configs([dict(BLOCK_C=4096, num_warps=8), dict(BLOCK_C=2048, num_warps=4),
                            dict(BLOCK_C=8192, num_warps=8), dict(BLOCK_C=8192, num_warps=16)],
                           dict(BLOCK_C=1024))
_AUTOTUNE_KEY = ["C", "HAS_TARGET", "KL_TERM", "CE_TERM", "WRITE_GRAD"]
_kd_loss_long_rows = triton.autotune(configs=LONG_ROW_CONFIGS, key=_AUTOTUNE_KEY)(_kd_loss_kernel)
_kd_loss_topk_long_rows = triton.autotune(configs=LONG_ROW_CONFIGS, key=_AUTOTUNE_KEY + ["K"])(_kd_loss_topk_kernel)
# Listed classes of a top-k teacher handled per step.
MAX_BLOCK_K = 256


def _unit_class_stride(logits: Tensor) -> Tensor:
    return logits if logits.stride(1) == 1 else logits.contiguous()


class _Call:
    """The buffers and options both losses share: per-row losses and flags, the gradient, its scale."""

    def __init__(self, student_logits: Tensor, target: Tensor | None, alpha: float, reduction: int,
                 ignore_index: int, compute_grad: bool):
        self.rows, self.classes = student_logits.shape
        self.device = student_logits.device
        self.acc_dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
        self.reduction = reduction
        self.ignore_index = int(ignore_index)
        self.grad = torch.empty((self.rows, self.classes) if compute_grad else (0,), dtype=student_logits.dtype,
                                device=self.device)
        self.student = _unit_class_stride(student_logits)
        self.target = target.contiguous() if target is not None else None
        if reduction == REDUCTION_BATCHMEAN and target is not None:
            # A device tensor: counting the rows that are not ignored needs no host synchronisation.
            counted = (self.target != ignore_index).sum().to(self.acc_dtype)
            self.scale = (1.0 / counted.clamp(min=1)).reshape(1)
        else:
            value = 1.0 / self.rows if reduction == REDUCTION_BATCHMEAN and self.rows else 1.0
            self.scale = torch.full((1,), value, dtype=self.acc_dtype, device=self.device)
        self.row_loss = torch.empty(self.rows, dtype=self.acc_dtype, device=self.device)
        self.flags = torch.empty(self.rows, dtype=torch.int32, device=self.device)
        self.options = dict(HAS_TARGET=target is not None, KL_TERM=alpha != 0,
                            CE_TERM=target is not None and alpha != 1, WRITE_GRAD=bool(compute_grad),
                            ACC=tl.float64 if self.acc_dtype == torch.float64 else tl.float32)

    def empty_result(self) -> tuple[Tensor, Tensor]:
        shape = (0,) if self.reduction == REDUCTION_NONE else ()
        return torch.zeros(shape, dtype=self.acc_dtype, device=self.device), self.grad

    def outputs(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """target (or a placeholder), scale, row_loss, grad (or a placeholder), flags: the kernels' buffers."""
        target = self.target if self.target is not None else self.flags
        grad = self.grad if self.grad.numel() else self.row_loss
        return target, self.scale, self.row_loss, grad, self.flags

    def short_row_blocks(self, block_c: int) -> tuple[int, int]:
        """(BLOCK_R, grid size) for rows of at most SHORT_ROW classes held in one tile."""
        block_r = max(1, min(TILE // block_c, MAX_TILE_ROWS, triton.next_power_of_2(self.rows)))
        return block_r, triton.cdiv(self.rows, block_r)

    def finish(self, teacher: Tensor | None) -> tuple[Tensor, Tensor]:
        if debug_checks.synchronous(self.flags):
            # One host synchronisation (free on the CPU): an error is raised by the call that saw it.
            if bool(self.flags.any()):
                _raise_for_flags(self.flags, self.student, teacher, self.target, self.ignore_index)
        else:
            debug_checks.assert_none(self.flags != 0, "kd_loss: a row of student_logits or teacher_logits holds NaN "
                                                      "or +inf or has no finite entry, or a target is out of range")
        if self.reduction == REDUCTION_NONE:
            loss = self.row_loss
        elif self.reduction == REDUCTION_SUM:
            loss = self.row_loss.sum()
        else:
            loss = self.row_loss.sum() * self.scale[0]
        return loss, self.grad


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None, temperature: float, alpha: float,
            reduction: int, ignore_index: int, compute_grad: bool) -> tuple[Tensor, Tensor]:
    """student_logits, teacher_logits [N, C]; target [N] or None -> (loss [] or [N] float32 (float64 for float64
    students), grad_student [N, C] in the student's dtype or an empty tensor when compute_grad is False)."""
    call = _Call(student_logits, target, alpha, reduction, ignore_index, compute_grad)
    if call.rows == 0:
        return call.empty_result()
    s = call.student
    t = _unit_class_stride(teacher_logits)
    T = float(temperature)
    args = (s, t, *call.outputs(), call.rows, call.classes, s.stride(0), t.stride(0), 1.0 / T, T, float(alpha),
            call.ignore_index)
    with launch_context(call.device):
        if call.classes <= SHORT_ROW:
            block_c = triton.next_power_of_2(call.classes)
            block_r, programs = call.short_row_blocks(block_c)
            _kd_loss_kernel[(programs,)](*args, **call.options, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
        else:
            _kd_loss_long_rows[(call.rows,)](*args, **call.options, BLOCK_R=1)
    return call.finish(t)


def kd_loss_topk(student_logits: Tensor, teacher_indices: Tensor, teacher_logits: Tensor, teacher_rest_mass: Tensor,
                 target: Tensor | None, temperature: float, alpha: float, reduction: int, ignore_index: int,
                 compute_grad: bool) -> tuple[Tensor, Tensor]:
    """kd_loss with the teacher given as its top-k classes: teacher_indices [N, k] int32/int64 (distinct per row),
    teacher_logits [N, k], teacher_rest_mass [N] float32, all checked by the operator. Same outputs as kd_loss."""
    call = _Call(student_logits, target, alpha, reduction, ignore_index, compute_grad)
    if call.rows == 0:
        return call.empty_result()
    s = call.student
    k = teacher_indices.shape[1]
    rest = teacher_rest_mass.contiguous()
    T = float(temperature)
    args = (s, teacher_indices, teacher_logits, rest, *call.outputs(), call.rows, call.classes, k, s.stride(0),
            teacher_indices.stride(0), teacher_indices.stride(1), teacher_logits.stride(0), teacher_logits.stride(1),
            1.0 / (call.classes - k) if call.classes > k else 0.0, 1.0 / T, T, float(alpha), call.ignore_index)
    block_k = min(triton.next_power_of_2(k), MAX_BLOCK_K)
    with launch_context(call.device):
        if call.classes <= SHORT_ROW:
            block_c = triton.next_power_of_2(call.classes)
            block_r, programs = call.short_row_blocks(block_c)
            _kd_loss_topk_kernel[(programs,)](*args, **call.options, BLOCK_R=block_r, BLOCK_C=block_c,
                                              BLOCK_K=block_k, num_warps=4)
        else:
            _kd_loss_topk_long_rows[(call.rows,)](*args, **call.options, BLOCK_R=1, BLOCK_K=block_k)
    return call.finish(None)


def _raise_for_flags(flags: Tensor, student: Tensor, teacher: Tensor | None, target: Tensor | None,
                     ignore_index: int):
    """The errors of ptd_sparse._kd_contract, in the reference's order: student rows first, then teacher rows, then
    labels."""
    for bit, name in ((BAD_STUDENT, "student_logits"), (BAD_TEACHER, "teacher_logits")):
        rows = torch.nonzero(flags & bit).reshape(-1)
        if rows.numel():
            raise ValueError(bad_logits_message(name, int(rows[0])))
    rows = torch.nonzero(flags & BAD_TARGET).reshape(-1)
    if rows.numel():
        row = int(rows[0])
        raise ValueError(bad_target_message(int(target[row]), row, student.shape[1], ignore_index))
