"""The genfast loss ops (GAN, VAE, BCE, reparameterisation): fake implementations, autograd and
backend choice.

Ops (each with a `backend` argument: "cpu"/"cuda" call the C++ ops of the same name + "_fwd"
(schemas in csrc/ops.cpp), "triton" calls genfast/kernels/losses.py):
  genfast::gan_loss        D or G loss of logits: (out_real, out_fake, saved_grad)
  genfast::vae_loss        reconstruction + beta * KL: (loss, parts, saved_grad)
  genfast::bce_loss        BCE / BCE-with-logits with a target tensor: (out, saved_grad)
  genfast::loss_backward   backward of the three: saved_grad times the incoming gradient
  genfast::reparameterize_fwd / _bwd
Every loss forward computes the derivative of the loss in the same pass and saves it; the
backward only scales it. When the backward must itself be differentiable (create_graph=True),
the gradient is recomputed from the reference formulas instead.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from genfast import backend as B
from genfast.reference import losses as ref

FAMILY = "losses"

GAN_KINDS = {"bce": 0, "minimax": 1, "hinge": 2, "wasserstein": 3, "lsgan": 4}
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
VAE_RECON = {"mse": 0, "bce": 1, "bce_logits": 2}
VAE_REDUCTIONS = {"sum": 2, "batchmean": 3}

_lib = torch.library.Library("genfast", "FRAGMENT")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return ref.acc_dtype(dtype)


# --- fakes ---------------------------------------------------------------------------------------

def _gan_fake(real, fake, kind, generator, reduction, real_label):
    any_ = real if real is not None else fake
    acc = _acc(any_.dtype)
    n = (real.numel() if real is not None else 0) + (fake.numel() if fake is not None else 0)
    grad = any_.new_empty((n,), dtype=acc)
    if reduction == REDUCTIONS["none"]:
        out_r = real.new_empty(real.shape, dtype=acc) if real is not None else any_.new_empty((0,), dtype=acc)
        out_f = fake.new_empty(fake.shape, dtype=acc) if fake is not None else any_.new_empty((0,), dtype=acc)
    else:
        out_r = any_.new_empty((), dtype=acc)
        out_f = any_.new_empty((0,), dtype=acc)
    return out_r, out_f, grad


def _scale_fake(coef_a, coef_b, saved, split, dtype_a, dtype_b):
    n = saved.numel()
    return saved.new_empty((split,), dtype=dtype_a), saved.new_empty((n - split,), dtype=dtype_b)


def _vae_fake(recon, target, mu, logvar, recon_kind, beta, reduction):
    acc = _acc(recon.dtype)
    n = recon.numel() + 2 * mu.numel()
    return recon.new_empty((), dtype=acc), recon.new_empty((2,), dtype=acc), recon.new_empty((n,), dtype=acc)


def _bce_fake(input, target, weight, pos_weight, reduction, logits):
    acc = _acc(input.dtype)
    out = input.new_empty(input.shape if reduction == REDUCTIONS["none"] else (), dtype=acc)
    return out, input.new_empty((input.numel(),), dtype=acc)


def _reparam_fwd_fake(mu, logvar, eps):
    return torch.empty_like(mu, memory_format=torch.contiguous_format)


def _reparam_bwd_fake(grad_z, logvar, eps):
    return torch.empty_like(logvar, memory_format=torch.contiguous_format)


HAS_CPP_OPS = B.has_cpu_ext()
if HAS_CPP_OPS:
    # asked of genfast._C now and cached: a first call made while torch.compile traces a loss
    # would reach the pybind11 function, which dynamo cannot trace (fullgraph=True raised)
    B.cpu_losses_supported()


def _gan_train_fake(real, fake, kind, generator, reduction, real_label):
    out_r, out_f, _ = _gan_fake(real, fake, kind, generator, reduction, real_label)
    return out_r, out_f


if HAS_CPP_OPS:
    torch.library.register_fake("genfast::gan_loss_train", _gan_train_fake, lib=_lib)
    for _name, _fn in (("gan_loss_fwd", _gan_fake), ("loss_scale_grad", _scale_fake),
                       ("vae_loss_fwd", _vae_fake), ("bce_loss_fwd", _bce_fake),
                       ("reparam_fwd", _reparam_fwd_fake), ("reparam_bwd", _reparam_bwd_fake)):
        torch.library.register_fake(f"genfast::{_name}", _fn, lib=_lib)


# --- kernel choice -------------------------------------------------------------------------------

def _kernel(name: str, backend: str):
    if backend in ("cpu", "cuda"):
        return getattr(torch.ops.genfast, name)
    if backend == "triton":
        from genfast.kernels import losses as K

        return getattr(K, name)
    raise ValueError(f"losses: backend must be 'cpu', 'cuda' or 'triton', got {backend!r}")


# --- registered ops ------------------------------------------------------------------------------

@torch.library.custom_op("genfast::gan_loss", mutates_args=())
def gan_loss_op(real: Optional[Tensor], fake: Optional[Tensor], kind: int, generator: bool,
                reduction: int, real_label: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _kernel("gan_loss_fwd", backend)(real, fake, kind, generator, reduction, real_label)


@gan_loss_op.register_fake
def _(real, fake, kind, generator, reduction, real_label, backend):
    return _gan_fake(real, fake, kind, generator, reduction, real_label)


@torch.library.custom_op("genfast::loss_backward", mutates_args=())
def loss_backward_op(coef_a: Optional[Tensor], coef_b: Optional[Tensor], saved: Tensor, split: int,
                     dtype_a: torch.dtype, dtype_b: torch.dtype, backend: str) -> tuple[Tensor, Tensor]:
    return _kernel("loss_scale_grad", backend)(coef_a, coef_b, saved, split, dtype_a, dtype_b)


@loss_backward_op.register_fake
def _(coef_a, coef_b, saved, split, dtype_a, dtype_b, backend):
    return _scale_fake(coef_a, coef_b, saved, split, dtype_a, dtype_b)


@torch.library.custom_op("genfast::vae_loss", mutates_args=())
def vae_loss_op(recon: Tensor, target: Tensor, mu: Tensor, logvar: Tensor, recon_kind: int,
                beta: float, reduction: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _kernel("vae_loss_fwd", backend)(recon, target, mu, logvar, recon_kind, beta, reduction)


@vae_loss_op.register_fake
def _(recon, target, mu, logvar, recon_kind, beta, reduction, backend):
    return _vae_fake(recon, target, mu, logvar, recon_kind, beta, reduction)


@torch.library.custom_op("genfast::bce_loss", mutates_args=())
def bce_loss_op(input: Tensor, target: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor],
                reduction: int, logits: bool, backend: str) -> tuple[Tensor, Tensor]:
    return _kernel("bce_loss_fwd", backend)(input, target, weight, pos_weight, reduction, logits)


@bce_loss_op.register_fake
def _(input, target, weight, pos_weight, reduction, logits, backend):
    return _bce_fake(input, target, weight, pos_weight, reduction, logits)


@torch.library.custom_op("genfast::reparameterize_fwd", mutates_args=())
def reparam_fwd_op(mu: Tensor, logvar: Tensor, eps: Tensor, backend: str) -> Tensor:
    return _kernel("reparam_fwd", backend)(mu, logvar, eps)


@reparam_fwd_op.register_fake
def _(mu, logvar, eps, backend):
    return _reparam_fwd_fake(mu, logvar, eps)


@torch.library.custom_op("genfast::reparameterize_bwd", mutates_args=())
def reparam_bwd_op(grad_z: Tensor, logvar: Tensor, eps: Tensor, backend: str) -> Tensor:
    return _kernel("reparam_bwd", backend)(grad_z, logvar, eps)


@reparam_bwd_op.register_fake
def _(grad_z, logvar, eps, backend):
    return _reparam_bwd_fake(grad_z, logvar, eps)


# --- autograd ------------------------------------------------------------------------------------
# The cpu and cuda backends call the C++ dispatcher ops directly (they have fakes, so
# torch.compile traces them): the Python custom-op layer costs about 20 us per call on the CPU,
# as much as a small loss kernel. The triton backend goes through the registered Python ops.

def _call(cpp_name: str, py_op, backend: str, *args):
    backend = B.at_run(FAMILY, backend, next(a for a in args if isinstance(a, Tensor)).device)
    if backend == "cpu" or backend == "cuda":
        # the OpOverload itself (no cache written here: this runs inside traced backwards too)
        return getattr(torch.ops.genfast, cpp_name).default(*args)
    return py_op(*args, backend)


# torch.autograd.Function (not register_autograd) so that outputs the caller does not use get no
# materialised zero gradients: a reduced loss's backward is exactly one loss_backward launch.

def _ref_grads(fn, inputs, outputs_grads):
    """Gradients of the reference formulas, differentiable (the create_graph=True path).
    ``fn(*inputs)`` computes the outputs. Each input that requires grad reaches fn as a view of
    its own, so that the gradient w.r.t. each argument is that argument's partial derivative
    even when one tensor is passed as two arguments (their sum is then the full derivative,
    once), and the result stays differentiable in the input itself. Outputs that do not depend
    on any input that requires grad contribute nothing."""
    with torch.enable_grad():
        args = [t.view_as(t) if (t is not None and t.requires_grad) else t for t in inputs]
        outs = fn(*args)
        if not isinstance(outs, tuple):
            outs = (outs,)
        pairs = [(o, g) for o, g in zip(outs, outputs_grads) if g is not None and o.requires_grad]
        wanted = [a for a, t in zip(args, inputs) if t is not None and t.requires_grad]
        if not pairs or not wanted:
            return [None for _ in inputs]
        got = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                  create_graph=True, allow_unused=True)
    it = iter(got)
    return [next(it) if (t is not None and t.requires_grad) else None for t in inputs]


class GanLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, real, fake, kind, generator, reduction, real_label, backend):
        out_r, out_f, grad = _call("gan_loss_fwd", gan_loss_op, backend, real, fake, kind, generator, reduction,
                                   real_label)
        _gan_save(ctx, grad, real, fake, out_r, out_f, (kind, generator, reduction, real_label, backend))
        return out_r, out_f

    @staticmethod
    def backward(ctx, g_r, g_f):
        grad, real, fake = ctx.saved_tensors
        real_meta, (fake_shape, fake_dtype) = ctx.meta
        kind, generator, reduction, real_label, backend = ctx.cfg
        none = reduction == REDUCTIONS["none"]
        coef_a, coef_b = (g_r, g_f) if none else (g_r, g_r)
        if coef_a is None and coef_b is None:
            return None, None, None, None, None, None, None
        if torch.is_grad_enabled():
            if fake is None:  # needs no gradient: its term is formed on zeros, not differentiated
                fake = torch.zeros(fake_shape, dtype=fake_dtype, device=grad.device)
            dr, df = _gan_ref_grads(real, fake, coef_a, coef_b, kind, generator, reduction, real_label)
        else:
            nr = real_meta[0].numel() if real_meta is not None else 0
            dt_r = real_meta[1] if real_meta is not None else grad.dtype
            ga, gb = _call("loss_scale_grad", loss_backward_op, backend, coef_a, coef_b, grad, nr, dt_r,
                           fake_dtype)
            dr = ga.view(real_meta[0]) if real_meta is not None else None
            df = gb.view(fake_shape)
        # a side that needs none, or (reduction none) whose terms got no gradient, gets None
        if not ctx.needs_input_grad[0] or (none and g_r is None):
            dr = None
        if not ctx.needs_input_grad[1] or (none and g_f is None):
            df = None
        return dr, df, None, None, None, None, None


def _gan_save(ctx, grad, real, fake, out_r, out_f, cfg, *non_differentiable):
    """The GAN loss's backward state (GanLossFunction and the registered op's autograd): the
    logits only where their side needs a gradient (the create_graph backward differentiates
    those alone; a side that needs none may be an inference tensor, which cannot be saved), and
    with reduction none each side's terms differentiable only when that side is (they depend on
    it alone, as torch's separate ops). `non_differentiable`: further outputs to mark (one
    mark_non_differentiable call: each call replaces the previous marks). Incoming gradients are
    not materialised, so a side whose terms got none is told apart from a zero gradient."""
    real_grad = real is not None and real.requires_grad
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad, real if real_grad else None, fake if fake.requires_grad else None)
    ctx.meta = (None if real is None else (real.shape, real.dtype), (fake.shape, fake.dtype))
    ctx.cfg = cfg
    marks = list(non_differentiable)
    if cfg[2] != REDUCTIONS["none"]:
        marks.append(out_f)
    else:
        if not real_grad:
            marks.append(out_r)
        if not fake.requires_grad:
            marks.append(out_f)
    ctx.mark_non_differentiable(*marks)


def _gan_ref_grads(real, fake, coef_a, coef_b, kind, generator, reduction, real_label):
    """Differentiable gradients w.r.t. (real, fake) of the reference GAN terms, reduced, against
    the incoming gradients coef_a (real side, or the reduced loss) and coef_b (fake side); None
    for a side that is missing or needs none (the create_graph=True backward)."""
    names = {v: k for k, v in GAN_KINDS.items()}
    red = {v: k for k, v in REDUCTIONS.items()}[reduction]

    def fn(r, f):
        outs = []
        if r is not None:
            outs.append(_reduce_ref(ref.gan_terms(r, names[kind], "real", real_label), red))
        outs.append(_reduce_ref(ref.gan_terms(f, names[kind], "gen" if generator else "fake"), red))
        return tuple(outs)

    grads_out = ([coef_a] if real is not None else []) + [coef_b]
    dr, df = _ref_grads(fn, (real, fake), grads_out)
    return dr, df


def _gan_ref_grad(real, fake, coef_a, coef_b, kind, generator, reduction, real_label):
    """Kernel of genfast::gan_loss_ref_grad (CompositeImplicitAutograd: differentiable):
    _gan_ref_grads with an empty tensor for a missing real gradient and zeros for fake's."""
    dr, df = _gan_ref_grads(real, fake, coef_a, coef_b, kind, generator, reduction, real_label)
    dr = dr if dr is not None else fake.new_empty((0,))
    df = df if df is not None else torch.zeros_like(fake)
    return dr, df


def _reduce_ref(terms, reduction):
    if reduction == "mean":
        return terms.mean()
    if reduction == "sum":
        return terms.sum()
    return terms


class VaeLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, recon, target, mu, logvar, recon_kind, beta, reduction, backend):
        loss, parts, grad = _call("vae_loss_fwd", vae_loss_op, backend, recon, target, mu, logvar, recon_kind, beta,
                                  reduction)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(parts)
        ctx.save_for_backward(grad, recon, target, mu, logvar)
        ctx.cfg = (recon_kind, beta, reduction, backend)
        return loss, parts

    @staticmethod
    def backward(ctx, g_loss, g_parts):
        grad, recon, target, mu, logvar = ctx.saved_tensors
        recon_kind, beta, reduction, backend = ctx.cfg
        if g_loss is None:
            return (None,) * 8
        if torch.is_grad_enabled():
            rk = {v: k for k, v in VAE_RECON.items()}[recon_kind]
            red = {v: k for k, v in VAE_REDUCTIONS.items()}[reduction]
            dr, dm, dl = _ref_grads(lambda r, m, lv: ref.vae_loss(r, target, m, lv, rk, beta, red)[0],
                                    (recon, mu, logvar), [g_loss])
            return dr, None, dm, dl, None, None, None, None
        n, nz = recon.numel(), mu.numel()
        ga, gb = _call("loss_scale_grad", loss_backward_op, backend, g_loss, g_loss, grad, n, recon.dtype, mu.dtype)
        need = ctx.needs_input_grad
        return (ga.view(recon.shape) if need[0] else None, None,
                gb[:nz].view(mu.shape) if need[2] else None,
                gb[nz:].view(logvar.shape) if need[3] else None, None, None, None, None)


class BceLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, target, weight, pos_weight, reduction, logits, backend):
        out, grad = _call("bce_loss_fwd", bce_loss_op, backend, input, target, weight, pos_weight, reduction, logits)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad, input, target, weight, pos_weight)
        ctx.cfg = (reduction, logits, backend)
        return out

    @staticmethod
    def backward(ctx, g):
        grad, input, target, weight, pos_weight = ctx.saved_tensors
        reduction, logits, backend = ctx.cfg
        if g is None:
            return (None,) * 7
        if torch.is_grad_enabled():
            red = {v: k for k, v in REDUCTIONS.items()}[reduction]
            if logits:
                fn = lambda x: ref.bce_with_logits(x, target, weight, pos_weight, red)  # noqa: E731
            else:
                fn = lambda x: ref.bce(x, target, weight, red)  # noqa: E731
            (dx,) = _ref_grads(fn, (input,), [g])
            return dx, None, None, None, None, None, None
        ga, _ = _call("loss_scale_grad", loss_backward_op, backend, g, None, grad, input.numel(), input.dtype,
                      grad.dtype)
        return ga.view(input.shape), None, None, None, None, None, None


class ReparamFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu, logvar, eps, backend):
        z = _call("reparam_fwd", reparam_fwd_op, backend, mu, logvar, eps)
        ctx.save_for_backward(logvar, eps)
        ctx.backend = backend
        return z

    @staticmethod
    def backward(ctx, g):
        logvar, eps = ctx.saved_tensors
        need = ctx.needs_input_grad
        if not need[1]:
            return g, None, None, None
        if torch.is_grad_enabled():
            return g, 0.5 * g * eps * torch.exp(0.5 * logvar), None, None
        return g, _call("reparam_bwd", reparam_bwd_op, ctx.backend, g, logvar, eps), None, None


# Autograd formulas on the registered ops themselves (for callers of torch.ops.genfast.* and for
# opcheck / AOT tracing): the same backward as the Functions above. The saved-derivative outputs
# (and the VAE's parts) are not differentiable.

def _gan_setup(ctx, inputs, output):
    real, fake, kind, generator, reduction, real_label, backend = inputs
    _gan_save(ctx, output[2], real, fake, output[0], output[1], (kind, generator, reduction, real_label, backend),
              output[2])


def _vae_setup(ctx, inputs, output):
    recon, target, mu, logvar, recon_kind, beta, reduction, backend = inputs
    ctx.save_for_backward(output[2], recon, target, mu, logvar)
    ctx.cfg = (recon_kind, beta, reduction, backend)
    ctx.mark_non_differentiable(output[1], output[2])


def _bce_setup(ctx, inputs, output):
    input, target, weight, pos_weight, reduction, logits, backend = inputs
    ctx.save_for_backward(output[1], input, target, weight, pos_weight)
    ctx.cfg = (reduction, logits, backend)
    ctx.mark_non_differentiable(output[1])


def _reparam_setup(ctx, inputs, output):
    mu, logvar, eps, backend = inputs
    ctx.save_for_backward(logvar, eps)
    ctx.backend = backend


gan_loss_op.register_autograd(lambda ctx, g_r, g_f, _g: GanLossFunction.backward(ctx, g_r, g_f),
                              setup_context=_gan_setup)
vae_loss_op.register_autograd(lambda ctx, g_loss, g_parts, _g: VaeLossFunction.backward(ctx, g_loss, g_parts),
                              setup_context=_vae_setup)
bce_loss_op.register_autograd(lambda ctx, g, _g: BceLossFunction.backward(ctx, g), setup_context=_bce_setup)
reparam_fwd_op.register_autograd(ReparamFunction.backward, setup_context=_reparam_setup)

if HAS_CPP_OPS:
    _lib.impl("gan_loss_ref_grad", _gan_ref_grad, "CompositeImplicitAutograd")

# Autocast: the losses run in float32, as torch's own losses (binary_cross_entropy_with_logits,
# mse_loss, ...) do under autocast on both device types.
for _op in ("genfast::gan_loss", "genfast::vae_loss", "genfast::bce_loss"):
    for _dev in ("cpu", "cuda"):
        torch.library.register_autocast(_op, _dev, torch.float32, lib=_lib)


def autocast_enabled(device: torch.device) -> bool:
    """Whether an autocast region is active for this device type (False for device types autocast
    does not know, such as meta)."""
    t = device.type
    return (t == "cpu" or t == "cuda" or torch.amp.is_autocast_available(t)) and torch.is_autocast_enabled(t)


def autocast_float32(*ts):
    """torch's autocast rule for losses: inside an autocast region of the tensors' device type,
    float16/bfloat16 tensors are cast to float32 (float64 and None pass unchanged)."""
    first = ts[0] if isinstance(ts[0], Tensor) else next((t for t in ts if isinstance(t, Tensor)), None)
    if first is None or not autocast_enabled(first.device):
        return ts
    return tuple(t.float() if isinstance(t, Tensor) and t.dtype in (torch.float16, torch.bfloat16) else t
                 for t in ts)


# --- checks (torch's exception types, the argument named) ----------------------------------------

def check_reduction(reduction: str, allowed) -> None:
    if reduction not in allowed:
        raise ValueError(f"{reduction} is not a valid value for reduction (expected one of {tuple(allowed)})")


def check_kind(kind: str) -> None:
    if kind not in GAN_KINDS:
        raise ValueError(f"kind must be one of {tuple(GAN_KINDS)}, got {kind!r}")


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, not {type(t).__name__}")
    if not t.is_floating_point():
        raise RuntimeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_gan(real, fake, kind, reduction, real_label) -> None:
    check_kind(kind)
    check_reduction(reduction, REDUCTIONS)
    if real is not None:
        _check_tensor(real, "real_logits")
    _check_tensor(fake, "fake_logits")
    if real is not None:
        if real.device != fake.device:
            raise RuntimeError("Expected all tensors to be on the same device, but found real_logits on "
                               f"{real.device} and fake_logits on {fake.device}")
        if real.dtype != fake.dtype:
            raise RuntimeError(f"real_logits ({real.dtype}) and fake_logits ({fake.dtype}) must have the same dtype")
    if kind in ("hinge", "wasserstein") and real_label != 1.0:
        raise ValueError(f"real_label applies to kinds 'bce', 'minimax' and 'lsgan'; got real_label={real_label} "
                         f"with kind={kind!r}")
    # (comparisons rather than math.isfinite, which torch.compile cannot trace for a real_label
    # it treats as a symbolic float: dynamic=True, or a value that changed between calls)
    if not -math.inf < real_label < math.inf:
        raise ValueError(f"real_label must be finite, got {real_label}")


def _raise_shape_mismatch(recon, target, recon_loss) -> None:
    """The exception torch's reconstruction loss raises for recon and target of different shapes
    (F.binary_cross_entropy, F.binary_cross_entropy_with_logits, or F.mse_loss's broadcast)."""
    if recon_loss == "bce":
        raise ValueError(f"Using a target size ({target.size()}) that is different to the input size ({recon.size()}) "
                         "is deprecated. Please ensure they have the same size.")
    if recon_loss == "bce_logits":
        raise ValueError(f"Target size ({target.size()}) must be the same as input size ({recon.size()})")
    a, b = tuple(recon.shape), tuple(target.shape)
    nd = max(len(a), len(b))
    a, b = (1,) * (nd - len(a)) + a, (1,) * (nd - len(b)) + b
    for i in reversed(range(nd)):
        if a[i] != b[i] and a[i] != 1 and b[i] != 1:
            raise RuntimeError(f"The size of tensor a ({a[i]}) must match the size of tensor b ({b[i]}) at "
                               f"non-singleton dimension {i}")
    # Broadcastable: torch's mse_loss warns and broadcasts; the fused VAE loss refuses.
    raise ValueError(f"Using a target size ({target.size()}) that is different to the input size ({recon.size()}) "
                     "would broadcast (torch's mse_loss warns); vae_loss needs target and recon of the same shape")


def check_vae(recon, target, mu, logvar, recon_loss, reduction) -> None:
    if recon_loss not in VAE_RECON:
        raise ValueError(f"recon_loss must be one of {tuple(VAE_RECON)}, got {recon_loss!r}")
    check_reduction(reduction, VAE_REDUCTIONS)
    for t, name in ((recon, "recon"), (target, "target"), (mu, "mu"), (logvar, "logvar")):
        _check_tensor(t, name)
    if recon.shape != target.shape:
        _raise_shape_mismatch(recon, target, recon_loss)
    if mu.shape != logvar.shape:
        raise RuntimeError(f"mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)} must have the same shape")
    for t, name in ((target, "target"), (mu, "mu"), (logvar, "logvar")):
        if t.device != recon.device:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found recon on {recon.device} "
                               f"and {name} on {t.device}")
    if mu.dtype != logvar.dtype:
        raise RuntimeError(f"mu ({mu.dtype}) and logvar ({logvar.dtype}) must have the same dtype")
    if target.dtype not in (recon.dtype, _acc(recon.dtype)):
        raise RuntimeError(f"target must have recon's dtype ({recon.dtype}) or {_acc(recon.dtype)}, got {target.dtype}")
    if _acc(mu.dtype) != _acc(recon.dtype):
        raise RuntimeError(f"mu ({mu.dtype}) and recon ({recon.dtype}) must both be float64 or both not")


# --- entry points used by genfast.functional -----------------------------------------------------

def _backend(device: torch.device, *ts) -> str:
    # Meta tensors carry no data: the reference formulas give torch's output shapes and dtypes.
    if device.type == "meta" or B.composite_only(*ts):
        return "reference"
    return B.resolve(FAMILY, device)


def _needs_reference(*ts) -> bool:
    # Gradients w.r.t. a target (or a loss weight) are not computed by the fused kernels.
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def eager_gan(real, fake, kind, generator, reduction, real_label):
    """The GAN loss of the common eager CPU call (float32/float64 logits of one dtype on the CPU,
    checked in C++; a known kind and reduction, a valid real_label, the cpu backend by "auto" or
    pin, not being traced) straight through gan_loss_train; None for any other call, which then takes the
    checked path (and raises there when it must). The checks of discriminator_loss /
    generator_loss cost about as much Python as the op itself at DCGAN batch sizes. Under
    autocast float32/float64 logits are not cast (autocast_float32), so it needs no check here."""
    k = GAN_KINDS.get(kind) if isinstance(kind, str) else None
    red = REDUCTIONS.get(reduction) if isinstance(reduction, str) else None
    if (k is None or red is None or type(fake) is not Tensor
            or torch._C._has_torch_function((real, fake)) or B.composite_only(real, fake)):
        return None
    if not (HAS_CPP_OPS and B.eager_cpu(fake) and B.cpu_losses_supported()):
        return None  # (first: torch.compile does not trace math.isfinite of a symbolic float)
    if real_label != 1.0 and (k in (GAN_KINDS["hinge"], GAN_KINDS["wasserstein"])
                              or not math.isfinite(real_label)):
        return None
    # genfast::gan_loss_train through a pybind11 entry (csrc/eager_entries.cpp): torch.ops' Python
    # call cost as much as the loss kernel at DCGAN batch sizes
    try:
        out = B.extension().gan_loss_eager(real, fake, k, generator, red, float(real_label))
    except TypeError:  # an argument the C++ signature does not take: the checked path raises
        return None
    if out is None:
        return None
    r, f = out
    if red == REDUCTIONS["none"]:
        return f if generator else (r, f)
    return r


def _gan(real, fake, kind, generator, reduction, real_label, name):
    if name == "cpu" and HAS_CPP_OPS and (not torch.compiler.is_compiling() or B.inductor_cpu(fake)):
        # eager CPU calls and torch.compile's CPU graphs: the op with its autograd in C++
        # (csrc/loss_autograd.cpp), which the compiled graph calls without Python
        return torch.ops.genfast.gan_loss_train.default(real, fake, GAN_KINDS[kind], generator,
                                                        REDUCTIONS[reduction], float(real_label))
    return GanLossFunction.apply(real, fake, GAN_KINDS[kind], generator, REDUCTIONS[reduction],
                                 float(real_label), B.for_op(name))


def discriminator_loss(real, fake, kind, reduction, real_label):
    name = _backend(fake.device, real, fake)
    if name == "reference":
        return ref.discriminator_loss(real, fake, kind, reduction, real_label)
    r, f = _gan(real, fake, kind, False, reduction, real_label, name)
    return (r, f) if reduction == "none" else r


def generator_loss(fake, kind, reduction):
    name = _backend(fake.device, fake)
    if name == "reference":
        return ref.generator_loss(fake, kind, reduction)
    r, f = _gan(None, fake, kind, True, reduction, 1.0, name)
    return f if reduction == "none" else r


def vae_loss(recon, target, mu, logvar, recon_loss, beta, reduction):
    """(loss, parts) with parts = [recon term, kl term] (detached, for logging)."""
    name = _backend(recon.device, recon, target, mu, logvar)
    if name == "reference" or _needs_reference(target):
        loss, rec, kl = ref.vae_loss(recon, target, mu, logvar, recon_loss, beta, reduction)
        return loss, torch.stack([rec.detach(), kl.detach()])
    return VaeLossFunction.apply(recon, target, mu, logvar, VAE_RECON[recon_loss], float(beta),
                                 VAE_REDUCTIONS[reduction], B.for_op(name))


def _check_broadcast(t, shape, what):
    # torch raises RuntimeError (its in-place product with the loss); ours names the argument
    if isinstance(t, Tensor):
        try:
            ok = torch.broadcast_shapes(t.shape, shape) == shape
        except RuntimeError:
            ok = False
        if not ok:
            raise RuntimeError(f"{what} of shape {list(t.shape)} cannot be broadcast to the "
                               f"input's shape {list(shape)}")


def bce_loss(input, target, weight, pos_weight, reduction, logits):
    """Per-element weights are broadcast to input's shape here (a copy only when the broadcast
    view is not contiguous)."""
    _check_broadcast(weight, input.shape, "weight")
    _check_broadcast(pos_weight, input.shape, "pos_weight")
    name = _backend(input.device, input, target, weight, pos_weight)
    if name == "reference" or _needs_reference(target, weight, pos_weight):
        if logits:
            return ref.bce_with_logits(input, target, weight, pos_weight, reduction)
        return ref.bce(input, target, weight, reduction)
    w = None if weight is None else torch.broadcast_to(weight, input.shape).contiguous()
    p = None if pos_weight is None else torch.broadcast_to(pos_weight, input.shape).contiguous()
    return BceLossFunction.apply(input, target, w, p, REDUCTIONS[reduction], logits, B.for_op(name))


def reparameterize_fast(mu, logvar) -> Optional[Tensor]:
    """The common eager CPU call (float32 / float64 CPU mu and logvar of one shape and dtype, the
    cpu backend by "auto" or pin, not traced) through genfast._C.reparameterize_eager: the noise
    drawn by torch.randn_like's generator and the kernel with its autograd in C++; None for every
    other call, which takes the checked path (and raises there when it must)."""
    if not (type(mu) is Tensor and HAS_CPP_OPS and B.eager_cpu(mu) and B.cpu_losses_supported()) \
            or torch._C._has_torch_function((mu, logvar)) or B.composite_only(mu, logvar):
        return None
    try:
        return B.extension().reparameterize_eager(mu, logvar)
    except TypeError:  # logvar not a tensor: the checked path raises
        return None


def reparameterize(mu, logvar, eps):
    name = _backend(mu.device, mu, logvar, eps)
    if name == "reference":
        return ref.reparameterize(mu, logvar, eps)
    return ReparamFunction.apply(mu, logvar, eps, B.for_op(name))
