"""The run configuration, typed: one frozen dataclass per section, each key declared once with its default and the
values it admits (a numeric range, or the names of a registry), all under Config. Read from the defaults, a TOML
file, then `--set section.key=value` overrides.

Every key has a default here (the fast Fashion-MNIST preset); configs/*.toml hold the paper's settings. Unknown keys,
wrongly typed values and values outside their range are errors that name the key, so a typo never silently runs the
default. Config.to_dict() is what a run directory's config.json holds; Config.from_dict reads one back.
"""
from __future__ import annotations

import copy
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, NamedTuple

from ptd_sparse.data import is_streaming
from ptd_sparse.pipeline import factories
from ptd_sparse.pipeline.prune_methods import PRUNE_METHODS
from ptd_sparse.pipeline.training import SCHEDULES
from ptd_sparse.pipeline.variants import VARIANTS


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

PRECISIONS = ("auto", "float32", "bfloat16")  # float16 would need loss scaling, which fit does not do
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")
SCOPES = ("global", "layer")  # of a pruning round's magnitude threshold (pruning.prune_to)
CACHE_FORMS = ("full", "topk")
CACHE_DTYPES = ("float16", "bfloat16", "float32")


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it."""


def setting(default, within: Range | None = None, one_of: Iterable[str] | None = None):
    """A configuration key: its default (a list is held as a tuple) and what it admits: `within`, the range of a
    numeric key (every int and float key has one); `one_of`, the names a string (or each item of a list) may take, a
    tuple or a registry dict whose keys are read when a value is checked."""
    metadata = {"default": default, "within": within, "one_of": one_of}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=metadata)
    return field(default=tuple(default) if isinstance(default, list) else default, metadata=metadata)


def _typed(name: str, value, default):
    """`value` as the type of `default` (an int for a float key becomes a float, a list a tuple), or ConfigError."""
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
        ok = isinstance(value, (list, tuple))
        value = tuple(value) if ok else value
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    else:
        ok = True
    if not ok:
        raise ConfigError(f"{name} must be a {type(default).__name__}, got {value!r}")
    return value


def _checked(name: str, value, metadata: Mapping):
    default, within, one_of = metadata["default"], metadata["within"], metadata["one_of"]
    value = _typed(name, value, default)
    if within is not None and not within.admits(value):
        kind = "an integer" if isinstance(default, int) else "a finite number"
        raise ConfigError(f"{name} must be {kind} {within.describe()}, got {value}")
    if one_of is not None:
        names = tuple(one_of)
        if isinstance(default, list):
            if not value or any(item not in names for item in value):
                raise ConfigError(f"{name} must be chosen from {names}, got {list(value)}")
        elif value not in names:
            raise ConfigError(f"{name} must be one of {names}, got {value!r}")
    return value


class Section:
    """A section of the configuration: every key typed and checked on construction, then the rules between keys
    (check)."""
    NAME: ClassVar[str]

    def __post_init__(self):
        for key in fields(self):
            object.__setattr__(self, key.name, _checked(f"{self.NAME}.{key.name}", getattr(self, key.name),
                                                        key.metadata))
        self.check()

    def check(self) -> None:
        """The rules between keys of this section; raises ConfigError."""


SECTIONS: dict[str, type[Section]] = {}  # name -> section class, in the order of Config's fields


def section(name: str):
    """Register a Section subclass as the frozen dataclass of section [name]."""
    def register(cls):
        cls = dataclass(frozen=True)(cls)
        cls.NAME = name
        for key in fields(cls):
            default = key.metadata["default"]
            numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
            if numeric != (key.metadata["within"] is not None):
                raise TypeError(f"{name}.{key.name}: every numeric key has a range (setting(within=...)), and no "
                                "other key has one")
        SECTIONS[name] = cls
        return cls
    return register


def _check_milestones(s: Section) -> None:
    if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in s.milestones):
        raise ConfigError(f"{s.NAME}.milestones must be a list of epochs (integers >= 1), got {list(s.milestones)}")


def _check_model(s: Section) -> None:
    if factories.is_factory(s.model):
        if s.plan:
            raise ConfigError(f"{s.NAME}.plan must be empty for a factory model ({s.model}): its widths are the "
                              f"factory's (set them with {s.NAME}.kwargs)")
    elif s.kwargs:
        raise ConfigError(f"{s.NAME}.kwargs are for factory models (package.module:function), not {s.model!r}")


# The sections. teacher, prune and distill are trainings: their schedule keys are those of training.Schedule (kind
# "multistep": milestones and gamma; "onecycle": warm-up over the `warmup` fraction of the steps, then cosine to zero).

@section("run")
class RunConfig(Section):
    seed: int = setting(0, SEED)
    seeds: int = setting(3, AT_LEAST_ONE)
    device: str = setting("auto")
    threads: int = setting(0, NON_NEGATIVE)  # 0: torch's default
    progress: bool = setting(True)
    precision: str = setting("auto", one_of=PRECISIONS)  # autocast of training forwards; auto: bfloat16 on GPUs
    memory_format: str = setting("auto", one_of=MEMORY_FORMATS)  # auto: channels_last on GPUs, contiguous on CPUs
    tensorboard: bool = setting(False)  # event files per training under <run>/tensorboard (the tensorboard extra)


@section("data")
class DataConfig(Section):
    name: str = setting("fashion_mnist")
    root: str = setting("")
    val_fraction: float = setting(0.1, FRACTION_OPEN)
    train_subset: int = setting(30000, NON_NEGATIVE)  # 0: the whole split
    batch_size: int = setting(128, AT_LEAST_ONE)
    crop_padding: int = setting(2, NON_NEGATIVE)
    flip: bool = setting(True)
    # The user's data instead of the built-in data set `name` (ptd_sparse.data.streaming), read through a DataLoader
    # with `workers` processes (0: in the training process): factory, "package.module:function" returning (train,
    # test) torch Datasets, called with factory_kwargs; or image_folder, a folder of train/ and test/ (or val/) class
    # subfolders, resized to image_size (0: the first image's shorter side). mean and std (both or neither; () =
    # computed from the training split) and num_classes (0 = inferred) are for these sources only.
    factory: str = setting("")
    factory_kwargs: dict = setting({})
    image_folder: str = setting("")
    image_size: int = setting(0, NON_NEGATIVE)
    num_classes: int = setting(0, NON_NEGATIVE)
    mean: list = setting([])
    std: list = setting([])
    workers: int = setting(2, NON_NEGATIVE)

    def check(self) -> None:
        if self.factory and self.image_folder:
            raise ConfigError("data.factory and data.image_folder name two data sources; set one of them")
        if self.factory and ":" not in self.factory:
            raise ConfigError(f"data.factory must be package.module:function, got {self.factory!r}")
        if self.factory_kwargs and not self.factory:
            raise ConfigError("data.factory_kwargs are the keyword arguments of data.factory, which is not set")
        for key in ("mean", "std", "image_size", "num_classes"):
            if getattr(self, key) and not is_streaming(self):
                raise ConfigError(f"data.{key} is for data.factory and data.image_folder; the built-in data set "
                                  f"{self.name} has its own")
        if self.image_size and self.factory:
            raise ConfigError("data.image_size resizes data.image_folder's images; a factory's data sets give images "
                              "of their own size (resize them in its transform)")
        if bool(self.mean) != bool(self.std):
            raise ConfigError("data.mean and data.std go together: set both (the statistics of your images in [0, 1]) "
                              "or neither (computed from the training split)")
        numbers = [v for v in (*self.mean, *self.std) if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(numbers) != len(self.mean) + len(self.std) or not all(math.isfinite(v) for v in numbers):
            raise ConfigError(f"data.mean and data.std must be finite numbers, got {list(self.mean)} and "
                              f"{list(self.std)}")
        if any(v <= 0 for v in self.std):
            raise ConfigError(f"data.std must be positive numbers, got {list(self.std)}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))


@section("teacher")
class TeacherConfig(Section):
    # model: a zoo name or a user's factory "package.module:function" called with kwargs (a table). checkpoint: a
    # model folder (`ptd import`) used as the trained teacher instead of training one ("" = train).
    model: str = setting("vgg_fmnist")
    plan: list = setting([])
    kwargs: dict = setting({})
    checkpoint: str = setting("")
    epochs: int = setting(14, AT_LEAST_ONE)  # with lr 0.2: the default teacher's 91% (docs/results.md)
    lr: float = setting(0.2, POSITIVE)
    momentum: float = setting(0.9, FRACTION_OPEN)  # Nesterov momentum (training.fit) needs momentum > 0
    weight_decay: float = setting(5e-4, NON_NEGATIVE)
    schedule: str = setting("onecycle", one_of=SCHEDULES)
    warmup: float = setting(0.2, FRACTION_BELOW_ONE)
    milestones: list = setting([])
    gamma: float = setting(0.2, POSITIVE)
    label_smoothing: float = setting(0.0, FRACTION_BELOW_ONE)

    def check(self) -> None:
        _check_milestones(self)
        _check_model(self)


@section("prune")
class PruneConfig(Section):
    targets: list = setting([0.79])  # sparsities in (0, 1), held sorted
    rate: float = setting(0.2, FRACTION_OPEN)
    scope: str = setting("global", one_of=SCOPES)
    method: str = setting("lr_rewind", one_of=PRUNE_METHODS)  # a strategy of prune_methods.PRUNE_METHODS
    skip: list = setting([])
    epochs: int = setting(1, AT_LEAST_ONE)
    lr: float = setting(0.05, POSITIVE)
    weight_decay: float = setting(2e-4, NON_NEGATIVE)
    schedule: str = setting("onecycle", one_of=SCHEDULES)
    warmup: float = setting(0.2, FRACTION_BELOW_ONE)
    milestones: list = setting([])
    gamma: float = setting(0.1, POSITIVE)
    label_smoothing: float = setting(0.0, FRACTION_BELOW_ONE)
    finetune_lr: float = setting(0.001, POSITIVE)

    @property
    def strategy(self):
        return PRUNE_METHODS[self.method]

    def check(self) -> None:
        _check_milestones(self)
        targets = self.targets
        if not targets or any(not isinstance(t, (int, float)) or not 0 < t < 1 for t in targets):
            raise ConfigError(f"prune.targets must be a non-empty list of sparsities in (0, 1), got {list(targets)}")
        object.__setattr__(self, "targets", tuple(sorted(float(t) for t in targets)))
        if len(set(self.targets)) != len(targets):
            raise ConfigError(f"prune.targets lists a sparsity twice: {list(targets)}")
        # The plan is made now, so targets it cannot honour fail before any training rather than after all pruning.
        try:
            self.strategy.levels(list(self.targets), self.rate)
        except ValueError as error:
            raise ConfigError(f"prune.targets: {error}") from None


@section("student")
class StudentConfig(Section):
    model: str = setting("vgg_fmnist")  # the fixed student (variants with student "fixed")
    plan: list = setting([16, "M", 32, "M", 64, "M"])
    kwargs: dict = setting({})
    multiple: int = setting(1, AT_LEAST_ONE)  # designed students: widths rounded to a multiple of this
    min_width: int = setting(4, AT_LEAST_ONE)

    def check(self) -> None:
        _check_model(self)


@section("distill")
class DistillConfig(Section):
    # alpha 0.9 and T 4 for 10 classes (Hinton-style); the paper's 0.95 and 10 are for CIFAR-100 (configs/cifar100_*).
    alpha: float = setting(0.9, Range(0, 1))
    temperature: float = setting(4.0, POSITIVE)
    epochs: int = setting(5, AT_LEAST_ONE)
    lr: float = setting(0.1, POSITIVE)
    weight_decay: float = setting(5e-4, NON_NEGATIVE)
    schedule: str = setting("onecycle", one_of=SCHEDULES)
    warmup: float = setting(0.2, FRACTION_BELOW_ONE)
    milestones: list = setting([])
    gamma: float = setting(0.2, POSITIVE)
    variants: list = setting(list(VARIANTS), one_of=VARIANTS)  # names of variants.VARIANTS

    def check(self) -> None:
        _check_milestones(self)


@section("cache")
class CacheConfig(Section):
    # Teacher-logit cache (ptd_sparse.cache, docs/cache.md): `ptd cache` writes it, distillation reads it when enabled.
    enabled: bool = setting(False)
    dir: str = setting("")  # "" = <run>/cache
    views: int = setting(0, NON_NEGATIVE)  # 0: one per distillation epoch with augmentation, 1 without
    form: str = setting("full", one_of=CACHE_FORMS)
    dtype: str = setting("float16", one_of=CACHE_DTYPES)
    k: int = setting(10, AT_LEAST_ONE)
    rest_mass: bool = setting(True)
    batch_size: int = setting(256, AT_LEAST_ONE)
    chunk: int = setting(1024, AT_LEAST_ONE)
    seed: int = setting(0, SEED)


def _plain(value):
    """A configuration value as JSON holds it (tuples as lists)."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


@dataclass(frozen=True)
class Config:
    """The whole configuration: config.teacher.lr, config.prune.targets, ..."""
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)

    def section(self, name: str) -> Section:
        """The section called `name` ("teacher", "prune", "distill", ...)."""
        if name not in SECTIONS:
            raise KeyError(name)
        return getattr(self, name)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """{section: {key: value}}, JSON's types: a run directory's config.json."""
        return {name: {key.name: _plain(getattr(self.section(name), key.name)) for key in fields(SECTIONS[name])}
                for name in SECTIONS}

    @classmethod
    def from_dict(cls, values: Mapping, source: str = "the configuration") -> "Config":
        """The configuration of {section: {key: value}} (a config.json, or a TOML file's tables), every missing key
        at its default. Factory models it names are not trusted by this (load_config trusts them)."""
        merged = {name: {} for name in SECTIONS}
        merge(merged, values, source)
        return cls(**{name: SECTIONS[name](**merged[name]) for name in SECTIONS})


assert [f.name for f in fields(Config)] == list(SECTIONS), "Config's fields are the registered sections, in order"

# {section: {key: default}} and {"section.key": Range} of every key, read from the sections above.
DEFAULTS = {name: {key.name: copy.deepcopy(key.metadata["default"]) for key in fields(cls)}
            for name, cls in SECTIONS.items()}
RANGES = {f"{name}.{key.name}": key.metadata["within"] for name, cls in SECTIONS.items() for key in fields(cls)
          if key.metadata["within"] is not None}


def merge(values: dict, updates: Mapping, source: str) -> dict:
    """Set {section: {key: value}} of `updates` into `values` (the same shape), refusing unknown sections and keys;
    the values are checked when the sections are built."""
    for name, section_values in updates.items():
        if name not in SECTIONS:
            raise ConfigError(f"{source}: unknown section [{name}]; known: {sorted(SECTIONS)}")
        if not isinstance(section_values, Mapping):
            raise ConfigError(f"{source}: [{name}] must be a table of keys")
        known = DEFAULTS[name]
        for key, value in section_values.items():
            if key not in known:
                raise ConfigError(f"{source}: unknown key {name}.{key}; known: {sorted(known)}")
            values[name][key] = value
    return values


def parse_override(text: str) -> dict:
    """'section.key=value' (value in TOML syntax; bare words are strings) -> {section: {key: value}}."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"an override must look like section.key=value, got {text!r}")
    dotted, raw = text.split("=", 1)
    section_name, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return {section_name: {key: value}}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The defaults, then the TOML file `path`, then each `section.key=value` of `overrides`; the factory models it
    names are trusted (the configuration asks for them to be imported)."""
    values = {name: {} for name in SECTIONS}
    if path:
        try:
            with open(path, "rb") as f:
                merge(values, tomllib.load(f), str(path))
        except FileNotFoundError as error:
            raise ConfigError(f"config file {path} does not exist") from error
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config file {path} is not valid TOML: {error}") from error
    for text in overrides or []:
        merge(values, parse_override(text), f"--set {text}")
    config = Config.from_dict(values)
    for model in (config.teacher.model, config.student.model):
        if factories.is_factory(model):
            factories.trust(model)
    return config
