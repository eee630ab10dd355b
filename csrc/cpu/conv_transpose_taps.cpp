// The CPU transposed convolution's product by our own AVX2 GEMM over the taps that land inside
// the output ("the tap product").
//
// Why: at the small maps of a generator's first layers the product that torch (oneDNN) and our
// GEMM form (MKL's sgemm, then col2im) compute includes every (input pixel, kernel tap) pair,
// also those whose output position falls outside the cropped output: with padding 1 a k4 s2
// layer from 4x4 computes 16 taps per pixel where the edge pixels use 12 or 9, so only 76.6% of
// the DCGAN 512 -> 256, 4x4 -> 8x8 layer's multiply-adds reach the output (k5 s2 p2 from 7x7,
// the Keras 128 -> 64 layer: 83.5%). On the CI CPU (AMD EPYC, AVX2, 2 cores) both of torch's
// products ran at 75-78% of the cores' FMA peak (measured: 39 GFLOP/s per core with a
// register-only FMA loop, MKL's 2048^3 sgemm 61 GFLOP/s on two), so no reordering of the full
// product could beat torch by more than a few percent there; skipping the outside taps can.
// BLAS cannot skip them (a tap's weights are a strided set of the weight's columns, and the
// skipped pairs are per pixel and tap), so the product is ours:
//   Z[n, oh, ow, co] = sum over (ih, iw, ky, kx) with oh = ih*SH - PH + ky*DH in [0, Hout) (and
//                      the same for ow) of  sum_ci x[n, ci, ih, iw] * w[ci, co, ky, kx]
// as one GEMM per tap t = (ky, kx): rows = input pixels (ih, iw, n) (the images innermost, so
// that a tile of 4 rows holds one pixel's images at even batch sizes, and every row of a tile
// skips the same taps), columns = 16 output channels of that tap, depth = C_in. The 4 x 16
// register tile (8 AVX2 accumulators; it measured at 97% of a core's FMA peak, as fast as 6 x 16
// on this CPU) is computed only when one of its rows lands inside the output, and its rows are
// added straight into Z at their output positions (no column buffer: the col2im is the tile's
// store). Z is (N, Hout, Wout, C_out rounded up to 16) float32, so that every tile store is
// whole; the channels past C_out are never read.
// Threads split the output channels (blocks of 16): each owns its channels of Z, so the adds
// need no atomics, and each output value receives its terms in a fixed order (C_in blocks, then
// taps, then pixels) whatever the number of threads: deterministic, and equal across thread
// counts. Per channel block and C_in block, the block's weights of every tap are packed once
// (tap-major, 16 channels per row: within 256 KB, so that they stay in L2 while the pixels go
// by in blocks within 128 KB of packed input).
// Passes: packs x once (reads x, writes it in 4-row tiles), reads w once, adds into Z (in cache
// for the layers it takes), then one pass writes the NCHW output from Z (the caller's epilogue
// adds the bias and activation, and the statistics of a following BatchNorm, in place).
// The backward (where the GEMM form's backward does not run: the k5 s2 layers) sums over the
// same pairs with the same register tile, each tile summed in registers over several strided
// runs of depth (tile_sum):
//   grad_input: rows = 4 images at one input pixel, columns = 16 input channels, depth = the
//     pixel's landing taps x C_out, read from dz reordered as (output pixel, C_out, images);
//   grad_weight: rows = 4 input channels, columns = 16 output channels, one tap per task, depth
//     = the tap's landing pixels x images: per input row, one run of pixels in x (reordered as
//     4-channel tiles) and one run of entries in one stride phase of dz (reordered by phase, as
//     16-channel blocks), which consecutive input pixels meet at consecutive entries.
// Non-finite values: each output value is the direct sum of its own terms, so an inf or NaN
// reaches exactly the outputs it does in torch's direct product; zero padding (past the last
// pixel tile or the last channel) only meets values that are discarded. In the gradients it
// reaches exactly what it does in torch's float32 CPU product (oneDNN skips the same pairs);
// torch's float64 product multiplies the zeros it puts outside the output, so an inf there
// also gives NaN in grad_weight's taps that do not land.
// Measured interleaved on the CI CPU against F.conv_transpose2d + the activation (batch 8,
// benchmarks/bench_conv_transpose.py and single-op runs): forward, the DCGAN 512 -> 256 4x4 ->
// 8x8 layer 1.37-1.55x (ATen's and our MKL GEMM form: 1.0x), 8x8 -> 16x16 256 -> 128 1.12-1.17x
// (GEMM form 0.91-0.93x), the Keras 128 -> 64 7x7 -> 14x14 k5 s2 layer 1.10-1.18x (ATen's:
// 0.92-0.98x); backward of the Keras layer, grad_weight 1.17-1.33x ATen's and grad_input
// 0.98-1.07x, forward + backward 1.08x. Where over 90% of the pairs land (16x16 -> 32x32 k4 s2:
// 93.8%; 14x14 -> 28x28 k5 s2: 91.6%) it tied or lost (0.89-0.99x), so "auto" takes the shapes
// where at most kAutoMaxUseful of the pairs land. Not on AVX-512 CPUs under "auto" (MKL's
// AVX-512 kernels there ran at 200-260 GFLOP/s, beyond an AVX2 kernel's reach), nor with fewer
// 16-channel blocks than threads.
#include "conv_transpose_taps.h"

#include <ATen/Parallel.h>

#include "../common/cpu_features.h"
#include "../common/kernel_mode.h"

#include <algorithm>
#include <atomic>
#include <utility>
#include <vector>

#if GENFAST_X86_INTRINSICS
#include <immintrin.h>
#define GENFAST_TAPS_TARGET __attribute__((target("avx2,fma")))
#endif

namespace genfast {
namespace {

constexpr int64_t kMR = 4;                            // pixel rows per register tile
constexpr int64_t kNR = 16;                           // output channels per register tile (two AVX2 vectors)
constexpr int64_t kBPanelBytes = int64_t(1) << 18;    // one channel block's packed weights, all taps
constexpr int64_t kABlockBytes = int64_t(1) << 17;    // packed input rows per pass over the taps
constexpr double kAutoMaxUseful = 0.9;                // "auto": at most this fraction of the pairs lands

KernelMode g_mode;
std::atomic<int64_t> g_products{0};


#if GENFAST_X86_INTRINSICS
// p[0..16) += (v0, v1), unless p is nullptr
GENFAST_TAPS_TARGET inline __attribute__((always_inline)) void add_row(float* p, __m256 v0, __m256 v1) {
  if (p == nullptr) return;
  _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), v0));
  _mm256_storeu_ps(p + 8, _mm256_add_ps(_mm256_loadu_ps(p + 8), v1));
}

// dst[r][0..16) += sum_k A[k*kMR + r] * B[k*kNR + 0..16) for the rows r with dst[r] != nullptr
// (A: a tile of packed input, B: one tap's packed weights for 16 channels)
GENFAST_TAPS_TARGET inline __attribute__((always_inline)) void tile_4x16(int64_t kc, const float* A, const float* B,
                                                                          float* const* dst) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(B), b1 = _mm256_loadu_ps(B + 8);
    __m256 a = _mm256_broadcast_ss(A);
    c00 = _mm256_fmadd_ps(a, b0, c00);
    c01 = _mm256_fmadd_ps(a, b1, c01);
    a = _mm256_broadcast_ss(A + 1);
    c10 = _mm256_fmadd_ps(a, b0, c10);
    c11 = _mm256_fmadd_ps(a, b1, c11);
    a = _mm256_broadcast_ss(A + 2);
    c20 = _mm256_fmadd_ps(a, b0, c20);
    c21 = _mm256_fmadd_ps(a, b1, c21);
    a = _mm256_broadcast_ss(A + 3);
    c30 = _mm256_fmadd_ps(a, b0, c30);
    c31 = _mm256_fmadd_ps(a, b1, c31);
    A += kMR;
    B += kNR;
  }
  add_row(dst[0], c00, c01);
  add_row(dst[1], c10, c11);
  add_row(dst[2], c20, c21);
  add_row(dst[3], c30, c31);
}

// out[r * kNR + j] = sum over segments s < nseg and k < kc of A[s][k * lda + r] * B[s][k * ldb + j]
// (a 4 x 16 tile summed over several strided blocks of depth, in registers; out: 64 floats).
// Its loop repeats tile_4x16's on purpose: one helper over a struct of the 8 accumulators,
// shared by both, ran the backward's products 1.5x slower (measured; the accumulators left the
// registers).
GENFAST_TAPS_TARGET void tile_sum(int64_t nseg, const float* const* As, const float* const* Bs, int64_t kc,
                                  int64_t lda, int64_t ldb, float* out) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  for (int64_t sg = 0; sg < nseg; ++sg) {
    const float* A = As[sg];
    const float* B = Bs[sg];
    for (int64_t k = 0; k < kc; ++k) {
      const __m256 b0 = _mm256_loadu_ps(B), b1 = _mm256_loadu_ps(B + 8);
      __m256 a = _mm256_broadcast_ss(A);
      c00 = _mm256_fmadd_ps(a, b0, c00);
      c01 = _mm256_fmadd_ps(a, b1, c01);
      a = _mm256_broadcast_ss(A + 1);
      c10 = _mm256_fmadd_ps(a, b0, c10);
      c11 = _mm256_fmadd_ps(a, b1, c11);
      a = _mm256_broadcast_ss(A + 2);
      c20 = _mm256_fmadd_ps(a, b0, c20);
      c21 = _mm256_fmadd_ps(a, b1, c21);
      a = _mm256_broadcast_ss(A + 3);
      c30 = _mm256_fmadd_ps(a, b0, c30);
      c31 = _mm256_fmadd_ps(a, b1, c31);
      A += lda;
      B += ldb;
    }
  }
  _mm256_storeu_ps(out, c00);
  _mm256_storeu_ps(out + 8, c01);
  _mm256_storeu_ps(out + 16, c10);
  _mm256_storeu_ps(out + 24, c11);
  _mm256_storeu_ps(out + 32, c20);
  _mm256_storeu_ps(out + 40, c21);
  _mm256_storeu_ps(out + 48, c30);
  _mm256_storeu_ps(out + 56, c31);
}

// For taps [0, T) and pixel tiles [mt0, mt1): the tiles with a row inside the output, added
// into Z (already offset to the channel block); off[m * T + t]: row m's Z offset for tap t, or -1
GENFAST_TAPS_TARGET void run_tiles(int64_t T, int64_t mt0, int64_t mt1, int64_t kc, const int64_t* off,
                                   const float* A, int64_t lda_tile, const float* Bp, float* Z) {
  float* dst[kMR];
  for (int64_t t = 0; t < T; ++t) {
    const float* B = Bp + t * kc * kNR;
    for (int64_t mt = mt0; mt < mt1; ++mt) {
      bool any = false;
      for (int64_t r = 0; r < kMR; ++r) {
        const int64_t o = off[(mt * kMR + r) * T + t];
        dst[r] = o >= 0 ? Z + o : nullptr;
        any = any || o >= 0;
      }
      if (any) tile_4x16(kc, A + mt * lda_tile, B, dst);
    }
  }
}
#endif

// Along one axis: the fraction of (input position, tap) pairs whose output position lies in
// [0, out)
double landing_fraction(int64_t in, int64_t K, int64_t S, int64_t P, int64_t D, int64_t out) {
  int64_t inside = 0;
  for (int64_t i = 0; i < in; ++i)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t o = i * S - P + k * D;
      inside += o >= 0 && o < out;
    }
  return double(inside) / double(std::max<int64_t>(1, in * K));
}

}  // namespace

bool tap_gemm_takes(const at::Tensor& x, const at::Tensor& w, int64_t groups, int64_t SH, int64_t SW, int64_t PH,
                    int64_t PW, int64_t DH, int64_t DW, int64_t Hout, int64_t Wout) {
  const int mode = g_mode.get();
  if (mode == KernelMode::kNever || !cpu_avx2_fma()) return false;
  if (x.scalar_type() != at::kFloat || w.scalar_type() != at::kFloat || x.dim() != 4 || w.dim() != 4) return false;
  if (groups != 1 || !x.is_contiguous() || !w.is_contiguous() || x.numel() == 0 || w.numel() == 0) return false;
  if (Hout <= 0 || Wout <= 0 || SH < 1 || SW < 1 || DH < 1 || DW < 1 || PH < 0 || PW < 0) return false;
  if (mode == KernelMode::kAlways) return true;
  // auto: an AVX2 CPU without AVX-512, at most kAutoMaxUseful of the (pixel, tap) pairs landing
  // in the output, and a channel block for each thread
  if (cpu_avx512() || (w.size(1) + kNR - 1) / kNR < std::max<int64_t>(2, at::get_num_threads())) return false;
  return landing_fraction(x.size(2), w.size(2), SH, PH, DH, Hout) * landing_fraction(x.size(3), w.size(3), SW, PW, DW, Wout) <=
         kAutoMaxUseful;
}

at::Tensor tap_conv_transpose(const at::Tensor& x, const at::Tensor& w, int64_t SH, int64_t SW, int64_t PH,
                              int64_t PW, int64_t DH, int64_t DW, int64_t Hout, int64_t Wout) {
#if GENFAST_X86_INTRINSICS
  TORCH_CHECK(cpu_avx2_fma(), "conv_transpose2d: the tap product needs AVX2 and FMA");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const int64_t N = xc.size(0), Cin = xc.size(1), H = xc.size(2), W = xc.size(3);
  const int64_t Cout = wc.size(1), KH = wc.size(2), KW = wc.size(3), T = KH * KW;
  const int64_t M = N * H * W, MT = (M + kMR - 1) / kMR, CB = (Cout + kNR - 1) / kNR, Cp = CB * kNR;
  const int64_t HWo = Hout * Wout, HWi = H * W;
  // depth per packed block: all taps' weights of one channel block within kBPanelBytes
  const int64_t KC = std::min(Cin, std::max<int64_t>(8, kBPanelBytes / (T * kNR * 4) / 8 * 8));
  const int64_t MCT = std::max<int64_t>(1, kABlockBytes / (KC * kMR * 4));  // pixel tiles per block

  // the input, row m = (ih * W + iw) * N + n, in tiles of kMR rows: A[(mt * Cin + k) * kMR + r]
  // (zeros past the last row)
  std::vector<float> A(static_cast<size_t>(MT * Cin * kMR), 0.f);
  const float* xp = xc.data_ptr<float>();
  at::parallel_for(0, MT, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t mt = t0; mt < t1; ++mt)
      for (int64_t r = 0; r < kMR; ++r) {
        const int64_t m = mt * kMR + r;
        if (m >= M) break;
        const int64_t n = m % N, pix = m / N;
        const float* src = xp + n * Cin * HWi + pix;
        float* d = A.data() + mt * Cin * kMR + r;
        for (int64_t k = 0; k < Cin; ++k) d[k * kMR] = src[k * HWi];
      }
  });
  // each row's Z offset per tap, or -1 where the tap lands outside the output (and past M)
  std::vector<int64_t> off(static_cast<size_t>(MT * kMR * T), -1);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t n = m % N, pix = m / N, ih = pix / W, iw = pix % W;
    for (int64_t ky = 0; ky < KH; ++ky) {
      const int64_t oh = ih * SH - PH + ky * DH;
      if (oh < 0 || oh >= Hout) continue;
      for (int64_t kx = 0; kx < KW; ++kx) {
        const int64_t ow = iw * SW - PW + kx * DW;
        if (ow < 0 || ow >= Wout) continue;
        off[m * T + ky * KW + kx] = ((n * Hout + oh) * Wout + ow) * Cp;
      }
    }
  }
  at::Tensor Zt = at::zeros({N * HWo * Cp}, xc.options());
  float* Z = Zt.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  at::parallel_for(0, CB, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> Bp(static_cast<size_t>(T * KC * kNR));
    for (int64_t cb = b0; cb < b1; ++cb) {
      const int64_t nr = std::min(kNR, Cout - cb * kNR);
      for (int64_t k0 = 0; k0 < Cin; k0 += KC) {
        const int64_t kc = std::min(KC, Cin - k0);
        // Bp[(t * kc + k) * kNR + j] = w[k0 + k, cb * kNR + j, t] (zeros past C_out)
        for (int64_t t = 0; t < T; ++t)
          for (int64_t k = 0; k < kc; ++k) {
            const float* src = wp + ((k0 + k) * Cout + cb * kNR) * T + t;
            float* d = Bp.data() + (t * kc + k) * kNR;
            for (int64_t j = 0; j < nr; ++j) d[j] = src[j * T];
            for (int64_t j = nr; j < kNR; ++j) d[j] = 0.f;
          }
        for (int64_t mt0 = 0; mt0 < MT; mt0 += MCT)
          run_tiles(T, mt0, std::min(MT, mt0 + MCT), kc, off.data(), A.data() + k0 * kMR, Cin * kMR, Bp.data(),
                    Z + cb * kNR);
      }
    }
  });
  // y[n, c, q] = Z[(n * HWo + q) * Cp + c], 16 pixels at a time
  at::Tensor y = at::empty({N, Cout, Hout, Wout}, xc.options());
  float* yp = y.data_ptr<float>();
  constexpr int64_t kQ = 16;
  const int64_t QB = (HWo + kQ - 1) / kQ;
  at::parallel_for(0, N * QB, 4, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / QB, q0 = (i % QB) * kQ, q1 = std::min(HWo, q0 + kQ);
      const float* z = Z + (n * HWo) * Cp;
      float* yn = yp + n * Cout * HWo;
      for (int64_t c = 0; c < Cout; ++c)
        for (int64_t q = q0; q < q1; ++q) yn[c * HWo + q] = z[q * Cp + c];
    }
  });
  g_products.fetch_add(1, std::memory_order_relaxed);
  return y;
#else
  TORCH_CHECK(false, "conv_transpose2d: the tap product needs an x86-64 CPU with AVX2 and FMA");
#endif
}

// The backward's two products over the same (pixel, tap) pairs as the forward, each value the
// direct sum of its own terms. A NaN or inf therefore reaches the gradients through the pairs
// that land in the output only: torch's float32 CPU product (oneDNN) gives the same pattern,
// its float64 product (which multiplies the zeros it puts outside the output) more NaN.
at::Tensor tap_conv_transpose_grad_input(const at::Tensor& dz, const at::Tensor& w, int64_t H, int64_t W,
                                         int64_t SH, int64_t SW, int64_t PH, int64_t PW, int64_t DH, int64_t DW) {
#if GENFAST_X86_INTRINSICS
  TORCH_CHECK(cpu_avx2_fma(), "conv_transpose2d: the tap product needs AVX2 and FMA");
  const at::Tensor dzc = dz.contiguous(), wc = w.contiguous();
  const int64_t N = dzc.size(0), Cout = dzc.size(1), Hout = dzc.size(2), Wout = dzc.size(3);
  const int64_t Cin = wc.size(0), KH = wc.size(2), KW = wc.size(3), T = KH * KW;
  const int64_t Np = (N + kMR - 1) / kMR * kMR, HWo = Hout * Wout, HWi = H * W, CB = (Cin + kNR - 1) / kNR;
  // D[(q * Cout + co) * Np + n] = dz[n, co, q] (zeros for the images past N): a tile's 4 rows
  // (4 images at one output pixel) side by side
  std::vector<float> D(static_cast<size_t>(HWo * Cout * Np), 0.f);
  const float* dp = dzc.data_ptr<float>();
  at::parallel_for(0, Cout, 4, [&](int64_t c0, int64_t c1) {
    for (int64_t co = c0; co < c1; ++co)
      for (int64_t n = 0; n < N; ++n) {
        const float* src = dp + (n * Cout + co) * HWo;
        for (int64_t q = 0; q < HWo; ++q) D[(q * Cout + co) * Np + n] = src[q];
      }
  });
  at::Tensor gx = at::empty({N, Cin, H, W}, dzc.options());
  float* gp = gx.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  at::parallel_for(0, CB, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> Bp(static_cast<size_t>(T * Cout * kNR));
    std::vector<const float*> As(static_cast<size_t>(T)), Bs(static_cast<size_t>(T));
    std::vector<int64_t> qs(static_cast<size_t>(T));
    alignas(32) float out[kMR * kNR];
    for (int64_t cb = b0; cb < b1; ++cb) {
      const int64_t nr = std::min(kNR, Cin - cb * kNR);
      // Bp[(t * Cout + co) * kNR + j] = w[cb * kNR + j, co, t] (zeros past C_in)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t co = 0; co < Cout; ++co) {
          float* d = Bp.data() + (t * Cout + co) * kNR;
          for (int64_t j = 0; j < nr; ++j) d[j] = wp[((cb * kNR + j) * Cout + co) * T + t];
          for (int64_t j = nr; j < kNR; ++j) d[j] = 0.f;
        }
      for (int64_t pix = 0; pix < HWi; ++pix) {
        const int64_t ih = pix / W, iw = pix % W;
        int64_t ns = 0;
        for (int64_t ky = 0; ky < KH; ++ky) {
          const int64_t oh = ih * SH - PH + ky * DH;
          if (oh < 0 || oh >= Hout) continue;
          for (int64_t kx = 0; kx < KW; ++kx) {
            const int64_t ow = iw * SW - PW + kx * DW;
            if (ow < 0 || ow >= Wout) continue;
            qs[ns] = oh * Wout + ow;
            Bs[ns] = Bp.data() + (ky * KW + kx) * Cout * kNR;
            ++ns;
          }
        }
        for (int64_t n0 = 0; n0 < N; n0 += kMR) {
          for (int64_t sg = 0; sg < ns; ++sg) As[sg] = D.data() + qs[sg] * Cout * Np + n0;
          tile_sum(ns, As.data(), Bs.data(), Cout, Np, kNR, out);
          for (int64_t r = 0; r < kMR && n0 + r < N; ++r)
            for (int64_t j = 0; j < nr; ++j) gp[((n0 + r) * Cin + cb * kNR + j) * HWi + pix] = out[r * kNR + j];
        }
      }
    }
  });
  g_products.fetch_add(1, std::memory_order_relaxed);
  return gx;
#else
  TORCH_CHECK(false, "conv_transpose2d: the tap product needs an x86-64 CPU with AVX2 and FMA");
#endif
}

at::Tensor tap_conv_transpose_grad_weight(const at::Tensor& x, const at::Tensor& dz, int64_t KH, int64_t KW,
                                          int64_t SH, int64_t SW, int64_t PH, int64_t PW, int64_t DH, int64_t DW) {
#if GENFAST_X86_INTRINSICS
  TORCH_CHECK(cpu_avx2_fma(), "conv_transpose2d: the tap product needs AVX2 and FMA");
  const at::Tensor xc = x.contiguous(), dzc = dz.contiguous();
  const int64_t N = xc.size(0), Cin = xc.size(1), H = xc.size(2), W = xc.size(3);
  const int64_t Cout = dzc.size(1), Hout = dzc.size(2), Wout = dzc.size(3), T = KH * KW;
  const int64_t HWi = H * W, HWo = Hout * Wout;
  const int64_t Cip = (Cin + kMR - 1) / kMR * kMR, CB = (Cout + kNR - 1) / kNR, Cop = CB * kNR;
  // Along one axis, a tap k lands output position i*S - P + k*D of input position i, which lies
  // in the stride's phase r = (k*D - P) mod S at index i + delta of that phase: consecutive input
  // positions meet consecutive entries of one phase. So dz goes into its phases, and a tap's
  // pairs are, per input row, one run of pixels in x and one run of entries in a phase of dz.
  struct Axis {
    std::vector<int64_t> Q, phase, delta, lo, hi;  // Q per phase; per tap: phase, delta, input range
  };
  const auto axis = [](int64_t in, int64_t out, int64_t K, int64_t S, int64_t P, int64_t D) {
    Axis a;
    a.Q.resize(S);
    for (int64_t r = 0; r < S; ++r) a.Q[r] = r < out ? (out - r + S - 1) / S : 0;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t off = k * D - P, r = ((off % S) + S) % S;
      a.phase.push_back(r);
      a.delta.push_back((off - r) / S);
      int64_t lo = in, hi = 0;
      for (int64_t i = 0; i < in; ++i)
        if (i * S + off >= 0 && i * S + off < out) lo = std::min(lo, i), hi = i + 1;
      a.lo.push_back(lo);
      a.hi.push_back(std::max(lo, hi));
    }
    return a;
  };
  const Axis ah = axis(H, Hout, KH, SH, PH, DH), aw = axis(W, Wout, KW, SW, PW, DW);
  std::vector<int64_t> base(static_cast<size_t>(SH * SW + 1), 0);  // phase (rh, rw)'s first entry
  for (int64_t rh = 0; rh < SH; ++rh)
    for (int64_t rw = 0; rw < SW; ++rw) base[rh * SW + rw + 1] = base[rh * SW + rw] + ah.Q[rh] * aw.Q[rw];
  // X[((rt * HWi + pix) * N + n) * 4 + r] = x[n, 4 rt + r, pix] and D[((cb * HWo + e) * N + n) * 16 +
  // j] = dz[n, 16 cb + j, (qh * SH + rh, qw * SW + rw)] with e = base + qh * Qw + qw (zeros past
  // C_in / C_out): each tile reads its depth from two sequential runs (16 and 64 bytes per step)
  std::vector<float> X(static_cast<size_t>(HWi * N * Cip), 0.f), D(static_cast<size_t>(HWo * N * Cop), 0.f);
  const float* xp = xc.data_ptr<float>();
  const float* dp = dzc.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t ci = 0; ci < Cin; ++ci)
        for (int64_t pix = 0; pix < HWi; ++pix)
          X[(((ci / kMR) * HWi + pix) * N + n) * kMR + ci % kMR] = xp[(n * Cin + ci) * HWi + pix];
      for (int64_t co = 0; co < Cout; ++co)
        for (int64_t oh = 0; oh < Hout; ++oh) {
          const int64_t rh = oh % SH, qh = oh / SH;
          for (int64_t ow = 0; ow < Wout; ++ow) {
            const int64_t rw = ow % SW, qw = ow / SW, e = base[rh * SW + rw] + qh * aw.Q[rw] + qw;
            D[(((co / kNR) * HWo + e) * N + n) * kNR + co % kNR] = dp[((n * Cout + co) * Hout + oh) * Wout + ow];
          }
        }
    }
  });
  at::Tensor gw = at::empty({Cin, Cout, KH, KW}, xc.options());
  float* gp = gw.data_ptr<float>();
  // tasks: (channel block, tap), each running every 4-channel tile of x against its one run of
  // dz per input row (in L1 across the tiles)
  at::parallel_for(0, CB * T, 1, [&](int64_t i0, int64_t i1) {
    std::vector<const float*> As(static_cast<size_t>(H)), Bs(static_cast<size_t>(H));
    std::vector<int64_t> aoff(static_cast<size_t>(H));
    alignas(32) float out[kMR * kNR];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t cb = i / T, t = i % T, ky = t / KW, kx = t % KW;
      const int64_t nr = std::min(kNR, Cout - cb * kNR);
      const int64_t rh = ah.phase[ky], rw = aw.phase[kx], Qw = aw.Q[rw];
      const int64_t iw0 = aw.lo[kx], run = (aw.hi[kx] - iw0) * N;
      int64_t ns = 0;
      if (run > 0)
        for (int64_t ih = ah.lo[ky]; ih < ah.hi[ky]; ++ih, ++ns) {
          aoff[ns] = ((ih * W + iw0) * N) * kMR;
          Bs[ns] = D.data() +
                   ((cb * HWo + base[rh * SW + rw] + (ih + ah.delta[ky]) * Qw + iw0 + aw.delta[kx]) * N) * kNR;
        }
      for (int64_t rt = 0; rt < Cip / kMR; ++rt) {
        for (int64_t sg = 0; sg < ns; ++sg) As[sg] = X.data() + rt * HWi * N * kMR + aoff[sg];
        tile_sum(ns, As.data(), Bs.data(), run, kMR, kNR, out);
        const int64_t ci0 = rt * kMR;
        for (int64_t r = 0; r < kMR && ci0 + r < Cin; ++r)
          for (int64_t j = 0; j < nr; ++j) gp[((ci0 + r) * Cout + cb * kNR + j) * T + t] = out[r * kNR + j];
      }
    }
  });
  g_products.fetch_add(1, std::memory_order_relaxed);
  return gw;
#else
  TORCH_CHECK(false, "conv_transpose2d: the tap product needs an x86-64 CPU with AVX2 and FMA");
#endif
}

void set_cpu_tap_gemm(const std::string& mode) { g_mode.set("set_cpu_tap_gemm", mode); }

std::string cpu_tap_gemm() { return g_mode.name(); }

int64_t cpu_tap_products() { return g_products.load(std::memory_order_relaxed); }

}  // namespace genfast
