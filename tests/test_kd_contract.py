"""The KD loss's shared contract (ptd_sparse/_kd_contract.py): its reduction codes are the ones the C++ side uses, the
C++ and CUDA kernels refuse bad input with its sentences, and no other module defines the codes again."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from ptd_sparse import _kd_contract as contract
from ptd_sparse._extension import extension_problem, kernels

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "csrc" / "kd_loss_checks.h"
CUDA_SOURCE = ROOT / "csrc" / "cuda" / "kd_loss_cuda.cu"


def header_reductions(text: str) -> dict[str, int]:
    """{reduction name: code} of the C++ enum `Reduction` (kNone -> "none", kBatchMean -> "batchmean")."""
    match = re.search(r"enum\s+Reduction\b[^{]*\{([^}]*)\}", text)
    assert match, f"{HEADER} declares no enum Reduction"
    table = {}
    for entry in match.group(1).split(","):
        name, _, value = (part.strip() for part in entry.partition("="))
        assert name.startswith("k") and value, f"enum Reduction entry {entry.strip()!r} is not `kName = code`"
        table[name[1:].lower()] = int(value, 0)
    return table


def test_the_header_parser_reads_an_enum():
    assert header_reductions("enum Reduction : int64_t { kNone = 0, kBatchMean = 0x2 };") == {"none": 0,
                                                                                              "batchmean": 2}


def test_the_cpp_reduction_codes_equal_the_python_table():
    assert header_reductions(HEADER.read_text()) == contract.REDUCTIONS


@pytest.mark.skipif(extension_problem() is not None, reason=str(extension_problem()))
def test_the_compiled_operator_reduces_as_each_code_says(generator):
    """Behaviour, not only the header: each code of the Python table makes the C++ operator reduce by that name."""
    student = torch.randn(5, 7, generator=generator)
    teacher = torch.randn(5, 7, generator=generator)
    target = torch.tensor([0, 3, -100, 6, 2])

    def loss(code):
        return kernels().kd_loss(student, teacher, target, 2.0, 0.5, code, -100, False)[0]

    rows = loss(contract.REDUCTIONS["none"])
    assert rows.shape == (5,) and rows[2] == 0  # one loss per row; the ignored row counts nothing
    torch.testing.assert_close(loss(contract.REDUCTIONS["sum"]), rows.sum())
    torch.testing.assert_close(loss(contract.REDUCTIONS["batchmean"]), rows.sum() / 4)
    with pytest.raises(ValueError, match="reduction code must be 0, 1 or 2"):
        loss(max(contract.REDUCTIONS.values()) + 1)


def joined_literals(text: str) -> str:
    """C++ source with adjacent string literals on consecutive lines joined, as the compiler joins them."""
    return re.sub(r'"\s*\n\s*"', "", text)


def test_the_cuda_kernels_print_the_contract_sentences():
    """The device-side asserts are format strings, read here from the source (no GPU needed)."""
    source = joined_literals(CUDA_SOURCE.read_text())
    assert contract.bad_logits_message("%s", "%lld") in source
    assert contract.bad_target_message("%lld", "%lld", "%lld", "%lld") in source


@pytest.mark.skipif(extension_problem() is not None, reason=str(extension_problem()))
def test_the_cpu_kernels_raise_the_contract_sentences(generator):
    student, teacher = torch.randn(3, 4, generator=generator), torch.randn(3, 4, generator=generator)
    teacher[1, 2] = float("nan")
    with pytest.raises(ValueError) as refused:
        kernels().kd_loss(student, teacher, None, 2.0, 0.5, 2, -100, False)
    assert contract.bad_logits_message("teacher_logits", 1) in str(refused.value)
    with pytest.raises(ValueError) as refused:
        kernels().kd_loss(student, student, torch.tensor([0, 7, 1]), 2.0, 0.5, 2, -100, False)
    assert contract.bad_target_message(7, 1, 4, -100) in str(refused.value)


def reduction_definitions(path: Path) -> list[str]:
    """Module-level names starting with REDUCTION that `path` assigns (an import is not a definition)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        for target in targets:
            for leaf in ast.walk(target):
                if isinstance(leaf, ast.Name) and leaf.id.startswith("REDUCTION"):
                    names.append(leaf.id)
    return names


def test_the_definition_finder_sees_tuple_assignments(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from x import REDUCTION_SUM\nREDUCTION_NONE, OTHER = 0, 1\nREDUCTIONS: dict = {}\n")
    assert reduction_definitions(module) == ["REDUCTION_NONE", "REDUCTIONS"]


def test_only_the_contract_defines_the_reduction_codes():
    sources = sorted((ROOT / "ptd_sparse").rglob("*.py")) + sorted((ROOT / "kernels").glob("*.py"))
    found = {str(path.relative_to(ROOT)): reduction_definitions(path) for path in sources
             if path.name != "_kd_contract.py" and path.relative_to(ROOT).parts[:2] != ("ptd_sparse", "kernels")}
    assert {path: names for path, names in found.items() if names} == {}


@pytest.mark.parametrize("reduction", [None, "mean", ["sum"]])
def test_a_bad_reduction_name_is_refused_naming_the_argument(reduction):
    with pytest.raises(ValueError, match=r"reduction must be one of \['batchmean', 'none', 'sum'\]"):
        contract.reduction_code(reduction)
