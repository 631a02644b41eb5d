// A 64-bit fingerprint of a tensor's bytes, for caches derived from a weight (ptd_sparse/fingerprint.py).
//
// Fused optimizers, `.data` edits and writes through NumPy views change a tensor's contents without moving its
// version counter, so a cache keyed on the version can serve a stale answer. A cache keyed on the contents cannot;
// this hash makes that key cheap to compute: one pass over the bytes at memory speed.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace ptd_sparse {

// Hash of the bytes of `tensor` (any dtype, on the CPU; made contiguous if it is not). Shape and dtype are not
// hashed: callers key on them separately.
int64_t fingerprint(const at::Tensor& tensor);

// The key of a weight derived from sparse `values` under the pattern (row_ptr, col_idx), all keyed on their contents:
// (fingerprint of values, their dtype, their count, fingerprint of row_ptr, fingerprint of col_idx, its dtype, its
// count). Contents, not addresses or version counters: `.data` edits, NumPy writes and a load_state_dict under
// inference mode change a tensor without moving its version, and a freed tensor's address is reused. One call
// where the same key built in Python took ~30 us of a batch-1 layer's call (ptd_sparse/fingerprint.py, weight_key).
using WeightKey = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;
WeightKey weight_key(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx);

}  // namespace ptd_sparse
