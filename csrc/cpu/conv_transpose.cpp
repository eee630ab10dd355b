// Transposed convolution + bias + activation on the CPU.
//
// Two forms of the matrix work. The GEMM form (below, "The GEMM product"; where it measured
// faster: stride > 1 or a 1x1 input, groups 1, NCHW) runs BLAS products (at::mm) and our
// col2im / im2col passes, which carry the bias, activation, statistics and dz prologue.
// Everything else goes through ATen's CPU convolution primitives (oneDNN or ATen's GEMM
// paths), without bias, with our own loops around them:
//   forward:  P = conv_transpose(x, w) (at::convolution, transposed, no bias), then ONE epilogue
//             pass y = act(P + bias), optionally with per-channel Welford statistics of the
//             stored y for a following BatchNorm.
//   backward: ONE pass dz = dy * act'(y) (act' from the saved output), fused with grad_bias =
//             per-channel sums of dz; then grad_input and grad_weight of the transposed
//             convolution from dz (at::convolution_backward).
// float16 / bfloat16 run the products in float32 on float32 copies of x and w (float
// accumulation), and round once when the epilogue stores y (and grad_input / grad_weight).
// Deterministic: our loops split the work into fixed tasks (planes or pixel blocks) whose
// partial sums are merged in a fixed order, independent of the thread count; ATen's CPU
// convolutions and the GEMM form's products (whose split over images follows the thread
// count) are deterministic run to run for a fixed thread count.
//
// Passes over memory of the ATen form (besides the traffic inside ATen's products, including any
// layout reorder of their own):
//   forward: ATen writes P once (into y itself for float32 / float64, into a float32 buffer for
//   float16 / bfloat16, which first converts x and w once); the epilogue reads P and writes y
//   once, the statistics re-reading each plane or pixel block of y from cache.
//   backward: reads dy and y once and writes dz once, grad_bias re-reading each plane or pixel
//   block of dz from cache (float32 / float64 with no activation: dz is dy itself and the pass
//   only reads dy for grad_bias; a dy in another layout than y is first copied); ATen's backward
//   reads dz, x and w and writes grad_input and grad_weight (float16 / bfloat16: converted once
//   more on the way out).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common/cpu_features.h"
#if GENFAST_X86_INTRINSICS
#include <immintrin.h>
#endif

#include "../common/activation.h"
#include "../common/batchnorm_act.h"
#include "conv_transpose_taps.h"
#include "conv_transpose_winograd.h"

namespace genfast {
namespace {

// tanh and sigmoid of float32 in the epilogues, in plain arithmetic that the compiler vectorises
// (libm's tanhf / expf are scalar calls: the GEMM form's tanh output layers ran at 0.4-0.5x
// eager with them, torch's own tanh being Sleef's vector code). For x <= 0 (x = -2|z| for tanh,
// -|z| for sigmoid): x = n ln2 + r, |r| <= ln2/2 (Cody-Waite split of ln2; n by the 1.5 * 2^23
// shift), e^r - 1 = r q(r), q the degree-7 Taylor polynomial of (e^r - 1)/r (truncation below
// 1e-8 relative); with s = 2^n built in the exponent bits,
//   expm1(x) = s (r q) + (s - 1)   (no cancellation near 0; -1 below x = -87.33)
//   e^x = (1 + r q) 2^(n/2) 2^(n - n/2)   (two normal factors: subnormal results as torch's;
//                                          0 below x = -104)
//   tanh(z) = sign(z) * -expm1(x) / (2 + expm1(x));
//   sigmoid(z) = 1 / (1 + e^x) for z >= 0, e^x / (1 + e^x) below.
// NaN stays NaN (it fails every comparison and poisons the polynomial), +-inf gives +-1 / 1, 0.
// Measured against float64 on 1.6M values from 1e-6 to 100 in magnitude: tanh within 1.7
// float32 ulps, sigmoid within 1.6 (torch: 0.5 and 1.2); float64 keeps libm.

// r q(r) and n for x in [lo, 0] (x below lo clamped to lo; NaN stays NaN)
struct ExpParts {
  float rq;
  int32_t n;
};
GENFAST_INLINE ExpParts exp_parts(float x, float lo) {
  const float xc = x < lo ? lo : x;
  const float shift = 12582912.0f;
  const float t = xc * 1.44269504088896341f + shift;
  const float nf = t - shift;
  float r = xc - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  const float q = 1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720 +
                  r * (1.0f / 5040 + r * (1.0f / 40320)))))));
  int32_t bits;
  std::memcpy(&bits, &t, sizeof bits);
  return ExpParts{r * q, bits - 0x4B400000};
}
GENFAST_INLINE float pow2(int32_t n) {  // 2^n for n in [-126, 127]
  const int32_t bits = (n + 127) << 23;
  float s;
  std::memcpy(&s, &bits, sizeof s);
  return s;
}

template <int ACT, typename T>
GENFAST_INLINE T act_out(T z, T slope) {
  if constexpr (std::is_same_v<T, float> && ACT == kTanh) {
    const float x = -2.0f * std::fabs(z);
    const ExpParts p = exp_parts(x, -87.33f);
    const float s = pow2(p.n);
    const float em1 = x < -87.33f ? -1.0f : s * p.rq + (s - 1.0f);
    return std::copysign(-em1 / (2.0f + em1), z);
  } else if constexpr (std::is_same_v<T, float> && ACT == kSigmoid) {
    // e^x down to float32's subnormals, as torch's sigmoid: 2^n in two normal factors
    const float x = -std::fabs(z);
    const ExpParts p = exp_parts(x, -104.0f);
    const int32_t n1 = p.n >> 1;
    const float e0 = ((1.0f + p.rq) * pow2(n1)) * pow2(p.n - n1);
    const float e = x < -104.0f ? 0.0f : e0;
    const float sig = 1.0f / (1.0f + e);
    return sig * (z >= 0.0f ? 1.0f : e);
  } else {
    return act_forward_c<ACT, T>(z, slope);
  }
}

struct Geometry {
  int64_t N, Cin, Hin, Win, Cout, Hout, Wout, G, COG, KH, KW;
  int64_t SH, SW, PH, PW, DH, DW;
};

constexpr int64_t kPixelBlock = 256;  // channels-last pixels per parallel task (and per statistics block)

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A tensor's own layout: channels_last when it is channels_last-dense and not contiguous, else
// contiguous.
at::MemoryFormat memory_format_of(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast) ? at::MemoryFormat::ChannelsLast
                                                                                : at::MemoryFormat::Contiguous;
}

// The output's layout: torch's rule for its CPU convolutions (checked on torch 2.14, float32,
// float64 and bfloat16): channels_last when the input or the weight suggests it
// (suggest_memory_format reads the order of the strides, so an (N, C, 1, 1) input made
// channels_last counts, and a weight made channels_last by model.to(memory_format=...) makes a
// contiguous input's output channels_last), else contiguous; an empty batch is contiguous.
// (genfast/ops/conv_transpose.py's out_format is the same rule.)
at::MemoryFormat output_format(const at::Tensor& x, const at::Tensor& w) {
  if (x.size(0) == 0 || x.size(1) == 0) return at::MemoryFormat::Contiguous;  // torch's empty-input convolution
  return x.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
                 w.suggest_memory_format() == at::MemoryFormat::ChannelsLast
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

// The gradients' layouts, torch's rule for its transposed convolution (checked on torch 2.14 over
// contiguous / channels_last inputs and weights, empty batches, 1x1 maps and one channel): grad_input
// follows output_format(x, w) (a contiguous input with a channels_last weight gives a
// channels_last grad_input), and so does grad_weight, except for an empty input (the weight's
// own layout). genfast/ops/conv_transpose.py's grad_formats is the same rule (the fakes).
at::MemoryFormat grad_weight_format(const at::Tensor& x, const at::Tensor& w) {
  return x.size(0) == 0 || x.size(1) == 0 ? memory_format_of(w) : output_format(x, w);
}

// The layout of a fused product whose activation (or following BatchNorm) torch would run as its
// own op: torch's elementwise ops and its CPU BatchNorm give a contiguous output for an input
// that is contiguous, whatever its strides, so a channels_last product whose shape makes both
// layouts one (one channel, a 1x1 map, or empty) comes out contiguous after them.
bool one_memory_order(int64_t N, int64_t C, int64_t H, int64_t W) { return N * C * H * W == 0 || C == 1 || H * W == 1; }

at::MemoryFormat fused_output_format(const at::Tensor& x, const at::Tensor& w, int64_t N, int64_t C, int64_t H,
                                     int64_t W, bool elementwise_after) {
  return elementwise_after && one_memory_order(N, C, H, W) ? at::MemoryFormat::Contiguous : output_format(x, w);
}

// Whether t has exactly the strides at::empty gives for `fmt` (the fakes' strides, which
// opcheck compares).
bool has_canonical_strides(const at::Tensor& t, at::MemoryFormat fmt) {
  return fmt == at::MemoryFormat::ChannelsLast
             ? t.strides() == at::IntArrayRef(c10::get_channels_last_strides_2d(t.sizes()))
             : t.strides() == at::IntArrayRef(c10::contiguous_strides(t.sizes()));
}

// t itself when it has the canonical strides of `fmt`, else a copy that has them (only a tensor
// whose size-1 dimensions carry other strides, or one in another layout).
at::Tensor canonical(const at::Tensor& t, at::MemoryFormat fmt) {
  if (has_canonical_strides(t, fmt)) return t;
  return at::empty(t.sizes(), t.options().memory_format(fmt)).copy_(t);
}

// Calls fn(std::integral_constant<int, ACT>) for the runtime activation code, so that the hot
// loops carry the activation as a compile-time constant (no branch, vectorisable).
template <typename F>
void dispatch_activation(int64_t act, F&& fn) {
  switch (act) {
    case kRelu: fn(std::integral_constant<int, kRelu>()); break;
    case kLeakyRelu: fn(std::integral_constant<int, kLeakyRelu>()); break;
    case kTanh: fn(std::integral_constant<int, kTanh>()); break;
    case kSigmoid: fn(std::integral_constant<int, kSigmoid>()); break;
    default: fn(std::integral_constant<int, kIdentity>()); break;
  }
}

// Sum of v[i] (or of (v[i] - mean)^2 with SQDEV) over i < n in the accumulation type, in
// kLanes interleaved partial sums: a fixed order (deterministic), and unlike one running sum
// (an in-order floating-point reduction GCC may not reorder) it vectorises.
template <bool SQDEV, typename acc_t, typename T>
inline acc_t lane_sum(const T* v, int64_t n, acc_t mean) {
  constexpr int kLanes = 8;
  acc_t s[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const acc_t d = static_cast<acc_t>(v[i + l]) - (SQDEV ? mean : acc_t(0));
      s[l] += SQDEV ? d * d : d;
    }
  acc_t t = 0;
  for (; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(v[i]) - (SQDEV ? mean : acc_t(0));
    t += SQDEV ? d * d : d;
  }
  for (int l = 0; l < kLanes; ++l) t += s[l];
  return t;
}

// (count, mean, M2) of one stored plane v[0..L), L > 0: the mean, then the squared deviations
// (the plane is still in cache)
template <typename acc_t, typename T>
inline Welford<acc_t> plane_welford(const T* v, int64_t L) {
  const acc_t mean = lane_sum<false>(v, L, acc_t(0)) / acc_t(L);
  return Welford<acc_t>{acc_t(L), mean, lane_sum<true>(v, L, mean)};
}

// y = act(p + bias[c]) over a dense (N, C, HW) tensor in layout `fmt` (p and y share the linear
// layout; they may be the same buffer). With stats, part[task * C + c] receives the Welford
// partial of channel c's stored values in that task; tasks: one (n, c) plane (NCHW, so part
// index n * C + c) or one block of kPixelBlock pixels (channels-last); the caller merges each
// channel's partials in task order. INPLACE: p is y (float32 / float64); reading through y's
// own pointer lets the compiler see the zero dependence distance and vectorise without an
// overlap check.
template <int ACT, bool INPLACE, typename scalar_t, typename acc_t>
void epilogue(const acc_t* p,                        // product, N * C * HW values in layout fmt
              scalar_t* y,                           // output, same layout (may alias p)
              const acc_t* bias,                     // C values, per-channel bias (zeros when none)
              int64_t N, int64_t C, int64_t HW,      // sizes
              bool channels_last,                    // layout: (N, HW, C) when true, else (N, C, HW)
              acc_t slope_in,                        // leaky_relu negative slope
              std::vector<Welford<acc_t>>* part) {   // per-task statistics, or nullptr
  const bool stats = part != nullptr;
  if (!channels_last) {
    if (stats) part->assign(N * C, welford_init<acc_t>());
    Welford<acc_t>* pp = stats ? part->data() : nullptr;
    at::parallel_for(0, N * C, 1, [=](int64_t r0, int64_t r1) {
      const acc_t slope = slope_in;  // private copies: no reads of the caller's stack in the hot loop
      const int64_t L = HW;
      for (int64_t r = r0; r < r1; ++r) {
        const acc_t bv = bias[r % C];
        scalar_t* dst = y + r * L;
        const acc_t* src = INPLACE ? reinterpret_cast<const acc_t*>(dst) : p + r * L;
        for (int64_t i = 0; i < L; ++i) dst[i] = static_cast<scalar_t>(act_out<ACT, acc_t>(src[i] + bv, slope));
        if (stats && L > 0) pp[r] = plane_welford<acc_t>(dst, L);
      }
    });
    return;
  }
  const int64_t pixels = N * HW, nblk = (pixels + kPixelBlock - 1) / kPixelBlock;
  if (stats) part->assign(nblk * C, welford_init<acc_t>());
  Welford<acc_t>* pp = stats ? part->data() : nullptr;
  at::parallel_for(0, nblk, 1, [=](int64_t b0, int64_t b1) {
    const acc_t slope = slope_in;
    const int64_t Cl = C;
    std::vector<acc_t> sum(stats ? Cl : 0), q(stats ? Cl : 0);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t lo = blk * kPixelBlock, hi = std::min(pixels, lo + kPixelBlock);
      if (stats) std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t m = lo; m < hi; ++m) {
        scalar_t* dst = y + m * Cl;
        const acc_t* src = INPLACE ? reinterpret_cast<const acc_t*>(dst) : p + m * Cl;
        for (int64_t c = 0; c < Cl; ++c)
          dst[c] = static_cast<scalar_t>(act_out<ACT, acc_t>(src[c] + bias[c], slope));
        if (stats)
          for (int64_t c = 0; c < Cl; ++c) sum[c] += static_cast<acc_t>(dst[c]);
      }
      if (!stats) continue;
      const acc_t cnt = acc_t(hi - lo);
      for (int64_t c = 0; c < Cl; ++c) {
        sum[c] /= cnt;  // now the block mean
        q[c] = 0;
      }
      for (int64_t m = lo; m < hi; ++m) {
        const scalar_t* row = y + m * Cl;
        for (int64_t c = 0; c < Cl; ++c) {
          const acc_t d = static_cast<acc_t>(row[c]) - sum[c];
          q[c] += d * d;
        }
      }
      for (int64_t c = 0; c < Cl; ++c) pp[blk * Cl + c] = Welford<acc_t>{cnt, sum[c], q[c]};
    }
  });
}

// dz = dy * act'(y) in the accumulation type (skipped when dz_out is nullptr: dz is dy itself)
// and part[task * C + c] = sum of channel c's dz in that task (when part is not nullptr);
// dense (N, C, HW) tensors sharing layout `fmt`, tasks as in `epilogue`.
template <int ACT, typename scalar_t, typename acc_t>
void grad_pre(const scalar_t* dy,                     // grad of the output, layout fmt
              const scalar_t* y,                      // saved output, same layout
              acc_t* dz_out,                          // dz, same layout, or nullptr (ACT == identity, no cast)
              int64_t N, int64_t C, int64_t HW,       // sizes
              bool channels_last,                     // layout: (N, HW, C) when true, else (N, C, HW)
              acc_t slope_in,                         // leaky_relu negative slope
              std::vector<acc_t>* part) {             // per-task bias-gradient sums, or nullptr
  const bool sums = part != nullptr;
  if (!channels_last) {
    if (sums) part->assign(N * C, acc_t(0));
    acc_t* pp = sums ? part->data() : nullptr;
    at::parallel_for(0, N * C, 1, [=](int64_t r0, int64_t r1) {
      const acc_t slope = slope_in;
      const int64_t L = HW;
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* g = dy + r * L;
        const scalar_t* o = y + r * L;
        if (dz_out != nullptr) {
          acc_t* d = dz_out + r * L;
          for (int64_t i = 0; i < L; ++i)
            d[i] = act_backward_from_output_c<ACT, acc_t>(static_cast<acc_t>(g[i]), static_cast<acc_t>(o[i]), slope);
          if (sums) pp[r] = lane_sum<false>(d, L, acc_t(0));  // the plane is still in cache
        } else if (sums) {
          pp[r] = lane_sum<false>(g, L, acc_t(0));
        }
      }
    });
    return;
  }
  const int64_t pixels = N * HW, nblk = (pixels + kPixelBlock - 1) / kPixelBlock;
  if (sums) part->assign(nblk * C, acc_t(0));
  acc_t* pp = sums ? part->data() : nullptr;
  at::parallel_for(0, nblk, 1, [=](int64_t b0, int64_t b1) {
    const acc_t slope = slope_in;
    const int64_t Cl = C;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t lo = blk * kPixelBlock, hi = std::min(pixels, lo + kPixelBlock);
      acc_t* s = sums ? pp + blk * Cl : nullptr;
      for (int64_t m = lo; m < hi; ++m) {
        const scalar_t* g = dy + m * Cl;
        const scalar_t* o = y + m * Cl;
        if (dz_out != nullptr) {
          acc_t* d = dz_out + m * Cl;
          for (int64_t c = 0; c < Cl; ++c)
            d[c] = act_backward_from_output_c<ACT, acc_t>(static_cast<acc_t>(g[c]), static_cast<acc_t>(o[c]), slope);
          if (sums)
            for (int64_t c = 0; c < Cl; ++c) s[c] += d[c];
        } else if (sums) {
          for (int64_t c = 0; c < Cl; ++c) s[c] += static_cast<acc_t>(g[c]);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// The GEMM product (NCHW tensors, groups == 1). Measured on the 2-core AVX-512 CI CPU: ATen's
// oneDNN transposed convolution ran the DCGAN generator layers at 80-160 GFLOP/s where one BLAS
// product of the same FLOPs ran at 190-250 GFLOP/s, and a 1-channel output layer 6x slower. So
// the transposed convolution is written as one product and our col2im:
//   columns[(n, ih, iw), (co, i, j)] = sum_ci x[n, ci, ih, iw] * w[ci, co, i, j]
// (at::mm; w2 = w as the (C_in, C_out*KH*KW) matrix it is in memory), then each output value is
// the bias plus its taps, added from the columns, through the activation, with the plane's
// BatchNorm statistics while it is in cache (gemm_forward: the two layouts of the columns, rows
// of pixels or planes of pixels, and the two ways of running the products).
// Backward: dz = dy * act'(y) of a run of channels goes into zero-bordered full planes (with the
// bias gradient's per-plane sums), im2col gathers each input pixel's taps from them into the row
// layout (zeros outside the output), then two BLAS products:
//   grad_input^T (N*HW, C_in) = cols x w2^T,   grad_weight (C_in, C_out*K) = x^T x cols,
// grad_weight in the weight's own layout.
// Each output value sums its taps in a fixed order, whatever the number of threads; grad_weight
// sums the chunks of the batch in batch order (deterministic).
// Memory: the columns hold C_out*K*H_in*W_in values per image, (KH*KW)/(SH*SW) times the output
// (4x for k4 s2), for one image per thread or a chunk of the batch at a time; above
// kMaxColsBytes per image the ATen path runs instead.
constexpr int64_t kMaxColsBytes = int64_t(1) << 28;  // one image's columns, above which ATen's path runs
constexpr int64_t kChunkBytes = int64_t(1) << 25;    // the columns of one product, unless one image needs more

// Where it runs, per direction: measured interleaved against ATen's product + torch's activation
// on the idle CI CPU (alternating calls, medians and minima, repeated runs; generator layers of
// the seed models; this VM's speed drifts, so single runs move 10-20%):
// - forward, with stride > 1 or from a 1x1 input: 2.6x from 1x1 noise inputs (100 -> 512, batch
//   64); 1.3x on DCGAN's 4x4 layer; 1.1x on the 7x7 and 8x8 layers; 1.05-1.12x on the 16x16,
//   128 -> 64 layer (batch 8 and 16; thread per image); 1.25x on a 14x14, 32 -> 16 layer;
//   4-5.5x on 1- and 3-channel output layers (plane layout). It lost on stride-1 k5 layers
//   (0.6-0.8x: the columns are 25x the input), so stride 1 keeps ATen's product.
// - backward: with a thread per image (thread_per_image) it won from 128 input pixels: forward
//   + backward of the 16x16, 128 -> 64 layer 1.13-1.45x eager against 1.04-1.31x with ATen's
//   backward on our dz (batch 8 and 16, with and without grad_input), the 14x14, 32 -> 16 layer
//   1.19-1.29x against 1.17-1.22x; at 7x7 and 8x8 a thread per image lost (0.92-1.0x). Over the
//   batch, with the earlier columns in (KH, KW, C_out) order (the weight copied into that order
//   and grad_weight out of it each call), it won only from 1x1 and 4x4 inputs (1.5x and 1.1x).
//   With the columns in the weight's own order, on the AMD EPYC CPU, the two products alone
//   took 0.77-0.92x of ATen's convolution backward at every generator layer measured (4x4 to
//   8x8 inputs, k4 s2 and k5 s2, batch 8 and 64; ties at 16x16), so the backward runs the GEMM
//   form wherever it is eligible.
constexpr int64_t kPlaneFormMaxCout = 8;   // output channels, up to which the forward's columns are planes

// Which way of running the products: from 128 input pixels per image, with at least as many
// images as threads, and while one image's columns and a weight-sized partial grad_weight stay
// within kThreadBytes each (a core's cache, which is the point; and each thread holds both), a
// thread per image (gemm_forward, gemm_backward_threads); else the products over chunks of the
// batch, whose images alone are too small to keep the BLAS kernel busy (measured on the CI CPU
// at 4x4 to 32x32 inputs).
constexpr int64_t kThreadBytes = int64_t(1) << 22;
bool thread_per_image(const Geometry& g, int64_t elem) {
  const double kc = double(g.KH) * g.KW * g.Cout * elem;
  return g.N > 1 && g.Hin * g.Win >= 128 && g.N >= at::get_num_threads() && kc * g.Hin * g.Win <= kThreadBytes &&
         kc * g.Cin <= kThreadBytes;
}

// Images per product: as many as keep the columns within kChunkBytes, so that a large batch
// does not hold (KH*KW)/(SH*SW) times its output at once.
int64_t chunk_images(const Geometry& g, int64_t elem) {
  const int64_t per = std::max<int64_t>(1, g.Hin * g.Win * g.KH * g.KW * g.Cout * elem);
  return std::max<int64_t>(1, std::min(g.N, kChunkBytes / per));
}

bool gemm_eligible(const at::Tensor& x, const Geometry& g) {
  if (g.G != 1 || g.N == 0 || g.Cin == 0 || g.Cout == 0) return false;
  const int64_t pixels = g.Hin * g.Win;
  if (pixels > 1 && g.SH * g.SW == 1)
    return false;
  if (memory_format_of(x) != at::MemoryFormat::Contiguous) return false;
  const int64_t elem = x.scalar_type() == at::kDouble ? 8 : 4;
  return double(g.Cout) * g.KH * g.KW * pixels * elem <= double(kMaxColsBytes);
}

// The row layout of the forward's columns (more than kPlaneFormMaxCout output channels) is one
// large BLAS product followed by col2im; whether that beats ATen's own transposed convolution
// (oneDNN) depends on the host's BLAS and on how many columns each input pixel makes
// (KH*KW / (SH*SW) times the output). Interleaved, batch 8 and 64, ReLU / LeakyReLU:
// - the CI VM's earlier CPU (AVX-512; its vendor was not recorded), MKL at 200-260 GFLOP/s on 2
//   threads against 80-160 for oneDNN's transposed convolution: 1.05-1.3x, 2.6x from 1x1 inputs;
// - an AMD EPYC (AVX2 only; MKL at 140-160 GFLOP/s in a fast period), with the columns in the
//   weight's own (C_out, KH, KW) order (no copy of the weight each way): k4 s2 layers 1.05-1.4x
//   (DCGAN 4x4 -> 8x8 1.18x, 8x8 -> 16x16 1.09x, 14x14 -> 28x28 1.3-1.4x; 16x16 -> 32x32 and
//   7x7 batch 64 at 256 -> 128 ties), 1x1 inputs 2.4-2.9x; k5 s2 layers (6.25 columns per
//   output value) 0.84-0.95x. (The earlier layout, which copied the weight into (KH, KW, C_out)
//   order, lost on that CPU at every size: 0.74-0.97x.)
// So `auto` takes it from a 1x1 input, or where each output value has at most 4 columns (KH*KW
// <= 4*SH*SW); ATen's product runs elsewhere and our epilogue follows. The plane layout (up to
// kPlaneFormMaxCout output channels) won on both hosts (2.5-9x) and is taken everywhere.
// genfast._C.set_cpu_row_gemm overrides the choice (tests cover both forms on any host; users can
// measure their own).
std::atomic<int> g_row_gemm_mode{0};  // 0 auto, 1 always, 2 never, 3 images_inner

bool row_gemm_auto(const Geometry& g) { return g.Hin * g.Win == 1 || g.KH * g.KW <= 4 * g.SH * g.SW; }

bool row_gemm_forward(const Geometry& g) {
  const int mode = g_row_gemm_mode.load(std::memory_order_relaxed);
  return mode == 1 || ((mode == 0 || mode == 3) && row_gemm_auto(g));
}

// The images-inner layout of the forward's columns (col2im_images): for more than
// kPlaneFormMaxCout output channels where the row layout's rule does not take the shape (each
// output value has more than 4 columns, KH*KW > 4*SH*SW: the k5 s2 layers), under the mode
// "images_inner" only (set_cpu_row_gemm; "auto" leaves these layers to ATen's product, "always"
// and "never" keep their meaning: the row layout, or ATen's product). It runs the same BLAS
// product as the plane layout with the images innermost, so that col2im adds flat runs of
// several images at once. Interleaved on the CI CPU (AMD EPYC, AVX2, MKL on 2 threads, a noisy
// VM: +-30% between runs), k5 s2 + bias + leaky_relu, C_in 32-256 -> C_in/2: against ATen's
// (oneDNN) product with our epilogue, 7x7 inputs 0.98-1.63x at batch 8 and 0.88-1.37x at batch
// 64, 14x14 inputs 0.96-1.15x at batch 8 and 1.09-1.48x at batch 64; against torch's
// transposed convolution + leaky_relu, the Keras 128 -> 64 7x7 layer 1.07-1.25x at batch 8.
// ATen's product ran at 95-142 GFLOP/s there, this layout at 123-146. That was the host in its
// faster state; in its slow state (MKL's 1024^3 product at 44-63 GFLOP/s, oneDNN slowed less)
// the same forward ran 0.70-0.81x torch's (Keras 128 -> 64 7x7 at batch 8, 16 and 64, 64 -> 32
// 14x14 at batch 16), so `auto` no longer takes it: a layout that can lose 20-30% to torch on
// the CI host's two states is not a default.
bool images_inner_forward(const Geometry& g) {
  return g.Cout > kPlaneFormMaxCout && g_row_gemm_mode.load(std::memory_order_relaxed) == 3 && !row_gemm_auto(g);
}

// Whether the forward runs the GEMM form: eligible, and the plane layout, the images-inner layout
// or the row layout where it is taken (row_gemm_forward)
bool gemm_forward_form(const at::Tensor& x, const Geometry& g) {
  return gemm_eligible(x, g) && (g.Cout <= kPlaneFormMaxCout || images_inner_forward(g) || row_gemm_forward(g));
}

// The backward's GEMM form (im2col of dz, then two BLAS products): with the plane layout (up to
// kPlaneFormMaxCout output channels) or where each output value has at most 4 columns (the k4 s2
// layers, 1x1 inputs: row_gemm_auto), by shape whatever the forward's mode. Not for the k5 s2
// layers: their im2col writes 6.25x dz, and interleaved on the CI CPU (AVX2, its slow state: MKL
// at 44-63 GFLOP/s) the Keras 128 -> 64 7x7 layer's backward ran 0.86-0.92x ATen's at batch 8
// (grad_input 0.81x, grad_weight 0.98x) and its grad_weight 0.91-0.95x at batch 64; there dz
// comes from our one pass (grad_pre), grad_input from Winograd where it takes the shape
// (2.6x ATen's at batch 64) and the rest from ATen's product.
bool gemm_backward(const at::Tensor& x, const Geometry& g) {
  return gemm_eligible(x, g) && (g.Cout <= kPlaneFormMaxCout || row_gemm_auto(g));
}


// x's images (n, C_in, H, W) as the (n*H*W, C_in) matrix (a transposed view for one image)
at::Tensor x_rows(const at::Tensor& xc, const Geometry& g) {
  const int64_t HW = g.Hin * g.Win, n = xc.size(0);
  if (n == 1) return xc.view({g.Cin, HW}).t();
  return xc.permute({0, 2, 3, 1}).contiguous().view({n * HW, g.Cin});
}

// grad_input (N, C_in, H, W) from cols (N*H*W, K*C_out) and wt (C_in, K*C_out)
at::Tensor gemm_grad_input(const at::Tensor& cols, const at::Tensor& wt, const Geometry& g) {
  if (g.N == 1) return at::mm(wt, cols.t()).view({1, g.Cin, g.Hin, g.Win});
  return at::mm(cols, wt.t()).view({g.N, g.Hin, g.Win, g.Cin}).permute({0, 3, 1, 2});
}

// x's images (n, C_in, H, W) as the (C_in, n*H*W) matrix (a view for one image, else a copy of
// whole planes)
at::Tensor x_cols(const at::Tensor& xa, const Geometry& g) {
  const int64_t HW = g.Hin * g.Win, n = xa.size(0);
  if (n == 1) return xa.contiguous().view({g.Cin, HW});
  return xa.contiguous().view({n, g.Cin, HW}).transpose(0, 1).contiguous().view({g.Cin, n * HW});
}

// x's images (n, C_in, H, W) as the (C_in, H*W*n) matrix with the images innermost (a copy)
at::Tensor x_cols_images_inner(const at::Tensor& xa, const Geometry& g) {
  const int64_t n = xa.size(0);
  return xa.permute({1, 2, 3, 0}).contiguous().view({g.Cin, g.Hin * g.Win * n});
}

// Images per product of the images-inner layout: as many as keep one output channel's columns
// (KH*KW rows of H_in*W_in*m values, read back by one task) within kImagesInnerChannelBytes, in
// a core's L2 with the channel's phases, and all the columns within kImagesInnerBytes; the
// batch then goes in chunks of equal size. Interleaved on the CI CPU, k5 s2 layers: 64 KB per
// channel (3 images of 14x14) ran the 64 -> 32 14x14 layer at batch 64 at 0.83x ATen's product,
// 128 KB at 1.06x; without the 4 MB bound the 7x7 layers at batch 64 (26 images, up to 16 MB of
// columns per product) ran at 0.87-0.95x for 128 and 256 input channels, with it at 1.07-1.24x.
constexpr int64_t kImagesInnerChannelBytes = int64_t(1) << 17;
constexpr int64_t kImagesInnerBytes = int64_t(1) << 22;
int64_t images_inner_chunk(const Geometry& g, int64_t elem) {
  const int64_t per = std::max<int64_t>(1, g.Hin * g.Win * g.KH * g.KW * elem);
  const int64_t most = std::max<int64_t>(
      1, std::min({g.N, kImagesInnerChannelBytes / per, kImagesInnerBytes / std::max<int64_t>(1, per * g.Cout)}));
  const int64_t chunks = (g.N + most - 1) / most;
  return (g.N + chunks - 1) / chunks;  // balanced chunks
}

// The per-thread partials of a parallel_for over images (each at its range's first image,
// undefined elsewhere) summed in range order: deterministic for a thread count. Returns an
// undefined tensor when no range made one.
at::Tensor sum_in_order(const std::vector<at::Tensor>& partial) {
  at::Tensor total;
  for (const at::Tensor& t : partial) {
    if (!t.defined()) continue;
    if (!total.defined()) total = t;
    else total.add_(t);
  }
  return total;
}

// Scratch memory of the GEMM form, kept per thread and per slot from one call to the next:
// the columns (kScratchCols over the batch, kScratchThread per image on each pool thread) were
// allocated afresh by every call, and glibc hands blocks of megabytes back
// to the system when they are freed and faults them in again when they return, which made the
// forward of the DCGAN 512-256 layer bimodal (3.6 or 5.9 ms) on the CI VM. A slot grows to the
// largest size asked of it (the columns stay within kChunkBytes over the batch, kThreadBytes
// per image) and is freed when its thread ends; its tensors never leave the op.
enum ScratchSlot : int { kScratchCols = 0, kScratchThread = 1, kScratchSlots = 2 };
struct ScratchBuf {
  void* p = nullptr;
  size_t bytes = 0;
  ~ScratchBuf() { std::free(p); }
};
at::Tensor scratch(int slot, at::IntArrayRef sizes, const at::TensorOptions& opts) {
  static thread_local ScratchBuf bufs[kScratchSlots];
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  const size_t need = ((static_cast<size_t>(n) * at::elementSize(c10::typeMetaToScalarType(opts.dtype())) + 63) / 64) * 64;
  ScratchBuf& b = bufs[slot];
  if (b.bytes < need) {
    std::free(b.p);
    b.p = std::aligned_alloc(64, std::max<size_t>(need, 64));
    b.bytes = b.p != nullptr ? need : 0;
    TORCH_CHECK(b.p != nullptr, "conv_transpose2d: out of memory allocating ", need, " bytes of scratch");
  }
  return at::from_blob(b.p, sizes, opts.device(at::kCPU));
}

// a x b into out (a scratch tensor), returned
at::Tensor mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  at::mm_out(out, a, b);
  return out;
}

// w (C_in, C_out, KH, KW) as the (C_in, C_out*KH*KW) matrix of the products: a view of the
// weight as it is stored (a copy only for a non-contiguous weight)
at::Tensor w_matrix(const at::Tensor& wa, const Geometry& g) {
  return wa.contiguous().view({g.Cin, g.Cout * g.KH * g.KW});
}

// Along one axis, the output positions o = r + S*q of phase r (q in [0, Q[r])) receive, per tap
// k with (r + P - k*D) divisible by S, input position q + delta, for q in [q0, q1) (the input
// positions inside [0, in)); taps[r] lists them in increasing k.
struct PhaseTap {
  int64_t k, delta, q0, q1;
};
struct AxisPhases {
  int64_t S = 1;
  std::vector<int64_t> Q;
  std::vector<std::vector<PhaseTap>> taps;
};
AxisPhases axis_phases(int64_t in, int64_t out, int64_t K, int64_t S, int64_t P, int64_t D) {
  AxisPhases a;
  a.S = S;
  a.Q.assign(S, 0);
  a.taps.resize(S);
  for (int64_t r = 0; r < S; ++r) {
    a.Q[r] = r < out ? (out - r + S - 1) / S : 0;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t num = r + P - k * D;
      if (((num % S) + S) % S != 0) continue;
      const int64_t delta = num / S;  // exact
      const int64_t q0 = std::max<int64_t>(0, -delta), q1 = std::min(a.Q[r], in - delta);
      if (q1 > q0) a.taps[r].push_back(PhaseTap{k, delta, q0, q1});
    }
  }
  return a;
}

// Row stride of phase rw's buffer in col2im_plane: W_in when its Q_w fits (the columns' own
// stride, so that a tap's rows add as one flat run), else Q_w.
inline int64_t phase_stride(const AxisPhases& pw, int64_t rw, int64_t Win) { return std::max(pw.Q[rw], Win); }

// Values of col2im_plane's buffer: the phases' buffers, then as many for the saved values.
int64_t plane_buffer(const Geometry& g, const AxisPhases& pw) {
  int64_t r = 0;
  for (int64_t rw = 0; rw < pw.S; ++rw) r += phase_stride(pw, rw, g.Win);
  return 2 * g.Hout * r;
}

// One output plane (image n, channel co) of the forward from the transposed columns
//   ct[co*KH*KW + i*KW + j][ih*W_in + iw]  (row stride ldc; the image's first pixel at ct).
// The plane is summed phase by phase of the stride in buf (phase (rh, rw) holds the outputs
// (rh + S_H*qh, rw + S_W*qw) in Q_h[rh] rows of phase_stride values): the bias, then each tap of
// the phase in tap order (i, j). A tap whose rows share the columns' stride adds as one flat
// run over its rows; the few values of that run which lie outside the tap's columns (where the
// run wraps from one row to the next) are saved before and put back after, untouched. The
// phases are then interleaved into y's plane through the activation, and the plane's
// statistics taken while it is in cache.
template <int ACT, typename scalar_t, typename acc_t>
GENFAST_SIMD_CLONES void col2im_plane(const acc_t* ct, int64_t ldc, int64_t co, scalar_t* yp, acc_t bias,
                                      const Geometry& g, const AxisPhases& ph, const AxisPhases& pw, acc_t* buf,
                                      acc_t** off, acc_t slope, Welford<acc_t>* stat) {
  const int64_t Win = g.Win, KW = g.KW, Wout = g.Wout, SH = ph.S, SW = pw.S;
  acc_t* base = buf;
  acc_t* saved = buf + plane_buffer(g, pw) / 2;
  for (int64_t rh = 0; rh < SH; ++rh)
    for (int64_t rw = 0; rw < SW; ++rw) {
      const int64_t Qh = ph.Q[rh], Qw = pw.Q[rw], R = phase_stride(pw, rw, Win);
      acc_t* P = base;
      off[rh * SW + rw] = P;
      base += Qh * R;
      for (int64_t e = 0; e < Qh * R; ++e) P[e] = bias;
      for (const PhaseTap& a : ph.taps[rh])
        for (const PhaseTap& b : pw.taps[rw]) {
          const acc_t* src = ct + (co * g.KH * KW + a.k * KW + b.k) * ldc + a.delta * Win + b.delta;
          if (R != Win) {
            for (int64_t qh = a.q0; qh < a.q1; ++qh) {
              const acc_t* sr = src + qh * Win;
              acc_t* d = P + qh * R;
              for (int64_t qw = b.q0; qw < b.q1; ++qw) d[qw] += sr[qw];
            }
            continue;
          }
          // one run from (a.q0, b.q0) to (a.q1 - 1, b.q1 - 1); the values it passes outside
          // [b.q0, b.q1) are columns [b.q1, Qw) of its rows but the last and [0, b.q0) of its
          // rows but the first
          const int64_t e0 = a.q0 * R + b.q0, e1 = (a.q1 - 1) * R + b.q1;
          int64_t ns = 0;
          for (int64_t qh = a.q0; qh < a.q1; ++qh) {
            if (qh + 1 < a.q1)
              for (int64_t qw = b.q1; qw < Qw; ++qw) saved[ns++] = P[qh * R + qw];
            if (qh > a.q0)
              for (int64_t qw = 0; qw < b.q0; ++qw) saved[ns++] = P[qh * R + qw];
          }
          for (int64_t e = e0; e < e1; ++e) P[e] += src[e];
          ns = 0;
          for (int64_t qh = a.q0; qh < a.q1; ++qh) {
            if (qh + 1 < a.q1)
              for (int64_t qw = b.q1; qw < Qw; ++qw) P[qh * R + qw] = saved[ns++];
            if (qh > a.q0)
              for (int64_t qw = 0; qw < b.q0; ++qw) P[qh * R + qw] = saved[ns++];
          }
        }
    }
  for (int64_t oh = 0; oh < g.Hout; ++oh) {
    const int64_t rh = oh % SH, qh = oh / SH;
    scalar_t* yr = yp + oh * Wout;
    acc_t* const* o = off + rh * SW;
    if (SW == 1) {
      const acc_t* A = o[0] + qh * phase_stride(pw, 0, Win);
      for (int64_t ow = 0; ow < Wout; ++ow) yr[ow] = static_cast<scalar_t>(act_out<ACT, acc_t>(A[ow], slope));
    } else if (SW == 2) {
      const acc_t* A = o[0] + qh * phase_stride(pw, 0, Win);
      const acc_t* B = o[1] + qh * phase_stride(pw, 1, Win);
      const int64_t pairs = Wout / 2;
      for (int64_t q = 0; q < pairs; ++q) {
        yr[2 * q] = static_cast<scalar_t>(act_out<ACT, acc_t>(A[q], slope));
        yr[2 * q + 1] = static_cast<scalar_t>(act_out<ACT, acc_t>(B[q], slope));
      }
      if (Wout % 2) yr[Wout - 1] = static_cast<scalar_t>(act_out<ACT, acc_t>(A[pairs], slope));
    } else {
      for (int64_t ow = 0; ow < Wout; ++ow) {
        const int64_t rw = ow % SW;
        yr[ow] = static_cast<scalar_t>(
            act_out<ACT, acc_t>(o[rw][qh * phase_stride(pw, rw, Win) + ow / SW], slope));
      }
    }
  }
  if (stat != nullptr) *stat = plane_welford<acc_t>(yp, g.Hout * Wout);
}

// Output channel co of m images (n0, ...) of the forward from the images-inner columns
//   ct[co*KH*KW + i*KW + j][(ih*W_in + iw)*m + n]  (rows of H_in*W_in*m values),
// where a tap's values for the m images of one input pixel are adjacent. The channel is summed
// phase by phase of the stride in buf (phase (rh, rw) holds the outputs (rh + S_H*qh, rw +
// S_W*qw) of the m images as (Q_h[rh], Q_w[rw], m) values): the bias, then each tap of the phase
// in tap order (i, j), each of its rows one flat run of (q1 - q0) * m values, contiguous in both
// ct and the phase (no bounds inside a run, none of col2im_plane's wrap handling). The m planes
// are then written through the activation from the phases, and their statistics taken.
// values per phase buffer of col2im_images: the largest phase (rows x columns) for m images
int64_t images_phase_values(const AxisPhases& ph, const AxisPhases& pw, int64_t m) {
  const int64_t qh = ph.Q.empty() ? 0 : *std::max_element(ph.Q.begin(), ph.Q.end());
  const int64_t qw = pw.Q.empty() ? 0 : *std::max_element(pw.Q.begin(), pw.Q.end());
  return qh * qw * m;
}
int64_t images_buffer(const AxisPhases& ph, const AxisPhases& pw, int64_t m) {
  return ph.S * pw.S * images_phase_values(ph, pw, m);
}

template <int ACT, typename scalar_t, typename acc_t>
GENFAST_SIMD_CLONES void col2im_images(const acc_t* ct, int64_t co, int64_t m, scalar_t* y, int64_t n0, acc_t bias,
                                       const Geometry& g, const AxisPhases& ph, const AxisPhases& pw, acc_t* buf,
                                       acc_t slope, Welford<acc_t>* stat) {
  const int64_t Win = g.Win, KK = g.KH * g.KW, SH = ph.S, SW = pw.S, row = g.Hin * Win * m;
  const int64_t L = g.Hout * g.Wout;
  const int64_t PS = images_phase_values(ph, pw, m);  // values per phase buffer
  for (int64_t rh = 0; rh < SH; ++rh)
    for (int64_t rw = 0; rw < SW; ++rw) {
      const int64_t Qw = pw.Q[rw];
      acc_t* P = buf + (rh * SW + rw) * PS;
      const int64_t n_ph = ph.Q[rh] * Qw * m;
      for (int64_t e = 0; e < n_ph; ++e) P[e] = bias;
      for (const PhaseTap& a : ph.taps[rh])
        for (const PhaseTap& b : pw.taps[rw]) {
          const int64_t len = (b.q1 - b.q0) * m;
          if (len <= 0) continue;
          const acc_t* src = ct + (co * KK + a.k * g.KW + b.k) * row;
          for (int64_t qh = a.q0; qh < a.q1; ++qh) {
            const acc_t* sr = src + ((qh + a.delta) * Win + b.q0 + b.delta) * m;
            acc_t* d = P + (qh * Qw + b.q0) * m;
#pragma omp simd
            for (int64_t e = 0; e < len; ++e) d[e] += sr[e];
          }
        }
    }
  // the activation over the phases (flat, vectorised), then the m planes copied out of them
  for (int64_t rh = 0; rh < SH; ++rh)
    for (int64_t rw = 0; rw < SW; ++rw) {
      acc_t* P = buf + (rh * SW + rw) * PS;
      const int64_t n_ph = ph.Q[rh] * pw.Q[rw] * m;
#pragma omp simd
      for (int64_t e = 0; e < n_ph; ++e) P[e] = act_out<ACT, acc_t>(P[e], slope);
    }
  for (int64_t i = 0; i < m; ++i) {
    scalar_t* yp = y + ((n0 + i) * g.Cout + co) * L;
    for (int64_t oh = 0; oh < g.Hout; ++oh) {
      const int64_t rh = oh % SH, qh = oh / SH;
      scalar_t* yr = yp + oh * g.Wout;
      for (int64_t rw = 0; rw < SW; ++rw) {
        const int64_t Qw = pw.Q[rw];
        const acc_t* A = buf + (rh * SW + rw) * PS + qh * Qw * m + i;
        for (int64_t qw = 0; qw < Qw; ++qw) yr[rw + qw * SW] = static_cast<scalar_t>(A[qw * m]);
      }
    }
    if (stat != nullptr) stat[(n0 + i) * g.Cout + co] = plane_welford<acc_t>(yp, L);
  }
}

// The row form's columns hold, per input pixel p = ih*W_in + iw of an image, the KH*KW taps of
// each output channel together: cols[p][co*KH*KW + i*KW + j], the product of x's rows by the
// weight as it is stored, (C_in, C_out*KH*KW) (no copy of the weight into another layout, and
// grad_weight comes out of its product in the weight's own layout). Tap (i, j) of pixel (ih,
// iw) lands on the output position (ih*SH - PH + i*DH, iw*SW - PW + j*DW). col2im and im2col go
// through "full" planes, uncropped: rows [0, Hb) and columns [0, Wb) cover every tap position
// and the output window [PH, PH + H_out) x [PW, PW + W_out) (which output_padding can push past
// the taps), so each pixel's KH x KW window is added or read without bounds checks.
struct FullPlane {
  int64_t H, W;
};
FullPlane full_plane(const Geometry& g) {
  return FullPlane{std::max((g.Hin - 1) * g.SH + (g.KH - 1) * g.DH + 1, g.PH + g.Hout),
                   std::max((g.Win - 1) * g.SW + (g.KW - 1) * g.DW + 1, g.PW + g.Wout)};
}

constexpr int64_t kRunElems = int64_t(1) << 15;  // full planes of one task's channels: 128 KiB of float

// Output channels per task of the row form's passes: full planes of at most kRunElems values
// (or one), and, when `images` images give too few tasks, runs short enough to keep every thread
// busy (not below 8 channels).
int64_t tap_run(const Geometry& g, int64_t images, bool spread) {
  const FullPlane f = full_plane(g);
  int64_t run = std::max<int64_t>(1, std::min(g.Cout, kRunElems / std::max<int64_t>(1, f.H * f.W)));
  const int64_t want = 4 * at::get_num_threads();
  if (spread && images * ((g.Cout + run - 1) / run) < want) {
    const int64_t per_n = (want + images - 1) / images;
    run = std::min(run, std::max<int64_t>(std::min<int64_t>(8, run), (g.Cout + per_n - 1) / per_n));
  }
  return run;
}

// One pixel's KH x KW taps of one channel (s, KH*KW values) added into (or, gather_taps, read
// from) its window of a full plane (P at the window's corner, rs = DH * Wb between its rows).
// KWC: KW when it is 3, 4 or 5 and DW is 1 (a fixed inner loop), else 0.
template <int KWC, typename acc_t>
GENFAST_INLINE void add_taps(acc_t* P, const acc_t* s, int64_t KH, int64_t KW, int64_t rs, int64_t DW) {
  if constexpr (KWC > 0) {
    for (int64_t i = 0; i < KH; ++i, P += rs, s += KWC)
      for (int j = 0; j < KWC; ++j) P[j] += s[j];
  } else {
    for (int64_t i = 0; i < KH; ++i, P += rs, s += KW)
      for (int64_t j = 0; j < KW; ++j) P[j * DW] += s[j];
  }
}
template <int KWC, typename acc_t>
GENFAST_INLINE void gather_taps(acc_t* d, const acc_t* P, int64_t KH, int64_t KW, int64_t rs, int64_t DW) {
  if constexpr (KWC > 0) {
    for (int64_t i = 0; i < KH; ++i, P += rs, d += KWC)
      for (int j = 0; j < KWC; ++j) d[j] = P[j];
  } else {
    for (int64_t i = 0; i < KH; ++i, P += rs, d += KW)
      for (int64_t j = 0; j < KW; ++j) d[j] = P[j * DW];
  }
}

template <typename F>
void dispatch_kw(const Geometry& g, F&& fn) {
  if (g.DW == 1 && g.KW == 4) fn(std::integral_constant<int, 4>{});
  else if (g.DW == 1 && g.KW == 3) fn(std::integral_constant<int, 3>{});
  else if (g.DW == 1 && g.KW == 5) fn(std::integral_constant<int, 5>{});
  else fn(std::integral_constant<int, 0>{});
}

// One task of the row form's col2im: output channels [c0, c0 + cw) of image n from its columns
// img (the image's first row; ldc values per row). Each channel's full plane in buf (cw full
// planes) starts at the bias; the pixels' taps are added in pixel order (each output value sums
// the bias, then its taps in increasing input pixel: deterministic); the output window then
// goes through the activation into y's planes, and each plane's statistics follow (in cache).
template <int ACT, int KWC, typename scalar_t, typename acc_t>
GENFAST_SIMD_CLONES void col2im_taps(const acc_t* img, int64_t ldc, scalar_t* y, const acc_t* bias,
                                     const Geometry& g, int64_t n, int64_t c0, int64_t cw, acc_t* buf, acc_t slope,
                                     Welford<acc_t>* pp) {
  const FullPlane f = full_plane(g);
  const int64_t FP = f.H * f.W, KK = g.KH * g.KW, L = g.Hout * g.Wout, rs = g.DH * f.W;
  for (int64_t c = 0; c < cw; ++c) std::fill(buf + c * FP, buf + (c + 1) * FP, bias[c0 + c]);
  const acc_t* src = img + c0 * KK;
  for (int64_t ih = 0; ih < g.Hin; ++ih)
    for (int64_t iw = 0; iw < g.Win; ++iw, src += ldc) {
      acc_t* P = buf + ih * g.SH * f.W + iw * g.SW;
      for (int64_t c = 0; c < cw; ++c) add_taps<KWC, acc_t>(P + c * FP, src + c * KK, g.KH, g.KW, rs, g.DW);
    }
  scalar_t* yn = y + (n * g.Cout + c0) * L;
  for (int64_t c = 0; c < cw; ++c) {
    const acc_t* P = buf + c * FP + g.PH * f.W + g.PW;
    scalar_t* yp = yn + c * L;
    for (int64_t oh = 0; oh < g.Hout; ++oh) {
      const acc_t* pr = P + oh * f.W;
      scalar_t* yr = yp + oh * g.Wout;
      for (int64_t ow = 0; ow < g.Wout; ++ow) yr[ow] = static_cast<scalar_t>(act_out<ACT, acc_t>(pr[ow], slope));
    }
    if (pp != nullptr && L > 0) pp[n * g.Cout + c0 + c] = plane_welford<acc_t>(yp, L);
  }
}

// The forward's GEMM form, in one of two layouts of the columns (the product's output):
// - rows (many output channels): cols (H_in*W_in per image, C_out*KH*KW) = x as rows of C_in by
//   wt (the weight as stored, (C_in, C_out*KH*KW)); each input pixel's KH x KW window of taps is
//   added into uncropped per-channel planes (col2im_taps);
// - planes (up to kPlaneFormMaxCout output channels): ct (C_out*KH*KW, H_in*W_in per image) =
//   wt^T by x's own (C_in, H_in*W_in) planes; each output plane's taps are rows of pixels
//   (col2im_plane).
// With a thread per image (thread_per_image), each thread runs its images' products on its own
// core into its own columns (one image's, in that core's cache) and consumes them there; else
// the products run over chunks of the batch (chunk_images) and col2im over the chunk's tasks.
template <int ACT, typename scalar_t, typename acc_t>
void gemm_forward(const at::Tensor& xc, const at::Tensor& wt, scalar_t* y, const acc_t* bias, const Geometry& g,
                  acc_t slope, Welford<acc_t>* pp) {  // pp: N * C_out per-plane statistics, or nullptr
  const int64_t HW = g.Hin * g.Win, L = g.Hout * g.Wout, C = g.Cout, KC = wt.size(1);
  const bool threads = thread_per_image(g, static_cast<int64_t>(sizeof(acc_t)));
  const int64_t nb = threads ? 1 : chunk_images(g, static_cast<int64_t>(sizeof(acc_t)));
  const AxisPhases ph = axis_phases(g.Hin, g.Hout, g.KH, g.SH, g.PH, g.DH);
  const AxisPhases pw = axis_phases(g.Win, g.Wout, g.KW, g.SW, g.PW, g.DW);
  if (g.Cout > kPlaneFormMaxCout && images_inner_forward(g)) {
    // images-inner layout: chunks of images, a task per output channel of the chunk
    const int64_t m0 = images_inner_chunk(g, static_cast<int64_t>(sizeof(acc_t)));
    const at::Tensor wT = wt.t();  // (KH*KW*C_out, C_in), a transposed view
    for (int64_t n0 = 0; n0 < g.N; n0 += m0) {
      const int64_t m = std::min(m0, g.N - n0);
      const at::Tensor ct = mm_into(scratch(kScratchCols, {KC, m * HW}, wt.options()), wT,
                                    x_cols_images_inner(xc.narrow(0, n0, m), g));
      const acc_t* cp = ct.data_ptr<acc_t>();
      at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
        std::vector<acc_t> buf(images_buffer(ph, pw, m));
        for (int64_t co = c0; co < c1; ++co)
          col2im_images<ACT, scalar_t, acc_t>(cp, co, m, y, n0, bias[co], g, ph, pw, buf.data(), slope, pp);
      });
    }
    return;
  }
  if (g.Cout > kPlaneFormMaxCout) {
    const FullPlane f = full_plane(g);
    dispatch_kw(g, [&](auto kw) {
      constexpr int KWC = decltype(kw)::value;
      if (threads) {
        const int64_t run = tap_run(g, 1, false);
        at::parallel_for(0, g.N, 1, [&](int64_t n0, int64_t n1) {
          at::AutoDispatchBelowADInplaceOrView below_autograd;  // per thread: the caller's guard is its own
          at::Tensor cols = scratch(kScratchThread, {HW, KC}, wt.options());
          std::vector<acc_t> buf(run * f.H * f.W);
          for (int64_t n = n0; n < n1; ++n) {
            at::mm_out(cols, xc.select(0, n).view({g.Cin, HW}).t(), wt);
            for (int64_t c0 = 0; c0 < C; c0 += run)
              col2im_taps<ACT, KWC, scalar_t, acc_t>(cols.data_ptr<acc_t>(), KC, y, bias, g, n, c0,
                                                     std::min(run, C - c0), buf.data(), slope, pp);
          }
        });
        return;
      }
      for (int64_t n0 = 0; n0 < g.N; n0 += nb) {
        Geometry gc = g;
        gc.N = std::min(nb, g.N - n0);
        const at::Tensor cols = mm_into(scratch(kScratchCols, {gc.N * HW, KC}, wt.options()),
                                        x_rows(xc.narrow(0, n0, gc.N), g), wt);
        const acc_t* cp = cols.data_ptr<acc_t>();
        scalar_t* yc = y + n0 * C * L;
        Welford<acc_t>* pc = pp != nullptr ? pp + n0 * C : nullptr;
        const int64_t run = tap_run(gc, gc.N, true), per_n = (C + run - 1) / run;
        at::parallel_for(0, gc.N * per_n, 1, [&](int64_t t0, int64_t t1) {
          std::vector<acc_t> buf(run * f.H * f.W);
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t n = t / per_n, c0 = (t % per_n) * run;
            col2im_taps<ACT, KWC, scalar_t, acc_t>(cp + n * HW * KC, KC, yc, bias, gc, n, c0, std::min(run, C - c0),
                                                   buf.data(), slope, pc);
          }
        });
      }
    });
    return;
  }
  const at::Tensor wT = wt.t();  // (KH*KW*C_out, C_in), a transposed view
  auto plane = [&](const acc_t* cp, int64_t ldc, int64_t n, int64_t co, acc_t* buf, acc_t** off) {
    col2im_plane<ACT, scalar_t, acc_t>(cp, ldc, co, y + (n * C + co) * L, bias[co], g, ph, pw, buf, off, slope,
                                       pp != nullptr ? pp + n * C + co : nullptr);
  };
  if (threads) {
    at::parallel_for(0, g.N, 1, [&](int64_t n0, int64_t n1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // per thread: the caller's guard is its own
      at::Tensor ct = scratch(kScratchThread, {KC, HW}, wt.options());
      std::vector<acc_t> buf(plane_buffer(g, pw));
      std::vector<acc_t*> off(g.SH * g.SW);
      for (int64_t n = n0; n < n1; ++n) {
        at::mm_out(ct, wT, xc.select(0, n).view({g.Cin, HW}));
        for (int64_t co = 0; co < C; ++co) plane(ct.data_ptr<acc_t>(), HW, n, co, buf.data(), off.data());
      }
    });
    return;
  }
  for (int64_t n0 = 0; n0 < g.N; n0 += nb) {
    const int64_t m = std::min(nb, g.N - n0);
    const at::Tensor ct = mm_into(scratch(kScratchCols, {KC, m * HW}, wt.options()), wT,
                                  x_cols(xc.narrow(0, n0, m), g));
    const acc_t* cp = ct.data_ptr<acc_t>();
    // channel-major tasks: a channel's KH*KW rows of ct are adjacent, and its m planes read them
    // in column order (image-major order read every channel's rows at one image's columns)
    at::parallel_for(0, m * C, 1, [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> buf(plane_buffer(g, pw));
      std::vector<acc_t*> off(g.SH * g.SW);
      for (int64_t r = r0; r < r1; ++r)
        plane(cp + (r % m) * HW, m * HW, n0 + r % m, r / m, buf.data(), off.data());
    });
  }
}

// One task of the backward's im2col: output channels [c0, c0 + cw) of image n into its columns
// img (the image's first row, ldc values per row; layout as col2im_taps): dz = dy * act'(y) of
// each plane into a zeroed full plane of buf (cw of them; pp[n * C + co] = the plane's sum of dz,
// row sums in row order), then each input pixel's taps gathered from its window (0 outside the
// output).
template <int ACT, int KWC, typename scalar_t, typename acc_t>
GENFAST_SIMD_CLONES void im2col_taps(const scalar_t* dy, const scalar_t* y, acc_t* img, int64_t ldc,
                                     const Geometry& g, int64_t n, int64_t c0, int64_t cw, acc_t* buf, acc_t slope,
                                     acc_t* pp) {
  const FullPlane f = full_plane(g);
  const int64_t FP = f.H * f.W, KK = g.KH * g.KW, L = g.Hout * g.Wout, rs = g.DH * f.W;
  const scalar_t* gn = dy + (n * g.Cout + c0) * L;
  const scalar_t* yn = y + (n * g.Cout + c0) * L;
  for (int64_t c = 0; c < cw; ++c) {
    acc_t* P = buf + c * FP;
    std::fill(P, P + FP, acc_t(0));
    acc_t total = 0;
    for (int64_t oh = 0; oh < g.Hout; ++oh) {
      const scalar_t* gr = gn + c * L + oh * g.Wout;
      const scalar_t* yr = yn + c * L + oh * g.Wout;
      acc_t* d = P + (oh + g.PH) * f.W + g.PW;
      for (int64_t ow = 0; ow < g.Wout; ++ow)
        d[ow] = act_backward_from_output_c<ACT, acc_t>(static_cast<acc_t>(gr[ow]), static_cast<acc_t>(yr[ow]), slope);
      if (pp != nullptr) {
        acc_t r = 0;
        for (int64_t ow = 0; ow < g.Wout; ++ow) r += d[ow];
        total += r;
      }
    }
    if (pp != nullptr) pp[n * g.Cout + c0 + c] = total;
  }
  acc_t* dst = img + c0 * KK;
  for (int64_t ih = 0; ih < g.Hin; ++ih)
    for (int64_t iw = 0; iw < g.Win; ++iw, dst += ldc) {
      const acc_t* P = buf + ih * g.SH * f.W + iw * g.SW;
      for (int64_t c = 0; c < cw; ++c) gather_taps<KWC, acc_t>(dst + c * KK, P + c * FP, g.KH, g.KW, rs, g.DW);
    }
}

// im2col_taps over the g_in.N images of dy, y and cols (tasks (image, run of channels) in
// parallel); pp: g_in.N * C_out per-plane sums of dz, or nullptr.
template <int ACT, typename scalar_t, typename acc_t>
void im2col_grad(const scalar_t* dy, const scalar_t* y, acc_t* cols, const Geometry& g, acc_t slope, acc_t* pp) {
  const int64_t HW = g.Hin * g.Win, KC = g.KH * g.KW * g.Cout;
  const FullPlane f = full_plane(g);
  const int64_t run = tap_run(g, g.N, true), per_n = (g.Cout + run - 1) / run;
  dispatch_kw(g, [&](auto kw) {
    at::parallel_for(0, g.N * per_n, 1, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> buf(run * f.H * f.W);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n = t / per_n, c0 = (t % per_n) * run;
        im2col_taps<ACT, decltype(kw)::value, scalar_t, acc_t>(dy, y, cols + n * HW * KC, KC, g, n, c0,
                                                               std::min(run, g.Cout - c0), buf.data(), slope, pp);
      }
    });
  });
}

// The backward's GEMM form with a thread per image (thread_per_image): each thread gathers its
// images' dz into its own columns (one image's) and runs both products on its own core:
// grad_input's plane block (C_in, H*W) = wt x cols^T, and its partial grad_weight += x's planes
// x cols. The partials are summed in the order of the threads' image ranges (deterministic for a
// thread count). gi: (N, C_in, H, W) or undefined; returns grad_weight (C_in, C_out*KH*KW) or an
// undefined tensor.
template <int ACT, typename scalar_t, typename acc_t>
at::Tensor gemm_backward_threads(const scalar_t* dy, const scalar_t* y, const at::Tensor& xc, const at::Tensor& wt,
                                 const at::Tensor& gi, bool need_weight, const Geometry& g, acc_t slope, acc_t* pp) {
  const int64_t HW = g.Hin * g.Win, KC = wt.size(1);
  const FullPlane f = full_plane(g);
  const int64_t run = tap_run(g, 1, false);
  std::vector<at::Tensor> partial(g.N);  // at each range's first image
  at::parallel_for(0, g.N, 1, [&](int64_t n0, int64_t n1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // per thread: the caller's guard is its own
    at::Tensor cols = scratch(kScratchThread, {HW, KC}, wt.options());
    std::vector<acc_t> d(run * f.H * f.W);
    at::Tensor gw;
    for (int64_t n = n0; n < n1; ++n) {
      dispatch_kw(g, [&](auto kw) {
        for (int64_t c0 = 0; c0 < g.Cout; c0 += run)
          im2col_taps<ACT, decltype(kw)::value, scalar_t, acc_t>(dy, y, cols.data_ptr<acc_t>(), KC, g, n, c0,
                                                                 std::min(run, g.Cout - c0), d.data(), slope, pp);
      });
      if (gi.defined()) {
        at::Tensor plane = gi.select(0, n).view({g.Cin, HW});
        at::mm_out(plane, wt, cols.t());
      }
      if (need_weight) {
        const at::Tensor xn = xc.select(0, n).view({g.Cin, HW});
        if (n == n0) gw = at::mm(xn, cols);
        else gw.addmm_(xn, cols);
      }
    }
    partial[n0] = gw;
  });
  return sum_in_order(partial);
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_impl(const at::Tensor& x, const at::Tensor& w,
                                                        const c10::optional<at::Tensor>& bias, const Geometry& g,
                                                        at::IntArrayRef stride, at::IntArrayRef padding,
                                                        at::IntArrayRef output_padding, at::IntArrayRef dilation,
                                                        int64_t act, double slope_d, bool stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_opts = x.options().dtype(acc_type_of(x.scalar_type()));
  // fmt: the layout the kernels work in (torch's for the product); out_fmt: the output's strides
  // (differing from fmt only where the shape makes the two layouts one memory order)
  const at::MemoryFormat fmt = output_format(x, w);
  const at::MemoryFormat out_fmt = fused_output_format(x, w, g.N, g.Cout, g.Hout, g.Wout, act != kIdentity || stats);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  std::vector<acc_t> bvec(g.Cout, acc_t(0));
  if (bias.has_value() && bias->defined()) {
    at::Tensor bc = bias->contiguous();
    const scalar_t* bp = bc.data_ptr<scalar_t>();
    for (int64_t c = 0; c < g.Cout; ++c) bvec[c] = static_cast<acc_t>(bp[c]);
  }
  at::Tensor y;
  std::vector<Welford<acc_t>> part;
  // float32 k4 s2 p1 / k5 s2 p2 (DCGAN's / the Keras-style layers): Winograd's F(4x4, 2x2) /
  // F(4x4, 3x3) product where it takes the shape
  // (csrc/cpu/conv_transpose_winograd.cpp), then the epilogue in place; undefined where it met a
  // non-finite value, and then the direct forms below run
  at::Tensor wprod;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (g.N > 0 && fmt == at::MemoryFormat::Contiguous && out_fmt == at::MemoryFormat::Contiguous) {
      if (winograd_s2_takes(x, w, g.G, g.KH, g.KW, g.SH, g.SW, g.PH, g.PW, g.DH, g.DW, g.Hout, g.Wout))
        wprod = winograd_conv_transpose_s2(x, w);
      // elsewhere (or after a non-finite Winograd value) our own product over the taps that land
      // in the output, where it takes the shape (csrc/cpu/conv_transpose_taps.cpp)
      if (!wprod.defined() && tap_gemm_takes(x, w, g.G, g.SH, g.SW, g.PH, g.PW, g.DH, g.DW, g.Hout, g.Wout))
        wprod = tap_conv_transpose(x, w, g.SH, g.SW, g.PH, g.PW, g.DH, g.DW, g.Hout, g.Wout);
    }
  }
  if (wprod.defined()) {
    TORCH_CHECK(has_canonical_strides(wprod, out_fmt), "conv_transpose2d: unexpected product strides (Winograd or tap product)");
    y = wprod;
    dispatch_activation(act, [&](auto a) {
      constexpr int A = decltype(a)::value;
      epilogue<A, true, scalar_t, acc_t>(y.data_ptr<acc_t>(), y.data_ptr<scalar_t>(), bvec.data(), g.N, g.Cout,
                                          g.Hout * g.Wout, false, static_cast<acc_t>(slope_d), stats ? &part : nullptr);
    });
  } else if (g.N > 0 && gemm_forward_form(x, g)) {
    // the GEMM product, then col2im + bias + activation (+ statistics) plane by plane
    const at::Tensor xc = x.to(acc_opts.dtype()).contiguous(), wt = w_matrix(w.to(acc_opts.dtype()), g);
    // NCHW planes: written into y directly when that is the output's memory order, else
    // reordered once below (a contiguous input with a channels_last weight)
    const bool nchw_order =
        out_fmt == at::MemoryFormat::Contiguous || one_memory_order(g.N, g.Cout, g.Hout, g.Wout);
    y = at::empty({g.N, g.Cout, g.Hout, g.Wout},
                  x.options().memory_format(nchw_order ? out_fmt : at::MemoryFormat::Contiguous));
    if (stats) part.assign(g.N * g.Cout, welford_init<acc_t>());
    Welford<acc_t>* pp = stats ? part.data() : nullptr;
    dispatch_activation(act, [&](auto a) {
      constexpr int A = decltype(a)::value;
      const acc_t slope = static_cast<acc_t>(slope_d);
      gemm_forward<A, scalar_t, acc_t>(xc, wt, y.data_ptr<scalar_t>(), bvec.data(), g, slope, pp);
    });
    if (!nchw_order) y = y.contiguous(out_fmt);  // (the statistics were taken of the same values)
  } else if (g.N > 0) {
    // the product, without bias, in the accumulation type (a no-op conversion for float / double)
    at::Tensor prod = at::convolution(x.to(acc_opts.dtype()), w.to(acc_opts.dtype()), c10::nullopt, stride, padding,
                                      dilation, /*transposed=*/true, output_padding, g.G);
    TORCH_CHECK(prod.size(2) == g.Hout && prod.size(3) == g.Wout, "conv_transpose2d: unexpected product size");
    if (!prod.is_contiguous(fmt)) prod = prod.contiguous(fmt);
    // float32 / float64: the epilogue runs in place when the product has y's exact strides
    // (y's memory order is the product's: out_fmt differs from fmt only where they are one)
    if (std::is_same_v<scalar_t, acc_t> && has_canonical_strides(prod, out_fmt)) y = prod;
    else y = at::empty({g.N, g.Cout, g.Hout, g.Wout}, x.options().memory_format(out_fmt));
    const bool inplace = prod.data_ptr() == y.data_ptr();
    dispatch_activation(act, [&](auto a) {
      constexpr int A = decltype(a)::value;
      auto run = inplace ? &epilogue<A, true, scalar_t, acc_t> : &epilogue<A, false, scalar_t, acc_t>;
      run(prod.data_ptr<acc_t>(), y.data_ptr<scalar_t>(), bvec.data(), g.N, g.Cout, g.Hout * g.Wout, cl,
          static_cast<acc_t>(slope_d), stats ? &part : nullptr);
    });
  } else {
    y = at::empty({g.N, g.Cout, g.Hout, g.Wout}, x.options().memory_format(out_fmt));
  }
  if (!stats) return {y, at::empty({0}, acc_opts), at::empty({0}, acc_opts)};  // distinct: no aliasing
  // merge the per-task partials of each channel in task order into one (count, mean, M2) row:
  // the (3, P = 1, C) partials that genfast::bn_block_finalize reads
  const int64_t tasks = g.Cout == 0 ? 0 : static_cast<int64_t>(part.size()) / g.Cout;  // per channel, in merge order
  at::Tensor merged = at::empty({3, 1, g.Cout}, x.options().dtype(at::kDouble));
  double* mp = merged.data_ptr<double>();
  for (int64_t c = 0; c < g.Cout; ++c) {
    // float64 with an exact count across tasks: no saturation however many pixels
    Welford<double, int64_t> t = welford_init<double, int64_t>();
    for (int64_t k = 0; k < tasks; ++k) {
      const Welford<acc_t>& p = part[k * g.Cout + c];
      t = welford_merge(t, Welford<double, int64_t>{static_cast<int64_t>(p.count), static_cast<double>(p.mean),
                                                     static_cast<double>(p.m2)});
    }
    mp[c] = static_cast<double>(t.count);
    mp[g.Cout + c] = t.mean;
    mp[2 * g.Cout + c] = t.m2;
  }
  return {y, merged, at::empty({0}, acc_opts)};
}

// Per-channel finalize of the BatchNorm block (ConvTranspose2d -> BatchNorm2d -> activation):
// merges the (3, P, C) (count, mean, M2) partials in row order (float64), returns (mean, invstd,
// scale = weight * invstd, shift = bias - mean * scale) in out_dtype, and updates the
// running statistics in place through their strides (the batch mean plus the preceding layer's
// bias, which was left out of y; the unbiased variance) and num_batches_tracked. An empty batch
// leaves the running statistics unchanged (num_batches_tracked still counts it, as in torch).
template <typename r_t>
void update_running(const at::Tensor& t, const std::vector<double>& value, double mom, const std::vector<bool>& upd) {
  r_t* p = t.data_ptr<r_t>();
  const int64_t s = t.stride(0);
  for (size_t c = 0; c < value.size(); ++c)
    if (upd[c]) p[c * s] = static_cast<r_t>((1.0 - mom) * static_cast<double>(p[c * s]) + mom * value[c]);
}

std::vector<double> as_doubles(const c10::optional<at::Tensor>& t, int64_t C, double fill) {
  std::vector<double> out(C, fill);
  if (!t.has_value() || !t->defined()) return out;
  at::Tensor v = t->to(at::kDouble).contiguous();  // a (C,) parameter: C elements
  const double* p = v.data_ptr<double>();
  std::copy(p, p + C, out.begin());
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_block_finalize_cpu(
    const at::Tensor& partials, const c10::optional<at::Tensor>& conv_bias, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, const c10::optional<at::Tensor>& num_batches_tracked,
    double momentum, bool cumulative, double eps, at::ScalarType out_dtype) {
  TORCH_CHECK(partials.dim() == 3 && partials.size(0) == 3, "bn_block_finalize: partials must be (3, P, C)");
  const int64_t P = partials.size(1), C = partials.size(2);
  at::Tensor part = partials.to(at::kDouble).contiguous();
  const double* pp = part.data_ptr<double>();
  const std::vector<double> cb = as_doubles(conv_bias, C, 0.0), wv = as_doubles(weight, C, 1.0),
                            bv = as_doubles(bias, C, 0.0);
  const auto out_opts = partials.options().dtype(out_dtype);
  at::Tensor mean = at::empty({C}, out_opts), invstd = at::empty({C}, out_opts);
  at::Tensor scale = at::empty({C}, out_opts), shift = at::empty({C}, out_opts);
  std::vector<double> rm_new(C), rv_new(C);
  std::vector<bool> upd(C);
  AT_DISPATCH_FLOATING_TYPES(out_dtype, "bn_block_finalize_cpu", [&] {
    scalar_t *mp = mean.data_ptr<scalar_t>(), *ip = invstd.data_ptr<scalar_t>();
    scalar_t *sp = scale.data_ptr<scalar_t>(), *hp = shift.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      Welford<double> t = welford_init<double>();
      for (int64_t r = 0; r < P; ++r)
        t = welford_merge(t, Welford<double>{pp[r * C + c], pp[(P + r) * C + c], pp[(2 * P + r) * C + c]});
      const double n = static_cast<double>(t.count);
      const double var = n > 0 ? t.m2 / n : 0.0;
      const double is = 1.0 / std::sqrt(var + eps);
      mp[c] = static_cast<scalar_t>(t.mean);
      ip[c] = static_cast<scalar_t>(is);
      sp[c] = static_cast<scalar_t>(wv[c] * is);
      hp[c] = static_cast<scalar_t>(bv[c] - t.mean * wv[c] * is);
      rm_new[c] = t.mean + cb[c];
      rv_new[c] = n > 1 ? t.m2 / (n - 1) : t.m2;
      upd[c] = n > 0;
    }
  });
  if (running_mean.has_value() && running_mean->defined()) {
    double mom = momentum;
    if (cumulative) {
      TORCH_CHECK(num_batches_tracked.has_value() && num_batches_tracked->defined(),
                  "bn_block_finalize: momentum=None needs num_batches_tracked");
      mom = 1.0 / (static_cast<double>(num_batches_tracked->item<int64_t>()) + 1.0);
    }
    for (const at::Tensor* t : {&*running_mean, &*running_var}) {
      const std::vector<double>& v = t == &*running_mean ? rm_new : rv_new;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t->scalar_type(), "bn_block_running", [&] {
        update_running<scalar_t>(*t, v, mom, upd);
      });
    }
  }
  if (num_batches_tracked.has_value() && num_batches_tracked->defined()) {
    int64_t* np = num_batches_tracked->data_ptr<int64_t>();
    *np += 1;
  }
  return {mean, invstd, scale, shift};
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_impl(const at::Tensor& dy_in, const at::Tensor& x,
                                                        const at::Tensor& w, const at::Tensor& y_in, const Geometry& g,
                                                        at::IntArrayRef stride, at::IntArrayRef padding,
                                                        at::IntArrayRef dilation, int64_t act, double slope_d,
                                                        bool need_input, bool need_weight, bool has_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_opts = x.options().dtype(acc_type_of(x.scalar_type()));
  const bool gemm = (need_input || need_weight) && g.N > 0 && gemm_backward(x, g);
  // dy and y in the saved output's layout (a copy only when dy arrives in another one); the
  // GEMM form reads NCHW planes (a channels_last output of a contiguous input, whose weight was
  // channels_last, is copied once)
  const at::MemoryFormat fmt = gemm ? at::MemoryFormat::Contiguous : memory_format_of(y_in);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor dy = dy_in.contiguous(fmt), y = y_in.contiguous(fmt);
  // unrequested results: distinct empty tensors (outputs of an op must not alias each other)
  at::Tensor dx = at::empty({0}, x.options()), dwt = at::empty({0}, x.options()), dbt = at::empty({0}, x.options());
  auto bias_grad = [&](const std::vector<acc_t>& part) {
    dbt = at::empty({g.Cout}, w.options());
    scalar_t* o = dbt.data_ptr<scalar_t>();
    const int64_t tasks = g.Cout == 0 ? 0 : static_cast<int64_t>(part.size()) / g.Cout;
    for (int64_t c = 0; c < g.Cout; ++c) {
      acc_t s = 0;
      for (int64_t k = 0; k < tasks; ++k) s += part[k * g.Cout + c];
      o[c] = static_cast<scalar_t>(s);
    }
  };
  if (gemm) {
    // dz gathered into columns (with the bias gradient), then the two BLAS products: a thread
    // per image, or chunk by chunk of images as the forward
    const at::Tensor xc = x.to(acc_opts.dtype()).contiguous(), wt = w_matrix(w.to(acc_opts.dtype()), g);
    // float32 k4 s2 p1 / k5 s2 p2: grad_input by Winograd from dz (materialised here, with the
    // bias gradient's sums) where the forward's rule takes the shape; the columns then serve
    // grad_weight alone
    bool wino_dx = false;
    if constexpr (std::is_same_v<scalar_t, float>)
      wino_dx = need_input &&
                winograd_s2_takes(x, w, g.G, g.KH, g.KW, g.SH, g.SW, g.PH, g.PW, g.DH, g.DW, g.Hout, g.Wout);
    const bool col_bias = has_bias && !wino_dx;  // the bias gradient's sums taken by im2col
    at::Tensor gi = need_input && !wino_dx ? at::empty({g.N, g.Cin, g.Hin, g.Win}, acc_opts) : at::Tensor();
    at::Tensor gw;
    std::vector<acc_t> part(has_bias ? g.N * g.Cout : 0);
    if (!(need_weight || gi.defined() || col_bias)) {
      // nothing for the columns to do
    } else if (thread_per_image(g, static_cast<int64_t>(sizeof(acc_t)))) {
      dispatch_activation(act, [&](auto a) {
        gw = gemm_backward_threads<decltype(a)::value, scalar_t, acc_t>(
            dy.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), xc, wt, gi, need_weight, g,
            static_cast<acc_t>(slope_d), col_bias ? part.data() : nullptr);
      });
    } else {
      const int64_t HW = g.Hin * g.Win, CL = g.Cout * g.Hout * g.Wout;
      const int64_t nb = chunk_images(g, static_cast<int64_t>(sizeof(acc_t)));
      at::Tensor cols = scratch(kScratchCols, {nb * HW, wt.size(1)}, acc_opts);
      Geometry gc = g;
      for (int64_t n0 = 0; n0 < g.N; n0 += nb) {
        gc.N = std::min(nb, g.N - n0);
        at::Tensor cc = cols.narrow(0, 0, gc.N * HW);
        dispatch_activation(act, [&](auto a) {
          im2col_grad<decltype(a)::value, scalar_t, acc_t>(
              dy.data_ptr<scalar_t>() + n0 * CL, y.data_ptr<scalar_t>() + n0 * CL, cc.data_ptr<acc_t>(), gc,
              static_cast<acc_t>(slope_d), col_bias ? part.data() + n0 * g.Cout : nullptr);
        });
        if (gi.defined()) gi.narrow(0, n0, gc.N).copy_(gemm_grad_input(cc, wt, gc));
        if (need_weight) {
          const at::Tensor xcols = x_cols(xc.narrow(0, n0, gc.N), gc);
          if (n0 == 0) gw = at::mm(xcols, cc);
          else gw.addmm_(xcols, cc);  // chunks summed in batch order (deterministic)
        }
      }
    }
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (wino_dx) {
        const bool dz_is_dy = act == kIdentity;
        at::Tensor dz = dz_is_dy ? dy : at::empty(dy.sizes(), acc_opts);
        if (has_bias || !dz_is_dy) {
          dispatch_activation(act, [&](auto a) {
            grad_pre<decltype(a)::value, scalar_t, acc_t>(
                dy.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), dz_is_dy ? nullptr : dz.data_ptr<acc_t>(), g.N,
                g.Cout, g.Hout * g.Wout, false, static_cast<acc_t>(slope_d), has_bias ? &part : nullptr);
          });
        }
        gi = winograd_conv_transpose_s2_grad_input(dz, w, g.Hin, g.Win);
        if (!gi.defined()) {  // a non-finite value or an outlier: ATen's product (torch's values)
          // the layer's output_padding (0 for k4 p1, 1 for k5 p2), recovered from the sizes
          const int64_t opw[2] = {g.Hout - ((g.Hin - 1) * g.SH - 2 * g.PH + g.DH * (g.KH - 1) + 1),
                                  g.Wout - ((g.Win - 1) * g.SW - 2 * g.PW + g.DW * (g.KW - 1) + 1)};
          gi = std::get<0>(at::convolution_backward(dz, x, w, c10::nullopt, stride, padding, dilation,
                                                    /*transposed=*/true, at::IntArrayRef(opw, 2), g.G,
                                                    {true, false, false}));
        }
      }
    }
    if (has_bias) bias_grad(part);
    if (need_input) dx = canonical(gi.to(x.scalar_type()), output_format(x, w));  // torch's rule: see grad_weight_format
    if (need_weight) {
      dwt = canonical(gw.view({g.Cin, g.Cout, g.KH, g.KW}).to(w.scalar_type()), grad_weight_format(x, w));
    }
    return {dx, dwt, dbt};
  }
  const bool dz_is_dy = std::is_same_v<scalar_t, acc_t> && act == kIdentity;
  at::Tensor dz = dz_is_dy ? dy : at::empty(dy.sizes(), acc_opts.memory_format(fmt));
  std::vector<acc_t> part;
  if (g.N > 0 && (has_bias || !dz_is_dy)) {
    acc_t* dzp = dz_is_dy ? nullptr : dz.data_ptr<acc_t>();
    dispatch_activation(act, [&](auto a) {
      grad_pre<decltype(a)::value, scalar_t, acc_t>(dy.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), dzp, g.N, g.Cout,
                                                    g.Hout * g.Wout, cl, static_cast<acc_t>(slope_d),
                                                    has_bias ? &part : nullptr);
    });
  }
  if (has_bias) bias_grad(part);
  if (need_input || need_weight) {
    // output_padding recovered from the output size (the forward's, validated there)
    const int64_t op[2] = {g.Hout - ((g.Hin - 1) * g.SH - 2 * g.PH + g.DH * (g.KH - 1) + 1),
                           g.Wout - ((g.Win - 1) * g.SW - 2 * g.PW + g.DW * (g.KW - 1) + 1)};
    at::Tensor gi, gw;
    if (g.N > 0) {
      // float32 k5 s2 p2 with more than kPlaneFormMaxCout output channels (the other Winograd
      // layers run the GEMM branch above, which takes it there): grad_input by Winograd where the
      // forward's rule takes the shape; undefined after a non-finite value or an outlier, and
      // then ATen's product gives it with grad_weight
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (need_input &&
            winograd_s2_takes(x, w, g.G, g.KH, g.KW, g.SH, g.SW, g.PH, g.PW, g.DH, g.DW, g.Hout, g.Wout))
          gi = winograd_conv_transpose_s2_grad_input(dz.contiguous(), w, g.Hin, g.Win);
      }
      // float32 where the forward's rule takes the tap product (csrc/cpu/conv_transpose_taps.cpp):
      // grad_input and grad_weight by its products over the same (pixel, tap) pairs
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (((need_input && !gi.defined()) || need_weight) &&
            tap_gemm_takes(x, w, g.G, g.SH, g.SW, g.PH, g.PW, g.DH, g.DW, g.Hout, g.Wout)) {
          const at::Tensor dzc = dz.contiguous();
          if (need_input && !gi.defined())
            gi = tap_conv_transpose_grad_input(dzc, w, g.Hin, g.Win, g.SH, g.SW, g.PH, g.PW, g.DH, g.DW);
          if (need_weight) gw = tap_conv_transpose_grad_weight(x, dzc, g.KH, g.KW, g.SH, g.SW, g.PH, g.PW, g.DH, g.DW);
        }
      }
      const bool aten_input = need_input && !gi.defined(), aten_weight = need_weight && !gw.defined();
      if (aten_input || aten_weight) {
        at::Tensor agi, agw;
        std::tie(agi, agw, std::ignore) = at::convolution_backward(
            dz, x.to(acc_opts.dtype()), w.to(acc_opts.dtype()), c10::nullopt, stride, padding, dilation,
            /*transposed=*/true, at::IntArrayRef(op, 2), g.G, {aten_input, aten_weight, false});
        if (aten_input) gi = agi;
        if (aten_weight) gw = agw;
      }
    } else {
      if (need_input) gi = at::empty(x.sizes(), acc_opts);
      if (need_weight) gw = at::zeros(w.sizes(), acc_opts);
    }
    if (need_input) dx = canonical(gi.to(x.scalar_type()), output_format(x, w));  // torch's rule: see grad_weight_format
    if (need_weight) dwt = canonical(gw.to(w.scalar_type()), grad_weight_format(x, w));
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
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // ATen's products record no graph
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "conv_transpose2d_fwd_cpu", [&] {
    out = fwd_impl<scalar_t>(input, weight, bias, g, stride, padding, output_padding, dilation, activation,
                             negative_slope, stats);
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
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // ATen's products record no graph
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "conv_transpose2d_bwd_cpu", [&] {
    out = bwd_impl<scalar_t>(grad_out, input, weight, output, g, stride, padding, dilation, activation, negative_slope,
                             need_input, need_weight, has_bias);
  });
  return out;
}

}  // namespace

// For genfast::conv_transpose2d_act (csrc/conv_transpose_autograd.cpp), on arguments it has
// validated: whether they take the GEMM form's forward; its eager CPU calls run torch's own
// product elsewhere.
bool conv_transpose_gemm_form(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef output_padding, int64_t groups,
                              at::IntArrayRef dilation) {
  return gemm_forward_form(x, geometry(x, w, stride, padding, output_padding, groups, dilation, -1, -1));
}

bool conv_transpose_gemm_backward(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef output_padding, int64_t groups,
                                  at::IntArrayRef dilation) {
  return gemm_backward(x, geometry(x, w, stride, padding, output_padding, groups, dilation, -1, -1));
}

void set_cpu_row_gemm(const std::string& mode) {
  TORCH_CHECK_VALUE(mode == "auto" || mode == "always" || mode == "never" || mode == "images_inner",
                    "set_cpu_row_gemm: mode must be 'auto', 'always', 'never' or 'images_inner', got '", mode,
                    "'");
  g_row_gemm_mode.store(mode == "auto" ? 0 : (mode == "always" ? 1 : (mode == "never" ? 2 : 3)),
                        std::memory_order_relaxed);
}

std::string cpu_row_gemm() {
  static const char* const names[] = {"auto", "always", "never", "images_inner"};
  return names[g_row_gemm_mode.load(std::memory_order_relaxed)];
}

// Whether the row layout can run at all: "never" turns it off; "auto" takes it by shape
// (row_gemm_auto).
bool cpu_row_gemm_active() { return g_row_gemm_mode.load(std::memory_order_relaxed) != 2; }

// For genfast::conv2d_act's backward (csrc/conv_act_autograd.cpp): whether grad_input, the
// transposed convolution of dz (x here) by the convolution's weight, runs the GEMM form. Only
// where it measured faster than ATen's convolution backward, interleaved on the CI CPU: the
// plane layout (a convolution of up to kPlaneFormMaxCout input channels: 3-9x for the first
// layers of the DCGAN, Keras and VAE discriminators), a thread per image (DCGAN 16x16 -> 32x32
// k4 s2: 1.0-1.8x, ATen's time there being bimodal) and inputs of up to 16 pixels (DCGAN 4x4 ->
// 8x8: 1.4-1.5x), measured on the AVX-512 CPU; over chunks of the batch the earlier row layout
// tied or lost by up to 25% there (Keras k5 s2, which row_gemm_auto leaves to ATen). The row
// layout follows row_gemm_forward.
bool conv2d_grad_input_gemm(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef output_padding, at::IntArrayRef dilation) {
  const Geometry g = geometry(x, w, stride, padding, output_padding, 1, dilation, -1, -1);
  // not the images-inner layout: at the Keras / DCGAN discriminators' k5 s2 Conv2d layers it
  // measured a tie with ATen's product in this backward (0.97-1.01x, interleaved); the Winograd
  // product where it takes the shape (the forward then runs it)
  return gemm_eligible(x, g) &&
         (g.Cout <= kPlaneFormMaxCout || row_gemm_forward(g) ||
          winograd_s2_takes(x, w, 1, g.KH, g.KW, g.SH, g.SW, g.PH, g.PW, g.DH, g.DW, g.Hout, g.Wout));
}

// For genfast::conv2d_act's backward (csrc/conv_act_autograd.cpp): grad_weight and grad_bias of
// a convolution with few input channels (up to kGradWeightMaxCin, groups 1: the first layers of
// the DCGAN, Keras and VAE discriminators), image by image in one pass each:
//   dz_n = dy_n * act'(y_n) (and its per-channel sums, grad_bias's part) into a per-thread
//   buffer, or into dz_out when grad_input needs dz afterwards;
//   cols_n (C_in*KH*KW, H_out*W_out) = the image's taps, gathered by our im2col (0 outside x);
//   grad_weight (C_out, C_in*KH*KW) += dz_n (C_out, H_out*W_out) x cols_n^T (one BLAS product).
// Each thread runs its range of images on its own core into its own partials, summed in range
// order afterwards (deterministic for a thread count). Without grad_input no dz tensor is made
// at all. Measured interleaved on the 2-core CI CPU against torch's leaky_relu backward + ATen's
// (oneDNN's) weight gradient, whose product ran at a few GFLOP/s for one input channel: see
// conv2d_grad_weight_gemm_ok.
constexpr int64_t kGradWeightMaxCin = 4;

bool conv2d_grad_weight_gemm_ok(const at::Tensor& x, const at::Tensor& w, int64_t groups) {
  return groups == 1 && x.dim() == 4 && w.dim() == 4 && x.size(1) <= kGradWeightMaxCin && x.size(0) > 0 &&
         x.numel() > 0 && w.numel() > 0 && x.is_contiguous() && w.is_contiguous() &&
         (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) && w.scalar_type() == x.scalar_type();
}

namespace {
// cols (C_in*KH*KW, H_out*W_out) of one image x (C_in, H, W) of a convolution (Geometry's "in"
// is the convolution's input, "out" its output)
template <typename scalar_t>
void conv_im2col_image(const scalar_t* x, scalar_t* cols, const Geometry& g) {
  const int64_t L = g.Hout * g.Wout;
  for (int64_t ci = 0; ci < g.Cin; ++ci)
    for (int64_t kh = 0; kh < g.KH; ++kh)
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        scalar_t* row = cols + ((ci * g.KH + kh) * g.KW + kw) * L;
        const scalar_t* plane = x + ci * g.Hin * g.Win;
        for (int64_t oh = 0; oh < g.Hout; ++oh) {
          scalar_t* r = row + oh * g.Wout;
          const int64_t ih = oh * g.SH - g.PH + kh * g.DH;
          if (ih < 0 || ih >= g.Hin) {
            std::fill(r, r + g.Wout, scalar_t(0));
            continue;
          }
          const scalar_t* xr = plane + ih * g.Win;
          for (int64_t ow = 0; ow < g.Wout; ++ow) {
            const int64_t iw = ow * g.SW - g.PW + kw * g.DW;
            r[ow] = (iw >= 0 && iw < g.Win) ? xr[iw] : scalar_t(0);
          }
        }
      }
}

// dz = dy * act'(y) over one image's C planes of L values (skipped for the identity: dz is dy),
// with each plane's sum added to bsum[c] (when bsum is not nullptr); returns whether every sum
// is finite (false for any NaN or inf in dz, and for a sum that overflows)
template <int ACT, typename scalar_t>
GENFAST_SIMD_CLONES bool conv_dz_image(const scalar_t* dy, const scalar_t* y, scalar_t* dz, int64_t C, int64_t L,
                                       scalar_t slope, scalar_t* bsum) {
  bool finite = true;
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* o = dy + c * L;
    if constexpr (ACT != kIdentity) {
      const scalar_t* d = dy + c * L;
      const scalar_t* yy = y + c * L;
      scalar_t* oc = dz + c * L;
      for (int64_t i = 0; i < L; ++i) oc[i] = act_backward_from_output_c<ACT, scalar_t>(d[i], yy[i], slope);
      o = oc;
    }
    const scalar_t t = lane_sum<false, scalar_t>(o, L, scalar_t(0));
    finite = finite && std::isfinite(t);
    if (bsum != nullptr) bsum[c] += t;
  }
  return finite;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> conv2d_weight_backward(const at::Tensor& dy, const at::Tensor& y, int64_t act,
                                                          double slope, const at::Tensor& x, const at::Tensor& w,
                                                          at::IntArrayRef stride, at::IntArrayRef padding,
                                                          at::IntArrayRef dilation, bool need_bias,
                                                          const at::Tensor& dz_out) {
  Geometry g{};
  g.N = x.size(0);
  g.Cin = x.size(1);
  g.Hin = x.size(2);
  g.Win = x.size(3);
  g.Cout = w.size(0);
  g.KH = w.size(2);
  g.KW = w.size(3);
  g.Hout = dy.size(2);
  g.Wout = dy.size(3);
  g.SH = stride[0];
  g.SW = stride[1];
  g.PH = padding[0];
  g.PW = padding[1];
  g.DH = dilation[0];
  g.DW = dilation[1];
  const int64_t K = g.Cin * g.KH * g.KW, L = g.Hout * g.Wout, CL = g.Cout * L;
  std::vector<at::Tensor> partial(g.N);  // grad_weight, at each range's first image
  std::vector<at::Tensor> bpart(g.N);    // grad_bias, likewise
  std::atomic<bool> nonfinite{false};    // a float32 image's dz held NaN or inf
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_weight_backward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    const scalar_t* yp = act == kIdentity ? nullptr : y.data_ptr<scalar_t>();
    scalar_t* dzp = dz_out.defined() ? dz_out.data_ptr<scalar_t>() : nullptr;
    dispatch_activation(act, [&](auto a) {
      constexpr int A = decltype(a)::value;
      at::parallel_for(0, g.N, 1, [&](int64_t n0, int64_t n1) {
        at::AutoDispatchBelowADInplaceOrView below_autograd;  // per thread: the caller's guard is its own
        at::Tensor cols = at::empty({K, L}, x.options());
        at::Tensor dzbuf = (A != kIdentity && dzp == nullptr) ? at::empty({g.Cout, L}, x.options()) : at::Tensor();
        at::Tensor bsum_t = need_bias ? at::zeros({g.Cout}, w.options()) : at::Tensor();
        scalar_t* bsum = need_bias ? bsum_t.data_ptr<scalar_t>() : nullptr;
        at::Tensor gw;
        for (int64_t n = n0; n < n1; ++n) {
          const scalar_t* dzn = dyp + n * CL;  // the identity: dz is dy
          scalar_t* o = nullptr;
          if constexpr (A != kIdentity) {
            o = dzp != nullptr ? dzp + n * CL : dzbuf.data_ptr<scalar_t>();
            dzn = o;
          }
          const bool finite = conv_dz_image<A, scalar_t>(dyp + n * CL, yp != nullptr ? yp + n * CL : nullptr, o, g.Cout,
                                                         L, static_cast<scalar_t>(slope),
                                                         bsum);
          const scalar_t* xn = xp + n * g.Cin * g.Hin * g.Win;
          if constexpr (std::is_same_v<scalar_t, float>) {
            // rare: torch's float32 (oneDNN) products place NaN by their own blocking, which
            // depends on the shape (they skip the padding at some shapes and not at others), so
            // once any image's dz is not finite grad_weight is left to that product (the
            // caller); dz and the bias sums go on
            if (!finite) nonfinite.store(true, std::memory_order_relaxed);
            if (nonfinite.load(std::memory_order_relaxed)) continue;
          }
          conv_im2col_image<scalar_t>(xn, cols.data_ptr<scalar_t>(), g);
          const at::Tensor dzt = at::from_blob(const_cast<scalar_t*>(dzn), {g.Cout, L}, x.options());
          if (!gw.defined()) gw = at::mm(dzt, cols.t());
          else gw.addmm_(dzt, cols.t());
        }
        partial[n0] = gw;
        bpart[n0] = bsum_t;
      });
    });
  });
  const at::Tensor db = sum_in_order(bpart);
  if (nonfinite.load()) return {at::Tensor(), db};
  return {sum_in_order(partial).view(w.sizes()), db};
}

// For genfast::linear_act's backward (csrc/conv_act_autograd.cpp), on a dense (M, C) row-major
// product of float32 / float64 that the caller has validated: dz = dy * act'(y) with grad_bias =
// the column sums of dz in one pass (blocks of kPixelBlock rows, summed in block order:
// deterministic).
std::tuple<at::Tensor, at::Tensor> rows_grad_pre(const at::Tensor& dy, const at::Tensor& y, int64_t act, double slope,
                                                 bool need_bias) {
  const int64_t M = dy.size(0), C = dy.size(1);
  at::Tensor dz = act == kIdentity ? dy : at::empty({M, C}, dy.options());
  at::Tensor db;
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "rows_grad_pre", [&] {
    std::vector<scalar_t> part;
    dispatch_activation(act, [&](auto a) {
      grad_pre<decltype(a)::value, scalar_t, scalar_t>(dy.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                                       act == kIdentity ? nullptr : dz.data_ptr<scalar_t>(), M, C, 1,
                                                       true, static_cast<scalar_t>(slope),
                                                       need_bias ? &part : nullptr);
    });
    if (!need_bias) return;
    db = at::empty({C}, dy.options());
    scalar_t* o = db.data_ptr<scalar_t>();
    const int64_t blocks = C == 0 ? 0 : static_cast<int64_t>(part.size()) / C;
    for (int64_t c = 0; c < C; ++c) {
      scalar_t t = 0;
      for (int64_t k = 0; k < blocks; ++k) t += part[k * C + c];
      o[c] = t;
    }
  });
  return {dz, db};
}

// One block of rows_from_transposed: columns [c0, c1) of rows [m0, m1) of y (pt's rows ld
// apart). The activation runs along pt's rows (contiguous: it vectorises, tanh / sigmoid
// included) into tmp, whose columns are then written as y's rows: float32 in 8 x 8 register
// transposes (transpose_tmp_avx, on CPUs with AVX2), else element by element, a strided read per
// element (with the register transposes the Linear layer's forward measured 20-60 us faster at
// 64 rows and 256-1024 features on the CI CPU, 2-5% of it).
constexpr int64_t kTransposeC = 16, kTransposeM = 64;

#if GENFAST_X86_INTRINSICS
namespace {
// y[m * C + c] = tmp[c * kTransposeM + m] for m < tm, c < tc: full 8 x 8 blocks in registers
// (unpack pairs of rows, shuffle pairs of pairs, swap 128-bit halves), the edges element by
// element.
__attribute__((target("avx"))) void transpose_tmp_avx(const float* tmp, int64_t tm, int64_t tc, float* y,
                                                      int64_t C) {
  const int64_t m8 = tm - tm % 8, c8 = tc - tc % 8;
  for (int64_t c = 0; c < c8; c += 8) {
    const float* s = tmp + c * kTransposeM;
    for (int64_t m = 0; m < m8; m += 8) {
      __m256 r[8], t[8], u[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(s + i * kTransposeM + m);
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);      // (a_i0 a_j0 a_i1 a_j1 | a_i4 a_j4 a_i5 a_j5)
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // (a_i2 a_j2 a_i3 a_j3 | a_i6 ...)
      }
      for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);      // columns 0 | 4 of rows i..i+3
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);  // columns 1 | 5
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);  // columns 2 | 6
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);  // columns 3 | 7
      }
      float* d = y + m * C + c;
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(d + i * C, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
        _mm256_storeu_ps(d + (i + 4) * C, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
      }
    }
  }
  for (int64_t m = 0; m < tm; ++m) {
    const int64_t cs = m < m8 ? c8 : 0;  // rows below m8 have their first c8 columns done
    for (int64_t c = cs; c < tc; ++c) y[m * C + c] = tmp[c * kTransposeM + m];
  }
}
}  // namespace
#define GENFAST_TRANSPOSE_AVX 1
#else
#define GENFAST_TRANSPOSE_AVX 0
#endif

template <int ACT, typename T>
GENFAST_SIMD_CLONES void transpose_act_block(const T* pt, int64_t ld, const T* bias, T* y, int64_t C, int64_t c0,
                                             int64_t c1, int64_t m0, int64_t m1, T slope, T* tmp) {
  const int64_t tm = m1 - m0;
  for (int64_t c = c0; c < c1; ++c) {
    const T b = bias != nullptr ? bias[c] : T(0);
    const T* src = pt + c * ld + m0;
    T* t = tmp + (c - c0) * kTransposeM;
    for (int64_t m = 0; m < tm; ++m) t[m] = act_out<ACT, T>(src[m] + b, slope);
  }
  const int64_t tc = c1 - c0;
#if GENFAST_TRANSPOSE_AVX
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_avx2_fma()) {  // AVX2 CPUs have the AVX that this needs
      transpose_tmp_avx(tmp, tm, tc, y + m0 * C + c0, C);
      return;
    }
  }
#endif
  for (int64_t m = 0; m < tm; ++m) {
    T* yr = y + (m0 + m) * C + c0;
    for (int64_t c = 0; c < tc; ++c) yr[c] = tmp[c * kTransposeM + m];
  }
}

// The Linear layer's forward epilogue (csrc/conv_act_autograd.cpp) on float32 / float64 that the
// caller has validated: y (M, C) = act(pt^T + bias) from the product pt (C, M) = w x^T, the
// orientation in which the BLAS product of MLP layers measured fastest (see linear_product).
// One pass: pt read once, y written once, in blocks of kTransposeC x kTransposeM (L1).
at::Tensor rows_from_transposed(const at::Tensor& pt, const c10::optional<at::Tensor>& bias, int64_t act,
                                double slope) {
  TORCH_INTERNAL_ASSERT(pt.stride(1) == 1 && pt.stride(0) >= pt.size(1),
                        "rows_from_transposed: pt's rows must be dense");
  const int64_t C = pt.size(0), M = pt.size(1), ld = pt.stride(0);
  at::Tensor y = at::empty({M, C}, pt.options());
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const int64_t cblocks = (C + kTransposeC - 1) / kTransposeC;
  // at least 16K values per task: smaller layers run on one thread
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, kTransposeC * M));
  AT_DISPATCH_FLOATING_TYPES(pt.scalar_type(), "rows_from_transposed", [&] {
    const scalar_t* pp = pt.data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    dispatch_activation(act, [&](auto a) {
      constexpr int A = decltype(a)::value;
      at::parallel_for(0, cblocks, grain, [&](int64_t k0, int64_t k1) {
        scalar_t tmp[kTransposeC * kTransposeM];
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t c0 = k * kTransposeC, c1 = std::min(C, c0 + kTransposeC);
          for (int64_t m0 = 0; m0 < M; m0 += kTransposeM)
            transpose_act_block<A, scalar_t>(pp, ld, bp, yp, C, c0, c1, m0, std::min(M, m0 + kTransposeM),
                                             static_cast<scalar_t>(slope), tmp);
        }
      });
    });
  });
  return y;
}

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("conv_transpose2d_fwd", &conv_transpose2d_fwd_cpu);
  m.impl("conv_transpose2d_bwd", &conv_transpose2d_bwd_cpu);
  m.impl("bn_block_finalize", &bn_block_finalize_cpu);
}

}  // namespace genfast
