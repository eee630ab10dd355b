// BatchNorm + activation on the CPU: at::parallel_for over fixed-size blocks (results do not
// depend on the thread count), inner loops over contiguous memory written for the compiler to
// vectorise (`omp simd`). Reductions accumulate in double with 64-bit counts, per block then
// per channel in a fixed order; the batch mean is the total sum over the count (as torch: an inf
// input gives an inf running_mean). Normalisation is (x - mean) * gamma * invstd + beta. An
// (N, C) input is read as N rows of C channels (vector loads across channels), one channel as
// one long row, and short rows (L <= 16) as N rows of C * L virtual channels (see bn_view).
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

#include <cmath>
#include <type_traits>
#include <vector>

#include "../common/batchnorm_act.h"
#include "../common/tensor_layout.h"

namespace genfast {
namespace {

// Elements per task along a contiguous row (NCL): a chunk is re-read from cache by the two-pass
// statistics, and a row longer than this (e.g. N = C = 1) is split so that it still runs in
// parallel and its partial sums stay short.
constexpr int64_t kChunk = 16384;
// Sums and statistics accumulate in double whatever the input dtype: float partials saturate
// (2^24 ones sum to 2^24 in float) and lose the mean at large offsets, as torch's CPU kernels
// (which accumulate in double) do not.
using red_t = double;

// (N, C) / channels-last blocks: 64K elements (256 KB of float32, read twice from L2), so that a
// wide BatchNorm1d makes few partials (16K-element blocks made 16 partial rows of 4096 channels
// for a (64, 4096) batch, whose strided merge cost more than the reads). Tiled blocks (below)
// hold 64K elements of kTileC channels each.
constexpr int64_t kRowBlockElems = 65536;
constexpr int64_t kTileC = 256;
int64_t nlc_rows_per_block(int64_t C) { return std::max<int64_t>(1, kRowBlockElems / std::max<int64_t>(C, 1)); }

// NCL rows of at most kShortRow values (e.g. BatchNorm2d on 4x4 maps, BatchNorm1d on (N, C, 4))
// are read as N rows of C * L "virtual channels" (channels-last with C * L channels), each real
// channel being L consecutive virtual ones whose statistics and sums are merged at the end: one
// partial per row of L values and a scalar loop per row ran up to 2x slower than torch's kernel
// for (64, 1024, 4) and (256, 256, 3) on the CI CPU (virtual channels: 2.7x and 6x faster than
// torch's there, forward; 5x and 7x forward + backward). Up to kMaxVirtualChannels virtual
// channels: a block of 64K elements then holds at least 16 rows, and the partials (one per
// virtual channel and block) stay a fraction of the input; (64, 1024, 16) as 16384 virtual
// channels ran 2.3x slower than as rows.
constexpr int64_t kShortRow = 16;
constexpr int64_t kMaxVirtualChannels = 4096;

// The view the CPU kernels iterate, and G, the virtual channels per channel (v.C = C * G).
struct BnView {
  ChannelView v;
  int64_t G;
  int64_t C() const { return v.C / G; }
  // values per channel
  double count() const { return static_cast<double>(v.N) * static_cast<double>(v.L) * static_cast<double>(G); }
};

// channel_view, then a single channel as one long row (both layouts are then the same
// contiguous run), L == 1 as channels-last (N rows of C values: BatchNorm1d on (N, C) reduces
// over rows with vector loads across channels instead of treating each element as a row of
// length 1) and short rows as virtual channels (above).
BnView bn_view(at::Tensor& t) {
  ChannelView v = channel_view(t);
  if (v.C == 1) return {{RowLayout::kNCL, 1, 1, v.N * v.L}, 1};
  if (v.layout == RowLayout::kNCL && v.L == 1) return {{RowLayout::kNLC, v.N, v.C, 1}, 1};
  if (v.layout == RowLayout::kNCL && v.L > 1 && v.L <= kShortRow && v.C * v.L <= kMaxVirtualChannels)
    return {{RowLayout::kNLC, v.N, v.C * v.L, 1}, v.L};
  return {v, 1};
}

// Per-channel coefficients repeated for the G virtual channels of each channel.
// Per-channel coefficients for the kernels: the vector itself, or repeated for the G virtual
// channels of each channel.
template <typename T>
const std::vector<T>& per_virtual(const std::vector<T>& x, int64_t G, std::vector<T>& buf) {
  if (G == 1) return x;
  buf.resize(x.size() * G);
  for (size_t c = 0; c < x.size(); ++c)
    for (int64_t g = 0; g < G; ++g) buf[c * G + g] = x[c];
  return buf;
}

// NLC tiles: a block of rows is also cut into channel ranges of kTileC channels when C is wider
// and a tile still holds at least kMinTileElems elements, so that a (64, 1024) BatchNorm1d batch
// (one 64K-element block) runs as 4 tasks on several threads instead of one. A tile's partial
// sums go to its own channels of its block's partial row: the merge is unchanged.
constexpr int64_t kMinTileElems = 8192;

// Work decomposition. NCL: each of the N*C rows is cut into `cpr` chunks of at most kChunk
// elements; task t is chunk t % cpr of row t / cpr (channel (t / cpr) % C). NLC: the N*L rows
// of C values go in `nb` blocks of `R` rows, each cut into `nc` tiles of `cw` channels; task t
// is tile t % nc of block t / nc.
struct Tasks {
  int64_t cpr;  // NCL: chunks per row
  int64_t R;    // NLC: rows per block
  int64_t n;    // number of tasks
  int64_t nb;   // NLC: row blocks
  int64_t cw;   // NLC: channels per tile
  int64_t nc;   // NLC: tiles per block
};

Tasks make_tasks(const ChannelView& v) {
  if (v.layout == RowLayout::kNCL) {
    const int64_t cpr = std::max<int64_t>(1, (v.L + kChunk - 1) / kChunk);
    return {cpr, 0, v.L > 0 ? v.N * v.C * cpr : 0, 0, 0, 0};
  }
  // tiles of kTileC channels by kRowBlockElems / kTileC rows wherever a tile holds at least
  // kMinTileElems values; else blocks of whole rows. (Blocks of 64K elements across all of C, the
  // only form for C > 2048 before, made 8 rows of 8192 channels for a (64, 8192) batch: 8 tasks
  // and 8 partials per channel merged on one thread, 0.68x torch's forward.)
  const int64_t rows = v.N * v.L, Rt = kRowBlockElems / kTileC;
  const bool tiled = v.C > kTileC && std::min(Rt, rows) * kTileC >= kMinTileElems;
  const int64_t R = tiled ? Rt : nlc_rows_per_block(v.C);
  const int64_t nb = (rows + R - 1) / R;
  const int64_t cw = tiled ? kTileC : v.C;
  const int64_t nc = cw > 0 ? (v.C + cw - 1) / cw : 0;
  return {1, R, nb * nc, nb, cw, nc};
}

// Rows [lo, hi) and channels [c0, c1) of NLC task t.
inline void nlc_tile(const Tasks& tk, const ChannelView& v, int64_t t, int64_t* lo, int64_t* hi, int64_t* c0,
                     int64_t* c1) {
  const int64_t b = t / tk.nc, j = t % tk.nc;
  *lo = b * tk.R;
  *hi = std::min(v.N * v.L, *lo + tk.R);
  *c0 = j * tk.cw;
  *c1 = std::min(v.C, *c0 + tk.cw);
}

// The NCL tasks t0, t0 + 1, ... in order: row r = n * C + c and chunk k of that row, advanced
// without a division per task (an NCL row of a 7x7 plane is 49 values: a division per row cost
// as much as the row's arithmetic).
struct NclCursor {
  int64_t r, k, n, c;
  NclCursor(const Tasks& tk, const ChannelView& v, int64_t t) {
    r = t / tk.cpr;
    k = t % tk.cpr;
    n = r / v.C;
    c = r % v.C;
  }
  void next(const Tasks& tk, const ChannelView& v) {
    if (++k < tk.cpr) return;
    k = 0;
    ++r;
    if (++c == v.C) {
      c = 0;
      ++n;
    }
  }
};

// Grain for at::parallel_for over the tasks of an elementwise pass: about 4096 elements.
int64_t elementwise_grain(const Tasks& tk, const ChannelView& v) {
  const int64_t per_task = v.layout == RowLayout::kNCL ? std::min(v.L, kChunk) : tk.R * tk.cw;
  return std::max<int64_t>(1, 4096 / std::max<int64_t>(per_task, 1));
}

// Grain (rows) for at::parallel_for over the rows of an NLC elementwise pass: about 4096 elements.
int64_t nlc_elementwise_grain(int64_t C) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)); }

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

// Statistics of one NLC block (`rows` rows of C channels, row stride C) into part[0..C): one read
// of the block, row by row over kW channels at a time, whose sums stay in L1 (two passes over
// all C channels per row were 3x slower at (256, 1024); kW channels per row with the sums in
// registers read the block with a stride of C and missed L1 on every row).
// Sums of d = x - k and d^2 in double, shifted by a pivot k per channel (the block's first
// value, or 0 when that is not finite) so that M2 = sum d^2 - (sum d)^2 / n does not cancel for
// a mean far from 0; an infinite or NaN input still gives an infinite or NaN sum and a NaN M2.
// x points at the tile's first element; rows are `stride` apart and hold `C` channels of the tile.
template <typename scalar_t>
GENFAST_SIMD_CLONES void nlc_block_stats(const scalar_t* x, int64_t rows, int64_t stride, int64_t C, SumPartial<red_t>* part) {
  constexpr int64_t kW = 256;
  const red_t n = static_cast<red_t>(rows);
  alignas(64) red_t k[kW], s[kW], q[kW];
  for (int64_t c0 = 0; c0 < C; c0 += kW) {
    const int64_t w = std::min(kW, C - c0);
    for (int64_t j = 0; j < w; ++j) {
      const red_t v = static_cast<red_t>(x[c0 + j]);
      k[j] = std::isfinite(v) ? v : red_t(0);
      s[j] = 0;
      q[j] = 0;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* p = x + r * stride + c0;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) {
        const red_t d = static_cast<red_t>(p[j]) - k[j];
        s[j] += d;
        q[j] += d * d;
      }
    }
    for (int64_t j = 0; j < w; ++j) {
      red_t m2 = q[j] - s[j] * (s[j] / n);
      if (m2 < 0) m2 = 0;  // rounding; NaN stays NaN
      red_t sum = k[j] * n + s[j];
      if (!std::isfinite(sum)) {
        // an inf or NaN input, or a float64 sum past the largest double: the plain sum, whose
        // sign is torch's (k * n + s with an infinite s gave -inf for a sum of +1.7e308 values)
        sum = 0;
        for (int64_t r = 0; r < rows; ++r) sum += static_cast<red_t>(x[r * stride + c0 + j]);
      }
      part[c0 + j] = SumPartial<red_t>{rows, sum, m2};
    }
  }
}

// Sum and M2 (about the chunk's own mean) of n contiguous values.
template <typename scalar_t>
GENFAST_INLINE void ncl_chunk_stats(const scalar_t* p, int64_t n, red_t* sum, red_t* m2) {
  red_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += static_cast<red_t>(p[i]);
  const red_t m = s / red_t(n);
  red_t q = 0;
#pragma omp simd reduction(+ : q)
  for (int64_t i = 0; i < n; ++i) {
    const red_t d = static_cast<red_t>(p[i]) - m;
    q += d * d;
  }
  *sum = s;
  *m2 = q;
}

// NCL tasks [t0, t1): each chunk's partial at part[(c * N + n) * cpr + k].
template <typename scalar_t>
GENFAST_SIMD_CLONES void ncl_stats_tasks(const scalar_t* x, const ChannelView& v, const Tasks& tk, int64_t t0,
                                         int64_t t1, SumPartial<red_t>* part) {
  NclCursor q(tk, v, t0);
  for (int64_t t = t0; t < t1; ++t, q.next(tk, v)) {
    const int64_t lo = q.k * kChunk, hi = std::min(v.L, lo + kChunk);
    red_t s, m2;
    ncl_chunk_stats(x + q.r * v.L + lo, hi - lo, &s, &m2);
    part[(q.c * v.N + q.n) * tk.cpr + q.k] = SumPartial<red_t>{hi - lo, s, m2};
  }
}

// Per-channel statistics of x (count, mean, M2) from one read of x (each chunk or block is
// re-read from cache): double partials per task, merged per channel in a fixed order.
template <typename scalar_t>
std::vector<Welford<red_t, int64_t>> channel_stats(const scalar_t* x, const BnView& bv) {
  const ChannelView& v = bv.v;
  const int64_t C = v.C, G = bv.G;
  const Tasks tk = make_tasks(v);
  std::vector<SumPartial<red_t>> part;
  std::vector<Welford<red_t, int64_t>> out(bv.C(), welford_init<red_t, int64_t>());
  if (tk.n == 0) return out;
  if (v.layout == RowLayout::kNCL) {
    // Channel-major partials: part[(c * N + n) * cpr + k], so that a channel's are contiguous.
    part.resize(tk.n);
    at::parallel_for(0, tk.n, 1, [&](int64_t t0, int64_t t1) { ncl_stats_tasks(x, v, tk, t0, t1, part.data()); });
    for (int64_t c = 0; c < C; ++c) out[c] = merge_sum_partials(part.data() + c * v.N * tk.cpr, v.N * tk.cpr, 1);
  } else {
    part.resize(tk.nb * C);
    at::parallel_for(0, tk.n, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        int64_t lo, hi, c0, c1;
        nlc_tile(tk, v, t, &lo, &hi, &c0, &c1);
        nlc_block_stats(x + lo * C + c0, hi - lo, C, c1 - c0, part.data() + (t / tk.nc) * C + c0);
      }
    });
    if (G == 1 && tk.nb == 1) {
      // one partial per channel, all of the same count: the mean by one reciprocal (the merge's
      // shortcut divides per channel; a wide, short batch's statistics were division-bound)
      const red_t inv = red_t(1) / static_cast<red_t>(v.N * v.L);
      for (int64_t c = 0; c < C; ++c) {
        const SumPartial<red_t>& q = part[c];
        out[c] = q.sum - q.sum == red_t(0) ? Welford<red_t, int64_t>{q.count, q.sum * inv, q.m2}
                                           : merge_sum_partials(&q, 1, 1);
      }
    } else if (G == 1) {
      for (int64_t c = 0; c < C; ++c) out[c] = merge_sum_partials(part.data() + c, tk.nb, C);
    } else {
      // a channel's partials: block by block, its G virtual channels in order
      std::vector<SumPartial<red_t>> mine(tk.nb * G);
      for (int64_t c = 0; c < bv.C(); ++c) {
        for (int64_t blk = 0; blk < tk.nb; ++blk)
          for (int64_t g = 0; g < G; ++g) mine[blk * G + g] = part[blk * C + c * G + g];
        out[c] = merge_sum_partials(mine.data(), tk.nb * G, 1);
      }
    }
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

// y = act((x - m) * a + b) over n contiguous values with one channel's coefficients ...
template <typename scalar_t, typename acc_t, int act>
GENFAST_INLINE void normalize_run(const scalar_t* p, scalar_t* o, int64_t n, acc_t mc, acc_t ac, acc_t bc,
                                  acc_t slope) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i)
    o[i] = static_cast<scalar_t>(bn_act_forward_elem_c<act, acc_t>(static_cast<acc_t>(p[i]), mc, ac, bc, slope));
}

// ... and with per-element coefficients (n values of consecutive channels).
template <typename scalar_t, typename acc_t, int act>
GENFAST_SIMD_CLONES void normalize_vec(const scalar_t* p, scalar_t* o, int64_t n, const acc_t* m, const acc_t* a,
                                       const acc_t* b, acc_t slope) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i)
    o[i] = static_cast<scalar_t>(bn_act_forward_elem_c<act, acc_t>(static_cast<acc_t>(p[i]), m[i], a[i], b[i], slope));
}

// NCL tasks [t0, t1) of the normalisation.
template <typename scalar_t, typename acc_t, int act>
GENFAST_SIMD_CLONES void ncl_normalize_tasks(const scalar_t* x, scalar_t* y, const ChannelView& v, const Tasks& tk,
                                             int64_t t0, int64_t t1, const acc_t* m, const acc_t* a, const acc_t* b,
                                             acc_t slope) {
  NclCursor q(tk, v, t0);
  for (int64_t t = t0; t < t1; ++t, q.next(tk, v)) {
    const int64_t lo = q.k * kChunk, hi = std::min(v.L, lo + kChunk), off = q.r * v.L + lo;
    normalize_run<scalar_t, acc_t, act>(x + off, y + off, hi - lo, m[q.c], a[q.c], b[q.c], slope);
  }
}

// y = act((x - mean) * scale + beta) per channel.
template <typename scalar_t, typename acc_t, int act>
void normalize_act(const scalar_t* x, scalar_t* y, const BnView& bv, const std::vector<acc_t>& mean_c,
                   const std::vector<acc_t>& scale_c, const std::vector<acc_t>& beta_c, acc_t slope_in) {
  const ChannelView& v = bv.v;
  const int64_t C = v.C;
  std::vector<acc_t> buf[3];
  const std::vector<acc_t>& mean = per_virtual(mean_c, bv.G, buf[0]);
  const std::vector<acc_t>& scale = per_virtual(scale_c, bv.G, buf[1]);
  const std::vector<acc_t>& beta = per_virtual(beta_c, bv.G, buf[2]);
  if (v.layout == RowLayout::kNLC) {
    // NLC: contiguous ranges of whole rows per thread (an elementwise pass keeps no partials, so
    // it need not follow the statistics' tiles: tiles of 256-channel pieces of 4 KB rows ran 2x
    // slower than whole rows for (256, 1024) float32 on the CI CPU). A range is one contiguous
    // run whose channel repeats with period C; the coefficients are repeated to a period P (a
    // multiple of C, at least kMinPeriod) so that the inner loop stays long when C is small
    // (e.g. (N, 16) inputs).
    const int64_t rows = v.N * v.L;
    if (rows == 0 || C == 0) return;
    constexpr int64_t kMinPeriod = 256;
    const int64_t P = C * std::max<int64_t>(1, kMinPeriod / C);
    std::vector<acc_t> mp(P), ap(P), bp(P);
    for (int64_t j0 = 0; j0 < P; j0 += C) {
      std::copy(mean.begin(), mean.end(), mp.begin() + j0);
      std::copy(scale.begin(), scale.end(), ap.begin() + j0);
      std::copy(beta.begin(), beta.end(), bp.begin() + j0);
    }
    at::parallel_for(0, rows, nlc_elementwise_grain(C), [&](int64_t r0, int64_t r1) {
      const acc_t slope = slope_in;  // a private copy per thread
      const int64_t n = (r1 - r0) * C;
      const scalar_t* p = x + r0 * C;
      scalar_t* o = y + r0 * C;
      for (int64_t j = 0; j < n; j += P)
        normalize_vec<scalar_t, acc_t, act>(p + j, o + j, std::min(P, n - j), mp.data(), ap.data(), bp.data(), slope);
    });
    return;
  }
  const Tasks tk = make_tasks(v);
  if (tk.n == 0) return;
  const acc_t* m = mean.data();
  const acc_t* a = scale.data();
  const acc_t* b = beta.data();
  at::parallel_for(0, tk.n, elementwise_grain(tk, v), [&](int64_t t0, int64_t t1) {
    ncl_normalize_tasks<scalar_t, acc_t, act>(x, y, v, tk, t0, t1, m, a, b, slope_in);
  });
}

// Writes v into a freshly allocated (contiguous) (C,) tensor t.
template <typename param_t, typename acc_t>
void store_param(at::Tensor& t, const std::vector<acc_t>& v) {
  param_t* d = t.data_ptr<param_t>();
  for (size_t c = 0; c < v.size(); ++c) d[c] = static_cast<param_t>(v[c]);
}

// Element c of a 1-D tensor, read or written through its stride (so a strided view such as
// base[::2] gets its own elements, an expanded stride-0 view its single element, and nothing
// outside the tensor is touched), converted from / to double.
// Element c of a (C,) running buffer through its stride, in its own dtype. The pointer, stride
// and dtype are read once (data_ptr's checks per element cost more than the whole update of a
// wide BatchNorm1d: 4096 channels took ~1 ms).
struct ParamAccess {
  char* base = nullptr;
  int64_t stride = 0;
  at::ScalarType type = at::kFloat;

  explicit ParamAccess(const at::Tensor& t)
      : base(static_cast<char*>(t.data_ptr())), stride(t.stride(0)), type(t.scalar_type()) {}

  double get(int64_t c) const {
    const int64_t i = c * stride;
    switch (type) {
      case at::kDouble: return reinterpret_cast<const double*>(base)[i];
      case at::kHalf: return static_cast<double>(reinterpret_cast<const at::Half*>(base)[i]);
      case at::kBFloat16: return static_cast<double>(reinterpret_cast<const at::BFloat16*>(base)[i]);
      default: return static_cast<double>(reinterpret_cast<const float*>(base)[i]);
    }
  }

  void set(int64_t c, double v) const {
    const int64_t i = c * stride;
    switch (type) {
      case at::kDouble: reinterpret_cast<double*>(base)[i] = v; break;
      case at::kHalf: reinterpret_cast<at::Half*>(base)[i] = static_cast<at::Half>(v); break;
      case at::kBFloat16: reinterpret_cast<at::BFloat16*>(base)[i] = static_cast<at::BFloat16>(v); break;
      default: reinterpret_cast<float*>(base)[i] = static_cast<float>(v); break;
    }
  }
};

// The training forward's per-channel finish (finish_stats: batch mean and invstd, running buffers
// updated in place) as branch-free loops over arrays, which the compiler vectorises, for the
// common case: running buffers both given or both absent, each (C,) with stride 1 in float32 or
// float64 and not overlapping the other. Every channel has the same count (the batch's N * L).
// A scalar loop over the Welford structs through strided accessors (the general path below) cost
// 20 ns per channel on the CI CPU: a (2, 4096) BatchNorm1d took 0.56x torch's forward time.
// Returns false (nothing written) where the general path must run. Same formulas, same order of
// operations as finish_stats, in red_t, rounded to the buffers' dtype.
template <typename param_t>
void update_running(param_t* p, const std::vector<red_t>& v, int64_t C, red_t momentum) {
  const red_t keep = red_t(1) - momentum;
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) p[c] = static_cast<param_t>(keep * static_cast<red_t>(p[c]) + momentum * v[c]);
}

bool running_buffer_ok(const c10::optional<at::Tensor>& t, int64_t C) {
  return t->dim() == 1 && t->size(0) == C && (t->stride(0) == 1 || C == 1) &&
         (t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble);
}

template <typename acc_t>
GENFAST_SIMD_CLONES bool finish_stats_vectorised(const std::vector<Welford<red_t, int64_t>>& st, double eps, double momentum,
                             const c10::optional<at::Tensor>& running_mean,
                             const c10::optional<at::Tensor>& running_var, bool have_rm, bool have_rv,
                             std::vector<acc_t>& mean, std::vector<acc_t>& invstd) {
  const int64_t C = static_cast<int64_t>(st.size());
  if (C == 0 || have_rm != have_rv) return false;
  const int64_t n = st[0].count;
  if (n <= 0) return false;
  for (int64_t c = 1; c < C; ++c)
    if (st[c].count != n) return false;
  if (have_rm) {
    if (!running_buffer_ok(running_mean, C) || !running_buffer_ok(running_var, C)) return false;
    const char *a = static_cast<const char*>(running_mean->data_ptr()), *b = static_cast<const char*>(running_var->data_ptr());
    const int64_t na = C * running_mean->element_size(), nb = C * running_var->element_size();
    if (a < b + nb && b < a + na) return false;  // overlapping buffers: the general path's channel order
  }
  std::vector<red_t> mu(C), m2(C);
  for (int64_t c = 0; c < C; ++c) {
    mu[c] = st[c].mean;
    m2[c] = st[c].m2;
  }
  // the divisions by the count as products with its reciprocal (within an ulp of float64, far
  // below the float32 results; a (2, 4096) batch's finish was division-bound)
  const red_t nd = static_cast<red_t>(n), e = static_cast<red_t>(eps), inv_n = red_t(1) / nd;
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const red_t var = m2[c] * inv_n;
    mean[c] = static_cast<acc_t>(mu[c]);
    invstd[c] = static_cast<acc_t>(red_t(1) / std::sqrt(var + e));
  }
  if (!have_rm) return true;
  const red_t mom = static_cast<red_t>(momentum);
  // unbiased variance into running_var (the biased one for a single value), as finish_stats
  std::vector<red_t> unbiased(C);
  const red_t inv_nu = red_t(1) / (n > 1 ? static_cast<red_t>(n - 1) : nd);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) unbiased[c] = m2[c] * inv_nu;
  if (running_mean->scalar_type() == at::kDouble) update_running(running_mean->data_ptr<double>(), mu, C, mom);
  else update_running(running_mean->data_ptr<float>(), mu, C, mom);
  if (running_var->scalar_type() == at::kDouble) update_running(running_var->data_ptr<double>(), unbiased, C, mom);
  else update_running(running_var->data_ptr<float>(), unbiased, C, mom);
  return true;
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
  const BnView v = bn_view(input);
  const int64_t C = input.size(1);
  const bool have_rm = running_mean.has_value() && running_mean->defined();
  const bool have_rv = running_var.has_value() && running_var->defined();
  TORCH_CHECK(training || (have_rm && have_rv),
              "batch_norm_act: running_mean and running_var are required when training=False");
  at::Tensor out = empty_bn_output(input);
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
      const std::vector<Welford<red_t, int64_t>> st = channel_stats<scalar_t>(x, v);
      if (!finish_stats_vectorised<acc_t>(st, eps, momentum, running_mean, running_var, have_rm, have_rv, mean,
                                          invstd)) {
      // The running buffers are read and written here, after every check has passed, channel
      // after channel through their views: an expanded (stride-0) buffer compounds the updates
      // in channel order, as torch's CPU kernel leaves it when it runs on one thread.
      const ParamAccess rma = have_rm ? ParamAccess(*running_mean) : ParamAccess(input);
      const ParamAccess rva = have_rv ? ParamAccess(*running_var) : ParamAccess(input);
      for (int64_t c = 0; c < C; ++c) {
        red_t m, is, rmc = 0, rvc = 0;
        if (have_rm) rmc = rma.get(c);
        if (have_rv) rvc = rva.get(c);
        finish_stats<red_t>(st[c], red_t(eps), red_t(momentum), &m, &is, have_rm ? &rmc : nullptr,
                            have_rv ? &rvc : nullptr);
        if (have_rm) rma.set(c, rmc);
        if (have_rv) rva.set(c, rvc);
        mean[c] = static_cast<acc_t>(m);
        invstd[c] = static_cast<acc_t>(is);
      }
      }
    } else {
      std::vector<acc_t> rm, rv;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean->scalar_type(), "bn_act_rs", [&] {
        rm = load_param<acc_t, scalar_t>(running_mean, C, acc_t(0));
        rv = load_param<acc_t, scalar_t>(running_var, C, acc_t(1));
      });
      mean = std::move(rm);
      const acc_t* var = rv.data();
      acc_t* is = invstd.data();
      const acc_t e = static_cast<acc_t>(eps);
_Pragma("omp simd")
      for (int64_t c = 0; c < C; ++c) is[c] = acc_t(1) / std::sqrt(var[c] + e);
    }
    std::vector<acc_t> scale(C);
    {
      const acc_t* g = gamma.data();
      const acc_t* is = invstd.data();
      acc_t* sc = scale.data();
      const acc_t floor = static_cast<acc_t>(gamma_floor);
_Pragma("omp simd")
      for (int64_t c = 0; c < C; ++c) sc[c] = effective_gamma<acc_t>(g[c], floor) * is[c];
    }
    // y = act((x - mean) * scale + beta) in both modes: the backward recomputes z with this same
    // formula, so that relu's and leaky_relu's masks agree with the output bit for bit (torch's
    // eval form x * alpha + (beta - mean * alpha), one load fewer per value, rounds differently
    // near z = 0: a positive output could then get a masked gradient)
    dispatch_act(activation, [&](auto a) {
      normalize_act<scalar_t, acc_t, decltype(a)::value>(x, out.data_ptr<scalar_t>(), v, mean, scale, beta,
                                                         acc_t(negative_slope));
    });
    std::copy(mean.begin(), mean.end(), save_mean.data_ptr<acc_t>());
    std::copy(invstd.begin(), invstd.end(), save_invstd.data_ptr<acc_t>());
  });
  return {bn_output_as_torch(out), save_mean, save_invstd};
}

// The backward's loops (multi-versioned as the forward's). One channel's n contiguous values:
// the sums of dz and dz * xhat ...
template <typename scalar_t, typename acc_t, int act, bool saved_is_output>
GENFAST_INLINE void bwd_sums_run(const scalar_t* pd, const scalar_t* ps, int64_t n, acc_t m, acc_t is, acc_t a,
                                 acc_t g, acc_t be, acc_t slope, red_t* sum, red_t* sum_x) {
  red_t s = 0, sx = 0;
#pragma omp simd reduction(+ : s, sx)
  for (int64_t i = 0; i < n; ++i) {
    const auto d = bn_act_dz_xhat_c<act, saved_is_output, acc_t>(static_cast<acc_t>(pd[i]), static_cast<acc_t>(ps[i]),
                                                                  m, is, m, a, be, g, be, slope);
    s += static_cast<red_t>(d.dz);
    sx += static_cast<red_t>(d.dz * d.xhat);
  }
  *sum = s;
  *sum_x = sx;
}

// ... the same sums of `rows` rows (`stride` apart) of w consecutive channels, added to s, sx ...
template <typename scalar_t, typename acc_t, int act, bool saved_is_output>
GENFAST_SIMD_CLONES void bwd_sums_rows(const scalar_t* dy, const scalar_t* sv, int64_t rows, int64_t stride, int64_t w,
                                       const acc_t* mean, const acc_t* invstd, const acc_t* scale, const acc_t* gamma,
                                       const acc_t* beta, acc_t slope, red_t* s, red_t* sx) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* pd = dy + r * stride;
    const scalar_t* ps = sv + r * stride;
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) {
      const auto d = bn_act_dz_xhat_c<act, saved_is_output, acc_t>(static_cast<acc_t>(pd[c]), static_cast<acc_t>(ps[c]),
                                                                    mean[c], invstd[c], mean[c], scale[c], beta[c],
                                                                    gamma[c], beta[c], slope);
      s[c] += static_cast<red_t>(d.dz);
      sx[c] += static_cast<red_t>(d.dz * d.xhat);
    }
  }
}

// ... dx of one channel's n contiguous values ...
template <typename scalar_t, typename acc_t, int act, bool saved_is_output>
GENFAST_INLINE void bwd_dx_run(const scalar_t* pd, const scalar_t* ps, scalar_t* o, int64_t n, acc_t m, acc_t is,
                               acc_t a, acc_t g, acc_t be, acc_t kc, acc_t kac, acc_t kbc, acc_t slope) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const auto d = bn_act_dz_xhat_c<act, saved_is_output, acc_t>(static_cast<acc_t>(pd[i]), static_cast<acc_t>(ps[i]),
                                                                  m, is, m, a, be, g, be, slope);
    o[i] = static_cast<scalar_t>(bn_act_dx_elem<acc_t>(d.dz, d.xhat, kc, kac, kbc));
  }
}

// ... and dx of n consecutive channels.
template <typename scalar_t, typename acc_t, int act, bool saved_is_output>
GENFAST_SIMD_CLONES void bwd_dx_vec(const scalar_t* pd, const scalar_t* ps, scalar_t* o, int64_t n, const acc_t* mean,
                                    const acc_t* invstd, const acc_t* scale, const acc_t* gamma, const acc_t* beta,
                                    const acc_t* k, const acc_t* ka, const acc_t* kb, acc_t slope) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const auto d = bn_act_dz_xhat_c<act, saved_is_output, acc_t>(static_cast<acc_t>(pd[c]), static_cast<acc_t>(ps[c]),
                                                                  mean[c], invstd[c], mean[c], scale[c], beta[c],
                                                                  gamma[c], beta[c], slope);
    o[c] = static_cast<scalar_t>(bn_act_dx_elem<acc_t>(d.dz, d.xhat, k[c], ka[c], kb[c]));
  }
}

// NCL tasks [t0, t1) of the backward sums: partials at (c * N + n) * cpr + k.
template <typename scalar_t, typename acc_t, int act, bool saved_is_output>
GENFAST_SIMD_CLONES void ncl_bwd_sums_tasks(const scalar_t* dy, const scalar_t* sv, const ChannelView& v,
                                            const Tasks& tk, int64_t t0, int64_t t1, const acc_t* mean,
                                            const acc_t* invstd, const acc_t* scale, const acc_t* gamma,
                                            const acc_t* beta, acc_t slope, red_t* ps, red_t* px) {
  NclCursor q(tk, v, t0);
  for (int64_t t = t0; t < t1; ++t, q.next(tk, v)) {
    const int64_t lo = q.k * kChunk, hi = std::min(v.L, lo + kChunk), off = q.r * v.L + lo, c = q.c;
    const int64_t at = (c * v.N + q.n) * tk.cpr + q.k;
    bwd_sums_run<scalar_t, acc_t, act, saved_is_output>(dy + off, sv + off, hi - lo, mean[c], invstd[c], scale[c],
                                                        gamma[c], beta[c], slope, ps + at, px + at);
  }
}

// NCL tasks [t0, t1) of dx.
template <typename scalar_t, typename acc_t, int act, bool saved_is_output>
GENFAST_SIMD_CLONES void ncl_bwd_dx_tasks(const scalar_t* dy, const scalar_t* sv, scalar_t* dx, const ChannelView& v,
                                          const Tasks& tk, int64_t t0, int64_t t1, const acc_t* mean,
                                          const acc_t* invstd, const acc_t* scale, const acc_t* gamma,
                                          const acc_t* beta, const acc_t* k, const acc_t* ka, const acc_t* kb,
                                          acc_t slope) {
  NclCursor q(tk, v, t0);
  for (int64_t t = t0; t < t1; ++t, q.next(tk, v)) {
    const int64_t lo = q.k * kChunk, hi = std::min(v.L, lo + kChunk), off = q.r * v.L + lo, c = q.c;
    bwd_dx_run<scalar_t, acc_t, act, saved_is_output>(dy + off, sv + off, dx + off, hi - lo, mean[c], invstd[c],
                                                      scale[c], gamma[c], beta[c], k[c], ka[c], kb[c], slope);
  }
}

// Per-channel sums of dz and dz * xhat (one read of dy and saved): double partials per task,
// added per channel in a fixed order.
template <typename scalar_t, typename acc_t, int act, bool saved_is_output>
void backward_sums(const scalar_t* dy, const scalar_t* sv, const BnView& bv,
                   const std::vector<acc_t>& mean_c, const std::vector<acc_t>& invstd_c,
                   const std::vector<acc_t>& scale_c, const std::vector<acc_t>& gamma_c, const std::vector<acc_t>& beta_c,
                   acc_t slope_in, std::vector<red_t>& sum_dz, std::vector<red_t>& sum_dzx) {
  const ChannelView& v = bv.v;
  const int64_t C = v.C, G = bv.G;
  const Tasks tk = make_tasks(v);
  sum_dz.assign(C, red_t(0));
  sum_dzx.assign(C, red_t(0));
  if (tk.n == 0) {
    sum_dz.resize(bv.C());
    sum_dzx.resize(bv.C());
    return;
  }
  std::vector<acc_t> buf[5];
  const std::vector<acc_t>& mean = per_virtual(mean_c, G, buf[0]);
  const std::vector<acc_t>& invstd = per_virtual(invstd_c, G, buf[1]);
  const std::vector<acc_t>& scale = per_virtual(scale_c, G, buf[2]);
  const std::vector<acc_t>& gamma = per_virtual(gamma_c, G, buf[3]);
  const std::vector<acc_t>& beta = per_virtual(beta_c, G, buf[4]);
  if (v.layout == RowLayout::kNCL) {
    // Channel-major partials, as in channel_stats.
    std::vector<red_t> ps_(tk.n), px_(tk.n);
    at::parallel_for(0, tk.n, 1, [&](int64_t t0, int64_t t1) {
      ncl_bwd_sums_tasks<scalar_t, acc_t, act, saved_is_output>(dy, sv, v, tk, t0, t1, mean.data(), invstd.data(),
                                                                scale.data(), gamma.data(), beta.data(), slope_in,
                                                                ps_.data(), px_.data());
    });
    const int64_t per = v.N * tk.cpr;
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < per; ++i) {
        sum_dz[c] += ps_[c * per + i];
        sum_dzx[c] += px_[c * per + i];
      }
  } else {
    std::vector<red_t> bs(tk.nb * C, red_t(0)), bx(tk.nb * C, red_t(0));
    at::parallel_for(0, tk.n, 1, [&](int64_t t0, int64_t t1) {
      const acc_t slope = slope_in;  // a private copy per thread
      for (int64_t t = t0; t < t1; ++t) {
        int64_t lo, hi, c0, c1;
        nlc_tile(tk, v, t, &lo, &hi, &c0, &c1);
        const int64_t off = (t / tk.nc) * C + c0;
        bwd_sums_rows<scalar_t, acc_t, act, saved_is_output>(dy + lo * C + c0, sv + lo * C + c0, hi - lo, C, c1 - c0,
                                                             mean.data() + c0, invstd.data() + c0, scale.data() + c0,
                                                             gamma.data() + c0, beta.data() + c0, slope, bs.data() + off,
                                                             bx.data() + off);
      }
    });
    for (int64_t blk = 0; blk < tk.nb; ++blk)
      for (int64_t c = 0; c < C; ++c) {
        sum_dz[c] += bs[blk * C + c];
        sum_dzx[c] += bx[blk * C + c];
      }
    if (G > 1) {  // a channel's sums: its G virtual channels in order
      for (int64_t c = 0; c < bv.C(); ++c) {
        red_t s = 0, sx = 0;
        for (int64_t g = 0; g < G; ++g) {
          s += sum_dz[c * G + g];
          sx += sum_dzx[c * G + g];
        }
        sum_dz[c] = s;
        sum_dzx[c] = sx;
      }
      sum_dz.resize(bv.C());
      sum_dzx.resize(bv.C());
    }
  }
}

template <typename scalar_t, typename acc_t, int act, bool saved_is_output>
void backward_dx(const scalar_t* dy, const scalar_t* sv, scalar_t* dx, const BnView& bv,
                 const std::vector<acc_t>& mean_c, const std::vector<acc_t>& invstd_c,
                 const std::vector<acc_t>& scale_c, const std::vector<acc_t>& gamma_c,
                 const std::vector<acc_t>& beta_c, const std::vector<acc_t>& k_c, const std::vector<acc_t>& ka_c,
                 const std::vector<acc_t>& kb_c, acc_t slope_in) {
  const ChannelView& v = bv.v;
  const int64_t C = v.C, G = bv.G;
  const Tasks tk = make_tasks(v);
  if (tk.n == 0) return;
  std::vector<acc_t> buf[8];
  const std::vector<acc_t>& mean = per_virtual(mean_c, G, buf[0]);
  const std::vector<acc_t>& invstd = per_virtual(invstd_c, G, buf[1]);
  const std::vector<acc_t>& scale = per_virtual(scale_c, G, buf[2]);
  const std::vector<acc_t>& gamma = per_virtual(gamma_c, G, buf[3]);
  const std::vector<acc_t>& beta = per_virtual(beta_c, G, buf[4]);
  const std::vector<acc_t>& k = per_virtual(k_c, G, buf[5]);
  const std::vector<acc_t>& ka = per_virtual(ka_c, G, buf[6]);
  const std::vector<acc_t>& kb = per_virtual(kb_c, G, buf[7]);
  if (v.layout == RowLayout::kNLC) {
    // contiguous ranges of whole rows per thread, as normalize_act
    at::parallel_for(0, v.N * v.L, nlc_elementwise_grain(C), [&](int64_t r0, int64_t r1) {
      const acc_t slope = slope_in;  // a private copy per thread
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t off = r * C;
        bwd_dx_vec<scalar_t, acc_t, act, saved_is_output>(dy + off, sv + off, dx + off, C, mean.data(), invstd.data(),
                                                          scale.data(), gamma.data(), beta.data(), k.data(),
                                                          ka.data(), kb.data(), slope);
      }
    });
    return;
  }
  at::parallel_for(0, tk.n, elementwise_grain(tk, v), [&](int64_t t0, int64_t t1) {
    const acc_t slope = slope_in;  // a private copy per thread
    ncl_bwd_dx_tasks<scalar_t, acc_t, act, saved_is_output>(dy, sv, dx, v, tk, t0, t1, mean.data(), invstd.data(),
                                                            scale.data(), gamma.data(), beta.data(), k.data(),
                                                            ka.data(), kb.data(), slope);
  });
}

// A (C,) tensor as contiguous acc_t (no op at all when it already is one).
template <typename acc_t>
at::Tensor as_acc(const at::Tensor& t) {
  const auto dt = c10::CppTypeToScalarType<acc_t>::value;
  at::Tensor c = t.is_contiguous() ? t : t.contiguous();
  return c.scalar_type() == dt ? c : c.to(dt);
}

// Per-channel gamma_eff, beta, mean, invstd and scale = gamma_eff * invstd, in the accumulation type.
template <typename acc_t>
struct Coeffs {
  std::vector<acc_t> gamma, beta, mean, invstd, scale;
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
  for (int64_t c = 0; c < C; ++c) {
    k.gamma[c] = effective_gamma<acc_t>(k.gamma[c], acc_t(gamma_floor));
    k.scale[c] = k.gamma[c] * k.invstd[c];
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
  const BnView v = bn_view(saved);
  const at::Tensor grad_out = grad_in_layout_of(grad_out_, saved);
  const int64_t C = saved.size(1);
  const double M = v.count();
  at::Tensor grad_input = at::empty_like(saved);
  at::Tensor grad_weight = at::empty({C}, saved.options().dtype(param_dtype(saved, weight)));
  at::Tensor grad_bias = at::empty({C}, saved.options().dtype(param_dtype(saved, bias)));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saved.scalar_type(), "batch_norm_act_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto kc = make_coeffs<acc_t>(saved, weight, bias, save_mean, save_invstd, gamma_floor);
    const auto &gamma = kc.gamma, &beta = kc.beta, &mean = kc.mean, &invstd = kc.invstd;
    const auto &scale = kc.scale, &k = kc.scale;
    std::vector<acc_t> ka(C, acc_t(0)), kb(C, acc_t(0));
    const scalar_t* dy = grad_out.data_ptr<scalar_t>();
    const scalar_t* sv = saved.data_ptr<scalar_t>();
    std::vector<red_t> sum_dz, sum_dzx;
    const acc_t slope = acc_t(negative_slope);
    dispatch_act(activation, [&](auto a) {
      constexpr int A = decltype(a)::value;
      if (saved_is_output) {
        backward_sums<scalar_t, acc_t, A, true>(dy, sv, v, mean, invstd, scale, gamma, beta, slope, sum_dz,
                                                sum_dzx);
      } else {
        backward_sums<scalar_t, acc_t, A, false>(dy, sv, v, mean, invstd, scale, gamma, beta, slope, sum_dz,
                                                 sum_dzx);
      }
      if (training && M > 0) {
        for (int64_t c = 0; c < C; ++c) {
          ka[c] = static_cast<acc_t>(sum_dz[c] / M);
          kb[c] = static_cast<acc_t>(sum_dzx[c] / M);
        }
      }
      scalar_t* dx = grad_input.data_ptr<scalar_t>();
      if (saved_is_output) {
        backward_dx<scalar_t, acc_t, A, true>(dy, sv, dx, v, mean, invstd, scale, gamma, beta, k, ka, kb, slope);
      } else {
        backward_dx<scalar_t, acc_t, A, false>(dy, sv, dx, v, mean, invstd, scale, gamma, beta, k, ka, kb, slope);
      }
    });
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_weight.scalar_type(), "bn_act_gw", [&] {
      store_param<scalar_t, red_t>(grad_weight, sum_dzx);
    });
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_bias.scalar_type(), "bn_act_gb", [&] {
      store_param<scalar_t, red_t>(grad_bias, sum_dz);
    });
  });
  return {bn_output_as_torch(grad_input), grad_weight, grad_bias};
}

// --- the two passes as separate ops (SyncBatchNormAct: an all-gather / all-reduce sits between
// them). Each is one pass over memory.

std::tuple<at::Tensor, at::Tensor> batch_norm_act_stats_cpu(const at::Tensor& input_) {
  check_common(input_, c10::nullopt, c10::nullopt);
  at::Tensor input = input_;
  const BnView v = bn_view(input);
  const auto acc_type = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({v.C()}, input.options().dtype(acc_type));
  at::Tensor m2 = at::empty({v.C()}, input.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_act_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto st = channel_stats<scalar_t>(input.data_ptr<scalar_t>(), v);
    for (int64_t c = 0; c < v.C(); ++c) {
      mean.data_ptr<acc_t>()[c] = static_cast<acc_t>(st[c].mean);
      m2.data_ptr<acc_t>()[c] = static_cast<acc_t>(st[c].m2);
    }
  });
  return {mean, m2};
}

at::Tensor batch_norm_act_apply_cpu(const at::Tensor& input_, const at::Tensor& mean, const at::Tensor& invstd,
                                    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                    int64_t activation, double negative_slope, double gamma_floor) {
  check_common(input_, weight, bias);
  at::Tensor input = input_;
  const BnView v = bn_view(input);
  at::Tensor out = empty_bn_output(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_act_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto k = make_coeffs<acc_t>(input, weight, bias, mean, invstd, gamma_floor);
    dispatch_act(activation, [&](auto a) {
      normalize_act<scalar_t, acc_t, decltype(a)::value>(input.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), v,
                                                         k.mean, k.scale, k.beta, acc_t(negative_slope));
    });
  });
  return bn_output_as_torch(out);
}

std::tuple<at::Tensor, at::Tensor> batch_norm_act_bwd_reduce_cpu(
    const at::Tensor& grad_out_, const at::Tensor& saved_, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd, int64_t activation,
    double negative_slope, double gamma_floor, bool saved_is_output) {
  check_common(saved_, weight, bias);
  at::Tensor saved = saved_;
  const BnView v = bn_view(saved);
  const at::Tensor grad_out = grad_in_layout_of(grad_out_, saved);
  const auto acc_type = saved.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor sum_dz = at::empty({v.C()}, saved.options().dtype(acc_type));
  at::Tensor sum_dzx = at::empty({v.C()}, saved.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saved.scalar_type(), "batch_norm_act_bwd_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto k = make_coeffs<acc_t>(saved, weight, bias, mean, invstd, gamma_floor);
    std::vector<red_t> s, sx;
    dispatch_act(activation, [&](auto a) {
      constexpr int A = decltype(a)::value;
      const scalar_t* dy = grad_out.data_ptr<scalar_t>();
      const scalar_t* sv = saved.data_ptr<scalar_t>();
      if (saved_is_output) {
        backward_sums<scalar_t, acc_t, A, true>(dy, sv, v, k.mean, k.invstd, k.scale, k.gamma, k.beta,
                                                acc_t(negative_slope), s, sx);
      } else {
        backward_sums<scalar_t, acc_t, A, false>(dy, sv, v, k.mean, k.invstd, k.scale, k.gamma, k.beta,
                                                 acc_t(negative_slope), s, sx);
      }
    });
    for (int64_t c = 0; c < v.C(); ++c) {
      sum_dz.data_ptr<acc_t>()[c] = static_cast<acc_t>(s[c]);
      sum_dzx.data_ptr<acc_t>()[c] = static_cast<acc_t>(sx[c]);
    }
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
  const BnView v = bn_view(saved);
  const at::Tensor grad_out = grad_in_layout_of(grad_out_, saved);
  at::Tensor grad_input = at::empty_like(saved);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saved.scalar_type(), "batch_norm_act_bwd_dx_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto k = make_coeffs<acc_t>(saved, weight, bias, mean, invstd, gamma_floor);
    TORCH_CHECK(sum_dz.numel() == v.C() && sum_dz_xhat.numel() == v.C(), "batch_norm_act: sum_dz and sum_dz_xhat must have ",
                v.C(), " elements, got ", sum_dz.numel(), " and ", sum_dz_xhat.numel());
    at::Tensor s = as_acc<acc_t>(sum_dz), sx = as_acc<acc_t>(sum_dz_xhat);
    std::vector<acc_t> ka(v.C(), acc_t(0)), kb(v.C(), acc_t(0));
    for (int64_t c = 0; c < v.C() && count > 0; ++c) {
      ka[c] = s.data_ptr<acc_t>()[c] / acc_t(count);
      kb[c] = sx.data_ptr<acc_t>()[c] / acc_t(count);
    }
    dispatch_act(activation, [&](auto a) {
      constexpr int A = decltype(a)::value;
      const scalar_t* dy = grad_out.data_ptr<scalar_t>();
      const scalar_t* sv = saved.data_ptr<scalar_t>();
      scalar_t* dx = grad_input.data_ptr<scalar_t>();
      if (saved_is_output) {
        backward_dx<scalar_t, acc_t, A, true>(dy, sv, dx, v, k.mean, k.invstd, k.scale, k.gamma, k.beta,
                                              k.scale, ka, kb, acc_t(negative_slope));
      } else {
        backward_dx<scalar_t, acc_t, A, false>(dy, sv, dx, v, k.mean, k.invstd, k.scale, k.gamma, k.beta,
                                               k.scale, ka, kb, acc_t(negative_slope));
      }
    });
  });
  return bn_output_as_torch(grad_input);
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
