"""Triton kernels for the GAN / VAE / BCE losses and reparameterisation, with their launchers
(tensors in, tensors out, no autograd). Same signatures and outputs as the C++ ops
genfast::gan_loss_fwd, loss_scale_grad, vae_loss_fwd, bce_loss_fwd, reparam_fwd, reparam_bwd
(csrc/ops.cpp); the per-element math mirrors csrc/common/losses.h.

Each loss forward makes one pass over its inputs (term and derivative from one evaluation, the
derivative written for the backward). Up to SINGLE_MAX elements run in ONE program and ONE
launch that also writes the loss; above that, each program writes a partial sum and a second
tiny launch adds the partials in program order (deterministic). The backward (loss_scale_grad)
is one launch, one pass. Scalars that must keep float64 precision (real_label, beta) are passed
as two float32 halves (hi + lo), since Triton passes Python floats as float32.
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from genfast.kernels.batchnorm_act import _on_device

BLOCK = 1024
SINGLE_MAX = 16384
ELEM_BLOCK = 1024


def _split(v: float) -> tuple[float, float]:
    """v = hi + lo with hi, lo float32 (about 48 bits of v survive Triton's float32 scalars)."""
    hi = struct.unpack("f", struct.pack("f", v))[0]
    return hi, v - hi


# torch's message for probabilities outside [0, 1] (or NaN) in binary_cross_entropy.
RANGE_MSG = "all elements of input should be between 0 and 1"
VAE_RANGE_MSG = (RANGE_MSG + " (vae_loss: recon holds probabilities for recon_loss='bce'; use 'bce_logits' "
                 "for logits)")


TARGET_RANGE_MSG = "all elements of target should be between 0 and 1"


def _check_range(bad: torch.Tensor, msg: str) -> None:
    """Raise torch's error when a kernel flagged a probability (1) or a target (2, reported when
    both are; torch names the first bad element it meets) outside [0, 1] or NaN: at once for
    CPU tensors (the interpreter), as a device-side assertion on the GPU (like torch's CUDA BCE
    kernel: no host synchronisation)."""
    if bad.device.type == "cuda":
        torch._assert_async(bad != 2, TARGET_RANGE_MSG)
        torch._assert_async(bad != 1, msg)
    else:
        flag = int(bad.item())
        if flag:
            raise RuntimeError(TARGET_RANGE_MSG if flag == 2 else msg)


def _check_target(input: torch.Tensor, target: torch.Tensor, name: str) -> None:
    """The C++ ops' rule: the target has the input's dtype or the accumulation dtype."""
    if target.dtype not in (input.dtype, _acc(input.dtype)):
        raise RuntimeError(f"{name}: target must have the dtype of the input ({input.dtype}) or "
                           f"{_acc(input.dtype)}, got {target.dtype}")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


def _tl(dtype: torch.dtype):
    """The Triton accumulation dtype (a constexpr argument of every kernel)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _log1p_small(e):
    # log(1 + e) for e in [0, 1], accurate also for tiny e (no libdevice log1p needed).
    return tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))


@triton.jit
def _expm1(x):
    small = x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0))))
    return tl.where(tl.abs(x) < 1e-2, small, tl.exp(x) - 1.0)


@triton.jit
def _bce_logits(x, t, p):
    # (loss, d/dx) of (1 - t) softplus(x) + p t softplus(-x); zero coefficients drop their term.
    ax = tl.abs(x)
    e = tl.exp(-ax)
    l1p = _log1p_small(e)
    inv = 1.0 / (1.0 + e)
    sig = tl.where(x >= 0, inv, e * inv)
    sign = tl.where(x >= 0, e * inv, inv)
    a = 1.0 - t
    b = p * t
    grad = a * sig - b * sign
    sp_pos = tl.maximum(x, 0.0, tl.PropagateNan.ALL) + l1p
    sp_neg = tl.maximum(-x, 0.0, tl.PropagateNan.ALL) + l1p
    loss = tl.where(a == 0.0, 0.0, a * sp_pos) + tl.where(b == 0.0, 0.0, b * sp_neg)
    loss = tl.where(x != x, x, loss)
    return loss, grad


@triton.jit
def _bce_prob(p, t):
    # (loss, d/dp) of torch's BCE on probabilities: each log clamped at -100 (NaN stays NaN, as
    # with torch's std::max), gradient (p - t) / max(p (1 - p), 1e-12).
    lp = tl.maximum(tl.log(p), -100.0, tl.PropagateNan.ALL)
    l1mp = tl.maximum(tl.log(1.0 - p), -100.0, tl.PropagateNan.ALL)
    loss = (t - 1.0) * l1mp - t * lp
    grad = (p - t) / tl.maximum(p * (1.0 - p), 1e-12, tl.PropagateNan.ALL)
    return loss, grad


@triton.jit
def _gan_elem(x, is_real, label, KIND: tl.constexpr, FAKE_ROLE: tl.constexpr):
    # KIND: 0 bce, 1 minimax, 2 hinge, 3 wasserstein, 4 lsgan; FAKE_ROLE: 1 fake (D), 2 gen (G).
    if KIND == 2:
        if FAKE_ROLE == 1:
            z = tl.where(is_real, 1.0 - x, 1.0 + x)
            on = z > 0
            loss = tl.where(on, z, tl.where(x != x, x, 0.0))
            # torch's threshold_backward: 0 where z <= 0 only (a NaN z passes the gradient)
            grad = tl.where(z <= 0, 0.0, tl.where(is_real, -1.0, 1.0))
        else:
            zr = 1.0 - x
            loss = tl.where(is_real, tl.where(zr > 0, zr, tl.where(x != x, x, 0.0)), -x)
            grad = tl.where(is_real, tl.where(zr <= 0, 0.0, -1.0), -1.0)
    elif KIND == 3:
        if FAKE_ROLE == 1:
            loss = tl.where(is_real, -x, x)
            grad = tl.where(is_real, -1.0, 1.0)
        else:
            loss = -x
            grad = tl.where(is_real, -1.0, -1.0)
    elif KIND == 4:
        if FAKE_ROLE == 1:
            target = tl.where(is_real, label, 0.0)
        else:
            target = tl.where(is_real, label, 1.0)
        d = x - target
        loss = d * d
        grad = 2.0 * d
    else:
        if FAKE_ROLE == 1:
            t = tl.where(is_real, label, 0.0)
            loss, grad = _bce_logits(x, t, 1.0)
        elif KIND == 1:
            lr, gr = _bce_logits(x, label, 1.0)
            lf, gf = _bce_logits(x, 0.0, 1.0)
            loss = tl.where(is_real, lr, -lf)
            grad = tl.where(is_real, gr, -gf)
        else:
            t = tl.where(is_real, label, 1.0)
            loss, grad = _bce_logits(x, t, 1.0)
    return loss, grad


@triton.jit
def _gan_loss_kernel(real_ptr,       # [nr] logits, role real (any valid pointer when nr = 0)
                     fake_ptr,       # [nf] logits, role fake / generator
                     nr, nf,         # element counts
                     grad_ptr,       # [nr + nf] derivative times the reduction factor (acc dtype)
                     terms_r_ptr,    # [nr] per-element terms (NONE) or unused
                     terms_f_ptr,    # [nf] per-element terms (NONE) or unused
                     out_ptr,        # 0-dim loss (SINGLE, reduced)
                     partial_ptr,    # [programs] partial sums (not SINGLE)
                     label_hi, label_lo,  # real-side target = hi + lo
                     chunk,          # elements per program (a multiple of BLOCK)
                     KIND: tl.constexpr, FAKE_ROLE: tl.constexpr, MEAN: tl.constexpr,
                     NONE: tl.constexpr, SINGLE: tl.constexpr, NAN_ADD: tl.constexpr,
                     ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # 64-bit offsets: pid * chunk can pass 2^31
    n = nr + nf
    one = tl.full([], 1.0, ACC)
    label = label_hi * one + label_lo * one
    if MEAN:
        # (count * one): counts of 1 arrive as constexpr, which has no .to()
        wr = one / (nr * one)
        wf = one / (nf * one)
    else:
        wr = tl.full([], 1.0, ACC)
        wf = tl.full([], 1.0, ACC)
    acc = tl.zeros([BLOCK], ACC)
    start = pid * chunk
    for off in range(0, chunk, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        m = idx < n
        is_r = idx < nr
        xr = tl.load(real_ptr + idx, mask=m & is_r, other=0.0).to(ACC)
        xf = tl.load(fake_ptr + (idx - nr), mask=m & (idx >= nr), other=0.0).to(ACC)
        x = tl.where(is_r, xr, xf)
        loss, grad = _gan_elem(x, is_r, label, KIND, FAKE_ROLE)
        w = tl.where(is_r, wr, wf)
        tl.store(grad_ptr + idx, (grad * w).to(ACC), mask=m)
        if NONE:
            tl.store(terms_r_ptr + idx, loss.to(ACC), mask=m & is_r)
            tl.store(terms_f_ptr + (idx - nr), loss.to(ACC), mask=m & (idx >= nr))
        else:
            acc += tl.where(m, loss * w, 0.0)
    if not NONE:
        s = tl.sum(acc, axis=0)
        if SINGLE:
            if NAN_ADD:
                zero = s * 0.0
                s = s + zero / zero  # NaN: the mean of an empty side
            tl.store(out_ptr, s)
        else:
            tl.store(partial_ptr + pid, s)


@triton.jit
def _sum_partials_kernel(partial_ptr,   # [nparts * NV] partial sums, value k of program p at k * nparts + p
                         nparts,        # number of partials per value
                         out_ptr,       # 0-dim loss
                         parts_ptr,     # [2] recon, kl (NV = 2) or unused
                         ndiv,          # VAE: N for batchmean, else 1
                         beta_hi, beta_lo,  # VAE KL weight = hi + lo
                         NV: tl.constexpr, NAN_ADD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    s0 = tl.zeros([BLOCK], ACC)
    s1 = tl.zeros([BLOCK], ACC)
    for off in range(0, nparts, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        m = idx < nparts
        s0 += tl.load(partial_ptr + idx, mask=m, other=0.0)
        if NV == 2:
            s1 += tl.load(partial_ptr + nparts + idx, mask=m, other=0.0)
    t0 = tl.sum(s0, axis=0)
    if NV == 2:
        t1 = tl.sum(s1, axis=0)
        one = tl.full([], 1.0, ACC)
        sc = one / (ndiv * one)
        rec = t0 * sc
        kl = t1 * sc
        beta = beta_hi * one + beta_lo * one
        tl.store(out_ptr, rec + beta * kl)
        tl.store(parts_ptr, rec)
        tl.store(parts_ptr + 1, kl)
    else:
        if NAN_ADD:
            zero = t0 * 0.0
            t0 = t0 + zero / zero  # NaN: the mean of an empty side
        tl.store(out_ptr, t0)


def _grid(n: int) -> tuple[int, int, bool]:
    """(programs, elements per program, single)."""
    if n <= SINGLE_MAX:
        return 1, max(BLOCK, triton.cdiv(n, BLOCK) * BLOCK), True
    chunk = 4 * BLOCK
    return triton.cdiv(n, chunk), chunk, False


def gan_loss_fwd(real, fake, kind: int, generator: bool, reduction: int, real_label: float):
    has_r, has_f = real is not None, fake is not None
    any_ = real if has_r else fake
    if has_r and has_f and real.dtype != fake.dtype:
        raise RuntimeError("gan_loss: real_logits and fake_logits must have the same dtype")
    acc = _acc(any_.dtype)
    real_c = real.contiguous() if has_r else None
    fake_c = fake.contiguous() if has_f else None
    nr = real_c.numel() if has_r else 0
    nf = fake_c.numel() if has_f else 0
    n = nr + nf
    grad = torch.empty((n,), dtype=acc, device=any_.device)
    none = reduction == 0
    if none:
        out_r = torch.empty(real.shape if has_r else (0,), dtype=acc, device=any_.device)
        out_f = torch.empty(fake.shape if has_f else (0,), dtype=acc, device=any_.device)
    else:
        out_r = torch.empty((), dtype=acc, device=any_.device)
        out_f = torch.empty((0,), dtype=acc, device=any_.device)
    programs, chunk, single = _grid(n)
    partials = grad if single or none else torch.empty((programs,), dtype=acc, device=any_.device)
    nan_add = reduction == 1 and ((has_r and nr == 0) or (has_f and nf == 0))
    hi, lo = _split(float(real_label))
    rp = real_c if has_r else fake_c
    fp = fake_c if has_f else real_c
    with _on_device(any_):
        _gan_loss_kernel[(programs,)](
            rp, fp, nr, nf, grad, out_r if none else grad, out_f if none else grad, out_r, partials,
            hi, lo, chunk, KIND=kind, FAKE_ROLE=2 if generator else 1, MEAN=reduction == 1, NONE=none,
            SINGLE=single, NAN_ADD=nan_add, ACC=_tl(acc), BLOCK=BLOCK)
        if not none and not single:
            _sum_partials_kernel[(1,)](partials, programs, out_r, out_r, 1, 0.0, 0.0,
                                       NV=1, NAN_ADD=nan_add, ACC=_tl(acc), BLOCK=BLOCK)
    return out_r, out_f, grad


@triton.jit
def _scale_kernel(saved_ptr,      # [n] saved derivatives (acc dtype)
                  split, n,       # segment a = [0, split), segment b = [split, n)
                  ca_ptr, cb_ptr,  # coefficients: 0-dim (MODE 1) or elementwise (MODE 2) or unused (MODE 0)
                  ga_ptr, gb_ptr,  # [split], [n - split] gradients in their own dtypes
                  MODE_A: tl.constexpr, MODE_B: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # 64-bit offsets: pid * chunk can pass 2^31
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    m = idx < n
    ina = idx < split
    s = tl.load(saved_ptr + idx, mask=m, other=0.0)
    if MODE_A == 0:
        va = tl.zeros_like(s)
    elif MODE_A == 1:
        va = s * tl.load(ca_ptr).to(s.dtype)
    else:
        va = s * tl.load(ca_ptr + idx, mask=m & ina, other=0.0).to(s.dtype)
    if MODE_B == 0:
        vb = tl.zeros_like(s)
    elif MODE_B == 1:
        vb = s * tl.load(cb_ptr).to(s.dtype)
    else:
        vb = s * tl.load(cb_ptr + (idx - split), mask=m & (idx >= split), other=0.0).to(s.dtype)
    tl.store(ga_ptr + idx, va.to(ga_ptr.dtype.element_ty), mask=m & ina)
    tl.store(gb_ptr + (idx - split), vb.to(gb_ptr.dtype.element_ty), mask=m & (idx >= split))


def _mode(c, m: int):
    if c is None:
        return 0, None
    c = c.contiguous()
    if c.dim() != 0 and c.numel() != m:
        raise RuntimeError(f"loss_scale_grad: gradient has {c.numel()} elements, expected 1 or {m}")
    return (1 if c.dim() == 0 else 2), c


def loss_scale_grad(coef_a, coef_b, saved, split: int, dtype_a, dtype_b):
    saved = saved.contiguous()
    n = saved.numel()
    if not 0 <= split <= n:
        raise RuntimeError(f"loss_scale_grad: split {split} outside [0, {n}]")
    ma, ca = _mode(coef_a, split)
    mb, cb = _mode(coef_b, n - split)
    ga = torch.empty((split,), dtype=dtype_a, device=saved.device)
    gb = torch.empty((n - split,), dtype=dtype_b, device=saved.device)
    if n == 0:
        return ga, gb
    with _on_device(saved):
        _scale_kernel[(triton.cdiv(n, ELEM_BLOCK),)](
            saved, split, n, ca if ca is not None else saved, cb if cb is not None else saved,
            ga if split > 0 else saved, gb if n - split > 0 else saved,
            MODE_A=ma, MODE_B=mb, BLOCK=ELEM_BLOCK)
    return ga, gb


@triton.jit
def _vae_kernel(recon_ptr, target_ptr,  # [n] reconstruction and target
                mu_ptr, lv_ptr,         # [nz] latent mean and log-variance
                n, nz,
                grad_ptr,               # [n + 2 nz] recon | mu | logvar derivatives (acc dtype)
                out_ptr, parts_ptr,     # 0-dim loss, [2] recon and kl (SINGLE)
                partial_ptr,            # [2 * programs] partial sums (not SINGLE)
                ndiv,                   # N for batchmean, else 1 (the terms are divided by it)
                beta_hi, beta_lo,       # KL weight = hi + lo
                chunk, programs,        # elements per program, number of programs
                bad_ptr,                # int32 0-dim: 1 recon, 2 target outside [0, 1] or NaN (RECON 1)
                RECON: tl.constexpr,    # 0 mse, 1 bce (probabilities), 2 bce_logits
                SINGLE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # 64-bit offsets: pid * chunk can pass 2^31
    total = n + nz
    one = tl.full([], 1.0, ACC)
    sc = one / (ndiv * one)
    beta = beta_hi * one + beta_lo * one
    kb = beta * sc
    acc_r = tl.zeros([BLOCK], ACC)
    acc_k = tl.zeros([BLOCK], ACC)
    bad = tl.zeros([BLOCK], tl.int32)
    start = pid * chunk
    for off in range(0, chunk, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mr = idx < n
        mk = (idx >= n) & (idx < total)
        r = tl.load(recon_ptr + idx, mask=mr, other=0.5).to(ACC)
        t = tl.load(target_ptr + idx, mask=mr, other=0.5).to(ACC)
        if RECON == 0:
            d = r - t
            lr = d * d
            gr = 2.0 * d
        elif RECON == 1:
            lr, gr = _bce_prob(r, t)
            bad = tl.maximum(bad, tl.where(mr & ~((r >= 0.0) & (r <= 1.0)), 1, 0))
            bad = tl.maximum(bad, tl.where(mr & ~((t >= 0.0) & (t <= 1.0)), 2, 0))
        else:
            lr, gr = _bce_logits(r, t, 1.0)
        tl.store(grad_ptr + idx, (gr * sc).to(ACC), mask=mr)
        acc_r += tl.where(mr, lr, 0.0)
        j = idx - n
        mu = tl.load(mu_ptr + j, mask=mk, other=0.0).to(ACC)
        lv = tl.load(lv_ptr + j, mask=mk, other=0.0).to(ACC)
        em1 = _expm1(lv)
        acc_k += tl.where(mk, 0.5 * (mu * mu + em1 - lv), 0.0)
        tl.store(grad_ptr + n + j, (mu * kb).to(ACC), mask=mk)
        tl.store(grad_ptr + n + nz + j, (0.5 * em1 * kb).to(ACC), mask=mk)
    sr = tl.sum(acc_r, axis=0)
    sk = tl.sum(acc_k, axis=0)
    if SINGLE:
        rec = sr * sc
        kl = sk * sc
        tl.store(out_ptr, rec + beta * kl)
        tl.store(parts_ptr, rec)
        tl.store(parts_ptr + 1, kl)
    else:
        tl.store(partial_ptr + pid, sr)
        tl.store(partial_ptr + programs + pid, sk)
    if RECON == 1:
        tl.atomic_max(bad_ptr, tl.max(bad, axis=0))


def vae_loss_fwd(recon, target, mu, logvar, recon_kind: int, beta: float, reduction: int):
    if recon.shape != target.shape:
        raise RuntimeError("vae_loss: recon and target must have the same shape")
    _check_target(recon, target, "vae_loss")
    if mu.shape != logvar.shape or mu.dtype != logvar.dtype:
        raise RuntimeError("vae_loss: mu and logvar must have the same shape and dtype")
    acc = _acc(recon.dtype)
    recon_c, target_c = recon.contiguous(), target.contiguous()
    mu_c, lv_c = mu.contiguous(), logvar.contiguous()
    n, nz = recon_c.numel(), mu_c.numel()
    dev = recon.device
    grad = torch.empty((n + 2 * nz,), dtype=acc, device=dev)
    loss = torch.empty((), dtype=acc, device=dev)
    parts = torch.empty((2,), dtype=acc, device=dev)
    N = (recon.shape[0] if recon.dim() > 0 else 1) if reduction == 3 else 1
    programs, chunk, single = _grid(n + nz)
    partials = grad if single else torch.empty((2 * programs,), dtype=acc, device=dev)
    hi, lo = _split(float(beta))
    bad = torch.zeros((), dtype=torch.int32, device=dev) if recon_kind == 1 else grad
    with _on_device(recon):
        _vae_kernel[(programs,)](recon_c, target_c, mu_c, lv_c, n, nz, grad, loss, parts, partials,
                                 N, hi, lo, chunk, programs, bad, RECON=recon_kind, SINGLE=single, ACC=_tl(acc),
                                 BLOCK=BLOCK)
        if not single:
            _sum_partials_kernel[(1,)](partials, programs, loss, parts, N, hi, lo, NV=2,
                                       NAN_ADD=False, ACC=_tl(acc), BLOCK=BLOCK)
    if recon_kind == 1:
        _check_range(bad, VAE_RANGE_MSG)
    return loss, parts, grad


@triton.jit
def _bce_kernel(x_ptr, t_ptr,    # [n] input (logits or probabilities) and target
                w_ptr, p_ptr,    # [n] weight and pos_weight (acc dtype) or unused
                n,
                grad_ptr,        # [n] derivative times 1/n for mean (acc dtype)
                terms_ptr,       # [n] per-element terms (NONE)
                out_ptr,         # 0-dim loss (SINGLE, reduced)
                partial_ptr,     # [programs] partial sums
                chunk,           # elements per program
                bad_ptr,         # int32 0-dim: 1 input, 2 target outside [0, 1] or NaN (not LOGITS)
                LOGITS: tl.constexpr, HAS_W: tl.constexpr, HAS_P: tl.constexpr, MEAN: tl.constexpr,
                NONE: tl.constexpr, SINGLE: tl.constexpr, NAN_ADD: tl.constexpr, ACC: tl.constexpr,
                BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # 64-bit offsets: pid * chunk can pass 2^31
    one = tl.full([], 1.0, ACC)
    bad = tl.zeros([BLOCK], tl.int32)
    if MEAN:
        gs = one / (n * one)
    else:
        gs = tl.full([], 1.0, ACC)
    acc = tl.zeros([BLOCK], ACC)
    start = pid * chunk
    for off in range(0, chunk, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        m = idx < n
        x = tl.load(x_ptr + idx, mask=m, other=0.5).to(ACC)
        t = tl.load(t_ptr + idx, mask=m, other=0.5).to(ACC)
        if LOGITS:
            if HAS_P:
                p = tl.load(p_ptr + idx, mask=m, other=1.0).to(ACC)
            else:
                p = tl.full([BLOCK], 1.0, ACC)
            loss, grad = _bce_logits(x, t, p)
        else:
            loss, grad = _bce_prob(x, t)
            bad = tl.maximum(bad, tl.where(m & ~((x >= 0.0) & (x <= 1.0)), 1, 0))
            bad = tl.maximum(bad, tl.where(m & ~((t >= 0.0) & (t <= 1.0)), 2, 0))
        if HAS_W:
            w = tl.load(w_ptr + idx, mask=m, other=0.0).to(ACC)
            loss = loss * w
            grad = grad * w
        tl.store(grad_ptr + idx, (grad * gs).to(ACC), mask=m)
        if NONE:
            tl.store(terms_ptr + idx, loss.to(ACC), mask=m)
        else:
            acc += tl.where(m, loss * gs, 0.0)
    if not NONE:
        s = tl.sum(acc, axis=0)
        if SINGLE:
            if NAN_ADD:
                zero = s * 0.0
                s = s + zero / zero  # NaN: the mean of an empty input
            tl.store(out_ptr, s)
        else:
            tl.store(partial_ptr + pid, s)
    if not LOGITS:
        tl.atomic_max(bad_ptr, tl.max(bad, axis=0))


def bce_loss_fwd(input, target, weight, pos_weight, reduction: int, logits: bool):
    if input.shape != target.shape:
        raise RuntimeError(f"bce_loss: target size ({target.shape}) must be the same as input size ({input.shape})")
    _check_target(input, target, "bce_loss")
    acc = _acc(input.dtype)
    x, t = input.contiguous(), target.contiguous()
    n = x.numel()
    w = weight.contiguous() if weight is not None else None
    p = pos_weight.contiguous() if pos_weight is not None else None
    for name, v in (("weight", w), ("pos_weight", p)):
        if v is not None and v.numel() != n:
            raise RuntimeError(f"bce_loss: {name} must have one value per input element")
    none = reduction == 0
    dev = input.device
    out = torch.empty(input.shape if none else (), dtype=acc, device=dev)
    grad = torch.empty((n,), dtype=acc, device=dev)
    programs, chunk, single = _grid(n)
    partials = grad if single or none else torch.empty((programs,), dtype=acc, device=dev)
    bad = grad if logits else torch.zeros((), dtype=torch.int32, device=dev)
    with _on_device(input):
        _bce_kernel[(programs,)](x, t, w if w is not None else x, p if p is not None else x, n, grad,
                                 out if none else grad, out, partials, chunk, bad, LOGITS=logits,
                                 HAS_W=w is not None, HAS_P=p is not None, MEAN=reduction == 1, NONE=none,
                                 SINGLE=single, NAN_ADD=reduction == 1 and n == 0, ACC=_tl(acc), BLOCK=BLOCK)
        if not none and not single:
            _sum_partials_kernel[(1,)](partials, programs, out, out, 1, 0.0, 0.0, NV=1,
                                       NAN_ADD=False, ACC=_tl(acc), BLOCK=BLOCK)
    if not logits:
        _check_range(bad, RANGE_MSG)
    return out, grad


@triton.jit
def _round_to(x, DT: tl.constexpr, OP: tl.constexpr):
    # x (dtype OP) rounded to DT to nearest even and back to OP: the rounding of a torch op's
    # result stored in DT (nothing to do when DT is OP).
    if DT == OP:
        return x
    else:
        return x.to(DT, fp_downcast_rounding="rtne").to(OP)


@triton.jit
def _reparam_fwd_kernel(mu_ptr, lv_ptr, eps_ptr,  # [n] inputs, one dtype
                        z_ptr,                    # [n] output, mu's dtype
                        n,                        # element count
                        LIBDEVICE: tl.constexpr,  # exp from libdevice (CUDA's expf / exp), else tl.exp
                        DT: tl.constexpr,         # the inputs' dtype
                        OP: tl.constexpr,         # dtype of torch's arithmetic (fp32 for fp16/bf16)
                        BLOCK: tl.constexpr):
    # torch's mu + eps * exp(0.5 * logvar) step by step: every intermediate rounded to DT as
    # torch's separate ops round it (the launch disables FMA contraction).
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # 64-bit offsets
    m = idx < n
    mu = tl.load(mu_ptr + idx, mask=m, other=0.0).to(OP)
    lv = tl.load(lv_ptr + idx, mask=m, other=0.0).to(OP)
    e = tl.load(eps_ptr + idx, mask=m, other=0.0).to(OP)
    h = _round_to(lv * 0.5, DT, OP)
    if LIBDEVICE:
        s = libdevice.exp(h)
    else:
        s = tl.exp(h)
    p = _round_to(e * _round_to(s, DT, OP), DT, OP)
    z = _round_to(mu + p, DT, OP)
    tl.store(z_ptr + idx, z.to(DT), mask=m)


@triton.jit
def _reparam_bwd_kernel(g_ptr, lv_ptr, eps_ptr,  # [n] incoming grad, logvar, eps
                        out_ptr,                 # [n] d logvar, logvar's dtype
                        n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # 64-bit offsets
    m = idx < n
    lv = tl.load(lv_ptr + idx, mask=m, other=0.0)
    g = tl.load(g_ptr + idx, mask=m, other=0.0).to(ACC)
    e = tl.load(eps_ptr + idx, mask=m, other=0.0).to(ACC)
    out = 0.5 * g * e * tl.exp(0.5 * lv.to(ACC))
    tl.store(out_ptr + idx, out.to(out_ptr.dtype.element_ty), mask=m)


def reparam_fwd(mu, logvar, eps):
    if not (mu.shape == logvar.shape == eps.shape) or not (mu.dtype == logvar.dtype == eps.dtype):
        raise RuntimeError("reparameterize: mu, logvar and eps must have the same shape and dtype")
    mu_c, lv_c, e_c = mu.contiguous(), logvar.contiguous(), eps.contiguous()
    z = torch.empty_like(mu_c)
    n = z.numel()
    if n:
        with _on_device(mu):
            _reparam_fwd_kernel[(triton.cdiv(n, ELEM_BLOCK),)](mu_c, lv_c, e_c, z, n, LIBDEVICE=mu.device.type == "cuda",
                                                               DT=_TL_DTYPES[mu.dtype], OP=_tl(_acc(mu.dtype)),
                                                               BLOCK=ELEM_BLOCK, enable_fp_fusion=False)
    return z


def reparam_bwd(grad_z, logvar, eps):
    if grad_z.shape != logvar.shape or grad_z.dtype != logvar.dtype:
        raise RuntimeError("reparameterize backward: grad must have logvar's shape and dtype")
    g, lv_c, e_c = grad_z.contiguous(), logvar.contiguous(), eps.contiguous()
    out = torch.empty_like(lv_c)
    n = out.numel()
    if n:
        with _on_device(logvar):
            _reparam_bwd_kernel[(triton.cdiv(n, ELEM_BLOCK),)](g, lv_c, e_c, out, n, ACC=_tl(_acc(logvar.dtype)),
                                                               BLOCK=ELEM_BLOCK)
    return out
