// Shared pieces of the CUDA kernels: argument checks with messages that name the tensor, warp and block reductions,
// and the first-bad-row error slots through which a kernel reports bad input to the host.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <initializer_list>
#include <utility>

namespace ptd_sparse {
namespace cuda {

constexpr int kWarp = 32;

// Every tensor must be a CUDA tensor on the device of `reference`; the error names the tensor and both devices.
inline void check_same_cuda_device(const at::Tensor& reference, const char* reference_name,
                                   std::initializer_list<std::pair<const at::Tensor*, const char*>> others) {
  TORCH_CHECK_VALUE(reference.is_cuda(), reference_name, " must be a CUDA tensor for the cuda backend, got ",
                    reference.device());
  for (const auto& [tensor, name] : others) {
    if (tensor == nullptr || !tensor->defined()) continue;
    TORCH_CHECK_VALUE(tensor->device() == reference.device(), name, " is on ", tensor->device(), " but ",
                      reference_name, " is on ", reference.device());
  }
}

inline unsigned int blocks_for(int64_t work, int64_t per_block) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  TORCH_CHECK(blocks <= 0x7fffffff, "ptd_sparse cuda: launch of ", blocks, " blocks exceeds the grid limit");
  return static_cast<unsigned int>(blocks);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  return value;
}

template <typename T>
__device__ __forceinline__ T warp_max(T value) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value = max(value, __shfl_down_sync(0xffffffffu, value, offset));
  return value;
}

// Sum (or max) over the whole block, returned to every thread. blockDim.x must be a multiple of 32 (<= 1024);
// `scratch` holds 32 values. Ends with a barrier, so scratch can be reused right away.
template <typename T, bool kMax = false>
__device__ T block_reduce(T value, T* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  value = kMax ? warp_max(value) : warp_sum(value);
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  if (warp == 0) {
    T v = lane < warps ? scratch[lane] : (kMax ? -INFINITY : T(0));
    v = kMax ? warp_max(v) : warp_sum(v);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  const T result = scratch[0];
  __syncthreads();
  return result;
}

// PTD_DEBUG_CHECKS=1: checks of input values that need the data on the host (and so a synchronisation per call)
// run, and raise ordinary exceptions; otherwise the kernels report bad input with device-side asserts. Read on every
// call (a getenv), so a test or a debugging session can switch it without restarting.
inline bool debug_checks() {
  const char* value = std::getenv("PTD_DEBUG_CHECKS");
  return value != nullptr && std::string_view(value) == "1";
}

// Under debug_checks(), a kernel records the first offending row of each kind with atomicMin into int32 slots that
// start at `rows` ("none"); the host reads them once after the launch and raises with the row number.
inline at::Tensor error_slots(int64_t count, int64_t rows, const at::Tensor& like) {
  TORCH_CHECK(rows < 0x7fffffff, "ptd_sparse cuda: more than 2^31 - 1 rows");
  return at::full({count}, rows, like.options().dtype(at::kInt));
}

}  // namespace cuda
}  // namespace ptd_sparse
