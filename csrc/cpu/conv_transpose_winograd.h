// The CPU transposed convolutions k4 s2 p1 (DCGAN's layers) and k5 s2 p2 (the Keras-style 28x28
// models' layers) by Winograd's minimal filtering, F(4x4, 2x2) and F(4x4, 3x3):
// csrc/cpu/conv_transpose_winograd.cpp says how and why.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace genfast {

// Whether conv_transpose2d(x, w, stride, padding, output_padding, groups, dilation) takes the
// Winograd product now: float32, NCHW x and weight, groups 1, kernel 4 with padding 1 or kernel 5
// with padding 2 (output_padding 1), stride 2, dilation 1, output 2H x 2W, a non-empty batch; under "auto" only the shapes where it measured
// faster (see the .cpp), under "always" every such call, under "never" none.
bool winograd_s2_takes(const at::Tensor& x, const at::Tensor& w, int64_t groups, int64_t KH, int64_t KW, int64_t SH,
                         int64_t SW, int64_t PH, int64_t PW, int64_t DH, int64_t DW, int64_t Hout, int64_t Wout);

// The product (no bias) of that transposed convolution of x (N, C_in, H, W) by w (C_in, C_out,
// 4, 4) or (C_in, C_out, 5, 5), float32, as a new contiguous (N, C_out, 2H, 2W) tensor; an undefined tensor
// when a computed value came out non-finite (an inf or NaN in x or w, or an overflow), where
// the caller runs its direct product instead, which gives torch's values.
at::Tensor winograd_conv_transpose_s2(const at::Tensor& x, const at::Tensor& w);

// grad_input (N, C_in, H, W) of that transposed convolution from dz (N, C_out, 2H, 2W), the
// gradient of its product, float32 (the same algorithm, the four phases summed inside the
// products); an undefined tensor when a computed value came out non-finite.
at::Tensor winograd_conv_transpose_s2_grad_input(const at::Tensor& dz, const at::Tensor& w, int64_t H, int64_t W);

// Whether conv2d(x, w, None, stride, padding, dilation, groups) takes that grad_input as its
// product (a Conv2d k4 s2 p1 or k5 s2 p2 is the grad_input of the transposed convolution with
// the same weight): float32, NCHW x and weight, groups 1, even H and W; "auto" by the transposed
// convolution's rule (C_out -> C_in channels from H/2 x W/2).
bool winograd_s2_conv2d_takes(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// The mode: "auto", "always" or "never" (genfast._C.set_cpu_winograd).
void set_cpu_winograd(const std::string& mode);
std::string cpu_winograd();

}  // namespace genfast
