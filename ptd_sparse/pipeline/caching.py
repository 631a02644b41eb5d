"""The pipeline's use of the teacher-logit cache (ptd_sparse.cache, docs/cache.md): `ptd cache` (cache_teacher)
writes one cache per teacher of the distillation under cache/<teacher>/ (cache.dir puts them elsewhere), with the
settings of the [cache] section; distillation opens them (open_cache), and refuses one written with other settings
than this configuration's, naming each setting that differs."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ptd_sparse import directory_lock
from ptd_sparse.cache import CacheError, TeacherCache, build_cache, make_spec, teacher_fingerprint
from ptd_sparse.cache.store import read_manifest
from ptd_sparse.data import Augmentation
from ptd_sparse.pipeline.checkpoint import load_model
from ptd_sparse.pipeline.config import Config
from ptd_sparse.pipeline.run_directory import Run
from ptd_sparse.pipeline.teacher_sources import distillation_teachers
from ptd_sparse.pipeline.training import precision_for

logger = logging.getLogger("ptd_sparse.pipeline")


def cache_folder(run: Run, name: str) -> Path:
    root = run.config.cache.dir
    return (Path(root).expanduser() if root else run.dir / "cache") / name


def cache_spec(run: Run, fingerprint: str):
    """The spec of the cache this configuration writes for the teacher of `fingerprint`."""
    c, data = run.config.cache, run.config.data
    augmentation = Augmentation(data.crop_padding, data.flip)
    augmenting = augmentation.crop_padding > 0 or augmentation.flip
    views = c.views or (run.config.distill.epochs if augmenting else 1)
    return make_spec(fingerprint, run.dataset, augmentation, views=views,
                     form=c.form, dtype=c.dtype, k=c.k, temperature=run.config.distill.temperature,
                     rest_mass=c.rest_mass, seed=c.seed, chunk=c.chunk)


# The setting of the configuration behind each field of a cache's spec that changes what the cache holds (the chunk
# size changes only how it is written). The teacher, data set, sample and class counts come from the run itself.
_CACHE_SETTINGS = {"form": "cache.form", "dtype": "cache.dtype", "k": "cache.k", "rest_mass": "cache.rest_mass",
                   "views": "cache.views", "view_seed": "cache.seed", "crop_padding": "data.crop_padding",
                   "flip": "data.flip", "temperature": "distill.temperature"}


def _describe_data(identity: dict) -> str:
    return (f"{identity.get('name')} {identity.get('split')} ({identity.get('samples')} samples, sha256 "
            f"{str(identity.get('sha256'))[:12]})")


def cache_differences(stored, expected, config: Config) -> list[str]:
    """What differs between the spec of an existing cache and the one this configuration gives, each as the setting,
    the cache's value and the configuration's value; fields that follow from another difference are left out
    (a full cache against top-k differs in k too)."""
    if stored.teacher != expected.teacher:
        return [f"the teacher: the cache was made from the teacher with fingerprint {stored.teacher[:12]}, this run's "
                f"teacher has {expected.teacher[:12]} (retrained, pruned again or another run)"]
    if (stored.dataset, stored.samples, stored.classes) != (expected.dataset, expected.samples, expected.classes):
        return [f"the data set: the cache holds {_describe_data(stored.dataset)}, the configuration gives "
                f"{_describe_data(expected.dataset)} (the data.* settings)"]
    fields = ["form", "dtype", "views", "view_seed", "crop_padding", "flip"]
    if stored.form == expected.form == "topk":
        fields += ["k", "rest_mass"]
        if stored.rest_mass == expected.rest_mass and expected.rest_mass:
            fields.append("temperature")
    elif stored.form != expected.form:
        fields = ["form"]
    differences = []
    for field in fields:
        mine, theirs = getattr(expected, field), getattr(stored, field)
        same = abs(mine - theirs) <= 1e-12 * max(1.0, abs(mine)) if field == "temperature" else mine == theirs
        if not same:
            note = " (cache.views = 0: one view per distillation epoch)" if field == "views" and \
                config.cache.views == 0 else ""
            differences.append(f"{_CACHE_SETTINGS[field]} is {theirs!r} in the cache but {mine!r} in the "
                               f"configuration{note}")
    return differences


def _refuse_other_cache(folder: Path, stored, expected, config: Config) -> None:
    differences = cache_differences(stored, expected, config)
    if differences:
        raise CacheError(f"teacher cache {folder} was made with other settings than this configuration: "
                         f"{'; '.join(differences)}; delete it, write a cache for this configuration elsewhere "
                         "(`ptd cache` with another cache.dir), or use the cache's settings")


def _require_cache(run: Run, name: str) -> Path:
    folder = cache_folder(run, name)
    if not (folder / "manifest.json").exists() and not (folder / "layout.json").exists():
        raise CacheError(f"no teacher cache for {name} in {folder}: run `ptd cache` first (with the same --cache "
                         "and configuration), or distill without cache.enabled")
    return folder


def check_caches(run: Run) -> None:
    """Before any student records its teacher source: every complete cache the distillation may read was made with
    this configuration's settings, so a refusal leaves no record behind that would block the corrected command. A
    missing or unfinished cache is reported when a student needs it (students already done need none); the
    teacher's fingerprint and the chunks' hashes are checked as each cache is opened."""
    if not run.config.cache.enabled:
        return
    for name in distillation_teachers(run):
        folder = cache_folder(run, name)
        if (folder / "manifest.json").exists():
            stored = read_manifest(folder)[0]
            _refuse_other_cache(folder, stored, cache_spec(run, stored.teacher), run.config)


def cache_teacher(run: Run) -> dict:
    """`ptd cache`: each teacher of the distillation run once in sparse inference form over every view of the
    training split, into cache/<teacher>/ (resumable; under torchrun every rank writes its share of the chunks)."""
    results = {}
    for name, model_folder in distillation_teachers(run).items():
        if not (model_folder / "model.json").exists():
            raise FileNotFoundError(f"{model_folder} does not hold a teacher yet: run `ptd train` and `ptd prune` "
                                    "before `ptd cache`")
        teacher, model_spec = load_model(model_folder)
        spec = cache_spec(run, teacher_fingerprint(teacher, model_spec))
        folder = cache_folder(run, name)
        if (folder / "manifest.json").exists():
            _refuse_other_cache(folder, read_manifest(folder)[0], spec, run.config)
        started = time.perf_counter()
        # The teacher runs in the run's precision, as it does live in distillation (bfloat16 on GPUs by default).
        autocast_dtype = precision_for(run.device, run.config.run.precision)
        with directory_lock.hold(folder, "ptd cache"), torch.autocast(
                run.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            cache = build_cache(folder, teacher, run.dataset, spec, batch_size=run.config.cache.batch_size,
                                device=run.device)
        results[name] = {"folder": str(folder), "form": spec.form, "dtype": spec.dtype, "views": spec.views,
                         "samples": spec.samples, "bytes": cache.nbytes(), "bytes_per_view": spec.bytes_per_view(),
                         "seconds": round(time.perf_counter() - started, 2)}
        logger.info("cache of %s: %s", name, results[name])
    return results


def open_cache(run: Run, name: str, teacher, model_spec: dict):
    """The cache of teacher `name`, opened and verified; refused unless it holds what this configuration would
    write (teacher, data, views, form, dtype, k, rest mass and its temperature)."""
    folder = _require_cache(run, name)
    expected = cache_spec(run, teacher_fingerprint(teacher, model_spec))
    _refuse_other_cache(folder, read_manifest(folder)[0], expected, run.config)
    return TeacherCache(folder)  # verifies every chunk's hash
