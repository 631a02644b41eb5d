"""ptd_sparse.design_student returns the student itself (.module), beside its widths (.plan) and report, for the
zoo's models, the example user models (torchvision-style ResNet and MobileNetV2, a two-branch network) and, when
installed, torchvision's own ResNet18."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

import ptd_sparse
from ptd_sparse.nn import MaskedConv2d
from ptd_sparse.pipeline.models import build_model
from ptd_sparse.pipeline.rewrite_widths import rewrite_widths

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import user_models  # noqa: E402


@pytest.fixture(autouse=True)
def _dense_route(monkeypatch):
    """The students run once to show they are ready; the sparse kernels' first call (compressing each all-true mask)
    is tested elsewhere and only slows this file."""
    monkeypatch.setenv("PTD_BACKEND", "dense")


def prune_globally(model: nn.Module, amount: float) -> nn.Module:
    convs = [(m, "weight") for m in model.modules() if isinstance(m, nn.Conv2d)]
    prune.global_unstructured(convs, pruning_method=prune.L1Unstructured, amount=amount)
    return model


def conv_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))


def check_student(teacher: nn.Module, in_channels: int, size: int, classes: int):
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    design = ptd_sparse.design_student(teacher, in_channels)
    student = design.module
    assert student is design.module  # built once
    assert type(student) is type(teacher) and student is not teacher
    # Its convolutions hold the dense weights the report designed, fewer than the teacher's.
    assert conv_weights(student) == sum(row.student_weights for row in design.rows)
    assert conv_weights(student) < conv_weights(teacher)
    assert all(not hasattr(m, "weight_orig") for m in student.modules())
    assert all(bool(m.mask.all()) for m in student.modules() if isinstance(m, MaskedConv2d))
    x = torch.randn(2, in_channels, size, size)
    out = student(x)
    assert out.shape == (2, classes)
    out.sum().backward()  # ready to train
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert "| group |" in design.report and len(design.report.splitlines()) == len(design.rows) + 2
    plan, rows = design  # a StudentDesign also unpacks as the (plan, rows) pair
    assert plan is design.plan and rows is design.rows
    for key, value in teacher.state_dict().items():  # the teacher is not touched
        torch.testing.assert_close(value, teacher_state[key])
    return design


@pytest.mark.parametrize("name,channels,size", [("vgg_fmnist", 1, 28), ("vgg11", 3, 32), ("resnet18", 3, 16),
                                                ("mobilenetv2", 3, 16)])
def test_zoo_students_are_built(name, channels, size):
    torch.manual_seed(0)
    teacher = build_model(name, in_channels=channels, image_size=size)
    for module in teacher.modules():
        if isinstance(module, MaskedConv2d):
            module.set_mask(torch.rand(module.weight.shape) < 0.3)
    design = check_student(teacher, channels, size, 10)
    if isinstance(design.plan, list):  # the zoo's plan lists build the same student through build_model
        rebuilt = build_model(name, design.plan, channels, 10, size)
        assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in design.module.parameters()]
        assert design.module.plan == design.plan


@pytest.mark.parametrize("factory", [lambda: user_models.resnet18(10, 3, 16), lambda: user_models.mobilenet_v2(10),
                                     lambda: user_models.two_branch_net(10)],
                         ids=["resnet18", "mobilenet_v2", "two_branch"])
def test_example_user_models_get_a_ready_student(factory):
    torch.manual_seed(0)
    teacher = prune_globally(factory(), 0.8)
    design = check_student(teacher, 3, 16, 10)
    assert isinstance(design.plan, dict)  # the width map stays available
    reference = rewrite_widths(teacher, design.plan)
    assert [p.shape for p in reference.parameters()] == [p.shape for p in design.module.parameters()]


def test_torchvision_resnet18_gets_a_ready_student():
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    teacher = prune_globally(models.resnet18(num_classes=10), 0.9)
    check_student(teacher, 3, 16, 10)
