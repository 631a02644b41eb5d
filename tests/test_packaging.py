"""pyproject.toml's requires-python admits only Pythons that can import and parse the package."""
from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "ptd_sparse").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))

# Standard-library modules added since Python 3.8, with the version that added them: an import of one of these
# needs at least that version.
NEW_STDLIB_MODULES = {"zoneinfo": (3, 9), "graphlib": (3, 9), "tomllib": (3, 11)}


def minimum_python() -> tuple[int, int]:
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    match = re.fullmatch(r"\s*>=\s*(\d+)\.(\d+)\s*", spec)
    assert match, f"requires-python should be a plain lower bound like '>=3.11', got {spec!r}"
    return int(match.group(1)), int(match.group(2))


def imported_modules(path: Path) -> set[str]:
    """Top-level names of the modules `path` imports unconditionally (not inside try/except ImportError)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            for inner in node.body:
                guarded.update(id(n) for n in ast.walk(inner))
    names = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def imports_too_new(minimum: tuple[int, int]) -> dict[tuple[str, str], tuple[int, int]]:
    """{(file, module): version needed} for the imports that Python `minimum` lacks."""
    return {(path.relative_to(ROOT).as_posix(), module): NEW_STDLIB_MODULES[module]
            for path in SOURCES for module in imported_modules(path)
            if module in NEW_STDLIB_MODULES and NEW_STDLIB_MODULES[module] > minimum}


def test_requires_python_covers_every_new_stdlib_import():
    minimum = minimum_python()
    too_new = imports_too_new(minimum)
    assert not too_new, f"requires-python >={minimum[0]}.{minimum[1]} but these imports need newer Pythons: {too_new}"


def test_the_import_check_catches_the_old_bound():
    """A bound of >=3.10 would be wrong, since the configuration module imports tomllib (3.11): the check sees that
    (and the command line's own tomllib import, which reads `ptd import --kwargs`)."""
    too_new = imports_too_new((3, 10))
    assert ("ptd_sparse/pipeline/config.py", "tomllib") in too_new
    assert set(too_new.values()) == {(3, 11)} and {module for _, module in too_new} == {"tomllib"}


def test_every_source_file_parses_with_the_minimum_grammar():
    minimum = minimum_python()
    for path in SOURCES:
        # feature_version rejects syntax newer than the given version (match statements, except*, ...).
        ast.parse(path.read_text(), filename=str(path), feature_version=minimum)
