"""Triton kernels around a vendor product (cuDNN/cuBLAS through ATen, or genfast's own GEMM):
the per-channel epilogue and prologue of a convolution-like layer and the BatchNorm block that
follows it. Tensors in, tensors out; no autograd.

Every kernel walks an output tensor y of shape (N, C, *spatial) or (N, C) through a "plane view"
(N', C, S) with strides (sn, sc, ss): element (n, c, s) lives at n * sn + c * sc + s * ss.
A contiguous NCHW tensor is (N, C, H*W) with ss = 1 (tiles run along the contiguous pixels); a
channels_last tensor or an (N, C) matrix is (1, C, N*H*W) with ss = C, sc = 1 (tiles run along
the contiguous channels). Tiles are [BLOCK_S pixels x BLOCK_C channels] of one plane row n.

Launches and passes (one launch = one pass over the tensors it names):
  standalone layer, forward:  epilogue (y = act(y + bias), read + write y in place)       1
  standalone layer, backward: prologue (dz = dy * act'(y) written once; bias-gradient partial
                              sums) + row_sum (fixed-order sum of the partials)            2
  BatchNorm block, forward:   stats (read y: Welford partials per program) + finalize (merge
                              the partials per channel in fixed order; mean, invstd, the
                              running statistics and num_batches_tracked in place,
                              scale/shift) + apply (act(y * scale + shift), read y, write out)  3
  BatchNorm block, backward:  bn_bwd_reduce (read dout, y: partial sums of dz, dz * xhat,
                              xhat) + bn_bwd_finalize (weight/bias gradients, the preceding
                              layer's bias gradient, dx coefficients) + bn_bwd_dx (read dout,
                              y, write dy)                                                   3
The finalize kernels run one program per block of channels and merge [BLOCK_R x BLOCK_C] tiles
of partials at a time (no per-row serial loop); every reduction has a fixed order, so results
are bitwise reproducible. The block's preceding bias is folded into the statistics instead of
being added to y (BatchNorm subtracts the batch mean): y is read-only in the block forward.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from genfast import backend as B
from genfast.kernels.activation import act_backward_from_y, act_backward_from_z, act_forward
from genfast.kernels.batchnorm_act import _on_device  # launches run under the tensor's device
from genfast.reference import batchnorm_act as ref_bn

_INTERPRET = B.triton_interpret()


# ---------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _tile(t, HB, offs_s0, offs_c, C, S, sn, sc, ss, BLOCK_S: tl.constexpr):
    # Offsets and mask of tile t of the plane view: t = n * HB + pixel block.
    n = t // HB
    offs_s = (t % HB) * BLOCK_S + offs_s0
    mask = (offs_s < S)[:, None] & (offs_c < C)[None, :]
    ptr = (n.to(tl.int64) * sn + offs_s.to(tl.int64) * ss)[:, None] + (offs_c.to(tl.int64) * sc)[None, :]
    return ptr, mask


@triton.jit
def _welford_combine(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    # Chan's merge of two (count, mean, M2) summaries; the mean as a convex combination so that
    # infinite means stay infinite.
    n = n_a + n_b
    frac = tl.where(n > 0, n_b / tl.where(n > 0, n, 1.0), 0.0)
    delta = mean_b - mean_a
    mean = mean_a * (1.0 - frac) + mean_b * frac
    m2 = m2_a + m2_b + delta * delta * n_a * frac
    return n, mean, m2


# ---------------------------------------------------------------------------------------------
# standalone layer: forward epilogue, backward prologue


@triton.jit
def _epilogue_kernel(
    y_ptr,  # product output, overwritten in place with act(y + bias)
    bias_ptr,  # (C,) bias or a dummy
    C, S, HB,  # channels, pixels per plane row, pixel blocks per plane row
    sn, sc, ss,  # plane-view strides of y
    slope,  # leaky_relu negative slope
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr,  # bias present; genfast.backend.ACTIVATIONS code
    ACC: tl.constexpr,  # tl.float32 or tl.float64
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,  # tile: pixels x channels
):
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ptr, mask = _tile(tl.program_id(0), HB, tl.arange(0, BLOCK_S), offs_c, C, S, sn, sc, ss, BLOCK_S)
    v = tl.load(y_ptr + ptr, mask=mask, other=0.0).to(ACC)
    if HAS_BIAS:
        v = v + tl.load(bias_ptr + offs_c, mask=offs_c < C, other=0.0).to(ACC)[None, :]
    tl.store(y_ptr + ptr, act_forward(v, ACT, slope).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _prologue_kernel(
    g_ptr,  # gradient of the layer output (plane-view strides as y)
    y_ptr,  # the layer output act(z) (act' is taken from it)
    dz_ptr,  # out: dz = g * act'(y), same strides (unused when WRITE is false)
    ws_ptr,  # out: (P, C) partial sums of dz per program (unused when SUM is false)
    C, S, HB, T, TILES,  # channels, pixels per row, pixel blocks per row, tiles, tiles per program
    sn, sc, ss,  # plane-view strides of g, y and dz
    slope,  # leaky_relu negative slope
    ACT: tl.constexpr, WRITE: tl.constexpr, SUM: tl.constexpr,  # activation; write dz; bias sums
    ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_s0 = tl.arange(0, BLOCK_S)
    acc = tl.zeros((BLOCK_C,), ACC)
    for i in range(0, TILES):
        t = pid * TILES + i
        ptr, mask = _tile(t, HB, offs_s0, offs_c, C, S, sn, sc, ss, BLOCK_S)
        mask = mask & (t < T)
        dz = tl.load(g_ptr + ptr, mask=mask, other=0.0).to(ACC)
        if ACT != 0:
            yv = tl.load(y_ptr + ptr, mask=mask, other=0.0).to(ACC)
            dz = act_backward_from_y(dz, yv, ACT, slope)
        if WRITE:
            tl.store(dz_ptr + ptr, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        if SUM:
            acc += tl.sum(tl.where(mask, dz, 0.0), axis=0)
    if SUM:
        tl.store(ws_ptr + pid.to(tl.int64) * C + offs_c, acc, mask=offs_c < C)


@triton.jit
def _row_sum_kernel(
    ws_ptr,  # (P, C) partial sums
    out_ptr,  # out: (C,) their sum, in out's dtype
    P, C,  # partial rows, channels
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_C,), tl.float64)
    for r0 in range(0, P, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        m = (offs_r < P)[:, None] & (offs_c < C)[None, :]
        v = tl.load(ws_ptr + offs_r[:, None] * C + offs_c[None, :], mask=m, other=0.0)
        acc += tl.sum(v.to(tl.float64), axis=0)
    tl.store(out_ptr + offs_c, acc.to(out_ptr.dtype.element_ty), mask=offs_c < C)


# ---------------------------------------------------------------------------------------------
# BatchNorm block: forward


@triton.jit
def _stats_kernel(
    y_ptr,  # product output (read only)
    ws_ptr,  # out: (3, P, C) float64: per-program count, mean, M2
    C, S, HB, T, TILES, PLANE,  # channels, pixels per row, blocks per row, tiles, tiles/program,
    # and P * C (the stride between the three planes of ws)
    sn, sc, ss,  # plane-view strides of y
    ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_s0 = tl.arange(0, BLOCK_S)
    cnt = tl.zeros((BLOCK_C,), ACC)
    mean = tl.zeros((BLOCK_C,), ACC)
    m2 = tl.zeros((BLOCK_C,), ACC)
    for i in range(0, TILES):
        t = pid * TILES + i
        ptr, mask = _tile(t, HB, offs_s0, offs_c, C, S, sn, sc, ss, BLOCK_S)
        mask = mask & (t < T)
        v = tl.load(y_ptr + ptr, mask=mask, other=0.0).to(ACC)
        n_t = tl.sum(mask.to(ACC), axis=0)
        mean_t = tl.sum(v, axis=0) / tl.where(n_t > 0, n_t, 1.0)
        d = tl.where(mask, v - mean_t[None, :], 0.0)
        cnt, mean, m2 = _welford_combine(cnt, mean, m2, n_t, mean_t, tl.sum(d * d, axis=0))
    c_ok = offs_c < C
    row = ws_ptr + pid.to(tl.int64) * C + offs_c
    tl.store(row, cnt.to(tl.float64), mask=c_ok)
    tl.store(row + PLANE, mean.to(tl.float64), mask=c_ok)
    tl.store(row + 2 * PLANE, m2.to(tl.float64), mask=c_ok)


@triton.jit
def _finalize_kernel(
    ws_ptr,  # (3, P, C) partial count / mean / M2 (float32 or float64)
    cbias_ptr,  # (C,) bias of the preceding layer (folded into the mean) or a dummy
    w_ptr, b_ptr,  # BatchNorm weight / bias (C,) or dummies
    rm_ptr, rv_ptr,  # running_mean / running_var (C,) with strides srm / srv, or dummies
    nbt_ptr,  # num_batches_tracked (int64 scalar), incremented by program 0, or a dummy
    mean_ptr, invstd_ptr, scale_ptr, shift_ptr,  # out: (C,) in float32 (float64 for float64)
    P, C, PLANE, srm, srv,  # partial rows, channels, P * C, running-statistics strides
    CBP,  # channel blocks per program (all of them in one program when CUMULATIVE)
    mom_hi, mom_lo, eps_hi, eps_lo,  # momentum (ignored when CUMULATIVE) and epsilon, each as
    # a float32 pair hi + lo (Triton passes Python floats as float32; the pair keeps float64's)
    HAS_CBIAS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr,  # update running stats; momentum=None
    INC_NBT: tl.constexpr,  # increment num_batches_tracked
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # With CUMULATIVE the momentum 1 / (num_batches_tracked + 1) is read before program 0
    # increments the counter: the launcher runs a single program then, so no program can read
    # the counter after the increment.
    pid = tl.program_id(0)
    eps = tl.full((BLOCK_C,), eps_hi, tl.float64) + tl.full((BLOCK_C,), eps_lo, tl.float64)
    for j in range(0, CBP):
        offs_c = (pid * CBP + j) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        cnt = tl.zeros((BLOCK_C,), tl.float64)
        mean = tl.zeros((BLOCK_C,), tl.float64)
        m2 = tl.zeros((BLOCK_C,), tl.float64)
        for r0 in range(0, P, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            m = (offs_r < P)[:, None] & c_ok[None, :]
            ptr = ws_ptr + offs_r.to(tl.int64)[:, None] * C + offs_c[None, :]
            n_t = tl.load(ptr, mask=m, other=0.0).to(tl.float64)
            mean_t = tl.load(ptr + PLANE, mask=m, other=0.0).to(tl.float64)
            m2_t = tl.load(ptr + 2 * PLANE, mask=m, other=0.0).to(tl.float64)
            n_t, mean_t, m2_t = tl.reduce((n_t, mean_t, m2_t), 0, _welford_combine)
            cnt, mean, m2 = _welford_combine(cnt, mean, m2, n_t, mean_t, m2_t)
        var = m2 / tl.where(cnt > 0, cnt, 1.0)
        invstd = 1.0 / tl.sqrt(var + eps)
        gamma = tl.full((BLOCK_C,), 1.0, tl.float64)
        if HAS_W:
            gamma = tl.load(w_ptr + offs_c, mask=c_ok, other=1.0).to(tl.float64)
        scale = gamma * invstd
        shift = -mean * scale
        if HAS_B:
            shift = shift + tl.load(b_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float64)
        tl.store(mean_ptr + offs_c, mean.to(mean_ptr.dtype.element_ty), mask=c_ok)
        tl.store(invstd_ptr + offs_c, invstd.to(invstd_ptr.dtype.element_ty), mask=c_ok)
        tl.store(scale_ptr + offs_c, scale.to(scale_ptr.dtype.element_ty), mask=c_ok)
        tl.store(shift_ptr + offs_c, shift.to(shift_ptr.dtype.element_ty), mask=c_ok)
        if RUNNING:
            if CUMULATIVE:
                mom = 1.0 / (tl.load(nbt_ptr).to(tl.float64) + 1.0)
            else:
                mom = tl.full((BLOCK_C,), mom_hi, tl.float64) + tl.full((BLOCK_C,), mom_lo, tl.float64)
            batch_mean = mean
            if HAS_CBIAS:
                batch_mean = mean + tl.load(cbias_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float64)
            unbiased = m2 / tl.where(cnt > 1, cnt - 1.0, 1.0)
            upd = c_ok & (cnt > 0)  # an empty batch leaves the running statistics unchanged
            rmp = rm_ptr + offs_c.to(tl.int64) * srm
            rvp = rv_ptr + offs_c.to(tl.int64) * srv
            rm = tl.load(rmp, mask=upd, other=0.0).to(tl.float64)
            rv = tl.load(rvp, mask=upd, other=0.0).to(tl.float64)
            tl.store(rmp, ((1.0 - mom) * rm + mom * batch_mean).to(rm_ptr.dtype.element_ty), mask=upd)
            tl.store(rvp, ((1.0 - mom) * rv + mom * unbiased).to(rv_ptr.dtype.element_ty), mask=upd)
    if INC_NBT:
        if pid == 0:
            tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)


@triton.jit
def _apply_kernel(
    y_ptr,  # product output
    out_ptr,  # out: act(y * scale + shift), same strides as y
    scale_ptr, shift_ptr,  # (C,) per-channel affine map (ACC dtype)
    C, S, HB,  # channels, pixels per row, pixel blocks per row
    sn, sc, ss,  # plane-view strides of y and out
    slope,  # leaky_relu negative slope
    ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ptr, mask = _tile(tl.program_id(0), HB, tl.arange(0, BLOCK_S), offs_c, C, S, sn, sc, ss, BLOCK_S)
    c_ok = offs_c < C
    a = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)
    b = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)
    v = tl.load(y_ptr + ptr, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + ptr, act_forward(v * a[None, :] + b[None, :], ACT, slope).to(out_ptr.dtype.element_ty),
             mask=mask)


# ---------------------------------------------------------------------------------------------
# BatchNorm block: backward


@triton.jit
def _bn_z(y_ptr, ptr, mask, mean, invstd, gamma, beta, ACC: tl.constexpr):
    # xhat and z = gamma * xhat + beta of a tile of y (per-channel vectors given).
    v = tl.load(y_ptr + ptr, mask=mask, other=0.0).to(ACC)
    xhat = (v - mean[None, :]) * invstd[None, :]
    return xhat, xhat * gamma[None, :] + beta[None, :]


@triton.jit
def _bn_params(mean_ptr, invstd_ptr, w_ptr, b_ptr, offs_c, C, HAS_W: tl.constexpr,
               HAS_B: tl.constexpr, ACC: tl.constexpr):
    c_ok = offs_c < C
    mean = tl.load(mean_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)
    invstd = tl.load(invstd_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)
    gamma = tl.full(offs_c.shape, 1.0, ACC)
    beta = tl.zeros(offs_c.shape, ACC)
    if HAS_W:
        gamma = tl.load(w_ptr + offs_c, mask=c_ok, other=1.0).to(ACC)
    if HAS_B:
        beta = tl.load(b_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)
    return mean, invstd, gamma, beta


@triton.jit
def _bn_bwd_reduce_kernel(
    g_ptr, y_ptr,  # gradient of the block output; product output (same strides)
    ws_ptr,  # out: (3, P, C) partial sums of dz, dz * xhat, xhat (ACC dtype)
    mean_ptr, invstd_ptr, w_ptr, b_ptr,  # batch statistics, BatchNorm weight / bias (or dummies)
    C, S, HB, T, TILES, PLANE,  # as in _stats_kernel
    sn, sc, ss,  # plane-view strides
    slope,  # leaky_relu negative slope
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_s0 = tl.arange(0, BLOCK_S)
    mean, invstd, gamma, beta = _bn_params(mean_ptr, invstd_ptr, w_ptr, b_ptr, offs_c, C, HAS_W, HAS_B, ACC)
    s_dz = tl.zeros((BLOCK_C,), ACC)
    s_dzx = tl.zeros((BLOCK_C,), ACC)
    s_x = tl.zeros((BLOCK_C,), ACC)
    for i in range(0, TILES):
        t = pid * TILES + i
        ptr, mask = _tile(t, HB, offs_s0, offs_c, C, S, sn, sc, ss, BLOCK_S)
        mask = mask & (t < T)
        xhat, z = _bn_z(y_ptr, ptr, mask, mean, invstd, gamma, beta, ACC)
        dz = act_backward_from_z(tl.load(g_ptr + ptr, mask=mask, other=0.0).to(ACC), z, ACT, slope)
        dz = tl.where(mask, dz, 0.0)
        xhat = tl.where(mask, xhat, 0.0)
        s_dz += tl.sum(dz, axis=0)
        s_dzx += tl.sum(dz * xhat, axis=0)
        s_x += tl.sum(xhat, axis=0)
    c_ok = offs_c < C
    row = ws_ptr + pid.to(tl.int64) * C + offs_c
    tl.store(row, s_dz, mask=c_ok)
    tl.store(row + PLANE, s_dzx, mask=c_ok)
    tl.store(row + 2 * PLANE, s_x, mask=c_ok)


@triton.jit
def _bn_bwd_finalize_kernel(
    ws_ptr,  # (3, P, C) partial sums from _bn_bwd_reduce_kernel
    invstd_ptr, w_ptr,  # batch invstd, BatchNorm weight (or a dummy)
    coef_ptr,  # out: (3, C) ACC: k = gamma * invstd, mean of dz, mean of dz * xhat
    dw_ptr, db_ptr, dcb_ptr,  # out: grads of BatchNorm weight, bias, the preceding bias (or dummies)
    P, C, PLANE, mf,  # partial rows, channels, P * C, pixels per channel (float, >= 1)
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_CBIAS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    s_dz = tl.zeros((BLOCK_C,), tl.float64)
    s_dzx = tl.zeros((BLOCK_C,), tl.float64)
    s_x = tl.zeros((BLOCK_C,), tl.float64)
    for r0 in range(0, P, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        m = (offs_r < P)[:, None] & c_ok[None, :]
        ptr = ws_ptr + offs_r.to(tl.int64)[:, None] * C + offs_c[None, :]
        s_dz += tl.sum(tl.load(ptr, mask=m, other=0.0).to(tl.float64), axis=0)
        s_dzx += tl.sum(tl.load(ptr + PLANE, mask=m, other=0.0).to(tl.float64), axis=0)
        s_x += tl.sum(tl.load(ptr + 2 * PLANE, mask=m, other=0.0).to(tl.float64), axis=0)
    gamma = tl.full((BLOCK_C,), 1.0, tl.float64)
    if HAS_W:
        gamma = tl.load(w_ptr + offs_c, mask=c_ok, other=1.0).to(tl.float64)
    k = gamma * tl.load(invstd_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float64)
    tl.store(coef_ptr + offs_c, k.to(coef_ptr.dtype.element_ty), mask=c_ok)
    tl.store(coef_ptr + C + offs_c, (s_dz / mf).to(coef_ptr.dtype.element_ty), mask=c_ok)
    tl.store(coef_ptr + 2 * C + offs_c, (s_dzx / mf).to(coef_ptr.dtype.element_ty), mask=c_ok)
    if HAS_W:
        tl.store(dw_ptr + offs_c, s_dzx.to(dw_ptr.dtype.element_ty), mask=c_ok)
    if HAS_B:
        tl.store(db_ptr + offs_c, s_dz.to(db_ptr.dtype.element_ty), mask=c_ok)
    if HAS_CBIAS:
        # sum over pixels of dy = k * (dz - mean(dz) - xhat * mean(dz * xhat))
        dcb = k * (s_dz - mf * (s_dz / mf) - s_x * (s_dzx / mf))
        tl.store(dcb_ptr + offs_c, dcb.to(dcb_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def _bn_bwd_dx_kernel(
    g_ptr, y_ptr,  # gradient of the block output; product output
    dy_ptr,  # out: gradient of the product output (same strides)
    coef_ptr,  # (3, C) from _bn_bwd_finalize_kernel
    mean_ptr, invstd_ptr, w_ptr, b_ptr,  # batch statistics, BatchNorm weight / bias (or dummies)
    C, S, HB,  # channels, pixels per row, pixel blocks per row
    sn, sc, ss,  # plane-view strides
    slope,  # leaky_relu negative slope
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    ptr, mask = _tile(tl.program_id(0), HB, tl.arange(0, BLOCK_S), offs_c, C, S, sn, sc, ss, BLOCK_S)
    mean, invstd, gamma, beta = _bn_params(mean_ptr, invstd_ptr, w_ptr, b_ptr, offs_c, C, HAS_W, HAS_B, ACC)
    xhat, z = _bn_z(y_ptr, ptr, mask, mean, invstd, gamma, beta, ACC)
    dz = act_backward_from_z(tl.load(g_ptr + ptr, mask=mask, other=0.0).to(ACC), z, ACT, slope)
    k = tl.load(coef_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)
    a = tl.load(coef_ptr + C + offs_c, mask=c_ok, other=0.0).to(ACC)
    b = tl.load(coef_ptr + 2 * C + offs_c, mask=c_ok, other=0.0).to(ACC)
    dx = k[None, :] * (dz - a[None, :] - xhat * b[None, :])
    tl.store(dy_ptr + ptr, dx.to(dy_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# launchers


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(t: torch.Tensor) -> int:
    """Programs a reduction pass is split into: enough to fill the GPU a few times over."""
    if not t.is_cuda:
        return 2
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return 4 * _num_sms(index)


class PlaneView:
    """The (N', C, S) plane view of a dense (N, C, *spatial) or (N, C) tensor, and its tiles."""

    def __init__(self, y: torch.Tensor):
        N, C = y.shape[0], y.shape[1]
        S = y.numel() // max(N * C, 1)
        rows_major = y.dim() == 2 or (C > 1 and y.stride(1) == 1)
        if rows_major:
            # channels_last (or (N, C)): pixels are rows of C contiguous channels
            if not _dense_rows(y):
                raise ValueError("expected a contiguous or channels_last tensor")
            self.n, self.s, self.strides = 1, N * S, (0, 1, C)
        else:
            if not y.is_contiguous():
                raise ValueError("expected a contiguous or channels_last tensor")
            self.n, self.s, self.strides = N, S, (C * S, S, 1)
        self.c = C
        cap = 1024 if _INTERPRET else 4096
        bc_max = 64 if rows_major else 16
        self.block_c = min(triton.next_power_of_2(max(C, 1)), bc_max)
        self.block_s = max(16, min(triton.next_power_of_2(max(self.s, 1)), cap // self.block_c))
        self.hb = triton.cdiv(self.s, self.block_s)
        self.tiles = self.n * self.hb
        self.cblocks = triton.cdiv(C, self.block_c)

    def split(self, t: torch.Tensor) -> tuple[int, int]:
        """(programs along the pixels, tiles per program) for a reduction pass."""
        progs = max(1, min(self.tiles, _target_programs(t) // self.cblocks))
        per = triton.cdiv(self.tiles, progs)
        return triton.cdiv(self.tiles, per), per


def _dense_rows(y: torch.Tensor) -> bool:
    if y.dim() == 2:
        return y.stride(1) == 1 and (y.shape[0] <= 1 or y.stride(0) == y.shape[1])
    return y.is_contiguous(memory_format=torch.channels_last)


def _f64_pair(v: float) -> tuple[float, float]:
    """v as hi + lo, both exactly representable in float32 (a float64 scalar for a kernel)."""
    import numpy as np

    hi = float(np.float32(v))
    return hi, float(np.float32(v - hi))


def _vec(t):
    """A per-channel (C,) vector as the kernels read it: contiguous (a copy only when it is
    strided or expanded)."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def layout_like(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """g with y's strides (a copy only when they differ, e.g. an expanded gradient)."""
    if g.stride() == y.stride():
        return g
    return torch.empty_like(y).copy_(g)


def epilogue_(y: torch.Tensor, bias, activation: int, negative_slope: float) -> torch.Tensor:
    """y = act(y + bias) in place (one read and one write of y). Returns y."""
    if y.numel() == 0 or (bias is None and activation == 0):
        return y
    bias = _vec(bias)
    v = PlaneView(y)
    with _on_device(y):
        _epilogue_kernel[(v.tiles, v.cblocks)](
            y, bias if bias is not None else y, v.c, v.s, v.hb, *v.strides, float(negative_slope),
            HAS_BIAS=bias is not None, ACT=activation, ACC=_acc(y.dtype), BLOCK_S=v.block_s,
            BLOCK_C=v.block_c)
    return y


def prologue(grad_out: torch.Tensor, y: torch.Tensor, activation: int, negative_slope: float,
             bias_grad: bool, bias_dtype=None):
    """(dz, grad_bias): dz = grad_out * act'(y) (grad_out itself for identity) and the
    per-channel sum of dz (None unless bias_grad)."""
    g = layout_like(grad_out, y)
    C = y.shape[1]
    write = activation != 0
    dz = torch.empty_like(y) if write else g
    if not write and not bias_grad:
        return dz, None
    db = torch.empty((C,), device=y.device, dtype=bias_dtype or y.dtype) if bias_grad else None
    if y.numel() == 0:
        if db is not None:
            db.zero_()
        return dz, db
    v = PlaneView(y)
    progs, per = v.split(y)
    ws = torch.empty((progs, C), device=y.device, dtype=acc_dtype(y.dtype)) if bias_grad else y
    with _on_device(y):
        _prologue_kernel[(progs, v.cblocks)](
            g, y, dz, ws, C, v.s, v.hb, v.tiles, per, *v.strides, float(negative_slope),
            ACT=activation, WRITE=write, SUM=bias_grad, ACC=_acc(y.dtype), BLOCK_S=v.block_s,
            BLOCK_C=v.block_c)
        if bias_grad:
            bc = min(triton.next_power_of_2(C), 64)
            _row_sum_kernel[(triton.cdiv(C, bc),)](ws, db, progs, C, BLOCK_R=32, BLOCK_C=bc)
    return dz, db


def bn_stats_partials(y: torch.Tensor) -> torch.Tensor:
    """(3, P, C) float64 Welford partials (count, mean, M2) of y per channel: one read of y."""
    C = y.shape[1]
    v = PlaneView(y)
    progs, per = v.split(y)
    ws = torch.empty((3, progs, C), device=y.device, dtype=torch.float64)
    with _on_device(y):
        _stats_kernel[(progs, v.cblocks)](
            y, ws, C, v.s, v.hb, v.tiles, per, progs * C, *v.strides, ACC=_acc(y.dtype),
            BLOCK_S=v.block_s, BLOCK_C=v.block_c)
    return ws


def bn_finalize(partials: torch.Tensor, conv_bias, weight, bias, running_mean, running_var,
                num_batches_tracked, momentum: float, cumulative: bool, eps: float, acc: torch.dtype):
    """Merge the (3, P, C) partials in fixed order: (mean, invstd, scale, shift) per channel in
    `acc`; running statistics updated in place (conv_bias added to the batch mean; momentum
    1 / (num_batches_tracked + 1) when cumulative) and num_batches_tracked incremented, in the
    same launch. An empty batch leaves the running statistics alone (and is counted)."""
    C = partials.shape[2]
    dev = partials.device
    conv_bias, weight, bias = _vec(conv_bias), _vec(weight), _vec(bias)
    mean, invstd, scale, shift = (torch.empty((C,), device=dev, dtype=acc) for _ in range(4))
    running = running_mean is not None
    nbt = num_batches_tracked
    if C == 0:
        if nbt is not None:
            nbt.add_(1)
        return mean, invstd, scale, shift
    bc = min(triton.next_power_of_2(C), 64)
    cblocks = triton.cdiv(C, bc)
    cbp = cblocks if (running and cumulative) else 1
    d = mean
    with _on_device(partials):
        _finalize_kernel[(triton.cdiv(cblocks, cbp),)](
            partials, conv_bias if conv_bias is not None else d, weight if weight is not None else d,
            bias if bias is not None else d, running_mean if running else d,
            running_var if running else d, nbt if nbt is not None else d,
            mean, invstd, scale, shift, partials.shape[1], C, partials.shape[1] * C,
            running_mean.stride(0) if running else 0, running_var.stride(0) if running else 0,
            cbp, *_f64_pair(momentum), *_f64_pair(eps), HAS_CBIAS=conv_bias is not None,
            HAS_W=weight is not None, HAS_B=bias is not None, RUNNING=running,
            CUMULATIVE=bool(running and cumulative), INC_NBT=nbt is not None, BLOCK_R=32, BLOCK_C=bc)
    return mean, invstd, scale, shift


def bn_apply(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, activation: int,
             negative_slope: float) -> torch.Tensor:
    """act(y * scale + shift) per channel: one read of y, one write (out in the layout
    torch's BatchNorm gives, the same memory order as y)."""
    out = ref_bn.empty_bn_output(y)
    if y.numel() == 0:
        return out
    v = PlaneView(y)
    with _on_device(y):
        _apply_kernel[(v.tiles, v.cblocks)](
            y, out, scale, shift, v.c, v.s, v.hb, *v.strides, float(negative_slope), ACT=activation,
            ACC=_acc(y.dtype), BLOCK_S=v.block_s, BLOCK_C=v.block_c)
    return out


def bn_act_backward(grad_out, y, mean, invstd, weight, bias, activation: int, negative_slope: float,
                    conv_bias_grad: bool, conv_bias_dtype=None):
    """Training-mode BatchNorm + activation backward with the batch statistics of y:
    (dy, grad_weight, grad_bias, grad_conv_bias). Three launches."""
    C = y.shape[1]
    g = layout_like(grad_out, y)
    dev = y.device
    weight, bias = _vec(weight), _vec(bias)
    dw = torch.empty((C,), device=dev, dtype=weight.dtype) if weight is not None else None
    db = torch.empty((C,), device=dev, dtype=bias.dtype) if bias is not None else None
    dcb = (torch.empty((C,), device=dev, dtype=conv_bias_dtype or y.dtype) if conv_bias_grad
           else None)
    dy = torch.empty_like(y)
    if y.numel() == 0:
        for t in (dw, db, dcb):
            if t is not None:
                t.zero_()
        return dy, dw, db, dcb
    v = PlaneView(y)
    progs, per = v.split(y)
    acc_t = acc_dtype(y.dtype)
    ws = torch.empty((3, progs, C), device=dev, dtype=acc_t)
    coef = torch.empty((3, C), device=dev, dtype=acc_t)
    wd = weight if weight is not None else mean
    bd = bias if bias is not None else mean
    common = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACT=activation,
                  ACC=_acc(y.dtype), BLOCK_S=v.block_s, BLOCK_C=v.block_c)
    bc = min(triton.next_power_of_2(C), 64)
    with _on_device(y):
        _bn_bwd_reduce_kernel[(progs, v.cblocks)](
            g, y, ws, mean, invstd, wd, bd, C, v.s, v.hb, v.tiles, per, progs * C, *v.strides,
            float(negative_slope), **common)
        _bn_bwd_finalize_kernel[(triton.cdiv(C, bc),)](
            ws, invstd, wd, coef, dw if dw is not None else coef, db if db is not None else coef,
            dcb if dcb is not None else coef, progs, C, progs * C, float(max(y.numel() // C, 1)),
            HAS_W=weight is not None, HAS_B=bias is not None, HAS_CBIAS=conv_bias_grad,
            BLOCK_R=32, BLOCK_C=bc)
        _bn_bwd_dx_kernel[(v.tiles, v.cblocks)](
            g, y, dy, coef, mean, invstd, wd, bd, C, v.s, v.hb, *v.strides, float(negative_slope),
            **common)
    return dy, dw, db, dcb
