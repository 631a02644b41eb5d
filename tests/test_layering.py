"""The layers import one way only: a module may import its own layer and the layers below it, never one above.

    foundation < kernels < ops < functional < nn < data < cache < pipeline < cli

(docs/architecture.md, "Layers"). Read from each module file's import statements (ast), not from sys.modules at
run time: several imports are deliberately lazy (inside a function), and those must obey the order too unless they
are listed in ALLOWED_LAZY with the reason. Inside a layer the imports form no cycle, lazy ones included: two modules
that need each other are one job split in two, or share something that belongs in a third.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Module-name prefixes of each layer, lowest first. The package root `ptd_sparse` (its __init__) is the public API
# of the operators and modules, so it sits with nn.
LAYERS = [
    ("foundation", ("ptd_sparse._validation", "ptd_sparse._format_checks", "ptd_sparse._kd_contract",
                    "ptd_sparse.named_callable",
                    "ptd_sparse.conv_geometry", "ptd_sparse.debug_checks", "ptd_sparse.pattern",
                    "ptd_sparse.topk_teacher", "ptd_sparse.files")),
    ("kernels", ("ptd_sparse.kernels", "ptd_sparse._C", "ptd_sparse._extension", "ptd_sparse.fingerprint",
                 "ptd_sparse.native",
                 "ptd_sparse.reference", "ptd_sparse.backends")),
    ("ops", ("ptd_sparse.ops",)),
    ("functional", ("ptd_sparse.functional",)),
    ("nn", ("ptd_sparse.nn", "ptd_sparse.sparsify", "ptd_sparse.fuse_graph", "ptd_sparse.route_plan",
            "ptd_sparse")),
    ("data", ("ptd_sparse.data", "ptd_sparse.distributed", "ptd_sparse.directory_lock")),
    ("cache", ("ptd_sparse.cache",)),
    ("pipeline", ("ptd_sparse.pipeline", "ptd_sparse.onnx_export")),
    ("cli", ("ptd_sparse.cli",)),
]
RANK = {name: rank for rank, (name, _) in enumerate(LAYERS)}

# Lazy imports (inside a function) that go up a layer on purpose: (importing module, imported module) -> why.
ALLOWED_LAZY = {
    ("ptd_sparse", "ptd_sparse.pipeline.design"):
        "ptd_sparse.design_student re-exports the pipeline's student-design rule without importing the pipeline",
    ("ptd_sparse", "ptd_sparse.onnx_export"):
        "ptd_sparse.export re-exports the ONNX export (which loads run folders) without importing the pipeline",
}


def layer_of(module: str) -> str:
    """The layer of a ptd_sparse module: the one with the longest matching prefix."""
    best = None
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (name, len(prefix))
    assert best is not None, f"{module} is in no layer; add it to LAYERS"
    return best[0]


def module_files() -> dict[str, Path]:
    """{module name: file} for every module of the package, the Triton kernels (installed as ptd_sparse.kernels)
    included."""
    files = {}
    for path in sorted((ROOT / "ptd_sparse").rglob("*.py")):
        relative = path.relative_to(ROOT).with_suffix("")
        if relative.parts[:2] == ("ptd_sparse", "kernels"):
            continue  # a development symlink to kernels/, read below under its installed name
        files[".".join(relative.parts[:-1] if relative.name == "__init__" else relative.parts)] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        name = "ptd_sparse.kernels" if path.stem == "__init__" else f"ptd_sparse.kernels.{path.stem}"
        files[name] = path
    return files


FILES = module_files()
COMPILED_MODULES = {"ptd_sparse._C"}  # the C++ extension: a module without a Python file


def imports_of(module: str, path: Path) -> list[tuple[str, bool]]:
    """(imported ptd_sparse module, lazy) for each import statement of `path`; lazy = inside a function."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    lazy_nodes = {id(inner) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for inner in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            # `from package import submodule` imports the submodule; `from module import name` the module.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in FILES.keys() | COMPILED_MODULES else base
                       for alias in node.names]
        else:
            continue
        found += [(target, id(node) in lazy_nodes) for target in targets
                  if target == "ptd_sparse" or target.startswith("ptd_sparse.")]
    return found


def upward_imports() -> list[str]:
    problems = []
    for module, path in FILES.items():
        for target, lazy in imports_of(module, path):
            if RANK[layer_of(target)] <= RANK[layer_of(module)]:
                continue
            if lazy and (module, target) in ALLOWED_LAZY:
                continue
            problems.append(f"{path.relative_to(ROOT)}: {module} ({layer_of(module)}) imports {target} "
                            f"({layer_of(target)}){' lazily' if lazy else ''}")
    return problems


def test_no_layer_imports_a_higher_one():
    problems = upward_imports()
    assert not problems, "imports against the layer order:\n" + "\n".join(problems)


def test_the_allowed_lazy_imports_exist_and_stay_lazy():
    for (module, target), why in ALLOWED_LAZY.items():
        found = imports_of(module, FILES[module])
        assert (target, True) in found, f"{module} no longer imports {target} lazily ({why}); update ALLOWED_LAZY"
        assert (target, False) not in found, f"{module} imports {target} eagerly: {why}, so it must stay lazy"


def test_the_cache_never_imports_the_pipeline():
    """Not even lazily: the cache is a library for users' own training loops (tests/test_cache_plain_loop.py)."""
    for module, path in FILES.items():
        if layer_of(module) == "cache":
            assert not [t for t, _ in imports_of(module, path) if layer_of(t) in ("pipeline", "cli")], module


def test_the_check_sees_an_upward_import(tmp_path):
    """The rule is live: an import of the pipeline from the cache, eager or lazy, is reported."""
    module = "ptd_sparse.cache.store"
    bad = tmp_path / "store.py"
    bad.write_text("from ptd_sparse.pipeline import stages\n\ndef f():\n    import ptd_sparse.cli\n")
    targets = imports_of(module, bad)
    assert targets == [("ptd_sparse.pipeline.stages", False), ("ptd_sparse.cli", True)]
    assert all(RANK[layer_of(t)] > RANK[layer_of(module)] for t, _ in targets)


def import_cycles(files: dict[str, Path]) -> list[list[str]]:
    """Cycles of imports between modules of one layer, eager or lazy, each as [a, b, ..., a]; one per cycle found
    by a depth-first walk (a module in several cycles may show in only one until that one is broken)."""
    graph = {module: sorted({target for target, _ in imports_of(module, path)
                             if target != module and target in files and layer_of(target) == layer_of(module)})
             for module, path in files.items()}
    cycles, done, path = [], set(), []

    def visit(module: str) -> None:
        path.append(module)
        for target in graph[module]:
            if target in path:
                cycles.append(path[path.index(target):] + [target])
            elif target not in done:
                visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module)
    return cycles


def test_no_import_cycle_inside_a_layer():
    cycles = import_cycles(FILES)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_check_sees_a_lazy_import_cycle(tmp_path):
    """The rule is live: two pipeline modules that import each other, one only inside a function, are a cycle; an
    import of a lower layer is not."""
    plots, report = tmp_path / "plots.py", tmp_path / "report.py"
    plots.write_text("from ptd_sparse.files import write_json\n\ndef f():\n    from ptd_sparse.pipeline.report "
                     "import X\n")
    report.write_text("from ptd_sparse.pipeline.plots import draw_plots\n")
    files = {"ptd_sparse.pipeline.plots": plots, "ptd_sparse.pipeline.report": report}
    assert import_cycles(files) == [["ptd_sparse.pipeline.plots", "ptd_sparse.pipeline.report",
                                     "ptd_sparse.pipeline.plots"]]
    report.write_text("from ptd_sparse.files import write_json\n")
    assert import_cycles(files) == []


@pytest.mark.parametrize("module", sorted(m for m in FILES if not m.startswith("ptd_sparse.kernels")))
def test_every_layer_imports(module):
    importlib.import_module(module)
