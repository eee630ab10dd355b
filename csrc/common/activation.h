// One activation table for every genfast kernel (C++ CPU and CUDA). The integer codes are the
// ones genfast/backend.py (ACTIVATIONS) passes through the op schemas.
#pragma once
#include <cmath>
#include "macros.h"

namespace genfast {

enum Activation : int {
  kIdentity = 0,
  kRelu = 1,
  kLeakyRelu = 2,
  kTanh = 3,
  kSigmoid = 4,
};

// f(z). relu is leaky_relu with slope 0, as torch computes it (z > 0 ? z : 0).
template <typename T>
GENFAST_HOST_DEVICE T act_forward(T z, int act, T slope) {
  switch (act) {
    case kRelu: return z > T(0) ? z : T(0);
    case kLeakyRelu: return z > T(0) ? z : z * slope;
    case kTanh: return ::tanh(z);
    case kSigmoid: return T(1) / (T(1) + ::exp(-z));
    default: return z;
  }
}

// f'(z) from the pre-activation z, with torch's convention at 0 (the negative side's slope).
template <typename T>
GENFAST_HOST_DEVICE T act_grad_from_input(T z, int act, T slope) {
  switch (act) {
    case kRelu: return z > T(0) ? T(1) : T(0);
    case kLeakyRelu: return z > T(0) ? T(1) : slope;
    case kTanh: { T t = ::tanh(z); return T(1) - t * t; }
    case kSigmoid: { T s = T(1) / (T(1) + ::exp(-z)); return s * (T(1) - s); }
    default: return T(1);
  }
}

// f'(z) from the output y = f(z), for activations whose sign is preserved (slope > 0).
template <typename T>
GENFAST_HOST_DEVICE T act_grad_from_output(T y, int act, T slope) {
  switch (act) {
    case kRelu: return y > T(0) ? T(1) : T(0);
    case kLeakyRelu: return y > T(0) ? T(1) : slope;
    case kTanh: return T(1) - y * y;
    case kSigmoid: return y * (T(1) - y);
    default: return T(1);
  }
}

// z = f^-1(y) for the invertible activations (identity, leaky_relu with slope > 0).
template <typename T>
GENFAST_HOST_DEVICE T act_invert(T y, int act, T slope) {
  if (act == kLeakyRelu) return y > T(0) ? y : y / slope;
  return y;
}

}  // namespace genfast
