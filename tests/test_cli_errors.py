"""Every error that reaches `ptd` is one line `ptd: error: ...` on stderr and exit code 2, without a traceback
(`--debug` adds it); Ctrl-C is exit code 130 with one line."""
from __future__ import annotations

import subprocess
import sys

import pytest

from ptd_sparse import cli
from ptd_sparse.pipeline import stages


def only_line(err: str) -> str:
    """The one error line of stderr (logging may add its own lines above it), checked to come without traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("ptd: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_a_bad_set_value_is_one_line_and_exit_2_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--out", str(out), "--set", "teacher.lr=nan"]) == 2
    err = capsys.readouterr().err
    assert err == "ptd: error: teacher.lr must be a finite number > 0, got nan\n"
    assert not out.exists()  # refused at load time: no run directory, no training


def test_a_bad_set_value_through_the_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ptd_sparse.cli", "run", "--out", str(tmp_path / "run"),
                             "--set", "run.threads=-2"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert only_line(result.stderr) == "ptd: error: run.threads must be an integer >= 0, got -2"


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert cli.main(["--debug", "train", "--out", str(tmp_path / "a"), "--set", "distill.temperature=inf"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ConfigError" in err
    assert err.endswith("ptd: error: distill.temperature must be a finite number > 0, got inf\n")
    assert cli.main(["train", "--debug", "--out", str(tmp_path / "b"), "--set", "data.crop_padding=-3"]) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("error,line", [
    (FileNotFoundError("teacher/model does not hold a teacher yet"), "teacher/model does not hold a teacher yet"),
    (FileNotFoundError(2, "No such file or directory", "/x/y.pt"), "No such file or directory: /x/y.pt"),
    (KeyError("sparsity_0.50"), "missing key 'sparsity_0.50'"),
    (TypeError("a list where a dict belongs"), "a list where a dict belongs"),
    (RuntimeError("first line\nsecond line"), "first line (--debug shows the rest)"),
    (AttributeError("'NoneType' object has no attribute 'x'"),
     "AttributeError: 'NoneType' object has no attribute 'x'"),
])
def test_any_error_of_a_stage_is_one_line(tmp_path, capsys, monkeypatch, error, line):
    def fail(run):
        raise error

    monkeypatch.setattr(stages, "train_teacher", fail)
    assert cli.main(["train", "--out", str(tmp_path / "run")]) == 2
    assert only_line(capsys.readouterr().err) == f"ptd: error: {line}"


def test_the_errors_of_real_stages_and_files_are_one_line(tmp_path, capsys):
    assert cli.main(["cache", "--out", str(tmp_path / "run")]) == 2
    assert "does not hold a teacher yet" in only_line(capsys.readouterr().err)
    assert cli.main(["train", "--config", str(tmp_path / "missing.toml")]) == 2
    assert only_line(capsys.readouterr().err) == f"ptd: error: config file {tmp_path / 'missing.toml'} does not exist"
    assert cli.main(["import", str(tmp_path / "x.pt"), "--model", "vgg11", "--kwargs", "{a =",
                     "--out", str(tmp_path / "m")]) == 2
    assert only_line(capsys.readouterr().err).startswith("ptd: error: --kwargs must be a TOML inline table")
    assert cli.main(["import", str(tmp_path / "x.pt"), "--model", "vgg11", "--out", str(tmp_path / "m")]) == 2
    assert only_line(capsys.readouterr().err) == f"ptd: error: No such file or directory: {tmp_path / 'x.pt'}"


def test_ctrl_c_is_exit_130_with_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(run):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "train_teacher", interrupted)
    assert cli.main(["train", "--out", str(tmp_path / "run")]) == 130
    assert capsys.readouterr().err == "ptd: interrupted\n"
    assert not (tmp_path / "run" / ".ptd-lock").exists()  # the run directory is released on the way out
