// genfast::gan_loss_train: the GAN loss (discriminator or generator side) with its autograd
// formula in C++, for eager calls. The Python entry point (genfast/ops/losses.py) calls it on the
// cpu backend outside torch.compile: a Python autograd.Function around gan_loss_fwd cost more
// than the loss kernel itself at DCGAN batch sizes (apply, a Python backward node, views).
//
// Forward: gan_loss_fwd (one pass: the terms, their reduction and the derivative, saved).
// Backward: loss_scale_grad (the saved derivative times the incoming gradient). When the
// backward must itself be differentiable (create_graph=True) it calls gan_loss_ref_grad, whose
// kernel is the Python reference formulas registered as CompositeImplicitAutograd, so the
// gradient is built from differentiable torch ops, as the Python path does.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace genfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kReduceNone = 0;

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_gan_loss_fwd(const c10::optional<at::Tensor>& real,
                                                                 const c10::optional<at::Tensor>& fake, int64_t kind,
                                                                 bool generator, int64_t reduction, double real_label) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("genfast::gan_loss_fwd", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, int64_t, bool,
                                 int64_t, double)>();
  return op.call(real, fake, kind, generator, reduction, real_label);
}

c10::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

struct GanLossTrain : public torch::autograd::Function<GanLossTrain> {
  // real is optional (the generator side has none): an undefined at::Tensor argument would be
  // taken for an input variable.
  static variable_list forward(AutogradContext* ctx, const c10::optional<at::Tensor>& real_, const at::Tensor& fake,
                               int64_t kind, bool generator, int64_t reduction, double real_label) {
    const at::Tensor real = real_.has_value() ? *real_ : at::Tensor();
    at::Tensor out_r, out_f, grad;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out_r, out_f, grad) = call_gan_loss_fwd(real_, fake, kind, generator, reduction, real_label);
    }
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({grad, real, fake});
    ctx->saved_data["kind"] = kind;
    ctx->saved_data["generator"] = generator;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["real_label"] = real_label;
    if (reduction != kReduceNone) ctx->mark_non_differentiable({out_f});
    return {out_r, out_f};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &grad = saved[0], &real = saved[1], &fake = saved[2];
    const int64_t kind = ctx->saved_data["kind"].toInt();
    const bool generator = ctx->saved_data["generator"].toBool();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const double real_label = ctx->saved_data["real_label"].toDouble();
    const bool none = reduction == kReduceNone;
    const at::Tensor g_r = grads[0];
    const at::Tensor g_f = grads.size() > 1 ? grads[1] : at::Tensor();
    const at::Tensor coef_a = g_r, coef_b = none ? g_f : g_r;
    at::Tensor dr, df;
    if (!coef_a.defined() && !coef_b.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
                                                       at::Tensor(), at::Tensor()};
    if (at::GradMode::is_enabled()) {
      static const auto ref = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("genfast::gan_loss_ref_grad", "")
                                  .typed<std::tuple<at::Tensor, at::Tensor>(
                                      const c10::optional<at::Tensor>&, const at::Tensor&,
                                      const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, int64_t,
                                      bool, int64_t, double)>();
      std::tie(dr, df) = ref.call(opt(real), fake, opt(coef_a), opt(coef_b), kind, generator, reduction, real_label);
      if (!real.defined()) dr = at::Tensor();
    } else {
      static const auto scale = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("genfast::loss_scale_grad", "")
                                    .typed<std::tuple<at::Tensor, at::Tensor>(
                                        const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                                        const at::Tensor&, c10::SymInt, at::ScalarType, at::ScalarType)>();
      // sizes as symbolic ints: torch.compile traces this backward with dynamic shapes (a batch
      // size that changed between calls)
      const c10::SymInt nr = real.defined() ? real.sym_numel() : c10::SymInt(0);
      const auto dt_r = real.defined() ? real.scalar_type() : grad.scalar_type();
      std::tie(dr, df) = scale.call(opt(coef_a), opt(coef_b), grad, nr, dt_r, fake.scalar_type());
      dr = real.defined() ? dr.view_symint(real.sym_sizes()) : at::Tensor();
      df = df.view_symint(fake.sym_sizes());
    }
    // needs_input_grad counts tensor inputs only: fake is the first when real is None
    if (!real.defined() || !ctx->needs_input_grad(0)) dr = at::Tensor();
    if (!ctx->needs_input_grad(real.defined() ? 1 : 0)) df = at::Tensor();
    return {dr, df, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> gan_loss_train_autograd(const c10::optional<at::Tensor>& real,
                                                           const at::Tensor& fake, int64_t kind, bool generator,
                                                           int64_t reduction, double real_label) {
  auto out = GanLossTrain::apply(real, fake, kind, generator, reduction, real_label);
  return {out[0], out[1]};
}

// Without autograd (inference mode): the forward kernel alone.
std::tuple<at::Tensor, at::Tensor> gan_loss_train_plain(const c10::optional<at::Tensor>& real, const at::Tensor& fake,
                                                        int64_t kind, bool generator, int64_t reduction,
                                                        double real_label) {
  auto out = call_gan_loss_fwd(real, fake, kind, generator, reduction, real_label);
  return {std::get<0>(out), std::get<1>(out)};
}

}  // namespace
}  // namespace genfast

TORCH_LIBRARY_IMPL(genfast, Autograd, m) {
  m.impl("gan_loss_train", &genfast::gan_loss_train_autograd);
}

TORCH_LIBRARY_IMPL(genfast, CompositeExplicitAutograd, m) {
  m.impl("gan_loss_train", &genfast::gan_loss_train_plain);
}
