// Every genfast schema, in one place. Kernels register per device in csrc/cpu and csrc/cuda;
// fake (meta) implementations and autograd live in genfast/ops.
#include <torch/extension.h>

TORCH_LIBRARY(genfast, m) {
  // BatchNorm + activation. Returns (out, save_mean, save_invstd); save_* are float32 (float64
  // for float64 input). running_mean / running_var are updated in place when training.
  // gamma_floor > 0 clamps |weight| from below (memory_efficient mode, see DESIGN).
  m.def(
      "batch_norm_act_fwd(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps, int activation, "
      "float negative_slope, float gamma_floor) -> (Tensor, Tensor, Tensor)");
  // Backward. `saved` is the input x, or the output y when saved_is_output (memory_efficient).
  // Returns (grad_input, grad_weight, grad_bias); grad_weight/grad_bias have weight's dtype, or
  // the input's when weight is None.
  m.def(
      "batch_norm_act_bwd(Tensor grad_out, Tensor saved, Tensor? weight, Tensor? bias, "
      "Tensor save_mean, Tensor save_invstd, bool training, int activation, "
      "float negative_slope, float gamma_floor, bool saved_is_output) -> (Tensor, Tensor, Tensor)");
  // Transposed convolution + bias + activation (genfast/ops/conv_transpose.py). input (N, C_in,
  // H, W), weight (C_in, C_out/groups, KH, KW). Returns (out, mean, var): with stats, the
  // per-channel mean and biased variance of out (float32; float64 for float64) for a following
  // BatchNorm, else two empty tensors.
  m.def(
      "conv_transpose2d_fwd(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] output_padding, int groups, int[2] dilation, int activation, float negative_slope, "
      "bool stats) -> (Tensor, Tensor, Tensor)");
  // Backward from the saved input and output (act' from the output). Returns (grad_input,
  // grad_weight, grad_bias); each is an empty (0,) tensor when not requested.
  m.def(
      "conv_transpose2d_bwd(Tensor grad_out, Tensor input, Tensor weight, Tensor output, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, int activation, float negative_slope, bool need_input, "
      "bool need_weight, bool has_bias) -> (Tensor, Tensor, Tensor)");
  // The two passes of each direction as separate ops, for SyncBatchNormAct (a collective sits
  // between them). stats -> (mean, M2) per channel (Welford; float32, float64 for float64 input).
  m.def("batch_norm_act_stats(Tensor input) -> (Tensor, Tensor)");
  m.def(
      "batch_norm_act_apply(Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, "
      "int activation, float negative_slope, float gamma_floor) -> Tensor");
  // -> (sum of dz, sum of dz * xhat) per channel, dz = dy * f'(z).
  m.def(
      "batch_norm_act_bwd_reduce(Tensor grad_out, Tensor saved, Tensor? weight, Tensor? bias, "
      "Tensor mean, Tensor invstd, int activation, float negative_slope, float gamma_floor, "
      "bool saved_is_output) -> (Tensor, Tensor)");
  // grad_input from the (global) sums over `count` elements per channel.
  m.def(
      "batch_norm_act_bwd_dx(Tensor grad_out, Tensor saved, Tensor? weight, Tensor? bias, "
      "Tensor mean, Tensor invstd, Tensor sum_dz, Tensor sum_dz_xhat, float count, int activation, "
      "float negative_slope, float gamma_floor, bool saved_is_output) -> Tensor");
}

namespace genfast {
bool built_with_cuda();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("built_with_cuda", &genfast::built_with_cuda,
        "True when the CUDA kernels were compiled into this extension");
}
