"""Student design from a pruned teacher (docs/design.md, section 1.4).

Same depth as the teacher, fewer channels: each student layer holds about as many dense weights as the pruned
teacher layer holds nonzeros, c_out(l) = round(nnz_l / (k_l * k_l * c_in_student(l))), the first layer's c_in being
the image channels. Residual networks apply the rule per stage: all convolutions of a stage share one width w (so
the tensors they add keep equal widths), chosen so that the stage's dense student weights, a quadratic in w, equal
the stage's teacher nonzeros. Widths are rounded to a multiple, never fall below min_width and never exceed the
teacher's width. The classifier maps the last width to the classes.

Which convolutions share a width is read from the model's graph (ptd_sparse.pipeline.width_graph), so the rule
applies to any traceable CNN: the zoo's VGG and ResNet18 (whose students are built from a plan list), a
torchvision-style ResNet, a MobileNetV2 (its expansion layers keep their ratio to the stage width inside residual
blocks), networks that concatenate branches. Their students are copies of the model with rewritten widths
(ptd_sparse.pipeline.rewrite_widths).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

from torch import nn

from ptd_sparse.pipeline import width_graph
from ptd_sparse.pipeline.models import POOL, VGG, ResNet18
from ptd_sparse.pipeline.rewrite_widths import rewrite_widths


@dataclass(frozen=True)
class DesignRow:
    group: int
    layers: str
    teacher_nonzeros: int
    teacher_width: int
    student_width: int
    student_weights: int


@dataclass
class WidthDesign:
    """The solved widths of every width variable (ptd_sparse.pipeline.width_graph) and the per-group report."""

    graph: width_graph.WidthGraph
    widths: dict[int, int]  # variable -> student channels (IMAGE -> the image channels)
    rows: list[DesignRow]
    roots: list[int]  # the groups' roots, in order

    def width_map(self) -> dict:
        """What rewrite_widths needs, JSON-serialisable: every convolution's (in, out, groups), every BatchNorm's
        features and every linear layer's input features."""
        g = self.graph
        convs = {}
        for conv in g.convs:
            c_in = sum(self.widths[v] for v in conv.inputs)
            convs[conv.name] = [c_in, self.widths[conv.out], c_in if conv.depthwise else 1]
        return {"convs": convs,
                "batch_norms": {name: sum(self.widths[v] for v in parts) for name, parts in g.bns.items()},
                "linears": {name: [sum(self.widths[v] for v in parts), sum(g.teacher_width[v] for v in parts)]
                            for name, parts in g.linears.items() if parts is not None}}


def _ratio(graph: width_graph.WidthGraph, var: int, root: int) -> float:
    return graph.teacher_width[var] / graph.teacher_width[root]


def design_widths(pruned_teacher: nn.Module, in_channels: int, multiple: int = 1,
                  min_width: int = 1) -> WidthDesign:
    """Student widths of any traceable CNN: the width groups from its graph (ptd_sparse.pipeline.width_graph), then
    per group the w whose dense student weights equal the group's teacher nonzeros. A group's convolution with
    output ratio r_o (its variable's teacher width over the group's base) and input of ratio r_i in the same group
    contributes k^2 r_o r_i w^2 (a residual stage's quadratic); one reading an earlier group of solved width c
    contributes k^2 r_o c w (the linear rule of chains); a depthwise one contributes k^2 r_o w."""
    if multiple < 1 or min_width < 1:
        raise ValueError(f"multiple and min_width must be >= 1, got {multiple} and {min_width}")
    graph = width_graph.analyse(pruned_teacher, in_channels)
    widths = {width_graph.IMAGE: in_channels}
    rows, roots = [], []
    members: dict[int, list[int]] = {}
    for var in graph.parent:
        members.setdefault(graph.root(var), []).append(var)
    for index, (root, convs) in enumerate(graph.groups()):
        quadratic = linear = 0.0
        for conv in convs:
            out_ratio = conv.area * _ratio(graph, conv.out, root)
            if conv.depthwise:
                linear += out_ratio
                continue
            for var in conv.inputs:
                if graph.root(var) == root:
                    quadratic += out_ratio * _ratio(graph, var, root)
                elif var in widths:
                    linear += out_ratio * widths[var]
                else:
                    raise width_graph.WidthGraphError(
                        f"{conv.name} reads a width that is designed only after its own group (a loop between "
                        "groups); not modelled")
        nonzeros = sum(conv.nonzeros for conv in convs)
        base = nonzeros / linear if quadratic == 0 else \
            (-linear + math.sqrt(linear * linear + 4 * quadratic * nonzeros)) / (2 * quadratic)
        for var in members[root]:
            # Never wider than the teacher's layer: the rule alone can ask for that where a narrow group feeds a
            # layer with many nonzeros (a 1x1 convolution after a heavily pruned stage), and a student wider than
            # its teacher is not what "fewer channels" means. Where it does not bind the rule is unchanged.
            widths[var] = max(min(_round_width(base * _ratio(graph, var, root), multiple, min_width),
                                  graph.teacher_width[var]), min_width)
        weights = sum(conv.area * widths[conv.out] * (1 if conv.depthwise else sum(widths[v] for v in conv.inputs))
                      for conv in convs)
        rows.append(DesignRow(index, ", ".join(conv.name for conv in convs), nonzeros, graph.teacher_width[root],
                              widths[root], weights))
        roots.append(root)
    return WidthDesign(graph, widths, rows, roots)


def _round_width(width: float, multiple: int, min_width: int) -> int:
    rounded = multiple * max(1, round(width / multiple))
    return max(rounded, min_width)


@dataclass
class StudentDesign:
    """What design_student returns: the student's widths (`plan`), the per-group report (`rows`, as markdown in
    `report`) and the student itself (`module`, built on first use).

    plan: the zoo's plan list for its VGG and ResNet18 (ptd_sparse.pipeline.models.build_model takes it), a width
    map for any other model (ptd_sparse.pipeline.rewrite_widths applies it to a copy). module: a new model of the
    teacher's classes with the student's widths, freshly initialised, dense (masks all true), on the teacher's
    device; each StudentDesign builds it once. Unpacks as `plan, rows = design_student(...)`, for code that keeps
    only the plan (the pipeline stores it in design/students.json)."""

    plan: list | dict
    rows: list[DesignRow]
    teacher: nn.Module = field(repr=False)
    in_channels: int = field(repr=False)

    def __iter__(self):
        return iter((self.plan, self.rows))

    @property
    def report(self) -> str:
        return format_design(self.rows)

    @cached_property
    def module(self) -> nn.Module:
        teacher = self.teacher
        if isinstance(teacher, (VGG, ResNet18)):
            # A new zoo model from the plan, as the pipeline builds it (its `plan` attribute then says the student's).
            student = type(teacher)(self.plan, self.in_channels, teacher.classifier.out_features)
            parameter = next(teacher.parameters(), None)
            return student.to(parameter.device) if parameter is not None else student
        return rewrite_widths(teacher, self.plan)


def design_student(pruned_teacher: nn.Module, in_channels: int, multiple: int = 1,
                   min_width: int = 1) -> StudentDesign:
    """The student of a pruned teacher: StudentDesign with .module (the student, ready to train), .plan (its widths)
    and .rows / .report (per width group: teacher nonzeros, teacher and student widths, student weights). The zoo's
    VGG and ResNet18 get plan lists; any other traceable CNN a width map. Raises width_graph.WidthGraphError (a
    ValueError) with the reason when the model's widths cannot be modelled."""
    design = design_widths(pruned_teacher, in_channels, multiple, min_width)
    group_widths = [design.widths[root] for root in design.roots]
    if isinstance(pruned_teacher, VGG):
        iterator = iter(group_widths)
        plan = [POOL if item == POOL else next(iterator) for item in pruned_teacher.plan]
    elif isinstance(pruned_teacher, ResNet18):
        plan = group_widths
    else:
        plan = design.width_map()
    return StudentDesign(plan, design.rows, pruned_teacher, in_channels)


def format_design(rows: list[DesignRow]) -> str:
    lines = ["| group | layers | teacher width | teacher nonzeros | student width | student weights |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.group} | {r.layers} | {r.teacher_width} | {r.teacher_nonzeros} | {r.student_width} | "
                     f"{r.student_weights} |")
    return "\n".join(lines)
