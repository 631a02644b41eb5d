// CPU kernel of the fused temperature-softmax KD loss:
//   row_loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)
// Per row: one online pass collects the running maxima and normalisers of softmax(s / T), softmax(s) and
// softmax(t / T) together with the teacher-weighted sum needed for KL; a second sweep over the same (cached) row
// writes the gradient. Accumulation is in float (double for double inputs). The only rows x classes buffer is the
// gradient itself, in the student's dtype.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "../kd_loss_checks.h"
#include "isa/dispatch.h"

namespace ptd_sparse {
namespace {

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
    st.teacher_weighted = scale > 0 ? st.teacher_weighted * scale : acc_t(0);  // never inf * 0
    st.teacher_max = t;
  }
  const acc_t p = std::exp((t - st.teacher_max) * inv_t);
  st.teacher_sum += p;
  // p = 0 (underflow) adds nothing, even where the student is -inf (which makes the term, and the loss, +inf).
  if (p > 0) st.teacher_weighted += p * (t - s) * inv_t;
}

inline void record_first(std::atomic<int64_t>& slot, int64_t row) {
  int64_t seen = slot.load();
  while (row < seen && !slot.compare_exchange_weak(seen, row)) {
  }
}

void report_bad_rows(int64_t bad_student, int64_t bad_teacher, int64_t rows) {
  TORCH_CHECK_VALUE(bad_student == rows, "kd_loss: student_logits row ", bad_student,
                    " holds NaN or +inf, or has no finite entry; logits must be finite or -inf");
  TORCH_CHECK_VALUE(bad_teacher == rows, "kd_loss: teacher_logits row ", bad_teacher,
                    " holds NaN or +inf, or has no finite entry; logits must be finite or -inf");
}

// Rows per parallel task: about 64K logits, so small losses run on one thread instead of paying a fork/join.
inline int64_t rows_per_task(int64_t classes) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, classes)); }

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

  at::parallel_for(0, rows, rows_per_task(classes), [&](int64_t begin, int64_t end) {
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
  report_bad_rows(bad_student.load(), bad_teacher.load(), rows);
}

// ---- fast path: every student dtype but double, rows as float (converted per row when needed), through the
// vectorised row kernel of the best instruction set this CPU has (csrc/cpu/kd_row_f32.h, dispatched by
// csrc/cpu/isa/dispatch.cpp).

template <typename T>
const float* row_as_float(const T* row, int64_t classes, std::vector<float>& buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    for (int64_t c = 0; c < classes; ++c) buffer[c] = static_cast<float>(row[c]);
    return buffer.data();
  }
}

template <typename student_t, typename teacher_t>
void kd_loss_rows_fast(const at::Tensor& student, const at::Tensor& teacher, const int64_t* target,
                       double temperature, double alpha, int64_t ignore_index, double grad_scale,
                       at::Tensor& row_loss, at::Tensor& grad) {
  const int64_t rows = student.size(0), classes = student.size(1);
  const student_t* s_ptr = student.const_data_ptr<student_t>();
  const teacher_t* t_ptr = teacher.const_data_ptr<teacher_t>();
  float* loss_ptr = row_loss.mutable_data_ptr<float>();
  student_t* g_ptr = grad.defined() ? grad.mutable_data_ptr<student_t>() : nullptr;
  const float T = static_cast<float>(temperature), inv_t = 1.0f / T;
  const float kd_weight = static_cast<float>(alpha) * T * T;
  const float ce_weight = target ? static_cast<float>(1.0 - alpha) : 0.0f;
  const float kd_grad = static_cast<float>(alpha) * T * static_cast<float>(grad_scale);
  const float ce_grad = ce_weight * static_cast<float>(grad_scale);
  std::atomic<int64_t> bad_student{rows}, bad_teacher{rows};
  const cpu_isa::F32Kernels& kernels = cpu_isa::f32_kernels();
  const int64_t multiple = kernels.kd_scratch_multiple;
  const int64_t scratch_size = 3 * ((classes + multiple - 1) / multiple * multiple);
  at::parallel_for(0, rows, rows_per_task(classes), [&](int64_t begin, int64_t end) {
    std::vector<float> s_buffer, t_buffer, g_buffer, scratch(scratch_size);
    if (!std::is_same_v<student_t, float>) s_buffer.resize(classes), g_buffer.resize(classes);
    if (!std::is_same_v<teacher_t, float>) t_buffer.resize(classes);
    for (int64_t r = begin; r < end; ++r) {
      student_t* g_row = g_ptr ? g_ptr + r * classes : nullptr;
      if (target && target[r] == ignore_index) {
        loss_ptr[r] = 0;
        if (g_row) std::fill(g_row, g_row + classes, student_t(0));
        continue;
      }
      const float* s_row = row_as_float(s_ptr + r * classes, classes, s_buffer);
      const float* t_row = row_as_float(t_ptr + r * classes, classes, t_buffer);
      float* g_float = nullptr;
      if (g_row) g_float = std::is_same_v<student_t, float> ? reinterpret_cast<float*>(g_row) : g_buffer.data();
      const cpu_isa::KdRowResult result = kernels.kd_row(s_row, t_row, classes, target ? target[r] : 0, inv_t,
                                                         kd_weight, ce_weight, kd_grad, ce_grad, scratch.data(),
                                                         g_float);
      if (result.bad_student) record_first(bad_student, r);
      if (result.bad_teacher) record_first(bad_teacher, r);
      loss_ptr[r] = result.loss;
      if (g_row && !std::is_same_v<student_t, float>)
        for (int64_t c = 0; c < classes; ++c) g_row[c] = static_cast<student_t>(g_float[c]);
    }
  });
  report_bad_rows(bad_student.load(), bad_teacher.load(), rows);
}

// Labels are checked and counted serially: O(rows), and batchmean needs the count before any gradient is written.
struct LabelCount {
  at::Tensor labels;  // int64 copy of the target, undefined without one
  int64_t counted_rows;
  const int64_t* pointer() const { return labels.defined() ? labels.const_data_ptr<int64_t>() : nullptr; }
};

LabelCount count_labels(const c10::optional<at::Tensor>& target, int64_t rows, int64_t classes,
                        int64_t ignore_index) {
  if (!target.has_value() || !target->defined()) return {at::Tensor(), rows};
  TORCH_CHECK_VALUE(target->device().is_cpu() && target->dim() == 1 && target->numel() == rows,
                    "target must be a 1-D CPU tensor with one label per row (", rows, "), got shape ",
                    target->sizes());
  TORCH_CHECK_VALUE(!at::isFloatingType(target->scalar_type()) && target->scalar_type() != at::kBool,
                    "target must hold integer class indices, got ", target->scalar_type());
  LabelCount count{target->to(at::kLong).contiguous(), 0};
  const int64_t* label_ptr = count.pointer();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t y = label_ptr[r];
    if (y == ignore_index) continue;
    TORCH_CHECK_VALUE(y >= 0 && y < classes, "kd_loss: target has value ", y, " at row ", r,
                      "; expected a class index in [0, ", classes, ") or ignore_index = ", ignore_index);
    ++count.counted_rows;
  }
  return count;
}

// The row losses are summed serially in double, in row order: deterministic whatever the thread count.
at::Tensor reduce_rows(const at::Tensor& row_loss, int64_t reduction, int64_t counted_rows) {
  if (reduction == kNone) return row_loss;
  at::Tensor loss = at::empty({}, row_loss.options());
  AT_DISPATCH_FLOATING_TYPES(row_loss.scalar_type(), "kd_loss_cpu_reduce", [&] {
    const scalar_t* rows_ptr = row_loss.const_data_ptr<scalar_t>();
    double total = 0;
    for (int64_t r = 0; r < row_loss.numel(); ++r) total += rows_ptr[r];
    if (reduction == kBatchMean) total /= static_cast<double>(std::max<int64_t>(counted_rows, 1));
    *loss.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(total);
  });
  return loss;
}

void check_common_arguments(const at::Tensor& student_logits, double temperature, double alpha, int64_t reduction) {
  TORCH_CHECK_VALUE(student_logits.device().is_cpu(), "student_logits must be a CPU tensor for the cpu backend");
  check_loss_options(student_logits, temperature, alpha, reduction);
}

std::tuple<at::Tensor, at::Tensor> kd_loss_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                               const c10::optional<at::Tensor>& target, double temperature,
                                               double alpha, int64_t reduction, int64_t ignore_index,
                                               bool compute_grad) {
  check_common_arguments(student_logits, temperature, alpha, reduction);
  TORCH_CHECK_VALUE(teacher_logits.device().is_cpu(), "teacher_logits must be a CPU tensor for the cpu backend");
  TORCH_CHECK_VALUE(teacher_logits.sizes() == student_logits.sizes(), "teacher_logits has shape ",
                    teacher_logits.sizes(), " but student_logits has shape ", student_logits.sizes());
  const int64_t rows = student_logits.size(0), classes = student_logits.size(1);
  const at::Tensor student = student_logits.contiguous(), teacher = teacher_logits.contiguous();

  const LabelCount labels = count_labels(target, rows, classes, ignore_index);
  const int64_t* label_ptr = labels.pointer();
  const int64_t counted_rows = labels.counted_rows;
  const double grad_scale = reduction == kBatchMean ? 1.0 / std::max<int64_t>(counted_rows, 1) : 1.0;
  const auto acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor row_loss = at::empty({rows}, student.options().dtype(acc_dtype));
  at::Tensor grad = compute_grad ? at::empty_like(student) : at::Tensor();

  if (rows > 0 && classes > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_loss_cpu", [&] {
      using student_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher.scalar_type(), "kd_loss_cpu_teacher", [&] {
        if constexpr (std::is_same_v<student_t, double>) {
          kd_loss_rows<student_t, scalar_t>(student, teacher, label_ptr, temperature, alpha, ignore_index,
                                            grad_scale, row_loss, grad);
        } else {
          kd_loss_rows_fast<student_t, scalar_t>(student, teacher, label_ptr, temperature, alpha, ignore_index,
                                                 grad_scale, row_loss, grad);
        }
      });
    });
  } else if (grad.defined()) {
    grad.zero_();
  }
  if (!compute_grad) grad = at::empty({0}, student.options());
  return {reduce_rows(row_loss, reduction, counted_rows), grad};
}


// ---- top-k teacher (ptd_sparse/topk_teacher.py): the teacher is (1 - r) softmax(logits / T) on its k listed
// classes and r / (C - k) on each other class. Per row: a sweep for the student's maximum, a sweep for its two
// normalisers and the sum of its scaled logits (which gives the unlisted classes' cross term without visiting them
// one by one), O(k) work for the teacher, and a sweep writing the gradient, then O(k) corrections at the listed
// classes. The teacher's values were checked by the operator; the indices are checked here again so that a direct
// call can never write out of bounds.
template <typename student_t, typename teacher_t, typename index_t>
void kd_loss_topk_rows(const at::Tensor& student, const at::Tensor& indices, const at::Tensor& teacher,
                       const at::Tensor& rest_mass, const int64_t* target, double temperature, double alpha,
                       int64_t ignore_index, double grad_scale, at::Tensor& row_loss, at::Tensor& grad) {
  using acc_t = std::conditional_t<std::is_same_v<student_t, double>, double, float>;
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  const int64_t rows = student.size(0), classes = student.size(1), k = indices.size(1);
  const student_t* s_ptr = student.const_data_ptr<student_t>();
  const index_t* i_ptr = indices.const_data_ptr<index_t>();
  const teacher_t* t_ptr = teacher.const_data_ptr<teacher_t>();
  const float* r_ptr = rest_mass.const_data_ptr<float>();
  acc_t* loss_ptr = row_loss.mutable_data_ptr<acc_t>();
  student_t* g_ptr = grad.defined() ? grad.mutable_data_ptr<student_t>() : nullptr;
  const acc_t T = static_cast<acc_t>(temperature), inv_t = acc_t(1) / T;
  const acc_t kd_weight = static_cast<acc_t>(alpha) * T * T;
  const acc_t ce_weight = target ? static_cast<acc_t>(1.0 - alpha) : acc_t(0);
  const acc_t kd_grad = kd_weight != 0 ? static_cast<acc_t>(alpha * temperature * grad_scale) : acc_t(0);
  const acc_t ce_grad = ce_weight * static_cast<acc_t>(grad_scale);
  std::atomic<int64_t> bad_student{rows};

  at::parallel_for(0, rows, rows_per_task(classes), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> listed_p(k);
    for (int64_t r = begin; r < end; ++r) {
      const student_t* s_row = s_ptr + r * classes;
      const index_t* i_row = i_ptr + r * k;
      const teacher_t* t_row = t_ptr + r * k;
      student_t* g_row = g_ptr ? g_ptr + r * classes : nullptr;
      if (target && target[r] == ignore_index) {
        loss_ptr[r] = 0;
        if (g_row) std::fill(g_row, g_row + classes, student_t(0));
        continue;
      }
      acc_t ms = -inf;
      bool bad = false;
      for (int64_t c = 0; c < classes; ++c) {
        const acc_t s = static_cast<acc_t>(s_row[c]);
        bad |= is_bad(s);
        ms = std::max(ms, s);
      }
      if (bad || ms == -inf) {
        record_first(bad_student, r);
        continue;
      }
      acc_t z_t = 0, z_1 = 0;
      // Sum over the finite classes of (s - ms) / T, in double (C can be 10^5), and the count of -inf classes
      // (-inf - -inf would be NaN).
      double scaled_sum = 0;
      int64_t minus_inf = 0;
      for (int64_t c = 0; c < classes; ++c) {
        const acc_t d = static_cast<acc_t>(s_row[c]) - ms;
        z_t += std::exp(d * inv_t);
        z_1 += std::exp(d);
        if (d == -inf) ++minus_inf; else scaled_sum += static_cast<double>(d * inv_t);
      }
      const acc_t log_z_t = std::log(z_t), log_z_1 = std::log(z_1);
      // The teacher over its listed classes.
      const acc_t rest = static_cast<acc_t>(r_ptr[r]);
      const acc_t spread = classes > k ? rest / static_cast<acc_t>(classes - k) : acc_t(0);
      acc_t mt = -inf;
      for (int64_t i = 0; i < k; ++i) mt = std::max(mt, static_cast<acc_t>(t_row[i]));
      acc_t z_teacher = 0;
      for (int64_t i = 0; i < k; ++i) z_teacher += std::exp((static_cast<acc_t>(t_row[i]) - mt) * inv_t);
      acc_t loss = 0;
      if (kd_weight != 0) {
        // KL = sum_listed p (log p - log q) + sum_unlisted u (log u - log q), log q_c = (s_c - ms) / T - log z_t.
        const acc_t log_listed = std::log1p(-rest) - std::log(z_teacher);
        acc_t kl = 0;
        double listed_scaled_sum = 0;
        int64_t listed_minus_inf = 0;
        for (int64_t i = 0; i < k; ++i) {
          const int64_t c = static_cast<int64_t>(i_row[i]);
          const acc_t log_q = (static_cast<acc_t>(s_row[c]) - ms) * inv_t - log_z_t;
          const acc_t p = std::exp((static_cast<acc_t>(t_row[i]) - mt) * inv_t + log_listed);
          listed_p[i] = p;
          if (p > 0) kl += p * ((static_cast<acc_t>(t_row[i]) - mt) * inv_t + log_listed - log_q);
          const acc_t d = static_cast<acc_t>(s_row[c]) - ms;
          if (d == -inf) ++listed_minus_inf; else listed_scaled_sum += static_cast<double>(d * inv_t);
        }
        if (spread > 0 && minus_inf > listed_minus_inf) {
          kl = inf;  // an unlisted class with teacher mass that the student rules out
        } else if (spread > 0) {
          const double unlisted_log_q = scaled_sum - listed_scaled_sum - static_cast<double>(classes - k) * log_z_t;
          kl += static_cast<acc_t>(static_cast<double>(rest) * std::log(static_cast<double>(spread)) -
                                   static_cast<double>(spread) * unlisted_log_q);
        }
        loss += kd_weight * kl;
      }
      if (ce_weight != 0) loss += ce_weight * (ms - static_cast<acc_t>(s_row[target[r]]) + log_z_1);
      loss_ptr[r] = loss;
      if (!g_row) continue;
      // d/ds [alpha T^2 KL] = alpha T (q - p) with p = spread off the listed classes; CE as in the dense loss.
      for (int64_t c = 0; c < classes; ++c) {
        const acc_t d = static_cast<acc_t>(s_row[c]) - ms;
        acc_t g = 0;
        if (kd_grad != 0) g += kd_grad * (std::exp(d * inv_t - log_z_t) - spread);
        // The label's one-hot term joins its entry before the one rounding to the student's dtype: subtracted
        // after it, an fp16/bf16 entry near -ce_grad (p near 1) would round to 0 and lose its gradient.
        if (ce_grad != 0) g += ce_grad * (std::exp(d - log_z_1) - acc_t(c == target[r]));
        g_row[c] = static_cast<student_t>(g);
      }
      if (kd_grad != 0) {
        for (int64_t i = 0; i < k; ++i) {
          const int64_t c = static_cast<int64_t>(i_row[i]);
          const acc_t d = static_cast<acc_t>(s_row[c]) - ms;
          acc_t g = kd_grad * (std::exp(d * inv_t - log_z_t) - listed_p[i]);
          if (ce_grad != 0) g += ce_grad * (std::exp(d - log_z_1) - acc_t(c == target[r]));
          g_row[c] = static_cast<student_t>(g);
        }
      }
    }
  });
  report_bad_rows(bad_student.load(), rows, rows);
}

std::tuple<at::Tensor, at::Tensor> kd_loss_topk_cpu(const at::Tensor& student_logits,
                                                    const at::Tensor& teacher_indices,
                                                    const at::Tensor& teacher_logits,
                                                    const at::Tensor& teacher_rest_mass,
                                                    const c10::optional<at::Tensor>& target, double temperature,
                                                    double alpha, int64_t reduction, int64_t ignore_index,
                                                    bool compute_grad) {
  check_common_arguments(student_logits, temperature, alpha, reduction);
  const int64_t rows = student_logits.size(0), classes = student_logits.size(1);
  TORCH_CHECK_VALUE(teacher_indices.device().is_cpu() && teacher_logits.device().is_cpu() &&
                        teacher_rest_mass.device().is_cpu(),
                    "teacher.indices, teacher.logits and teacher.rest_mass must be CPU tensors for the cpu backend");
  check_topk_teacher_shapes(teacher_indices, teacher_logits, teacher_rest_mass, rows, classes);
  const at::Tensor student = student_logits.contiguous(), indices = teacher_indices.contiguous();
  const at::Tensor teacher = teacher_logits.contiguous(), rest = teacher_rest_mass.contiguous();
  if (indices.numel() > 0) {
    const int64_t low = indices.min().item<int64_t>(), high = indices.max().item<int64_t>();
    TORCH_CHECK_VALUE(low >= 0 && high < classes, "kd_loss: teacher.indices holds ", low < 0 ? low : high,
                      "; expected class indices in [0, ", classes, ")");
  }
  const LabelCount labels = count_labels(target, rows, classes, ignore_index);
  const double grad_scale = reduction == kBatchMean ? 1.0 / std::max<int64_t>(labels.counted_rows, 1) : 1.0;
  const auto acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor row_loss = at::empty({rows}, student.options().dtype(acc_dtype));
  at::Tensor grad = compute_grad ? at::empty_like(student) : at::Tensor();
  if (rows > 0 && classes > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_loss_topk_cpu", [&] {
      using student_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher.scalar_type(), "kd_loss_topk_teacher", [&] {
        using teacher_t = scalar_t;
        AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "kd_loss_topk_indices", [&] {
          kd_loss_topk_rows<student_t, teacher_t, index_t>(student, indices, teacher, rest, labels.pointer(),
                                                           temperature, alpha, ignore_index, grad_scale, row_loss,
                                                           grad);
        });
      });
    });
  } else if (grad.defined()) {
    grad.zero_();
  }
  if (!compute_grad) grad = at::empty({0}, student.options());
  return {reduce_rows(row_loss, reduction, labels.counted_rows), grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(ptd_sparse_kernels, CPU, m) {
  m.impl("kd_loss", &kd_loss_cpu);
  m.impl("kd_loss_topk", &kd_loss_topk_cpu);
}

}  // namespace ptd_sparse
