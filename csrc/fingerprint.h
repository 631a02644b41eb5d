// A 64-bit fingerprint of a tensor's bytes, for caches derived from a weight (ptd_sparse/fingerprint.py).
//
// Fused optimizers, `.data` edits and writes through NumPy views change a tensor's contents without moving its
// version counter, so a cache keyed on the version can serve a stale answer. A cache keyed on the contents cannot;
// this hash makes that key cheap to compute: one pass over the bytes at memory speed.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace ptd_sparse {

// Hash of the bytes of `tensor` (any dtype, on the CPU; made contiguous if it is not). Shape and dtype are not
// hashed: callers key on them separately.
int64_t fingerprint(const at::Tensor& tensor);

}  // namespace ptd_sparse
