// Runtime CPU dispatch of the float32 hot kernels (the sparse convolution's fast paths and the KD loss's row kernel).
//
// The extension's ordinary code is compiled for a portable baseline (setup.py: x86-64-v2 unless PTD_NATIVE=1 or
// PTD_CPU_ARCH say otherwise). The hot kernels are compiled again for AVX2+FMA and for AVX-512 (kernels_avx2.cpp,
// kernels_avx512.cpp), each copy in a namespace of its own, and one table of entry points per copy. f32_kernels()
// picks the best table this CPU runs, once; PTD_CPU_ISA=baseline|avx2|avx512 forces one (for tests and
// comparisons), and asking for one this CPU or this build lacks is an error naming what is missing.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "../../conv_geometry.h"
#include "../max_pool_window.h"

namespace ptd_sparse {
namespace cpu_isa {

struct KdRowResult {
  float loss;
  bool bad_student, bad_teacher;
};

// One copy of the kernels. The convolution entry points return false (and touch nothing) when the geometry does not
// suit the fast layout (offsets beyond int32, a strided data gradient, ...): the caller then runs its generic loops.
// Tensors are contiguous float32 and already checked by the caller.
struct F32Kernels {
  const char* isa;  // "baseline", "avx2" or "avx512"
  bool (*conv_forward)(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                       const at::Tensor& col_idx, const float* bias, bool relu, const ConvGeometry& g,
                       at::Tensor& out);
  // conv_forward followed by the max-pool `pool` (conv_forward_max_pool): out is the pooled map. Fused only where
  // fuses_max_pool says so (the layouts whose epilogue can pool); false elsewhere (the caller then runs the two
  // operators).
  bool (*fuses_max_pool)(const ConvGeometry& g, int64_t nnz, const Pool& pool);
  bool (*conv_forward_max_pool)(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                                const at::Tensor& col_idx, const float* bias, bool relu, const ConvGeometry& g,
                                const Pool& pool, at::Tensor& out);
  bool (*conv_backward_input)(const at::Tensor& grad_output, const at::Tensor& values, const at::Tensor& col_idx,
                              const at::Tensor& t_ptr, const at::Tensor& t_rows, const at::Tensor& t_perm,
                              const ConvGeometry& g, at::Tensor& grad_input);
  bool (*conv_backward_values)(const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& row_ptr,
                               const at::Tensor& col_idx, const ConvGeometry& g, at::Tensor& grad_values);
  // One row of the dense KD loss (kd_loss_cpu.cpp): loss, and the gradient into grad when grad is not null.
  // scratch holds 3 * classes floats rounded up to kd_scratch_multiple.
  KdRowResult (*kd_row)(const float* s, const float* t, int64_t classes, int64_t label, float inv_t,
                        float kd_weight, float ce_weight, float kd_grad, float ce_grad, float* scratch, float* grad);
  int64_t kd_scratch_multiple;
};

// The tables of each copy; null where this build has no such copy (a non-x86 machine, a compiler without the
// target pragmas).
const F32Kernels* baseline_kernels();
const F32Kernels* avx2_kernels();
const F32Kernels* avx512_kernels();

// The table in use, chosen on the first call (thread-safe) and kept: the best copy this CPU supports, or the one
// PTD_CPU_ISA names. Throws c10::ValueError for a bad PTD_CPU_ISA.
const F32Kernels& f32_kernels();

// A float32 tensor of `numel` uninitialised elements for a kernel's packed operands, whose memory is reused by later
// calls on the same calling thread once this one has released it. A fresh allocation of a large activation's size is
// mapped anew by the C library on every call, and the kernel paid for the page faults and the zeroing of every page
// on first touch: 64@56x56 at batch 64 spent more time in them than in its multiply-adds. Each calling thread keeps at
// most kKeptPackingBuffers buffers of at most kMaxKeptPackingBytes each (the largest ones it has used).
constexpr int kKeptPackingBuffers = 2;
constexpr int64_t kMaxKeptPackingBytes = int64_t{512} << 20;
at::Tensor packing_buffer(int64_t numel);

// An uninitialised tensor of `sizes` (dtype, device and memory format from `options`) for an operator's output.
// Outputs of at least kHugePageAdviceMinBytes come from buffers of exactly their size that this calling thread's
// earlier outputs released (at most kKeptOutputBuffers of at most kMaxKeptOutputBytes each): a fresh allocation of
// that size is mapped anew by the C library and its pages faulted in and zeroed on first write, 8% of a torchvision
// ResNet18's forward at batch 64 (perf, Xeon), every forward again. Smaller outputs are heap blocks the C library
// reuses itself. The tensor shares the buffer's storage (no view of it): it is free again once no tensor holds that
// storage, and never again once the storage was moved into shared memory.
constexpr int kKeptOutputBuffers = 4;
constexpr int64_t kMaxKeptOutputBytes = int64_t{512} << 20;
at::Tensor output_tensor(at::IntArrayRef sizes, const at::TensorOptions& options);

// The copies this build has and this CPU runs, lowest first (always starts with "baseline").
std::vector<std::string> available_isas();

// CPU features the extension's ordinary (baseline) code was compiled to assume (-march) that this CPU lacks:
// empty for a portable build; a -march=native build moved to an older CPU lists what it lacks.
std::vector<std::string> missing_baseline_features();

}  // namespace cpu_isa
}  // namespace ptd_sparse
