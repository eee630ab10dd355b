"""GAN / VAE / BCE losses, reparameterisation and gradient penalties: the reference against the
textbook PyTorch formulas, every backend against the float64 reference (forward and gradients,
every kind, reduction, dtype, extreme logits), opcheck, gradcheck and double backward, one
torch.compile(fullgraph=True) test, bad input, and a profiler check that the CPU path runs no
PyTorch compute operator."""
import contextlib
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import genfast
import genfast.functional as GF
import genfast.nn as gnn
from genfast.ops import losses as L
from genfast.reference import losses as ref
from tests.utils import CPU_BACKENDS, GPU_BACKENDS, TOL, assert_close, backend

KINDS = ["bce", "minimax", "hinge", "wasserstein", "lsgan"]
REDS = ["mean", "sum", "none"]
EXTREMES = [-math.inf, -100.0, -30.0, -1.5, 0.0, 0.5, 30.0, 100.0, math.inf]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- the reference against torch's own loss functions (float64) ----------------------------------

def textbook_terms(x, kind, role, label=1.0):
    """The per-element textbook formulas written with torch's loss functions."""
    if kind in ("bce", "minimax"):
        if role == "real":
            return F.binary_cross_entropy_with_logits(x, torch.full_like(x, label), reduction="none")
        if role == "fake":
            return F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
        if kind == "bce":
            return F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none")
        return -F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
    if kind == "hinge":
        return {"real": F.relu(1 - x), "fake": F.relu(1 + x), "gen": -x}[role]
    if kind == "wasserstein":
        return {"real": -x, "fake": x, "gen": -x}[role]
    target = {"real": label, "fake": 0.0, "gen": 1.0}[role]
    return F.mse_loss(x, torch.full_like(x, target), reduction="none")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("role", ["real", "fake", "gen"])
def test_reference_matches_textbook(kind, role):
    x = torch.cat([torch.randn(40, dtype=torch.float64) * 4, torch.tensor([-100.0, 100.0], dtype=torch.float64)])
    x.requires_grad_(True)
    label = 0.9 if kind in ("bce", "minimax", "lsgan") and role == "real" else 1.0
    got = ref.gan_terms(x, kind, role, label)
    want = textbook_terms(x, kind, role, label)
    assert_close(got, want, torch.float64, f"{kind} {role}")
    g1, = torch.autograd.grad(got.sum(), x)
    g2, = torch.autograd.grad(want.sum(), x)
    assert_close(g1, g2, torch.float64, f"{kind} {role} grad")


def test_reference_vae_matches_textbook():
    recon, target = torch.rand(6, 10, dtype=torch.float64), torch.rand(6, 10, dtype=torch.float64)
    mu, lv = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    kl = -0.5 * torch.sum(1 + lv - mu.pow(2) - lv.exp())
    for rl, rec in (("mse", F.mse_loss(recon, target, reduction="sum")),
                    ("bce", F.binary_cross_entropy(recon, target, reduction="sum")),
                    ("bce_logits", F.binary_cross_entropy_with_logits(recon, target, reduction="sum"))):
        loss, r, k = ref.vae_loss(recon, target, mu, lv, rl, 0.5, "sum")
        assert_close(r, rec, torch.float64, rl)
        assert_close(k, kl, torch.float64, rl)
        assert_close(loss, rec + 0.5 * kl, torch.float64, rl)
        loss_b, _, _ = ref.vae_loss(recon, target, mu, lv, rl, 0.5, "batchmean")
        assert_close(loss_b, (rec + 0.5 * kl) / 6, torch.float64, rl)


# --- GAN losses on every backend -----------------------------------------------------------------

def _gan_all(real, fake, kind, red, label):
    """D loss (scalar or weighted sum of the terms), its grads, G loss, its grad."""
    d = GF.discriminator_loss(real, fake, kind, red, real_label=label)
    if red == "none":
        wr = torch.linspace(0.5, 1.5, real.numel(), dtype=d[0].dtype, device=real.device).view(real.shape)
        wf = torch.linspace(-1.0, 1.0, fake.numel(), dtype=d[1].dtype, device=fake.device).view(fake.shape)
        dsum = (d[0] * wr).sum() + (d[1] * wf).sum()
        dvals = torch.cat([d[0].flatten(), d[1].flatten()])
    else:
        dsum, dvals = d, d.reshape(1)
    gr, gf = torch.autograd.grad(dsum, (real, fake))
    g = GF.generator_loss(fake, kind, red)
    if red == "none":
        gsum = (g * torch.linspace(-1.0, 2.0, fake.numel(), dtype=g.dtype, device=fake.device).view(fake.shape)).sum()
        gvals = g.flatten()
    else:
        gsum, gvals = g, g.reshape(1)
    (gg,) = torch.autograd.grad(gsum, (fake,))
    return dvals, gr, gf, gvals, gg


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_gan_losses_match_reference(backend_name, kind, dtype):
    real = (torch.randn(7, 1, 2, 3) * 3).to(dtype).requires_grad_(True)
    fake = (torch.randn(5, 1, 2, 3) * 3).to(dtype).requires_grad_(True)  # different batch size
    label = 0.9 if kind in ("bce", "lsgan") else 1.0
    for red in REDS:
        with backend(backend_name):
            got = _gan_all(real, fake, kind, red, label)
        r64 = real.detach().double().requires_grad_(True)
        f64 = fake.detach().double().requires_grad_(True)
        with backend("reference"):
            want = _gan_all(r64, f64, kind, red, label)
        assert got[0].dtype == _acc(dtype) and got[3].dtype == _acc(dtype), "loss dtype"
        assert got[1].dtype == dtype and got[2].dtype == dtype and got[4].dtype == dtype, "grad dtype"
        names = ("D loss", "D grad real", "D grad fake", "G loss", "G grad")
        for name, a, b in zip(names, got, want):
            tol_dtype = _acc(dtype) if "loss" in name else dtype
            assert_close(a, b, tol_dtype, f"{backend_name} {kind} {red} {name}", scale=4.0 if "loss" in name else 1.0)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_gan_extreme_logits(backend_name, kind):
    x = torch.tensor(EXTREMES, dtype=torch.float32)
    label = 1.0
    for role in ("real", "fake", "gen"):
        xr = x.clone().requires_grad_(True)
        with backend(backend_name):
            if role == "gen":
                terms = GF.generator_loss(xr, kind, "none")
            else:
                pair = GF.discriminator_loss(xr, xr, kind, "none", real_label=label)
                terms = pair[0] if role == "real" else pair[1]
        (grad,) = torch.autograd.grad(terms.sum(), xr)
        x64 = x.double().requires_grad_(True)
        want = ref.gan_terms(x64, kind, role, label)
        (wgrad,) = torch.autograd.grad(want.sum(), x64)
        for name, a, b in (("terms", terms, want), ("grad", grad, wgrad)):
            a, b = a.double(), b.detach()
            assert torch.equal(torch.isfinite(a), torch.isfinite(b)), f"{kind} {role} {name}: {a} vs {b}"
            assert not torch.isnan(a).any(), f"{kind} {role} {name} has NaN: {a}"
            fin = torch.isfinite(b)
            assert torch.equal(a[~fin], b[~fin]), f"{kind} {role} {name} infinities"
            assert_close(a[fin], b[fin], torch.float32, f"{kind} {role} {name}")
        # torch's own textbook formula, wherever it is finite (it gives NaN at +-inf for bce).
        tb = textbook_terms(x, kind, role, label)
        ok = torch.isfinite(tb)
        assert_close(terms[ok], tb[ok], torch.float32, f"{kind} {role} vs torch")


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_gan_layouts_and_odd_shapes(backend_name):
    cases = [
        (torch.randn(5, 3).t(), torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)),  # non-contiguous
        (torch.randn(()), torch.randn(1)),  # 0-dim and size-1 logits
        (torch.randn(3, 1, 2, 2)[:, :, ::2, :], torch.randn(0, 1)),  # strided; empty fake batch
    ]
    for real, fake in cases:
        for red in ("sum", "none"):
            r, f = real.clone().requires_grad_(True), fake.clone().requires_grad_(True)
            with backend(backend_name):
                d = GF.discriminator_loss(r, f, "bce", red)
            s = d if red == "sum" else d[0].sum() * 1.5 + d[1].sum()
            gr, gf = torch.autograd.grad(s, (r, f))
            r64, f64 = real.double().requires_grad_(True), fake.double().requires_grad_(True)
            w = ref.discriminator_loss(r64, f64, "bce", red)
            ws = w if red == "sum" else w[0].sum() * 1.5 + w[1].sum()
            wr, wf = torch.autograd.grad(ws, (r64, f64))
            assert gr.shape == real.shape and gf.shape == fake.shape
            assert_close(s, ws, torch.float32, f"{backend_name} {red} loss")
            assert_close(gr, wr, torch.float32, f"{backend_name} {red} grad real")
            assert_close(gf, wf, torch.float32, f"{backend_name} {red} grad fake")


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_nonsaturating_generator_gradient_does_not_vanish(backend_name):
    x = torch.tensor([-100.0, -50.0, -30.0], requires_grad=True)
    with backend(backend_name):
        (g,) = torch.autograd.grad(GF.generator_loss(x, "bce", "sum"), x)
    torch.testing.assert_close(g, torch.full_like(g, -1.0))
    xn = x.detach().clone().requires_grad_(True)
    (naive,) = torch.autograd.grad((-torch.log(torch.sigmoid(xn) + 1e-8)).sum(), xn)
    assert naive.abs().max() < 1e-3  # the form genfast avoids: its gradient vanishes


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_gan_multiblock_and_deterministic(backend_name):
    # above the single-block size of the kernels: partial sums, then their fixed-order sum
    real = torch.randn(20000, 1)
    fake = torch.randn(3000, 1)
    with backend(backend_name):
        a = GF.discriminator_loss(real, fake, "bce")
        b = GF.discriminator_loss(real, fake, "bce")
    assert torch.equal(a, b)
    want = ref.discriminator_loss(real.double(), fake.double(), "bce")
    assert_close(a, want, torch.float32, backend_name, scale=4.0)


@pytest.mark.parametrize("backend_name", ["cpu", "triton"])
def test_gan_empty_side_mean_is_nan_like_torch(backend_name):
    with backend(backend_name):
        d = GF.discriminator_loss(torch.randn(0), torch.randn(3), "bce")
    assert torch.isnan(d) and torch.isnan(torch.randn(0).mean())


@pytest.mark.parametrize("backend_name", ["cpu", "triton"])
def test_autocast_returns_float32(backend_name):
    lin = nn.Linear(5, 1)
    x, xf = torch.randn(6, 5), torch.randn(4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16), backend(backend_name):
        real, fake = lin(x), lin(xf)
        assert real.dtype == torch.bfloat16
        d = GF.discriminator_loss(real, fake, "bce")
        g = GF.generator_loss(fake, "lsgan")
    assert d.dtype == torch.float32 and g.dtype == torch.float32
    assert_close(d, ref.discriminator_loss(real.double(), fake.double(), "bce"), torch.float32, "D autocast", scale=4.0)
    assert_close(g, ref.generator_loss(fake.double(), "lsgan"), torch.float32, "G autocast", scale=4.0)
    (gw,) = torch.autograd.grad(d + g, lin.weight)
    assert gw.dtype == torch.float32 and torch.isfinite(gw).all()


# --- VAE ------------------------------------------------------------------------------------------

def _vae_inputs(dtype, recon_loss, n=4, d=12, z=3):
    if recon_loss == "bce":
        recon = torch.rand(n, d).clamp(0.02, 0.98)
    else:
        recon = torch.randn(n, d)
    target = torch.rand(n, d)
    mu, lv = torch.randn(n, z), torch.randn(n, z) * 2
    return [t.to(dtype) for t in (recon, target, mu, lv)]


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("recon_loss", ["mse", "bce", "bce_logits"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_vae_loss_matches_reference(backend_name, recon_loss, dtype):
    recon, target, mu, lv = _vae_inputs(dtype, recon_loss)
    for red in ("sum", "batchmean"):
        ins = [t.clone().requires_grad_(True) for t in (recon, mu, lv)]
        with backend(backend_name):
            loss, rec, kl = GF.vae_loss(ins[0], target, ins[1], ins[2], recon_loss=recon_loss, beta=0.7,
                                        reduction=red, return_parts=True)
        grads = torch.autograd.grad(loss, ins)
        ins64 = [t.detach().double().requires_grad_(True) for t in ins]
        wl, wr, wk = ref.vae_loss(ins64[0], target.double(), ins64[1], ins64[2], recon_loss, 0.7, red)
        wg = torch.autograd.grad(wl, ins64)
        assert loss.dtype == _acc(dtype)
        for name, a, b in (("loss", loss, wl), ("recon", rec, wr), ("kl", kl, wk)):
            assert_close(a, b, _acc(dtype), f"{backend_name} {recon_loss} {red} {name}", scale=4.0)
        for name, a, b in zip(("d recon", "d mu", "d logvar"), grads, wg):
            assert a.dtype == dtype
            assert_close(a, b, dtype, f"{backend_name} {recon_loss} {red} {name}")


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_vae_kl_finite_at_extreme_logvar(backend_name, dtype):
    mu = torch.randn(2, 4).to(dtype)
    lv = torch.tensor([[-30.0, 30.0, -10.0, 10.0], [30.0, -30.0, 0.0, 1e-3]]).to(dtype).requires_grad_(True)
    recon = torch.randn(2, 5).to(dtype)
    with backend(backend_name):
        loss, _, kl = GF.vae_loss(recon, recon.detach().clone(), mu, lv, return_parts=True)
    (g,) = torch.autograd.grad(loss, lv)
    assert torch.isfinite(loss)
    # d/d logvar = 0.5 expm1(logvar), in logvar's dtype: 5e12 at logvar = 30 overflows float16
    want_g = (0.5 * torch.expm1(lv.detach().double())).to(dtype)
    assert torch.equal(torch.isfinite(g), torch.isfinite(want_g))
    if dtype == torch.float32:
        assert torch.isfinite(g).all()
    want = ref.kl_terms(mu.double(), lv.detach().double()).sum()
    assert torch.isfinite(kl)
    assert_close(kl, want, torch.float32, "kl", scale=4.0)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_vae_noncontiguous(backend_name):
    recon, target, mu, lv = _vae_inputs(torch.float32, "mse", n=6, d=4, z=3)
    rt, mt, lt = recon.t().requires_grad_(True), mu.t().requires_grad_(True), lv.t().requires_grad_(True)
    with backend(backend_name):
        loss = GF.vae_loss(rt, target.t(), mt, lt, reduction="batchmean")
    g = torch.autograd.grad(loss, (rt, mt, lt))
    ins = [t.detach().double().requires_grad_(True) for t in (rt, mt, lt)]
    want = ref.vae_loss(ins[0], target.t().double(), ins[1], ins[2], "mse", 1.0, "batchmean")[0]
    wg = torch.autograd.grad(want, ins)
    assert_close(loss, want, torch.float32, "vae loss", scale=4.0)
    for a, b in zip(g, wg):
        assert a.shape == b.shape
        assert_close(a, b, torch.float32, "vae grad")


@pytest.mark.parametrize("backend_name", ["cpu", "triton"])
def test_vae_multiblock(backend_name):
    recon, target, mu, lv = _vae_inputs(torch.float32, "mse", n=4, d=5000, z=20)
    with backend(backend_name):
        loss = GF.vae_loss(recon, target, mu, lv, reduction="batchmean")
    want = ref.vae_loss(recon.double(), target.double(), mu.double(), lv.double(), "mse", 1.0, "batchmean")[0]
    assert_close(loss, want, torch.float32, backend_name, scale=4.0)


@pytest.mark.parametrize("backend_name", ["cpu"])
def test_vae_bce_rejects_out_of_range(backend_name):
    recon = torch.tensor([[0.5, 1.5]])
    with backend(backend_name), pytest.raises(RuntimeError, match="between 0 and 1"):
        GF.vae_loss(recon, torch.rand(1, 2), torch.zeros(1, 1), torch.zeros(1, 1), recon_loss="bce")


# --- BCE drop-ins ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bce_dropins_match_torch(backend_name, reduction, dtype):
    x = (torch.randn(6, 4) * 3).to(dtype)
    t = torch.rand(6, 4).to(dtype)
    w, pw = torch.rand(4).to(dtype) + 0.5, torch.rand(4).to(dtype) * 3
    for kw in ({}, {"weight": w}, {"pos_weight": pw}, {"weight": w, "pos_weight": pw}):
        g, tm = gnn.BCEWithLogitsLoss(reduction=reduction, **kw), nn.BCEWithLogitsLoss(reduction=reduction, **kw)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        with backend(backend_name):
            a = g(xa, t)
        b = tm(xb, t)
        assert a.dtype == b.dtype
        assert_close(a, b, dtype, f"bce_logits {kw.keys()}", scale=4.0)
        ga, = torch.autograd.grad(a.sum(), xa)
        gb, = torch.autograd.grad(b.sum(), xb)
        assert_close(ga, gb, dtype, f"bce_logits grad {kw.keys()}")
    p = torch.rand(6, 4).to(dtype).clamp(1e-3, 1 - 1e-3)
    p[0, 0], p[0, 1] = 0.0, 1.0  # torch's clamp of the log at -100
    for kw in ({}, {"weight": torch.rand(6, 1).to(dtype)}):
        pa, pb = p.clone().requires_grad_(True), p.clone().requires_grad_(True)
        with backend(backend_name):
            a = gnn.BCELoss(reduction=reduction, **kw)(pa, t)
        b = nn.BCELoss(reduction=reduction, **kw)(pb, t)
        assert_close(a, b, dtype, "bce", scale=4.0)
        ga, = torch.autograd.grad(a.sum(), pa)
        gb, = torch.autograd.grad(b.sum(), pb)
        assert_close(ga, gb, dtype, "bce grad")


def test_bce_dropins_are_torch_modules():
    m = gnn.BCEWithLogitsLoss(pos_weight=torch.ones(3))
    assert isinstance(m, nn.BCEWithLogitsLoss)
    assert set(m.state_dict()) == set(nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)).state_dict())
    assert isinstance(gnn.BCELoss(), nn.BCELoss)


# --- reparameterize -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_reparameterize_seed_contract_and_grads(backend_name, dtype):
    mu = torch.randn(5, 3).to(dtype).requires_grad_(True)
    lv = torch.randn(5, 3).to(dtype).requires_grad_(True)
    torch.manual_seed(7)
    with backend(backend_name):
        z = GF.reparameterize(mu, lv)
    torch.manual_seed(7)
    mu64, lv64 = mu.detach().double().requires_grad_(True), lv.detach().double().requires_grad_(True)
    eps = torch.randn_like(mu)
    want = mu64 + eps.double() * torch.exp(0.5 * lv64)
    assert z.dtype == dtype
    assert_close(z, want, dtype, "z")
    gz = torch.randn_like(z)
    ga = torch.autograd.grad(z, (mu, lv), gz)
    gb = torch.autograd.grad(want, (mu64, lv64), gz.double())
    for a, b in zip(ga, gb):
        assert_close(a, b, dtype, "reparameterize grad")


# --- registration, gradcheck, double backward, compile -------------------------------------------

@pytest.mark.parametrize("backend_name", ["cpu", "triton"])
def test_opcheck(backend_name):
    r, f = torch.randn(4, 3), torch.randn(5)
    ops = torch.ops.genfast
    for red in (0, 1):
        torch.library.opcheck(ops.gan_loss.default, (r, f, 0, False, red, 0.9, backend_name))
        torch.library.opcheck(ops.gan_loss.default, (None, f, 2, True, red, 1.0, backend_name))
    saved = torch.randn(17)
    torch.library.opcheck(ops.loss_backward.default,
                          (torch.tensor(2.0), torch.randn(5), saved, 12, torch.float32, torch.float16, backend_name))
    torch.library.opcheck(ops.loss_backward.default,
                          (None, torch.tensor(1.5), saved, 0, torch.float32, torch.float32, backend_name))
    recon, target, mu, lv = _vae_inputs(torch.float32, "bce")
    torch.library.opcheck(ops.vae_loss.default, (recon, target, mu, lv, 1, 0.5, 3, backend_name))
    x, t = torch.randn(3, 4), torch.rand(3, 4)
    torch.library.opcheck(ops.bce_loss.default, (x, t, torch.rand(3, 4), torch.rand(3, 4), 1, True, backend_name))
    torch.library.opcheck(ops.bce_loss.default, (torch.rand(3, 4), t, None, None, 0, False, backend_name))
    torch.library.opcheck(ops.reparameterize_fwd.default, (mu, lv, torch.randn_like(mu), backend_name))
    torch.library.opcheck(ops.reparameterize_bwd.default, (torch.randn_like(mu), lv, torch.randn_like(mu), backend_name))
    if backend_name == "cpu":
        torch.library.opcheck(ops.gan_loss_fwd.default, (r, f, 4, False, 2, 0.8))
        torch.library.opcheck(ops.loss_scale_grad.default, (torch.tensor(2.0), None, saved, 3, torch.float32, torch.float32))
        torch.library.opcheck(ops.vae_loss_fwd.default, (recon, target, mu, lv, 0, 1.0, 2))
        torch.library.opcheck(ops.bce_loss_fwd.default, (x, t, None, None, 2, True))
        torch.library.opcheck(ops.reparam_fwd.default, (mu, lv, torch.randn_like(mu)))
        torch.library.opcheck(ops.reparam_bwd.default, (mu, lv, torch.randn_like(mu)))


@pytest.mark.parametrize("backend_name", ["cpu", "triton"])
def test_gradcheck(backend_name):
    dt = torch.float64
    r = (torch.randn(4, 2, dtype=dt) * 2).requires_grad_(True)
    f = (torch.randn(3, 2, dtype=dt) * 2).requires_grad_(True)
    with backend(backend_name):
        for kind in (KINDS if backend_name == "cpu" else ["bce", "hinge"]):
            for red in ("mean", "none"):
                assert torch.autograd.gradcheck(
                    lambda a, b: GF.discriminator_loss(a, b, kind, red, real_label=0.9 if kind == "bce" else 1.0),
                    (r, f))
                assert torch.autograd.gradcheck(lambda b: GF.generator_loss(b, kind, red), (f,))
        recon, target, mu, lv = [t.requires_grad_(i != 1) for i, t in enumerate(_vae_inputs(dt, "bce"))]
        for rl in ("mse", "bce", "bce_logits"):
            assert torch.autograd.gradcheck(
                lambda a, m, v: GF.vae_loss(a, target, m, v, recon_loss=rl, beta=0.5, reduction="batchmean"),
                (recon, mu, lv))
        t = torch.rand(4, 2, dtype=dt)
        crit = gnn.BCEWithLogitsLoss(pos_weight=torch.rand(2, dtype=dt))
        assert torch.autograd.gradcheck(lambda a: crit(a, t), (r,))

        def rep(m, v):
            torch.manual_seed(3)
            return GF.reparameterize(m, v)

        assert torch.autograd.gradcheck(rep, (mu, lv))


def test_double_backward_through_fused_losses():
    dt = torch.float64
    r = torch.randn(4, 2, dtype=dt, requires_grad=True)
    f = torch.randn(3, 2, dtype=dt, requires_grad=True)
    with backend("cpu"):
        assert torch.autograd.gradgradcheck(lambda a, b: GF.discriminator_loss(a, b, "bce", real_label=0.9), (r, f))
        assert torch.autograd.gradgradcheck(lambda b: GF.generator_loss(b, "lsgan", "none"), (f,))
        recon, target, mu, lv = [t.requires_grad_(i != 1) for i, t in enumerate(_vae_inputs(dt, "mse"))]
        assert torch.autograd.gradgradcheck(lambda a, m, v: GF.vae_loss(a, target, m, v, beta=2.0), (recon, mu, lv))


def _critic(genfast_layers: bool):
    torch.manual_seed(11)
    bn = gnn.BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.2) if genfast_layers else nn.Sequential(
        nn.BatchNorm2d(4), nn.LeakyReLU(0.2))
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), bn, nn.Flatten(), nn.Linear(4 * 5 * 5, 1)).double()


@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
def test_penalties_double_backward_through_genfast_layers(backend_name):
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    fake = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    grads = {}
    for gl in (True, False):
        d = _critic(gl)
        with backend(backend_name):
            xr = x.clone().requires_grad_(True)
            r1 = GF.r1_penalty(d(xr), xr)
            torch.manual_seed(5)
            gp = GF.gradient_penalty(d, x, fake)
        params = list(d.parameters())
        pg = torch.autograd.grad(r1 + 0.5 * gp, params, allow_unused=True)
        # the conv bias (before BatchNorm) and the last bias do not change d critic / d x: their
        # gradient is zero, reported as None or as zeros depending on the graph
        grads[gl] = [r1.detach(), gp.detach()] + [torch.zeros_like(p) if g is None else g
                                                  for g, p in zip(pg, params)]
    for a, b in zip(grads[True], grads[False]):
        assert_close(a, b, torch.float64, "penalty vs torch layers", scale=100.0)


def test_penalty_definitions():
    x = torch.randn(4, 3, dtype=torch.float64)
    fake = torch.randn(4, 3, dtype=torch.float64)
    w = torch.randn(3, dtype=torch.float64)

    def critic(v):
        return (v * w).sum(1) ** 2

    xr = x.clone().requires_grad_(True)
    r1 = GF.r1_penalty(critic(xr), xr)
    g = 2 * (x @ w)[:, None] * w  # per-sample gradient of critic
    assert_close(r1, g.pow(2).sum(1).mean(), torch.float64, "r1")
    torch.manual_seed(9)
    gp = GF.gradient_penalty(critic, x, fake)
    torch.manual_seed(9)
    a = torch.rand(4, 1, dtype=torch.float64)
    xh = a * x + (1 - a) * fake
    gh = 2 * (xh @ w)[:, None] * w
    assert_close(gp, ((gh.norm(dim=1) - 1) ** 2).mean(), torch.float64, "gp")  # per-sample norms
    p = w.clone().requires_grad_(True)

    def gp_of(v):
        torch.manual_seed(9)
        return GF.gradient_penalty(lambda s: (s * v).sum(1) ** 2, x, fake)

    assert torch.autograd.gradcheck(gp_of, (p,))
    assert torch.autograd.gradcheck(lambda v: GF.r1_penalty(*(lambda xx: ((xx * v).sum(1) ** 2, xx))(
        x.clone().requires_grad_(True))), (p,))


def test_compile_fullgraph_matches_eager():
    def step(real, fake, recon, target, mu, lv):
        d = GF.discriminator_loss(real, fake, "bce", real_label=0.9)
        g = GF.generator_loss(fake, "bce")
        v = GF.vae_loss(recon, target, mu, lv, recon_loss="bce_logits", reduction="batchmean")
        return d + g + v

    args = [torch.randn(8, 1), torch.randn(6, 1), torch.randn(4, 10), torch.rand(4, 10), torch.randn(4, 3),
            torch.randn(4, 3)]
    e_args = [a.clone().requires_grad_(i != 3) for i, a in enumerate(args)]
    c_args = [a.clone().requires_grad_(i != 3) for i, a in enumerate(args)]
    with backend("cpu"):
        eager = step(*e_args)
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*c_args)
    assert_close(compiled, eager, torch.float32, "compile")
    ge = torch.autograd.grad(eager, [a for a in e_args if a.requires_grad])
    gc = torch.autograd.grad(compiled, [a for a in c_args if a.requires_grad])
    for a, b in zip(gc, ge):
        assert_close(a, b, torch.float32, "compile grad")


# --- modules and bad input -----------------------------------------------------------------------

def test_modules():
    real, fake = torch.randn(6, 1), torch.randn(4, 1)
    m = gnn.GANLoss("hinge")
    assert_close(m.discriminator(real, fake), ref.discriminator_loss(real, fake, "hinge"), torch.float32, "D")
    assert_close(m.generator(fake), ref.generator_loss(fake, "hinge"), torch.float32, "G")
    recon, target, mu, lv = _vae_inputs(torch.float32, "bce")
    v = gnn.VAELoss("bce", beta=4.0, reduction="batchmean")
    want = ref.vae_loss(recon, target, mu, lv, "bce", 4.0, "batchmean")[0]
    assert_close(v(recon, target, mu, lv), want, torch.float32, "VAELoss")


def test_bad_input():
    r, f = torch.randn(4), torch.randn(4)
    with pytest.raises(ValueError, match="kind"):
        GF.discriminator_loss(r, f, "softmax")
    with pytest.raises(ValueError, match="reduction"):
        GF.generator_loss(f, "bce", "avg")
    with pytest.raises(ValueError, match="kind"):
        gnn.GANLoss("nope")
    with pytest.raises(ValueError, match="real_label"):
        GF.discriminator_loss(r, f, "hinge", real_label=0.9)
    with pytest.raises(RuntimeError, match="real_logits"):
        GF.discriminator_loss(r, f.double())
    recon, target, mu, lv = _vae_inputs(torch.float32, "mse")
    with pytest.raises(RuntimeError, match="size of tensor"):  # torch's mse_loss broadcast error
        GF.vae_loss(recon, target[:, :5], mu, lv)
    with pytest.raises(RuntimeError, match="logvar"):
        GF.vae_loss(recon, target, mu, lv[:, :2])
    with pytest.raises(ValueError, match="recon_loss"):
        GF.vae_loss(recon, target, mu, lv, recon_loss="l1")
    with pytest.raises(ValueError, match="reduction"):
        GF.vae_loss(recon, target, mu, lv, reduction="mean")
    with pytest.raises(RuntimeError, match="logvar"):
        GF.reparameterize(mu, lv[:2])
    with pytest.raises(ValueError, match="target size"):
        gnn.BCEWithLogitsLoss()(torch.randn(3), torch.rand(4))
    with pytest.raises(ValueError):
        F.binary_cross_entropy_with_logits(torch.randn(3), torch.rand(4))  # torch's type, same case


# --- the CPU path runs only genfast ops ----------------------------------------------------------

ALLOWED_ATEN = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resize_", "aten::detach",
                "aten::view", "aten::slice", "aten::as_strided", "aten::alias"}


def _profile(fn):
    with backend("cpu"):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("which", ["d", "g", "vae", "bce_logits", "bce", "reparam"])
def test_cpu_path_runs_no_torch_compute_op(which):
    real, fake = torch.randn(64, 1, requires_grad=True), torch.randn(64, 1, requires_grad=True)
    recon, target, mu, lv = [t.requires_grad_(i != 1) for i, t in enumerate(_vae_inputs(torch.float32, "bce"))]
    one = torch.ones(())
    eps = torch.randn_like(mu)

    def run():
        if which == "d":
            GF.discriminator_loss(real, fake, "bce", real_label=0.9).backward(one)
        elif which == "g":
            GF.generator_loss(fake, "bce").backward(one)
        elif which == "vae":
            GF.vae_loss(recon, target, mu, lv, recon_loss="bce").backward(one)
        elif which == "bce_logits":
            gnn.BCEWithLogitsLoss()(real, torch.rand(64, 1)).backward(one)
        elif which == "bce":
            gnn.BCELoss()(torch.sigmoid(real).detach().requires_grad_(True), torch.rand(64, 1)).backward(one)
        else:
            # autograd.grad: d mu is the incoming gradient itself, which .backward() would clone
            # into mu.grad (AccumulateGrad's rule for a tensor the caller still holds)
            torch.autograd.grad(L.reparameterize(mu, lv, eps), (mu, lv), eps)

    run()  # warm-up (first-call registrations)
    for t in (real, fake, recon, mu, lv):
        t.grad = None  # no accumulation (aten::add_) into existing .grad
    names = _profile(run)
    assert any(n.startswith("genfast::") and n.endswith("_fwd") for n in names), names
    assert "genfast::loss_scale_grad" in names or "genfast::reparam_bwd" in names, names
    extra = {"aten::rand", "aten::uniform_", "aten::sigmoid"} if which in ("bce_logits", "bce") else set()
    if which == "reparam":
        # exp(0.5 logvar) from torch's own kernels inside genfast::reparam_fwd (z bitwise torch's);
        # the scalar 0.5 becomes a 0-dim tensor (aten::to) as in torch's own 0.5 * logvar
        extra = {"aten::mul", "aten::exp_", "aten::to", "aten::_to_copy", "aten::copy_"}
    aten = {n for n in names if n.startswith("aten::")} - ALLOWED_ATEN - extra
    assert not aten, aten


# --- GPU ------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", GPU_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [128, 128 * 900])
def test_gpu_gan_losses(cuda_device, backend_name, kind, dtype, n):
    real = (torch.randn(n, 1, device=cuda_device) * 3).to(dtype).requires_grad_(True)
    fake = (torch.randn(n // 2 + 1, 1, device=cuda_device) * 3).to(dtype).requires_grad_(True)
    label = 0.9 if kind in ("bce", "lsgan") else 1.0
    for red in REDS:
        with backend(backend_name):
            got = _gan_all(real, fake, kind, red, label)
            again = _gan_all(real, fake, kind, red, label)
        r64 = real.detach().double().requires_grad_(True)
        f64 = fake.detach().double().requires_grad_(True)
        with backend("reference"):
            want = _gan_all(r64, f64, kind, red, label)
        for i, (a, b, c) in enumerate(zip(got, want, again)):
            assert torch.equal(a, c), "deterministic"
            tol_dtype = _acc(dtype) if i in (0, 3) else dtype
            assert_close(a, b, tol_dtype, f"{backend_name} {kind} {red} {i}", scale=10.0 if i in (0, 3) else 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", GPU_BACKENDS)
@pytest.mark.parametrize("recon_loss", ["mse", "bce", "bce_logits"])
@pytest.mark.parametrize("shape", [(128, 784, 20), (64, 3 * 64 * 64, 128)])
def test_gpu_vae_bce_reparam(cuda_device, backend_name, recon_loss, shape):
    n, d, z = shape
    recon, target, mu, lv = [t.to(cuda_device) for t in _vae_inputs(torch.float32, recon_loss, n, d, z)]
    ins = [t.clone().requires_grad_(True) for t in (recon, mu, lv)]
    with backend(backend_name):
        loss = GF.vae_loss(ins[0], target, ins[1], ins[2], recon_loss=recon_loss, reduction="batchmean")
    grads = torch.autograd.grad(loss, ins)
    ins64 = [t.detach().double().requires_grad_(True) for t in ins]
    wl = ref.vae_loss(ins64[0], target.double(), ins64[1], ins64[2], recon_loss, 1.0, "batchmean")[0]
    wg = torch.autograd.grad(wl, ins64)
    assert_close(loss, wl, torch.float32, "vae", scale=10.0)
    for a, b in zip(grads, wg):
        assert_close(a, b, torch.float32, "vae grad")
    x = torch.randn(n, 7, device=cuda_device, requires_grad=True)
    t = torch.rand(n, 7, device=cuda_device)
    pw = torch.rand(7, device=cuda_device)
    with backend(backend_name):
        a = gnn.BCEWithLogitsLoss(pos_weight=pw)(x, t)
    (ga,) = torch.autograd.grad(a, x)
    x64 = x.detach().double().requires_grad_(True)
    b = nn.BCEWithLogitsLoss(pos_weight=pw.double())(x64, t.double())
    (gb,) = torch.autograd.grad(b, x64)
    assert_close(a, b, torch.float32, "bce_logits", scale=10.0)
    assert_close(ga, gb, torch.float32, "bce_logits grad")
    torch.manual_seed(1)
    with backend(backend_name):
        zz = GF.reparameterize(mu, lv)
    torch.manual_seed(1)
    assert_close(zz, mu + torch.randn_like(mu) * torch.exp(0.5 * lv), torch.float32, "reparam")


# --- issue 11: bad input, special values, empty batches, opcheck with grads, autocast ------------

def _raises_like(torch_fn, fn):
    """fn raises exactly what torch_fn raises (type and message)."""
    with pytest.raises(Exception) as want:
        torch_fn()
    with pytest.raises(want.type, match=re.escape(str(want.value))):
        fn()


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [1.5, -0.5, math.nan])
def test_bce_on_probabilities_rejects_out_of_range_like_torch(backend_name, bad):
    p, t = torch.rand(3, 5).clamp(0.1, 0.9), torch.rand(3, 5)
    p[1, 2] = bad
    with backend(backend_name):
        _raises_like(lambda: F.binary_cross_entropy(p, t), lambda: gnn.BCELoss()(p, t))
        _raises_like(lambda: F.binary_cross_entropy(p, t, reduction="none"),
                     lambda: gnn.BCELoss(reduction="none")(p, t))
        with pytest.raises(RuntimeError, match=re.escape("all elements of input should be between 0 and 1")):
            GF.vae_loss(p, t, torch.zeros(3, 2), torch.zeros(3, 2), recon_loss="bce")


@pytest.mark.parametrize("backend_name", ["cpu", "triton"])
def test_bce_op_rejects_out_of_range_in_every_block(backend_name):
    # one bad value in the last of several programs / blocks
    p, t = torch.rand(40000).clamp(0.1, 0.9), torch.rand(40000)
    p[-1] = 1.0 + 1e-3
    with pytest.raises(RuntimeError, match="between 0 and 1"):
        torch.ops.genfast.bce_loss.default(p, t, None, None, 1, False, backend_name)
    recon = p.view(400, 100)
    with pytest.raises(RuntimeError, match="between 0 and 1"):
        torch.ops.genfast.vae_loss.default(recon, t.view(400, 100), torch.zeros(400, 2), torch.zeros(400, 2), 1, 1.0,
                                           2, backend_name)


def _nan_equal(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(torch.nan_to_num(a, nan=123.0),
                                                                     torch.nan_to_num(b, nan=123.0)) \
        and torch.equal(a.isnan(), b.isnan())


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_every_loss_on_an_empty_batch_behaves_as_torch(backend_name):
    e1, e2 = torch.randn(0, 1), torch.randn(0, 1)
    for kind in KINDS:
        for red in REDS:
            r, f = e1.clone().requires_grad_(True), e2.clone().requires_grad_(True)
            with backend(backend_name):
                d = GF.discriminator_loss(r, f, kind, red)
                g = GF.generator_loss(f, kind, red)
            tr = textbook_terms(r.detach(), kind, "real")
            tf = textbook_terms(f.detach(), kind, "fake")
            tg = textbook_terms(f.detach(), kind, "gen")
            if red == "none":
                assert _nan_equal(d[0], tr) and _nan_equal(d[1], tf) and _nan_equal(g, tg), (kind, red)
                dsum = d[0].sum() + d[1].sum()
                gsum = g.sum()
            else:
                want_d = getattr(tr, red)() + getattr(tf, red)()
                assert _nan_equal(d, want_d) and _nan_equal(g, getattr(tg, red)()), (kind, red, d, g)
                dsum, gsum = d, g
            gr, gf = torch.autograd.grad(dsum + gsum, (r, f))
            assert gr.shape == r.shape and gf.shape == f.shape
    for rl in ("mse", "bce", "bce_logits"):
        for red in ("sum", "batchmean"):
            recon = torch.rand(0, 12).requires_grad_(True)
            mu, lv = torch.randn(0, 3).requires_grad_(True), torch.randn(0, 3).requires_grad_(True)
            target = torch.rand(0, 12)
            with backend(backend_name):
                loss = GF.vae_loss(recon, target, mu, lv, recon_loss=rl, reduction=red)
            rec = {"mse": F.mse_loss(recon, target, reduction="sum"),
                   "bce": F.binary_cross_entropy(recon, target, reduction="sum"),
                   "bce_logits": F.binary_cross_entropy_with_logits(recon, target, reduction="sum")}[rl]
            kl = -0.5 * torch.sum(1 + lv - mu.pow(2) - lv.exp())
            want = rec + kl if red == "sum" else (rec + kl) / recon.shape[0]
            assert _nan_equal(loss.detach(), want.detach()), (rl, red, loss, want)
            grads = torch.autograd.grad(loss, (recon, mu, lv))
            assert [t.shape for t in grads] == [recon.shape, mu.shape, lv.shape]
    for red in REDS:
        x, t = torch.randn(0, 4).requires_grad_(True), torch.rand(0, 4)
        with backend(backend_name):
            a = gnn.BCEWithLogitsLoss(reduction=red, pos_weight=torch.ones(4))(x, t)
            b = gnn.BCELoss(reduction=red)(torch.sigmoid(x), t)
        assert _nan_equal(a.detach(), nn.BCEWithLogitsLoss(reduction=red, pos_weight=torch.ones(4))(x, t).detach())
        assert _nan_equal(b.detach(), nn.BCELoss(reduction=red)(torch.sigmoid(x), t).detach())
        (gx,) = torch.autograd.grad(a.sum() + b.sum(), x)
        assert gx.shape == x.shape
    mu, lv = torch.randn(0, 3).requires_grad_(True), torch.randn(0, 3).requires_grad_(True)
    with backend(backend_name):
        z = GF.reparameterize(mu, lv)
    assert z.shape == mu.shape and z.dtype == mu.dtype
    assert [g.shape for g in torch.autograd.grad(z.sum(), (mu, lv))] == [mu.shape, lv.shape]


@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 3), (129, 37), (70001,), "transposed"])
def test_reparameterize_is_bitwise_torch(backend_name, dtype, shape):
    if shape == "transposed":
        mu, lv = torch.randn(40, 23).to(dtype), (torch.randn(23, 40) * 3).to(dtype).t()
    else:
        mu, lv = torch.randn(shape).to(dtype), (torch.randn(shape) * 3).to(dtype)
    if lv.is_contiguous():
        lv.view(-1)[:3] = torch.tensor([-200.0, 80.0, math.nan], dtype=dtype)
    torch.manual_seed(11)
    with backend(backend_name):
        z = GF.reparameterize(mu, lv)
    torch.manual_seed(11)
    want = mu + torch.randn_like(mu) * torch.exp(0.5 * lv)
    assert z.dtype == want.dtype and z.shape == want.shape
    assert torch.equal(z.isnan(), want.isnan())
    assert torch.equal(z.nan_to_num(), want.nan_to_num()), (z - want).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_reparameterize_on_triton_within_the_stated_tolerance(dtype):
    # README / docstring: on the triton backend exp is the device's (CUDA's expf through libdevice
    # on the GPU, numpy's under the interpreter), so z may differ from torch's CPU z by the
    # rounding of exp: |z - z_torch| <= eps(dtype) * (|z_torch| + 2 |eps * exp(0.5 * logvar)|).
    mu, lv = torch.randn(3000).to(dtype), (torch.randn(3000) * 3).to(dtype)
    torch.manual_seed(5)
    with backend("triton"):
        z = GF.reparameterize(mu, lv)
    torch.manual_seed(5)
    eps = torch.randn_like(mu)
    want = mu + eps * torch.exp(0.5 * lv)
    fi = torch.finfo(dtype)
    bound = fi.eps * (want.double().abs() + 2 * (eps.double() * torch.exp(0.5 * lv.double())).abs())
    assert ((z.double() - want.double()).abs() <= bound + fi.tiny).all()


def test_meta_tensors_like_torch():
    m = torch.empty(6, 4, device="meta")
    for red in REDS:
        for mod_g, mod_t in ((gnn.BCELoss(reduction=red), nn.BCELoss(reduction=red)),
                             (gnn.BCEWithLogitsLoss(reduction=red), nn.BCEWithLogitsLoss(reduction=red))):
            a, b = mod_g(m, m), mod_t(m, m)
            assert a.device.type == "meta" and a.shape == b.shape and a.dtype == b.dtype
    d = GF.discriminator_loss(m, m)
    assert d.device.type == "meta" and d.shape == ()
    assert GF.generator_loss(m, "hinge", "none").shape == m.shape
    v = GF.vae_loss(m, m, torch.empty(6, 2, device="meta"), torch.empty(6, 2, device="meta"), recon_loss="bce")
    assert v.device.type == "meta" and v.shape == ()


@pytest.mark.parametrize("recon_loss", ["mse", "bce", "bce_logits"])
@pytest.mark.parametrize("tshape", [(4, 5), (3, 12, 2)])
def test_vae_shape_mismatch_raises_like_torch(recon_loss, tshape):
    recon, target = torch.rand(4, 12), torch.rand(tshape)
    torch_fn = {"mse": F.mse_loss, "bce": F.binary_cross_entropy,
                "bce_logits": F.binary_cross_entropy_with_logits}[recon_loss]
    _raises_like(lambda: torch_fn(recon, target, reduction="sum"),
                 lambda: GF.vae_loss(recon, target, torch.zeros(4, 2), torch.zeros(4, 2), recon_loss=recon_loss))


@pytest.mark.parametrize("backend_name", ["cpu", "triton"])
def test_opcheck_with_requires_grad(backend_name):
    ops = torch.ops.genfast
    r, f = torch.randn(4, 3, requires_grad=True), torch.randn(5, requires_grad=True)
    for red in (0, 1, 2):
        torch.library.opcheck(ops.gan_loss.default, (r, f, 0, False, red, 0.9, backend_name))
        torch.library.opcheck(ops.gan_loss.default, (None, f, 4, True, red, 1.0, backend_name))
    recon, target, mu, lv = _vae_inputs(torch.float32, "bce")
    args = (recon.requires_grad_(True), target, mu.requires_grad_(True), lv.requires_grad_(True))
    for rk in (0, 1, 2):
        torch.library.opcheck(ops.vae_loss.default, args + (rk, 0.5, 3, backend_name))
    x, t = torch.randn(3, 4, requires_grad=True), torch.rand(3, 4)
    torch.library.opcheck(ops.bce_loss.default, (x, t, torch.rand(3, 4), torch.rand(3, 4), 1, True, backend_name))
    p = torch.rand(3, 4).clamp(0.1, 0.9).requires_grad_(True)
    torch.library.opcheck(ops.bce_loss.default, (p, t, None, None, 0, False, backend_name))
    m, v = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    torch.library.opcheck(ops.reparameterize_fwd.default, (m, v, torch.randn(4, 3), backend_name))


@pytest.mark.parametrize("backend_name", ["cpu", "triton"])
def test_registered_ops_differentiate_like_the_reference(backend_name):
    ops = torch.ops.genfast
    r, f = torch.randn(4, 3, dtype=torch.float64, requires_grad=True), torch.randn(5, dtype=torch.float64,
                                                                                  requires_grad=True)
    out = ops.gan_loss.default(r, f, 0, False, 1, 0.9, backend_name)[0]
    want = ref.discriminator_loss(r, f, "bce", "mean", 0.9)
    for a, b in zip(torch.autograd.grad(out, (r, f)), torch.autograd.grad(want, (r, f))):
        assert_close(a, b, torch.float64, "gan op grad")
    m, v, e = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)
    z = ops.reparameterize_fwd.default(m, v, e, backend_name)
    gm, gv = torch.autograd.grad(z, (m, v), torch.ones_like(z))
    assert torch.equal(gm, torch.ones_like(m))
    assert_close(gv, 0.5 * e * torch.exp(0.5 * v.detach()), torch.float32, "reparam op grad")


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_autocast_losses_run_in_float32_like_torch(backend_name):
    lin = nn.Linear(5, 1)
    x = torch.randn(6, 5)
    fake32 = torch.randn(4, 1)
    t16 = torch.rand(6, 1).to(torch.float16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        real = lin(x)
        assert real.dtype == torch.bfloat16
        want_d = (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                  + F.binary_cross_entropy_with_logits(fake32, torch.zeros_like(fake32)))
        want_b = F.binary_cross_entropy_with_logits(real, t16)
        with backend(backend_name):
            d = GF.discriminator_loss(real, fake32, "bce")  # bf16 and float32 logits, as torch allows
            b = gnn.BCEWithLogitsLoss()(real, t16)
            v = GF.vae_loss(real, t16.float(), real.view(2, 3), torch.zeros(2, 3), recon_loss="bce_logits")
    assert d.dtype == want_d.dtype == torch.float32 and b.dtype == want_b.dtype
    assert_close(d, want_d, torch.float32, "D autocast")
    assert_close(b, want_b, torch.float32, "BCE autocast")
    assert v.dtype == torch.float32
    gw, = torch.autograd.grad(d, lin.weight, retain_graph=True)
    gw_t, = torch.autograd.grad(want_d, lin.weight)
    assert gw.dtype == gw_t.dtype
    assert_close(gw, gw_t, torch.float32, "D autocast grad")


@pytest.mark.parametrize("backend_name", ["cpu", "triton"])
def test_ops_registered_for_autocast(backend_name):
    ops = torch.ops.genfast
    x, t = torch.randn(3, 4).half(), torch.rand(3, 4).bfloat16()
    with pytest.raises(RuntimeError):
        ops.bce_loss.default(x, t, None, None, 1, True, backend_name)  # mixed 16-bit dtypes outside autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = ops.bce_loss.default(x, t, None, None, 1, True, backend_name)
        want = F.binary_cross_entropy_with_logits(x, t)
        mu16 = torch.randn(2, 3).bfloat16()
        loss = ops.vae_loss.default(torch.randn(2, 4), torch.rand(2, 4), mu16, torch.zeros(2, 3), 0, 1.0, 2,
                                    backend_name)[0]
        d = ops.gan_loss.default(x, t, 0, False, 1, 1.0, backend_name)[0]
    assert out.dtype == want.dtype
    assert_close(out, want, torch.float32, "bce op autocast")
    assert loss.dtype == torch.float32 and d.dtype == torch.float32


# --- issue 10: device guard, NaN-propagating clamps and 64-bit offsets in the Triton kernels -----

def test_every_triton_launch_runs_under_the_input_device_guard(monkeypatch):
    from genfast.kernels import losses as K

    state = {"device": None, "launches": []}

    class Guard:
        def __init__(self, t):
            self.device = t.device

        def __enter__(self):
            state["device"] = self.device

        def __exit__(self, *a):
            state["device"] = None

    class Spy:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            def launch(*args, **kw):
                state["launches"].append((self.name, state["device"]))
                return self.fn[grid](*args, **kw)
            return launch

    monkeypatch.setattr(K, "_on_device", Guard)
    names = [n for n in dir(K) if n.endswith("_kernel") and hasattr(getattr(K, n), "__getitem__")]
    for n in names:
        monkeypatch.setattr(K, n, Spy(n, getattr(K, n)))
    x = torch.randn(20000)
    K.gan_loss_fwd(x, x[:7], 0, False, 1, 1.0)
    K.loss_scale_grad(torch.tensor(1.0), torch.tensor(2.0), x, 5, torch.float32, torch.float32)
    K.vae_loss_fwd(x.view(200, 100).sigmoid(), x.view(200, 100).sigmoid(), x[:40].view(20, 2), x[:40].view(20, 2), 1,
                   1.0, 2)
    K.bce_loss_fwd(x.sigmoid(), x.sigmoid(), None, None, 1, False)
    K.reparam_fwd(x, x, x)
    K.reparam_bwd(x, x, x)
    launched = {n for n, _ in state["launches"]}
    assert launched == set(names), (launched, names)
    assert all(dev == x.device for _, dev in state["launches"]), state["launches"]


def test_device_guard_enters_the_tensors_cuda_device(monkeypatch):
    from types import SimpleNamespace

    from genfast.kernels import losses as K

    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or contextlib.nullcontext())
    with K._on_device(SimpleNamespace(device=torch.device("cuda", 1))):
        pass
    assert entered == [torch.device("cuda", 1)]


def compile_losses_for_sm90():
    """Compile the loss kernels for sm_90 with Triton's own compiler (run in a subprocess without
    TRITON_INTERPRET) and print, per kernel, whether its PTX uses only NaN-propagating float
    max/min and whether its TTIR addresses memory with 64-bit offsets."""
    import json
    import re as _re

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from genfast.kernels import losses as K

    acc_ptrs = {"grad_ptr", "terms_r_ptr", "terms_f_ptr", "out_ptr", "partial_ptr", "parts_ptr", "terms_ptr",
                "saved_ptr", "w_ptr", "p_ptr", "ca_ptr", "cb_ptr", "ga_ptr", "gb_ptr"}

    def build(fn, dt, **consts):
        sig = {}
        for p in fn.params:
            if p.is_constexpr:
                sig[p.name] = "constexpr"
            elif p.name == "bad_ptr":
                sig[p.name] = "*i32"
            elif p.name.endswith("_ptr"):
                sig[p.name] = "*fp32" if p.name in acc_ptrs else f"*{dt}"
            elif p.name.endswith(("_hi", "_lo")):
                sig[p.name] = "fp32"
            else:
                sig[p.name] = "i32"
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
        ptx, ttir = k.asm["ptx"], k.asm["ttir"]
        return {"plain_fminmax": bool(_re.search(r"\b(max|min)(\.ftz)?\.f32\b", ptx)),
                "nan_fminmax": bool(_re.search(r"\b(max|min)\.NaN\.f32\b", ptx)),
                "i64_offsets": "arith.extsi" in ttir and bool(_re.search(r"tt\.addptr .*xi64>", ttir))}

    f32 = tl.float32
    out = {
        "gan_bce": build(K._gan_loss_kernel, "bf16", KIND=0, FAKE_ROLE=1, MEAN=True, NONE=False, SINGLE=False,
                         NAN_ADD=False, ACC=f32, BLOCK=K.BLOCK),
        "gan_hinge": build(K._gan_loss_kernel, "fp32", KIND=2, FAKE_ROLE=2, MEAN=False, NONE=True, SINGLE=True,
                           NAN_ADD=False, ACC=f32, BLOCK=K.BLOCK),
        "scale": build(K._scale_kernel, "fp32", MODE_A=1, MODE_B=2, BLOCK=K.ELEM_BLOCK),
        "vae_bce": build(K._vae_kernel, "fp32", RECON=1, SINGLE=False, ACC=f32, BLOCK=K.BLOCK),
        "vae_logits": build(K._vae_kernel, "fp16", RECON=2, SINGLE=True, ACC=f32, BLOCK=K.BLOCK),
        "bce_prob": build(K._bce_kernel, "fp32", LOGITS=False, HAS_W=True, HAS_P=False, MEAN=True, NONE=False,
                          SINGLE=False, NAN_ADD=False, ACC=f32, BLOCK=K.BLOCK),
        "bce_logits": build(K._bce_kernel, "fp32", LOGITS=True, HAS_W=False, HAS_P=True, MEAN=False, NONE=True,
                            SINGLE=True, NAN_ADD=False, ACC=f32, BLOCK=K.BLOCK),
        "reparam_fwd": build(K._reparam_fwd_kernel, "bf16", LIBDEVICE=True, DT=tl.bfloat16, OP=f32, BLOCK=K.ELEM_BLOCK),
        "reparam_bwd": build(K._reparam_bwd_kernel, "bf16", ACC=f32, BLOCK=K.ELEM_BLOCK),
    }
    print("RESULT" + json.dumps(out))


def test_loss_kernels_compile_for_sm90_with_nan_max_and_64bit_offsets():
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    code = "from tests.test_losses import compile_losses_for_sm90; compile_losses_for_sm90()"
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.split("RESULT", 1)[1])
    for name, info in res.items():
        assert not info["plain_fminmax"], f"{name}: float max/min that drops NaN on the GPU"
        assert info["i64_offsets"], f"{name}: 32-bit offsets"
    for name in ("gan_bce", "vae_bce", "bce_prob", "bce_logits"):
        assert res[name]["nan_fminmax"], f"{name}: expected the NaN-propagating max"



def test_cpu_logistic_terms_within_a_few_ulps_on_a_dense_grid():
    """The float32 CPU kernels compute exp(-|x|) and log1p of it with their own polynomials (not
    Sleef): terms and gradients of BCE-with-logits, for three targets, within 8 float32 ulps
    (relative to the terms, or to the gradient's two parts) of the float64 formulas over x in [-110, 110] at 2e5 points, the ranges where
    exp(-|x|) flushes to 0 included, and NaN kept."""
    x = torch.cat([torch.linspace(-110, 110, 200_001), torch.tensor([-87.4, -87.3, -1e-30, 1e-30, 1e-8, -1e-8])])
    x = x.float()
    x64 = x.double()
    eps = torch.finfo(torch.float32).eps
    for t in (0.0, 0.3, 1.0):
        target = torch.full_like(x, t)
        xr = x.clone().requires_grad_(True)
        with backend("cpu"):
            terms = L.bce_loss(xr, target, None, None, "none", True)
        (grad,) = torch.autograd.grad(terms.sum(), xr)
        xr64 = x64.clone().requires_grad_(True)
        want = ref.bce_with_logits(xr64, target.double(), None, None, "none")
        (wgrad,) = torch.autograd.grad(want.sum(), xr64)
        for name, a, b in (("terms", terms.double(), want.detach()), ("grad", grad.double(), wgrad)):
            err = (a - b).abs()
            # relative to the size of the parts: the gradient (1-t) sigmoid(x) - t sigmoid(-x)
            # cancels where they are equal, in float32 as in torch; the loss terms do not cancel
            size = b.abs() if name == "terms" else (1 - t) * torch.sigmoid(x64) + t * torch.sigmoid(-x64)
            bound = 8 * eps * size + 1e-37  # absolute floor: the flushed range (|x| > 87.3)
            worst = int((err - bound).argmax())
            assert bool((err <= bound).all()), (f"t={t} {name}: x={x[worst].item()} got {a[worst].item()} "
                                                f"want {b[worst].item()}")
    with backend("cpu"):
        nan_terms = L.bce_loss(torch.tensor([math.nan, 1.0]), torch.ones(2), None, None, "none", True)
    assert math.isnan(nan_terms[0].item()) and math.isfinite(nan_terms[1].item())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("red", ["mean", "sum", "none"])
def test_cpu_gan_loss_autograd_in_cpp_double_backward(kind, red):
    """Eager CPU GAN losses run genfast::gan_loss_train, whose autograd node is C++ (no Python
    Function on the step's path); its create_graph backward goes through the differentiable
    reference formulas (gan_loss_ref_grad): gradgradcheck on both sides, every kind and reduction."""
    dt = torch.float64
    r = (torch.randn(4, 2, dtype=dt) * 2).requires_grad_(True)
    f = (torch.randn(3, 2, dtype=dt) * 2).requires_grad_(True)
    label = 0.9 if kind in ("bce", "lsgan") else 1.0
    with backend("cpu"):
        d = GF.discriminator_loss(r, f, kind, red, real_label=label)
        g = GF.generator_loss(f, kind, red)
        for out in (d if red == "none" else (d,)) + (g,):
            assert "GanLossTrain" in out.grad_fn.name(), out.grad_fn.name()
        assert torch.autograd.gradgradcheck(lambda a, b: GF.discriminator_loss(a, b, kind, red, real_label=label),
                                            (r, f))
        assert torch.autograd.gradgradcheck(lambda b: GF.generator_loss(b, kind, red), (f,))
    # inference mode (no autograd keys): the plain kernel
    with torch.inference_mode(), backend("cpu"):
        got = GF.generator_loss(f.detach(), kind, red)
    with backend("reference"):
        want = GF.generator_loss(f.detach(), kind, red)
    assert_close(got, want, dt, f"{kind} {red} inference mode")



def test_cpu_gan_loss_node_behaves_as_torch_nodes():
    """The C++ node of gan_loss_train (csrc/loss_autograd.cpp, a Node of its own): a second
    backward without retain_graph raises torch's error (the logits are leaves: the error is the
    node's own); with retain_graph it gives the same gradient again; only the logits that require
    grad have an edge; the sides' gradients reach a graph upstream; a dual tensor (forward-mode
    AD) passed to the op itself is refused, not ignored."""
    x = torch.randn(6, 3, dtype=torch.float64)
    lin = nn.Linear(3, 1).double()
    r = lin(x)
    f = torch.randn(5, 1, dtype=torch.float64) * 2  # no grad
    with backend("cpu"):
        d = GF.discriminator_loss(r, f)
        g = GF.generator_loss(r)
    want = (ref.discriminator_loss(lin(x), f, "bce", "mean", 1.0), ref.generator_loss(lin(x), "bce", "mean"))
    gw_want = torch.autograd.grad(want[0] + want[1], lin.weight)[0]
    gw = torch.autograd.grad(d + g, lin.weight, retain_graph=True)[0]
    assert_close(gw, gw_want, torch.float64, "upstream gradient")
    gw2 = torch.autograd.grad(d + g, lin.weight)[0]
    assert torch.equal(gw, gw2)
    leaf = torch.randn(5, 1, dtype=torch.float64).requires_grad_()
    with backend("cpu"):
        gl = GF.generator_loss(leaf)
    assert gl.grad_fn.name() == "GanLossTrainBackward"
    torch.autograd.grad(gl, leaf)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(gl, leaf)
    # only fake requires grad: real has no edge, fake gets its gradient
    rr = torch.randn(4, 1, dtype=torch.float64)
    ff = torch.randn(4, 1, dtype=torch.float64).requires_grad_()
    with backend("cpu"):
        d = GF.discriminator_loss(rr, ff)
    assert d.grad_fn.next_functions[0][0] is None and d.grad_fn.next_functions[1][0] is not None
    d.backward()
    assert_close(ff.grad, torch.sigmoid(ff.detach()) / 4, torch.float64, "fake side")
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        dual = fwAD.make_dual(rr, torch.ones_like(rr))
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            torch.ops.genfast.gan_loss_train(None, dual, 0, True, 1, 1.0)


@pytest.mark.parametrize("red", ["mean", "none"])
def test_cpu_gan_loss_node_under_compiled_autograd(red):
    """The C++ node under compiled autograd (its compiled_args / apply_with_saved): the backward
    traced into a graph gives the eager gradients, on both sides."""
    from torch._dynamo import compiled_autograd
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    r0, f0 = torch.randn(6, 1), torch.randn(5, 1)
    grads = []
    for compiled in (False, True):
        r, f = r0.clone().requires_grad_(), f0.clone().requires_grad_()
        with backend("cpu"):
            d = GF.discriminator_loss(r, f, "bce", red)
            g = GF.generator_loss(f, "bce", red)
        loss = (d[0].sum() + d[1].sum() + g.sum()) if red == "none" else d + g
        ctx = (compiled_autograd._enable(torch.compile(backend="eager", fullgraph=True)) if compiled
               else contextlib.nullcontext())
        with ctx:
            loss.backward()
        grads.append((r.grad, f.grad))
    assert counters["compiled_autograd"]["captures"] == 1  # the backward ran as a captured graph
    torch._dynamo.reset()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)

def test_auto_takes_the_reference_losses_on_a_cpu_without_avx2(monkeypatch):
    """genfast._C's CPU loss kernels need AVX2/FMA/F16C: on a CPU without them `auto` resolves the
    losses (only) to the reference backend, with one warning, and the loss is still torch's."""
    from genfast import backend as B

    monkeypatch.setattr(B, "_CPU_LOSSES", [True])
    assert B.resolve("losses", torch.device("cpu")) == "cpu"
    monkeypatch.setattr(B, "_CPU_LOSSES", [False])
    monkeypatch.setattr(B, "_warned", set())
    with genfast.backend.use_backend("auto"):
        with pytest.warns(RuntimeWarning, match="lacks AVX2"):
            assert B.resolve("losses", torch.device("cpu")) == "reference"
        assert B.resolve("batchnorm_act", torch.device("cpu")) == "cpu"
        x = torch.randn(5, 1, dtype=torch.float64)
        got = GF.generator_loss(x)
    want = F.binary_cross_entropy_with_logits(x, torch.ones_like(x))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("red", ["mean", "sum", "none"])
def test_eager_cpu_gan_fast_path_matches_the_checked_path(kind, red):
    """GF.discriminator_loss / generator_loss take ops.losses.eager_gan for plain float CPU
    logits; its result and gradients are bitwise those of the checked path, and a bad argument
    still raises the checked path's exception."""
    from genfast.ops import losses as L

    r = (torch.randn(6, 1) * 3).requires_grad_()
    f = (torch.randn(5, 1) * 3).requires_grad_()
    label = 0.9 if kind in ("bce", "lsgan") else 1.0
    with backend("cpu"):
        assert L.eager_gan(r, f, kind, False, red, label) is not None
        fast = (GF.discriminator_loss(r, f, kind, red, real_label=label), GF.generator_loss(f, kind, red))
        slow = (L.discriminator_loss(r, f, kind, red, label), L.generator_loss(f, kind, red))
    flat = [t for out in (fast, slow) for o in out for t in (o if isinstance(o, tuple) else (o,))]
    half = len(flat) // 2
    for a, b in zip(flat[:half], flat[half:]):
        assert torch.equal(a, b)
        ga = torch.autograd.grad(a.sum(), (r, f), allow_unused=True, retain_graph=True)
        gb = torch.autograd.grad(b.sum(), (r, f), allow_unused=True, retain_graph=True)
        for x, y in zip(ga, gb):
            assert (x is None and y is None) or torch.equal(x, y)
    with backend("cpu"):
        with pytest.raises(ValueError, match="kind must be one of"):
            GF.discriminator_loss(r, f, "bogus")
        with pytest.raises(ValueError, match="real_label must be finite"):
            GF.discriminator_loss(r, f, "bce", real_label=float("inf"))
        with pytest.raises(RuntimeError, match="same dtype"):
            GF.discriminator_loss(r.double(), f, kind)


def test_first_loss_call_under_compile_fullgraph_in_a_fresh_interpreter():
    """In a fresh interpreter, the first GAN loss call of the process made while torch.compile
    traces (fullgraph=True, CPU): traced without a graph break (the CPU kernels' support was first
    asked of genfast._C during the trace, which dynamo cannot follow), and the loss and gradient
    are torch's BCE-with-logits ones."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, genfast.functional as GF\n"
        "import torch.nn.functional as F\n"
        "x = torch.randn(64, 1, dtype=torch.float64, requires_grad=True)\n"
        "f = torch.compile(lambda t: GF.generator_loss(t, kind='bce'), backend='aot_eager', fullgraph=True)\n"
        "y = f(x); (g,) = torch.autograd.grad(y, x)\n"
        "xr = x.detach().requires_grad_(); yr = F.binary_cross_entropy_with_logits(xr, torch.ones_like(xr))\n"
        "(gr,) = torch.autograd.grad(yr, xr)\n"
        "torch.testing.assert_close(y, yr); torch.testing.assert_close(g, gr)\n"
        "print('OK')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-4000:]


def _torch_d_loss(kind, r, f, real_label):
    if kind == "bce":
        return (F.binary_cross_entropy_with_logits(r, torch.full_like(r, real_label))
                + F.binary_cross_entropy_with_logits(f, torch.zeros_like(f)))
    if kind == "hinge":
        return torch.relu(1 - r).mean() + torch.relu(1 + f).mean()
    return (r - real_label).pow(2).mean() + f.pow(2).mean()  # lsgan


@pytest.mark.parametrize("kind", ["bce", "hinge", "lsgan"])
def test_compiled_discriminator_loss_with_changing_batch_and_dynamic_shapes(kind):
    """torch.compile(fullgraph=True) of the discriminator loss on the CPU, forward and backward,
    at batch 8 then 5 (the smaller last batch of an epoch: dynamo recompiles with a symbolic
    batch size, which the loss's C++ backward takes), and with dynamic=True; values and
    gradients as torch's formula in float64."""
    def loss(r, f):
        return GF.discriminator_loss(r, f, kind=kind)

    for dynamic in (None, True):
        torch._dynamo.reset()
        fn = torch.compile(loss, backend="aot_eager", fullgraph=True, dynamic=dynamic)
        for n in (8, 5):
            r = torch.randn(n, 1, requires_grad=True)
            f = torch.randn(n + 2, 1, requires_grad=True)
            out = fn(r, f)
            gr, gf = torch.autograd.grad(out, (r, f))
            rd, fd = r.detach().double().requires_grad_(), f.detach().double().requires_grad_()
            want = _torch_d_loss(kind, rd, fd, 1.0)
            wr, wf = torch.autograd.grad(want, (rd, fd))
            assert_close(out, want.float(), torch.float32)
            assert_close(gr, wr.float(), torch.float32)
            assert_close(gf, wf.float(), torch.float32)


def test_compiled_discriminator_loss_real_label_changing_between_calls():
    """A real_label passed as a changing Python float to a compiled (fullgraph) function, as a
    label-smoothing schedule does: traced (dynamo makes it a symbolic float on the second value)
    and each value used, as torch's formula."""
    torch._dynamo.reset()
    fn = torch.compile(lambda r, f, rl: GF.discriminator_loss(r, f, "bce", real_label=rl),
                       backend="aot_eager", fullgraph=True)
    r, f = torch.randn(8), torch.randn(8)
    for rl in (1.0, 0.9, 0.8):
        assert_close(fn(r, f, rl), _torch_d_loss("bce", r.double(), f.double(), rl).float(),
                     torch.float32)
