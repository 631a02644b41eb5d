"""Every numeric configuration key has a range and is finite; a value outside is refused at load time, naming the key.

The keys are read from config.DEFAULTS, so a numeric key added without a range in config.RANGES fails here."""
from __future__ import annotations

import math
import re

import pytest

from ptd_sparse.pipeline import config
from ptd_sparse.pipeline.run_directory import Run

NUMERIC_KEYS = [f"{section}.{key}" for section, values in config.DEFAULTS.items()
                for key, default in values.items()
                if isinstance(default, (int, float)) and not isinstance(default, bool)]


def default_of(dotted: str):
    section, key = dotted.split(".")
    return config.DEFAULTS[section][key]


def toml(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return repr(value)


def refused_values(dotted: str) -> list:
    """Values just outside the key's range (and the bounds themselves where open), plus nan and infinities."""
    allowed = config.RANGES[dotted]
    step = 1 if isinstance(default_of(dotted), int) else 0.5
    values = []
    if allowed.low is not None:
        values.append(allowed.low - step)
        if not allowed.low_closed:
            values.append(allowed.low)
    if allowed.high is not None:
        values.append(allowed.high + step)
        if not allowed.high_closed:
            values.append(allowed.high)
    if isinstance(default_of(dotted), float):
        values += [math.nan, math.inf, -math.inf]
    return values


def admitted_values(dotted: str) -> list:
    allowed = config.RANGES[dotted]
    return [bound for bound, closed in ((allowed.low, allowed.low_closed), (allowed.high, allowed.high_closed))
            if bound is not None and closed]


def test_the_numeric_keys_are_found():
    assert {"teacher.lr", "run.threads", "data.crop_padding", "distill.temperature", "cache.k"} <= set(NUMERIC_KEYS)
    assert set(config.RANGES) == set(NUMERIC_KEYS)  # no range for a key that does not exist


@pytest.mark.parametrize("key", NUMERIC_KEYS)
def test_every_numeric_key_is_range_checked(key):
    assert key in config.RANGES, f"{key} has no range in config.RANGES"
    assert config.RANGES[key].admits(default_of(key))
    for value in refused_values(key):
        with pytest.raises(config.ConfigError, match=f"^{re.escape(key)} must be (an integer|a finite number) "):
            config.load_config(None, [f"{key}={toml(value)}"])
    for value in admitted_values(key):
        section, name = key.split(".")
        assert getattr(config.load_config(None, [f"{key}={toml(value)}"]).section(section), name) == value


@pytest.mark.parametrize("override,message", [
    ("teacher.lr=nan", "teacher.lr must be a finite number > 0, got nan"),
    ("teacher.lr=-0.1", "teacher.lr must be a finite number > 0, got -0.1"),
    ("teacher.momentum=-1", "teacher.momentum must be a finite number in (0, 1), got -1.0"),
    ("distill.temperature=inf", "distill.temperature must be a finite number > 0, got inf"),
    ("data.crop_padding=-3", "data.crop_padding must be an integer >= 0, got -3"),
    ("run.threads=-2", "run.threads must be an integer >= 0, got -2"),
    ("run.seed=4294967296", "run.seed must be an integer in [0, 4294967295], got 4294967296"),
    ("distill.milestones=[2, 0]", "distill.milestones must be a list of epochs (integers >= 1), got [2, 0]"),
])
def test_the_reported_values_are_refused_with_the_key(override, message):
    with pytest.raises(config.ConfigError) as refused:
        config.load_config(None, [override])
    assert str(refused.value) == message


def test_ranges_hold_for_a_toml_file_too(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[teacher]\nlr = nan\n")
    with pytest.raises(config.ConfigError, match="teacher.lr must be a finite number > 0, got nan"):
        config.load_config(path)


def test_teacher_momentum_reaches_the_optimizer(tmp_path):
    with Run(tmp_path / "run", config.load_config(None, ["teacher.momentum=0.5"])) as run:
        assert run.schedule("teacher").momentum == 0.5
        assert run.schedule("distill").momentum == 0.9  # distillation and pruning keep SGD's 0.9
