// Checks of the canonical sparse format (CSR by output channel, and its transposed view) at the kernel entry points.
//
// The Python layer validates a pattern once, when it is built or loaded (ptd_sparse/_format_checks.py); these checks
// guard direct calls of torch.ops.ptd_sparse_kernels.*, where a corrupt row_ptr or col_idx would otherwise become an
// out-of-bounds read or write inside a kernel. Dtypes and sizes are checked on every device. The content checks
// (row_ptr starts at 0, never decreases and ends at nnz; col_idx in range and ascending within a row; the transposed
// view in range) read the index arrays, O(C_out + C_in + nnz), which on a CPU is small next to the convolution
// itself (nnz * N * OH * OW multiply-adds). On a GPU they would need a device-to-host copy and a synchronisation per
// call, so CUDA tensors get the dtype and size checks only and rely on the validation at the Python boundary.
// Every message names the tensor and its first bad entry.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>
#include <vector>

#include "conv_geometry.h"

namespace ptd_sparse {

inline void check_index_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK_VALUE(t.scalar_type() == at::kInt && t.dim() == 1, name, " must be a 1-D int32 tensor, got ",
                    t.scalar_type(), " of shape ", t.sizes());
}

// pointers [rows + 1] of a compressed layout over `entries` entries: starts at 0, never decreases, ends at entries.
inline void check_pointers(const at::Tensor& pointers, const char* name, int64_t rows, int64_t entries,
                           const char* rows_name) {
  check_index_tensor(pointers, name);
  TORCH_CHECK_VALUE(pointers.numel() == rows + 1, name, " must have ", rows_name, " + 1 = ", rows + 1,
                    " entries, got ", pointers.numel());
  if (!pointers.device().is_cpu()) return;
  const at::Tensor p = pointers.contiguous();
  const int32_t* ptr = p.const_data_ptr<int32_t>();
  TORCH_CHECK_VALUE(ptr[0] == 0, name, "[0] = ", ptr[0], "; ", name, " must start at 0");
  // One branch-free pass decides; the entry is looked up for the message only when something is wrong.
  bool decreasing = false;
  for (int64_t i = 1; i <= rows; ++i) decreasing |= ptr[i] < ptr[i - 1];
  for (int64_t i = 1; decreasing && i <= rows; ++i)
    TORCH_CHECK_VALUE(ptr[i] >= ptr[i - 1], name, "[", i, "] = ", ptr[i], " is less than ", name, "[", i - 1,
                      "] = ", ptr[i - 1], "; ", name, " must be non-decreasing");
  TORCH_CHECK_VALUE(ptr[rows] == entries, name, "[", rows, "] = ", ptr[rows], " but there are ", entries,
                    " nonzeros (col_idx entries); the last pointer must equal nnz");
}

// Entries per task of the column check's parallel pass.
constexpr int64_t kCheckGrain = 65536;

// col_idx: 1-D int32, or on the CPU int16 (the compact form an inference SparseConv2d holds where every column is
// below 32768; only the CPU kernels read it).
inline void check_column_tensor(const at::Tensor& col_idx) {
  TORCH_CHECK_VALUE(col_idx.defined(), "col_idx must be a tensor, got None");
  const bool compact = col_idx.scalar_type() == at::kShort && col_idx.device().is_cpu();
  TORCH_CHECK_VALUE((col_idx.scalar_type() == at::kInt || compact) && col_idx.dim() == 1,
                    "col_idx must be a 1-D int32 tensor (or int16 on the CPU), got ", col_idx.scalar_type(),
                    " of shape ", col_idx.sizes(), " on ", col_idx.device());
}

// col_idx's range and order within each row (row_ptr already checked).
template <typename Index>
void check_columns(const int32_t* rp_ptr, const Index* ci_ptr, int64_t nnz, const ConvGeometry& g) {
  const int64_t columns = g.in_channels * g.taps();
  // These checks run on every call, so they must cost little next to a batch-1 convolution, which does a few
  // multiply-adds per nonzero: one vectorisable pass counts the entries not above their predecessor, over the whole
  // array. Such descents may lie only where a row starts; if every other entry ascends, each row's first entry >= 0
  // and last < columns put the whole row in range, so the rest is O(C_out). The detailed pass below runs only to
  // name the first bad entry.
  std::atomic<int64_t> descents{0};
  at::parallel_for(1, std::max<int64_t>(nnz, 1), kCheckGrain, [&](int64_t begin, int64_t end) {
    // 32-bit lanes: twice the entries per vector of a 64-bit count; nnz fits int32 (row_ptr[C_out] == nnz).
    int32_t count = 0;
    for (int64_t e = begin; e < end; ++e) count += ci_ptr[e] <= ci_ptr[e - 1];
    descents += count;
  });
  int64_t row_start_descents = 0;
  bool bad = false;
  for (int64_t row = 0; row < g.out_channels; ++row) {
    const int64_t first = rp_ptr[row], end = rp_ptr[row + 1];
    if (first == end) continue;  // rows that are empty start nowhere
    bad |= (ci_ptr[first] < 0) | (ci_ptr[end - 1] >= columns);
    if (first > 0) row_start_descents += ci_ptr[first] <= ci_ptr[first - 1];
  }
  bad |= descents.load() != row_start_descents;
  for (int64_t row = 0; bad && row < g.out_channels; ++row) {
    for (int64_t e = rp_ptr[row]; e < rp_ptr[row + 1]; ++e) {
      TORCH_CHECK_VALUE(ci_ptr[e] >= 0 && ci_ptr[e] < columns, "col_idx[", e, "] = ", ci_ptr[e],
                        " is out of range; columns must lie in [0, C_in * KH * KW = ", columns, ")");
      // Duplicates would count a weight twice; the canonical order is ascending within a row.
      TORCH_CHECK_VALUE(e == rp_ptr[row] || ci_ptr[e] > ci_ptr[e - 1], "col_idx[", e, "] = ", ci_ptr[e],
                        " is not greater than col_idx[", e - 1, "] = ", ci_ptr[e - 1], " in row ", row,
                        "; columns must be strictly ascending within a row");
    }
  }
}

// row_ptr [C_out + 1] and col_idx [nnz] of a weight of geometry g: column = (c_in * KH + kh) * KW + kw.
inline void check_csr(const at::Tensor& row_ptr, const at::Tensor& col_idx, const ConvGeometry& g) {
  check_column_tensor(col_idx);
  const int64_t nnz = col_idx.numel();
  check_pointers(row_ptr, "row_ptr", g.out_channels, nnz, "C_out");
  if (!col_idx.device().is_cpu() || !row_ptr.device().is_cpu()) return;
  const at::Tensor rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  if (ci.scalar_type() == at::kShort)
    check_columns(rp.const_data_ptr<int32_t>(), ci.const_data_ptr<int16_t>(), nnz, g);
  else
    check_columns(rp.const_data_ptr<int32_t>(), ci.const_data_ptr<int32_t>(), nnz, g);
}

// values [nnz], one per col_idx entry, in the dtype of `like`.
inline void check_values(const at::Tensor& values, const at::Tensor& col_idx, const at::Tensor& like,
                         const char* like_name) {
  TORCH_CHECK_VALUE(values.dim() == 1 && values.numel() == col_idx.numel(), "values must be 1-D with one entry per "
                    "nonzero (col_idx has ", col_idx.numel(), "), got shape ", values.sizes());
  TORCH_CHECK_VALUE(values.scalar_type() == like.scalar_type(), "values dtype ", values.scalar_type(),
                    " must match ", like_name, " dtype ", like.scalar_type());
}

// The transposed view (CSC by input channel) of col_idx [nnz]: t_ptr [C_in + 1], t_rows [nnz] (output channel of
// each entry), t_perm [nnz] (its CSR position, a permutation of 0 .. nnz - 1). Checks col_idx's range too, since the
// data gradient decodes col_idx[t_perm[j]] without row_ptr; entry j must lie in the input channel of its column.
inline void check_transposed(const at::Tensor& col_idx, const at::Tensor& t_ptr, const at::Tensor& t_rows,
                             const at::Tensor& t_perm, const ConvGeometry& g) {
  check_index_tensor(col_idx, "col_idx");
  check_index_tensor(t_rows, "t_rows");
  check_index_tensor(t_perm, "t_perm");
  TORCH_CHECK_VALUE(t_ptr.numel() != 0, "the input gradient needs the pattern's transposed view: t_ptr must have "
                    "C_in + 1 = ", g.in_channels + 1, " entries, got none (an inference-only call passes an empty view)");
  const int64_t nnz = col_idx.numel();
  TORCH_CHECK_VALUE(t_rows.numel() == nnz && t_perm.numel() == nnz, "t_rows and t_perm must have one entry per "
                    "nonzero (col_idx has ", nnz, "), got ", t_rows.numel(), " and ", t_perm.numel());
  check_pointers(t_ptr, "t_ptr", g.in_channels, nnz, "C_in");
  if (!col_idx.device().is_cpu() || !t_ptr.device().is_cpu() || !t_rows.device().is_cpu() ||
      !t_perm.device().is_cpu())
    return;
  const int64_t columns = g.in_channels * g.taps();
  const at::Tensor ci = col_idx.contiguous(), tp = t_ptr.contiguous(), tr = t_rows.contiguous(),
                   tperm = t_perm.contiguous();
  const int32_t* ci_ptr = ci.const_data_ptr<int32_t>();
  const int32_t* tp_ptr = tp.const_data_ptr<int32_t>();
  const int32_t* tr_ptr = tr.const_data_ptr<int32_t>();
  const int32_t* perm_ptr = tperm.const_data_ptr<int32_t>();
  // As in check_csr: a tight pass decides, the detailed pass names the first bad entry.
  std::vector<uint8_t> seen(nnz, 0);
  bool bad = false;
  for (int64_t c = 0; c < g.in_channels && !bad; ++c) {
    const int64_t first_column = c * g.taps(), end_column = first_column + g.taps();  // input channel c's columns
    for (int64_t j = tp_ptr[c]; j < tp_ptr[c + 1]; ++j) {
      const int32_t e = perm_ptr[j];
      if (e < 0 || e >= nnz || seen[e]) {
        bad = true;
        break;
      }
      seen[e] = 1;
      const int32_t column = ci_ptr[e];
      bad |= (tr_ptr[j] < 0) | (tr_ptr[j] >= g.out_channels) | (column < first_column) | (column >= end_column);
    }
  }
  std::fill(seen.begin(), seen.end(), 0);
  for (int64_t c = 0; bad && c < g.in_channels; ++c) {
    for (int64_t j = tp_ptr[c]; j < tp_ptr[c + 1]; ++j) {
      TORCH_CHECK_VALUE(tr_ptr[j] >= 0 && tr_ptr[j] < g.out_channels, "t_rows[", j, "] = ", tr_ptr[j],
                        " is out of range; output channels lie in [0, C_out = ", g.out_channels, ")");
      const int32_t e = perm_ptr[j];
      TORCH_CHECK_VALUE(e >= 0 && e < nnz, "t_perm[", j, "] = ", e, " is out of range; CSR positions lie in [0, nnz = ",
                        nnz, ")");
      TORCH_CHECK_VALUE(!seen[e], "t_perm[", j, "] = ", e, " repeats an earlier entry; t_perm must be a permutation");
      seen[e] = 1;
      TORCH_CHECK_VALUE(ci_ptr[e] >= 0 && ci_ptr[e] < columns, "col_idx[", e, "] = ", ci_ptr[e],
                        " is out of range; columns must lie in [0, C_in * KH * KW = ", columns, ")");
      TORCH_CHECK_VALUE(ci_ptr[e] / g.taps() == c, "t_perm[", j, "] = ", e, " points at col_idx[", e, "] = ", ci_ptr[e],
                        " of input channel ", ci_ptr[e] / g.taps(), " but entry ", j, " of t_ptr belongs to input "
                        "channel ", c);
    }
  }
}

}  // namespace ptd_sparse
