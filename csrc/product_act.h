// Helpers shared by the C++ autograd functions of the products with an activation
// (conv_transpose_autograd.cpp, conv_act_autograd.cpp): torch's activation in place on a fresh
// product, dz = dy * act'(y) from the saved output in ATen ops, and the call of the transposed
// convolution's GEMM-form kernel.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include "common/activation.h"
#include "common/tensor_layout.h"

namespace genfast {

// The non-tensor arguments a product's autograd node keeps for its backward (output_padding is
// the transposed convolution's; the Linear node keeps no geometry).
struct ProductArgs {
  std::vector<int64_t> stride, padding, output_padding, dilation;
  int64_t groups = 1, act = 0;
  double slope = 0.0;
  bool has_bias = false;

  void save(torch::autograd::AutogradContext* ctx) const {
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["output_padding"] = output_padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["act"] = act;
    ctx->saved_data["slope"] = slope;
    ctx->saved_data["has_bias"] = has_bias;
  }
  static ProductArgs load(torch::autograd::AutogradContext* ctx) {
    ProductArgs a;
    a.stride = ctx->saved_data["stride"].toIntVector();
    a.padding = ctx->saved_data["padding"].toIntVector();
    a.output_padding = ctx->saved_data["output_padding"].toIntVector();
    a.dilation = ctx->saved_data["dilation"].toIntVector();
    a.groups = ctx->saved_data["groups"].toInt();
    a.act = ctx->saved_data["act"].toInt();
    a.slope = ctx->saved_data["slope"].toDouble();
    a.has_bias = ctx->saved_data["has_bias"].toBool();
    return a;
  }
};

// Whether t is an ordinary tensor whose data our kernels may read: not a fake or other Python
// subclass tensor (the Python dispatch key: a trace's fake tensors with fixed sizes, which the
// symbolic-size checks miss) nor a functorch wrapper (no storage).
inline bool plain_tensor(const at::Tensor& t) {
  return t.has_storage() && !t.key_set().has(c10::DispatchKey::Python);
}

// torch's activation, in place on a fresh product
inline at::Tensor torch_act_(at::Tensor y, int64_t act, double slope) {
  // torch's out-of-place activation: contiguous strides for a contiguous product
  if (act != kIdentity) y = with_contiguous_strides(y);
  switch (act) {
    case kRelu: return at::relu_(y);
    case kLeakyRelu: return at::leaky_relu_(y, slope);
    case kTanh: return at::tanh_(y);
    case kSigmoid: return at::sigmoid_(y);
    default: return y;
  }
}

// dz = dy * act'(y) from the activation's output y: torch's own activation backward ops, which
// have derivatives in dy and y (a create_graph backward connects y as torch's does).
inline at::Tensor act_grad_from_output(const at::Tensor& dy, const at::Tensor& y, int64_t act, double slope) {
  switch (act) {
    case kRelu: return at::threshold_backward(dy, y, 0);
    case kLeakyRelu: return at::leaky_relu_backward(dy, y, slope, /*self_is_result=*/true);
    case kTanh: return at::tanh_backward(dy, y);
    case kSigmoid: return at::sigmoid_backward(dy, y);
    default: return dy;
  }
}

// csrc/cpu/conv_transpose.cpp, on arguments the caller has validated: whether the transposed
// convolution of x by w takes the GEMM form (conv_transpose2d_fwd's own product).
bool conv_transpose_gemm_form(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef output_padding, int64_t groups,
                              at::IntArrayRef dilation);

// csrc/cpu/conv_transpose.cpp, on arguments the caller has validated: whether the backward of
// the transposed convolution of x by w runs the GEMM form (im2col prologue + two BLAS products).
bool conv_transpose_gemm_backward(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef output_padding, int64_t groups,
                                  at::IntArrayRef dilation);

// csrc/cpu/conv_transpose.cpp: whether conv2d_act's grad_input (the transposed convolution of dz
// by w, groups 1) runs the GEMM form, on arguments the caller has validated.
bool conv2d_grad_input_gemm(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef output_padding, at::IntArrayRef dilation);

// csrc/cpu/conv_transpose.cpp: whether conv2d_act's grad_weight and grad_bias run
// conv2d_weight_backward (few input channels, groups 1, contiguous float32 / float64 x and w),
// and that backward: (grad_weight, grad_bias or undefined) from dy and the saved output y (any
// tensor for the identity), both contiguous, writing dz = dy * act'(y) into dz_out when it is
// defined (a contiguous tensor of dy's size, for grad_input; not for the identity). grad_weight
// is undefined when a float32 dz holds NaN or inf: the caller then takes it from torch's own
// product, whose NaN pattern depends on the shape. On arguments the caller has validated.
bool conv2d_grad_weight_gemm_ok(const at::Tensor& x, const at::Tensor& w, int64_t groups);
std::tuple<at::Tensor, at::Tensor> conv2d_weight_backward(const at::Tensor& dy, const at::Tensor& y, int64_t act,
                                                          double slope, const at::Tensor& x, const at::Tensor& w,
                                                          at::IntArrayRef stride, at::IntArrayRef padding,
                                                          at::IntArrayRef dilation, bool need_bias,
                                                          const at::Tensor& dz_out);

// csrc/cpu/conv_transpose.cpp: the Linear layer's backward prologue ((dz, grad_bias or
// undefined)) on dense (M, C) float32 / float64 rows.
std::tuple<at::Tensor, at::Tensor> rows_grad_pre(const at::Tensor& dy, const at::Tensor& y, int64_t act, double slope,
                                                 bool need_bias);

// csrc/conv_act_autograd.cpp: the Linear layer's forward product, act(x w^T + b), on 2-D float32 /
// float64 CPU tensors of matching shapes (the caller checks them); from 2 to kTransposedRowsMax
// rows through the transposed BLAS product and rows_from_transposed, else addmm + torch's
// activation in place.
constexpr int64_t kTransposedRowsMax = 128;
at::Tensor linear_product(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b, int64_t act,
                          double slope);

// csrc/cpu/conv_transpose.cpp: the Linear layer's forward epilogue, y (M, C) = act(pt^T + bias)
// from the product pt (C, M) = w x^T (its rows dense, any distance apart), on float32 / float64
// the caller has validated.
at::Tensor rows_from_transposed(const at::Tensor& pt, const c10::optional<at::Tensor>& bias, int64_t act,
                                double slope);

// genfast::conv_transpose2d_fwd through the dispatcher (its CPU kernel is in csrc/cpu), without
// BatchNorm statistics: (out, empty, empty).
using ProductTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
inline ProductTriple conv_transpose_fwd_call(const at::Tensor& x, const at::Tensor& w,
                                             const c10::optional<at::Tensor>& b, at::IntArrayRef stride,
                                             at::IntArrayRef padding, at::IntArrayRef output_padding, int64_t groups,
                                             at::IntArrayRef dilation, int64_t act, double slope) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("genfast::conv_transpose2d_fwd", "")
          .typed<ProductTriple(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, at::IntArrayRef,
                               at::IntArrayRef, at::IntArrayRef, int64_t, at::IntArrayRef, int64_t, double, bool)>();
  return op.call(x, w, b, stride, padding, output_padding, groups, dilation, act, slope, false);
}

}  // namespace genfast
