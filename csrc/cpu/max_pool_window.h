// The max-pool's window arithmetic and its one-output-row kernel, shared by the max-pool operators
// (max_pool2d_cpu.cpp) and the sparse convolution's fused pool epilogue (wide_conv_f32.h, conv_forward_max_pool):
// floor mode, no indices, any kernel size, stride, padding and dilation, exactly as torch's max_pool2d. NaN
// propagates as there; a window wholly in the padding gives -inf.
//
// Included before the per-ISA copies set their instruction set (csrc/cpu/isa/prelude.h), so its functions are
// compiled for the baseline; a copy's kernels inline them, and the compiler vectorises them for that copy.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "../conv_geometry.h"

namespace ptd_sparse {

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

// max(value, 0) with NaN kept, as the convolution's relu epilogue computes it (std::max(value, 0.0f)).
template <typename T>
inline T relu_of(T value) {
  return value < T(0) ? T(0) : value;
}

// One spatial dimension of the window: output o reads inputs o * stride - padding + k * dilation, k < kernel.
struct PoolWindow {
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
  PoolWindow h, w;
};

// The pool of kernel_size, stride, padding and dilation (two integers each), refused with a message naming the
// argument, as max_pool2d refuses it.
inline Pool checked_pool(at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, const char* op = "max_pool2d", const char* prefix = "") {
  const auto pair = [&](at::IntArrayRef values, const char* name, int64_t minimum) {
    TORCH_CHECK_VALUE(values.size() == 2 && values[0] >= minimum && values[1] >= minimum, op, ": ", prefix, name,
                      " must be two integers >= ", minimum, ", got ", values);
  };
  pair(kernel_size, "kernel_size", 1);
  pair(stride, "stride", 1);
  pair(padding, "padding", 0);
  pair(dilation, "dilation", 1);
  TORCH_CHECK_VALUE(2 * padding[0] <= kernel_size[0] && 2 * padding[1] <= kernel_size[1], op, ": ", prefix,
                    "padding must be at most half of ", prefix, "kernel_size (as in torch's max_pool2d), got ", prefix,
                    "padding ", padding, " for ", prefix, "kernel_size ", kernel_size);
  return {{kernel_size[0], stride[0], padding[0], dilation[0]}, {kernel_size[1], stride[1], padding[1], dilation[1]}};
}

// The kernel taps of one dimension an output reads inside the input: k in [begin, end) with
// 0 <= window.first(o) + k * dilation < size.
struct PoolTaps {
  int64_t begin, end;
  static PoolTaps of(const PoolWindow& window, int64_t o, int64_t size) {
    const int64_t first = window.first(o);
    int64_t begin = 0, end = window.kernel;
    while (begin < end && first + begin * window.dilation < 0) ++begin;
    while (end > begin && first + (end - 1) * window.dilation >= size) --end;
    return {begin, end};
  }
};

// dst[o] = the maximum of row[window.first(o) + k * dilation] over k < kernel, for the outputs o in `interior`
// (windows wholly in the row): kernel tap by tap, each a pass over the outputs with a constant stride, which the
// compiler vectorises where the stride is known (1 and 2, the common pools, are instantiated).
template <int64_t kStride, typename T>
inline void interior_max_strided(const T* row, T* dst, OutputRange interior, const PoolWindow& window,
                                 int64_t stride) {
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
inline void interior_max(const T* row, T* dst, OutputRange interior, const PoolWindow& window) {
  if (interior.begin >= interior.end) return;
  if (window.stride == 1) return interior_max_strided<1>(row, dst, interior, window, 1);
  if (window.stride == 2) return interior_max_strided<2>(row, dst, interior, window, 2);
  interior_max_strided<0>(row, dst, interior, window, window.stride);
}

// Output row oh of one plane (in_h rows of in_w values, `row_stride` apart) into dst [out_w]: the window maximum
// along the elementwise maximum of the input rows it reads (`rows`, scratch of in_w values), each value clamped at 0
// first where kRelu (the convolution's relu epilogue). `interior` = pool.w.interior(in_w, out_w).
template <bool kRelu, typename T>
inline void pool_output_row(const T* in, int64_t row_stride, int64_t in_h, int64_t in_w, int64_t oh, const Pool& pool,
                            OutputRange interior, T* rows, T* dst, int64_t out_w) {
  const PoolTaps taps_h = PoolTaps::of(pool.h, oh, in_h);
  if (taps_h.begin == taps_h.end) {
    std::fill(dst, dst + out_w, lowest<T>());
    return;
  }
  const T* top = in + (pool.h.first(oh) + taps_h.begin * pool.h.dilation) * row_stride;
  for (int64_t iw = 0; iw < in_w; ++iw) rows[iw] = kRelu ? relu_of(top[iw]) : top[iw];
  for (int64_t kh = taps_h.begin + 1; kh < taps_h.end; ++kh) {
    const T* src = top + (kh - taps_h.begin) * pool.h.dilation * row_stride;
    for (int64_t iw = 0; iw < in_w; ++iw) rows[iw] = nan_max(rows[iw], kRelu ? relu_of(src[iw]) : src[iw]);
  }
  for (int64_t ow = 0; ow < out_w; ++ow) {  // the edges, where windows reach into the padding
    if (ow == interior.begin) ow = interior.end;
    if (ow >= out_w) break;
    const PoolTaps taps_w = PoolTaps::of(pool.w, ow, in_w);
    const T* window = rows + pool.w.first(ow);
    T value = lowest<T>();
    for (int64_t kw = taps_w.begin; kw < taps_w.end; ++kw) value = nan_max(value, window[kw * pool.w.dilation]);
    dst[ow] = value;
  }
  interior_max(rows, dst, interior, pool.w);
}

}  // namespace ptd_sparse
