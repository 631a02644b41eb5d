"""The canonical sparse weight format shared by every backend (docs/design.md, section 2.1).

A 4-D convolution weight [C_out, C_in, KH, KW] is stored as CSR by output channel:
    row_ptr int32 [C_out + 1], col_idx int32 [nnz] = (c_in * KH + kh) * KW + kw, values [nnz] (the weight's dtype).
A grouped convolution (groups g, weight [C_out, C_in / g, KH, KW]) is stored as the block-diagonal dense weight
[C_out, C_in, KH, KW] it is equivalent to: the columns of row r index the FULL input-channel space, and only those of
r's group, c_in = group(r) * C_in / g + c_local, are ever present. So every backend's forward, data-gradient and
weight-gradient kernels compute grouped and depthwise convolutions unchanged (their work scales with the nonzeros,
and no zero block is ever stored); only `flat_index` (positions in the grouped weight, from which values are gathered
and into which their gradients go) and the dense fallbacks (F.conv2d with groups) need to know g.
`ConvPattern` is the part that depends only on the mask: the CSR structure plus the layouts derived from it once per
mask (the transposed CSC-by-input-channel view for the data gradient, and the flat positions used to gather values
from a dense weight). `SparseConvWeight` is a pattern plus its values.

Both validate what they are given (ptd_sparse._format_checks: row_ptr monotone from 0 to nnz, col_idx in range and
ascending within a row, the transposed view and flat_index consistent, values finite), because the kernels index
memory with these arrays. Patterns derived inside the package (from_mask, .to(), a module's buffers) are valid by
construction and skip the check through `_trusted`, so nothing is re-validated per call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ptd_sparse import _format_checks

INT32_MAX = 2**31 - 1


def _counts_to_pointers(counts: Tensor) -> Tensor:
    pointers = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=counts.device)
    pointers[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return pointers


def grouped_shape(weight_shape, groups: int) -> tuple[int, int, int, int]:
    """The grouped weight's shape [C_out, C_in / groups, KH, KW] of the full (block-diagonal) `weight_shape`."""
    c_out, c_in, kh, kw = weight_shape
    return (int(c_out), int(c_in) // groups, int(kh), int(kw))


def flat_positions(row_ptr: Tensor, col_idx: Tensor, weight_shape: list[int], groups: int = 1) -> Tensor:
    """Position of each CSR entry in the flattened grouped weight [C_out, C_in / groups, KH, KW] (what
    ConvPattern.flat_index holds, computed from the index tensors alone for callers that have no ConvPattern).
    weight_shape is the full [C_out, C_in, KH, KW]; with groups=1 the two coincide."""
    c_out, c_in, kh, kw = weight_shape
    # output_size: the length is known (nnz), so torch.compile needs no data-dependent size here.
    rows = torch.repeat_interleave(torch.arange(c_out, device=col_idx.device), (row_ptr[1:] - row_ptr[:-1]).long(),
                                   output_size=col_idx.numel())
    group_columns = (c_in // groups) * kh * kw
    if groups == 1:
        return rows * group_columns + col_idx.long()
    # Row r's columns lie in its group's block [group(r) * group_columns, (group(r) + 1) * group_columns).
    group_of_row = torch.div(rows, c_out // groups, rounding_mode="floor")
    return rows * group_columns + col_idx.long() - group_of_row * group_columns


def transposed_view(row_ptr: Tensor, col_idx: Tensor, shape) -> tuple[Tensor, Tensor, Tensor]:
    """(t_ptr, t_rows, t_perm), the CSC-by-input-channel view of a CSR pattern of the full `shape` [C_out, C_in, KH,
    KW] that the data-gradient kernels read (see ConvPattern's fields). Every intermediate has a size known from the
    shapes alone (no bincount), so a traced or compiled graph can derive the view in-graph."""
    c_out, c_in, kh, kw = (int(s) for s in shape)
    nnz = col_idx.numel()
    rows = torch.repeat_interleave(torch.arange(c_out, device=col_idx.device), (row_ptr[1:] - row_ptr[:-1]).long(),
                                   output_size=nnz)
    in_channels = torch.div(col_idx.long(), kh * kw, rounding_mode="floor")
    order = torch.argsort(in_channels, stable=True)
    t_ptr = torch.searchsorted(in_channels[order], torch.arange(c_in + 1, device=col_idx.device))
    return t_ptr.to(torch.int32), rows[order].to(torch.int32), order.to(torch.int32)


def dense_weight(values: Tensor, row_ptr: Tensor, col_idx: Tensor, weight_shape: list[int],
                 groups: int = 1) -> Tensor:
    """The dense grouped weight [C_out, C_in / groups, KH, KW] holding `values` at the CSR positions (weight_shape is
    the full [C_out, C_in, KH, KW]); for F.conv2d(..., groups=groups)."""
    shape = grouped_shape(weight_shape, groups)
    flat = flat_positions(row_ptr, col_idx, weight_shape, groups)
    return values.new_zeros(math.prod(shape)).index_put((flat,), values).reshape(shape)


@dataclass(frozen=True)
class ConvPattern:
    """Nonzero structure of a [C_out, C_in, KH, KW] weight; built once per mask, shared by all calls. With
    groups > 1, `shape` is the full (block-diagonal) shape the kernels see and `weight_shape` the grouped weight's
    [C_out, C_in / groups, KH, KW] (see the module docstring)."""

    shape: tuple[int, int, int, int]  # full: C_in counts every input channel
    row_ptr: Tensor  # int32 [C_out + 1]
    col_idx: Tensor  # int32 [nnz], column = (c_in * KH + kh) * KW + kw, ascending within a row
    t_ptr: Tensor  # int32 [C_in + 1], entries of input channel c are t_ptr[c] .. t_ptr[c + 1]
    t_rows: Tensor  # int32 [nnz], output channel of each transposed entry
    t_perm: Tensor  # int32 [nnz], CSR position of each transposed entry
    flat_index: Tensor  # int64 [nnz], position of each nonzero in the grouped weight.reshape(-1)
    groups: int = 1  # row r reads only input channels of its group, group(r) = r // (C_out / groups)

    def __post_init__(self):
        shape = _format_checks.check_pattern(self.shape, self.row_ptr, self.col_idx, self.t_ptr, self.t_rows,
                                             self.t_perm, self.flat_index, self.groups)
        object.__setattr__(self, "shape", shape)

    @classmethod
    def _trusted(cls, shape, *tensors: Tensor, groups: int = 1) -> "ConvPattern":
        """A pattern from tensors the package derived itself (valid by construction): no validation, which would
        cost O(C_out + nnz) (and device synchronisations) on every call of the modules that rebuild it per call."""
        pattern = object.__new__(cls)
        object.__setattr__(pattern, "shape", tuple(int(s) for s in shape))
        for name, tensor in zip(cls.index_names(), tensors, strict=True):
            object.__setattr__(pattern, name, tensor)
        object.__setattr__(pattern, "groups", int(groups))
        return pattern

    @classmethod
    def from_mask(cls, mask: Tensor, groups: int = 1) -> "ConvPattern":
        """Pattern of the nonzero entries of `mask` ([C_out, C_in / groups, KH, KW], bool or 0/1 valued): the mask
        of a convolution with `groups` groups (C_out divisible by groups)."""
        if not isinstance(mask, Tensor) or mask.dim() != 4:
            raise ValueError(f"mask must be a 4-D tensor [C_out, C_in / groups, KH, KW], got "
                             f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
        groups = _format_checks.check_groups(groups, mask.shape[0])
        if mask.dtype != torch.bool:
            if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("mask must be boolean or hold only 0 and 1, so that weight * mask keeps or drops "
                                 "each weight; got other values")
        c_out, c_in_group, kh, kw = mask.shape
        c_in = c_in_group * groups
        taps = c_in_group * kh * kw
        flat_index = torch.nonzero(mask.reshape(-1) != 0).reshape(-1)
        if flat_index.numel() > INT32_MAX or c_out * c_in * kh * kw > INT32_MAX:
            raise ValueError(f"mask has {mask.numel()} entries over {c_in} input channels; the int32 CSR format "
                             f"holds at most {INT32_MAX} columns x rows")
        rows = torch.div(flat_index, taps, rounding_mode="floor")
        # Columns over the full input-channel space: the row's group block, then the position inside the group.
        cols = flat_index - rows * taps + torch.div(rows, c_out // groups, rounding_mode="floor") * taps
        row_ptr = _counts_to_pointers(torch.bincount(rows, minlength=c_out))
        col_idx = cols.to(torch.int32)
        return cls._trusted((c_out, c_in, kh, kw), row_ptr, col_idx,
                            *transposed_view(row_ptr, col_idx, (c_out, c_in, kh, kw)), flat_index, groups=groups)

    @classmethod
    def _from_trusted_csr(cls, shape, row_ptr: Tensor, col_idx: Tensor, groups: int = 1) -> "ConvPattern":
        """The full pattern of a CSR structure the package holds checked (SparseConv2d keeps only row_ptr and
        col_idx): the transposed view and flat positions derived from them."""
        return cls._trusted(shape, row_ptr, col_idx, *transposed_view(row_ptr, col_idx, shape),
                            flat_positions(row_ptr, col_idx, list(shape), groups), groups=groups)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        """The grouped weight's shape [C_out, C_in / groups, KH, KW] (equal to `shape` when groups=1)."""
        return grouped_shape(self.shape, self.groups)

    @property
    def nnz(self) -> int:
        return int(self.col_idx.numel())

    @property
    def density(self) -> float:
        """Nonzeros over the grouped weight's entries (the zero blocks outside the groups do not count)."""
        total = math.prod(self.weight_shape)
        return self.nnz / total if total else 1.0

    @property
    def device(self) -> torch.device:
        return self.row_ptr.device

    def to(self, device: torch.device | str) -> "ConvPattern":
        return ConvPattern._trusted(self.shape, *(getattr(self, name).to(device) for name in self.index_names()),
                                    groups=self.groups)

    @staticmethod
    def index_names() -> tuple[str, ...]:
        return ("row_ptr", "col_idx", "t_ptr", "t_rows", "t_perm", "flat_index")

    def gather(self, weight: Tensor) -> Tensor:
        """values [nnz] of a dense (grouped) weight [C_out, C_in / groups, KH, KW] at this pattern's nonzeros
        (differentiable)."""
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"weight has shape {tuple(weight.shape)} but the pattern was built for "
                             f"{self.weight_shape}" + (f" (groups={self.groups})" if self.groups != 1 else ""))
        return torch.take(weight, self.flat_index)  # one autograd node (reshape + index_select would be two)

    def scatter(self, values: Tensor) -> Tensor:
        """The dense (grouped) weight [C_out, C_in / groups, KH, KW] holding `values` at the nonzeros, 0 elsewhere."""
        dense = values.new_zeros(math.prod(self.weight_shape))
        return dense.index_put((self.flat_index,), values).reshape(self.weight_shape)


class SparseConvWeight:
    """A convolution weight in the canonical CSR format: a `ConvPattern` plus `values` [nnz].

    `values` may require grad: `ptd_sparse.sparse_conv2d` then trains the nonzero values in place of the dense weight.
    """

    def __init__(self, pattern: ConvPattern, values: Tensor):
        if not isinstance(pattern, ConvPattern):
            raise TypeError(f"pattern must be a ptd_sparse.ConvPattern, got {type(pattern).__name__}")
        _format_checks.check_values(values, pattern.nnz, pattern.device)
        self.pattern = pattern
        self.values = values

    @classmethod
    def _trusted(cls, pattern: ConvPattern, values: Tensor) -> "SparseConvWeight":
        """Pattern and values the package already holds checked (a module's buffers and parameter): no validation,
        whose finiteness test would read every value on every call."""
        weight = object.__new__(cls)
        weight.pattern, weight.values = pattern, values
        return weight

    @classmethod
    def from_dense(cls, weight: Tensor, mask: Tensor | None = None, groups: int = 1) -> "SparseConvWeight":
        """Compress `weight` [C_out, C_in / groups, KH, KW] (the weight of a convolution with `groups` groups);
        with no mask, its nonzero entries are kept."""
        if not isinstance(weight, Tensor) or weight.dim() != 4 or not weight.is_floating_point():
            raise ValueError("weight must be a 4-D floating-point tensor [C_out, C_in, KH, KW]")
        if mask is None:
            mask = weight.detach() != 0
        elif tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask has shape {tuple(mask.shape)} but weight has shape {tuple(weight.shape)}")
        elif mask.device != weight.device:
            raise ValueError(f"mask is on {mask.device} but weight is on {weight.device}")
        pattern = ConvPattern.from_mask(mask, groups)
        return cls(pattern, pattern.gather(weight.detach()).clone())

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The full shape [C_out, C_in, KH, KW] the kernels see (see weight_shape for the grouped weight's)."""
        return self.pattern.shape

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return self.pattern.weight_shape

    @property
    def groups(self) -> int:
        return self.pattern.groups

    @property
    def nnz(self) -> int:
        return self.pattern.nnz

    @property
    def density(self) -> float:
        return self.pattern.density

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to_dense(self) -> Tensor:
        """The dense weight [C_out, C_in / groups, KH, KW], zero outside the pattern."""
        return self.pattern.scatter(self.values)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SparseConvWeight":
        pattern = self.pattern if device is None else self.pattern.to(device)
        return SparseConvWeight._trusted(pattern, self.values.to(device=device, dtype=dtype))

    def __repr__(self) -> str:
        return (f"SparseConvWeight(shape={self.weight_shape}, groups={self.groups}, nnz={self.nnz}, "
                f"density={self.density:.4f}, "
                f"dtype={self.dtype}, device={self.device})")
