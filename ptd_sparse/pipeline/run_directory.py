"""A run directory and what every stage of it shares: the configuration, the data set, the device, the training
contexts and schedules, the done.json markers.

Building a Run only records its directory and configuration. Run.open() (or `with Run(...) as run`) starts it: the
device and thread count, the process group under torchrun, the lock on the directory, and config.json (checked against
the one a run before this one wrote, then written); close() lets the directory go. The data set is opened when a
stage first asks for it (and data.json written then). Layout: ptd_sparse.pipeline.stages.
"""
from __future__ import annotations

import json
import weakref
from pathlib import Path

import torch

from ptd_sparse import directory_lock, distributed
from ptd_sparse.data import Augmentation, open_dataset, preprocessing
from ptd_sparse.files import write_json
from ptd_sparse.pipeline import tensorboard
from ptd_sparse.pipeline.checkpoint import read_json
from ptd_sparse.pipeline.config import DEFAULTS, Config
from ptd_sparse.pipeline.models import default_plan
from ptd_sparse.pipeline.progress import StageProgress
from ptd_sparse.pipeline.training import Context, Schedule, channels_last_for, precision_for, steps_per_epoch


class Run:
    """A run directory, held by this process group while the Run is open (directory_lock), and everything the stages
    share (configuration, data, device)."""

    def __init__(self, directory: Path, config: Config):
        self.dir = Path(directory)
        self.config = config
        self._device: torch.device | None = None
        self._dataset = None
        self._release = None

    def open(self) -> "Run":
        """Start the run: its device, the thread count, the process group (torchrun), the directory's lock, then
        config.json, refused if the directory holds a run of another configuration. Returns the Run."""
        if self._release is not None:
            return self
        settings = self.config.run
        self._device = distributed.local_device(settings.device)
        if settings.threads:
            torch.set_num_threads(settings.threads)
        distributed.setup(self._device)
        if settings.tensorboard:
            tensorboard.require()  # before any training, not after the first one
        # Held until close() (or until this Run is collected, or the process ends), before config.json is read, so
        # that a second process can neither race this one's write of it nor train into the same directory.
        lock = directory_lock.acquire(self.dir, "ptd run directory")
        self._release = weakref.finalize(self, lock.release)
        try:
            stored = self.dir / "config.json"
            config = self.config.to_dict()
            if stored.exists() and (differences := config_differences(read_json(stored), config)):
                raise ValueError(f"{self.dir} holds a run with another configuration ({'; '.join(differences)}); "
                                 "resume it with the same configuration or choose a new --out directory")
            if distributed.is_main():
                write_json(stored, config)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Let other processes use the run directory (also done when this Run is collected or the process ends)."""
        if self._release is not None:
            self._release()

    def __enter__(self) -> "Run":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def device(self) -> torch.device:
        if self._device is None:
            raise RuntimeError(f"the run in {self.dir} is not open: call open() first")
        return self._device

    @property
    def dataset(self):
        """The data set of [data]: a built-in one in memory, or the user's (data.factory, data.image_folder) streamed;
        opening it writes data.json, what a deployed model expects of its input (docs/pipeline.md, "Your data")."""
        if self._dataset is None:
            self._dataset = open_dataset(self.config.data, self.config.run.seed)
            if distributed.is_main():
                write_json(self.dir / "data.json", preprocessing(self._dataset, self.config.data))
        return self._dataset

    def context(self, seed: int, progress: StageProgress | None = None, **extra) -> Context:
        """The training context of one training of a stage; progress: the stage's bar or log."""
        data, run = self.config.data, self.config.run
        return Context(self.dataset, Augmentation(data.crop_padding, data.flip), self.device, seed,
                       run.progress, self.dir / "metrics.jsonl", extra,
                       precision_for(self.device, run.precision),
                       channels_last_for(self.device, run.memory_format), progress,
                       self.dir / tensorboard.FOLDER if run.tensorboard else None)

    def progress(self, name: str, trainings: int, section: str) -> StageProgress:
        """The progress of a stage of `trainings` trainings, each run with the schedule of `section`."""
        steps = steps_per_epoch(len(self.dataset.train), self.config.data.batch_size, distributed.world_size())
        return StageProgress(name, trainings * self.config.section(section).epochs * steps, self.config.run.progress)

    def skip(self, progress: StageProgress, section: str) -> None:
        """Count one training of `section` that was finished before this process on `progress`."""
        steps = steps_per_epoch(len(self.dataset.train), self.config.data.batch_size, distributed.world_size())
        progress.skip(self.config.section(section).epochs * steps)

    def spec(self, section: str, plan=None) -> dict:
        """The model spec (checkpoint.save_model) of the model of `section` ("teacher" or "student"), with `plan`
        instead of the configured one if given."""
        s = self.config.section(section)
        plan = plan if plan is not None else (list(s.plan) or default_plan(s.model))
        spec = {"name": s.model, "plan": plan, "in_channels": self.dataset.in_channels,
                "num_classes": self.dataset.num_classes, "image_size": self.dataset.image_size}
        if s.kwargs:  # factories only: zoo specs (and fingerprints) stay as they were
            spec["kwargs"] = dict(s.kwargs)
        return spec

    def schedule(self, section: str) -> Schedule:
        """The schedule of the training section `section` ("teacher", "prune" or "distill"); the sections without a
        momentum or label_smoothing key train with Schedule's (SGD's 0.9, none)."""
        s = self.config.section(section)
        return Schedule(s.epochs, s.lr, s.weight_decay, tuple(s.milestones), s.gamma,
                        momentum=getattr(s, "momentum", Schedule.momentum), batch_size=self.config.data.batch_size,
                        kind=s.schedule, warmup=s.warmup, label_smoothing=getattr(s, "label_smoothing", 0.0))

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
    (teacher_sources)."""
    held = {section: dict(values) for section, values in config.items() if section != "cache"}
    for dotted in RESUME_MAY_CHANGE:
        section, key = dotted.split(".")
        held.get(section, {}).pop(key, None)
    return held


def config_differences(stored: dict, config: dict) -> list[str]:
    """'section.key: <stored> there, <config> here' for every results-changing key on which a run directory's
    config.json (stored) and this configuration (Config.to_dict()) differ. A key that config.json lacks (one added
    since that run was started) held what it then had: its default, as Config.from_dict reads a missing key."""
    stored, defaulted = _with_defaults(stored, config)
    old, new = _results_config(stored), _results_config(config)
    differences = []
    for section in sorted(set(old) | set(new)):
        before, after = old.get(section, {}), new.get(section, {})
        for key in sorted(set(before) | set(after)):
            if (key in before) != (key in after) or before.get(key) != after.get(key):
                shown = _shown(before, key) + (" (absent: the default)" if f"{section}.{key}" in defaulted else "")
                differences.append(f"{section}.{key}: {shown} there, {_shown(after, key)} here")
    return differences


def _with_defaults(stored: dict, config: dict) -> tuple[dict, set[str]]:
    """`stored` with each key of `config` that it lacks set to the key's default (DEFAULTS), and those keys
    ("section.key"). Keys the configuration does not know stay as they are (and differ: absent here)."""
    filled = {section: dict(values) for section, values in stored.items()}
    defaulted = set()
    for section, values in config.items():
        for key in values:
            if key in DEFAULTS.get(section, {}) and key not in filled.get(section, {}):
                filled.setdefault(section, {})[key] = json.loads(json.dumps(DEFAULTS[section][key]))
                defaulted.add(f"{section}.{key}")
    return filled, defaulted


def _shown(values: dict, key: str) -> str:
    return json.dumps(values[key]) if key in values else "absent"
