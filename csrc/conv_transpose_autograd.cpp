// genfast::conv_transpose2d_act: transposed convolution + bias + activation with its autograd
// formula in C++, for eager calls on the CPU (the drop-in modules and the blocks' products),
// for torch.compile's CPU graphs (genfast/ops/conv_transpose.py, conv_transpose2d: batched
// input) and for the registered op's CPU forward in float32 / float64. A Python autograd.Function
// around conv_transpose2d_fwd / _bwd would cost tens of microseconds per layer and step.
//
// Forward: genfast::conv_transpose2d_fwd (the GEMM product + col2im epilogue, csrc/cpu/
// conv_transpose.cpp; where the row layout is off on this CPU but the backward takes the GEMM
// form, ATen's product + our epilogue), saving input, weight and output. Backward: genfast::conv_transpose2d_bwd
// (our dz prologue, then the GEMM form over the batch from inputs of up to 16 pixels or with a
// thread per image from 128, ATen's convolution backward between). A create_graph backward
// runs the same formula in differentiable ATen ops (dz = dy * act'(y), then
// at::convolution_backward, which has a double backward).
//
// Arguments the C++ kernel does not take (not a 4-D float32 / float64 NCHW input, groups > 1,
// mismatched shapes or dtypes, invalid geometry, or a shape where neither the forward (the GEMM
// form or the Winograd product) nor (when a gradient is wanted) the backward takes the GEMM form) run
// torch's own at::conv_transpose2d and activation, so that torch raises its own exceptions for
// bad input.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "cpu/conv_transpose_taps.h"
#include "cpu/conv_transpose_winograd.h"
#include "product_act.h"

namespace genfast {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptT = c10::optional<at::Tensor>;
using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Triple call_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& y,
                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t act,
                double slope, bool need_input, bool need_weight, bool has_bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("genfast::conv_transpose2d_bwd", "")
                             .typed<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, int64_t, double,
                                           bool, bool, bool)>();
  return op.call(dy, x, w, y, stride, padding, dilation, groups, act, slope, need_input, need_weight, has_bias);
}

// Whether the C++ kernel takes these arguments (everything else goes to torch)
bool kernel_takes(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
                  at::IntArrayRef padding, at::IntArrayRef output_padding, int64_t groups, at::IntArrayRef dilation,
                  bool training) {
  // traced with symbolic sizes (torch.compile with dynamic shapes, AOT dispatch): the registered
  // ops genfast::conv_transpose2d_fwd / _bwd and their fakes, which take batched (N, C, H, W)
  // input of any layout, groups and dtype (callers pass batched input only)
  if (x.unsafeGetTensorImpl()->has_symbolic_sizes_strides() || w.unsafeGetTensorImpl()->has_symbolic_sizes_strides())
    return true;
  if (x.dim() != 4 || w.dim() != 4 || groups != 1 || !x.device().is_cpu() || !w.device().is_cpu()) return false;
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble) return false;
  if (w.scalar_type() != x.scalar_type() || !x.is_contiguous() || x.size(0) == 0 || x.size(1) != w.size(0))
    return false;
  if (stride.size() != 2 || padding.size() != 2 || output_padding.size() != 2 || dilation.size() != 2) return false;
  int64_t out[2];
  for (int d = 0; d < 2; ++d) {
    if (stride[d] <= 0 || dilation[d] <= 0 || padding[d] < 0 || output_padding[d] < 0) return false;
    if (output_padding[d] >= stride[d] && output_padding[d] >= dilation[d]) return false;
    out[d] = (x.size(2 + d) - 1) * stride[d] - 2 * padding[d] + dilation[d] * (w.size(2 + d) - 1) +
             output_padding[d] + 1;
    if (out[d] <= 0 || x.size(2 + d) == 0) return false;
  }
  if (b.has_value() && b->defined()) {
    if (b->dim() != 1 || b->numel() != w.size(1) || b->scalar_type() != x.scalar_type() || !b->device().is_cpu())
      return false;
  }
  // only where the GEMM form, the Winograd product or the tap product runs, forward or (with a backward to come)
  // backward: elsewhere torch's product with its bias and torch's activation measured at least as
  // fast as ATen's product without bias plus our epilogue. Where only the backward takes it, the
  // forward is ATen's product and our epilogue; where only the forward does (the k5 s2 layers by
  // Winograd), the backward is our dz pass, Winograd's grad_input and ATen's grad_weight.
  return w.size(1) > 0 &&
         (conv_transpose_gemm_form(x, w, stride, padding, output_padding, groups, dilation) ||
          winograd_s2_takes(x, w, groups, w.size(2), w.size(3), stride[0], stride[1], padding[0], padding[1],
                            dilation[0], dilation[1], out[0], out[1]) ||
          tap_gemm_takes(x, w, groups, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], out[0],
                         out[1]) ||
          (training && conv_transpose_gemm_backward(x, w, stride, padding, output_padding, groups, dilation)));
}

struct ConvTransposeAct : public torch::autograd::Function<ConvTransposeAct> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const OptT& b,
                               std::vector<int64_t> stride, std::vector<int64_t> padding,
                               std::vector<int64_t> output_padding, int64_t groups, std::vector<int64_t> dilation,
                               int64_t act, double slope) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      y = std::get<0>(conv_transpose_fwd_call(x, w, b, stride, padding, output_padding, groups, dilation, act, slope));
    }
    ctx->set_materialize_grads(false);
    // the output only where the backward reads it: with no activation, the caller may modify it in
    // place before the backward, as after torch's conv_transpose2d
    ctx->save_for_backward({x, w, act == kIdentity ? at::Tensor() : y});
    ProductArgs{stride, padding, output_padding, dilation, groups, act, slope, b.has_value() && b->defined()}.save(
        ctx);
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(10);
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const ProductArgs args = ProductArgs::load(ctx);
    // with no activation y is not saved: dy stands in for it (the kernels do not read it then)
    const at::Tensor &x = saved[0], &w = saved[1], &y = args.act == kIdentity ? dy : saved[2];
    const std::vector<int64_t>&stride = args.stride, &padding = args.padding, &output_padding = args.output_padding,
                               &dilation = args.dilation;
    const int64_t groups = args.groups, act = args.act;
    const double slope = args.slope;
    const bool has_bias = args.has_bias;
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool need_b = has_bias && ctx->needs_input_grad(2);
    at::Tensor dx, dw, db;
    if (at::GradMode::is_enabled()) {
      // differentiable: dz = dy * act'(y) in ATen ops, then ATen's convolution backward
      const at::Tensor dz = act_grad_from_output(dy, y, act, slope);
      const std::vector<int64_t> bias_sizes{w.size(1) * groups};
      std::tie(dx, dw, db) = at::convolution_backward(dz, x, w, has_bias ? at::OptionalIntArrayRef(bias_sizes)
                                                                         : at::OptionalIntArrayRef(c10::nullopt),
                                                      stride, padding, dilation, true, output_padding, groups,
                                                      {need_x, need_w, need_b});
    } else {
      std::tie(dx, dw, db) = call_bwd(dy, x, w, y, stride, padding, dilation, groups, act, slope, need_x, need_w,
                                      need_b);
    }
    if (need_x) out[0] = dx;
    if (need_w) out[1] = dw;
    if (need_b) out[2] = db;
    return out;
  }
};

at::Tensor conv_transpose2d_act_autograd(const at::Tensor& x, const at::Tensor& w, const OptT& b,
                                         at::IntArrayRef stride, at::IntArrayRef padding,
                                         at::IntArrayRef output_padding, int64_t groups, at::IntArrayRef dilation,
                                         int64_t act, double slope) {
  const bool training = at::GradMode::is_enabled() &&
                        (x.requires_grad() || w.requires_grad() || (b.has_value() && b->requires_grad()));
  if (!kernel_takes(x, w, b, stride, padding, output_padding, groups, dilation, training))
    return torch_act_(at::conv_transpose2d(x, w, b, stride, padding, output_padding, groups, dilation), act, slope);
  return ConvTransposeAct::apply(x, w, b, stride.vec(), padding.vec(), output_padding.vec(), groups, dilation.vec(),
                                 act, slope)[0];
}

// Without autograd (inference mode): the forward kernel alone.
at::Tensor conv_transpose2d_act_plain(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef output_padding, int64_t groups,
                                      at::IntArrayRef dilation, int64_t act, double slope) {
  if (!kernel_takes(x, w, b, stride, padding, output_padding, groups, dilation, /*training=*/false))
    return torch_act_(at::conv_transpose2d(x, w, b, stride, padding, output_padding, groups, dilation), act, slope);
  return std::get<0>(conv_transpose_fwd_call(x, w, b, stride, padding, output_padding, groups, dilation, act, slope));
}

}  // namespace
}  // namespace genfast

TORCH_LIBRARY_IMPL(genfast, Autograd, m) {
  m.impl("conv_transpose2d_act", &genfast::conv_transpose2d_act_autograd);
}

TORCH_LIBRARY_IMPL(genfast, CompositeExplicitAutograd, m) {
  m.impl("conv_transpose2d_act", &genfast::conv_transpose2d_act_plain);
}
