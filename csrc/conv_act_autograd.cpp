// genfast::conv2d_act and genfast::linear_act: convolution / linear + bias + activation with
// their autograd formulas in C++, for eager calls on the CPU (genfast/ops/conv_act.py: the
// drop-in Conv2d and Linear, GF.conv2d / GF.linear and the products of the Conv2d / Linear ->
// BatchNorm -> activation blocks, outside torch.compile).
//
// conv2d_act. Forward: torch's own product (at::convolution, oneDNN, bias included), the
// activation in place; for float32 k4 s2 p1 and k5 s2 p2 layers where it measured faster (the
// Keras-style D2 14 -> 7 layer from batch 16: csrc/cpu/conv_transpose_winograd.cpp; the DCGAN
// discriminator's 32x32 -> 16x16 layer: 1.2-1.4x oneDNN's product at batch 8-64), Winograd's
// F(4x4, 2x2) instead (the grad_input of the transposed convolution with the same weight:
// csrc/cpu/conv_transpose_winograd.cpp), then bias and activation. Saves input, weight and
// (for an activation) the output.
// Backward: dz = dy * act'(y) (torch's activation backward kernels), then
//   grad_input  = the transposed convolution of dz by the same weight: genfast::
//                 conv_transpose2d_fwd's GEMM form where it measured faster than ATen's
//                 convolution backward (conv2d_grad_input_gemm in csrc/cpu/conv_transpose.cpp:
//                 groups 1, NCHW, strided; 3-9x for inputs of up to 8 channels, where ATen's
//                 oneDNN backward runs at a few GFLOP/s; 1.0-1.8x for the DCGAN k4 s2 layers);
//   grad_weight, grad_bias = ATen's convolution backward (oneDNN), without grad_input.
// Layers of up to 4 input channels (conv2d_grad_weight_gemm_ok): dz, grad_weight and grad_bias
// image by image in csrc/cpu/conv_transpose.cpp (conv2d_weight_backward; dz is written out only
// for grad_input), then grad_input as above.
// Elsewhere ATen's convolution backward computes all three at once. A create_graph backward
// runs dz in differentiable ATen ops and at::convolution_backward (which has a double
// backward): gradient-penalty GANs.
//
// linear_act: forward = at::mm (transposed, w x^T, for 2-128 rows), then bias + activation in one
// pass of our own (elsewhere addmm + torch's activation: linear_product); backward = dz =
// dy * act'(y) with grad_bias in one pass, then grad_input and grad_weight (genfast's linear GEMM
// for float32 MLP batches on AVX2 CPUs, csrc/cpu/linear_gemm.cpp; else at::mm, side by side on
// the two cores of a two-thread CPU: linear_products). create_graph: ATen ops.
//
// Arguments a product does not take here (not a 4-D (conv) / 2-D (linear) float32 / float64 CPU
// input, mismatched shapes or dtypes, invalid geometry, an empty batch) run torch's own
// at::conv2d / at::linear and activation, so that torch raises its own exceptions for bad input
// (and handles unbatched input).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "cpu/conv_transpose_winograd.h"
#include "cpu/linear_gemm.h"
#include "product_act.h"

namespace genfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptT = c10::optional<at::Tensor>;

bool symbolic(const at::Tensor& t) { return t.unsafeGetTensorImpl()->has_symbolic_sizes_strides(); }

// Whether these arguments run the product here (everything else goes to torch's at::conv2d)
bool takes(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride, at::IntArrayRef padding,
           at::IntArrayRef dilation, int64_t groups) {
  if (symbolic(x) || symbolic(w)) return true;  // traced (export / AOT dispatch): the op and its fake
  if (x.dim() != 4 || w.dim() != 4 || !x.device().is_cpu() || !w.device().is_cpu() || groups <= 0) return false;
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble) return false;
  if (w.scalar_type() != x.scalar_type() || x.size(0) == 0 || x.size(1) != w.size(1) * groups) return false;
  if (w.size(0) == 0 || w.size(0) % groups != 0) return false;
  if (stride.size() != 2 || padding.size() != 2 || dilation.size() != 2) return false;
  for (int d = 0; d < 2; ++d) {
    if (stride[d] <= 0 || dilation[d] <= 0 || padding[d] < 0) return false;
    if (x.size(2 + d) + 2 * padding[d] - dilation[d] * (w.size(2 + d) - 1) - 1 < 0) return false;
  }
  if (b.has_value() && b->defined())
    return b->dim() == 1 && b->numel() == w.size(0) && b->scalar_type() == x.scalar_type() && b->device().is_cpu();
  return true;
}

}  // namespace

// conv2d(x, w, b, ...) by Winograd (bias added) where winograd_s2_conv2d_takes the call and the
// bias is a float32 vector of the output channels; undefined elsewhere (and where a value came
// out non-finite): the caller runs torch's product
at::Tensor winograd_conv2d(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  if (!winograd_s2_conv2d_takes(x, w, stride, padding, dilation, groups)) return at::Tensor();
  const bool bias = b.has_value() && b->defined();
  if (bias && (b->dim() != 1 || b->numel() != w.size(0) || b->scalar_type() != at::kFloat || !b->device().is_cpu() ||
               !plain_tensor(*b)))
    return at::Tensor();
  at::Tensor y = winograd_conv_transpose_s2_grad_input(x, w, x.size(2) / 2, x.size(3) / 2);
  if (y.defined() && bias) y.add_(b->view({1, -1, 1, 1}));
  return y;
}

namespace {

at::Tensor product(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t act, double slope) {
  const int64_t zero[2] = {0, 0};
  // float32 k4 s2 p1 / k5 s2 p2 (DCGAN's / the Keras-style discriminator layers): Winograd's
  // F(4x4, 2x2) / F(4x4, 3x3) where it takes the
  // shape (csrc/cpu/conv_transpose_winograd.cpp), then the bias and activation; a non-finite
  // value there (undefined result) runs torch's product instead
  if (!symbolic(x) && !symbolic(w)) {
    at::Tensor y = winograd_conv2d(x, w, b, stride, padding, dilation, groups);
    if (y.defined()) return torch_act_(y, act, slope);
  }
  return torch_act_(at::convolution(x, w, b, stride, padding, dilation, false, at::IntArrayRef(zero, 2), groups), act,
                    slope);
}

struct Conv2dAct : public torch::autograd::Function<Conv2dAct> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const OptT& b,
                               std::vector<int64_t> stride, std::vector<int64_t> padding,
                               std::vector<int64_t> dilation, int64_t groups, int64_t act, double slope) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      y = product(x, w, b, stride, padding, dilation, groups, act, slope);
    }
    ctx->set_materialize_grads(false);
    // the output only when act' needs it (an identity product keeps no second activation alive)
    ctx->save_for_backward({x, w, act == kIdentity ? at::Tensor() : y});
    ProductArgs{stride, padding, {}, dilation, groups, act, slope, b.has_value() && b->defined()}.save(ctx);
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(9);
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &y = saved[2];
    const ProductArgs args = ProductArgs::load(ctx);
    const std::vector<int64_t>&stride = args.stride, &padding = args.padding, &dilation = args.dilation;
    const int64_t groups = args.groups, act = args.act;
    const double slope = args.slope;
    const bool has_bias = args.has_bias;
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool need_b = has_bias && ctx->needs_input_grad(2);
    const bool differentiable = at::GradMode::is_enabled();
    const std::vector<int64_t> bias_sizes{w.size(0)};
    const at::OptionalIntArrayRef bias_arg =
        has_bias ? at::OptionalIntArrayRef(bias_sizes) : at::OptionalIntArrayRef(c10::nullopt);
    const int64_t zero[2] = {0, 0};
    at::Tensor dx, dw, db;
    // output_padding of the transposed convolution that maps dz back onto x's size (< stride)
    const int64_t op[2] = {
        x.size(2) - ((dy.size(2) - 1) * stride[0] - 2 * padding[0] + dilation[0] * (w.size(2) - 1) + 1),
        x.size(3) - ((dy.size(3) - 1) * stride[1] - 2 * padding[1] + dilation[1] * (w.size(3) - 1) + 1)};
    // (an empty input or weight, e.g. 0 input channels, takes ATen's backward, which gives zeros)
    const bool eager = !differentiable && !symbolic(x) && !symbolic(dy) && plain_tensor(x) && plain_tensor(dy) &&
                       plain_tensor(w) && (!y.defined() || plain_tensor(y));
    const bool gemm = eager && need_x && groups == 1 && x.is_contiguous() && x.numel() > 0 && w.numel() > 0 &&
                      conv2d_grad_input_gemm(dy.is_contiguous() ? dy : at::empty(dy.sizes(), dy.options()), w, stride,
                                             padding, at::IntArrayRef(op, 2), dilation);
    // (dz is made contiguous; the rule reads dz's shape, dtype and layout, and the Winograd rule
    // also its device and storage: an uninitialised CPU tensor stands for a strided dy, where a
    // meta tensor had kept a non-contiguous dy from the Winograd grad_input)
    at::Tensor dz;
    if (eager && need_w && conv2d_grad_weight_gemm_ok(x, w, groups)) {
      // few input channels: dz, grad_weight and grad_bias image by image (conv2d_weight_backward);
      // a dz tensor only when grad_input needs it
      const at::Tensor dyc = dy.contiguous();
      const at::Tensor yc = act == kIdentity ? dyc : y.contiguous();
      dz = !need_x ? at::Tensor() : (act == kIdentity ? dyc : at::empty(dyc.sizes(), dyc.options()));
      std::tie(dw, db) = conv2d_weight_backward(dyc, yc, act, slope, x, w, stride, padding, dilation, need_b,
                                                act == kIdentity ? at::Tensor() : dz);
      if (!dw.defined()) {
        // a float32 dz holding NaN or inf: grad_weight from torch's own product, whose NaN
        // pattern (oneDNN's blocking over the padding) depends on the shape
        const at::Tensor dzf = dz.defined() ? dz : act_grad_from_output(dyc, yc, act, slope).contiguous();
        dw = std::get<1>(at::convolution_backward(dzf, x, w, c10::nullopt, stride, padding, dilation, false,
                                                  at::IntArrayRef(zero, 2), groups, {false, true, false}));
      }
      if (need_x)
        dx = gemm ? std::get<0>(conv_transpose_fwd_call(dz, w, c10::nullopt, stride, padding, at::IntArrayRef(op, 2),
                                                        1, dilation, kIdentity, 0.0))
                  : std::get<0>(at::convolution_backward(dz, x, w, c10::nullopt, stride, padding, dilation, false,
                                                         at::IntArrayRef(zero, 2), groups, {true, false, false}));
    } else if (gemm) {
      dz = act_grad_from_output(dy, y, act, slope).contiguous();
      dx = std::get<0>(conv_transpose_fwd_call(dz, w, c10::nullopt, stride, padding, at::IntArrayRef(op, 2), 1,
                                               dilation, kIdentity, 0.0));
      if (need_w || need_b)
        std::tie(std::ignore, dw, db) =
            at::convolution_backward(dz, x, w, bias_arg, stride, padding, dilation, false, at::IntArrayRef(zero, 2),
                                     groups, {false, need_w, need_b});
    } else {
      dz = act_grad_from_output(dy, y, act, slope);
      std::tie(dx, dw, db) = at::convolution_backward(dz, x, w, bias_arg, stride, padding, dilation, false,
                                                      at::IntArrayRef(zero, 2), groups, {need_x, need_w, need_b});
    }
    if (need_x) out[0] = dx;
    if (need_w) out[1] = dw;
    if (need_b) out[2] = db;
    return out;
  }
};

at::Tensor conv2d_act_autograd(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t act,
                               double slope) {
  if (!takes(x, w, b, stride, padding, dilation, groups))
    return torch_act_(at::conv2d(x, w, b, stride, padding, dilation, groups), act, slope);
  return Conv2dAct::apply(x, w, b, stride.vec(), padding.vec(), dilation.vec(), groups, act, slope)[0];
}

// Without autograd (inference mode) and for the fake / meta tensors of a trace: the product alone.
at::Tensor conv2d_act_plain(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t act,
                            double slope) {
  if (!takes(x, w, b, stride, padding, dilation, groups))
    return torch_act_(at::conv2d(x, w, b, stride, padding, dilation, groups), act, slope);
  return product(x, w, b, stride, padding, dilation, groups, act, slope);
}

// --- Linear ------------------------------------------------------------------------------------

// Whether these arguments run the product here: a 2-D float32 / float64 CPU input (everything else,
// including (*, in_features) inputs of other ranks, goes to torch's at::linear)
bool takes_linear(const at::Tensor& x, const at::Tensor& w, const OptT& b) {
  if (symbolic(x) || symbolic(w)) return true;
  if (x.dim() != 2 || w.dim() != 2 || !x.device().is_cpu() || !w.device().is_cpu()) return false;
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble) return false;
  if (w.scalar_type() != x.scalar_type() || x.size(1) != w.size(1) || x.size(0) == 0 || w.size(0) == 0) return false;
  if (b.has_value() && b->defined())
    return b->dim() == 1 && b->numel() == w.size(0) && b->scalar_type() == x.scalar_type() && b->device().is_cpu();
  return true;
}

}  // namespace

// y = act(x w^T + b). For 2 to kTransposedRowsMax rows (MLP batches) the BLAS product runs
// transposed, y^T = w x^T (at::mm), and one pass of ours adds the bias, applies the activation
// and writes y's rows (rows_from_transposed): with 64 rows and 256-1024 features that product
// measured 1.2-1.3x faster than x w^T on the 2-core CI CPU (MKL, two threads; 1.15-1.5x with 8
// to 64 rows, 0.87-0.9x from 1024 rows), and the block's forward 1.07-1.2x torch's addmm +
// activation where the product into a fresh tensor in torch's orientation had measured 5-20%
// slower (genfast's linear GEMM for this product ran 0.88-0.99x this path: csrc/cpu/linear_gemm.cpp).
// Elsewhere: ATen's addmm (the bias in the BLAS call, as F.linear), then torch's activation in
// place. x and w as takes_linear admits them (or symbolic: a trace's fake tensors take torch's
// ops).
at::Tensor linear_product(const at::Tensor& x, const at::Tensor& w, const OptT& b, int64_t act, double slope) {
  if (!symbolic(x) && !symbolic(w) && x.dim() == 2 && x.size(0) >= 2 && x.size(0) <= kTransposedRowsMax &&
      x.is_cpu() && w.is_cpu() && plain_tensor(x) && plain_tensor(w) &&
      (!b.has_value() || !b->defined() || plain_tensor(*b)))
    return rows_from_transposed(at::mm(w, x.t()), b, act, slope);
  const bool bias = b.has_value() && b->defined();
  return torch_act_(bias ? at::addmm(*b, x, w.t()) : at::mm(x, w.t()), act, slope);
}

namespace {

// grad_input = dz w and grad_weight = dz^T x: by genfast's linear GEMM where it takes x and w (each
// product on all threads, one after the other), else by BLAS. With both wanted and two threads
// (the CI CPU), each BLAS product runs single-threaded on its own core at once: at MLP sizes (64
// rows, 256-1024 features) one product on two threads measured 0.25-0.35 ms, the pair
// 1.25-1.35x faster side by side. Each is the same BLAS call either way, on the same operands.
void linear_products(const at::Tensor& dz, const at::Tensor& x, const at::Tensor& w, bool need_x, bool need_w,
                     at::Tensor& dx, at::Tensor& dw) {
  if (dz.scalar_type() == at::kFloat && dz.is_contiguous() && linear_gemm_takes(x, w)) {
    if (need_x) dx = linear_gemm_grad_input(dz, w);
    if (need_w) dw = linear_gemm_grad_weight(dz, x);
    return;
  }
  if (need_x) dx = at::empty({dz.size(0), w.size(1)}, dz.options());
  if (need_w) dw = at::empty(w.sizes(), w.options());
  if (need_x && need_w && at::get_num_threads() == 2 && !at::in_parallel_region()) {
    at::parallel_for(0, 2, 1, [&](int64_t t0, int64_t t1) {
      at::AutoDispatchBelowADInplaceOrView guard;  // per thread: the caller's guard is its own
      for (int64_t t = t0; t < t1; ++t) {
        if (t == 0) at::mm_out(dx, dz, w);
        else at::mm_out(dw, dz.t(), x);
      }
    });
    return;
  }
  if (need_x) at::mm_out(dx, dz, w);
  if (need_w) at::mm_out(dw, dz.t(), x);
}

struct LinearAct : public torch::autograd::Function<LinearAct> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const OptT& b,
                               int64_t act, double slope) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      y = linear_product(x, w, b, act, slope);
    }
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, w, act == kIdentity ? at::Tensor() : y});
    ProductArgs{{}, {}, {}, {}, 1, act, slope, b.has_value() && b->defined()}.save(ctx);
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(5);
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &y = saved[2];
    const ProductArgs args = ProductArgs::load(ctx);
    const int64_t act = args.act;
    const double slope = args.slope;
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool need_b = args.has_bias && ctx->needs_input_grad(2);
    at::Tensor dz, dx, dw, db;
    if (at::GradMode::is_enabled() || symbolic(dy) || !dy.device().is_cpu()) {
      // differentiable (create_graph): ATen ops with derivatives
      dz = act_grad_from_output(dy, y, act, slope);
      if (need_b) db = dz.sum(0);
      if (need_x) dx = at::mm(dz, w);
      if (need_w) dw = at::mm(dz.t(), x);
    } else {
      const at::Tensor dyc = dy.contiguous();
      std::tie(dz, db) = rows_grad_pre(dyc, act == kIdentity ? dyc : y, act, slope, need_b);
      linear_products(dz, x, w, need_x, need_w, dx, dw);
    }
    if (need_x) out[0] = dx;
    if (need_w) out[1] = dw;
    if (need_b) out[2] = db;
    return out;
  }
};

at::Tensor linear_act_autograd(const at::Tensor& x, const at::Tensor& w, const OptT& b, int64_t act, double slope) {
  if (!takes_linear(x, w, b)) return torch_act_(at::linear(x, w, b), act, slope);
  return LinearAct::apply(x, w, b, act, slope)[0];
}

at::Tensor linear_act_plain(const at::Tensor& x, const at::Tensor& w, const OptT& b, int64_t act, double slope) {
  if (!takes_linear(x, w, b)) return torch_act_(at::linear(x, w, b), act, slope);
  return linear_product(x, w, b, act, slope);
}

}  // namespace
}  // namespace genfast

TORCH_LIBRARY_IMPL(genfast, Autograd, m) {
  m.impl("conv2d_act", &genfast::conv2d_act_autograd);
  m.impl("linear_act", &genfast::linear_act_autograd);
}

TORCH_LIBRARY_IMPL(genfast, CompositeExplicitAutograd, m) {
  m.impl("conv2d_act", &genfast::conv2d_act_plain);
  m.impl("linear_act", &genfast::linear_act_plain);
}
