"""run.tensorboard = true: every training of a run (teacher, pruning rounds, students) writes its per-epoch loss,
accuracy and learning rate as TensorBoard scalars under <run>/tensorboard/<stage>/<training>, the same numbers as
metrics.jsonl. Skipped when the tensorboard extra is absent."""
from __future__ import annotations

import json

import pytest
import torch
from pipeline_helpers import fake_fashion_mnist, tiny_run_overrides

from ptd_sparse import cli
from ptd_sparse.data import Augmentation, load_dataset
from ptd_sparse.pipeline import tensorboard
from ptd_sparse.pipeline.models import build_model
from ptd_sparse.pipeline.training import Context, Schedule, fit

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_fit_writes_the_epoch_scalars_of_metrics_jsonl(tmp_path):
    root = fake_fashion_mnist(tmp_path / "data", train=200, test=50)
    ctx = Context(load_dataset("fashion_mnist", str(root)), Augmentation(2, True), torch.device("cpu"), seed=1,
                  progress=False, metrics_path=tmp_path / "metrics.jsonl", extra={"stage": "teacher"},
                  tensorboard_dir=tmp_path / "tb")
    torch.manual_seed(0)
    result = fit(build_model("vgg_fmnist", [4, "M", 4, "M"], in_channels=1, image_size=28), ctx,
                 Schedule(epochs=2, lr=0.05, weight_decay=5e-4, milestones=(1,), batch_size=64),
                 tmp_path / "state.pt", "round 2 (0.36)")
    found = scalars(tmp_path / "tb" / "teacher" / "round_2_0.36")
    assert set(found) == {"train/loss", "train/accuracy", "val/accuracy", "lr", "test/accuracy"}
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "epoch" in line]
    epochs = [line for line in lines if "train_loss" in line]
    for tag, key in tensorboard.EPOCH_TAGS.items():
        assert [step for step, _ in found[key]] == [1, 2]
        assert [value for _, value in found[key]] == pytest.approx([line[tag] for line in epochs], rel=1e-6)
    assert all(value > 0 for _, value in found["lr"])
    assert found["test/accuracy"] == [(2, pytest.approx(result["test_acc"]))]


def test_a_whole_run_writes_every_training(tmp_path):
    root = fake_fashion_mnist(tmp_path / "data")
    out = tmp_path / "run"
    args = ["run", "--out", str(out)]
    for override in tiny_run_overrides(root) + ["run.seeds=1", "run.tensorboard=true", "prune.targets=[0.36]",
                                                 "distill.variants=[\"kd_pruned\"]"]:
        args += ["--set", override]
    assert cli.main(args) == 0
    board = out / "tensorboard"
    trainings = sorted(p.parent.relative_to(board).as_posix() for p in board.rglob("events.out.tfevents.*"))
    stages = {t.split("/")[0] for t in trainings}
    assert stages == {"teacher", "prune", "distill"}, trainings
    labels = {json.loads(line)["label"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert len(set(trainings)) == len(labels)  # one folder per training of metrics.jsonl
    for training in set(trainings):
        assert {"train/loss", "train/accuracy", "val/accuracy", "lr"} <= set(scalars(board / training)), training


def test_off_by_default_and_a_clear_error_without_the_package(tmp_path, monkeypatch, capsys):
    root = fake_fashion_mnist(tmp_path / "data", train=100, test=20)
    args = ["train", "--out", str(tmp_path / "run")]
    for override in tiny_run_overrides(root) + ["teacher.epochs=1", "teacher.milestones=[]"]:
        args += ["--set", override]
    assert cli.main(args) == 0
    assert not (tmp_path / "run" / "tensorboard").exists()
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)
    capsys.readouterr()
    assert cli.main(["train", "--out", str(tmp_path / "other")] + args[3:] + ["--set", "run.tensorboard=true"]) == 2
    assert "run.tensorboard = true needs the tensorboard package" in capsys.readouterr().err
