// BatchNorm + activation math shared by the C++ CPU and CUDA kernels.
//
// Notation per channel c over its M = N * L elements:
//   mean, invstd = 1 / sqrt(var_biased + eps)
//   xhat = (x - mean) * invstd,  z = gamma * xhat + beta = (x - mean) * scale + beta,  y = f(z)
// with scale = gamma * invstd, in every kernel (CPU and CUDA): x - mean is exact near the mean,
// so a large mean offset costs no precision, as in torch's kernels (x * scale + (beta - mean *
// scale) would round at the offset: a float32 error 3x torch's at a 1e4 offset).
// Statistics reduce in double (red_t) with 64-bit counts whatever the input dtype: per-block
// SumPartials (count, sum, M2 about the block's own mean), merged in a fixed order; the mean is
// the total sum over the total count, as torch computes it (an inf input gives an inf mean).
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
  // One non-empty partial with a finite sum: its M2 as it is (mean_b - mean is exactly 0; the
  // general loop's second division per channel was most of a wide, short batch's merge)
  if (n == 1 && p[0].count > 0 && p[0].sum - p[0].sum == red_t(0))  // (is_finite_value, below)
    return Welford<red_t, int64_t>{p[0].count, p[0].sum / red_t(p[0].count), p[0].m2};
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

// Chan's merge of two partials (CUDA warps, blocks and splits, and a thread's runs): the
// between-partial term is cross^2 * r with cross = sum_b * count_a - sum_a * count_b
// (= (mean_b - mean_a) * count_a * count_b; its rounding is that of the difference of the two
// means, as in the mean-based formula) and r = 1 / (count_a * count_b * (count_a + count_b)).
// Partials with equal counts (the channels of one thread) share r: one division for all of
// them. With an inf or NaN in either partial the merged sum is theirs (+-inf stays +-inf, inf -
// inf is NaN) and the merged M2 is NaN (a partial holding an inf has a NaN M2).
template <typename red_t>
GENFAST_HOST_DEVICE red_t sum_partial_merge_factor(int64_t count_a, int64_t count_b) {
  const red_t na = red_t(count_a), nb = red_t(count_b);
  return red_t(1) / (na * nb * (na + nb));
}

// The merge with r = sum_partial_merge_factor(a.count, b.count); both counts > 0.
template <typename red_t>
GENFAST_HOST_DEVICE SumPartial<red_t> sum_partial_merge_with(const SumPartial<red_t>& a, const SumPartial<red_t>& b,
                                                             red_t r) {
  const red_t cross = b.sum * red_t(a.count) - a.sum * red_t(b.count);
  return SumPartial<red_t>{a.count + b.count, a.sum + b.sum, a.m2 + b.m2 + cross * cross * r};
}

template <typename red_t>
GENFAST_HOST_DEVICE SumPartial<red_t> sum_partial_merge(const SumPartial<red_t>& a, const SumPartial<red_t>& b) {
  if (a.count == 0) return b;
  if (b.count == 0) return a;
  return sum_partial_merge_with(a, b, sum_partial_merge_factor<red_t>(a.count, b.count));
}

// True for a finite value (inf - inf and NaN - NaN are NaN, never 0).
template <typename T>
GENFAST_HOST_DEVICE bool is_finite_value(T v) {
  return v - v == T(0);
}

// The SumPartial of a short run of n > 0 values, reduced in acc_t (float for float, half and
// bfloat16 input) by two passes over registers: s = sum(x), the estimate m = s * inv_n
// (inv_n = 1 / n in acc_t), then sd = sum(x - m) and q = sum((x - m)^2). The run's sum is
// refined in red_t as n * m + sd: the deviations x - m are exact near the mean, so the rounding
// of the acc_t sum at a large mean offset is gone (ulp(1.6e5) = 2^-6 for 16 float32 values near
// 1e4). A non-finite m (an inf or NaN in the run) keeps the plain sum, so that +-inf stays +-inf
// as in torch; q, and so M2, is then NaN. M2 = q - sd^2 / n: about the refined mean (the
// correction is small against q, so acc_t precision suffices for it).
template <typename red_t, typename acc_t>
GENFAST_HOST_DEVICE SumPartial<red_t> sum_partial_of_run(int64_t n, acc_t inv_n, acc_t s, acc_t m, acc_t sd, acc_t q) {
  const red_t sum = is_finite_value(m) ? red_t(n) * red_t(m) + red_t(sd) : red_t(s);
  return SumPartial<red_t>{n, sum, red_t(q) - red_t(sd * sd * inv_n)};
}

// (count, mean, M2) of a merged partial: mean = sum / count (0 for an empty partial).
template <typename red_t>
GENFAST_HOST_DEVICE Welford<red_t, int64_t> sum_partial_stats(const SumPartial<red_t>& p) {
  return Welford<red_t, int64_t>{p.count, p.count > 0 ? p.sum / red_t(p.count) : red_t(0), p.m2};
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

// Forward element: y = f((x - center) * scale + offset); every kernel passes center = mean,
// offset = beta.
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
    return {act_backward_from_output_c<ACT, acc_t>(dy, saved, slope), (z - beta) / gamma};
  } else {
    return {act_backward_from_input_c<ACT, acc_t>(dy, (saved - center) * scale + offset, slope),
            (saved - mean) * invstd};
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
    return act_backward_from_output<acc_t>(dy, saved, act, slope);
  }
  *xhat = (saved - mean) * invstd;
  return act_backward_from_input<acc_t>(dy, (saved - center) * scale + offset, act, slope);
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
