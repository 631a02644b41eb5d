"""The typed configuration: frozen sections, config.json written and read back unchanged, the registries of student
variants and pruning methods as the only lists of names, and a Run that does nothing until it is opened."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ptd_sparse.pipeline import config, prune_methods, variants
from ptd_sparse.pipeline.report import _summarize
from ptd_sparse.pipeline.run_directory import Run
from ptd_sparse.pipeline.training import Schedule


def test_sections_are_frozen_and_typed():
    cfg = config.load_config(None, ["prune.targets=[0.59, 0.36]", "teacher.milestones=[2, 3]", "distill.alpha=1"])
    assert cfg.prune.targets == (0.36, 0.59) and cfg.teacher.milestones == (2, 3)
    assert cfg.distill.alpha == 1.0 and isinstance(cfg.distill.alpha, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.teacher.lr = 1.0
    with pytest.raises(config.ConfigError, match="teacher.lr must be a finite number > 0, got -1.0"):
        dataclasses.replace(cfg.teacher, lr=-1)  # a section built in Python is checked as a loaded one is


def test_config_json_round_trip_and_an_existing_one_loads(tmp_path):
    cfg = config.load_config(None, ["prune.targets=[0.36, 0.59]", 'student.plan=[8, "M"]', "cache.enabled=true"])
    assert config.Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # A config.json as the dict-based configuration wrote it: the same keys and JSON values.
    stored = {"run": {"seed": 0, "seeds": 3, "device": "auto", "threads": 0, "progress": True, "precision": "auto",
                      "memory_format": "auto", "tensorboard": False},
              "prune": {"targets": [0.36, 0.59], "method": "lr_rewind"}, "student": {"plan": [8, "M"]},
              "cache": {"enabled": True}}
    assert config.Config.from_dict(stored) == cfg
    with pytest.raises(config.ConfigError, match="unknown key teacher.nope"):
        config.Config.from_dict({"teacher": {"nope": 1}})


def test_defaults_and_ranges_are_views_of_the_sections():
    assert config.DEFAULTS == config.Config().to_dict()
    assert config.RANGES["distill.temperature"] == config.POSITIVE


def test_a_numeric_key_without_a_range_is_refused_where_it_is_declared():
    with pytest.raises(TypeError, match="every numeric key has a range"):
        @config.section("extra")
        class Extra(config.Section):
            steps: int = config.setting(3)
    assert "extra" not in config.SECTIONS


def test_a_registered_variant_is_admitted_and_labelled(monkeypatch):
    extra = variants.Variant("kd_pruned_again", "student, KD from the pruned teacher (again)", "pruned", "fixed",
                             "tab:red")
    monkeypatch.setitem(variants.VARIANTS, extra.name, extra)
    cfg = config.load_config(None, ['distill.variants=["kd_pruned_again", "student_ce"]'])
    assert cfg.distill.variants == ("kd_pruned_again", "student_ce")
    results = [{"variant": "kd_pruned_again", "target": 0.79, "test_acc": 0.5, "parameters": 1},
               {"variant": "student_ce", "target": None, "test_acc": 0.4, "parameters": 1}]
    rows = _summarize(results, {"test_acc": 0.9}, {"0.79": 0.8})
    assert [r["description"] for r in rows] == ["student, no KD", extra.label]
    assert rows[1]["teacher_test_acc"] == pytest.approx(80.0)  # its teacher is the pruned one


def test_variants_are_checked_when_registered():
    with pytest.raises(ValueError, match="designed from a pruned teacher"):
        variants.register(variants.Variant("designed_alone", "x", None, "designed", "tab:red"))
    with pytest.raises(ValueError, match="registered twice"):
        variants.register(variants.VARIANTS["kd_pruned"])


def test_a_registered_prune_method_is_admitted(monkeypatch):
    with pytest.raises(config.ConfigError, match=r"prune.method must be one of \('lr_rewind', "):
        config.load_config(None, ["prune.method=gradual"])
    monkeypatch.setitem(prune_methods.PRUNE_METHODS, "gradual", prune_methods.PruneMethod())
    assert config.load_config(None, ["prune.method=gradual"]).prune.strategy is prune_methods.PRUNE_METHODS["gradual"]


def test_prune_methods_levels_and_schedules():
    prune = config.Config().prune
    methods = prune_methods.PRUNE_METHODS
    assert methods["oneshot"].levels([0.36, 0.59], 0.2) == [0.36, 0.59]
    assert len(methods["lr_rewind"].levels([0.59], 0.2)) == 4
    base = Schedule(3, 0.1, 5e-4, (1,), 0.2, batch_size=64, kind="onecycle")
    assert methods["lr_rewind"].schedule(base, prune.finetune_lr) is base
    tuned = methods["finetune"].schedule(base, 0.001)
    assert (tuned.lr, tuned.milestones, tuned.gamma, tuned.kind, tuned.batch_size) == (0.001, (), 1.0, "multistep", 64)


def test_a_run_does_nothing_until_it_is_opened(tmp_path):
    threads = torch.get_num_threads()
    run = Run(tmp_path / "run", config.load_config(None, [f"run.threads={threads + 1}"]))
    assert not (tmp_path / "run").exists() and torch.get_num_threads() == threads
    with pytest.raises(RuntimeError, match="not open"):
        run.device
    try:
        with run:
            assert json.loads((tmp_path / "run" / "config.json").read_text()) == run.config.to_dict()
            assert torch.get_num_threads() == threads + 1 and isinstance(run.device, torch.device)
    finally:
        torch.set_num_threads(threads)
