"""The run configuration: defaults, a TOML file, then `--set section.key=value` overrides, checked key by key.

Every key has a default here (the fast Fashion-MNIST preset); configs/*.toml hold the paper's settings. Unknown
keys and wrongly typed values are errors that name the key, so a typo never silently runs the default.
"""
from __future__ import annotations

import copy
import math
import tomllib
from pathlib import Path
from typing import NamedTuple

from ptd_sparse.data import DataError
from ptd_sparse.data import check_settings as check_data_settings
from ptd_sparse.pipeline import factories
from ptd_sparse.pipeline.prune_plan import METHODS, pruning_levels

DEFAULTS = {
    # precision: the autocast dtype of training forwards ("auto": bfloat16 on GPUs, float32 on CPUs);
    # memory_format: of models and batches ("auto": channels_last on GPUs, contiguous on CPUs).
    "run": {"seed": 0, "seeds": 3, "device": "auto", "threads": 0, "progress": True, "precision": "auto",
            "memory_format": "auto",
            "tensorboard": False},  # event files per training under <run>/tensorboard (the tensorboard extra)
    # factory ("package.module:function" returning (train, test) torch Datasets, called with factory_kwargs) or
    # image_folder (a folder of train/ and test/ or val/ class subfolders, resized to image_size, 0 = the first
    # image's shorter side): the user's data, read through a DataLoader with `workers` processes instead of the
    # built-in data set `name`; mean, std ([] = computed) and num_classes (0 = inferred) are theirs only.
    "data": {"name": "fashion_mnist", "root": "", "val_fraction": 0.1, "train_subset": 30000, "batch_size": 128,
             "crop_padding": 2, "flip": True, "factory": "", "factory_kwargs": {}, "image_folder": "",
             "image_size": 0, "num_classes": 0, "mean": [], "std": [], "workers": 2},
    # model: a zoo name or a user's factory "package.module:function" called with kwargs (a table). checkpoint: a
    # model folder (`ptd import`) used as the trained teacher instead of training one ("" = train).
    # schedule: "multistep" (milestones, gamma; the paper's) or "onecycle" (warm-up over the `warmup` fraction of the
    # steps, then cosine to zero; milestones and gamma unused), see training.Schedule.
    "teacher": {"model": "vgg_fmnist", "plan": [], "kwargs": {}, "checkpoint": "", "epochs": 8, "lr": 0.1,
                "momentum": 0.9, "weight_decay": 5e-4, "schedule": "onecycle", "warmup": 0.2, "milestones": [],
                "gamma": 0.2, "label_smoothing": 0.0},
    "prune": {"targets": [0.79], "rate": 0.2, "scope": "global", "method": "lr_rewind", "skip": [],
              "epochs": 1, "lr": 0.05, "weight_decay": 2e-4, "schedule": "onecycle", "warmup": 0.2,
              "milestones": [], "gamma": 0.1, "label_smoothing": 0.0, "finetune_lr": 0.001},
    "student": {"model": "vgg_fmnist", "plan": [16, "M", 32, "M", 64, "M"], "kwargs": {}, "multiple": 1,
                "min_width": 4},
    # alpha 0.9 and T 4 for 10 classes (Hinton-style); the paper's 0.95 and 10 are for CIFAR-100 (configs/cifar100_*).
    "distill": {"alpha": 0.9, "temperature": 4.0, "epochs": 4, "lr": 0.1, "weight_decay": 5e-4,
                "schedule": "onecycle", "warmup": 0.2, "milestones": [], "gamma": 0.2,
                "variants": ["student_ce", "kd_unpruned", "kd_pruned", "designed_kd_pruned"]},
    # Teacher-logit cache (ptd_sparse.cache, docs/cache.md): `ptd cache` writes it, distillation reads it when enabled.
    # views 0 = one per distillation epoch with augmentation, 1 without; dir "" = <run>/cache.
    "cache": {"enabled": False, "dir": "", "views": 0, "form": "full", "dtype": "float16", "k": 10,
              "rest_mass": True, "batch_size": 256, "chunk": 1024, "seed": 0},
}

class Range(NamedTuple):
    """The values a numeric key admits: low and high bounds (None: unbounded), each closed (the bound itself allowed)
    or open. Every value must also be finite."""
    low: float | None
    high: float | None = None
    low_closed: bool = True
    high_closed: bool = True

    def admits(self, value) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (value == self.low and not self.low_closed)):
            return False
        return self.high is None or value < self.high or (value == self.high and self.high_closed)

    def describe(self) -> str:
        if self.high is None:
            return f"{'>=' if self.low_closed else '>'} {self.low}"
        return f"in {'[' if self.low_closed else '('}{self.low}, {self.high}{']' if self.high_closed else ')'}"


POSITIVE = Range(0, low_closed=False)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
FRACTION_OPEN = Range(0, 1, low_closed=False, high_closed=False)  # (0, 1)
FRACTION_BELOW_ONE = Range(0, 1, high_closed=False)  # [0, 1)
SEED = Range(0, 2**32 - 1)  # the data split, batch orders and cache views derive generator seeds from it

# The range of every numeric key of DEFAULTS ("section.key"); a key without one is refused at load time.
RANGES = {
    "run.seed": SEED, "run.seeds": AT_LEAST_ONE, "run.threads": NON_NEGATIVE,  # threads 0: torch's default
    "data.val_fraction": FRACTION_OPEN, "data.train_subset": NON_NEGATIVE,  # train_subset 0: the whole split
    "data.batch_size": AT_LEAST_ONE, "data.crop_padding": NON_NEGATIVE,
    "data.image_size": NON_NEGATIVE, "data.num_classes": NON_NEGATIVE, "data.workers": NON_NEGATIVE,  # 0: see above
    "teacher.epochs": AT_LEAST_ONE, "teacher.lr": POSITIVE,
    "teacher.momentum": FRACTION_OPEN,  # Nesterov momentum (training.fit) needs momentum > 0
    "teacher.weight_decay": NON_NEGATIVE, "teacher.warmup": FRACTION_BELOW_ONE, "teacher.gamma": POSITIVE,
    "teacher.label_smoothing": FRACTION_BELOW_ONE,
    "prune.rate": FRACTION_OPEN, "prune.epochs": AT_LEAST_ONE, "prune.lr": POSITIVE,
    "prune.weight_decay": NON_NEGATIVE, "prune.warmup": FRACTION_BELOW_ONE, "prune.gamma": POSITIVE,
    "prune.label_smoothing": FRACTION_BELOW_ONE, "prune.finetune_lr": POSITIVE,
    "student.multiple": AT_LEAST_ONE, "student.min_width": AT_LEAST_ONE,
    "distill.alpha": Range(0, 1), "distill.temperature": POSITIVE, "distill.epochs": AT_LEAST_ONE,
    "distill.lr": POSITIVE, "distill.weight_decay": NON_NEGATIVE, "distill.warmup": FRACTION_BELOW_ONE,
    "distill.gamma": POSITIVE,
    "cache.views": NON_NEGATIVE, "cache.k": AT_LEAST_ONE, "cache.batch_size": AT_LEAST_ONE,
    "cache.chunk": AT_LEAST_ONE, "cache.seed": SEED,  # cache.views 0: chosen from the distillation (see above)
}


VARIANTS = ("student_ce", "kd_unpruned", "kd_pruned", "designed_kd_pruned")
PRUNE_METHODS = METHODS
SCHEDULES = ("multistep", "onecycle")  # learning-rate schedules of training.Schedule
PRECISIONS = ("auto", "float32", "bfloat16")  # float16 would need loss scaling, which fit does not do
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it."""


def _check_type(key: str, value, default):
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    else:
        ok = True
    if not ok:
        raise ConfigError(f"{key} must be a {type(default).__name__}, got {value!r}")
    return value


def merge(config: dict, updates: dict, source: str) -> dict:
    for section, values in updates.items():
        if section not in DEFAULTS:
            raise ConfigError(f"{source}: unknown section [{section}]; known: {sorted(DEFAULTS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of keys")
        for key, value in values.items():
            if key not in DEFAULTS[section]:
                raise ConfigError(f"{source}: unknown key {section}.{key}; known: {sorted(DEFAULTS[section])}")
            config[section][key] = _check_type(f"{section}.{key}", value, DEFAULTS[section][key])
    return config


def parse_override(text: str) -> dict:
    """'section.key=value' (value in TOML syntax; bare words are strings) -> {section: {key: value}}."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"an override must look like section.key=value, got {text!r}")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return {section: {key: value}}


def check_ranges(config: dict) -> None:
    """Every numeric key within its range (RANGES) and finite; milestones are lists of epochs >= 1."""
    for section, values in DEFAULTS.items():
        for key, default in values.items():
            if not isinstance(default, (int, float)) or isinstance(default, bool):
                continue
            name, value = f"{section}.{key}", config[section][key]
            if name not in RANGES:
                raise ConfigError(f"{name} has no range in RANGES (ptd_sparse/pipeline/config.py)")
            allowed = RANGES[name]
            if not allowed.admits(value):
                kind = "an integer" if isinstance(default, int) else "a finite number"
                raise ConfigError(f"{name} must be {kind} {allowed.describe()}, got {value}")
        milestones = values.get("milestones")
        if milestones is not None and any(isinstance(m, bool) or not isinstance(m, int) or m < 1
                                          for m in config[section]["milestones"]):
            raise ConfigError(f"{section}.milestones must be a list of epochs (integers >= 1), got "
                              f"{config[section]['milestones']}")


def validate(config: dict) -> dict:
    check_ranges(config)
    prune, distill = config["prune"], config["distill"]
    targets = prune["targets"]
    if not targets or any(not isinstance(t, (int, float)) or not 0 < t < 1 for t in targets):
        raise ConfigError(f"prune.targets must be a non-empty list of sparsities in (0, 1), got {targets}")
    prune["targets"] = sorted(float(t) for t in targets)
    if len(set(prune["targets"])) != len(targets):
        raise ConfigError(f"prune.targets lists a sparsity twice: {targets}")
    if prune["method"] not in PRUNE_METHODS:
        raise ConfigError(f"prune.method must be one of {PRUNE_METHODS}, got {prune['method']!r}")
    if prune["scope"] not in ("global", "layer"):
        raise ConfigError(f"prune.scope must be 'global' or 'layer', got {prune['scope']!r}")
    # The plan is made now, so targets it cannot honour fail before any training rather than after all pruning.
    try:
        pruning_levels(prune["targets"], prune["rate"], prune["method"])
    except ValueError as error:
        raise ConfigError(f"prune.targets: {error}") from None
    unknown = [v for v in distill["variants"] if v not in VARIANTS]
    if unknown or not distill["variants"]:
        raise ConfigError(f"distill.variants must be chosen from {VARIANTS}, got {distill['variants']}")
    for section in ("teacher", "distill", "prune"):
        if config[section]["schedule"] not in SCHEDULES:
            raise ConfigError(f"{section}.schedule must be one of {SCHEDULES}, got {config[section]['schedule']!r}")
    if config["run"]["precision"] not in PRECISIONS:
        raise ConfigError(f"run.precision must be one of {PRECISIONS}, got {config['run']['precision']!r}")
    if config["run"]["memory_format"] not in MEMORY_FORMATS:
        raise ConfigError(f"run.memory_format must be one of {MEMORY_FORMATS}, got {config['run']['memory_format']!r}")
    for section in ("teacher", "student"):
        model = config[section]["model"]
        if ":" in model:
            factories.trust(model)  # the configuration names it: the pipeline may import it
            if config[section]["plan"]:
                raise ConfigError(f"{section}.plan must be empty for a factory model ({model}): its widths are the "
                                  f"factory's (set them with {section}.kwargs)")
        elif config[section]["kwargs"]:
            raise ConfigError(f"{section}.kwargs are for factory models (package.module:function), not {model!r}")
    try:
        check_data_settings(config["data"])
    except DataError as error:
        raise ConfigError(str(error)) from None
    c = config["cache"]
    if c["form"] not in ("full", "topk"):
        raise ConfigError(f"cache.form must be 'full' or 'topk', got {c['form']!r}")
    if c["dtype"] not in ("float16", "bfloat16", "float32"):
        raise ConfigError(f"cache.dtype must be float16, bfloat16 or float32, got {c['dtype']!r}")
    return config


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    config = copy.deepcopy(DEFAULTS)
    if path:
        try:
            with open(path, "rb") as f:
                merge(config, tomllib.load(f), str(path))
        except FileNotFoundError as error:
            raise ConfigError(f"config file {path} does not exist") from error
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config file {path} is not valid TOML: {error}") from error
    for text in overrides or []:
        merge(config, parse_override(text), f"--set {text}")
    return validate(config)
