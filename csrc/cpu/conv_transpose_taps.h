// The CPU transposed convolution's product by our own AVX2 GEMM that computes only the taps which
// land inside the output: csrc/cpu/conv_transpose_taps.cpp says how and why.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace genfast {

// Whether conv_transpose2d(x, w, stride, padding, output_padding, groups=1, dilation) with output
// (Hout, Wout) takes the tap product now: float32, NCHW-contiguous x and weight, groups 1, a
// non-empty batch and weight, a CPU with AVX2 and FMA; under "auto" only the shapes and CPUs where
// it measured faster (see the .cpp), under "always" every such call, under "never" none.
bool tap_gemm_takes(const at::Tensor& x, const at::Tensor& w, int64_t groups, int64_t SH, int64_t SW, int64_t PH,
                    int64_t PW, int64_t DH, int64_t DW, int64_t Hout, int64_t Wout);

// The product (no bias) of that transposed convolution of x (N, C_in, H, W) by w (C_in, C_out,
// KH, KW), float32, as a new contiguous (N, C_out, Hout, Wout) tensor.
at::Tensor tap_conv_transpose(const at::Tensor& x, const at::Tensor& w, int64_t SH, int64_t SW, int64_t PH,
                              int64_t PW, int64_t DH, int64_t DW, int64_t Hout, int64_t Wout);

// grad_input (N, C_in, H, W) of that transposed convolution from dz (N, C_out, Hout, Wout), the
// gradient of its product, and w; float32, over the same (pixel, tap) pairs.
at::Tensor tap_conv_transpose_grad_input(const at::Tensor& dz, const at::Tensor& w, int64_t H, int64_t W,
                                         int64_t SH, int64_t SW, int64_t PH, int64_t PW, int64_t DH, int64_t DW);

// grad_weight (C_in, C_out, KH, KW) of that transposed convolution from x and dz; float32.
at::Tensor tap_conv_transpose_grad_weight(const at::Tensor& x, const at::Tensor& dz, int64_t KH, int64_t KW,
                                          int64_t SH, int64_t SW, int64_t PH, int64_t PW, int64_t DH, int64_t DW);

// The mode: "auto", "always" or "never" (genfast._C.set_cpu_tap_gemm).
void set_cpu_tap_gemm(const std::string& mode);
std::string cpu_tap_gemm();
// How many tap products have run in this process (the tests' evidence of the path).
int64_t cpu_tap_products();

}  // namespace genfast
