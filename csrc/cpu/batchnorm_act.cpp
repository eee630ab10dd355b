// BatchNorm + activation on the CPU: at::parallel_for over fixed-size blocks (results do not
// depend on the thread count), inner loops over contiguous memory written for the compiler to
// vectorise (`omp simd`).
//
// Passes over memory:
//   training forward: 2 reads of x (statistics; normalise) + 1 write of y.
//   eval forward:     1 read of x + 1 write of y.
//   training backward: 2 reads of dy and x (or y) (the two reductions; dx) + 1 write of dx.
//   eval backward:    the same two passes (dgamma and dbeta still need the reductions).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "../common/batchnorm_act.h"
#include "../common/tensor_layout.h"

namespace genfast {
namespace {

// Rows per block for the channels-last reductions: a block of rows x C elements is read twice
// (sum, then squared deviations) and is sized to stay in the L2 cache between the two reads.
constexpr int64_t kBlockElems = 16384;

int64_t nlc_rows_per_block(int64_t C) { return std::max<int64_t>(1, kBlockElems / std::max<int64_t>(C, 1)); }

template <typename acc_t, typename param_t>
std::vector<acc_t> load_param(const c10::optional<at::Tensor>& p, int64_t C, acc_t fill) {
  std::vector<acc_t> out(C, fill);
  if (p.has_value() && p->defined()) {
    at::Tensor pc = p->contiguous();
    const param_t* d = pc.data_ptr<param_t>();
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<acc_t>(d[c]);
  }
  return out;
}

// Per-channel Welford statistics of x (one read of x; each row or block is re-read from cache).
template <typename scalar_t, typename acc_t>
std::vector<Welford<acc_t>> channel_stats(const scalar_t* x, const ChannelView& v) {
  const int64_t C = v.C;
  std::vector<Welford<acc_t>> out(C, welford_init<acc_t>());
  if (v.layout == RowLayout::kNCL) {
    const int64_t rows = v.N * C, L = v.L;
    std::vector<Welford<acc_t>> row_stats(rows);
    at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* p = x + r * L;
        acc_t s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < L; ++i) s += static_cast<acc_t>(p[i]);
        const acc_t m = L > 0 ? s / acc_t(L) : acc_t(0);
        acc_t q = 0;
#pragma omp simd reduction(+ : q)
        for (int64_t i = 0; i < L; ++i) {
          const acc_t d = static_cast<acc_t>(p[i]) - m;
          q += d * d;
        }
        row_stats[r] = Welford<acc_t>{acc_t(L), m, q};
      }
    });
    for (int64_t n = 0; n < v.N; ++n)
      for (int64_t c = 0; c < C; ++c) out[c] = welford_merge(out[c], row_stats[n * C + c]);
  } else {
    const int64_t rows = v.N * v.L, R = nlc_rows_per_block(C);
    const int64_t nblocks = (rows + R - 1) / R;
    std::vector<Welford<acc_t>> blk(nblocks * C);
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> s(C), q(C);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t lo = b * R, hi = std::min(rows, lo + R);
        std::fill(s.begin(), s.end(), acc_t(0));
        std::fill(q.begin(), q.end(), acc_t(0));
        for (int64_t r = lo; r < hi; ++r) {
          const scalar_t* p = x + r * C;
          acc_t* sp = s.data();
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) sp[c] += static_cast<acc_t>(p[c]);
        }
        const acc_t cnt = acc_t(hi - lo);
        for (int64_t c = 0; c < C; ++c) s[c] /= cnt;
        for (int64_t r = lo; r < hi; ++r) {
          const scalar_t* p = x + r * C;
          const acc_t* sp = s.data();
          acc_t* qp = q.data();
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const acc_t d = static_cast<acc_t>(p[c]) - sp[c];
            qp[c] += d * d;
          }
        }
        for (int64_t c = 0; c < C; ++c) blk[b * C + c] = Welford<acc_t>{cnt, s[c], q[c]};
      }
    });
    for (int64_t b = 0; b < nblocks; ++b)
      for (int64_t c = 0; c < C; ++c) out[c] = welford_merge(out[c], blk[b * C + c]);
  }
  return out;
}

// Calls f(std::integral_constant<int, ACT>) so that hot loops see the activation as a
// compile-time constant (no branch in the inner loop, which then vectorises).
template <typename F>
void dispatch_act(int64_t act, F&& f) {
  switch (act) {
    case kRelu: f(std::integral_constant<int, kRelu>{}); break;
    case kLeakyRelu: f(std::integral_constant<int, kLeakyRelu>{}); break;
    default: f(std::integral_constant<int, kIdentity>{}); break;
  }
}

template <typename scalar_t, typename acc_t, int act>
void normalize_act(const scalar_t* x, scalar_t* y, const ChannelView& v, const std::vector<acc_t>& scale,
                   const std::vector<acc_t>& shift, acc_t slope_in) {
  const int64_t C = v.C;
  if (v.layout == RowLayout::kNCL) {
    const int64_t rows = v.N * C, L = v.L;
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(L, 1)), [&](int64_t r0, int64_t r1) {
      const acc_t slope = slope_in;  // a private copy per thread
      for (int64_t r = r0; r < r1; ++r) {
        const acc_t a = scale[r % C], b = shift[r % C];
        const scalar_t* p = x + r * L;
        scalar_t* o = y + r * L;
#pragma omp simd
        for (int64_t i = 0; i < L; ++i)
          o[i] = static_cast<scalar_t>(bn_act_forward_elem_c<act, acc_t>(static_cast<acc_t>(p[i]), a, b, slope));
      }
    });
  } else {
    const int64_t rows = v.N * v.L;
    const acc_t* a = scale.data();
    const acc_t* b = shift.data();
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
      const acc_t slope = slope_in;  // a private copy per thread
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* p = x + r * C;
        scalar_t* o = y + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c)
          o[c] = static_cast<scalar_t>(bn_act_forward_elem_c<act, acc_t>(static_cast<acc_t>(p[c]), a[c], b[c], slope));
      }
    });
  }
}

template <typename param_t, typename acc_t>
void store_param(at::Tensor& t, const std::vector<acc_t>& v) {
  param_t* d = t.data_ptr<param_t>();
  for (size_t c = 0; c < v.size(); ++c) d[c] = static_cast<param_t>(v[c]);
}

void check_common(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                  const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dim() >= 2, "batch_norm_act: input must have at least 2 dims (N, C, *), got ",
              input.dim());
  const int64_t C = input.size(1);
  for (const auto* p : {&weight, &bias}) {
    if (p->has_value() && (*p)->defined()) {
      TORCH_CHECK((*p)->dim() == 1 && (*p)->numel() == C,
                  "batch_norm_act: weight and bias must be 1-D with ", C, " elements");
    }
  }
}

at::ScalarType param_dtype(const at::Tensor& input, const c10::optional<at::Tensor>& p) {
  return p.has_value() && p->defined() ? p->scalar_type() : input.scalar_type();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_fwd_cpu(
    const at::Tensor& input_, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
    int64_t activation, double negative_slope, double gamma_floor) {
  check_common(input_, weight, bias);
  at::Tensor input = input_;
  const ChannelView v = channel_view(input);
  const int64_t C = v.C;
  const bool have_rm = running_mean.has_value() && running_mean->defined();
  const bool have_rv = running_var.has_value() && running_var->defined();
  TORCH_CHECK(training || (have_rm && have_rv),
              "batch_norm_act: running_mean and running_var are required when training=False");
  at::Tensor out = at::empty_like(input);
  const auto acc_type = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor save_mean = at::empty({C}, input.options().dtype(acc_type));
  at::Tensor save_invstd = at::empty({C}, input.options().dtype(acc_type));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_act_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> gamma, beta, mean(C), invstd(C);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param_dtype(input, weight), "bn_act_param", [&] {
      gamma = load_param<acc_t, scalar_t>(weight, C, acc_t(1));
    });
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param_dtype(input, bias), "bn_act_param", [&] {
      beta = load_param<acc_t, scalar_t>(bias, C, acc_t(0));
    });
    const scalar_t* x = input.data_ptr<scalar_t>();
    if (training) {
      std::vector<Welford<acc_t>> st = channel_stats<scalar_t, acc_t>(x, v);
      std::vector<acc_t> rm, rv;
      if (have_rm) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean->scalar_type(), "bn_act_rs", [&] {
          rm = load_param<acc_t, scalar_t>(running_mean, C, acc_t(0));
        });
      }
      if (have_rv) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_var->scalar_type(), "bn_act_rs", [&] {
          rv = load_param<acc_t, scalar_t>(running_var, C, acc_t(1));
        });
      }
      for (int64_t c = 0; c < C; ++c) {
        finish_stats<acc_t>(st[c], acc_t(eps), acc_t(momentum), &mean[c], &invstd[c],
                            have_rm ? &rm[c] : nullptr, have_rv ? &rv[c] : nullptr);
      }
      // Running buffers are written only here, after every check has passed.
      if (have_rm) {
        at::Tensor t = *running_mean;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "bn_act_rs", [&] {
          store_param<scalar_t, acc_t>(t, rm);
        });
      }
      if (have_rv) {
        at::Tensor t = *running_var;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "bn_act_rs", [&] {
          store_param<scalar_t, acc_t>(t, rv);
        });
      }
    } else {
      std::vector<acc_t> rm, rv;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean->scalar_type(), "bn_act_rs", [&] {
        rm = load_param<acc_t, scalar_t>(running_mean, C, acc_t(0));
        rv = load_param<acc_t, scalar_t>(running_var, C, acc_t(1));
      });
      for (int64_t c = 0; c < C; ++c) {
        mean[c] = rm[c];
        invstd[c] = acc_t(1) / std::sqrt(rv[c] + acc_t(eps));
      }
    }
    std::vector<acc_t> scale(C), shift(C);
    for (int64_t c = 0; c < C; ++c) {
      const acc_t g = effective_gamma<acc_t>(gamma[c], acc_t(gamma_floor));
      scale[c] = g * invstd[c];
      shift[c] = beta[c] - mean[c] * scale[c];
    }
    dispatch_act(activation, [&](auto a) {
      normalize_act<scalar_t, acc_t, decltype(a)::value>(x, out.data_ptr<scalar_t>(), v, scale, shift,
                                                         acc_t(negative_slope));
    });
    std::copy(mean.begin(), mean.end(), save_mean.data_ptr<acc_t>());
    std::copy(invstd.begin(), invstd.end(), save_invstd.data_ptr<acc_t>());
  });
  return {out, save_mean, save_invstd};
}

// Per-channel sums of dz and dz * xhat (one read of dy and saved).
template <typename scalar_t, typename acc_t, int act, bool saved_is_output>
void backward_sums(const scalar_t* dy, const scalar_t* sv, const ChannelView& v,
                   const std::vector<acc_t>& mean, const std::vector<acc_t>& invstd,
                   const std::vector<acc_t>& scale, const std::vector<acc_t>& shift,
                   const std::vector<acc_t>& gamma, const std::vector<acc_t>& beta, acc_t slope_in,
                   std::vector<acc_t>& sum_dz, std::vector<acc_t>& sum_dzx) {
  const int64_t C = v.C;
  if (v.layout == RowLayout::kNCL) {
    const int64_t rows = v.N * C, L = v.L;
    std::vector<acc_t> rs(rows), rx(rows);
    at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
      const acc_t slope = slope_in;  // a private copy per thread
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t c = r % C;
        const acc_t m = mean[c], is = invstd[c], a = scale[c], b = shift[c], g = gamma[c], be = beta[c];
        const scalar_t* pd = dy + r * L;
        const scalar_t* ps = sv + r * L;
        acc_t s = 0, sx = 0;
#pragma omp simd reduction(+ : s, sx)
        for (int64_t i = 0; i < L; ++i) {
          const auto d = bn_act_dz_xhat_c<act, saved_is_output, acc_t>(
              static_cast<acc_t>(pd[i]), static_cast<acc_t>(ps[i]), m, is, a, b, g, be, slope);
          const acc_t dz = d.dz, xh = d.xhat;
          s += dz;
          sx += dz * xh;
        }
        rs[r] = s;
        rx[r] = sx;
      }
    });
    for (int64_t n = 0; n < v.N; ++n)
      for (int64_t c = 0; c < C; ++c) {
        sum_dz[c] += rs[n * C + c];
        sum_dzx[c] += rx[n * C + c];
      }
  } else {
    const int64_t rows = v.N * v.L, R = nlc_rows_per_block(C);
    const int64_t nblocks = (rows + R - 1) / R;
    std::vector<acc_t> bs(nblocks * C, acc_t(0)), bx(nblocks * C, acc_t(0));
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      const acc_t slope = slope_in;  // a private copy per thread
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t lo = blk * R, hi = std::min(rows, lo + R);
        acc_t* s = bs.data() + blk * C;
        acc_t* sx = bx.data() + blk * C;
        for (int64_t r = lo; r < hi; ++r) {
          const scalar_t* pd = dy + r * C;
          const scalar_t* ps = sv + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const auto d = bn_act_dz_xhat_c<act, saved_is_output, acc_t>(
                static_cast<acc_t>(pd[c]), static_cast<acc_t>(ps[c]), mean[c], invstd[c], scale[c], shift[c],
                gamma[c], beta[c], slope);
            s[c] += d.dz;
            sx[c] += d.dz * d.xhat;
          }
        }
      }
    });
    for (int64_t blk = 0; blk < nblocks; ++blk)
      for (int64_t c = 0; c < C; ++c) {
        sum_dz[c] += bs[blk * C + c];
        sum_dzx[c] += bx[blk * C + c];
      }
  }
}

template <typename scalar_t, typename acc_t, int act, bool saved_is_output>
void backward_dx(const scalar_t* dy, const scalar_t* sv, scalar_t* dx, const ChannelView& v,
                 const std::vector<acc_t>& mean, const std::vector<acc_t>& invstd, const std::vector<acc_t>& scale,
                 const std::vector<acc_t>& shift, const std::vector<acc_t>& gamma, const std::vector<acc_t>& beta,
                 const std::vector<acc_t>& k, const std::vector<acc_t>& ka, const std::vector<acc_t>& kb,
                 acc_t slope_in) {
  const int64_t C = v.C;
  if (v.layout == RowLayout::kNCL) {
    const int64_t rows = v.N * C, L = v.L;
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(L, 1)), [&](int64_t r0, int64_t r1) {
      const acc_t slope = slope_in;  // a private copy per thread
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t c = r % C;
        const acc_t m = mean[c], is = invstd[c], a = scale[c], b = shift[c], g = gamma[c], be = beta[c];
        const acc_t kc = k[c], kac = ka[c], kbc = kb[c];
        const scalar_t* pd = dy + r * L;
        const scalar_t* ps = sv + r * L;
        scalar_t* o = dx + r * L;
#pragma omp simd
        for (int64_t i = 0; i < L; ++i) {
          const auto d = bn_act_dz_xhat_c<act, saved_is_output, acc_t>(
              static_cast<acc_t>(pd[i]), static_cast<acc_t>(ps[i]), m, is, a, b, g, be, slope);
          const acc_t dz = d.dz, xh = d.xhat;
          o[i] = static_cast<scalar_t>(bn_act_dx_elem<acc_t>(dz, xh, kc, kac, kbc));
        }
      }
    });
  } else {
    const int64_t rows = v.N * v.L;
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
      const acc_t slope = slope_in;  // a private copy per thread
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* pd = dy + r * C;
        const scalar_t* ps = sv + r * C;
        scalar_t* o = dx + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const auto d = bn_act_dz_xhat_c<act, saved_is_output, acc_t>(
              static_cast<acc_t>(pd[c]), static_cast<acc_t>(ps[c]), mean[c], invstd[c], scale[c], shift[c],
              gamma[c], beta[c], slope);
          const acc_t dz = d.dz, xh = d.xhat;
          o[c] = static_cast<scalar_t>(bn_act_dx_elem<acc_t>(dz, xh, k[c], ka[c], kb[c]));
        }
      }
    });
  }
}

// A (C,) tensor as contiguous acc_t (no op at all when it already is one).
template <typename acc_t>
at::Tensor as_acc(const at::Tensor& t) {
  const auto dt = c10::CppTypeToScalarType<acc_t>::value;
  at::Tensor c = t.is_contiguous() ? t : t.contiguous();
  return c.scalar_type() == dt ? c : c.to(dt);
}

// Per-channel (gamma_eff, beta, mean, invstd) -> scale, shift, in the accumulation type.
template <typename acc_t>
struct Coeffs {
  std::vector<acc_t> gamma, beta, mean, invstd, scale, shift;
};

template <typename acc_t>
Coeffs<acc_t> make_coeffs(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias, const at::Tensor& mean_t,
                          const at::Tensor& invstd_t, double gamma_floor) {
  const int64_t C = x.size(1);
  Coeffs<acc_t> k;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param_dtype(x, weight), "bn_act_param", [&] {
    k.gamma = load_param<acc_t, scalar_t>(weight, C, acc_t(1));
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param_dtype(x, bias), "bn_act_param", [&] {
    k.beta = load_param<acc_t, scalar_t>(bias, C, acc_t(0));
  });
  TORCH_CHECK(mean_t.numel() == C && invstd_t.numel() == C, "batch_norm_act: mean and invstd must have ", C,
              " elements");
  at::Tensor m = as_acc<acc_t>(mean_t), is = as_acc<acc_t>(invstd_t);
  k.mean.assign(m.data_ptr<acc_t>(), m.data_ptr<acc_t>() + C);
  k.invstd.assign(is.data_ptr<acc_t>(), is.data_ptr<acc_t>() + C);
  k.scale.resize(C);
  k.shift.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    k.gamma[c] = effective_gamma<acc_t>(k.gamma[c], acc_t(gamma_floor));
    k.scale[c] = k.gamma[c] * k.invstd[c];
    k.shift[c] = k.beta[c] - k.mean[c] * k.scale[c];
  }
  return k;
}

// grad_out in the saved tensor's layout (a copy only when they differ).
at::Tensor grad_in_layout_of(const at::Tensor& grad_out, const at::Tensor& saved) {
  TORCH_CHECK(grad_out.sizes() == saved.sizes(), "batch_norm_act: grad_output has shape ", grad_out.sizes(),
              " but the saved tensor has shape ", saved.sizes());
  if (grad_out.strides() != saved.strides()) return at::empty_like(saved).copy_(grad_out);
  return grad_out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_bwd_cpu(
    const at::Tensor& grad_out_, const at::Tensor& saved_, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& save_mean, const at::Tensor& save_invstd,
    bool training, int64_t activation, double negative_slope, double gamma_floor, bool saved_is_output) {
  check_common(saved_, weight, bias);
  at::Tensor saved = saved_;
  const ChannelView v = channel_view(saved);
  const at::Tensor grad_out = grad_in_layout_of(grad_out_, saved);
  const int64_t C = v.C;
  const double M = static_cast<double>(v.N) * static_cast<double>(v.L);
  at::Tensor grad_input = at::empty_like(saved);
  at::Tensor grad_weight = at::empty({C}, saved.options().dtype(param_dtype(saved, weight)));
  at::Tensor grad_bias = at::empty({C}, saved.options().dtype(param_dtype(saved, bias)));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saved.scalar_type(), "batch_norm_act_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto kc = make_coeffs<acc_t>(saved, weight, bias, save_mean, save_invstd, gamma_floor);
    const auto &gamma = kc.gamma, &beta = kc.beta, &mean = kc.mean, &invstd = kc.invstd;
    const auto &scale = kc.scale, &shift = kc.shift, &k = kc.scale;
    std::vector<acc_t> ka(C, acc_t(0)), kb(C, acc_t(0));
    const scalar_t* dy = grad_out.data_ptr<scalar_t>();
    const scalar_t* sv = saved.data_ptr<scalar_t>();
    std::vector<acc_t> sum_dz(C, acc_t(0)), sum_dzx(C, acc_t(0));
    const acc_t slope = acc_t(negative_slope);
    dispatch_act(activation, [&](auto a) {
      constexpr int A = decltype(a)::value;
      if (saved_is_output) {
        backward_sums<scalar_t, acc_t, A, true>(dy, sv, v, mean, invstd, scale, shift, gamma, beta, slope, sum_dz,
                                                sum_dzx);
      } else {
        backward_sums<scalar_t, acc_t, A, false>(dy, sv, v, mean, invstd, scale, shift, gamma, beta, slope, sum_dz,
                                                 sum_dzx);
      }
      if (training && M > 0) {
        for (int64_t c = 0; c < C; ++c) {
          ka[c] = sum_dz[c] / acc_t(M);
          kb[c] = sum_dzx[c] / acc_t(M);
        }
      }
      scalar_t* dx = grad_input.data_ptr<scalar_t>();
      if (saved_is_output) {
        backward_dx<scalar_t, acc_t, A, true>(dy, sv, dx, v, mean, invstd, scale, shift, gamma, beta, k, ka, kb, slope);
      } else {
        backward_dx<scalar_t, acc_t, A, false>(dy, sv, dx, v, mean, invstd, scale, shift, gamma, beta, k, ka, kb, slope);
      }
    });
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_weight.scalar_type(), "bn_act_gw", [&] {
      store_param<scalar_t, acc_t>(grad_weight, sum_dzx);
    });
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_bias.scalar_type(), "bn_act_gb", [&] {
      store_param<scalar_t, acc_t>(grad_bias, sum_dz);
    });
  });
  return {grad_input, grad_weight, grad_bias};
}

// --- the two passes as separate ops (SyncBatchNormAct: an all-gather / all-reduce sits between
// them). Each is one pass over memory.

std::tuple<at::Tensor, at::Tensor> batch_norm_act_stats_cpu(const at::Tensor& input_) {
  check_common(input_, c10::nullopt, c10::nullopt);
  at::Tensor input = input_;
  const ChannelView v = channel_view(input);
  const auto acc_type = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({v.C}, input.options().dtype(acc_type));
  at::Tensor m2 = at::empty({v.C}, input.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_act_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto st = channel_stats<scalar_t, acc_t>(input.data_ptr<scalar_t>(), v);
    for (int64_t c = 0; c < v.C; ++c) {
      mean.data_ptr<acc_t>()[c] = st[c].mean;
      m2.data_ptr<acc_t>()[c] = st[c].m2;
    }
  });
  return {mean, m2};
}

at::Tensor batch_norm_act_apply_cpu(const at::Tensor& input_, const at::Tensor& mean, const at::Tensor& invstd,
                                    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                    int64_t activation, double negative_slope, double gamma_floor) {
  check_common(input_, weight, bias);
  at::Tensor input = input_;
  const ChannelView v = channel_view(input);
  at::Tensor out = at::empty_like(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_act_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto k = make_coeffs<acc_t>(input, weight, bias, mean, invstd, gamma_floor);
    dispatch_act(activation, [&](auto a) {
      normalize_act<scalar_t, acc_t, decltype(a)::value>(input.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), v,
                                                         k.scale, k.shift, acc_t(negative_slope));
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> batch_norm_act_bwd_reduce_cpu(
    const at::Tensor& grad_out_, const at::Tensor& saved_, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd, int64_t activation,
    double negative_slope, double gamma_floor, bool saved_is_output) {
  check_common(saved_, weight, bias);
  at::Tensor saved = saved_;
  const ChannelView v = channel_view(saved);
  const at::Tensor grad_out = grad_in_layout_of(grad_out_, saved);
  const auto acc_type = saved.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor sum_dz = at::empty({v.C}, saved.options().dtype(acc_type));
  at::Tensor sum_dzx = at::empty({v.C}, saved.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saved.scalar_type(), "batch_norm_act_bwd_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto k = make_coeffs<acc_t>(saved, weight, bias, mean, invstd, gamma_floor);
    std::vector<acc_t> s(v.C, acc_t(0)), sx(v.C, acc_t(0));
    dispatch_act(activation, [&](auto a) {
      constexpr int A = decltype(a)::value;
      const scalar_t* dy = grad_out.data_ptr<scalar_t>();
      const scalar_t* sv = saved.data_ptr<scalar_t>();
      if (saved_is_output) {
        backward_sums<scalar_t, acc_t, A, true>(dy, sv, v, k.mean, k.invstd, k.scale, k.shift, k.gamma, k.beta,
                                                acc_t(negative_slope), s, sx);
      } else {
        backward_sums<scalar_t, acc_t, A, false>(dy, sv, v, k.mean, k.invstd, k.scale, k.shift, k.gamma, k.beta,
                                                 acc_t(negative_slope), s, sx);
      }
    });
    std::copy(s.begin(), s.end(), sum_dz.data_ptr<acc_t>());
    std::copy(sx.begin(), sx.end(), sum_dzx.data_ptr<acc_t>());
  });
  return {sum_dz, sum_dzx};
}

at::Tensor batch_norm_act_bwd_dx_cpu(const at::Tensor& grad_out_, const at::Tensor& saved_,
                                     const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                     const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& sum_dz,
                                     const at::Tensor& sum_dz_xhat, double count, int64_t activation,
                                     double negative_slope, double gamma_floor, bool saved_is_output) {
  check_common(saved_, weight, bias);
  at::Tensor saved = saved_;
  const ChannelView v = channel_view(saved);
  const at::Tensor grad_out = grad_in_layout_of(grad_out_, saved);
  at::Tensor grad_input = at::empty_like(saved);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saved.scalar_type(), "batch_norm_act_bwd_dx_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto k = make_coeffs<acc_t>(saved, weight, bias, mean, invstd, gamma_floor);
    at::Tensor s = as_acc<acc_t>(sum_dz), sx = as_acc<acc_t>(sum_dz_xhat);
    std::vector<acc_t> ka(v.C, acc_t(0)), kb(v.C, acc_t(0));
    for (int64_t c = 0; c < v.C && count > 0; ++c) {
      ka[c] = s.data_ptr<acc_t>()[c] / acc_t(count);
      kb[c] = sx.data_ptr<acc_t>()[c] / acc_t(count);
    }
    dispatch_act(activation, [&](auto a) {
      constexpr int A = decltype(a)::value;
      const scalar_t* dy = grad_out.data_ptr<scalar_t>();
      const scalar_t* sv = saved.data_ptr<scalar_t>();
      scalar_t* dx = grad_input.data_ptr<scalar_t>();
      if (saved_is_output) {
        backward_dx<scalar_t, acc_t, A, true>(dy, sv, dx, v, k.mean, k.invstd, k.scale, k.shift, k.gamma, k.beta,
                                              k.scale, ka, kb, acc_t(negative_slope));
      } else {
        backward_dx<scalar_t, acc_t, A, false>(dy, sv, dx, v, k.mean, k.invstd, k.scale, k.shift, k.gamma, k.beta,
                                               k.scale, ka, kb, acc_t(negative_slope));
      }
    });
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("batch_norm_act_fwd", &batch_norm_act_fwd_cpu);
  m.impl("batch_norm_act_bwd", &batch_norm_act_bwd_cpu);
  m.impl("batch_norm_act_stats", &batch_norm_act_stats_cpu);
  m.impl("batch_norm_act_apply", &batch_norm_act_apply_cpu);
  m.impl("batch_norm_act_bwd_reduce", &batch_norm_act_bwd_reduce_cpu);
  m.impl("batch_norm_act_bwd_dx", &batch_norm_act_bwd_dx_cpu);
}

}  // namespace genfast
