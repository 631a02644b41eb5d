"""Validation of the canonical sparse format (ptd_sparse.pattern) where it enters the package from outside.

A pattern built by hand, or loaded from a state dict, reaches kernels that index memory with it: a decreasing
row_ptr or an out-of-range col_idx is an out-of-bounds access there, not just a wrong answer. These checks run once,
when a ConvPattern / SparseConvWeight is constructed or a module's state is loaded, never per call (the CUDA and
Triton kernels do not read the index arrays on the host; see csrc/csr_checks.h). Each error names the tensor and its
first bad entry. Cost: a few vectorised passes over C_out + C_in + nnz entries.
"""
from __future__ import annotations

from numbers import Integral

import torch
from torch import Tensor

from ptd_sparse._validation import FLOAT_DTYPES

INDEX_DTYPES = {"row_ptr": torch.int32, "col_idx": torch.int32, "t_ptr": torch.int32, "t_rows": torch.int32,
                "t_perm": torch.int32, "flat_index": torch.int64}


def _first(bad: Tensor) -> int | None:
    """Index of the first True entry of a 1-D bool tensor, or None."""
    hits = torch.nonzero(bad)
    return int(hits[0, 0]) if hits.numel() else None


def _owners(pointers: Tensor, entries: int) -> Tensor:
    """The row of each of `entries` entries under checked (non-decreasing) pointers, as int64. searchsorted rather
    than repeat_interleave: the latter costs milliseconds per call on small tensors with several CPU threads."""
    positions = torch.arange(entries, dtype=pointers.dtype, device=pointers.device)
    return torch.searchsorted(pointers[1:].contiguous(), positions, right=True).long()


def check_shape(shape) -> tuple[int, int, int, int]:
    if (not isinstance(shape, (tuple, list)) or len(shape) != 4
            or not all(isinstance(s, Integral) and not isinstance(s, bool) and s >= 1 for s in shape)):
        raise ValueError(f"shape must be 4 positive ints (C_out, C_in, KH, KW), got {shape!r}")
    return tuple(int(s) for s in shape)


def check_groups(groups, c_out: int, c_in: int | None = None) -> int:
    """groups: a positive int dividing C_out (and the full C_in, when given)."""
    if not isinstance(groups, Integral) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if c_out % groups or (c_in is not None and c_in % groups):
        raise ValueError(f"groups={groups} must divide C_out = {c_out}" +
                         (f" and C_in = {c_in}" if c_in is not None else ""))
    return int(groups)


def check_index_tensor(tensor, name: str, length: int | None, device: torch.device | None) -> Tensor:
    """A 1-D tensor of the index dtype `name` needs, with `length` entries (None: any) on `device`."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    dtype = INDEX_DTYPES[name]
    if tensor.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {tensor.dtype}")
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
    if length is not None and tensor.numel() != length:
        raise ValueError(f"{name} must have {length} entries, got {tensor.numel()}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but row_ptr is on {device}")
    return tensor


def check_pointers(pointers: Tensor, name: str, entries: int) -> None:
    """pointers starts at 0, never decreases and ends at `entries`."""
    first = int(pointers[0])
    if first != 0:
        raise ValueError(f"{name}[0] = {first}; {name} must start at 0")
    p = pointers.long()
    i = _first(p[1:] < p[:-1])
    if i is not None:
        raise ValueError(f"{name}[{i + 1}] = {int(p[i + 1])} is less than {name}[{i}] = {int(p[i])}; {name} must be "
                         "non-decreasing")
    last = int(p[-1])
    if last != entries:
        raise ValueError(f"{name}[{p.numel() - 1}] = {last} but there are {entries} nonzeros (col_idx entries); the "
                         "last pointer must equal nnz")


def check_pattern(shape, row_ptr, col_idx, t_ptr, t_rows, t_perm, flat_index,
                  groups: int = 1) -> tuple[int, int, int, int]:
    """Every invariant of ConvPattern (see its field comments); returns the shape as a tuple of ints."""
    c_out, c_in, kh, kw = check_shape(shape)
    device = check_index_tensor(row_ptr, "row_ptr", c_out + 1, None).device
    nnz = check_index_tensor(col_idx, "col_idx", None, device).numel()
    check_index_tensor(t_ptr, "t_ptr", c_in + 1, device)
    for name, tensor in (("t_rows", t_rows), ("t_perm", t_perm), ("flat_index", flat_index)):
        check_index_tensor(tensor, name, nnz, device)
    rows, cols, expected_flat = _check_csr_entries(shape, row_ptr, col_idx, groups)
    e = _first(flat_index != expected_flat)
    if e is not None:
        raise ValueError(f"flat_index[{e}] = {int(flat_index[e])} but the CSR entry {e} (row {int(rows[e])}, column "
                         f"{int(cols[e])}) is at {int(expected_flat[e])}; flat_index must match row_ptr and col_idx")
    check_pointers(t_ptr, "t_ptr", nnz)
    perm = t_perm.long()
    j = _first((perm < 0) | (perm >= nnz))
    if j is not None:
        raise ValueError(f"t_perm[{j}] = {int(perm[j])} is out of range; CSR positions lie in [0, nnz = {nnz})")
    counts = torch.bincount(perm, minlength=nnz)
    e = _first(counts != 1)
    if e is not None:
        raise ValueError(f"t_perm holds CSR position {e} {int(counts[e])} times; t_perm must be a permutation of "
                         f"0 .. nnz - 1")
    j = _first(t_rows.long() != rows[perm])
    if j is not None:
        raise ValueError(f"t_rows[{j}] = {int(t_rows[j])} but CSR entry t_perm[{j}] = {int(perm[j])} is in row "
                         f"{int(rows[perm[j]])}; t_rows must match the transposed entries")
    channels = _owners(t_ptr, nnz)
    j = _first(cols[perm] // (kh * kw) != channels)
    if j is not None:
        raise ValueError(f"t_perm[{j}] = {int(perm[j])} points at col_idx[{int(perm[j])}] = {int(cols[perm[j]])} of "
                         f"input channel {int(cols[perm[j]]) // (kh * kw)}, but entry {j} of t_ptr belongs to input "
                         f"channel {int(channels[j])}")
    return c_out, c_in, kh, kw


def check_csr(shape, row_ptr, col_idx, groups: int = 1) -> tuple[int, int, int, int]:
    """The invariants of the CSR part of ConvPattern (row_ptr, col_idx; what SparseConv2d keeps); returns the shape as
    a tuple of ints."""
    c_out = check_shape(shape)[0]
    device = check_index_tensor(row_ptr, "row_ptr", c_out + 1, None).device
    check_index_tensor(col_idx, "col_idx", None, device)
    _check_csr_entries(shape, row_ptr, col_idx, groups)
    return check_shape(shape)


def _check_csr_entries(shape, row_ptr: Tensor, col_idx: Tensor, groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """row_ptr and col_idx (dtypes and lengths already checked) against each other and the shape; returns each
    entry's row, column and position in the flattened grouped weight."""
    c_out, c_in, kh, kw = check_shape(shape)
    groups = check_groups(groups, c_out, c_in)
    nnz = col_idx.numel()
    columns = c_in * kh * kw
    if nnz > c_out * columns:
        raise ValueError(f"col_idx has {nnz} entries but a {shape} weight has only {c_out * columns}")

    check_pointers(row_ptr, "row_ptr", nnz)
    cols = col_idx.long()
    e = _first((cols < 0) | (cols >= columns))
    if e is not None:
        raise ValueError(f"col_idx[{e}] = {int(cols[e])} is out of range; columns must lie in [0, C_in * KH * KW = "
                         f"{columns})")
    rows = _owners(row_ptr, nnz)
    e = _first((rows[1:] == rows[:-1]) & (cols[1:] <= cols[:-1]))
    if e is not None:
        raise ValueError(f"col_idx[{e + 1}] = {int(cols[e + 1])} is not greater than col_idx[{e}] = {int(cols[e])} "
                         f"in row {int(rows[e])}; columns must be strictly ascending within a row")
    group_columns = columns // groups
    expected_flat = rows * columns + cols
    if groups != 1:
        # A grouped pattern's row reads only its group's block of columns; flat_index counts in the grouped weight.
        group_of_row = torch.div(rows, c_out // groups, rounding_mode="floor")
        e = _first(torch.div(cols, group_columns, rounding_mode="floor") != group_of_row)
        if e is not None:
            raise ValueError(f"col_idx[{e}] = {int(cols[e])} (input channel {int(cols[e]) // (kh * kw)}) lies outside "
                             f"the input channels of row {int(rows[e])}'s group {int(group_of_row[e])} "
                             f"(groups={groups}, {c_in // groups} channels each)")
        expected_flat = rows * group_columns + cols - group_of_row * group_columns
    return rows, cols, expected_flat


def check_sizes(weight_shape, row_ptr, col_idx, t_ptr, t_rows, t_perm, values) -> None:
    """The O(1) part of check_pattern, for the operators' every call: dtypes and lengths, nothing read from the
    tensors' memory (no device synchronisation). The content was checked when the pattern entered the package."""
    c_out, c_in, _, _ = check_shape(list(weight_shape))
    device = check_index_tensor(row_ptr, "row_ptr", c_out + 1, None).device
    nnz = check_index_tensor(col_idx, "col_idx", None, device).numel()
    if not is_absent_transposed_view(t_ptr, t_rows, t_perm):
        check_index_tensor(t_ptr, "t_ptr", c_in + 1, device)
        check_index_tensor(t_rows, "t_rows", nnz, device)
        check_index_tensor(t_perm, "t_perm", nnz, device)
    if not isinstance(values, Tensor) or values.dim() != 1 or values.numel() != nnz:
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"values must be 1-D with nnz = {nnz} entries, got {shape}")


def is_absent_transposed_view(t_ptr, t_rows, t_perm) -> bool:
    """Whether (t_ptr, t_rows, t_perm) are the empty int32 tensors a call passes when no input gradient will be
    computed: only the data-gradient kernels read the transposed view, and an inference model does not hold it
    (SparseConv2d). The data-gradient kernels refuse such a view."""
    return all(isinstance(t, Tensor) and t.dtype == torch.int32 and t.numel() == 0 for t in (t_ptr, t_rows, t_perm))


def check_values(values, nnz: int, device: torch.device, name: str = "values") -> Tensor:
    """values: a 1-D floating tensor of nnz finite entries on `device`."""
    if not isinstance(values, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    if values.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float16, bfloat16, float32 or float64, got {values.dtype}")
    if values.dim() != 1 or values.numel() != nnz:
        raise ValueError(f"{name} must be 1-D with nnz = {nnz} entries, got shape {tuple(values.shape)}")
    if values.device != device:
        raise ValueError(f"{name} are on {values.device} but the pattern is on {device}")
    check_finite(values.detach(), name)
    return values


def check_finite(tensor: Tensor, name: str) -> None:
    """No NaN or infinity in `tensor` (a floating tensor of any shape); names the first bad entry."""
    bad = _first(~torch.isfinite(tensor.reshape(-1)))
    if bad is not None:
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(bad), tensor.shape)) if tensor.dim() else ()
        raise ValueError(f"{name}{list(index)} = {tensor.reshape(-1)[bad].item()} is not finite; {name} must hold "
                         "finite numbers only")
