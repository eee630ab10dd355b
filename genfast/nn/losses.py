"""Loss modules: GANLoss and VAELoss (genfast's own), and BCEWithLogitsLoss / BCELoss, drop-ins
that subclass torch's and run the fused kernels."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from genfast import functional as GF
from genfast.backend import warn_once
from genfast.ops import losses as _loss


class GANLoss(nn.Module):
    """GAN losses of one kind: ``.discriminator(real_logits, fake_logits)`` and
    ``.generator(fake_logits)`` (see ``genfast.functional.discriminator_loss``).

    Args:
        kind: "bce" (default), "minimax", "hinge", "wasserstein" or "lsgan".
        reduction: "mean" (default), "sum" or "none".
        real_label: real-side target for "bce"/"minimax"/"lsgan" (keyword-only, default 1.0).
    ``forward(real_logits, fake_logits)`` is ``.discriminator``.
    """

    def __init__(self, kind: str = "bce", reduction: str = "mean", *, real_label: float = 1.0) -> None:
        super().__init__()
        _loss.check_kind(kind)
        _loss.check_reduction(reduction, _loss.REDUCTIONS)
        self.kind, self.reduction, self.real_label = kind, reduction, float(real_label)

    def discriminator(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        return GF.discriminator_loss(real_logits, fake_logits, self.kind, self.reduction,
                                     real_label=self.real_label)

    def generator(self, fake_logits: Tensor) -> Tensor:
        return GF.generator_loss(fake_logits, self.kind, self.reduction)

    def forward(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        return self.discriminator(real_logits, fake_logits)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, reduction={self.reduction!r}, real_label={self.real_label}"


class VAELoss(nn.Module):
    """``forward(recon, target, mu, logvar)``: reconstruction + beta * KL, fused
    (see ``genfast.functional.vae_loss``).

    Args:
        recon_loss: "mse" (default), "bce" (recon holds probabilities) or "bce_logits".
        beta: KL weight (default 1.0).
        reduction: "sum" (default) or "batchmean".
        return_parts: keyword-only; forward returns (loss, recon_term, kl_term).
    """

    def __init__(self, recon_loss: str = "mse", beta: float = 1.0, reduction: str = "sum", *,
                 return_parts: bool = False) -> None:
        super().__init__()
        if recon_loss not in _loss.VAE_RECON:
            raise ValueError(f"recon_loss must be one of {tuple(_loss.VAE_RECON)}, got {recon_loss!r}")
        _loss.check_reduction(reduction, _loss.VAE_REDUCTIONS)
        self.recon_loss, self.beta, self.reduction = recon_loss, float(beta), reduction
        self.return_parts = bool(return_parts)

    def forward(self, recon: Tensor, target: Tensor, mu: Tensor, logvar: Tensor
                ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        return GF.vae_loss(recon, target, mu, logvar, recon_loss=self.recon_loss, beta=self.beta,
                           reduction=self.reduction, return_parts=self.return_parts)

    def extra_repr(self) -> str:
        return f"recon_loss={self.recon_loss!r}, beta={self.beta}, reduction={self.reduction!r}"


def _out_dtype(input: Tensor, target: Tensor) -> torch.dtype:
    # torch returns the loss in the promoted input/target dtype (float32 under autocast, which
    # casts both to float32 first); genfast's kernels return float32 for 16-bit inputs.
    if _loss.autocast_enabled(input.device):
        return torch.float32
    if input.dtype == target.dtype:
        return input.dtype
    return torch.promote_types(input.dtype, target.dtype)


def _check_bce(input: object, target: object, name: str) -> None:
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{name}: input and target must be Tensors")
    if target.size() != input.size():
        raise ValueError(f"Using a target size ({target.size()}) that is different to the input size "
                         f"({input.size()}) is deprecated. Please ensure they have the same size.")
    if not input.is_floating_point() or not target.is_floating_point():
        raise RuntimeError(f"{name}: input and target must be floating-point, got {input.dtype} and {target.dtype}")


class BCEWithLogitsLoss(nn.BCEWithLogitsLoss):
    """Drop-in ``nn.BCEWithLogitsLoss`` (same arguments, buffers and state_dict) on genfast's
    fused loss kernel: the loss and its gradient in one pass. weight and pos_weight broadcast as
    in torch (pos_weight along the last dimension)."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        _check_bce(input, target, "BCEWithLogitsLoss")
        _loss.check_reduction(self.reduction, _loss.REDUCTIONS)
        input, target = _loss.autocast_float32(input, target)
        if target.dtype not in (input.dtype, _loss._acc(input.dtype)):
            warn_once("bce-logits-dtype", "genfast BCEWithLogitsLoss: target dtype differs from input's (and "
                      "is not float32); running torch's implementation")
            return super().forward(input, target)
        out = _loss.bce_loss(input, target, self.weight, self.pos_weight, self.reduction, True)
        dt = _out_dtype(input, target)
        return out if out.dtype == dt else out.to(dt)


class BCELoss(nn.BCELoss):
    """Drop-in ``nn.BCELoss`` (input holds probabilities; logs clamped at -100 as in torch) on
    genfast's fused loss kernel."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        _check_bce(input, target, "BCELoss")
        _loss.check_reduction(self.reduction, _loss.REDUCTIONS)
        if _loss.autocast_enabled(input.device):
            # torch refuses binary_cross_entropy under autocast; keep its exception.
            return super().forward(input, target)
        if target.dtype not in (input.dtype, _loss._acc(input.dtype)):
            warn_once("bce-dtype", "genfast BCELoss: target dtype differs from input's (and is not "
                      "float32); running torch's implementation")
            return super().forward(input, target)
        out = _loss.bce_loss(input, target, self.weight, None, self.reduction, False)
        dt = _out_dtype(input, target)
        return out if out.dtype == dt else out.to(dt)
