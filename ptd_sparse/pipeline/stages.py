"""The stages of prune-then-distill, each a function over one run directory:

    train (teacher) -> prune -> design -> [cache] -> distill -> report

A stage writes its results under its own folder and a `done.json` last; a stage whose done.json exists is skipped,
and a training interrupted mid-way resumes from its per-epoch state. Layout of a run directory:
    config.json                      the resolved configuration
    data.json                        what the models expect of an image: input shape, mean and std, class names
    metrics.jsonl                    one line per epoch of every training, and stage events
    teacher/model, teacher/init      the trained teacher (and its initial weights, for weight rewinding)
    prune/round_<k>/                 the teacher after round k; prune/sparsity_<s>/ the pruned teacher of target s
    design/sparsity_<s>.json         the designed student plan and its per-group report
    cache/<teacher>/                 teacher-logit caches (`ptd cache`, when cache.enabled), teacher = teacher or
                                     sparsity_<s> (cache.dir puts them elsewhere)
    students/<variant>/seed_<n>/     each student of the comparison
    report/                          summary.md, summary.json, plots
"""
from __future__ import annotations

import json
import logging
import time
import weakref
from pathlib import Path

import torch

from ptd_sparse.pipeline import design as design_rule
from ptd_sparse import directory_lock, distributed
from ptd_sparse.pipeline import factories, prune_plan, pruning, tensorboard
from ptd_sparse.files import write_json
from ptd_sparse.pipeline.checkpoint import load_model, read_json, save_model
from ptd_sparse.data import Augmentation, check_model_fits, is_streaming, open_dataset, preprocessing
from ptd_sparse.pipeline.models import build_model, count_parameters, default_plan, prunable_layers
from ptd_sparse.pipeline.progress import StageProgress
from ptd_sparse.pipeline.training import (Context, Distillation, Schedule, channels_last_for, evaluate, fit,
                                          precision_for, steps_per_epoch)

logger = logging.getLogger("ptd_sparse.pipeline")


class Run:
    """A run directory, held by this process group while the Run is open (directory_lock), and everything the stages
    share (configuration, data, device)."""

    def __init__(self, directory: Path, config: dict):
        self.dir = Path(directory)
        self.config = config
        self.device = distributed.local_device(config["run"]["device"])
        if config["run"]["threads"]:
            torch.set_num_threads(config["run"]["threads"])
        distributed.setup(self.device)
        if config["run"]["tensorboard"]:
            tensorboard.require()  # before any training, not after the first one
        self._dataset = None
        # Held until close() (or until this Run is collected, or the process ends), before config.json is read, so
        # that a second process can neither race this one's write of it nor train into the same directory.
        lock = directory_lock.acquire(self.dir, "ptd run directory")
        self._release = weakref.finalize(self, lock.release)
        try:
            stored = self.dir / "config.json"
            if stored.exists() and (differences := config_differences(read_json(stored), config)):
                raise ValueError(f"{self.dir} holds a run with another configuration ({'; '.join(differences)}); "
                                 "resume it with the same configuration or choose a new --out directory")
            if distributed.is_main():
                write_json(stored, config)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Let other processes use the run directory (also done when this Run is collected or the process ends)."""
        self._release()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def dataset(self):
        if self._dataset is None:
            self._dataset = open_dataset(self.config["data"], self.config["run"]["seed"])
            if distributed.is_main():  # what a deployed model expects of its input (docs/pipeline.md, "Your data")
                write_json(self.dir / "data.json", preprocessing(self._dataset, self.config["data"]))
        return self._dataset

    def context(self, seed: int, progress: StageProgress | None = None, **extra) -> Context:
        """The training context of one training of a stage; progress: the stage's bar or log."""
        data, run = self.config["data"], self.config["run"]
        return Context(self.dataset, Augmentation(data["crop_padding"], data["flip"]), self.device, seed,
                       run["progress"], self.dir / "metrics.jsonl", extra,
                       precision_for(self.device, run["precision"]),
                       channels_last_for(self.device, run["memory_format"]), progress,
                       self.dir / tensorboard.FOLDER if run["tensorboard"] else None)

    def progress(self, name: str, trainings: int, section: str) -> StageProgress:
        """The progress of a stage of `trainings` trainings, each run with the schedule of `section`."""
        steps = steps_per_epoch(len(self.dataset.train), self.config["data"]["batch_size"],
                                distributed.world_size())
        return StageProgress(name, trainings * self.config[section]["epochs"] * steps,
                             self.config["run"]["progress"])

    def skip(self, progress: StageProgress, section: str) -> None:
        """Count one training of `section` that was finished before this process on `progress`."""
        steps = steps_per_epoch(len(self.dataset.train), self.config["data"]["batch_size"],
                                distributed.world_size())
        progress.skip(self.config[section]["epochs"] * steps)

    def spec(self, section: str, plan=None) -> dict:
        name = self.config[section]["model"]
        plan = plan if plan is not None else (self.config[section]["plan"] or default_plan(name))
        spec = {"name": name, "plan": plan, "in_channels": self.dataset.in_channels,
                "num_classes": self.dataset.num_classes, "image_size": self.dataset.image_size}
        if self.config[section]["kwargs"]:  # factories only: zoo specs (and fingerprints) stay as they were
            spec["kwargs"] = dict(self.config[section]["kwargs"])
        return spec

    def schedule(self, section: str) -> Schedule:
        s = self.config[section]
        milestones = s.get("milestones", [])
        return Schedule(s["epochs"], s["lr"], s["weight_decay"], tuple(milestones), s.get("gamma", 0.1),
                        momentum=s.get("momentum", Schedule.momentum),
                        batch_size=self.config["data"]["batch_size"], kind=s["schedule"], warmup=s["warmup"],
                        label_smoothing=s.get("label_smoothing", 0.0))

    def done(self, folder: Path) -> dict | None:
        marker = Path(folder) / "done.json"
        return read_json(marker) if marker.exists() else None

    def finish(self, folder: Path, result: dict) -> dict:
        if distributed.is_main():
            write_json(Path(folder) / "done.json", result)
        distributed.barrier()
        return result


# Keys a resume may change, because they change how a run is shown or how fast it goes, not what it computes.
RESUME_MAY_CHANGE = (
    "run.progress",  # progress bars or log lines (--quiet): output on the terminal only
    # The CPU threads that share each operation: the same operations on the same data, so a run interrupted on one
    # machine can finish on one with other cores; the last bits of a sum may differ with the count (docs/
    # architecture.md, "Reproducibility"), which is why a byte-identical run keeps it.
    "run.threads",
    "run.tensorboard",  # curves written beside metrics.jsonl: a record of the training, not an input to it
    "data.workers",  # processes that read a streaming data set's batches: the same batches, in the same order
)


def _results_config(config: dict) -> dict:
    """The part of a configuration that the whole run directory is held to: all of it but RESUME_MAY_CHANGE and the
    cache section. The cache section is left out so that a run trained and pruned without a cache can be distilled
    with one (`ptd cache`, `ptd distill --cache`); what it changes in a student's results is held per student instead
    (teacher_source)."""
    held = {section: dict(values) for section, values in config.items() if section != "cache"}
    for dotted in RESUME_MAY_CHANGE:
        section, key = dotted.split(".")
        held.get(section, {}).pop(key, None)
    return held


def config_differences(stored: dict, config: dict) -> list[str]:
    """'section.key: <stored> there, <config> here' for every results-changing key on which a run directory's
    config.json (stored) and this configuration differ."""
    old, new = _results_config(stored), _results_config(config)
    differences = []
    for section in sorted(set(old) | set(new)):
        before, after = old.get(section, {}), new.get(section, {})
        for key in sorted(set(before) | set(after)):
            if (key in before) != (key in after) or before.get(key) != after.get(key):
                differences.append(f"{section}.{key}: {_shown(before, key)} there, {_shown(after, key)} here")
    return differences


def _shown(values: dict, key: str) -> str:
    return json.dumps(values[key]) if key in values else "absent"


TEACHER_SOURCE_FILE = "teacher_source.json"


def teacher_source(config: dict) -> dict:
    """What a distilled student learns from beyond the run's configuration: the live teacher, or a cache whose
    settings change the loss (top-k, k, rest mass, the stored dtype) or the views it replays (views, seed). Where the
    cache lives and how it was written (dir, batch_size, chunk) change nothing and are left out."""
    c = config["cache"]
    if not c["enabled"]:
        return {"teacher": "live"}
    source = {"teacher": "cache", "form": c["form"], "dtype": c["dtype"], "views": c["views"], "seed": c["seed"]}
    if c["form"] == "topk":
        source.update(k=c["k"], rest_mass=c["rest_mass"])
    return source


def _hold_teacher_source(folder: Path, source: dict) -> None:
    """Record the teacher source of a student before it trains; refuse to resume (or skip as done) a student that
    began with another one, which would mix two losses in one training without a trace."""
    record = folder / TEACHER_SOURCE_FILE
    started = (folder / "state.pt").exists() or (folder / "done.json").exists()
    if record.exists():
        stored = read_json(record)
        if stored != source:
            raise ValueError(f"{folder} was trained against teacher source {stored}, but this configuration gives "
                             f"{source} (the [cache] section); resume it with the same cache settings or choose a "
                             "new --out directory")
    elif started:
        raise ValueError(f"{folder} holds a student without a record of its teacher source ({record}); it cannot be "
                         "resumed safely: delete the folder or choose a new --out directory")
    elif distributed.is_main():
        write_json(record, source)
    distributed.barrier()


def sparsity_name(target: float) -> str:
    return prune_plan.target_name(target)


def _imported_teacher(run: Run, folder: Path) -> dict:
    """teacher.checkpoint: a model folder (`ptd import`) stands in for training; it becomes the teacher (and the
    starting point of weight rewinding), its masks kept, so pruning continues from them."""
    source = Path(run.config["teacher"]["checkpoint"]).expanduser()
    model, spec = load_model(source, run.device)
    expected = run.spec("teacher")
    for key in ("name", "in_channels", "num_classes"):
        if spec.get(key) != expected.get(key):
            raise ValueError(f"teacher.checkpoint {source} holds {key} {spec.get(key)!r} but this run's teacher has "
                             f"{expected.get(key)!r} (teacher.model, teacher.kwargs and the data set decide it)")
    if spec.get("kwargs", {}) != expected.get("kwargs", {}):
        raise ValueError(f"teacher.checkpoint {source} was built with kwargs {spec.get('kwargs', {})} but "
                         f"teacher.kwargs are {expected.get('kwargs', {})}")
    ctx = run.context(run.config["run"]["seed"], stage="teacher")
    result = {"imported": str(source), "sparsity": pruning.achieved_sparsity(model),
              "best_val_acc": evaluate(model, ctx.dataset.val, ctx), "test_acc": evaluate(model, ctx.dataset.test, ctx),
              "epochs": 0, "parameters": count_parameters(model)}
    if distributed.is_main():
        save_model(model, folder / "init", spec)
        save_model(model, folder / "model", spec)
    return run.finish(folder, result)


def train_teacher(run: Run) -> dict:
    folder = run.dir / "teacher"
    if (result := run.done(folder)) is not None:
        return result
    if run.config["teacher"]["checkpoint"]:
        return _imported_teacher(run, folder)
    torch.manual_seed(run.config["run"]["seed"])
    spec = run.spec("teacher")
    model = build_model(**spec)
    # A factory's model may not fit the data's images or classes (the zoo's are built for them): one forward checks it
    # before any training, as it does every model on a user's data (data.factory, data.image_folder).
    if factories.is_factory(spec["name"]) or is_streaming(run.config["data"]):
        check_model_fits(model, run.dataset, "teacher.model")
    if not (folder / "init" / "model.json").exists() and distributed.is_main():
        save_model(model, folder / "init", spec)  # the starting point weight rewinding returns to
    distributed.barrier()  # every rank starts from the weights rank 0 saved
    init, _ = load_model(folder / "init")
    model.load_state_dict(init.state_dict())
    progress = run.progress("teacher", 1, "teacher")
    result = fit(model, run.context(run.config["run"]["seed"], progress, stage="teacher"), run.schedule("teacher"),
                 folder / "state.pt", "teacher")
    progress.close()
    logger.info("teacher: validation %.2f%%, test %.2f%%", 100 * result["best_val_acc"], 100 * result["test_acc"])
    result["parameters"] = count_parameters(model)
    if distributed.is_main():
        save_model(model, folder / "model", spec)
    return run.finish(folder, result)


def prune_teacher(run: Run) -> dict:
    """Iterative pruning to every target: rounds of `rate` of the remaining weights, retraining after each."""
    folder = run.dir / "prune"
    if (result := run.done(folder)) is not None:
        return result
    p = run.config["prune"]
    targets = p["targets"]
    levels = pruning.pruning_levels(targets, p["rate"], p["method"])  # every target is a level of its own
    model, spec = load_model(run.dir / "teacher" / "model")
    init, _ = load_model(run.dir / "teacher" / "init")
    results = {}
    progress = run.progress("prune", len(levels), "prune")
    for k, level in enumerate(levels, start=1):
        round_folder = folder / f"round_{k}"
        if (done := run.done(round_folder)) is not None:
            model, _ = load_model(round_folder / "model")
            results[f"round_{k}"] = done
            run.skip(progress, "prune")
            continue
        pruning.prune_to(model, level, p["scope"], p["skip"])
        if p["method"] == "weight_rewind":
            with torch.no_grad():
                for (_, layer), (_, start) in zip(prunable_layers(model), prunable_layers(init)):
                    layer.weight.copy_(start.weight * layer.mask)
        schedule = run.schedule("prune")
        if p["method"] == "finetune":
            schedule = Schedule(schedule.epochs, p["finetune_lr"], schedule.weight_decay, (), 1.0,
                                batch_size=schedule.batch_size)
        achieved = pruning.check_sparsity(model, level, p["skip"])
        table = pruning.format_table(pruning.sparsity_table(model))
        logger.info("prune round %d: sparsity %.4f\n%s", k, achieved, table)
        result = fit(model, run.context(run.config["run"]["seed"], progress, stage="prune", round=k), schedule,
                     round_folder / "state.pt", f"round {k} ({level:.2f})")
        pruning.check_sparsity(model, level, p["skip"])  # retraining must not revive pruned weights
        result.update(sparsity=achieved, round=k)
        logger.info("prune round %d (sparsity %.2f): validation %.2f%%, test %.2f%%", k, achieved,
                    100 * result["best_val_acc"], 100 * result["test_acc"])
        if distributed.is_main():
            save_model(model, round_folder / "model", spec)
            (round_folder / "sparsity.md").write_text(table + "\n")
            if level in targets:
                save_model(model, folder / sparsity_name(level) / "model", spec)
                write_json(folder / sparsity_name(level) / "layers.json",
                           [r.__dict__ for r in pruning.sparsity_table(model)])
        results[f"round_{k}"] = run.finish(round_folder, result)
    progress.close()
    return run.finish(folder, {"targets": targets, "rounds": results})


def design_students(run: Run) -> dict:
    folder = run.dir / "design"
    if (result := run.done(folder)) is not None:
        return result
    s = run.config["student"]
    designs = {}
    for target in run.config["prune"]["targets"]:
        teacher, spec = load_model(run.dir / "prune" / sparsity_name(target) / "model")
        plan, rows = design_rule.design_student(teacher, spec["in_channels"], s["multiple"], s["min_width"])
        student = build_model(spec["name"], plan, spec["in_channels"], spec["num_classes"], spec["image_size"],
                              spec.get("kwargs"))
        designs[sparsity_name(target)] = {
            "plan": plan, "teacher_nonzeros": sum(r.teacher_nonzeros for r in rows),
            "student_parameters": count_parameters(student), "rows": [r.__dict__ for r in rows],
            "table": design_rule.format_design(rows)}
        logger.info("designed student for sparsity %.2f: plan %s\n%s", target, plan, designs[sparsity_name(target)]
                    ["table"])
    if distributed.is_main():
        write_json(folder / "students.json", designs)
    return run.finish(folder, designs)


def distillation_teachers(run: Run) -> dict[str, Path]:
    """{name: model folder} of every teacher the configured variants distill from: "teacher" (the unpruned one) and
    sparsity_<s> for each pruning target."""
    variants = run.config["distill"]["variants"]
    teachers = {}
    if "kd_unpruned" in variants:
        teachers["teacher"] = run.dir / "teacher" / "model"
    if "kd_pruned" in variants or "designed_kd_pruned" in variants:
        for target in run.config["prune"]["targets"]:
            teachers[sparsity_name(target)] = run.dir / "prune" / sparsity_name(target) / "model"
    return teachers


def cache_folder(run: Run, name: str) -> Path:
    root = run.config["cache"]["dir"]
    return (Path(root).expanduser() if root else run.dir / "cache") / name


def _cache_spec(run: Run, fingerprint: str):
    """The spec of the cache this configuration writes for the teacher of `fingerprint`."""
    from ptd_sparse.cache import make_spec

    c, data = run.config["cache"], run.config["data"]
    augmentation = Augmentation(data["crop_padding"], data["flip"])
    augmenting = augmentation.crop_padding > 0 or augmentation.flip
    views = c["views"] or (run.config["distill"]["epochs"] if augmenting else 1)
    return make_spec(fingerprint, run.dataset, augmentation, views=views,
                     form=c["form"], dtype=c["dtype"], k=c["k"], temperature=run.config["distill"]["temperature"],
                     rest_mass=c["rest_mass"], seed=c["seed"], chunk=c["chunk"])


# The setting of the configuration behind each field of a cache's spec that changes what the cache holds (the chunk
# size changes only how it is written). The teacher, data set, sample and class counts come from the run itself.
_CACHE_SETTINGS = {"form": "cache.form", "dtype": "cache.dtype", "k": "cache.k", "rest_mass": "cache.rest_mass",
                   "views": "cache.views", "view_seed": "cache.seed", "crop_padding": "data.crop_padding",
                   "flip": "data.flip", "temperature": "distill.temperature"}


def _describe_data(identity: dict) -> str:
    return (f"{identity.get('name')} {identity.get('split')} ({identity.get('samples')} samples, sha256 "
            f"{str(identity.get('sha256'))[:12]})")


def _cache_differences(stored, expected, config: dict) -> list[str]:
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
                config["cache"]["views"] == 0 else ""
            differences.append(f"{_CACHE_SETTINGS[field]} is {theirs!r} in the cache but {mine!r} in the "
                               f"configuration{note}")
    return differences


def _refuse_other_cache(folder: Path, stored, expected, config: dict) -> None:
    from ptd_sparse.cache import CacheError

    differences = _cache_differences(stored, expected, config)
    if differences:
        raise CacheError(f"teacher cache {folder} was made with other settings than this configuration: "
                         f"{'; '.join(differences)}; delete it, write a cache for this configuration elsewhere "
                         "(`ptd cache` with another cache.dir), or use the cache's settings")


def _require_cache(run: Run, name: str) -> Path:
    from ptd_sparse.cache import CacheError

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
    from ptd_sparse.cache.store import read_manifest

    if not run.config["cache"]["enabled"]:
        return
    for name in distillation_teachers(run):
        folder = cache_folder(run, name)
        if (folder / "manifest.json").exists():
            stored = read_manifest(folder)[0]
            _refuse_other_cache(folder, stored, _cache_spec(run, stored.teacher), run.config)


def cache_teacher(run: Run) -> dict:
    """`ptd cache`: each teacher of the distillation run once in sparse inference form over every view of the
    training split, into cache/<teacher>/ (resumable; under torchrun every rank writes its share of the chunks)."""
    from ptd_sparse.cache import build_cache, teacher_fingerprint
    from ptd_sparse.cache.store import read_manifest

    c = run.config["cache"]
    results = {}
    for name, model_folder in distillation_teachers(run).items():
        if not (model_folder / "model.json").exists():
            raise FileNotFoundError(f"{model_folder} does not hold a teacher yet: run `ptd train` and `ptd prune` "
                                    "before `ptd cache`")
        teacher, model_spec = load_model(model_folder)
        spec = _cache_spec(run, teacher_fingerprint(teacher, model_spec))
        folder = cache_folder(run, name)
        if (folder / "manifest.json").exists():
            _refuse_other_cache(folder, read_manifest(folder)[0], spec, run.config)
        started = time.perf_counter()
        # The teacher runs in the run's precision, as it does live in distillation (bfloat16 on GPUs by default).
        autocast_dtype = precision_for(run.device, run.config["run"]["precision"])
        with directory_lock.hold(folder, "ptd cache"), torch.autocast(
                run.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            cache = build_cache(folder, teacher, run.dataset, spec, batch_size=c["batch_size"], device=run.device)
        results[name] = {"folder": str(folder), "form": spec.form, "dtype": spec.dtype, "views": spec.views,
                         "samples": spec.samples, "bytes": cache.nbytes(), "bytes_per_view": spec.bytes_per_view(),
                         "seconds": round(time.perf_counter() - started, 2)}
        logger.info("cache of %s: %s", name, results[name])
    return results


def open_cache(run: Run, name: str, teacher, model_spec: dict):
    """The cache of teacher `name`, opened and verified; refused unless it holds what this configuration would
    write (teacher, data, views, form, dtype, k, rest mass and its temperature)."""
    from ptd_sparse.cache import TeacherCache, teacher_fingerprint
    from ptd_sparse.cache.store import read_manifest

    folder = _require_cache(run, name)
    expected = _cache_spec(run, teacher_fingerprint(teacher, model_spec))
    _refuse_other_cache(folder, read_manifest(folder)[0], expected, run.config)
    return TeacherCache(folder)  # verifies every chunk's hash


def distill_students(run: Run) -> dict:
    """Every variant of the comparison, for every seed (and every target for the pruned-teacher variants)."""
    d = run.config["distill"]
    designs = read_json(run.dir / "design" / "students.json") if (run.dir / "design" / "done.json").exists() else {}
    teachers = {}  # name -> Distillation, each teacher (or its cache) read from disk once
    folders = distillation_teachers(run)
    source = teacher_source(run.config)
    check_caches(run)
    results = {}
    targets_of = {v: len(run.config["prune"]["targets"]) if v in ("kd_pruned", "designed_kd_pruned") else 1
                  for v in d["variants"]}
    progress = run.progress("distill", run.config["run"]["seeds"] * sum(targets_of.values()), "distill")
    for seed_index in range(run.config["run"]["seeds"]):
        seed = run.config["run"]["seed"] + seed_index
        for variant in d["variants"]:
            targets = run.config["prune"]["targets"] if variant in ("kd_pruned", "designed_kd_pruned") else [None]
            for target in targets:
                key = variant if target is None else f"{variant}@{target:.2f}"
                folder = run.dir / "students" / key.replace("@", "_") / f"seed_{seed}"
                _hold_teacher_source(folder, source if variant != "student_ce" else {"teacher": None})
                if (done := run.done(folder)) is not None:
                    results.setdefault(key, []).append(done)
                    run.skip(progress, "distill")
                    continue
                torch.manual_seed(seed)
                if variant == "designed_kd_pruned":
                    plan = designs[sparsity_name(target)]["plan"]
                    # A width map names the teacher's layers: that student is the teacher's model, rewritten.
                    spec = run.spec("teacher" if isinstance(plan, dict) else "student", plan)
                else:
                    spec = run.spec("student")
                student = build_model(**spec)
                if factories.is_factory(spec["name"]):
                    check_model_fits(student, run.dataset, f"the {key} student's model {spec['name']}")
                distillation = None
                if variant != "student_ce":
                    name = "teacher" if target is None else sparsity_name(target)
                    if name not in teachers:
                        teacher, model_spec = load_model(folders[name])
                        if run.config["cache"]["enabled"]:
                            teachers[name] = Distillation(None, d["alpha"], d["temperature"],
                                                          open_cache(run, name, teacher, model_spec))
                        else:
                            teachers[name] = Distillation(teacher, d["alpha"], d["temperature"])
                    distillation = teachers[name]
                result = fit(student, run.context(seed, progress, stage="distill", variant=key),
                             run.schedule("distill"), folder / "state.pt", f"{key} seed {seed}", distillation)
                logger.info("%s seed %d: validation %.2f%%, test %.2f%%", key, seed, 100 * result["best_val_acc"],
                            100 * result["test_acc"])
                result.update(variant=variant, target=target, seed=seed, parameters=count_parameters(student),
                              plan=spec["plan"])
                if distributed.is_main():
                    save_model(student, folder / "model", spec)
                results.setdefault(key, []).append(run.finish(folder, result))
    progress.close()
    return results


def run_all(run: Run) -> dict:
    """`ptd run`: every stage in order, each skipped if already done."""
    from ptd_sparse.pipeline.report import write_report

    teacher = train_teacher(run)
    prune_teacher(run)
    designs = design_students(run)
    if run.config["cache"]["enabled"]:
        cache_teacher(run)
    students = distill_students(run)
    summary = write_report(run) if distributed.is_main() else {}
    distributed.barrier()
    return {"teacher": teacher, "designs": {k: v["plan"] for k, v in designs.items()}, "students": students,
            "summary": summary}


def describe(results: dict) -> str:
    return json.dumps(results, indent=1, default=str)
