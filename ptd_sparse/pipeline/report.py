"""The report stage: the paper's comparison as a markdown table, a JSON summary and PNG plots."""
from __future__ import annotations

import statistics
from pathlib import Path

from ptd_sparse.files import write_json
from ptd_sparse.pipeline.checkpoint import read_json

DESCRIPTIONS = {
    "student_ce": "student, no KD",
    "kd_unpruned": "student, KD from the unpruned teacher",
    "kd_pruned": "student, KD from the pruned teacher",
    "designed_kd_pruned": "sparsity-designed student, KD from the pruned teacher",
}


def _collect(run_dir: Path) -> list[dict]:
    rows = []
    for done in sorted((run_dir / "students").glob("*/seed_*/done.json")):
        rows.append(read_json(done))
    return rows


def _summarize(results: list[dict], teacher: dict, prune: dict) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["variant"], r["target"]), []).append(r)
    order = list(DESCRIPTIONS)
    summary = []
    for (variant, target), items in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1] or 0)):
        accuracies = [100 * r["test_acc"] for r in items]
        summary.append({
            "variant": variant, "description": DESCRIPTIONS[variant], "teacher_sparsity": target or 0.0,
            "teacher_test_acc": 100 * (teacher["test_acc"] if target is None or variant == "kd_unpruned"
                                       else prune[f"{target:.2f}"]),
            "parameters": items[0]["parameters"], "seeds": len(items),
            "test_acc_mean": statistics.fmean(accuracies),
            "test_acc_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0})
    return summary


def _pruned_accuracies(run_dir: Path, targets: list[float]) -> dict:
    rounds = read_json(run_dir / "prune" / "done.json")["rounds"]
    by_sparsity = {f"{r['sparsity']:.2f}": r["test_acc"] for r in rounds.values()}
    return {f"{t:.2f}": by_sparsity.get(f"{t:.2f}", float("nan")) for t in targets}


def write_report(run) -> dict:
    run_dir, config = run.dir, run.config
    teacher = read_json(run_dir / "teacher" / "done.json")
    targets = config["prune"]["targets"]
    prune = _pruned_accuracies(run_dir, targets)
    summary = _summarize(_collect(run_dir), teacher, prune)
    folder = run_dir / "report"
    lines = [f"# Prune, then distill: {config['data']['name']}, teacher {config['teacher']['model']} "
             f"({teacher['parameters']} parameters, test accuracy {100 * teacher['test_acc']:.2f}%)", "",
             "| variant | teacher sparsity | teacher test acc (%) | student parameters | test acc (%) | seeds |",
             "|---|---|---|---|---|---|"]
    for s in summary:
        spread = f" ± {s['test_acc_std']:.2f}" if s["seeds"] > 1 else ""
        lines.append(f"| {s['description']} | {s['teacher_sparsity']:.2f} | {s['teacher_test_acc']:.2f} | "
                     f"{s['parameters']} | {s['test_acc_mean']:.2f}{spread} | {s['seeds']} |")
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
    write_json(folder / "summary.json", {"teacher": teacher, "pruned_teacher_test_acc": prune, "rows": summary})
    _plots(run_dir, folder, summary, targets)
    return {"rows": summary, "markdown": "\n".join(lines[:4 + len(summary)])}


def _plots(run_dir: Path, folder: Path, summary: list[dict], targets: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{s['variant']}" + (f"\n@{s['teacher_sparsity']:.2f}" if s["teacher_sparsity"] else "")
              for s in summary]
    ax.bar(range(len(summary)), [s["test_acc_mean"] for s in summary],
           yerr=[s["test_acc_std"] for s in summary], color="tab:blue", capsize=4)
    ax.set_xticks(range(len(summary)), labels, fontsize=8)
    low = min(s["test_acc_mean"] for s in summary)
    ax.set_ylim(max(0, low - 5), 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Student accuracy by variant")
    fig.tight_layout()
    fig.savefig(folder / "accuracy_by_variant.png", dpi=120)
    plt.close(fig)

    for target in targets:
        layers = run_dir / "prune" / f"sparsity_{target:.2f}" / "layers.json"
        if not layers.exists():
            continue
        rows = read_json(layers)
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.bar(range(len(rows)), [r["nonzeros"] / r["total"] for r in rows], color="tab:green")
        ax.set_xticks(range(len(rows)), [r["name"].replace("features.", "f.") for r in rows], rotation=60,
                      fontsize=7)
        ax.set_ylabel("density (nonzeros / weights)")
        ax.set_title(f"Pruned teacher, global sparsity {target:.2f}: density per layer")
        fig.tight_layout()
        fig.savefig(folder / f"layer_density_{target:.2f}.png", dpi=120)
        plt.close(fig)

    if len(targets) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant in ("kd_pruned", "designed_kd_pruned"):
            points = sorted((s["teacher_sparsity"], s["test_acc_mean"]) for s in summary if s["variant"] == variant)
            if points:
                ax.plot(*zip(*points), marker="o", label=DESCRIPTIONS[variant])
        ax.set_xlabel("teacher sparsity")
        ax.set_ylabel("student test accuracy (%)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "accuracy_vs_sparsity.png", dpi=120)
        plt.close(fig)
