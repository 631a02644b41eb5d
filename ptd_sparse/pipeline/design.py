"""Student design from a pruned teacher (docs/design.md, section 1.4).

Same depth as the teacher, fewer channels: each student layer holds about as many dense weights as the pruned
teacher layer holds nonzeros, c_out(l) = round(nnz_l / (k_l * k_l * c_in_student(l))), the first layer's c_in being
the image channels. Residual networks apply the rule per stage: all convolutions of a stage share one width w (so
the tensors they add keep equal widths), chosen so that the stage's dense student weights, a quadratic in w, equal
the stage's teacher nonzeros. Widths are rounded to a multiple and never fall below min_width. The classifier maps
the last width to the classes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ptd_sparse.nn import MaskedConv2d
from ptd_sparse.pipeline.models import POOL, VGG, BasicBlock, ResNet18


@dataclass(frozen=True)
class WidthGroup:
    """Convolutions that output one width of the plan. Each entry: (name, k*k, True if its input is the group's own
    width, False if it is the previous group's width)."""

    convs: tuple
    nonzeros: int


@dataclass(frozen=True)
class DesignRow:
    group: int
    layers: str
    teacher_nonzeros: int
    teacher_width: int
    student_width: int
    student_weights: int


def _vgg_groups(model: VGG) -> list[WidthGroup]:
    groups = []
    for name, module in model.features.named_children():
        if isinstance(module, MaskedConv2d):
            area = module.kernel_size[0] * module.kernel_size[1]
            groups.append(WidthGroup(((f"features.{name}", area, False),), module.nnz))
    return groups


def _resnet_groups(model: ResNet18) -> list[WidthGroup]:
    children = list(model.features.named_children())
    stem_name, stem = children[0]
    stages: list[list] = [[(f"features.{stem_name}", 9, False)]]
    nonzeros = [stem.nnz]
    blocks = [(name, block) for name, block in children if isinstance(block, BasicBlock)]
    for index, (name, block) in enumerate(blocks):
        stage = index // 2
        if stage == len(stages):
            stages.append([])
            nonzeros.append(0)
        convs = [(f"features.{name}.body.{n}", m) for n, m in block.body.named_children()
                 if isinstance(m, MaskedConv2d)]
        convs += [(f"features.{name}.shortcut.{n}", m) for n, m in block.shortcut.named_children()
                  if isinstance(m, MaskedConv2d)]
        for conv_name, conv in convs:
            # Stage 0's stem already fixes its input; otherwise a block's first conv and shortcut read the previous
            # stage's width only in the first block of a stage.
            reads_previous = index % 2 == 0 and stage > 0 and (".body.0" in conv_name or ".shortcut." in conv_name)
            area = conv.kernel_size[0] * conv.kernel_size[1]
            stages[stage].append((conv_name, area, not reads_previous))
            nonzeros[stage] += conv.nnz
    return [WidthGroup(tuple(convs), nnz) for convs, nnz in zip(stages, nonzeros)]


def width_groups(model: nn.Module) -> list[WidthGroup]:
    if isinstance(model, VGG):
        return _vgg_groups(model)
    if isinstance(model, ResNet18):
        return _resnet_groups(model)
    raise ValueError(f"design_student supports the VGG and ResNet18 families; got {type(model).__name__} (in "
                     "MobileNetV2 the expansion layers tie widths to their inputs, which this rule does not model)")


def _solve_width(group: WidthGroup, previous: int) -> float:
    """The w with  sum_own k^2 * w * w + sum_prev k^2 * previous * w = nonzeros."""
    quadratic = sum(area for _, area, own in group.convs if own)
    linear = sum(area * previous for _, area, own in group.convs if not own)
    if quadratic == 0:
        return group.nonzeros / linear
    return (-linear + math.sqrt(linear * linear + 4 * quadratic * group.nonzeros)) / (2 * quadratic)


def _round_width(width: float, multiple: int, min_width: int) -> int:
    rounded = multiple * max(1, round(width / multiple))
    return max(rounded, min_width)


def design_student(pruned_teacher: nn.Module, in_channels: int, multiple: int = 1,
                   min_width: int = 1) -> tuple[list, list[DesignRow]]:
    """(student plan, per-group report) for a pruned VGG or ResNet18 teacher."""
    if multiple < 1 or min_width < 1:
        raise ValueError(f"multiple and min_width must be >= 1, got {multiple} and {min_width}")
    groups = width_groups(pruned_teacher)
    teacher_widths = [w for w in pruned_teacher.plan if w != POOL]
    widths, rows, previous = [], [], in_channels
    for index, group in enumerate(groups):
        width = _round_width(_solve_width(group, previous), multiple, min_width)
        weights = sum(area * width * (width if own else previous) for _, area, own in group.convs)
        rows.append(DesignRow(index, ", ".join(name for name, _, _ in group.convs), group.nonzeros,
                              int(teacher_widths[index]), width, weights))
        widths.append(width)
        previous = width
    if isinstance(pruned_teacher, VGG):
        iterator = iter(widths)
        plan = [POOL if item == POOL else next(iterator) for item in pruned_teacher.plan]
    else:
        plan = widths
    return plan, rows


def format_design(rows: list[DesignRow]) -> str:
    lines = ["| group | layers | teacher width | teacher nonzeros | student width | student weights |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.group} | {r.layers} | {r.teacher_width} | {r.teacher_nonzeros} | {r.student_width} | "
                     f"{r.student_weights} |")
    return "\n".join(lines)
