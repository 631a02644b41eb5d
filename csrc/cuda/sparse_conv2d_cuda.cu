// CUDA kernels of the masked sparse convolution: forward, backward-data and backward-weight (at the nonzeros only).
//
// Direct sparse convolution with implicit im2col (Escoin's formulation): an output value is the sum, over the
// nonzeros of its output channel's CSR row, of weight * input at the tap's shifted position; nothing dense is built
// and work is proportional to nnz * N * OH * OW.
// - forward: a block owns one output channel and kPixelsPerThread * blockDim.x consecutive output positions of the
//   flattened (image, row, column) space, so small late-layer maps still fill a block. The row's nonzeros are staged
//   in shared memory in chunks (value and decoded tap offsets, decoded once per block, not per pixel); each thread
//   keeps kPixelsPerThread fp32 accumulators in registers and reuses every staged weight across them. Consecutive
//   threads read consecutive input columns: coalesced. Bias and ReLU are fused in the epilogue.
// - backward-data: the same kernel shape over the transposed pattern (entries of one input channel, built once per
//   mask): each input-gradient position gathers from the output positions that read it (a gather, so no atomics
//   and a deterministic result).
// - backward-weight: one warp per nonzero, a dot product of the output gradient plane of its row with the shifted
//   input plane over every image, restricted to the valid window so no bounds checks are needed; warp-shuffle sum.
// Rows of very different lengths: the grid has many more blocks than SMs (every (channel, pixel tile) pair), so the
// block scheduler balances long and short rows; no block is tied to a whole row's pixels.
#include "../conv_geometry.h"
#include "../csr_checks.h"
#include "cuda_common.cuh"

#include <torch/library.h>

namespace ptd_sparse {
namespace {

constexpr int kThreads = 128;
constexpr int kPixelsPerThread = 4;
constexpr int kChunk = 256;  // nonzeros staged in shared memory at a time

// Plain-integer geometry for the device (the host struct holds int64 fields too, but 32-bit index math is faster;
// the host checks that every tensor fits).
struct DeviceGeometry {
  int batch, in_channels, in_h, in_w, out_channels, kernel_h, kernel_w, out_h, out_w;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
};

DeviceGeometry to_device(const ConvGeometry& g, std::initializer_list<int64_t> element_counts) {
  // Tap offsets are staged in shared memory as 16-bit integers.
  TORCH_CHECK_VALUE((g.kernel_h - 1) * g.dil_h + g.pad_h < 32768 && (g.kernel_w - 1) * g.dil_w + g.pad_w < 32768,
                    "the cuda backend supports dilated kernel extents and padding below 32768");
  TORCH_CHECK_VALUE(g.out_channels <= 65535 && g.in_channels <= 65535, "the cuda backend launches one grid row per "
                    "channel: at most 65535 input and output channels, got ", g.in_channels, " and ", g.out_channels);
  for (int64_t count : element_counts)
    TORCH_CHECK_VALUE(count < (int64_t(1) << 31), "the cuda backend indexes tensors with 32-bit integers; a tensor "
                      "of ", count, " elements is too large (split the batch)");
  return {static_cast<int>(g.batch), static_cast<int>(g.in_channels), static_cast<int>(g.in_h),
          static_cast<int>(g.in_w), static_cast<int>(g.out_channels), static_cast<int>(g.kernel_h),
          static_cast<int>(g.kernel_w), static_cast<int>(g.out_h), static_cast<int>(g.out_w),
          static_cast<int>(g.stride_h), static_cast<int>(g.stride_w), static_cast<int>(g.pad_h),
          static_cast<int>(g.pad_w), static_cast<int>(g.dil_h), static_cast<int>(g.dil_w)};
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) conv_forward_kernel(
    const scalar_t* __restrict__ input, const scalar_t* __restrict__ values, const int* __restrict__ row_ptr,
    const int* __restrict__ col_idx, const scalar_t* __restrict__ bias, scalar_t* __restrict__ output,
    DeviceGeometry g, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t s_value[kChunk];
  __shared__ int s_offset[kChunk];  // c_in * H * W + dh * W + dw: where the tap reads, relative to (ih0, iw0)
  __shared__ short s_dh[kChunk], s_dw[kChunk];

  const int co = blockIdx.y;
  const int out_plane = g.out_h * g.out_w, in_plane = g.in_h * g.in_w;
  const int total = g.batch * out_plane;
  const int taps = g.kernel_h * g.kernel_w;

  int out_index[kPixelsPerThread], base[kPixelsPerThread], ih0[kPixelsPerThread], iw0[kPixelsPerThread];
  acc_t acc[kPixelsPerThread];
  const acc_t start = bias != nullptr ? static_cast<acc_t>(bias[co]) : acc_t(0);
#pragma unroll
  for (int j = 0; j < kPixelsPerThread; ++j) {
    const int q = (blockIdx.x * kPixelsPerThread + j) * kThreads + threadIdx.x;
    const int n = q / out_plane, p = q - n * out_plane;
    const int oh = p / g.out_w, ow = p - oh * g.out_w;
    out_index[j] = q < total ? (n * g.out_channels + co) * out_plane + p : -1;
    ih0[j] = q < total ? oh * g.stride_h - g.pad_h : -(1 << 20);  // out-of-range pixels fail every bounds check
    iw0[j] = ow * g.stride_w - g.pad_w;
    base[j] = q < total ? n * g.in_channels * in_plane + ih0[j] * g.in_w + iw0[j] : 0;  // no overflow past the end
    acc[j] = start;
  }

  const int row_begin = row_ptr[co], row_end = row_ptr[co + 1];
  for (int chunk = row_begin; chunk < row_end; chunk += kChunk) {
    const int count = min(kChunk, row_end - chunk);
    __syncthreads();
    for (int i = threadIdx.x; i < count; i += kThreads) {
      const int column = col_idx[chunk + i];
      const int ci = column / taps, tap = column - ci * taps;
      const int kh = tap / g.kernel_w, kw = tap - kh * g.kernel_w;
      s_value[i] = static_cast<acc_t>(values[chunk + i]);
      s_dh[i] = static_cast<short>(kh * g.dil_h);
      s_dw[i] = static_cast<short>(kw * g.dil_w);
      s_offset[i] = ci * in_plane + kh * g.dil_h * g.in_w + kw * g.dil_w;
    }
    __syncthreads();
    for (int i = 0; i < count; ++i) {
      const acc_t w = s_value[i];
      const int offset = s_offset[i], dh = s_dh[i], dw = s_dw[i];
#pragma unroll
      for (int j = 0; j < kPixelsPerThread; ++j) {
        const unsigned ih = static_cast<unsigned>(ih0[j] + dh), iw = static_cast<unsigned>(iw0[j] + dw);
        if (ih < static_cast<unsigned>(g.in_h) && iw < static_cast<unsigned>(g.in_w))
          acc[j] += w * static_cast<acc_t>(__ldg(input + base[j] + offset));
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kPixelsPerThread; ++j) {
    if (out_index[j] < 0) continue;
    const acc_t v = relu && acc[j] < acc_t(0) ? acc_t(0) : acc[j];
    output[out_index[j]] = static_cast<scalar_t>(v);
  }
}

// grad_input[n, ci, ih, iw] = sum over the nonzeros (co, ci, kh, kw) of w * grad_output[n, co, oh, ow] with
// ih = oh * stride_h + kh * dil_h - pad_h (and the same for columns), i.e. oh = (ih + pad_h - kh * dil_h) / stride_h
// when that divides exactly and lands inside the output.
template <typename scalar_t, bool kUnitStride>
__global__ void __launch_bounds__(kThreads) conv_backward_input_kernel(
    const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ values, const int* __restrict__ col_idx,
    const int* __restrict__ t_ptr, const int* __restrict__ t_rows, const int* __restrict__ t_perm,
    scalar_t* __restrict__ grad_input, DeviceGeometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t s_value[kChunk];
  __shared__ int s_plane[kChunk];  // co * OH * OW
  __shared__ short s_dh[kChunk], s_dw[kChunk];  // kh * dil_h - pad_h, kw * dil_w - pad_w

  const int ci = blockIdx.y;
  const int out_plane = g.out_h * g.out_w, in_plane = g.in_h * g.in_w;
  const int total = g.batch * in_plane;
  const int taps = g.kernel_h * g.kernel_w;

  int in_index[kPixelsPerThread], base[kPixelsPerThread], ih[kPixelsPerThread], iw[kPixelsPerThread];
  acc_t acc[kPixelsPerThread];
#pragma unroll
  for (int j = 0; j < kPixelsPerThread; ++j) {
    const int q = (blockIdx.x * kPixelsPerThread + j) * kThreads + threadIdx.x;
    const int n = q / in_plane, p = q - n * in_plane;
    in_index[j] = q < total ? (n * g.in_channels + ci) * in_plane + p : -1;
    ih[j] = q < total ? p / g.in_w : -(1 << 20);
    iw[j] = p - (p / g.in_w) * g.in_w;
    base[j] = q < total ? n * g.out_channels * out_plane : 0;
    acc[j] = 0;
  }

  const int begin = t_ptr[ci], end = t_ptr[ci + 1];
  for (int chunk = begin; chunk < end; chunk += kChunk) {
    const int count = min(kChunk, end - chunk);
    __syncthreads();
    for (int i = threadIdx.x; i < count; i += kThreads) {
      const int e = t_perm[chunk + i];
      const int tap = col_idx[e] % taps;
      const int kh = tap / g.kernel_w, kw = tap - kh * g.kernel_w;
      s_value[i] = static_cast<acc_t>(values[e]);
      s_plane[i] = t_rows[chunk + i] * out_plane;
      s_dh[i] = static_cast<short>(kh * g.dil_h - g.pad_h);
      s_dw[i] = static_cast<short>(kw * g.dil_w - g.pad_w);
    }
    __syncthreads();
    for (int i = 0; i < count; ++i) {
      const acc_t w = s_value[i];
      const int plane = s_plane[i], dh = s_dh[i], dw = s_dw[i];
#pragma unroll
      for (int j = 0; j < kPixelsPerThread; ++j) {
        int oh = ih[j] - dh, ow = iw[j] - dw;
        if (oh < 0 || ow < 0) continue;
        if (!kUnitStride) {
          if (oh % g.stride_h != 0 || ow % g.stride_w != 0) continue;
          oh /= g.stride_h;
          ow /= g.stride_w;
        }
        if (oh < g.out_h && ow < g.out_w)
          acc[j] += w * static_cast<acc_t>(__ldg(grad_output + base[j] + plane + oh * g.out_w + ow));
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kPixelsPerThread; ++j)
    if (in_index[j] >= 0) grad_input[in_index[j]] = static_cast<scalar_t>(acc[j]);
}

constexpr int kWarpsPerBlock = kThreads / cuda::kWarp;

// grad_values[e] = sum over n and the valid output window of grad_output[n, co, oh, ow] * input[n, ci, ih, iw].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) conv_backward_values_kernel(
    const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ input, const int* __restrict__ row_ptr,
    const int* __restrict__ col_idx, int nnz, scalar_t* __restrict__ grad_values, DeviceGeometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % cuda::kWarp;
  const int e = blockIdx.x * kWarpsPerBlock + threadIdx.x / cuda::kWarp;
  if (e >= nnz) return;
  // The entry's output channel: the last row whose start is <= e (binary search over row_ptr).
  int low = 0, high = g.out_channels;
  while (high - low > 1) {
    const int mid = (low + high) / 2;
    if (row_ptr[mid] <= e) low = mid; else high = mid;
  }
  const int co = low, taps = g.kernel_h * g.kernel_w;
  const int column = col_idx[e];
  const int ci = column / taps, tap = column - ci * taps;
  const int kh = tap / g.kernel_w, kw = tap - kh * g.kernel_w;
  const int off_h = kh * g.dil_h - g.pad_h, off_w = kw * g.dil_w - g.pad_w;
  const OutputRange rows = valid_output_range(off_h, g.stride_h, g.in_h, g.out_h);
  const OutputRange cols = valid_output_range(off_w, g.stride_w, g.in_w, g.out_w);
  const int window_h = static_cast<int>(rows.end - rows.begin), window_w = static_cast<int>(cols.end - cols.begin);
  const int window = window_h * window_w;
  const int out_plane = g.out_h * g.out_w, in_plane = g.in_h * g.in_w;
  acc_t sum = 0;
  for (int i = lane; i < g.batch * window; i += cuda::kWarp) {
    const int n = i / window, r = i - n * window;
    const int oh = static_cast<int>(rows.begin) + r / window_w, ow = static_cast<int>(cols.begin) + r % window_w;
    const scalar_t go = grad_output[(n * g.out_channels + co) * out_plane + oh * g.out_w + ow];
    const scalar_t x = input[(n * g.in_channels + ci) * in_plane + (oh * g.stride_h + off_h) * g.in_w +
                             ow * g.stride_w + off_w];
    sum += static_cast<acc_t>(go) * static_cast<acc_t>(x);
  }
  sum = cuda::warp_sum(sum);
  if (lane == 0) grad_values[e] = static_cast<scalar_t>(sum);
}

// The CUDA entry points check the pattern's dtypes and sizes (csr_checks.h); its content (row_ptr monotone and
// ending at nnz, col_idx in range) is not read here, since that would copy it to the host and synchronise on every
// call. Patterns are validated once where they enter the package (ConvPattern, SparseConvWeight, state-dict loads;
// ptd_sparse/_format_checks.py), which every call through the Python API goes through.

at::Tensor conv_forward_cuda(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_ptr,
                             const at::Tensor& col_idx, at::IntArrayRef weight_shape,
                             const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, bool relu) {
  const at::Tensor bias_tensor = bias.has_value() ? *bias : at::Tensor();
  cuda::check_same_cuda_device(input, "input", {{&values, "values"}, {&row_ptr, "row_ptr"}, {&col_idx, "col_idx"},
                                                {&bias_tensor, "bias"}});
  const ConvGeometry g = make_geometry(input.sizes(), weight_shape, stride, padding, dilation);
  check_csr(row_ptr, col_idx, g);  // sizes and dtypes only on CUDA tensors
  check_values(values, col_idx, input, "input");
  if (bias_tensor.defined())
    TORCH_CHECK_VALUE(bias_tensor.numel() == g.out_channels && bias_tensor.scalar_type() == input.scalar_type(),
                      "bias must have C_out = ", g.out_channels, " entries of the input's dtype, got ",
                      bias_tensor.scalar_type(), " of shape ", bias_tensor.sizes());
  c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous(), vals = values.contiguous();
  const at::Tensor rp = row_ptr.contiguous(), cols = col_idx.contiguous();
  const at::Tensor b = bias_tensor.defined() ? bias_tensor.contiguous() : at::Tensor();
  at::Tensor out = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, x.options());
  if (out.numel() == 0) return out.contiguous(output_memory_format(input));
  const DeviceGeometry dg = to_device(g, {x.numel(), out.numel()});
  const dim3 grid(cuda::blocks_for(g.batch * g.out_plane(), kThreads * kPixelsPerThread),
                  static_cast<unsigned int>(g.out_channels));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_forward_cuda", [&] {
    conv_forward_kernel<scalar_t><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), vals.const_data_ptr<scalar_t>(), rp.const_data_ptr<int>(),
        cols.const_data_ptr<int>(), b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
        out.mutable_data_ptr<scalar_t>(), dg, relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // The kernel runs NCHW; the result takes the input's layout (csrc/conv_geometry.h, output_memory_format).
  return out.contiguous(output_memory_format(input));
}

at::Tensor conv_backward_input_cuda(const at::Tensor& grad_output, const at::Tensor& values,
                                    const at::Tensor& col_idx, const at::Tensor& t_ptr, const at::Tensor& t_rows,
                                    const at::Tensor& t_perm, at::IntArrayRef weight_shape,
                                    at::IntArrayRef input_shape, at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation) {
  cuda::check_same_cuda_device(grad_output, "grad_output", {{&values, "values"}, {&col_idx, "col_idx"},
                                                            {&t_ptr, "t_ptr"}, {&t_rows, "t_rows"},
                                                            {&t_perm, "t_perm"}});
  const ConvGeometry g = make_geometry(input_shape, weight_shape, stride, padding, dilation);
  check_grad_output(grad_output, g);
  check_transposed(col_idx, t_ptr, t_rows, t_perm, g);  // sizes and dtypes only on CUDA tensors
  check_values(values, col_idx, grad_output, "grad_output");
  c10::cuda::CUDAGuard guard(grad_output.device());
  const at::Tensor go = grad_output.contiguous(), vals = values.contiguous(), cols = col_idx.contiguous();
  const at::Tensor tp = t_ptr.contiguous(), tr = t_rows.contiguous(), tperm = t_perm.contiguous();
  at::Tensor grad_input = at::empty({g.batch, g.in_channels, g.in_h, g.in_w}, go.options());
  if (grad_input.numel() == 0) return grad_input;
  const DeviceGeometry dg = to_device(g, {go.numel(), grad_input.numel()});
  const dim3 grid(cuda::blocks_for(g.batch * g.in_plane(), kThreads * kPixelsPerThread),
                  static_cast<unsigned int>(g.in_channels));
  const bool unit_stride = g.stride_h == 1 && g.stride_w == 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "conv_backward_input_cuda", [&] {
    auto kernel = unit_stride ? conv_backward_input_kernel<scalar_t, true> : conv_backward_input_kernel<scalar_t, false>;
    kernel<<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        go.const_data_ptr<scalar_t>(), vals.const_data_ptr<scalar_t>(), cols.const_data_ptr<int>(),
        tp.const_data_ptr<int>(), tr.const_data_ptr<int>(), tperm.const_data_ptr<int>(),
        grad_input.mutable_data_ptr<scalar_t>(), dg);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_input;
}

at::Tensor conv_backward_values_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                     const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                     at::IntArrayRef weight_shape, at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation) {
  cuda::check_same_cuda_device(grad_output, "grad_output", {{&input, "input"}, {&row_ptr, "row_ptr"},
                                                            {&col_idx, "col_idx"}});
  const ConvGeometry g = make_geometry(input.sizes(), weight_shape, stride, padding, dilation);
  check_csr(row_ptr, col_idx, g);  // sizes and dtypes only on CUDA tensors
  TORCH_CHECK_VALUE(grad_output.scalar_type() == input.scalar_type(), "grad_output dtype ", grad_output.scalar_type(),
                    " must match input dtype ", input.scalar_type());
  check_grad_output(grad_output, g);
  c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor go = grad_output.contiguous(), x = input.contiguous();
  const at::Tensor rp = row_ptr.contiguous(), cols = col_idx.contiguous();
  const int64_t nnz = cols.numel();
  at::Tensor grad_values = at::empty({nnz}, x.options());
  if (nnz == 0) return grad_values;
  if (g.batch == 0) return grad_values.zero_();
  const DeviceGeometry dg = to_device(g, {go.numel(), x.numel(), nnz});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_backward_values_cuda", [&] {
    conv_backward_values_kernel<scalar_t>
        <<<cuda::blocks_for(nnz, kWarpsPerBlock), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), rp.const_data_ptr<int>(),
            cols.const_data_ptr<int>(), static_cast<int>(nnz), grad_values.mutable_data_ptr<scalar_t>(), dg);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_values;
}

}  // namespace

TORCH_LIBRARY_IMPL(ptd_sparse_kernels, CUDA, m) {
  m.impl("conv_forward", &conv_forward_cuda);
  m.impl("conv_backward_input", &conv_backward_input_cuda);
  m.impl("conv_backward_values", &conv_backward_values_cuda);
}

}  // namespace ptd_sparse
