"""Triton kernels for the transposed convolution (conv_transpose2d + bias + activation) as an
implicit GEMM on tensor cores, and their launchers (tensors in, tensors out; no autograd).

Design (sm_90; NOT MEASURED: no GPU has run this code. What follows is what the design expects,
and the only thing checked without a GPU is what the compiler emits, see
tests/test_conv_transpose_triton.py::test_gemm_compiles_for_sm90):
- Operands are read with their reduction-free dimension innermost so that the loads vectorise
  to 16 bytes and the software pipeliner turns them into cp.async copies into shared memory,
  num_stages deep, feeding tl.dot on tensor cores (wgmma for float16/bfloat16 and TF32, from
  shared memory; mma.sync where wgmma does not apply):
  activations are read channels_last (any tensor whose channel stride is 1 is used as it is; a
  contiguous NCHW tensor is converted once per call), weights are repacked once per weight
  call (one tiny kernel) into per-phase matrices
  [taps * C_in/g, C_out/g padded to 16] (forward) and [taps * C_out/g, C_in/g padded to 16]
  (grad_input), whose rows are 16-byte aligned.
- Alignment: a stride or channel count that is not a multiple of 16 (e.g. 100 input channels)
  is passed divided by VEC, the largest power of two (<= 16 bytes) dividing it, and multiplied
  by the constexpr VEC in the kernel, so the compiler still knows VEC-element alignment.
- Forward: output phases. Output rows oh = ph + SH*j (ph in [0, SH)) receive exactly the taps th
  with (ph + PH - th*DH) divisible by SH; these are th0, th0 + SH/gcd(SH, DH), ..., reading input
  row j + base - i * DH/gcd(SH, DH) (_phase_taps). Each phase is an unstrided convolution: one
  flattened K loop over (valid taps x C_in/g) per (BLOCK_M pixels of one phase) x (BLOCK_N output
  channels of one group) tile, no multiply by a tap that cannot reach the output.
  Epilogue: bias, activation, store (any output strides); with STATS, per-tile Welford partials
  (count, mean, M2) of the stored output per channel, merged elsewhere in a fixed order.
- Backward: a prologue pass forms dz = dy * act'(y) once, channels_last, in the input dtype, and
  grad_bias partial sums per pixel chunk (skipped when act is identity, dy is already channel-
  innermost and there is no bias). grad_input is an ordinary strided convolution of dz with the
  repacked weight (one K loop over taps x C_out/g). grad_weight is, per tap, x^T @ dz over the
  batch pixels, split over SPLIT chunks of that reduction into a float32 (float64) workspace; a
  last kernel sums the chunks and the grad_bias partials in a fixed order: deterministic.
- Tiles: a fixed table (_gemm_config) gives one config per (kernel, dtype, shape): the same
  config, hence bitwise the same result, in every process; no autotuning at run time.
- Indices: int32 unless a tensor of the call has >= 2^31 elements (IDX = int64 then).
- NaN/inf in x or dy propagate as in torch (CPU), including torch's zero-padded products in the
  gradients (an inf pixel times a zero of dz is NaN in grad_weight). A non-finite WEIGHT in the
  forward differs: where a tap falls outside the input (image borders) the GEMM multiplies it
  by the zero of the masked pixel (inf * 0 = NaN) where torch's col2im skips the product.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from genfast import backend as B
from genfast.kernels.activation import act_backward_from_y, act_forward
from genfast.kernels.batchnorm_act import _num_sms, _on_device

_INTERPRET = B.triton_interpret()

# ---------------------------------------------------------------------------------------------
# shared device helpers


@triton.jit
def _phase_taps(p, S, PAD, D, K: tl.constexpr):
    # Taps of output phase p along one axis: output index o = p + S * j receives the taps
    # t0 + i * S/gcd(S, D) (i < count), reading input index j + base - i * D/gcd(S, D).
    # p: phase (scalar or tensor); S, PAD, D: stride, padding, dilation; K: kernel size.
    t0 = p * 0 + K
    count = p * 0
    for tt in tl.static_range(K):
        t = K - 1 - tt
        ok = ((p + PAD + S * K * D - t * D) % S) == 0  # shifted by S*K*D: non-negative
        t0 = tl.where(ok, t, t0)
        count += ok.to(tl.int32)
    base = (p + PAD + S * K * D - t0 * D) // S - K * D
    return t0, count, base


@triton.jit
def _gather_dot(acc, a_rows, r, c, R, C, m_ok, SR, SC, ck, c_lim, b_ptr, ROW, offs_n,
                PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    # One K step of an implicit GEMM, acc + A @ B. A: per GEMM row (pixel) the channels ck of the
    # channel-innermost tensor at a_rows + r * SR + c * SC, zero where (r, c) is outside
    # [0, R) x [0, C), m_ok is False or ck >= c_lim. B: rows ck (< c_lim) of the row-major
    # matrix at b_ptr with row length ROW, columns offs_n (< ROW).
    a_ok = m_ok & (r >= 0) & (r < R) & (c >= 0) & (c < C)
    c_ok = ck < c_lim
    a = tl.load(a_rows[:, None] + (r * SR + c * SC)[:, None] + ck[None, :],
                mask=a_ok[:, None] & c_ok[None, :], other=0.0)
    b = tl.load(b_ptr + ck[:, None] * ROW + offs_n[None, :],
                mask=c_ok[:, None] & (offs_n < ROW)[None, :], other=0.0)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)


# ---------------------------------------------------------------------------------------------
# forward


@triton.jit
def _convt_fwd_kernel(
    x_ptr,  # input (N, C_in, H_in, W_in), channel stride 1; (n, h, w) strides XN_V/XH_V/XW_V * VEC_X
    wp_ptr,  # repacked weight (G, SH*SW, MAXT, C_in/g, COUT_P) from _repack_kernel (MODE 0)
    b_ptr,  # bias (C_out,) with stride SB, or a dummy pointer when HAS_BIAS is False
    y_ptr,  # output (N, C_out, H_out, W_out), any strides
    st_ptr,  # STATS: partials (3, rows, C_OUT) in ACC_DTYPE (count, mean, M2); else dummy
    N, HIN, WIN,  # batch, input height and width
    COUT_G, HOUT, WOUT,  # output channels per group, output height and width
    HPH, WPH,  # rows / columns per output phase: cdiv(H_out, SH), cdiv(W_out, SW)
    CIN_GV,  # input channels per group / VEC_X
    XN_V, XH_V, XW_V,  # input strides of n, h, w (elements) / VEC_X
    COUT_P,  # row length of the repacked weight (C_out/g rounded up to 16)
    MAXT,  # tap slots per phase in the repacked weight
    SB,  # bias stride
    syn, syc, syh, syw,  # output strides
    SH, SW, PH, PW, DH, DW,  # stride, padding, dilation
    ISH, ISW,  # input step between consecutive valid taps of a phase: D / gcd(S, D)
    slope,  # leaky_relu negative slope
    ST_PLANE, C_OUT,  # statistics plane size (rows * C_out) and total output channels
    TILES_M, TILES_N,  # tiles along the phase's pixels and along C_out/g
    KH: tl.constexpr, KW: tl.constexpr,  # kernel size
    HAS_BIAS: tl.constexpr,  # add bias in the epilogue
    ACT: tl.constexpr,  # activation code (genfast.backend.ACTIVATIONS)
    STATS: tl.constexpr,  # also write per-tile statistics partials of the output
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for float64 tensors
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" or "tf32"
    IDX: tl.constexpr,  # index dtype: tl.int32, or tl.int64 when a tensor has >= 2^31 elements
    VEC_X: tl.constexpr,  # power of two dividing C_in/g and the input's n, h, w strides
    BLOCK_M: tl.constexpr,  # output pixels (of one phase) per tile
    BLOCK_N: tl.constexpr,  # output channels per tile
    BLOCK_K: tl.constexpr,  # input channels per reduction step
):
    # one grid axis (no 65535 limit): ((g * SH*SW + phase) * TILES_N + tile_n) * TILES_M + tile_m
    pid = tl.program_id(0)
    pid_m = pid % TILES_M
    r = pid // TILES_M
    pid_n = r % TILES_N
    pid_z = r // TILES_N  # g * SH * SW + phase
    nphase = SH * SW
    g = pid_z // nphase
    phase = pid_z % nphase
    ph = phase // SW
    pw = phase % SW
    th0, n_th, base_h = _phase_taps(ph, SH, PH, DH, KH)
    tw0, n_tw, base_w = _phase_taps(pw, SW, PW, DW, KW)
    n_tw1 = tl.maximum(n_tw, 1)
    cin_g = CIN_GV * VEC_X

    offs_m = pid_m.to(IDX) * BLOCK_M + tl.arange(0, BLOCK_M)
    per_img = HPH * WPH
    n_idx = offs_m // per_img
    rem = offs_m % per_img
    j = rem // WPH
    k = rem % WPH
    oh = ph + SH * j
    ow = pw + SW * k
    m_ok = (n_idx < N) & (oh < HOUT) & (ow < WOUT)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)

    x_img = x_ptr + n_idx * (XN_V * VEC_X) + g * cin_g
    w_phase = wp_ptr + pid_z.to(IDX) * MAXT * cin_g * COUT_P
    n_cc = tl.cdiv(cin_g, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for kk in range(0, n_th * n_tw * n_cc):  # flattened (valid taps) x (input channel blocks)
        t = kk // n_cc
        ck = (kk - t * n_cc) * BLOCK_K + offs_k
        ti = t // n_tw1
        tj = t - ti * n_tw1
        acc = _gather_dot(acc, x_img, j + (base_h - ti * ISH), k + (base_w - tj * ISW), HIN, WIN,
                          m_ok, XH_V * VEC_X, XW_V * VEC_X, ck, cin_g,
                          w_phase + t * cin_g * COUT_P, COUT_P, offs_n, PRECISION, ACC_DTYPE)

    co_ok = offs_n < COUT_G
    co = g * COUT_G + offs_n
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + co * SB, mask=co_ok, other=0.0).to(ACC_DTYPE)[None, :]
    out = act_forward(acc, ACT, slope)
    y_ptrs = y_ptr + (n_idx * syn + oh * syh + ow * syw)[:, None] + (co * syc)[None, :]
    mask = m_ok[:, None] & co_ok[None, :]
    out_lp = out.to(y_ptr.dtype.element_ty)
    tl.store(y_ptrs, out_lp, mask=mask)

    if STATS:
        # Welford partials of the stored (rounded) output, as a following BatchNorm sees it.
        v = tl.where(mask, out_lp.to(ACC_DTYPE), 0.0)
        cnt = tl.sum(m_ok.to(ACC_DTYPE), axis=0)
        mean = tl.sum(v, axis=0) / tl.maximum(cnt, 1.0)
        d = tl.where(mask, v - mean[None, :], 0.0)
        m2 = tl.sum(d * d, axis=0)
        row = phase * TILES_M + pid_m
        st = st_ptr + row.to(tl.int64) * C_OUT + co
        tl.store(st, tl.zeros((BLOCK_N,), ACC_DTYPE) + cnt, mask=co_ok)
        tl.store(st + ST_PLANE, mean, mask=co_ok)
        tl.store(st + 2 * ST_PLANE, m2, mask=co_ok)


@triton.jit
def _repack_kernel(
    w_ptr,  # weight (C_in, C_out/g, KH, KW), any strides
    out_ptr,  # MODE 0: (G, SH*SW, MAXT, C_in/g, ROW); MODE 1: (G, KH*KW, MAXT, ROW); zero padded
    TOTAL,  # elements of out
    CIN_G, COUT_G,  # channels per group
    ROW,  # padded row length (C_out/g or C_in/g rounded up to 16)
    MAXT,  # MODE 0: tap slots per phase; MODE 1: rows per tap (C_out/g, padded to dz's channels)
    swi, swo, swh, sww,  # weight strides
    SH, SW, PH, PW, DH, DW,  # stride, padding, dilation (MODE 0)
    TSH, TSW,  # tap step between valid taps of a phase: S / gcd(S, D) (MODE 0)
    KH: tl.constexpr, KW: tl.constexpr,  # kernel size
    MODE: tl.constexpr,  # 0: forward layout (per phase), 1: grad_input layout (per tap)
    BLOCK: tl.constexpr,  # elements per program
):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = e < TOTAL
    r = e // ROW
    col = e % ROW
    if MODE == 0:
        co = col
        ci = r % CIN_G
        r = r // CIN_G
        t = r % MAXT
        r = r // MAXT
        phase = r % (SH * SW)
        g = r // (SH * SW)
        th0, n_th, base_h = _phase_taps(phase // SW, SH, PH, DH, KH)
        tw0, n_tw, base_w = _phase_taps(phase % SW, SW, PW, DW, KW)
        n_tw1 = tl.maximum(n_tw, 1)
        th = th0 + (t // n_tw1) * TSH
        tw = tw0 + (t % n_tw1) * TSW
        ok = inb & (t < n_th * n_tw) & (co < COUT_G)
    else:
        ci = col
        co = r % MAXT
        r = r // MAXT
        tap = r % (KH * KW)
        g = r // (KH * KW)
        th = tap // KW
        tw = tap % KW
        ok = inb & (ci < CIN_G) & (co < COUT_G)
    src = w_ptr + (g * CIN_G + ci) * swi + co * swo + th * swh + tw * sww
    v = tl.load(src, mask=ok, other=0.0)
    tl.store(out_ptr + e, v, mask=inb)


# ---------------------------------------------------------------------------------------------
# backward


@triton.jit
def _dz_prologue_kernel(
    dy_ptr,  # grad of the output (N, C, H_out, W_out), any strides
    y_ptr,  # saved output, any strides (read only when ACT != 0)
    dz_ptr,  # out (WRITE_DZ): dz = dy * act'(y), dense (N, H_out, W_out, G, COUT_GP), pad zeros
    bp_ptr,  # out (HAS_BIAS): grad_bias partial sums (SPLIT, C) in ACC
    NP, C, HW, WOUT,  # pixels N*H_out*W_out, channels, H_out*W_out, W_out
    COUT_G, COUT_GP, CP,  # channels per group, the same padded for alignment, G * COUT_GP
    P_SPLIT,  # pixels per program along axis 1 (a multiple of BLOCK_P)
    sdn, sdc, sdh, sdw,  # dy strides
    syn, syc, syh, syw,  # y strides
    slope,  # leaky_relu negative slope
    ACT: tl.constexpr,  # activation code
    WRITE_DZ: tl.constexpr,  # store dz
    HAS_BIAS: tl.constexpr,  # store grad_bias partials
    ACC: tl.constexpr,  # tl.float32 or tl.float64
    IDX: tl.constexpr,  # index dtype
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,  # tile: pixels x channels
):
    pid_s = tl.program_id(1)  # pixel chunk (<= 64)
    offs_cp = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # padded channel index
    co = offs_cp % COUT_GP
    offs_c = (offs_cp // COUT_GP) * COUT_G + co  # channel of dy
    c_ok = (offs_cp < CP) & (co < COUT_G)
    lo = pid_s.to(IDX) * P_SPLIT
    hi = tl.minimum(lo + P_SPLIT, NP)
    s = tl.zeros((BLOCK_C,), ACC)
    for p0 in range(lo, hi, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        n = p // HW
        hw = p % HW
        oh = hw // WOUT
        ow = hw % WOUT
        mask = (p < hi)[:, None] & c_ok[None, :]
        dz = tl.load(dy_ptr + (n * sdn + oh * sdh + ow * sdw)[:, None] + (offs_c * sdc)[None, :],
                     mask=mask, other=0.0).to(ACC)
        if ACT != 0:
            yv = tl.load(y_ptr + (n * syn + oh * syh + ow * syw)[:, None] + (offs_c * syc)[None, :],
                         mask=mask, other=0.0)
            dz = act_backward_from_y(dz, yv.to(ACC), ACT, slope)
        if WRITE_DZ:
            tl.store(dz_ptr + (p * CP)[:, None] + offs_cp[None, :], dz.to(dz_ptr.dtype.element_ty),
                     mask=(p < hi)[:, None] & (offs_cp < CP)[None, :])
        if HAS_BIAS:
            s += tl.sum(tl.where(mask, dz, 0.0), axis=0)
    if HAS_BIAS:
        tl.store(bp_ptr + pid_s.to(tl.int64) * C + offs_c, s, mask=c_ok)


@triton.jit
def _convt_dgrad_kernel(
    dz_ptr,  # dz (N, C_out, H_out, W_out), channel stride 1; (n, h, w) strides ZN_V/ZH_V/ZW_V * VEC_Z
    wp_ptr,  # repacked weight (G, KH*KW, COUT_GV * VEC_Z, CIN_P) from _repack_kernel (MODE 1)
    dx_ptr,  # grad of the input (N, C_in, H_in, W_in), any strides
    N, HIN, WIN, HOUT, WOUT,  # batch, input and output height and width
    CIN_G,  # input channels per group
    COUT_GV,  # dz channels per group (C_out/g, or padded with zeros) / VEC_Z
    ZN_V, ZH_V, ZW_V,  # dz strides of n, h, w / VEC_Z
    CIN_P,  # row length of the repacked weight (C_in/g rounded up to 16)
    TILES_M, TILES_N,  # tiles along the input pixels and along C_in/g
    sxn, sxc, sxh, sxw,  # dx strides
    SH, SW, PH, PW, DH, DW,  # stride, padding, dilation of the transposed convolution
    KH: tl.constexpr, KW: tl.constexpr,  # kernel size
    ACC_DTYPE: tl.constexpr,  # tl.float32 or tl.float64
    PRECISION: tl.constexpr,  # tl.dot input precision
    IDX: tl.constexpr,  # index dtype
    VEC_Z: tl.constexpr,  # power of two dividing C_out/g and dz's n, h, w strides
    BLOCK_M: tl.constexpr,  # input pixels per tile
    BLOCK_N: tl.constexpr,  # input channels per tile
    BLOCK_K: tl.constexpr,  # output channels per reduction step
):
    # one grid axis: (g * TILES_N + tile_n) * TILES_M + tile_m
    pid = tl.program_id(0)
    pid_m = pid % TILES_M
    r = pid // TILES_M
    pid_n = r % TILES_N
    g = r // TILES_N
    cout_g = COUT_GV * VEC_Z
    offs_m = pid_m.to(IDX) * BLOCK_M + tl.arange(0, BLOCK_M)
    per_img = HIN * WIN
    n_idx = offs_m // per_img
    rem = offs_m % per_img
    ih = rem // WIN
    iw = rem % WIN
    m_ok = n_idx < N
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)

    dz_img = dz_ptr + n_idx * (ZN_V * VEC_Z) + g * cout_g
    w_grp = wp_ptr + g.to(IDX) * (KH * KW) * cout_g * CIN_P
    n_cc = tl.cdiv(cout_g, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for kk in range(0, KH * KW * n_cc):  # flattened (taps) x (output channel blocks)
        t = kk // n_cc
        ck = (kk - t * n_cc) * BLOCK_K + offs_k
        th = t // KW
        tw = t - th * KW
        acc = _gather_dot(acc, dz_img, ih * SH + (th * DH - PH), iw * SW + (tw * DW - PW), HOUT, WOUT,
                          m_ok, ZH_V * VEC_Z, ZW_V * VEC_Z, ck, cout_g,
                          w_grp + t * cout_g * CIN_P, CIN_P, offs_n, PRECISION, ACC_DTYPE)

    dx_ptrs = (dx_ptr + (n_idx * sxn + ih * sxh + iw * sxw)[:, None]
               + ((g * CIN_G + offs_n) * sxc)[None, :])
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_n < CIN_G)[None, :])


@triton.jit
def _convt_wgrad_kernel(
    x_ptr,  # saved input, channel stride 1; (n, h, w) strides XN_V/XH_V/XW_V * VEC_X
    dz_ptr,  # dz, channel stride 1; (n, h, w) strides ZN_V/ZH_V/ZW_V * VEC_Z
    ws_ptr,  # out: partials (SPLIT, C_in * C_out/g * KH * KW) in ACC_DTYPE, grad_weight layout
    HIN, WIN, HOUT, WOUT,  # input and output height and width
    CIN_GV, COUT_GV,  # channels per group / VEC_X; dz channels per group (maybe padded) / VEC_Z
    COUT_G,  # output channels per group
    XN_V, XH_V, XW_V, ZN_V, ZH_V, ZW_V,  # strides / VEC
    TILES_M, TILES_N,  # tiles along C_in/g and C_out/g
    K_SPLIT,  # input pixels per split (a multiple of BLOCK_K)
    NPIX,  # input pixels N * H_in * W_in
    NW,  # grad_weight elements (workspace row length)
    SH, SW, PH, PW, DH, DW,  # stride, padding, dilation
    KH: tl.constexpr, KW: tl.constexpr,  # kernel size
    ACC_DTYPE: tl.constexpr,  # tl.float32 or tl.float64
    PRECISION: tl.constexpr,  # tl.dot input precision
    IDX: tl.constexpr,  # index dtype
    VEC_X: tl.constexpr, VEC_Z: tl.constexpr,  # alignment of x and dz (see the kernels above)
    BLOCK_M: tl.constexpr,  # input channels per tile
    BLOCK_N: tl.constexpr,  # output channels per tile
    BLOCK_K: tl.constexpr,  # input pixels per reduction step
):
    # axis 0: ((g * KH*KW + tap) * TILES_M + tile_m) * TILES_N + tile_n; axis 1: split (<= 64)
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_n = pid % TILES_N
    r = pid // TILES_N
    pid_m = r % TILES_M
    r = r // TILES_M
    tap = r % (KH * KW)
    g = r // (KH * KW)
    th = tap // KW
    tw = tap % KW
    cin_g = CIN_GV * VEC_X
    cout_g = COUT_GV * VEC_Z
    offs_ci = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_ok = offs_ci < cin_g
    co_ok = offs_co < cout_g
    offs_k = tl.arange(0, BLOCK_K)
    per_img = HIN * WIN
    k_lo = pid_s.to(IDX) * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, NPIX)
    x_ch = x_ptr + g * cin_g + offs_ci
    dz_ch = dz_ptr + g * cout_g + offs_co
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for p0 in range(k_lo, k_hi, BLOCK_K):
        p = p0 + offs_k
        p_ok = p < k_hi
        n_idx = p // per_img
        rem = p % per_img
        ih = rem // WIN
        iw = rem % WIN
        oh = ih * SH + (th * DH - PH)
        ow = iw * SW + (tw * DW - PW)
        o_ok = p_ok & (oh >= 0) & (oh < HOUT) & (ow >= 0) & (ow < WOUT)
        # x is not masked with the tap's output range: like torch's zero-padded product, a
        # NaN/inf pixel whose tap misses the output meets a zero of dz (NaN in grad_weight)
        a = tl.load(x_ch[:, None] + (n_idx * (XN_V * VEC_X) + ih * (XH_V * VEC_X) + iw * (XW_V * VEC_X))[None, :],
                    mask=ci_ok[:, None] & p_ok[None, :], other=0.0)
        b = tl.load(dz_ch[None, :] + (n_idx * (ZN_V * VEC_Z) + oh * (ZH_V * VEC_Z) + ow * (ZW_V * VEC_Z))[:, None],
                    mask=o_ok[:, None] & co_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    # grad_weight layout (C_in, C_out/g, KH, KW), contiguous
    w_off = ((g * cin_g + offs_ci)[:, None] * COUT_G + offs_co[None, :]) * (KH * KW) + tap
    tl.store(ws_ptr + pid_s.to(tl.int64) * NW + w_off, acc,
             mask=ci_ok[:, None] & (offs_co < COUT_G)[None, :])


@triton.jit
def _wgrad_finish_kernel(
    ws_ptr,  # grad_weight partials (SPLIT, NW)
    dw_ptr,  # out: grad_weight, contiguous (C_in, C_out/g, KH, KW)
    bp_ptr,  # grad_bias partials (SPLIT_B, C_OUT), or dummy
    db_ptr,  # out: grad_bias (C_OUT,), or dummy
    SPLIT, NW,  # grad_weight partial rows and row length
    SPLIT_B, C_OUT,  # grad_bias partial rows and row length
    TILES_W,  # programs for grad_weight (the rest do grad_bias)
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,  # which results to write
    BLOCK: tl.constexpr,  # elements per program
):
    # Sums the partial rows in a fixed order: deterministic.
    pid = tl.program_id(0)
    if pid < TILES_W:
        if HAS_W:
            offs_w = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            w_ok = offs_w < NW
            acc_w = tl.load(ws_ptr + offs_w, mask=w_ok, other=0.0)
            for s in range(1, SPLIT):
                acc_w += tl.load(ws_ptr + s * NW + offs_w, mask=w_ok, other=0.0)
            tl.store(dw_ptr + offs_w, acc_w.to(dw_ptr.dtype.element_ty), mask=w_ok)
    else:
        if HAS_B:
            offs_b = (pid - TILES_W) * BLOCK + tl.arange(0, BLOCK)
            b_ok = offs_b < C_OUT
            acc_b = tl.zeros((BLOCK,), bp_ptr.dtype.element_ty)
            for s in range(0, SPLIT_B):
                acc_b += tl.load(bp_ptr + s * C_OUT + offs_b, mask=b_ok, other=0.0)
            tl.store(db_ptr + offs_b, acc_b.to(db_ptr.dtype.element_ty), mask=b_ok)


# ---------------------------------------------------------------------------------------------
# launchers


class _Cfg(NamedTuple):
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int

    def meta(self) -> dict:
        return dict(BLOCK_M=self.BLOCK_M, BLOCK_N=self.BLOCK_N, BLOCK_K=self.BLOCK_K,
                    num_warps=self.num_warps, num_stages=self.num_stages)


# Under TRITON_INTERPRET=1 (CPU tests) one small tile, so that small test shapes still take
# several tiles, partial tiles and several K steps.
_INTERP_CFG = _Cfg(16, 16, 16, 4, 1)


def _gemm_config(kind: str, dtype: torch.dtype, m: int, n: int, k: int) -> _Cfg:
    """The one tile config of a GEMM launch: a fixed function of (kernel, dtype, extents), so
    every process picks the same config and gets bitwise the same result. kind: "fwd", "dgrad"
    or "wgrad"; m, n: the GEMM's output extents (pixels or channels); k: the channel count of
    one reduction step's range (fwd, dgrad) or the pixel count (wgrad). The kernel size,
    strides, groups, layout and activation enter through m, n, k and the constexprs; they do not
    change the tile. float32 runs TF32 (or IEEE) tl.dot, float64 small tiles. Tiles are multiples of the wgmma shape (64 rows per warpgroup); the
    pipeline depth keeps stages * (BLOCK_M + BLOCK_N) * BLOCK_K * itemsize <= 160 KB.
    Not tuned on hardware: the sizes follow the usual Hopper tile choices."""
    if _INTERPRET:
        return _INTERP_CFG
    if dtype == torch.float64:
        bm, bn_cap, bk_cap, stages = 64, 64, 16, 2
    else:
        bm = 128 if m > 64 else 64
        # the forward's epilogue (bias, activation, statistics, per-row output addresses)
        # spilled at 128 x 128 in ptxas -v (sm_90): 64 output channels per tile there
        bn_cap = 64 if kind == "fwd" else 128
        bk_cap = 64 if dtype.itemsize == 2 else 32
        stages = 4 if dtype.itemsize == 2 else 3
    bn = min(bn_cap, max(16, triton.next_power_of_2(max(n, 1))))
    bk = min(bk_cap, max(16, triton.next_power_of_2(max(k, 1))))
    warps = 8 if bm >= 128 else 4
    return _Cfg(bm, bn, bk, warps, stages)


_PROLOGUE_TILE = (16, 16) if _INTERPRET else (32, 64)  # 64x64 spilled on Triton 3.6 (255 registers)
_FINISH_BLOCK = 64 if _INTERPRET else 1024
_REPACK_BLOCK = 256 if _INTERPRET else 1024
_I32_SAFE = 2 ** 31 - 2 ** 24  # index ranges below this stay int32 (tile overhang included)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _acc_torch(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _span(t: torch.Tensor) -> int:
    """1 + the largest element offset of t (0 when empty)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))


def _index_dtype(*tensors: torch.Tensor):
    """tl.int64 when some offset of the call can reach 2^31, else tl.int32."""
    return tl.int64 if max(_span(t) for t in tensors) >= _I32_SAFE else tl.int32


def _vec(itemsize: int, *values: int) -> int:
    """Largest power of two <= 16 bytes / itemsize dividing every value."""
    v = max(1, 16 // itemsize)
    while v > 1 and any(val % v for val in values):
        v //= 2
    return v


def _channels_inner(t: torch.Tensor):
    """t with channel stride 1 (t itself when it has one, else one channels_last copy) and its
    (n, h, w) strides, 0 for a dimension of size 1."""
    if t.shape[1] > 1 and t.stride(1) != 1:
        t = t.contiguous(memory_format=torch.channels_last)
    return t, tuple(0 if t.shape[d] == 1 else t.stride(d) for d in (0, 2, 3))


def _tf32_allowed() -> bool:
    """Whether torch lets cuDNN convolutions use TF32 for float32. Reads the fp32_precision API
    (conv setting, else cuDNN's, else the global one) where it exists: reading the legacy
    allow_tf32 raises once a user has mixed the two APIs."""
    cudnn = torch.backends.cudnn
    conv = getattr(cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        for p in (conv.fp32_precision, getattr(cudnn, "fp32_precision", "none"),
                  getattr(torch.backends, "fp32_precision", "none")):
            if p != "none":
                return p == "tf32"
        return False
    return bool(cudnn.allow_tf32)


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    """tl.dot input precision: TF32 for float32 CUDA tensors exactly when torch's cuDNN
    convolutions would use it."""
    if device.type == "cuda" and dtype == torch.float32 and _tf32_allowed():
        return "tf32"
    return "ieee"


def _check_input(x: torch.Tensor) -> None:
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise RuntimeError("Only zero batch or zero channel inputs are supported, but got input "
                           f"shape: {list(x.shape)}")


def _launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](...), skipped when the grid is empty (empty batch, zero channels)."""
    if all(g > 0 for g in grid):
        kernel[grid](*args, **kwargs)


def _phase_geometry(k: int, s: int, d: int):
    """(tap step, input step, tap slots) of the phases along one axis."""
    gcd = math.gcd(s, d)
    return s // gcd, d // gcd, triton.cdiv(k, s // gcd)


def _repack(weight, groups, mode, stride=(1, 1), padding=(0, 0), dilation=(1, 1), cout_gp=0):
    """The weight as the GEMM reads it, repacked on every call: mode 0 (forward) (G, SH*SW, MAXT, C_in/g, COUT_P),
    mode 1 (grad_input) (G, KH*KW, cout_gp, CIN_P) with cout_gp >= C_out/g the channels per group
    of dz; rows padded to 16 elements with zeros, rows past C_out/g zero."""
    cin, cog, kh, kw = weight.shape
    cig = cin // groups
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    tsh, _, mth = _phase_geometry(kh, sh, dh)
    tsw, _, mtw = _phase_geometry(kw, sw, dw)
    if mode == 0:
        row = triton.cdiv(cog, 16) * 16
        shape = (groups, sh * sw, mth * mtw, cig, row)
    else:
        row = triton.cdiv(cig, 16) * 16
        shape = (groups, kh * kw, cout_gp, row)
    slots = mth * mtw if mode == 0 else cout_gp
    # Not cached across calls: a cache keyed on the weight's version would serve stale values
    # after a write through .data (which does not bump the version), and a training step
    # changes the weight anyway.
    out = torch.empty(shape, device=weight.device, dtype=weight.dtype)
    total = out.numel()
    _launch(_repack_kernel, (triton.cdiv(total, _REPACK_BLOCK),),
            weight, out, total, cig, cog, row, slots, *weight.stride(),
            sh, sw, ph, pw, dh, dw, tsh, tsw, KH=kh, KW=kw, MODE=mode, BLOCK=_REPACK_BLOCK)
    return out, row


def conv_transpose2d_fwd(x, weight, bias, stride, padding, output_padding, groups, dilation,
                         activation: int, negative_slope: float, stats: bool = False):
    """y = act(conv_transpose2d(x, weight) + bias) for 4-D x (validated by the caller).
    With stats=True returns (y, partials): partials (3, P, C_out) in float32 (float64 for
    float64 x) holds per row tile the count, mean and M2 of y per channel over its (N, H, W)
    pixels (count 0, mean 0, M2 0 for a tile without pixels); merge the P rows with Chan's
    formula."""
    _check_input(x)
    N, Cin, Hin, Win = x.shape
    _, COG, KH, KW = weight.shape
    G = groups
    CIG = Cin // G
    Cout = COG * G
    SH, SW = stride
    PH, PW = padding
    DH, DW = dilation
    Hout = (Hin - 1) * SH - 2 * PH + DH * (KH - 1) + output_padding[0] + 1
    Wout = (Win - 1) * SW - 2 * PW + DW * (KW - 1) + output_padding[1] + 1
    from genfast.ops.conv_transpose import fused_out_format  # torch's layout (here: no import cycle)

    y = torch.empty((N, Cout, Hout, Wout), device=x.device, dtype=x.dtype,
                    memory_format=fused_out_format(x, weight, (N, Cout, Hout, Wout),
                                                   activation != 0 or stats))
    HPH, WPH = triton.cdiv(Hout, SH), triton.cdiv(Wout, SW)
    M = N * HPH * WPH
    cfg = _gemm_config("fwd", x.dtype, M, COG, CIG)
    tiles_m = triton.cdiv(M, cfg.BLOCK_M)
    st = (torch.empty((3, SH * SW * tiles_m, Cout), device=x.device, dtype=_acc_torch(x.dtype))
          if stats else None)
    with _on_device(x):
        if y.numel() > 0:
            xs, (xn, xh, xw) = _channels_inner(x)
            vx = _vec(x.element_size(), CIG, xn, xh, xw)
            wp, cout_p = _repack(weight, G, 0, stride, padding, dilation)
            _, ish, mth = _phase_geometry(KH, SH, DH)
            _, isw, mtw = _phase_geometry(KW, SW, DW)
            tiles_n = triton.cdiv(COG, cfg.BLOCK_N)
            _launch(_convt_fwd_kernel, (tiles_m * tiles_n * G * SH * SW,),
                    xs, wp, bias if bias is not None else y, y, st if stats else y,
                    N, Hin, Win, COG, Hout, Wout, HPH, WPH,
                    CIG // vx, xn // vx, xh // vx, xw // vx, cout_p, mth * mtw,
                    bias.stride(0) if bias is not None else 0, *y.stride(),
                    SH, SW, PH, PW, DH, DW, ish, isw, float(negative_slope),
                    (SH * SW * tiles_m) * Cout, Cout, tiles_m, tiles_n,
                    KH=KH, KW=KW, HAS_BIAS=bias is not None, ACT=activation, STATS=stats,
                    ACC_DTYPE=_acc(x.dtype), PRECISION=_precision(x.dtype, x.device),
                    IDX=_index_dtype(xs, y), VEC_X=vx, **cfg.meta())
    return (y, st) if stats else y


def _split_count(device: torch.device, programs: int, k: int, block_k: int) -> int:
    """How many chunks the grad_weight reduction over k pixels is split into: enough programs
    for two waves of the device, at least 4 reduction steps per chunk, at most 64 chunks."""
    target = 2 * _num_sms(device)
    split = triton.cdiv(target, max(programs, 1))
    return max(1, min(split, k // (4 * block_k), 64))


def conv_transpose2d_bwd(grad_out, x, weight, y, stride, padding, dilation, groups,
                         activation: int, negative_slope: float, need_input: bool,
                         need_weight: bool, has_bias: bool):
    """(grad_input, grad_weight, grad_bias) of y = act(conv_transpose2d(x, weight) + bias),
    with act' taken from the saved output y. Unrequested results are empty (0,) tensors."""
    N, Cin, Hin, Win = x.shape
    _, COG, KH, KW = weight.shape
    G = groups
    CIG = Cin // G
    Cout = COG * G
    Hout, Wout = grad_out.shape[2], grad_out.shape[3]
    SH, SW = stride
    PH, PW = padding
    DH, DW = dilation
    acc_t = _acc_torch(x.dtype)
    prec = _precision(x.dtype, x.device)
    from genfast.ops.conv_transpose import grad_formats

    dx_fmt, dw_fmt = grad_formats(x, weight)  # the gradients' layouts, as the fake promises
    dx = x.new_empty((0,))  # unrequested results: distinct empty tensors (no aliasing outputs)
    dw, db = x.new_empty((0,)), x.new_empty((0,))
    with _on_device(x):
        # dz = dy * act'(y), channel stride 1, each group's channels padded with zeros to a
        # multiple of 16 bytes, and the grad_bias partial sums: one pass
        align = max(1, 16 // x.element_size())
        dz_inner = grad_out.shape[1] == 1 or grad_out.stride(1) == 1
        write_dz = (need_input or need_weight) and (activation != 0 or not dz_inner or COG % align != 0)
        cout_gp = triton.cdiv(COG, align) * align if write_dz else COG
        NP = N * Hout * Wout
        bp_, bc_ = _PROLOGUE_TILE
        split_b = 0
        bp = None
        dz = grad_out
        if write_dz or has_bias:
            c_tiles = triton.cdiv(G * cout_gp, bc_)
            split_b = min(triton.cdiv(NP, bp_), triton.cdiv(4 * _num_sms(x.device), max(c_tiles, 1)), 64)
            p_split = max(1, triton.cdiv(triton.cdiv(NP, max(split_b, 1)), bp_)) * bp_
            split_b = triton.cdiv(NP, p_split)
            if write_dz:
                dz = torch.empty((N, Hout, Wout, G * cout_gp), device=x.device,
                                 dtype=x.dtype).permute(0, 3, 1, 2)
            if has_bias:
                bp = torch.empty((split_b, Cout), device=x.device, dtype=acc_t)
            ysrc = y if activation != 0 else grad_out
            _launch(_dz_prologue_kernel, (c_tiles, split_b),
                    grad_out, ysrc, dz, bp if has_bias else grad_out, NP, Cout, Hout * Wout, Wout,
                    COG, cout_gp, G * cout_gp, p_split, *grad_out.stride(), *ysrc.stride(), float(negative_slope),
                    ACT=activation, WRITE_DZ=write_dz, HAS_BIAS=has_bias, ACC=_acc(x.dtype),
                    IDX=_index_dtype(grad_out, ysrc), BLOCK_P=bp_, BLOCK_C=bc_)
        if need_input or need_weight:
            dz, (zn, zh, zw) = _channels_inner(dz)
            vz = _vec(x.element_size(), cout_gp, zn, zh, zw)

        if need_input:
            dx = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=dx_fmt)
            if dx.numel() > 0:
                wp, cin_p = _repack(weight, G, 1, cout_gp=cout_gp)
                Mx = N * Hin * Win
                cfg = _gemm_config("dgrad", x.dtype, Mx, CIG, COG)
                tiles_m, tiles_n = triton.cdiv(Mx, cfg.BLOCK_M), triton.cdiv(CIG, cfg.BLOCK_N)
                _launch(_convt_dgrad_kernel, (tiles_m * tiles_n * G,),
                        dz, wp, dx, N, Hin, Win, Hout, Wout, CIG, cout_gp // vz,
                        zn // vz, zh // vz, zw // vz, cin_p, tiles_m, tiles_n, *dx.stride(),
                        SH, SW, PH, PW, DH, DW, KH=KH, KW=KW, ACC_DTYPE=_acc(x.dtype),
                        PRECISION=prec, IDX=_index_dtype(dz, dx), VEC_Z=vz, **cfg.meta())

        if need_weight or has_bias:
            nw = weight.numel() if need_weight else 0
            split = 1
            ws = bp
            if need_weight:
                dw = torch.empty(weight.shape, device=x.device, dtype=weight.dtype)
                xs, (xn, xh, xw) = _channels_inner(x)
                vx = _vec(x.element_size(), CIG, xn, xh, xw)
                k_w = N * Hin * Win
                cfg = _gemm_config("wgrad", x.dtype, CIG, COG, k_w)
                tiles_m, tiles_n = triton.cdiv(CIG, cfg.BLOCK_M), triton.cdiv(COG, cfg.BLOCK_N)
                programs = tiles_m * tiles_n * G * KH * KW
                split = _split_count(x.device, programs, k_w, cfg.BLOCK_K)
                k_split = max(1, triton.cdiv(triton.cdiv(k_w, split), cfg.BLOCK_K)) * cfg.BLOCK_K
                split = max(1, triton.cdiv(k_w, k_split))
                ws = torch.empty((split, nw), device=x.device, dtype=acc_t)
                _launch(_convt_wgrad_kernel, (programs, split),
                        xs, dz, ws, Hin, Win, Hout, Wout, CIG // vx, cout_gp // vz, COG,
                        xn // vx, xh // vx, xw // vx, zn // vz, zh // vz, zw // vz,
                        tiles_m, tiles_n, k_split, k_w, nw, SH, SW, PH, PW, DH, DW,
                        KH=KH, KW=KW, ACC_DTYPE=_acc(x.dtype), PRECISION=prec,
                        IDX=_index_dtype(xs, dz), VEC_X=vx, VEC_Z=vz, **cfg.meta())
            if has_bias:
                db = torch.empty((Cout,), device=x.device, dtype=weight.dtype)
            tiles_w = triton.cdiv(nw, _FINISH_BLOCK)
            tiles_b = triton.cdiv(Cout, _FINISH_BLOCK) if has_bias else 0
            _launch(_wgrad_finish_kernel, (tiles_w + tiles_b,),
                    ws if ws is not None else db, dw, bp if has_bias else db, db,
                    split, nw, split_b, Cout, tiles_w,
                    HAS_W=need_weight, HAS_B=has_bias, BLOCK=_FINISH_BLOCK)
    if need_weight and dw.dim() == 4:
        # (the finish kernel writes it contiguous)
        if dw_fmt != torch.contiguous_format:
            dw = dw.contiguous(memory_format=dw_fmt)
    return dx, dw, db
