// GAN / VAE / BCE losses and reparameterisation on the CPU.
//
// Every forward makes ONE pass over its inputs: each element's loss term and its derivative come
// from one evaluation of the csrc/common/losses.h math; the derivative (already multiplied by the
// reduction's factor, e.g. 1/n for "mean") is written to a flat float32 (float64 for float64
// input) buffer that the backward only scales by the incoming gradient (one more pass:
// read saved, write grad). Reductions are deterministic: fixed blocks of kBlock elements, one
// partial sum per block (at::parallel_for over blocks), then the partials summed in block order,
// so the result does not depend on the number of threads.
//
// The loops run on at::vec::Vectorized<float/double> (exp, log1p, expm1, log from Sleef, as
// torch's own CPU kernels): the losses.h math is written with element primitives that this file
// overloads for vectors. float16/bfloat16 inputs are converted to float one vector at a time. On
// x86-64 the kernels below are compiled for AVX2+FMA+F16C (the extension itself is built for the
// baseline ISA), and every op checks at run time that the CPU has them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <type_traits>
#include <vector>

// Before the SIMD region: the reparameterisation math stays on the baseline ISA, which has no
// FMA to contract torch's separate product and sum.
#include "../common/reparam.h"

namespace genfast {
bool cpu_losses_supported();
namespace {

// Whether this CPU runs the SIMD kernels of this file (compiled for AVX2+FMA on x86-64). The
// Python layer asks first (genfast.backend: `auto` then takes the reference backend for the
// losses, with a warning); the op checks again so that a pinned backend fails clearly.
void check_simd() {
  TORCH_CHECK(cpu_losses_supported(), "genfast's CPU loss kernels need a CPU with AVX2, FMA and F16C, "
              "which this one lacks; use genfast.set_backend('reference') for the losses");
}

}  // namespace

bool cpu_losses_supported() {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return true;
#endif
}

}  // namespace genfast

// --- SIMD kernels (AVX2+FMA on x86-64) -------------------------------------------------------------
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(CPU_CAPABILITY)
#if !defined(__AVX2__) || !defined(__FMA__)
#define GENFAST_LOSSES_TARGET_PRAGMA 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// g++ does not define the ISA macros for a target pragma; sleef.h and the vec headers test them.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace genfast {

using at::vec::Vectorized;

// The element primitives of csrc/common/losses.h on vectors (declared before that header so that
// its templates see them). Comparisons of Vectorized give lane masks.
template <typename T>
inline Vectorized<T> sel(const Vectorized<T>& c, const Vectorized<T>& a, const Vectorized<T>& b) {
  return Vectorized<T>::blendv(b, a, c);
}
template <typename T>
inline Vectorized<T> is_nan(const Vectorized<T>& x) { return x.isnan(); }
template <typename T>
inline Vectorized<T> abs_t(const Vectorized<T>& x) { return x.abs(); }
template <typename T>
inline Vectorized<T> neg_t(const Vectorized<T>& x) { return x.neg(); }
template <typename T>
inline Vectorized<T> exp_t(const Vectorized<T>& x) { return x.exp(); }
// log1p through log (Sleef's vector log1p measured several times slower than its log here):
// u = 1 + x rounded, log(u) * x / (u - 1) undoes the rounding of u; x itself where u rounds to 1.
template <typename T>
inline Vectorized<T> log1p_t(const Vectorized<T>& x) {
  const Vectorized<T> one(T(1)), zero(T(0));
  const Vectorized<T> u = one + x;
  const Vectorized<T> d = u - one;
  return sel(d == zero, x, u.log() * x / d);
}
template <typename T>
inline Vectorized<T> expm1_t(const Vectorized<T>& x) { return x.expm1(); }

// float32 exp on (-inf, 0] and log1p on [0, 1] for the logistic losses (BCE with logits and the
// GAN losses built on it: softplus and sigmoid of one exp(-|x|)). Sleef's u10 log measured about
// 2.7 ns per element here (most of the loss kernel's 4.7 ns); these cost a few FMAs.
//   exp: x = n ln2 + r, |r| <= ln2/2 (Cody-Waite split of ln2), degree-7 Taylor polynomial of
//        e^r (truncation below 6e-9 relative), times 2^n built in the exponent bits. Results
//        below FLT_MIN (x < -87.33) are flushed to 0; NaN stays NaN.
//   log1p(e) = 2 atanh(s), s = e / (2 + e) in [0, 1/3]: 2s (1 + z/3 + ... + z^7/15), z = s^2
//        (truncation below 2e-9 relative); no cancellation for small e (the result tends to e).
// Both stay within a few float32 ulps of the correctly rounded value (tested against float64).
// Polynomials in Estrin's form (pairs, then pairs of pairs): the loop is bound by the latency of
// each element's chain (the out-of-order window holds about three iterations), which Horner's
// form doubles.
inline __m256 estrin7(__m256 x, __m256 x2, __m256 x4, float c0, float c1, float c2, float c3, float c4, float c5,
                      float c6, float c7) {
  const __m256 p01 = _mm256_fmadd_ps(_mm256_set1_ps(c1), x, _mm256_set1_ps(c0));
  const __m256 p23 = _mm256_fmadd_ps(_mm256_set1_ps(c3), x, _mm256_set1_ps(c2));
  const __m256 p45 = _mm256_fmadd_ps(_mm256_set1_ps(c5), x, _mm256_set1_ps(c4));
  const __m256 p67 = _mm256_fmadd_ps(_mm256_set1_ps(c7), x, _mm256_set1_ps(c6));
  return _mm256_fmadd_ps(_mm256_fmadd_ps(p67, x2, p45), x4, _mm256_fmadd_ps(p23, x2, p01));
}
inline Vectorized<float> exp_nonpos_t(const Vectorized<float>& xv) {
  const __m256 x = xv;
  const __m256 xc = _mm256_max_ps(x, _mm256_set1_ps(-87.33f));  // NaN -> -87.33 here, restored below
  // n = round(x / ln2) by the 1.5 * 2^23 shift (exact for |n| < 2^22); its low bits are n
  const __m256 shift = _mm256_set1_ps(12582912.0f);
  const __m256 t = _mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), shift);
  const __m256 n = _mm256_sub_ps(t, shift);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  const __m256 r2 = _mm256_mul_ps(r, r);
  const __m256 p = estrin7(r, r2, _mm256_mul_ps(r2, r2), 1.0f, 1.0f, 0.5f, 1.0f / 6.0f, 1.0f / 24.0f,
                           1.0f / 120.0f, 1.0f / 720.0f, 1.0f / 5040.0f);
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127 - 0x4B400000)), 23);
  __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(-87.33f), _CMP_LT_OQ));
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}
inline Vectorized<float> log1p_unit_t(const Vectorized<float>& ev) {
  const __m256 e = ev;
  const __m256 s = _mm256_div_ps(e, _mm256_add_ps(_mm256_set1_ps(2.0f), e));
  const __m256 z = _mm256_mul_ps(s, s);
  const __m256 z2 = _mm256_mul_ps(z, z);
  const __m256 p = estrin7(z, z2, _mm256_mul_ps(z2, z2), 1.0f, 1.0f / 3.0f, 1.0f / 5.0f, 1.0f / 7.0f, 1.0f / 9.0f,
                           1.0f / 11.0f, 1.0f / 13.0f, 1.0f / 15.0f);
  return _mm256_mul_ps(_mm256_add_ps(s, s), p);
}
template <typename T>
inline Vectorized<T> log_t(const Vectorized<T>& x) { return x.log(); }

}  // namespace genfast

#include "../common/losses.h"

namespace genfast {
namespace {

// Elements per reduction block (fixed: the summation order depends only on n; a multiple of
// every vector width).
constexpr int64_t kBlock = 4096;
// Blocks one thread takes before a reduction runs in parallel (at::parallel_for's grain): about
// 32K elements, torch's own grain for elementwise CPU kernels. Waking the thread pool costs
// more than a few blocks' logistic math (a 4096-logit GAN batch measured slower split in two).
constexpr int64_t kGrainBlocks = 8;
// Elements one thread takes before the gradient scaling runs in parallel (one multiply each).
constexpr int64_t kScaleGrain = 65536;

// Sum over [0, n) of f(i0, i1) -> partial, in fixed blocks, partials added in block order.
template <typename acc_t, typename F>
acc_t blocked_sum(int64_t n, const F& f) {
  const int64_t nb = (n + kBlock - 1) / kBlock;
  if (nb <= 1) return n > 0 ? f(int64_t(0), n) : acc_t(0);
  std::vector<acc_t> part(nb);
  at::parallel_for(0, nb, kGrainBlocks, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) part[b] = f(b * kBlock, std::min(n, (b + 1) * kBlock));
  });
  acc_t s = 0;
  for (int64_t b = 0; b < nb; ++b) s += part[b];
  return s;
}

// `c` elements of p (c <= the vector width) as a vector of acc_t; missing lanes are 0.
template <typename scalar_t, typename acc_t>
inline Vectorized<acc_t> load_as(const scalar_t* p, int64_t c) {
  using Vec = Vectorized<acc_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return c == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, c);
  } else {
    if (c == Vec::size()) {
      Vec out;
      at::vec::load_to_float<scalar_t>(p, out);
      return out;
    }
    __at_align__ acc_t tmp[Vec::size()] = {};
    for (int64_t k = 0; k < c; ++k) tmp[k] = static_cast<acc_t>(p[k]);
    return Vec::loadu(tmp);
  }
}

// Sum over [i0, i1) of the loss vectors f(i, count) (count = the vector width except for the last
// step); lanes past count are dropped; the lanes are added in a fixed order.
template <typename acc_t, typename F>
inline acc_t vec_sum(int64_t i0, int64_t i1, const F& f) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  Vec acc(acc_t(0));
  int64_t i = i0;
  for (; i + W <= i1; i += W) acc = acc + f(i, W);
  if (i < i1) acc = acc + Vec::set(Vec(acc_t(0)), f(i, i1 - i), i1 - i);
  __at_align__ acc_t lanes[W];
  acc.store(lanes);
  acc_t s = 0;
  for (int64_t k = 0; k < W; ++k) s += lanes[k];
  return s;
}

// Whether any lane of v is outside [0, 1] or NaN.
template <typename acc_t>
inline bool any_outside_unit(const Vectorized<acc_t>& v) {
  using Vec = Vectorized<acc_t>;
  return ((v >= Vec(acc_t(0))) & (v <= Vec(acc_t(1)))).zero_mask() != 0;
}

// One GAN side: terms and derivatives of x[0..n) in role ROLE; grad[i] = d term_i * gscale.
// Writes terms[i] when TERMS. Returns the (unscaled) sum of the terms. KIND, ROLE and TERMS are
// compile-time so that the per-element switch folds away.
template <typename scalar_t, typename acc_t, int KIND, int ROLE, bool TERMS>
acc_t gan_side_t(const scalar_t* x, int64_t n, acc_t label, acc_t gscale, acc_t* grad, acc_t* terms) {
  using Vec = Vectorized<acc_t>;
  const Vec lab(label), gs(gscale);
  return blocked_sum<acc_t>(n, [&](int64_t i0, int64_t i1) {
    return vec_sum<acc_t>(i0, i1, [&](int64_t i, int64_t c) {
      Vec g;
      const Vec l = gan_elem<Vec>(load_as<scalar_t, acc_t>(x + i, c), KIND, ROLE, lab, &g);
      (g * gs).store(grad + i, c);
      if (TERMS) l.store(terms + i, c);
      return l;
    });
  });
}

template <typename scalar_t, typename acc_t, int KIND>
acc_t gan_side_k(const scalar_t* x, int64_t n, int role, acc_t label, acc_t gscale, acc_t* grad, acc_t* terms) {
  const bool t = terms != nullptr;
  switch (role) {
    case kRoleReal:
      return t ? gan_side_t<scalar_t, acc_t, KIND, kRoleReal, true>(x, n, label, gscale, grad, terms)
               : gan_side_t<scalar_t, acc_t, KIND, kRoleReal, false>(x, n, label, gscale, grad, terms);
    case kRoleFake:
      return t ? gan_side_t<scalar_t, acc_t, KIND, kRoleFake, true>(x, n, label, gscale, grad, terms)
               : gan_side_t<scalar_t, acc_t, KIND, kRoleFake, false>(x, n, label, gscale, grad, terms);
    default:
      return t ? gan_side_t<scalar_t, acc_t, KIND, kRoleGen, true>(x, n, label, gscale, grad, terms)
               : gan_side_t<scalar_t, acc_t, KIND, kRoleGen, false>(x, n, label, gscale, grad, terms);
  }
}

template <typename scalar_t, typename acc_t>
acc_t gan_side(const scalar_t* x, int64_t n, int kind, int role, acc_t label, acc_t gscale, acc_t* grad,
               acc_t* terms) {
  switch (kind) {
    case kGanBce: return gan_side_k<scalar_t, acc_t, kGanBce>(x, n, role, label, gscale, grad, terms);
    case kGanMinimax: return gan_side_k<scalar_t, acc_t, kGanMinimax>(x, n, role, label, gscale, grad, terms);
    case kGanHinge: return gan_side_k<scalar_t, acc_t, kGanHinge>(x, n, role, label, gscale, grad, terms);
    case kGanWasserstein:
      return gan_side_k<scalar_t, acc_t, kGanWasserstein>(x, n, role, label, gscale, grad, terms);
    case kGanLsgan: return gan_side_k<scalar_t, acc_t, kGanLsgan>(x, n, role, label, gscale, grad, terms);
    default: TORCH_CHECK(false, "gan_loss: bad kind code ", kind);
  }
}

// out[i] = src[i] * k (k a scalar) or src[i] * c[i] (c elementwise, COEF_ELEM), in out_t.
template <typename acc_t, typename out_t, typename coef_t, bool COEF_ELEM>
void scale_into(const acc_t* src, const coef_t* c, int64_t m, out_t* o) {
  const acc_t k = COEF_ELEM ? acc_t(0) : static_cast<acc_t>(c[0]);
  at::parallel_for(0, m, kScaleGrain, [&](int64_t i0, int64_t i1) {
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) o[i] = static_cast<out_t>(src[i] * (COEF_ELEM ? static_cast<acc_t>(c[i]) : k));
  });
}

// Bits of the range flag the probability losses set: a probability (input) or a target outside
// [0, 1] or NaN, which torch's binary_cross_entropy rejects (torch names the first bad element it
// meets; with both kinds present, the target's error is raised here).
constexpr int kBadInput = 1, kBadTarget = 2;

// Sum of the reconstruction terms of recon[0..n) (kind RK), d/d recon * s written to g; when RK
// is bce, sets kBadInput / kBadTarget in *bad for a recon / target value outside [0, 1] or NaN.
template <int RK, typename r_t, typename t_t, typename acc_t>
acc_t vae_recon_sum(const r_t* r, const t_t* t, int64_t n, acc_t s, acc_t* g, std::atomic<int>* bad) {
  using Vec = Vectorized<acc_t>;
  const Vec sv(s);
  return blocked_sum<acc_t>(n, [&](int64_t i0, int64_t i1) {
    bool out = false, tout = false;
    const acc_t a = vec_sum<acc_t>(i0, i1, [&](int64_t i, int64_t c) {
      const Vec ri = load_as<r_t, acc_t>(r + i, c), ti = load_as<t_t, acc_t>(t + i, c);
      if (RK == kReconBce) {
        out |= any_outside_unit<acc_t>(ri);
        tout |= any_outside_unit<acc_t>(ti);
      }
      Vec gi;
      const Vec l = vae_recon_elem<Vec>(ri, ti, RK, &gi);
      (gi * sv).store(g + i, c);
      return l;
    });
    if (out || tout) bad->fetch_or((out ? kBadInput : 0) | (tout ? kBadTarget : 0));
    return a;
  });
}

// Sum of the KL terms of (mu, logvar)[0..nz); d/d mu * k to gm, d/d logvar * k to gl.
template <typename scalar_t, typename acc_t>
acc_t kl_sum(const scalar_t* m, const scalar_t* lv, int64_t nz, acc_t k, acc_t* gm, acc_t* gl) {
  using Vec = Vectorized<acc_t>;
  const Vec kv(k);
  return blocked_sum<acc_t>(nz, [&](int64_t i0, int64_t i1) {
    return vec_sum<acc_t>(i0, i1, [&](int64_t i, int64_t c) {
      Vec dm, dl;
      const Vec l = kl_elem<Vec>(load_as<scalar_t, acc_t>(m + i, c), load_as<scalar_t, acc_t>(lv + i, c), &dm, &dl);
      (dm * kv).store(gm + i, c);
      (dl * kv).store(gl + i, c);
      return l;
    });
  });
}

// BCE (LOGITS: with logits) of x against t, optional per-element weight wp and pos_weight pp;
// d/dx * gs to g, the terms to terms (when not null). Returns the (unscaled) sum; sets kBadInput /
// kBadTarget in *bad for a probability / target outside [0, 1] or NaN (not LOGITS).
template <bool LOGITS, typename x_t, typename t_t, typename acc_t>
acc_t bce_sum(const x_t* x, const t_t* t, const acc_t* wp, const acc_t* pp, int64_t n, acc_t gs, acc_t* g,
              acc_t* terms, std::atomic<int>* bad) {
  using Vec = Vectorized<acc_t>;
  const Vec gsv(gs), one(acc_t(1));
  return blocked_sum<acc_t>(n, [&](int64_t i0, int64_t i1) {
    bool out = false, tout = false;
    const acc_t a = vec_sum<acc_t>(i0, i1, [&](int64_t i, int64_t c) {
      const Vec xi = load_as<x_t, acc_t>(x + i, c), ti = load_as<t_t, acc_t>(t + i, c);
      Vec gi, l;
      if constexpr (LOGITS) {
        l = bce_logits_elem<Vec>(xi, ti, pp ? load_as<acc_t, acc_t>(pp + i, c) : one, &gi);
      } else {
        out |= any_outside_unit<acc_t>(xi);
        tout |= any_outside_unit<acc_t>(ti);
        l = bce_prob_elem<Vec>(xi, ti, &gi);
      }
      if (wp) {
        const Vec w = load_as<acc_t, acc_t>(wp + i, c);
        l = l * w;
        gi = gi * w;
      }
      (gi * gsv).store(g + i, c);
      if (terms) l.store(terms + i, c);
      return l;
    });
    if (out || tout) bad->fetch_or((out ? kBadInput : 0) | (tout ? kBadTarget : 0));
    return a;
  });
}

}  // namespace
}  // namespace genfast

#ifdef GENFAST_LOSSES_TARGET_PRAGMA
#pragma GCC pop_options
#undef __AVX__
#undef __AVX2__
#undef __FMA__
#undef __F16C__
#endif

// --- ops (baseline ISA: the run-time check comes first) --------------------------------------------
namespace genfast {
namespace {

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_floating_point(), "genfast losses: ", name, " must be a floating-point tensor, got ",
              t.scalar_type());
}

// Returns (out_real, out_fake, grad). reduction mean/sum: out_real is the 0-dim loss
// reduce(real terms) + reduce(fake terms) and out_fake is empty; none: the per-element terms in
// the shapes of real and fake. grad: flat [real | fake] derivatives of the reduced loss (of each
// term for none). A missing side contributes nothing; `generator` gives fake the generator role.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gan_loss_fwd_cpu(const c10::optional<at::Tensor>& real_,
                                                                const c10::optional<at::Tensor>& fake_,
                                                                int64_t kind, bool generator, int64_t reduction,
                                                                double real_label) {
  const bool has_r = real_.has_value() && real_->defined();
  const bool has_f = fake_.has_value() && fake_->defined();
  TORCH_CHECK(has_r || has_f, "gan_loss: real_logits and fake_logits are both None");
  check_simd();
  const at::Tensor& any = has_r ? *real_ : *fake_;
  if (has_r) check_float(*real_, "real_logits");
  if (has_f) check_float(*fake_, "fake_logits");
  TORCH_CHECK(!(has_r && has_f) || real_->scalar_type() == fake_->scalar_type(),
              "gan_loss: real_logits and fake_logits must have the same dtype, got ", real_->scalar_type(), " and ",
              fake_->scalar_type());
  TORCH_CHECK(reduction >= kReduceNone && reduction <= kReduceSum, "gan_loss: bad reduction code ", reduction);
  at::Tensor real = has_r ? real_->contiguous() : at::Tensor();
  at::Tensor fake = has_f ? fake_->contiguous() : at::Tensor();
  const int64_t nr = has_r ? real.numel() : 0, nf = has_f ? fake.numel() : 0;
  const auto opts = any.options().dtype(acc_type(any.scalar_type()));
  at::Tensor grad = at::empty({nr + nf}, opts);
  at::Tensor out_r, out_f;
  if (reduction == kReduceNone) {
    out_r = has_r ? at::empty(real.sizes(), opts) : at::empty({0}, opts);
    out_f = has_f ? at::empty(fake.sizes(), opts) : at::empty({0}, opts);
  } else {
    out_r = at::empty({}, opts);
    out_f = at::empty({0}, opts);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, any.scalar_type(), "gan_loss_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool mean = reduction == kReduceMean, none = reduction == kReduceNone;
    acc_t* g = grad.data_ptr<acc_t>();
    const acc_t lab = static_cast<acc_t>(real_label);
    acc_t total = 0;
    if (has_r) {
      const acc_t sc = mean ? acc_t(1) / acc_t(nr) : acc_t(1);
      const acc_t s = gan_side<scalar_t, acc_t>(real.data_ptr<scalar_t>(), nr, static_cast<int>(kind), kRoleReal,
                                                lab, sc, g, none ? out_r.data_ptr<acc_t>() : nullptr);
      total += mean ? s / acc_t(nr) : s;
    }
    if (has_f) {
      const acc_t sc = mean ? acc_t(1) / acc_t(nf) : acc_t(1);
      const acc_t s = gan_side<scalar_t, acc_t>(fake.data_ptr<scalar_t>(), nf, static_cast<int>(kind),
                                                generator ? kRoleGen : kRoleFake, lab, sc, g + nr,
                                                none ? out_f.data_ptr<acc_t>() : nullptr);
      total += mean ? s / acc_t(nf) : s;
    }
    if (!none) *out_r.data_ptr<acc_t>() = total;
  });
  return {out_r, out_f, grad};
}

// (grad_a, grad_b) = (saved[:split] * coef_a, saved[split:] * coef_b) in dtype_a / dtype_b, flat.
// coef_x is a 0-dim scalar (reduced losses), a tensor with the segment's element count (none),
// or None (the output was not used: the gradient is 0). One pass: read saved, write the grads.
std::tuple<at::Tensor, at::Tensor> loss_scale_grad_cpu(const c10::optional<at::Tensor>& coef_a,
                                                       const c10::optional<at::Tensor>& coef_b,
                                                       const at::Tensor& saved_, int64_t split,
                                                       at::ScalarType dtype_a, at::ScalarType dtype_b) {
  const at::Tensor saved = saved_.contiguous();
  const int64_t n = saved.numel();
  TORCH_CHECK(split >= 0 && split <= n, "loss_scale_grad: split ", split, " outside [0, ", n, "]");
  check_simd();
  at::Tensor ga = at::empty({split}, saved.options().dtype(dtype_a));
  at::Tensor gb = at::empty({n - split}, saved.options().dtype(dtype_b));
  AT_DISPATCH_FLOATING_TYPES(saved.scalar_type(), "loss_scale_grad_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t* s = saved.data_ptr<acc_t>();
    auto seg = [&](const c10::optional<at::Tensor>& coef_, at::Tensor& out, const acc_t* src, int64_t m) {
      const bool has = coef_.has_value() && coef_->defined();
      at::Tensor coef;
      if (has) {
        coef = coef_->contiguous();
        TORCH_CHECK(coef.dim() == 0 || coef.numel() == m, "loss_scale_grad: gradient has ", coef.numel(),
                    " elements, expected 1 or ", m);
      }
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "loss_scale_grad_out", [&] {
        using out_t = scalar_t;
        out_t* o = out.data_ptr<out_t>();
        if (!has) {
          at::parallel_for(0, m, 16384, [&](int64_t i0, int64_t i1) {
            for (int64_t i = i0; i < i1; ++i) o[i] = out_t(0);
          });
          return;
        }
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, coef.scalar_type(), "loss_scale_grad_coef", [&] {
          if (coef.dim() == 0) {
            scale_into<acc_t, out_t, scalar_t, false>(src, coef.data_ptr<scalar_t>(), m, o);
          } else {
            scale_into<acc_t, out_t, scalar_t, true>(src, coef.data_ptr<scalar_t>(), m, o);
          }
        });
      });
    };
    seg(coef_a, ga, s, split);
    seg(coef_b, gb, s + split, n - split);
  });
  return {ga, gb};
}

// Runs f<scalar_t, target_t, acc_t>() for input dtype `t` and a target of the same dtype or of
// the accumulation dtype (float32 targets with float16/bfloat16 inputs, as autocast produces).
template <typename F>
void dispatch_pair(at::ScalarType t, at::ScalarType tt, const char* name, const F& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "loss_dispatch_pair", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (tt == t) {
      f(scalar_t(0), scalar_t(0), acc_t(0));
    } else {
      TORCH_CHECK(tt == acc_type(t), name, ": target must have the dtype of the input (", t, ") or ",
                  acc_type(t), ", got ", tt);
      f(scalar_t(0), acc_t(0), acc_t(0));
    }
  });
}

// Returns (loss 0-dim, parts (2,) = [recon, kl], grad flat [recon | mu | logvar]); every value
// already carries the reduction's 1/N, the gradient of mu and logvar also beta.
std::tuple<at::Tensor, at::Tensor, at::Tensor> vae_loss_fwd_cpu(const at::Tensor& recon_, const at::Tensor& target_,
                                                                const at::Tensor& mu_, const at::Tensor& logvar_,
                                                                int64_t recon_kind, double beta, int64_t reduction) {
  check_float(recon_, "recon");
  check_float(target_, "target");
  check_float(mu_, "mu");
  check_float(logvar_, "logvar");
  TORCH_CHECK(recon_.sizes() == target_.sizes(), "vae_loss: recon ", recon_.sizes(), " and target ",
              target_.sizes(), " must have the same shape");
  TORCH_CHECK(mu_.sizes() == logvar_.sizes(), "vae_loss: mu ", mu_.sizes(), " and logvar ", logvar_.sizes(),
              " must have the same shape");
  TORCH_CHECK(mu_.scalar_type() == logvar_.scalar_type(), "vae_loss: mu and logvar must have the same dtype");
  const at::ScalarType acc = acc_type(recon_.scalar_type());
  TORCH_CHECK(acc_type(mu_.scalar_type()) == acc, "vae_loss: mu (", mu_.scalar_type(), ") and recon (",
              recon_.scalar_type(), ") must both be float64 or both not");
  TORCH_CHECK(reduction == kReduceSum || reduction == kReduceBatchMean, "vae_loss: bad reduction code ", reduction);
  check_simd();
  const at::Tensor recon = recon_.contiguous(), target = target_.contiguous();
  const at::Tensor mu = mu_.contiguous(), logvar = logvar_.contiguous();
  const int64_t n = recon.numel(), nz = mu.numel();
  const auto opts = recon.options().dtype(acc);
  at::Tensor loss = at::empty({}, opts), parts = at::empty({2}, opts), grad = at::empty({n + 2 * nz}, opts);
  const double N = reduction == kReduceBatchMean ? (recon.dim() > 0 ? double(recon.size(0)) : 1.0) : 1.0;
  std::atomic<int> out_of_range{0};
  double rec_sum = 0, kl_total = 0;
  dispatch_pair(recon.scalar_type(), target.scalar_type(), "vae_loss", [&](auto rz, auto tz, auto az) {
    using r_t = decltype(rz);
    using t_t = decltype(tz);
    using acc_t = decltype(az);
    const r_t* r = recon.data_ptr<r_t>();
    const t_t* t = target.data_ptr<t_t>();
    acc_t* g = grad.data_ptr<acc_t>();
    const acc_t s = acc_t(1) / acc_t(N);
    acc_t rs;
    if (recon_kind == kReconBce) {
      rs = vae_recon_sum<kReconBce>(r, t, n, s, g, &out_of_range);
    } else if (recon_kind == kReconBceLogits) {
      rs = vae_recon_sum<kReconBceLogits>(r, t, n, s, g, &out_of_range);
    } else {
      rs = vae_recon_sum<kReconMse>(r, t, n, s, g, &out_of_range);
    }
    rec_sum = static_cast<double>(rs);
  });
  TORCH_CHECK(!(out_of_range.load() & kBadTarget), "all elements of target should be between 0 and 1");
  TORCH_CHECK(!(out_of_range.load() & kBadInput), "all elements of input should be between 0 and 1 (vae_loss: recon holds "
              "probabilities for recon_loss='bce'; use 'bce_logits' for logits)");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "vae_kl", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* m = mu.data_ptr<scalar_t>();
    const scalar_t* lv = logvar.data_ptr<scalar_t>();
    acc_t* gm = grad.data_ptr<acc_t>() + n;
    acc_t* gl = gm + nz;
    const acc_t k = static_cast<acc_t>(beta) / acc_t(N);
    const acc_t ks = kl_sum<scalar_t, acc_t>(m, lv, nz, k, gm, gl);
    kl_total = static_cast<double>(ks);
  });
  AT_DISPATCH_FLOATING_TYPES(acc, "vae_store", [&] {
    const scalar_t rec = static_cast<scalar_t>(rec_sum) / static_cast<scalar_t>(N);
    const scalar_t kl = static_cast<scalar_t>(kl_total) / static_cast<scalar_t>(N);
    *loss.data_ptr<scalar_t>() = rec + static_cast<scalar_t>(beta) * kl;
    parts.data_ptr<scalar_t>()[0] = rec;
    parts.data_ptr<scalar_t>()[1] = kl;
  });
  return {loss, parts, grad};
}

// BCE / BCE-with-logits with a target tensor; weight and pos_weight (optional) hold one value per
// element of input (the caller broadcasts them). Returns (out, grad): out is the 0-dim reduced
// loss or the per-element terms (input's shape); both in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor> bce_loss_fwd_cpu(const at::Tensor& input_, const at::Tensor& target_,
                                                    const c10::optional<at::Tensor>& weight_,
                                                    const c10::optional<at::Tensor>& pos_weight_,
                                                    int64_t reduction, bool logits) {
  check_float(input_, "input");
  check_float(target_, "target");
  TORCH_CHECK(input_.sizes() == target_.sizes(), "bce_loss: target size (", target_.sizes(),
              ") must be the same as input size (", input_.sizes(), ")");
  TORCH_CHECK(reduction >= kReduceNone && reduction <= kReduceSum, "bce_loss: bad reduction code ", reduction);
  const bool has_w = weight_.has_value() && weight_->defined();
  const bool has_p = pos_weight_.has_value() && pos_weight_->defined();
  TORCH_CHECK(logits || !has_p, "bce_loss: pos_weight needs logits=True");
  check_simd();
  const at::Tensor input = input_.contiguous(), target = target_.contiguous();
  const int64_t n = input.numel();
  const at::ScalarType acc = acc_type(input.scalar_type());
  at::Tensor w = has_w ? weight_->contiguous().to(acc) : at::Tensor();
  at::Tensor pw = has_p ? pos_weight_->contiguous().to(acc) : at::Tensor();
  TORCH_CHECK(!has_w || w.numel() == n, "bce_loss: weight must have one value per input element");
  TORCH_CHECK(!has_p || pw.numel() == n, "bce_loss: pos_weight must have one value per input element");
  const auto opts = input.options().dtype(acc);
  const bool none = reduction == kReduceNone;
  at::Tensor out = none ? at::empty(input.sizes(), opts) : at::empty({}, opts);
  at::Tensor grad = at::empty({n}, opts);
  std::atomic<int> out_of_range{0};
  dispatch_pair(input.scalar_type(), target.scalar_type(), "bce_loss", [&](auto xz, auto tz, auto az) {
    using x_t = decltype(xz);
    using t_t = decltype(tz);
    using acc_t = decltype(az);
    const x_t* x = input.data_ptr<x_t>();
    const t_t* t = target.data_ptr<t_t>();
    const acc_t* wp = has_w ? w.data_ptr<acc_t>() : nullptr;
    const acc_t* pp = has_p ? pw.data_ptr<acc_t>() : nullptr;
    acc_t* g = grad.data_ptr<acc_t>();
    acc_t* terms = none ? out.data_ptr<acc_t>() : nullptr;
    const acc_t gs = reduction == kReduceMean ? acc_t(1) / acc_t(n) : acc_t(1);
    const acc_t s = logits ? bce_sum<true>(x, t, wp, pp, n, gs, g, terms, &out_of_range)
                           : bce_sum<false>(x, t, wp, pp, n, gs, g, terms, &out_of_range);
    if (!none) *out.data_ptr<acc_t>() = reduction == kReduceMean ? s / acc_t(n) : s;
  });
  TORCH_CHECK(!(out_of_range.load() & kBadTarget), "all elements of target should be between 0 and 1");
  TORCH_CHECK(!(out_of_range.load() & kBadInput), "all elements of input should be between 0 and 1");
  return {out, grad};
}

// The strides torch's elementwise expression a * b (+ c) gives (TensorIterator's choice from its
// operands' strides), found on meta tensors: for operands that are not all contiguous.
at::Tensor torch_layout_like(const at::Tensor& out, std::initializer_list<at::Tensor> operands, bool add_first) {
  std::vector<at::Tensor> m;
  for (const at::Tensor& t : operands)
    m.push_back(at::empty_strided(t.sizes(), t.strides(), t.options().device(at::kMeta)));
  const at::Tensor r = add_first ? at::add(m[0], at::mul(m[1], m[2])) : at::mul(at::mul(m[0], m[1]), m[2]);
  if (r.strides() == out.strides()) return out;
  return at::empty_strided(r.sizes(), r.strides(), out.options()).copy_(out);
}

bool all_contiguous(std::initializer_list<at::Tensor> ts) {
  for (const at::Tensor& t : ts)
    if (!t.is_contiguous()) return false;
  return true;
}

// z = mu + eps * s, s = exp(0.5 logvar) already computed (by torch's mul and exp), one pass.
// With keep_layout (the eager entry), z takes the strides torch's expression's result has: mu's
// when eps and s share them (e.g. channels_last), computed in place; for operands of different
// layouts it is computed contiguous and copied into torch's strides (one more pass, rare). For
// the registered op (whose fake kernel is contiguous) z is contiguous.
at::Tensor reparam_combine_cpu(const at::Tensor& mu_, const at::Tensor& eps_, const at::Tensor& s,
                               bool keep_layout) {
  const bool same = keep_layout && mu_.is_non_overlapping_and_dense() && eps_.strides() == mu_.strides() &&
                    s.strides() == mu_.strides();
  const at::Tensor mu = same ? mu_ : mu_.contiguous(), eps = same ? eps_ : eps_.contiguous(),
                   sc = same ? s : s.contiguous();
  // (dense tensors of equal strides: element i of each, in memory order, is the same index)
  at::Tensor z = same ? at::empty_like(mu) : at::empty(mu.sizes(), mu.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparam_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *m = mu.data_ptr<scalar_t>(), *e = eps.data_ptr<scalar_t>(), *sp = sc.data_ptr<scalar_t>();
    scalar_t* o = z.data_ptr<scalar_t>();
    at::parallel_for(0, mu.numel(), 16384, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) o[i] = reparam_combine<scalar_t, acc_t>(m[i], e[i], sp[i]);
    });
  });
  if (keep_layout && !same && !all_contiguous({mu_, eps_, s})) return torch_layout_like(z, {mu_, eps_, s}, true);
  return z;
}

void check_reparam_args(const at::Tensor& mu_, const at::Tensor& logvar_, const at::Tensor& eps_) {
  TORCH_CHECK(mu_.sizes() == logvar_.sizes() && mu_.sizes() == eps_.sizes(), "reparameterize: mu ", mu_.sizes(),
              ", logvar ", logvar_.sizes(), " and eps ", eps_.sizes(), " must have the same shape");
  TORCH_CHECK(mu_.scalar_type() == logvar_.scalar_type() && mu_.scalar_type() == eps_.scalar_type(),
              "reparameterize: mu, logvar and eps must have the same dtype");
}

// (z, s): z = mu + eps * exp(0.5 logvar) in mu's dtype, bitwise torch's expression: s =
// exp(0.5 logvar) comes from torch's own mul and exp kernels (torch's vectorised exp differs from
// libm's in the last bit for some inputs, and which one a lane gets depends on its position in
// torch's loop), then one pass computes mu + eps * s with torch's roundings (csrc/common/reparam.h,
// compiled for the baseline ISA: no FMA contraction).
std::tuple<at::Tensor, at::Tensor> reparam_fwd_parts(const at::Tensor& mu, const at::Tensor& logvar,
                                                     const at::Tensor& eps, bool keep_layout) {
  check_reparam_args(mu, logvar, eps);
  at::Tensor s = at::mul(logvar, 0.5);
  s.exp_();
  return {reparam_combine_cpu(mu, eps, s, keep_layout), s};
}

at::Tensor reparam_fwd_cpu(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& eps) {
  return std::get<0>(reparam_fwd_parts(mu, logvar, eps, false));
}

// d logvar = 0.5 * grad_z * eps * exp(0.5 logvar) (one pass); d mu is grad_z itself.
at::Tensor reparam_bwd_cpu(const at::Tensor& grad_z_, const at::Tensor& logvar_, const at::Tensor& eps_) {
  TORCH_CHECK(grad_z_.sizes() == logvar_.sizes() && grad_z_.sizes() == eps_.sizes(),
              "reparameterize backward: shapes of grad, logvar and eps differ");
  const at::Tensor gz = grad_z_.contiguous(), lv = logvar_.contiguous(), eps = eps_.contiguous();
  TORCH_CHECK(gz.scalar_type() == lv.scalar_type(), "reparameterize backward: grad dtype ", gz.scalar_type(),
              " differs from logvar's ", lv.scalar_type());
  at::Tensor out = at::empty(lv.sizes(), lv.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lv.scalar_type(), "reparam_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *g = gz.data_ptr<scalar_t>(), *l = lv.data_ptr<scalar_t>(), *e = eps.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, lv.numel(), 16384, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        o[i] = static_cast<scalar_t>(reparam_grad_logvar<acc_t>(static_cast<acc_t>(g[i]), static_cast<acc_t>(l[i]),
                                                                static_cast<acc_t>(e[i])));
    });
  });
  return out;
}

}  // namespace

// For the eager entry's C++ autograd (csrc/eager_entries.cpp), which keeps s = exp(0.5 logvar)
// from its forward: (z, s), z bitwise reparam_fwd's; and d logvar = 0.5 * grad_z * eps * s in one
// pass without an exp (reparam_bwd recomputes exp per element with the scalar libm call: 30 us
// for 64 x 128 values on the CI CPU, more than torch's whole backward of the expression).
std::tuple<at::Tensor, at::Tensor> reparam_fwd_scale_cpu(const at::Tensor& mu, const at::Tensor& logvar,
                                                         const at::Tensor& eps) {
  return reparam_fwd_parts(mu, logvar, eps, true);
}

at::Tensor reparam_bwd_scale_cpu(const at::Tensor& grad_z_, const at::Tensor& eps_, const at::Tensor& s_) {
  TORCH_CHECK(grad_z_.sizes() == eps_.sizes() && grad_z_.sizes() == s_.sizes(),
              "reparameterize backward: shapes of grad, eps and scale differ");
  TORCH_CHECK(grad_z_.scalar_type() == s_.scalar_type() && eps_.scalar_type() == s_.scalar_type(),
              "reparameterize backward: grad dtype ", grad_z_.scalar_type(), " differs from logvar's ", s_.scalar_type());
  const at::Tensor gz = grad_z_.contiguous(), eps = eps_.contiguous(), sc = s_.contiguous();
  at::Tensor out = at::empty(sc.sizes(), sc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sc.scalar_type(), "reparam_bwd_scale_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *g = gz.data_ptr<scalar_t>(), *e = eps.data_ptr<scalar_t>(), *sp = sc.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, sc.numel(), 16384, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        o[i] = static_cast<scalar_t>(acc_t(0.5) * static_cast<acc_t>(g[i]) * static_cast<acc_t>(e[i]) *
                                     static_cast<acc_t>(sp[i]));
    });
  });
  // the strides torch's backward of the expression gives (its grad_z * eps * s), e.g. channels_last
  if (!all_contiguous({grad_z_, eps_, s_})) return torch_layout_like(out, {grad_z_, eps_, s_}, false);
  return out;
}

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("gan_loss_fwd", &gan_loss_fwd_cpu);
  m.impl("loss_scale_grad", &loss_scale_grad_cpu);
  m.impl("vae_loss_fwd", &vae_loss_fwd_cpu);
  m.impl("bce_loss_fwd", &bce_loss_fwd_cpu);
  m.impl("reparam_fwd", &reparam_fwd_cpu);
  m.impl("reparam_bwd", &reparam_bwd_cpu);
}

}  // namespace genfast
