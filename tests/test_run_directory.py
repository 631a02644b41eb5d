"""A run directory resumes whatever its progress and thread settings, refuses a results-changing key in one line,
and is used by one process at a time (as is a cache folder that `ptd cache` writes)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from lock_holder_worker import kill, start_holder
from pipeline_helpers import fake_fashion_mnist, tiny_run_overrides

from ptd_sparse import cli
from ptd_sparse.pipeline.run_directory import config_differences

def args(command: str, out: Path, root: Path, *extra: str) -> list[str]:
    result = [command, "--out", str(out)]
    for override in tiny_run_overrides(root) + ["teacher.epochs=1", "teacher.milestones=[]",
                                                'distill.variants=["kd_unpruned"]'] + list(extra):
        result += ["--set", override]
    return result


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("ptd: error: ")]


def test_resume_ignores_progress_and_threads_and_refuses_a_results_change_in_one_line(tmp_path, capsys):
    root = fake_fashion_mnist(tmp_path / "data", train=200, test=40)
    out = tmp_path / "run"
    assert cli.main(args("train", out, root)) == 0
    metrics = (out / "metrics.jsonl").read_text()
    threads = torch.get_num_threads()
    try:
        assert cli.main(args("train", out, root, "run.threads=1", "run.progress=true")) == 0
        assert cli.main(args("train", out, root, "run.threads=2") + ["--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert (out / "metrics.jsonl").read_text() == metrics  # resumed: the finished teacher is not trained again
    assert json.loads((out / "config.json").read_text())["run"]["threads"] == 2
    capsys.readouterr()
    assert cli.main(args("train", out, root, "teacher.lr=0.01", "run.threads=2")) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"ptd: error: {out} holds a run with another configuration (teacher.lr: 0.1 there, 0.01 here); resume it "
        "with the same configuration or choose a new --out directory"]


def test_config_differences_name_every_key_and_skip_the_harmless_ones():
    stored = {"run": {"threads": 4, "progress": True, "seeds": 3}, "teacher": {"lr": 0.1, "old_key": 1},
              "cache": {"k": 5}}
    config = {"run": {"threads": 1, "progress": False, "seeds": 2}, "teacher": {"lr": 0.1, "momentum": 0.9},
              "data": {"workers": 0, "factory": "", "mean": []}, "cache": {"k": 3}}
    # A key config.json lacks is its default: teacher.momentum (0.9) and the data.* keys agree, nothing is "absent".
    assert config_differences(stored, config) == ["run.seeds: 3 there, 2 here", "teacher.old_key: 1 there, absent here"]
    config["teacher"]["momentum"] = 0.5
    config["data"]["mean"] = [0.5]
    assert config_differences(stored, config) == ["data.mean: [] (absent: the default) there, [0.5] here",
                                                  "run.seeds: 3 there, 2 here",
                                                  "teacher.momentum: 0.9 (absent: the default) there, 0.5 here",
                                                  "teacher.old_key: 1 there, absent here"]


def test_a_run_directory_from_before_a_key_was_added_resumes(tmp_path, capsys):
    """A config.json written before the data.* keys of any dataset (and teacher.label_smoothing) existed: the run
    resumes, the keys taken at their defaults, and config.json is rewritten with them."""
    root = fake_fashion_mnist(tmp_path / "data", train=200, test=40)
    out = tmp_path / "run"
    assert cli.main(args("train", out, root)) == 0
    metrics = (out / "metrics.jsonl").read_text()
    full = json.loads((out / "config.json").read_text())
    added = ("factory", "factory_kwargs", "image_folder", "image_size", "num_classes", "mean", "std", "workers")
    old = json.loads(json.dumps(full))
    for key in added:
        del old["data"][key]
    del old["teacher"]["label_smoothing"]
    (out / "config.json").write_text(json.dumps(old))
    assert cli.main(args("train", out, root)) == 0
    assert (out / "metrics.jsonl").read_text() == metrics  # resumed: the finished teacher is not trained again
    assert json.loads((out / "config.json").read_text()) == full
    (out / "config.json").write_text(json.dumps(old))
    capsys.readouterr()
    assert cli.main(args("train", out, root, "teacher.label_smoothing=0.1")) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"ptd: error: {out} holds a run with another configuration (teacher.label_smoothing: 0.0 (absent: the "
        "default) there, 0.1 here); resume it with the same configuration or choose a new --out directory"]


def test_a_run_directory_in_use_is_refused_naming_its_holder(tmp_path, capsys):
    out = tmp_path / "run"
    holder = start_holder(out)
    try:
        assert cli.main(["train", "--out", str(out)]) == 2
    finally:
        kill(holder)
    [line] = error_lines(capsys.readouterr().err)
    assert line.startswith(f"ptd: error: {out} is in use by process {holder.pid} on ")
    assert not (out / "config.json").exists()  # refused before it read or wrote anything of the run


def test_ptd_cache_is_refused_while_another_process_holds_the_cache_folder(tmp_path, capsys):
    root = fake_fashion_mnist(tmp_path / "data", train=200, test=40)
    out = tmp_path / "run"
    assert cli.main(args("train", out, root)) == 0
    holder = start_holder(out / "cache" / "teacher")
    try:
        capsys.readouterr()
        assert cli.main(args("cache", out, root)) == 2
        [line] = error_lines(capsys.readouterr().err)
        assert f"cache/teacher is in use by process {holder.pid} on " in line
        assert not (out / "cache" / "teacher" / "manifest.json").exists()
    finally:
        kill(holder)
    assert cli.main(args("cache", out, root)) == 0  # the killed holder's lock is taken over
    assert (out / "cache" / "teacher" / "manifest.json").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # every lock released
    assert os.listdir(out / "cache" / "teacher").count(".ptd-lock") == 0
