// genfast::gan_loss_train: the GAN loss (discriminator or generator side) with its autograd
// formula in C++, for eager calls. The Python entry point (genfast/ops/losses.py) calls it on the
// cpu backend outside torch.compile: a Python autograd.Function around gan_loss_fwd cost more
// than the loss kernel itself at DCGAN batch sizes (apply, a Python backward node, views).
//
// Forward: gan_loss_fwd (one pass: the terms, their reduction and the derivative, saved in a
// GanLossTrainBackward node).
// Backward: loss_scale_grad (the saved derivative times the incoming gradient). When the
// backward must itself be differentiable (create_graph=True) it calls gan_loss_ref_grad, whose
// kernel is the Python reference formulas registered as CompositeImplicitAutograd, so the
// gradient is built from differentiable torch ops, as the Python path does.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/FuncTorchTLS.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

#include <type_traits>

namespace genfast {
namespace {

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

// The backward node of gan_loss_train, written as a torch::autograd::Node of our own rather
// than a torch::autograd::Function: at DCGAN batch sizes the loss kernels take about a
// microsecond, and Function's context (saved_data's string-keyed IValues, its input and output
// records) cost more than the kernel on both passes. Inputs: the loss (reduced) or the two term
// tensors (reduction none); outputs: the gradients of real and fake (real's edge is empty on
// the generator side).
struct GanLossTrainBackward final : public torch::autograd::Node {
  torch::autograd::SavedVariable grad_, real_, fake_;  // the saved derivative; the logits
  bool has_real = false, generator = false;
  bool real_saved = false, fake_saved = false;  // the logits kept for create_graph (sides needing grad)
  int64_t kind = 0, reduction = 0;
  double real_label = 1.0;
  std::vector<c10::SymInt> real_sizes, fake_sizes;
  at::ScalarType real_dtype = at::kFloat, fake_dtype = at::kFloat;

  std::string name() const override { return "GanLossTrainBackward"; }

  // compiled autograd (torch._dynamo.compiled_autograd): the node's state for its cache key, and
  // apply() traced with the saved tensors and sizes swapped for the graph's proxies
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    args.collect(grad_, false);
    args.collect(real_, false);
    args.collect(fake_, false);
    args.collect(has_real);
    args.collect(real_saved);
    args.collect(fake_saved);
    args.collect(generator);
    args.collect(kind);
    args.collect(reduction);
    args.collect(real_label);
    args.collect(real_sizes);
    args.collect(fake_sizes);
    args.collect(real_dtype);
    args.collect(fake_dtype);
  }
  variable_list apply_with_saved(const variable_list& inputs,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    saved.before(grad_);
    saved.before(real_);
    saved.before(fake_);
    saved.before(real_sizes);
    saved.before(fake_sizes);
    variable_list out = apply(variable_list(inputs));
    saved.after(grad_);
    saved.after(real_);
    saved.after(fake_);
    saved.after(real_sizes);
    saved.after(fake_sizes);
    return out;
  }
  void release_variables() override {
    grad_.reset_data();
    real_.reset_data();
    fake_.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    // unpack raises torch's "backward through the graph a second time" after a release
    const at::Tensor grad = grad_.unpack();
    const bool none = reduction == kReduceNone;
    const at::Tensor g_r = grads[0];
    const at::Tensor g_f = grads.size() > 1 ? grads[1] : at::Tensor();
    const at::Tensor coef_a = g_r, coef_b = none ? g_f : g_r;
    at::Tensor dr, df;
    if (!coef_a.defined() && !coef_b.defined()) return {at::Tensor(), at::Tensor()};
    if (at::GradMode::is_enabled()) {
      // create_graph: the reference formulas (differentiable torch ops) on the saved logits
      static const auto ref = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("genfast::gan_loss_ref_grad", "")
                                  .typed<std::tuple<at::Tensor, at::Tensor>(
                                      const c10::optional<at::Tensor>&, const at::Tensor&,
                                      const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, int64_t,
                                      bool, int64_t, double)>();
      // a side that needs no gradient was not saved (it may be an inference tensor): real is
      // left out, fake (whose term the reference still forms) stands in as zeros
      const at::Tensor real = has_real && real_saved ? real_.unpack() : at::Tensor();
      const at::Tensor fake = fake_saved ? fake_.unpack()
                                         : at::zeros_symint(fake_sizes, grad.options().dtype(fake_dtype));
      std::tie(dr, df) = ref.call(opt(real), fake, opt(coef_a), opt(coef_b), kind, generator, reduction, real_label);
    } else {
      static const auto scale = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("genfast::loss_scale_grad", "")
                                    .typed<std::tuple<at::Tensor, at::Tensor>(
                                        const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                                        const at::Tensor&, c10::SymInt, at::ScalarType, at::ScalarType)>();
      // sizes as symbolic ints: torch.compile traces this backward with dynamic shapes (a batch
      // size that changed between calls)
      c10::SymInt nr(0);
      if (has_real) {
        nr = c10::SymInt(1);
        for (const c10::SymInt& d : real_sizes) nr = nr * d;
      }
      std::tie(dr, df) = scale.call(opt(coef_a), opt(coef_b), grad, nr, has_real ? real_dtype : grad.scalar_type(),
                                    fake_dtype);
      if (has_real) dr = dr.view_symint(real_sizes);
      df = df.view_symint(fake_sizes);
    }
    // (task_should_compute_output: also false for an edge torch.autograd.grad's inputs= leave out).
    // reduction none: each term tensor depends on its own side only, so a side whose terms got no
    // gradient gets none (as torch's separate ops: its .grad stays None, not zeros)
    if (!has_real || !task_should_compute_output(0) || (none && !g_r.defined())) dr = at::Tensor();
    if (!task_should_compute_output(1) || (none && !g_f.defined())) df = at::Tensor();
    return {dr, df};
  }
};

// A new node of type N, as the installed torch holds autograd nodes: c10::intrusive_ptr in
// recent torch (2.14 here), std::shared_ptr with torch's iterative deleter (long graphs) in older
// ones (2.11 on the GPU machines).
template <typename N>
auto make_node() {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, N>) {
    return c10::make_intrusive<N>();
  } else {
    return std::shared_ptr<N>(new N(), [](auto* p) { deleteNode(p); });
  }
}

std::tuple<at::Tensor, at::Tensor> gan_loss_train_autograd(const c10::optional<at::Tensor>& real_,
                                                           const at::Tensor& fake, int64_t kind, bool generator,
                                                           int64_t reduction, double real_label) {
  // as torch::autograd::Function::apply: a C++ autograd node has no functorch rule
  if (const auto& functorch_tls = at::functorch::functorchTLSAccessor()) functorch_tls->checkSupportsCppAutogradFunction();
  const at::Tensor real = real_.has_value() ? *real_ : at::Tensor();
  TORCH_CHECK(!(real.defined() && real._fw_grad(0).defined()) && !(fake.defined() && fake._fw_grad(0).defined()),
              "gan_loss_train: forward-mode AD is not implemented (genfast.functional's losses run the reference "
              "formulas for dual tensors)");
  at::Tensor out_r, out_f, grad;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(out_r, out_f, grad) = call_gan_loss_fwd(real_, fake, kind, generator, reduction, real_label);
  }
  if (!torch::autograd::compute_requires_grad(real, fake)) return {out_r, out_f};
  auto node = make_node<GanLossTrainBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(real, fake));
  node->grad_ = torch::autograd::SavedVariable(grad, false);
  node->has_real = real.defined();
  // the logits only where their side needs a gradient: the create_graph backward differentiates
  // those alone, and a side that needs none may be an inference tensor (which cannot be saved)
  if (node->has_real) {
    node->real_saved = real.requires_grad();
    if (node->real_saved) node->real_ = torch::autograd::SavedVariable(real, false);
    node->real_sizes = real.sym_sizes().vec();
    node->real_dtype = real.scalar_type();
  }
  node->fake_saved = fake.requires_grad();
  if (node->fake_saved) node->fake_ = torch::autograd::SavedVariable(fake, false);
  node->fake_sizes = fake.sym_sizes().vec();
  node->fake_dtype = fake.scalar_type();
  node->generator = generator;
  node->kind = kind;
  node->reduction = reduction;
  node->real_label = real_label;
  if (reduction == kReduceNone) {
    // each side's terms record the node only when that side needs a gradient (an undefined
    // tensor keeps the input slot, so the fake terms stay the node's input 1)
    const bool real_grad = real.defined() && real.requires_grad();
    torch::autograd::set_history(real_grad ? out_r : at::Tensor(), node);
    torch::autograd::set_history(fake.requires_grad() ? out_f : at::Tensor(), node);
  } else {
    torch::autograd::set_history(out_r, node);
  }
  return {out_r, out_f};
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
