// BatchNorm + activation math shared by the C++ CPU and CUDA kernels.
//
// Notation per channel c over its M = N * L elements:
//   mean, invstd = 1 / sqrt(var_biased + eps)
//   xhat = (x - mean) * invstd,  z = gamma * xhat + beta = (x - center) * scale + offset,  y = f(z)
// with scale = gamma * invstd and either center = mean, offset = beta (the CPU kernels: x - mean
// is exact near the mean, so a large mean offset costs no precision, as in torch's CPU kernel)
// or center = 0, offset = beta - mean * scale (the CUDA kernels: two per-channel values).
// Backward, with dz = dy * f'(z):
//   sum_dz = sum(dz), sum_dz_xhat = sum(dz * xhat)
//   training: dx = gamma * invstd * (dz - sum_dz / M - xhat * sum_dz_xhat / M)
//   eval:     dx = gamma * invstd * dz
//   dgamma = sum_dz_xhat, dbeta = sum_dz
#pragma once
#include <cmath>
#include "activation.h"
#include "macros.h"

namespace genfast {

// Running (count, mean, M2) of a stream of values; merged with Chan's parallel formula so that
// blocks of any size combine without the cancellation of sum / sum-of-squares. count_t = int64_t
// keeps the count exact past 2^24 elements (a float count stops growing there).
template <typename acc_t, typename count_t = acc_t>
struct Welford {
  count_t count;
  acc_t mean;
  acc_t m2;
};

template <typename acc_t, typename count_t = acc_t>
GENFAST_HOST_DEVICE Welford<acc_t, count_t> welford_init() {
  return Welford<acc_t, count_t>{count_t(0), acc_t(0), acc_t(0)};
}

template <typename acc_t, typename count_t>
GENFAST_HOST_DEVICE void welford_push(Welford<acc_t, count_t>& w, acc_t x) {
  w.count += count_t(1);
  acc_t d = x - w.mean;
  w.mean += d / acc_t(w.count);
  w.m2 += d * (x - w.mean);
}

template <typename acc_t, typename count_t>
GENFAST_HOST_DEVICE Welford<acc_t, count_t> welford_merge(const Welford<acc_t, count_t>& a,
                                                          const Welford<acc_t, count_t>& b) {
  if (a.count == count_t(0)) return b;
  if (b.count == count_t(0)) return a;
  count_t n = a.count + b.count;
  acc_t d = b.mean - a.mean;
  acc_t rb = acc_t(b.count) / acc_t(n);
  return Welford<acc_t, count_t>{n, a.mean + d * rb, a.m2 + b.m2 + d * d * acc_t(a.count) * rb};
}

// Per-block partial statistics for a fixed-order two-level reduction: element count, sum, and M2
// about the block's own mean (sum / count).
template <typename red_t>
struct SumPartial {
  int64_t count;
  red_t sum;
  red_t m2;
};

// Merges n partials p[0], p[stride], ... in order. The mean is the total sum over the total count
// (as torch computes it: +-inf inputs give a +-inf mean, NaN a NaN mean), and
// M2 = sum_b (M2_b + count_b * (mean_b - mean)^2).
template <typename red_t>
GENFAST_HOST_DEVICE Welford<red_t, int64_t> merge_sum_partials(const SumPartial<red_t>* p, int64_t n,
                                                               int64_t stride) {
  int64_t count = 0;
  red_t sum = red_t(0);
  for (int64_t i = 0; i < n; ++i) {
    count += p[i * stride].count;
    sum += p[i * stride].sum;
  }
  const red_t mean = count > 0 ? sum / red_t(count) : red_t(0);
  red_t m2 = red_t(0);
  for (int64_t i = 0; i < n; ++i) {
    const SumPartial<red_t>& q = p[i * stride];
    if (q.count == 0) continue;
    const red_t d = q.sum / red_t(q.count) - mean;
    m2 += q.m2 + red_t(q.count) * d * d;
  }
  return Welford<red_t, int64_t>{count, mean, m2};
}

// Effective gamma. memory_efficient mode keeps |gamma| >= gamma_floor so that the backward can
// recover xhat = (z - beta) / gamma from the output; gamma_floor = 0 leaves gamma unchanged.
template <typename acc_t>
GENFAST_HOST_DEVICE acc_t effective_gamma(acc_t g, acc_t gamma_floor) {
  if (gamma_floor > acc_t(0)) {
    acc_t a = g < acc_t(0) ? -g : g;
    if (a < gamma_floor) return g < acc_t(0) ? -gamma_floor : gamma_floor;
  }
  return g;
}

// Per-channel finish of the statistics pass: save mean/invstd and update the running buffers
// (unbiased variance into running_var, as torch does). An empty batch leaves the running buffers
// unchanged, as torch does.
template <typename acc_t, typename count_t>
GENFAST_HOST_DEVICE void finish_stats(const Welford<acc_t, count_t>& w, acc_t eps, acc_t momentum,
                                      acc_t* save_mean, acc_t* save_invstd,
                                      acc_t* run_mean, acc_t* run_var) {
  acc_t var = w.count > count_t(0) ? w.m2 / acc_t(w.count) : acc_t(0);
  *save_mean = w.mean;
  *save_invstd = acc_t(1) / ::sqrt(var + eps);
  if (w.count == count_t(0)) return;
  if (run_mean != nullptr) {
    *run_mean = (acc_t(1) - momentum) * *run_mean + momentum * w.mean;
  }
  if (run_var != nullptr) {
    acc_t unbiased = w.count > count_t(1) ? w.m2 / acc_t(w.count - count_t(1)) : var;
    *run_var = (acc_t(1) - momentum) * *run_var + momentum * unbiased;
  }
}

// Forward element: y = f((x - center) * scale + offset).
template <int ACT, typename acc_t>
GENFAST_HOST_DEVICE acc_t bn_act_forward_elem_c(acc_t x, acc_t center, acc_t scale, acc_t offset, acc_t slope) {
  return act_forward_c<ACT, acc_t>((x - center) * scale + offset, slope);
}

template <typename acc_t>
GENFAST_HOST_DEVICE acc_t bn_act_forward_elem(acc_t x, acc_t center, acc_t scale, acc_t offset, int act,
                                              acc_t slope) {
  return act_forward<acc_t>((x - center) * scale + offset, act, slope);
}

// Backward element: dz = dy * f'(z) and xhat for one element. `saved` is x
// (saved_is_output = false; z is recomputed exactly as the forward computed it, from the same
// center / scale / offset) or y (true; z is recovered by inverting f, then xhat = (z - beta) / gamma).
template <typename acc_t>
struct DzXhat {
  acc_t dz;
  acc_t xhat;
};

template <int ACT, bool SAVED_IS_OUTPUT, typename acc_t>
GENFAST_HOST_DEVICE DzXhat<acc_t> bn_act_dz_xhat_c(acc_t dy, acc_t saved, acc_t mean, acc_t invstd,
                                                   acc_t center, acc_t scale, acc_t offset, acc_t gamma,
                                                   acc_t beta, acc_t slope) {
  if constexpr (SAVED_IS_OUTPUT) {
    const acc_t z = act_invert_c<ACT, acc_t>(saved, slope);
    return {dy * act_grad_from_output_c<ACT, acc_t>(saved, slope), (z - beta) / gamma};
  } else {
    const acc_t g = act_grad_from_input_c<ACT, acc_t>((saved - center) * scale + offset, slope);
    return {dy * g, (saved - mean) * invstd};
  }
}

template <typename acc_t>
GENFAST_HOST_DEVICE acc_t bn_act_dz_xhat(acc_t dy, acc_t saved, bool saved_is_output,
                                         acc_t mean, acc_t invstd, acc_t center, acc_t scale,
                                         acc_t offset, acc_t gamma, acc_t beta, int act, acc_t slope,
                                         acc_t* xhat) {
  if (saved_is_output) {
    acc_t z = act_invert<acc_t>(saved, act, slope);
    *xhat = (z - beta) / gamma;
    return dy * act_grad_from_output<acc_t>(saved, act, slope);
  }
  *xhat = (saved - mean) * invstd;
  return dy * act_grad_from_input<acc_t>((saved - center) * scale + offset, act, slope);
}

// dx from dz, xhat and the per-channel coefficients k = gamma * invstd,
// a = sum_dz / M, b = sum_dz_xhat / M (a = b = 0 in eval mode). The xhat term is skipped when
// b == 0, so that an infinite xhat (an inf input in eval mode) gives torch's eval gradient
// k * dz rather than inf * 0 = NaN; in training an inf or NaN xhat makes b NaN, never 0.
template <typename acc_t>
GENFAST_HOST_DEVICE acc_t bn_act_dx_elem(acc_t dz, acc_t xhat, acc_t k, acc_t a, acc_t b) {
  return k * (dz - a - (b == acc_t(0) ? acc_t(0) : xhat * b));
}

}  // namespace genfast
