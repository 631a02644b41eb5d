"""torch.autocast (bfloat16): the convolutions run in the autocast dtype as F.conv2d does, the KD loss in float32 as
F.cross_entropy does, on every backend and inside torch.compile. The cuda and triton cases run on CUDA tensors under
CUDA autocast where a GPU exists (conftest.device_for), else on the CPU under CPU autocast."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import device_backends, device_for, on_device, random_mask
from torch import nn

import ptd_sparse
from ptd_sparse.backends import KD_LOSS, SPARSE_CONV
from ptd_sparse.nn import KDLoss, MaskedConv2d, SparseConv2d

CONV_BACKENDS = device_backends(SPARSE_CONV)
LOSS_BACKENDS = device_backends(KD_LOSS)
BF16 = dict(atol=5e-2, rtol=5e-2)  # bfloat16 keeps 8 bits: two roundings of a sum of ~150 products


def masked_network(backend, generator):
    """A small network: two masked convolutions around BatchNorm and ReLU."""
    torch.manual_seed(int(torch.randint(0, 2**30, (1,), generator=generator)))
    model = nn.Sequential(MaskedConv2d(3, 16, 3, padding=1, backend=backend), nn.BatchNorm2d(16), nn.ReLU(),
                          MaskedConv2d(16, 16, 3, padding=1, backend=backend))
    for module in model:
        if isinstance(module, MaskedConv2d):
            module.set_mask(random_mask(module.weight.shape, 0.3, generator))
    return model.to(device_for(backend))


def autocast(backend):
    """bfloat16 autocast on the device of the backend's tensors."""
    return torch.autocast(device_for(backend).type, dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_masked_network_under_cpu_autocast_matches_float32(backend, generator):
    model = masked_network(backend, generator)
    x = on_device(backend, torch.randn(4, 3, 8, 8, generator=generator))
    expected = model(x)
    with autocast(backend):
        out = model(x)
    assert out.dtype == torch.bfloat16  # like nn.Conv2d under autocast
    torch.testing.assert_close(out.float(), expected, **BF16)
    out.float().square().mean().backward()
    for module in model:
        if isinstance(module, MaskedConv2d):
            assert module.weight.grad.dtype == torch.float32  # the master weights stay float32
            assert not module.weight.grad[~module.mask].any()


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_gradients_under_autocast_match_float32(backend, generator):
    conv = MaskedConv2d(5, 6, 3, padding=1, backend=backend).to(device_for(backend))
    conv.set_mask(on_device(backend, random_mask(conv.weight.shape, 0.5, generator)))
    x, grad_out = on_device(backend, torch.randn(2, 5, 7, 7, generator=generator),
                            torch.randn(2, 6, 7, 7, generator=generator))
    x.requires_grad_()
    expected = torch.autograd.grad(conv(x), (x, conv.weight, conv.bias), grad_out)
    with autocast(backend):
        out = conv(x)
    got = torch.autograd.grad(out, (x, conv.weight, conv.bias), grad_out)
    for g, e in zip(got, expected):
        assert g.dtype == torch.float32
        scale = float(e.abs().max())
        torch.testing.assert_close(g / scale, e / scale, **BF16)


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_sparse_conv2d_module_and_channels_last_under_autocast(backend, generator):
    conv = nn.Conv2d(4, 6, 3, padding=1)
    layer = SparseConv2d.from_conv(conv, random_mask(conv.weight.shape, 0.3, generator), backend=backend)
    layer = layer.to(device_for(backend))
    x = on_device(backend, torch.randn(3, 4, 6, 6, generator=generator)).contiguous(memory_format=torch.channels_last)
    expected = F.conv2d(x, layer.sparse_weight.to_dense(), layer.bias, padding=1)
    with autocast(backend):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, **BF16)


def test_float64_is_left_alone_by_autocast(generator):
    """Autocast never lowers float64, for its own operators or ours."""
    weight = torch.randn(3, 2, 3, 3, generator=generator, dtype=torch.float64)
    mask = random_mask(weight.shape, 0.5, generator)
    x = torch.randn(1, 2, 5, 5, generator=generator, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ptd_sparse.masked_conv2d(x, weight, mask, padding=1, backend="cpu")
    assert out.dtype == torch.float64


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_kd_loss_computes_in_float32_under_autocast(backend, generator):
    student, teacher, target = on_device(backend, torch.randn(8, 10, generator=generator).bfloat16(),
                                         torch.randn(8, 10, generator=generator).bfloat16(),
                                         torch.randint(0, 10, (8,), generator=generator))
    student.requires_grad_()
    with autocast(backend):
        loss = ptd_sparse.kd_loss(student, teacher, target, temperature=4.0, alpha=0.9, backend=backend)
        topk_loss = ptd_sparse.kd_loss(student, ptd_sparse.topk_teacher(teacher.float(), 3, 4.0), target,
                                       temperature=4.0, alpha=0.9, backend=backend)
    assert loss.dtype == torch.float32 and topk_loss.dtype == torch.float32
    expected = ptd_sparse.kd_loss(student.float(), teacher.float(), target, temperature=4.0, alpha=0.9,
                                  backend="reference")
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(loss, student)
    assert grad.dtype == torch.bfloat16  # back to the student's dtype through autocast's cast
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(grad.float(), expected_grad.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_masked_network_and_kd_loss_compile_without_graph_breaks(backend, generator):
    """torch.compile(fullgraph=True) of a MaskedConv2d network, with autocast, and of KDLoss."""
    model = masked_network(backend, generator)
    x = torch.randn(2, 3, 8, 8, generator=generator)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), model(x), **BF16)
    out.float().sum().backward()
    assert model[0].weight.grad is not None and not model[0].weight.grad[~model[0].mask].any()

    for choice in (backend, None):  # the given backend, and the automatic one with its measured routes
        sparse_model = ptd_sparse.sparsify(model, backend=choice)
        compiled_sparse = torch.compile(sparse_model, backend="aot_eager", fullgraph=True)
        with torch.no_grad():
            torch.testing.assert_close(compiled_sparse(x), sparse_model(x), atol=1e-5, rtol=1e-5)

    criterion = KDLoss(temperature=4.0, alpha=0.9, backend=backend)
    student = torch.randn(6, 10, generator=generator, requires_grad=True)
    teacher = torch.randn(6, 10, generator=generator)
    target = torch.randint(0, 10, (6,), generator=generator)
    compiled_loss = torch.compile(criterion, backend="aot_eager", fullgraph=True)
    loss = compiled_loss(student, teacher, target)
    torch.testing.assert_close(loss, criterion(student, teacher, target))
    (grad,) = torch.autograd.grad(loss, student)
    (expected,) = torch.autograd.grad(criterion(student, teacher, target), student)
    torch.testing.assert_close(grad, expected)
