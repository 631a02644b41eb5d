"""`ptd sweep`: choose the distillation temperature and alpha on the validation split, never on the test split.

For every (T, alpha) of a grid, the fixed student is distilled from the pruned teacher (the sparsest target) and,
unless `teachers` says otherwise, from the unpruned teacher too, with the run's distillation schedule and seeds
run.seed, run.seed + 1, ...; each training keeps its best validation accuracy and never evaluates the test split
(fit(test=False)). The table ranks the settings by their validation accuracy averaged over teachers and seeds, so
the choice is one that distils well in general, not one tuned to favour the pruned teacher. The teacher and its
pruning are the run's own (trained first if missing): sweeping in the run directory of a later `ptd run` with the same
configuration shares them. Layout: <run>/sweep/<teacher>/T_<t>_alpha_<a>/seed_<n>/ (done.json, as every training).
"""
from __future__ import annotations

import logging
import statistics

import torch

from ptd_sparse import distributed
from ptd_sparse.files import write_json
from ptd_sparse.pipeline import caching, stages
from ptd_sparse.pipeline.checkpoint import load_model
from ptd_sparse.pipeline.models import build_model
from ptd_sparse.pipeline.run_directory import Run
from ptd_sparse.pipeline.training import Distillation, fit

logger = logging.getLogger("ptd_sparse.pipeline")


def _setting_name(temperature: float, alpha: float) -> str:
    return f"T_{temperature:g}_alpha_{alpha:g}"


def sweep_distillation(run: Run, temperatures: list[float], alphas: list[float], seeds: int = 1,
                       teachers: tuple[str, ...] = ("pruned", "unpruned")) -> dict:
    """Distil the fixed student for every (temperature, alpha) and teacher; returns {"rows": [...], "table": str},
    rows ranked best first by mean validation accuracy (%)."""
    if not temperatures or any(t <= 0 for t in temperatures):
        raise ValueError(f"temperatures must be a non-empty list of values > 0, got {temperatures}")
    if not alphas or any(not 0 <= a <= 1 for a in alphas):
        raise ValueError(f"alphas must be a non-empty list of values in [0, 1], got {alphas}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    unknown = [t for t in teachers if t not in ("pruned", "unpruned")]
    if unknown or not teachers:
        raise ValueError(f"teachers must be chosen from ('pruned', 'unpruned'), got {teachers}")
    stages.train_teacher(run)
    target = max(run.config.prune.targets)
    folders = {}
    if "pruned" in teachers:
        stages.prune_teacher(run)
        folders[stages.sparsity_name(target)] = run.dir / "prune" / stages.sparsity_name(target) / "model"
    if "unpruned" in teachers:
        folders["teacher"] = run.dir / "teacher" / "model"
    grid = [(t, a) for t in temperatures for a in alphas]
    progress = run.progress("sweep", len(grid) * len(folders) * seeds, "distill")
    spec = run.spec("student")
    records = []
    for name, model_folder in folders.items():
        teacher, model_spec = load_model(model_folder)
        cache = None
        if run.config.cache.enabled:  # a full-logit cache serves every temperature
            caching.cache_teacher(run)
            cache = caching.open_cache(run, name, teacher, model_spec)
        for temperature, alpha in grid:
            for index in range(seeds):
                seed = run.config.run.seed + index
                folder = run.dir / "sweep" / name / _setting_name(temperature, alpha) / f"seed_{seed}"
                if (done := run.done(folder)) is None:
                    torch.manual_seed(seed)
                    student = build_model(**spec)
                    distillation = Distillation(None if cache is not None else teacher, alpha, temperature, cache)
                    result = fit(student, run.context(seed, progress, stage="sweep", teacher=name,
                                                      temperature=temperature, alpha=alpha),
                                 run.schedule("distill"), folder / "state.pt",
                                 f"{name} T={temperature:g} alpha={alpha:g} seed {seed}", distillation, test=False)
                    result.update(teacher=name, temperature=temperature, alpha=alpha, seed=seed)
                    done = run.finish(folder, result)
                    logger.info("sweep %s T=%g alpha=%g seed %d: validation %.2f%%", name, temperature, alpha, seed,
                                100 * done["best_val_acc"])
                else:
                    run.skip(progress, "distill")
                records.append(done)
    progress.close()
    rows = _rank(records, grid, list(folders))
    table = _table(rows, list(folders), seeds)
    if distributed.is_main():
        write_json(run.dir / "sweep" / "summary.json", {"rows": rows, "teachers": list(folders), "seeds": seeds})
        (run.dir / "sweep" / "summary.md").write_text(table + "\n")
    return {"rows": rows, "table": table}


def _rank(records: list[dict], grid: list[tuple], teachers: list[str]) -> list[dict]:
    rows = []
    for temperature, alpha in grid:
        mine = [r for r in records if r["temperature"] == temperature and r["alpha"] == alpha]
        per_teacher = {name: statistics.fmean(100 * r["best_val_acc"] for r in mine if r["teacher"] == name)
                       for name in teachers}
        rows.append({"temperature": temperature, "alpha": alpha, "per_teacher": per_teacher,
                     "val_acc_mean": statistics.fmean(100 * r["best_val_acc"] for r in mine)})
    return sorted(rows, key=lambda r: -r["val_acc_mean"])


def _table(rows: list[dict], teachers: list[str], seeds: int) -> str:
    lines = [f"Validation accuracy (%) of the fixed student, mean over {seeds} seed(s); best first.", "",
             "| T | alpha | " + " | ".join(teachers) + " | mean |", "|---|---|" + "---|" * (len(teachers) + 1)]
    for r in rows:
        lines.append(f"| {r['temperature']:g} | {r['alpha']:g} | " +
                     " | ".join(f"{r['per_teacher'][t]:.2f}" for t in teachers) + f" | {r['val_acc_mean']:.2f} |")
    return "\n".join(lines)
