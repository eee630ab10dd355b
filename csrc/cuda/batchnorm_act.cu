// BatchNorm + activation on CUDA: the CUDA dispatch key of genfast::batch_norm_act_fwd / _bwd.
// Behaviour is that of csrc/cpu/batchnorm_act.cpp (the spec); the per-element and per-channel
// math is csrc/common/batchnorm_act.h, shared with the CPU kernels.
//
// Work decomposition. A channel group is one channel (NCL layout: contiguous (N, C, L)) or
// tx * VEC adjacent channels (NLC layout: (N, L, C) in memory, e.g. channels_last). Every kernel
// runs on a grid of (channel group, split) blocks; the splits of a group share its N*L
// elements in contiguous chunks. Reductions accumulate in double with 64-bit counts whatever
// the input dtype, as on the CPU (a float count stops at 2^24, and float partials lose the mean
// at large offsets): each thread reduces short runs of values in the accumulation type (float
// for float, half and bfloat16 input), statistics by two passes over registers (sum_partial_of_run
// in csrc/common: a SumPartial with a double sum refined by the deviations), backward sums as
// plain sums, and adds the runs into double partials; threads, blocks and splits merge the
// partials (Chan's formula for the statistics, sum_partial_merge) in a fixed order: the results
// do not depend on timing (no floating-point atomics). The batch mean is the total sum over the
// count (an inf input gives an inf running_mean, as torch), and the normalise pass computes
// f((x - mean) * gamma * invstd + beta), as the CPU kernels. With more than one split,
// each block writes its partial result, takes a ticket from an atomic counter, and the last
// block of its group to arrive merges the partials (in split order) and finalises the group in
// the same launch. With one split (small N*L per channel, or enough channels to fill the GPU),
// the block that reduced a group also finishes the elementwise pass in the same launch.
//
// Passes over memory (x: input, y: output, dy: grad_output, s: saved x or y, dx: grad_input):
//   bn_fwd_stats_kernel     training forward, statistics: 1 read of x. With one split it also
//                           normalises (second read of x, mostly from L2, + 1 write of y):
//                           the whole training forward in one launch.
//   bn_fwd_norm_kernel      normalise: 1 read of x + 1 write of y. Training forward with
//                           splits = stats + norm (2 launches); eval forward = norm only.
//   bn_bwd_reduce_kernel    backward reductions (sum dz, sum dz*xhat): 1 read of dy and s.
//                           Eval: also writes dx in the same pass (dx needs no reduction), so
//                           the eval backward is 1 launch, 1 read + 1 write. Training with one
//                           split: also the dx pass (second read of dy and s + 1 write of dx).
//   bn_bwd_dx_kernel        training dx: 1 read of dy and s + 1 write of dx. Training backward
//                           with splits = reduce + dx (2 launches).
// The split-pass ops (SyncBatchNormAct) are one launch each, of the same kernels:
//   batch_norm_act_stats       bn_fwd_stats_kernel, stats_only: 1 read of x -> (mean, M2)
//   batch_norm_act_apply       bn_fwd_norm_kernel with given mean / invstd: 1 read of x + 1 write of y
//   batch_norm_act_bwd_reduce  bn_bwd_reduce_kernel without dx: 1 read of dy and s -> sums
//   batch_norm_act_bwd_dx      bn_bwd_dx_kernel from the global sums: 1 read of dy and s + 1 write of dx
// Launches: training forward 1 (one split) or 2; eval forward 1; training backward 1 (one
// split) or 2; eval backward 1. No memset or other launch besides (the arrival counters reset
// themselves; see ticket_counters), except a copy of grad_output when its layout differs from
// the saved tensor's, a contiguous copy of inputs in neither layout (as on the CPU), and one
// single-thread launch (bn_running_serial_kernel) when the running buffers overlap in memory
// (an expanded running_mean, or running_mean and running_var sharing storage): their update is
// then made channel after channel, as the CPU kernel makes it, instead of by racing blocks.
// Vector loads of 16 bytes along L (NCL) or along C (NLC) when the sizes and pointers allow
// (8 bytes in the NLC backward of half / bfloat16, see vec_width).
// (N, C) inputs (L == 1) are read as NLC: the same memory, coalesced along C.
// Kernels run on c10::cuda::getCurrentCUDAStream() (the function at::cuda re-exports; the
// ATen/cuda/CUDAContext.h header is not used because it needs the cuBLAS/cuSPARSE headers, which
// a minimal CUDA toolkit does not ship).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <vector>
#include <utility>

#include "../common/batchnorm_act.h"
#include "../common/tensor_layout.h"

namespace genfast {
namespace {

constexpr int kThreads = 256;               // threads per block, every kernel
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;                  // vector loads in flight per thread (forward)
constexpr int kBwdUnroll = 2;               // backward: 2 tensors per step, more registers per element
constexpr int kMinBlocksPerSM = 2;          // register cap: at most 128 registers per thread
constexpr int64_t kMaxSplits = 1024;        // most blocks per channel group in a reduction
constexpr int64_t kReduceMinElems = 8192;   // fewest elements per reduction block
constexpr int64_t kNormMinElems = 4096;     // fewest elements per elementwise block
constexpr int kReduceBlocksPerSM = 4;       // reduction grids aim at this many blocks per SM
constexpr int kNormBlocksPerSM = 8;         // elementwise grids aim at this many blocks per SM
constexpr int kColGroup = 4;                // NLC block reductions: columns' values per shared-memory round
// Reductions (statistics, backward sums, their partials) in double whatever the input dtype.
using red_t = double;

// ---------------------------------------------------------------------------------------------
// Per-channel tensors (weight, bias, running stats, saved stats, grad_weight/bias) are read and
// written through a strided pointer tagged with its dtype: they may be in the input's dtype or
// float32 (mixed precision), independently of each other, without one kernel per combination.

enum ParamType : int { kParamNone = 0, kParamFloat, kParamDouble, kParamHalf, kParamBFloat16 };

struct ChannelParam {
  void* ptr;       // element of channel 0; nullptr when the tensor is absent
  int64_t stride;  // elements between consecutive channels
  int type;        // ParamType
};

template <typename acc_t>
__device__ __forceinline__ acc_t param_load(const ChannelParam& p, int64_t c, acc_t fill) {
  const int64_t i = c * p.stride;
  switch (p.type) {
    case kParamFloat: return static_cast<acc_t>(static_cast<const float*>(p.ptr)[i]);
    case kParamDouble: return static_cast<acc_t>(static_cast<const double*>(p.ptr)[i]);
    case kParamHalf: return static_cast<acc_t>(static_cast<float>(static_cast<const c10::Half*>(p.ptr)[i]));
    case kParamBFloat16:
      return static_cast<acc_t>(static_cast<float>(static_cast<const c10::BFloat16*>(p.ptr)[i]));
    default: return fill;
  }
}

template <typename acc_t>
__device__ __forceinline__ void param_store(const ChannelParam& p, int64_t c, acc_t v) {
  const int64_t i = c * p.stride;
  switch (p.type) {
    case kParamFloat: static_cast<float*>(p.ptr)[i] = static_cast<float>(v); break;
    case kParamDouble: static_cast<double*>(p.ptr)[i] = static_cast<double>(v); break;
    case kParamHalf: static_cast<c10::Half*>(p.ptr)[i] = c10::Half(static_cast<float>(v)); break;
    case kParamBFloat16: static_cast<c10::BFloat16*>(p.ptr)[i] = c10::BFloat16(static_cast<float>(v)); break;
    default: break;
  }
}

// ---------------------------------------------------------------------------------------------
// Reduction values and their block-level combination (fixed order: deterministic).

template <typename T>
struct SumPair {
  T dz;   // sum of dz
  T dzx;  // sum of dz * xhat
};

using StatPartial = SumPartial<red_t>;  // (count, sum, M2): csrc/common
using BwdSums = SumPair<red_t>;

__device__ __forceinline__ StatPartial combine(const StatPartial& a, const StatPartial& b) {
  return sum_partial_merge<red_t>(a, b);
}

__device__ __forceinline__ BwdSums combine(const BwdSums& a, const BwdSums& b) {
  return BwdSums{a.dz + b.dz, a.dzx + b.dzx};
}

__device__ __forceinline__ StatPartial shfl_down(const StatPartial& p, int o) {
  return StatPartial{static_cast<int64_t>(__shfl_down_sync(0xffffffffu, static_cast<long long>(p.count), o)),
                     __shfl_down_sync(0xffffffffu, p.sum, o), __shfl_down_sync(0xffffffffu, p.m2, o)};
}

__device__ __forceinline__ BwdSums shfl_down(const BwdSums& s, int o) {
  return BwdSums{__shfl_down_sync(0xffffffffu, s.dz, o), __shfl_down_sync(0xffffffffu, s.dzx, o)};
}

// L2 loads (bypassing L1) of partial results written by other blocks of the same launch.
__device__ __forceinline__ StatPartial load_partial(const StatPartial* p) {
  return StatPartial{static_cast<int64_t>(__ldcg(reinterpret_cast<const long long*>(&p->count))), __ldcg(&p->sum),
                     __ldcg(&p->m2)};
}

__device__ __forceinline__ BwdSums load_partial(const BwdSums* p) {
  return BwdSums{__ldcg(&p->dz), __ldcg(&p->dzx)};
}

__device__ __forceinline__ StatPartial identity_of(const StatPartial*) { return StatPartial{0, red_t(0), red_t(0)}; }

__device__ __forceinline__ BwdSums identity_of(const BwdSums*) { return BwdSums{red_t(0), red_t(0)}; }

// 1-D block of kThreads (NCL): combines every thread's v; the result is valid in thread 0.
// smem: kWarps entries. Every thread of the block must call it.
template <typename R>
__device__ R reduce_block_1d(R v, R* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = combine(v, shfl_down(v, o));
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? smem[lane] : identity_of(static_cast<R*>(nullptr));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = combine(v, shfl_down(v, o));
  }
  __syncthreads();
  return v;
}

// Values per column that reduce_block_cols passes through shared memory at a time.
template <int VEC>
constexpr int kColGroupOf = VEC < kColGroup ? VEC : kColGroup;

// 2-D block (tx, ty), tx a power of two <= 32, tx * ty = kThreads (NLC): combines v[k] over
// threadIdx.y for every column threadIdx.x; results valid in the threads with threadIdx.y == 0.
// smem: kWarps * 32 * kColGroupOf<VEC> entries (the VEC values go through it in groups, so that
// 8 double partials per column stay within the static shared-memory limit). Every thread of the
// block must call it.
template <typename R, int VEC>
__device__ void reduce_block_cols(R (&v)[VEC], R* smem) {
  constexpr int G = kColGroupOf<VEC>;
  const int tx = blockDim.x;
  const int tid = threadIdx.y * tx + threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  // Lanes o apart hold the same column when o is a multiple of tx.
  for (int o = 16; o >= tx; o >>= 1) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = combine(v[k], shfl_down(v[k], o));
  }
#pragma unroll
  for (int k0 = 0; k0 < VEC; k0 += G) {
    // Lanes [0, tx) of each warp are the columns x = lane, combined over the warp's rows.
    if (lane < tx) {
#pragma unroll
      for (int k = 0; k < G; ++k) smem[(warp * 32 + lane) * G + k] = v[k0 + k];
    }
    __syncthreads();
    if (threadIdx.y == 0) {
#pragma unroll
      for (int k = 0; k < G; ++k) {
        R r = smem[threadIdx.x * G + k];
        for (int w = 1; w < kWarps; ++w) r = combine(r, smem[(w * 32 + threadIdx.x) * G + k]);
        v[k0 + k] = r;
      }
    }
    __syncthreads();
  }
}

// Ticket of a split block: after the block's partial results are written, returns true in
// every thread of the last block of the group to arrive (which then sees every partial). The
// last block resets the counter to 0 for the next launch on this stream.
__device__ bool arrive_last(unsigned* ticket, unsigned splits, bool* flag) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    const unsigned t = atomicAdd(ticket, 1u);
    *flag = t == splits - 1;
    if (*flag) *ticket = 0u;
  }
  __syncthreads();
  const bool last = *flag;
  if (last) __threadfence();
  return last;
}

// ---------------------------------------------------------------------------------------------
// Memory access.

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T, int N>
struct alignas(sizeof(T) * N) VecT {
  T v[N];
};

// Walks the vectors of one channel in the NCL layout: the channel's flat vector index
// j = n * Lv + i (row n, vector i of the row) lives at vector offset (n * C + c) * Lv + i.
// Steps of `step` vectors are taken without divisions.
struct NclCursor {
  int64_t j;      // flat vector index within the channel
  int64_t i;      // vector index within the row
  int64_t off;    // vector offset in the tensor
  int64_t Lv;     // vectors per row
  int64_t di;     // step % Lv
  int64_t doff;   // offset change of a step without a row carry
  int64_t carry;  // extra offset change when i wraps past the row end: (C - 1) * Lv

  __device__ NclCursor(int64_t j0, int64_t c, int64_t C, int64_t Lv_, int64_t step) : j(j0), Lv(Lv_) {
    const int64_t n = j0 / Lv;
    i = j0 - n * Lv;
    off = (n * C + c) * Lv + i;
    const int64_t dn = step / Lv;
    di = step - dn * Lv;
    doff = dn * C * Lv + di;
    carry = (C - 1) * Lv;
  }
  __device__ __forceinline__ void advance(int64_t step) {
    j += step;
    i += di;
    off += doff;
    if (i >= Lv) {
      i -= Lv;
      off += carry;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Kernel arguments.

template <typename scalar_t, typename acc_t>
struct FwdArgs {
  const scalar_t* x;           // input, NCL or NLC layout
  scalar_t* y;                 // output, same layout as x
  int64_t N, C, L;             // logical sizes: x is (N, C, L)
  int64_t nvec;                // vectors per row: L / VEC (NCL) or C / VEC (NLC)
  int64_t chunk;               // per split: vectors of the channel (NCL) or rows of N*L (NLC)
  ChannelParam weight;         // gamma (absent: 1)
  ChannelParam bias;           // beta (absent: 0)
  ChannelParam run_mean;       // running_mean, updated in place when training (may be absent)
  ChannelParam run_var;        // running_var, updated in place when training (may be absent)
  acc_t* save_mean;            // (C,) out: batch mean (training) or running mean (eval)
  acc_t* save_invstd;          // (C,) out: 1 / sqrt(var + eps)
  StatPartial* partials;       // (splits, C) per-split statistics (splits > 1 only)
  unsigned* tickets;           // (groups,) arrival counters, 0 between launches (splits > 1)
  Welford<red_t, int64_t>* deferred;  // (C,) out: the merged statistics, when the running buffers
                               // overlap in memory (bn_running_serial_kernel then updates them;
                               // run_mean / run_var are left alone here); nullptr otherwise
  red_t eps;                   // added to the variance
  red_t momentum;              // running-statistics factor
  acc_t slope;                 // leaky_relu negative slope
  acc_t gamma_floor;           // |gamma| lower bound (memory_efficient), 0 = off
  ChannelParam given_mean;     // (C,) mean for the normalise pass (batch_norm_act_apply); absent: see training
  ChannelParam given_invstd;   // (C,) invstd for the normalise pass (batch_norm_act_apply)
  int act;                     // Activation code (csrc/common/activation.h)
  bool training;               // batch statistics (true) or running statistics (false)
  bool fuse_normalize;         // stats kernel with one split: also write y in the same launch
  bool stats_only;             // stats kernel (batch_norm_act_stats): write (mean, M2) into
                               // save_mean / save_invstd and stop (no running stats, no y)
};

template <typename scalar_t, typename acc_t>
struct BwdArgs {
  const scalar_t* dy;          // grad_output, same layout as saved
  const scalar_t* saved;       // x, or y when saved_is_output
  scalar_t* dx;                // grad_input, same layout as saved
  int64_t N, C, L;             // logical sizes: (N, C, L)
  int64_t nvec;                // vectors per row: L / VEC (NCL) or C / VEC (NLC)
  int64_t chunk;               // per split: vectors of the channel (NCL) or rows of N*L (NLC)
  ChannelParam weight;         // gamma (absent: 1)
  ChannelParam bias;           // beta (absent: 0)
  ChannelParam save_mean;      // (C,) mean saved by the forward (acc dtype)
  ChannelParam save_invstd;    // (C,) invstd saved by the forward (acc dtype)
  ChannelParam grad_weight;    // (C,) out: sum(dz * xhat)
  ChannelParam grad_bias;      // (C,) out: sum(dz)
  BwdSums* partials;           // (splits, C) per-split sums (splits > 1 only)
  unsigned* tickets;           // (groups,) arrival counters, 0 between launches (splits > 1)
  acc_t* coef;                 // (C, 2) sum_dz / M and sum_dzx / M: written by the reduce kernel and
                               // read by bn_bwd_dx_kernel when not null
  ChannelParam sum_dz;         // (C,) global sum of dz for bn_bwd_dx_kernel when coef is null
  ChannelParam sum_dzx;        // (C,) global sum of dz * xhat for bn_bwd_dx_kernel when coef is null
  red_t count;                 // M: elements per channel (N * L, or the global count of the split op)
  acc_t slope;                 // leaky_relu negative slope
  acc_t gamma_floor;           // |gamma| lower bound (memory_efficient), 0 = off
  int act;                     // Activation code
  bool training;               // dx through the batch statistics (true) or not (false)
  bool saved_is_output;        // saved holds y (memory_efficient) rather than x
  bool fuse_dx;                // reduce kernel with one split: also write dx in the same launch
};

// ---------------------------------------------------------------------------------------------
// Per-channel coefficients.

// The coefficients of the normalise pass z = (x - mean) * scale + beta, scale = gamma * invstd.
template <typename acc_t>
struct NormCoef {
  acc_t mean, scale, beta;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ NormCoef<acc_t> norm_coef(const FwdArgs<scalar_t, acc_t>& a, int64_t c, acc_t mean,
                                                     acc_t invstd) {
  const acc_t g = effective_gamma<acc_t>(param_load<acc_t>(a.weight, c, acc_t(1)), a.gamma_floor);
  return NormCoef<acc_t>{mean, g * invstd, param_load<acc_t>(a.bias, c, acc_t(0))};
}

// Coefficients from the given statistics (batch_norm_act_apply), the saved batch statistics
// (training) or the running statistics (eval; the block that owns save_* for the channel writes
// them).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ NormCoef<acc_t> fwd_coef(const FwdArgs<scalar_t, acc_t>& a, int64_t c, bool write_saved) {
  acc_t mean, invstd;
  if (a.given_mean.type != kParamNone) {
    mean = param_load<acc_t>(a.given_mean, c, acc_t(0));
    invstd = param_load<acc_t>(a.given_invstd, c, acc_t(1));
  } else if (a.training) {
    mean = a.save_mean[c];
    invstd = a.save_invstd[c];
  } else {
    mean = param_load<acc_t>(a.run_mean, c, acc_t(0));
    invstd = acc_t(1) / ::sqrt(param_load<acc_t>(a.run_var, c, acc_t(1)) + static_cast<acc_t>(a.eps));
    if (write_saved) {
      a.save_mean[c] = mean;
      a.save_invstd[c] = invstd;
    }
  }
  return norm_coef(a, c, mean, invstd);
}

// Finishes channel c from its merged statistics, in double as on the CPU: save_mean /
// save_invstd, the running statistics (or, when they overlap in memory, the statistics into
// `deferred` for bn_running_serial_kernel), and (returned) the normalise coefficients.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ NormCoef<acc_t> fwd_finish(const FwdArgs<scalar_t, acc_t>& a, int64_t c,
                                                      const StatPartial& p) {
  const Welford<red_t, int64_t> w = sum_partial_stats<red_t>(p);
  red_t mean, invstd;
  if (a.deferred != nullptr) {
    a.deferred[c] = w;
    finish_stats<red_t>(w, a.eps, a.momentum, &mean, &invstd, nullptr, nullptr);
  } else {
    const bool have_rm = a.run_mean.type != kParamNone, have_rv = a.run_var.type != kParamNone;
    red_t rm = param_load<red_t>(a.run_mean, c, red_t(0));
    red_t rv = param_load<red_t>(a.run_var, c, red_t(1));
    finish_stats<red_t>(w, a.eps, a.momentum, &mean, &invstd, have_rm ? &rm : nullptr, have_rv ? &rv : nullptr);
    if (have_rm) param_store<red_t>(a.run_mean, c, rm);
    if (have_rv) param_store<red_t>(a.run_var, c, rv);
  }
  a.save_mean[c] = static_cast<acc_t>(mean);
  a.save_invstd[c] = static_cast<acc_t>(invstd);
  return norm_coef(a, c, static_cast<acc_t>(mean), static_cast<acc_t>(invstd));
}

// End of the statistics pass for channel c: fwd_finish, or (stats_only) the merged (mean, M2)
// into save_mean / save_invstd.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ NormCoef<acc_t> stats_finish(const FwdArgs<scalar_t, acc_t>& a, int64_t c,
                                                        const StatPartial& p) {
  if (a.stats_only) {
    const Welford<red_t, int64_t> w = sum_partial_stats<red_t>(p);
    a.save_mean[c] = static_cast<acc_t>(w.mean);
    a.save_invstd[c] = static_cast<acc_t>(w.m2);
    return NormCoef<acc_t>{acc_t(0), acc_t(0), acc_t(0)};
  }
  return fwd_finish(a, c, p);
}

template <typename acc_t>
struct BwdCoef {
  acc_t mean, invstd, scale, gamma, beta;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ BwdCoef<acc_t> bwd_coef(const BwdArgs<scalar_t, acc_t>& a, int64_t c) {
  BwdCoef<acc_t> k;
  k.mean = param_load<acc_t>(a.save_mean, c, acc_t(0));
  k.invstd = param_load<acc_t>(a.save_invstd, c, acc_t(1));
  k.gamma = effective_gamma<acc_t>(param_load<acc_t>(a.weight, c, acc_t(1)), a.gamma_floor);
  k.beta = param_load<acc_t>(a.bias, c, acc_t(0));
  k.scale = k.gamma * k.invstd;
  return k;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t bwd_dz(const BwdArgs<scalar_t, acc_t>& a, const BwdCoef<acc_t>& k, acc_t dy,
                                        acc_t sv, acc_t* xhat) {
  // z = (x - mean) * scale + beta, exactly as the forward computed it.
  return bn_act_dz_xhat<acc_t>(dy, sv, a.saved_is_output, k.mean, k.invstd, k.mean, k.scale, k.beta, k.gamma,
                               k.beta, a.act, a.slope, xhat);
}

// Writes grad_weight / grad_bias of channel c and returns (a, b) = (sum_dz / M, sum_dzx / M)
// for the dx pass ((0, 0) in eval mode or for an empty batch, as on the CPU).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void bwd_finish(const BwdArgs<scalar_t, acc_t>& a, int64_t c, const BwdSums& s,
                                           acc_t& ka, acc_t& kb) {
  param_store<red_t>(a.grad_weight, c, s.dzx);
  param_store<red_t>(a.grad_bias, c, s.dz);
  ka = acc_t(0);
  kb = acc_t(0);
  if (a.training && a.count > red_t(0)) {
    ka = static_cast<acc_t>(s.dz / a.count);
    kb = static_cast<acc_t>(s.dzx / a.count);
  }
}

// (sum_dz / M, sum_dzx / M) of channel c for the dx pass: from coef (fused backward) or from the
// global sums given to batch_norm_act_bwd_dx ((0, 0) when M == 0, as on the CPU).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void dx_coef(const BwdArgs<scalar_t, acc_t>& a, int64_t c, acc_t& ka, acc_t& kb) {
  if (a.coef != nullptr) {
    ka = a.coef[2 * c];
    kb = a.coef[2 * c + 1];
    return;
  }
  ka = acc_t(0);
  kb = acc_t(0);
  if (a.count > red_t(0)) {
    ka = param_load<acc_t>(a.sum_dz, c, acc_t(0)) / static_cast<acc_t>(a.count);
    kb = param_load<acc_t>(a.sum_dzx, c, acc_t(0)) / static_cast<acc_t>(a.count);
  }
}

// ---------------------------------------------------------------------------------------------
// Elementwise loops over one block's share of a channel group.

// NCL: vectors [j0, j1) of channel c, each thread every kThreads-th vector.
template <typename scalar_t, typename acc_t, int VEC>
__device__ void ncl_normalize(const FwdArgs<scalar_t, acc_t>& a, int64_t c, int64_t j0, int64_t j1,
                              const NormCoef<acc_t>& k) {
  using V = VecT<scalar_t, VEC>;
  const V* xv = reinterpret_cast<const V*>(a.x);
  V* yv = reinterpret_cast<V*>(a.y);
  if (j0 + threadIdx.x >= j1) return;
  NclCursor cur(j0 + threadIdx.x, c, a.C, a.nvec, kThreads);
  while (cur.j < j1) {
    V v[kUnroll];
    int64_t off[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      ok[u] = cur.j < j1;
      off[u] = cur.off;
      if (ok[u]) v[u] = xv[cur.off];
      cur.advance(kThreads);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (!ok[u]) continue;
      V o;
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        o.v[e] = static_cast<scalar_t>(
            bn_act_forward_elem<acc_t>(static_cast<acc_t>(v[u].v[e]), k.mean, k.scale, k.beta, a.act, a.slope));
      yv[off[u]] = o;
    }
  }
}

// NLC: rows [r0, r1) of the thread's VEC channels (vector column xv), every ty-th row.
template <typename scalar_t, typename acc_t, int VEC>
__device__ void nlc_normalize(const FwdArgs<scalar_t, acc_t>& a, int64_t xv_col, int64_t r0, int64_t r1,
                              const NormCoef<acc_t> (&k)[VEC]) {
  using V = VecT<scalar_t, VEC>;
  const V* xv = reinterpret_cast<const V*>(a.x);
  V* yv = reinterpret_cast<V*>(a.y);
  const int64_t ty = blockDim.y, Cv = a.nvec;
  for (int64_t r = r0 + threadIdx.y; r < r1; r += kUnroll * ty) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (r + u * ty < r1) v[u] = xv[(r + u * ty) * Cv + xv_col];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (r + u * ty >= r1) continue;
      V o;
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        o.v[e] = static_cast<scalar_t>(bn_act_forward_elem<acc_t>(static_cast<acc_t>(v[u].v[e]), k[e].mean,
                                                                  k[e].scale, k[e].beta, a.act, a.slope));
      yv[(r + u * ty) * Cv + xv_col] = o;
    }
  }
}

// Backward loops. REDUCE: accumulate the sums in double (NCL: each step's values summed in acc_t,
// then added; NLC: each value added); WRITE: write dx from (ka, kb).
template <typename scalar_t, typename acc_t, int VEC, bool REDUCE, bool WRITE>
__device__ BwdSums ncl_backward(const BwdArgs<scalar_t, acc_t>& a, int64_t c, int64_t j0, int64_t j1,
                                const BwdCoef<acc_t>& k, acc_t ka, acc_t kb) {
  using V = VecT<scalar_t, VEC>;
  const V* dyv = reinterpret_cast<const V*>(a.dy);
  const V* sv = reinterpret_cast<const V*>(a.saved);
  V* dxv = reinterpret_cast<V*>(a.dx);
  BwdSums acc{red_t(0), red_t(0)};
  if (j0 + threadIdx.x >= j1) return acc;
  NclCursor cur(j0 + threadIdx.x, c, a.C, a.nvec, kThreads);
  while (cur.j < j1) {
    V g[kBwdUnroll], s[kBwdUnroll];
    int64_t off[kBwdUnroll];
    bool ok[kBwdUnroll];
#pragma unroll
    for (int u = 0; u < kBwdUnroll; ++u) {
      ok[u] = cur.j < j1;
      off[u] = cur.off;
      if (ok[u]) {
        g[u] = dyv[cur.off];
        s[u] = sv[cur.off];
      }
      cur.advance(kThreads);
    }
    acc_t sdz = acc_t(0), sdzx = acc_t(0);
#pragma unroll
    for (int u = 0; u < kBwdUnroll; ++u) {
      if (!ok[u]) continue;
      V o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        acc_t xh;
        const acc_t dz = bwd_dz(a, k, static_cast<acc_t>(g[u].v[e]), static_cast<acc_t>(s[u].v[e]), &xh);
        if (REDUCE) {
          sdz += dz;
          sdzx += dz * xh;
        }
        if (WRITE) o.v[e] = static_cast<scalar_t>(bn_act_dx_elem<acc_t>(dz, xh, k.scale, ka, kb));
      }
      if (WRITE) dxv[off[u]] = o;
    }
    if (REDUCE) {
      acc.dz += static_cast<red_t>(sdz);
      acc.dzx += static_cast<red_t>(sdzx);
    }
  }
  return acc;
}

template <typename scalar_t, typename acc_t, int VEC, bool REDUCE, bool WRITE>
__device__ void nlc_backward(const BwdArgs<scalar_t, acc_t>& a, int64_t xv_col, int64_t r0, int64_t r1,
                             const BwdCoef<acc_t> (&k)[VEC], const acc_t (&ka)[VEC], const acc_t (&kb)[VEC],
                             BwdSums (&acc)[VEC]) {
  using V = VecT<scalar_t, VEC>;
  const V* dyv = reinterpret_cast<const V*>(a.dy);
  const V* sv = reinterpret_cast<const V*>(a.saved);
  V* dxv = reinterpret_cast<V*>(a.dx);
  const int64_t ty = blockDim.y, Cv = a.nvec;
  for (int64_t r = r0 + threadIdx.y; r < r1; r += kBwdUnroll * ty) {
    V g[kBwdUnroll], s[kBwdUnroll];
#pragma unroll
    for (int u = 0; u < kBwdUnroll; ++u) {
      if (r + u * ty < r1) {
        g[u] = dyv[(r + u * ty) * Cv + xv_col];
        s[u] = sv[(r + u * ty) * Cv + xv_col];
      }
    }
#pragma unroll
    for (int u = 0; u < kBwdUnroll; ++u) {
      if (r + u * ty >= r1) continue;
      V o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        acc_t xh;
        const acc_t dz = bwd_dz(a, k[e], static_cast<acc_t>(g[u].v[e]), static_cast<acc_t>(s[u].v[e]), &xh);
        if (REDUCE) {
          // Each value straight into the double sums: a step holds only kBwdUnroll values of a
          // channel, and acc_t step sums would need 2 * VEC more registers (spills at VEC = 8).
          acc[e].dz += static_cast<red_t>(dz);
          acc[e].dzx += static_cast<red_t>(dz * xh);
        }
        if (WRITE) o.v[e] = static_cast<scalar_t>(bn_act_dx_elem<acc_t>(dz, xh, k[e].scale, ka[e], kb[e]));
      }
      if (WRITE) dxv[(r + u * ty) * Cv + xv_col] = o;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Kernels. Grid: (channel groups, splits). NCL: block (kThreads), group = channel blockIdx.x.
// NLC: block (tx, ty), group blockIdx.x covers vector columns [blockIdx.x * tx, + tx).

// Training statistics (and, with one split, the normalise pass). Each thread reduces one step's
// loaded values (NCL: kUnroll vectors of its channel; NLC: kUnroll rows of each of its VEC
// channels) as one run (sum_partial_of_run) and merges it into its double partial.
template <typename scalar_t, typename acc_t, int VEC, bool NLC>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
bn_fwd_stats_kernel(const FwdArgs<scalar_t, acc_t> a /* see FwdArgs */) {
  using W = StatPartial;
  __shared__ W smem[NLC ? kWarps * 32 * kColGroupOf<VEC> : kWarps];
  __shared__ NormCoef<acc_t> s_coef[NLC ? 32 * VEC : 1];
  __shared__ bool s_last;
  const int64_t g = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  if constexpr (!NLC) {
    using V = VecT<scalar_t, VEC>;
    const V* xv = reinterpret_cast<const V*>(a.x);
    const int64_t c = g, total = a.N * a.nvec;
    const int64_t j0 = imin(total, split * a.chunk), j1 = imin(total, j0 + a.chunk);
    W w = identity_of(static_cast<W*>(nullptr));
    if (j0 + threadIdx.x < j1) {
      NclCursor cur(j0 + threadIdx.x, c, a.C, a.nvec, kThreads);
      while (cur.j < j1) {
        V v[kUnroll];
        bool ok[kUnroll];
        int nok = 0;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          ok[u] = cur.j < j1;
          if (ok[u]) v[u] = xv[cur.off];
          nok += ok[u] ? 1 : 0;
          cur.advance(kThreads);
        }
        // One run: the step's valid values (at least the first vector), two passes over registers.
        const int64_t n = static_cast<int64_t>(nok) * VEC;
        const acc_t inv_n = nok == kUnroll ? acc_t(1.0 / (kUnroll * VEC)) : acc_t(1) / static_cast<acc_t>(n);
        acc_t sum = acc_t(0);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (!ok[u]) continue;
#pragma unroll
          for (int e = 0; e < VEC; ++e) sum += static_cast<acc_t>(v[u].v[e]);
        }
        const acc_t m = sum * inv_n;
        acc_t sd = acc_t(0), q = acc_t(0);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (!ok[u]) continue;
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const acc_t d = static_cast<acc_t>(v[u].v[e]) - m;
            sd += d;
            q += d * d;
          }
        }
        const W run = sum_partial_of_run<red_t, acc_t>(n, inv_n, sum, m, sd, q);
        w = w.count == 0 ? run : sum_partial_merge_with<red_t>(w, run, sum_partial_merge_factor<red_t>(w.count, n));
      }
    }
    w = reduce_block_1d(w, smem);
    if (splits > 1) {
      if (threadIdx.x == 0) a.partials[split * a.C + c] = w;
      if (!arrive_last(a.tickets + g, static_cast<unsigned>(splits), &s_last)) return;
      w = identity_of(static_cast<W*>(nullptr));
      for (int64_t s = threadIdx.x; s < splits; s += kThreads) w = combine(w, load_partial(a.partials + s * a.C + c));
      w = reduce_block_1d(w, smem);
    }
    if (threadIdx.x == 0) s_coef[0] = stats_finish(a, c, w);
    if (!a.fuse_normalize) return;
    __syncthreads();
    ncl_normalize<scalar_t, acc_t, VEC>(a, c, j0, j1, s_coef[0]);
  } else {
    using V = VecT<scalar_t, VEC>;
    const V* xv = reinterpret_cast<const V*>(a.x);
    const int64_t ty = blockDim.y, Cv = a.nvec, rows = a.N * a.L;
    const int64_t col = g * blockDim.x + threadIdx.x;  // vector column: channels col*VEC .. +VEC-1
    const bool active = col < Cv;
    const int64_t r0 = imin(rows, split * a.chunk), r1 = imin(rows, r0 + a.chunk);
    W w[VEC];
    {
      // The VEC channels of a thread see the same rows: one count, one merge factor per step.
      int64_t cnt = 0;
      red_t sum[VEC], m2[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) sum[e] = m2[e] = red_t(0);
      if (active) {
        for (int64_t r = r0 + threadIdx.y; r < r1; r += kUnroll * ty) {
          V v[kUnroll];
          int nrow = 0;
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            if (r + u * ty < r1) {
              v[u] = xv[(r + u * ty) * Cv + col];
              ++nrow;
            }
          }
          const acc_t inv_n = nrow == kUnroll ? acc_t(1.0 / kUnroll) : acc_t(1) / static_cast<acc_t>(nrow);
          const red_t f = cnt > 0 ? sum_partial_merge_factor<red_t>(cnt, nrow) : red_t(0);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            acc_t s = acc_t(0);
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
              if (u < nrow) s += static_cast<acc_t>(v[u].v[e]);
            const acc_t m = s * inv_n;
            acc_t sd = acc_t(0), q = acc_t(0);
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
              if (u < nrow) {
                const acc_t d = static_cast<acc_t>(v[u].v[e]) - m;
                sd += d;
                q += d * d;
              }
            }
            const W run = sum_partial_of_run<red_t, acc_t>(nrow, inv_n, s, m, sd, q);
            if (cnt == 0) {
              sum[e] = run.sum;
              m2[e] = run.m2;
            } else {
              const W merged = sum_partial_merge_with<red_t>(W{cnt, sum[e], m2[e]}, run, f);
              sum[e] = merged.sum;
              m2[e] = merged.m2;
            }
          }
          cnt += nrow;
        }
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) w[e] = W{cnt, sum[e], m2[e]};
    }
    reduce_block_cols<W, VEC>(w, smem);
    if (splits > 1) {
      if (threadIdx.y == 0 && active) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) a.partials[split * a.C + col * VEC + e] = w[e];
      }
      if (!arrive_last(a.tickets + g, static_cast<unsigned>(splits), &s_last)) return;
#pragma unroll
      for (int e = 0; e < VEC; ++e) w[e] = identity_of(static_cast<W*>(nullptr));
      if (active) {
        for (int64_t s = threadIdx.y; s < splits; s += ty) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) w[e] = combine(w[e], load_partial(a.partials + s * a.C + col * VEC + e));
        }
      }
      reduce_block_cols<W, VEC>(w, smem);
    }
    if (threadIdx.y == 0 && active) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) s_coef[threadIdx.x * VEC + e] = stats_finish(a, col * VEC + e, w[e]);
    }
    if (!a.fuse_normalize) return;
    __syncthreads();
    if (!active) return;
    NormCoef<acc_t> k[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) k[e] = s_coef[threadIdx.x * VEC + e];
    nlc_normalize<scalar_t, acc_t, VEC>(a, col, r0, r1, k);
  }
}

// Normalise + activation: y = f((x - mean) * scale + beta) from the saved (training), given
// (batch_norm_act_apply) or running (eval) statistics; in eval mode the blocks of split 0 also
// write save_mean / save_invstd.
template <typename scalar_t, typename acc_t, int VEC, bool NLC>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
bn_fwd_norm_kernel(const FwdArgs<scalar_t, acc_t> a /* see FwdArgs */) {
  const int64_t g = blockIdx.x, split = blockIdx.y;
  if constexpr (!NLC) {
    const int64_t c = g, total = a.N * a.nvec;
    const int64_t j0 = imin(total, split * a.chunk), j1 = imin(total, j0 + a.chunk);
    const NormCoef<acc_t> k = fwd_coef(a, c, split == 0 && threadIdx.x == 0);
    ncl_normalize<scalar_t, acc_t, VEC>(a, c, j0, j1, k);
  } else {
    const int64_t rows = a.N * a.L;
    const int64_t col = g * blockDim.x + threadIdx.x;
    if (col >= a.nvec) return;
    const int64_t r0 = imin(rows, split * a.chunk), r1 = imin(rows, r0 + a.chunk);
    NormCoef<acc_t> k[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) k[e] = fwd_coef(a, col * VEC + e, split == 0 && threadIdx.y == 0);
    nlc_normalize<scalar_t, acc_t, VEC>(a, col, r0, r1, k);
  }
}

// The running statistics when their buffers overlap in memory (an expanded running_mean, or
// running_mean and running_var sharing storage): one thread updates them channel after channel
// from the merged statistics, reading both buffers of a channel before writing either, as the
// CPU kernel's loop does (an expanded buffer compounds the updates in channel order; torch's CPU
// kernel leaves the same on one thread). Every access goes through the views' strides.
__global__ void bn_running_serial_kernel(const Welford<red_t, int64_t>* st,  // (C,) merged statistics
                                         int64_t C,                          // channels
                                         ChannelParam run_mean,              // may be absent
                                         ChannelParam run_var,               // may be absent
                                         red_t eps, red_t momentum) {
  const bool have_rm = run_mean.type != kParamNone, have_rv = run_var.type != kParamNone;
  for (int64_t c = 0; c < C; ++c) {
    red_t mean, invstd;
    red_t rm = have_rm ? param_load<red_t>(run_mean, c, red_t(0)) : red_t(0);
    red_t rv = have_rv ? param_load<red_t>(run_var, c, red_t(1)) : red_t(0);
    finish_stats<red_t>(st[c], eps, momentum, &mean, &invstd, have_rm ? &rm : nullptr, have_rv ? &rv : nullptr);
    if (have_rm) param_store<red_t>(run_mean, c, rm);
    if (have_rv) param_store<red_t>(run_var, c, rv);
  }
}

// Backward reductions; eval mode also writes dx in the same pass; training with one split also
// runs the dx pass (fuse_dx). The finalising block writes grad_weight / grad_bias and coef.
template <typename scalar_t, typename acc_t, int VEC, bool NLC>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
bn_bwd_reduce_kernel(const BwdArgs<scalar_t, acc_t> a /* see BwdArgs */) {
  using S = BwdSums;
  __shared__ S smem[NLC ? kWarps * 32 * kColGroupOf<VEC> : kWarps];
  __shared__ acc_t s_ka[NLC ? 32 * VEC : 1];
  __shared__ acc_t s_kb[NLC ? 32 * VEC : 1];
  __shared__ bool s_last;
  const int64_t g = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  if constexpr (!NLC) {
    const int64_t c = g, total = a.N * a.nvec;
    const int64_t j0 = imin(total, split * a.chunk), j1 = imin(total, j0 + a.chunk);
    const BwdCoef<acc_t> k = bwd_coef(a, c);
    S acc = a.training ? ncl_backward<scalar_t, acc_t, VEC, true, false>(a, c, j0, j1, k, acc_t(0), acc_t(0))
                       : ncl_backward<scalar_t, acc_t, VEC, true, true>(a, c, j0, j1, k, acc_t(0), acc_t(0));
    acc = reduce_block_1d(acc, smem);
    if (splits > 1) {
      if (threadIdx.x == 0) a.partials[split * a.C + c] = acc;
      if (!arrive_last(a.tickets + g, static_cast<unsigned>(splits), &s_last)) return;
      acc = identity_of(static_cast<S*>(nullptr));
      for (int64_t s = threadIdx.x; s < splits; s += kThreads) acc = combine(acc, load_partial(a.partials + s * a.C + c));
      acc = reduce_block_1d(acc, smem);
    }
    if (threadIdx.x == 0) {
      bwd_finish(a, c, acc, s_ka[0], s_kb[0]);
      if (a.coef != nullptr) {
        a.coef[2 * c] = s_ka[0];
        a.coef[2 * c + 1] = s_kb[0];
      }
    }
    if (!(a.training && a.fuse_dx)) return;
    __syncthreads();
    ncl_backward<scalar_t, acc_t, VEC, false, true>(a, c, j0, j1, k, s_ka[0], s_kb[0]);
  } else {
    const int64_t ty = blockDim.y, rows = a.N * a.L;
    const int64_t col = g * blockDim.x + threadIdx.x;
    const bool active = col < a.nvec;
    const int64_t r0 = imin(rows, split * a.chunk), r1 = imin(rows, r0 + a.chunk);
    // The coefficients are loaded for each pass, not kept across the block reduction: with
    // the VEC double sums and their shuffles they would not fit in registers (VEC = 8 spilled).
    S acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = identity_of(static_cast<S*>(nullptr));
    if (active) {
      BwdCoef<acc_t> k[VEC];
      acc_t zero[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        zero[e] = acc_t(0);
        k[e] = bwd_coef(a, col * VEC + e);
      }
      if (a.training)
        nlc_backward<scalar_t, acc_t, VEC, true, false>(a, col, r0, r1, k, zero, zero, acc);
      else
        nlc_backward<scalar_t, acc_t, VEC, true, true>(a, col, r0, r1, k, zero, zero, acc);
    }
    reduce_block_cols<S, VEC>(acc, smem);
    if (splits > 1) {
      if (threadIdx.y == 0 && active) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) a.partials[split * a.C + col * VEC + e] = acc[e];
      }
      if (!arrive_last(a.tickets + g, static_cast<unsigned>(splits), &s_last)) return;
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] = identity_of(static_cast<S*>(nullptr));
      if (active) {
        for (int64_t s = threadIdx.y; s < splits; s += ty) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[e] = combine(acc[e], load_partial(a.partials + s * a.C + col * VEC + e));
        }
      }
      reduce_block_cols<S, VEC>(acc, smem);
    }
    if (threadIdx.y == 0 && active) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int64_t c = col * VEC + e;
        acc_t pa, pb;
        bwd_finish(a, c, acc[e], pa, pb);
        s_ka[threadIdx.x * VEC + e] = pa;
        s_kb[threadIdx.x * VEC + e] = pb;
        if (a.coef != nullptr) {
          a.coef[2 * c] = pa;
          a.coef[2 * c + 1] = pb;
        }
      }
    }
    if (!(a.training && a.fuse_dx)) return;
    __syncthreads();
    if (!active) return;
    BwdCoef<acc_t> k[VEC];
    acc_t ka[VEC], kb[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      k[e] = bwd_coef(a, col * VEC + e);
      ka[e] = s_ka[threadIdx.x * VEC + e];
      kb[e] = s_kb[threadIdx.x * VEC + e];
    }
    nlc_backward<scalar_t, acc_t, VEC, false, true>(a, col, r0, r1, k, ka, kb, acc);
  }
}

// Training dx from the coefficients written by bn_bwd_reduce_kernel, or from the global sums
// (batch_norm_act_bwd_dx: coef is null, see dx_coef).
template <typename scalar_t, typename acc_t, int VEC, bool NLC>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
bn_bwd_dx_kernel(const BwdArgs<scalar_t, acc_t> a /* see BwdArgs */) {
  const int64_t g = blockIdx.x, split = blockIdx.y;
  if constexpr (!NLC) {
    const int64_t c = g, total = a.N * a.nvec;
    const int64_t j0 = imin(total, split * a.chunk), j1 = imin(total, j0 + a.chunk);
    const BwdCoef<acc_t> k = bwd_coef(a, c);
    acc_t ka, kb;
    dx_coef(a, c, ka, kb);
    ncl_backward<scalar_t, acc_t, VEC, false, true>(a, c, j0, j1, k, ka, kb);
  } else {
    const int64_t rows = a.N * a.L;
    const int64_t col = g * blockDim.x + threadIdx.x;
    if (col >= a.nvec) return;
    const int64_t r0 = imin(rows, split * a.chunk), r1 = imin(rows, r0 + a.chunk);
    BwdCoef<acc_t> k[VEC];
    acc_t ka[VEC], kb[VEC];
    BwdSums unused[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const int64_t c = col * VEC + e;
      k[e] = bwd_coef(a, c);
      dx_coef(a, c, ka[e], kb[e]);
    }
    nlc_backward<scalar_t, acc_t, VEC, false, true>(a, col, r0, r1, k, ka, kb, unused);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int next_pow2(int64_t v) {
  int p = 1;
  while (p < v && p < 32) p <<= 1;
  return p;
}

// Grid geometry of one call.
struct Geometry {
  bool nlc;         // layout
  int vec;          // elements per vector access
  int tx, ty;       // block shape (NCL: kThreads x 1)
  int64_t nvec;     // vectors per row (L / vec for NCL, C / vec for NLC)
  int64_t groups;   // channel groups (gridDim.x)
  int64_t group_elems;  // elements of one group: N * L * channels per group
  int64_t units;    // split units of a group: vectors (NCL) or rows (NLC)
};

// Elements per vector access: 16 bytes, except in the NLC backward of 2-byte dtypes, which
// reads 8 (4 channels per thread): with 8 channels a thread's double sums, their coefficients
// and its loads did not fit in the 128-register cap (ptxas spilled 510 bytes at bfloat16).
template <typename scalar_t, bool BWD>
constexpr int vec_width(bool nlc) {
  return BWD && nlc && sizeof(scalar_t) == 2 ? 8 / sizeof(scalar_t) : 16 / sizeof(scalar_t);
}

template <typename scalar_t, bool BWD = false>
Geometry make_geometry(const ChannelView& v, std::initializer_list<const void*> ptrs) {
  Geometry g;
  g.nlc = v.layout == RowLayout::kNLC;
  const int kVec = vec_width<scalar_t, BWD>(g.nlc);
  const int64_t inner = g.nlc ? v.C : v.L;
  bool vec_ok = inner % kVec == 0;
  for (const void* p : ptrs) vec_ok = vec_ok && reinterpret_cast<uintptr_t>(p) % (kVec * sizeof(scalar_t)) == 0;
  g.vec = vec_ok ? kVec : 1;
  g.nvec = inner / g.vec;
  if (g.nlc) {
    g.tx = next_pow2(std::max<int64_t>(g.nvec, 1));
    g.ty = kThreads / g.tx;
    g.groups = ceil_div(std::max<int64_t>(g.nvec, 1), g.tx);
    g.units = v.N * v.L;
    g.group_elems = g.units * std::min<int64_t>(v.C, static_cast<int64_t>(g.tx) * g.vec);
  } else {
    g.tx = kThreads;
    g.ty = 1;
    g.groups = v.C;
    g.units = v.N * g.nvec;
    g.group_elems = v.N * v.L;
  }
  return g;
}

// Streaming multiprocessors of the current device (queried once per device).
int sm_count() {
  static std::mutex mu;
  static std::vector<int> counts;
  const int dev = c10::cuda::current_device();
  std::lock_guard<std::mutex> lock(mu);
  if (static_cast<int>(counts.size()) <= dev) counts.resize(dev + 1, 0);
  if (counts[dev] == 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&counts[dev], cudaDevAttrMultiProcessorCount, dev));
  return counts[dev];
}

// Splits per group: enough blocks for `blocks_per_sm` per SM, each with >= min_elems elements.
int64_t choose_splits(const Geometry& g, int blocks_per_sm, int64_t min_elems) {
  const int sms = sm_count();
  int64_t s = ceil_div(static_cast<int64_t>(sms) * blocks_per_sm, g.groups);
  s = std::min(s, g.group_elems / min_elems);
  s = std::min(s, std::max<int64_t>(g.units, 1));
  return std::max<int64_t>(1, std::min(s, kMaxSplits));
}

// Arrival counters for the split reductions: (groups,) ints, zero between launches. Outside
// CUDA-graph capture they are kept per (device, stream) and reset by the kernels themselves
// (launches on one stream are ordered, so no two launches share a counter at once); during
// capture each call gets its own zeroed buffer (a memset node of the graph), so that graph
// replays on other streams never share counters with eager launches.
unsigned* ticket_counters(int64_t n, const at::Tensor& like, at::Tensor& holder) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    holder = at::empty({n}, like.options().dtype(at::kInt));
    C10_CUDA_CHECK(cudaMemsetAsync(holder.data_ptr(), 0, n * sizeof(int), stream));
    return reinterpret_cast<unsigned*>(holder.data_ptr<int>());
  }
  static std::mutex mu;
  // Never destroyed: freeing CUDA memory during process teardown is not safe.
  static auto* cache = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();
  std::lock_guard<std::mutex> lock(mu);
  at::Tensor& t = (*cache)[{static_cast<int>(like.get_device()), stream}];
  if (!t.defined() || t.numel() < n) t = at::zeros({std::max<int64_t>(n, 1024)}, like.options().dtype(at::kInt));
  holder = t;
  return reinterpret_cast<unsigned*>(t.data_ptr<int>());
}

int param_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return kParamFloat;
    case at::kDouble: return kParamDouble;
    case at::kHalf: return kParamHalf;
    case at::kBFloat16: return kParamBFloat16;
    default: TORCH_CHECK(false, "batch_norm_act: ", name, " must be a floating-point tensor, got ", t.scalar_type());
  }
  return kParamNone;
}

ChannelParam channel_param(const c10::optional<at::Tensor>& t, const char* name) {
  if (!t.has_value() || !t->defined()) return ChannelParam{nullptr, 0, kParamNone};
  return ChannelParam{t->data_ptr(), t->dim() == 1 ? t->stride(0) : 1, param_type(*t, name)};
}

void check_tensor(const c10::optional<at::Tensor>& t, const at::Tensor& input, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->device() == input.device(),
              "Expected all tensors to be on the same device, but found input on ", input.device(),
              " and argument ", name, " on ", t->device());
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
  check_tensor(weight, input, "weight");
  check_tensor(bias, input, "bias");
}

at::ScalarType param_dtype(const at::Tensor& input, const c10::optional<at::Tensor>& p) {
  return p.has_value() && p->defined() ? p->scalar_type() : input.scalar_type();
}

// channel_view (csrc/common), except that contiguous tensors with L == 1 ((N, C) inputs of
// BatchNorm1d) are read as N rows of C channels (NLC: the same memory), so that warps read
// along C instead of one element per channel row.
ChannelView cuda_channel_view(at::Tensor& t) {
  ChannelView v = channel_view(t);
  if (v.layout == RowLayout::kNCL && v.L == 1) v.layout = RowLayout::kNLC;
  return v;
}

dim3 block_of(const Geometry& g) { return dim3(g.tx, g.ty); }

// Byte range [first, last] of a 1-D tensor's elements (empty tensors have none).
std::pair<uintptr_t, uintptr_t> byte_range(const at::Tensor& t) {
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t span = static_cast<uintptr_t>((t.numel() - 1) * t.stride(0) * t.element_size());
  return {p, p + span + t.element_size() - 1};
}

// True when the running buffers (1-D, checked) overlap in memory, so that blocks updating
// different channels would write the same element: a buffer with stride 0 and more than one
// element (an expanded tensor), or running_mean and running_var whose byte ranges intersect
// (conservative: interleaved views such as base[::2] and base[1::2] count too).
bool running_buffers_overlap(const c10::optional<at::Tensor>& rm, const c10::optional<at::Tensor>& rv) {
  const bool have_rm = rm.has_value() && rm->defined() && rm->numel() > 0;
  const bool have_rv = rv.has_value() && rv->defined() && rv->numel() > 0;
  for (const auto* t : {&rm, &rv}) {
    if (t->has_value() && (*t)->defined() && (*t)->numel() > 1 && (*t)->stride(0) == 0) return true;
  }
  if (!(have_rm && have_rv)) return false;
  const auto a = byte_range(*rm), b = byte_range(*rv);
  return a.first <= b.second && b.first <= a.second;
}

// The normalise pass alone (eval forward, training forward with splits, batch_norm_act_apply).
template <typename scalar_t, typename acc_t, int VEC, bool NLC>
void launch_norm(FwdArgs<scalar_t, acc_t> a, const Geometry& g) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t splits = choose_splits(g, kNormBlocksPerSM, kNormMinElems);
  a.chunk = ceil_div(g.units, splits);
  bn_fwd_norm_kernel<scalar_t, acc_t, VEC, NLC><<<dim3(g.groups, splits), block_of(g), 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Training: the statistics pass, then (unless fused into it, or stats_only) the normalise pass.
// Eval: the normalise pass.
template <typename scalar_t, typename acc_t, int VEC, bool NLC>
void launch_fwd(FwdArgs<scalar_t, acc_t> a, const Geometry& g, const at::Tensor& like) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor workspace, tickets;
  if (a.training) {
    const int64_t splits = choose_splits(g, kReduceBlocksPerSM, kReduceMinElems);
    a.chunk = ceil_div(g.units, splits);
    a.fuse_normalize = splits == 1 && !a.stats_only;
    if (splits > 1) {
      workspace = at::empty({static_cast<int64_t>(splits * a.C * sizeof(StatPartial))},
                            like.options().dtype(at::kByte));
      a.partials = reinterpret_cast<StatPartial*>(workspace.data_ptr());
      a.tickets = ticket_counters(g.groups, like, tickets);
    }
    bn_fwd_stats_kernel<scalar_t, acc_t, VEC, NLC>
        <<<dim3(g.groups, splits), block_of(g), 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (a.fuse_normalize || a.stats_only) return;
  }
  launch_norm<scalar_t, acc_t, VEC, NLC>(a, g);
}

// The training dx pass alone (coef from the reduce kernel, or a.sum_dz / a.sum_dzx).
template <typename scalar_t, typename acc_t, int VEC, bool NLC>
void launch_bwd_dx(BwdArgs<scalar_t, acc_t> a, const Geometry& g) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t splits = choose_splits(g, kNormBlocksPerSM, kNormMinElems);
  a.chunk = ceil_div(g.units, splits);
  bn_bwd_dx_kernel<scalar_t, acc_t, VEC, NLC><<<dim3(g.groups, splits), block_of(g), 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Backward: the reduce pass (eval: with dx), then in training the dx pass unless fused into it.
// reduce_only (batch_norm_act_bwd_reduce; needs a.training): the reduce pass alone, its sums
// written through grad_weight (sum dz * xhat) and grad_bias (sum dz), no coef, no dx.
template <typename scalar_t, typename acc_t, int VEC, bool NLC>
void launch_bwd(BwdArgs<scalar_t, acc_t> a, const Geometry& g, const at::Tensor& like, bool reduce_only) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor workspace, tickets, coef;
  // Eval writes dx during the reduction: grid it as the elementwise pass it also is.
  const int64_t splits = a.training ? choose_splits(g, kReduceBlocksPerSM, kReduceMinElems)
                                    : choose_splits(g, kNormBlocksPerSM, kNormMinElems);
  a.chunk = ceil_div(g.units, splits);
  a.fuse_dx = splits == 1 && !reduce_only;
  if (splits > 1) {
    workspace = at::empty({static_cast<int64_t>(splits * a.C * sizeof(BwdSums))},
                          like.options().dtype(at::kByte));
    a.partials = reinterpret_cast<BwdSums*>(workspace.data_ptr());
    a.tickets = ticket_counters(g.groups, like, tickets);
  }
  if (a.training && !a.fuse_dx && !reduce_only) {
    coef = at::empty({2 * a.C}, like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    a.coef = coef.data_ptr<acc_t>();
  }
  bn_bwd_reduce_kernel<scalar_t, acc_t, VEC, NLC><<<dim3(g.groups, splits), block_of(g), 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!a.training || a.fuse_dx || reduce_only) return;
  launch_bwd_dx<scalar_t, acc_t, VEC, NLC>(a, g);
}

// Calls f(VEC, NLC) (integral constants) for the geometry's vector width and layout; BWD as in
// make_geometry.
template <typename scalar_t, bool BWD = false, typename F>
void dispatch_geometry(const Geometry& g, F&& f) {
  constexpr int kVecNlc = vec_width<scalar_t, BWD>(true), kVecNcl = vec_width<scalar_t, BWD>(false);
  if (g.nlc) {
    if (g.vec == kVecNlc) f(std::integral_constant<int, kVecNlc>(), std::true_type());
    else f(std::integral_constant<int, 1>(), std::true_type());
  } else {
    if (g.vec == kVecNcl) f(std::integral_constant<int, kVecNcl>(), std::false_type());
    else f(std::integral_constant<int, 1>(), std::false_type());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_fwd_cuda(
    const at::Tensor& input_, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
    int64_t activation, double negative_slope, double gamma_floor) {
  check_common(input_, weight, bias);
  for (const auto& [t, name] : {std::make_pair(&running_mean, "running_mean"), std::make_pair(&running_var, "running_var")}) {
    check_tensor(*t, input_, name);
    if (t->has_value() && (*t)->defined()) {
      TORCH_CHECK((*t)->dim() == 1 && (*t)->numel() == input_.size(1), "batch_norm_act: ", name,
                  " should contain ", input_.size(1), " elements not ", (*t)->numel());
    }
  }
  const c10::cuda::CUDAGuard guard(input_.device());
  at::Tensor input = input_;
  const ChannelView v = cuda_channel_view(input);
  const int64_t C = v.C;
  const bool have_rm = running_mean.has_value() && running_mean->defined();
  const bool have_rv = running_var.has_value() && running_var->defined();
  TORCH_CHECK(training || (have_rm && have_rv),
              "batch_norm_act: running_mean and running_var are required when training=False");
  at::Tensor out = empty_bn_output(input);
  const auto acc_type = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor save_mean = at::empty({C}, input.options().dtype(acc_type));
  at::Tensor save_invstd = at::empty({C}, input.options().dtype(acc_type));
  // Parameter dtypes are checked before anything is written.
  const ChannelParam w = channel_param(weight, "weight"), b = channel_param(bias, "bias");
  const ChannelParam rm = channel_param(running_mean, "running_mean");
  const ChannelParam rv = channel_param(running_var, "running_var");
  if (C == 0) return {out, save_mean, save_invstd};
  // Overlapping running buffers: the statistics pass leaves them alone and writes the merged
  // statistics here; bn_running_serial_kernel then updates them in channel order.
  at::Tensor deferred;
  if (training && running_buffers_overlap(running_mean, running_var)) {
    deferred = at::empty({static_cast<int64_t>(C * sizeof(Welford<red_t, int64_t>))}, input.options().dtype(at::kByte));
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_act_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Geometry g = make_geometry<scalar_t>(v, {input.data_ptr(), out.data_ptr()});
    FwdArgs<scalar_t, acc_t> a{};
    a.x = input.data_ptr<scalar_t>();
    a.y = out.data_ptr<scalar_t>();
    a.N = v.N;
    a.C = C;
    a.L = v.L;
    a.nvec = g.nvec;
    a.weight = w;
    a.bias = b;
    a.run_mean = rm;
    a.run_var = rv;
    a.save_mean = save_mean.data_ptr<acc_t>();
    a.save_invstd = save_invstd.data_ptr<acc_t>();
    a.partials = nullptr;
    a.tickets = nullptr;
    a.deferred = deferred.defined() ? reinterpret_cast<Welford<red_t, int64_t>*>(deferred.data_ptr()) : nullptr;
    a.eps = eps;
    a.momentum = momentum;
    a.slope = static_cast<acc_t>(negative_slope);
    a.gamma_floor = static_cast<acc_t>(gamma_floor);
    a.act = static_cast<int>(activation);
    a.training = training;
    a.fuse_normalize = false;
    dispatch_geometry<scalar_t>(g, [&](auto vec, auto nlc) {
      launch_fwd<scalar_t, acc_t, decltype(vec)::value, decltype(nlc)::value>(a, g, input);
    });
  });
  if (deferred.defined()) {
    bn_running_serial_kernel<<<1, 1, 0, c10::cuda::getCurrentCUDAStream().stream()>>>(
        reinterpret_cast<const Welford<red_t, int64_t>*>(deferred.data_ptr()), C, rm, rv, eps, momentum);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {bn_output_as_torch(out), save_mean, save_invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_bwd_cuda(
    const at::Tensor& grad_out_, const at::Tensor& saved_, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& save_mean, const at::Tensor& save_invstd,
    bool training, int64_t activation, double negative_slope, double gamma_floor, bool saved_is_output) {
  check_common(saved_, weight, bias);
  TORCH_CHECK(grad_out_.sizes() == saved_.sizes(), "batch_norm_act: grad_output has shape ", grad_out_.sizes(),
              " but the saved tensor has shape ", saved_.sizes());
  check_tensor(grad_out_, saved_, "grad_output");
  check_tensor(save_mean, saved_, "save_mean");
  check_tensor(save_invstd, saved_, "save_invstd");
  TORCH_CHECK(grad_out_.scalar_type() == saved_.scalar_type(), "batch_norm_act: grad_output has dtype ",
              grad_out_.scalar_type(), " but the saved tensor has dtype ", saved_.scalar_type());
  const auto acc_type = saved_.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto* t : {&save_mean, &save_invstd}) {
    TORCH_CHECK(t->scalar_type() == acc_type && t->dim() == 1 && t->numel() == saved_.size(1),
                "batch_norm_act: save_mean and save_invstd must be 1-D ", acc_type, " tensors with ",
                saved_.size(1), " elements");
  }
  const c10::cuda::CUDAGuard guard(saved_.device());
  at::Tensor saved = saved_;
  const ChannelView v = cuda_channel_view(saved);
  // grad_out is read in the saved tensor's layout; a copy is made only when the two differ.
  at::Tensor grad_out = grad_out_;
  if (grad_out.strides() != saved.strides()) grad_out = at::empty_like(saved).copy_(grad_out_);
  const int64_t C = v.C;
  at::Tensor grad_input = at::empty_like(saved);
  at::Tensor grad_weight = at::empty({C}, saved.options().dtype(param_dtype(saved, weight)));
  at::Tensor grad_bias = at::empty({C}, saved.options().dtype(param_dtype(saved, bias)));
  const ChannelParam w = channel_param(weight, "weight"), b = channel_param(bias, "bias");
  if (C == 0) return {grad_input, grad_weight, grad_bias};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saved.scalar_type(), "batch_norm_act_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Geometry g =
        make_geometry<scalar_t, true>(v, {grad_out.data_ptr(), saved.data_ptr(), grad_input.data_ptr()});
    BwdArgs<scalar_t, acc_t> a{};
    a.dy = grad_out.data_ptr<scalar_t>();
    a.saved = saved.data_ptr<scalar_t>();
    a.dx = grad_input.data_ptr<scalar_t>();
    a.N = v.N;
    a.C = C;
    a.L = v.L;
    a.nvec = g.nvec;
    a.weight = w;
    a.bias = b;
    a.save_mean = channel_param(save_mean, "save_mean");
    a.save_invstd = channel_param(save_invstd, "save_invstd");
    a.grad_weight = channel_param(grad_weight, "grad_weight");
    a.grad_bias = channel_param(grad_bias, "grad_bias");
    a.partials = nullptr;
    a.tickets = nullptr;
    a.coef = nullptr;
    a.count = static_cast<red_t>(v.N) * static_cast<red_t>(v.L);
    a.slope = static_cast<acc_t>(negative_slope);
    a.gamma_floor = static_cast<acc_t>(gamma_floor);
    a.act = static_cast<int>(activation);
    a.training = training;
    a.saved_is_output = saved_is_output;
    a.fuse_dx = false;
    dispatch_geometry<scalar_t, true>(g, [&](auto vec, auto nlc) {
      launch_bwd<scalar_t, acc_t, decltype(vec)::value, decltype(nlc)::value>(a, g, saved, false);
    });
  });
  return {bn_output_as_torch(grad_input), grad_weight, grad_bias};
}

// --- The passes as separate ops (SyncBatchNormAct: a collective sits between them), with the
// behaviour of their CPU kernels. Each is one launch of the kernel above that makes the pass
// (split blocks merge in the same launch), with its finalisation replaced: stats returns the
// merged (mean, M2); bwd_reduce the sums; apply and bwd_dx take mean / invstd (and the global
// sums and count) as inputs.

// A per-channel input (mean, invstd, sums): C elements of any floating dtype on like's device,
// read through a ChannelParam (so 1-D; a (C, 1)-shaped tensor is viewed as (C,)).
at::Tensor per_channel_input(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.numel() == like.size(1), "batch_norm_act: ", name, " must have ", like.size(1),
              " elements, got ", t.numel());
  check_tensor(t, like, name);
  return t.dim() == 1 ? t : t.reshape({-1});
}

// grad_output against the saved tensor: same shape, device and dtype.
void check_grad_out(const at::Tensor& grad_out, const at::Tensor& saved) {
  TORCH_CHECK(grad_out.sizes() == saved.sizes(), "batch_norm_act: grad_output has shape ", grad_out.sizes(),
              " but the saved tensor has shape ", saved.sizes());
  check_tensor(grad_out, saved, "grad_output");
  TORCH_CHECK(grad_out.scalar_type() == saved.scalar_type(), "batch_norm_act: grad_output has dtype ",
              grad_out.scalar_type(), " but the saved tensor has dtype ", saved.scalar_type());
}

template <typename scalar_t, typename acc_t>
FwdArgs<scalar_t, acc_t> fwd_args(const at::Tensor& input, const ChannelView& v, const Geometry& g) {
  FwdArgs<scalar_t, acc_t> a{};
  a.x = input.data_ptr<scalar_t>();
  a.N = v.N;
  a.C = v.C;
  a.L = v.L;
  a.nvec = g.nvec;
  return a;
}

template <typename scalar_t, typename acc_t>
BwdArgs<scalar_t, acc_t> bwd_args(const at::Tensor& grad_out, const at::Tensor& saved, const ChannelView& v,
                                  const Geometry& g, const ChannelParam& w, const ChannelParam& b,
                                  const at::Tensor& mean, const at::Tensor& invstd, int64_t activation,
                                  double negative_slope, double gamma_floor, bool saved_is_output) {
  BwdArgs<scalar_t, acc_t> a{};
  a.dy = grad_out.data_ptr<scalar_t>();
  a.saved = saved.data_ptr<scalar_t>();
  a.N = v.N;
  a.C = v.C;
  a.L = v.L;
  a.nvec = g.nvec;
  a.weight = w;
  a.bias = b;
  a.save_mean = channel_param(mean, "mean");
  a.save_invstd = channel_param(invstd, "invstd");
  a.slope = static_cast<acc_t>(negative_slope);
  a.gamma_floor = static_cast<acc_t>(gamma_floor);
  a.act = static_cast<int>(activation);
  a.training = true;
  a.saved_is_output = saved_is_output;
  return a;
}

std::tuple<at::Tensor, at::Tensor> batch_norm_act_stats_cuda(const at::Tensor& input_) {
  check_common(input_, c10::nullopt, c10::nullopt);
  const c10::cuda::CUDAGuard guard(input_.device());
  at::Tensor input = input_;
  const ChannelView v = cuda_channel_view(input);
  const auto acc_type = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({v.C}, input.options().dtype(acc_type));
  at::Tensor m2 = at::empty({v.C}, input.options().dtype(acc_type));
  if (v.C == 0) return {mean, m2};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_act_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Geometry g = make_geometry<scalar_t>(v, {input.data_ptr()});
    FwdArgs<scalar_t, acc_t> a = fwd_args<scalar_t, acc_t>(input, v, g);
    a.save_mean = mean.data_ptr<acc_t>();
    a.save_invstd = m2.data_ptr<acc_t>();
    a.training = true;
    a.stats_only = true;
    dispatch_geometry<scalar_t>(g, [&](auto vec, auto nlc) {
      launch_fwd<scalar_t, acc_t, decltype(vec)::value, decltype(nlc)::value>(a, g, input);
    });
  });
  return {mean, m2};
}

at::Tensor batch_norm_act_apply_cuda(const at::Tensor& input_, const at::Tensor& mean_, const at::Tensor& invstd_,
                                     const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                     int64_t activation, double negative_slope, double gamma_floor) {
  check_common(input_, weight, bias);
  const at::Tensor mean = per_channel_input(mean_, input_, "mean");
  const at::Tensor invstd = per_channel_input(invstd_, input_, "invstd");
  const c10::cuda::CUDAGuard guard(input_.device());
  at::Tensor input = input_;
  const ChannelView v = cuda_channel_view(input);
  const ChannelParam w = channel_param(weight, "weight"), b = channel_param(bias, "bias");
  const ChannelParam pm = channel_param(mean, "mean"), pi = channel_param(invstd, "invstd");
  at::Tensor out = empty_bn_output(input);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_act_apply_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Geometry g = make_geometry<scalar_t>(v, {input.data_ptr(), out.data_ptr()});
    FwdArgs<scalar_t, acc_t> a = fwd_args<scalar_t, acc_t>(input, v, g);
    a.y = out.data_ptr<scalar_t>();
    a.weight = w;
    a.bias = b;
    a.given_mean = pm;
    a.given_invstd = pi;
    a.slope = static_cast<acc_t>(negative_slope);
    a.gamma_floor = static_cast<acc_t>(gamma_floor);
    a.act = static_cast<int>(activation);
    a.training = true;
    dispatch_geometry<scalar_t>(g, [&](auto vec, auto nlc) {
      launch_norm<scalar_t, acc_t, decltype(vec)::value, decltype(nlc)::value>(a, g);
    });
  });
  return bn_output_as_torch(out);
}

std::tuple<at::Tensor, at::Tensor> batch_norm_act_bwd_reduce_cuda(
    const at::Tensor& grad_out_, const at::Tensor& saved_, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean_, const at::Tensor& invstd_, int64_t activation,
    double negative_slope, double gamma_floor, bool saved_is_output) {
  check_common(saved_, weight, bias);
  check_grad_out(grad_out_, saved_);
  const at::Tensor mean = per_channel_input(mean_, saved_, "mean");
  const at::Tensor invstd = per_channel_input(invstd_, saved_, "invstd");
  const c10::cuda::CUDAGuard guard(saved_.device());
  at::Tensor saved = saved_;
  const ChannelView v = cuda_channel_view(saved);
  at::Tensor grad_out = grad_out_;
  if (grad_out.strides() != saved.strides()) grad_out = at::empty_like(saved).copy_(grad_out_);
  const auto acc_type = saved.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor sum_dz = at::empty({v.C}, saved.options().dtype(acc_type));
  at::Tensor sum_dzx = at::empty({v.C}, saved.options().dtype(acc_type));
  const ChannelParam w = channel_param(weight, "weight"), b = channel_param(bias, "bias");
  if (v.C == 0) return {sum_dz, sum_dzx};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saved.scalar_type(), "batch_norm_act_bwd_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Geometry g = make_geometry<scalar_t, true>(v, {grad_out.data_ptr(), saved.data_ptr()});
    BwdArgs<scalar_t, acc_t> a = bwd_args<scalar_t, acc_t>(grad_out, saved, v, g, w, b, mean, invstd, activation,
                                                           negative_slope, gamma_floor, saved_is_output);
    a.grad_weight = channel_param(sum_dzx, "sum_dz_xhat");
    a.grad_bias = channel_param(sum_dz, "sum_dz");
    a.count = static_cast<red_t>(v.N) * static_cast<red_t>(v.L);
    dispatch_geometry<scalar_t, true>(g, [&](auto vec, auto nlc) {
      launch_bwd<scalar_t, acc_t, decltype(vec)::value, decltype(nlc)::value>(a, g, saved, true);
    });
  });
  return {sum_dz, sum_dzx};
}

at::Tensor batch_norm_act_bwd_dx_cuda(const at::Tensor& grad_out_, const at::Tensor& saved_,
                                      const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                      const at::Tensor& mean_, const at::Tensor& invstd_, const at::Tensor& sum_dz_,
                                      const at::Tensor& sum_dz_xhat_, double count, int64_t activation,
                                      double negative_slope, double gamma_floor, bool saved_is_output) {
  check_common(saved_, weight, bias);
  check_grad_out(grad_out_, saved_);
  const at::Tensor mean = per_channel_input(mean_, saved_, "mean");
  const at::Tensor invstd = per_channel_input(invstd_, saved_, "invstd");
  const at::Tensor sum_dz = per_channel_input(sum_dz_, saved_, "sum_dz");
  const at::Tensor sum_dzx = per_channel_input(sum_dz_xhat_, saved_, "sum_dz_xhat");
  const c10::cuda::CUDAGuard guard(saved_.device());
  at::Tensor saved = saved_;
  const ChannelView v = cuda_channel_view(saved);
  const ChannelParam w = channel_param(weight, "weight"), b = channel_param(bias, "bias");
  const ChannelParam ps = channel_param(sum_dz, "sum_dz"), psx = channel_param(sum_dzx, "sum_dz_xhat");
  at::Tensor grad_input = at::empty_like(saved);
  if (grad_input.numel() == 0) return grad_input;
  at::Tensor grad_out = grad_out_;
  if (grad_out.strides() != saved.strides()) grad_out = at::empty_like(saved).copy_(grad_out_);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saved.scalar_type(), "batch_norm_act_bwd_dx_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Geometry g =
        make_geometry<scalar_t, true>(v, {grad_out.data_ptr(), saved.data_ptr(), grad_input.data_ptr()});
    BwdArgs<scalar_t, acc_t> a = bwd_args<scalar_t, acc_t>(grad_out, saved, v, g, w, b, mean, invstd, activation,
                                                           negative_slope, gamma_floor, saved_is_output);
    a.dx = grad_input.data_ptr<scalar_t>();
    a.sum_dz = ps;
    a.sum_dzx = psx;
    a.count = count;
    dispatch_geometry<scalar_t, true>(g, [&](auto vec, auto nlc) {
      launch_bwd_dx<scalar_t, acc_t, decltype(vec)::value, decltype(nlc)::value>(a, g);
    });
  });
  return bn_output_as_torch(grad_input);
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CUDA, m) {
  m.impl("batch_norm_act_fwd", &batch_norm_act_fwd_cuda);
  m.impl("batch_norm_act_bwd", &batch_norm_act_bwd_cuda);
  m.impl("batch_norm_act_stats", &batch_norm_act_stats_cuda);
  m.impl("batch_norm_act_apply", &batch_norm_act_apply_cuda);
  m.impl("batch_norm_act_bwd_reduce", &batch_norm_act_bwd_reduce_cuda);
  m.impl("batch_norm_act_bwd_dx", &batch_norm_act_bwd_dx_cuda);
}

}  // namespace genfast
