// genfast::conv2d_act: convolution + bias + activation with its autograd formula in C++, for
// eager calls on the CPU (genfast/ops/conv_act.py: the drop-in Conv2d, GF.conv2d and the
// products of the Conv2d -> BatchNorm -> activation blocks, outside torch.compile).
//
// Forward: torch's own product (at::convolution, oneDNN, bias included), the activation in
// place; saves input, weight and (for an activation) the output.
// Backward: dz = dy * act'(y) (torch's activation backward kernels), then
//   grad_input  = the transposed convolution of dz by the same weight. Where its GEMM form
//                 applies (groups 1, NCHW, every strided layer: csrc/cpu/conv_transpose.cpp),
//                 genfast::conv_transpose2d_fwd computes it: measured on the 2-core CI CPU,
//                 1.2-1.6x faster than ATen's convolution backward for the DCGAN discriminator's
//                 k4 s2 layers, 4-9x for 1- and 3-channel inputs (ATen's oneDNN backward runs
//                 those at a few GFLOP/s), a tie for the 28x28 Keras k5 s2 layer;
//   grad_weight, grad_bias = ATen's convolution backward (oneDNN), without grad_input.
// Elsewhere (groups > 1, channels_last, stride 1) ATen's convolution backward computes all
// three at once. A create_graph backward runs dz in differentiable ATen ops and
// at::convolution_backward (which has a double backward): gradient-penalty GANs.
//
// Arguments the product does not take here (not a 4-D float32 / float64 CPU input, mismatched
// shapes or dtypes, invalid geometry, an empty batch) run torch's own at::conv2d and
// activation, so that torch raises its own exceptions for bad input (and handles unbatched input).
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

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

at::Tensor product(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t act, double slope) {
  const int64_t zero[2] = {0, 0};
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
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["act"] = act;
    ctx->saved_data["slope"] = slope;
    ctx->saved_data["has_bias"] = b.has_value() && b->defined();
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(9);
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &y = saved[2];
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    const int64_t groups = ctx->saved_data["groups"].toInt(), act = ctx->saved_data["act"].toInt();
    const double slope = ctx->saved_data["slope"].toDouble();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool need_b = has_bias && ctx->needs_input_grad(2);
    const bool differentiable = at::GradMode::is_enabled();
    at::Tensor dz = act_grad_from_output(dy, y, act, slope);
    const std::vector<int64_t> bias_sizes{w.size(0)};
    const at::OptionalIntArrayRef bias_arg =
        has_bias ? at::OptionalIntArrayRef(bias_sizes) : at::OptionalIntArrayRef(c10::nullopt);
    const int64_t zero[2] = {0, 0};
    at::Tensor dx, dw, db;
    // output_padding of the transposed convolution that maps dz back onto x's size (< stride)
    const int64_t op[2] = {
        x.size(2) - ((dy.size(2) - 1) * stride[0] - 2 * padding[0] + dilation[0] * (w.size(2) - 1) + 1),
        x.size(3) - ((dy.size(3) - 1) * stride[1] - 2 * padding[1] + dilation[1] * (w.size(3) - 1) + 1)};
    bool gemm = !differentiable && need_x && groups == 1 && x.is_contiguous() && !symbolic(x);
    if (gemm) {
      dz = dz.contiguous();
      gemm = conv_transpose_gemm_form(dz, w, stride, padding, at::IntArrayRef(op, 2), 1, dilation);
    }
    if (gemm) {
      dx = std::get<0>(conv_transpose_fwd_call(dz, w, c10::nullopt, stride, padding, at::IntArrayRef(op, 2), 1,
                                               dilation, kIdentity, 0.0));
      if (need_w || need_b)
        std::tie(std::ignore, dw, db) =
            at::convolution_backward(dz, x, w, bias_arg, stride, padding, dilation, false, at::IntArrayRef(zero, 2),
                                     groups, {false, need_w, need_b});
    } else {
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

}  // namespace
}  // namespace genfast

TORCH_LIBRARY_IMPL(genfast, Autograd, m) { m.impl("conv2d_act", &genfast::conv2d_act_autograd); }

TORCH_LIBRARY_IMPL(genfast, CompositeExplicitAutograd, m) { m.impl("conv2d_act", &genfast::conv2d_act_plain); }
