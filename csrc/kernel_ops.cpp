// Schemas of the kernel-level operators: the contract that every compiled backend (cpu here, cuda in csrc/cuda)
// implements for its device. Users never call these directly; the public operators in ptd_sparse/ops/ route a call
// to them when the `cpu` or `cuda` backend is chosen.
//
// Sparse weights come in the canonical CSR-by-output-channel format of docs/design.md, section 2.1:
//   row_ptr int32 [C_out + 1], col_idx int32 [nnz] = (c_in * KH + kh) * KW + kw, values [nnz]; on the CPU col_idx
//   may also be int16 (the compact form of an inference SparseConv2d, docs/design.md section 2.1).
// The data gradient walks a transposed (CSC-by-input-channel) view of the same nonzeros, built once per mask:
//   t_ptr int32 [C_in + 1], t_rows int32 [nnz] (output channel of each entry), t_perm int32 [nnz] (its CSR position).
#include <torch/extension.h>

#include "cpu/isa/dispatch.h"
#include "fingerprint.h"

#ifndef PTD_TORCH_VERSION
#define PTD_TORCH_VERSION "unknown"
#endif
#ifndef PTD_BUILD_FLAGS
#define PTD_BUILD_FLAGS "unknown"
#endif

TORCH_LIBRARY(ptd_sparse_kernels, m) {
  m.def(
      "conv_forward(Tensor input, Tensor values, Tensor row_ptr, Tensor col_idx, int[] weight_shape, "
      "Tensor? bias, int[] stride, int[] padding, int[] dilation, bool relu=False) -> Tensor");
  // relu=True clamps the output at 0 in the kernel's epilogue (inference with folded BatchNorm and ReLU).
  // max_pool2d(conv_forward(...), pool_kernel_size, pool_stride, pool_padding, pool_dilation) (floor mode), for an
  // inference layer whose output only a max-pool reads; CPU only (its caller, SparseConv2d, runs the two operators
  // on other devices). The pooled output's layout is the one the two operators would give.
  m.def(
      "conv_forward_max_pool(Tensor input, Tensor values, Tensor row_ptr, Tensor col_idx, int[] weight_shape, "
      "Tensor? bias, int[] stride, int[] padding, int[] dilation, bool relu, int[2] pool_kernel_size, "
      "int[2] pool_stride, int[2] pool_padding, int[2] pool_dilation) -> Tensor");
  m.def(
      "conv_backward_input(Tensor grad_output, Tensor values, Tensor col_idx, Tensor t_ptr, Tensor t_rows, "
      "Tensor t_perm, int[] weight_shape, int[] input_shape, int[] stride, int[] padding, int[] dilation) -> Tensor");
  m.def(
      "conv_backward_values(Tensor grad_output, Tensor input, Tensor row_ptr, Tensor col_idx, int[] weight_shape, "
      "int[] stride, int[] padding, int[] dilation) -> Tensor");
  // reduction: 0 = none, 1 = sum, 2 = batchmean. Returns (loss, grad_student); grad_student is empty when
  // compute_grad is false.
  m.def(
      "kd_loss(Tensor student_logits, Tensor teacher_logits, Tensor? target, float temperature, float alpha, "
      "int reduction, int ignore_index, bool compute_grad) -> (Tensor, Tensor)");
  // The teacher as its top-k classes (ptd_sparse/topk_teacher.py): indices int32/int64 [N, k], logits [N, k],
  // rest_mass float32 [N] = its probability outside those classes, spread evenly over the other C - k classes.
  m.def(
      "kd_loss_topk(Tensor student_logits, Tensor teacher_indices, Tensor teacher_logits, Tensor teacher_rest_mass, "
      "Tensor? target, float temperature, float alpha, int reduction, int ignore_index, bool compute_grad) "
      "-> (Tensor, Tensor)");

  // The differentiable operators of the compiled backends (csrc/autograd/): autograd and autocast registered in C++,
  // so an eager call pays no Python layer. The convolution runs in the autocast dtype under torch.autocast, the loss
  // in float32. Gradients: input, values and bias of the convolution; the student logits of the loss.
  m.def(
      "sparse_conv2d(Tensor input, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor t_ptr, Tensor t_rows, "
      "Tensor t_perm, int[] weight_shape, Tensor? bias, int[] stride, int[] padding, int[] dilation, "
      "bool relu=False) -> Tensor");
  m.def(
      "kd_loss_differentiable(Tensor student_logits, Tensor teacher_logits, Tensor? target, float temperature, "
      "float alpha, int reduction, int ignore_index) -> Tensor");
  m.def(
      "kd_loss_topk_differentiable(Tensor student_logits, Tensor teacher_indices, Tensor teacher_logits, "
      "Tensor teacher_rest_mass, Tensor? target, float temperature, float alpha, int reduction, int ignore_index) "
      "-> Tensor");
}

// The Python side compares this with the running torch to refuse a stale build with one clear sentence.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("torch_version", []() { return std::string(PTD_TORCH_VERSION); },
             "The torch version this extension was compiled against.");
  module.def("has_cuda", []() {
#ifdef WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled into this build.");
  // Portability (csrc/cpu/isa/dispatch.h): which copy of the float32 CPU kernels runs here, which ones could, the
  // flags the ordinary code was compiled with, and what those flags assume that this CPU lacks (the stale-build
  // check refuses an extension whose list is not empty).
  module.def("cpu_kernel_isa", []() { return std::string(ptd_sparse::cpu_isa::f32_kernels().isa); },
             "The float32 CPU kernel set in use on this CPU: 'avx512', 'avx2' or 'baseline' (PTD_CPU_ISA forces one).");
  module.def("cpu_kernel_isas", &ptd_sparse::cpu_isa::available_isas,
             "The float32 CPU kernel sets this build has and this CPU runs, lowest first.");
  module.def("build_flags", []() { return std::string(PTD_BUILD_FLAGS); },
             "The compiler flags of the extension's CPU code that decide where it runs (optimisation, -march).");
  module.def("fingerprint", &ptd_sparse::fingerprint, pybind11::arg("tensor"),
             "A 64-bit hash of a CPU tensor's bytes (caches derived from a weight key on it; ptd_sparse/fingerprint.py).");
  module.def("weight_key", &ptd_sparse::weight_key, pybind11::arg("values"), pybind11::arg("row_ptr"),
             pybind11::arg("col_idx"),
             "The key of a weight derived from sparse values under a pattern (ptd_sparse/fingerprint.py, weight_key).");
  module.def("missing_cpu_features", &ptd_sparse::cpu_isa::missing_baseline_features,
             "CPU features the build's -march assumes that this CPU lacks (empty for a portable build).");
}
