// GAN / VAE / BCE loss math shared by the C++ CPU and CUDA kernels: for one element, the loss
// term and its derivative in one evaluation (one exp and one log1p for the logistic losses).
//
// Stable forms (e = exp(-|x|), never overflows):
//   softplus(x)  = max(x, 0) + log1p(e)          softplus(-x) = max(-x, 0) + log1p(e)
//   sigmoid(x)   = x >= 0 ? 1 / (1 + e) : e / (1 + e)
//   BCE with logits, target t, positive weight p:
//     loss = (1 - t) * softplus(x) + p * t * softplus(-x)      [= (1 - t) x + (1 + (p - 1) t) softplus(-x)]
//     d/dx = (1 - t) * sigmoid(x) - p * t * sigmoid(-x)
//   A coefficient of exactly 0 drops its term, so x = +-inf gives 0 (not 0 * inf = NaN) where the
//   limit is finite, and the gradient never cancels: at x = -100 with t = 1 it is -1.
// The integer codes match genfast/ops/losses.py.
//
// Every function is written with the element primitives below (sel, is_nan, abs_t, neg_t and the
// exp/log family) instead of ?: and if, so that the same code also runs on SIMD vectors: the CPU
// kernels declare overloads of the primitives for at::vec::Vectorized before including this
// header (csrc/cpu/losses.cpp); CUDA uses the scalar ones.
#pragma once
#include <cmath>
#include "macros.h"
#include "reparam.h"

namespace genfast {

enum GanKind : int { kGanBce = 0, kGanMinimax = 1, kGanHinge = 2, kGanWasserstein = 3, kGanLsgan = 4 };
// Which term an element contributes: the discriminator's real or fake side, or the generator's.
enum GanRole : int { kRoleReal = 0, kRoleFake = 1, kRoleGen = 2 };
// torch's at::Reduction values, plus VAE's batchmean.
enum LossReduction : int { kReduceNone = 0, kReduceMean = 1, kReduceSum = 2, kReduceBatchMean = 3 };
enum VaeRecon : int { kReconMse = 0, kReconBce = 1, kReconBceLogits = 2 };

// sel(c, a, b): a where c holds, else b (both evaluated).
template <typename T>
GENFAST_HOST_DEVICE T sel(bool c, T a, T b) { return c ? a : b; }
template <typename T>
GENFAST_HOST_DEVICE bool is_nan(T x) { return x != x; }
template <typename T>
GENFAST_HOST_DEVICE T abs_t(T x) { return x < T(0) ? -x : x; }
template <typename T>
GENFAST_HOST_DEVICE T neg_t(T x) { return -x; }

// exp / log1p / expm1 / log in T's own precision: std:: overloads, so that float stays float on
// the host (the global ::exp(float) of the C library is the double function); CUDA provides the
// same std:: overloads on the device.
template <typename T>
GENFAST_HOST_DEVICE T exp_t(T x) { return std::exp(x); }
template <typename T>
GENFAST_HOST_DEVICE T log1p_t(T x) { return std::log1p(x); }
template <typename T>
GENFAST_HOST_DEVICE T expm1_t(T x) { return std::expm1(x); }
template <typename T>
GENFAST_HOST_DEVICE T log_t(T x) { return std::log(x); }

// exp(x) for x <= 0 (or NaN) and log1p(e) for e in [0, 1]: the two transcendental steps of the
// logistic losses, on arguments of known range. The CPU file overloads them for float vectors
// with short polynomials; everywhere else they are exp and log1p.
template <typename T>
GENFAST_HOST_DEVICE T exp_nonpos_t(T x) { return exp_t(x); }
template <typename T>
GENFAST_HOST_DEVICE T log1p_unit_t(T e) { return log1p_t(e); }

// c * v with c == 0 giving 0 even for infinite v.
template <typename T>
GENFAST_HOST_DEVICE T mul_or_zero(T c, T v) {
  return sel(c == T(0), T(0), c * v);
}

// BCE with logits for one element: returns the loss, writes d loss / d x.
template <typename T>
GENFAST_HOST_DEVICE T bce_logits_elem(T x, T t, T pos_weight, T* grad) {
  const T zero(0), one(1);
  const T e = exp_nonpos_t(neg_t(abs_t(x)));
  const T l1p = log1p_unit_t(e);
  const T pos = sel(x > zero, x, zero);         // max(x, 0)
  const T neg = sel(x < zero, neg_t(x), zero);  // max(-x, 0)
  const T inv = one / (one + e);
  const T sig = sel(x >= zero, inv, e * inv);   // sigmoid(x)
  const T sign = sel(x >= zero, e * inv, inv);  // sigmoid(-x)
  const T a = one - t;
  const T b = pos_weight * t;
  *grad = a * sig - b * sign;
  // softplus(x) = pos + l1p, softplus(-x) = neg + l1p; NaN in, NaN out (the zero-coefficient
  // rule must not hide it)
  return sel(is_nan(x), x, mul_or_zero(a, pos + l1p) + mul_or_zero(b, neg + l1p));
}

// BCE on probabilities, torch's formula: each log clamped at -100; gradient
// (p - t) / max(p (1 - p), 1e-12), with torch's EPSILON: the float32 value of 1e-12.
template <typename T>
GENFAST_HOST_DEVICE T bce_prob_elem(T p, T t, T* grad) {
  const T floor_(-100), one(1);
  T lp = log_t(p);
  T l1mp = log1p_t(neg_t(p));
  lp = sel(lp < floor_, floor_, lp);  // NaN stays NaN, as with torch's std::max
  l1mp = sel(l1mp < floor_, floor_, l1mp);
  T den = p * (one - p);
  const T eps(static_cast<float>(1e-12f));
  den = sel(den < eps, eps, den);
  *grad = (p - t) / den;
  return (t - one) * l1mp - t * lp;
}

// One GAN loss term for a logit x in role `role`: returns the term, writes its derivative.
// Kinds (per element; the reduction is applied by the caller):
//   bce / minimax, discriminator: real  BCE(x, real_label), fake  softplus(x)
//   bce generator (non-saturating):    softplus(-x)           = -log D(G(z))
//   minimax generator (saturating):   -softplus(x)            =  log(1 - D(G(z)))
//   hinge: real relu(1 - x), fake relu(1 + x), generator -x
//   wasserstein: real -x, fake x, generator -x
//   lsgan: real (x - real_label)^2, fake x^2, generator (x - 1)^2   (F.mse_loss terms)
template <typename T>
GENFAST_HOST_DEVICE T gan_elem(T x, int kind, int role, T real_label, T* grad) {
  switch (kind) {
    case kGanHinge: {
      if (role == kRoleGen) {
        *grad = T(-1);
        return neg_t(x);
      }
      // relu(1 - x) (real) or relu(1 + x) (fake); NaN propagates. The derivative as torch's
      // threshold_backward: 0 where z <= 0 only, so a NaN z passes the gradient (+-1)
      const T z = role == kRoleReal ? T(1) - x : T(1) + x;
      const auto on = z > T(0);
      *grad = sel(z <= T(0), T(0), T(role == kRoleReal ? -1.0f : 1.0f));
      return sel(on, z, sel(is_nan(x), x, T(0)));
    }
    case kGanWasserstein:
      *grad = T(role == kRoleFake ? 1.0f : -1.0f);
      return role == kRoleFake ? x : neg_t(x);
    case kGanLsgan: {
      const T target = role == kRoleReal ? real_label : (role == kRoleFake ? T(0) : T(1));
      const T d = x - target;
      *grad = T(2) * d;
      return d * d;
    }
    default: {
      if (role == kRoleReal) return bce_logits_elem<T>(x, real_label, T(1), grad);
      if (role == kRoleFake) return bce_logits_elem<T>(x, T(0), T(1), grad);
      if (kind == kGanMinimax) {
        T g;
        const T l = bce_logits_elem<T>(x, T(0), T(1), &g);
        *grad = neg_t(g);
        return neg_t(l);
      }
      return bce_logits_elem<T>(x, T(1), T(1), grad);
    }
  }
}

// Reconstruction term of the VAE loss for one element (sum convention), and d/d recon.
template <typename T>
GENFAST_HOST_DEVICE T vae_recon_elem(T r, T t, int recon, T* grad) {
  if (recon == kReconBce) return bce_prob_elem<T>(r, t, grad);
  if (recon == kReconBceLogits) return bce_logits_elem<T>(r, t, T(1), grad);
  const T d = r - t;
  *grad = T(2) * d;
  return d * d;
}

// KL(N(mu, exp(logvar)) || N(0, 1)) for one latent element:
//   -0.5 (1 + lv - mu^2 - exp(lv)) = 0.5 (mu^2 + expm1(lv) - lv)
// with d/dmu = mu and d/dlv = 0.5 expm1(lv). Finite for |lv| <= 30 in float32.
template <typename T>
GENFAST_HOST_DEVICE T kl_elem(T mu, T lv, T* grad_mu, T* grad_lv) {
  const T em1 = expm1_t(lv);
  *grad_mu = mu;
  *grad_lv = T(0.5) * em1;
  return T(0.5) * (mu * mu + em1 - lv);
}

}  // namespace genfast
