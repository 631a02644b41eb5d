"""The student variants of the comparison, one registry shared by the configuration (distill.variants), the distill
stage, the report and the plots.

A variant is a student and what it learns from: trained alone, or distilled from the unpruned teacher, or from the
pruned teacher of each pruning target (one student per target); the student is the fixed one (student.model and
student.plan) or the one designed from the pruned teacher it learns from (design/). Adding a variant is one more
`register(Variant(...))` below; the stages, the report and the plots read its fields, never its name.
"""
from __future__ import annotations

from dataclasses import dataclass

TEACHERS = (None, "unpruned", "pruned")  # None: no teacher (cross-entropy alone)
STUDENTS = ("fixed", "designed")


@dataclass(frozen=True)
class Variant:
    """name: its key in distill.variants and its folder under students/; label: its description in the report and
    the plots' legends; teacher: None, "unpruned" or "pruned" (one student per pruning target); student: "fixed" or
    "designed" (the plan designed from that pruned teacher); color: its colour in the plots."""
    name: str
    label: str
    teacher: str | None
    student: str
    color: str

    @property
    def distilled(self) -> bool:
        return self.teacher is not None

    @property
    def per_target(self) -> bool:
        """One student per pruning target (its teacher is the pruned teacher of that target)."""
        return self.teacher == "pruned"


VARIANTS: dict[str, Variant] = {}  # in the order of the report's table


def register(variant: Variant) -> Variant:
    if variant.teacher not in TEACHERS:
        raise ValueError(f"variant {variant.name}: teacher must be one of {TEACHERS}, got {variant.teacher!r}")
    if variant.student not in STUDENTS:
        raise ValueError(f"variant {variant.name}: student must be one of {STUDENTS}, got {variant.student!r}")
    if variant.student == "designed" and not variant.per_target:
        raise ValueError(f"variant {variant.name}: a designed student is designed from a pruned teacher "
                         "(teacher='pruned')")
    if variant.name in VARIANTS:
        raise ValueError(f"variant {variant.name} is registered twice")
    VARIANTS[variant.name] = variant
    return variant


register(Variant("student_ce", "student, no KD", None, "fixed", "tab:gray"))
register(Variant("kd_unpruned", "student, KD from the unpruned teacher", "unpruned", "fixed", "tab:blue"))
register(Variant("kd_pruned", "student, KD from the pruned teacher", "pruned", "fixed", "tab:orange"))
register(Variant("designed_kd_pruned", "sparsity-designed student, KD from the pruned teacher", "pruned", "designed",
                 "tab:green"))
