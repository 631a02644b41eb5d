"""The stages of prune-then-distill, each a function over one open run directory (run_directory.Run):

    train (teacher) -> prune -> design -> [cache] -> distill -> report

A stage writes its results under its own folder and a `done.json` last; a stage whose done.json exists is skipped,
and a training interrupted mid-way resumes from its per-epoch state. The cache stage and the cache's use in
distillation are in caching.py, the teachers students learn from and their records in teacher_sources.py, the report
in report.py. Layout of a run directory:
    config.json                      the resolved configuration
    data.json                        what the models expect of an image: input shape, mean and std, class names
    metrics.jsonl                    one line per epoch of every training, and stage events
    teacher/model, teacher/init      the trained teacher (and its initial weights, for weight rewinding)
    prune/round_<k>/                 the teacher after round k; prune/sparsity_<s>/ the pruned teacher of target s
    design/sparsity_<s>.json         the designed student plan and its per-group report
    cache/<teacher>/                 teacher-logit caches (`ptd cache`, when cache.enabled), teacher = teacher or
                                     sparsity_<s> (cache.dir puts them elsewhere)
    students/<variant>/seed_<n>/     each student of the comparison
    report/                          summary.md, summary.json, plots
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ptd_sparse import distributed
from ptd_sparse.data import check_model_fits, is_streaming
from ptd_sparse.files import write_json
from ptd_sparse.pipeline import caching, factories, prune_plan, pruning
from ptd_sparse.pipeline import design as design_rule
from ptd_sparse.pipeline.checkpoint import load_model, read_json, save_model
from ptd_sparse.pipeline.models import build_model, count_parameters
from ptd_sparse.pipeline.report import write_report
from ptd_sparse.pipeline.run_directory import Run
from ptd_sparse.pipeline.teacher_sources import (distillation_teachers, hold_teacher_source, teacher_name,
                                                 teacher_source)
from ptd_sparse.pipeline.training import Distillation, evaluate, fit
from ptd_sparse.pipeline.variants import VARIANTS

logger = logging.getLogger("ptd_sparse.pipeline")


def sparsity_name(target: float) -> str:
    return prune_plan.target_name(target)


def _imported_teacher(run: Run, folder: Path) -> dict:
    """teacher.checkpoint: a model folder (`ptd import`) stands in for training; it becomes the teacher (and the
    starting point of weight rewinding), its masks kept, so pruning continues from them."""
    source = Path(run.config.teacher.checkpoint).expanduser()
    model, spec = load_model(source, run.device)
    expected = run.spec("teacher")
    for key in ("name", "in_channels", "num_classes"):
        if spec.get(key) != expected.get(key):
            raise ValueError(f"teacher.checkpoint {source} holds {key} {spec.get(key)!r} but this run's teacher has "
                             f"{expected.get(key)!r} (teacher.model, teacher.kwargs and the data set decide it)")
    if spec.get("kwargs", {}) != expected.get("kwargs", {}):
        raise ValueError(f"teacher.checkpoint {source} was built with kwargs {spec.get('kwargs', {})} but "
                         f"teacher.kwargs are {expected.get('kwargs', {})}")
    ctx = run.context(run.config.run.seed, stage="teacher")
    result = {"imported": str(source), "sparsity": pruning.achieved_sparsity(model),
              "best_val_acc": evaluate(model, ctx.dataset.val, ctx), "test_acc": evaluate(model, ctx.dataset.test, ctx),
              "epochs": 0, "parameters": count_parameters(model)}
    if distributed.is_main():
        save_model(model, folder / "init", spec)
        save_model(model, folder / "model", spec)
    return run.finish(folder, result)


def train_teacher(run: Run) -> dict:
    folder = run.dir / "teacher"
    if (result := run.done(folder)) is not None:
        return result
    if run.config.teacher.checkpoint:
        return _imported_teacher(run, folder)
    torch.manual_seed(run.config.run.seed)
    spec = run.spec("teacher")
    model = build_model(**spec)
    # A factory's model may not fit the data's images or classes (the zoo's are built for them): one forward checks it
    # before any training, as it does every model on a user's data (data.factory, data.image_folder).
    if factories.is_factory(spec["name"]) or is_streaming(run.config.data):
        check_model_fits(model, run.dataset, "teacher.model")
    if not (folder / "init" / "model.json").exists() and distributed.is_main():
        save_model(model, folder / "init", spec)  # the starting point weight rewinding returns to
    distributed.barrier()  # every rank starts from the weights rank 0 saved
    init, _ = load_model(folder / "init")
    model.load_state_dict(init.state_dict())
    progress = run.progress("teacher", 1, "teacher")
    result = fit(model, run.context(run.config.run.seed, progress, stage="teacher"), run.schedule("teacher"),
                 folder / "state.pt", "teacher")
    progress.close()
    logger.info("teacher: validation %.2f%%, test %.2f%%", 100 * result["best_val_acc"], 100 * result["test_acc"])
    result["parameters"] = count_parameters(model)
    if distributed.is_main():
        save_model(model, folder / "model", spec)
    return run.finish(folder, result)


def prune_teacher(run: Run) -> dict:
    """Iterative pruning to every target: rounds of `rate` of the remaining weights, retraining after each."""
    folder = run.dir / "prune"
    if (result := run.done(folder)) is not None:
        return result
    p = run.config.prune
    method = p.strategy  # prune_methods.PRUNE_METHODS[p.method]
    targets = list(p.targets)
    levels = method.levels(targets, p.rate)  # every target is a level of its own
    model, spec = load_model(run.dir / "teacher" / "model")
    init, _ = load_model(run.dir / "teacher" / "init")
    results = {}
    progress = run.progress("prune", len(levels), "prune")
    for k, level in enumerate(levels, start=1):
        round_folder = folder / f"round_{k}"
        if (done := run.done(round_folder)) is not None:
            model, _ = load_model(round_folder / "model")
            results[f"round_{k}"] = done
            run.skip(progress, "prune")
            continue
        pruning.prune_to(model, level, p.scope, list(p.skip))
        method.rewind(model, init)
        schedule = method.schedule(run.schedule("prune"), p.finetune_lr)
        achieved = pruning.check_sparsity(model, level, list(p.skip))
        table = pruning.format_table(pruning.sparsity_table(model))
        logger.info("prune round %d: sparsity %.4f\n%s", k, achieved, table)
        result = fit(model, run.context(run.config.run.seed, progress, stage="prune", round=k), schedule,
                     round_folder / "state.pt", f"round {k} ({level:.2f})")
        pruning.check_sparsity(model, level, list(p.skip))  # retraining must not revive pruned weights
        result.update(sparsity=achieved, round=k)
        logger.info("prune round %d (sparsity %.2f): validation %.2f%%, test %.2f%%", k, achieved,
                    100 * result["best_val_acc"], 100 * result["test_acc"])
        if distributed.is_main():
            save_model(model, round_folder / "model", spec)
            (round_folder / "sparsity.md").write_text(table + "\n")
            if level in targets:
                save_model(model, folder / sparsity_name(level) / "model", spec)
                write_json(folder / sparsity_name(level) / "layers.json",
                           [r.__dict__ for r in pruning.sparsity_table(model)])
        results[f"round_{k}"] = run.finish(round_folder, result)
    progress.close()
    return run.finish(folder, {"targets": targets, "rounds": results})


def design_students(run: Run) -> dict:
    folder = run.dir / "design"
    if (result := run.done(folder)) is not None:
        return result
    s = run.config.student
    designs = {}
    for target in run.config.prune.targets:
        teacher, spec = load_model(run.dir / "prune" / sparsity_name(target) / "model")
        plan, rows = design_rule.design_student(teacher, spec["in_channels"], s.multiple, s.min_width)
        student = build_model(spec["name"], plan, spec["in_channels"], spec["num_classes"], spec["image_size"],
                              spec.get("kwargs"))
        designs[sparsity_name(target)] = {
            "plan": plan, "teacher_nonzeros": sum(r.teacher_nonzeros for r in rows),
            "student_parameters": count_parameters(student), "rows": [r.__dict__ for r in rows],
            "table": design_rule.format_design(rows)}
        logger.info("designed student for sparsity %.2f: plan %s\n%s", target, plan, designs[sparsity_name(target)]
                    ["table"])
    if distributed.is_main():
        write_json(folder / "students.json", designs)
    return run.finish(folder, designs)


def _student_spec(run: Run, variant: str, target: float | None, designs: dict) -> dict:
    """The model spec of a student of `variant`: the fixed student, or the one designed from the pruned teacher of
    `target`."""
    if VARIANTS[variant].student == "designed":
        plan = designs[sparsity_name(target)]["plan"]
        # A width map names the teacher's layers: that student is the teacher's model, rewritten.
        return run.spec("teacher" if isinstance(plan, dict) else "student", plan)
    return run.spec("student")


def distill_students(run: Run) -> dict:
    """Every variant of the comparison, for every seed (and every target for the variants with a pruned teacher)."""
    d = run.config.distill
    targets = list(run.config.prune.targets)
    designs = read_json(run.dir / "design" / "students.json") if (run.dir / "design" / "done.json").exists() else {}
    teachers = {}  # name -> Distillation, each teacher (or its cache) read from disk once
    folders = distillation_teachers(run)
    source = teacher_source(run.config)
    caching.check_caches(run)
    results = {}
    targets_of = {v: targets if VARIANTS[v].per_target else [None] for v in d.variants}
    progress = run.progress("distill", run.config.run.seeds * sum(len(t) for t in targets_of.values()), "distill")
    for seed_index in range(run.config.run.seeds):
        seed = run.config.run.seed + seed_index
        for variant in d.variants:
            for target in targets_of[variant]:
                key = variant if target is None else f"{variant}@{target:.2f}"
                folder = run.dir / "students" / key.replace("@", "_") / f"seed_{seed}"
                name = teacher_name(variant, target)
                hold_teacher_source(folder, source if name is not None else {"teacher": None})
                if (done := run.done(folder)) is not None:
                    results.setdefault(key, []).append(done)
                    run.skip(progress, "distill")
                    continue
                torch.manual_seed(seed)
                spec = _student_spec(run, variant, target, designs)
                student = build_model(**spec)
                if factories.is_factory(spec["name"]):
                    check_model_fits(student, run.dataset, f"the {key} student's model {spec['name']}")
                distillation = None
                if name is not None:
                    if name not in teachers:
                        teacher, model_spec = load_model(folders[name])
                        if run.config.cache.enabled:
                            teachers[name] = Distillation(None, d.alpha, d.temperature,
                                                          caching.open_cache(run, name, teacher, model_spec))
                        else:
                            teachers[name] = Distillation(teacher, d.alpha, d.temperature)
                    distillation = teachers[name]
                result = fit(student, run.context(seed, progress, stage="distill", variant=key),
                             run.schedule("distill"), folder / "state.pt", f"{key} seed {seed}", distillation)
                logger.info("%s seed %d: validation %.2f%%, test %.2f%%", key, seed, 100 * result["best_val_acc"],
                            100 * result["test_acc"])
                result.update(variant=variant, target=target, seed=seed, parameters=count_parameters(student),
                              plan=spec["plan"])
                if distributed.is_main():
                    save_model(student, folder / "model", spec)
                results.setdefault(key, []).append(run.finish(folder, result))
    progress.close()
    return results


def run_all(run: Run) -> dict:
    """`ptd run`: every stage in order, each skipped if already done."""
    teacher = train_teacher(run)
    prune_teacher(run)
    designs = design_students(run)
    if run.config.cache.enabled:
        caching.cache_teacher(run)
    students = distill_students(run)
    summary = write_report(run) if distributed.is_main() else {}
    distributed.barrier()
    return {"teacher": teacher, "designs": {k: v["plan"] for k, v in designs.items()}, "students": students,
            "summary": summary}


def describe(results: dict) -> str:
    return json.dumps(results, indent=1, default=str)
