"""The report over seeds (mean, standard deviation, error bars, the paper's claims), the one-cycle schedule, the stage
progress (a bar on a terminal, clean lines in a log), `ptd sweep`, and the curve preset at toy size."""
from __future__ import annotations

import io
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pipeline_helpers import fake_fashion_mnist, tiny_run_overrides

from ptd_sparse import cli
from ptd_sparse.data import Augmentation, load_dataset
from ptd_sparse.pipeline import config as config_module
from ptd_sparse.pipeline.models import build_model
from ptd_sparse.pipeline.progress import StageProgress
from ptd_sparse.pipeline.report import _summarize, check_claims
from ptd_sparse.pipeline.training import Context, OneCycle, Schedule, fit

ROOT = Path(__file__).resolve().parents[1]


def ptd_args(command: str, out: Path, data_root: Path, *extra: str) -> list[str]:
    args = [command, "--out", str(out)]
    for override in tiny_run_overrides(data_root) + list(extra):
        args += ["--set", override]
    return args


def student(variant, accuracy, seed, target=None, parameters=100):
    return {"variant": variant, "target": target, "test_acc": accuracy, "seed": seed, "parameters": parameters}


def claims_by_name(results):
    summary = _summarize(results, {"test_acc": 0.92}, {"0.79": 0.915})
    return summary, {c["claim"]: c for c in check_claims(summary)}


def test_claims_hold_when_the_differences_clear_the_spread():
    results = ([student("student_ce", a, s) for s, a in enumerate((0.880, 0.882, 0.884))] +
               [student("kd_unpruned", a, s) for s, a in enumerate((0.890, 0.892, 0.894))] +
               [student("kd_pruned", a, s, 0.79) for s, a in enumerate((0.889, 0.891, 0.893))] +
               [student("designed_kd_pruned", a, s, 0.79, 80) for s, a in enumerate((0.888, 0.890, 0.892))])
    summary, claims = claims_by_name(results)
    row = next(r for r in summary if r["variant"] == "kd_pruned")
    assert row["test_acc"] == pytest.approx([88.9, 89.1, 89.3]) and row["seed_values"] == [0, 1, 2]
    assert row["test_acc_mean"] == pytest.approx(89.1) and row["test_acc_std"] == pytest.approx(0.2)
    assert row["teacher_test_acc"] == pytest.approx(91.5)
    assert claims["a"]["difference"] == pytest.approx(0.9) and claims["a"]["tolerance"] == pytest.approx(0.2)
    assert claims["b"]["difference"] == pytest.approx(-0.1)  # worse, but within one std: holds
    assert claims["c"]["parameters"] == 80 and claims["c"]["baseline_parameters"] == 100
    assert [claims[k]["holds"] for k in "abc"] == [True, True, True]


def test_claims_fail_when_the_differences_are_within_or_beyond_the_spread():
    results = ([student("student_ce", a, s) for s, a in enumerate((0.880, 0.885, 0.890))] +
               [student("kd_unpruned", a, s) for s, a in enumerate((0.900, 0.901, 0.902))] +
               [student("kd_pruned", a, s, 0.79) for s, a in enumerate((0.884, 0.886, 0.888))] +
               [student("designed_kd_pruned", a, s, 0.79) for s, a in enumerate((0.870, 0.871, 0.872))])
    _, claims = claims_by_name(results)
    # (a) +0.1 points against a std of 0.5; (b) -1.5 against 0.2; (c) -1.5 against 0.2.
    assert [claims[k]["holds"] for k in "abc"] == [False, False, False]


def test_one_seed_leaves_the_claims_unjudged():
    results = [student("student_ce", 0.88, 0), student("kd_pruned", 0.89, 0, 0.79)]
    summary, claims = claims_by_name(results)
    assert summary[0]["test_acc_std"] == 0.0 and claims["a"]["holds"] is None and set(claims) == {"a"}


def test_bar_chart_draws_the_spread_as_error_bars(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from ptd_sparse.pipeline.plots import draw_plots

    drawn = {}
    original_bar, original_errorbar = Axes.bar, Axes.errorbar

    def bar(self, x, height, *args, **kwargs):
        drawn.setdefault("bar", []).append((list(height), kwargs.get("yerr")))
        return original_bar(self, x, height, *args, **kwargs)

    def errorbar(self, x, y, *args, **kwargs):
        drawn.setdefault("errorbar", []).append((list(x), list(y), kwargs.get("yerr")))
        return original_errorbar(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "bar", bar)
    monkeypatch.setattr(Axes, "errorbar", errorbar)
    results = ([student("student_ce", a, s) for s, a in enumerate((0.88, 0.89))] +
               [student("kd_pruned", a, s, t) for t in (0.36, 0.79) for s, a in enumerate((0.89, 0.91))] +
               [student("designed_kd_pruned", a, s, t) for t in (0.36, 0.79) for s, a in enumerate((0.87, 0.90))])
    summary = _summarize(results, {"test_acc": 0.92}, {"0.36": 0.92, "0.79": 0.915})
    draw_plots(tmp_path, tmp_path, summary, [0.36, 0.79], 92.0, {"0.36": 0.92, "0.79": 0.915})
    heights, errors = drawn["bar"][0]
    assert heights == pytest.approx([88.5, 90.0, 90.0, 88.5, 88.5])
    assert errors == pytest.approx([0.7071, 1.4142, 1.4142, 2.1213, 2.1213], abs=1e-4)
    # (Axes.bar draws its own error bars through errorbar too: the two curves are the last two calls.)
    (fixed_x, fixed_y, fixed_err), (designed_x, designed_y, designed_err) = drawn["errorbar"][-2:]
    assert fixed_x == designed_x == [0.36, 0.79]
    assert fixed_y == pytest.approx([90.0, 90.0]) and fixed_err == pytest.approx([1.4142, 1.4142], abs=1e-4)
    assert designed_y == pytest.approx([88.5, 88.5]) and designed_err == pytest.approx([2.1213, 2.1213], abs=1e-4)
    assert (tmp_path / "accuracy_by_variant.png").stat().st_size > 0
    assert (tmp_path / "accuracy_vs_sparsity.png").stat().st_size > 0


def test_one_cycle_rises_then_anneals_to_zero():
    cycle = OneCycle(total=100, warmup=20)
    assert cycle(0) == pytest.approx(1 / 25)
    assert cycle(10) == pytest.approx(1 / 25 + (1 - 1 / 25) / 2)
    assert cycle(20) == pytest.approx(1.0)
    assert cycle(60) == pytest.approx(0.5)
    assert cycle(100) == pytest.approx(0.0, abs=1e-12) and cycle(150) == pytest.approx(0.0, abs=1e-12)
    values = [cycle(s) for s in range(20, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_one_cycle_training_steps_per_batch_and_resumes_exactly(tmp_path):
    root = fake_fashion_mnist(tmp_path / "data", train=300, test=50)
    dataset = load_dataset("fashion_mnist", str(root))
    ctx = Context(dataset, Augmentation(2, True), torch.device("cpu"), seed=1, progress=False,
                  metrics_path=tmp_path / "metrics.jsonl")
    schedule = Schedule(epochs=3, lr=0.05, weight_decay=5e-4, batch_size=64, kind="onecycle", warmup=0.3)

    def fresh():
        torch.manual_seed(0)
        return build_model("vgg_fmnist", in_channels=1, image_size=28)

    expected = fit(fresh(), ctx, schedule, tmp_path / "a.pt", "a")
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
           if json.loads(line).get("label") == "a" and "lr" in json.loads(line)]
    assert lrs[-1] == pytest.approx(0.0, abs=1e-9) and lrs[0] > lrs[1] > lrs[2]  # stepped per batch, annealed

    def interrupt(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(fresh(), ctx, schedule, tmp_path / "b.pt", "b", on_epoch_end=interrupt)
    assert fit(fresh(), ctx, schedule, tmp_path / "b.pt", "b") == expected


def test_schedule_and_config_refuse_bad_values():
    with pytest.raises(ValueError, match="schedule kind must be one of"):
        Schedule(1, 0.1, 0.0, kind="cosine-ish")
    with pytest.raises(config_module.ConfigError, match="teacher.schedule must be one of"):
        config_module.load_config(None, ["teacher.schedule=linear"])
    with pytest.raises(config_module.ConfigError, match=r"distill.warmup must be a finite number in \[0, 1\), got 1.5"):
        config_module.load_config(None, ["distill.warmup=1.5"])


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_draws_one_bar_on_a_terminal_and_lines_in_a_log(caplog):
    terminal = _Terminal()
    progress = StageProgress("distill", 40, True, terminal)
    progress.step(20, "kd_pruned seed 0", {"loss": "0.5"})
    progress.step(20, "kd_pruned seed 0")
    progress.epoch("kd_pruned seed 0", 1, 1, {"train_loss": 0.5, "val_acc": 0.9, "seconds": 1.0})
    progress.close()
    assert "\r" in terminal.getvalue() and "40/40" in terminal.getvalue()

    log = io.StringIO()
    with caplog.at_level("INFO", logger="ptd_sparse.pipeline"):
        progress = StageProgress("distill", 40, True, log)
        progress.step(40, "kd_pruned seed 0")
        progress.epoch("kd_pruned seed 0", 1, 1, {"train_loss": 0.5, "val_acc": 0.9, "seconds": 1.0})
        progress.close()
    assert log.getvalue() == ""  # no bar drawn into a log
    messages = [r.getMessage() for r in caplog.records]
    assert "distill: kd_pruned seed 0 epoch 1/1 train_loss 0.5000 val_acc 0.9000 (1.0s)" in messages
    assert any(m.startswith("distill: done in") for m in messages)


def test_ptd_run_logs_cleanly_when_output_is_not_a_terminal(tmp_path):
    root = fake_fashion_mnist(tmp_path / "data", train=300, test=50)
    args = [sys.executable, "-m", "ptd_sparse.cli"] + ptd_args("run", tmp_path / "run", root, "run.progress=true",
                                                                "prune.targets=[0.36]", "run.seeds=2")
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\r" not in result.stderr and "\r" not in result.stdout
    lines = result.stderr.splitlines()
    assert "teacher: teacher epoch 1/2" in "\n".join(lines) and any(l.startswith("distill: done in") for l in lines)
    # one line per epoch of every training, not one per step: teacher 2 + 2 rounds + 2 seeds x 4 students
    assert sum(" epoch " in line for line in lines) == 2 + 2 + 8
    assert "## The paper's claims, on this run" in result.stdout


def test_ptd_run_with_seeds_reports_mean_std_and_claims(tmp_path):
    root = fake_fashion_mnist(tmp_path / "data", train=300, test=50)
    out = tmp_path / "run"
    assert cli.main(ptd_args("run", out, root, "prune.targets=[0.59]") + ["--seeds", "3"]) == 0
    summary = json.loads((out / "report" / "summary.json").read_text())
    for row in summary["rows"]:
        assert row["seeds"] == 3 and row["seed_values"] == [0, 1, 2] and len(row["test_acc"]) == 3
        assert row["test_acc_std"] == pytest.approx(statistics.stdev(row["test_acc"]), abs=1e-9)
    assert {c["claim"] for c in summary["claims"]} == {"a", "b", "c"}
    assert all(c["holds"] in (True, False) and c["seeds"] == 3 for c in summary["claims"])
    markdown = (out / "report" / "summary.md").read_text()
    assert " ± " in markdown and "| (a) " in markdown
    assert len(list((out / "students").glob("*/seed_*/done.json"))) == 12


def test_sweep_chooses_on_validation_only(tmp_path, capsys):
    root = fake_fashion_mnist(tmp_path / "data", train=300, test=50)
    out = tmp_path / "run"
    assert cli.main(ptd_args("sweep", out, root, "prune.targets=[0.36]") +
                    ["--temperatures", "2", "4", "--alphas", "0.9"]) == 0
    printed = capsys.readouterr().out
    assert "| T | alpha | sparsity_0.36 | teacher | mean |" in printed
    summary = json.loads((out / "sweep" / "summary.json").read_text())
    assert [(r["temperature"], r["alpha"]) for r in summary["rows"]] in ([(2.0, 0.9), (4.0, 0.9)],
                                                                          [(4.0, 0.9), (2.0, 0.9)])
    means = [r["val_acc_mean"] for r in summary["rows"]]
    assert means == sorted(means, reverse=True)
    done = [json.loads(p.read_text()) for p in (out / "sweep").glob("*/*/seed_*/done.json")]
    assert len(done) == 4 and all(d["test_acc"] is None for d in done)  # the test split is never evaluated
    # The sweep shares the run directory: `ptd run` with the same configuration reuses its teacher and pruning.
    assert cli.main(ptd_args("run", out, root, "prune.targets=[0.36]")) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for m in metrics if m.get("label") == "teacher" and m.get("event") == "finished") == 1


def test_sweep_refuses_bad_grids(tmp_path, capsys):
    root = fake_fashion_mnist(tmp_path / "data", train=300, test=50)
    assert cli.main(ptd_args("sweep", tmp_path / "run", root) + ["--alphas", "1.5"]) == 2
    assert "alphas must be" in capsys.readouterr().err


def test_curve_preset_at_toy_size(tmp_path):
    """configs/curve.toml as it is, shrunk only in data and epochs: every target is pruned, designed and distilled
    with every seed, and the report draws the accuracy-against-sparsity figure."""
    preset = config_module.load_config(ROOT / "configs" / "curve.toml")
    targets = list(preset.prune.targets)
    assert len(targets) >= 3 and preset.run.seeds >= 3
    root = fake_fashion_mnist(tmp_path / "data", train=300, test=50)
    out = tmp_path / "run"
    toy = [f"data.root={json.dumps(str(root))}", "data.train_subset=0", "data.batch_size=100", "teacher.epochs=1",
           "prune.epochs=1", "distill.epochs=1", "run.progress=false", "run.seeds=2"]
    args = ["run", "--config", str(ROOT / "configs" / "curve.toml"), "--out", str(out)]
    for override in toy:
        args += ["--set", override]
    assert cli.main(args) == 0
    summary = json.loads((out / "report" / "summary.json").read_text())
    for variant in ("kd_pruned", "designed_kd_pruned"):
        rows = [r for r in summary["rows"] if r["variant"] == variant]
        assert [r["teacher_sparsity"] for r in rows] == targets and all(r["seeds"] == 2 for r in rows)
    designs = json.loads((out / "design" / "students.json").read_text())
    sizes = [designs[f"sparsity_{t:.2f}"]["student_parameters"] for t in targets]
    assert sizes == sorted(sizes, reverse=True)  # a sparser teacher designs a smaller student
    assert (out / "report" / "accuracy_vs_sparsity.png").stat().st_size > 0
