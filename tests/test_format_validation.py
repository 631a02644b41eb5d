"""The canonical sparse format is validated where it comes from outside: ConvPattern / SparseConvWeight
construction, state-dict loads of SparseConv2d and MaskedConv2d, and the C++ kernel entry points. Errors name the
tensor and its first bad entry. (tests/test_fuzz_formats.py corrupts formats at random; this file pins messages.)"""
from __future__ import annotations

import pytest
import torch
from conftest import random_mask
from torch import nn

from ptd_sparse import _extension
from ptd_sparse.nn import MaskedConv2d, SparseConv2d
from ptd_sparse.pattern import ConvPattern, SparseConvWeight

SHAPE = (4, 3, 3, 3)


@pytest.fixture
def pattern(generator) -> ConvPattern:
    return ConvPattern.from_mask(random_mask(SHAPE, 0.4, generator))


def fields(pattern: ConvPattern) -> dict:
    return {name: getattr(pattern, name).clone() for name in ConvPattern.index_names()}


def set_entry(name: str, index: int, value: int):
    def corrupt(f):
        f[name][index] = value
    return corrupt


def decreasing_row_ptr(f):
    f["row_ptr"][2] = f["row_ptr"][3] + 1


def unsorted_row(f):
    row = int(torch.argmax(f["row_ptr"][1:] - f["row_ptr"][:-1]))  # the longest row has >= 2 entries
    start = int(f["row_ptr"][row])
    f["col_idx"][start], f["col_idx"][start + 1] = int(f["col_idx"][start + 1]), int(f["col_idx"][start])


CORRUPTIONS = {
    "row_ptr starts above 0": (set_entry("row_ptr", 0, 1), ValueError, r"row_ptr\[0\] = 1; row_ptr must start at 0"),
    "decreasing row_ptr": (decreasing_row_ptr, ValueError, r"row_ptr\[3\] = \d+ is less than row_ptr\[2\] = \d+; "
                                                           "row_ptr must be non-decreasing"),
    "row_ptr ends past nnz": (set_entry("row_ptr", -1, 10_000), ValueError, r"row_ptr\[4\] = 10000 but there are"),
    "col_idx out of range": (set_entry("col_idx", 0, 27), ValueError,
                             r"col_idx\[0\] = 27 is out of range; columns must lie in \[0, C_in \* KH \* KW = 27\)"),
    "negative col_idx": (set_entry("col_idx", 1, -1), ValueError, r"col_idx\[1\] = -1 is out of range"),
    "columns not ascending": (unsorted_row, ValueError, "strictly ascending within a row"),
    "t_perm out of range": (set_entry("t_perm", 0, 10_000), ValueError, r"t_perm\[0\] = 10000 is out of range"),
    "t_rows wrong": (lambda f: f["t_rows"].__setitem__(0, (int(f["t_rows"][0]) + 1) % 4), ValueError,
                     r"t_rows\[0\] = \d+ but CSR entry"),
    "flat_index wrong": (set_entry("flat_index", 0, 10_000), ValueError, r"flat_index\[0\] = 10000"),
    "row_ptr int64": (lambda f: f.update(row_ptr=f["row_ptr"].long()), TypeError,
                      "row_ptr must have dtype torch.int32, got torch.int64"),
    "truncated col_idx": (lambda f: f.update(col_idx=f["col_idx"][:-1]), ValueError,
                          "t_rows must have .* entries"),
    "2-D t_ptr": (lambda f: f.update(t_ptr=f["t_ptr"].reshape(1, -1)), ValueError, r"t_ptr must be 1-D"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_hand_built_pattern_names_the_tensor_and_first_bad_entry(pattern, name):
    corrupt, error, match = CORRUPTIONS[name]
    f = fields(pattern)
    ConvPattern(SHAPE, *f.values())  # the uncorrupted copy is accepted
    corrupt(f)
    with pytest.raises(error, match=match):
        ConvPattern(SHAPE, *f.values())


def test_sparse_weight_values_are_checked(pattern):
    values = torch.randn(pattern.nnz)
    values[2] = float("nan")
    with pytest.raises(ValueError, match=r"values\[2\] = nan is not finite"):
        SparseConvWeight(pattern, values)
    with pytest.raises(TypeError, match="values must have dtype float16, bfloat16, float32 or float64"):
        SparseConvWeight(pattern, torch.ones(pattern.nnz, dtype=torch.int32))
    with pytest.raises(ValueError, match=f"values must be 1-D with nnz = {pattern.nnz} entries"):
        SparseConvWeight(pattern, torch.randn(pattern.nnz + 1))


def test_patterns_the_package_derives_are_not_revalidated(generator, monkeypatch):
    """from_mask's output is valid by construction; validation must not run per call."""
    from ptd_sparse import _format_checks

    layer = SparseConv2d.from_conv(nn.Conv2d(3, 4, 3, padding=1), random_mask(SHAPE, 0.2, generator), backend="cpu"
                                   if not _extension.extension_problem() else "reference")

    def refuse(*args, **kwargs):
        raise AssertionError("validated on the hot path")

    monkeypatch.setattr(_format_checks, "check_pattern", refuse)
    monkeypatch.setattr(_format_checks, "check_values", refuse)
    layer(torch.randn(2, 3, 8, 8)).sum().backward()
    ConvPattern.from_mask(random_mask(SHAPE, 0.3, generator)).to("cpu")


def sparse_layer(generator) -> SparseConv2d:
    return SparseConv2d.from_conv(nn.Conv2d(3, 4, 3, padding=1), random_mask(SHAPE, 0.4, generator))


def test_sparse_conv2d_state_dict_refuses_corrupt_patterns_before_copying(generator):
    layer = sparse_layer(generator)
    good = {k: v.clone() for k, v in layer.state_dict().items()}
    state = dict(good)
    state["row_ptr"] = good["row_ptr"].clone()
    state["row_ptr"][2] = state["row_ptr"][3] + 1
    with pytest.raises(ValueError, match=r"SparseConv2d .*row_ptr\[3\] = \d+ is less than row_ptr\[2\]"):
        layer.load_state_dict(state)
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in good.items())  # nothing was half-copied
    state = dict(good, values=good["values"].clone())
    state["values"][0] = float("inf")
    with pytest.raises(ValueError, match=r"values\[0\] = inf is not finite"):
        layer.load_state_dict(state)
    with pytest.raises(TypeError, match="col_idx must have dtype torch.int32, got torch.float32"):
        layer.load_state_dict(dict(good, col_idx=good["col_idx"].float()))
    state = dict(good, col_idx=good["col_idx"].clone())
    state["col_idx"][-1] = 99
    with pytest.raises(ValueError, match=r"col_idx\[\d+\] = 99 is out of range"):
        layer.load_state_dict(state)
    partial = {"row_ptr": torch.zeros(5, dtype=torch.int32)}  # strict=False: checked combined with the rest
    with pytest.raises(ValueError, match="the last pointer must equal nnz"):
        layer.load_state_dict(partial, strict=False)
    layer.load_state_dict(good)


def test_masked_conv2d_state_dict_refuses_bad_masks_and_nan_weights():
    layer = MaskedConv2d(3, 4, 3)
    good = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"mask has shape \(4, 3, 3\), expected the weight's shape \(4, 3, 3, 3\)"):
        layer.load_state_dict(dict(good, mask=good["mask"][..., 0]))
    half = good["mask"].float()
    half[1, 2, 0, 1] = 0.5
    with pytest.raises(ValueError, match=r"mask\[1, 2, 0, 1\] = 0.5; a mask must be bool or hold only 0 and 1"):
        layer.load_state_dict(dict(good, mask=half))
    weight = good["weight"].clone()
    weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"MaskedConv2d .*weight\[0, 0, 0, 0\] = nan is not finite"):
        layer.load_state_dict(dict(good, weight=weight))
    assert torch.equal(layer.weight, good["weight"])
    layer.load_state_dict(dict(good, mask=good["mask"].float()))  # 0/1 floats are a mask


needs_extension = pytest.mark.skipif(bool(_extension.extension_problem()), reason="the C++ extension is not built")


@needs_extension
def test_cpu_kernel_entry_points_check_the_pattern(pattern):
    ops = torch.ops.ptd_sparse_kernels
    x = torch.randn(2, 3, 6, 6)
    values = torch.randn(pattern.nnz)
    geometry = ([1, 1], [1, 1], [1, 1])
    grad_output = torch.randn(2, 4, 6, 6)
    row_ptr = pattern.row_ptr.clone()
    row_ptr[2] = row_ptr[3] + 1
    with pytest.raises(ValueError, match=r"row_ptr\[3\] = \d+ is less than row_ptr\[2\] = \d+"):
        ops.conv_forward(x, values, row_ptr, pattern.col_idx, list(SHAPE), None, *geometry)
    # backward-values checks the format too: its fast path fills grad_values[row_ptr[begin] .. row_ptr[end]), so a
    # bad row_ptr would make it write outside grad_values.
    with pytest.raises(ValueError, match=r"row_ptr\[3\] = \d+ is less than row_ptr\[2\] = \d+"):
        ops.conv_backward_values(grad_output, x, row_ptr, pattern.col_idx, list(SHAPE), *geometry)
    with pytest.raises(ValueError, match=r"grad_output has shape \[1, 4, 6, 6\], expected \[2, 4, 6, 6\]"):
        ops.conv_backward_values(grad_output[:1], x, pattern.row_ptr, pattern.col_idx, list(SHAPE), *geometry)
    col_idx = pattern.col_idx.clone()
    col_idx[0] = 27
    with pytest.raises(ValueError, match=r"col_idx\[0\] = 27 is out of range"):
        ops.conv_backward_input(grad_output, values, col_idx, pattern.t_ptr, pattern.t_rows, pattern.t_perm,
                                list(SHAPE), list(x.shape), *geometry)
    t_perm = pattern.t_perm.clone()
    t_perm[1] = t_perm[0]
    with pytest.raises(ValueError, match=r"t_perm\[1\] = \d+ repeats an earlier entry"):
        ops.conv_backward_input(grad_output, values, pattern.col_idx, pattern.t_ptr, pattern.t_rows, t_perm,
                                list(SHAPE), list(x.shape), *geometry)
    with pytest.raises(ValueError, match=r"weight_shape must be 4 positive sizes"):
        ops.conv_forward(x, values, pattern.row_ptr, pattern.col_idx, [4, 3, 0, 3], None, *geometry)


def test_cpu_kernel_column_check_allows_descents_only_where_a_row_starts():
    # The kernel's check counts descents over the whole col_idx array and allows them at row starts only: rows that
    # are empty, rows of one entry and descents across a row boundary are valid; a repeat or a descent inside a row,
    # also right after an empty row, and a column past the end are not.
    shape = [4, 1, 3, 3]
    x = torch.randn(1, 1, 5, 5)
    dense = torch.zeros(shape)

    def run(row_ptr, col_idx):
        row_ptr, col_idx = torch.tensor(row_ptr, dtype=torch.int32), torch.tensor(col_idx, dtype=torch.int32)
        values = torch.arange(1.0, len(col_idx) + 1)
        return torch.ops.ptd_sparse_kernels.conv_forward(x, values, row_ptr, col_idx, shape, None, [1, 1], [1, 1],
                                                         [1, 1])

    out = run([0, 2, 2, 3, 5], [4, 8, 0, 3, 7])  # row 1 empty; 8 -> 0 and 0 -> 3 cross row starts
    dense.view(4, 9)[0, [4, 8]] = torch.tensor([1.0, 2.0])
    dense.view(4, 9)[2, 0] = 3.0
    dense.view(4, 9)[3, [3, 7]] = torch.tensor([4.0, 5.0])
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, dense, padding=1))
    with pytest.raises(ValueError, match=r"col_idx\[4\] = 3 is not greater than col_idx\[3\] = 7 in row 3"):
        run([0, 2, 2, 3, 5], [4, 8, 0, 7, 3])
    with pytest.raises(ValueError, match=r"col_idx\[3\] = 2 is not greater than col_idx\[2\] = 2 in row 2"):
        run([0, 2, 2, 4, 5], [4, 8, 2, 2, 7])  # a repeat in the row after an empty one
    with pytest.raises(ValueError, match=r"col_idx\[4\] = 9 is out of range"):
        run([0, 2, 2, 3, 5], [4, 8, 0, 3, 9])
    with pytest.raises(ValueError, match=r"col_idx\[0\] = -1 is out of range"):
        run([0, 2, 2, 3, 5], [-1, 8, 0, 3, 7])
