"""What the students of a run learn from: the teachers the configured variants distill from, and the record of the
teacher source (the live teacher, or a cache with the settings that change the loss) each student was trained
against, so that a half-trained student never resumes against another one silently."""
from __future__ import annotations

from pathlib import Path

from ptd_sparse import distributed
from ptd_sparse.files import write_json
from ptd_sparse.pipeline.checkpoint import read_json
from ptd_sparse.pipeline.config import Config
from ptd_sparse.pipeline.run_directory import Run
from ptd_sparse.pipeline.prune_plan import target_name
from ptd_sparse.pipeline.variants import VARIANTS

TEACHER_SOURCE_FILE = "teacher_source.json"


def teacher_name(variant: str, target: float | None) -> str | None:
    """The teacher a student of `variant` learns from ("teacher": the unpruned one; sparsity_<s>: the pruned one of
    target s), None for a student trained alone."""
    teacher = VARIANTS[variant].teacher
    if teacher is None:
        return None
    return "teacher" if teacher == "unpruned" else target_name(target)


def distillation_teachers(run: Run) -> dict[str, Path]:
    """{name: model folder} of every teacher the configured variants distill from: "teacher" (the unpruned one) and
    sparsity_<s> for each pruning target."""
    teachers = {}
    chosen = [VARIANTS[name] for name in run.config.distill.variants]
    if any(v.teacher == "unpruned" for v in chosen):
        teachers["teacher"] = run.dir / "teacher" / "model"
    if any(v.teacher == "pruned" for v in chosen):
        for target in run.config.prune.targets:
            teachers[target_name(target)] = run.dir / "prune" / target_name(target) / "model"
    return teachers


def teacher_source(config: Config) -> dict:
    """What a distilled student learns from beyond the run's configuration: the live teacher, or a cache whose
    settings change the loss (top-k, k, rest mass, the stored dtype) or the views it replays (views, seed). Where the
    cache lives and how it was written (dir, batch_size, chunk) change nothing and are left out."""
    c = config.cache
    if not c.enabled:
        return {"teacher": "live"}
    source = {"teacher": "cache", "form": c.form, "dtype": c.dtype, "views": c.views, "seed": c.seed}
    if c.form == "topk":
        source.update(k=c.k, rest_mass=c.rest_mass)
    return source


def hold_teacher_source(folder: Path, source: dict) -> None:
    """Record the teacher source of a student before it trains; refuse to resume (or skip as done) a student that
    began with another one, which would mix two losses in one training without a trace."""
    record = folder / TEACHER_SOURCE_FILE
    started = (folder / "state.pt").exists() or (folder / "done.json").exists()
    if record.exists():
        stored = read_json(record)
        if stored != source:
            raise ValueError(f"{folder} was trained against teacher source {stored}, but this configuration gives "
                             f"{source} (the [cache] section); resume it with the same cache settings or choose a "
                             "new --out directory")
    elif started:
        raise ValueError(f"{folder} holds a student without a record of its teacher source ({record}); it cannot be "
                         "resumed safely: delete the folder or choose a new --out directory")
    elif distributed.is_main():
        write_json(record, source)
    distributed.barrier()
