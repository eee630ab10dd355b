// The CPU Linear layer's backward products by our own AVX2 GEMM, for MLP batches ("the linear
// GEMM"): grad_input dx = dz w and grad_weight dw = dz^T x.
//
// Why: an MLP GAN's training step is its Linear products (64 rows, 100-1024 features) and the
// optimiser. On the CI CPU (AMD EPYC, AVX2, 2 cores; 39 GFLOP/s per core with a register-only
// FMA loop) MKL's sgemm ran these products at 33-35 GFLOP/s on one thread and 47-64 GFLOP/s on
// two, 45-58 GFLOP/s inside the step (torch.profiler); genfast's backward had run grad_input and
// grad_weight side by side, one MKL thread each (linear_products). A 4 x 16 register tile (the
// tap product's: 8 AVX2 accumulators, csrc/cpu/conv_transpose_taps.cpp) over operands laid out so
// that each thread streams its own part of the weight ran, per call with a fresh output
// (interleaved with MKL's through torch, 64 rows): grad_input 1.1-1.2x MKL's two-thread product
// (57-65 against 47-59 GFLOP/s), grad_weight 0.95-1.05x (53-62 GFLOP/s, as MKL); the backward
// of a layer 1.0-1.09x genfast's side-by-side MKL products. In the training step the gain is
// smaller: the converted MLP GAN and conditional GAN steps ran 1.10-1.11x eager with these two
// against 1.08-1.10x with MKL's (five interleaved A/B runs, the same process).
// The same tile for the forward (pt = w x^T from x packed as (K, rows)) ran 0.88-0.99x MKL's
// transposed product with our epilogue, and 0.91-0.97x eager at two MLP layers under no_grad
// (64 x 512 -> 256, 64 x 256 -> 512), so the forward stays MKL's. Smaller layers (fewer than 128
// input or output features, or fewer than 16 rows) tied or lost against MKL (0.93-1.03x), so
// "auto" leaves them to MKL.
//
// Both products as tiles of 4 rows x 16 columns, every output value the direct sum of its terms
// in increasing order (one fixed order, whatever the thread count: deterministic and equal
// across thread counts):
//   grad_input dx (M, K) = dz w: tile rows = 4 rows of dz (broadcast), columns = 16 columns of
//              w, packed per 16-column panel (N x 16, contiguous: w's own rows are K apart, and
//              at K = 1024 the 4 KB stride maps every row to one L1 set), depth = N in one run.
//              Threads own panels.
//   grad_weight dw (N, K) = dz^T x: tile rows = 4 columns of dz (packed once as (N / 4, M, 4)),
//              columns = 16 columns of x (packed per panel as M x 16), depth = M. Threads own
//              blocks of 4 rows of dw, so each writes its part of dw once.
// Edges: the last tile of rows or columns computes with a repeated row or zero-padded columns
// and stores only the values inside the output, so padding meets only values that are
// discarded; an inf or NaN reaches exactly the gradients of its direct sums (as in torch's
// float64 product; MKL's float32 product gives the same pattern).
// Under "auto": an AVX2 CPU without AVX-512 (MKL's AVX-512 kernels are beyond an AVX2 kernel's
// reach), more than one thread (on one thread MKL's kernel ran as fast as ours), 16 to 128 rows
// and at least 128 input and output features.
#include "linear_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "../common/cpu_features.h"
#include "../common/kernel_mode.h"

#if GENFAST_X86_INTRINSICS
#include <immintrin.h>
#define GENFAST_LG_TARGET __attribute__((target("avx2,fma")))
#endif

namespace genfast {
namespace {

constexpr int64_t kMR = 4;              // rows per register tile
constexpr int64_t kNR = 16;             // columns per register tile (two AVX2 vectors)
constexpr int64_t kAutoRowsMin = 16, kAutoRowsMax = 128, kAutoFeaturesMin = 128;

KernelMode g_mode;
std::atomic<int64_t> g_products{0};

#if GENFAST_X86_INTRINSICS
// o[r * os + j] = sum_k a[r][k * as] * b[k * bs + j] for r < rows, j < cols (a: kMR row
// pointers, the ones past `rows` repeating a valid row; b: 16 values per step, zeros past cols).
// The loop is the tap product's tile_4x16 / tile_sum with strided row pointers, written out
// again on purpose: a shared helper over a struct of the 8 accumulators ran those 1.5x slower
// (the accumulators left the registers).
GENFAST_LG_TARGET void tile(int64_t kc, const float* const* a, int64_t as, const float* b, int64_t bs, float* o,
                            int64_t os, int64_t rows, int64_t cols) {
  const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3];
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 v = _mm256_broadcast_ss(a0);
    c00 = _mm256_fmadd_ps(v, b0, c00);
    c01 = _mm256_fmadd_ps(v, b1, c01);
    v = _mm256_broadcast_ss(a1);
    c10 = _mm256_fmadd_ps(v, b0, c10);
    c11 = _mm256_fmadd_ps(v, b1, c11);
    v = _mm256_broadcast_ss(a2);
    c20 = _mm256_fmadd_ps(v, b0, c20);
    c21 = _mm256_fmadd_ps(v, b1, c21);
    v = _mm256_broadcast_ss(a3);
    c30 = _mm256_fmadd_ps(v, b0, c30);
    c31 = _mm256_fmadd_ps(v, b1, c31);
    a0 += as;
    a1 += as;
    a2 += as;
    a3 += as;
    b += bs;
  }
  if (rows == kMR && cols == kNR) {
    _mm256_storeu_ps(o, c00);
    _mm256_storeu_ps(o + 8, c01);
    _mm256_storeu_ps(o + os, c10);
    _mm256_storeu_ps(o + os + 8, c11);
    _mm256_storeu_ps(o + 2 * os, c20);
    _mm256_storeu_ps(o + 2 * os + 8, c21);
    _mm256_storeu_ps(o + 3 * os, c30);
    _mm256_storeu_ps(o + 3 * os + 8, c31);
    return;
  }
  float t[kMR * kNR];
  _mm256_storeu_ps(t, c00);
  _mm256_storeu_ps(t + 8, c01);
  _mm256_storeu_ps(t + 16, c10);
  _mm256_storeu_ps(t + 24, c11);
  _mm256_storeu_ps(t + 32, c20);
  _mm256_storeu_ps(t + 40, c21);
  _mm256_storeu_ps(t + 48, c30);
  _mm256_storeu_ps(t + 56, c31);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j) o[r * os + j] = t[r * kNR + j];
}

// The kMR row pointers of the tile whose first row is base + r0 * stride (rows past `rows` repeat
// the last valid one)
inline void row_pointers(const float* base, int64_t r0, int64_t stride, int64_t rows, const float** a) {
  for (int64_t r = 0; r < kMR; ++r) a[r] = base + (r0 + std::min(r, rows - 1)) * stride;
}

// p[i * kNR + j] = src[i * ld + j] for j < cols, 0 for cols <= j < kNR (i < n)
GENFAST_LG_TARGET void pack_panel(const float* src, int64_t ld, int64_t n, int64_t cols, float* p) {
  if (cols == kNR) {
    for (int64_t i = 0; i < n; ++i) {
      _mm256_storeu_ps(p + i * kNR, _mm256_loadu_ps(src + i * ld));
      _mm256_storeu_ps(p + i * kNR + 8, _mm256_loadu_ps(src + i * ld + 8));
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < kNR; ++j) p[i * kNR + j] = j < cols ? src[i * ld + j] : 0.f;
}
#endif

void check_call(const char* what) {
  TORCH_CHECK(cpu_avx2_fma(), "linear: genfast's ", what, " needs a CPU with AVX2 and FMA");
}

}  // namespace

bool linear_gemm_takes(const at::Tensor& x, const at::Tensor& w) {
  const int mode = g_mode.get();
  if (mode == KernelMode::kNever || !cpu_avx2_fma()) return false;
  if (x.scalar_type() != at::kFloat || w.scalar_type() != at::kFloat || x.dim() != 2 || w.dim() != 2) return false;
  if (!x.is_cpu() || !w.is_cpu() || !x.is_contiguous() || !w.is_contiguous() || x.size(1) != w.size(1)) return false;
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  if (M < 1 || K < 1 || N < 1) return false;
  if (mode == KernelMode::kAlways) return true;
  return !cpu_avx512() && at::get_num_threads() > 1 && M >= kAutoRowsMin && M <= kAutoRowsMax &&
         K >= kAutoFeaturesMin && N >= kAutoFeaturesMin;
}

at::Tensor linear_gemm_grad_input(const at::Tensor& dz, const at::Tensor& w) {
  check_call("grad_input product");
  const int64_t M = dz.size(0), N = dz.size(1), K = w.size(1);
  const int64_t KT = (K + kNR - 1) / kNR;
  at::Tensor dx = at::empty({M, K}, dz.options());
#if GENFAST_X86_INTRINSICS
  const at::Tensor dzc = dz.contiguous(), wc = w.contiguous();
  const float* dd = dzc.data_ptr<float>();
  const float* wd = wc.data_ptr<float>();
  float* o = dx.data_ptr<float>();
  at::parallel_for(0, KT, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> panel(static_cast<size_t>(N * kNR));
    const float* a[kMR];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t k = p * kNR, cols = std::min(kNR, K - k);
      pack_panel(wd + k, K, N, cols, panel.data());
      for (int64_t m = 0; m < M; m += kMR) {
        const int64_t rows = std::min(kMR, M - m);
        row_pointers(dd, m, N, rows, a);
        tile(N, a, 1, panel.data(), kNR, o + m * K + k, K, rows, cols);
      }
    }
  });
  g_products.fetch_add(1, std::memory_order_relaxed);
#endif
  return dx;
}

at::Tensor linear_gemm_grad_weight(const at::Tensor& dz, const at::Tensor& x) {
  check_call("grad_weight product");
  const int64_t M = dz.size(0), N = dz.size(1), K = x.size(1);
  const int64_t NT = (N + kMR - 1) / kMR, KT = (K + kNR - 1) / kNR;
  at::Tensor dw = at::empty({N, K}, dz.options());
#if GENFAST_X86_INTRINSICS
  const at::Tensor dzc = dz.contiguous(), xc = x.contiguous();
  const float* dd = dzc.data_ptr<float>();
  const float* xd = xc.data_ptr<float>();
  float* o = dw.data_ptr<float>();
  // dzp[(t * M + m) * kMR + r] = dz[m, t * kMR + r], zeros past N
  std::vector<float> dzp(static_cast<size_t>(NT * M * kMR), 0.f);
  at::parallel_for(0, NT, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t rows = std::min(kMR, N - t * kMR);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t r = 0; r < rows; ++r) dzp[(t * M + m) * kMR + r] = dd[m * N + t * kMR + r];
    }
  });
  at::parallel_for(0, NT, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> panel(static_cast<size_t>(M * kNR));
    const float* a[kMR];
    for (int64_t p = 0; p < KT; ++p) {
      const int64_t k = p * kNR, cols = std::min(kNR, K - k);
      pack_panel(xd + k, K, M, cols, panel.data());
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n = t * kMR, rows = std::min(kMR, N - n);
        const float* base = dzp.data() + t * M * kMR;
        for (int64_t r = 0; r < kMR; ++r) a[r] = base + r;  // the zero columns past N are never stored
        tile(M, a, kMR, panel.data(), kNR, o + n * K + k, K, rows, cols);
      }
    }
  });
  g_products.fetch_add(1, std::memory_order_relaxed);
#endif
  return dw;
}

void set_cpu_linear_gemm(const std::string& mode) { g_mode.set("set_cpu_linear_gemm", mode); }

std::string cpu_linear_gemm() { return g_mode.name(); }

int64_t cpu_linear_products() { return g_products.load(std::memory_order_relaxed); }

}  // namespace genfast
