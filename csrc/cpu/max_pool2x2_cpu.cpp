// The inference form's 2x2, stride-2 max-pool (ptd_sparse/nn/pooling.py, MaxPool2x2) on contiguous CPU tensors
// [..., H, W] in one pass: each output row reads its two input rows once and writes once. torch's NCHW max_pool2d
// runs a generic window loop, and three elementwise maxima of strided views read the input twice and write two
// intermediates; on the first pool of a CIFAR VGG at batch 64 (64 x 64 x 32 x 32 floats) they took 11.2 ms and
// 1.9-4.0 ms where this takes 0.3 ms (2 cores, Zen 4). NaN propagates as in max_pool2d; odd sizes drop the last row
// or column (floor mode). A channels_last input [N, C, H, W] is pooled in NHWC (each output a run of channels, the
// maxima vectorised over them) and gives a channels_last output, as max_pool2d's does.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../conv_geometry.h"

#include <algorithm>
#include <vector>

namespace ptd_sparse {
namespace {

// The larger of a and b, NaN if either is (std::max would return a when b is NaN).
template <typename T>
inline T nan_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}

std::vector<int64_t> pooled_shape(const at::Tensor& input) {
  TORCH_CHECK_VALUE(input.dim() >= 3 && input.size(-2) >= 2 && input.size(-1) >= 2,
                    "max_pool2x2: input must be [..., H, W] with at least one leading dimension and H, W >= 2, got "
                    "shape ", input.sizes());
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape[shape.size() - 2] /= 2;
  shape[shape.size() - 1] /= 2;
  return shape;
}

template <typename T>
void pool_rows(const T* in, T* out, int64_t planes, int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w) {
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
void pool_positions(const T* in, T* out, int64_t batch, int64_t channels, int64_t in_h, int64_t in_w, int64_t out_h,
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

at::Tensor max_pool2x2_cpu(const at::Tensor& input) {
  const std::vector<int64_t> shape = pooled_shape(input);
  if (is_channels_last(input)) {
    at::Tensor out = at::empty(shape, input.options().memory_format(output_memory_format(input)));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "max_pool2x2_cpu", [&] {
      pool_positions(input.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), input.size(0),
                     input.size(1), input.size(2), input.size(3), shape[2], shape[3]);
    });
    return out;
  }
  const at::Tensor x = input.contiguous();
  at::Tensor out = at::empty(shape, x.options());
  const int64_t in_h = x.size(-2), in_w = x.size(-1), out_h = shape[shape.size() - 2], out_w = shape.back();
  const int64_t planes = in_h * in_w == 0 ? 0 : x.numel() / (in_h * in_w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "max_pool2x2_cpu", [&] {
    pool_rows(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), planes, in_h, in_w, out_h, out_w);
  });
  return out;
}

at::Tensor max_pool2x2_meta(const at::Tensor& input) {
  return at::empty(pooled_shape(input), input.options().memory_format(output_memory_format(input)));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ptd_sparse_kernels, m) {
  m.def("max_pool2x2(Tensor input) -> Tensor");
}

TORCH_LIBRARY_IMPL(ptd_sparse_kernels, CPU, m) {
  m.impl("max_pool2x2", &max_pool2x2_cpu);
}

TORCH_LIBRARY_IMPL(ptd_sparse_kernels, Meta, m) {
  m.impl("max_pool2x2", &max_pool2x2_meta);
}

}  // namespace ptd_sparse
