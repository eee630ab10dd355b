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
  // batch_norm_act_fwd with its autograd formula in C++ (csrc/batchnorm_autograd.cpp): the
  // output alone, for eager calls. batch_norm_act_ref_grad: (grad_input, grad_weight,
  // grad_bias) of the reference formulas, differentiable (its kernel is Python,
  // genfast/ops/batchnorm_act.py); the create_graph=True backward of batch_norm_act_train.
  // grad_weight / grad_bias are empty when weight / bias are None.
  m.def(
      "batch_norm_act_train(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps, int activation, "
      "float negative_slope, float gamma_floor) -> Tensor");
  m.def(
      "batch_norm_act_ref_grad(Tensor grad_out, Tensor saved, Tensor? weight, Tensor? bias, "
      "Tensor save_mean, Tensor save_invstd, bool training, int activation, float negative_slope, "
      "float gamma_floor, float eps) -> (Tensor, Tensor, Tensor)");
  // Transposed convolution + bias + activation (genfast/ops/conv_transpose.py). input (N, C_in,
  // H, W), weight (C_in, C_out/groups, KH, KW). Returns (out, partials, empty): with stats, the
  // (3, 1, C_out) per-channel (count, mean, M2) of out in float64 for a following BatchNorm
  // (genfast::bn_block_finalize), else two empty tensors.
  m.def(
      "conv_transpose2d_fwd(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] output_padding, int groups, int[2] dilation, int activation, float negative_slope, "
      "bool stats) -> (Tensor, Tensor, Tensor)");
  // The same with its autograd formula in C++ (csrc/conv_transpose_autograd.cpp): the eager CPU
  // path of the modules; arguments its kernel does not take run torch's own conv_transpose2d.
  m.def(
      "conv_transpose2d_act(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] output_padding, int groups, int[2] dilation, int activation, float negative_slope) -> Tensor");
  // Convolution / linear + bias + activation with autograd formulas in C++
  // (csrc/conv_act_autograd.cpp): the eager CPU path of the Conv2d / Linear modules, blocks and
  // GF.conv2d / GF.linear. Arguments they do not take run torch's own conv2d / linear.
  m.def(
      "conv2d_act(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, int activation, float negative_slope) -> Tensor");
  m.def("linear_act(Tensor input, Tensor weight, Tensor? bias, int activation, float negative_slope) -> Tensor");
  // Backward from the saved input and output (act' from the output). Returns (grad_input,
  // grad_weight, grad_bias); each is an empty (0,) tensor when not requested.
  m.def(
      "conv_transpose2d_bwd(Tensor grad_out, Tensor input, Tensor weight, Tensor output, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, int activation, float negative_slope, bool need_input, "
      "bool need_weight, bool has_bias) -> (Tensor, Tensor, Tensor)");
  // The BatchNorm block's finalize (csrc/cpu/conv_transpose.cpp; Triton on CUDA tensors):
  // (3, P, C) partials -> (mean, invstd, scale, shift), running statistics and
  // num_batches_tracked updated in place.
  m.def(
      "bn_block_finalize(Tensor partials, Tensor? conv_bias, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, "
      "float momentum, bool cumulative, float eps, ScalarType out_dtype) -> (Tensor, Tensor, Tensor, Tensor)");
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

  // GAN / VAE / BCE losses (csrc/common/losses.h). Each forward returns the loss and the flat
  // derivative of the loss w.r.t. its inputs (float32, or float64 for float64 input), computed in
  // the same pass; loss_scale_grad is the backward of all of them.
  // gan_loss_fwd: codes kind (bce 0, minimax 1, hinge 2, wasserstein 3, lsgan 4), reduction
  // (none 0, mean 1, sum 2). Returns (out_real, out_fake, grad [real | fake]): for mean/sum
  // out_real is the 0-dim loss and out_fake is empty; for none, the per-element terms.
  m.def(
      "gan_loss_fwd(Tensor? real, Tensor? fake, int kind, bool generator, int reduction, "
      "float real_label) -> (Tensor, Tensor, Tensor)");
  // gan_loss_fwd with its autograd formula in C++ (csrc/loss_autograd.cpp): (out_real, out_fake)
  // as gan_loss_fwd's, for eager calls. gan_loss_ref_grad: the gradients w.r.t. (real, fake) of
  // the reference formulas, differentiable (its kernel is Python, genfast/ops/losses.py); the
  // create_graph=True backward of gan_loss_train. real's gradient is empty when real is None.
  m.def(
      "gan_loss_train(Tensor? real, Tensor fake, int kind, bool generator, int reduction, "
      "float real_label) -> (Tensor, Tensor)");
  m.def(
      "gan_loss_ref_grad(Tensor? real, Tensor fake, Tensor? coef_a, Tensor? coef_b, int kind, "
      "bool generator, int reduction, float real_label) -> (Tensor, Tensor)");
  // (saved[:split] * coef_a, saved[split:] * coef_b) as flat tensors of dtype_a / dtype_b; a
  // coefficient is 0-dim, elementwise, or None (zero gradient).
  m.def(
      "loss_scale_grad(Tensor? coef_a, Tensor? coef_b, Tensor saved, SymInt split, ScalarType dtype_a, "
      "ScalarType dtype_b) -> (Tensor, Tensor)");
  // recon_kind: mse 0, bce 1, bce_logits 2; reduction: sum 2, batchmean 3.
  // Returns (loss, parts [recon, kl], grad [recon | mu | logvar]).
  m.def(
      "vae_loss_fwd(Tensor recon, Tensor target, Tensor mu, Tensor logvar, int recon_kind, float beta, "
      "int reduction) -> (Tensor, Tensor, Tensor)");
  // weight / pos_weight hold one value per input element. Returns (out, grad).
  m.def(
      "bce_loss_fwd(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, int reduction, "
      "bool logits) -> (Tensor, Tensor)");
  // z = mu + eps * exp(0.5 logvar); backward: d logvar = 0.5 grad_z eps exp(0.5 logvar).
  m.def("reparam_fwd(Tensor mu, Tensor logvar, Tensor eps) -> Tensor");
  m.def("reparam_bwd(Tensor grad_z, Tensor logvar, Tensor eps) -> Tensor");
}

namespace genfast {
bool built_with_cuda();
bool cpu_losses_supported();
void set_cpu_row_gemm(const std::string& mode);
std::string cpu_row_gemm();
void set_cpu_winograd(const std::string& mode);
void set_cpu_tap_gemm(const std::string& mode);
void set_cpu_linear_gemm(const std::string& mode);
std::string cpu_linear_gemm();
int64_t cpu_linear_products();
std::string cpu_tap_gemm();
int64_t cpu_tap_products();
std::string cpu_winograd();
int64_t cpu_winograd_products();
bool cpu_row_gemm_active();
c10::optional<at::Tensor> batch_norm_act_eager(const at::Tensor& input, const c10::optional<at::Tensor>& running_mean,
                                               const c10::optional<at::Tensor>& running_var,
                                               const c10::optional<at::Tensor>& weight,
                                               const c10::optional<at::Tensor>& bias, bool training, double momentum,
                                               double eps, int64_t act, double slope);
// csrc/eager_entries.cpp
using OptTensor = c10::optional<at::Tensor>;
OptTensor linear_act_eager(const at::Tensor& x, const at::Tensor& w, const OptTensor& b, int64_t act, double slope);
OptTensor product_bn_eval_eager(const at::Tensor& x, const at::Tensor& w, const OptTensor& b, int64_t kind,
                                const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                                const std::vector<int64_t>& dilation, const std::vector<int64_t>& output_padding,
                                int64_t groups, const at::Tensor& rm, const at::Tensor& rv, const OptTensor& bn_w,
                                const OptTensor& bn_b, double eps, int64_t act, double slope);
OptTensor conv2d_act_eager(const at::Tensor& x, const at::Tensor& w, const OptTensor& b,
                           const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                           const std::vector<int64_t>& dilation, int64_t groups, int64_t act, double slope);
OptTensor conv_transpose2d_act_eager(const at::Tensor& x, const at::Tensor& w, const OptTensor& b,
                                     const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                                     const std::vector<int64_t>& output_padding, int64_t groups,
                                     const std::vector<int64_t>& dilation, int64_t act, double slope);
c10::optional<std::tuple<at::Tensor, at::Tensor>> gan_loss_eager(const OptTensor& real, const at::Tensor& fake,
                                                                 int64_t kind, bool generator, int64_t reduction,
                                                                 double real_label);
OptTensor reparameterize_eager(const at::Tensor& mu, const at::Tensor& logvar);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("built_with_cuda", &genfast::built_with_cuda,
        "True when the CUDA kernels were compiled into this extension");
  m.def("cpu_losses_supported", &genfast::cpu_losses_supported,
        "True when this CPU has the instructions the CPU loss kernels were compiled for");
  m.def("set_cpu_row_gemm", &genfast::set_cpu_row_gemm, py::arg("mode"),
        "The CPU transposed convolution's GEMM form with the row layout (more than 8 output "
        "channels): 'auto' (by shape: from a 1x1 input, or with KH*KW <= 4*SH*SW, where it "
        "measured faster than ATen's product), 'always', 'never' or 'images_inner' (auto, plus the "
        "images-inner layout for the layers with more than 4 columns per output value, e.g. k5 s2)");
  m.def("cpu_row_gemm", &genfast::cpu_row_gemm, "The mode set_cpu_row_gemm set ('auto' at start)");
  m.def("set_cpu_winograd", &genfast::set_cpu_winograd, py::arg("mode"),
        "The CPU k4 s2 p1 products (float32, NCHW) by Winograd's F(4x4, 2x2): the transposed "
        "convolution's forward and grad_input, and Conv2d's forward (conv2d_act, its no-grad call and "
        "the eval BatchNorm block) and its grad_input where that runs the GEMM form. 'auto' (by "
        "shape, where it measured faster: maps that are multiples of 4, at least 64 input and 32 output "
        "channels as a transposed convolution, from 64 4x4 tiles over the batch with at least 4 per "
        "image or from 16 in one image; scratch within 64 MB for the weight and 32 MB per image), "
        "'always' or 'never'");
  m.def("cpu_winograd", &genfast::cpu_winograd, "The mode set_cpu_winograd set ('auto' at start)");
  m.def("set_cpu_tap_gemm", &genfast::set_cpu_tap_gemm, py::arg("mode"),
        "The CPU transposed convolution's product by genfast's AVX2 GEMM over the taps that land in the "
        "output (float32, NCHW, groups 1; csrc/cpu/conv_transpose_taps.cpp): 'auto' (where it measured "
        "faster: an AVX2 CPU without AVX-512, at most 90% of the (pixel, tap) pairs landing in the "
        "output, a block of 16 output channels per thread), 'always' (any such call on a CPU with "
        "AVX2 and FMA) or 'never'");
  m.def("cpu_tap_gemm", &genfast::cpu_tap_gemm, "The mode set_cpu_tap_gemm set ('auto' at start)");
  m.def("set_cpu_linear_gemm", &genfast::set_cpu_linear_gemm, py::arg("mode"),
        "The CPU Linear layer's backward products (grad_input, grad_weight; float32, contiguous) by "
        "genfast's AVX2 GEMM (csrc/cpu/linear_gemm.cpp): 'auto' (where it measured faster than MKL: an "
        "AVX2 CPU without AVX-512, more than one thread, 16 to 128 rows, at least 128 input and output "
        "features), 'always' (any such call on a CPU with AVX2 and FMA) or 'never'");
  m.def("cpu_linear_gemm", &genfast::cpu_linear_gemm, "The mode set_cpu_linear_gemm set ('auto' at start)");
  m.def("cpu_linear_products", &genfast::cpu_linear_products,
        "How many products genfast's linear GEMM has run in this process");
  m.def("cpu_tap_products", &genfast::cpu_tap_products,
        "How many tap products the CPU transposed convolution has run in this process");
  m.def("cpu_winograd_products", &genfast::cpu_winograd_products,
        "How many Winograd products the CPU transposed convolution has returned in this process "
        "(calls that fell back to the direct product on a non-finite value do not count)");
  m.def("batch_norm_act_eager", &genfast::batch_norm_act_eager, py::call_guard<py::gil_scoped_release>(),
        "The eager CPU BatchNorm + activation call (genfast::batch_norm_act_train) when its arguments "
        "take it (see csrc/batchnorm_autograd.cpp), else None");
  // The eager CPU entries of the products, the GAN loss and the reparameterisation
  // (csrc/eager_entries.cpp): the op's result, or None where the checked Python path must run.
  // Each runs without the GIL once its arguments are converted, as torch's own operator bindings
  // do (other Python threads run meanwhile; a Python kernel or mode reached through the
  // dispatcher takes the GIL itself).
  m.def("linear_act_eager", &genfast::linear_act_eager, py::call_guard<py::gil_scoped_release>(), "genfast::linear_act's eager CPU call, or None");
  m.def("product_bn_eval_eager", &genfast::product_bn_eval_eager, py::call_guard<py::gil_scoped_release>(),
        "act(eval BatchNorm(linear, conv2d or conv_transpose2d)) for a call that records no backward, or None");
  m.def("conv2d_act_eager", &genfast::conv2d_act_eager, py::call_guard<py::gil_scoped_release>(), "genfast::conv2d_act's eager CPU call, or None");
  m.def("conv_transpose2d_act_eager", &genfast::conv_transpose2d_act_eager, py::call_guard<py::gil_scoped_release>(),
        "genfast::conv_transpose2d_act's eager CPU call, or None");
  m.def("gan_loss_eager", &genfast::gan_loss_eager, py::call_guard<py::gil_scoped_release>(), "genfast::gan_loss_train's eager CPU call, or None");
  m.def("reparameterize_eager", &genfast::reparameterize_eager, py::call_guard<py::gil_scoped_release>(),
        "The eager CPU reparameterisation (noise from torch's generator, C++ autograd), or None");
  m.def("cpu_row_gemm_active", &genfast::cpu_row_gemm_active,
        "Whether the row layout of the GEMM form can run now (False under 'never'; 'auto' takes it "
        "by shape)");
}
