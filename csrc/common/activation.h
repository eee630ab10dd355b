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

// Each function takes the activation either as a runtime `act` or, through the `_c` form, as
// a compile-time constant: hot CPU loops use the latter so that they carry no branch and
// vectorise.

// f(z), propagating NaN and +-inf exactly as torch: relu(NaN) = NaN, relu(-0.0) = -0.0,
// leaky_relu(-inf) = -inf. Selects between a computed value and a constant (a select between
// two computed values GCC does not vectorise): a NaN z fails both comparisons, so it reaches
// the sum. The slope multiplies z before the select, so an infinite slope gives z (not
// z + inf * 0 = NaN) for z > 0, and z * slope (torch's value, NaN at z = 0) otherwise.
template <int ACT, typename T>
GENFAST_HOST_DEVICE T act_forward_c(T z, T slope) {
  if constexpr (ACT == kRelu) return z < T(0) ? T(0) : z;
  else if constexpr (ACT == kLeakyRelu) return (z < T(0) ? T(0) : z) + (z > T(0) ? T(0) : z * slope);
  else if constexpr (ACT == kTanh) return ::tanh(z);
  else if constexpr (ACT == kSigmoid) return T(1) / (T(1) + ::exp(-z));
  else return z;
}

// f'(z) from the pre-activation z, with torch's conventions: at 0 the negative side's slope; at
// NaN relu passes the gradient (torch masks only where relu(z) <= 0) and leaky_relu takes the
// slope (torch takes it unless z > 0).
template <int ACT, typename T>
GENFAST_HOST_DEVICE T act_grad_from_input_c(T z, T slope) {
  // A select between two values that need no computation: GCC vectorises it (a select between
  // computed values, or a bool-to-float conversion, it does not).
  if constexpr (ACT == kRelu) return z <= T(0) ? T(0) : T(1);
  else if constexpr (ACT == kLeakyRelu) return z > T(0) ? T(1) : slope;
  else if constexpr (ACT == kTanh) { T t = ::tanh(z); return T(1) - t * t; }
  else if constexpr (ACT == kSigmoid) { T s = T(1) / (T(1) + ::exp(-z)); return s * (T(1) - s); }
  else return T(1);
}

// f'(z) from the output y = f(z), for activations whose sign is preserved (slope > 0); NaN as
// act_grad_from_input_c.
template <int ACT, typename T>
GENFAST_HOST_DEVICE T act_grad_from_output_c(T y, T slope) {
  if constexpr (ACT == kRelu) return y <= T(0) ? T(0) : T(1);
  else if constexpr (ACT == kLeakyRelu) return y > T(0) ? T(1) : slope;
  else if constexpr (ACT == kTanh) return T(1) - y * y;
  else if constexpr (ACT == kSigmoid) return y * (T(1) - y);
  else return T(1);
}

// dz = dy * f'(z) from the output y = f(z), as torch's activation backward: relu selects (its
// threshold_backward passes dy where y > 0 or y is NaN and gives 0 elsewhere, a NaN or inf dy
// included, where a product with f' = 0 would give NaN); the others multiply.
template <int ACT, typename T>
GENFAST_HOST_DEVICE T act_backward_from_output_c(T dy, T y, T slope) {
  if constexpr (ACT == kRelu) return y <= T(0) ? T(0) : dy;
  else return dy * act_grad_from_output_c<ACT, T>(y, slope);
}

// The same from the activation's input z (relu: 0 where z <= 0, where its output is 0).
template <int ACT, typename T>
GENFAST_HOST_DEVICE T act_backward_from_input_c(T dy, T z, T slope) {
  if constexpr (ACT == kRelu) return z <= T(0) ? T(0) : dy;
  else return dy * act_grad_from_input_c<ACT, T>(z, slope);
}

// z = f^-1(y) for the invertible activations (identity, leaky_relu with slope > 0); NaN stays NaN.
template <int ACT, typename T>
GENFAST_HOST_DEVICE T act_invert_c(T y, T slope) {
  if constexpr (ACT == kLeakyRelu) return (y < T(0) ? T(0) : y) + (y > T(0) ? T(0) : y / slope);
  else return y;
}

#define GENFAST_ACT_RUNTIME(name)                                     \
  template <typename T>                                               \
  GENFAST_HOST_DEVICE T name(T v, int act, T slope) {                 \
    switch (act) {                                                    \
      case kRelu: return name##_c<kRelu, T>(v, slope);                \
      case kLeakyRelu: return name##_c<kLeakyRelu, T>(v, slope);      \
      case kTanh: return name##_c<kTanh, T>(v, slope);                \
      case kSigmoid: return name##_c<kSigmoid, T>(v, slope);          \
      default: return name##_c<kIdentity, T>(v, slope);               \
    }                                                                 \
  }

GENFAST_ACT_RUNTIME(act_forward)
GENFAST_ACT_RUNTIME(act_grad_from_input)
GENFAST_ACT_RUNTIME(act_grad_from_output)
GENFAST_ACT_RUNTIME(act_invert)
#undef GENFAST_ACT_RUNTIME

// the runtime forms of act_backward_from_output_c / act_backward_from_input_c (dy, then y or z)
#define GENFAST_ACT_BACKWARD_RUNTIME(name)                            \
  template <typename T>                                               \
  GENFAST_HOST_DEVICE T name(T dy, T v, int act, T slope) {           \
    switch (act) {                                                    \
      case kRelu: return name##_c<kRelu, T>(dy, v, slope);            \
      case kLeakyRelu: return name##_c<kLeakyRelu, T>(dy, v, slope);  \
      case kTanh: return name##_c<kTanh, T>(dy, v, slope);            \
      case kSigmoid: return name##_c<kSigmoid, T>(dy, v, slope);      \
      default: return name##_c<kIdentity, T>(dy, v, slope);           \
    }                                                                 \
  }

GENFAST_ACT_BACKWARD_RUNTIME(act_backward_from_output)
GENFAST_ACT_BACKWARD_RUNTIME(act_backward_from_input)
#undef GENFAST_ACT_BACKWARD_RUNTIME

}  // namespace genfast
