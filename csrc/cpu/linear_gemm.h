// The CPU Linear layer's backward products (grad_input, grad_weight) by genfast's own AVX2 GEMM
// for MLP batches: csrc/cpu/linear_gemm.cpp says how and why.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace genfast {

// Whether the backward products of the Linear layer with input x (M, K) and weight w (N, K) run
// here now: float32, contiguous 2-D x and w (ordinary tensors: the caller checks that they are
// not fake or symbolic), M, N, K >= 1, a CPU with AVX2 and FMA; under "auto" only where it measured faster
// than MKL (see the .cpp), under "always" every such call, under "never" none.
bool linear_gemm_takes(const at::Tensor& x, const at::Tensor& w);

// grad_input (M, K) = dz w from dz (M, N) and w (N, K); float32, contiguous.
at::Tensor linear_gemm_grad_input(const at::Tensor& dz, const at::Tensor& w);

// grad_weight (N, K) = dz^T x from dz (M, N) and x (M, K); float32, contiguous.
at::Tensor linear_gemm_grad_weight(const at::Tensor& dz, const at::Tensor& x);

// The mode: "auto", "always" or "never" (genfast._C.set_cpu_linear_gemm).
void set_cpu_linear_gemm(const std::string& mode);
std::string cpu_linear_gemm();
// How many products (grad_input and grad_weight count one each) have run here in this process
// (the tests' evidence of the path).
int64_t cpu_linear_products();

}  // namespace genfast
