"""BatchNorm + activation in Triton: kernels and launchers (tensors in, tensors out; no autograd).

Semantics are those of the C++ ops genfast::batch_norm_act_fwd / _bwd (csrc/cpu/batchnorm_act.cpp,
math in csrc/common/batchnorm_act.h, ground truth in genfast/reference/batchnorm_act.py).

Memory view. An (N, C, *) input is read as (N, C, L) in one of two layouts, without a copy:
  NCL (contiguous):    N*C rows of L elements; a tile is [BA rows n, BB elements l] of ONE channel
                       (one program per channel and split).
  NLC (channels_last): N*L rows of C elements; a tile is [BA rows (n, l), BB channels]
                       (one program per block of BB channels and split).
Any other layout is copied to contiguous first. The output has the input's memory format.
Elementwise math runs in float32 (float64 for float64 input). Each tile is reduced in that dtype;
the sums across tiles and splits, and the workspace, are float64, so that the error does not grow
with the reduction length (2^24 float32 ones already saturate). The batch mean is the total sum
over the total count, so +-inf inputs give a +-inf running_mean, as in torch.

Kernels, and their passes over memory (x, y, dy, dx are the big tensors):
  _stats_partial_kernel  training fwd, pass 1: reads x once; writes a (count, sum, M2) partial per
                         (channel, split): per-tile two-pass statistics in registers, merged across
                         tiles and splits with Chan's formula (no sum / sum-of-squares).
  _normalize_kernel      fwd, pass 2 (training) or the only pass (eval): reads x once, writes y once.
                         In training every program first merges the partials of its channels (a few
                         hundred floats from L2, fixed order, so every program gets bit-identical
                         statistics); the split-0 program of each channel writes save_mean/invstd and
                         the running statistics. So the two-stage reduction needs no third launch.
  _fused_fwd_kernel      "resident" path: one program holds a whole channel block in registers,
                         computes the statistics and normalises from registers: reads x ONCE and
                         writes y once, in a single launch. Used for tiny shapes (single launch) and,
                         on GPU, whenever a channel block fits on chip and there are enough channel
                         blocks to fill the GPU (e.g. DCGAN 128x512x4x4, 128x256x8x8).
  _bwd_partial_kernel    bwd, pass 1: reads dy and saved (x or y) once; writes partial
                         (sum dz, sum dz*xhat) per (channel, split). In eval it also writes dx
                         (dx = gamma*invstd*dz needs no reduction), so eval backward is ONE pass.
  _bwd_dx_kernel         training bwd, pass 2: merges the partials (fixed order), the split-0 program
                         writes grad_weight/grad_bias; reads dy and saved again, writes dx once.
                         In eval it is launched with no tiles, as the tiny finalize of grad_weight /
                         grad_bias (a second launch of one program per channel block).
  _fused_bwd_kernel      resident backward: dy and saved read ONCE, dx written once, one launch.
No float atomics anywhere: every reduction has a fixed order, results are deterministic.

Launches per call. Split path: training forward 2 (stats, normalize), eval forward 1, training
backward 2 (partial sums, dx), eval backward 2 (partial sums + dx, finalize). Resident path: 1 in
every mode. The finalize of the two-stage reductions is folded into the consumer kernel (each
program merges the partials it needs) rather than done by an atomic ticket, so it needs neither
a counter to reset nor cross-program memory ordering. The launcher picks the resident path when
the channel block fits (RESIDENT_MAX_*) and either the tensor is tiny (<= 65536 elements: one
launch beats a split) or there are at least half as many channel blocks as SMs; otherwise the
split path, with splits = ceil(4 * SMs / channel blocks), at most MAX_SPLITS, so that small C
still fills the GPU while each consumer program re-reads at most MAX_SPLITS partial rows.

Not done: the one-read (resident) path covers channel blocks up to RESIDENT_MAX_FWD / _BWD elements.
Larger channels (DCGAN 128x64x32x32 and 128x128x16x16: 131072 and 32768 elements per channel) take
the two-launch split path; keeping them on chip needs several CTAs per channel that synchronise
(a grid barrier or thread-block clusters), which was not written because it could not be tested
here (no GPU, and programs run one after another under TRITON_INTERPRET=1, so a barrier would hang).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from genfast.kernels.activation import act_backward_from_y, act_backward_from_z, act_forward, act_invert
from genfast.reference import batchnorm_act as ref


# Elements held per program by the resident kernels (padded to powers of two; half for float64).
# Forward keeps x, backward keeps dy and saved: 16384 fp32 values are 64 KiB of registers over
# 16 warps, 32 per thread (compiled for sm_90 with Triton 3.8: no spills at fp32, a few bytes at
# bf16; float64 spills at 16384, hence the halving).
RESIDENT_MAX_FWD = 16384
RESIDENT_MAX_BWD = 8192
# Channels per program in the channels-last layout (a row segment of BB contiguous values).
NLC_BLOCK_C = 64
# Columns (contiguous positions of one channel) per tile in the NCL layout.
NCL_BLOCK_L = 1024
# Elements per tile of the split kernels (4096 spilled in the float64-refined statistics pass,
# sm_90 compile check).
TILE_GPU = 2048
TILE_INTERPRET = 1024
# Partial rows per channel: every program of the consumer kernels merges all of them.
MAX_SPLITS = 64
# Partial rows merged per step (32 spilled in the channels_last normalise kernel).
MERGE_BLOCK = 8


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------

@triton.jit
def _scalar(v, ACC: tl.constexpr):
    # A float64 kernel argument as an ACC-typed scalar (exact for float64, rounded for float32).
    return tl.full([], v, ACC)


@triton.jit
def _invstd(var, eps, ACC: tl.constexpr):
    # 1 / sqrt(var + eps), IEEE-rounded square root in both precisions.
    if ACC == tl.float64:
        r = 1.0 / tl.sqrt(var + eps)
    else:
        r = 1.0 / tl.sqrt_rn(var + eps)
    return r


@triton.jit
def _channels(pid_c, C, BB: tl.constexpr, BCH: tl.constexpr, CL: tl.constexpr):
    # The channel indices of program `pid_c` ([BCH]: BB channels in NLC, one channel in NCL).
    if CL:
        ch = pid_c * BB + tl.arange(0, BCH)
    else:
        ch = pid_c + tl.arange(0, BCH)
    return ch, ch < C


@triton.jit
def _tile(t, pid_c, n_a, n_b, stride_a, L, tiles_b, BA: tl.constexpr, BB: tl.constexpr,
          CL: tl.constexpr):
    # Offsets [BA, BB] and mask of tile `t` of channel block `pid_c` (see the module docstring).
    # Row indices in int64: N*L rows of a channels-last tensor can pass 2^31.
    t = tl.cast(t, tl.int64)
    ta = t // tiles_b
    tb = t - ta * tiles_b
    a = ta * BA + tl.arange(0, BA)
    if CL:
        b = pid_c * BB + tl.arange(0, BB)
        base = tl.zeros([], tl.int64)
    else:
        b = tb * BB + tl.arange(0, BB)
        base = pid_c.to(tl.int64) * L
    mask = (a < n_a)[:, None] & (b < n_b)[None, :]
    offs = base + a[:, None] * stride_a + b[None, :]
    return offs, mask


@triton.jit
def _params(W, Bi, ch, cmask, floor, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr):
    # Effective gamma (|gamma| >= floor, sign kept, 0 counts as +; floor = 0: unchanged) and beta.
    if HAS_W:
        g = tl.load(W + ch, mask=cmask, other=1.0).to(ACC)
    else:
        g = tl.full(ch.shape, 1.0, ACC)
    g = tl.where(tl.abs(g) < floor, tl.where(g < 0, -floor, floor), g)
    if HAS_B:
        b = tl.load(Bi + ch, mask=cmask, other=0.0).to(ACC)
    else:
        b = tl.zeros(ch.shape, ACC)
    return g, b


@triton.jit
def _to_channel(v, CL: tl.constexpr):
    # Column values [BB] -> per-channel [BCH]: identity in NLC, the sum of all columns in NCL.
    if CL:
        out = v
    else:
        out = tl.sum(v[None, :], 1)
    return out


@triton.jit
def _from_channel(v, CL: tl.constexpr):
    # A per-channel [BCH] value broadcastable against a [BA, BB] tile.
    return v[None, :]


@triton.jit
def _cast(v, DT: tl.constexpr):
    # v (float32 or float64) as DT; float64 goes through float32 first (a direct float64 to
    # bfloat16/float16 conversion is not available everywhere, e.g. in the interpreter).
    if DT == tl.float64:
        out = v.to(tl.float64)
    else:
        out = v.to(tl.float32).to(DT)
    return out


@triton.jit
def _refined_sum(tsum, tmean, tc, d):
    # The sum of a tile's columns as tc * tmean + sum(x - tmean) (d = x - tmean, 0 where masked),
    # in float64: the deviations are small, so a float32 tile sum's rounding at a large mean
    # offset (ulp(1e7) = 1 for 1024 values near 1e4) is gone. A non-finite mean (an inf or NaN
    # in the column) keeps the plain sum, so that +-inf stays +-inf as in torch.
    refined = tc.to(tl.float64) * tmean.to(tl.float64) + tl.sum(d, 0).to(tl.float64)
    return tl.where(tl.abs(tmean) < float("inf"), refined, tsum.to(tl.float64))


@triton.jit
def _finish_stats(ch, cmask, cnt, mean, m2, RM, RV, SAVE_MEAN, SAVE_INVSTD, eps, momentum,
                  write, HAS_RM: tl.constexpr, ACC: tl.constexpr):
    # Batch mean/invstd from (count, mean, M2), computed in ACC (the dtype of cnt/mean/m2); when
    # `write`, store save_mean/save_invstd and update the running statistics (unbiased
    # variance), exactly once per channel. An empty batch gives mean 0, var 0 (as the C++ op).
    var = tl.where(cnt > 0, m2 / tl.maximum(cnt, 1.0), 0.0)
    invstd = _invstd(var, eps, ACC)
    if write:
        tl.store(SAVE_MEAN + ch, _cast(mean, SAVE_MEAN.dtype.element_ty), mask=cmask)
        tl.store(SAVE_INVSTD + ch, _cast(invstd, SAVE_INVSTD.dtype.element_ty), mask=cmask)
        if HAS_RM:
            unbiased = tl.where(cnt > 1, m2 / tl.maximum(cnt - 1.0, 1.0), var)
            rm = tl.load(RM + ch, mask=cmask, other=0.0).to(ACC)
            rv = tl.load(RV + ch, mask=cmask, other=1.0).to(ACC)
            # An empty batch leaves the running statistics unchanged, as torch does.
            rm = tl.where(cnt > 0, (1.0 - momentum) * rm + momentum * mean, rm)
            rv = tl.where(cnt > 0, (1.0 - momentum) * rv + momentum * unbiased, rv)
            tl.store(RM + ch, _cast(rm, RM.dtype.element_ty), mask=cmask)
            tl.store(RV + ch, _cast(rv, RV.dtype.element_ty), mask=cmask)
    return invstd


# ---------------------------------------------------------------------------------------------
# Forward kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _stats_partial_kernel(
    X,                 # input, (N, C, L) in the NCL or NLC layout
    WS,                # float64 workspace [3, S, C]: count, sum, M2 of each (split, channel)
    n_a,               # rows of the tile grid: N (NCL) or N*L (NLC)
    n_b,               # extent of the tile's second axis: L (NCL) or C (NLC)
    stride_a,          # elements between rows: C*L (NCL) or C (NLC)
    L,                 # spatial size (channel offset c*L in NCL)
    C,                 # channels
    S,                 # number of splits (second grid axis)
    tiles_b,           # tiles along the second axis: cdiv(L, BB) (NCL) or 1 (NLC)
    n_tiles,           # tiles per channel block
    tiles_per_split,   # tiles handled by one program
    ACC: tl.constexpr,  # accumulation dtype
    BA: tl.constexpr,   # tile rows
    BB: tl.constexpr,   # tile columns
    BCH: tl.constexpr,  # channels per program: BB (NLC) or 1 (NCL)
    CL: tl.constexpr,   # True: NLC layout
):
    # One read of this program's share of x. Tiles reduce in ACC; the running (count, sum, M2)
    # per column is float64.
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    cnt = tl.zeros([BB], tl.float64)
    wsum = tl.zeros([BB], tl.float64)
    m2 = tl.zeros([BB], tl.float64)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    for t in range(t0, t1):
        offs, mask = _tile(t, pid_c, n_a, n_b, stride_a, L, tiles_b, BA, BB, CL)
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        tc = tl.sum(mask.to(ACC), 0)
        tsum = tl.sum(x, 0)
        tmean = tsum / tl.maximum(tc, 1.0)
        d = tl.where(mask, x - tmean[None, :], 0.0)
        tsum64 = _refined_sum(tsum, tmean, tc, d)
        tc64 = tc.to(tl.float64)
        mean_t = tsum64 / tl.maximum(tc64, 1.0)
        # M2 about the refined tile mean: sum(d^2) - tc * (mean_t - tmean)^2.
        dm = mean_t - tmean.to(tl.float64)
        tm2 = tl.sum(d * d, 0).to(tl.float64) - tc64 * dm * dm
        # Chan's merge of (cnt, sum, m2) with the tile's columns (the running mean is sum / cnt).
        n = cnt + tc64
        delta = mean_t - wsum / tl.maximum(cnt, 1.0)
        m2 = m2 + tm2 + tl.where(cnt > 0, delta * delta * cnt * (tc64 / tl.maximum(n, 1.0)), 0.0)
        wsum = wsum + tsum64
        cnt = n
    ch, cmask = _channels(pid_c, C, BB, BCH, CL)
    # Columns -> channel: total count, total sum, M2 + count * (column mean - mean)^2.
    tot = _to_channel(cnt, CL)
    gsum = _to_channel(wsum, CL)
    if CL:
        gm2 = m2
    else:
        gmean = gsum / tl.maximum(tot, 1.0)
        dev = wsum[None, :] / tl.maximum(cnt[None, :], 1.0) - gmean[:, None]
        gm2 = tl.sum(m2[None, :], 1) + tl.sum(tl.where(cnt[None, :] > 0, cnt[None, :] * dev * dev, 0.0), 1)
    base = pid_s * C + ch
    tl.store(WS + base, tot, mask=cmask)
    tl.store(WS + S * C + base, gsum, mask=cmask)
    tl.store(WS + 2 * S * C + base, gm2, mask=cmask)


@triton.jit
def _merge_stats(WS, S, C, ch, cmask, BS: tl.constexpr, BCH: tl.constexpr):
    # Merge the S float64 (count, sum, M2) partials of channels `ch` in a fixed order: total
    # count, mean = total sum / total count, M2 (float64).
    tot = tl.zeros([BCH], tl.float64)
    wsum = tl.zeros([BCH], tl.float64)
    for s0 in range(0, S, BS):
        s = s0 + tl.arange(0, BS)
        m = (s < S)[:, None] & cmask[None, :]
        idx = s[:, None] * C + ch[None, :]
        tot += tl.sum(tl.load(WS + idx, mask=m, other=0.0), 0)
        wsum += tl.sum(tl.load(WS + S * C + idx, mask=m, other=0.0), 0)
    mean = wsum / tl.maximum(tot, 1.0)
    m2 = tl.zeros([BCH], tl.float64)
    for s0 in range(0, S, BS):
        s = s0 + tl.arange(0, BS)
        m = (s < S)[:, None] & cmask[None, :]
        idx = s[:, None] * C + ch[None, :]
        c = tl.load(WS + idx, mask=m, other=0.0)
        sm = tl.load(WS + S * C + idx, mask=m, other=0.0)
        q = tl.load(WS + 2 * S * C + idx, mask=m, other=0.0)
        d = sm / tl.maximum(c, 1.0) - mean[None, :]
        m2 += tl.sum(q + tl.where(c > 0, c * d * d, 0.0), 0)
    return tot, mean, m2


@triton.jit
def _normalize_kernel(
    X,                 # input, (N, C, L) in the NCL or NLC layout
    Y,                 # output, same layout as X
    W,                 # weight (C,) or a dummy when HAS_W is False
    Bi,                # bias (C,) or a dummy when HAS_B is False
    RM,                # running_mean (C,): read in eval, updated in training; dummy if not HAS_RM
    RV,                # running_var (C,), as RM
    SAVE_MEAN,         # (C,) batch mean (training) or running mean (eval), written by split 0
    SAVE_INVSTD,       # (C,) 1/sqrt(var + eps), written by split 0
    WS,                # float64 workspace of _stats_partial_kernel [3, S, C] (training only)
    n_a,               # tile-grid rows: N (NCL) or N*L (NLC)
    n_b,               # tile second axis extent: L (NCL) or C (NLC)
    stride_a,          # elements between rows: C*L (NCL) or C (NLC)
    L,                 # spatial size
    C,                 # channels
    S,                 # number of splits (partials in WS, and the second grid axis)
    tiles_b,           # tiles along the second axis
    n_tiles,           # tiles per channel block
    tiles_per_split,   # tiles handled by one program
    eps: tl.float64,       # added to the variance
    momentum: tl.float64,  # running-statistics factor
    slope: tl.float64,     # leaky_relu negative slope
    floor: tl.float64,     # gamma floor (0: off)
    TRAINING: tl.constexpr,  # batch statistics (True) or running statistics (False)
    HAS_W: tl.constexpr,     # weight given
    HAS_B: tl.constexpr,     # bias given
    HAS_RM: tl.constexpr,    # running statistics given (training: update them)
    ACT: tl.constexpr,       # activation code
    ACC: tl.constexpr,       # accumulation dtype
    BA: tl.constexpr,        # tile rows
    BB: tl.constexpr,        # tile columns
    BCH: tl.constexpr,       # channels per program
    BS: tl.constexpr,        # partials merged per step
    CL: tl.constexpr,        # True: NLC layout
):
    # One read of x, one write of y (plus S*3 floats per channel from L2 in training).
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    eps_ = _scalar(eps, ACC)
    slope_ = _scalar(slope, ACC)
    ch, cmask = _channels(pid_c, C, BB, BCH, CL)
    g, beta = _params(W, Bi, ch, cmask, _scalar(floor, ACC), HAS_W, HAS_B, ACC)
    if TRAINING:
        tot, mean64, m2 = _merge_stats(WS, S, C, ch, cmask, BS, BCH)
        invstd = _finish_stats(ch, cmask, tot, mean64, m2, RM, RV, SAVE_MEAN, SAVE_INVSTD,
                               _scalar(eps, tl.float64), _scalar(momentum, tl.float64),
                               pid_s == 0, HAS_RM, tl.float64).to(ACC)
        mean = mean64.to(ACC)
    else:
        mean = tl.load(RM + ch, mask=cmask, other=0.0).to(ACC)
        invstd = _invstd(tl.load(RV + ch, mask=cmask, other=1.0).to(ACC), eps_, ACC)
        if pid_s == 0:
            tl.store(SAVE_MEAN + ch, mean, mask=cmask)
            tl.store(SAVE_INVSTD + ch, invstd, mask=cmask)
    scale = g * invstd
    mean2 = _from_channel(mean, CL)
    scale2 = _from_channel(scale, CL)
    beta2 = _from_channel(beta, CL)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    for t in range(t0, t1):
        offs, mask = _tile(t, pid_c, n_a, n_b, stride_a, L, tiles_b, BA, BB, CL)
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        # (x - mean) * scale + beta: x - mean is exact near the mean, so a large mean offset
        # costs no precision (x * scale + (beta - mean * scale) would round at the offset).
        y = act_forward((x - mean2) * scale2 + beta2, ACT, slope_)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _fused_fwd_kernel(
    X,                 # input, (N, C, L) in the NCL or NLC layout
    Y,                 # output, same layout as X
    W,                 # weight (C,) or dummy
    Bi,                # bias (C,) or dummy
    RM,                # running_mean (C,) or dummy
    RV,                # running_var (C,) or dummy
    SAVE_MEAN,         # (C,) output: batch (or running) mean
    SAVE_INVSTD,       # (C,) output: 1/sqrt(var + eps)
    n_a,               # rows: N (NCL) or N*L (NLC); BA >= n_a
    n_b,               # columns: L (NCL, BB >= L) or C (NLC)
    stride_a,          # elements between rows
    L,                 # spatial size
    C,                 # channels
    eps: tl.float64,       # added to the variance
    momentum: tl.float64,  # running-statistics factor
    slope: tl.float64,     # leaky_relu negative slope
    floor: tl.float64,     # gamma floor (0: off)
    TRAINING: tl.constexpr,  # batch statistics (True) or running statistics (False)
    HAS_W: tl.constexpr,     # weight given
    HAS_B: tl.constexpr,     # bias given
    HAS_RM: tl.constexpr,    # running statistics given
    ACT: tl.constexpr,       # activation code
    ACC: tl.constexpr,       # accumulation dtype
    BA: tl.constexpr,        # rows of the single tile (>= n_a)
    BB: tl.constexpr,        # columns of the single tile
    BCH: tl.constexpr,       # channels per program
    CL: tl.constexpr,        # True: NLC layout
):
    # Whole channel block in registers: ONE read of x, one write of y, one launch.
    pid_c = tl.program_id(0)
    eps_ = _scalar(eps, ACC)
    slope_ = _scalar(slope, ACC)
    ch, cmask = _channels(pid_c, C, BB, BCH, CL)
    g, beta = _params(W, Bi, ch, cmask, _scalar(floor, ACC), HAS_W, HAS_B, ACC)
    offs, mask = _tile(0, pid_c, n_a, n_b, stride_a, L, 1, BA, BB, CL)
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    if TRAINING:
        cnt = _to_channel(tl.sum(mask.to(ACC), 0), CL)
        mean0 = _to_channel(tl.sum(x, 0), CL) / tl.maximum(cnt, 1.0)
        d = tl.where(mask, x - _from_channel(mean0, CL), 0.0)
        # The mean refined by the deviations' mean (see _refined_sum); M2 about it.
        dm = _to_channel(tl.sum(d, 0), CL) / tl.maximum(cnt, 1.0)
        mean = tl.where(tl.abs(mean0) < float("inf"), mean0 + dm, mean0)
        m2 = _to_channel(tl.sum(d * d, 0), CL) - cnt * dm * dm
        invstd = _finish_stats(ch, cmask, cnt, mean, m2, RM, RV, SAVE_MEAN, SAVE_INVSTD, eps_,
                               _scalar(momentum, ACC), True, HAS_RM, ACC)
    else:
        mean = tl.load(RM + ch, mask=cmask, other=0.0).to(ACC)
        invstd = _invstd(tl.load(RV + ch, mask=cmask, other=1.0).to(ACC), eps_, ACC)
        tl.store(SAVE_MEAN + ch, mean, mask=cmask)
        tl.store(SAVE_INVSTD + ch, invstd, mask=cmask)
    scale = g * invstd
    y = act_forward((x - _from_channel(mean, CL)) * _from_channel(scale, CL) + _from_channel(beta, CL),
                    ACT, slope_)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Backward kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _dz_xhat(dy, sv, mask, mean2, invstd2, scale2, g2, beta2, slope,
             SAVED_IS_OUTPUT: tl.constexpr, ACT: tl.constexpr):
    # dz = dy * f'(z) and xhat for a tile; `sv` is x, or y when SAVED_IS_OUTPUT. Masked lanes -> 0.
    if SAVED_IS_OUTPUT:
        z = act_invert(sv, ACT, slope)
        xhat = (z - beta2) / g2
        dz = act_backward_from_y(dy, sv, ACT, slope)
    else:
        xhat = (sv - mean2) * invstd2
        dz = act_backward_from_z(dy, (sv - mean2) * scale2 + beta2, ACT, slope)
    dz = tl.where(mask, dz, 0.0)
    xhat = tl.where(mask, xhat, 0.0)
    return dz, xhat


@triton.jit
def _bwd_partial_kernel(
    DY,                # grad_out, same layout as SV
    SV,                # saved: x, or y when SAVED_IS_OUTPUT
    DX,                # grad_input, written only when WRITE_DX (eval); dummy otherwise
    W,                 # weight (C,) or dummy
    Bi,                # bias (C,) or dummy
    MEAN,              # save_mean (C,)
    INVSTD,            # save_invstd (C,)
    WS,                # float64 workspace [2, S, C]: sum dz, sum dz*xhat per (split, channel)
    n_a,               # tile-grid rows: N (NCL) or N*L (NLC)
    n_b,               # tile second axis extent: L (NCL) or C (NLC)
    stride_a,          # elements between rows
    L,                 # spatial size
    C,                 # channels
    S,                 # number of splits
    tiles_b,           # tiles along the second axis
    n_tiles,           # tiles per channel block
    tiles_per_split,   # tiles handled by one program
    slope: tl.float64,     # leaky_relu negative slope
    floor: tl.float64,     # gamma floor (0: off)
    SAVED_IS_OUTPUT: tl.constexpr,  # SV holds y (recover z by inverting f)
    WRITE_DX: tl.constexpr,         # eval: also write dx = gamma*invstd*dz in this pass
    HAS_W: tl.constexpr,            # weight given
    HAS_B: tl.constexpr,            # bias given
    ACT: tl.constexpr,              # activation code
    ACC: tl.constexpr,              # accumulation dtype
    BA: tl.constexpr,               # tile rows
    BB: tl.constexpr,               # tile columns
    BCH: tl.constexpr,              # channels per program
    CL: tl.constexpr,               # True: NLC layout
):
    # One read of dy and saved (and, in eval, one write of dx).
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    slope_ = _scalar(slope, ACC)
    ch, cmask = _channels(pid_c, C, BB, BCH, CL)
    g, beta = _params(W, Bi, ch, cmask, _scalar(floor, ACC), HAS_W, HAS_B, ACC)
    mean = tl.load(MEAN + ch, mask=cmask, other=0.0).to(ACC)
    invstd = tl.load(INVSTD + ch, mask=cmask, other=0.0).to(ACC)
    scale = g * invstd
    mean2 = _from_channel(mean, CL)
    invstd2 = _from_channel(invstd, CL)
    scale2 = _from_channel(scale, CL)
    g2 = _from_channel(g, CL)
    beta2 = _from_channel(beta, CL)
    s_dz = tl.zeros([BB], tl.float64)
    s_dzx = tl.zeros([BB], tl.float64)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    for t in range(t0, t1):
        offs, mask = _tile(t, pid_c, n_a, n_b, stride_a, L, tiles_b, BA, BB, CL)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
        sv = tl.load(SV + offs, mask=mask, other=0.0).to(ACC)
        dz, xhat = _dz_xhat(dy, sv, mask, mean2, invstd2, scale2, g2, beta2, slope_,
                            SAVED_IS_OUTPUT, ACT)
        s_dz += tl.sum(dz, 0).to(tl.float64)
        s_dzx += tl.sum(dz * xhat, 0).to(tl.float64)
        if WRITE_DX:
            tl.store(DX + offs, (scale2 * dz).to(DX.dtype.element_ty), mask=mask)
    base = pid_s * C + ch
    tl.store(WS + base, _to_channel(s_dz, CL), mask=cmask)
    tl.store(WS + S * C + base, _to_channel(s_dzx, CL), mask=cmask)


@triton.jit
def _bwd_dx_kernel(
    DY,                # grad_out, same layout as SV
    SV,                # saved: x, or y when SAVED_IS_OUTPUT
    DX,                # grad_input, same layout
    W,                 # weight (C,) or dummy
    Bi,                # bias (C,) or dummy
    MEAN,              # save_mean (C,)
    INVSTD,            # save_invstd (C,)
    WS,                # float64 partial sums of _bwd_partial_kernel [2, S, C]
    GW,                # grad_weight (C,), written by split 0
    GB,                # grad_bias (C,), written by split 0
    n_a,               # tile-grid rows
    n_b,               # tile second axis extent
    stride_a,          # elements between rows
    L,                 # spatial size
    C,                 # channels
    S,                 # number of partial splits in WS
    M: tl.float64,     # elements per channel, N*L
    tiles_b,           # tiles along the second axis
    n_tiles,           # tiles per channel block (0: only finalise grad_weight / grad_bias)
    tiles_per_split,   # tiles handled by one program
    slope: tl.float64,     # leaky_relu negative slope
    floor: tl.float64,     # gamma floor (0: off)
    SAVED_IS_OUTPUT: tl.constexpr,  # SV holds y
    TRAINING: tl.constexpr,         # dx with the batch-statistics terms
    HAS_W: tl.constexpr,            # weight given
    HAS_B: tl.constexpr,            # bias given
    ACT: tl.constexpr,              # activation code
    ACC: tl.constexpr,              # accumulation dtype
    BA: tl.constexpr,               # tile rows
    BB: tl.constexpr,               # tile columns
    BCH: tl.constexpr,              # channels per program
    BS: tl.constexpr,               # partials summed per step
    CL: tl.constexpr,               # True: NLC layout
):
    # One read of dy and saved, one write of dx (plus S*2 floats per channel from L2).
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    slope_ = _scalar(slope, ACC)
    ch, cmask = _channels(pid_c, C, BB, BCH, CL)
    g, beta = _params(W, Bi, ch, cmask, _scalar(floor, ACC), HAS_W, HAS_B, ACC)
    mean = tl.load(MEAN + ch, mask=cmask, other=0.0).to(ACC)
    invstd = tl.load(INVSTD + ch, mask=cmask, other=0.0).to(ACC)
    sum_dz = tl.zeros([BCH], tl.float64)
    sum_dzx = tl.zeros([BCH], tl.float64)
    for s0 in range(0, S, BS):
        s = s0 + tl.arange(0, BS)
        m = (s < S)[:, None] & cmask[None, :]
        idx = s[:, None] * C + ch[None, :]
        sum_dz += tl.sum(tl.load(WS + idx, mask=m, other=0.0), 0)
        sum_dzx += tl.sum(tl.load(WS + S * C + idx, mask=m, other=0.0), 0)
    if pid_s == 0:
        tl.store(GW + ch, _cast(sum_dzx, GW.dtype.element_ty), mask=cmask)
        tl.store(GB + ch, _cast(sum_dz, GB.dtype.element_ty), mask=cmask)
    scale = g * invstd
    if TRAINING:
        m_ = tl.maximum(_scalar(M, tl.float64), 1.0)
        ka = (sum_dz / m_).to(ACC)
        kb = (sum_dzx / m_).to(ACC)
    else:
        ka = tl.zeros([BCH], ACC)
        kb = tl.zeros([BCH], ACC)
    mean2 = _from_channel(mean, CL)
    invstd2 = _from_channel(invstd, CL)
    scale2 = _from_channel(scale, CL)
    g2 = _from_channel(g, CL)
    beta2 = _from_channel(beta, CL)
    ka2 = _from_channel(ka, CL)
    kb2 = _from_channel(kb, CL)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    for t in range(t0, t1):
        offs, mask = _tile(t, pid_c, n_a, n_b, stride_a, L, tiles_b, BA, BB, CL)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
        sv = tl.load(SV + offs, mask=mask, other=0.0).to(ACC)
        dz, xhat = _dz_xhat(dy, sv, mask, mean2, invstd2, scale2, g2, beta2, slope_,
                            SAVED_IS_OUTPUT, ACT)
        dx = scale2 * (dz - ka2 - xhat * kb2)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _fused_bwd_kernel(
    DY,                # grad_out, same layout as SV
    SV,                # saved: x, or y when SAVED_IS_OUTPUT
    DX,                # grad_input, same layout
    W,                 # weight (C,) or dummy
    Bi,                # bias (C,) or dummy
    MEAN,              # save_mean (C,)
    INVSTD,            # save_invstd (C,)
    GW,                # grad_weight (C,)
    GB,                # grad_bias (C,)
    n_a,               # rows: BA >= n_a
    n_b,               # columns: L (NCL, BB >= L) or C (NLC)
    stride_a,          # elements between rows
    L,                 # spatial size
    C,                 # channels
    M: tl.float64,     # elements per channel, N*L
    slope: tl.float64,     # leaky_relu negative slope
    floor: tl.float64,     # gamma floor (0: off)
    SAVED_IS_OUTPUT: tl.constexpr,  # SV holds y
    TRAINING: tl.constexpr,         # dx with the batch-statistics terms
    HAS_W: tl.constexpr,            # weight given
    HAS_B: tl.constexpr,            # bias given
    ACT: tl.constexpr,              # activation code
    ACC: tl.constexpr,              # accumulation dtype
    BA: tl.constexpr,               # rows of the single tile
    BB: tl.constexpr,               # columns of the single tile
    BCH: tl.constexpr,              # channels per program
    CL: tl.constexpr,               # True: NLC layout
):
    # Whole channel block in registers: ONE read of dy and saved, one write of dx, one launch.
    pid_c = tl.program_id(0)
    slope_ = _scalar(slope, ACC)
    ch, cmask = _channels(pid_c, C, BB, BCH, CL)
    g, beta = _params(W, Bi, ch, cmask, _scalar(floor, ACC), HAS_W, HAS_B, ACC)
    mean = tl.load(MEAN + ch, mask=cmask, other=0.0).to(ACC)
    invstd = tl.load(INVSTD + ch, mask=cmask, other=0.0).to(ACC)
    scale = g * invstd
    scale2 = _from_channel(scale, CL)
    offs, mask = _tile(0, pid_c, n_a, n_b, stride_a, L, 1, BA, BB, CL)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
    sv = tl.load(SV + offs, mask=mask, other=0.0).to(ACC)
    dz, xhat = _dz_xhat(dy, sv, mask, _from_channel(mean, CL), _from_channel(invstd, CL), scale2,
                        _from_channel(g, CL), _from_channel(beta, CL),
                        slope_, SAVED_IS_OUTPUT, ACT)
    sum_dz = _to_channel(tl.sum(dz, 0), CL)
    sum_dzx = _to_channel(tl.sum(dz * xhat, 0), CL)
    tl.store(GW + ch, sum_dzx.to(GW.dtype.element_ty), mask=cmask)
    tl.store(GB + ch, sum_dz.to(GB.dtype.element_ty), mask=cmask)
    if TRAINING:
        m_ = tl.maximum(_scalar(M, ACC), 1.0)
        dx = scale2 * (dz - _from_channel(sum_dz / m_, CL) - xhat * _from_channel(sum_dzx / m_, CL))
    else:
        dx = scale2 * dz
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _acc_dtype(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _layout(x: Tensor) -> tuple[Tensor, bool, int, int, int]:
    """(tensor, channels_last, N, C, L): `x` itself when it is contiguous or channels-last dense
    as (N, C, L); otherwise a contiguous copy. When both views hold (C == 1 or L == 1) the one
    with the longer rows is chosen."""
    N, C = x.shape[0], x.shape[1]
    L = 1
    for s in x.shape[2:]:
        L *= s
    ncl = x.is_contiguous()
    nlc = False
    if not ncl:
        if x.dim() == 4:
            nlc = x.is_contiguous(memory_format=torch.channels_last)
        elif x.dim() == 3:
            nlc = x.transpose(1, 2).is_contiguous()
    if not (ncl or nlc):
        x = x.contiguous()
        ncl = True
    cl = nlc or (ncl and L == 1 and C > 1)
    return x, cl, N, C, L


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    # The interpreter runs programs one after another: a small number keeps its grids small.
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


class _Plan:
    """Tiling of one call: tile shape, channel blocks, splits (see the module docstring).
    Built through the cached `_plan`, so a training loop pays for it once per shape."""

    def __init__(self, device: torch.device, dtype: torch.dtype, cl: bool, N: int, C: int, L: int,
                 resident_max: int, path: Optional[str], tile: Optional[int], splits: Optional[int]):
        self.cl, self.N, self.C, self.L = cl, N, C, L
        on_gpu = device.type == "cuda"
        self.n_a = N * L if cl else N
        self.n_b = C if cl else L
        self.stride_a = C if cl else C * L
        self.M = N * L
        sms = _num_sms(device)
        # Resident candidate: the whole channel block in one tile.
        if dtype == torch.float64:
            resident_max //= 2
        ra = triton.next_power_of_2(max(self.n_a, 1))
        if cl:
            rb = max(1, min(triton.next_power_of_2(C), resident_max // ra, 16))
        else:
            rb = triton.next_power_of_2(max(L, 1))
        fits = ra * rb <= resident_max
        n_rblocks = triton.cdiv(C, rb) if cl else C
        if path is None:
            small = N * C * L <= 65536
            path = "resident" if fits and (small or 2 * n_rblocks >= sms) else "split"
        if path == "resident" and not fits:
            raise ValueError(f"resident path needs a channel block of at most {resident_max} elements")
        self.path = path
        if path == "resident":
            self.BA, self.BB = ra, rb
            self.BCH = rb if cl else 1
            self.n_cblocks = n_rblocks
            # About 8 to 32 elements per thread: no spills at fp32/bf16 (checked with ptxas, sm_90).
            self.num_warps = max(4, min(16, ra * rb // 256)) if on_gpu else 1
            return
        tile = tile or (TILE_GPU if on_gpu else TILE_INTERPRET)
        if dtype == torch.float64:
            tile = max(1, tile // 2)
        if cl:
            self.BB = min(triton.next_power_of_2(C), NLC_BLOCK_C, tile)
            self.tiles_b = 1
            self.n_cblocks = triton.cdiv(C, self.BB)
        else:
            # at most NCL_BLOCK_L columns: the statistics pass keeps three float64 running
            # vectors per column (2048 columns spilled, sm_90 compile check). Under the
            # interpreter (no registers) a tile given explicitly may be wider: the interpreter's
            # cost is per tile (one 18.9M-value plane in 1024-column tiles took 12 minutes).
            cap = NCL_BLOCK_L if on_gpu else max(NCL_BLOCK_L, tile)
            self.BB = min(triton.next_power_of_2(max(L, 1)), tile, cap)
            self.tiles_b = triton.cdiv(L, self.BB)
            self.n_cblocks = C
        self.BA = max(1, min(tile // self.BB, triton.next_power_of_2(max(self.n_a, 1))))
        self.BCH = self.BB if cl else 1
        self.n_tiles = triton.cdiv(self.n_a, self.BA) * self.tiles_b
        if splits is None:
            splits = min(triton.cdiv(4 * sms, max(self.n_cblocks, 1)), MAX_SPLITS)
        splits = max(1, min(splits, self.n_tiles, MAX_SPLITS))
        self.tiles_per_split = triton.cdiv(self.n_tiles, splits)
        self.S = triton.cdiv(self.n_tiles, self.tiles_per_split) if self.n_tiles else 1
        # Partials merged per step: fixed per layout (not from S, which changes with the batch
        # size and would recompile the kernels for each); the loop masks the rows past S.
        self.BS = max(1, min(MERGE_BLOCK, 2048 // self.BCH))
        self.num_warps = (8 if self.BA * self.BB >= 4096 else 4) if on_gpu else 1


_plan = functools.lru_cache(maxsize=1024)(_Plan)


def _write_back(buf: Tensor, initial: Tensor, updated: Tensor, momentum: float) -> None:
    """Writes the running statistics that the kernels updated in the contiguous copy `updated`
    (from `initial`) back through the strided view `buf`. An expanded (stride-0) buffer, whose
    channels share one element, gets torch's CPU result: the updates compounded in channel order
    (copy_ refuses a destination whose elements overlap)."""
    if buf.dim() == 1 and buf.numel() > 1 and buf.stride(0) == 0:
        # updated[c] = (1 - m) * initial[c] + m * batch[c]; replay it channel after channel.
        contrib = updated.double() - (1 - momentum) * initial.double()
        cur = initial[:1].double()
        for c in range(buf.numel()):
            cur = (1 - momentum) * cur + contrib[c:c + 1]
        buf[:1].copy_(cur)
    else:
        buf.copy_(updated)


def _on_device(t: Tensor):
    """Launch on the tensor's CUDA device (nothing to do for CPU tensors under the interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def bn_act_fwd(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
               running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
               momentum: float, eps: float, activation: int, negative_slope: float,
               gamma_floor: float, *, _path: Optional[str] = None, _tile: Optional[int] = None,
               _splits: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Forward of genfast::batch_norm_act_fwd: (out, save_mean, save_invstd).

    input (N, C, *) contiguous or channels_last; out has input's memory format; save_mean and
    save_invstd are (C,) float32 (float64 for float64 input). Running statistics are updated in
    place when training. `_path` ("resident" | "split"), `_tile` and `_splits` override the
    tiling (tests)."""
    x, cl, N, C, L = _layout(input)
    tl_acc, acc = _acc_dtype(x.dtype)
    out = ref.bn_write_buffer(x)
    save_mean = torch.empty((C,), dtype=acc, device=x.device)
    save_invstd = torch.empty((C,), dtype=acc, device=x.device)
    if C == 0:
        return ref.bn_output_as_torch(out), save_mean, save_invstd
    has_rm = running_mean is not None and running_var is not None
    if not training and not has_rm:
        raise RuntimeError("batch_norm_act: running_mean and running_var are required when training=False")
    p = _plan(x.device, x.dtype, cl, N, C, L, RESIDENT_MAX_FWD, _path, _tile, _splits)
    dummy = save_mean
    # The kernels index (C,) vectors with stride 1. A strided running buffer is updated through a
    # contiguous copy, copied back after the kernels have run.
    w = weight.contiguous() if weight is not None else dummy
    b = bias.contiguous() if bias is not None else dummy
    rm = running_mean.contiguous() if has_rm else dummy
    rv = running_var.contiguous() if has_rm else dummy
    # The initial values of copied running buffers (an expanded buffer replays the update).
    rm0 = rm.clone() if has_rm and rm is not running_mean else None
    rv0 = rv.clone() if has_rm and rv is not running_var else None
    flags = dict(TRAINING=bool(training), HAS_W=weight is not None, HAS_B=bias is not None,
                 HAS_RM=has_rm, ACT=int(activation), ACC=tl_acc)
    scalars = (float(eps), float(momentum), float(negative_slope), float(gamma_floor))
    with _on_device(x):
        if p.path == "resident":
            _fused_fwd_kernel[(p.n_cblocks,)](
                x, out, w, b, rm, rv, save_mean, save_invstd, p.n_a, p.n_b, p.stride_a, L, C,
                *scalars, BA=p.BA, BB=p.BB, BCH=p.BCH, CL=p.cl, num_warps=p.num_warps, **flags)
        else:
            ws = dummy
            if training:
                ws = torch.empty((3, p.S, C), dtype=torch.float64, device=x.device)
                _stats_partial_kernel[(p.n_cblocks, p.S)](
                    x, ws, p.n_a, p.n_b, p.stride_a, L, C, p.S, p.tiles_b, p.n_tiles,
                    p.tiles_per_split, ACC=tl_acc, BA=p.BA, BB=p.BB, BCH=p.BCH, CL=p.cl,
                    num_warps=p.num_warps)
            _normalize_kernel[(p.n_cblocks, p.S)](
                x, out, w, b, rm, rv, save_mean, save_invstd, ws, p.n_a, p.n_b, p.stride_a, L, C,
                p.S, p.tiles_b, p.n_tiles, p.tiles_per_split, *scalars, BA=p.BA, BB=p.BB,
                BCH=p.BCH, BS=p.BS, CL=p.cl, num_warps=p.num_warps, **flags)
    if training and has_rm:
        for buf, used, init in ((running_mean, rm, rm0), (running_var, rv, rv0)):
            if used is not buf:
                _write_back(buf, init, used, momentum)
    return ref.bn_output_as_torch(out), save_mean, save_invstd


def bn_act_bwd(grad_out: Tensor, saved: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
               save_mean: Tensor, save_invstd: Tensor, training: bool, activation: int,
               negative_slope: float, gamma_floor: float, saved_is_output: bool, *,
               _path: Optional[str] = None, _tile: Optional[int] = None,
               _splits: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of genfast::batch_norm_act_bwd: (grad_input, grad_weight, grad_bias).

    `saved` is x, or y when `saved_is_output`; grad_input has saved's layout; grad_weight /
    grad_bias have weight's / bias's dtype (saved's dtype when None). grad_out is copied into
    saved's layout only when its strides differ. `_path`, `_tile`, `_splits` as in bn_act_fwd."""
    if grad_out.shape != saved.shape:
        raise RuntimeError(f"batch_norm_act: grad_output has shape {tuple(grad_out.shape)} but the "
                           f"saved tensor has shape {tuple(saved.shape)}")
    sv, cl, N, C, L = _layout(saved)
    dy = grad_out
    if dy.stride() != sv.stride():
        dy = torch.empty_like(sv).copy_(grad_out)
    tl_acc, acc = _acc_dtype(sv.dtype)
    dx = torch.empty_like(sv)
    gw = torch.empty((C,), dtype=weight.dtype if weight is not None else sv.dtype, device=sv.device)
    gb = torch.empty((C,), dtype=bias.dtype if bias is not None else sv.dtype, device=sv.device)
    if C == 0:
        return ref.bn_output_as_torch(dx), gw, gb
    p = _plan(sv.device, sv.dtype, cl, N, C, L, RESIDENT_MAX_BWD, _path, _tile, _splits)
    mean = save_mean.contiguous()
    invstd = save_invstd.contiguous()
    w = weight.contiguous() if weight is not None else mean
    b = bias.contiguous() if bias is not None else mean
    flags = dict(SAVED_IS_OUTPUT=bool(saved_is_output), HAS_W=weight is not None,
                 HAS_B=bias is not None, ACT=int(activation), ACC=tl_acc)
    scalars = (float(negative_slope), float(gamma_floor))
    M = float(p.M)
    with _on_device(sv):
        if p.path == "resident":
            _fused_bwd_kernel[(p.n_cblocks,)](
                dy, sv, dx, w, b, mean, invstd, gw, gb, p.n_a, p.n_b, p.stride_a, L, C, M,
                *scalars, TRAINING=bool(training), BA=p.BA, BB=p.BB, BCH=p.BCH, CL=p.cl,
                num_warps=p.num_warps, **flags)
            return ref.bn_output_as_torch(dx), gw, gb
        ws = torch.empty((2, p.S, C), dtype=torch.float64, device=sv.device)
        _bwd_partial_kernel[(p.n_cblocks, p.S)](
            dy, sv, dx, w, b, mean, invstd, ws, p.n_a, p.n_b, p.stride_a, L, C, p.S, p.tiles_b,
            p.n_tiles, p.tiles_per_split, *scalars, WRITE_DX=not training, BA=p.BA, BB=p.BB,
            BCH=p.BCH, CL=p.cl, num_warps=p.num_warps, **flags)
        # Training: pass 2 computes dx. Eval: dx is already written; the same kernel with no
        # tiles only finalises grad_weight / grad_bias (one program per channel block).
        grid = (p.n_cblocks, p.S) if training else (p.n_cblocks, 1)
        _bwd_dx_kernel[grid](
            dy, sv, dx, w, b, mean, invstd, ws, gw, gb, p.n_a, p.n_b, p.stride_a, L, C, p.S, M,
            p.tiles_b, p.n_tiles if training else 0, p.tiles_per_split, *scalars,
            TRAINING=bool(training), BA=p.BA, BB=p.BB, BCH=p.BCH, BS=p.BS, CL=p.cl,
            num_warps=p.num_warps, **flags)
    return ref.bn_output_as_torch(dx), gw, gb


__all__ = ["bn_act_fwd", "bn_act_bwd"]
