"""The report's figures (PNG, matplotlib's Agg backend): student accuracy by variant with error bars, the pruned
teacher's per-layer density, and, for several pruning targets, student accuracy against teacher sparsity (the
paper's main figure in miniature). Error bars are one sample standard deviation over seeds."""
from __future__ import annotations

import math
from pathlib import Path

from ptd_sparse.pipeline.checkpoint import read_json
from ptd_sparse.pipeline.variants import VARIANTS


def draw_plots(run_dir: Path, folder: Path, summary: list[dict], targets: list[float], teacher_acc: float,
               pruned_acc: dict) -> None:
    """Write accuracy_by_variant.png, layer_density_<s>.png per target and, with several targets,
    accuracy_vs_sparsity.png into `folder`. summary: the rows of report._summarize (their "description" labels
    the variants); accuracies in %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if summary:
        _by_variant(plt, folder, summary, teacher_acc)
    for target in targets:
        layers = run_dir / "prune" / f"sparsity_{target:.2f}" / "layers.json"
        if layers.exists():
            _layer_density(plt, folder, read_json(layers), target)
    if len(targets) > 1 and summary:
        _accuracy_vs_sparsity(plt, folder, summary, teacher_acc, pruned_acc)


def _by_variant(plt, folder: Path, summary: list[dict], teacher_acc: float) -> None:
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(summary) + 2), 4.5))
    means = [s["test_acc_mean"] for s in summary]
    stds = [s["test_acc_std"] for s in summary]
    ax.bar(range(len(summary)), means, yerr=stds, capsize=5, color=[VARIANTS[s["variant"]].color for s in summary],
           error_kw={"elinewidth": 1.5})
    for i, s in enumerate(summary):  # every seed's value, so the spread is visible, not only its summary
        ax.scatter([i] * len(s["test_acc"]), s["test_acc"], color="black", s=10, zorder=3)
        ax.annotate(f"{s['test_acc_mean']:.2f}\n± {s['test_acc_std']:.2f}", (i, s["test_acc_mean"] + s["test_acc_std"]),
                    textcoords="offset points", xytext=(0, 4), ha="center", fontsize=7)
    ax.axhline(teacher_acc, color="black", linestyle="--", linewidth=1, label=f"teacher {teacher_acc:.2f}%")
    labels = [s["description"].replace(", ", ",\n") +
              (f"\n(sparsity {s['teacher_sparsity']:.2f})" if s["teacher_sparsity"] else "") +
              f"\n{s['parameters']} params" for s in summary]
    ax.set_xticks(range(len(summary)), labels, fontsize=7)
    low = min(m - s for m, s in zip(means, stds))
    high = max(max(m + s for m, s in zip(means, stds)), teacher_acc)
    margin = max(0.5, 0.25 * (high - low))
    ax.set_ylim(max(0.0, low - margin), min(100.0, high + margin))
    ax.set_ylabel("test accuracy (%)")
    seeds = sorted({s["seeds"] for s in summary})
    ax.set_title(f"Student test accuracy by variant (mean ± std over {'/'.join(map(str, seeds))} seeds)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(folder / "accuracy_by_variant.png", dpi=120)
    plt.close(fig)


def _layer_density(plt, folder: Path, rows: list[dict], target: float) -> None:
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(range(len(rows)), [r["nonzeros"] / r["total"] for r in rows], color="tab:green")
    ax.set_xticks(range(len(rows)), [r["name"].replace("features.", "f.") for r in rows], rotation=60, fontsize=7)
    ax.set_ylabel("density (nonzeros / weights)")
    ax.set_title(f"Pruned teacher, global sparsity {target:.2f}: density per layer")
    fig.tight_layout()
    fig.savefig(folder / f"layer_density_{target:.2f}.png", dpi=120)
    plt.close(fig)


def _accuracy_vs_sparsity(plt, folder: Path, summary: list[dict], teacher_acc: float, pruned_acc: dict) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant in (v for v in VARIANTS.values() if v.per_target):  # a curve over the pruning targets
        rows = sorted((s for s in summary if s["variant"] == variant.name), key=lambda s: s["teacher_sparsity"])
        if rows:
            ax.errorbar([s["teacher_sparsity"] for s in rows], [s["test_acc_mean"] for s in rows],
                        yerr=[s["test_acc_std"] for s in rows], marker="o", capsize=4, color=variant.color,
                        label=rows[0]["description"])
    points = sorted((float(t), 100 * a) for t, a in pruned_acc.items() if not math.isnan(a))
    if points:
        ax.plot(*zip(*points), marker="s", linestyle=":", color="black", label="pruned teacher")
    ax.axhline(teacher_acc, color="black", linestyle="--", linewidth=1, label="unpruned teacher")
    for variant in (v for v in VARIANTS.values() if not v.per_target):  # references independent of the sparsity
        row = next((s for s in summary if s["variant"] == variant.name), None)
        if row is not None:
            ax.axhspan(row["test_acc_mean"] - row["test_acc_std"], row["test_acc_mean"] + row["test_acc_std"],
                       color=variant.color, alpha=0.2)
            ax.axhline(row["test_acc_mean"], color=variant.color, linewidth=1, label=row["description"])
    ax.set_xlabel("teacher sparsity (fraction of weights pruned)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Student accuracy against teacher sparsity (mean ± std over seeds)")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(folder / "accuracy_vs_sparsity.png", dpi=120)
    plt.close(fig)
