// GAN / VAE / BCE losses and reparameterisation on CUDA (the math is csrc/common/losses.h).
//
// Each loss forward is ONE kernel launch and ONE pass over its inputs: every element's term and
// derivative come from one evaluation; the derivative (times the reduction factor) is written to
// a flat float32 (float64) buffer for the backward; the block's terms are summed in a fixed tree
// order; with more than one block, each block writes its partial sum and the last block to
// finish (an atomic ticket) adds the partials in block order, so the loss is deterministic.
// Inputs up to kSingleBlockMax elements run in a single block (no ticket, no memset); larger
// ones need the 4-byte ticket zeroed first (cudaMemsetAsync, not a kernel). The grid size
// depends only on the element count, never on the device.
// Backward (loss_scale_grad): one launch, one pass (read saved, write grad).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../common/losses.h"

namespace genfast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kSingleBlockMax = 16384;  // elements handled by one block
constexpr int64_t kPerBlock = 4096;         // elements per block above that
constexpr int64_t kMaxBlocks = 1024;

int64_t num_blocks(int64_t n) {
  if (n <= kSingleBlockMax) return 1;
  return std::min<int64_t>(kMaxBlocks, (n + kPerBlock - 1) / kPerBlock);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Sum of NV values over the block, in a fixed order; the result is valid in thread 0.
template <typename T, int NV>
__device__ void block_sum(T (&v)[NV]) {
  __shared__ T sm[NV][kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    v[k] = warp_sum(v[k]);
    if (lane == 0) sm[k][warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      T x = lane < kThreads / 32 ? sm[k][lane] : T(0);
      v[k] = warp_sum(x);
    }
  }
  __syncthreads();
}

// After block_sum: with one block, thread 0 holds the total (returns true there). Otherwise
// thread 0 stores the block's partials, takes a ticket; the last block re-reads all partials in
// block order and sums them; returns true in its thread 0 with the totals in v.
template <typename T, int NV>
__device__ bool finish_grid(T (&v)[NV], T* partials, unsigned int* ticket) {
  if (gridDim.x == 1) return threadIdx.x == 0;
  __shared__ bool last;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < NV; ++k) partials[k * gridDim.x + blockIdx.x] = v[k];
    __threadfence();
    last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return false;
  __threadfence();
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    T s = 0;
    for (unsigned b = threadIdx.x; b < gridDim.x; b += blockDim.x) s += __ldcg(partials + k * gridDim.x + b);
    v[k] = s;
  }
  block_sum<T, NV>(v);
  return threadIdx.x == 0;
}

// One launch for both sides of a GAN loss.
template <typename scalar_t, typename acc_t>
__global__ void gan_loss_kernel(const scalar_t* __restrict__ real,  // nr logits (role real)
                                const scalar_t* __restrict__ fake,  // nf logits (role fake / gen)
                                int64_t nr, int64_t nf,
                                int kind,                // GanKind
                                int fake_role,           // kRoleFake or kRoleGen
                                int reduction,           // LossReduction
                                acc_t real_label,        // real-side target (bce / lsgan)
                                acc_t wr, acc_t wf,      // per-element factor of each side (1/n for mean)
                                acc_t add,               // added to the loss: NaN for the mean of an empty side
                                acc_t* __restrict__ grad,      // [nr + nf] derivative * factor
                                acc_t* __restrict__ terms_r,   // [nr] terms (reduction none) or null
                                acc_t* __restrict__ terms_f,   // [nf] terms (reduction none) or null
                                acc_t* __restrict__ out,       // 0-dim loss (mean/sum) or null
                                acc_t* __restrict__ partials,  // [gridDim.x] block partials
                                unsigned int* ticket) {        // zeroed counter (gridDim.x > 1)
  const int64_t n = nr + nf;
  acc_t v[1] = {acc_t(0)};
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const bool is_r = i < nr;
    const acc_t x = static_cast<acc_t>(is_r ? real[i] : fake[i - nr]);
    acc_t g;
    const acc_t l = gan_elem<acc_t>(x, kind, is_r ? kRoleReal : fake_role, real_label, &g);
    const acc_t w = is_r ? wr : wf;
    grad[i] = g * w;
    if (reduction == kReduceNone) {
      if (is_r) terms_r[i] = l; else terms_f[i - nr] = l;
    } else {
      v[0] += l * w;
    }
  }
  if (reduction == kReduceNone) return;
  block_sum<acc_t, 1>(v);
  if (finish_grid<acc_t, 1>(v, partials, ticket)) *out = v[0] + add;
}

template <typename acc_t, typename out_a_t, typename out_b_t>
__global__ void scale_grad_kernel(const acc_t* __restrict__ saved,  // [n] saved derivatives
                                  int64_t split, int64_t n,
                                  const acc_t* __restrict__ ca, int mode_a,  // coef of [0, split): 0 none, 1 scalar, 2 elementwise
                                  const acc_t* __restrict__ cb, int mode_b,  // coef of [split, n)
                                  out_a_t* __restrict__ ga,                  // [split]
                                  out_b_t* __restrict__ gb) {                // [n - split]
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    if (i < split) {
      const acc_t c = mode_a == 0 ? acc_t(0) : (mode_a == 1 ? ca[0] : ca[i]);
      ga[i] = static_cast<out_a_t>(mode_a == 0 ? acc_t(0) : saved[i] * c);
    } else {
      const int64_t j = i - split;
      const acc_t c = mode_b == 0 ? acc_t(0) : (mode_b == 1 ? cb[0] : cb[j]);
      gb[j] = static_cast<out_b_t>(mode_b == 0 ? acc_t(0) : saved[i] * c);
    }
  }
}

// Reconstruction over [0, n) and KL over [n, n + nz) in one launch; two sums (recon, kl).
template <typename r_t, typename t_t, typename m_t, typename acc_t>
__global__ void vae_loss_kernel(const r_t* __restrict__ recon, const t_t* __restrict__ target,  // [n]
                                const m_t* __restrict__ mu, const m_t* __restrict__ logvar,     // [nz]
                                int64_t n, int64_t nz,
                                int recon_kind,   // VaeRecon
                                acc_t inv_n,      // 1 / N (batchmean) or 1
                                acc_t beta,       // KL weight
                                acc_t* __restrict__ grad,      // [n + 2 nz]: recon | mu | logvar
                                acc_t* __restrict__ loss,      // 0-dim
                                acc_t* __restrict__ parts,     // [2] recon, kl
                                acc_t* __restrict__ partials,  // [2 * gridDim.x]
                                unsigned int* ticket) {
  acc_t v[2] = {acc_t(0), acc_t(0)};
  const int64_t total = n + nz;
  const acc_t kb = beta * inv_n;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    if (i < n) {
      acc_t g;
      if (recon_kind == kReconBce) {  // torch's CUDA BCE asserts on both, in the kernel
        CUDA_KERNEL_ASSERT(recon[i] >= r_t(0) && recon[i] <= r_t(1));
        CUDA_KERNEL_ASSERT(target[i] >= t_t(0) && target[i] <= t_t(1));
      }
      v[0] += vae_recon_elem<acc_t>(static_cast<acc_t>(recon[i]), static_cast<acc_t>(target[i]), recon_kind, &g);
      grad[i] = g * inv_n;
    } else {
      const int64_t j = i - n;
      acc_t dm, dl;
      v[1] += kl_elem<acc_t>(static_cast<acc_t>(mu[j]), static_cast<acc_t>(logvar[j]), &dm, &dl);
      grad[n + j] = dm * kb;
      grad[n + nz + j] = dl * kb;
    }
  }
  block_sum<acc_t, 2>(v);
  if (finish_grid<acc_t, 2>(v, partials, ticket)) {
    const acc_t rec = v[0] * inv_n, kl = v[1] * inv_n;
    *loss = rec + beta * kl;
    parts[0] = rec;
    parts[1] = kl;
  }
}

template <typename x_t, typename t_t, typename acc_t>
__global__ void bce_loss_kernel(const x_t* __restrict__ input, const t_t* __restrict__ target,  // [n]
                                const acc_t* __restrict__ weight,      // [n] or null
                                const acc_t* __restrict__ pos_weight,  // [n] or null (logits only)
                                int64_t n,
                                bool logits,          // input holds logits (else probabilities)
                                int reduction,        // LossReduction
                                acc_t gscale,         // 1/n for mean, else 1
                                acc_t* __restrict__ grad,      // [n]
                                acc_t* __restrict__ terms,     // [n] (none) or null
                                acc_t* __restrict__ out,       // 0-dim (mean/sum) or null
                                acc_t* __restrict__ partials,  // [gridDim.x]
                                unsigned int* ticket) {
  acc_t v[1] = {acc_t(0)};
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    acc_t g, l;
    const acc_t xi = static_cast<acc_t>(input[i]), ti = static_cast<acc_t>(target[i]);
    if (logits) {
      l = bce_logits_elem<acc_t>(xi, ti, pos_weight ? pos_weight[i] : acc_t(1), &g);
    } else {
      CUDA_KERNEL_ASSERT(xi >= acc_t(0) && xi <= acc_t(1));
      CUDA_KERNEL_ASSERT(ti >= acc_t(0) && ti <= acc_t(1));
      l = bce_prob_elem<acc_t>(xi, ti, &g);
    }
    if (weight) {
      l *= weight[i];
      g *= weight[i];
    }
    grad[i] = g * gscale;
    if (reduction == kReduceNone) terms[i] = l; else v[0] += l * gscale;
  }
  if (reduction == kReduceNone) return;
  block_sum<acc_t, 1>(v);
  if (finish_grid<acc_t, 1>(v, partials, ticket)) *out = v[0];
}

template <typename scalar_t>
__global__ void reparam_fwd_kernel(const scalar_t* __restrict__ mu, const scalar_t* __restrict__ lv,
                                   const scalar_t* __restrict__ eps,  // [n] each
                                   scalar_t* __restrict__ z, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    z[i] = reparam_elem<scalar_t, acc_t>(mu[i], lv[i], eps[i]);
}

template <typename scalar_t>
__global__ void reparam_bwd_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ lv,
                                   const scalar_t* __restrict__ eps,  // [n] each
                                   scalar_t* __restrict__ out, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = static_cast<scalar_t>(reparam_grad_logvar<acc_t>(static_cast<acc_t>(g[i]), static_cast<acc_t>(lv[i]),
                                                              static_cast<acc_t>(eps[i])));
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

int elementwise_blocks(int64_t n) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 65535)));
}

// Partials buffer [nv * blocks] and a zeroed ticket (only when blocks > 1).
struct GridScratch {
  at::Tensor partials, ticket;
};

GridScratch grid_scratch(const at::Tensor& like, at::ScalarType acc, int64_t blocks, int nv) {
  GridScratch s;
  s.partials = at::empty({nv * blocks}, like.options().dtype(acc));
  s.ticket = at::empty({1}, like.options().dtype(at::kInt));
  if (blocks > 1) {
    C10_CUDA_CHECK(cudaMemsetAsync(s.ticket.data_ptr(), 0, sizeof(int), c10::cuda::getCurrentCUDAStream()));
  }
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gan_loss_fwd_cuda(const c10::optional<at::Tensor>& real_,
                                                                 const c10::optional<at::Tensor>& fake_,
                                                                 int64_t kind, bool generator, int64_t reduction,
                                                                 double real_label) {
  const bool has_r = real_.has_value() && real_->defined();
  const bool has_f = fake_.has_value() && fake_->defined();
  TORCH_CHECK(has_r || has_f, "gan_loss: real_logits and fake_logits are both None");
  const at::Tensor& any = has_r ? *real_ : *fake_;
  TORCH_CHECK(!(has_r && has_f) || real_->scalar_type() == fake_->scalar_type(),
              "gan_loss: real_logits and fake_logits must have the same dtype");
  TORCH_CHECK(reduction >= kReduceNone && reduction <= kReduceSum, "gan_loss: bad reduction code ", reduction);
  c10::cuda::CUDAGuard guard(any.device());
  at::Tensor real = has_r ? real_->contiguous() : at::Tensor();
  at::Tensor fake = has_f ? fake_->contiguous() : at::Tensor();
  const int64_t nr = has_r ? real.numel() : 0, nf = has_f ? fake.numel() : 0;
  const at::ScalarType acc = acc_type(any.scalar_type());
  const auto opts = any.options().dtype(acc);
  at::Tensor grad = at::empty({nr + nf}, opts);
  const bool none = reduction == kReduceNone;
  at::Tensor out_r = none ? (has_r ? at::empty(real.sizes(), opts) : at::empty({0}, opts)) : at::empty({}, opts);
  at::Tensor out_f = none && has_f ? at::empty(fake.sizes(), opts) : at::empty({0}, opts);
  const int64_t blocks = none ? elementwise_blocks(nr + nf) : num_blocks(nr + nf);
  GridScratch s = grid_scratch(any, acc, none ? 1 : blocks, 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, any.scalar_type(), "gan_loss_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool mean = reduction == kReduceMean;
    // 1/0 for an empty side with "mean": its (empty) sum then gives NaN, as torch's mean does.
    const acc_t wr = mean ? acc_t(1) / acc_t(nr) : acc_t(1), wf = mean ? acc_t(1) / acc_t(nf) : acc_t(1);
    const bool empty_side = (has_r && nr == 0) || (has_f && nf == 0);
    const acc_t add = mean && empty_side ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(0);
    gan_loss_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        has_r ? real.data_ptr<scalar_t>() : nullptr, has_f ? fake.data_ptr<scalar_t>() : nullptr, nr, nf,
        static_cast<int>(kind), generator ? kRoleGen : kRoleFake, static_cast<int>(reduction),
        static_cast<acc_t>(real_label), wr, wf, add, grad.data_ptr<acc_t>(),
        none && has_r ? out_r.data_ptr<acc_t>() : nullptr, none && has_f ? out_f.data_ptr<acc_t>() : nullptr,
        none ? nullptr : out_r.data_ptr<acc_t>(), s.partials.data_ptr<acc_t>(),
        reinterpret_cast<unsigned int*>(s.ticket.data_ptr<int>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out_r, out_f, grad};
}

template <typename acc_t, typename a_t, typename b_t>
void launch_scale(const at::Tensor& saved, int64_t split, const at::Tensor& ca, int ma, const at::Tensor& cb, int mb,
                  at::Tensor& ga, at::Tensor& gb) {
  const int64_t n = saved.numel();
  if (n == 0) return;
  scale_grad_kernel<acc_t, a_t, b_t><<<elementwise_blocks(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      saved.data_ptr<acc_t>(), split, n, ma ? ca.data_ptr<acc_t>() : nullptr, ma,
      mb ? cb.data_ptr<acc_t>() : nullptr, mb, ga.data_ptr<a_t>(), gb.data_ptr<b_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> loss_scale_grad_cuda(const c10::optional<at::Tensor>& coef_a,
                                                        const c10::optional<at::Tensor>& coef_b,
                                                        const at::Tensor& saved_, int64_t split,
                                                        at::ScalarType dtype_a, at::ScalarType dtype_b) {
  c10::cuda::CUDAGuard guard(saved_.device());
  const at::Tensor saved = saved_.contiguous();
  const int64_t n = saved.numel();
  TORCH_CHECK(split >= 0 && split <= n, "loss_scale_grad: split ", split, " outside [0, ", n, "]");
  auto coef = [&](const c10::optional<at::Tensor>& c, int64_t m, at::Tensor& t) -> int {
    if (!c.has_value() || !c->defined()) return 0;
    TORCH_CHECK(c->scalar_type() == saved.scalar_type(), "loss_scale_grad: gradient dtype ", c->scalar_type(),
                " differs from the saved derivative's ", saved.scalar_type());
    t = c->contiguous();
    TORCH_CHECK(t.dim() == 0 || t.numel() == m, "loss_scale_grad: gradient has ", t.numel(), " elements, expected 1 or ",
                m);
    return t.dim() == 0 ? 1 : 2;
  };
  at::Tensor ca, cb;
  const int ma = coef(coef_a, split, ca), mb = coef(coef_b, n - split, cb);
  at::Tensor ga = at::empty({split}, saved.options().dtype(dtype_a));
  at::Tensor gb = at::empty({n - split}, saved.options().dtype(dtype_b));
  if (saved.scalar_type() == at::kDouble) {
    TORCH_CHECK(dtype_a == at::kDouble && dtype_b == at::kDouble, "loss_scale_grad: float64 derivatives need float64 grads");
    launch_scale<double, double, double>(saved, split, ca, ma, cb, mb, ga, gb);
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype_a, "scale_a", [&] {
      using a_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype_b, "scale_b", [&] {
        launch_scale<float, a_t, scalar_t>(saved, split, ca, ma, cb, mb, ga, gb);
      });
    });
  }
  return {ga, gb};
}

// Runs f(r_t(), t_t(), acc_t()) for recon/input dtype r and target dtype t (= r or float32).
template <typename F>
void dispatch_pair(at::ScalarType r, at::ScalarType t, const F& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r, "loss_dispatch_pair", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (t == r) {
      f(scalar_t(0), scalar_t(0), acc_t(0));
    } else {
      TORCH_CHECK(t == acc_type(r), "losses: target must have the input's dtype or ", acc_type(r), ", got ", t);
      f(scalar_t(0), acc_t(0), acc_t(0));
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> vae_loss_fwd_cuda(const at::Tensor& recon_, const at::Tensor& target_,
                                                                 const at::Tensor& mu_, const at::Tensor& logvar_,
                                                                 int64_t recon_kind, double beta, int64_t reduction) {
  TORCH_CHECK(recon_.sizes() == target_.sizes(), "vae_loss: recon and target must have the same shape");
  TORCH_CHECK(mu_.sizes() == logvar_.sizes(), "vae_loss: mu and logvar must have the same shape");
  TORCH_CHECK(mu_.scalar_type() == logvar_.scalar_type(), "vae_loss: mu and logvar must have the same dtype");
  const at::ScalarType acc = acc_type(recon_.scalar_type());
  TORCH_CHECK(acc_type(mu_.scalar_type()) == acc, "vae_loss: mu and recon must both be float64 or both not");
  TORCH_CHECK(reduction == kReduceSum || reduction == kReduceBatchMean, "vae_loss: bad reduction code ", reduction);
  c10::cuda::CUDAGuard guard(recon_.device());
  const at::Tensor recon = recon_.contiguous(), target = target_.contiguous();
  const at::Tensor mu = mu_.contiguous(), logvar = logvar_.contiguous();
  const int64_t n = recon.numel(), nz = mu.numel();
  const auto opts = recon.options().dtype(acc);
  at::Tensor loss = at::empty({}, opts), parts = at::empty({2}, opts), grad = at::empty({n + 2 * nz}, opts);
  const double N = reduction == kReduceBatchMean ? (recon.dim() > 0 ? double(recon.size(0)) : 1.0) : 1.0;
  const int64_t blocks = num_blocks(n + nz);
  GridScratch s = grid_scratch(recon, acc, blocks, 2);
  dispatch_pair(recon.scalar_type(), target.scalar_type(), [&](auto rz, auto tz, auto az) {
    using r_t = decltype(rz);
    using t_t = decltype(tz);
    using acc_t = decltype(az);
    auto launch = [&](auto mz) {
      using m_t = decltype(mz);
      vae_loss_kernel<r_t, t_t, m_t, acc_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          recon.data_ptr<r_t>(), target.data_ptr<t_t>(), mu.data_ptr<m_t>(), logvar.data_ptr<m_t>(), n, nz,
          static_cast<int>(recon_kind), acc_t(1.0 / N), static_cast<acc_t>(beta), grad.data_ptr<acc_t>(),
          loss.data_ptr<acc_t>(), parts.data_ptr<acc_t>(), s.partials.data_ptr<acc_t>(),
          reinterpret_cast<unsigned int*>(s.ticket.data_ptr<int>()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    switch (mu.scalar_type()) {
      case at::kDouble: if constexpr (std::is_same_v<acc_t, double>) launch(double(0)); break;
      case at::kFloat: if constexpr (!std::is_same_v<acc_t, double>) launch(float(0)); break;
      case at::kHalf: if constexpr (!std::is_same_v<acc_t, double>) launch(at::Half(0)); break;
      case at::kBFloat16: if constexpr (!std::is_same_v<acc_t, double>) launch(at::BFloat16(0)); break;
      default: TORCH_CHECK(false, "vae_loss: unsupported mu dtype ", mu.scalar_type());
    }
  });
  return {loss, parts, grad};
}

std::tuple<at::Tensor, at::Tensor> bce_loss_fwd_cuda(const at::Tensor& input_, const at::Tensor& target_,
                                                     const c10::optional<at::Tensor>& weight_,
                                                     const c10::optional<at::Tensor>& pos_weight_,
                                                     int64_t reduction, bool logits) {
  TORCH_CHECK(input_.sizes() == target_.sizes(), "bce_loss: target size (", target_.sizes(),
              ") must be the same as input size (", input_.sizes(), ")");
  TORCH_CHECK(reduction >= kReduceNone && reduction <= kReduceSum, "bce_loss: bad reduction code ", reduction);
  c10::cuda::CUDAGuard guard(input_.device());
  const bool has_w = weight_.has_value() && weight_->defined();
  const bool has_p = pos_weight_.has_value() && pos_weight_->defined();
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
  const int64_t blocks = none ? elementwise_blocks(n) : num_blocks(n);
  GridScratch s = grid_scratch(input, acc, none ? 1 : blocks, 1);
  dispatch_pair(input.scalar_type(), target.scalar_type(), [&](auto xz, auto tz, auto az) {
    using x_t = decltype(xz);
    using t_t = decltype(tz);
    using acc_t = decltype(az);
    bce_loss_kernel<x_t, t_t, acc_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        input.data_ptr<x_t>(), target.data_ptr<t_t>(), has_w ? w.data_ptr<acc_t>() : nullptr,
        has_p ? pw.data_ptr<acc_t>() : nullptr, n, logits, static_cast<int>(reduction),
        reduction == kReduceMean ? acc_t(1) / acc_t(n) : acc_t(1), grad.data_ptr<acc_t>(),
        none ? out.data_ptr<acc_t>() : nullptr, none ? nullptr : out.data_ptr<acc_t>(),
        s.partials.data_ptr<acc_t>(), reinterpret_cast<unsigned int*>(s.ticket.data_ptr<int>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, grad};
}

at::Tensor reparam_fwd_cuda(const at::Tensor& mu_, const at::Tensor& logvar_, const at::Tensor& eps_) {
  TORCH_CHECK(mu_.sizes() == logvar_.sizes() && mu_.sizes() == eps_.sizes(),
              "reparameterize: mu, logvar and eps must have the same shape");
  TORCH_CHECK(mu_.scalar_type() == logvar_.scalar_type() && mu_.scalar_type() == eps_.scalar_type(),
              "reparameterize: mu, logvar and eps must have the same dtype");
  c10::cuda::CUDAGuard guard(mu_.device());
  const at::Tensor mu = mu_.contiguous(), lv = logvar_.contiguous(), eps = eps_.contiguous();
  at::Tensor z = at::empty(mu.sizes(), mu.options());
  const int64_t n = mu.numel();
  if (n == 0) return z;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparam_fwd_cuda", [&] {
    reparam_fwd_kernel<scalar_t><<<elementwise_blocks(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        mu.data_ptr<scalar_t>(), lv.data_ptr<scalar_t>(), eps.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return z;
}

at::Tensor reparam_bwd_cuda(const at::Tensor& grad_z_, const at::Tensor& logvar_, const at::Tensor& eps_) {
  TORCH_CHECK(grad_z_.sizes() == logvar_.sizes() && grad_z_.sizes() == eps_.sizes(),
              "reparameterize backward: shapes of grad, logvar and eps differ");
  TORCH_CHECK(grad_z_.scalar_type() == logvar_.scalar_type(), "reparameterize backward: grad dtype differs from logvar's");
  c10::cuda::CUDAGuard guard(logvar_.device());
  const at::Tensor g = grad_z_.contiguous(), lv = logvar_.contiguous(), eps = eps_.contiguous();
  at::Tensor out = at::empty(lv.sizes(), lv.options());
  const int64_t n = lv.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lv.scalar_type(), "reparam_bwd_cuda", [&] {
    reparam_bwd_kernel<scalar_t><<<elementwise_blocks(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        g.data_ptr<scalar_t>(), lv.data_ptr<scalar_t>(), eps.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CUDA, m) {
  m.impl("gan_loss_fwd", &gan_loss_fwd_cuda);
  m.impl("loss_scale_grad", &loss_scale_grad_cuda);
  m.impl("vae_loss_fwd", &vae_loss_fwd_cuda);
  m.impl("bce_loss_fwd", &bce_loss_fwd_cuda);
  m.impl("reparam_fwd", &reparam_fwd_cuda);
  m.impl("reparam_bwd", &reparam_bwd_cuda);
}

}  // namespace genfast
