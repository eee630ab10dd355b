"""GAN, VAE and BCE losses in plain PyTorch: the textbook formulas in their stable forms
(softplus through log-sigmoid, never log(sigmoid(x) + eps)). Differentiable to any order.

Every loss computes in float32 for float16/bfloat16 inputs (float64 for float64) and returns
that dtype, as torch's autocast does for its losses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

GAN_KINDS = ("bce", "minimax", "hinge", "wasserstein", "lsgan")
GAN_REDUCTIONS = ("mean", "sum", "none")
VAE_RECON = ("mse", "bce", "bce_logits")
VAE_REDUCTIONS = ("sum", "batchmean")
ROLES = ("real", "fake", "gen")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(x)), stable for any x (softplus(-inf) = 0, softplus(inf) = inf)."""
    return -F.logsigmoid(-x)


def _mul_or_zero(c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # c * v with a coefficient of exactly 0 dropping the term (0 * inf would be NaN).
    return torch.where(c == 0, torch.zeros_like(v), c * v)


def bce_logits_terms(x, target, pos_weight=None):
    """Per-element BCE with logits: (1 - t) softplus(x) + p t softplus(-x), where
    softplus(x) - softplus(-x) = x makes it torch's (1 - t) x + (1 + (p - 1) t) softplus(-x).
    `target` may be a float (a constant label) or a tensor; NaN logits give NaN."""
    t = torch.as_tensor(target, dtype=x.dtype, device=x.device)
    p = 1.0 if pos_weight is None else pos_weight
    loss = _mul_or_zero(1 - t, softplus(x)) + _mul_or_zero(p * t, softplus(-x))
    return torch.where(torch.isnan(x), x, loss)


def gan_terms(x: torch.Tensor, kind: str, role: str, real_label: float = 1.0) -> torch.Tensor:
    """Per-element GAN loss terms of logits `x` (in float32 / float64) for one side:
    role "real" / "fake" (discriminator) or "gen" (generator)."""
    x = x.to(acc_dtype(x.dtype))
    if kind in ("bce", "minimax"):
        if role == "real":
            return bce_logits_terms(x, real_label)
        if role == "fake":
            return softplus(x)
        return softplus(-x) if kind == "bce" else -softplus(x)
    if kind == "hinge":
        if role == "real":
            return F.relu(1 - x)
        if role == "fake":
            return F.relu(1 + x)
        return -x
    if kind == "wasserstein":
        return x if role == "fake" else -x
    if kind == "lsgan":
        target = real_label if role == "real" else (0.0 if role == "fake" else 1.0)
        return (x - target) ** 2
    raise ValueError(f"kind must be one of {GAN_KINDS}, got {kind!r}")


def _reduce(terms: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return terms.mean()
    if reduction == "sum":
        return terms.sum()
    return terms


def discriminator_loss(real_logits, fake_logits, kind="bce", reduction="mean", real_label=1.0):
    """mean/sum: reduce(real terms) + reduce(fake terms); none: (real terms, fake terms)."""
    r = _reduce(gan_terms(real_logits, kind, "real", real_label), reduction)
    f = _reduce(gan_terms(fake_logits, kind, "fake"), reduction)
    if reduction == "none":
        return r, f
    return r + f


def generator_loss(fake_logits, kind="bce", reduction="mean"):
    return _reduce(gan_terms(fake_logits, kind, "gen"), reduction)


def bce_prob_terms(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """torch's binary_cross_entropy per element: -(t log p + (1 - t) log(1 - p)) with each log
    clamped at -100, and torch's gradient (p - t) / max(p (1 - p), 1e-12) (float32 1e-12)."""
    return F.binary_cross_entropy(p, t, reduction="none")


def kl_terms(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """-0.5 (1 + logvar - mu^2 - exp(logvar)) per latent element."""
    return 0.5 * (mu * mu + torch.expm1(logvar) - logvar)


def vae_loss(recon, target, mu, logvar, recon_loss="mse", beta=1.0, reduction="sum"):
    """(loss, recon_term, kl_term) with loss = recon_term + beta * kl_term; reduction "sum" or
    "batchmean" (both terms divided by recon.shape[0])."""
    acc = acc_dtype(recon.dtype)
    r, t = recon.to(acc), target.to(acc)
    if recon_loss == "mse":
        rec = ((r - t) ** 2).sum()
    elif recon_loss == "bce":
        rec = F.binary_cross_entropy(r, t, reduction="sum")
    elif recon_loss == "bce_logits":
        rec = bce_logits_terms(r, t).sum()
    else:
        raise ValueError(f"recon_loss must be one of {VAE_RECON}, got {recon_loss!r}")
    lacc = acc_dtype(mu.dtype)
    kl = kl_terms(mu.to(lacc), logvar.to(lacc)).sum().to(rec.dtype)
    if reduction == "batchmean":
        n = recon.shape[0] if recon.dim() > 0 else 1
        rec, kl = rec / n, kl / n
    return rec + beta * kl, rec, kl


def reparameterize(mu, logvar, eps):
    """mu + eps * exp(0.5 * logvar), in mu's dtype."""
    return mu + eps * torch.exp(0.5 * logvar)


def bce_with_logits(input, target, weight=None, pos_weight=None, reduction="mean"):
    """Per-element BCE with logits (optionally weighted), reduced; accumulates in float32."""
    acc = acc_dtype(input.dtype)
    terms = bce_logits_terms(input.to(acc), target.to(acc),
                             None if pos_weight is None else pos_weight.to(acc))
    if weight is not None:
        terms = terms * weight.to(acc)
    return _reduce(terms, reduction)


def bce(input, target, weight=None, reduction="mean"):
    acc = acc_dtype(input.dtype)
    w = None if weight is None else torch.broadcast_to(weight.to(acc), input.shape)
    return F.binary_cross_entropy(input.to(acc), target.to(acc), w, reduction=reduction)
