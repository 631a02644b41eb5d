"""A half-trained student never resumes against another teacher source (the [cache] section) silently."""
from __future__ import annotations

import json
import re

from pipeline_helpers import fake_fashion_mnist, short_distill_args as args

from ptd_sparse import cli
from ptd_sparse.pipeline import stages
from ptd_sparse.pipeline.config import load_config
from ptd_sparse.pipeline.teacher_sources import TEACHER_SOURCE_FILE, teacher_source


def test_teacher_source_holds_what_changes_a_students_results():
    live = teacher_source(load_config(None, ["cache.form=topk", "cache.k=3"]))
    assert live == {"teacher": "live"}  # cache settings matter only when the cache is used
    full = teacher_source(load_config(None, ["cache.enabled=true"]))
    moved = teacher_source(load_config(None, ["cache.enabled=true", 'cache.dir="/elsewhere"', "cache.chunk=7"]))
    assert full == moved
    topk = teacher_source(load_config(None, ["cache.enabled=true", "cache.form=topk", "cache.k=3"]))
    assert topk != full and topk["k"] == 3


def test_half_trained_student_refuses_another_cache_configuration(tmp_path, monkeypatch, capsys):
    root = fake_fashion_mnist(tmp_path / "data", train=200, test=40)
    out = tmp_path / "run"
    assert cli.main(args("train", out, root)) == 0
    assert cli.main(args("cache", out, root, "cache.form=topk", "cache.k=3")) == 0

    def stop_after_first_epoch(epoch):
        raise KeyboardInterrupt

    fit = stages.fit
    monkeypatch.setattr(stages, "fit", lambda *a, **k: fit(*a, **k, on_epoch_end=stop_after_first_epoch))
    assert cli.main(args("distill", out, root)) == 130  # the live teacher, interrupted after epoch 1
    monkeypatch.setattr(stages, "fit", fit)
    student = out / "students" / "kd_unpruned" / "seed_0"
    assert (student / "state.pt").exists() and not (student / "done.json").exists()

    capsys.readouterr()
    assert cli.main(args("distill", out, root, "cache.enabled=true", "cache.form=topk", "cache.k=3")) == 2
    assert re.search("was trained against teacher source .*'live'.* but this configuration gives .*'topk'",
                     capsys.readouterr().err)
    assert not (student / "done.json").exists()

    assert cli.main(args("distill", out, root)) == 0  # the same source resumes
    assert json.loads((student / TEACHER_SOURCE_FILE).read_text()) == {"teacher": "live"}
    assert json.loads((student / "done.json").read_text())["epochs"] == 2
