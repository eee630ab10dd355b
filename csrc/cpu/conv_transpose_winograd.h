// The CPU transposed convolution k4 s2 p1 (DCGAN's generator layer) by Winograd's minimal
// filtering F(4x4, 2x2): csrc/cpu/conv_transpose_winograd.cpp says how and why.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace genfast {

// Whether conv_transpose2d(x, w, stride, padding, output_padding, groups, dilation) takes the
// Winograd product now: float32, NCHW x and weight, groups 1, kernel 4, stride 2, padding 1,
// dilation 1, output 2H x 2W, a non-empty batch; under "auto" only the shapes where it measured
// faster (see the .cpp), under "always" every such call, under "never" none.
bool winograd_k4s2_takes(const at::Tensor& x, const at::Tensor& w, int64_t groups, int64_t KH, int64_t KW, int64_t SH,
                         int64_t SW, int64_t PH, int64_t PW, int64_t DH, int64_t DW, int64_t Hout, int64_t Wout);

// The product (no bias) of the k4 s2 p1 transposed convolution of x (N, C_in, H, W) by w (C_in,
// C_out, 4, 4), float32, as a new contiguous (N, C_out, 2H, 2W) tensor; an undefined tensor
// when a computed value came out non-finite (an inf or NaN in x or w, or an overflow), where
// the caller runs its direct product instead, which gives torch's values.
at::Tensor winograd_conv_transpose_k4s2(const at::Tensor& x, const at::Tensor& w);

// grad_input (N, C_in, H, W) of that transposed convolution from dz (N, C_out, 2H, 2W), the
// gradient of its product, float32 (the same F(4x4, 2x2), the four phases summed inside the
// products); an undefined tensor when a computed value came out non-finite.
at::Tensor winograd_conv_transpose_k4s2_grad_input(const at::Tensor& dz, const at::Tensor& w, int64_t H, int64_t W);

// Whether conv2d(x, w, None, stride, padding, dilation, groups) takes that grad_input as its
// product (a Conv2d k4 s2 p1 is the grad_input of the transposed convolution with the same
// weight): float32, NCHW x and weight, groups 1, even H and W; "auto" by the transposed
// convolution's rule (C_out -> C_in channels from H/2 x W/2).
bool winograd_k4s2_conv2d_takes(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// The mode: "auto", "always" or "never" (genfast._C.set_cpu_winograd).
void set_cpu_winograd(const std::string& mode);
std::string cpu_winograd();

}  // namespace genfast
