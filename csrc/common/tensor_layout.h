// Host-side view of a BatchNorm-style (N, C, *) tensor as rows of contiguous elements, shared
// by the CPU and CUDA launchers. Only the two layouts genfast reads without a copy are named:
//   kNCL: contiguous (N, C, L): N*C rows of L elements, all of one channel.
//   kNLC: channels-last (N, L, C) in memory: N*L rows of C elements, one per channel.
#pragma once
#include <ATen/ATen.h>

namespace genfast {

enum class RowLayout { kNCL, kNLC };

struct ChannelView {
  RowLayout layout;
  int64_t N, C, L;
};

inline bool is_channels_last_dense(const at::Tensor& t) {
  if (t.dim() == 4) return t.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (t.dim() == 3) {
    const int64_t N = t.size(0), C = t.size(1), L = t.size(2);
    // (N, C, L) stored as (N, L, C).
    return (C == 1 || t.stride(1) == 1) && (L == 1 || t.stride(2) == C) &&
           (N == 1 || t.stride(0) == C * L);
  }
  return false;
}

// Returns the view; `t` is replaced by a contiguous copy only when it is neither layout.
inline ChannelView channel_view(at::Tensor& t) {
  const int64_t N = t.size(0), C = t.size(1);
  const int64_t L = C == 0 || N == 0 ? 0 : t.numel() / (N * C);
  if (t.is_contiguous()) return {RowLayout::kNCL, N, C, L};
  if (is_channels_last_dense(t)) return {RowLayout::kNLC, N, C, L};
  t = t.contiguous();
  return {RowLayout::kNCL, N, C, L};
}

// The output of a BatchNorm (+ activation) of t, t contiguous or channels_last-dense as
// channel_view leaves it: torch's CPU BatchNorm layout, canonical strides: contiguous whenever t
// is contiguous, whatever the strides of its size-1 dimensions (an (N, C, 1, 1) tensor made
// channels_last), else channels_last; other ranks keep t's strides. The memory order is t's
// either way (kernels index both as the view).
inline at::Tensor empty_bn_output(const at::Tensor& t) {
  if (t.dim() != 4) return at::empty_like(t);
  if (t.is_contiguous()) return at::empty(t.sizes(), t.options());
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::ChannelsLast));
  return at::empty_like(t);
}

// The output a BatchNorm op returns, from the buffer empty_bn_output gave its kernel: torch's CPU
// and CUDA BatchNorm return contiguous strides for an (N, C, L) input stored (N, L, C) (a
// sequence's (N, L, C).transpose(1, 2): suggest_memory_format is contiguous for 3-D), which the
// kernels read and write in that order, so its output is copied to contiguous (user code views
// it). (A 5-D channels_last_3d input, which torch keeps in its layout, is read through a
// contiguous copy and returned contiguous: a known difference.)
inline at::Tensor bn_output_as_torch(const at::Tensor& out) {
  return out.dim() != 4 && !out.is_contiguous() ? out.contiguous() : out;
}

// t with contiguous strides where it is contiguous in memory but carries other strides (a
// channels_last product of one channel or of 1x1 maps, which both layouts describe): the output
// torch's out-of-place elementwise ops and CPU BatchNorm give such an input. A copy (these
// shapes are small); t itself otherwise, and for a traced tensor with symbolic strides.
inline at::Tensor with_contiguous_strides(const at::Tensor& t) {
  if (t.dim() != 4 || t.unsafeGetTensorImpl()->has_symbolic_sizes_strides() || !t.is_contiguous() ||
      t.strides() == at::IntArrayRef(c10::contiguous_strides(t.sizes())))
    return t;
  return at::empty(t.sizes(), t.options()).copy_(t);
}

}  // namespace genfast
