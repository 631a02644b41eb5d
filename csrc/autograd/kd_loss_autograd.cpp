// ptd_sparse_kernels::kd_loss_differentiable and kd_loss_topk_differentiable: the compiled backends' fused KD loss
// as differentiable, autocast-aware operators registered in C++, so that an eager call costs the kernel and the
// dispatcher, not a Python autograd layer.
//
// The kernels compute the loss and its gradient with respect to the student logits in one pass; the backward only
// scales that saved gradient by the incoming one (and returns it as it is for the usual scalar 1 of loss.backward()).
// Under torch.autocast the loss computes in fp32, like F.cross_entropy: a float16/bfloat16 student is cast to float32
// (the teacher is read in its own dtype by the kernels, which accumulate in fp32 anyway).
// The fake implementations for torch.compile are registered in Python (ptd_sparse/native/kd_loss.py).
#include <ATen/autocast_mode.h>
#include <torch/autograd.h>
#include <torch/extension.h>

#include "../kd_loss_checks.h"

namespace ptd_sparse {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using LossAndGrad = std::tuple<at::Tensor, at::Tensor>;

LossAndGrad dense_kernel(const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& target,
                         double temperature, double alpha, int64_t reduction, int64_t ignore_index,
                         bool compute_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ptd_sparse_kernels::kd_loss", "")
                       .typed<LossAndGrad(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                          double, double, int64_t, int64_t, bool)>();
  return op.call(student, teacher, target, temperature, alpha, reduction, ignore_index, compute_grad);
}

LossAndGrad topk_kernel(const at::Tensor& student, const at::Tensor& indices, const at::Tensor& teacher,
                        const at::Tensor& rest_mass, const c10::optional<at::Tensor>& target, double temperature,
                        double alpha, int64_t reduction, int64_t ignore_index, bool compute_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ptd_sparse_kernels::kd_loss_topk", "")
                       .typed<LossAndGrad(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const c10::optional<at::Tensor>&, double, double, int64_t, int64_t,
                                          bool)>();
  return op.call(student, indices, teacher, rest_mass, target, temperature, alpha, reduction, ignore_index,
                 compute_grad);
}

// Saves the kernel's gradient for backward and returns the loss.
at::Tensor keep_gradient(AutogradContext* ctx, LossAndGrad loss_and_grad, int64_t reduction) {
  ctx->save_for_backward({std::get<1>(loss_and_grad)});
  ctx->saved_data["reduction"] = reduction;
  return std::get<0>(loss_and_grad);
}

// d(loss)/d(student) = grad_loss * saved gradient (per row for reduction "none").
at::Tensor scaled_gradient(AutogradContext* ctx, const at::Tensor& grad_loss) {
  const at::Tensor saved = ctx->get_saved_variables()[0];
  if (ctx->saved_data["reduction"].toInt() == kNone) return saved * grad_loss.unsqueeze(1).to(saved.scalar_type());
  // loss.backward() passes a scalar 1 on the CPU: the saved gradient is the answer, with no second buffer. Reading the
  // value of a plain CPU scalar costs nothing; a GPU scalar is multiplied instead of being read (no synchronisation),
  // and so is a traced one (fake or functional tensors under torch.compile have no value to read).
  const bool plain_cpu_scalar = grad_loss.device().is_cpu() && grad_loss.dim() == 0 &&
                                !grad_loss.key_set().has_any(c10::DispatchKeySet(
                                    {c10::DispatchKey::Python, c10::DispatchKey::Functionalize}));
  if (plain_cpu_scalar && grad_loss.item<double>() == 1.0) return saved;
  return saved * grad_loss.to(saved.scalar_type());
}

class KDLossFunction : public torch::autograd::Function<KDLossFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                            const c10::optional<at::Tensor>& target, double temperature, double alpha,
                            int64_t reduction, int64_t ignore_index, bool compute_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto result = dense_kernel(student, teacher, target, temperature, alpha, reduction, ignore_index, compute_grad);
    return keep_gradient(ctx, std::move(result), reduction);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // Arguments: student, teacher, target, temperature, alpha, reduction, ignore_index, compute_grad; the teacher
    // never gets a gradient.
    return {scaled_gradient(ctx, grad_outputs[0]), {}, {}, {}, {}, {}, {}, {}};
  }
};

class KDLossTopKFunction : public torch::autograd::Function<KDLossTopKFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& indices,
                            const at::Tensor& teacher, const at::Tensor& rest_mass,
                            const c10::optional<at::Tensor>& target, double temperature, double alpha,
                            int64_t reduction, int64_t ignore_index, bool compute_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto result = topk_kernel(student, indices, teacher, rest_mass, target, temperature, alpha, reduction,
                              ignore_index, compute_grad);
    return keep_gradient(ctx, std::move(result), reduction);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return {scaled_gradient(ctx, grad_outputs[0]), {}, {}, {}, {}, {}, {}, {}, {}, {}};
  }
};

// Below autograd (inference, or no gradient wanted): the loss alone.
at::Tensor kd_loss_forward(const at::Tensor& student, const at::Tensor& teacher,
                           const c10::optional<at::Tensor>& target, double temperature, double alpha,
                           int64_t reduction, int64_t ignore_index) {
  return std::get<0>(dense_kernel(student, teacher, target, temperature, alpha, reduction, ignore_index, false));
}

at::Tensor kd_loss_topk_forward(const at::Tensor& student, const at::Tensor& indices, const at::Tensor& teacher,
                                const at::Tensor& rest_mass, const c10::optional<at::Tensor>& target,
                                double temperature, double alpha, int64_t reduction, int64_t ignore_index) {
  return std::get<0>(topk_kernel(student, indices, teacher, rest_mass, target, temperature, alpha, reduction,
                                 ignore_index, false));
}

at::Tensor kd_loss_autograd(const at::Tensor& student, const at::Tensor& teacher,
                            const c10::optional<at::Tensor>& target, double temperature, double alpha,
                            int64_t reduction, int64_t ignore_index) {
  // The gradient is computed in the kernel's pass only when autograd will ask for it.
  const bool compute_grad = at::GradMode::is_enabled() && student.requires_grad();
  return KDLossFunction::apply(student, teacher.detach(), target, temperature, alpha, reduction, ignore_index,
                               compute_grad);
}

at::Tensor kd_loss_topk_autograd(const at::Tensor& student, const at::Tensor& indices, const at::Tensor& teacher,
                                 const at::Tensor& rest_mass, const c10::optional<at::Tensor>& target,
                                 double temperature, double alpha, int64_t reduction, int64_t ignore_index) {
  const bool compute_grad = at::GradMode::is_enabled() && student.requires_grad();
  return KDLossTopKFunction::apply(student, indices, teacher.detach(), rest_mass.detach(), target, temperature,
                                   alpha, reduction, ignore_index, compute_grad);
}

// Autocast: a float16/bfloat16 student of the autocast device is computed in float32 (as F.cross_entropy is).
template <c10::DeviceType device>
at::Tensor in_float32(const at::Tensor& student) {
  return at::autocast::cached_cast(at::kFloat, student, device);
}

template <c10::DeviceType device, c10::DispatchKey autocast_key>
at::Tensor kd_loss_autocast(const at::Tensor& student, const at::Tensor& teacher,
                            const c10::optional<at::Tensor>& target, double temperature, double alpha,
                            int64_t reduction, int64_t ignore_index) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ptd_sparse_kernels::kd_loss_differentiable", "")
                       .typed<decltype(kd_loss_forward)>();
  return op.call(in_float32<device>(student), teacher, target, temperature, alpha, reduction, ignore_index);
}

template <c10::DeviceType device, c10::DispatchKey autocast_key>
at::Tensor kd_loss_topk_autocast(const at::Tensor& student, const at::Tensor& indices, const at::Tensor& teacher,
                                 const at::Tensor& rest_mass, const c10::optional<at::Tensor>& target,
                                 double temperature, double alpha, int64_t reduction, int64_t ignore_index) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ptd_sparse_kernels::kd_loss_topk_differentiable", "")
                       .typed<decltype(kd_loss_topk_forward)>();
  return op.call(in_float32<device>(student), indices, teacher, rest_mass, target, temperature, alpha, reduction,
                 ignore_index);
}

}  // namespace

TORCH_LIBRARY_IMPL(ptd_sparse_kernels, CPU, m) {
  m.impl("kd_loss_differentiable", &kd_loss_forward);
  m.impl("kd_loss_topk_differentiable", &kd_loss_topk_forward);
}
TORCH_LIBRARY_IMPL(ptd_sparse_kernels, CUDA, m) {
  m.impl("kd_loss_differentiable", &kd_loss_forward);
  m.impl("kd_loss_topk_differentiable", &kd_loss_topk_forward);
}
TORCH_LIBRARY_IMPL(ptd_sparse_kernels, Autograd, m) {
  m.impl("kd_loss_differentiable", &kd_loss_autograd);
  m.impl("kd_loss_topk_differentiable", &kd_loss_topk_autograd);
}
TORCH_LIBRARY_IMPL(ptd_sparse_kernels, AutocastCPU, m) {
  m.impl("kd_loss_differentiable", &kd_loss_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
  m.impl("kd_loss_topk_differentiable",
         &kd_loss_topk_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}
TORCH_LIBRARY_IMPL(ptd_sparse_kernels, AutocastCUDA, m) {
  m.impl("kd_loss_differentiable", &kd_loss_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
  m.impl("kd_loss_topk_differentiable",
         &kd_loss_topk_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}

}  // namespace ptd_sparse
