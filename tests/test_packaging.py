"""Packaging: pyproject.toml's requires-python admits only Pythons that can import and parse the package; release
wheels pin the torch they were built with, name its build in their version, carry no debug information, and run in
a fresh venv without a compiler (the last two build a wheel: PTD_TEST_WHEEL=1)."""
from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from test_cpu_dispatch import load_setup  # setup.py's extension() under a chosen environment

import ptd_sparse

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




def setup_py():
    """setup.py as a module (not __main__: setup() itself does not run)."""
    spec = importlib.util.spec_from_file_location("ptd_setup_for_wheels", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wheel_metadata_pins_the_torch_release_and_names_its_build():
    setup = setup_py()
    public = torch.__version__.split("+")[0]
    assert setup.torch_requirement() == f"torch=={public}"
    assert setup.base_version() == ptd_sparse.__version__
    for cuda_kernels in (True, False):
        version = Version(setup.wheel_version(cuda_kernels))  # a valid PEP 440 version
        assert version.public == ptd_sparse.__version__
        assert version.local.startswith("torch" + torch.__version__.replace("+", ".").lower())
        assert version.local.endswith(".cpuonly") == (torch.version.cuda is not None and not cuda_kernels)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {"version", "dependencies"} <= set(project["dynamic"]) and "dependencies" not in project


def test_the_triton_kernels_folder_installs_as_ptd_sparse_kernels():
    """setup.py maps the top-level kernels/ folder to the subpackage ptd_sparse.kernels, for wheels and editable
    installs alike, and lists every Python package of ptd_sparse/."""
    setup = setup_py()
    assert setup.PACKAGE_DIR == {"ptd_sparse.kernels": "kernels"}
    assert (ROOT / "kernels" / "__init__.py").is_file()
    packages = setup.packages()
    assert "ptd_sparse.kernels" in packages and len(packages) == len(set(packages))
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "ptd_sparse").rglob("__init__.py")}
    assert folders <= set(packages)


def test_ptd_sparse_kernels_resolves_to_a_kernels_folder_beside_setup_py():
    """In this environment (an editable install, scripts/setup.sh) the name ptd_sparse.kernels finds the top-level
    kernels/ folder of a source checkout, the way the package imports it: no loader of its own."""
    spec = importlib.util.find_spec("ptd_sparse.kernels")
    if spec is None:
        pytest.skip("ptd_sparse is not installed here (pip install --no-build-isolation -e .)")
    origin = Path(spec.origin)
    assert origin.name == "__init__.py" and origin.parent.name == "kernels"
    assert (origin.parent.parent / "setup.py").is_file() or origin.parent.parent.name == "ptd_sparse"


def test_release_builds_carry_no_debug_information(monkeypatch):
    flags = load_setup(monkeypatch).extra_compile_args["cxx"]
    assert flags[-1] == "-g0"  # after Python's CFLAGS, which hold -g
    sanitized = load_setup(monkeypatch, PTD_SANITIZE="1").extra_compile_args["cxx"]
    assert "-g0" not in sanitized and "-g" in sanitized


def elf_section_names(path: Path) -> set[str]:
    """Section names of a 64-bit little-endian ELF file (enough to see .debug_* sections without binutils)."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path} is not a 64-bit little-endian ELF"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_offset = sections[shstrndx][4]
    return {data[names_offset + s[0]:data.index(b"\0", names_offset + s[0])].decode() for s in sections}


def test_the_elf_reader_reads_section_names():
    """The reader the wheel test uses on its library, tried on this checkout's extension."""
    library = Path(ptd_sparse.__file__).parent
    candidates = sorted(library.glob("_C*.so"))
    if not candidates:
        pytest.skip("no compiled extension in this checkout")
    names = elf_section_names(candidates[0])
    assert ".text" in names and ".dynsym" in names


# PTD_TEST_WHEEL=1 builds a wheel (the CPU extension from scratch: about 2.5 minutes on 2 quiet cores; .ci/run sets
# it); PTD_TEST_WHEEL=<path of a .whl> tests that wheel instead.
WHEEL_TEST = os.environ.get("PTD_TEST_WHEEL", "0")
needs_wheel = pytest.mark.skipif(WHEEL_TEST == "0", reason="builds a release wheel: set PTD_TEST_WHEEL=1 (or a "
                                 "wheel's path)")


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory) -> Path:
    """A release wheel built once per session from a copy of the source (CPU kernels: PTD_SKIP_CUDA_BUILD=1)."""
    if WHEEL_TEST != "1":
        return Path(WHEEL_TEST)
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    for name in tracked:
        if (ROOT / name).is_file() and not name.endswith(".so"):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    env = {**os.environ, "PTD_SKIP_CUDA_BUILD": "1", "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", ".", "-w",
                    str(work / "dist")], cwd=source, env=env, check=True)
    (wheel,) = (work / "dist").glob("*.whl")
    return wheel


@pytest.mark.slow
@needs_wheel
def test_the_wheel_is_pinned_labelled_and_stripped(built_wheel, tmp_path):
    version = Version(built_wheel.name.split("-")[1])
    assert version.local.startswith("torch" + torch.__version__.replace("+", ".").lower())
    with zipfile.ZipFile(built_wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        requires = Parser().parsestr(archive.read(metadata).decode()).get_all("Requires-Dist")
        (library,) = [n for n in archive.namelist() if n.startswith("ptd_sparse/_C") and n.endswith(".so")]
        archive.extract(library, tmp_path)
        names = set(archive.namelist())
    assert f"torch=={torch.__version__.split('+')[0]}" in requires
    assert {"ptd_sparse/kernels/__init__.py", "ptd_sparse/cli.py"} <= names
    unpacked = tmp_path / library
    assert not {n for n in elf_section_names(unpacked) if n.startswith(".debug")}
    assert unpacked.stat().st_size < 20 * 2**20, f"{unpacked.stat().st_size / 2**20:.1f} MB unpacked"


OPERATOR_CALLS = """
import sys, torch, ptd_sparse, ptd_sparse._extension as extension
assert extension.extension_problem() is None, extension.extension_problem()
assert ptd_sparse.__file__.startswith(sys.prefix), ptd_sparse.__file__
g = torch.Generator().manual_seed(0)
x, w = torch.randn(2, 4, 8, 8, generator=g), torch.randn(6, 4, 3, 3, generator=g)
mask = torch.rand(w.shape, generator=g) < 0.3
expected = torch.nn.functional.conv2d(x, w * mask, padding=1)
out = ptd_sparse.masked_conv2d(x, w, mask, padding=1, backend="cpu")
torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
sparse = ptd_sparse.SparseConvWeight.from_dense(w, mask)
torch.testing.assert_close(ptd_sparse.sparse_conv2d(x, sparse, padding=1, backend="cpu"), expected, atol=1e-4,
                           rtol=1e-4)
s, t, y = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g), torch.arange(5) % 7
torch.testing.assert_close(ptd_sparse.kd_loss(s, t, y, backend="cpu"), ptd_sparse.kd_loss(s, t, y, backend="reference"))
print("operators ok", ptd_sparse.__file__)
"""


@pytest.mark.slow
@needs_wheel
def test_the_wheel_runs_in_a_fresh_venv_without_a_compiler(built_wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)  # a plain venv: no system packages
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # The wheel alone goes into the new venv; torch and the other dependencies come from the test environment's
    # site-packages through a .pth line, which Python adds after the venv's own folder, so ptd_sparse is the
    # wheel's (the folder a .pth line names is not scanned for .pth files: an editable install there stays out).
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(built_wheel)],
                   check=True)
    (site / "test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    no_compiler = {"PATH": str(venv / "bin"), "HOME": str(tmp_path)}
    assert not any(shutil.which(tool, path=no_compiler["PATH"]) for tool in ("c++", "g++", "gcc", "cc", "nvcc"))
    # Run away from the source tree: `python -c` puts the working directory first on sys.path.
    help_text = subprocess.run([str(venv / "bin" / "ptd"), "--help"], env=no_compiler, cwd=tmp_path,
                               capture_output=True, text=True, check=True).stdout
    assert "export" in help_text and "import" in help_text
    ran = subprocess.run([str(python), "-c", OPERATOR_CALLS], env=no_compiler, cwd=tmp_path, capture_output=True,
                         text=True)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "operators ok " + str(site) in ran.stdout
