// CPU kernels of the masked sparse convolution: forward, backward-data and backward-weight (at the nonzeros only).
//
// Direct sparse convolution: every nonzero weight w[co, ci, kh, kw] adds w * (a shifted window of input plane ci) to
// output plane co. Work is nnz * N * OH * OW multiply-adds, proportional to the nonzeros; nothing dense is built.
// Each parallel task owns one output plane (forward) or one input-gradient plane (backward-data), so no two threads
// write the same memory and no atomics are needed. Sums are accumulated in at::opmath_type (float for half/bfloat16).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

#include "../conv_geometry.h"
#include "../csr_checks.h"
#include "huge_pages.h"
#include "isa/dispatch.h"

namespace ptd_sparse {
namespace {

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

// col_idx as int32: the compact int16 form (check_column_tensor) is read by the float32 forward kernels only; the
// generic loops and the backward kernels (training, which holds the int32 form) get it widened, once per call.
at::Tensor int32_columns(const at::Tensor& col_idx) {
  return col_idx.scalar_type() == at::kInt ? col_idx.contiguous() : col_idx.to(at::kInt).contiguous();
}

// float32 goes through the fast paths of csrc/cpu/conv_f32.h, in the copy for the best instruction set this CPU has
// (csrc/cpu/isa/dispatch.h); other dtypes, and geometries those paths decline, use the generic loops above.

// The forward's operands, checked (each error names the argument) and made contiguous; bias undefined when absent.
struct ForwardOperands {
  ConvGeometry g;
  at::Tensor vals, rp, ci, bias;
};

ForwardOperands checked_forward_operands(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_ptr,
                                         const at::Tensor& col_idx, at::IntArrayRef weight_shape,
                                         const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation) {
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
  return {g, values.contiguous(), row_ptr.contiguous(), col_idx.contiguous(), bias_c};
}

// The forward of checked operands.
at::Tensor forward_checked(const at::Tensor& input, const ForwardOperands& operands, bool relu) {
  const ConvGeometry& g = operands.g;
  const at::Tensor &vals = operands.vals, &rp = operands.rp, &ci = operands.ci, &bias_c = operands.bias;
  // The output takes the input's layout (channels_last in, channels_last out); the float32 kernels read and write
  // NHWC directly, the generic loops below run NCHW and the result is copied.
  const at::MemoryFormat format = output_memory_format(input);
  at::Tensor out = cpu_isa::output_tensor({g.batch, g.out_channels, g.out_h, g.out_w},
                                          input.options().memory_format(format));
  if (out.numel() == 0) return out;
  if (ci.numel() == 0) {
    // No nonzeros (global pruning empties whole layers: the 512-channel layers of VGG19 at 95%): the output is the
    // bias, relu'd, and the input is never read, where the kernels below would still pack it.
    if (bias_c.defined())
      out.copy_((relu ? bias_c.clamp_min(0) : bias_c).view({1, g.out_channels, 1, 1}).expand_as(out));
    else
      out.zero_();
    return out;
  }
  const bool f32 = input.scalar_type() == at::kFloat;
  const float* bias_f32 = f32 && bias_c.defined() ? bias_c.const_data_ptr<float>() : nullptr;
  if (f32 && cpu_isa::f32_kernels().conv_forward(input.contiguous(format), vals, rp, ci, bias_f32, relu, g, out))
    return out;
  const at::Tensor x = input.contiguous();
  at::Tensor nchw_out = format == at::MemoryFormat::Contiguous ? out : at::empty(out.sizes(), input.options());
  const at::Tensor columns = int32_columns(ci);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "conv_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* v_ptr = vals.const_data_ptr<scalar_t>();
    const scalar_t* b_ptr = bias_c.defined() ? bias_c.const_data_ptr<scalar_t>() : nullptr;
    const int32_t* rp_ptr = rp.const_data_ptr<int32_t>();
    const int32_t* ci_ptr = columns.const_data_ptr<int32_t>();
    scalar_t* out_ptr = nchw_out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.batch * g.out_channels, plane_grain(g.out_plane()), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(g.out_plane());
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / g.out_channels, co = task % g.out_channels;
        std::fill(acc.begin(), acc.end(), b_ptr ? static_cast<acc_t>(b_ptr[co]) : acc_t(0));
        const scalar_t* image = x_ptr + n * g.in_channels * g.in_plane();
        for (int32_t e = rp_ptr[co]; e < rp_ptr[co + 1]; ++e) {
          const KernelTap tap = decode_column(ci_ptr[e], g);
          axpy_window(acc.data(), image + tap.channel * g.in_plane(), static_cast<acc_t>(v_ptr[e]), g,
                      tap.kh * g.dil_h - g.pad_h, tap.kw * g.dil_w - g.pad_w);
        }
        scalar_t* dst = out_ptr + task * g.out_plane();
        for (int64_t i = 0; i < g.out_plane(); ++i)
          dst[i] = static_cast<scalar_t>(relu ? std::max(acc[i], acc_t(0)) : acc[i]);
      }
    });
  });
  if (!nchw_out.is_same(out)) out.copy_(nchw_out);
  return out;
}

at::Tensor conv_forward_cpu(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_ptr,
                            const at::Tensor& col_idx, at::IntArrayRef weight_shape,
                            const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, bool relu) {
  return forward_checked(
      input, checked_forward_operands(input, values, row_ptr, col_idx, weight_shape, bias, stride, padding, dilation),
      relu);
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
  check_column_tensor(col_idx);
  const at::Tensor cols = int32_columns(col_idx);
  check_transposed(cols, t_ptr, t_rows, t_perm, g);
  check_values(values, cols, grad_output, "grad_output");
  const at::Tensor go = grad_output.contiguous();
  const at::Tensor vals = values.contiguous();
  const at::Tensor tp = t_ptr.contiguous(), tr = t_rows.contiguous(), tperm = t_perm.contiguous();
  at::Tensor grad_input = at::empty({g.batch, g.in_channels, g.in_h, g.in_w}, grad_output.options());
  advise_huge_pages(grad_input);
  if (grad_input.numel() == 0) return grad_input;
  if (cols.numel() == 0) return grad_input.zero_();  // no nonzeros: nothing reaches the input
  if (go.scalar_type() == at::kFloat &&
      cpu_isa::f32_kernels().conv_backward_input(go, vals, cols, tp, tr, tperm, g, grad_input))
    return grad_input;

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
          const KernelTap tap = decode_column(col_ptr[e], g);
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
  const at::Tensor rp = row_ptr.contiguous(), cols = int32_columns(col_idx);
  const int64_t nnz = cols.numel();
  at::Tensor grad_values = at::empty({nnz}, input.options());
  if (nnz == 0) return grad_values;
  if (g.batch == 0) return grad_values.zero_();
  if (x.scalar_type() == at::kFloat && cpu_isa::f32_kernels().conv_backward_values(go, x, rp, cols, g, grad_values))
    return grad_values;

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
        const KernelTap tap = decode_column(col_ptr[e], g);
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

// conv_forward, then max_pool2d(pool_kernel, pool_stride, pool_padding, pool_dilation) of its output, in one call
// (an inference SparseConv2d whose output only a max-pool reads: ptd_sparse.sparsify). float32 forwards whose layout
// can pool in its epilogue (csrc/cpu/conv_f32.h, fuses_max_pool_f32: the wide layout, the tiled layout's row-pair
// tiles) never write the full-size output; every other call runs the two operators one after the other. The values
// are the same either way.
at::Tensor conv_forward_max_pool_cpu(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_ptr,
                                     const at::Tensor& col_idx, at::IntArrayRef weight_shape,
                                     const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation, bool relu,
                                     at::IntArrayRef pool_kernel, at::IntArrayRef pool_stride,
                                     at::IntArrayRef pool_padding, at::IntArrayRef pool_dilation) {
  const ForwardOperands operands =
      checked_forward_operands(input, values, row_ptr, col_idx, weight_shape, bias, stride, padding, dilation);
  const ConvGeometry& g = operands.g;
  const at::Tensor &vals = operands.vals, &rp = operands.rp, &ci = operands.ci, &bias_c = operands.bias;
  const Pool pool = checked_pool(pool_kernel, pool_stride, pool_padding, pool_dilation, "conv_forward_max_pool",
                                 "pool_");
  const int64_t out_h = pool.h.out_size(g.out_h), out_w = pool.w.out_size(g.out_w);
  TORCH_CHECK_VALUE(out_h >= 1 && out_w >= 1, "conv_forward_max_pool: the convolution's ", g.out_h, "x", g.out_w,
                    " output is smaller than the pool's window (pool_kernel_size ", pool_kernel, ", pool_dilation ",
                    pool_dilation, ", pool_padding ", pool_padding, ")");
  if (input.scalar_type() == at::kFloat && g.batch > 0 && g.out_channels > 0 && ci.numel() > 0 &&
      cpu_isa::f32_kernels().fuses_max_pool(g, ci.numel(), pool)) {
    // The layout the two operators would give: the convolution's output takes the input's, the pool its input's.
    const at::MemoryFormat conv_format = output_memory_format(input);
    const at::Tensor conv_like = at::empty({g.batch, g.out_channels, g.out_h, g.out_w},
                                           input.options().device(at::kMeta).memory_format(conv_format));
    at::Tensor out = cpu_isa::output_tensor({g.batch, g.out_channels, out_h, out_w},
                                            input.options().memory_format(output_memory_format(conv_like)));
    const float* bias_f32 = bias_c.defined() ? bias_c.const_data_ptr<float>() : nullptr;
    const bool fused = cpu_isa::f32_kernels().conv_forward_max_pool(input.contiguous(conv_format), vals, rp, ci,
                                                                     bias_f32, relu, g, pool, out);
    TORCH_CHECK(fused, "conv_forward_max_pool: the kernel declined a pool that fuses_max_pool accepted");
    return out;
  }
  static auto max_pool2d = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("ptd_sparse_kernels::max_pool2d", "")
                               .typed<at::Tensor(const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                                 at::IntArrayRef)>();
  return max_pool2d.call(forward_checked(input, operands, relu), pool_kernel, pool_stride, pool_padding,
                         pool_dilation);
}

}  // namespace

TORCH_LIBRARY_IMPL(ptd_sparse_kernels, CPU, m) {
  m.impl("conv_forward", &conv_forward_cpu);
  m.impl("conv_forward_max_pool", &conv_forward_max_pool_cpu);
  m.impl("conv_backward_input", &conv_backward_input_cpu);
  m.impl("conv_backward_values", &conv_backward_values_cpu);
}

}  // namespace ptd_sparse
