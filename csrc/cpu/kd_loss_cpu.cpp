// CPU kernel of the fused temperature-softmax KD loss:
//   row_loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)
// Per row: one online pass collects the running maxima and normalisers of softmax(s / T), softmax(s) and
// softmax(t / T) together with the teacher-weighted sum needed for KL; a second sweep over the same (cached) row
// writes the gradient. Accumulation is in float (double for double inputs). The only rows x classes buffer is the
// gradient itself, in the student's dtype.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <atomic>
#include <cmath>
#include <limits>

namespace ptd_sparse {
namespace {

enum Reduction : int64_t { kNone = 0, kSum = 1, kBatchMean = 2 };

template <typename acc_t>
struct RowStats {
  acc_t student_max = -std::numeric_limits<acc_t>::infinity();
  acc_t student_sum_t = 0;  // sum exp((s - student_max) / T)
  acc_t student_sum_1 = 0;  // sum exp(s - student_max)
  acc_t teacher_max = -std::numeric_limits<acc_t>::infinity();
  acc_t teacher_sum = 0;       // sum exp((t - teacher_max) / T)
  acc_t teacher_weighted = 0;  // sum exp((t - teacher_max) / T) * (t - s) / T
};

// Folds one (student, teacher) pair into the running statistics, rescaling the sums when a maximum grows.
// -inf entries contribute nothing (their probability is exactly zero) and never produce inf - inf.
template <typename acc_t>
inline void accumulate(RowStats<acc_t>& st, acc_t s, acc_t t, acc_t inv_t) {
  if (s > st.student_max) {
    st.student_sum_t *= std::exp((st.student_max - s) * inv_t);
    st.student_sum_1 *= std::exp(st.student_max - s);
    st.student_max = s;
  }
  if (s != -std::numeric_limits<acc_t>::infinity()) {
    st.student_sum_t += std::exp((s - st.student_max) * inv_t);
    st.student_sum_1 += std::exp(s - st.student_max);
  }
  if (t == -std::numeric_limits<acc_t>::infinity()) return;
  if (t > st.teacher_max) {
    const acc_t scale = std::exp((st.teacher_max - t) * inv_t);
    st.teacher_sum *= scale;
    st.teacher_weighted *= scale;
    st.teacher_max = t;
  }
  const acc_t p = std::exp((t - st.teacher_max) * inv_t);
  st.teacher_sum += p;
  st.teacher_weighted += p * (t - s) * inv_t;
}

inline void record_first(std::atomic<int64_t>& slot, int64_t row) {
  int64_t seen = slot.load();
  while (row < seen && !slot.compare_exchange_weak(seen, row)) {
  }
}

inline bool is_bad(double v) { return std::isnan(v) || v == std::numeric_limits<double>::infinity(); }

template <typename student_t, typename teacher_t>
void kd_loss_rows(const at::Tensor& student, const at::Tensor& teacher, const int64_t* target, double temperature,
                  double alpha, int64_t ignore_index, double grad_scale, at::Tensor& row_loss, at::Tensor& grad) {
  using acc_t = std::conditional_t<std::is_same_v<student_t, double>, double, float>;
  const int64_t rows = student.size(0), classes = student.size(1);
  const student_t* s_ptr = student.const_data_ptr<student_t>();
  const teacher_t* t_ptr = teacher.const_data_ptr<teacher_t>();
  acc_t* loss_ptr = row_loss.mutable_data_ptr<acc_t>();
  student_t* g_ptr = grad.defined() ? grad.mutable_data_ptr<student_t>() : nullptr;
  const acc_t T = static_cast<acc_t>(temperature), inv_t = acc_t(1) / T;
  const acc_t kd_weight = static_cast<acc_t>(alpha) * T * T;
  const acc_t ce_weight = target ? static_cast<acc_t>(1.0 - alpha) : acc_t(0);
  const acc_t scale = static_cast<acc_t>(grad_scale);
  // First offending row per problem; reported after the parallel region so no exception crosses threads.
  std::atomic<int64_t> bad_student{rows}, bad_teacher{rows};

  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, classes)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const student_t* s_row = s_ptr + r * classes;
      const teacher_t* t_row = t_ptr + r * classes;
      student_t* g_row = g_ptr ? g_ptr + r * classes : nullptr;
      const bool ignored = target && target[r] == ignore_index;
      if (ignored) {
        loss_ptr[r] = 0;
        if (g_row) std::fill(g_row, g_row + classes, student_t(0));
        continue;
      }
      RowStats<acc_t> st;
      bool bad_s = false, bad_t = false;
      for (int64_t c = 0; c < classes; ++c) {
        const acc_t s = static_cast<acc_t>(s_row[c]), t = static_cast<acc_t>(t_row[c]);
        bad_s |= is_bad(s);
        bad_t |= is_bad(t);
        accumulate(st, s, t, inv_t);
      }
      bad_s |= st.student_max == -std::numeric_limits<acc_t>::infinity();
      bad_t |= st.teacher_max == -std::numeric_limits<acc_t>::infinity();
      if (bad_s || bad_t) {
        if (bad_s) record_first(bad_student, r);
        if (bad_t) record_first(bad_teacher, r);
        continue;
      }
      // Everything is computed relative to the row maxima: x - max is exact for nearby values, so large logits
      // (|x| ~ 1e4) lose no precision before the exponentials.
      const acc_t log_z_student_t = std::log(st.student_sum_t), log_z_student_1 = std::log(st.student_sum_1);
      const acc_t log_z_teacher = std::log(st.teacher_sum);
      acc_t loss = 0;
      if (kd_weight != 0) {
        // KL = sum p_t (t - s) / T - lse(t / T) + lse(s / T)
        const acc_t lse_difference = (st.teacher_max - st.student_max) * inv_t + log_z_teacher - log_z_student_t;
        loss += kd_weight * (st.teacher_weighted / st.teacher_sum - lse_difference);
      }
      if (ce_weight != 0)
        loss += ce_weight * (st.student_max - static_cast<acc_t>(s_row[target[r]]) + log_z_student_1);
      loss_ptr[r] = loss;
      if (!g_row) continue;
      // d/ds [alpha T^2 KL] = alpha T (p_s^T - p_t^T);  d/ds [(1 - alpha) CE] = (1 - alpha) (p_s - onehot(y)).
      const acc_t kd_grad = static_cast<acc_t>(alpha) * T * scale, ce_grad = ce_weight * scale;
      for (int64_t c = 0; c < classes; ++c) {
        const acc_t s = static_cast<acc_t>(s_row[c]) - st.student_max;
        const acc_t t = static_cast<acc_t>(t_row[c]) - st.teacher_max;
        acc_t g = 0;
        if (kd_weight != 0)
          g += kd_grad * (std::exp(s * inv_t - log_z_student_t) - std::exp(t * inv_t - log_z_teacher));
        if (ce_grad != 0) g += ce_grad * (std::exp(s - log_z_student_1) - (c == target[r] ? acc_t(1) : acc_t(0)));
        g_row[c] = static_cast<student_t>(g);
      }
    }
  });
  TORCH_CHECK_VALUE(bad_student.load() == rows, "kd_loss: student_logits row ", bad_student.load(),
                    " holds NaN or +inf, or has no finite entry; logits must be finite or -inf");
  TORCH_CHECK_VALUE(bad_teacher.load() == rows, "kd_loss: teacher_logits row ", bad_teacher.load(),
                    " holds NaN or +inf, or has no finite entry; logits must be finite or -inf");
}

std::tuple<at::Tensor, at::Tensor> kd_loss_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                               const c10::optional<at::Tensor>& target, double temperature,
                                               double alpha, int64_t reduction, int64_t ignore_index,
                                               bool compute_grad) {
  TORCH_CHECK_VALUE(student_logits.device().is_cpu() && teacher_logits.device().is_cpu(),
                    "student_logits and teacher_logits must be CPU tensors for the cpu backend");
  TORCH_CHECK_VALUE(student_logits.dim() == 2, "student_logits must be 2-D (rows, classes), got shape ",
                    student_logits.sizes());
  TORCH_CHECK_VALUE(teacher_logits.sizes() == student_logits.sizes(), "teacher_logits has shape ",
                    teacher_logits.sizes(), " but student_logits has shape ", student_logits.sizes());
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), "temperature must be a finite number > 0, got ",
                    temperature);
  TORCH_CHECK_VALUE(alpha >= 0 && alpha <= 1, "alpha must lie in [0, 1], got ", alpha);
  TORCH_CHECK_VALUE(reduction >= kNone && reduction <= kBatchMean, "reduction code must be 0, 1 or 2, got ", reduction);
  const int64_t rows = student_logits.size(0), classes = student_logits.size(1);
  const at::Tensor student = student_logits.contiguous(), teacher = teacher_logits.contiguous();

  // Labels are checked and counted serially: O(rows), and batchmean needs the count before any gradient is written.
  at::Tensor labels;
  const int64_t* label_ptr = nullptr;
  int64_t counted_rows = rows;
  if (target.has_value() && target->defined()) {
    TORCH_CHECK_VALUE(target->device().is_cpu() && target->dim() == 1 && target->numel() == rows,
                      "target must be a 1-D CPU tensor with one label per row (", rows, "), got shape ",
                      target->sizes());
    TORCH_CHECK_VALUE(!at::isFloatingType(target->scalar_type()) && target->scalar_type() != at::kBool,
                      "target must hold integer class indices, got ", target->scalar_type());
    labels = target->to(at::kLong).contiguous();
    label_ptr = labels.const_data_ptr<int64_t>();
    counted_rows = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t y = label_ptr[r];
      if (y == ignore_index) continue;
      TORCH_CHECK_VALUE(y >= 0 && y < classes, "kd_loss: target has value ", y, " at row ", r,
                        "; expected a class index in [0, ", classes, ") or ignore_index = ", ignore_index);
      ++counted_rows;
    }
  }
  const double grad_scale = reduction == kBatchMean ? 1.0 / std::max<int64_t>(counted_rows, 1) : 1.0;
  const auto acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor row_loss = at::empty({rows}, student.options().dtype(acc_dtype));
  at::Tensor grad = compute_grad ? at::empty_like(student) : at::Tensor();

  if (rows > 0 && classes > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_loss_cpu", [&] {
      using student_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher.scalar_type(), "kd_loss_cpu_teacher", [&] {
        kd_loss_rows<student_t, scalar_t>(student, teacher, label_ptr, temperature, alpha, ignore_index, grad_scale,
                                          row_loss, grad);
      });
    });
  } else if (grad.defined()) {
    grad.zero_();
  }
  at::Tensor loss;
  if (reduction == kNone) {
    loss = row_loss;
  } else {
    loss = row_loss.sum();
    if (reduction == kBatchMean) loss = loss / static_cast<double>(std::max<int64_t>(counted_rows, 1));
  }
  return {loss, compute_grad ? grad : at::empty({0}, student.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(ptd_sparse_kernels, CPU, m) { m.impl("kd_loss", &kd_loss_cpu); }

}  // namespace ptd_sparse
