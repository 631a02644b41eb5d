"""`ptd distill` (and `ptd cache`) refuse an existing teacher cache made with other settings than the configuration's,
in one sentence naming the setting, the cache's value and the configuration's value, before any student is touched:
`--set cache.form=topk` on a full-logit cache must not train on full logits and record the result as top-k."""
from __future__ import annotations

import re

import pytest
from pipeline_helpers import fake_fashion_mnist, short_distill_args as args, tiny_run_overrides

from ptd_sparse import cli
from ptd_sparse.cache import CacheError
from ptd_sparse.pipeline import caching
from ptd_sparse.pipeline.run_directory import Run
from ptd_sparse.pipeline.config import load_config


def refusal(argv: list[str], capsys) -> str:
    """The one-sentence refusal of a CLI command (exit code 2 and stderr, or the CacheError it raises)."""
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except CacheError as error:
        return str(error)
    assert code == 2, f"`ptd {argv[0]}` was not refused (exit code {code})"
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def run_with_caches(tmp_path_factory):
    """A trained teacher with two caches: the default full fp16 one (2 views: one per epoch, augmenting; seed 0),
    and a top-3 one with rest mass in cache.dir=<topk>."""
    tmp = tmp_path_factory.mktemp("cache_settings")
    root, out = fake_fashion_mnist(tmp / "data", train=200, test=40), tmp / "run"
    assert cli.main(args("train", out, root)) == 0
    assert cli.main(args("cache", out, root)) == 0
    topk = f'cache.dir="{tmp / "topk"}"'
    assert cli.main(args("cache", out, root, topk, "cache.form=topk", "cache.k=3")) == 0
    return root, out, topk


FULL_CACHE_MISMATCHES = [
    (["cache.form=topk", "cache.k=3"], "cache.form is 'full' in the cache but 'topk' in the configuration"),
    (['cache.dtype="float32"'], "cache.dtype is 'float16' in the cache but 'float32' in the configuration"),
    (["cache.views=3"], "cache.views is 2 in the cache but 3 in the configuration"),
    (["cache.seed=5"], "cache.seed is 0 in the cache but 5 in the configuration"),
    (["cache.seed=5", "cache.views=1"], "cache.views is 2 .* but 1 .*; cache.seed is 0 in the cache but 5"),
]
TOPK_CACHE_MISMATCHES = [
    (["cache.form=full"], "cache.form is 'topk' in the cache but 'full' in the configuration"),
    (["cache.form=topk", "cache.k=4"], "cache.k is 3 in the cache but 4 in the configuration"),
    (["cache.form=topk", "cache.k=3", "cache.rest_mass=false"],
     "cache.rest_mass is True in the cache but False in the configuration"),
]


@pytest.mark.parametrize("command", ["distill", "cache"])
@pytest.mark.parametrize("cache, overrides, message",
                         [("full", *case) for case in FULL_CACHE_MISMATCHES] +
                         [("topk", *case) for case in TOPK_CACHE_MISMATCHES],
                         ids=[f"full-{'-'.join(c[0])}" for c in FULL_CACHE_MISMATCHES] +
                             [f"topk-{'-'.join(c[0])}" for c in TOPK_CACHE_MISMATCHES])
def test_a_cache_of_other_settings_is_refused_naming_the_setting(run_with_caches, capsys, command, cache, overrides,
                                                                 message):
    root, out, topk = run_with_caches
    extra = ["cache.enabled=true"] + ([topk] if cache == "topk" else []) + overrides
    text = refusal(args(command, out, root, *extra), capsys)
    assert "was made with other settings than this configuration" in text
    assert len(text.strip().splitlines()) == 1
    assert re.search(message, text), text
    assert not (out / "students").exists()  # nothing recorded: the corrected command is not blocked


def test_the_corrected_command_distills_from_the_cache(run_with_caches, capsys):
    root, out, topk = run_with_caches
    refusal(args("distill", out, root, "cache.enabled=true", "cache.form=topk", "cache.k=3"), capsys)
    assert cli.main(args("distill", out, root, "cache.enabled=true")) == 0
    assert (out / "students" / "kd_unpruned" / "seed_0" / "done.json").exists()
    # Students already done need no cache: the distillation is complete without one.
    (out / "cache").rename(out / "cache_aside")
    try:
        assert cli.main(args("distill", out, root, "cache.enabled=true")) == 0
    finally:
        (out / "cache_aside").rename(out / "cache")


def test_views_zero_names_its_rule_and_another_teacher_is_named(run_with_caches, tmp_path):
    root, out, topk = run_with_caches
    from ptd_sparse.cache.store import read_manifest

    stored = read_manifest(out / "cache" / "teacher")[0]
    run = Run(tmp_path / "other", load_config(None, tiny_run_overrides(root) + [
        "teacher.epochs=1", "teacher.milestones=[]", "distill.epochs=3", 'distill.variants=["kd_unpruned"]',
        "cache.enabled=true"]))
    expected = caching.cache_spec(run, stored.teacher)
    assert caching.cache_differences(stored, expected, run.config) == [
        "cache.views is 2 in the cache but 3 in the configuration (cache.views = 0: one view per distillation epoch)"]
    other_teacher = caching.cache_spec(run, "f" * 64)
    assert caching.cache_differences(stored, other_teacher, run.config)[0].startswith(
        f"the teacher: the cache was made from the teacher with fingerprint {stored.teacher[:12]}")
