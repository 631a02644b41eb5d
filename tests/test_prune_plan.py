"""The pruning plan reaches every target exactly, colliding targets included, and is checked when the
configuration is read."""
from __future__ import annotations

import json

import pytest
from pipeline_helpers import fake_fashion_mnist, tiny_run_overrides

from ptd_sparse import cli
from ptd_sparse.pipeline import config
from ptd_sparse.pipeline.prune_plan import pruning_levels, sparsity_after


def test_levels_follow_the_paper_without_collisions():
    levels = pruning_levels([0.36, 0.59, 0.79])
    assert len(levels) == 7
    assert levels[1] == 0.36 and levels[3] == 0.59 and levels[6] == 0.79
    assert [levels[k - 1] for k in (1, 3, 5, 6)] == pytest.approx([sparsity_after(k) for k in (1, 3, 5, 6)])


@pytest.mark.parametrize("targets", [[0.36, 0.40], [0.36, 0.38, 0.40], [0.5, 0.52, 0.79], [0.3, 0.31]])
def test_colliding_targets_each_get_a_round(targets):
    """0.36 and 0.40 both are closest to round 2: the higher one gets an extra round after it."""
    levels = pruning_levels(targets)
    assert all(t in levels for t in targets)
    assert levels == sorted(set(levels))  # every round prunes further


def test_oneshot_prunes_straight_to_each_target():
    assert pruning_levels([0.36, 0.40], one_shot=True) == [0.36, 0.40]


@pytest.mark.parametrize("targets,match", [
    ("[0.361, 0.364]", "would both be written as sparsity_0.36"),
    ("[0.4, 0.4]", "lists a sparsity twice"),
])
def test_targets_the_plan_cannot_honour_are_refused_when_the_config_is_read(targets, match):
    with pytest.raises(config.ConfigError, match=match):
        config.load_config(None, [f"prune.targets={targets}"])


def test_prune_stage_writes_every_colliding_target(tmp_path):
    """Targets 0.36 and 0.40, both closest to round 2, each get a round and a model folder, and design finds both."""
    root = fake_fashion_mnist(tmp_path / "data", train=200, test=40)
    out = tmp_path / "run"
    args = []
    for override in tiny_run_overrides(root) + ["prune.targets=[0.36, 0.40]", "teacher.epochs=1",
                                                "teacher.milestones=[]"]:
        args += ["--set", override]
    for command in ("train", "prune", "design"):
        assert cli.main([command, "--out", str(out)] + args) == 0
    rounds = json.loads((out / "prune" / "done.json").read_text())["rounds"]
    assert [r["sparsity"] for r in rounds.values()] == pytest.approx([0.2, 0.36, 0.40], abs=1e-3)
    for name in ("sparsity_0.36", "sparsity_0.40"):
        assert (out / "prune" / name / "model" / "weights.safetensors").exists()
    assert set(json.loads((out / "design" / "students.json").read_text())) == {"sparsity_0.36", "sparsity_0.40"}
