// Transposed convolution + bias + activation on the CPU, decomposed by output phase.
//
// The output rows oh = ph + stride * j (ph in [0, stride)) receive exactly the taps t with
// (ph + pad - t * dil) divisible by stride, from input row ih = j + (ph + pad - t * dil) / stride
// (likewise for columns), so each (group, phase) is a dense matrix product with no zero
// insertion and no wasted tap:
//   At (K x M) = x gathered for the phase's taps (M = N * rows * cols of the phase,
//                K = C_in/groups * taps_h * taps_w), in the accumulation type; pixel-major rows
//                so that the gather reads and writes contiguous runs (NCHW)
//   B (K x C_out/groups) = the phase's weight taps
//   Ct = B^T @ At (at::mm, ATen's GEMM), then our own epilogue: bias, activation, store into the
//   phase's strided output pixels, and optionally per-channel Welford statistics of the output.
// Every tap belongs to exactly one phase, so the backward is the exact transpose per phase:
//   dCt = dy * act'(y) gathered (act' from the saved output), grad_bias = row sums of dCt,
//   dAt = B @ dCt scattered (added) into grad_input, dB = At @ dCt^T stored into grad_weight.
// Deterministic: every loop has a fixed order or writes disjoint outputs; the result does not
// depend on the thread count.
//
// Passes over memory (besides the GEMMs' own operand traffic): the forward gathers x once per
// tap of each phase (the phase's im2col, taps_h * taps_w / (stride_h * stride_w) reads of x on
// average) and writes y once, the statistics re-reading each 64-row block from cache; the
// backward reads dy and y once (dC), gathers x once more for grad_weight, and writes dx once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <utility>
#include <vector>

#include "../common/activation.h"
#include "../common/batchnorm_act.h"
#include "../common/tensor_layout.h"

namespace genfast {
namespace {

struct Geometry {
  int64_t N, Cin, Hin, Win, Cout, Hout, Wout, G, CIG, COG, KH, KW;
  int64_t SH, SW, PH, PW, DH, DW;
};

// (tap, offset) pairs reaching the output rows of `phase`: ih = j + offset.
std::vector<std::pair<int64_t, int64_t>> phase_taps(int64_t phase, int64_t k, int64_t s, int64_t p, int64_t d) {
  std::vector<std::pair<int64_t, int64_t>> taps;
  for (int64_t t = 0; t < k; ++t) {
    const int64_t r = phase + p - t * d;
    // exact division: r is a multiple of s here, negative or not
    if (((r % s) + s) % s == 0) taps.emplace_back(t, r / s);
  }
  return taps;
}

int64_t phase_len(int64_t phase, int64_t out, int64_t s) { return phase < out ? (out - phase + s - 1) / s : 0; }

struct Phase {
  int64_t ph, pw, Hph, Wph, M, K;
  std::vector<std::pair<int64_t, int64_t>> th, tw;
};

Phase make_phase(const Geometry& g, int64_t ph, int64_t pw) {
  Phase P;
  P.ph = ph;
  P.pw = pw;
  P.Hph = phase_len(ph, g.Hout, g.SH);
  P.Wph = phase_len(pw, g.Wout, g.SW);
  P.M = g.N * P.Hph * P.Wph;
  P.th = phase_taps(ph, g.KH, g.SH, g.PH, g.DH);
  P.tw = phase_taps(pw, g.KW, g.SW, g.PW, g.DW);
  P.K = g.CIG * static_cast<int64_t>(P.th.size() * P.tw.size());
  return P;
}

constexpr int64_t kRowBlock = 4096;  // pixels per parallel task in epilogues (and per statistics block)

// At[(ci * nth + a) * ntw + b, m] = x[n, grp * CIG + ci, j + off_a, k + off_b] (0 outside),
// m = (n * Hph + j) * Wph + k.
template <typename scalar_t, typename acc_t>
void gather_x(const at::Tensor& x, const Geometry& g, const Phase& P, int64_t grp, acc_t* At) {
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t sn = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  const int64_t nth = P.th.size(), ntw = P.tw.size();
  at::parallel_for(0, P.K, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t kk = k0; kk < k1; ++kk) {
      const int64_t ci = kk / (nth * ntw), a = (kk / ntw) % nth, b = kk % ntw;
      const int64_t oa = P.th[a].second, ob = P.tw[b].second;
      acc_t* row = At + kk * P.M;
      for (int64_t n = 0; n < g.N; ++n) {
        const scalar_t* plane = xp + n * sn + (grp * g.CIG + ci) * sc;
        for (int64_t j = 0; j < P.Hph; ++j) {
          acc_t* dst = row + (n * P.Hph + j) * P.Wph;
          const int64_t ih = j + oa;
          if (ih < 0 || ih >= g.Hin) {
            for (int64_t k = 0; k < P.Wph; ++k) dst[k] = acc_t(0);
            continue;
          }
          // valid k: 0 <= k + ob < Win; zeros outside, a strided copy inside
          const int64_t k_lo = std::min(P.Wph, std::max<int64_t>(0, -ob));
          const int64_t k_hi = std::max(k_lo, std::min(P.Wph, g.Win - ob));
          for (int64_t k = 0; k < k_lo; ++k) dst[k] = acc_t(0);
          const scalar_t* src = plane + ih * sh + ob * sw;
          if (sw == 1) {
#pragma omp simd
            for (int64_t k = k_lo; k < k_hi; ++k) dst[k] = static_cast<acc_t>(src[k]);
          } else {
            for (int64_t k = k_lo; k < k_hi; ++k) dst[k] = static_cast<acc_t>(src[k * sw]);
          }
          for (int64_t k = k_hi; k < P.Wph; ++k) dst[k] = acc_t(0);
        }
      }
    }
  });
}

// B[(ci * nth + a) * ntw + b, co] = w[grp * CIG + ci, co, t_a, t_b].
template <typename scalar_t, typename acc_t>
void gather_w(const at::Tensor& w, const Geometry& g, const Phase& P, int64_t grp, acc_t* Bm) {
  const scalar_t* wp = w.data_ptr<scalar_t>();
  const int64_t si = w.stride(0), so = w.stride(1), sh = w.stride(2), sw = w.stride(3);
  const int64_t nth = P.th.size(), ntw = P.tw.size();
  // per input channel: read w[ci] (contiguous for a contiguous weight), write its nth * ntw rows
  at::parallel_for(0, g.CIG, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t ci = c0; ci < c1; ++ci)
      for (int64_t co = 0; co < g.COG; ++co) {
        const scalar_t* src = wp + (grp * g.CIG + ci) * si + co * so;
        for (int64_t a = 0; a < nth; ++a)
          for (int64_t b = 0; b < ntw; ++b)
            Bm[((ci * nth + a) * ntw + b) * g.COG + co] =
                static_cast<acc_t>(src[P.th[a].first * sh + P.tw[b].first * sw]);
      }
  });
}

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_impl(const at::Tensor& x, const at::Tensor& w,
                                                        const c10::optional<at::Tensor>& bias, const Geometry& g,
                                                        int64_t act, double slope_d, bool stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_opts = x.options().dtype(acc_type_of(x.scalar_type()));
  const bool cl = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor y = at::empty({g.N, g.Cout, g.Hout, g.Wout},
                           x.options().memory_format(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  std::vector<acc_t> bvec(g.Cout, acc_t(0));
  if (bias.has_value() && bias->defined()) {
    at::Tensor bc = bias->contiguous();
    const scalar_t* bp = bc.data_ptr<scalar_t>();
    for (int64_t c = 0; c < g.Cout; ++c) bvec[c] = static_cast<acc_t>(bp[c]);
  }
  const acc_t slope = static_cast<acc_t>(slope_d);
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int64_t yn = y.stride(0), yc = y.stride(1), yh = y.stride(2), yw = y.stride(3);
  std::vector<Welford<acc_t>> total(stats ? g.Cout : 0, welford_init<acc_t>());
  // one set of work buffers for every phase (sized for the largest), not one allocation each
  int64_t max_km = 0, max_m = 0, max_k = 0;
  for (int64_t ph = 0; ph < g.SH; ++ph)
    for (int64_t pw = 0; pw < g.SW; ++pw) {
      const Phase P = make_phase(g, ph, pw);
      max_km = std::max(max_km, P.K * P.M);
      max_m = std::max(max_m, P.M);
      max_k = std::max(max_k, P.K);
    }
  at::Tensor at_buf = at::empty({max_km}, acc_opts);
  at::Tensor bm_buf = at::empty({max_k * g.COG}, acc_opts);
  at::Tensor ct_buf = at::empty({g.COG * max_m}, acc_opts);

  for (int64_t grp = 0; grp < g.G; ++grp) {
    for (int64_t ph = 0; ph < g.SH; ++ph) {
      for (int64_t pw = 0; pw < g.SW; ++pw) {
        const Phase P = make_phase(g, ph, pw);
        if (P.M == 0) continue;
        at::Tensor Ct = ct_buf.narrow(0, 0, g.COG * P.M).view({g.COG, P.M});  // (C_out/groups, M)
        if (P.K > 0) {
          at::Tensor At = at_buf.narrow(0, 0, P.K * P.M).view({P.K, P.M});
          at::Tensor Bm = bm_buf.narrow(0, 0, P.K * g.COG).view({P.K, g.COG});
          gather_x<scalar_t, acc_t>(x, g, P, grp, At.data_ptr<acc_t>());
          gather_w<scalar_t, acc_t>(w, g, P, grp, Bm.data_ptr<acc_t>());
          at::mm_out(Ct, Bm.t(), At);
        } else {
          acc_t* c = Ct.data_ptr<acc_t>();  // a phase no tap reaches: bias only
          std::fill(c, c + g.COG * P.M, acc_t(0));
        }
        acc_t* cp = Ct.data_ptr<acc_t>();
        // epilogue tasks: (output channel, block of kRowBlock pixels); statistics per task
        const int64_t nblk = (P.M + kRowBlock - 1) / kRowBlock;
        std::vector<Welford<acc_t>> part(stats ? g.COG * nblk : 0);
        at::parallel_for(0, g.COG * nblk, 1, [&](int64_t t0, int64_t t1) {
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t co = t / nblk, lo = (t % nblk) * kRowBlock, hi = std::min(P.M, lo + kRowBlock);
            acc_t* row = cp + co * P.M;
            const acc_t bv = bvec[grp * g.COG + co];
            scalar_t* ych = yp + (grp * g.COG + co) * yc;
            int64_t n = lo / (P.Hph * P.Wph), r = lo % (P.Hph * P.Wph), j = r / P.Wph, k = r % P.Wph;
            for (int64_t m = lo; m < hi; ++m) {
              const scalar_t v = static_cast<scalar_t>(act_forward<acc_t>(row[m] + bv, act, slope));
              ych[n * yn + (ph + g.SH * j) * yh + (pw + g.SW * k) * yw] = v;
              row[m] = static_cast<acc_t>(v);  // kept for the statistics of the stored output
              if (++k == P.Wph) {
                k = 0;
                if (++j == P.Hph) {
                  j = 0;
                  ++n;
                }
              }
            }
            if (stats) {
              // block mean, then squared deviations (the block is still in cache)
              const acc_t cnt = acc_t(hi - lo);
              acc_t sum = 0;
              for (int64_t m = lo; m < hi; ++m) sum += row[m];
              const acc_t mean = sum / cnt;
              acc_t q = 0;
              for (int64_t m = lo; m < hi; ++m) q += (row[m] - mean) * (row[m] - mean);
              part[t] = Welford<acc_t>{cnt, mean, q};
            }
          }
        });
        if (stats)
          for (int64_t co = 0; co < g.COG; ++co)
            for (int64_t b = 0; b < nblk; ++b)
              total[grp * g.COG + co] = welford_merge(total[grp * g.COG + co], part[co * nblk + b]);
      }
    }
  }
  if (!stats) return {y, at::empty({0}, acc_opts), at::empty({0}, acc_opts)};  // distinct: no aliasing
  at::Tensor mean = at::empty({g.Cout}, acc_opts), var = at::empty({g.Cout}, acc_opts);
  acc_t* mp = mean.data_ptr<acc_t>();
  acc_t* vp = var.data_ptr<acc_t>();
  for (int64_t c = 0; c < g.Cout; ++c) {
    mp[c] = total[c].mean;
    vp[c] = total[c].count > acc_t(0) ? total[c].m2 / total[c].count : acc_t(0);
  }
  return {y, mean, var};
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                                        const at::Tensor& y, const Geometry& g, int64_t act,
                                                        double slope_d, bool need_input, bool need_weight,
                                                        bool has_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_opts = x.options().dtype(acc_type_of(x.scalar_type()));
  const acc_t slope = static_cast<acc_t>(slope_d);
  // grad_input accumulates in a contiguous buffer of the accumulation type, then is stored
  // once into dx (x's memory format) by our own loop.
  at::Tensor dx_acc = need_input ? at::zeros({g.N, g.Cin, g.Hin, g.Win}, acc_opts) : at::Tensor();
  at::Tensor dw_acc = need_weight ? at::zeros({g.Cin, g.COG, g.KH, g.KW}, acc_opts) : at::Tensor();
  std::vector<acc_t> db(g.Cout, acc_t(0));
  const scalar_t* dyp = dy.data_ptr<scalar_t>();
  const scalar_t* yp = y.data_ptr<scalar_t>();
  const int64_t dn = dy.stride(0), dc = dy.stride(1), dh = dy.stride(2), dwst = dy.stride(3);
  const int64_t yn = y.stride(0), yc = y.stride(1), yh = y.stride(2), yw = y.stride(3);

  // one set of work buffers for every phase (sized for the largest)
  int64_t max_km = 0, max_m = 0, max_k = 0;
  for (int64_t ph = 0; ph < g.SH; ++ph)
    for (int64_t pw = 0; pw < g.SW; ++pw) {
      const Phase P = make_phase(g, ph, pw);
      max_km = std::max(max_km, P.K * P.M);
      max_m = std::max(max_m, P.M);
      max_k = std::max(max_k, P.K);
    }
  at::Tensor dct_buf = at::empty({g.COG * max_m}, acc_opts);
  at::Tensor km_buf = at::empty({max_km}, acc_opts);  // At, then dAt
  at::Tensor bm_buf = at::empty({max_k * g.COG}, acc_opts);
  at::Tensor db_buf = at::empty({max_k * g.COG}, acc_opts);
  for (int64_t grp = 0; grp < g.G; ++grp) {
    for (int64_t ph = 0; ph < g.SH; ++ph) {
      for (int64_t pw = 0; pw < g.SW; ++pw) {
        const Phase P = make_phase(g, ph, pw);
        if (P.M == 0) continue;
        // dCt[co, m] = dy * act'(y) at the phase's pixels
        at::Tensor dCt = dct_buf.narrow(0, 0, g.COG * P.M).view({g.COG, P.M});
        acc_t* dcp = dCt.data_ptr<acc_t>();
        const int64_t nblk = (P.M + kRowBlock - 1) / kRowBlock;
        at::parallel_for(0, g.COG * nblk, 1, [&](int64_t t0, int64_t t1) {
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t co = t / nblk, lo = (t % nblk) * kRowBlock, hi = std::min(P.M, lo + kRowBlock);
            acc_t* row = dcp + co * P.M;
            const scalar_t* dch = dyp + (grp * g.COG + co) * dc;
            const scalar_t* ych = yp + (grp * g.COG + co) * yc;
            int64_t n = lo / (P.Hph * P.Wph), r = lo % (P.Hph * P.Wph), j = r / P.Wph, k = r % P.Wph;
            for (int64_t m = lo; m < hi; ++m) {
              const int64_t oh = ph + g.SH * j, ow = pw + g.SW * k;
              acc_t d = static_cast<acc_t>(dch[n * dn + oh * dh + ow * dwst]);
              if (act != kIdentity)
                d *= act_grad_from_output<acc_t>(static_cast<acc_t>(ych[n * yn + oh * yh + ow * yw]), act, slope);
              row[m] = d;
              if (++k == P.Wph) {
                k = 0;
                if (++j == P.Hph) {
                  j = 0;
                  ++n;
                }
              }
            }
          }
        });
        if (has_bias) {
          at::parallel_for(0, g.COG, 1, [&](int64_t c0, int64_t c1) {
            for (int64_t co = c0; co < c1; ++co) {
              acc_t sum = 0;
              const acc_t* row = dcp + co * P.M;
              for (int64_t m = 0; m < P.M; ++m) sum += row[m];
              db[grp * g.COG + co] += sum;
            }
          });
        }
        if (P.K == 0 || !(need_input || need_weight)) continue;
        at::Tensor Bm = bm_buf.narrow(0, 0, P.K * g.COG).view({P.K, g.COG});
        gather_w<scalar_t, acc_t>(w, g, P, grp, Bm.data_ptr<acc_t>());
        at::Tensor KM = km_buf.narrow(0, 0, P.K * P.M).view({P.K, P.M});
        const int64_t nth = P.th.size(), ntw = P.tw.size();
        if (need_input) {
          at::Tensor dAt = at::mm_out(KM, Bm, dCt);  // (K, M)
          const acc_t* dap = dAt.data_ptr<acc_t>();
          acc_t* dxp = dx_acc.data_ptr<acc_t>();
          // rows of one input channel only touch that channel's planes: parallel over channels
          at::parallel_for(0, g.CIG, 1, [&](int64_t c0, int64_t c1) {
            for (int64_t ci = c0; ci < c1; ++ci)
              for (int64_t a = 0; a < nth; ++a)
                for (int64_t b = 0; b < ntw; ++b) {
                  const acc_t* row = dap + ((ci * nth + a) * ntw + b) * P.M;
                  const int64_t oa = P.th[a].second, ob = P.tw[b].second;
                  for (int64_t n = 0; n < g.N; ++n) {
                    acc_t* plane = dxp + (n * g.Cin + grp * g.CIG + ci) * g.Hin * g.Win;
                    for (int64_t j = 0; j < P.Hph; ++j) {
                      const int64_t ih = j + oa;
                      if (ih < 0 || ih >= g.Hin) continue;
                      const acc_t* src = row + (n * P.Hph + j) * P.Wph;
                      for (int64_t k = 0; k < P.Wph; ++k) {
                        const int64_t iw = k + ob;
                        if (iw >= 0 && iw < g.Win) plane[ih * g.Win + iw] += src[k];
                      }
                    }
                  }
                }
          });
        }
        if (need_weight) {
          at::Tensor At = KM;  // dAt is no longer needed
          gather_x<scalar_t, acc_t>(x, g, P, grp, At.data_ptr<acc_t>());
          at::Tensor dB = db_buf.narrow(0, 0, P.K * g.COG).view({P.K, g.COG});
          at::mm_out(dB, At, dCt.t());  // (K, C_out/groups)
          const acc_t* dbp = dB.data_ptr<acc_t>();
          acc_t* dwp = dw_acc.data_ptr<acc_t>();
          // each tap belongs to exactly one phase: plain stores
          for (int64_t ci = 0; ci < g.CIG; ++ci)
            for (int64_t a = 0; a < nth; ++a)
              for (int64_t b = 0; b < ntw; ++b)
                for (int64_t co = 0; co < g.COG; ++co)
                  dwp[(((grp * g.CIG + ci) * g.COG + co) * g.KH + P.th[a].first) * g.KW + P.tw[b].first] =
                      dbp[((ci * nth + a) * ntw + b) * g.COG + co];
        }
      }
    }
  }

  // unrequested results: distinct empty tensors (outputs of an op must not alias each other)
  at::Tensor dx = at::empty({0}, x.options()), dwt = at::empty({0}, x.options()), dbt = at::empty({0}, x.options());
  if (need_input) {
    const bool cl = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
    dx = at::empty(x.sizes(), x.options().memory_format(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
    scalar_t* o = dx.data_ptr<scalar_t>();
    const acc_t* src = dx_acc.data_ptr<acc_t>();
    const int64_t sn = dx.stride(0), sc = dx.stride(1), sh = dx.stride(2), sw = dx.stride(3);
    at::parallel_for(0, g.N * g.Cin, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / g.Cin, c = r % g.Cin;
        const acc_t* s = src + r * g.Hin * g.Win;
        scalar_t* d = o + n * sn + c * sc;
        for (int64_t h = 0; h < g.Hin; ++h)
          for (int64_t ww = 0; ww < g.Win; ++ww) d[h * sh + ww * sw] = static_cast<scalar_t>(s[h * g.Win + ww]);
      }
    });
  }
  if (need_weight) {
    dwt = at::empty({g.Cin, g.COG, g.KH, g.KW}, w.options().memory_format(at::MemoryFormat::Contiguous));
    scalar_t* o = dwt.data_ptr<scalar_t>();
    const acc_t* s = dw_acc.data_ptr<acc_t>();
    for (int64_t i = 0; i < dwt.numel(); ++i) o[i] = static_cast<scalar_t>(s[i]);
  }
  if (has_bias) {
    dbt = at::empty({g.Cout}, w.options());
    scalar_t* o = dbt.data_ptr<scalar_t>();
    for (int64_t c = 0; c < g.Cout; ++c) o[c] = static_cast<scalar_t>(db[c]);
  }
  return {dx, dwt, dbt};
}

Geometry geometry(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
                  at::IntArrayRef output_padding, int64_t groups, at::IntArrayRef dilation, int64_t Hout, int64_t Wout) {
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4, "conv_transpose2d: input and weight must be 4-D");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2 && output_padding.size() == 2,
              "conv_transpose2d: stride, padding, output_padding and dilation must have 2 elements");
  TORCH_CHECK(groups > 0 && x.size(1) == w.size(0) && w.size(0) % groups == 0,
              "conv_transpose2d: input channels must equal weight.size(0), divisible by groups");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "conv_transpose2d: input and weight must have the same dtype");
  Geometry g;
  g.N = x.size(0);
  g.Cin = x.size(1);
  g.Hin = x.size(2);
  g.Win = x.size(3);
  g.G = groups;
  g.CIG = g.Cin / groups;
  g.COG = w.size(1);
  g.Cout = g.COG * groups;
  g.KH = w.size(2);
  g.KW = w.size(3);
  g.SH = stride[0];
  g.SW = stride[1];
  g.PH = padding[0];
  g.PW = padding[1];
  g.DH = dilation[0];
  g.DW = dilation[1];
  TORCH_CHECK(g.SH > 0 && g.SW > 0 && g.DH > 0 && g.DW > 0 && g.PH >= 0 && g.PW >= 0,
              "conv_transpose2d: stride and dilation must be positive, padding non-negative");
  g.Hout = Hout >= 0 ? Hout : (g.Hin - 1) * g.SH - 2 * g.PH + g.DH * (g.KH - 1) + output_padding[0] + 1;
  g.Wout = Wout >= 0 ? Wout : (g.Win - 1) * g.SW - 2 * g.PW + g.DW * (g.KW - 1) + output_padding[1] + 1;
  TORCH_CHECK(g.Hout > 0 && g.Wout > 0, "conv_transpose2d: output size is too small");
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_transpose2d_fwd_cpu(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef output_padding, int64_t groups, at::IntArrayRef dilation,
    int64_t activation, double negative_slope, bool stats) {
  const Geometry g = geometry(input, weight, stride, padding, output_padding, groups, dilation, -1, -1);
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == g.Cout && bias->scalar_type() == input.scalar_type(),
                "conv_transpose2d: bias must be 1-D with C_out elements of the input's dtype");
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "conv_transpose2d_fwd_cpu", [&] {
    out = fwd_impl<scalar_t>(input, weight, bias, g, activation, negative_slope, stats);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_transpose2d_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& output,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t activation,
    double negative_slope, bool need_input, bool need_weight, bool has_bias) {
  const int64_t zero[2] = {0, 0};
  const Geometry g = geometry(input, weight, stride, padding, at::IntArrayRef(zero, 2), groups, dilation,
                              grad_out.size(2), grad_out.size(3));
  TORCH_CHECK(grad_out.sizes() == output.sizes() && grad_out.size(0) == g.N && grad_out.size(1) == g.Cout,
              "conv_transpose2d_bwd: grad_out and output must have the output's shape");
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type() && output.scalar_type() == input.scalar_type(),
              "conv_transpose2d_bwd: grad_out, output and input must have the same dtype");
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "conv_transpose2d_bwd_cpu", [&] {
    out = bwd_impl<scalar_t>(grad_out, input, weight, output, g, activation, negative_slope, need_input, need_weight,
                             has_bias);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("conv_transpose2d_fwd", &conv_transpose2d_fwd_cpu);
  m.impl("conv_transpose2d_bwd", &conv_transpose2d_bwd_cpu);
}

}  // namespace genfast
