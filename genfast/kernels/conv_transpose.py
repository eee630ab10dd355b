"""Triton kernels for the fused transposed convolution (conv_transpose2d + bias + activation)
and their launchers (tensors in, tensors out; no autograd).

Forward: implicit GEMM decomposed by output phase. The output rows oh = ph + stride_h * j
(ph in [0, stride_h)) receive exactly the kernel taps th with (ph + pad_h - th * dil_h) divisible
by stride_h, from input row ih = j + (ph + pad_h - th * dil_h) / stride_h; likewise for columns.
So each of the stride_h * stride_w phases is an ordinary (unstrided) convolution over its own
taps: no zero insertion and no multiply by a tap that does not reach the output (k4 s2 p1 gives
four 2x2 sub-convolutions; k5 s2 gives 3- and 2-tap phases). Per program: a BLOCK_M tile of
output pixels of one phase x a BLOCK_N tile of output channels of one group, reduced over
(valid taps) x (input channels of the group) with tl.dot and a float32 accumulator (float64 for
float64). Epilogue: bias, activation, store; optionally per-tile channel statistics (count-free
sum and sum of squared deviations from the tile mean) for a following BatchNorm.
Passes over memory: x and weight are read once per output-channel tile (the GEMM operand reuse
of any implicit GEMM), y is written once.

Backward (3 launches):
  _convt_dgrad_kernel: grad_input = conv2d(dz, weight, stride, padding, dilation, groups), an
      ordinary strided implicit GEMM; dz = dy * act'(y) is formed while loading (act' from the
      saved output), so dz is never written. Reads dy (and y) once per input-channel tile,
      writes dx once.
  _convt_wgrad_kernel: grad_weight per (tap, channel tile) as x^T @ dz over the batch and input
      pixels, split over SPLIT chunks of that reduction into a float32 workspace (no atomics);
      the extra programs of the last grid rows sum dz per output channel (grad_bias) per chunk.
  _split_sum_kernel: sums the SPLIT partials in a fixed order and writes grad_weight and
      grad_bias in their dtype. Results do not depend on scheduling: deterministic.

ConvTransposeBNAct2d (training) normalises the conv output with the statistics from the forward
epilogue: _bn_apply_kernel (1 read of y, 1 write), and backward _bn_bwd_reduce_kernel (split
partial sums, 1 read of dout and y) + _bn_bwd_dx_kernel (fixed-order sum of the partials, 1 more
read of dout and y, 1 write).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from genfast import backend as B
from genfast.kernels.activation import act_forward, act_grad_from_y, act_grad_from_z

# ---------------------------------------------------------------------------------------------
# shared device helpers


# ---------------------------------------------------------------------------------------------
# forward


@triton.jit
def _convt_fwd_kernel(
    x_ptr,  # input (N, C_in, H_in, W_in), any strides
    w_ptr,  # weight (C_in, C_out / groups, KH, KW), any strides
    b_ptr,  # bias (C_out,) or a dummy pointer when HAS_BIAS is False
    y_ptr,  # output (N, C_out, H_out, W_out), any strides
    st_ptr,  # statistics workspace (G, rows >= SH * SW * tiles_m, 3, C_out / groups), zeroed, or dummy
    N, CIN_G, HIN, WIN,  # batch, input channels per group, input height and width
    COUT_G, HOUT, WOUT,  # output channels per group, output height and width
    HPH, WPH,  # rows / columns per phase: cdiv(H_out, SH), cdiv(W_out, SW)
    sxn, sxc, sxh, sxw,  # input strides (elements)
    swi, swo, swh, sww,  # weight strides
    syn, syc, syh, syw,  # output strides
    SH, SW, PH, PW, DH, DW,  # stride, padding, dilation
    slope,  # leaky_relu negative slope
    ST_ROWS,  # statistics rows per group in st_ptr
    KH: tl.constexpr, KW: tl.constexpr,  # kernel size (constexpr: the tap loops unroll)
    HAS_BIAS: tl.constexpr,  # add bias in the epilogue
    ACT: tl.constexpr,  # activation code (genfast.backend.ACTIVATIONS)
    STATS: tl.constexpr,  # also write per-tile channel (sum, M2) of the output
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for float64 tensors
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" or "tf32"
    BLOCK_M: tl.constexpr,  # output pixels per tile (of one phase)
    BLOCK_N: tl.constexpr,  # output channels per tile
    BLOCK_K: tl.constexpr,  # input channels per reduction step
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(2)
    nphase = SH * SW
    g = pid_z // nphase
    phase = pid_z % nphase
    ph = phase // SW
    pw = phase % SW

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    per_img = HPH * WPH
    n_idx = offs_m // per_img
    rem = offs_m % per_img
    j = rem // WPH
    k = rem % WPH
    oh = ph + SH * j
    ow = pw + SW * k
    m_ok = (n_idx < N) & (oh < HOUT) & (ow < WOUT)

    offs_co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = offs_co < COUT_G
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    x_img = x_ptr + n_idx.to(tl.int64) * sxn + (g * CIN_G) * sxc
    w_grp = w_ptr + (g * CIN_G) * swi + offs_co[None, :] * swo
    for th in tl.static_range(KH):
        # (ph + PH - th * DH) shifted by a multiple of SH to stay non-negative
        rh = ph + PH + SH * KH * DH - th * DH
        if rh % SH == 0:
            ih = j + rh // SH - KH * DH
            h_ok = m_ok & (ih >= 0) & (ih < HIN)
            for tw in tl.static_range(KW):
                rw = pw + PW + SW * KW * DW - tw * DW
                if rw % SW == 0:
                    iw = k + rw // SW - KW * DW
                    a_ok = h_ok & (iw >= 0) & (iw < WIN)
                    a_row = x_img + ih * sxh + iw * sxw
                    w_tap = w_grp + th * swh + tw * sww
                    for c0 in range(0, CIN_G, BLOCK_K):
                        ck = c0 + offs_k
                        ck_ok = ck < CIN_G
                        a = tl.load(a_row[:, None] + ck[None, :] * sxc,
                                    mask=a_ok[:, None] & ck_ok[None, :], other=0.0)
                        b = tl.load(w_tap + ck[:, None] * swi,
                                    mask=ck_ok[:, None] & co_ok[None, :], other=0.0)
                        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)

    if HAS_BIAS:
        bias = tl.load(b_ptr + g * COUT_G + offs_co, mask=co_ok, other=0.0).to(ACC_DTYPE)
        acc = acc + bias[None, :]
    out = act_forward(acc, ACT, slope)
    y_ptrs = (y_ptr + (n_idx.to(tl.int64) * syn + oh * syh + ow * syw)[:, None]
              + ((g * COUT_G + offs_co) * syc)[None, :])
    mask = m_ok[:, None] & co_ok[None, :]
    out_lp = out.to(y_ptr.dtype.element_ty)
    tl.store(y_ptrs, out_lp, mask=mask)

    if STATS:
        # Statistics of the stored (rounded) output, as a following BatchNorm would see it:
        # per channel, the tile sum and the sum of squared deviations from the tile mean.
        v = tl.where(mask, out_lp.to(ACC_DTYPE), 0.0)
        cnt = tl.sum(m_ok.to(ACC_DTYPE), axis=0)
        s = tl.sum(v, axis=0)
        mean = s / tl.maximum(cnt, 1.0)
        d = tl.where(mask, v - mean[None, :], 0.0)
        m2 = tl.sum(d * d, axis=0)
        row = (g * ST_ROWS + phase * tl.num_programs(0) + pid_m).to(tl.int64)
        st = st_ptr + row * 3 * COUT_G + offs_co
        tl.store(st, tl.zeros((BLOCK_N,), ACC_DTYPE) + cnt, mask=co_ok)
        tl.store(st + COUT_G, s, mask=co_ok)
        tl.store(st + 2 * COUT_G, m2, mask=co_ok)


# ---------------------------------------------------------------------------------------------
# backward: grad_input


@triton.jit
def _convt_dgrad_kernel(
    dy_ptr,  # grad of the output (N, C_out, H_out, W_out), any strides
    y_ptr,  # saved output (same shape; read only when ACT != 0)
    w_ptr,  # weight (C_in, C_out / groups, KH, KW), any strides
    dx_ptr,  # grad of the input (N, C_in, H_in, W_in), any strides
    N, CIN_G, HIN, WIN,  # batch, input channels per group, input height and width
    COUT_G, HOUT, WOUT,  # output channels per group, output height and width
    sdn, sdc, sdh, sdw,  # dy strides
    syn, syc, syh, syw,  # y strides
    swi, swo, swh, sww,  # weight strides
    sxn, sxc, sxh, sxw,  # dx strides
    SH, SW, PH, PW, DH, DW,  # stride, padding, dilation of the transposed convolution
    slope,  # leaky_relu negative slope
    KH: tl.constexpr, KW: tl.constexpr,  # kernel size
    ACT: tl.constexpr,  # activation code; dz = dy * act'(y)
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for float64 tensors
    PRECISION: tl.constexpr,  # tl.dot input precision
    BLOCK_M: tl.constexpr,  # input pixels per tile
    BLOCK_N: tl.constexpr,  # input channels per tile
    BLOCK_K: tl.constexpr,  # output channels per reduction step
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    per_img = HIN * WIN
    n_idx = offs_m // per_img
    rem = offs_m % per_img
    ih = rem // WIN
    iw = rem % WIN
    m_ok = n_idx < N
    offs_ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_ok = offs_ci < CIN_G
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    dy_img = dy_ptr + n_idx.to(tl.int64) * sdn + (g * COUT_G) * sdc
    y_img = y_ptr + n_idx.to(tl.int64) * syn + (g * COUT_G) * syc
    w_grp = w_ptr + ((g * CIN_G + offs_ci) * swi)[None, :]
    for th in tl.static_range(KH):
        oh = ih * SH - PH + th * DH
        h_ok = m_ok & (oh >= 0) & (oh < HOUT)
        for tw in tl.static_range(KW):
            ow = iw * SW - PW + tw * DW
            a_ok = h_ok & (ow >= 0) & (ow < WOUT)
            dy_row = dy_img + oh * sdh + ow * sdw
            y_row = y_img + oh * syh + ow * syw
            w_tap = w_grp + th * swh + tw * sww
            for c0 in range(0, COUT_G, BLOCK_K):
                ck = c0 + offs_k
                ck_ok = ck < COUT_G
                amask = a_ok[:, None] & ck_ok[None, :]
                dz = tl.load(dy_row[:, None] + ck[None, :] * sdc, mask=amask, other=0.0)
                if ACT != 0:
                    yv = tl.load(y_row[:, None] + ck[None, :] * syc, mask=amask, other=0.0)
                    dz = (dz.to(ACC_DTYPE) * act_grad_from_y(yv.to(ACC_DTYPE), ACT, slope)).to(w_ptr.dtype.element_ty)
                b = tl.load(w_tap + ck[:, None] * swo, mask=ck_ok[:, None] & ci_ok[None, :], other=0.0)
                acc = tl.dot(dz, b, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)

    dx_ptrs = (dx_ptr + (n_idx.to(tl.int64) * sxn + ih * sxh + iw * sxw)[:, None]
               + ((g * CIN_G + offs_ci) * sxc)[None, :])
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & ci_ok[None, :])


# ---------------------------------------------------------------------------------------------
# backward: grad_weight (+ grad_bias) partials, then a fixed-order sum


@triton.jit
def _convt_wgrad_kernel(
    x_ptr,  # saved input (N, C_in, H_in, W_in), any strides
    dy_ptr,  # grad of the output (N, C_out, H_out, W_out), any strides
    y_ptr,  # saved output (read only when ACT != 0)
    ws_ptr,  # workspace (SPLIT, C_in * C_out/groups * KH * KW + C_out) in ACC_DTYPE
    N, CIN_G, HIN, WIN,  # batch, input channels per group, input height and width
    COUT_G, HOUT, WOUT,  # output channels per group, output height and width
    G,  # groups
    sxn, sxc, sxh, sxw,  # x strides
    sdn, sdc, sdh, sdw,  # dy strides
    syn, syc, syh, syw,  # y strides
    SH, SW, PH, PW, DH, DW,  # stride, padding, dilation
    slope,  # leaky_relu negative slope
    K_SPLIT,  # grad_weight reduction elements (pixels of x) per split
    KB_SPLIT,  # grad_bias reduction elements (pixels of dy) per split
    WS_ROW,  # workspace row length: C_in * C_out/groups * KH * KW + C_out
    KH: tl.constexpr, KW: tl.constexpr,  # kernel size
    ACT: tl.constexpr,  # activation code
    HAS_BIAS: tl.constexpr,  # the last G grid rows compute grad_bias partials
    ACC_DTYPE: tl.constexpr,  # tl.float32 or tl.float64
    PRECISION: tl.constexpr,  # tl.dot input precision
    BLOCK_M: tl.constexpr,  # input channels per tile
    BLOCK_N: tl.constexpr,  # output channels per tile
    BLOCK_K: tl.constexpr,  # reduction step (pixels of the batch)
):
    pid_mn = tl.program_id(0)
    pid_z = tl.program_id(1)  # g * KH * KW + tap, or (with HAS_BIAS) G * KH * KW + g
    pid_s = tl.program_id(2)  # split index
    tiles_n = tl.cdiv(COUT_G, BLOCK_N)
    pid_m = pid_mn // tiles_n
    pid_n = pid_mn % tiles_n
    offs_co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = offs_co < COUT_G
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = pid_s * K_SPLIT
    ws_row = ws_ptr + pid_s.to(tl.int64) * WS_ROW
    KHW: tl.constexpr = KH * KW

    if pid_z < G * KHW:
        g = pid_z // KHW
        tap = pid_z % KHW
        th = tap // KW
        tw = tap % KW
        offs_ci = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        ci_ok = offs_ci < CIN_G
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        x_ch = x_ptr + ((g * CIN_G + offs_ci) * sxc)[:, None]
        total = N * HIN * WIN
        k_hi = tl.minimum(k_lo + K_SPLIT, total)
        for p0 in range(k_lo, k_hi, BLOCK_K):
            p = p0 + offs_k
            p_ok = p < k_hi
            n_idx = p // (HIN * WIN)
            rem = p % (HIN * WIN)
            ih = rem // WIN
            iw = rem % WIN
            oh = ih * SH - PH + th * DH
            ow = iw * SW - PW + tw * DW
            o_ok = p_ok & (oh >= 0) & (oh < HOUT) & (ow >= 0) & (ow < WOUT)
            a = tl.load(x_ch + (n_idx.to(tl.int64) * sxn + ih * sxh + iw * sxw)[None, :],
                        mask=ci_ok[:, None] & p_ok[None, :], other=0.0)
            bmask = o_ok[:, None] & co_ok[None, :]
            ch = (g * COUT_G + offs_co)[None, :]
            dz = tl.load(dy_ptr + (n_idx.to(tl.int64) * sdn + oh * sdh + ow * sdw)[:, None] + ch * sdc,
                         mask=bmask, other=0.0)
            if ACT != 0:
                yv = tl.load(y_ptr + (n_idx.to(tl.int64) * syn + oh * syh + ow * syw)[:, None] + ch * syc,
                             mask=bmask, other=0.0)
                dz = (dz.to(ACC_DTYPE) * act_grad_from_y(yv.to(ACC_DTYPE), ACT, slope)).to(x_ptr.dtype.element_ty)
            acc = tl.dot(a, dz, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        # workspace layout of one split: grad_weight (C_in, C_out/G, KH, KW) contiguous, then grad_bias
        w_off = (((g * CIN_G + offs_ci) * COUT_G)[:, None] + offs_co[None, :]) * KHW + tap
        tl.store(ws_row + w_off, acc, mask=ci_ok[:, None] & co_ok[None, :])
    elif HAS_BIAS:
        if pid_m == 0:
            g = pid_z - G * KHW
            total = N * HOUT * WOUT
            kb_lo = pid_s * KB_SPLIT
            k_hi = tl.minimum(kb_lo + KB_SPLIT, total)
            accb = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
            ch = (g * COUT_G + offs_co)[None, :]
            for p0 in range(kb_lo, k_hi, BLOCK_K):
                p = p0 + offs_k
                p_ok = p < k_hi
                n_idx = p // (HOUT * WOUT)
                rem = p % (HOUT * WOUT)
                oh = rem // WOUT
                ow = rem % WOUT
                bmask = p_ok[:, None] & co_ok[None, :]
                dz = tl.load(dy_ptr + (n_idx.to(tl.int64) * sdn + oh * sdh + ow * sdw)[:, None] + ch * sdc,
                             mask=bmask, other=0.0).to(ACC_DTYPE)
                if ACT != 0:
                    yv = tl.load(y_ptr + (n_idx.to(tl.int64) * syn + oh * syh + ow * syw)[:, None] + ch * syc,
                                 mask=bmask, other=0.0)
                    dz = dz * act_grad_from_y(yv.to(ACC_DTYPE), ACT, slope)
                accb += tl.sum(dz, axis=0)
            tl.store(ws_row + (WS_ROW - G * COUT_G) + g * COUT_G + offs_co, accb, mask=co_ok)


@triton.jit
def _split_sum_kernel(
    ws_ptr,  # workspace (SPLIT, WS_ROW)
    dw_ptr,  # grad_weight, contiguous (C_in, C_out/G, KH, KW)
    db_ptr,  # grad_bias (C_out,) or dummy
    SPLIT,  # number of partial rows
    WS_ROW,  # row length
    NW,  # grad_weight elements (the rest of a row is grad_bias)
    HAS_BIAS: tl.constexpr,  # write grad_bias
    BLOCK: tl.constexpr,  # elements per program
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < WS_ROW
    acc = tl.load(ws_ptr + offs, mask=ok, other=0.0)
    for s in range(1, SPLIT):
        acc += tl.load(ws_ptr + s * WS_ROW + offs, mask=ok, other=0.0)
    tl.store(dw_ptr + offs, acc.to(dw_ptr.dtype.element_ty), mask=offs < NW)
    if HAS_BIAS:
        tl.store(db_ptr + (offs - NW), acc.to(db_ptr.dtype.element_ty), mask=ok & (offs >= NW))


@triton.jit
def _stats_merge_kernel(
    st_ptr,  # per-tile (count, sum, M2) rows: (G, ROWS, 3, COUT_G), rows with count 0 ignored
    mean_ptr,  # out: per-channel mean (G * COUT_G,), ACC dtype
    var_ptr,  # out: per-channel biased variance (G * COUT_G,)
    ROWS,  # rows per group
    COUT_G,  # channels per group
    BLOCK: tl.constexpr,  # channels per program
):
    # Chan's parallel merge of per-tile (count, mean, M2), rows in a fixed order: deterministic.
    g = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < COUT_G
    base = st_ptr + g.to(tl.int64) * ROWS * 3 * COUT_G + offs
    n_a = tl.load(base, mask=ok, other=0.0) * 0.0
    mean_a = n_a
    m2_a = n_a
    for r in range(0, ROWS):
        row = base + r * 3 * COUT_G
        n_b = tl.load(row, mask=ok, other=0.0)
        s_b = tl.load(row + COUT_G, mask=ok, other=0.0)
        m2_b = tl.load(row + 2 * COUT_G, mask=ok, other=0.0)
        n_ab = n_a + n_b
        safe = tl.maximum(n_ab, 1.0)
        mean_b = s_b / tl.maximum(n_b, 1.0)
        delta = mean_b - mean_a
        mean_a = tl.where(n_ab > 0, mean_a + delta * (n_b / safe), mean_a)
        m2_a = tl.where(n_ab > 0, m2_a + m2_b + delta * delta * (n_a * n_b / safe), m2_a)
        n_a = n_ab
    tl.store(mean_ptr + g * COUT_G + offs, mean_a, mask=ok)
    tl.store(var_ptr + g * COUT_G + offs, m2_a / tl.maximum(n_a, 1.0), mask=ok)


# ---------------------------------------------------------------------------------------------
# launchers


def _fixed(bm, bn, bk):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)


# Under TRITON_INTERPRET=1 (CPU tests) one small fixed tile; on GPU the tiles are autotuned.
_INTERPRET = B.triton_interpret()
_INTERP_TILE = _fixed(16, 16, 16)


def _configs(shapes):
    return [triton.Config(_fixed(m, n, k), num_warps=w, num_stages=s) for (m, n, k, w, s) in shapes]


_GEMM_CONFIGS = [
    (128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4),
    (128, 32, 32, 4, 4), (64, 32, 64, 4, 3), (128, 128, 64, 8, 3), (256, 64, 32, 8, 3),
    (128, 16, 32, 4, 4),
]

if _INTERPRET:
    _fwd_launch = _convt_fwd_kernel
    _dgrad_launch = _convt_dgrad_kernel
    _wgrad_launch = _convt_wgrad_kernel
else:
    _fwd_launch = triton.autotune(
        _configs(_GEMM_CONFIGS), key=["N", "CIN_G", "COUT_G", "HOUT", "WOUT", "SH", "SW", "ST_ROWS"],
        reset_to_zero=["st_ptr"])(_convt_fwd_kernel)
    _dgrad_launch = triton.autotune(
        _configs(_GEMM_CONFIGS), key=["N", "CIN_G", "COUT_G", "HIN", "WIN", "SH", "SW"])(_convt_dgrad_kernel)
    _wgrad_launch = triton.autotune(
        _configs([(64, 64, 32, 4, 4), (64, 64, 64, 4, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
                  (32, 32, 64, 4, 3), (32, 16, 128, 4, 3), (64, 16, 64, 4, 3), (128, 128, 32, 8, 3)]),
        key=["N", "CIN_G", "COUT_G", "HIN", "WIN", "SH", "SW", "G"])(_convt_wgrad_kernel)


def _tile_kwargs():
    return _INTERP_TILE if _INTERPRET else {}


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _precision(x: torch.Tensor) -> str:
    # TF32 for float32 exactly when torch's cuDNN convolutions would use it.
    if x.is_cuda and x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def out_memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is stored channels-last (and not also plainly contiguous)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _min_stats_tile() -> int:
    return _INTERP_TILE["BLOCK_M"] if _INTERPRET else min(c[0] for c in _GEMM_CONFIGS)


def conv_transpose2d_fwd(x, weight, bias, stride, padding, output_padding, groups, dilation,
                         activation: int, negative_slope: float, stats: bool = False):
    """y = act(conv_transpose2d(x, weight) + bias) for 4-D x (validated by the caller).
    With stats=True also returns the per-channel (mean, biased var) of y in float32 (float64
    for float64), from the forward epilogue plus one small merge launch."""
    N, Cin, Hin, Win = x.shape
    _, COG, KH, KW = weight.shape
    G = groups
    CIG = Cin // G
    SH, SW = stride
    PH, PW = padding
    DH, DW = dilation
    Hout = (Hin - 1) * SH - 2 * PH + DH * (KH - 1) + output_padding[0] + 1
    Wout = (Win - 1) * SW - 2 * PW + DW * (KW - 1) + output_padding[1] + 1
    y = torch.empty((N, COG * G, Hout, Wout), device=x.device, dtype=x.dtype,
                    memory_format=out_memory_format(x))
    acc_t = torch.float64 if x.dtype == torch.float64 else torch.float32
    HPH, WPH = triton.cdiv(Hout, SH), triton.cdiv(Wout, SW)
    M = N * HPH * WPH
    st_rows = SH * SW * triton.cdiv(M, _min_stats_tile())
    st = (torch.zeros((G, st_rows, 3, COG), device=x.device, dtype=acc_t) if stats
          else y)
    if y.numel() > 0:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(COG, meta["BLOCK_N"]), G * SH * SW)

        _fwd_launch[grid](
            x, weight, bias if bias is not None else y, y, st,
            N, CIG, Hin, Win, COG, Hout, Wout, HPH, WPH,
            *x.stride(), *weight.stride(), *y.stride(),
            SH, SW, PH, PW, DH, DW, float(negative_slope), st_rows,
            KH=KH, KW=KW, HAS_BIAS=bias is not None, ACT=activation, STATS=stats,
            ACC_DTYPE=_acc(x.dtype), PRECISION=_precision(x), **_tile_kwargs())
    if not stats:
        return y
    mean = torch.empty((COG * G,), device=x.device, dtype=acc_t)
    var = torch.empty((COG * G,), device=x.device, dtype=acc_t)
    blk = 64
    _stats_merge_kernel[(triton.cdiv(COG, blk), G)](st, mean, var, st_rows, COG, BLOCK=blk)
    return y, mean, var


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_count(x: torch.Tensor, programs: int, k: int) -> int:
    """How many chunks the grad_weight reduction over k pixels is split into."""
    if _INTERPRET:
        return min(2, max(1, k))
    target = 2 * _num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device())
    split = max(1, -(-target // max(programs, 1)))
    return max(1, min(split, k // 512, 64))


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
    acc_t = torch.float64 if x.dtype == torch.float64 else torch.float32
    ysrc = y if activation != 0 else grad_out
    common = dict(ACT=activation, ACC_DTYPE=_acc(x.dtype), PRECISION=_precision(x), **_tile_kwargs())

    dx = x.new_empty((0,))  # unrequested results: distinct empty tensors (no aliasing outputs)
    if need_input:
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=out_memory_format(x))
        if dx.numel() > 0:
            Mx = N * Hin * Win

            def grid_d(meta):
                return (triton.cdiv(Mx, meta["BLOCK_M"]), triton.cdiv(CIG, meta["BLOCK_N"]), G)

            _dgrad_launch[grid_d](
                grad_out, ysrc, weight, dx, N, CIG, Hin, Win, COG, Hout, Wout,
                *grad_out.stride(), *ysrc.stride(), *weight.stride(), *dx.stride(),
                SH, SW, PH, PW, DH, DW, float(negative_slope), KH=KH, KW=KW, **common)

    dw, db = x.new_empty((0,)), x.new_empty((0,))
    want_b = has_bias
    if need_weight or want_b:
        dw = torch.empty(weight.shape, device=x.device, dtype=weight.dtype)
        db = torch.empty((Cout,), device=x.device, dtype=weight.dtype) if want_b else db
        nw = dw.numel()
        ws_row = nw + (Cout if want_b else 0)
        k_w = N * Hin * Win
        k_b = N * Hout * Wout
        split = _split_count(x, triton.cdiv(CIG, 64) * triton.cdiv(COG, 64) * G * KH * KW, k_w)
        ws = torch.empty((split, ws_row), device=x.device, dtype=acc_t)
        zrows = G * KH * KW + (G if want_b else 0)

        def grid_w(meta):
            return (triton.cdiv(CIG, meta["BLOCK_M"]) * triton.cdiv(COG, meta["BLOCK_N"]), zrows, split)

        _wgrad_launch[grid_w](
            x, grad_out, ysrc, ws, N, CIG, Hin, Win, COG, Hout, Wout, G,
            *x.stride(), *grad_out.stride(), *ysrc.stride(),
            SH, SW, PH, PW, DH, DW, float(negative_slope),
            triton.cdiv(k_w, split), triton.cdiv(k_b, split), ws_row,
            KH=KH, KW=KW, HAS_BIAS=want_b, **common)
        blk = 256
        _split_sum_kernel[(triton.cdiv(ws_row, blk),)](ws, dw, db if want_b else dw, split, ws_row, nw,
                                                       HAS_BIAS=want_b, BLOCK=blk)
        if not need_weight:
            dw = x.new_empty((0,))
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# BatchNorm + activation from the statistics of the conv epilogue (ConvTransposeBNAct2d, training)
# y is a dense (N, C, H, W) tensor, contiguous or channels_last: its pixels have one stride (HW
# flattened). Passes: forward 1 read of y + 1 write; backward 1 read of dout and y (partial
# reductions) + 1 more read of both and 1 write of dy.


@triton.jit
def _bn_load_z(y_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, offs_p, offs_c, C, HW, syn, syc, shw,
               mask, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr):
    # Element offsets, xhat and z = gamma * xhat + beta of a (pixels x channels) tile of y;
    # offs_p indexes the N * HW pixels, mask = valid pixel & valid channel.
    c_ok = offs_c < C
    n = offs_p // HW
    hw = offs_p % HW
    ptr = (n.to(tl.int64) * syn + hw * shw)[:, None] + (offs_c * syc)[None, :]
    yv = tl.load(y_ptr + ptr, mask=mask, other=0.0).to(ACC)
    mean = tl.load(mean_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)
    invstd = tl.load(invstd_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)
    xhat = (yv - mean[None, :]) * invstd[None, :]
    gamma = tl.full(offs_c.shape, 1.0, ACC)
    if HAS_W:
        gamma = tl.load(w_ptr + offs_c, mask=c_ok, other=1.0).to(ACC)
    z = xhat * gamma[None, :]
    if HAS_B:
        z = z + tl.load(b_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)[None, :]
    return ptr, xhat, z, gamma


@triton.jit
def _bn_apply_kernel(
    y_ptr,  # conv output (N, C, H, W), contiguous or channels_last
    out_ptr,  # result, same strides as y
    mean_ptr, invstd_ptr,  # per-channel batch statistics (ACC dtype)
    w_ptr, b_ptr,  # BatchNorm weight / bias (C,) or dummies
    NP, C, HW,  # N * H * W, channels, H * W
    syn, syc, shw,  # y strides: batch, channel, pixel (H and W flattened)
    slope,  # leaky_relu negative slope
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,  # affine parameters present
    ACT: tl.constexpr,  # activation code
    ACC: tl.constexpr,  # tl.float32 or tl.float64
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,  # tile: pixels x channels
):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_p < NP)[:, None] & (offs_c < C)[None, :]
    ptr, xhat, z, gamma = _bn_load_z(y_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, offs_p, offs_c, C,
                                     HW, syn, syc, shw, mask, HAS_W, HAS_B, ACC)
    tl.store(out_ptr + ptr, act_forward(z, ACT, slope).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_bwd_reduce_kernel(
    g_ptr,  # grad of the block output, strides as y
    y_ptr,  # conv output
    ws_ptr,  # out: partials (SPLIT, 2, C): sum of dz, sum of dz * xhat over this split's pixels
    mean_ptr, invstd_ptr, w_ptr, b_ptr,  # statistics and affine parameters (or dummies)
    NP, C, HW, P_SPLIT,  # pixels, channels, H * W, pixels per split
    syn, syc, shw,  # strides of y and of the gradient (the same layout)
    slope,  # leaky_relu negative slope
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,  # tile: pixels x channels
):
    pid_s = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    s_dz = tl.zeros((BLOCK_C,), ACC)
    s_dzx = tl.zeros((BLOCK_C,), ACC)
    lo = pid_s * P_SPLIT
    hi = tl.minimum(lo + P_SPLIT, NP)
    for p0 in range(lo, hi, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask = (offs_p < hi)[:, None] & c_ok[None, :]
        ptr, xhat, z, gamma = _bn_load_z(y_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, offs_p, offs_c,
                                         C, HW, syn, syc, shw, mask, HAS_W, HAS_B, ACC)
        dz = tl.load(g_ptr + ptr, mask=mask, other=0.0).to(ACC) * act_grad_from_z(z, ACT, slope)
        dz = tl.where(mask, dz, 0.0)
        s_dz += tl.sum(dz, axis=0)
        s_dzx += tl.sum(dz * xhat, axis=0)
    row = ws_ptr + pid_s.to(tl.int64) * 2 * C + offs_c
    tl.store(row, s_dz, mask=c_ok)
    tl.store(row + C, s_dzx, mask=c_ok)


@triton.jit
def _bn_bwd_dx_kernel(
    g_ptr, y_ptr,  # grad of the block output and the conv output (same strides)
    dy_ptr,  # out: grad of the conv output, same strides
    ws_ptr,  # partials (SPLIT, 2, C) from _bn_bwd_reduce_kernel
    dw_ptr, db_ptr,  # out: BatchNorm weight / bias gradients (C,) or dummies
    mean_ptr, invstd_ptr, w_ptr, b_ptr,  # statistics and affine parameters (or dummies)
    NP, C, HW, SPLIT,  # pixels, channels, H * W, number of partial rows
    syn, syc, shw,  # strides
    slope,  # leaky_relu negative slope
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,  # tile: pixels x channels
):
    pid_p = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    s_dz = tl.zeros((BLOCK_C,), ACC)
    s_dzx = tl.zeros((BLOCK_C,), ACC)
    for s in range(0, SPLIT):  # fixed order: deterministic
        row = ws_ptr + s * 2 * C + offs_c
        s_dz += tl.load(row, mask=c_ok, other=0.0)
        s_dzx += tl.load(row + C, mask=c_ok, other=0.0)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = (offs_p < NP)[:, None] & c_ok[None, :]
    ptr, xhat, z, gamma = _bn_load_z(y_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, offs_p, offs_c, C,
                                     HW, syn, syc, shw, mask, HAS_W, HAS_B, ACC)
    dz = tl.load(g_ptr + ptr, mask=mask, other=0.0).to(ACC) * act_grad_from_z(z, ACT, slope)
    invstd = tl.load(invstd_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)
    k = gamma * invstd
    m = NP * 1.0
    dx = k[None, :] * (dz - (s_dz / m)[None, :] - xhat * (s_dzx / m)[None, :])
    tl.store(dy_ptr + ptr, dx.to(dy_ptr.dtype.element_ty), mask=mask)
    if pid_p == 0:
        if HAS_W:
            tl.store(dw_ptr + offs_c, s_dzx.to(dw_ptr.dtype.element_ty), mask=c_ok)
        if HAS_B:
            tl.store(db_ptr + offs_c, s_dz.to(db_ptr.dtype.element_ty), mask=c_ok)


def _pixel_view(y: torch.Tensor):
    """(batch stride, channel stride, pixel stride) of a dense NCHW or channels_last tensor."""
    N, C, H, W = y.shape
    if H > 1 and y.stride(2) != W * y.stride(3):
        raise ValueError("bn_act_given_stats: y must be contiguous or channels_last")
    return y.stride(0), y.stride(1), y.stride(3)


_BN_TILE = (32, 16) if _INTERPRET else (128, 32)


def bn_act_given_stats_fwd(y, mean, invstd, weight, bias, activation: int, negative_slope: float):
    """act(weight * (y - mean) * invstd + bias) in one pass (y read once, written once)."""
    N, C, H, W = y.shape
    out = torch.empty_like(y)
    if y.numel() == 0:
        return out
    syn, syc, shw = _pixel_view(y)
    bp, bc = _BN_TILE
    _bn_apply_kernel[(triton.cdiv(N * H * W, bp), triton.cdiv(C, bc))](
        y, out, mean, invstd, weight if weight is not None else mean, bias if bias is not None else mean,
        N * H * W, C, H * W, syn, syc, shw, float(negative_slope),
        HAS_W=weight is not None, HAS_B=bias is not None, ACT=activation, ACC=_acc(y.dtype),
        BLOCK_P=bp, BLOCK_C=bc)
    return out


def bn_act_given_stats_bwd(grad_out, y, mean, invstd, weight, bias, activation: int,
                           negative_slope: float):
    """(grad_y, grad_weight, grad_bias) of the training-mode BatchNorm + activation above (the
    statistics are functions of y). grad_out must have y's strides."""
    N, C, H, W = y.shape
    NP = N * H * W
    syn, syc, shw = _pixel_view(y)
    if grad_out.stride() != y.stride():
        grad_out = grad_out.contiguous(memory_format=torch.channels_last if syc == 1 and C > 1
                                       else torch.contiguous_format)
        if grad_out.stride() != y.stride():
            raise ValueError("bn_act_given_stats: grad_out and y must share a layout")
    bp, bc = _BN_TILE
    acc_t = torch.float64 if y.dtype == torch.float64 else torch.float32
    split = max(1, min(triton.cdiv(NP, bp), 2 if _INTERPRET else 256))
    p_split = triton.cdiv(triton.cdiv(NP, split), bp) * bp
    split = triton.cdiv(NP, p_split)
    ws = torch.empty((split, 2, C), device=y.device, dtype=acc_t)
    common = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACT=activation, ACC=_acc(y.dtype),
                  BLOCK_P=bp, BLOCK_C=bc)
    wd = weight if weight is not None else mean
    bd = bias if bias is not None else mean
    _bn_bwd_reduce_kernel[(split, triton.cdiv(C, bc))](
        grad_out, y, ws, mean, invstd, wd, bd, NP, C, H * W, p_split, syn, syc, shw,
        float(negative_slope), **common)
    dy = torch.empty_like(y)
    dw = torch.empty((C,), device=y.device, dtype=weight.dtype) if weight is not None else None
    db = torch.empty((C,), device=y.device, dtype=bias.dtype) if bias is not None else None
    _bn_bwd_dx_kernel[(triton.cdiv(NP, bp), triton.cdiv(C, bc))](
        grad_out, y, dy, ws, dw if dw is not None else ws, db if db is not None else ws,
        mean, invstd, wd, bd, NP, C, H * W, split, syn, syc, shw, float(negative_slope), **common)
    return dy, dw, db
