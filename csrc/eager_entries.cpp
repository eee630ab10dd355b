// The eager CPU entries of the products, the GAN loss and the reparameterisation, called from
// Python through pybind11 (genfast._C.*_eager; genfast/ops/conv_act.py, conv_transpose.py,
// losses.py). Each takes the common call (float32 / float64 CPU tensors of one dtype, autocast
// off) to the registered op through the dispatcher, whose autograd is C++
// (conv_act_autograd.cpp, conv_transpose_autograd.cpp, loss_autograd.cpp) or, for the
// reparameterisation, the C++ autograd function below.
//
// Why: a call through torch.ops (Python argument parsing against the schema, the OpOverload's
// Python frames) plus the Python entry's checks cost 15-35 us per call on the 2-core CI CPU, as
// much as torch's whole F.linear at batch 1 and more than a DCGAN generator loss at batch 64; a
// pybind11 call with the checks in C++ costs a few microseconds.
//
// Contract: nullopt (Python None) for any call these checks do not take; the caller then runs its
// checked Python path, which raises torch's exceptions for bad input (an error translated
// through pybind11 would lose their types: ValueError, IndexError, NotImplementedError). A
// c10::Error from the op itself (arguments passing these checks that torch's own product
// refuses) is caught likewise: nothing was written by then (these ops write only their fresh
// outputs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <torch/autograd.h>

#include <cfloat>
#include <cmath>
#include <vector>

#include "product_act.h"

namespace genfast {

// conv2d by Winograd where it takes the call (csrc/conv_act_autograd.cpp), else undefined
at::Tensor winograd_conv2d(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// csrc/cpu/losses.cpp
std::tuple<at::Tensor, at::Tensor> reparam_fwd_scale_cpu(const at::Tensor& mu, const at::Tensor& logvar,
                                                         const at::Tensor& eps);
at::Tensor reparam_bwd_scale_cpu(const at::Tensor& grad_z, const at::Tensor& eps, const at::Tensor& s);

namespace {

// torch's conv2d, or the same product by Winograd where that takes the call
at::Tensor conv2d_product(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  at::Tensor y = winograd_conv2d(x, w, b, stride, padding, dilation, groups);
  return y.defined() ? y : at::conv2d(x, w, b, stride, padding, dilation, groups);
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptT = c10::optional<at::Tensor>;

bool float_cpu(const at::Tensor& t, at::ScalarType dt) {
  return t.defined() && t.scalar_type() == dt && t.device().is_cpu() && t.layout() == at::kStrided;
}

// The argument checks every entry shares: float32 / float64 CPU input, the other tensors of its
// dtype on the CPU, a known activation whose slope the dtype holds (torch raises for a leaky_relu
// slope beyond float32's range with float32 input), CPU autocast off.
bool common_ok(const at::Tensor& x, std::initializer_list<const at::Tensor*> others, const OptT& b, int64_t act,
               double slope) {
  if (!x.defined()) return false;
  const auto dt = x.scalar_type();
  if ((dt != at::kFloat && dt != at::kDouble) || !float_cpu(x, dt)) return false;
  for (const at::Tensor* t : others)
    if (!float_cpu(*t, dt)) return false;
  if (b.has_value() && !float_cpu(*b, dt)) return false;
  if (act < kIdentity || act > kSigmoid) return false;
  if (act == kLeakyRelu && !(slope >= 0)) return false;
  if (act == kLeakyRelu && dt == at::kFloat && std::isfinite(slope) && std::abs(slope) > FLT_MAX) return false;
  return !at::autocast::is_autocast_enabled(at::kCPU);
}

bool pair(const std::vector<int64_t>& v) { return v.size() == 2; }

// Whether an eager call records a backward. Without one, genfast::conv2d_act / linear_act's
// forward is torch's own product and in-place activation: those calls run them directly.
bool records_backward(const at::Tensor& x, const at::Tensor& w, const OptT& b) {
  return at::GradMode::is_enabled() && (x.requires_grad() || w.requires_grad() || (b.has_value() && b->requires_grad()));
}

template <typename R = at::Tensor, typename F>
c10::optional<R> guarded(F&& f) {
  try {
    return f();
  } catch (const c10::Error&) {
    return c10::nullopt;
  }
}

// --- reparameterisation ----------------------------------------------------------------------

// z = mu + eps * exp(0.5 logvar), eps = randn_like(mu) from torch's default generator (the same
// draw as torch.randn_like in Python), z bitwise reparam_fwd's (csrc/cpu/losses.cpp). The node
// has a second output, s = exp(0.5 logvar), which the caller drops; the backward keeps eps and
// s (as torch's own expression keeps exp's result, not logvar: logvar may be an inference tensor
// or change in place before the backward, as in torch): d mu = g, d logvar = 0.5 g eps s in one
// pass. A differentiable backward (create_graph) writes the same formula in ATen ops on s, the
// node's own output, so the second derivative flows back through this node: d logvar of a
// gradient w.r.t. s is 0.5 g_s s.
struct Reparameterize : public torch::autograd::Function<Reparameterize> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& mu, const at::Tensor& logvar) {
    at::Tensor z, eps, s;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      eps = at::randn_like(mu, at::MemoryFormat::Preserve);
      RECORD_FUNCTION("genfast::reparam_fwd_scale", std::vector<c10::IValue>());
      std::tie(z, s) = reparam_fwd_scale_cpu(mu, logvar, eps);
    }
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({eps, s});
    return {z, s};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(2);
    const at::Tensor &g = grads[0], &g_s = grads[1];
    if (g.defined() && ctx->needs_input_grad(0)) out[0] = g;
    if (!ctx->needs_input_grad(1) || (!g.defined() && !g_s.defined())) return out;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &eps = saved[0], &s = saved[1];
    at::Tensor d;
    if (g.defined()) {
      if (at::GradMode::is_enabled()) {
        d = g * 0.5 * eps * s;  // the Python formula, in its order
      } else {
        RECORD_FUNCTION("genfast::reparam_bwd_scale", std::vector<c10::IValue>());
        d = reparam_bwd_scale_cpu(g, eps, s);
      }
    }
    if (g_s.defined()) {
      const at::Tensor d_s = g_s * 0.5 * s;
      d = d.defined() ? d + d_s : d_s;
    }
    out[1] = d;
    return out;
  }
};

}  // namespace

// genfast._C.linear_act_eager: act(x w^T + b) through genfast::linear_act (torch's linear and
// activation in place for a call that records no backward) for (*, in_features) input whose last
// size matches the (out, in) weight and a (out,) bias or none.
OptT linear_act_eager(const at::Tensor& x, const at::Tensor& w, const OptT& b, int64_t act, double slope) {
  if (!common_ok(x, {&w}, b, act, slope) || x.dim() < 1 || w.dim() != 2 || x.size(-1) != w.size(1)) return c10::nullopt;
  if (b.has_value() && (b->dim() != 1 || b->size(0) != w.size(0))) return c10::nullopt;
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("genfast::linear_act", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptT&, int64_t, double)>();
  return guarded([&]() -> OptT {
    if (records_backward(x, w, b)) return op.call(x, w, b, act, slope);
    // without a backward: the same product as genfast::linear_act's for 2-D input (the transposed
    // BLAS product for MLP batches), torch's linear for other ranks
    return x.dim() == 2 ? linear_product(x, w, b, act, slope) : torch_act_(at::linear(x, w, b), act, slope);
  });
}

// genfast._C.conv2d_act_eager: act(conv2d(x, w) + b) through genfast::conv2d_act (torch's conv2d
// and activation in place for a call that records no backward) for a batched
// (4-D) input and int pairs of geometry (the Python caller turns an int into a pair; "same" /
// "valid" padding take the checked path).
OptT conv2d_act_eager(const at::Tensor& x, const at::Tensor& w, const OptT& b, const std::vector<int64_t>& stride,
                      const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation, int64_t groups,
                      int64_t act, double slope) {
  if (!common_ok(x, {&w}, b, act, slope) || x.dim() != 4 || w.dim() != 4 || !pair(stride) || !pair(padding) ||
      !pair(dilation))
    return c10::nullopt;
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("genfast::conv2d_act", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptT&, at::IntArrayRef,
                                               at::IntArrayRef, at::IntArrayRef, int64_t, int64_t, double)>();
  return guarded([&]() -> OptT {
    if (records_backward(x, w, b)) return op.call(x, w, b, stride, padding, dilation, groups, act, slope);
    return torch_act_(conv2d_product(x, w, b, stride, padding, dilation, groups), act, slope);
  });
}

// --- product + eval-mode BatchNorm + activation -------------------------------------------------

namespace {

// y = act(y * scale + shift) in place, per channel c of a (rows, C) row-major block (C channels
// per row: Linear output, or a channels-last map) or of (N, C, L) planes. scale = weight /
// sqrt(running_var + eps) and shift = bias - running_mean * scale in the BatchNorm's dtype
// (bn_eval_coeffs): torch's eval BatchNorm's own (alpha, beta) formula. NaN stays NaN (relu and
// leaky_relu keep it: act_forward_c), as in torch.

template <int ACT, typename T>
void affine_act_(T* y, int64_t outer, int64_t C, int64_t L, const T* a, const T* b, T slope) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C * L));
  at::parallel_for(0, outer, grain, [=](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      T* __restrict__ p = y + o * C * L;
      if (L == 1) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) p[c] = act_forward_c<ACT, T>(p[c] * a[c] + b[c], slope);
      } else {
        for (int64_t c = 0; c < C; ++c) {
          T* __restrict__ q = p + c * L;
          const T ac = a[c], bc = b[c];
#pragma omp simd
          for (int64_t i = 0; i < L; ++i) q[i] = act_forward_c<ACT, T>(q[i] * ac + bc, slope);
        }
      }
    }
  });
}

template <typename T>
void affine_act_(T* y, int64_t outer, int64_t C, int64_t L, const std::vector<T>& a, const std::vector<T>& b,
                 int64_t act, T slope) {
  if (act == kRelu) affine_act_<kRelu, T>(y, outer, C, L, a.data(), b.data(), slope);
  else if (act == kLeakyRelu) affine_act_<kLeakyRelu, T>(y, outer, C, L, a.data(), b.data(), slope);
  else affine_act_<kIdentity, T>(y, outer, C, L, a.data(), b.data(), slope);
}

// The eval BatchNorm's per-channel map in its dtype, as torch's eval batch_norm takes it:
// a = gamma / sqrt(var + eps), shift = beta - mean * a (loops the compiler vectorises; the
// buffers read through their strides).
template <typename T>
void bn_eval_coeffs(const at::Tensor& rm, const at::Tensor& rv, const OptT& bn_w, const OptT& bn_b, double eps,
                    int64_t C, T* __restrict__ a, T* __restrict__ sh) {
  const T* mean = rm.data_ptr<T>();
  const T* var = rv.data_ptr<T>();
  const int64_t sm = rm.stride(0), sv = rv.stride(0);
  const T e = static_cast<T>(eps);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) a[c] = T(1) / std::sqrt(var[c * sv] + e);
  if (bn_w.has_value()) {
    const T* g = bn_w->data_ptr<T>();
    const int64_t sg = bn_w->stride(0);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) a[c] *= g[c * sg];
  }
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) sh[c] = -mean[c * sm] * a[c];
  if (bn_b.has_value()) {
    const T* be = bn_b->data_ptr<T>();
    const int64_t sb = bn_b->stride(0);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) sh[c] += be[c * sb];
  }
}

// genfast::conv_transpose2d_act through the dispatcher (product_bn_eval_eager's kind 2 and
// conv_transpose2d_act_eager)
const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const OptT&, at::IntArrayRef,
                                          at::IntArrayRef, at::IntArrayRef, int64_t, at::IntArrayRef, int64_t, double)>&
conv_transpose2d_act_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("genfast::conv_transpose2d_act", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptT&, at::IntArrayRef,
                                               at::IntArrayRef, at::IntArrayRef, int64_t, at::IntArrayRef, int64_t,
                                               double)>();
  return op;
}

bool channel_vec(const at::Tensor& t, at::ScalarType dt, int64_t C) {
  return float_cpu(t, dt) && t.dim() == 1 && t.size(0) == C;
}

}  // namespace

// genfast._C.product_bn_eval_eager: act(bn_eval(product(x))) for a call that records no
// backward: torch's linear (kind 0; 2-D input), torch's conv2d (kind 1; 4-D input, int pairs) or
// genfast::conv_transpose2d_act without activation (kind 2; 4-D input, int pairs, output_padding),
// the bias included, then one in-place pass of the eval BatchNorm's per-channel affine map and
// the activation (identity, relu, leaky_relu). The eval block's Python path cost 20-30 us more
// per layer than torch's modules at batch 1 (its checks, then a second entry for the
// BatchNorm), and folding the BatchNorm into the weight reads and writes the whole weight on
// every call.
OptT product_bn_eval_eager(const at::Tensor& x, const at::Tensor& w, const OptT& b, int64_t kind,
                           const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                           const std::vector<int64_t>& dilation, const std::vector<int64_t>& output_padding,
                           int64_t groups, const at::Tensor& rm, const at::Tensor& rv, const OptT& bn_w,
                           const OptT& bn_b, double eps, int64_t act, double slope) {
  if (!common_ok(x, {&w}, b, act, slope) || act > kLeakyRelu || !(eps >= 0)) return c10::nullopt;
  const auto dt = x.scalar_type();
  if (kind == 0) {
    if (x.dim() != 2 || w.dim() != 2 || x.size(1) != w.size(1)) return c10::nullopt;
  } else if ((kind != 1 && kind != 2) || x.dim() != 4 || w.dim() != 4 || !pair(stride) || !pair(padding) ||
             !pair(dilation) || (kind == 2 && !pair(output_padding)) || groups < 1) {
    return c10::nullopt;
  }
  // output channels: dim 0 of a linear / conv2d weight, groups x dim 1 of a transposed one
  const int64_t C = kind == 2 ? w.size(1) * groups : w.size(0);
  if (b.has_value() && (b->dim() != 1 || b->size(0) != C)) return c10::nullopt;
  if (!channel_vec(rm, dt, C) || !channel_vec(rv, dt, C)) return c10::nullopt;
  if ((bn_w.has_value() && !channel_vec(*bn_w, dt, C)) || (bn_b.has_value() && !channel_vec(*bn_b, dt, C)))
    return c10::nullopt;
  if (at::GradMode::is_enabled()) {
    for (const at::Tensor* t : {&x, &w})
      if (t->requires_grad()) return c10::nullopt;
    for (const OptT* t : {&b, &bn_w, &bn_b})
      if (t->has_value() && (*t)->requires_grad()) return c10::nullopt;
  }
  return guarded([&]() -> OptT {
    at::Tensor y = kind == 0   ? at::linear(x, w, b)
                   : kind == 1 ? conv2d_product(x, w, b, stride, padding, dilation, groups)
                               : conv_transpose2d_act_op().call(x, w, b, stride, padding, output_padding, groups, dilation,
                                                                 kIdentity, 0.0);
    y = with_contiguous_strides(y);  // as torch's BatchNorm gives a contiguous product
    const bool rows = y.dim() == 2 || (!y.is_contiguous() && y.is_contiguous(at::MemoryFormat::ChannelsLast));
    if (!rows && !y.is_contiguous()) return c10::nullopt;  // (the products give one of the two)
    const int64_t L = y.dim() == 4 ? y.size(2) * y.size(3) : 1;
    AT_DISPATCH_FLOATING_TYPES(dt, "product_bn_eval", [&] {
      std::vector<scalar_t> a(C), sh(C);
      bn_eval_coeffs<scalar_t>(rm, rv, bn_w, bn_b, eps, C, a.data(), sh.data());
      scalar_t* p = y.data_ptr<scalar_t>();
      if (rows) affine_act_<scalar_t>(p, y.numel() / std::max<int64_t>(1, C), C, 1, a, sh, act, static_cast<scalar_t>(slope));
      else affine_act_<scalar_t>(p, y.size(0), C, L, a, sh, act, static_cast<scalar_t>(slope));
    });
    return y;
  });
}

// genfast._C.conv_transpose2d_act_eager: act(conv_transpose2d(x, w) + b) through
// genfast::conv_transpose2d_act for a batched (4-D) input and int pairs of geometry.
OptT conv_transpose2d_act_eager(const at::Tensor& x, const at::Tensor& w, const OptT& b,
                                const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                                const std::vector<int64_t>& output_padding, int64_t groups,
                                const std::vector<int64_t>& dilation, int64_t act, double slope) {
  if (!common_ok(x, {&w}, b, act, slope) || x.dim() != 4 || w.dim() != 4 || !pair(stride) || !pair(padding) ||
      !pair(output_padding) || !pair(dilation))
    return c10::nullopt;
  return guarded([&]() -> OptT {
    return conv_transpose2d_act_op().call(x, w, b, stride, padding, output_padding, groups, dilation, act, slope);
  });
}

// genfast._C.gan_loss_eager: genfast::gan_loss_train for float32 / float64 CPU logits (real of
// fake's dtype, or none on the generator side); kind, reduction and real_label are checked by the
// Python caller. Returns the op's pair (loss or per-element terms of real, of fake).
c10::optional<std::tuple<at::Tensor, at::Tensor>> gan_loss_eager(const OptT& real, const at::Tensor& fake,
                                                                 int64_t kind, bool generator, int64_t reduction,
                                                                 double real_label) {
  if (!fake.defined()) return c10::nullopt;
  const auto dt = fake.scalar_type();
  if ((dt != at::kFloat && dt != at::kDouble) || !float_cpu(fake, dt) || (real.has_value() && !float_cpu(*real, dt)))
    return c10::nullopt;
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("genfast::gan_loss_train", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const OptT&, const at::Tensor&, int64_t, bool,
                                                                       int64_t, double)>();
  return guarded<std::tuple<at::Tensor, at::Tensor>>(
      [&] { return op.call(real, fake, kind, generator, reduction, real_label); });
}

// genfast._C.reparameterize_eager: the reparameterisation of float32 / float64 CPU mu and logvar of
// one shape and dtype, with its autograd in C++ (the Python autograd.Function and checks cost
// more than the kernel below a few thousand elements).
OptT reparameterize_eager(const at::Tensor& mu, const at::Tensor& logvar) {
  if (!mu.defined()) return c10::nullopt;
  const auto dt = mu.scalar_type();
  if ((dt != at::kFloat && dt != at::kDouble) || !float_cpu(mu, dt) || !float_cpu(logvar, dt) ||
      mu.sizes() != logvar.sizes())
    return c10::nullopt;
  return guarded([&]() -> OptT { return Reparameterize::apply(mu, logvar)[0]; });
}

}  // namespace genfast
