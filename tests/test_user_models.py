"""Models the package did not build (examples/user_models.py: torchvision-style ResNet18/34, MobileNetV2, a network
that concatenates branches): width groups read from the graph, the student design rule per group, students built by
rewriting a copy's widths, and sparsify's Conv-BN(-ReLU) folding found in the traced graph."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.utils.prune as prune
from conftest import random_mask
from torch import nn

import ptd_sparse
from ptd_sparse.nn import SparseConv2d
from ptd_sparse.pipeline import width_graph
from ptd_sparse.pipeline.design import design_student, design_widths
from ptd_sparse.pipeline.models import POOL, VGG, BasicBlock, ResNet18, build_model
from ptd_sparse.pipeline.rewrite_widths import rewrite_widths

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import user_models  # noqa: E402


def prune_globally(model: nn.Module, amount: float) -> nn.Module:
    convs = [(m, "weight") for m in model.modules() if isinstance(m, nn.Conv2d)]
    prune.global_unstructured(convs, pruning_method=prune.L1Unstructured, amount=amount)
    return model


def convs_of(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


# The zoo's width groups written out by hand from the models' definitions: the graph analysis must find exactly
# these, so the zoo's students keep their widths.
def zoo_vgg_groups(model: VGG) -> list:
    return [((f"features.{n}", m.kernel_size[0] * m.kernel_size[1], False),) for n, m in model.features.named_children()
            if isinstance(m, nn.Conv2d)]


def zoo_resnet_groups(model: ResNet18) -> list:
    children = list(model.features.named_children())
    stages = [[(f"features.{children[0][0]}", 9, False)]]
    blocks = [(name, block) for name, block in children if isinstance(block, BasicBlock)]
    for index, (name, block) in enumerate(blocks):
        stage = index // 2
        if stage == len(stages):
            stages.append([])
        convs = [(f"features.{name}.body.{n}", m) for n, m in block.body.named_children() if isinstance(m, nn.Conv2d)]
        convs += [(f"features.{name}.shortcut.{n}", m) for n, m in block.shortcut.named_children()
                  if isinstance(m, nn.Conv2d)]
        for conv_name, conv in convs:
            reads_previous = index % 2 == 0 and stage > 0 and (".body.0" in conv_name or ".shortcut." in conv_name)
            stages[stage].append((conv_name, conv.kernel_size[0] * conv.kernel_size[1], not reads_previous))
    return [tuple(s) for s in stages]


def zoo_plan(groups: list, nonzeros: list, in_channels: int) -> list:
    """The hand-written rule's widths: per group, sum_own k^2 w^2 + sum_prev k^2 prev w = nonzeros."""
    widths, previous = [], in_channels
    for convs, nnz in zip(groups, nonzeros):
        quadratic = sum(a for _, a, own in convs if own)
        linear = sum(a * previous for _, a, own in convs if not own)
        w = nnz / linear if quadratic == 0 else \
            (-linear + math.sqrt(linear ** 2 + 4 * quadratic * nnz)) / (2 * quadratic)
        widths.append(max(1, round(w)))
        previous = widths[-1]
    return widths


@pytest.mark.parametrize("name", ["vgg11", "vgg_fmnist", "resnet18"])
def test_zoo_plans_are_unchanged(name, generator):
    in_channels = 1 if name == "vgg_fmnist" else 3
    model = build_model(name, in_channels=in_channels, image_size=28 if name == "vgg_fmnist" else 32)
    # Unequal densities per layer (alternating ones keep the chain rule's widths below the teacher's, where the
    # package's cap at the teacher width does not bind and today's rule applies unchanged).
    for density, (_, conv) in zip([0.5, 0.4] * 11, convs_of(model).items()):
        conv.set_mask(random_mask(conv.weight.shape, density, generator))
    hand = zoo_resnet_groups(model) if isinstance(model, ResNet18) else zoo_vgg_groups(model)
    nonzeros = [sum(model.get_submodule(n).nnz for n, _, _ in group) for group in hand]
    plan, rows = design_student(model, in_channels)
    assert [tuple(r.layers.split(", ")) for r in rows] == [tuple(n for n, _, _ in g) for g in hand]
    assert [r.teacher_nonzeros for r in rows] == nonzeros
    expected = zoo_plan(hand, nonzeros, in_channels)
    teacher_widths = [w for w in model.plan if w != POOL]
    assert all(w <= t for w, t in zip(expected, teacher_widths))  # the cap at the teacher's width does not bind
    if isinstance(model, VGG):
        iterator = iter(expected)
        expected = [POOL if item == POOL else next(iterator) for item in model.plan]
    assert plan == expected
    build_model(name, plan, in_channels, 10, 28 if name == "vgg_fmnist" else 32)  # the plan builds


@pytest.mark.parametrize("factory,blocks", [(user_models.resnet18, [2, 2, 2, 2]), (user_models.resnet34, [3, 4, 6, 3])])
def test_torchvision_style_resnet_has_one_group_per_stage(factory, blocks):
    torch.manual_seed(0)
    teacher = prune_globally(factory(10, 3, 16), 0.8)
    design = design_widths(teacher, 3)
    groups = design.graph.groups()
    assert len(groups) == 4
    for stage, (_, convs) in enumerate(groups):
        names = {c.name for c in convs}
        expected = {n for n in convs_of(teacher) if n.startswith(f"layer{stage + 1}.")}
        assert names == expected | ({"conv1"} if stage == 0 else set())
        assert len({design.widths[c.out] for c in convs}) == 1  # one width per stage
    for row in design.rows:  # each stage's dense student weights ~ its teacher nonzeros (up to rounding)
        assert abs(row.student_weights - row.teacher_nonzeros) <= 0.1 * row.teacher_nonzeros + 200
    plan, _ = design_student(teacher, 3)
    student = rewrite_widths(teacher, plan)
    assert type(student) is type(teacher) and not hasattr(student.conv1, "weight_orig")
    assert student(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    widths = [design.widths[root] for root in design.roots]
    assert student.fc.in_features == widths[-1] and student.layer2[0].downsample[1].num_features == widths[1]


def test_mobilenetv2_depthwise_and_expansion_ties():
    torch.manual_seed(0)
    teacher = prune_globally(user_models.mobilenet_v2(10, 3, 0.5), 0.6)
    design = design_widths(teacher, 3)
    g = design.graph
    convs = {c.name: c for c in g.convs}
    for block in teacher.features:
        if not isinstance(block, user_models.InvertedResidual):
            continue
        index = next(i for i, b in enumerate(teacher.features) if b is block)
        depthwise = [c for c in convs.values() if c.name.startswith(f"features.{index}.") and c.depthwise]
        assert len(depthwise) == 1
        assert depthwise[0].out == depthwise[0].inputs[0]  # the depthwise width is its input's
        if block.use_res_connect and len(block.conv) == 4:
            expansion = convs[f"features.{index}.conv.0.0"]
            projection = convs[f"features.{index}.conv.2"]
            # Inside a residual block the expansion joins the stage's group at its teacher ratio.
            assert g.root(expansion.out) == g.root(projection.out)
            ratio = g.teacher_width[expansion.out] / g.teacher_width[projection.out]
            assert abs(design.widths[expansion.out] - ratio * design.widths[projection.out]) <= ratio
    plan, _ = design_student(teacher, 3)
    student = rewrite_widths(teacher, plan)
    for name, conv in convs_of(student).items():
        if convs[name].depthwise:
            assert conv.groups == conv.in_channels == conv.out_channels
    assert student(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_zoo_mobilenetv2_is_designed_too(generator):
    teacher = build_model("mobilenetv2")
    for conv in convs_of(teacher).values():
        conv.set_mask(random_mask(conv.weight.shape, 0.3, generator))
    plan, rows = design_student(teacher, 3)
    assert isinstance(plan, dict) and rows
    assert rewrite_widths(teacher, plan)(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_concatenation_adds_the_widths_of_its_parts():
    torch.manual_seed(0)
    teacher = prune_globally(user_models.two_branch_net(), 0.7)
    design = design_widths(teacher, 3)
    convs = {c.name: c for c in design.graph.convs}
    assert convs["join"].inputs == (convs["left"].out, convs["right"].out)
    plan, _ = design_student(teacher, 3)
    student = rewrite_widths(teacher, plan)
    assert student.join.in_channels == student.left.out_channels + student.right.out_channels
    assert student(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_unmodelled_grouped_convolution_is_refused():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3)
            self.b = nn.Conv2d(8, 8, 3, groups=2)

        def forward(self, x):
            return self.b(self.a(x))

    with pytest.raises(width_graph.WidthGraphError, match="grouped convolution"):
        design_student(Grouped(), 3)


def trained_statistics(model: nn.Module, in_channels: int, size: int) -> nn.Module:
    """Give BatchNorm non-trivial running statistics, so folding them is tested."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, in_channels, size, size) * 2 + 0.5)
    return model.eval()


@pytest.mark.parametrize("backend", [None, "cpu", "reference"])
@pytest.mark.parametrize("which", ["resnet18", "mobilenet_v2", "two_branch_net"])
def test_sparsify_folds_in_the_traced_graph_and_matches_dense_logits(which, backend):
    if backend == "cpu" and ptd_sparse.backends.unsupported_reasons("cpu", "sparse_conv2d", torch.device("cpu")):
        pytest.skip("no C++ extension")
    torch.manual_seed(0)
    model = {"resnet18": lambda: user_models.resnet18(10, 3, 16),
             "mobilenet_v2": lambda: user_models.mobilenet_v2(10, 3, 0.5),
             "two_branch_net": lambda: user_models.two_branch_net()}[which]()
    model = trained_statistics(prune_globally(model, 0.7), 3, 32)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        sparse = ptd_sparse.sparsify(model, backend=backend)
        out = sparse(x)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in sparse.modules())  # every BatchNorm folded
    assert not any(type(m) is nn.Conv2d for m in sparse.modules())  # every pruned conv, depthwise too, sparse
    fused = [n for n, m in sparse.named_modules() if isinstance(m, SparseConv2d) and m.relu]
    if which == "resnet18":
        # The stem's ReLU is applied once and is fused; the blocks' shared self.relu runs on its own.
        assert fused == ["conv1"] and isinstance(sparse.relu, nn.Identity)
        assert isinstance(sparse.layer1[0].relu, nn.ReLU)
