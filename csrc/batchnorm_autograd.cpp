// genfast::batch_norm_act_train: BatchNorm + activation with its autograd formula in C++, for
// eager calls on the cpu backend (genfast/ops/batchnorm_act.py calls it outside torch.compile).
// A Python autograd.Function around batch_norm_act_fwd / _bwd cost tens of microseconds per
// layer and step on the 2-core CI CPU (apply, the Python backward node), as much as the kernels
// at MLP-GAN sizes.
//
// Forward: batch_norm_act_fwd (running statistics updated in place), saving x (or y in
// memory_efficient mode, gamma_floor > 0) and the batch mean and invstd. Backward:
// batch_norm_act_bwd; when the backward must itself be differentiable (create_graph=True) it
// calls batch_norm_act_ref_grad, whose kernel is the Python reference formula registered as
// CompositeImplicitAutograd, as the Python path does.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace genfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptT = c10::optional<at::Tensor>;
using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Triple call_fwd(const at::Tensor& input, const OptT& weight, const OptT& bias, const OptT& rm, const OptT& rv,
                bool training, double momentum, double eps, int64_t act, double slope, double gamma_floor) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("genfast::batch_norm_act_fwd", "")
                             .typed<Triple(const at::Tensor&, const OptT&, const OptT&, const OptT&, const OptT&,
                                           bool, double, double, int64_t, double, double)>();
  return op.call(input, weight, bias, rm, rv, training, momentum, eps, act, slope, gamma_floor);
}

OptT opt(const at::Tensor& t) { return t.defined() ? OptT(t) : c10::nullopt; }

struct BatchNormActTrain : public torch::autograd::Function<BatchNormActTrain> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const OptT& weight, const OptT& bias,
                               const OptT& running_mean, const OptT& running_var, bool training, double momentum,
                               double eps, int64_t act, double slope, double gamma_floor) {
    at::Tensor y, mean, invstd;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(y, mean, invstd) =
          call_fwd(input, weight, bias, running_mean, running_var, training, momentum, eps, act, slope, gamma_floor);
    }
    const bool saved_is_output = gamma_floor > 0;
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({saved_is_output ? y : input, weight.has_value() ? *weight : at::Tensor(),
                            bias.has_value() ? *bias : at::Tensor(), mean, invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["act"] = act;
    ctx->saved_data["slope"] = slope;
    ctx->saved_data["gamma_floor"] = gamma_floor;
    // needs_input_grad counts the tensor arguments given: input, then weight and bias if any
    ctx->saved_data["w_edge"] = weight.has_value() ? int64_t(1) : int64_t(-1);
    ctx->saved_data["b_edge"] = bias.has_value() ? int64_t(weight.has_value() ? 2 : 1) : int64_t(-1);
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(11);
    const at::Tensor& g = grads[0];
    if (!g.defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &sv = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3], &invstd = saved[4];
    const bool training = ctx->saved_data["training"].toBool();
    const double eps = ctx->saved_data["eps"].toDouble();
    const int64_t act = ctx->saved_data["act"].toInt();
    const double slope = ctx->saved_data["slope"].toDouble();
    const double gamma_floor = ctx->saved_data["gamma_floor"].toDouble();
    const int64_t w_edge = ctx->saved_data["w_edge"].toInt(), b_edge = ctx->saved_data["b_edge"].toInt();
    at::Tensor dx, dw, db;
    if (at::GradMode::is_enabled()) {
      TORCH_CHECK(gamma_floor == 0,
                  "batch_norm_act: double backward is not supported with memory_efficient=True (the input is not "
                  "saved); use memory_efficient=False for gradient penalties");
      static const auto ref = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("genfast::batch_norm_act_ref_grad", "")
                                  .typed<Triple(const at::Tensor&, const at::Tensor&, const OptT&, const OptT&,
                                                const at::Tensor&, const at::Tensor&, bool, int64_t, double, double,
                                                double)>();
      std::tie(dx, dw, db) =
          ref.call(g, sv, opt(weight), opt(bias), mean, invstd, training, act, slope, gamma_floor, eps);
    } else {
      static const auto bwd = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("genfast::batch_norm_act_bwd", "")
                                  .typed<Triple(const at::Tensor&, const at::Tensor&, const OptT&, const OptT&,
                                                const at::Tensor&, const at::Tensor&, bool, int64_t, double, double,
                                                bool)>();
      std::tie(dx, dw, db) =
          bwd.call(g, sv, opt(weight), opt(bias), mean, invstd, training, act, slope, gamma_floor, gamma_floor > 0);
    }
    if (ctx->needs_input_grad(0)) out[0] = dx;
    if (w_edge >= 0 && ctx->needs_input_grad(w_edge)) out[1] = dw;
    if (b_edge >= 0 && ctx->needs_input_grad(b_edge)) out[2] = db;
    return out;
  }
};

at::Tensor batch_norm_act_train_autograd(const at::Tensor& input, const OptT& weight, const OptT& bias,
                                         const OptT& running_mean, const OptT& running_var, bool training,
                                         double momentum, double eps, int64_t act, double slope, double gamma_floor) {
  return BatchNormActTrain::apply(input, weight, bias, running_mean, running_var, training, momentum, eps, act,
                                  slope, gamma_floor)[0];
}

// Without autograd (inference mode): the forward kernel alone.
at::Tensor batch_norm_act_train_plain(const at::Tensor& input, const OptT& weight, const OptT& bias,
                                      const OptT& running_mean, const OptT& running_var, bool training,
                                      double momentum, double eps, int64_t act, double slope, double gamma_floor) {
  return std::get<0>(
      call_fwd(input, weight, bias, running_mean, running_var, training, momentum, eps, act, slope, gamma_floor));
}

}  // namespace

// genfast._C.batch_norm_act_eager: the eager CPU call's checks and the op's call in one C++
// function (genfast/ops/batchnorm_act.py, eager_fast). The same checks in Python cost 7-15 us per
// call on the 2-core CI CPU, half of a (64, 64) BatchNorm1d's time. Returns nothing (the caller
// then takes the checked path, which raises torch's exceptions where it must) unless: a float32 /
// float64 CPU input of 2 to 4 dims with C > 0 channels; given parameters and running buffers
// (C,) CPU tensors of its dtype (buffers not requiring grad where grad mode is on); running
// buffers both or neither, and given when not training;
// eps > 0 when training (>= 0 in eval); more than one value per channel when training.
c10::optional<at::Tensor> batch_norm_act_eager(const at::Tensor& input, const OptT& running_mean,
                                               const OptT& running_var, const OptT& weight, const OptT& bias,
                                               bool training, double momentum, double eps, int64_t act,
                                               double slope) {
  const auto dt = input.scalar_type();
  if ((dt != at::kFloat && dt != at::kDouble) || !input.device().is_cpu() || input.dim() < 2 || input.dim() > 4)
    return c10::nullopt;
  const int64_t C = input.size(1);
  if (C == 0 || running_mean.has_value() != running_var.has_value() || (!training && !running_mean.has_value()))
    return c10::nullopt;
  if (!(training ? eps > 0.0 : eps >= 0.0)) return c10::nullopt;
  for (const OptT* p : {&running_mean, &running_var, &weight, &bias}) {
    if (!p->has_value()) continue;
    const at::Tensor& t = **p;
    if (!t.defined() || t.dim() != 1 || t.size(0) != C || t.scalar_type() != dt || !t.device().is_cpu())
      return c10::nullopt;
  }
  // a running buffer that requires grad: torch raises with grad mode on (the checked path does)
  for (const OptT* p : {&running_mean, &running_var})
    if (p->has_value() && (*p)->requires_grad() && at::GradMode::is_enabled()) return c10::nullopt;
  if (training && input.numel() / C <= 1) return c10::nullopt;
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("genfast::batch_norm_act_train", "")
                             .typed<at::Tensor(const at::Tensor&, const OptT&, const OptT&, const OptT&, const OptT&,
                                               bool, double, double, int64_t, double, double)>();
  return op.call(input, weight, bias, running_mean, running_var, training, momentum, eps, act, slope, 0.0);
}

}  // namespace genfast

TORCH_LIBRARY_IMPL(genfast, Autograd, m) {
  m.impl("batch_norm_act_train", &genfast::batch_norm_act_train_autograd);
}

TORCH_LIBRARY_IMPL(genfast, CompositeExplicitAutograd, m) {
  m.impl("batch_norm_act_train", &genfast::batch_norm_act_train_plain);
}
