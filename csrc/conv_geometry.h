// Geometry of a 2-D convolution shared by every compiled backend: sizes, and for one kernel tap (kh, kw) the range
// of output positions whose input position falls inside the (unpadded) image. Iterating only over that range is how
// the sparse kernels implement zero padding without materialising a padded copy of the input.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

namespace ptd_sparse {

struct ConvGeometry {
  int64_t batch, in_channels, in_h, in_w;
  int64_t out_channels, kernel_h, kernel_w;
  int64_t out_h, out_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;

  int64_t taps() const { return kernel_h * kernel_w; }
  int64_t in_plane() const { return in_h * in_w; }
  int64_t out_plane() const { return out_h * out_w; }
};

// Whether a convolution's input is laid out channels_last: NHWC-contiguous and not also NCHW-contiguous (as 1x1 maps
// and single channels are). Its forward output is then channels_last too, as F.conv2d's is, on every backend (the
// fake kernels decide the same way: ptd_sparse/conv_geometry.py, output_memory_format).
inline bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::MemoryFormat output_memory_format(const at::Tensor& input) {
  return is_channels_last(input) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// Half-open range [begin, end) of output coordinates o with 0 <= o * stride + offset < in_size, clipped to
// [0, out_size). offset = tap * dilation - padding.
struct OutputRange {
  int64_t begin, end;
};

#if defined(__CUDACC__)
__host__ __device__
#endif
inline OutputRange valid_output_range(int64_t offset, int64_t stride, int64_t in_size, int64_t out_size) {
  int64_t begin = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  int64_t last_in = in_size - 1 - offset;  // largest o * stride allowed
  int64_t end = last_in < 0 ? 0 : last_in / stride + 1;
  if (end > out_size) end = out_size;
  if (begin > end) begin = end;
  return {begin, end};
}

// One nonzero's position in the weight, decoded from its CSR column (c_in * KH + kh) * KW + kw.
struct KernelTap {
  int64_t channel, kh, kw;
};

inline KernelTap decode_column(int32_t column, const ConvGeometry& g) {
  const int64_t tap = column % g.taps();
  return {column / g.taps(), tap / g.kernel_w, tap % g.kernel_w};
}

// Builds the geometry from the kernel-op arguments and checks everything a kernel relies on, with messages that
// name the argument. The public Python layer validates user input first; these checks guard direct calls.
inline ConvGeometry make_geometry(at::IntArrayRef input_shape, at::IntArrayRef weight_shape, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK_VALUE(input_shape.size() == 4, "input must be 4-D (N, C_in, H, W), got ", input_shape.size(), " dims");
  TORCH_CHECK_VALUE(weight_shape.size() == 4, "weight_shape must have 4 entries (C_out, C_in, KH, KW), got ",
                    weight_shape);
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    "stride, padding and dilation must have 2 entries each");
  // A zero kernel size would divide by zero when a column is decoded (column % (KH * KW)); a negative size is no
  // shape at all. Sizes of the input may be 0 (an empty batch); those of the weight may not.
  for (size_t i = 0; i < 4; ++i) {
    TORCH_CHECK_VALUE(weight_shape[i] >= 1, "weight_shape must be 4 positive sizes (C_out, C_in, KH, KW), got ",
                      weight_shape);
    TORCH_CHECK_VALUE(input_shape[i] >= 0, "input shape must have sizes >= 0, got ", input_shape);
  }
  TORCH_CHECK_VALUE(input_shape[1] == weight_shape[1], "input has ", input_shape[1],
                    " channels but weight_shape expects C_in = ", weight_shape[1]);
  TORCH_CHECK_VALUE(stride[0] >= 1 && stride[1] >= 1, "stride must be >= 1, got ", stride);
  TORCH_CHECK_VALUE(dilation[0] >= 1 && dilation[1] >= 1, "dilation must be >= 1, got ", dilation);
  TORCH_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0, "padding must be >= 0, got ", padding);
  ConvGeometry g{};
  g.batch = input_shape[0];
  g.in_channels = input_shape[1];
  g.in_h = input_shape[2];
  g.in_w = input_shape[3];
  g.out_channels = weight_shape[0];
  g.kernel_h = weight_shape[2];
  g.kernel_w = weight_shape[3];
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dil_h = dilation[0];
  g.dil_w = dilation[1];
  // The dilated kernel must fit the padded input, as F.conv2d requires. Checked before dividing: C++ division rounds
  // toward zero, so a negative numerator (kernel larger than the padded input) would give an output size of 1.
  const int64_t span_h = g.dil_h * (g.kernel_h - 1) + 1;
  const int64_t span_w = g.dil_w * (g.kernel_w - 1) + 1;
  TORCH_CHECK_VALUE(g.in_h + 2 * g.pad_h >= span_h && g.in_w + 2 * g.pad_w >= span_w, "input of size ", input_shape,
                    " with padding ", padding, " is smaller than the dilated kernel (", span_h, " x ", span_w,
                    ") of weight ", weight_shape, " with dilation ", dilation, "; the output would be empty");
  g.out_h = (g.in_h + 2 * g.pad_h - span_h) / g.stride_h + 1;
  g.out_w = (g.in_w + 2 * g.pad_w - span_w) / g.stride_w + 1;
  return g;
}

// grad_output of a convolution of geometry g: [N, C_out, OH, OW]. The kernels index it by those sizes.
inline void check_grad_output(const at::Tensor& grad_output, const ConvGeometry& g) {
  TORCH_CHECK_VALUE(grad_output.dim() == 4 && grad_output.size(0) == g.batch && grad_output.size(1) == g.out_channels &&
                        grad_output.size(2) == g.out_h && grad_output.size(3) == g.out_w,
                    "grad_output has shape ", grad_output.sizes(), ", expected [", g.batch, ", ", g.out_channels, ", ",
                    g.out_h, ", ", g.out_w, "]");
}

}  // namespace ptd_sparse
