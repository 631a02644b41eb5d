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
#include "huge_pages.h"

#include <algorithm>
#include <limits>
#include <vector>

namespace ptd_sparse {
namespace {

// The larger of a and b, NaN if either is (std::max would return a when b is NaN). Two selects rather than one with
// `||`, which GCC compiled to branches: on random data they mispredicted half the time.
template <typename T>
inline T nan_max(T a, T b) {
  const T larger = a > b ? a : b;  // b where b is NaN
  return a != a ? a : larger;
}

template <typename T>
inline T lowest() {
  return -std::numeric_limits<T>::infinity();
}

// One spatial dimension of the window: output o reads inputs o * stride - padding + k * dilation, k < kernel.
struct Window {
  int64_t kernel, stride, padding, dilation;
  // Floor division, as torch's: a window that does not fit (a negative span) leaves no output, where C++'s division
  // truncating toward zero would give one output reading past the input.
  int64_t out_size(int64_t in_size) const {
    const int64_t span = in_size + 2 * padding - dilation * (kernel - 1) - 1;
    return span < 0 ? 0 : span / stride + 1;
  }
  int64_t first(int64_t o) const { return o * stride - padding; }
  bool is_2x2() const { return kernel == 2 && stride == 2 && padding == 0 && dilation == 1; }
  // The outputs whose whole window lies in the input: first(o) >= 0 and first(o) + (kernel - 1) * dilation < size.
  OutputRange interior(int64_t in_size, int64_t out) const {
    const OutputRange first_tap = valid_output_range(-padding, stride, in_size, out);
    const OutputRange last_tap = valid_output_range((kernel - 1) * dilation - padding, stride, in_size, out);
    const int64_t begin = std::max(first_tap.begin, last_tap.begin);
    return {begin, std::max(begin, std::min(first_tap.end, last_tap.end))};
  }
};

struct Pool {
  Window h, w;
};

Pool checked_pool(at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                  at::IntArrayRef dilation) {
  const auto pair = [](at::IntArrayRef values, const char* name, int64_t minimum) {
    TORCH_CHECK_VALUE(values.size() == 2 && values[0] >= minimum && values[1] >= minimum, "max_pool2d: ", name,
                      " must be two integers >= ", minimum, ", got ", values);
  };
  pair(kernel_size, "kernel_size", 1);
  pair(stride, "stride", 1);
  pair(padding, "padding", 0);
  pair(dilation, "dilation", 1);
  TORCH_CHECK_VALUE(2 * padding[0] <= kernel_size[0] && 2 * padding[1] <= kernel_size[1],
                    "max_pool2d: padding must be at most half of kernel_size (as in torch's max_pool2d), got "
                    "padding ", padding, " for kernel_size ", kernel_size);
  return {{kernel_size[0], stride[0], padding[0], dilation[0]}, {kernel_size[1], stride[1], padding[1], dilation[1]}};
}

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

// The input rows an output row reads: k in [begin, end) with 0 <= window.first(o) + k * dilation < size.
struct Taps {
  int64_t begin, end;
  static Taps of(const Window& window, int64_t o, int64_t size) {
    const int64_t first = window.first(o);
    int64_t begin = 0, end = window.kernel;
    while (begin < end && first + begin * window.dilation < 0) ++begin;
    while (end > begin && first + (end - 1) * window.dilation >= size) --end;
    return {begin, end};
  }
};

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

// dst[o] = the maximum of row[window.first(o) + k * dilation] over k < kernel, for the outputs o in `interior`
// (windows wholly in the row): kernel tap by tap, each a pass over the outputs with a constant stride, which the
// compiler vectorises where the stride is known (1 and 2, the common pools, are instantiated).
template <int64_t kStride, typename T>
void interior_max_strided(const T* row, T* dst, OutputRange interior, const Window& window, int64_t stride) {
  const int64_t step = kStride > 0 ? kStride : stride;
  const T* src = row + window.first(interior.begin);
  const int64_t count = interior.end - interior.begin;
  T* out = dst + interior.begin;
  for (int64_t o = 0; o < count; ++o) out[o] = src[o * step];
  for (int64_t k = 1; k < window.kernel; ++k) {
    const T* tap = src + k * window.dilation;
    for (int64_t o = 0; o < count; ++o) out[o] = nan_max(out[o], tap[o * step]);
  }
}

template <typename T>
void interior_max(const T* row, T* dst, OutputRange interior, const Window& window) {
  if (interior.begin >= interior.end) return;
  if (window.stride == 1) return interior_max_strided<1>(row, dst, interior, window, 1);
  if (window.stride == 2) return interior_max_strided<2>(row, dst, interior, window, 2);
  interior_max_strided<0>(row, dst, interior, window, window.stride);
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
      const Taps taps_h = Taps::of(pool.h, oh, in_h);
      T* dst = out + row * out_w;
      if (taps_h.begin == taps_h.end) {
        std::fill(dst, dst + out_w, lowest<T>());
        continue;
      }
      const T* top = in + (plane * in_h + pool.h.first(oh) + taps_h.begin * pool.h.dilation) * in_w;
      std::copy(top, top + in_w, rows.data());
      for (int64_t kh = taps_h.begin + 1; kh < taps_h.end; ++kh) {
        const T* src = top + (kh - taps_h.begin) * pool.h.dilation * in_w;
        for (int64_t iw = 0; iw < in_w; ++iw) rows[iw] = nan_max(rows[iw], src[iw]);
      }
      for (int64_t ow = 0; ow < out_w; ++ow) {  // the edges, where windows reach into the padding
        if (ow == interior.begin) ow = interior.end;
        if (ow >= out_w) break;
        const Taps taps_w = Taps::of(pool.w, ow, in_w);
        const T* window = rows.data() + pool.w.first(ow);
        T value = lowest<T>();
        for (int64_t kw = taps_w.begin; kw < taps_w.end; ++kw) value = nan_max(value, window[kw * pool.w.dilation]);
        dst[ow] = value;
      }
      interior_max(rows.data(), dst, interior, pool.w);
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
      const Taps taps_h = Taps::of(pool.h, oh, in_h);
      for (int64_t ow = 0; ow < out_w; ++ow) {
        const Taps taps_w = Taps::of(pool.w, ow, in_w);
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
    at::Tensor out = at::empty(shape, input.options().memory_format(output_memory_format(input)));
    advise_huge_pages(out);
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
  at::Tensor out = at::empty(shape, x.options());
  advise_huge_pages(out);
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
