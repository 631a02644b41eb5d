"""`ptd` end to end on small synthetic data in the real file formats: the whole run, resume after an interruption
(in process and by killing the process), DDP with two CPU processes, and the errors of bad configs."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pipeline_helpers import fake_fashion_mnist, tiny_run_overrides

from ptd_sparse import cli
from ptd_sparse.pipeline import config as config_module
from ptd_sparse.pipeline import stages
from ptd_sparse.data import Augmentation, load_dataset
from ptd_sparse.pipeline.models import build_model
from ptd_sparse.pipeline.training import Context, Schedule, fit


def ptd_args(command: str, out: Path, data_root: Path, *extra: str) -> list[str]:
    args = [command, "--out", str(out)]
    for override in tiny_run_overrides(data_root) + list(extra):
        args += ["--set", override]
    return args


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ptd_run_end_to_end_and_rerun_does_nothing(tmp_path, capsys):
    root = fake_fashion_mnist(tmp_path / "data")
    out = tmp_path / "run"
    assert cli.main(ptd_args("run", out, root)) == 0
    printed = capsys.readouterr().out
    assert "sparsity-designed student, KD from the pruned teacher" in printed
    summary = json.loads((out / "report" / "summary.json").read_text())
    variants = [(r["variant"], r["teacher_sparsity"]) for r in summary["rows"]]
    assert variants == [("student_ce", 0.0), ("kd_unpruned", 0.0), ("kd_pruned", 0.36), ("kd_pruned", 0.59),
                        ("designed_kd_pruned", 0.36), ("designed_kd_pruned", 0.59)]
    for name in ("accuracy_by_variant.png", "layer_density_0.36.png", "accuracy_vs_sparsity.png", "summary.md"):
        assert (out / "report" / name).stat().st_size > 0
    # The pruned teachers meet their targets and the designed students are smaller for the sparser teacher.
    designs = json.loads((out / "design" / "students.json").read_text())
    assert designs["sparsity_0.59"]["student_parameters"] < designs["sparsity_0.36"]["student_parameters"]
    # Two short epochs on 540 images: the teacher must at least be well above chance (0.1).
    assert json.loads((out / "teacher" / "done.json").read_text())["test_acc"] > 0.2
    lines = len(metrics(out))
    assert cli.main(ptd_args("run", out, root)) == 0
    assert len(metrics(out)) == lines  # everything was done already


def test_run_directory_refuses_another_configuration(tmp_path, capsys):
    root = fake_fashion_mnist(tmp_path / "data")
    assert cli.main(ptd_args("train", tmp_path / "run", root)) == 0
    capsys.readouterr()
    assert cli.main(ptd_args("train", tmp_path / "run", root, "teacher.lr=0.01")) == 2
    assert "holds a run with another configuration (teacher.lr: 0.1 there, 0.01 here)" in capsys.readouterr().err


def test_fit_resumes_exactly_where_it_stopped(tmp_path):
    root = fake_fashion_mnist(tmp_path / "data", train=300, test=50)
    dataset = load_dataset("fashion_mnist", str(root))
    ctx = Context(dataset, Augmentation(2, True), torch.device("cpu"), seed=1, progress=False,
                  metrics_path=tmp_path / "metrics.jsonl")
    schedule = Schedule(epochs=3, lr=0.05, weight_decay=5e-4, milestones=(2,), batch_size=64)

    def fresh():
        torch.manual_seed(0)
        return build_model("vgg_fmnist", in_channels=1, image_size=28)

    uninterrupted = fresh()
    expected = fit(uninterrupted, ctx, schedule, tmp_path / "a.pt", "a")

    def interrupt(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(fresh(), ctx, schedule, tmp_path / "b.pt", "b", on_epoch_end=interrupt)
    resumed = fresh()
    result = fit(resumed, ctx, schedule, tmp_path / "b.pt", "b")
    assert result == expected
    for key, value in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value)
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"event": "resumed", "label": "b", "epoch": 1} in events


def test_killed_run_resumes(tmp_path):
    root = fake_fashion_mnist(tmp_path / "data")
    out = tmp_path / "run"
    args = [sys.executable, "-m", "ptd_sparse.cli"] + ptd_args("train", out, root, "teacher.epochs=12",
                                                                "teacher.milestones=[]")
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "teacher" / "state.pt"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert state.exists() and not (out / "teacher" / "done.json").exists()
    assert subprocess.run(args, capture_output=True).returncode == 0
    records = metrics(out)
    assert any(r.get("event") == "resumed" for r in records)
    assert json.loads((out / "teacher" / "done.json").read_text())["epochs"] == 12
    assert not list((out / "teacher").glob(".*.tmp"))  # no half-written file is left behind


def test_ddp_with_two_cpu_processes(tmp_path):
    root = fake_fashion_mnist(tmp_path / "data")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "ptd_sparse.cli"] + ptd_args("train", out, root)
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    epochs = [r for r in metrics(out) if "epoch" in r and "event" not in r]
    assert [r["epoch"] for r in epochs] == [1, 2]  # written once, by rank 0
    assert json.loads((out / "teacher" / "done.json").read_text())["epochs"] == 2


def test_cli_errors_exit_cleanly(tmp_path, capsys):
    assert cli.main(["run", "--out", str(tmp_path / "x"), "--set", "distill.alpha=2"]) == 2
    assert "ptd: error: distill.alpha must be a finite number in [0, 1], got 2" in capsys.readouterr().err
    assert cli.main(["train", "--out", str(tmp_path / "y"), "--set", f'data.root="{tmp_path}"']) == 2
    assert "apt-get install -y dataset-fashion-mnist" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_loads():
    ds = load_dataset("fashion_mnist", None, train_subset=1000)
    assert ds.train.images.shape == (1000, 1, 28, 28) and len(ds.test) == 10000 and len(ds.val) == 6000


def test_default_config_is_the_fast_preset():
    cfg = config_module.load_config(Path(__file__).parent.parent / "configs" / "default.toml")
    defaults = config_module.load_config(None)
    # The preset turns the teacher-logit cache on (its students share each teacher's forwards); the library default
    # leaves it off, so that `ptd distill` alone never needs a `ptd cache` first. It also trains in channels_last,
    # measured faster for its small CNNs on CPUs, where the library's "auto" stays contiguous for every model.
    # Everything else is the same.
    assert cfg.cache.enabled and not defaults.cache.enabled
    assert cfg.run.memory_format == "channels_last" and defaults.run.memory_format == "auto"
    same = dataclasses.replace(cfg, cache=defaults.cache,
                               run=dataclasses.replace(cfg.run, memory_format=defaults.run.memory_format))
    assert same == defaults
    assert cfg.run.seeds >= 3
    assert stages.sparsity_name(0.79) == "sparsity_0.79"


@pytest.mark.parametrize("method", ["weight_rewind", "finetune", "oneshot"])
def test_other_pruning_methods(tmp_path, method):
    root = fake_fashion_mnist(tmp_path / "data", train=300, test=50)
    out = tmp_path / "run"
    assert cli.main(ptd_args("train", out, root, f"prune.method={method}", "prune.targets=[0.5]")) == 0
    assert cli.main(ptd_args("prune", out, root, f"prune.method={method}", "prune.targets=[0.5]")) == 0
    rounds = json.loads((out / "prune" / "done.json").read_text())["rounds"]
    assert len(rounds) == (1 if method == "oneshot" else 3)  # 1 - 0.8^3 = 0.488 is closest to 0.5
    assert list(rounds.values())[-1]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    if method == "weight_rewind":  # the surviving weights restart from the teacher's initial values
        from ptd_sparse.pipeline.checkpoint import load_model

        init, _ = load_model(out / "teacher" / "init")
        first_round, _ = load_model(out / "prune" / "round_1" / "model")
        assert not torch.equal(init.features[0].weight, first_round.features[0].weight)  # retrained after rewind


def test_report_shows_mean_and_spread_over_seeds(tmp_path):
    from ptd_sparse.pipeline.report import _summarize

    results = [{"variant": "student_ce", "target": None, "test_acc": acc, "parameters": 10} for acc in (0.8, 0.9)]
    (row,) = _summarize(results, {"test_acc": 0.95}, {})
    assert row["seeds"] == 2 and row["test_acc_mean"] == pytest.approx(85.0)
    assert row["test_acc_std"] == pytest.approx(7.0711, abs=1e-3)
