"""The GPU backends (cuda, triton) on CUDA tensors at full size, against the float64 oracle computed on the CPU:
the sparse convolution forward and its three gradients on CIFAR VGG-sized layers and odd geometries, grouped and
depthwise layers, every dtype, 0% and 100% dense masks, empty batches, non-contiguous inputs, the fused ReLU, CUDA
autocast in bfloat16 and float16; the KD loss with dense and top-k teachers at vocabulary sizes up to 32000, with no
host synchronisation per call; gradcheck, opcheck, the automatic choice and the errors of bad input (device-side
asserts, and ValueErrors under PTD_DEBUG_CHECKS=1). Without a CUDA device every test here skips with that reason
(the CPU suite covers triton through the interpreter)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, conv_call, opcheck_conv_route, opcheck_loss_route, random_mask

import ptd_sparse
from ptd_sparse.backends import KD_LOSS, SPARSE_CONV, choose_backend, unsupported_reasons
from ptd_sparse.ops import kd_loss as kd_loss_ops

HAS_GPU = torch.cuda.is_available()
DTYPE_IDS = lambda d: str(d).split(".")[-1]  # noqa: E731


def gpu_backends(op: str) -> list:
    params = []
    for name in ("cuda", "triton"):
        reasons = ["no CUDA device on this machine"] if not HAS_GPU else unsupported_reasons(name, op,
                                                                                           torch.device("cuda"))
        params.append(pytest.param(name, marks=[pytest.mark.skip(reason="; ".join(reasons))] if reasons else [],
                                   id=name))
    return params


CONV_BACKENDS = gpu_backends(SPARSE_CONV)
LOSS_BACKENDS = gpu_backends(KD_LOSS)


def dtypes_of(backend):
    """Every backend runs fp32/fp16/bf16; the CUDA C++ kernels also run fp64."""
    return [torch.float32, torch.float16, torch.bfloat16] + ([torch.float64] if backend == "cuda" else [])


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(4321)


# --- sparse convolution ---------------------------------------------------------------------------------------------

def conv_case(backend, batch, c_in, c_out, size, kernel, stride, padding, dilation, density, dtype, generator,
              relu=False, channels_last=False, groups=1):
    x = torch.randn(batch, c_in, *size, generator=generator)
    fan_in = c_in // groups * kernel * kernel
    weight = torch.randn(c_out, c_in // groups, kernel, kernel, generator=generator) / fan_in ** 0.5
    mask = random_mask(weight.shape, density, generator)
    bias = torch.randn(c_out, generator=generator)
    # float64 oracle on the CPU, from the same rounded inputs
    xr, wr, br = (t.to(dtype).double().requires_grad_() for t in (x, weight, bias))
    want = F.conv2d(xr, wr * mask.double(), br, stride, padding, dilation, groups)
    if relu:
        want = want.clamp_min(0)
    grad_out = torch.randn(want.shape, generator=generator).to(dtype)
    want_grads = torch.autograd.grad(want, (xr, wr, br), grad_out.double())

    xg = x.to("cuda", dtype)
    if channels_last:
        xg = xg.contiguous(memory_format=torch.channels_last)
    xg.requires_grad_()
    sparse = ptd_sparse.SparseConvWeight.from_dense(weight.to("cuda", dtype), mask.cuda(), groups)
    sparse.values.requires_grad_()
    bg = bias.to("cuda", dtype).requires_grad_()
    out = ptd_sparse.sparse_conv2d(xg, sparse, bg, stride, padding, dilation, backend=backend, relu=relu)
    assert out.shape == want.shape and out.dtype == dtype and out.device.type == "cuda"
    assert_close(out.cpu(), want, dtype, "output")
    if batch == 0:
        return
    got = torch.autograd.grad(out, (xg, sparse.values, bg), grad_out.cuda())
    assert_close(got[0].cpu(), want_grads[0], dtype, "grad_input")
    assert_close(got[1].cpu(), want_grads[1].reshape(-1)[sparse.pattern.flat_index.cpu()], dtype, "grad_values")
    assert_close(got[2].cpu(), want_grads[2], dtype, "grad_bias")


# CIFAR VGG layers at their real widths (batch reduced to keep the float64 CPU oracle quick) and odd geometries.
VGG_LAYERS = [(8, 64, 64, (32, 32)), (8, 128, 128, (16, 16)), (8, 256, 256, (8, 8)), (8, 512, 512, (4, 4)),
              (16, 512, 512, (2, 2))]


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("density", [0.05, 0.1, 0.3])
@pytest.mark.parametrize("batch,c_in,c_out,size", VGG_LAYERS, ids=lambda v: str(v))
def test_conv_vgg_layers(backend, batch, c_in, c_out, size, density, generator):
    conv_case(backend, batch, c_in, c_out, size, 3, 1, 1, 1, density, torch.float32, generator)


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("kernel,stride,padding,dilation,size", [
    (1, 1, 0, 1, (7, 9)), (3, 2, 1, 1, (17, 15)), (5, 1, 2, 2, (13, 11)), (3, 2, 0, 2, (12, 19)), (5, 2, 2, 1, (9, 9)),
])
@pytest.mark.parametrize("density", [0.0, 0.2, 1.0])
def test_conv_odd_geometry_and_density(backend, kernel, stride, padding, dilation, size, density, generator):
    conv_case(backend, 5, 7, 11, size, kernel, stride, padding, dilation, density, torch.float32, generator)


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS)
def test_conv_every_dtype(backend, dtype, generator):
    if dtype not in dtypes_of(backend):
        pytest.skip(f"the {backend} backend does not run {dtype}")
    conv_case(backend, 4, 32, 48, (15, 15), 3, 1, 1, 1, 0.2, dtype, generator)
    conv_case(backend, 4, 32, 48, (15, 15), 3, 2, 1, 1, 0.2, dtype, generator)


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_conv_empty_batch_relu_and_channels_last(backend, generator):
    conv_case(backend, 0, 8, 8, (8, 8), 3, 1, 1, 1, 0.3, torch.float32, generator)
    conv_case(backend, 6, 16, 24, (10, 10), 3, 1, 1, 1, 0.3, torch.float32, generator, relu=True)
    conv_case(backend, 6, 16, 24, (10, 10), 3, 1, 1, 1, 0.3, torch.float32, generator, channels_last=True)


# (batch, groups, C_in, C_out, size): MobileNet-style depthwise layers (with a channel multiplier in the last one),
# and ResNeXt-style groups of 4 and 32.
GROUPED_LAYERS = [(8, 64, 64, 64, (32, 32)), (8, 256, 256, 256, (8, 8)), (8, 4, 128, 128, (16, 16)),
                  (8, 32, 256, 256, (8, 8)), (4, 32, 32, 64, (15, 15))]


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("batch,groups,c_in,c_out,size", GROUPED_LAYERS, ids=lambda v: str(v))
def test_conv_grouped_and_depthwise(backend, batch, groups, c_in, c_out, size, generator):
    conv_case(backend, batch, c_in, c_out, size, 3, 1, 1, 1, 0.3, torch.float32, generator, groups=groups)
    conv_case(backend, batch, c_in, c_out, size, 3, 2, 1, 1, 0.3, torch.float32, generator, groups=groups, relu=True)


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS)
def test_conv_depthwise_half_precision(backend, dtype, generator):
    conv_case(backend, 4, 48, 48, (14, 14), 3, 1, 1, 1, 0.5, dtype, generator, groups=48)
    conv_case(backend, 4, 48, 96, (14, 14), 5, 2, 2, 1, 0.5, dtype, generator, groups=48)


def autocast_network(backend, generator):
    """MaskedConv2d - BatchNorm - ReLU - grouped MaskedConv2d - ReLU - depthwise SparseConv2d, on the GPU."""
    from ptd_sparse.nn import MaskedConv2d, SparseConv2d

    torch.manual_seed(int(torch.randint(0, 2**30, (1,), generator=generator)))
    first = MaskedConv2d(16, 32, 3, padding=1, backend=backend)
    grouped = MaskedConv2d(32, 32, 3, padding=1, groups=4, backend=backend)
    for conv in (first, grouped):
        conv.set_mask(random_mask(conv.weight.shape, 0.3, generator))
    depthwise = torch.nn.Conv2d(32, 32, 3, padding=1, groups=32)
    sparse = SparseConv2d.from_conv(depthwise, random_mask(depthwise.weight.shape, 0.5, generator), backend=backend)
    return torch.nn.Sequential(first, torch.nn.BatchNorm2d(32), torch.nn.ReLU(), grouped, torch.nn.ReLU(),
                               sparse).cuda()


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS)
def test_conv_network_under_cuda_autocast(backend, dtype, generator):
    """Under torch.autocast("cuda") the convolutions run in the autocast dtype (as nn.Conv2d does), the master
    weights and their gradients stay float32 and zero outside the masks, and the result is the float32 network's
    within the dtype's rounding."""
    model = autocast_network(backend, generator)
    x = torch.randn(8, 16, 12, 12, generator=generator).cuda()
    expected = model(x)
    with torch.autocast("cuda", dtype=dtype):
        out = model(x)
    assert out.dtype == dtype and out.device.type == "cuda"
    tolerance = dict(atol=5e-2, rtol=5e-2) if dtype == torch.bfloat16 else dict(atol=1e-2, rtol=1e-2)
    scale = float(expected.abs().max())
    torch.testing.assert_close(out.float() / scale, expected / scale, **tolerance)
    out.float().square().mean().backward()
    for conv in (model[0], model[3]):
        assert conv.weight.grad.dtype == torch.float32
        assert not conv.weight.grad[~conv.mask].any()
    assert model[5].values.grad is not None and model[5].values.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS)
def test_kd_loss_under_cuda_autocast(backend, dtype, generator):
    """The loss computes in float32 under autocast (like F.cross_entropy) and hands the gradient back in the
    student's dtype."""
    student = (torch.randn(32, 1000, generator=generator) * 3).cuda().to(dtype).requires_grad_()
    teacher = (torch.randn(32, 1000, generator=generator) * 3).cuda().to(dtype)
    target = torch.randint(0, 1000, (32,), generator=generator).cuda()
    with torch.autocast("cuda", dtype=dtype):
        loss = ptd_sparse.kd_loss(student, teacher, target, temperature=4.0, alpha=0.9, backend=backend)
        topk = ptd_sparse.kd_loss(student, ptd_sparse.topk_teacher(teacher.float(), 10, 4.0), target,
                                  temperature=4.0, alpha=0.9, backend=backend)
    assert loss.dtype == torch.float32 and topk.dtype == torch.float32
    expected = ptd_sparse.kd_loss(student.float(), teacher.float(), target, temperature=4.0, alpha=0.9,
                                  backend="reference")
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(loss, student)
    (expected_grad,) = torch.autograd.grad(expected, student)
    assert grad.dtype == dtype
    assert_close(grad.float().cpu(), expected_grad.float().cpu(), dtype, "grad_student")


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_conv_gradcheck_and_opcheck(backend, generator):
    if torch.float64 in dtypes_of(backend):
        x = torch.randn(2, 3, 7, 6, dtype=torch.float64, device="cuda", requires_grad=True)
        weight = torch.randn(4, 3, 3, 3, dtype=torch.float64, device="cuda")
        mask = random_mask(weight.shape, 0.5, generator).cuda()
        sparse = ptd_sparse.SparseConvWeight.from_dense(weight, mask)
        values = sparse.values.clone().requires_grad_()
        bias = torch.randn(4, dtype=torch.float64, device="cuda", requires_grad=True)
        p = sparse.pattern

        def conv(x, values, bias):
            return conv_call(backend)(x, values, p.row_ptr, p.col_idx, p.t_ptr, p.t_rows, p.t_perm, list(p.shape),
                                      bias, [2, 1], [1, 1], [1, 2])

        assert torch.autograd.gradcheck(conv, (x, values, bias))
    x = torch.randn(3, 5, 9, 9, device="cuda", requires_grad=True)
    sparse = ptd_sparse.SparseConvWeight.from_dense(torch.randn(6, 5, 3, 3, device="cuda"),
                                                    random_mask((6, 5, 3, 3), 0.4, generator).cuda())
    p = sparse.pattern
    opcheck_conv_route(backend, x, sparse.values.requires_grad_(), p, None, [1, 1], [1, 1], [1, 1])


def test_automatic_choice_on_cuda_takes_the_gpu_loss_kernel_and_cudnn_for_convolutions():
    if not HAS_GPU:
        pytest.skip("no CUDA device on this machine")
    assert choose_backend(KD_LOSS, torch.device("cuda")) in ("cuda", "triton")
    assert choose_backend(SPARSE_CONV, torch.device("cuda"), density=0.05, batch=128) == "dense"
    assert choose_backend(SPARSE_CONV, torch.device("cuda"), density=0.95, batch=128) == "dense"
    assert choose_backend(SPARSE_CONV, torch.device("cuda")) in ("cuda", "triton")


# --- KD loss --------------------------------------------------------------------------------------------------------

def loss_oracle(student, teacher_probs, target, T, alpha, reduction):
    s = student.double().requires_grad_()
    log_q = F.log_softmax(s / T, dim=1)
    kl = torch.where(teacher_probs > 0, teacher_probs * (teacher_probs.log() - log_q), torch.zeros_like(s)).sum(1)
    rows = alpha * T * T * kl
    valid = torch.ones(s.shape[0], dtype=torch.bool)
    if target is not None:
        valid = target != -100
        rows = rows + (1 - alpha) * F.cross_entropy(s, target, ignore_index=-100, reduction="none")
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    loss = {"none": rows, "sum": rows.sum()}.get(reduction, rows.sum() / max(int(valid.sum()), 1))
    grad_out = torch.ones_like(loss) if reduction != "none" else torch.linspace(-1, 2, loss.numel(), dtype=loss.dtype)
    (grad,) = torch.autograd.grad(loss, s, grad_out) if s.shape[0] else (torch.zeros_like(s),)
    return loss.detach(), grad, grad_out


def loss_case(backend, rows, classes, student_dtype, teacher_dtype, T, alpha, reduction, generator, k=None,
              with_target=True):
    s = (torch.randn(rows, classes, generator=generator) * 3).to(student_dtype)
    t = (torch.randn(rows, classes, generator=generator) * 3).to(teacher_dtype)
    target = torch.randint(0, classes, (rows,), generator=generator) if with_target else None
    if target is not None and rows:
        target[::7] = -100
    if k is None:
        teacher, probs = t.cuda(), F.softmax(t.double() / T, dim=1)
    else:
        topk = ptd_sparse.topk_teacher(t, k, T)
        rest = topk.rest_mass.double()
        probs = (rest / (classes - k) if classes > k else torch.zeros_like(rest))[:, None].repeat(1, classes)
        probs.scatter_(1, topk.indices.long(), (1 - rest)[:, None] * F.softmax(topk.logits.double() / T, dim=1))
        teacher = ptd_sparse.TopKTeacher(*(x.cuda() for x in topk))
    want_loss, want_grad, grad_out = loss_oracle(s, probs, target, T, alpha, reduction)
    sg = s.cuda().requires_grad_()
    loss = ptd_sparse.kd_loss(sg, teacher, target.cuda() if target is not None else None, temperature=T,
                              alpha=alpha, reduction=reduction, backend=backend)
    tol = student_dtype if student_dtype != torch.float64 else torch.float32
    assert_close(loss.cpu(), want_loss, tol, "loss")
    if rows:
        (grad,) = torch.autograd.grad(loss, sg, grad_out.to(loss.dtype).cuda())
        assert grad.dtype == student_dtype
        assert_close(grad.cpu(), want_grad, tol, "grad_student")


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("rows,classes", [(0, 10), (1, 1), (37, 13), (64, 1000), (16, 32000), (5, 1001)])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_loss_shapes_and_reductions(backend, rows, classes, reduction, generator):
    loss_case(backend, rows, classes, torch.float32, torch.float32, 4.0, 0.9, reduction, generator)
    loss_case(backend, rows, classes, torch.float32, torch.float32, 4.0, 0.9, reduction, generator,
              k=min(5, classes))


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("student_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=DTYPE_IDS)
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS)
def test_loss_every_dtype_pair(backend, student_dtype, teacher_dtype, generator):
    if student_dtype not in dtypes_of(backend):
        pytest.skip(f"the {backend} backend does not run {student_dtype}")
    for T, alpha in ((1.0, 0.5), (10.0, 0.95)):
        loss_case(backend, 24, 3000, student_dtype, teacher_dtype, T, alpha, "batchmean", generator)
        loss_case(backend, 24, 3000, student_dtype, teacher_dtype, T, alpha, "batchmean", generator, k=10)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_loss_without_labels_and_alpha_edges(backend, generator):
    loss_case(backend, 9, 77, torch.float32, torch.float32, 2.0, 0.7, "none", generator, with_target=False)
    loss_case(backend, 9, 77, torch.float32, torch.float32, 2.0, 0.0, "sum", generator)
    loss_case(backend, 9, 77, torch.float32, torch.float32, 2.0, 1.0, "sum", generator, k=7)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_loss_non_contiguous_and_extreme_logits(backend, generator):
    s = (torch.randn(300, 40, generator=generator) * 1e4).cuda().t()  # [40, 300] transposed view
    t = (torch.randn(80, 300, generator=generator) * 1e4).cuda()[::2]
    t[3, 10:] = float("-inf")
    target = torch.randint(0, 300, (40,), generator=generator).cuda()
    got = ptd_sparse.kd_loss(s, t, target, temperature=4.0, alpha=0.5, backend=backend)
    want = ptd_sparse.kd_loss(s.cpu(), t.cpu(), target.cpu(), temperature=4.0, alpha=0.5, backend="reference")
    torch.testing.assert_close(got.cpu(), want, rtol=2e-5, atol=2e-5 * float(want.abs().clamp_min(1)))


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_loss_gradcheck_and_opcheck(backend, generator):
    s32 = torch.randn(8, 6, device="cuda", requires_grad=True)
    t32 = torch.randn(8, 6, device="cuda")
    target = torch.randint(0, 6, (8,), device="cuda")
    opcheck_loss_route(kd_loss_ops.ROUTES, backend, s32, (t32,), target, 2.0, 0.5, 2)
    topk = ptd_sparse.topk_teacher(t32, 3, 2.0)
    opcheck_loss_route(kd_loss_ops.TOPK_ROUTES, backend, s32, tuple(topk), target, 2.0, 0.5, 2)
    if backend == "cuda":
        s = torch.randn(7, 9, dtype=torch.float64, device="cuda", requires_grad=True)
        t = torch.randn(7, 9, dtype=torch.float64, device="cuda")
        y = torch.randint(0, 9, (7,), device="cuda")
        assert torch.autograd.gradcheck(lambda s: kd_loss_ops.ROUTES[backend].call(s, t, y, 3.0, 0.6, 2, -100), (s,))
        topk64 = ptd_sparse.topk_teacher(t, 4, 3.0)
        assert torch.autograd.gradcheck(
            lambda s: kd_loss_ops.TOPK_ROUTES[backend].call(s, *topk64, y, 3.0, 0.6, 1, -100), (s,))


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_loss_bad_input_is_refused(backend, generator, monkeypatch):
    monkeypatch.setenv("PTD_DEBUG_CHECKS", "1")  # the ValueErrors; without it, device-side asserts (below)
    s = torch.randn(6, 5, device="cuda")
    t = torch.randn(6, 5, device="cuda")
    for which, bad in (("student_logits", float("nan")), ("teacher_logits", float("inf"))):
        s2, t2 = s.clone(), t.clone()
        (s2 if which == "student_logits" else t2)[4, 1] = bad
        with pytest.raises(ValueError, match=f"{which} row 4"):
            ptd_sparse.kd_loss(s2, t2, torch.arange(6, device="cuda") % 5, backend=backend)
    with pytest.raises(ValueError, match="target has value 5 at row 2"):
        ptd_sparse.kd_loss(s, t, torch.tensor([0, 1, 5, 2, 3, 4], device="cuda"), backend=backend)
    with pytest.raises(ValueError, match="teacher_logits is on cpu"):
        ptd_sparse.kd_loss(s, t.cpu(), backend=backend)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_loss_does_not_synchronise(backend, generator):
    """Forward and backward of the loss, dense and top-k teacher, with labels and batchmean, under
    torch.cuda.set_sync_debug_mode("error"): any device-to-host synchronisation raises."""
    s = (torch.randn(64, 1000, generator=generator) * 3).cuda().requires_grad_()
    t = (torch.randn(64, 1000, generator=generator) * 3).cuda()
    target = torch.randint(0, 1000, (64,), generator=generator).cuda()
    target[::9] = -100
    teacher = ptd_sparse.topk_teacher(t, 10, 4.0)

    def step():
        for given in (t, teacher):
            loss = ptd_sparse.kd_loss(s, given, target, temperature=4.0, alpha=0.9, backend=backend)
            loss.backward()

    step()  # compiles and loads the kernels first
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_loss_bad_input_is_a_device_side_assert(backend):
    """Without PTD_DEBUG_CHECKS a NaN logit stops the kernel with a device-side assert, reported by a later CUDA
    call (the synchronisation at the latest; test_loss_does_not_synchronise shows the call itself waits for
    nothing). In a fresh interpreter: the assert leaves the CUDA context unusable."""
    code = ("import torch, ptd_sparse\n"
            "s = torch.randn(4, 7, device='cuda'); s[2, 3] = float('nan')\n"
            f"loss = ptd_sparse.kd_loss(s, torch.randn(4, 7, device='cuda'), torch.arange(4, device='cuda'), "
            f"backend={backend!r})\n"
            "torch.cuda.synchronize()\n")
    environment = {key: value for key, value in os.environ.items() if key != "PTD_DEBUG_CHECKS"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env=environment)
    assert result.returncode != 0
    assert "device-side assert" in result.stderr
    assert "ValueError" not in result.stderr
    if backend == "cuda":  # the kernel prints the cpu backend's sentence
        assert "kd_loss: student_logits row 2 holds NaN or +inf" in result.stdout + result.stderr
