// CPU kernels of the masked sparse convolution: forward, backward-data and backward-weight (at the nonzeros only).
//
// Direct sparse convolution: every nonzero weight w[co, ci, kh, kw] adds w * (a shifted window of input plane ci) to
// output plane co. Work is nnz * N * OH * OW multiply-adds, proportional to the nonzeros; nothing dense is built.
// Each parallel task owns one output plane (forward) or one input-gradient plane (backward-data), so no two threads
// write the same memory and no atomics are needed. Sums are accumulated in at::opmath_type (float for half/bfloat16).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

#include "../conv_geometry.h"
#include "../csr_checks.h"
#include "wide_conv_f32.h"

namespace ptd_sparse {
namespace {

struct Tap {
  int64_t channel, kh, kw;
};

inline Tap decode_column(int32_t column, const ConvGeometry& g) {
  const int64_t tap = column % g.taps();
  return {column / g.taps(), tap / g.kernel_w, tap % g.kernel_w};
}

// acc[o_h, o_w] += weight * src[o_h * stride_h + off_h, o_w * stride_w + off_w] over the valid output window.
template <typename acc_t, typename scalar_t>
inline void axpy_window(acc_t* acc, const scalar_t* src, acc_t weight, const ConvGeometry& g, int64_t off_h,
                        int64_t off_w) {
  const OutputRange rows = valid_output_range(off_h, g.stride_h, g.in_h, g.out_h);
  const OutputRange cols = valid_output_range(off_w, g.stride_w, g.in_w, g.out_w);
  for (int64_t oh = rows.begin; oh < rows.end; ++oh) {
    acc_t* out_row = acc + oh * g.out_w;
    const scalar_t* in_row = src + (oh * g.stride_h + off_h) * g.in_w + off_w;
    if (g.stride_w == 1) {
      for (int64_t ow = cols.begin; ow < cols.end; ++ow) out_row[ow] += weight * static_cast<acc_t>(in_row[ow]);
    } else {
      for (int64_t ow = cols.begin; ow < cols.end; ++ow)
        out_row[ow] += weight * static_cast<acc_t>(in_row[ow * g.stride_w]);
    }
  }
}

// The transpose of axpy_window: acc[i_h, i_w] += weight * src[o_h, o_w] where i = o * stride + off.
template <typename acc_t, typename scalar_t>
inline void scatter_window(acc_t* acc, const scalar_t* src, acc_t weight, const ConvGeometry& g, int64_t off_h,
                           int64_t off_w) {
  const OutputRange rows = valid_output_range(off_h, g.stride_h, g.in_h, g.out_h);
  const OutputRange cols = valid_output_range(off_w, g.stride_w, g.in_w, g.out_w);
  for (int64_t oh = rows.begin; oh < rows.end; ++oh) {
    acc_t* in_row = acc + (oh * g.stride_h + off_h) * g.in_w + off_w;
    const scalar_t* out_row = src + oh * g.out_w;
    if (g.stride_w == 1) {
      for (int64_t ow = cols.begin; ow < cols.end; ++ow) in_row[ow] += weight * static_cast<acc_t>(out_row[ow]);
    } else {
      for (int64_t ow = cols.begin; ow < cols.end; ++ow)
        in_row[ow * g.stride_w] += weight * static_cast<acc_t>(out_row[ow]);
    }
  }
}

// sum over the valid window of a[o_h, o_w] * b[o_h * stride_h + off_h, o_w * stride_w + off_w].
template <typename acc_t, typename scalar_t>
inline acc_t dot_window(const scalar_t* a, const scalar_t* b, const ConvGeometry& g, int64_t off_h, int64_t off_w) {
  const OutputRange rows = valid_output_range(off_h, g.stride_h, g.in_h, g.out_h);
  const OutputRange cols = valid_output_range(off_w, g.stride_w, g.in_w, g.out_w);
  acc_t sum = 0;
  for (int64_t oh = rows.begin; oh < rows.end; ++oh) {
    const scalar_t* a_row = a + oh * g.out_w;
    const scalar_t* b_row = b + (oh * g.stride_h + off_h) * g.in_w + off_w;
    for (int64_t ow = cols.begin; ow < cols.end; ++ow)
      sum += static_cast<acc_t>(a_row[ow]) * static_cast<acc_t>(b_row[ow * g.stride_w]);
  }
  return sum;
}

// Enough planes per task that scheduling overhead stays small for tiny feature maps.
inline int64_t plane_grain(int64_t plane_size) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, plane_size)); }

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor for the cpu backend, got ", t.device());
}

// ---- float32 fast paths (wide_conv_f32.h); other dtypes and unsupported geometries use the generic loops above.

// Packed-image offset of every weight column (c_in, kh, kw) for either packing (wide::PackedGeometry or
// batch_inner::Geometry), tap (kh, kw) flipped when `flipped` (the data gradient's kernel) and the channel term left
// out when `without_channel`. A table of C_in * KH * KW entries built per call makes each nonzero's tap one load:
// decoding every column with three integer divisions cost more than the arithmetic itself at batch 1, where each
// tap is applied to a few dozen outputs only.
template <typename Packing>
std::vector<int32_t> column_offsets(const ConvGeometry& g, const Packing& p, bool flipped, bool without_channel) {
  std::vector<int32_t> table(g.in_channels * g.taps());
  for (int64_t c = 0; c < g.in_channels; ++c)
    for (int64_t kh = 0; kh < g.kernel_h; ++kh)
      for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
        const int64_t th = (flipped ? g.kernel_h - 1 - kh : kh) * g.dil_h;
        const int64_t tw = (flipped ? g.kernel_w - 1 - kw : kw) * g.dil_w;
        table[(c * g.kernel_h + kh) * g.kernel_w + kw] = p.tap_offset(without_channel ? 0 : c, th, tw);
      }
  return table;
}

// The CSR taps as (offset into one packed image, value); values may be null when only the offsets are needed.
template <typename Packing>
std::vector<wide::Tap> csr_taps(const float* values, const int32_t* col_idx, int64_t nnz, const ConvGeometry& g,
                                const Packing& p) {
  const std::vector<int32_t> offsets = column_offsets(g, p, false, false);
  std::vector<wide::Tap> taps(nnz);
  for (int64_t e = 0; e < nnz; ++e) taps[e] = {offsets[col_idx[e]], values ? values[e] : 0.0f};
  return taps;
}

// The data gradient of a stride-1 convolution is a convolution of grad_output with the transposed, flipped kernel
// and padding (K - 1) * dilation - padding; its rows are the transposed pattern's input channels and its channels
// the output channels (t_rows). Packed offsets are linear in the channel, so a tap is the flipped (kh, kw) term from
// the table plus the output channel's stride.
template <typename Packing>
std::vector<wide::Tap> transposed_flipped_taps(const at::Tensor& vals, const at::Tensor& cols, const at::Tensor& tr,
                                               const at::Tensor& tperm, const ConvGeometry& g, const Packing& p) {
  const float* v_ptr = vals.const_data_ptr<float>();
  const int32_t* col_ptr = cols.const_data_ptr<int32_t>();
  const int32_t* tr_ptr = tr.const_data_ptr<int32_t>();
  const int32_t* perm_ptr = tperm.const_data_ptr<int32_t>();
  const std::vector<int32_t> spatial = column_offsets(g, p, true, true);
  const int64_t channel_stride = p.tap_offset(1, 0, 0);
  std::vector<wide::Tap> taps(vals.numel());
  for (int64_t j = 0; j < vals.numel(); ++j) {
    const int32_t e = perm_ptr[j];
    taps[j] = {static_cast<int32_t>(tr_ptr[j] * channel_stride + spatial[col_ptr[e]]), v_ptr[e]};
  }
  return taps;
}

int64_t data_grad_pad_h(const ConvGeometry& g) { return (g.kernel_h - 1) * g.dil_h - g.pad_h; }
int64_t data_grad_pad_w(const ConvGeometry& g) { return (g.kernel_w - 1) * g.dil_w - g.pad_w; }

wide::PackedGeometry input_packing(const ConvGeometry& g) {
  return wide::packed_geometry(g.in_channels, g.in_h, g.in_w, g.pad_h, g.pad_w, g.stride_h, g.stride_w, g.out_h,
                               g.out_w);
}

// Small feature maps with enough images go batch-innermost (see batch_inner in wide_conv_f32.h); the threshold is
// where the wide layout's discarded columns start to dominate (bench/bench_sparse_conv2d.py).
constexpr int64_t kBatchInnerMaxPositions = 64;
constexpr int64_t kBatchInnerMinBatch = 16;

batch_inner::Geometry batch_inner_packing(const ConvGeometry& g) {
  return {g.in_channels, g.in_h + 2 * g.pad_h, g.in_w + 2 * g.pad_w};
}

bool use_batch_inner(const ConvGeometry& g) {
  return g.out_h * g.out_w <= kBatchInnerMaxPositions && g.batch >= kBatchInnerMinBatch &&
         batch_inner::fits_int32(batch_inner_packing(g));
}

void conv_forward_batch_inner_f32(const at::Tensor& x, const at::Tensor& vals, const at::Tensor& rp,
                                  const at::Tensor& cols, const float* bias, bool relu, const ConvGeometry& g,
                                  at::Tensor& out) {
  const batch_inner::Geometry p = batch_inner_packing(g);
  const at::Tensor packed =
      batch_inner::pack(x.const_data_ptr<float>(), g.batch, g.in_h, g.in_w, g.pad_h, g.pad_w, p);
  const auto taps = csr_taps(vals.const_data_ptr<float>(), cols.const_data_ptr<int32_t>(), vals.numel(), g, p);
  batch_inner::sparse_rows(packed.const_data_ptr<float>(), p, taps, rp.const_data_ptr<int32_t>(), g.out_channels,
                           g.batch, g.out_h, g.out_w, g.stride_h, g.stride_w, bias, relu,
                           out.mutable_data_ptr<float>());
}

// Data gradient, batch-innermost: the flipped transposed kernel over grad_output padded by (K - 1) * dilation - pad.
void conv_backward_input_batch_inner_f32(const at::Tensor& go, const at::Tensor& vals, const at::Tensor& cols,
                                         const at::Tensor& tp, const at::Tensor& tr, const at::Tensor& tperm,
                                         const ConvGeometry& g, at::Tensor& grad_input) {
  const int64_t pad_h = data_grad_pad_h(g), pad_w = data_grad_pad_w(g);
  const batch_inner::Geometry p{g.out_channels, g.out_h + 2 * pad_h, g.out_w + 2 * pad_w};
  const at::Tensor packed = batch_inner::pack(go.const_data_ptr<float>(), g.batch, g.out_h, g.out_w, pad_h, pad_w, p);
  const auto taps = transposed_flipped_taps(vals, cols, tr, tperm, g, p);
  batch_inner::sparse_rows(packed.const_data_ptr<float>(), p, taps, tp.const_data_ptr<int32_t>(), g.in_channels,
                           g.batch, g.in_h, g.in_w, 1, 1, nullptr, false, grad_input.mutable_data_ptr<float>());
}

void conv_backward_values_batch_inner_f32(const at::Tensor& go, const at::Tensor& x, const at::Tensor& rp,
                                          const at::Tensor& cols, const ConvGeometry& g, at::Tensor& grad_values) {
  const batch_inner::Geometry p = batch_inner_packing(g);
  const at::Tensor packed_x =
      batch_inner::pack(x.const_data_ptr<float>(), g.batch, g.in_h, g.in_w, g.pad_h, g.pad_w, p);
  const at::Tensor packed_go = batch_inner::pack(go.const_data_ptr<float>(), g.batch, g.out_h, g.out_w, 0, 0,
                                                 {g.out_channels, g.out_h, g.out_w});
  const auto taps = csr_taps(nullptr, cols.const_data_ptr<int32_t>(), grad_values.numel(), g, p);  // offsets only
  batch_inner::grad_values(packed_x.const_data_ptr<float>(), p, packed_go.const_data_ptr<float>(), taps,
                           rp.const_data_ptr<int32_t>(), g.out_channels, g.batch, g.out_h, g.out_w, g.stride_h,
                           g.stride_w, grad_values.mutable_data_ptr<float>());
}

void conv_forward_f32(const at::Tensor& x, const at::Tensor& vals, const at::Tensor& rp, const at::Tensor& cols,
                      const float* bias, bool relu, const ConvGeometry& g, at::Tensor& out) {
  if (use_batch_inner(g)) return conv_forward_batch_inner_f32(x, vals, rp, cols, bias, relu, g, out);
  const wide::PackedGeometry p = input_packing(g);
  const at::Tensor packed = wide::pack_images(x.const_data_ptr<float>(), g.batch, g.in_h, g.in_w, g.pad_h, g.pad_w, p);
  const auto taps = csr_taps(vals.const_data_ptr<float>(), cols.const_data_ptr<int32_t>(), vals.numel(), g, p);
  wide::sparse_rows(packed.const_data_ptr<float>(), p, taps, rp.const_data_ptr<int32_t>(), g.out_channels, g.batch,
                    bias, relu, out.mutable_data_ptr<float>());
}

wide::PackedGeometry grad_output_packing(const ConvGeometry& g) {
  return wide::packed_geometry(g.out_channels, g.out_h, g.out_w, data_grad_pad_h(g), data_grad_pad_w(g), 1, 1,
                               g.in_h, g.in_w);
}

bool backward_input_is_wide(const ConvGeometry& g) {
  return g.stride_h == 1 && g.stride_w == 1 && data_grad_pad_h(g) >= 0 && data_grad_pad_w(g) >= 0 &&
         wide::fits_int32(grad_output_packing(g));
}

void conv_backward_input_f32(const at::Tensor& go, const at::Tensor& vals, const at::Tensor& cols,
                             const at::Tensor& tp, const at::Tensor& tr, const at::Tensor& tperm,
                             const ConvGeometry& g, at::Tensor& grad_input) {
  const wide::PackedGeometry p = grad_output_packing(g);
  const at::Tensor packed = wide::pack_images(go.const_data_ptr<float>(), g.batch, g.out_h, g.out_w,
                                              data_grad_pad_h(g), data_grad_pad_w(g), p);
  const auto taps = transposed_flipped_taps(vals, cols, tr, tperm, g, p);
  wide::sparse_rows(packed.const_data_ptr<float>(), p, taps, tp.const_data_ptr<int32_t>(), g.in_channels, g.batch,
                    nullptr, false, grad_input.mutable_data_ptr<float>());
}

// grad_values[e] = sum over images of <grad_output plane of e's row, the input window of e's tap>, both laid out wide.
void conv_backward_values_f32(const at::Tensor& go, const at::Tensor& x, const at::Tensor& rp, const at::Tensor& cols,
                              const ConvGeometry& g, at::Tensor& grad_values) {
  const wide::PackedGeometry p = input_packing(g);
  const at::Tensor packed = wide::pack_images(x.const_data_ptr<float>(), g.batch, g.in_h, g.in_w, g.pad_h, g.pad_w, p);
  const int64_t length = p.wide_length();
  // grad_output in the wide layout, zero in the discarded columns so they add nothing.
  at::Tensor go_wide = at::empty({g.batch * g.out_channels, length}, go.options());
  const float* go_ptr = go.const_data_ptr<float>();
  float* wide_ptr = go_wide.mutable_data_ptr<float>();
  at::parallel_for(0, g.batch * g.out_channels, 16, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      float* dst = wide_ptr + plane * length;
      std::fill(dst, dst + length, 0.0f);
      for (int64_t oh = 0; oh < g.out_h; ++oh)
        std::memcpy(dst + oh * p.cols, go_ptr + (plane * g.out_h + oh) * g.out_w, g.out_w * sizeof(float));
    }
  });
  const int64_t nnz = grad_values.numel();
  const auto taps = csr_taps(nullptr, cols.const_data_ptr<int32_t>(), nnz, g, p);  // offsets only
  const int32_t* rp_ptr = rp.const_data_ptr<int32_t>();
  const float* packed_ptr = packed.const_data_ptr<float>();
  float* gv_ptr = grad_values.mutable_data_ptr<float>();
  // Each task owns a range of output channels (so its entries); images run outermost inside it, so one packed
  // image stays in cache while every entry of the range reads it.
  at::parallel_for(0, g.out_channels, 1, [&](int64_t begin, int64_t end) {
    std::fill(gv_ptr + rp_ptr[begin], gv_ptr + rp_ptr[end], 0.0f);
    for (int64_t n = 0; n < g.batch; ++n) {
      const float* image = packed_ptr + n * p.image();
      for (int64_t co = begin; co < end; ++co) {
        const float* grad_plane = wide_ptr + (n * g.out_channels + co) * length;
        for (int32_t e = rp_ptr[co]; e < rp_ptr[co + 1]; ++e)
          gv_ptr[e] += wide::dot(grad_plane, image + taps[e].offset, length);
      }
    }
  });
}

at::Tensor conv_forward_cpu(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_ptr,
                            const at::Tensor& col_idx, at::IntArrayRef weight_shape,
                            const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, bool relu) {
  for (auto [t, name] : {std::pair{&input, "input"}, {&values, "values"}, {&row_ptr, "row_ptr"}, {&col_idx, "col_idx"}})
    check_cpu(*t, name);
  const ConvGeometry g = make_geometry(input.sizes(), weight_shape, stride, padding, dilation);
  check_csr(row_ptr, col_idx, g);
  check_values(values, col_idx, input, "input");
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    check_cpu(*bias, "bias");
    TORCH_CHECK_VALUE(bias->numel() == g.out_channels && bias->scalar_type() == input.scalar_type(),
                      "bias must have C_out = ", g.out_channels, " entries of dtype ", input.scalar_type());
    bias_c = bias->contiguous();
  }
  const at::Tensor x = input.contiguous();
  const at::Tensor vals = values.contiguous();
  const at::Tensor rp = row_ptr.contiguous();
  const at::Tensor ci = col_idx.contiguous();
  at::Tensor out = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options());
  if (out.numel() == 0) return out;
  if (input.scalar_type() == at::kFloat && wide::fits_int32(input_packing(g))) {
    conv_forward_f32(x, vals, rp, ci, bias_c.defined() ? bias_c.const_data_ptr<float>() : nullptr, relu, g, out);
    return out;
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "conv_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* v_ptr = vals.const_data_ptr<scalar_t>();
    const scalar_t* b_ptr = bias_c.defined() ? bias_c.const_data_ptr<scalar_t>() : nullptr;
    const int32_t* rp_ptr = rp.const_data_ptr<int32_t>();
    const int32_t* ci_ptr = ci.const_data_ptr<int32_t>();
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.batch * g.out_channels, plane_grain(g.out_plane()), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(g.out_plane());
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / g.out_channels, co = task % g.out_channels;
        std::fill(acc.begin(), acc.end(), b_ptr ? static_cast<acc_t>(b_ptr[co]) : acc_t(0));
        const scalar_t* image = x_ptr + n * g.in_channels * g.in_plane();
        for (int32_t e = rp_ptr[co]; e < rp_ptr[co + 1]; ++e) {
          const Tap tap = decode_column(ci_ptr[e], g);
          axpy_window(acc.data(), image + tap.channel * g.in_plane(), static_cast<acc_t>(v_ptr[e]), g,
                      tap.kh * g.dil_h - g.pad_h, tap.kw * g.dil_w - g.pad_w);
        }
        scalar_t* dst = out_ptr + task * g.out_plane();
        for (int64_t i = 0; i < g.out_plane(); ++i)
          dst[i] = static_cast<scalar_t>(relu ? std::max(acc[i], acc_t(0)) : acc[i]);
      }
    });
  });
  return out;
}

at::Tensor conv_backward_input_cpu(const at::Tensor& grad_output, const at::Tensor& values, const at::Tensor& col_idx,
                                   const at::Tensor& t_ptr, const at::Tensor& t_rows, const at::Tensor& t_perm,
                                   at::IntArrayRef weight_shape, at::IntArrayRef input_shape, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation) {
  for (auto [t, name] : {std::pair{&grad_output, "grad_output"}, {&values, "values"}, {&col_idx, "col_idx"},
                         {&t_ptr, "t_ptr"}, {&t_rows, "t_rows"}, {&t_perm, "t_perm"}})
    check_cpu(*t, name);
  const ConvGeometry g = make_geometry(input_shape, weight_shape, stride, padding, dilation);
  check_grad_output(grad_output, g);
  check_transposed(col_idx, t_ptr, t_rows, t_perm, g);
  check_values(values, col_idx, grad_output, "grad_output");
  const at::Tensor go = grad_output.contiguous();
  const at::Tensor vals = values.contiguous(), cols = col_idx.contiguous();
  const at::Tensor tp = t_ptr.contiguous(), tr = t_rows.contiguous(), tperm = t_perm.contiguous();
  at::Tensor grad_input = at::empty({g.batch, g.in_channels, g.in_h, g.in_w}, grad_output.options());
  if (grad_input.numel() == 0) return grad_input;
  if (go.scalar_type() == at::kFloat && backward_input_is_wide(g)) {
    if (g.in_h * g.in_w <= kBatchInnerMaxPositions && use_batch_inner(g))
      conv_backward_input_batch_inner_f32(go, vals, cols, tp, tr, tperm, g, grad_input);
    else
      conv_backward_input_f32(go, vals, cols, tp, tr, tperm, g, grad_input);
    return grad_input;
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "conv_backward_input_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* go_ptr = go.const_data_ptr<scalar_t>();
    const scalar_t* v_ptr = vals.const_data_ptr<scalar_t>();
    const int32_t* col_ptr = cols.const_data_ptr<int32_t>();
    const int32_t* tp_ptr = tp.const_data_ptr<int32_t>();
    const int32_t* tr_ptr = tr.const_data_ptr<int32_t>();
    const int32_t* perm_ptr = tperm.const_data_ptr<int32_t>();
    scalar_t* gi_ptr = grad_input.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.batch * g.in_channels, plane_grain(g.in_plane()), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(g.in_plane());
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / g.in_channels, c = task % g.in_channels;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        const scalar_t* grad_image = go_ptr + n * g.out_channels * g.out_plane();
        for (int32_t j = tp_ptr[c]; j < tp_ptr[c + 1]; ++j) {
          const int32_t e = perm_ptr[j];
          const Tap tap = decode_column(col_ptr[e], g);
          scatter_window(acc.data(), grad_image + tr_ptr[j] * g.out_plane(), static_cast<acc_t>(v_ptr[e]), g,
                         tap.kh * g.dil_h - g.pad_h, tap.kw * g.dil_w - g.pad_w);
        }
        scalar_t* dst = gi_ptr + task * g.in_plane();
        for (int64_t i = 0; i < g.in_plane(); ++i) dst[i] = static_cast<scalar_t>(acc[i]);
      }
    });
  });
  return grad_input;
}

at::Tensor conv_backward_values_cpu(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& row_ptr,
                                    const at::Tensor& col_idx, at::IntArrayRef weight_shape, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation) {
  for (auto [t, name] : {std::pair{&grad_output, "grad_output"}, {&input, "input"}, {&row_ptr, "row_ptr"},
                         {&col_idx, "col_idx"}})
    check_cpu(*t, name);
  const ConvGeometry g = make_geometry(input.sizes(), weight_shape, stride, padding, dilation);
  // The fast paths write grad_values[row_ptr[begin] .. row_ptr[end]) and read grad_output planes by channel: a
  // corrupt row_ptr or a grad_output of another shape would be an out-of-bounds access.
  check_csr(row_ptr, col_idx, g);
  check_grad_output(grad_output, g);
  TORCH_CHECK_VALUE(grad_output.scalar_type() == input.scalar_type(), "grad_output dtype ", grad_output.scalar_type(),
                    " must match input dtype ", input.scalar_type());
  const at::Tensor go = grad_output.contiguous(), x = input.contiguous();
  const at::Tensor rp = row_ptr.contiguous(), cols = col_idx.contiguous();
  const int64_t nnz = cols.numel();
  at::Tensor grad_values = at::empty({nnz}, input.options());
  if (nnz == 0) return grad_values;
  if (g.batch == 0) return grad_values.zero_();
  if (x.scalar_type() == at::kFloat && use_batch_inner(g)) {
    conv_backward_values_batch_inner_f32(go, x, rp, cols, g, grad_values);
    return grad_values;
  }
  if (x.scalar_type() == at::kFloat && wide::fits_int32(input_packing(g))) {
    conv_backward_values_f32(go, x, rp, cols, g, grad_values);
    return grad_values;
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_backward_values_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* go_ptr = go.const_data_ptr<scalar_t>();
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const int32_t* rp_ptr = rp.const_data_ptr<int32_t>();
    const int32_t* col_ptr = cols.const_data_ptr<int32_t>();
    scalar_t* gv_ptr = grad_values.mutable_data_ptr<scalar_t>();
    const int64_t work_per_entry = g.batch * g.out_plane();
    at::parallel_for(0, nnz, std::max<int64_t>(1, 16384 / work_per_entry), [&](int64_t begin, int64_t end) {
      // Row (output channel) of the first entry of this chunk; later rows follow by walking row_ptr.
      int64_t co = std::upper_bound(rp_ptr, rp_ptr + g.out_channels + 1, static_cast<int32_t>(begin)) - rp_ptr - 1;
      for (int64_t e = begin; e < end; ++e) {
        while (rp_ptr[co + 1] <= e) ++co;
        const Tap tap = decode_column(col_ptr[e], g);
        acc_t sum = 0;
        for (int64_t n = 0; n < g.batch; ++n) {
          sum += dot_window<acc_t>(go_ptr + (n * g.out_channels + co) * g.out_plane(),
                                   x_ptr + (n * g.in_channels + tap.channel) * g.in_plane(), g,
                                   tap.kh * g.dil_h - g.pad_h, tap.kw * g.dil_w - g.pad_w);
        }
        gv_ptr[e] = static_cast<scalar_t>(sum);
      }
    });
  });
  return grad_values;
}

}  // namespace

TORCH_LIBRARY_IMPL(ptd_sparse_kernels, CPU, m) {
  m.impl("conv_forward", &conv_forward_cpu);
  m.impl("conv_backward_input", &conv_backward_input_cpu);
  m.impl("conv_backward_values", &conv_backward_values_cpu);
}

}  // namespace ptd_sparse
