// The inference form's max-pools (ptd_sparse/nn/pooling.py: MaxPool2d, and MaxPool2x2 for the common 2x2 pool) on
// contiguous CPU tensors [..., H, W] or channels_last ones [N, C, H, W]: floor mode, no indices, any kernel size,
// stride, padding and dilation. torch's max_pool2d on contiguous NCHW CPU tensors runs a generic window loop per
// output: a ResNet stem's 3x3, stride-2 pool of 64 x 112 x 112 floats took 3.6 ms at batch 1 and 247 ms at batch 64
// (2 cores, Zen 4), and the first 2x2 pool of a CIFAR VGG at batch 64 11.2 ms; this kernel takes each output row's
// input rows once, their elementwise maximum first (contiguous, vectorised by the compiler), then the window maximum
// along that row. A channels_last input is pooled in NHWC (each output the maximum of its window's channel runs) and
// gives a channels_last output, as max_pool2d's does. NaN propagates as in max_pool2d; a window wholly in the padding
// gives -inf, as there.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../conv_geometry.h"
#include "isa/dispatch.h"
#include "max_pool_window.h"

#include <algorithm>
#include <vector>

namespace ptd_sparse {
namespace {

std::vector<int64_t> pooled_shape(const at::Tensor& input, const Pool& pool) {
  TORCH_CHECK_VALUE(input.dim() >= 3, "max_pool2d: input must be [..., H, W] with at least one leading dimension, "
                    "got shape ", input.sizes());
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  const int64_t out_h = pool.h.out_size(input.size(-2)), out_w = pool.w.out_size(input.size(-1));
  TORCH_CHECK_VALUE(out_h >= 1 && out_w >= 1, "max_pool2d: input of shape ", input.sizes(),
                    " is smaller than the window (kernel_size ", pool.h.kernel, "x", pool.w.kernel, ", dilation ",
                    pool.h.dilation, "x", pool.w.dilation, ", padding ", pool.h.padding, "x", pool.w.padding, ")");
  shape[shape.size() - 2] = out_h;
  shape[shape.size() - 1] = out_w;
  return shape;
}

// The 2x2, stride-2 pool without padding (VGG's), in one pass: each output row reads its two input rows once. The
// general loops below, with their window bounds and a pass per kernel tap, took 2-4x as long on these maps (64 x 64 x
// 32 x 32 to 64 x 512 x 4 x 4, batch 64).
template <typename T>
void pool_rows_2x2(const T* in, T* out, int64_t planes, int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w) {
  // A task is a run of output rows across planes; a grain of about 4096 outputs keeps the parallel overhead small.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(out_w, 1));
  at::parallel_for(0, planes * out_h, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t plane = row / out_h, oh = row % out_h;
      const T* top = in + (plane * in_h + 2 * oh) * in_w;
      const T* bottom = top + in_w;
      T* dst = out + row * out_w;
      for (int64_t ow = 0; ow < out_w; ++ow)
        dst[ow] = nan_max(nan_max(top[2 * ow], top[2 * ow + 1]), nan_max(bottom[2 * ow], bottom[2 * ow + 1]));
    }
  });
}

// NHWC: out[n, oh, ow, :] = max of the four input positions' channel runs.
template <typename T>
void pool_positions_2x2(const T* in, T* out, int64_t batch, int64_t channels, int64_t in_h, int64_t in_w, int64_t out_h,
                        int64_t out_w) {
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(out_w * channels, 1));
  at::parallel_for(0, batch * out_h, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / out_h, oh = row % out_h;
      const T* top = in + ((n * in_h + 2 * oh) * in_w) * channels;
      const T* bottom = top + in_w * channels;
      T* dst = out + row * out_w * channels;
      for (int64_t ow = 0; ow < out_w; ++ow) {
        const T* a = top + 2 * ow * channels;
        const T* b = bottom + 2 * ow * channels;
        T* o = dst + ow * channels;
        for (int64_t c = 0; c < channels; ++c)
          o[c] = nan_max(nan_max(a[c], a[c + channels]), nan_max(b[c], b[c + channels]));
      }
    }
  });
}

// NCHW: each output row is the window maximum along the elementwise maximum of its input rows (`rows`, one row of
// in_w per task).
template <typename T>
void pool_rows(const T* in, T* out, int64_t planes, int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w,
               const Pool& pool) {
  // A task is a run of output rows across planes; a grain of about 4096 outputs keeps the parallel overhead small.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(out_w, 1));
  const OutputRange interior = pool.w.interior(in_w, out_w);
  at::parallel_for(0, planes * out_h, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> rows(in_w);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t plane = row / out_h, oh = row % out_h;
      pool_output_row<false>(in + plane * in_h * in_w, in_w, in_h, in_w, oh, pool, interior, rows.data(),
                             out + row * out_w, out_w);
    }
  });
}

// NHWC: out[n, oh, ow, :] = the maximum of the window's channel runs.
template <typename T>
void pool_positions(const T* in, T* out, int64_t batch, int64_t channels, int64_t in_h, int64_t in_w, int64_t out_h,
                    int64_t out_w, const Pool& pool) {
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(out_w * channels, 1));
  at::parallel_for(0, batch * out_h, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / out_h, oh = row % out_h;
      const PoolTaps taps_h = PoolTaps::of(pool.h, oh, in_h);
      for (int64_t ow = 0; ow < out_w; ++ow) {
        const PoolTaps taps_w = PoolTaps::of(pool.w, ow, in_w);
        T* o = out + (row * out_w + ow) * channels;
        std::fill(o, o + channels, lowest<T>());
        for (int64_t kh = taps_h.begin; kh < taps_h.end; ++kh) {
          const int64_t ih = pool.h.first(oh) + kh * pool.h.dilation;
          for (int64_t kw = taps_w.begin; kw < taps_w.end; ++kw) {
            const int64_t iw = pool.w.first(ow) + kw * pool.w.dilation;
            const T* a = in + ((n * in_h + ih) * in_w + iw) * channels;
            for (int64_t c = 0; c < channels; ++c) o[c] = nan_max(o[c], a[c]);
          }
        }
      }
    }
  });
}

at::Tensor max_pool2d_cpu(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Pool pool = checked_pool(kernel_size, stride, padding, dilation);
  const std::vector<int64_t> shape = pooled_shape(input, pool);
  const bool two_by_two = pool.h.is_2x2() && pool.w.is_2x2();
  if (is_channels_last(input)) {
    at::Tensor out = cpu_isa::output_tensor(shape, input.options().memory_format(output_memory_format(input)));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "max_pool2d_cpu", [&] {
      if (two_by_two)
        return pool_positions_2x2(input.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), input.size(0),
                                  input.size(1), input.size(2), input.size(3), shape[2], shape[3]);
      pool_positions(input.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), input.size(0),
                     input.size(1), input.size(2), input.size(3), shape[2], shape[3], pool);
    });
    return out;
  }
  const at::Tensor x = input.contiguous();
  at::Tensor out = cpu_isa::output_tensor(shape, x.options());
  const int64_t in_h = x.size(-2), in_w = x.size(-1), out_h = shape[shape.size() - 2], out_w = shape.back();
  const int64_t planes = in_h * in_w == 0 ? 0 : x.numel() / (in_h * in_w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "max_pool2d_cpu", [&] {
    if (two_by_two)
      return pool_rows_2x2(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), planes, in_h, in_w, out_h,
                           out_w);
    pool_rows(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), planes, in_h, in_w, out_h, out_w,
              pool);
  });
  return out;
}

at::Tensor max_pool2d_meta(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Pool pool = checked_pool(kernel_size, stride, padding, dilation);
  return at::empty(pooled_shape(input, pool), input.options().memory_format(output_memory_format(input)));
}

// The 2x2, stride-2 pool, refusing its input with the message its callers know.
void check_2x2_input(const at::Tensor& input) {
  TORCH_CHECK_VALUE(input.dim() >= 3 && input.size(-2) >= 2 && input.size(-1) >= 2,
                    "max_pool2x2: input must be [..., H, W] with at least one leading dimension and H, W >= 2, got "
                    "shape ", input.sizes());
}

at::Tensor max_pool2x2_cpu(const at::Tensor& input) {
  check_2x2_input(input);
  return max_pool2d_cpu(input, {2, 2}, {2, 2}, {0, 0}, {1, 1});
}

at::Tensor max_pool2x2_meta(const at::Tensor& input) {
  check_2x2_input(input);
  return max_pool2d_meta(input, {2, 2}, {2, 2}, {0, 0}, {1, 1});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ptd_sparse_kernels, m) {
  m.def("max_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  m.def("max_pool2x2(Tensor input) -> Tensor");
}

TORCH_LIBRARY_IMPL(ptd_sparse_kernels, CPU, m) {
  m.impl("max_pool2d", &max_pool2d_cpu);
  m.impl("max_pool2x2", &max_pool2x2_cpu);
}

TORCH_LIBRARY_IMPL(ptd_sparse_kernels, Meta, m) {
  m.impl("max_pool2d", &max_pool2d_meta);
  m.impl("max_pool2x2", &max_pool2x2_meta);
}

}  // namespace ptd_sparse
