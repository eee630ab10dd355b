// The CPU transposed convolutions k4 s2 p1 by Winograd's minimal filtering F(4x4, 2x2) and k5 s2 p2
// by F(4x4, 3x3) (the second further down: "k5 s2 p2"), and the Conv2d layers that are their
// grad_input.
//
// Why: at batch 8 the DCGAN 16x16 -> 32x32 layer's direct product (one BLAS product of 537
// MFLOP, then col2im) runs at MKL's peak on the CI CPU and still only tied ATen's oneDNN
// transposed convolution; the product itself had to get smaller. Winograd's algorithm (Lavin and
// Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) computes m outputs of an
// r-tap correlation from m + r - 1 products.
//
// The split into phases: output row 2i + a (a = 0, 1) of a k4 s2 p1 transposed convolution
// takes two kernel rows, y[2i] = x[i-1] w[3] + x[i] w[1], y[2i+1] = x[i] w[2] + x[i+1] w[0]: a
// 2-tap correlation per phase, over the input window starting at i - 1 + a. In 2-D, each of the
// four phases (a, b) is a 2x2 correlation of x with the taps g[j][k] = w[3-a-2j][3-b-2k], and
// F(4x4, 2x2) computes a 4x4 tile of that phase's outputs from a 5x5 input window:
//   Y = A^T [ sum_ci (G g G^T) . (B^T d B) ] A          (. elementwise, 5x5)
// with 25 products per 16 outputs where the direct form has 64: 2.56x fewer multiply-adds,
// which become 100 (phase, element) matrix products over the channels, one batched BLAS call:
//   M[p, e] (T, C_out) = V[p, e] (T, C_in) x U[p, e] (C_in, C_out)
// (T = the batch's 4x4 tiles), between an input transform (V, from x) and an output
// transform (A^T M A, into the output).
// The points: 1, -1, 1/2, -1/2 and infinity. Measured on 20,000 128-channel sums against float64,
// that set's 1-D error was 2x the direct sum's (points 0, +-1, 2 or -2: 3-4x), so the 2-D
// tile's about 4x: the 16x16 -> 32x32 layer came within 8e-6 of float64 where the direct float32
// product came within 2e-6, outputs of magnitude up to 5 (tests/test_conv_transpose_winograd.py
// holds it to float32's test tolerance). With these points B^T and A^T have small integer and
// power-of-two entries; G holds the fractions (1/6, 2/3, 1/3, 1/4), applied once per weight.
//   B^T = [[-1, -1,  4,  4, 0],     G = [[1/6,  1/6],     A^T = [[1,  1, 1,    1,    0],
//          [-1,  1,  4, -4, 0],          [1/6, -1/6],            [1, -1, 1/2, -1/2,  0],
//          [ 1,  2, -1, -2, 0],          [2/3,  1/3],            [1,  1, 1/4,  1/4,  0],
//          [ 1, -2, -1,  2, 0],          [2/3, -1/3],            [1, -1, 1/8, -1/8,  1]]
//          [ 1,  0, -5,  0, 4]]          [0,    1/4]]
// (rows of B^T and of G scaled against each other from the textbook construction).
//
// Dynamic range: see block_range_ok and local_range_ok below (a block of input with few values
// near its largest magnitude, an outlier, or a tile whose region holds values far larger than an
// output of it reads, makes the call run the direct product).
// Non-finite values: a transform mixes a window's values, so an inf in x would reach outputs
// that do not depend on it in the direct form (as NaN); the output transform therefore checks
// every value it computes, and any non-finite one makes the call return an undefined tensor,
// and the caller runs the direct product instead (torch's NaN / inf pattern, its values to
// rounding). A non-finite x or w value
// always shows: it makes some V or U entry non-finite, then a whole row or column of M (an
// inf times a zero is NaN), then an output of its tile, checked before anything is cropped.
//
// Layout and passes: U (100, C_in, C_out), V (100, T, C_in) and M (100, T, C_out), each
// matrix's rows padded to a multiple of 8 channels (zeros); U's and V's 100 matrices lie 16
// floats apart beyond their size (so that the 25 elements of a tile, which the input transform
// writes together, are not a multiple of 4 KB apart: at 4 KB strides they shared L1 sets, and
// the input transform ran 5x slower), M's contiguously (at::bmm_out ran a strided result's
// products one by one: 1.8x slower). The transforms run on 8 channels at a time (one AVX2 vector
// per tile element). Per call: U from w (reads w, writes 6.25x w), then per chunk of the batch
// (V and M within kChunkBytes) V from x (reads x, writes 6.25x x), the product, and the output
// transform (reads M, 1.56x the output, writes the output once). Scratch memory is kept per
// calling thread from one call to the next, as the GEMM form's columns are (the allocator
// handed large blocks back to the system and faulted them in again each call). The outlier
// check (block_range_ok) is written in vectors: as scalar code it cost as much as the input
// transform it guards (the 16x16 layer at batch 8 ran 1.10x eager with it, 1.23x once
// vectorised, in one hour's VM).
//
// Where it runs ("auto"): measured interleaved on the CI CPU (AMD EPYC, AVX2, 2 threads, MKL),
// forward of the product + bias + ReLU against torch's conv_transpose2d + relu (and genfast's
// direct GEMM form, in parentheses): 16x16 128 -> 64 at batch 8 1.46-1.52x (1.00-1.05x), batch 4
// 1.39x (1.05x), batch 2 1.37x (1.09x), batch 1 1.22x (1.07x); 8x8 256 -> 128 at batch 8 1.24x
// (1.16x), batch 16 1.34x (1.07x); 16x16 64 -> 32 at batch 8 1.37x (1.08x), 96 -> 64 1.38x
// (1.04x), 128 -> 32 1.26x (1.05x); 32x32 64 -> 32 1.15x (1.06x). It lost where the 100
// products are small: 4x4 maps (one tile per image: 512 -> 256 at batch 8 0.60x against 1.31x,
// batch 32 1.04x against 1.12x), 8x8 at batch 1-4 (4-16 tiles: 0.84-1.09x against 1.22-1.68x),
// 16 -> 8 channels (0.74x against 1.46x); 32 -> 16 tied. As a Conv2d forward (oneDNN's product
// the baseline): 32x32 64 -> 128 at batch 8-64 1.42-1.51x, 16x16 128 -> 256 at batch 16 1.29x,
// 14x14 64 -> 128 1.20x, 8x8 256 -> 512 (4x4 tiles of one per image) 0.66x. Maps that are not
// multiples of 4 pad their last tiles: 7x7 128 -> 64 at batch 8 and 64 1.10-1.16x against the
// direct form's 1.27-1.44x, 9x9 0.87x against 0.95x (measured while another job ran: rough; the
// Conv2d 14x14 -> 7x7 layer, 1.20x above, is left out with them). Repeated later (another hour's
// VM, slower), 16x16 128 -> 64 at batch 8 ran 1.20-1.41x against the direct form's 1.18-1.38x,
// and 8x8 256 -> 128 at batch 8 (32 tiles) lost: 0.92-1.07x against 1.01-1.14x. So "auto" takes
// it for maps that are multiples of 4, with at least 64 input and 32 output channels (as a
// transposed convolution), from 64 tiles over the batch with at least 4 per image or from 16
// tiles in one image.

#include "conv_transpose_winograd.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "../common/kernel_mode.h"
#include "../common/macros.h"

namespace genfast {
namespace {

constexpr int kLanes = 8;  // channels per transform step
constexpr int64_t kPadFloats = 16;  // between consecutive matrices of U and V (M is contiguous)
constexpr int64_t kChunkBytes = int64_t(1) << 25;  // V and M of one chunk of the batch
constexpr int64_t kMaxWeightBytes = int64_t(1) << 26;  // U, above which "auto" keeps the direct form
constexpr int64_t kMinTiles = 64, kMinImageTiles = 4, kOneImageTiles = 16;
constexpr int64_t kMinCin = 64, kMinCout = 32;

KernelMode g_mode;
std::atomic<int64_t> g_products{0};  // Winograd products returned (the tests' evidence of the path)

const float kG[5][2] = {{1.f / 6, 1.f / 6}, {1.f / 6, -1.f / 6}, {2.f / 3, 1.f / 3}, {2.f / 3, -1.f / 3}, {0.f, 0.25f}};

struct WGeo {
  int64_t N, Ci, Co, H, W;
  int64_t Th, Tw, TT;  // tiles per column, per row, per image
  int64_t Cip, Cop;    // channels padded to a multiple of kLanes
  int64_t ldu;         // floats between consecutive matrices of U
  int64_t PH, PW;      // the zero-bordered input plane of the input transform
};

WGeo geometry_of(int64_t N, int64_t Ci, int64_t Co, int64_t H, int64_t W) {
  WGeo g;
  g.N = N, g.Ci = Ci, g.Co = Co, g.H = H, g.W = W;
  g.Th = (H + 3) / 4, g.Tw = (W + 3) / 4, g.TT = g.Th * g.Tw;
  g.Cip = (Ci + kLanes - 1) / kLanes * kLanes, g.Cop = (Co + kLanes - 1) / kLanes * kLanes;
  g.ldu = 0;  // set by the caller
  // the zero-bordered input plane, one zero row / column above and left: k4's 5x5 windows start
  // at bordered row 4*th + a, k5's 6x6 windows at 4*th; 4*Th + 2 rows either way
  g.PH = 4 * g.Th + 2, g.PW = 4 * g.Tw + 2;
  return g;
}

// kLanes channels as one vector (GCC / Clang vector extension: one AVX2 register, two SSE ones
// in the default clone); loads and stores by memcpy (no alignment assumed). The helpers taking
// or returning one are always inlined into their (multi-versioned) callers, so no vector
// crosses a call: GCC's note that such a return changes the ABI without AVX does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
typedef float v8 __attribute__((vector_size(32)));
static_assert(kLanes * sizeof(float) == sizeof(v8), "one v8 per kLanes channels");
GENFAST_INLINE v8 ld8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
GENFAST_INLINE void st8(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }
typedef int32_t vi8 __attribute__((vector_size(32)));  // (a cast between the two: the same bits)
GENFAST_INLINE v8 abs8(v8 x) { return (v8)((vi8)x & 0x7fffffff); }
// a > m ? a : m per lane (m where a is NaN), by masks (no vector ?: needed)
GENFAST_INLINE v8 max8(v8 a, v8 m) {
  const vi8 gt = a > m;
  return (v8)(((vi8)a & gt) | ((vi8)m & ~gt));
}

// Dynamic range of one block of input (a zero-bordered pad of kLanes channels): whether at least
// 1 / kDenseFraction of its nonzero values lie within kRangeRatio of its largest magnitude. A
// transform mixes a 5x5 window, so the rounding of its largest value reaches every output of
// its tile, including outputs that do not depend on it in the direct form: one entry of 1e8 among
// values of order 1 put errors of 4 on such outputs (the direct product: 2e-6), and 1e30 gave
// finite values wrong by 1e22 (found by a bad-input hunt). A block that fails runs the call's
// direct product instead. (A bound on max / root-mean-square would not do: a single outlier
// raises the mean square itself, and among n values max / rms <= sqrt(n).) Gaussian values pass
// easily (76% lie within 1/16 of a maximum of about 5 sigma), so do ReLU outputs (zeros are not
// counted); where the check passes, the block's mean square is at least max^2 / 25600. The
// weight is checked as a whole (weight_range_ok): a large tap reaches, through the transforms,
// the outputs whose direct sum multiplies it by a zero input (the padding, or a ReLU's zeros).
// NaN and inf pass here (the output check catches them).
constexpr float kRangeRatio = 16.f;
constexpr int64_t kDenseFraction = 10;

GENFAST_INLINE bool block_range_ok(const float* p, int64_t n) {
  const int64_t nv = n / kLanes * kLanes;
  v8 m = {};
  for (int64_t i = 0; i < nv; i += kLanes) {
    m = max8(abs8(ld8(p + i)), m);
  }
  float mm = 0.f;
  for (int l = 0; l < kLanes; ++l) mm = m[l] > mm ? m[l] : mm;
  for (int64_t i = nv; i < n; ++i) mm = std::fabs(p[i]) > mm ? std::fabs(p[i]) : mm;
  if (mm == 0.f || !(mm <= std::numeric_limits<float>::max())) return true;
  const float t = mm / kRangeRatio;
  const v8 zero = {}, thr = zero + t;
  vi8 nz = {}, lg = {};  // minus the counts (a true comparison is -1)
  for (int64_t i = 0; i < nv; i += kLanes) {
    const v8 a = abs8(ld8(p + i));
    nz += a > zero;
    lg += a >= thr;
  }
  int64_t tn = 0, tl = 0;
  for (int l = 0; l < kLanes; ++l) tn -= nz[l], tl -= lg[l];
  for (int64_t i = nv; i < n; ++i) tn += std::fabs(p[i]) > 0.f ? 1 : 0, tl += std::fabs(p[i]) >= t ? 1 : 0;
  return tl * kDenseFraction >= tn;
}

// block_range_ok over the whole weight (C_in * C_out * 16 or 25 values, contiguous), in one
// thread (a vectorised read: the 128 -> 64 k4 layer's weight is 0.5 MB)
GENFAST_SIMD_CLONES bool weight_range_ok(const float* w, int64_t n) { return block_range_ok(w, n); }

// The transforms of one tile, kLanes channels at a time, shared by the forward and grad_input.

// o[e * ldu + lane] = (G g G^T)[e] of one phase's 2x2 taps g[j][k] = taps[row[j] * 4 + col[k]]
GENFAST_INLINE void weight_tile(const float (&taps)[16][kLanes], const int (&row)[2], const int (&col)[2], float* o,
                                int64_t ldu) {
  float t[5][2][kLanes];  // G g
  for (int u = 0; u < 5; ++u)
    for (int k = 0; k < 2; ++k)
      for (int l = 0; l < kLanes; ++l)
        t[u][k][l] = kG[u][0] * taps[row[0] * 4 + col[k]][l] + kG[u][1] * taps[row[1] * 4 + col[k]][l];
  for (int u = 0; u < 5; ++u)
    for (int v = 0; v < 5; ++v)
      for (int l = 0; l < kLanes; ++l) o[(u * 5 + v) * ldu + l] = t[u][0][l] * kG[v][0] + t[u][1][l] * kG[v][1];
}

// o[e * ldv + lane] = (B^T d B)[e] of the 5x5 window d (rows pw * kLanes floats apart)
GENFAST_INLINE void input_tile(const float* d, int64_t pw, float* o, int64_t ldv) {
  float t[5][5][kLanes];  // B^T d: [u][column k]
  for (int k = 0; k < 5; ++k)
    for (int l = 0; l < kLanes; ++l) {
      const float d0 = d[(0 * pw + k) * kLanes + l], d1 = d[(1 * pw + k) * kLanes + l],
                  d2 = d[(2 * pw + k) * kLanes + l], d3 = d[(3 * pw + k) * kLanes + l],
                  d4 = d[(4 * pw + k) * kLanes + l];
      t[0][k][l] = 4.f * (d2 + d3) - (d0 + d1);
      t[1][k][l] = 4.f * (d2 - d3) - (d0 - d1);
      t[2][k][l] = (d0 - d2) + 2.f * (d1 - d3);
      t[3][k][l] = (d0 - d2) - 2.f * (d1 - d3);
      t[4][k][l] = d0 - 5.f * d2 + 4.f * d4;
    }
  for (int u = 0; u < 5; ++u)
    for (int l = 0; l < kLanes; ++l) {
      const float d0 = t[u][0][l], d1 = t[u][1][l], d2 = t[u][2][l], d3 = t[u][3][l], d4 = t[u][4][l];
      o[(u * 5 + 0) * ldv + l] = 4.f * (d2 + d3) - (d0 + d1);
      o[(u * 5 + 1) * ldv + l] = 4.f * (d2 - d3) - (d0 - d1);
      o[(u * 5 + 2) * ldv + l] = (d0 - d2) + 2.f * (d1 - d3);
      o[(u * 5 + 3) * ldv + l] = (d0 - d2) - 2.f * (d1 - d3);
      o[(u * 5 + 4) * ldv + l] = d0 - 5.f * d2 + 4.f * d4;
    }
}

// t = A^T M of the tile whose 25 elements are m[e * ldm + lane]: [i][column v]
GENFAST_INLINE void output_columns(const float* m, int64_t ldm, float (&t)[4][5][kLanes]) {
  for (int v = 0; v < 5; ++v)
    for (int l = 0; l < kLanes; ++l) {
      const float m0 = m[(0 * 5 + v) * ldm + l], m1 = m[(1 * 5 + v) * ldm + l], m2 = m[(2 * 5 + v) * ldm + l],
                  m3 = m[(3 * 5 + v) * ldm + l], m4 = m[(4 * 5 + v) * ldm + l];
      t[0][v][l] = (m0 + m1) + (m2 + m3);
      t[1][v][l] = (m0 - m1) + 0.5f * (m2 - m3);
      t[2][v][l] = (m0 + m1) + 0.25f * (m2 + m3);
      t[3][v][l] = (m0 - m1) + 0.125f * (m2 - m3) + m4;
    }
}

// o = row i of (A^T M) A, the tile's outputs (i, 0..3); check[lane] += each * 0 (0, or NaN after
// a non-finite value)
GENFAST_INLINE void output_row(const float (&t)[4][5][kLanes], int i, float (&o)[4][kLanes], float (&check)[kLanes]) {
  for (int l = 0; l < kLanes; ++l) {
    const float m0 = t[i][0][l], m1 = t[i][1][l], m2 = t[i][2][l], m3 = t[i][3][l], m4 = t[i][4][l];
    o[0][l] = (m0 + m1) + (m2 + m3);
    o[1][l] = (m0 - m1) + 0.5f * (m2 - m3);
    o[2][l] = (m0 + m1) + 0.25f * (m2 + m3);
    o[3][l] = (m0 - m1) + 0.125f * (m2 - m3) + m4;
    check[l] += (o[0][l] * 0.f + o[1][l] * 0.f) + (o[2][l] * 0.f + o[3][l] * 0.f);
  }
}

// Local dynamic range of one image of the input: block_range_ok looks at how a block's values are
// distributed, not where they lie, and a region of large values (e.g. the top rows of every map
// 1000x the rest: 29% of the values near the maximum) passes it while the tiles' transforms
// spread its rounding onto outputs that read only the small values (a bad-input hunt: errors of
// 6e-3 on outputs of order 2 where the direct product's were 7e-7). So, over all channels of the
// image, each tile's input region (bordered rows and columns 4*t .. 4*t + 5, which holds every
// window of the tile: k4's forward windows in each phase, grad_input's in each phase plane,
// k5's 6x6 window) must have no 2x2 patch read by an existing output whose largest magnitude is
// below 1 / kRangeRatio of the region's. Every output of k4's phases reads a 2x2 patch at
// offsets 0 to 4 (the window's phase offset plus the output's), every output of k5 a 3x3, 3x2,
// 2x3 or 2x2 patch (phases whose kernel has 2 taps on a side) at offsets 0 to 4, each holding a
// 2x2 patch at one of the offsets checked; outputs of a cropped tile beyond H or W do not count.
// That bounds the spread to kRangeRatio times the error of evenly spread values. The magnitudes
// are taken over all channels (an output sums every channel) and, for grad_input's input, over
// the four phase planes (an output sums all four): a patch of one position holds C_in values,
// and Gaussian data or ReLU outputs of 64 channels (Winograd's "auto" minimum) all below 1/16 of
// their region's largest come with odds below 1e-15. NaN is passed over (the output check
// catches it); an inf fails the check (the direct product then gives torch's pattern, as the
// output check would). One more read of the input. phases: the input is grad_input's dz (N,
// C_out, 2H, 2W), seen as its four phase planes, else x (N, C_in, H, W); amap: PH * PW floats.
GENFAST_SIMD_CLONES bool local_range_ok(const float* in, const WGeo& g, int64_t n, bool phases, float* amap) {
  std::fill(amap, amap + g.PH * g.PW, 0.f);
  if (phases) {
    const int64_t OW = 2 * g.W;
    for (int64_t c = 0; c < g.Co; ++c) {
      const float* src = in + (n * g.Co + c) * 4 * g.H * g.W;
      for (int64_t h = 0; h < 2 * g.H; ++h) {
        float* row = amap + (h / 2 + 1) * g.PW + 1;
        const float* sr = src + h * OW;
        for (int64_t t = 0; t < g.W; ++t) {  // the two phases of columns 2t, 2t + 1
          const float a = std::fabs(sr[2 * t]), b = std::fabs(sr[2 * t + 1]);
          const float v = a > b ? a : b;
          row[t] = v > row[t] ? v : row[t];
        }
      }
    }
  } else {
    for (int64_t c = 0; c < g.Ci; ++c) {
      const float* src = in + (n * g.Ci + c) * g.H * g.W;
      for (int64_t h = 0; h < g.H; ++h) {
        float* row = amap + (h + 1) * g.PW + 1;
        for (int64_t w = 0; w < g.W; ++w) {
          const float v = std::fabs(src[h * g.W + w]);
          row[w] = v > row[w] ? v : row[w];
        }
      }
    }
  }
  for (int64_t th = 0; th < g.Th; ++th) {
    const int64_t last_h = std::min<int64_t>(3, g.H - 1 - 4 * th) + 1;  // the last patch offset read
    for (int64_t tw = 0; tw < g.Tw; ++tw) {
      const int64_t last_w = std::min<int64_t>(3, g.W - 1 - 4 * tw) + 1;
      const float* a0 = amap + 4 * th * g.PW + 4 * tw;
      float mx = 0.f;
      for (int i = 0; i < 6; ++i)
        for (int j = 0; j < 6; ++j) mx = a0[i * g.PW + j] > mx ? a0[i * g.PW + j] : mx;
      const float t = mx / kRangeRatio;  // inf for an inf: every finite patch fails
      for (int64_t i = 0; i <= last_h; ++i)
        for (int64_t j = 0; j <= last_w; ++j) {
          const float* q = a0 + i * g.PW + j;
          const float pm = std::max(std::max(q[0], q[1]), std::max(q[g.PW], q[g.PW + 1]));
          if (pm < t) return false;
        }
    }
  }
  return true;
}

// local_range_ok over every image of the input, in parallel over the images
bool input_local_range_ok(const float* in, const WGeo& g, bool phases) {
  std::atomic<bool> ok{true};
  at::parallel_for(0, g.N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<float> amap(g.PH * g.PW);
    for (int64_t n = n0; n < n1 && ok.load(std::memory_order_relaxed); ++n)
      if (!local_range_ok(in, g, n, phases, amap.data())) ok.store(false);
  });
  return ok.load();
}

// The input block of the forward: channels [c0, c0 + kLanes) of image n of x (N, C_in, H, W)
// into the zero-bordered plane pad (PH x PW x kLanes, input row r at row r + 1, zeros beyond
// C_in); false when the block fails block_range_ok
GENFAST_INLINE bool fill_plane(const float* x, const WGeo& g, int64_t n, int64_t c0, float* pad) {
  const int64_t nc = std::min<int64_t>(kLanes, g.Ci - c0);
  std::fill(pad, pad + g.PH * g.PW * kLanes, 0.f);
  for (int64_t l = 0; l < nc; ++l) {
    const float* src = x + (n * g.Ci + c0 + l) * g.H * g.W;
    for (int64_t h = 0; h < g.H; ++h)
      for (int64_t w = 0; w < g.W; ++w) pad[((h + 1) * g.PW + w + 1) * kLanes + l] = src[h * g.W + w];
  }
  return block_range_ok(pad, g.PH * g.PW * kLanes);
}

// The input block of grad_input: channels [c0, c0 + kLanes) of image n of dz (N, C_out, 2H, 2W)
// split into its four phase images P_ab[q][t] = dz[2q + a][2t + b], each into a zero-bordered
// plane (phase a * 2 + b at pad + (a * 2 + b) * PH * PW * kLanes, row q at row q + 1); false
// when the block fails block_range_ok
GENFAST_INLINE bool fill_phase_planes(const float* dz, const WGeo& g, int64_t n, int64_t c0, float* pad) {
  const int64_t nc = std::min<int64_t>(kLanes, g.Co - c0), plane = g.PH * g.PW * kLanes, OW = 2 * g.W;
  std::fill(pad, pad + 4 * plane, 0.f);
  for (int64_t l = 0; l < nc; ++l) {
    const float* src = dz + (n * g.Co + c0 + l) * 4 * g.H * g.W;
    for (int64_t h = 0; h < 2 * g.H; ++h) {
      float* row = pad + (h % 2) * 2 * plane + ((h / 2 + 1) * g.PW + 1) * kLanes + l;
      for (int64_t w = 0; w < OW; ++w) row[(w % 2) * plane + (w / 2) * kLanes] = src[h * OW + w];
    }
  }
  return block_range_ok(pad, 4 * plane);
}

// U[p*25 + e] rows ci, output channels [c0, c0 + kLanes) (zeros beyond C_out), from w (C_in,
// C_out, 4, 4) contiguous
GENFAST_SIMD_CLONES void weight_block(const float* w, float* U, const WGeo& g, int64_t ci, int64_t c0) {
  const int64_t nc = std::min<int64_t>(kLanes, g.Co - c0);
  float taps[16][kLanes];
  for (int q = 0; q < 16; ++q)
    for (int l = 0; l < kLanes; ++l) taps[q][l] = l < nc ? w[(ci * g.Co + c0 + l) * 16 + q] : 0.f;
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < 2; ++b) {
      // g[j][k] = w[3 - a - 2j][3 - b - 2k]
      const int row[2] = {3 - a, 1 - a}, col[2] = {3 - b, 1 - b};
      weight_tile(taps, row, col, U + int64_t((a * 2 + b) * 25) * g.ldu + ci * g.Cop + c0, g.ldu);
    }
}

// V rows of image n (the chunk's nl-th), input channels [c0, c0 + kLanes) (zeros beyond C_in);
// pad: PH * PW * kLanes floats of scratch
// (false, with nothing written, when the block fails a range check)
GENFAST_SIMD_CLONES bool input_block(const float* x, float* V, int64_t ldv, const WGeo& g, int64_t n, int64_t nl,
                                     int64_t c0, float* pad) {
  if (!fill_plane(x, g, n, c0, pad)) return false;
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < 2; ++b) {
      float* vb = V + int64_t((a * 2 + b) * 25) * ldv + nl * g.TT * g.Cip + c0;
      for (int64_t th = 0; th < g.Th; ++th)
        for (int64_t tw = 0; tw < g.Tw; ++tw) {
          const float* d = pad + ((4 * th + a) * g.PW + 4 * tw + b) * kLanes;
          input_tile(d, g.PW, vb + (th * g.Tw + tw) * g.Cip, ldv);
        }
    }
  return true;
}

// The output transform of image n (the chunk's nl-th), output channels [c0, c0 + kLanes), into
// y (N, C_out, 2H, 2W); false when a computed value (cropped or not, padded channel or not) is
// not finite
GENFAST_SIMD_CLONES bool output_block(const float* M, int64_t ldm, float* y, const WGeo& g, int64_t n, int64_t nl,
                                      int64_t c0) {
  const int64_t OH = 2 * g.H, OW = 2 * g.W, nc = std::min<int64_t>(kLanes, g.Co - c0);
  float check[kLanes] = {};  // sums of value * 0: 0, or NaN after a non-finite value
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < 2; ++b) {
      const float* mb = M + int64_t((a * 2 + b) * 25) * ldm + nl * g.TT * g.Cop + c0;
      for (int64_t th = 0; th < g.Th; ++th)
        for (int64_t tw = 0; tw < g.Tw; ++tw) {
          const float* m = mb + (th * g.Tw + tw) * g.Cop;
          float t[4][5][kLanes];
          output_columns(m, ldm, t);
          const int64_t jn = std::min<int64_t>(4, g.W - 4 * tw);
          for (int i = 0; i < 4; ++i) {
            float o[4][kLanes];
            output_row(t, i, o, check);
            const int64_t r = 4 * th + i;  // the phase's row; output row 2r + a
            if (r >= g.H) continue;
            for (int64_t l = 0; l < nc; ++l) {
              float* yo = y + ((n * g.Co + c0 + l) * OH + 2 * r + a) * OW + 8 * tw + b;
              for (int64_t j = 0; j < jn; ++j) yo[2 * j] = o[j][l];
            }
          }
        }
    }
  float c = 0.f;
  for (int l = 0; l < kLanes; ++l) c += check[l];
  return c == 0.f;
}

// --- grad_input: dx = conv2d(dz, w, stride 2, padding 1) ----------------------------------------
// Per axis, dx[i] = dz[2i-1] w[0] + dz[2i] w[1] + dz[2i+1] w[2] + dz[2i+2] w[3]: with the phase
// images P_a[q] = dz[2q + a], a 2-tap correlation of P_a with the taps (w[1-a], w[3-a]) over the
// window starting at i - a. The four phases' products of a tile sum into the same 4x4 outputs,
// so they sum in the transformed domain, inside the matrix products:
//   M[e] (T, C_in) = V[e] (T, 4*C_out) x U[e] (4*C_out, C_in)     (25 products)
// V's columns (phase, output channel), U's rows the same.

// U rows (p, co) of the 25 matrices, input channels [c0, c0 + kLanes) (zeros beyond C_in)
GENFAST_SIMD_CLONES void weight_block_bwd(const float* w, float* U, const WGeo& g, int64_t co, int64_t c0) {
  const int64_t nc = std::min<int64_t>(kLanes, g.Ci - c0);
  float taps[16][kLanes];
  for (int q = 0; q < 16; ++q)
    for (int l = 0; l < kLanes; ++l) taps[q][l] = l < nc ? w[((c0 + l) * g.Co + co) * 16 + q] : 0.f;
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < 2; ++b) {
      // g[j][k] = w[1 - a + 2j][1 - b + 2k]
      const int row[2] = {1 - a, 3 - a}, col[2] = {1 - b, 3 - b};
      weight_tile(taps, row, col, U + ((a * 2 + b) * g.Cop + co) * g.Cip + c0, g.ldu);
    }
}

// V rows of image n (the chunk's nl-th), columns (p, co) for output channels [c0, c0 + kLanes)
// (zeros beyond C_out), from dz (N, C_out, 2H, 2W); pad: 4 * PH * PW * kLanes floats
// (false, with nothing written, when the block fails a range check)
GENFAST_SIMD_CLONES bool input_block_bwd(const float* dz, float* V, int64_t ldv, const WGeo& g, int64_t n, int64_t nl,
                                         int64_t c0, float* pad) {
  const int64_t plane = g.PH * g.PW * kLanes;
  if (!fill_phase_planes(dz, g, n, c0, pad)) return false;
  const int64_t ldr = 4 * g.Cop;  // V's row length
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < 2; ++b) {
      const float* pp = pad + (a * 2 + b) * plane;
      float* vb = V + nl * g.TT * ldr + (a * 2 + b) * g.Cop + c0;
      for (int64_t th = 0; th < g.Th; ++th)
        for (int64_t tw = 0; tw < g.Tw; ++tw) {
          // the window starts at phase row 4*th - a, bordered row 4*th - a + 1
          const float* d = pp + ((4 * th - a + 1) * g.PW + 4 * tw - b + 1) * kLanes;
          input_tile(d, g.PW, vb + (th * g.Tw + tw) * ldr, ldv);
        }
    }
  return true;
}

// The output transform of image n (the chunk's nl-th), input channels [c0, c0 + kLanes), into
// dx (N, C_in, H, W); false when a computed value is not finite
GENFAST_SIMD_CLONES bool output_block_bwd(const float* M, int64_t ldm, float* dx, const WGeo& g, int64_t n, int64_t nl,
                                          int64_t c0) {
  const int64_t nc = std::min<int64_t>(kLanes, g.Ci - c0);
  float check[kLanes] = {};
  const float* mb = M + nl * g.TT * g.Cip + c0;
  for (int64_t th = 0; th < g.Th; ++th)
    for (int64_t tw = 0; tw < g.Tw; ++tw) {
      const float* m = mb + (th * g.Tw + tw) * g.Cip;
      float t[4][5][kLanes];
      output_columns(m, ldm, t);
      const int64_t jn = std::min<int64_t>(4, g.W - 4 * tw);
      for (int i = 0; i < 4; ++i) {
        float o[4][kLanes];
        output_row(t, i, o, check);
        const int64_t r = 4 * th + i;
        if (r >= g.H) continue;
        for (int64_t l = 0; l < nc; ++l) {
          float* xo = dx + ((n * g.Ci + c0 + l) * g.H + r) * g.W + 4 * tw;
          for (int64_t j = 0; j < jn; ++j) xo[j] = o[j][l];
        }
      }
    }
  float c = 0.f;
  for (int l = 0; l < kLanes; ++l) c += check[l];
  return c == 0.f;
}

// --- k5 s2 p2 (the Keras-style 28x28 models' layers): F(4x4, 3x3) -----------------------------
// Per axis, output 2r + a of the k5 s2 p2 transposed convolution with output_padding 1 (2H
// outputs from H) takes the taps w[4 - 2j + a] at input r - 1 + j (j = 0, 1, 2; tap 5 is a zero):
// a 3-tap correlation over the window starting at r - 1 for both phases (the odd phase's first
// tap zero). F(4x4, 3x3) computes a 4x4 tile of it from a 6x6 window with 36 products where the
// direct form has 144 (4 phases padded to 3x3: 25 taps, 100 multiply-adds per output quad
// against 36, 2.8x fewer before the 7x7 maps' padded tiles). One input transform serves the four
// phases (they share the window), so the phases become the product's columns:
//   M[e] (T, 4*C_out) = V[e] (T, C_in) x U[e] (C_in, 4*C_out)     (36 products)
// grad_input (and the Conv2d k5 s2 p2, its transpose): dx[r] = sum_k dz[2r - 2 + k] w[k]: with
// the phase images P_a[q] = dz[2q + a], a 3-tap correlation of P_a with w[2j + a] (w[5] a zero)
// over the window starting at r - 1; the phases sum inside the products:
//   M[e] (T, C_in) = V[e] (T, 4*C_out) x U[e] (4*C_out, C_in)
// The points: 1, -1, 1/2, -1/2, -2 and infinity (the five-point set with the least error of the
// sets measured: 0, +-1, +-1/2 gave 1.4x its error, 0, +-1, +-2 also 1.4x). F(4x4, 3x3) rounds
// more than F(4x4, 2x2): on 128-channel sums of Gaussian values its error against float64 was
// 20x the direct float32 sum's (F(4x4, 2x2): 8.5x in the same simulation); measured in this code
// against float64 see tests/test_conv_transpose_winograd.py and the README.
//   B^T = [[-2, -3,   7, 12, 4, 0],   G = [[ 1/18,  1/18,  1/18],  A^T = [[1,  1, 1,    1,     1, 0],
//          [ 2, -1,  -9,  4, 4, 0],        [-1/6,   1/6,  -1/6 ],         [1, -1, 1/2, -1/2,  -2, 0],
//          [-2, -5,   0,  5, 2, 0],        [-4/15, -2/15, -1/15],         [1,  1, 1/4,  1/4,   4, 0],
//          [ 2, -3,  -4,  3, 2, 0],        [ 4/9,  -2/9,   1/9 ],         [1, -1, 1/8, -1/8,  -8, 1]]
//          [ 1,  0,  -5,  0, 4, 0],        [ 1/45, -2/45,  4/45],
//          [ 2,  1, -10, -5, 8, 4]]        [ 0,     0,     1/4 ]]
// (B^T's rows scaled to integers, G's by the inverse factors.)
const float kG5[6][3] = {{1.f / 18, 1.f / 18, 1.f / 18},   {-1.f / 6, 1.f / 6, -1.f / 6},
                         {-4.f / 15, -2.f / 15, -1.f / 15}, {4.f / 9, -2.f / 9, 1.f / 9},
                         {1.f / 45, -2.f / 45, 4.f / 45},   {0.f, 0.f, 0.25f}};

// o[e * ldu + lane] = (G g G^T)[e] of one phase's 3x3 taps g[j][k] = taps[idx[j][k]] (index 25:
// the zero tap)
GENFAST_INLINE void weight_tile6(const float (&taps)[26][kLanes], const int (&idx)[3][3], float* o, int64_t ldu) {
  v8 t[6][3];  // G g
  for (int k = 0; k < 3; ++k) {
    const v8 g0 = ld8(taps[idx[0][k]]), g1 = ld8(taps[idx[1][k]]), g2 = ld8(taps[idx[2][k]]);
    for (int u = 0; u < 6; ++u) t[u][k] = kG5[u][0] * g0 + kG5[u][1] * g1 + kG5[u][2] * g2;
  }
  for (int u = 0; u < 6; ++u)
    for (int v = 0; v < 6; ++v) st8(o + (u * 6 + v) * ldu, t[u][0] * kG5[v][0] + t[u][1] * kG5[v][1] + t[u][2] * kG5[v][2]);
}

// B^T d of six vectors
GENFAST_INLINE void bt6(const v8 (&d)[6], v8 (&o)[6]) {
  const v8 a = d[3] - d[1];
  o[0] = (4.f * d[4] - 2.f * d[0]) + (12.f * d[3] - 3.f * d[1]) + 7.f * d[2];
  o[1] = (4.f * d[4] + 2.f * d[0]) + (4.f * d[3] - d[1]) - 9.f * d[2];
  o[2] = (2.f * d[4] - 2.f * d[0]) + 5.f * a;
  o[3] = (2.f * d[4] + 2.f * d[0]) + 3.f * a - 4.f * d[2];
  o[4] = (d[0] + 4.f * d[4]) - 5.f * d[2];
  o[5] = (2.f * d[0] + d[1]) + (8.f * d[4] - 5.f * d[3]) + (4.f * d[5] - 10.f * d[2]);
}

// o[e * ldv + lane] = (B^T d B)[e] of the 6x6 window d (rows pw * kLanes floats apart)
GENFAST_INLINE void input_tile6(const float* d, int64_t pw, float* o, int64_t ldv) {
  v8 t[6][6];  // (B^T d)^T: [column k][u]
  for (int k = 0; k < 6; ++k) {
    const v8 col[6] = {ld8(d + (0 * pw + k) * kLanes), ld8(d + (1 * pw + k) * kLanes), ld8(d + (2 * pw + k) * kLanes),
                       ld8(d + (3 * pw + k) * kLanes), ld8(d + (4 * pw + k) * kLanes), ld8(d + (5 * pw + k) * kLanes)};
    bt6(col, t[k]);
  }
  for (int u = 0; u < 6; ++u) {
    const v8 row[6] = {t[0][u], t[1][u], t[2][u], t[3][u], t[4][u], t[5][u]};
    v8 r[6];
    bt6(row, r);
    for (int v = 0; v < 6; ++v) st8(o + (u * 6 + v) * ldv, r[v]);
  }
}

// A^T m of six vectors: four
GENFAST_INLINE void at6(const v8 (&m)[6], v8 (&o)[4]) {
  const v8 sp = m[0] + m[1], sm = m[0] - m[1], hp = m[2] + m[3], hm = m[2] - m[3];
  o[0] = (sp + hp) + m[4];
  o[1] = (sm + 0.5f * hm) - 2.f * m[4];
  o[2] = (sp + 0.25f * hp) + 4.f * m[4];
  o[3] = (sm + 0.125f * hm) + (m[5] - 8.f * m[4]);
}

// The 4x4 outputs (A^T M A) of the tile whose 36 elements are m[e * ldm + lane]; check +=
// each * 0 (0, or NaN after a non-finite value)
GENFAST_INLINE void output_tile6(const float* m, int64_t ldm, float (&o)[4][4][kLanes], v8& check) {
  v8 t[6][4];  // (A^T M)^T: [column v][i]
  for (int v = 0; v < 6; ++v) {
    const v8 col[6] = {ld8(m + (0 * 6 + v) * ldm), ld8(m + (1 * 6 + v) * ldm), ld8(m + (2 * 6 + v) * ldm),
                       ld8(m + (3 * 6 + v) * ldm), ld8(m + (4 * 6 + v) * ldm), ld8(m + (5 * 6 + v) * ldm)};
    at6(col, t[v]);
  }
  for (int i = 0; i < 4; ++i) {
    const v8 row[6] = {t[0][i], t[1][i], t[2][i], t[3][i], t[4][i], t[5][i]};
    v8 r[4];
    at6(row, r);
    check += (r[0] * 0.f + r[1] * 0.f) + (r[2] * 0.f + r[3] * 0.f);
    for (int j = 0; j < 4; ++j) st8(o[i][j], r[j]);
  }
}

// 25 taps of kLanes channels, [25] the zero tap: taps[q][l] = w[base + l * lstride + q] (zeros
// beyond nc lanes)
GENFAST_INLINE void load_taps5(const float* w, int64_t base, int64_t lstride, int64_t nc, float (&taps)[26][kLanes]) {
  for (int q = 0; q < 25; ++q)
    for (int l = 0; l < kLanes; ++l) taps[q][l] = l < nc ? w[base + l * lstride + q] : 0.f;
  for (int l = 0; l < kLanes; ++l) taps[25][l] = 0.f;
}

// the 3x3 taps of phase (a, b): w[s0 + sg*2j + a][s0 + sg*2k + b] (sg = -1, s0 = 4: the forward;
// sg = 1, s0 = 0: grad_input), 25 (the zero tap) where an index reaches 5
GENFAST_INLINE void phase_taps5(int a, int b, bool fwd, int (&idx)[3][3]) {
  for (int j = 0; j < 3; ++j)
    for (int k = 0; k < 3; ++k) {
      const int r = fwd ? 4 - 2 * j + a : 2 * j + a, c = fwd ? 4 - 2 * k + b : 2 * k + b;
      idx[j][k] = r <= 4 && c <= 4 ? r * 5 + c : 25;
    }
}

// U (36, C_in, 4*C_out) row ci, output channels [c0, c0 + kLanes) of each phase, from w (C_in,
// C_out, 5, 5)
GENFAST_SIMD_CLONES void weight_block5(const float* w, float* U, const WGeo& g, int64_t ci, int64_t c0) {
  float taps[26][kLanes];
  load_taps5(w, (ci * g.Co + c0) * 25, 25, std::min<int64_t>(kLanes, g.Co - c0), taps);
  for (int p = 0; p < 4; ++p) {
    int idx[3][3];
    phase_taps5(p / 2, p % 2, true, idx);
    weight_tile6(taps, idx, U + ci * 4 * g.Cop + p * g.Cop + c0, g.ldu);
  }
}

// V (36, T, C_in) rows of image n (the chunk's nl-th), input channels [c0, c0 + kLanes); pad:
// PH * PW * kLanes floats (false, nothing written, when the block fails a range check)
GENFAST_SIMD_CLONES bool input_block5(const float* x, float* V, int64_t ldv, const WGeo& g, int64_t n, int64_t nl,
                                      int64_t c0, float* pad) {
  if (!fill_plane(x, g, n, c0, pad)) return false;
  float* vb = V + nl * g.TT * g.Cip + c0;
  for (int64_t th = 0; th < g.Th; ++th)
    for (int64_t tw = 0; tw < g.Tw; ++tw)  // window rows 4*th - 1 .. 4*th + 4: bordered rows from 4*th
      input_tile6(pad + (4 * th * g.PW + 4 * tw) * kLanes, g.PW, vb + (th * g.Tw + tw) * g.Cip, ldv);
  return true;
}

// The output transform of image n (the chunk's nl-th), output channels [c0, c0 + kLanes) of the
// four phases, into y (N, C_out, 2H, 2W); false when a computed value is not finite
GENFAST_SIMD_CLONES bool output_block5(const float* M, int64_t ldm, float* y, const WGeo& g, int64_t n, int64_t nl,
                                       int64_t c0) {
  const int64_t OH = 2 * g.H, OW = 2 * g.W, nc = std::min<int64_t>(kLanes, g.Co - c0), ldr = 4 * g.Cop;
  v8 check = {};
  for (int p = 0; p < 4; ++p) {
    const int a = p / 2, b = p % 2;
    const float* mb = M + nl * g.TT * ldr + p * g.Cop + c0;
    for (int64_t th = 0; th < g.Th; ++th)
      for (int64_t tw = 0; tw < g.Tw; ++tw) {
        float o[4][4][kLanes];
        output_tile6(mb + (th * g.Tw + tw) * ldr, ldm, o, check);
        const int64_t in = std::min<int64_t>(4, g.H - 4 * th), jn = std::min<int64_t>(4, g.W - 4 * tw);
        for (int64_t l = 0; l < nc; ++l)
          for (int64_t i = 0; i < in; ++i) {
            float* yo = y + ((n * g.Co + c0 + l) * OH + 2 * (4 * th + i) + a) * OW + 8 * tw + b;
            for (int64_t j = 0; j < jn; ++j) yo[2 * j] = o[i][j][l];
          }
      }
  }
  float c = 0.f;
  for (int l = 0; l < kLanes; ++l) c += check[l];
  return c == 0.f;
}

// grad_input: U (36, 4*C_out, C_in) rows (p, co), input channels [c0, c0 + kLanes)
GENFAST_SIMD_CLONES void weight_block5_bwd(const float* w, float* U, const WGeo& g, int64_t co, int64_t c0) {
  float taps[26][kLanes];
  load_taps5(w, (c0 * g.Co + co) * 25, g.Co * 25, std::min<int64_t>(kLanes, g.Ci - c0), taps);
  for (int p = 0; p < 4; ++p) {
    int idx[3][3];
    phase_taps5(p / 2, p % 2, false, idx);
    weight_tile6(taps, idx, U + (p * g.Cop + co) * g.Cip + c0, g.ldu);
  }
}

// V (36, T, 4*C_out) rows of image n, columns (p, co) for output channels [c0, c0 + kLanes), from
// dz (N, C_out, 2H, 2W); pad: 4 * PH * PW * kLanes floats (false, nothing written, when the
// block fails a range check)
GENFAST_SIMD_CLONES bool input_block5_bwd(const float* dz, float* V, int64_t ldv, const WGeo& g, int64_t n,
                                          int64_t nl, int64_t c0, float* pad) {
  const int64_t plane = g.PH * g.PW * kLanes;
  if (!fill_phase_planes(dz, g, n, c0, pad)) return false;
  const int64_t ldr = 4 * g.Cop;
  for (int p = 0; p < 4; ++p) {
    const float* pp = pad + p * plane;
    float* vb = V + nl * g.TT * ldr + p * g.Cop + c0;
    for (int64_t th = 0; th < g.Th; ++th)
      for (int64_t tw = 0; tw < g.Tw; ++tw)
        input_tile6(pp + (4 * th * g.PW + 4 * tw) * kLanes, g.PW, vb + (th * g.Tw + tw) * ldr, ldv);
  }
  return true;
}

// The output transform of image n, input channels [c0, c0 + kLanes), into dx (N, C_in, H, W);
// false when a computed value is not finite
GENFAST_SIMD_CLONES bool output_block5_bwd(const float* M, int64_t ldm, float* dx, const WGeo& g, int64_t n,
                                           int64_t nl, int64_t c0) {
  const int64_t nc = std::min<int64_t>(kLanes, g.Ci - c0);
  v8 check = {};
  const float* mb = M + nl * g.TT * g.Cip + c0;
  for (int64_t th = 0; th < g.Th; ++th)
    for (int64_t tw = 0; tw < g.Tw; ++tw) {
      float o[4][4][kLanes];
      output_tile6(mb + (th * g.Tw + tw) * g.Cip, ldm, o, check);
      const int64_t in = std::min<int64_t>(4, g.H - 4 * th), jn = std::min<int64_t>(4, g.W - 4 * tw);
      for (int64_t l = 0; l < nc; ++l)
        for (int64_t i = 0; i < in; ++i) {
          float* xo = dx + ((n * g.Ci + c0 + l) * g.H + 4 * th + i) * g.W + 4 * tw;
          for (int64_t j = 0; j < jn; ++j) xo[j] = o[i][j][l];
        }
    }
  float c = 0.f;
  for (int l = 0; l < kLanes; ++l) c += check[l];
  return c == 0.f;
}

// Scratch of the calling thread, kept from call to call (grows to the largest size asked)
float* scratch_floats(int64_t n) {
  struct Buf {
    float* p = nullptr;
    int64_t n = 0;
    ~Buf() { std::free(p); }
  };
  static thread_local Buf buf;
  if (buf.n < n) {
    std::free(buf.p);
    const size_t bytes = ((static_cast<size_t>(n) * sizeof(float) + 63) / 64) * 64;
    buf.p = static_cast<float*>(std::aligned_alloc(64, bytes));
    buf.n = buf.p != nullptr ? n : 0;
    TORCH_CHECK(buf.p != nullptr, "conv_transpose2d: out of memory allocating ", bytes, " bytes of scratch");
  }
  return buf.p;
}

// "auto": a transposed convolution C_in -> C_out from N images of H x W (or the Conv2d that is
// its grad_input); also keeps the scratch bounded: U within kMaxWeightBytes, and one image's V
// and M within kChunkBytes (a batch goes in chunks of whole images; a larger image, e.g. 128
// channels at 256x256, would hold hundreds of MB per thread)
bool auto_takes(int64_t N, int64_t Ci, int64_t Co, int64_t H, int64_t W) {
  const double tt = double((H + 3) / 4) * double((W + 3) / 4), tiles = double(N) * tt;
  const double cip = double((Ci + 7) / 8 * 8), cop = double((Co + 7) / 8 * 8);
  const double ubytes = 100.0 * cip * cop * 4.0;
  const double image_bytes = 100.0 * tt * (cip + cop) * 4.0;  // V + M of the forward (grad_input's are smaller)
  const bool enough = (tt >= double(kMinImageTiles) && tiles >= double(kMinTiles)) || tt >= double(kOneImageTiles);
  return enough && H % 4 == 0 && W % 4 == 0 && Ci >= kMinCin && Co >= kMinCout && ubytes <= double(kMaxWeightBytes) &&
         image_bytes <= double(kChunkBytes);
}

// A dense CPU tensor with storage of its own (not a fake, functional or other wrapper tensor: a
// traced call runs torch's product; no lazy negation or conjugation bit), in NCHW order that
// torch's layout rule reads as contiguous
bool plain_nchw(const at::Tensor& t) {
  const c10::DispatchKeySet ks = t.key_set();
  return t.has_storage() && !ks.has(c10::DispatchKey::Python) && !ks.has(c10::DispatchKey::Functionalize) &&
         !ks.has(c10::DispatchKey::PythonTLSSnapshot) && !t.is_neg() && !t.is_conj() && t.device().is_cpu() &&
         t.layout() == at::kStrided && t.is_contiguous() && t.suggest_memory_format() == at::MemoryFormat::Contiguous;
}

// "auto" for k5 s2 p2 (a transposed convolution C_in -> C_out from N images of H x W, or the
// Conv2d that is its grad_input), measured interleaved on the CI CPU (AMD EPYC, AVX2, 2 threads,
// MKL; a slower hour's VM than auto_takes's figures: MKL's product ran at 30-60 GFLOP/s), the
// forward against torch's: as a transposed convolution (+ bias + LeakyReLU) 7x7 128 -> 64 at
// batch 2, 4, 8, 16, 64: 0.55x, 0.70x, 0.85-0.92x, 1.04-1.07x, 1.19-1.44x; 16x16 128 -> 64 and
// 64 -> 32 at batch 8 1.70x, 1.40x; 14x14 64 -> 64 1.16x; 8x8 256 -> 128 at batch 8 1.23x. As a
// Conv2d (its transposed structure: 4 C_in rows per matrix, a 4x larger transformed weight)
// 14 -> 7 64 -> 128 at batch 4, 8, 16, 64: 0.61x, 0.78-0.82x, 0.97-1.11x, 1.22-1.23x; 32 -> 16
// 64 -> 128 and 32 -> 64 at batch 8 1.46x, 1.28x; 28 -> 14 64 -> 64 and 64 -> 32 at batch 8
// 0.92x, 0.82x; 16 -> 8 128 -> 256 at batch 8 (32 tiles) 0.82x. The transformed weight is
// written every call (36 x 4 x the weight), so few tiles lose. Forward + backward: the Keras
// Conv2d 64 -> 128 14 -> 7 + BatchNorm + LeakyReLU block 1.06x at batch 16 (1.03x without
// Winograd), 1.17x at batch 64 (1.01x); the Keras transposed convolution 128 -> 64 7x7 +
// LeakyReLU 0.90x at batch 8 (0.98x without), 1.04x at batch 32 (0.85x). So: from 64 tiles with
// at least 4 per image, 64 input and 32 output channels (as a transposed convolution), maps
// whose sides are not 2 more than a multiple of 4 (the 14x14 Conv2d outputs lost).
bool auto_takes5(int64_t N, int64_t Ci, int64_t Co, int64_t H, int64_t W) {
  const double tt = double((H + 3) / 4) * double((W + 3) / 4), tiles = double(N) * tt;
  const double cip = double((Ci + 7) / 8 * 8), cop = double((Co + 7) / 8 * 8);
  const double ubytes = 36.0 * cip * 4.0 * cop * 4.0;
  const double image_bytes = 36.0 * tt * (cip + 4.0 * cop) * 4.0;
  return tiles >= double(kMinTiles) && tt >= double(kMinImageTiles) && H % 4 != 2 && W % 4 != 2 && Ci >= kMinCin &&
         Co >= kMinCout && ubytes <= double(kMaxWeightBytes) && image_bytes <= double(kChunkBytes);
}

using WeightBlock = void (*)(const float*, float*, const WGeo&, int64_t, int64_t);
using InputBlock = bool (*)(const float*, float*, int64_t, const WGeo&, int64_t, int64_t, int64_t, float*);
using OutputBlock = bool (*)(const float*, int64_t, float*, const WGeo&, int64_t, int64_t, int64_t);

// One Winograd call: U from the weight w, then per chunk of the batch (V and M within
// kChunkBytes) V from the input in, E batched products M[e] (T, cols) = V[e] (T, K) x U[e] (K,
// cols), and the output transform into out. g.ldu: U's matrix stride (K * cols + kPadFloats);
// zero_u: U has padded rows that no weight block writes. Tasks: weight_fn(w, U, g, r, c0) for
// r < wrows, c0 over wblocks blocks of kLanes; input_fn(in, V, ldv, g, n, nl, c0, pad) over
// vblocks per image (pad: pad_floats of scratch; false: the block failed its range check);
// output_fn(M, ldm, out, g, n, nl, c0) over oblocks per image (false: a non-finite value).
// False when the call must run the direct product instead.
bool winograd_run(const WGeo& g, int64_t E, int64_t K, int64_t cols, bool zero_u, int64_t wrows, int64_t wblocks,
                  int64_t vblocks, int64_t oblocks, int64_t pad_floats, const float* w, const float* in, float* out,
                  WeightBlock weight_fn, InputBlock input_fn, OutputBlock output_fn, const at::TensorOptions& opts) {
  // images per chunk: V and M of a chunk within kChunkBytes
  const int64_t per_image = E * g.TT * (K + cols) * int64_t(sizeof(float));
  const int64_t m0 = std::max<int64_t>(1, std::min(g.N, kChunkBytes / std::max<int64_t>(1, per_image)));
  const int64_t Tmax = m0 * g.TT;
  // M has no padding: a non-contiguous result made at::bmm_out run its products one by one
  // (2.8 ms against 1.5 ms for the 16x16 k4 layer's 100 products at batch 8)
  const int64_t ldv = Tmax * K + kPadFloats, mfloats = Tmax * cols;
  float* U = scratch_floats(E * (g.ldu + ldv + mfloats));
  float* V = U + E * g.ldu;
  float* M = V + E * ldv;
  if (zero_u) std::fill(U, U + E * g.ldu, 0.f);
  at::parallel_for(0, wrows * wblocks, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) weight_fn(w, U, g, r / wblocks, (r % wblocks) * kLanes);
  });
  std::atomic<bool> ok{true};
  for (int64_t n0 = 0; n0 < g.N && ok.load(); n0 += m0) {
    const int64_t m = std::min(m0, g.N - n0), T = m * g.TT;
    at::parallel_for(0, m * vblocks, 1, [&](int64_t r0, int64_t r1) {
      std::vector<float> pad(pad_floats);
      for (int64_t r = r0; r < r1 && ok.load(std::memory_order_relaxed); ++r)
        if (!input_fn(in, V, ldv, g, n0 + r / vblocks, r / vblocks, (r % vblocks) * kLanes, pad.data()))
          ok.store(false);
    });
    if (!ok.load()) break;
    const at::Tensor Ut = at::from_blob(U, {E, K, cols}, {g.ldu, cols, 1}, opts);
    const at::Tensor Vt = at::from_blob(V, {E, T, K}, {ldv, K, 1}, opts);
    at::Tensor Mt = at::from_blob(M, {E, T, cols}, opts);  // contiguous (this chunk's size)
    // (one product per thread, at::mm_out under at::parallel_for, measured no faster)
    at::bmm_out(Mt, Vt, Ut);
    at::parallel_for(0, m * oblocks, 1, [&](int64_t r0, int64_t r1) {
      bool fine = true;
      for (int64_t r = r0; r < r1; ++r)
        fine = output_fn(M, T * cols, out, g, n0 + r / oblocks, r / oblocks, (r % oblocks) * kLanes) && fine;
      if (!fine) ok.store(false);
    });
  }
  return ok.load();
}

}  // namespace

bool winograd_s2_takes(const at::Tensor& x, const at::Tensor& w, int64_t groups, int64_t KH, int64_t KW, int64_t SH,
                       int64_t SW, int64_t PH, int64_t PW, int64_t DH, int64_t DW, int64_t Hout, int64_t Wout) {
  const int mode = g_mode.get();
  if (mode == KernelMode::kNever) return false;
  if (x.scalar_type() != at::kFloat || w.scalar_type() != at::kFloat || x.dim() != 4 || w.dim() != 4) return false;
  const bool k4 = KH == 4 && KW == 4 && PH == 1 && PW == 1, k5 = KH == 5 && KW == 5 && PH == 2 && PW == 2;
  if (groups != 1 || !(k4 || k5) || SH != 2 || SW != 2 || DH != 1 || DW != 1) return false;
  const int64_t N = x.size(0), Ci = x.size(1), H = x.size(2), W = x.size(3), Co = w.size(1);
  if (N == 0 || Ci == 0 || Co == 0 || H == 0 || W == 0 || Hout != 2 * H || Wout != 2 * W || w.size(0) != Ci ||
      w.size(2) != KH || w.size(3) != KW)
    return false;
  if (!plain_nchw(x) || !plain_nchw(w)) return false;
  return mode == KernelMode::kAlways || (k4 ? auto_takes(N, Ci, Co, H, W) : auto_takes5(N, Ci, Co, H, W));
}

bool winograd_s2_conv2d_takes(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const int mode = g_mode.get();
  if (mode == KernelMode::kNever) return false;
  if (x.scalar_type() != at::kFloat || w.scalar_type() != at::kFloat || x.dim() != 4 || w.dim() != 4) return false;
  if (groups != 1 || stride.size() != 2 || padding.size() != 2 || dilation.size() != 2) return false;
  const int64_t k = w.size(2);
  if (!((k == 4 && padding[0] == 1) || (k == 5 && padding[0] == 2)) || w.size(3) != k || padding[1] != padding[0])
    return false;
  if (stride[0] != 2 || stride[1] != 2 || dilation[0] != 1 || dilation[1] != 1) return false;
  const int64_t N = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3), Cout = w.size(0);
  if (N == 0 || Cin == 0 || Cout == 0 || H == 0 || W == 0 || H % 2 != 0 || W % 2 != 0 || w.size(1) != Cin) return false;
  if (!plain_nchw(x) || !plain_nchw(w)) return false;
  // the transposed convolution whose grad_input this is: C_out -> C_in channels, H/2 x W/2 input
  return mode == KernelMode::kAlways ||
         (k == 4 ? auto_takes(N, Cout, Cin, H / 2, W / 2) : auto_takes5(N, Cout, Cin, H / 2, W / 2));
}

at::Tensor winograd_conv_transpose_s2(const at::Tensor& x_in, const at::Tensor& w_in) {
  TORCH_CHECK(x_in.device().is_cpu() && w_in.device().is_cpu() && x_in.scalar_type() == at::kFloat &&
                  w_in.scalar_type() == at::kFloat && x_in.dim() == 4 && w_in.dim() == 4 &&
                  (w_in.size(2) == 4 || w_in.size(2) == 5) && w_in.size(3) == w_in.size(2) &&
                  w_in.size(0) == x_in.size(1),
              "conv_transpose2d: unexpected arguments of the Winograd product");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  if (!weight_range_ok(w.data_ptr<float>(), w.numel())) return at::Tensor();
  const bool k5 = w.size(2) == 5;
  WGeo g = geometry_of(x.size(0), x.size(1), w.size(1), x.size(2), x.size(3));
  const int64_t cols = k5 ? 4 * g.Cop : g.Cop;  // k5: the four phases' columns side by side
  g.ldu = g.Cip * cols + kPadFloats;
  if (!input_local_range_ok(x.data_ptr<float>(), g, false)) return at::Tensor();
  at::Tensor y = at::empty({g.N, g.Co, 2 * g.H, 2 * g.W}, x.options());
  const int64_t cob = g.Cop / kLanes, cib = g.Cip / kLanes;
  const bool ok = winograd_run(g, k5 ? 36 : 100, g.Cip, cols, g.Cip != g.Ci, g.Ci, cob, cib, cob,
                               g.PH * g.PW * kLanes, w.data_ptr<float>(), x.data_ptr<float>(), y.data_ptr<float>(),
                               k5 ? weight_block5 : weight_block, k5 ? input_block5 : input_block,
                               k5 ? output_block5 : output_block, x.options());
  if (!ok) return at::Tensor();
  g_products.fetch_add(1, std::memory_order_relaxed);
  return y;
}

at::Tensor winograd_conv_transpose_s2_grad_input(const at::Tensor& dz_in, const at::Tensor& w_in, int64_t H,
                                                 int64_t W) {
  const at::Tensor dz = dz_in.contiguous(), w = w_in.contiguous();
  TORCH_CHECK(dz.device().is_cpu() && w.device().is_cpu() && dz.scalar_type() == at::kFloat &&
                  w.scalar_type() == at::kFloat && dz.dim() == 4 && w.dim() == 4 &&
                  (w.size(2) == 4 || w.size(2) == 5) && w.size(3) == w.size(2) && dz.size(1) == w.size(1) &&
                  dz.size(2) == 2 * H && dz.size(3) == 2 * W,
              "conv_transpose2d: unexpected arguments of the Winograd grad_input");
  if (!weight_range_ok(w.data_ptr<float>(), w.numel())) return at::Tensor();
  const bool k5 = w.size(2) == 5;
  WGeo g = geometry_of(dz.size(0), w.size(0), w.size(1), H, W);
  g.ldu = 4 * g.Cop * g.Cip + kPadFloats;
  if (!input_local_range_ok(dz.data_ptr<float>(), g, true)) return at::Tensor();
  at::Tensor dx = at::empty({g.N, g.Ci, H, W}, dz.options());
  const int64_t cob = g.Cop / kLanes, cib = g.Cip / kLanes;
  const bool ok = winograd_run(g, k5 ? 36 : 25, 4 * g.Cop, g.Cip, g.Cop != g.Co, g.Co, cib, cob, cib,
                               4 * g.PH * g.PW * kLanes, w.data_ptr<float>(), dz.data_ptr<float>(),
                               dx.data_ptr<float>(), k5 ? weight_block5_bwd : weight_block_bwd,
                               k5 ? input_block5_bwd : input_block_bwd, k5 ? output_block5_bwd : output_block_bwd,
                               dz.options());
  if (!ok) return at::Tensor();
  g_products.fetch_add(1, std::memory_order_relaxed);
  return dx;
}

void set_cpu_winograd(const std::string& mode) { g_mode.set("set_cpu_winograd", mode); }

int64_t cpu_winograd_products() { return g_products.load(std::memory_order_relaxed); }

std::string cpu_winograd() { return g_mode.name(); }

}  // namespace genfast
