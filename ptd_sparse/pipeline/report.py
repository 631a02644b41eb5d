"""The report stage: the paper's comparison as a markdown table (mean and standard deviation over seeds), the
paper's claims checked against those numbers, a JSON summary, and the plots (ptd_sparse.pipeline.plots)."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from ptd_sparse.files import write_json
from ptd_sparse.pipeline.checkpoint import read_json
from ptd_sparse.pipeline.config import Config
from ptd_sparse.pipeline.plots import draw_plots
from ptd_sparse.pipeline.variants import VARIANTS


def _collect(run_dir: Path) -> list[dict]:
    rows = []
    for done in sorted((run_dir / "students").glob("*/seed_*/done.json")):
        rows.append(read_json(done))
    return rows


def _summarize(results: list[dict], teacher: dict, prune: dict) -> list[dict]:
    """One row per (variant, teacher sparsity): the test accuracy (%) of every seed, their mean and their sample
    standard deviation (0 for one seed)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["variant"], r["target"]), []).append(r)
    order = list(VARIANTS)
    summary = []
    for (variant, target), items in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1] or 0)):
        items = sorted(items, key=lambda r: r.get("seed", 0))
        accuracies = [100 * r["test_acc"] for r in items]
        summary.append({
            "variant": variant, "description": VARIANTS[variant].label, "teacher_sparsity": target or 0.0,
            "teacher_test_acc": 100 * (teacher["test_acc"] if target is None or not VARIANTS[variant].per_target
                                       else prune[f"{target:.2f}"]),
            "parameters": items[0]["parameters"], "seeds": len(items),
            "seed_values": [r.get("seed") for r in items], "test_acc": accuracies,
            "test_acc_mean": statistics.fmean(accuracies),
            "test_acc_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0})
    return summary


def _row(summary: list[dict], variant: str, target: float | None = None) -> dict | None:
    for s in summary:
        if s["variant"] == variant and (target is None or abs(s["teacher_sparsity"] - target) < 1e-9):
            return s
    return None


def check_claims(summary: list[dict]) -> list[dict]:
    """The paper's three claims, per pruning target, as the numbers of this run decide them:

    (a) KD from the pruned teacher beats the student trained alone by more than the larger standard deviation;
    (b) KD from the pruned teacher is at least as good as KD from the unpruned teacher, within one standard deviation
        (the larger of the two);
    (c) the sparsity-designed student is within one standard deviation (the larger) of the fixed student distilled
        from the same pruned teacher, or better.

    Each entry: claim, target, difference (points), tolerance (the larger std), holds (None where a variant is
    missing or a variant has fewer than 2 seeds: one seed has no spread to judge a difference by)."""
    claims = []
    targets = sorted({s["teacher_sparsity"] for s in summary if VARIANTS[s["variant"]].per_target})
    comparisons = [("a", "kd_pruned", "student_ce", "beats the student trained alone by more than the larger std",
                    lambda diff, tol: diff > tol),
                   ("b", "kd_pruned", "kd_unpruned", "at least as good as KD from the unpruned teacher, within one std",
                    lambda diff, tol: diff >= -tol),
                   ("c", "designed_kd_pruned", "kd_pruned",
                    "designed student at least as good as the fixed one (same pruned teacher), within one std",
                    lambda diff, tol: diff >= -tol)]
    for target in targets:
        for name, variant, baseline, text, decide in comparisons:
            row = _row(summary, variant, target)
            base = _row(summary, baseline, target if VARIANTS[baseline].per_target else None)
            if row is None or base is None:
                continue
            diff = row["test_acc_mean"] - base["test_acc_mean"]
            tolerance = max(row["test_acc_std"], base["test_acc_std"])
            seeds = min(row["seeds"], base["seeds"])
            claims.append({"claim": name, "text": text, "target": target, "variant": variant, "baseline": baseline,
                           "mean": row["test_acc_mean"], "baseline_mean": base["test_acc_mean"],
                           "difference": diff, "tolerance": tolerance, "seeds": seeds,
                           "parameters": row["parameters"], "baseline_parameters": base["parameters"],
                           "holds": decide(diff, tolerance) if seeds > 1 else None})
    return claims


def _verdict(holds: bool | None) -> str:
    return {True: "holds", False: "does not hold", None: "not judged (needs >= 2 seeds)"}[holds]


def claims_markdown(claims: list[dict]) -> list[str]:
    if not claims:
        return []
    lines = ["", "## The paper's claims, on this run", "",
             "Differences of mean test accuracy in points; tolerance: the larger standard deviation of the two rows.",
             "", "| claim | teacher sparsity | variant | baseline | difference | tolerance | seeds | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for c in claims:
        lines.append(f"| ({c['claim']}) {c['text']} | {c['target']:.2f} | {c['variant']} ({c['mean']:.2f}) | "
                     f"{c['baseline']} ({c['baseline_mean']:.2f}) | {c['difference']:+.2f} | {c['tolerance']:.2f} | "
                     f"{c['seeds']} | {_verdict(c['holds'])} |")
    return lines


def _pruned_accuracies(run_dir: Path, targets: list[float]) -> dict:
    rounds = read_json(run_dir / "prune" / "done.json")["rounds"]
    by_sparsity = {f"{r['sparsity']:.2f}": r["test_acc"] for r in rounds.values()}
    return {f"{t:.2f}": by_sparsity.get(f"{t:.2f}", float("nan")) for t in targets}


def _settings_line(config: Config) -> str:
    d, t, p = config.distill, config.teacher, config.prune
    return (f"Teacher: {t.epochs} epochs ({t.schedule}); pruning: {p.method}, "
            f"{p.epochs} epoch(s) per round; students: {d.epochs} epochs ({d.schedule}), "
            f"KD alpha {d.alpha:g}, temperature {d.temperature:g}; training images: "
            f"{config.data.train_subset or 'all'}; seeds per student: {config.run.seeds}.")


def write_report(run) -> dict:
    run_dir, config = run.dir, run.config
    teacher = read_json(run_dir / "teacher" / "done.json")
    targets = list(config.prune.targets)
    prune = _pruned_accuracies(run_dir, targets)
    summary = _summarize(_collect(run_dir), teacher, prune)
    claims = check_claims(summary)
    folder = run_dir / "report"
    pruned = ", ".join(f"{float(t):.2f}: {100 * acc:.2f}%" for t, acc in prune.items() if not math.isnan(acc))
    lines = [f"# Prune, then distill: {config.data.name}, teacher {config.teacher.model} "
             f"({teacher['parameters']} parameters, test accuracy {100 * teacher['test_acc']:.2f}%)", "",
             f"Pruned teacher test accuracy by sparsity: {pruned}.", _settings_line(config),
             "Student test accuracy: mean ± sample standard deviation over seeds, then each seed's value.", "",
             "| variant | teacher sparsity | teacher test acc (%) | student parameters | test acc (%) | seeds | "
             "per seed |", "|---|---|---|---|---|---|---|"]
    table_end = len(lines) + len(summary)
    for s in summary:
        spread = f" ± {s['test_acc_std']:.2f}" if s["seeds"] > 1 else ""
        per_seed = ", ".join(f"{a:.2f}" for a in s["test_acc"])
        lines.append(f"| {s['description']} | {s['teacher_sparsity']:.2f} | {s['teacher_test_acc']:.2f} | "
                     f"{s['parameters']} | {s['test_acc_mean']:.2f}{spread} | {s['seeds']} | {per_seed} |")
    lines += claims_markdown(claims)
    designs = read_json(run_dir / "design" / "students.json") if (run_dir / "design" / "students.json").exists() \
        else {}
    for name, d in designs.items():
        # A width map (a model the zoo's plan lists cannot express) names every layer: the table shows its groups.
        plan = f"width map of {len(d['plan']['convs'])} convolutions (design/students.json)" \
            if isinstance(d["plan"], dict) else d["plan"]
        lines += ["", f"## Designed student, teacher {name.replace('_', ' ')}: plan {plan}", "", d["table"]]
    for target in targets:
        layers = run_dir / "prune" / f"sparsity_{target:.2f}" / "layers.json"
        if layers.exists():
            rows = read_json(layers)
            lines += ["", f"## Pruned teacher, sparsity {target:.2f}: per-layer density", "",
                      "| layer | weights | nonzeros | density |", "|---|---|---|---|"]
            lines += [f"| {r['name']} | {r['total']} | {r['nonzeros']} | {r['nonzeros'] / r['total']:.3f} |"
                      for r in rows]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.md").write_text("\n".join(lines) + "\n")
    write_json(folder / "summary.json", {"teacher": teacher, "pruned_teacher_test_acc": prune, "rows": summary,
                                         "claims": claims})
    draw_plots(run_dir, folder, summary, targets, 100 * teacher["test_acc"], prune)
    return {"rows": summary, "claims": claims, "markdown": "\n".join(lines[:table_end])}
