// CUDA kernels of the fused temperature-softmax KD loss, for a dense teacher and for a top-k teacher
// (ptd_sparse/topk_teacher.py). One block per row:
//   pass 1 reads the row once (vector loads when the row allows) and keeps, per thread, an online softmax state:
//          the student's maximum and its normalisers at temperature T and at 1, and the teacher's maximum, normaliser
//          and teacher-weighted (t - s) / T sum; the block merges the states and writes the row's loss;
//   pass 2 reads the row again (largely from L2) and writes the gradient of the reduced loss.
// The only rows x classes buffer is the gradient itself; accumulation is in fp32 (fp64 for double students), and
// every gradient entry is rounded to the student's dtype once.
// Nothing synchronises with the host: the reduction scale of batchmean is computed on the device, and bad input
// (NaN / +inf / rows with no finite entry, labels out of range, top-k indices out of range) stops the kernel with a
// device-side assert that prints the same sentence as the cpu backend's ValueError; the host sees "device-side
// assert triggered" at its next synchronisation, and the CUDA context is unusable afterwards, as after
// F.cross_entropy's own label assert. With PTD_DEBUG_CHECKS=1 the kernel records the first offending row of each
// kind in int32 slots instead, the host reads them after the launch (one synchronisation per call) and raises the
// cpu backend's ValueError.
#include "../kd_loss_checks.h"
#include "cuda_common.cuh"

#include <torch/library.h>

#include <cmath>

namespace ptd_sparse {
namespace {

enum ErrorSlot : int { kBadStudent = 0, kBadTeacher = 1, kBadLabel = 2, kBadIndex = 3, kSlots = 4 };

// Where a kernel reports bad input: the debug mode's error slots, or (nullptr) a device-side assert.
__device__ void report_bad_logits(int* errors, ErrorSlot slot, int64_t row) {
  if (errors != nullptr) {
    atomicMin(errors + slot, static_cast<int>(row));
    return;
  }
  const char* name = slot == kBadStudent ? "student_logits" : "teacher_logits";
  CUDA_KERNEL_ASSERT_PRINTF(false,
                            "kd_loss: %s row %lld holds NaN or +inf, or has no finite entry; logits must be finite "
                            "or -inf (PTD_DEBUG_CHECKS=1 raises this as a ValueError)",
                            name, static_cast<long long>(row));
}

__device__ void report_bad_label(int* errors, int64_t row, int64_t label, int64_t classes, int64_t ignore_index) {
  if (errors != nullptr) {
    atomicMin(errors + kBadLabel, static_cast<int>(row));
    return;
  }
  CUDA_KERNEL_ASSERT_PRINTF(false,
                            "kd_loss: target has value %lld at row %lld; expected a class index in [0, %lld) or "
                            "ignore_index = %lld (PTD_DEBUG_CHECKS=1 raises this as a ValueError)",
                            static_cast<long long>(label), static_cast<long long>(row),
                            static_cast<long long>(classes), static_cast<long long>(ignore_index));
}

__device__ void report_bad_index(int* errors, int64_t row, int64_t index, int64_t classes) {
  if (errors != nullptr) {
    atomicMin(errors + kBadIndex, static_cast<int>(row));
    return;
  }
  CUDA_KERNEL_ASSERT_PRINTF(false,
                            "kd_loss: teacher.indices row %lld holds %lld; expected class indices in [0, %lld) "
                            "(PTD_DEBUG_CHECKS=1 raises this as a ValueError)",
                            static_cast<long long>(row), static_cast<long long>(index),
                            static_cast<long long>(classes));
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ bool is_bad(T v) {
  return isnan(v) || v == INFINITY;
}

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T, int kVec>
__device__ __forceinline__ Pack<T, kVec> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, kVec>*>(p);
}

// Online softmax state of the student row: max, sum exp((s - max) / T), sum exp(s - max).
template <typename acc_t>
struct StudentState {
  acc_t max, sum_t, sum_1;

  __device__ static StudentState empty() { return {-INFINITY, 0, 0}; }
  __device__ StudentState shuffle_down(int offset) const {
    return {__shfl_down_sync(0xffffffffu, max, offset), __shfl_down_sync(0xffffffffu, sum_t, offset),
            __shfl_down_sync(0xffffffffu, sum_1, offset)};
  }
  __device__ void add(acc_t s, acc_t inv_t) {
    if (s > max) {  // -inf entries never raise the max; exp(-inf) = 0 rescales empty sums to 0
      sum_t *= exp_acc((max - s) * inv_t);
      sum_1 *= exp_acc(max - s);
      max = s;
    }
    if (s != -INFINITY) {
      sum_t += exp_acc((s - max) * inv_t);
      sum_1 += exp_acc(s - max);
    }
  }
  __device__ void merge(const StudentState& o, acc_t inv_t) {
    const acc_t m = max > o.max ? max : o.max;
    if (m == -INFINITY) return;
    sum_t = sum_t * exp_acc((max - m) * inv_t) + o.sum_t * exp_acc((o.max - m) * inv_t);
    sum_1 = sum_1 * exp_acc(max - m) + o.sum_1 * exp_acc(o.max - m);
    max = m;
  }
};

// Online state of the dense teacher row: max, sum exp((t - max) / T), sum exp((t - max) / T) * (t - s) / T.
template <typename acc_t>
struct TeacherState {
  acc_t max, sum, weighted;

  __device__ static TeacherState empty() { return {-INFINITY, 0, 0}; }
  __device__ TeacherState shuffle_down(int offset) const {
    return {__shfl_down_sync(0xffffffffu, max, offset), __shfl_down_sync(0xffffffffu, sum, offset),
            __shfl_down_sync(0xffffffffu, weighted, offset)};
  }
  __device__ void add(acc_t t, acc_t s, acc_t inv_t) {
    if (t == -INFINITY) return;  // the teacher rules this class out: probability 0, no contribution
    if (t > max) {
      const acc_t scale = exp_acc((max - t) * inv_t);
      sum *= scale;
      weighted = scale > 0 ? weighted * scale : acc_t(0);  // never inf * 0
      max = t;
    }
    const acc_t p = exp_acc((t - max) * inv_t);
    sum += p;
    // p = 0 (underflow) adds nothing, even where the student is -inf (which makes the term, and the loss, +inf).
    if (p > 0) weighted += p * (t - s) * inv_t;
  }
  __device__ void merge(const TeacherState& o, acc_t inv_t) {
    const acc_t m = max > o.max ? max : o.max;
    if (m == -INFINITY) return;
    const acc_t a = exp_acc((max - m) * inv_t), b = exp_acc((o.max - m) * inv_t);
    sum = sum * a + o.sum * b;
    weighted = (a > 0 ? weighted * a : acc_t(0)) + (b > 0 ? o.weighted * b : acc_t(0));
    max = m;
  }
};

// Merges one State per thread into one for the whole block (every thread gets it): shuffles within each warp, then
// the warps' states through `scratch` (room for 32). Ends with a barrier, so scratch can be reused at once.
template <typename State, typename acc_t>
__device__ State block_merge(State state, State* scratch, acc_t inv_t) {
  const int lane = threadIdx.x % cuda::kWarp, warp = threadIdx.x / cuda::kWarp, warps = blockDim.x / cuda::kWarp;
  for (int offset = cuda::kWarp / 2; offset > 0; offset /= 2) state.merge(state.shuffle_down(offset), inv_t);
  if (lane == 0) scratch[warp] = state;
  __syncthreads();
  if (warp == 0) {
    state = lane < warps ? scratch[lane] : State::empty();
    for (int offset = cuda::kWarp / 2; offset > 0; offset /= 2) state.merge(state.shuffle_down(offset), inv_t);
    if (lane == 0) scratch[0] = state;
  }
  __syncthreads();
  const State result = scratch[0];
  __syncthreads();
  return result;
}

struct LossWeights {
  double inv_t, kd_weight, ce_weight, kd_grad, ce_grad;  // kd_grad = alpha T, ce_grad = 1 - alpha (0 without labels)
};

// Label of `row`, or -1 when the row does not count (ignored, or out of range: reported as bad input).
__device__ __forceinline__ int64_t row_label(const int64_t* target, int64_t row, int64_t classes, int64_t ignore_index,
                                             int* errors) {
  if (target == nullptr) return classes;  // no hard label: counts, but no class gets the one-hot term
  const int64_t y = target[row];
  if (y == ignore_index) return -1;
  if (y < 0 || y >= classes) {
    if (threadIdx.x == 0) report_bad_label(errors, row, y, classes, ignore_index);
    return -1;
  }
  return y;
}

template <typename student_t>
__device__ void zero_row(student_t* g_row, int64_t classes) {
  for (int64_t c = threadIdx.x; c < classes; c += blockDim.x) g_row[c] = student_t(0);
}

template <typename student_t, typename teacher_t, int kVec>
__global__ void __launch_bounds__(1024) kd_loss_dense_kernel(const student_t* __restrict__ student, const teacher_t* __restrict__ teacher,
                                     const int64_t* __restrict__ target, int64_t classes, LossWeights weights,
                                     const at::opmath_type<student_t>* __restrict__ grad_scale, int64_t ignore_index,
                                     at::opmath_type<student_t>* __restrict__ row_loss, student_t* __restrict__ grad,
                                     int* __restrict__ errors) {
  using acc_t = std::conditional_t<std::is_same_v<student_t, double>, double, float>;
  __shared__ StudentState<acc_t> student_scratch[32];
  __shared__ TeacherState<acc_t> teacher_scratch[32];
  const int64_t row = blockIdx.x;
  const student_t* s_row = student + row * classes;
  const teacher_t* t_row = teacher + row * classes;
  student_t* g_row = grad != nullptr ? grad + row * classes : nullptr;
  const int64_t label = row_label(target, row, classes, ignore_index, errors);
  if (label < 0) {
    if (threadIdx.x == 0) row_loss[row] = 0;
    if (g_row) zero_row(g_row, classes);
    return;
  }
  const acc_t inv_t = static_cast<acc_t>(weights.inv_t);
  const bool need_kd = weights.kd_weight != 0;
  StudentState<acc_t> st = StudentState<acc_t>::empty();
  TeacherState<acc_t> tt = TeacherState<acc_t>::empty();
  bool bad_s = false, bad_t = false;
  for (int64_t c = threadIdx.x * kVec; c < classes; c += blockDim.x * kVec) {
    const Pack<student_t, kVec> sp = load_pack<student_t, kVec>(s_row + c);
    const Pack<teacher_t, kVec> tp = load_pack<teacher_t, kVec>(t_row + c);
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      const acc_t s = static_cast<acc_t>(sp.v[v]), t = static_cast<acc_t>(tp.v[v]);
      bad_s |= is_bad(s);
      bad_t |= is_bad(t);
      st.add(s, inv_t);
      tt.add(t, s, inv_t);
    }
  }
  st = block_merge(st, student_scratch, inv_t);
  tt = block_merge(tt, teacher_scratch, inv_t);
  bad_s = __syncthreads_or(bad_s || st.max == -INFINITY);
  bad_t = __syncthreads_or(bad_t || tt.max == -INFINITY);
  if (bad_s || bad_t) {
    if (threadIdx.x == 0) {
      if (bad_s) report_bad_logits(errors, kBadStudent, row);
      if (bad_t) report_bad_logits(errors, kBadTeacher, row);
    }
    return;
  }
  const acc_t log_z_st = log_acc(st.sum_t), log_z_s1 = log_acc(st.sum_1), log_z_t = log_acc(tt.sum);
  const bool has_label = label < classes;
  if (threadIdx.x == 0) {
    acc_t loss = 0;
    if (need_kd) {
      // KL = sum p_t (t - s) / T - lse(t / T) + lse(s / T)
      const acc_t lse_difference = (tt.max - st.max) * inv_t + log_z_t - log_z_st;
      loss += static_cast<acc_t>(weights.kd_weight) * (tt.weighted / tt.sum - lse_difference);
    }
    if (has_label && weights.ce_weight != 0)
      loss += static_cast<acc_t>(weights.ce_weight) * (st.max - static_cast<acc_t>(s_row[label]) + log_z_s1);
    row_loss[row] = loss;
  }
  if (g_row == nullptr) return;
  const acc_t scale = *grad_scale;
  const acc_t kd_grad = static_cast<acc_t>(weights.kd_grad) * scale, ce_grad = static_cast<acc_t>(weights.ce_grad) * scale;
  for (int64_t c = threadIdx.x * kVec; c < classes; c += blockDim.x * kVec) {
    const Pack<student_t, kVec> sp = load_pack<student_t, kVec>(s_row + c);
    const Pack<teacher_t, kVec> tp = load_pack<teacher_t, kVec>(t_row + c);
    Pack<student_t, kVec> out;
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      const acc_t ds = static_cast<acc_t>(sp.v[v]) - st.max;
      acc_t g = 0;
      if (need_kd)
        g += kd_grad * (exp_acc(ds * inv_t - log_z_st) -
                        exp_acc((static_cast<acc_t>(tp.v[v]) - tt.max) * inv_t - log_z_t));
      if (ce_grad != 0) g += ce_grad * (exp_acc(ds - log_z_s1) - (c + v == label ? acc_t(1) : acc_t(0)));
      out.v[v] = static_cast<student_t>(g);
    }
    *reinterpret_cast<Pack<student_t, kVec>*>(g_row + c) = out;
  }
}

// Top-k teacher: p = (1 - rest) softmax(logits / T) on the k listed classes, rest / (C - k) on the others.
// Pass 1 over the student also sums its logits (in double), which gives the unlisted classes' cross term
// sum_unlisted log q without visiting them; the teacher part is O(k) per row.
template <typename student_t, typename teacher_t, typename index_t>
__global__ void __launch_bounds__(1024) kd_loss_topk_kernel(const student_t* __restrict__ student, const index_t* __restrict__ indices,
                                    const teacher_t* __restrict__ teacher, const float* __restrict__ rest_mass,
                                    const int64_t* __restrict__ target, int64_t classes, int64_t k,
                                    LossWeights weights, const at::opmath_type<student_t>* __restrict__ grad_scale,
                                    int64_t ignore_index,
                                    at::opmath_type<student_t>* __restrict__ row_loss, student_t* __restrict__ grad,
                                    int* __restrict__ errors) {
  using acc_t = std::conditional_t<std::is_same_v<student_t, double>, double, float>;
  __shared__ StudentState<acc_t> student_scratch[32];
  __shared__ acc_t scratch[32];
  __shared__ double sum_scratch[32];
  const int64_t row = blockIdx.x;
  const student_t* s_row = student + row * classes;
  const index_t* i_row = indices + row * k;
  const teacher_t* t_row = teacher + row * k;
  student_t* g_row = grad != nullptr ? grad + row * classes : nullptr;
  const int64_t label = row_label(target, row, classes, ignore_index, errors);
  if (label < 0) {
    if (threadIdx.x == 0) row_loss[row] = 0;
    if (g_row) zero_row(g_row, classes);
    return;
  }
  const acc_t inv_t = static_cast<acc_t>(weights.inv_t);
  const bool need_kd = weights.kd_weight != 0;
  StudentState<acc_t> st = StudentState<acc_t>::empty();
  // Sum of the finite logits and count of the -inf ones (-inf - -inf would be NaN).
  double s_sum = 0, s_minus_inf = 0;
  bool bad_s = false;
  for (int64_t c = threadIdx.x; c < classes; c += blockDim.x) {
    const acc_t s = static_cast<acc_t>(s_row[c]);
    bad_s |= is_bad(s);
    st.add(s, inv_t);
    if (s == -INFINITY) s_minus_inf += 1; else s_sum += static_cast<double>(s);
  }
  st = block_merge(st, student_scratch, inv_t);
  bad_s = __syncthreads_or(bad_s || st.max == -INFINITY);
  if (bad_s) {
    if (threadIdx.x == 0) report_bad_logits(errors, kBadStudent, row);
    return;
  }
  s_sum = cuda::block_reduce(s_sum, sum_scratch);
  s_minus_inf = cuda::block_reduce(s_minus_inf, sum_scratch);
  const acc_t log_z_st = log_acc(st.sum_t), log_z_s1 = log_acc(st.sum_1);
  const acc_t rest = static_cast<acc_t>(rest_mass[row]);
  const acc_t spread = classes > k ? rest / static_cast<acc_t>(classes - k) : acc_t(0);
  // The teacher over its listed classes: max, normaliser, then each class's probability.
  acc_t t_max = -INFINITY;
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) t_max = max(t_max, static_cast<acc_t>(t_row[i]));
  t_max = cuda::block_reduce<acc_t, true>(t_max, scratch);
  acc_t t_sum = 0;
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) t_sum += exp_acc((static_cast<acc_t>(t_row[i]) - t_max) * inv_t);
  t_sum = cuda::block_reduce(t_sum, scratch);
  const acc_t log_listed = log1p(-rest) - log_acc(t_sum);  // log p_i = (t_i - t_max) / T + log_listed
  acc_t kl = 0;
  double listed_sum = 0, listed_minus_inf = 0;
  if (need_kd) {
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
      const int64_t c = static_cast<int64_t>(i_row[i]);
      if (c < 0 || c >= classes) {  // never read out of bounds
        report_bad_index(errors, row, c, classes);
        continue;
      }
      const acc_t s = static_cast<acc_t>(s_row[c]);
      const acc_t log_p = (static_cast<acc_t>(t_row[i]) - t_max) * inv_t + log_listed;
      const acc_t p = exp_acc(log_p);
      if (p > 0) kl += p * (log_p - ((s - st.max) * inv_t - log_z_st));
      if (s == -INFINITY) listed_minus_inf += 1; else listed_sum += static_cast<double>(s);
    }
    kl = cuda::block_reduce(kl, scratch);
    listed_sum = cuda::block_reduce(listed_sum, sum_scratch);
    listed_minus_inf = cuda::block_reduce(listed_minus_inf, sum_scratch);
  }
  const bool has_label = label < classes;
  if (threadIdx.x == 0) {
    acc_t loss = 0;
    if (need_kd) {
      if (spread > 0 && s_minus_inf > listed_minus_inf) {
        kl = INFINITY;  // an unlisted class with teacher mass that the student rules out
      } else if (spread > 0) {
        // sum over unlisted classes of log q = (sum of their logits - (C - k) max) / T - (C - k) log z_st
        const double unlisted = static_cast<double>(classes - k);
        const double unlisted_log_q = ((s_sum - listed_sum) - unlisted * static_cast<double>(st.max)) *
                                          static_cast<double>(inv_t) -
                                      unlisted * static_cast<double>(log_z_st);
        kl += static_cast<acc_t>(static_cast<double>(rest) * log(static_cast<double>(spread)) -
                                 static_cast<double>(spread) * unlisted_log_q);
      }
      loss += static_cast<acc_t>(weights.kd_weight) * kl;
    }
    if (has_label && weights.ce_weight != 0)
      loss += static_cast<acc_t>(weights.ce_weight) * (st.max - static_cast<acc_t>(s_row[label]) + log_z_s1);
    row_loss[row] = loss;
  }
  if (g_row == nullptr) return;
  const acc_t scale = *grad_scale;
  const acc_t kd_grad = need_kd ? static_cast<acc_t>(weights.kd_grad) * scale : acc_t(0);
  const acc_t ce_grad = static_cast<acc_t>(weights.ce_grad) * scale;
  // Every class as if unlisted, then the listed classes overwritten after a barrier (a different thread may own the
  // same class). Each entry, the label's one-hot term included, is summed in acc_t and rounded once: subtracting
  // the one-hot from an entry already rounded to fp16/bf16 would lose the label's gradient where its probability
  // is near 1 (1 - q below the dtype's spacing at 1 - alpha).
  for (int64_t c = threadIdx.x; c < classes; c += blockDim.x) {
    const acc_t ds = static_cast<acc_t>(s_row[c]) - st.max;
    acc_t g = 0;
    if (kd_grad != 0) g += kd_grad * (exp_acc(ds * inv_t - log_z_st) - spread);
    if (ce_grad != 0) g += ce_grad * (exp_acc(ds - log_z_s1) - (c == label ? acc_t(1) : acc_t(0)));
    g_row[c] = static_cast<student_t>(g);
  }
  if (kd_grad == 0) return;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    const int64_t c = static_cast<int64_t>(i_row[i]);
    if (c < 0 || c >= classes) continue;  // reported above
    const acc_t ds = static_cast<acc_t>(s_row[c]) - st.max;
    const acc_t p = exp_acc((static_cast<acc_t>(t_row[i]) - t_max) * inv_t + log_listed);
    acc_t g = kd_grad * (exp_acc(ds * inv_t - log_z_st) - p);
    if (ce_grad != 0) g += ce_grad * (exp_acc(ds - log_z_s1) - (c == label ? acc_t(1) : acc_t(0)));
    g_row[c] = static_cast<student_t>(g);
  }
}

int threads_for(int64_t work) {
  int threads = cuda::kWarp;
  while (threads < 1024 && threads < work) threads *= 2;
  return threads;
}

void check_arguments(const at::Tensor& student_logits, double temperature, double alpha, int64_t reduction,
                     const c10::optional<at::Tensor>& target) {
  check_loss_options(student_logits, temperature, alpha, reduction);
  if (target.has_value() && target->defined()) {
    TORCH_CHECK_VALUE(target->dim() == 1 && target->numel() == student_logits.size(0),
                      "target must be 1-D with one label per row (", student_logits.size(0), "), got shape ",
                      target->sizes());
    TORCH_CHECK_VALUE(!at::isFloatingType(target->scalar_type()) && target->scalar_type() != at::kBool,
                      "target must hold integer class indices, got ", target->scalar_type());
  }
}

// Everything around a launch that the dense and the top-k loss share: labels, the device-side reduction scale,
// the debug mode's error slots and the final reduction.
struct LossCall {
  at::Tensor labels;      // int64, contiguous, or undefined
  at::Tensor counted;     // number of rows that count (device scalar, int64)
  at::Tensor grad_scale;  // device scalar in the accumulation dtype: 1 / max(counted, 1) for batchmean, else 1
  at::Tensor errors;      // int32 [kSlots] under PTD_DEBUG_CHECKS=1, else undefined (the kernels assert)
  at::Tensor row_loss, grad;
  LossWeights weights;

  LossCall(const at::Tensor& student, const c10::optional<at::Tensor>& target, double temperature, double alpha,
           int64_t reduction, int64_t ignore_index, bool compute_grad) {
    const int64_t rows = student.size(0);
    const bool with_labels = target.has_value() && target->defined();
    if (with_labels) {
      labels = target->to(at::kLong).contiguous();
      counted = (labels != ignore_index).sum();
    } else {
      counted = at::full({}, rows, student.options().dtype(at::kLong));
    }
    // In the accumulation dtype: a float32 1/3 would put a relative error of 1e-8 into float64 gradients.
    const auto acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    grad_scale = reduction == kBatchMean ? counted.clamp_min(1).to(acc_dtype).reciprocal()
                                         : at::ones({}, student.options().dtype(acc_dtype));
    if (cuda::debug_checks()) errors = cuda::error_slots(kSlots, rows, student);
    row_loss = at::empty({rows}, student.options().dtype(acc_dtype));
    grad = compute_grad ? at::empty_like(student) : at::Tensor();
    weights = {1.0 / temperature, alpha * temperature * temperature, with_labels ? 1.0 - alpha : 0.0,
               alpha * temperature, with_labels ? 1.0 - alpha : 0.0};
  }

  const int64_t* label_pointer() const { return labels.defined() ? labels.const_data_ptr<int64_t>() : nullptr; }
  int* error_pointer() { return errors.defined() ? errors.mutable_data_ptr<int>() : nullptr; }

  std::tuple<at::Tensor, at::Tensor> finish(const at::Tensor& student, int64_t reduction, int64_t ignore_index,
                                            const char* teacher_name) {
    if (errors.defined()) raise_for_errors(student, ignore_index, teacher_name);
    at::Tensor out_grad = grad.defined() ? grad : at::empty({0}, student.options());
    if (reduction == kNone) return {row_loss, out_grad};
    at::Tensor total = row_loss.sum(at::kDouble);
    if (reduction == kBatchMean) total = total / counted.clamp_min(1).to(at::kDouble);
    return {total.to(row_loss.scalar_type()), out_grad};
  }

  // The debug mode's one synchronisation: the error slots come to the host, and bad input raises the cpu backend's
  // ValueError with the first offending row.
  void raise_for_errors(const at::Tensor& student, int64_t ignore_index, const char* teacher_name) const {
    const int64_t rows = student.size(0);
    const at::Tensor slots = errors.cpu();
    const int* bad = slots.const_data_ptr<int>();
    TORCH_CHECK_VALUE(bad[kBadStudent] == rows, "kd_loss: student_logits row ", bad[kBadStudent],
                      " holds NaN or +inf, or has no finite entry; logits must be finite or -inf");
    TORCH_CHECK_VALUE(bad[kBadTeacher] == rows, "kd_loss: ", teacher_name, " row ", bad[kBadTeacher],
                      " holds NaN or +inf, or has no finite entry; logits must be finite or -inf");
    TORCH_CHECK_VALUE(bad[kBadIndex] == rows, "kd_loss: teacher.indices row ", bad[kBadIndex],
                      " holds a class outside [0, ", student.size(1), ")");
    if (bad[kBadLabel] != rows) {
      const int64_t value = labels[bad[kBadLabel]].item<int64_t>();
      TORCH_CHECK_VALUE(false, "kd_loss: target has value ", value, " at row ", bad[kBadLabel],
                        "; expected a class index in [0, ", student.size(1), ") or ignore_index = ", ignore_index);
    }
  }
};

bool aligned(const void* pointer, int64_t bytes) { return reinterpret_cast<uintptr_t>(pointer) % bytes == 0; }

std::tuple<at::Tensor, at::Tensor> kd_loss_cuda(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                                const c10::optional<at::Tensor>& target, double temperature,
                                                double alpha, int64_t reduction, int64_t ignore_index,
                                                bool compute_grad) {
  const at::Tensor target_tensor = target.has_value() ? *target : at::Tensor();
  cuda::check_same_cuda_device(student_logits, "student_logits",
                               {{&teacher_logits, "teacher_logits"}, {&target_tensor, "target"}});
  check_arguments(student_logits, temperature, alpha, reduction, target);
  TORCH_CHECK_VALUE(teacher_logits.sizes() == student_logits.sizes(), "teacher_logits has shape ",
                    teacher_logits.sizes(), " but student_logits has shape ", student_logits.sizes());
  c10::cuda::CUDAGuard guard(student_logits.device());
  const at::Tensor student = student_logits.contiguous(), teacher = teacher_logits.contiguous();
  LossCall call(student, target, temperature, alpha, reduction, ignore_index, compute_grad);
  const int64_t rows = student.size(0), classes = student.size(1);
  if (rows > 0 && classes > 0) {
    TORCH_CHECK(rows <= 0x7fffffff, "kd_loss cuda: at most 2^31 - 1 rows per call");
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_loss_cuda", [&] {
      using student_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher.scalar_type(), "kd_loss_cuda_teacher", [&] {
        using teacher_t = scalar_t;
        constexpr int kVec = 4;
        const bool vectorised = classes % kVec == 0 && aligned(student.const_data_ptr(), kVec * sizeof(student_t)) &&
                                aligned(teacher.const_data_ptr(), kVec * sizeof(teacher_t)) &&
                                (!call.grad.defined() || aligned(call.grad.const_data_ptr(), kVec * sizeof(student_t)));
        const int threads = threads_for(vectorised ? classes / kVec : classes);
        auto kernel = vectorised ? kd_loss_dense_kernel<student_t, teacher_t, kVec>
                                 : kd_loss_dense_kernel<student_t, teacher_t, 1>;
        kernel<<<static_cast<unsigned int>(rows), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
            student.const_data_ptr<student_t>(), teacher.const_data_ptr<teacher_t>(), call.label_pointer(), classes,
            call.weights, call.grad_scale.const_data_ptr<at::opmath_type<student_t>>(), ignore_index,
            call.row_loss.mutable_data_ptr<at::opmath_type<student_t>>(),
            call.grad.defined() ? call.grad.mutable_data_ptr<student_t>() : nullptr, call.error_pointer());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  } else if (call.grad.defined()) {
    call.grad.zero_();
  }
  return call.finish(student, reduction, ignore_index, "teacher_logits");
}

std::tuple<at::Tensor, at::Tensor> kd_loss_topk_cuda(const at::Tensor& student_logits,
                                                     const at::Tensor& teacher_indices,
                                                     const at::Tensor& teacher_logits,
                                                     const at::Tensor& teacher_rest_mass,
                                                     const c10::optional<at::Tensor>& target, double temperature,
                                                     double alpha, int64_t reduction, int64_t ignore_index,
                                                     bool compute_grad) {
  const at::Tensor target_tensor = target.has_value() ? *target : at::Tensor();
  cuda::check_same_cuda_device(student_logits, "student_logits",
                               {{&teacher_indices, "teacher.indices"}, {&teacher_logits, "teacher.logits"},
                                {&teacher_rest_mass, "teacher.rest_mass"}, {&target_tensor, "target"}});
  check_arguments(student_logits, temperature, alpha, reduction, target);
  const int64_t rows = student_logits.size(0), classes = student_logits.size(1);
  c10::cuda::CUDAGuard guard(student_logits.device());
  const at::Tensor student = student_logits.contiguous(), indices = teacher_indices.contiguous();
  const at::Tensor teacher = teacher_logits.contiguous(), rest = teacher_rest_mass.contiguous();
  check_topk_teacher_shapes(indices, teacher, rest, rows, classes);
  LossCall call(student, target, temperature, alpha, reduction, ignore_index, compute_grad);
  if (rows > 0 && classes > 0) {
    TORCH_CHECK(rows <= 0x7fffffff, "kd_loss cuda: at most 2^31 - 1 rows per call");
    const int threads = threads_for(classes);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_loss_topk_cuda", [&] {
      using student_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher.scalar_type(), "kd_loss_topk_teacher", [&] {
        using teacher_t = scalar_t;
        AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "kd_loss_topk_indices", [&] {
          kd_loss_topk_kernel<student_t, teacher_t, index_t>
              <<<static_cast<unsigned int>(rows), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
                  student.const_data_ptr<student_t>(), indices.const_data_ptr<index_t>(),
                  teacher.const_data_ptr<teacher_t>(), rest.const_data_ptr<float>(), call.label_pointer(), classes,
                  indices.size(1), call.weights, call.grad_scale.const_data_ptr<at::opmath_type<student_t>>(),
                  ignore_index, call.row_loss.mutable_data_ptr<at::opmath_type<student_t>>(),
                  call.grad.defined() ? call.grad.mutable_data_ptr<student_t>() : nullptr, call.error_pointer());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  } else if (call.grad.defined()) {
    call.grad.zero_();
  }
  return call.finish(student, reduction, ignore_index, "teacher.logits");
}

}  // namespace

TORCH_LIBRARY_IMPL(ptd_sparse_kernels, CUDA, m) {
  m.impl("kd_loss", &kd_loss_cuda);
  m.impl("kd_loss_topk", &kd_loss_topk_cuda);
}

}  // namespace ptd_sparse
