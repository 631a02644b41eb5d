// Argument checks that every compiled backend of the KD loss shares, so the cpu and cuda kernels refuse the same
// input with the same message. Device checks stay with each backend.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

namespace ptd_sparse {

enum Reduction : int64_t { kNone = 0, kSum = 1, kBatchMean = 2 };

inline void check_loss_options(const at::Tensor& student_logits, double temperature, double alpha,
                               int64_t reduction) {
  TORCH_CHECK_VALUE(student_logits.dim() == 2, "student_logits must be 2-D (rows, classes), got shape ",
                    student_logits.sizes());
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), "temperature must be a finite number > 0, got ",
                    temperature);
  TORCH_CHECK_VALUE(alpha >= 0 && alpha <= 1, "alpha must lie in [0, 1], got ", alpha);
  TORCH_CHECK_VALUE(reduction >= kNone && reduction <= kBatchMean, "reduction code must be 0, 1 or 2, got ", reduction);
}

// Shapes and dtypes of a top-k teacher (ptd_sparse/topk_teacher.py). The operator has checked its values; the
// kernels index the student row with the indices, so each also refuses an index out of range, in its own way (the
// cpu backend before its loop, the cuda kernel through an error slot, without a synchronisation of its own).
inline void check_topk_teacher_shapes(const at::Tensor& indices, const at::Tensor& logits,
                                      const at::Tensor& rest_mass, int64_t rows, int64_t classes) {
  TORCH_CHECK_VALUE(indices.dim() == 2 && indices.size(0) == rows && indices.size(1) >= 1 &&
                        indices.size(1) <= std::max<int64_t>(classes, 1),
                    "teacher.indices must have shape [", rows, ", k] with 1 <= k <= ", classes, ", got ",
                    indices.sizes());
  TORCH_CHECK_VALUE(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong,
                    "teacher.indices must have dtype int32 or int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(logits.sizes() == indices.sizes(), "teacher.logits has shape ", logits.sizes(),
                    " but teacher.indices has shape ", indices.sizes());
  TORCH_CHECK_VALUE(rest_mass.dim() == 1 && rest_mass.size(0) == rows && rest_mass.scalar_type() == at::kFloat,
                    "teacher.rest_mass must be float32 of shape [", rows, "], got ", rest_mass.scalar_type(),
                    " of shape ", rest_mass.sizes());
}

}  // namespace ptd_sparse
