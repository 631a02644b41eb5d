// ptd_sparse_kernels::sparse_conv2d: the compiled backends' convolution as one differentiable, autocast-aware
// operator, registered entirely in C++ so that an eager call pays the dispatcher and nothing else.
//
// Dispatch keys, top to bottom (a call enters at the highest key its tensors carry):
//   AutocastCPU / AutocastCUDA  cast input, values and bias to the autocast dtype (the weight once per call, as
//                               F.conv2d does), then go on below autocast;
//   Autograd                    a torch::autograd::Function whose forward calls conv_forward and whose backward calls
//                               conv_backward_input / conv_backward_values, only for the gradients that are needed;
//   CPU / CUDA                  the forward kernel itself (conv_forward, by device).
// The fake (meta) implementation for torch.compile is registered in Python (ptd_sparse/native/sparse_conv2d.py).
#include <ATen/autocast_mode.h>
#include <torch/autograd.h>
#include <torch/extension.h>

namespace ptd_sparse {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor conv_forward(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_ptr,
                        const at::Tensor& col_idx, at::IntArrayRef weight_shape, const c10::optional<at::Tensor>& bias,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ptd_sparse_kernels::conv_forward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         at::IntArrayRef, const c10::optional<at::Tensor>&, at::IntArrayRef,
                                         at::IntArrayRef, at::IntArrayRef, bool)>();
  return op.call(input, values, row_ptr, col_idx, weight_shape, bias, stride, padding, dilation, relu);
}

at::Tensor conv_backward_input(const at::Tensor& grad_output, const at::Tensor& values, const at::Tensor& col_idx,
                               const at::Tensor& t_ptr, const at::Tensor& t_rows, const at::Tensor& t_perm,
                               at::IntArrayRef weight_shape, at::IntArrayRef input_shape, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ptd_sparse_kernels::conv_backward_input", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                                         at::IntArrayRef, at::IntArrayRef, at::IntArrayRef)>();
  return op.call(grad_output, values, col_idx, t_ptr, t_rows, t_perm, weight_shape, input_shape, stride, padding,
                 dilation);
}

at::Tensor conv_backward_values(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& row_ptr,
                                const at::Tensor& col_idx, at::IntArrayRef weight_shape, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ptd_sparse_kernels::conv_backward_values", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef)>();
  return op.call(grad_output, input, row_ptr, col_idx, weight_shape, stride, padding, dilation);
}

// The operator below autograd: the forward kernel.
at::Tensor sparse_conv2d_forward(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_ptr,
                                 const at::Tensor& col_idx, const at::Tensor& t_ptr, const at::Tensor& t_rows,
                                 const at::Tensor& t_perm, at::IntArrayRef weight_shape,
                                 const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  return conv_forward(input, values, row_ptr, col_idx, weight_shape, bias, stride, padding, dilation, relu);
}

class SparseConv2dFunction : public torch::autograd::Function<SparseConv2dFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& values,
                            const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& t_ptr,
                            const at::Tensor& t_rows, const at::Tensor& t_perm, at::IntArrayRef weight_shape,
                            const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, bool relu) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor out = conv_forward(input, values, row_ptr, col_idx, weight_shape, bias, stride, padding, dilation,
                                  relu);
    // With a fused ReLU the output is saved too: its sign masks the incoming gradient.
    ctx->save_for_backward({input, values, row_ptr, col_idx, t_ptr, t_rows, t_perm, relu ? out : at::Tensor()});
    ctx->saved_data["weight_shape"] = weight_shape.vec();
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &values = saved[1], &row_ptr = saved[2], &col_idx = saved[3];
    const at::Tensor &t_ptr = saved[4], &t_rows = saved[5], &t_perm = saved[6], &out = saved[7];
    const auto weight_shape = ctx->saved_data["weight_shape"].toIntVector();
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    at::Tensor grad_output = grad_outputs[0];
    if (out.defined()) grad_output = grad_output * out.gt(0);
    // Gradients arriving from .sum() are stride-0 expansions; the kernels read dense rows.
    grad_output = grad_output.contiguous();
    // Autograd edges are numbered over the tensor arguments that were given: input 0, values 1, the pattern's five
    // index tensors 2-6, bias 7.
    at::Tensor grad_input, grad_values, grad_bias;
    if (ctx->needs_input_grad(0))
      grad_input = conv_backward_input(grad_output, values, col_idx, t_ptr, t_rows, t_perm, weight_shape,
                                       input.sizes(), stride, padding, dilation);
    if (ctx->needs_input_grad(1))
      grad_values = conv_backward_values(grad_output, input, row_ptr, col_idx, weight_shape, stride, padding,
                                         dilation);
    if (has_bias && ctx->needs_input_grad(7)) grad_bias = grad_output.sum({0, 2, 3});
    // One entry per forward argument (13): input, values, the five index tensors, weight_shape, bias, stride,
    // padding, dilation, relu.
    return {grad_input, grad_values, {}, {}, {}, {}, {}, {}, grad_bias, {}, {}, {}, {}};
  }
};

at::Tensor sparse_conv2d_autograd(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_ptr,
                                  const at::Tensor& col_idx, const at::Tensor& t_ptr, const at::Tensor& t_rows,
                                  const at::Tensor& t_perm, at::IntArrayRef weight_shape,
                                  const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  return SparseConv2dFunction::apply(input, values, row_ptr, col_idx, t_ptr, t_rows, t_perm, weight_shape, bias,
                                     stride, padding, dilation, relu);
}

// Under torch.autocast the convolution runs in the autocast dtype, like F.conv2d: floating inputs of the autocast
// device are cast (float64 and other devices' tensors are left alone, as autocast does for its own ops), and the
// kernels accumulate in fp32.
template <c10::DeviceType device, c10::DispatchKey autocast_key>
at::Tensor sparse_conv2d_autocast(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_ptr,
                                  const at::Tensor& col_idx, const at::Tensor& t_ptr, const at::Tensor& t_rows,
                                  const at::Tensor& t_perm, at::IntArrayRef weight_shape,
                                  const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ptd_sparse_kernels::sparse_conv2d", "")
                       .typed<decltype(sparse_conv2d_forward)>();
  return op.call(at::autocast::cached_cast(dtype, input, device), at::autocast::cached_cast(dtype, values, device),
                 row_ptr, col_idx, t_ptr, t_rows, t_perm, weight_shape,
                 at::autocast::cached_cast(dtype, bias, device), stride, padding, dilation, relu);
}

}  // namespace

TORCH_LIBRARY_IMPL(ptd_sparse_kernels, CPU, m) { m.impl("sparse_conv2d", &sparse_conv2d_forward); }
TORCH_LIBRARY_IMPL(ptd_sparse_kernels, CUDA, m) { m.impl("sparse_conv2d", &sparse_conv2d_forward); }
TORCH_LIBRARY_IMPL(ptd_sparse_kernels, Autograd, m) { m.impl("sparse_conv2d", &sparse_conv2d_autograd); }
TORCH_LIBRARY_IMPL(ptd_sparse_kernels, AutocastCPU, m) {
  m.impl("sparse_conv2d", &sparse_conv2d_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}
TORCH_LIBRARY_IMPL(ptd_sparse_kernels, AutocastCUDA, m) {
  m.impl("sparse_conv2d", &sparse_conv2d_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}

}  // namespace ptd_sparse
