"""Losses and the transposed convolution at the edges, against torch's own formulas on the same
inputs: double backward with one side detached or one tensor passed twice, BCE targets outside
[0, 1], and a transposed convolution output modified in place before the backward."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import genfast
import genfast.functional as GF
import genfast.nn as gnn
from tests.utils import CPU_BACKENDS, backend


def _torch_d_loss(kind, r, f):
    if kind == "bce":
        return (F.binary_cross_entropy_with_logits(r, torch.ones_like(r))
                + F.binary_cross_entropy_with_logits(f, torch.zeros_like(f)))
    if kind == "hinge":
        return F.relu(1 - r).mean() + F.relu(1 + f).mean()
    return ((r - 1) ** 2).mean() + (f ** 2).mean()  # lsgan, real label 1


def _grads_2nd(loss_fn, wrt):
    """First gradients (create_graph) and the gradient of their squared norm."""
    g = torch.autograd.grad(loss_fn(), wrt, create_graph=True)
    h = torch.autograd.grad(sum(t.pow(2).sum() for t in g), wrt)
    return g, h


def _close_pairs(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
@pytest.mark.parametrize("kind", ["bce", "hinge", "lsgan"])
@pytest.mark.parametrize("side", ["real", "fake"])
def test_double_backward_one_side_detached(backend_name, kind, side):
    torch.manual_seed(0)
    r = torch.randn(5, dtype=torch.float64) * 2
    f = torch.randn(3, dtype=torch.float64) * 2
    x = (r if side == "real" else f).requires_grad_()
    with backend(backend_name):
        got = _grads_2nd(lambda: GF.discriminator_loss(r, f, kind), [x])
    want = _grads_2nd(lambda: _torch_d_loss(kind, r, f), [x])
    _close_pairs(got[0], want[0])
    _close_pairs(got[1], want[1])


@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
@pytest.mark.parametrize("kind", ["bce", "hinge", "lsgan"])
def test_double_backward_same_tensor_both_sides(backend_name, kind):
    torch.manual_seed(1)
    x = (torch.randn(6, dtype=torch.float64) * 2).requires_grad_()
    with backend(backend_name):
        got = _grads_2nd(lambda: GF.discriminator_loss(x, x, kind), [x])
    want = _grads_2nd(lambda: _torch_d_loss(kind, x, x), [x])
    _close_pairs(got[0], want[0])
    _close_pairs(got[1], want[1])


def test_vae_double_backward_mu_passed_as_logvar():
    torch.manual_seed(2)
    m = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    rc = torch.rand(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.rand(3, 5, dtype=torch.float64)

    def torch_vae():
        return F.mse_loss(rc, t, reduction="sum") - 0.5 * torch.sum(1 + m - m.pow(2) - m.exp())

    got = _grads_2nd(lambda: GF.vae_loss(rc, t, m, m, recon_loss="mse"), [rc, m])
    want = _grads_2nd(torch_vae, [rc, m])
    _close_pairs(got[0], want[0])
    _close_pairs(got[1], want[1])


# --- BCE targets outside [0, 1] -------------------------------------------------------------

@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [2.0, -0.5, float("nan")])
def test_bce_target_outside_unit_raises_like_torch(backend_name, bad):
    torch.manual_seed(3)
    x = torch.rand(4, 5).clamp(0.05, 0.95)
    t = torch.rand(4, 5)
    t[1, 2] = bad
    with pytest.raises(RuntimeError, match="target should be between 0 and 1"):
        F.binary_cross_entropy(x, t)
    with backend(backend_name):
        with pytest.raises(RuntimeError, match="target should be between 0 and 1"):
            gnn.BCELoss()(x, t)
        mu, lv = torch.randn(4, 3), torch.randn(4, 3)
        with pytest.raises(RuntimeError, match="target should be between 0 and 1"):
            GF.vae_loss(x, t, mu, lv, recon_loss="bce")
        # both out of range: torch names whichever element it meets first; either message
        x2 = x.clone()
        x2[0, 0] = 1.5
        with pytest.raises(RuntimeError, match="should be between 0 and 1"):
            gnn.BCELoss()(x2, t)
        # targets of exactly 0 and 1 are fine, and give torch's value
        t2 = (torch.rand(4, 5) > 0.5).float()
        torch.testing.assert_close(gnn.BCELoss()(x, t2), F.binary_cross_entropy(x, t2))
        # logits take any target (torch does not check it)
        torch.testing.assert_close(gnn.BCEWithLogitsLoss()(x, t.nan_to_num(2.0)),
                                   F.binary_cross_entropy_with_logits(x, t.nan_to_num(2.0)))


# --- the transposed convolution's output modified in place -----------------------------------

@pytest.mark.parametrize("stride", [1, 2])
def test_conv_transpose_output_modified_in_place(stride):
    """Without an activation the output is not saved: an in-place op on it (e.g. an in-place
    ReLU right after, as in many generators) leaves the backward as torch's."""
    torch.manual_seed(4)
    m = nn.Sequential(nn.ConvTranspose2d(3, 4, 3, stride, 1, output_padding=stride - 1),
                      nn.ReLU(inplace=True)).double()
    g = genfast.convert(copy.deepcopy(m))
    assert isinstance(g[0], gnn.ConvTranspose2d)
    x0 = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    dy = None
    grads = []
    for model in (m, g):
        x = x0.clone().requires_grad_()
        y = model(x)  # the in-place ReLU modifies the transposed convolution's output
        dy = torch.randn_like(y) if dy is None else dy
        y.backward(dy)
        grads.append([x.grad] + [p.grad for p in model.parameters()])
    _close_pairs(grads[1], grads[0])
    # the functional form, weight only
    w = torch.randn(3, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    y = GF.conv_transpose2d(x0, w, stride=stride)
    y.mul_(3.0)
    (gw,) = torch.autograd.grad(y.sum(), w)
    w2 = w.detach().requires_grad_()
    y2 = F.conv_transpose2d(x0, w2, stride=stride)
    y2.mul_(3.0)
    (gw2,) = torch.autograd.grad(y2.sum(), w2)
    torch.testing.assert_close(gw, gw2)


# --- reduction "none": each side's terms depend on that side alone ----------------------------

def _bce_terms(x, target):
    return F.binary_cross_entropy_with_logits(x, torch.full_like(x, target), reduction="none")


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_gan_none_terms_one_side_backward_leaves_other_grad_none(backend_name):
    """Backpropagating only the fake terms leaves real.grad None (torch's separate ops), not
    zeros that momentum or weight decay would still act on; the fake gradient is torch's."""
    torch.manual_seed(2)
    r = torch.randn(4, dtype=torch.float64, requires_grad=True)
    f = torch.randn(3, dtype=torch.float64, requires_grad=True)
    with backend(backend_name):
        _, fake_terms = GF.discriminator_loss(r, f, "bce", "none")
    fake_terms.sum().backward()
    assert r.grad is None
    f_ref = f.detach().clone().requires_grad_()
    _bce_terms(f_ref, 0.0).sum().backward()
    torch.testing.assert_close(f.grad, f_ref.grad)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("side", ["real", "fake"])
def test_gan_none_terms_require_grad_per_side(backend_name, side):
    """A side whose logits need no gradient gets terms that need none either (torch: False), and
    backpropagating them raises torch's error instead of giving the other side zeros."""
    torch.manual_seed(3)
    r = torch.randn(4, requires_grad=side == "real")  # side: the one whose logits need a gradient
    f = torch.randn(3, requires_grad=side == "fake")
    with backend(backend_name):
        real_terms, fake_terms = GF.discriminator_loss(r, f, "bce", "none")
    plain, tracked = (real_terms, fake_terms) if side == "fake" else (fake_terms, real_terms)
    assert not plain.requires_grad and tracked.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        plain.sum().backward()
    assert (r.grad, f.grad) == (None, None)
    tracked.sum().backward()
    got = f.grad if side == "fake" else r.grad
    x_ref = (f if side == "fake" else r).detach().clone().requires_grad_()
    _bce_terms(x_ref, 0.0 if side == "fake" else 1.0).sum().backward()
    torch.testing.assert_close(got, x_ref.grad)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gan_inference_tensor_on_side_without_grad(backend_name, reduction):
    """Real logits made under inference_mode (they need no gradient) with fake logits that do:
    torch's loss takes them; so does genfast's (the side needing no gradient is not saved), with
    torch's value, gradient and create_graph gradient."""
    torch.manual_seed(4)
    with torch.inference_mode():
        r = torch.randn(5, dtype=torch.float64)
    f = torch.randn(5, dtype=torch.float64, requires_grad=True)
    with backend(backend_name):
        out = GF.discriminator_loss(r, f, "bce", reduction)
    want_terms = (_bce_terms(r.clone(), 1.0), _bce_terms(f, 0.0))
    loss = out[1].sum() if reduction == "none" else out
    want = want_terms[1].sum() if reduction == "none" else sum(t.mean() for t in want_terms)
    torch.testing.assert_close(loss.detach(), want.detach())
    (g,) = torch.autograd.grad(loss, f, create_graph=True)
    (g_want,) = torch.autograd.grad(want, f, create_graph=True)
    torch.testing.assert_close(g, g_want)
    # the create_graph gradient is differentiable: its own gradient is torch's
    torch.testing.assert_close(torch.autograd.grad(g.pow(2).sum(), f)[0],
                               torch.autograd.grad(g_want.pow(2).sum(), f)[0])


# --- hinge at NaN logits ----------------------------------------------------------------------

@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_hinge_backward_passes_gradient_at_nan(backend_name, dtype, reduction):
    """relu(1 - x)'s backward zeroes the gradient only where 1 - x <= 0 (torch's
    threshold_backward): a NaN logit passes it (-1 real, +1 fake), in the fused backward as in
    the create_graph one."""
    nan = float("nan")
    r0 = torch.tensor([nan, 0.5, 2.0, 1.0], dtype=dtype)
    f0 = torch.tensor([-0.5, nan, -2.0, -1.0], dtype=dtype)

    def grads(fn, create_graph):
        r, f = r0.clone().requires_grad_(), f0.clone().requires_grad_()
        out = fn(r, f)
        loss = out[0].sum() + out[1].sum() if reduction == "none" else out
        return torch.autograd.grad(loss, (r, f), create_graph=create_graph)

    def torch_loss(r, f):
        terms = (F.relu(1 - r), F.relu(1 + f))
        if reduction == "none":
            return terms
        return sum(t.sum() if reduction == "sum" else t.mean() for t in terms)

    want = grads(torch_loss, False)
    for create_graph in (False, True):
        with backend(backend_name):
            got = grads(lambda r, f: GF.discriminator_loss(r, f, "hinge", reduction), create_graph)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.detach(), b, equal_nan=True)


@pytest.mark.parametrize("backend_name", ["cpu", "triton"])
def test_gan_registered_op_autograd_per_side(backend_name):
    """torch.ops.genfast.gan_loss (the op torch.compile's graphs call) under autograd, as the
    eager paths: with reduction none, the terms of a side without grad need none (their backward
    raises torch's error), and backpropagating one side's terms leaves the other's .grad None;
    reduced, the second (empty) output needs no grad."""
    op = torch.ops.genfast.gan_loss
    torch.manual_seed(8)
    r, f = torch.randn(4, dtype=torch.float64), torch.randn(3, dtype=torch.float64, requires_grad=True)
    out_r, out_f, _ = op(r, f, 0, False, 0, 1.0, backend_name)
    assert not out_r.requires_grad and out_f.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        out_r.sum().backward()
    r.requires_grad_()
    out_r, out_f, _ = op(r, f, 0, False, 0, 1.0, backend_name)
    out_f.sum().backward()
    assert r.grad is None
    f_ref = f.detach().clone().requires_grad_()
    _bce_terms(f_ref, 0.0).sum().backward()
    torch.testing.assert_close(f.grad, f_ref.grad)
    loss, empty, _ = op(r, f, 0, False, 1, 1.0, backend_name)
    assert loss.requires_grad and not empty.requires_grad


@pytest.mark.parametrize("backend_name", ["cpu", "triton"])
@pytest.mark.parametrize("saved_is_output", [False, True])
def test_backward_fake_strides_match_the_kernel(backend_name, saved_is_output):
    """The registered backward's fake gives the strides its kernel returns for a saved tensor in
    neither layout the kernels read in place (a permuted 4-D tensor, read through a contiguous
    copy) and for an empty sequence batch (found by a review)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for saved in (torch.randn(2, 5, 4, 3).permute(0, 2, 1, 3), torch.randn(0, 5, 4).transpose(1, 2)):
        C = saved.shape[1]
        dy = torch.randn(saved.shape)
        w, b = torch.rand(C) + 0.5, torch.randn(C)
        mean, invstd = torch.randn(C), torch.rand(C) + 0.5
        args = (True, 2, 0.2, 1e-3 if saved_is_output else 0.0, saved_is_output)
        with genfast.backend.use_backend(backend_name):
            real = torch.ops.genfast.batch_norm_act_bwd(dy, saved, w, b, mean, invstd, *args)[0]
        with FakeTensorMode() as mode:
            fs, fdy, fw, fb, fm, fi = (mode.from_tensor(t) for t in (saved, dy, w, b, mean, invstd))
            fake = torch.ops.genfast.batch_norm_act_bwd(fdy, fs, fw, fb, fm, fi, *args)[0]
        assert fake.stride() == real.stride(), (tuple(saved.stride()), fake.stride(), real.stride())
