// Reparameterisation z = mu + eps * exp(0.5 logvar), shared by the C++ CPU and CUDA kernels.
// Kept apart from losses.h so that the CPU file can compile it for the baseline ISA (no FMA
// contraction of torch's separate product and sum; see csrc/cpu/losses.cpp).
#pragma once
#include <cmath>
#include "macros.h"

namespace genfast {

// A product and a sum rounded on their own, never contracted into a fused multiply-add, as
// torch's separate mul and add kernels round them (host code is built without FMA contraction:
// see csrc/cpu/losses.cpp).
GENFAST_HOST_DEVICE float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
GENFAST_HOST_DEVICE double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
GENFAST_HOST_DEVICE float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
GENFAST_HOST_DEVICE double add_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// z = mu + eps * s with s = exp(0.5 lv) already in scalar_t: torch's last two ops, each result
// rounded to scalar_t (computed in acc_t, torch's opmath type).
template <typename scalar_t, typename acc_t>
GENFAST_HOST_DEVICE scalar_t reparam_combine(scalar_t mu, scalar_t eps, scalar_t s) {
  const scalar_t p = static_cast<scalar_t>(mul_rn(static_cast<acc_t>(eps), static_cast<acc_t>(s)));
  return static_cast<scalar_t>(add_rn(static_cast<acc_t>(mu), static_cast<acc_t>(p)));
}

// z = mu + eps * exp(0.5 lv) in torch's order, every intermediate rounded to scalar_t: bitwise
// torch's expression wherever exp_t is the exp torch's kernel calls (CUDA's expf / exp).
template <typename scalar_t, typename acc_t>
GENFAST_HOST_DEVICE scalar_t reparam_elem(scalar_t mu, scalar_t lv, scalar_t eps) {
  const scalar_t h = static_cast<scalar_t>(mul_rn(static_cast<acc_t>(lv), acc_t(0.5)));
  const scalar_t s = static_cast<scalar_t>(std::exp(static_cast<acc_t>(h)));
  return reparam_combine<scalar_t, acc_t>(mu, eps, s);
}

// d z / d lv = 0.5 eps exp(0.5 lv).
template <typename T>
GENFAST_HOST_DEVICE T reparam_grad_logvar(T g, T lv, T eps) {
  return T(0.5) * g * eps * std::exp(T(0.5) * lv);
}

}  // namespace genfast
