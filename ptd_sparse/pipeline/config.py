"""The run configuration: defaults, a TOML file, then `--set section.key=value` overrides, checked key by key.

Every key has a default here (the fast Fashion-MNIST preset); configs/*.toml hold the paper's settings. Unknown
keys and wrongly typed values are errors that name the key, so a typo never silently runs the default.
"""
from __future__ import annotations

import copy
import tomllib
from pathlib import Path

from ptd_sparse.pipeline import factories
from ptd_sparse.pipeline.prune_plan import METHODS, pruning_levels

DEFAULTS = {
    # precision: the autocast dtype of training forwards ("auto": bfloat16 on GPUs, float32 on CPUs);
    # memory_format: of models and batches ("auto": channels_last on GPUs, contiguous on CPUs).
    "run": {"seed": 0, "seeds": 3, "device": "auto", "threads": 0, "progress": True, "precision": "auto",
            "memory_format": "auto",
            "tensorboard": False},  # event files per training under <run>/tensorboard (the tensorboard extra)
    "data": {"name": "fashion_mnist", "root": "", "val_fraction": 0.1, "train_subset": 30000, "batch_size": 128,
             "crop_padding": 2, "flip": True},
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


def validate(config: dict) -> dict:
    prune, distill, data = config["prune"], config["distill"], config["data"]
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
    if not 0 < prune["rate"] < 1:
        raise ConfigError(f"prune.rate must lie in (0, 1), got {prune['rate']}")
    # The plan is made now, so targets it cannot honour fail before any training rather than after all pruning.
    try:
        pruning_levels(prune["targets"], prune["rate"], prune["method"])
    except ValueError as error:
        raise ConfigError(f"prune.targets: {error}") from None
    if not 0 <= distill["alpha"] <= 1:
        raise ConfigError(f"distill.alpha must lie in [0, 1], got {distill['alpha']}")
    if not distill["temperature"] > 0:
        raise ConfigError(f"distill.temperature must be > 0, got {distill['temperature']}")
    unknown = [v for v in distill["variants"] if v not in VARIANTS]
    if unknown or not distill["variants"]:
        raise ConfigError(f"distill.variants must be chosen from {VARIANTS}, got {distill['variants']}")
    if not 0 < data["val_fraction"] < 1:
        raise ConfigError(f"data.val_fraction must lie in (0, 1), got {data['val_fraction']}")
    for section in ("teacher", "distill", "prune"):
        if config[section]["epochs"] < 1:
            raise ConfigError(f"{section}.epochs must be >= 1, got {config[section]['epochs']}")
        if config[section]["schedule"] not in SCHEDULES:
            raise ConfigError(f"{section}.schedule must be one of {SCHEDULES}, got {config[section]['schedule']!r}")
        if not 0 <= config[section]["warmup"] < 1:
            raise ConfigError(f"{section}.warmup must lie in [0, 1), got {config[section]['warmup']}")
        if not 0 <= config[section].get("label_smoothing", 0.0) < 1:
            raise ConfigError(f"{section}.label_smoothing must lie in [0, 1), got "
                              f"{config[section]['label_smoothing']}")
    if data["batch_size"] < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {data['batch_size']}")
    if config["run"]["precision"] not in PRECISIONS:
        raise ConfigError(f"run.precision must be one of {PRECISIONS}, got {config['run']['precision']!r}")
    if config["run"]["memory_format"] not in MEMORY_FORMATS:
        raise ConfigError(f"run.memory_format must be one of {MEMORY_FORMATS}, got {config['run']['memory_format']!r}")
    if config["run"]["seeds"] < 1:
        raise ConfigError(f"run.seeds must be >= 1, got {config['run']['seeds']}")
    for section in ("teacher", "student"):
        model = config[section]["model"]
        if ":" in model:
            factories.trust(model)  # the configuration names it: the pipeline may import it
            if config[section]["plan"]:
                raise ConfigError(f"{section}.plan must be empty for a factory model ({model}): its widths are the "
                                  f"factory's (set them with {section}.kwargs)")
        elif config[section]["kwargs"]:
            raise ConfigError(f"{section}.kwargs are for factory models (package.module:function), not {model!r}")
    if config["student"]["multiple"] < 1 or config["student"]["min_width"] < 1:
        raise ConfigError("student.multiple and student.min_width must be >= 1")
    c = config["cache"]
    if c["form"] not in ("full", "topk"):
        raise ConfigError(f"cache.form must be 'full' or 'topk', got {c['form']!r}")
    if c["dtype"] not in ("float16", "bfloat16", "float32"):
        raise ConfigError(f"cache.dtype must be float16, bfloat16 or float32, got {c['dtype']!r}")
    if c["views"] < 0 or c["k"] < 1 or c["batch_size"] < 1 or c["chunk"] < 1:
        raise ConfigError("cache.views must be >= 0 and cache.k, cache.batch_size, cache.chunk >= 1")
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
