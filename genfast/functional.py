"""Public functions (thin): checks, then the registered op of the chosen backend."""
from __future__ import annotations

import math
from typing import Callable, Literal, Optional, Sequence, Union, overload

import torch
from torch import Tensor
from torch.nn import functional as F

from genfast.ops import batchnorm_act as _bn
from genfast.ops import conv_act as _ca
from genfast.ops import conv_transpose as _ct
from genfast.ops import losses as _loss

_Size2 = Union[int, Sequence[int]]  # an int or a (height, width) pair


def batch_norm_act(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *,
                   activation: str = "leaky_relu", negative_slope: float = 0.01,
                   memory_efficient: bool = False) -> Tensor:
    """Fused ``activation(F.batch_norm(input, ...))``; arguments as ``F.batch_norm``.

    Args:
        input: (N, C), (N, C, L) or (N, C, H, W), float16/bfloat16/float32/float64, contiguous
            or channels_last (other layouts are copied first).
        running_mean, running_var: (C,) buffers, updated in place when ``training`` (unbiased
            variance into ``running_var``); required when ``training=False``.
        weight, bias: (C,) affine parameters or None.
        training: use batch statistics (True) or the running ones (False).
        momentum: running-statistics factor (pass 1/num_batches for a cumulative average).
        eps: added to the variance.
        activation: "leaky_relu" (default), "relu" or "identity".
        negative_slope: slope of leaky_relu for negative inputs (default 0.01).
        memory_efficient: save the output instead of the input for backward (needs an
            invertible activation; |weight| is kept >= 1e-3 in that mode; a float16/bfloat16
            input saves the input, with one RuntimeWarning).

    Returns:
        Tensor of the shape, dtype and memory format of ``input``.
    """
    out = _bn.eager_fast(input, running_mean, running_var, weight, bias, training, momentum, eps,
                         activation, negative_slope, memory_efficient)
    if out is not None:
        return out
    _bn.check_activation(activation, negative_slope, memory_efficient)
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, eps, momentum)
    if isinstance(input, Tensor) and input.dim() >= 2:
        # torch takes affine parameters of any shape holding C elements, e.g. (C, 1)
        C = input.shape[1]
        weight = _as_channel_vector(weight, C)
        bias = _as_channel_vector(bias, C)
    _bn.check_inputs(input, running_mean, running_var, weight, bias, training)
    return _bn.batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum,
                              eps, activation, negative_slope, memory_efficient)


_SCALAR_TYPE_NAMES = {torch.bool: "Bool", torch.uint8: "Byte", torch.int8: "Char",
                      torch.int16: "Short", torch.int32: "Int", torch.int64: "Long",
                      torch.complex32: "ComplexHalf", torch.complex64: "ComplexFloat",
                      torch.complex128: "ComplexDouble"}


def _as_channel_vector(t: Optional[Tensor], C: int) -> Optional[Tensor]:
    if t is None or not isinstance(t, Tensor) or t.dim() == 1 or t.numel() != C:
        return t
    return t.reshape(C)


def check_batch_norm_args(input: Tensor, running_mean: Optional[Tensor],
                          running_var: Optional[Tensor], weight: Optional[Tensor],
                          bias: Optional[Tensor], training: bool, eps: float,
                          momentum: object = 0.1) -> None:
    """The checks F.batch_norm / nn.BatchNorm make that genfast's op checks do not (torch's
    exception types and messages, naming the argument), run before anything is written."""
    if not isinstance(input, Tensor):
        raise TypeError(f"batch_norm_act(): argument 'input' must be Tensor, not {type(input).__name__}")
    if type(training) is not bool:  # torch's parser takes a bool only (not 0/1, not a tensor)
        raise TypeError(f"batch_norm_act(): argument 'training' must be bool, not {type(training).__name__}")
    _bn.check_float_arg("momentum", momentum)
    _bn.check_float_arg("eps", eps)
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"batch_norm_act(): argument '{name}' must be Tensor, not {type(t).__name__}")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"batch_norm_act: the function is not differentiable with respect to "
                               f"argument '{name}' (a running buffer that requires grad)")
    if input.dim() < 2:
        raise RuntimeError(f"batch_norm_act: expected input with at least 2 dims (N, C, *), got "
                           f"{input.dim()}D input")
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not training and eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if training and (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be "
                         "None (batch_norm_act)")
    if not training:
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is None:
                raise RuntimeError(f"batch_norm_act: {name} must be defined in evaluation mode "
                                   "(running_mean and running_var are required when training=False)")
    if not input.is_floating_point():
        name = _SCALAR_TYPE_NAMES.get(input.dtype, str(input.dtype))
        raise NotImplementedError(f"\"batch_norm\" not implemented for '{name}': batch_norm_act "
                                  f"input must be a floating-point tensor, got {input.dtype}")
    C = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.dim() != 1:
            raise RuntimeError(f"batch_norm_act: {name} should be a 1-D tensor of {C} elements, "
                               f"got shape {tuple(t.shape)}")
    if C == 0:
        # torch checks the batch before it reads the parameters (its IndexError below)
        if training and math.prod(input.shape[2:]) * input.shape[0] == 1:
            raise ValueError("Expected more than 1 value per channel when training, got input size "
                             f"{input.size()}")
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None:
                raise IndexError(f"batch_norm_act: {name} has no element for channel 0 (input has 0 "
                                 "channels): select(): index 0 out of range for tensor of size [0] "
                                 "at dimension 0")


# --- losses (GAN, VAE, reparameterisation, gradient penalties) -----------------------------------


@overload
def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, kind: str = ...,
                       reduction: Literal["mean", "sum"] = ..., *, real_label: float = ...) -> Tensor: ...
@overload
def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, kind: str, reduction: Literal["none"], *,
                       real_label: float = ...) -> tuple[Tensor, Tensor]: ...
@overload
def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, kind: str = ..., reduction: str = ..., *,
                       real_label: float = ...) -> Union[Tensor, tuple[Tensor, Tensor]]: ...
def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, kind: str = "bce",
                       reduction: str = "mean", *, real_label: float = 1.0
                       ) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Discriminator loss of real and fake logits, one fused kernel for both.

    Args:
        real_logits, fake_logits: logits of any shapes (batch sizes may differ), same dtype
            (float16/bfloat16 compute in float32; under autocast they are cast to float32 first,
            as torch does for its losses).
        kind: "bce" (default; = "minimax" on this side): BCE(real, real_label) + BCE(fake, 0) in
            the stable softplus form; "hinge": relu(1 - real) + relu(1 + fake); "wasserstein":
            -real + fake; "lsgan": (real - real_label)^2 + fake^2.
        reduction: "mean" (default: mean of the real terms + mean of the fake terms), "sum", or
            "none" (returns the tuple (real_terms, fake_terms) in the logits' shapes).
        real_label: target of the real side for "bce"/"minimax"/"lsgan" (one-sided label
            smoothing, e.g. 0.9); must be 1.0 for "hinge" and "wasserstein".

    Returns:
        A 0-dim float32 tensor (float64 for float64 logits), or the tuple for "none".
    """
    out = _loss.eager_gan(real_logits, fake_logits, kind, False, reduction, real_label)
    if out is not None:
        return out
    _check_loss_dtypes(kind, (real_logits, "real_logits"), (fake_logits, "fake_logits"))
    real_logits, fake_logits = _loss.autocast_float32(real_logits, fake_logits)
    _loss.check_gan(real_logits, fake_logits, kind, reduction, real_label)
    return _loss.discriminator_loss(real_logits, fake_logits, kind, reduction, real_label)


def generator_loss(fake_logits: Tensor, kind: str = "bce", reduction: str = "mean") -> Tensor:
    """Generator loss of the discriminator's logits on generated samples.

    kind: "bce" (default): non-saturating softplus(-x) = -log D(G(z)), whose gradient does not
    vanish for very negative logits; "minimax": the saturating log(1 - D(G(z))) = -softplus(x);
    "hinge" and "wasserstein": -x; "lsgan": (x - 1)^2. reduction: "mean" (default), "sum" or
    "none" (per-element terms in fake_logits' shape). Returns float32 (float64 for float64).
    """
    out = _loss.eager_gan(None, fake_logits, kind, True, reduction, 1.0)
    if out is not None:
        return out
    _check_loss_dtypes(kind, (fake_logits, "fake_logits"))
    (fake_logits,) = _loss.autocast_float32(fake_logits)
    _loss.check_gan(None, fake_logits, kind, reduction, 1.0)
    return _loss.generator_loss(fake_logits, kind, reduction)


@overload
def vae_loss(recon: Tensor, target: Tensor, mu: Tensor, logvar: Tensor, *, recon_loss: str = ...,
             beta: float = ..., reduction: str = ..., return_parts: Literal[False] = ...) -> Tensor: ...
@overload
def vae_loss(recon: Tensor, target: Tensor, mu: Tensor, logvar: Tensor, *, recon_loss: str = ...,
             beta: float = ..., reduction: str = ..., return_parts: Literal[True]) -> tuple[Tensor, Tensor, Tensor]: ...
@overload
def vae_loss(recon: Tensor, target: Tensor, mu: Tensor, logvar: Tensor, *, recon_loss: str = ...,
             beta: float = ..., reduction: str = ..., return_parts: bool) -> Union[Tensor, tuple[Tensor, Tensor, Tensor]]: ...
def vae_loss(recon: Tensor, target: Tensor, mu: Tensor, logvar: Tensor, *, recon_loss: str = "mse",
             beta: float = 1.0, reduction: str = "sum", return_parts: bool = False
             ) -> Union[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """VAE loss: reconstruction + beta * KL(N(mu, exp(logvar)) || N(0, I)), one fused kernel.

    Args:
        recon, target: (N, *) of the same shape; target has recon's dtype or float32.
        mu, logvar: (N, Z) of the same shape and dtype.
        recon_loss: "mse" (default; sum of squared errors), "bce" (recon holds probabilities;
            torch's BCE with logs clamped at -100) or "bce_logits" (recon holds logits).
        beta: weight of the KL term (default 1.0).
        reduction: "sum" (default, the VAE paper's convention) or "batchmean" (divided by N).
        return_parts: also return the reconstruction and KL terms (detached, for logging).

    Returns:
        0-dim float32 loss (float64 for float64 input), or (loss, recon_term, kl_term).
        Gradients flow to recon, mu and logvar; when target requires grad the reference
        formulas run instead of the fused kernel.
    """
    _check_loss_dtypes(recon_loss, (recon, "recon"))
    recon, target, mu, logvar = _loss.autocast_float32(recon, target, mu, logvar)
    _loss.check_vae(recon, target, mu, logvar, recon_loss, reduction)
    loss, parts = _loss.vae_loss(recon, target, mu, logvar, recon_loss, beta, reduction)
    if return_parts:
        return loss, parts[0], parts[1]
    return loss


def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
    """z = mu + eps * exp(0.5 * logvar) with eps = torch.randn_like(mu) (torch's generator).

    With the same seed, z is bitwise the plain PyTorch expression on the "cpu" and "reference"
    backends. On "triton", exp is the device's (libdevice on the GPU, numpy under the
    interpreter): |z - z_torch| <= eps(dtype) * (|z_torch| + 2 |eps * exp(0.5 * logvar)|),
    eps(dtype) = torch.finfo(dtype).eps. mu, logvar: same
    shape and dtype. Returns z in mu's shape and dtype; exact gradients w.r.t. mu and logvar."""
    z = _loss.reparameterize_fast(mu, logvar)
    if z is not None:
        return z
    for t, name in ((mu, "mu"), (logvar, "logvar")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, not {type(t).__name__}")
    if mu.shape != logvar.shape:
        raise RuntimeError(f"mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)} must have the same shape")
    for t, name in ((mu, "mu"), (logvar, "logvar")):
        if not t.is_floating_point():  # torch's randn_like / exp raise NotImplementedError
            raise NotImplementedError(f"reparameterize: {name} must be a floating-point tensor, got {t.dtype}")
    if mu.dtype != logvar.dtype:
        raise RuntimeError(f"mu and logvar must have the same floating-point dtype, got {mu.dtype} and {logvar.dtype}")
    if mu.device != logvar.device:
        raise RuntimeError(f"Expected all tensors to be on the same device, but found mu on {mu.device} and "
                           f"logvar on {logvar.device}")
    eps = torch.randn_like(mu)
    return _loss.reparameterize(mu, logvar, eps)


def _check_loss_dtypes(kind: str, *named: tuple) -> None:
    """Non-floating logits / reconstructions: NotImplementedError, as torch's BCE and MSE losses raise (the
    hinge and wasserstein kinds are means, which raise RuntimeError in the op's own check)."""
    if kind not in ("bce", "minimax", "lsgan", "mse", "bce_logits"):
        return
    for t, name in named:
        if isinstance(t, Tensor) and not t.is_floating_point():
            raise NotImplementedError(f"{name} must be a floating-point tensor for the {kind!r} loss, "
                                      f"got {t.dtype}")


def r1_penalty(real_logits: Tensor, real_inputs: Tensor) -> Tensor:
    """R1 penalty (Mescheder et al. 2018): the mean over the batch of the per-sample squared norm
    of d sum(real_logits) / d real_inputs. real_inputs must require grad and be the input that
    produced real_logits; the result is differentiable (double backward through the
    discriminator, genfast layers included). Multiply by gamma / 2 yourself. Returns a 0-dim
    tensor of real_inputs' dtype."""
    if not real_inputs.requires_grad:
        raise RuntimeError("r1_penalty: real_inputs must require grad (call real_inputs.requires_grad_() "
                           "before the discriminator's forward)")
    (grad,) = torch.autograd.grad(real_logits.sum(), real_inputs, create_graph=True)
    return grad.reshape(grad.shape[0], -1).pow(2).sum(1).mean()


def gradient_penalty(critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor) -> Tensor:
    """WGAN-GP penalty (Gulrajani et al. 2017): mean over the batch of (||grad critic(x_hat)||_2 - 1)^2
    with x_hat = a * real + (1 - a) * fake, one a ~ U(0, 1) per sample (torch's generator), and
    the gradient norm taken per sample. real, fake: (N, *) of the same shape (both detached
    here). Differentiable w.r.t. the critic's parameters (double backward). Multiply by lambda
    (10 in the paper) yourself. Returns a 0-dim tensor."""
    if real.shape != fake.shape:
        raise RuntimeError(f"gradient_penalty: real {tuple(real.shape)} and fake {tuple(fake.shape)} must have "
                           "the same shape")
    n = real.shape[0]
    alpha = torch.rand((n,) + (1,) * (real.dim() - 1), dtype=real.dtype, device=real.device)
    x_hat = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    out = critic(x_hat)
    (grad,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
    norm = grad.reshape(n, -1).norm(2, dim=1)
    return ((norm - 1) ** 2).mean()


def _not_floating(input: object, weight: object) -> bool:
    """Tensors of one non-floating dtype (integers, bool, complex): genfast has no kernel for
    them, torch computes some on the CPU (int64, complex64) and raises for the others."""
    return (isinstance(input, Tensor) and isinstance(weight, Tensor) and input.dtype == weight.dtype
            and not input.is_floating_point())


def _torch_composition(product: Callable[[], Tensor], activation: Optional[str], negative_slope: float,
                       check: Callable[[Optional[str], float], str]) -> Tensor:
    """activation(product()) in torch's own ops, for the dtypes genfast has no kernel for: torch's
    result where it computes one (int64 / complex64 products on the CPU), its exception where it
    does not; the activation's name and slope checked as on the fused path."""
    act = check(activation, negative_slope)
    return _ct.apply_activation(product(), act, negative_slope)


def conv_transpose2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: _Size2 = 1,
                     padding: _Size2 = 0, output_padding: _Size2 = 0, groups: int = 1, dilation: _Size2 = 1, *,
                     activation: Optional[str] = None, negative_slope: float = 0.01) -> Tensor:
    """Fused ``activation(F.conv_transpose2d(input, weight, bias, ...))``; arguments as
    ``F.conv_transpose2d``.

    An activation is applied in place on the product's output and its backward reads that
    output, as after torch's in-place activations (nn.LeakyReLU(inplace=True)): modifying the
    result in place before the backward raises autograd's error. Without an activation the
    output is not saved, and may be modified in place as torch's.

    Args:
        input: (N, C_in, H_in, W_in) or unbatched (C_in, H_in, W_in); float16/bfloat16/float32/
            float64, contiguous or channels_last (any strides accepted; the triton backend reads them
            without a copy); another dtype runs torch's own conv_transpose2d and activation
            (int64 and complex64 computed, others torch's error).
        weight: (C_in, C_out / groups, kH, kW), the input's dtype.
        bias: (C_out,) or None.
        stride, padding, output_padding, dilation: int or (h, w) pair; defaults 1, 0, 0, 1.
            output_padding must be smaller than stride or dilation in each dimension.
        groups: int, default 1; divides C_in and C_out.
        activation: None (identity, default), "relu", "leaky_relu", "tanh" or "sigmoid",
            applied with the bias in the epilogue.
        negative_slope: leaky_relu slope for negative inputs (default 0.01, must be >= 0).

    Returns:
        (N, C_out, H_out, W_out) (unbatched: without N), H_out = (H_in - 1) * stride - 2 *
        padding + dilation * (kH - 1) + output_padding + 1; channels_last when input is.
    """
    y = _ct.conv_transpose2d_fast(input, weight, bias, stride, padding, output_padding, groups,
                                  dilation, activation, negative_slope)
    if y is not None:
        return y
    if _not_floating(input, weight):
        return _torch_composition(lambda: F.conv_transpose2d(input, weight, bias, stride, padding,
                                                             output_padding, groups, dilation),
                                  activation, negative_slope, _ct.check_activation)
    return _ct.conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups,
                                dilation, activation, negative_slope)


def conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: _Size2 = 1,
           padding: Union[_Size2, str] = 0, dilation: _Size2 = 1, groups: int = 1, *,
           activation: Optional[str] = None, negative_slope: float = 0.01) -> Tensor:
    """Fused ``activation(F.conv2d(input, weight, bias, ...))``; arguments as ``F.conv2d``.

    The convolution comes from the vendor library (cuDNN through ATen on CUDA tensors, oneDNN
    on CPU tensors); the bias and the activation are applied in one pass over its output (on
    the CPU as a oneDNN post-op for identity, leaky_relu and tanh).
    The activation is applied in place on the product's output and its backward reads that
    output, as after torch's in-place activations (nn.LeakyReLU(inplace=True)): modifying the
    result in place before the backward raises autograd's error.

    Args:
        input: (N, C_in, H, W) or unbatched (C_in, H, W); floating point (another dtype runs
            torch's own conv2d and activation: int64 and complex64 computed, others torch's error).
        weight: (C_out, C_in / groups, kH, kW), the input's dtype.
        bias: (C_out,) or None.
        stride, dilation: int or (h, w) pair; defaults 1.
        padding: int, (h, w) pair, "valid" or "same" (stride 1 only), default 0.
        groups: int, default 1; divides C_in and C_out.
        activation: None (identity, default), "relu", "leaky_relu", "tanh" or "sigmoid".
        negative_slope: leaky_relu slope for negative inputs (default 0.01, must be >= 0).

    Returns:
        (N, C_out, H_out, W_out) (unbatched: without N); channels_last when input is.
    """
    y = _ca.conv2d_fast(input, weight, bias, stride, padding, dilation, groups, activation,
                        negative_slope)
    if y is not None:
        return y
    if _not_floating(input, weight):
        return _torch_composition(lambda: F.conv2d(input, weight, bias, stride, padding, dilation, groups),
                                  activation, negative_slope, _ca.check_activation)
    return _ca.conv2d_act(input, weight, bias, stride, padding, dilation, groups, activation,
                          negative_slope)


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
           activation: Optional[str] = None, negative_slope: float = 0.01) -> Tensor:
    """Fused ``activation(F.linear(input, weight, bias))``; arguments as ``F.linear``.

    The matmul comes from the vendor library (cuBLAS through ATen on CUDA tensors, MKL on CPU
    tensors; the backward's two products of float32 MLP batches on AVX2 CPUs from genfast's own
    GEMM, ``genfast.backend.set_cpu_linear_gemm``); the bias and the activation are applied in
    one pass over its output.
    The activation is applied in place on the product's output and its backward reads that
    output, as after torch's in-place activations (nn.LeakyReLU(inplace=True)): modifying the
    result in place before the backward raises autograd's error.

    Args:
        input: (*, in_features); floating point (another dtype runs torch's own linear and
            activation: int64 and complex64 computed, others torch's error).
        weight: (out_features, in_features), the input's dtype.
        bias: (out_features,) or None.
        activation: None (identity, default), "relu", "leaky_relu", "tanh" or "sigmoid".
        negative_slope: leaky_relu slope for negative inputs (default 0.01, must be >= 0).

    Returns:
        (*, out_features).
    """
    y = _ca.linear_fast(input, weight, bias, activation, negative_slope)
    if y is not None:
        return y
    if _not_floating(input, weight):
        return _torch_composition(lambda: F.linear(input, weight, bias), activation, negative_slope,
                                  _ca.check_activation)
    return _ca.linear_act(input, weight, bias, activation, negative_slope)
