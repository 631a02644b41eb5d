"""The canonical sparse weight format shared by every backend (docs/design.md, section 2.1).

A 4-D convolution weight [C_out, C_in, KH, KW] is stored as CSR by output channel:
    row_ptr int32 [C_out + 1], col_idx int32 [nnz] = (c_in * KH + kh) * KW + kw, values [nnz] (the weight's dtype).
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
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ptd_sparse import _format_checks

INT32_MAX = 2**31 - 1


def _counts_to_pointers(counts: Tensor) -> Tensor:
    pointers = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=counts.device)
    pointers[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return pointers


def flat_positions(row_ptr: Tensor, col_idx: Tensor, weight_shape: list[int]) -> Tensor:
    """Position of each CSR entry in the flattened dense weight (what ConvPattern.flat_index holds, computed from
    the index tensors alone for callers that have no ConvPattern)."""
    c_out, c_in, kh, kw = weight_shape
    # output_size: the length is known (nnz), so torch.compile needs no data-dependent size here.
    rows = torch.repeat_interleave(torch.arange(c_out, device=col_idx.device), (row_ptr[1:] - row_ptr[:-1]).long(),
                                   output_size=col_idx.numel())
    return rows * (c_in * kh * kw) + col_idx.long()


def dense_weight(values: Tensor, row_ptr: Tensor, col_idx: Tensor, weight_shape: list[int]) -> Tensor:
    """The dense [C_out, C_in, KH, KW] weight holding `values` at the CSR positions."""
    flat = flat_positions(row_ptr, col_idx, weight_shape)
    return values.new_zeros(math.prod(weight_shape)).index_put((flat,), values).reshape(weight_shape)


@dataclass(frozen=True)
class ConvPattern:
    """Nonzero structure of a [C_out, C_in, KH, KW] weight; built once per mask, shared by all calls."""

    shape: tuple[int, int, int, int]
    row_ptr: Tensor  # int32 [C_out + 1]
    col_idx: Tensor  # int32 [nnz], column = (c_in * KH + kh) * KW + kw, ascending within a row
    t_ptr: Tensor  # int32 [C_in + 1], entries of input channel c are t_ptr[c] .. t_ptr[c + 1]
    t_rows: Tensor  # int32 [nnz], output channel of each transposed entry
    t_perm: Tensor  # int32 [nnz], CSR position of each transposed entry
    flat_index: Tensor  # int64 [nnz], position of each nonzero in weight.reshape(-1)

    def __post_init__(self):
        shape = _format_checks.check_pattern(self.shape, self.row_ptr, self.col_idx, self.t_ptr, self.t_rows,
                                             self.t_perm, self.flat_index)
        object.__setattr__(self, "shape", shape)

    @classmethod
    def _trusted(cls, shape, *tensors: Tensor) -> "ConvPattern":
        """A pattern from tensors the package derived itself (valid by construction): no validation, which would
        cost O(C_out + nnz) (and device synchronisations) on every call of the modules that rebuild it per call."""
        pattern = object.__new__(cls)
        object.__setattr__(pattern, "shape", tuple(int(s) for s in shape))
        for field, tensor in zip(fields(cls)[1:], tensors, strict=True):
            object.__setattr__(pattern, field.name, tensor)
        return pattern

    @classmethod
    def from_mask(cls, mask: Tensor) -> "ConvPattern":
        """Pattern of the nonzero entries of `mask` ([C_out, C_in, KH, KW], bool or 0/1 valued)."""
        if not isinstance(mask, Tensor) or mask.dim() != 4:
            raise ValueError(f"mask must be a 4-D tensor [C_out, C_in, KH, KW], got "
                             f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
        if mask.dtype != torch.bool:
            if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("mask must be boolean or hold only 0 and 1, so that weight * mask keeps or drops "
                                 "each weight; got other values")
        c_out, c_in, kh, kw = mask.shape
        taps = c_in * kh * kw
        flat_index = torch.nonzero(mask.reshape(-1) != 0).reshape(-1)
        if flat_index.numel() > INT32_MAX or mask.numel() > INT32_MAX:
            raise ValueError(f"mask has {mask.numel()} entries; the int32 CSR format holds at most {INT32_MAX}")
        rows = torch.div(flat_index, taps, rounding_mode="floor")
        cols = flat_index - rows * taps
        in_channels = torch.div(cols, kh * kw, rounding_mode="floor")
        order = torch.argsort(in_channels, stable=True)
        return cls._trusted(
            (c_out, c_in, kh, kw),
            _counts_to_pointers(torch.bincount(rows, minlength=c_out)),  # row_ptr
            cols.to(torch.int32),  # col_idx
            _counts_to_pointers(torch.bincount(in_channels, minlength=c_in)),  # t_ptr
            rows[order].to(torch.int32),  # t_rows
            order.to(torch.int32),  # t_perm
            flat_index,
        )

    @property
    def nnz(self) -> int:
        return int(self.col_idx.numel())

    @property
    def density(self) -> float:
        total = self.shape[0] * self.shape[1] * self.shape[2] * self.shape[3]
        return self.nnz / total if total else 1.0

    @property
    def device(self) -> torch.device:
        return self.row_ptr.device

    def to(self, device: torch.device | str) -> "ConvPattern":
        return ConvPattern._trusted(self.shape, *(getattr(self, name).to(device) for name in self.index_names()))

    @staticmethod
    def index_names() -> tuple[str, ...]:
        return ("row_ptr", "col_idx", "t_ptr", "t_rows", "t_perm", "flat_index")

    def gather(self, weight: Tensor) -> Tensor:
        """values [nnz] of a dense weight at this pattern's nonzeros (differentiable)."""
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"weight has shape {tuple(weight.shape)} but the pattern was built for {self.shape}")
        return torch.take(weight, self.flat_index)  # one autograd node (reshape + index_select would be two)

    def scatter(self, values: Tensor) -> Tensor:
        """The dense weight holding `values` at the nonzeros and 0 elsewhere."""
        dense = values.new_zeros(self.shape[0] * self.shape[1] * self.shape[2] * self.shape[3])
        return dense.index_put((self.flat_index,), values).reshape(self.shape)


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
    def from_dense(cls, weight: Tensor, mask: Tensor | None = None) -> "SparseConvWeight":
        """Compress `weight` [C_out, C_in, KH, KW]; with no mask, its nonzero entries are kept."""
        if not isinstance(weight, Tensor) or weight.dim() != 4 or not weight.is_floating_point():
            raise ValueError("weight must be a 4-D floating-point tensor [C_out, C_in, KH, KW]")
        if mask is None:
            mask = weight.detach() != 0
        elif tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask has shape {tuple(mask.shape)} but weight has shape {tuple(weight.shape)}")
        elif mask.device != weight.device:
            raise ValueError(f"mask is on {mask.device} but weight is on {weight.device}")
        pattern = ConvPattern.from_mask(mask)
        return cls(pattern, pattern.gather(weight.detach()).clone())

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.pattern.shape

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
        """The dense [C_out, C_in, KH, KW] weight, zero outside the pattern."""
        return self.pattern.scatter(self.values)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SparseConvWeight":
        pattern = self.pattern if device is None else self.pattern.to(device)
        return SparseConvWeight._trusted(pattern, self.values.to(device=device, dtype=dtype))

    def __repr__(self) -> str:
        return (f"SparseConvWeight(shape={self.shape}, nnz={self.nnz}, density={self.density:.4f}, "
                f"dtype={self.dtype}, device={self.device})")
