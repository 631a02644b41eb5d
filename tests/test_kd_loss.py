"""Fused KD loss: every backend against a float64 eager oracle (log_softmax, softmax, KL, cross-entropy, autograd),
over temperatures, alphas, reductions, dtypes, ignored rows, extreme and -inf logits, and bad input. The cuda and
triton cases run on CUDA tensors where a GPU exists (conftest.device_for); the oracle always runs on the CPU."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (assert_close, device_backends, gradcheck_options, loss_kernels, moved_to, on_device,
                      opcheck_loss_route, runs_python_operator)

import ptd_sparse
from ptd_sparse.backends import KD_LOSS
from ptd_sparse.ops import kd_loss as kd_loss_ops
from ptd_sparse.ops.kd_loss import kd_loss as kd_loss_op
from ptd_sparse.ops.kd_loss import kd_loss_backward as kd_loss_backward_op

BACKENDS = device_backends(KD_LOSS)
CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = lambda d: str(d).split(".")[-1]  # noqa: E731


def oracle(student, teacher, target, temperature, alpha, reduction, ignore_index=-100):
    """(loss, grad wrt student) of the documented definition, in float64, by eager composition and autograd."""
    s = student.detach().double().requires_grad_()
    t = teacher.detach().double()
    T = temperature
    log_p_s = F.log_softmax(s / T, dim=1)
    log_p_t = F.log_softmax(t / T, dim=1)
    p_t = log_p_t.exp()
    kl = torch.where(p_t > 0, p_t * (log_p_t - log_p_s), torch.zeros_like(s)).sum(1)
    rows = alpha * T * T * kl
    valid = torch.ones(s.shape[0], dtype=torch.bool)
    if target is not None:
        valid = target != ignore_index
        ce = F.cross_entropy(s, target, ignore_index=ignore_index, reduction="none")
        rows = rows + (1 - alpha) * ce
    return reduced(s, rows, valid, reduction)


def reduced(s, rows, valid, reduction):
    """(loss, grad wrt s, the incoming gradient used) of per-row losses under a reduction, ignored rows zeroed."""
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.sum() / max(int(valid.sum()), 1)
    grad_out = torch.ones_like(loss) if reduction != "none" else torch.linspace(-1, 2, loss.numel(), dtype=loss.dtype)
    (grad,) = torch.autograd.grad(loss, s, grad_out) if s.shape[0] else (torch.zeros_like(s),)
    return loss.detach(), grad, grad_out


def check(backend, student, teacher, target, temperature, alpha, reduction, dtype_tol, ignore_index=-100,
          oracle_fn=None):
    """The backend on device_for(backend) (inputs already there keep their strides) against the oracle on the CPU."""
    student, teacher, target = on_device(backend, student.detach(), teacher, target)
    student.requires_grad_()
    loss = ptd_sparse.kd_loss(student, teacher, target, temperature=temperature, alpha=alpha, reduction=reduction,
                              ignore_index=ignore_index, backend=backend)
    want_loss, want_grad, grad_out = (oracle_fn or oracle)(*moved_to(CPU, student, teacher, target), temperature,
                                                           alpha, reduction, ignore_index)
    assert loss.dtype == (torch.float64 if student.dtype == torch.float64 else torch.float32)
    assert loss.shape == want_loss.shape and loss.device == student.device
    assert_close(loss.cpu(), want_loss, dtype_tol, "loss")
    if student.shape[0]:
        (grad,) = torch.autograd.grad(loss, student, grad_out.to(loss.dtype).to(loss.device))
        assert grad.dtype == student.dtype
        assert_close(grad.cpu(), want_grad, dtype_tol, "grad_student")


def logits(rows, classes, generator, scale=3.0, dtype=torch.float32):
    return (torch.randn(rows, classes, generator=generator) * scale).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 10.0])
def test_matches_oracle(backend, temperature, alpha, reduction, generator):
    s, t = logits(37, 13, generator), logits(37, 13, generator)
    target = torch.randint(0, 13, (37,), generator=generator)
    target[::5] = -100  # some ignored rows
    check(backend, s, t, target, temperature, alpha, reduction, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("student_dtype", DTYPES + [torch.float64], ids=DTYPE_IDS)
@pytest.mark.parametrize("teacher_dtype", DTYPES, ids=DTYPE_IDS)
def test_every_dtype_pair(backend, student_dtype, teacher_dtype, generator):
    s = logits(29, 100, generator, dtype=student_dtype)
    t = logits(29, 100, generator, dtype=teacher_dtype)
    target = torch.randint(0, 100, (29,), generator=generator)
    # The oracle sees the same rounded inputs, so the tolerance is that of the student's dtype (its gradient's).
    check(backend, s, t, target, 4.0, 0.5, "batchmean", student_dtype if student_dtype != torch.float64 else
          torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 10.0])
def test_extreme_logits(backend, temperature, generator):
    s = logits(16, 50, generator, scale=1e4)
    t = logits(16, 50, generator, scale=1e4)
    target = torch.randint(0, 50, (16,), generator=generator)
    check(backend, s, t, target, temperature, 0.5, "batchmean", torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_teacher_minus_inf_entries(backend, alpha, generator):
    s, t = logits(12, 20, generator), logits(12, 20, generator)
    t[:, 5:9] = float("-inf")
    t[3, :19] = float("-inf")  # a teacher that is certain
    target = torch.randint(0, 20, (12,), generator=generator)
    loss = ptd_sparse.kd_loss(*on_device(backend, s, t, target), temperature=4.0, alpha=alpha, backend=backend)
    assert math.isfinite(float(loss))
    check(backend, s, t, target, 4.0, alpha, "batchmean", torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_all_rows_ignored_gives_zero_loss_and_gradient(backend, reduction, generator):
    s, t = on_device(backend, logits(6, 10, generator), logits(6, 10, generator))
    s.requires_grad_()
    target = torch.full((6,), -1, dtype=torch.long, device=s.device)
    loss = ptd_sparse.kd_loss(s, t, target, ignore_index=-1, reduction=reduction, backend=backend)
    assert torch.equal(loss, torch.zeros_like(loss))
    loss.sum().backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows,classes", [(0, 10), (1, 1), (1, 7), (33, 3), (5, 1001)])
def test_odd_and_empty_shapes(backend, rows, classes, generator):
    target = torch.randint(0, classes, (rows,), generator=generator)
    check(backend, logits(rows, classes, generator), logits(rows, classes, generator), target, 2.0, 0.7,
          "batchmean", torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_target_none_is_the_weighted_distillation_term(backend, reduction, generator):
    s, t = logits(9, 11, generator), logits(9, 11, generator)
    check(backend, s, t, None, 4.0, 0.8, reduction, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_logits(backend, generator):
    s = on_device(backend, logits(20, 30, generator)).t()  # [30, 20] transposed view
    t = on_device(backend, logits(60, 20, generator))[::2]  # every other row
    assert not s.is_contiguous() and not t.is_contiguous()
    target = on_device(backend, torch.randint(0, 20, (60,), generator=generator))[::2]
    check(backend, s, t, target, 4.0, 0.5, "batchmean", torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_eager_composition(backend, generator):
    """The textbook eager loss (kl_div batchmean + cross_entropy) that users replace with kd_loss."""
    s, t, target = on_device(backend, logits(64, 100, generator), logits(64, 100, generator),
                             torch.randint(0, 100, (64,), generator=generator))
    s.requires_grad_()
    T, alpha = 4.0, 0.9
    eager = alpha * T * T * F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="batchmean",
                                     log_target=True) + (1 - alpha) * F.cross_entropy(s, target)
    fused = ptd_sparse.kd_loss(s, t, target, temperature=T, alpha=alpha, backend=backend)
    torch.testing.assert_close(fused, eager.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(fused, s)[0], torch.autograd.grad(eager, s)[0], atol=1e-6,
                               rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_gradcheck_float64(backend, reduction, generator):
    target = torch.randint(0, 9, (7,), generator=generator)
    target[2] = -100
    s, t, target = on_device(backend, logits(7, 9, generator, dtype=torch.float64),
                             logits(7, 9, generator, dtype=torch.float64), target)
    s.requires_grad_()

    def loss(s):
        return kd_loss_ops.ROUTES[backend].call(s, t, target, 3.0, 0.6, reduction, -100)

    assert torch.autograd.gradcheck(loss, (s,), **gradcheck_options(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, generator):
    for rows, reduction, with_target in ((8, 2, True), (0, 0, True), (5, 1, False)):
        target = torch.randint(0, 6, (rows,), generator=generator) if with_target else None
        s, t, target = on_device(backend, logits(rows, 6, generator), logits(rows, 6, generator), target)
        s.requires_grad_()
        opcheck_loss_route(kd_loss_ops.ROUTES, backend, s, (t,), target, 2.0, 0.5, reduction)
        if runs_python_operator(backend):
            loss, grad = kd_loss_op(s.detach(), t, target, 2.0, 0.5, reduction, -100, True, backend)
            torch.library.opcheck(kd_loss_backward_op, (torch.full_like(loss, 0.5), grad, reduction))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_twice_and_gradient_accumulation(backend, generator):
    """The saved gradient is handed out without a copy when the incoming gradient is 1; a second backward over the
    same graph and accumulation into .grad must still be right."""
    s, t, target = on_device(backend, logits(4, 5, generator), logits(4, 5, generator), torch.arange(4))
    s.requires_grad_()
    loss = ptd_sparse.kd_loss(s, t, target, backend=backend)
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    loss.backward(retain_graph=True)
    torch.testing.assert_close(s.grad, 2 * first)
    (scaled,) = torch.autograd.grad(loss * 3, s)
    torch.testing.assert_close(scaled, 3 * first)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_is_computed_without_requires_grad(backend, generator):
    s, t, target = on_device(backend, logits(4, 5, generator), logits(4, 5, generator), torch.arange(4))
    with torch.no_grad():
        loss = ptd_sparse.kd_loss(s, t, target, backend=backend)
    assert loss.shape == () and not loss.requires_grad


def test_kdloss_module_matches_function(generator):
    s, t = logits(10, 8, generator), logits(10, 8, generator)
    target = torch.randint(0, 8, (10,), generator=generator)
    module = ptd_sparse.nn.KDLoss(temperature=3.0, alpha=0.25, reduction="sum")
    torch.testing.assert_close(module(s, t, target),
                               ptd_sparse.kd_loss(s, t, target, temperature=3.0, alpha=0.25, reduction="sum"))
    assert "temperature=3.0" in repr(module)


# --- bad input: the error names the argument and what was expected -------------------------------------------------
# On CUDA tensors bad values end in a device-side assert unless PTD_DEBUG_CHECKS=1 (ptd_sparse.debug_checks), which
# these tests set so that every backend raises the same ValueError (tests/test_gpu.py checks the assert).

@pytest.fixture
def debug_checks(monkeypatch):
    monkeypatch.setenv("PTD_DEBUG_CHECKS", "1")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["student_logits", "teacher_logits"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "plus_inf"])
def test_nan_or_inf_logits_are_refused(backend, which, bad, generator, debug_checks):
    s, t = logits(5, 4, generator), logits(5, 4, generator)
    (s if which == "student_logits" else t)[3, 2] = bad
    with pytest.raises(ValueError, match=f"{which} row 3"):
        ptd_sparse.kd_loss(*on_device(backend, s, t, torch.arange(5) % 4), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_out_of_range_is_refused(backend, generator, debug_checks):
    target = torch.tensor([0, 1, 4, 2])
    with pytest.raises(ValueError, match="target has value 4 at row 2"):
        ptd_sparse.kd_loss(*on_device(backend, logits(4, 4, generator), logits(4, 4, generator), target),
                           backend=backend)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("reference", "cpu")])
def test_cpu_tensors_are_checked_without_the_debug_mode(backend, generator):
    """Reading a CPU tensor costs no synchronisation, so CPU users get the ValueError whatever PTD_DEBUG_CHECKS."""
    s = logits(5, 4, generator)
    s[1, 0] = float("nan")
    with pytest.raises(ValueError, match="student_logits row 1"):
        ptd_sparse.kd_loss(s, logits(5, 4, generator), torch.arange(5) % 4, backend=backend)
    teacher = ptd_sparse.topk_teacher(logits(5, 4, generator), 2, 2.0)
    repeated = teacher.indices.clone()
    repeated[3, 1] = repeated[3, 0]
    with pytest.raises(ValueError, match="teacher.indices row 3 lists a class twice"):
        ptd_sparse.kd_loss(logits(5, 4, generator), teacher._replace(indices=repeated), backend=backend)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(temperature=-2.0), "temperature must be a finite number > 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number > 0"),
    (dict(alpha=1.5), r"alpha must be a number in \[0, 1\]"),
    (dict(alpha=-0.1), r"alpha must be a number in \[0, 1\]"),
    (dict(reduction="mean"), "reduction must be one of"),
    (dict(backend="gpu"), "backend must be one of"),
])
def test_bad_arguments(kwargs, match, generator):
    with pytest.raises(ValueError, match=match):
        ptd_sparse.kd_loss(logits(3, 4, generator), logits(3, 4, generator), torch.arange(3), **kwargs)


def test_bad_tensors(generator):
    s, t = logits(3, 4, generator), logits(3, 4, generator)
    with pytest.raises(ValueError, match="teacher_logits has shape"):
        ptd_sparse.kd_loss(s, logits(3, 5, generator))
    with pytest.raises(ValueError, match="student_logits must be 2-D"):
        ptd_sparse.kd_loss(s[0], t[0])
    with pytest.raises(TypeError, match="student_logits must have dtype"):
        ptd_sparse.kd_loss(s.long(), t)
    with pytest.raises(TypeError, match="target must hold integer class indices"):
        ptd_sparse.kd_loss(s, t, torch.zeros(3))
    with pytest.raises(ValueError, match="target has 2 labels"):
        ptd_sparse.kd_loss(s, t, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="alpha=0 with target=None"):
        ptd_sparse.kd_loss(s, t, alpha=0.0)
    with pytest.raises(ValueError, match="student_logits has 0 classes"):
        ptd_sparse.kd_loss(s[:, :0], t[:, :0])
    with pytest.raises(ValueError, match="teacher_logits is on meta"):
        ptd_sparse.kd_loss(s, t.to("meta"))


# --- the teacher as its top-k classes (ptd_sparse.TopKTeacher) ------------------------------------------------------

def topk_oracle(student, teacher, target, temperature, alpha, reduction, ignore_index=-100):
    """(loss, grad) of the documented top-k contract in float64: the dense teacher distribution written out
    ((1 - r) softmax on the listed classes, r / (C - k) elsewhere), then KL and CE by autograd."""
    indices, t_logits, rest = teacher
    s = student.detach().double().requires_grad_()
    rows, classes = s.shape
    k = indices.shape[1]
    rest = torch.zeros(rows, dtype=torch.float64) if rest is None else rest.double()
    p = torch.empty(rows, classes, dtype=torch.float64)
    listed = (1 - rest)[:, None] * F.softmax(t_logits.double() / temperature, dim=1)
    for row in range(rows):
        p[row] = rest[row] / (classes - k) if classes > k else 0.0
        p[row, indices[row].long()] = listed[row]
    log_q = F.log_softmax(s / temperature, dim=1)
    kl = torch.where(p > 0, p * (p.log() - log_q), torch.zeros_like(s)).sum(1)
    per_row = alpha * temperature ** 2 * kl
    valid = torch.ones(rows, dtype=torch.bool)
    if target is not None:
        valid = target != ignore_index
        per_row = per_row + (1 - alpha) * F.cross_entropy(s, target, ignore_index=ignore_index, reduction="none")
    return reduced(s, per_row, valid, reduction)


def check_topk(backend, student, teacher, target, temperature, alpha, reduction, dtype_tol):
    check(backend, student, teacher, target, temperature, alpha, reduction, dtype_tol, oracle_fn=topk_oracle)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("k,with_rest", [(1, True), (5, True), (5, False), (13, True)])
def test_topk_matches_oracle(backend, k, with_rest, temperature, alpha, reduction, generator):
    s, t = logits(37, 13, generator), logits(37, 13, generator)
    target = torch.randint(0, 13, (37,), generator=generator)
    target[::5] = -100
    teacher = ptd_sparse.topk_teacher(t, k, temperature)
    if not with_rest:
        teacher = teacher._replace(rest_mass=None)
    check_topk(backend, s, teacher, target, temperature, alpha, reduction, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_of_every_class_is_the_dense_loss(backend, generator):
    s, t, target = on_device(backend, logits(21, 17, generator), logits(21, 17, generator),
                             torch.randint(0, 17, (21,), generator=generator))
    s.requires_grad_()
    dense = ptd_sparse.kd_loss(s, t, target, temperature=3.0, alpha=0.7, backend=backend)
    topk = ptd_sparse.kd_loss(s, ptd_sparse.topk_teacher(t, 17, 3.0), target, temperature=3.0, alpha=0.7,
                              backend=backend)
    torch.testing.assert_close(topk, dense)
    torch.testing.assert_close(torch.autograd.grad(topk, s)[0], torch.autograd.grad(dense, s)[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("student_dtype", DTYPES + [torch.float64], ids=DTYPE_IDS)
@pytest.mark.parametrize("teacher_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=DTYPE_IDS)
def test_topk_every_dtype(backend, student_dtype, teacher_dtype, index_dtype, generator):
    s = logits(19, 100, generator, dtype=student_dtype)
    teacher = ptd_sparse.topk_teacher(logits(19, 100, generator), 10, 4.0)
    teacher = teacher._replace(indices=teacher.indices.to(index_dtype), logits=teacher.logits.to(teacher_dtype))
    target = torch.randint(0, 100, (19,), generator=generator)
    check_topk(backend, s, teacher, target, 4.0, 0.9,
               "batchmean", student_dtype if student_dtype != torch.float64 else torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows,classes,k", [(0, 10, 3), (1, 1, 1), (6, 1001, 7)])
def test_topk_odd_and_empty_shapes(backend, rows, classes, k, generator):
    teacher = ptd_sparse.topk_teacher(logits(rows, classes, generator), k, 2.0)
    target = torch.randint(0, classes, (rows,), generator=generator)
    check_topk(backend, logits(rows, classes, generator), teacher, target, 2.0, 0.8, "batchmean", torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_non_contiguous_and_minus_inf(backend, generator):
    s = on_device(backend, logits(20, 30, generator)).t()  # [30, 20]
    full = on_device(backend, ptd_sparse.topk_teacher(logits(30, 20, generator), 6, 4.0))
    teacher = ptd_sparse.TopKTeacher(full.indices.t().contiguous().t(), full.logits.clone(), full.rest_mass)
    teacher.logits[4, 2:] = float("-inf")  # a teacher sure of fewer than k classes
    assert not s.is_contiguous() and not teacher.indices.is_contiguous()
    check_topk(backend, s, teacher, None, 4.0, 0.9, "none", torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_gradcheck_and_opcheck(backend, generator):
    target = torch.randint(0, 9, (7,), generator=generator)
    target[2] = -100
    s, teacher, target = on_device(backend, logits(7, 9, generator, dtype=torch.float64),
                                   ptd_sparse.topk_teacher(logits(7, 9, generator, dtype=torch.float64), 3, 3.0),
                                   target)
    s.requires_grad_()
    for reduction in (0, 1, 2):
        assert torch.autograd.gradcheck(
            lambda s: kd_loss_ops.TOPK_ROUTES[backend].call(s, *teacher, target, 3.0, 0.6, reduction, -100), (s,),
            **gradcheck_options(backend))
    for rows, reduction in ((8, 2), (0, 0)):
        s32, topk = on_device(backend, logits(rows, 6, generator),
                              ptd_sparse.topk_teacher(logits(rows, 6, generator), 2, 2.0))
        s32.requires_grad_()
        opcheck_loss_route(kd_loss_ops.TOPK_ROUTES, backend, s32, tuple(topk), None, 2.0, 0.5, reduction)


def test_topk_teacher_helper_rest_mass_is_exact(generator):
    t = logits(5, 40, generator, dtype=torch.float64)
    teacher = ptd_sparse.topk_teacher(t, 4, 3.0)
    p = F.softmax(t / 3.0, dim=1)
    torch.testing.assert_close(teacher.rest_mass.double(), 1 - p.topk(4, dim=1).values.sum(1), atol=1e-6, rtol=0)
    assert teacher.indices.dtype == torch.int32 and teacher.rest_mass.dtype == torch.float32
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 40\]"):
        ptd_sparse.topk_teacher(t, 41, 3.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_bad_teachers_are_refused(backend, generator, debug_checks):
    s = on_device(backend, logits(4, 6, generator))
    good = on_device(backend, ptd_sparse.topk_teacher(logits(4, 6, generator), 3, 2.0))

    def run(teacher):
        return ptd_sparse.kd_loss(s, teacher, temperature=2.0, backend=backend)

    repeated = good.indices.clone()
    repeated[2, 1] = repeated[2, 0]
    with pytest.raises(ValueError, match="teacher.indices row 2 lists a class twice"):
        run(good._replace(indices=repeated))
    with pytest.raises(ValueError, match=r"teacher.indices holds 6; expected class indices in \[0, 6\)"):
        run(good._replace(indices=good.indices.clone().index_fill_(1, torch.tensor([0], device=s.device), 6)))
    with pytest.raises(ValueError, match="teacher.rest_mass is 1.5 at row 0"):
        run(good._replace(rest_mass=torch.full((4,), 1.5, device=s.device)))
    with pytest.raises(ValueError, match="0 when k equals the number of classes"):
        run(on_device(backend, ptd_sparse.topk_teacher(logits(4, 6, generator), 6, 2.0))._replace(
            rest_mass=torch.full((4,), 0.1, device=s.device)))
    bad_logits = good.logits.clone()
    bad_logits[1, 0] = float("nan")
    with pytest.raises(ValueError, match="teacher.logits row 1 holds NaN"):
        run(good._replace(logits=bad_logits))
    with pytest.raises(TypeError, match="teacher.indices must have dtype int32 or int64"):
        run(good._replace(indices=good.indices.float()))
    with pytest.raises(ValueError, match="teacher.logits has shape"):
        run(good._replace(logits=good.logits[:, :2]))
    with pytest.raises(ValueError, match=r"teacher.indices has shape \(3, 3\)"):
        run(ptd_sparse.TopKTeacher(good.indices[:3], good.logits[:3], None))
    with pytest.raises(ValueError, match="teacher.rest_mass has shape"):
        run(good._replace(rest_mass=good.rest_mass[:2]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_minus_inf_gives_the_oracle_value_not_nan(backend, generator):
    """A student that rules out a class (-inf): +inf where the teacher has mass there, the finite value where the
    teacher's probability underflows to 0; never NaN (inf - inf, inf * 0)."""
    s = logits(3, 40, generator)
    s[0, 0] = float("-inf")
    t = logits(3, 40, generator)
    t[0, 0], t[0, 32] = -500.0, 500.0  # teacher probability of class 0 underflows at T = 1
    t[1, 5] = 50.0
    s[1, 5] = float("-inf")  # the teacher's favourite class, ruled out by the student
    dense = ptd_sparse.kd_loss(*on_device(backend, s, t), temperature=1.0, alpha=1.0, reduction="none",
                               backend=backend).cpu()
    want, _, _ = oracle(s, t, None, 1.0, 1.0, "none")
    assert not torch.isnan(dense).any()
    torch.testing.assert_close(dense.double(), want, rtol=2e-5, atol=2e-5)
    topk = ptd_sparse.topk_teacher(t, 4, 1.0)
    listed = ptd_sparse.kd_loss(*on_device(backend, s, topk), temperature=1.0, alpha=1.0, reduction="none",
                                backend=backend).cpu()
    want_topk, _, _ = topk_oracle(s, topk, None, 1.0, 1.0, "none")
    assert not torch.isnan(listed).any()
    torch.testing.assert_close(listed.double(), want_topk, rtol=2e-5, atol=2e-5)


# --- rounding: each gradient entry rounded to the student's dtype once, float64 exact -------------------------------

def confident_rows(dtype):
    """Student logits [8, 10] whose label (class 3) has softmax probability 1 - 9e^-m for margins m from 6 to 11:
    q close enough to 1 that the label's gradient (1 - alpha) scale (q - 1) lies far below the dtype's spacing at
    (1 - alpha) scale, where an entry rounded before its one-hot term is subtracted would land."""
    margins = torch.linspace(6.0, 11.0, 8)
    s = torch.zeros(8, 10)
    s[:, 3] = margins
    s[:, 5] = 0.25  # not every other class alike
    return s.to(dtype), torch.full((8,), 3, dtype=torch.long)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS)
@pytest.mark.parametrize("listed", [True, False], ids=["label_listed", "label_unlisted"])
def test_topk_label_gradient_near_probability_one_is_rounded_once(backend, dtype, listed):
    """Against the float64 oracle (ptd_sparse.reference on float64 copies of the same inputs), every entry within
    one rounding of the dtype: a second rounding of the label's entry loses its gradient (0 instead of -1e-5)."""
    from ptd_sparse.reference import kd_loss as reference_kd

    s, target = confident_rows(dtype)
    if listed:  # the teacher is the student itself: its top 4 (the label first) and the exact rest mass
        teacher = ptd_sparse.topk_teacher(s.float(), 4, 1.0)
    else:  # every class but the label listed, the label's share as the rest mass: the same distribution
        others = torch.tensor([c for c in range(10) if c != 3]).repeat(8, 1)
        p = torch.softmax(s.double(), dim=1)
        teacher = ptd_sparse.TopKTeacher(others.int(), s.float().gather(1, others), p[:, 3].float())
    want_loss, want_grad = reference_kd.kd_loss_topk(s.double(), *teacher, target, 1.0, 0.5, 2, -100, True)
    loss, grad = loss_kernels(backend)[1](*on_device(backend, s, *teacher, target), 1.0, 0.5, 2, -100, True)
    assert grad.dtype == dtype
    label_grad = want_grad[:, 3]
    assert bool((label_grad < -1e-6).all()), "the case must have a label gradient the dtype can hold"
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(grad.cpu().double(), want_grad, rtol=2 * eps, atol=1e-7)
    assert_close(loss.cpu(), want_loss, torch.float32, "loss")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", [0, 1, 2], ids=["none", "sum", "batchmean"])
def test_float64_gradients_are_exact(backend, reduction, generator):
    """float64 students get float64 gradients to float64 precision: the batchmean scale 1/3 (three rows count) must
    not pass through float32 (a relative error of 3e-8)."""
    from ptd_sparse.reference import kd_loss as reference_kd

    s, t = logits(5, 7, generator, dtype=torch.float64), logits(5, 7, generator, dtype=torch.float64)
    target = torch.tensor([1, -100, 4, -100, 6])
    teacher = ptd_sparse.topk_teacher(t, 3, 2.0)
    dense_kernel, topk_kernel = loss_kernels(backend)
    cases = ((dense_kernel, reference_kd.kd_loss, (t,)), (topk_kernel, reference_kd.kd_loss_topk, tuple(teacher)))
    for op, reference, teacher_args in cases:
        want_loss, want_grad = reference(s, *teacher_args, target, 2.0, 0.7, reduction, -100, True)
        loss, grad = op(*on_device(backend, s, *teacher_args, target), 2.0, 0.7, reduction, -100, True)
        assert grad.dtype == torch.float64 and loss.dtype == torch.float64
        torch.testing.assert_close(grad.cpu(), want_grad, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(loss.cpu(), want_loss, rtol=1e-12, atol=1e-15)
