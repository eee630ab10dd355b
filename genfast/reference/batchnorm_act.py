"""BatchNorm + activation in plain PyTorch, written from the formulas (not through
F.batch_norm) so that the tests can check it against torch.nn independently.

Statistics and arithmetic run in float32 for float16/bfloat16 inputs (float64 for float64); the
statistics' sums accumulate in float64, as torch's CPU kernel does."""
from __future__ import annotations

import torch

from genfast.reference.activation import act_backward, act_forward


def bn_write_buffer(x: torch.Tensor) -> torch.Tensor:
    """The buffer a BatchNorm (+ activation) kernel writes its output of x into: canonical
    strides, contiguous whenever x is contiguous (whatever the strides of its size-1 dimensions,
    e.g. an (N, C, 1, 1) tensor made channels_last: torch's CPU BatchNorm layout), channels_last
    for a channels_last-dense 4-D x, x's own strides for an (N, C, L) x stored (N, L, C) (the
    kernels write in x's memory order); contiguous for any other x, which the kernels first copy
    to contiguous (torch keeps a channels_last-like one channels_last there). The C++ kernels'
    allocation is csrc/common/tensor_layout.h's empty_bn_output."""
    if x.dim() == 3 and x.transpose(1, 2).is_contiguous() and not x.is_contiguous():
        return torch.empty_like(x)
    if x.dim() == 3 and x.numel() == 0:
        # an empty batch: x's own strides, as the C++ kernels' empty_like and torch give
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    if x.is_contiguous():
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device,
                           memory_format=torch.channels_last)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def bn_output_as_torch(out: torch.Tensor) -> torch.Tensor:
    """The output a BatchNorm op returns from its kernel's buffer (bn_write_buffer): torch's
    BatchNorm returns contiguous strides for an (N, C, L) input stored (N, L, C) (3-D:
    suggest_memory_format is contiguous), so such an output, written in that order, is copied to
    contiguous (csrc/common/tensor_layout.h's bn_output_as_torch; other ranks' buffers already
    have the strides the ops return)."""
    return out.contiguous() if out.dim() == 3 and not out.is_contiguous() else out


def empty_bn_output(x: torch.Tensor) -> torch.Tensor:
    """An output of a BatchNorm (+ activation) of x with the strides the ops return (the fakes
    use this): bn_write_buffer's, contiguous for a 3-D one stored (N, L, C)."""
    return bn_output_as_torch(bn_write_buffer(x))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shape(x: torch.Tensor) -> list[int]:
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def effective_gamma(weight: torch.Tensor, gamma_floor: float) -> torch.Tensor:
    """|weight| clamped from below by gamma_floor (sign kept, 0 counts as positive); the gradient
    passes straight through to weight. gamma_floor = 0 returns weight."""
    if gamma_floor <= 0:
        return weight
    floor = torch.where(weight < 0, torch.full_like(weight, -gamma_floor), torch.full_like(weight, gamma_floor))
    clamped = torch.where(weight.abs() < gamma_floor, floor, weight)
    return weight + (clamped - weight).detach()


def batch_stats(xf: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, biased var, invstd) per channel of an (N, C, *) tensor in its own dtype. The sums
    accumulate in float64 (as torch's CPU batch norm does), so the float32 mean is correctly
    rounded even at a large offset."""
    dims = _dims(xf)
    mean = xf.mean(dims, dtype=torch.float64).to(xf.dtype)
    var = (xf - mean.view(_shape(xf))).square().mean(dims, dtype=torch.float64).to(xf.dtype)
    return mean, var, torch.rsqrt(var + eps)


def update_running(buf: torch.Tensor, batch_value: torch.Tensor, momentum: float) -> None:
    """buf <- (1 - momentum) * buf + momentum * batch_value, channel after channel through buf's
    view, as torch's CPU kernel does: a strided view gets its own elements, and an expanded
    (stride-0) buffer, whose channels share one element, compounds the updates in channel
    order."""
    acc = batch_value.dtype
    if buf.dim() == 1 and buf.numel() > 1 and buf.stride(0) == 0:
        for c in range(buf.numel()):
            cur = buf[c:c + 1]
            cur.copy_((1 - momentum) * cur.to(acc) + momentum * batch_value[c:c + 1])
    else:
        buf.copy_((1 - momentum) * buf.to(acc) + momentum * batch_value)


def batch_norm_act(x, running_mean, running_var, weight, bias, training, momentum, eps,
                   activation="leaky_relu", negative_slope=0.01, gamma_floor=0.0):
    """y = f(weight * (x - mean) / sqrt(var + eps) + bias); updates running stats when training
    (unbiased variance, momentum as given). Differentiable to any order."""
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    shape = _shape(x)
    if training:
        mean, var, invstd = batch_stats(xf, eps)
        n = xf.numel() // max(xf.shape[1], 1)
        # An empty batch leaves the running statistics unchanged, as in torch.
        with torch.no_grad():
            if n > 0 and running_mean is not None:
                update_running(running_mean, mean.detach(), momentum)
            if n > 0 and running_var is not None:
                unbiased = var.detach() * (n / (n - 1)) if n > 1 else var.detach()
                update_running(running_var, unbiased, momentum)
    else:
        mean = running_mean.to(acc)
        invstd = torch.rsqrt(running_var.to(acc) + eps)
    z = (xf - mean.view(shape)) * invstd.view(shape)
    if weight is not None:
        z = z * effective_gamma(weight.to(acc), gamma_floor).view(shape)
    if bias is not None:
        z = z + bias.to(acc).view(shape)
    # torch's strides: contiguous for a 3-D x stored (N, L, C) (elementwise ops keep x's)
    return bn_output_as_torch(act_forward(z, activation, negative_slope).to(x.dtype))


def batch_norm_act_backward(grad_out, x, weight, bias, mean, invstd, training,
                            activation="leaky_relu", negative_slope=0.01, gamma_floor=0.0, eps=None):
    """(grad_input, grad_weight, grad_bias) from the formulas. With mean = invstd = None the
    batch statistics are recomputed from x with `eps` (training mode), so that the result is
    differentiable in x as well: the double-backward path."""
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    dy = grad_out.to(acc)
    shape, dims = _shape(x), _dims(x)
    C = x.shape[1]
    if mean is None:
        mean, _, invstd = batch_stats(xf, eps)
    g = torch.ones(C, dtype=acc, device=x.device) if weight is None else effective_gamma(weight.to(acc), gamma_floor)
    b = torch.zeros(C, dtype=acc, device=x.device) if bias is None else bias.to(acc)
    xhat = (xf - mean.to(acc).view(shape)) * invstd.to(acc).view(shape)
    z = xhat * g.view(shape) + b.view(shape)
    # torch's activation-backward ops: differentiable in z (double backward), and relu's selects
    # (a NaN or inf dy where relu's output is 0 gives 0, as torch's threshold_backward)
    dz = act_backward(dy, z, activation, negative_slope)
    sum_dz = dz.sum(dims)
    sum_dzx = (dz * xhat).sum(dims)
    k = (g * invstd.to(acc)).view(shape)
    if training:
        m = max(xf.numel() // max(C, 1), 1)
        dx = k * (dz - sum_dz.view(shape) / m - xhat * sum_dzx.view(shape) / m)
    else:
        dx = k * dz
    return dx.to(x.dtype), sum_dzx, sum_dz


# --- the two passes separately (SyncBatchNormAct; mirrors the C++ split ops) ------------------

def stats(x):
    """(mean, M2) per channel in the accumulation dtype: M2 = sum((x - mean)^2)."""
    xf = x.to(acc_dtype(x.dtype))
    dims = _dims(xf)
    n = xf.numel() // max(xf.shape[1], 1)
    if n == 0:
        z = xf.new_zeros(xf.shape[1])
        return z, z.clone()
    mean = xf.mean(dims)
    return mean, (xf - mean.view(_shape(xf))).square().sum(dims)


def apply(x, mean, invstd, weight, bias, activation, negative_slope, gamma_floor=0.0):
    acc = acc_dtype(x.dtype)
    shape = _shape(x)
    z = (x.to(acc) - mean.to(acc).view(shape)) * invstd.to(acc).view(shape)
    if weight is not None:
        z = z * effective_gamma(weight.to(acc), gamma_floor).view(shape)
    if bias is not None:
        z = z + bias.to(acc).view(shape)
    # torch's strides: contiguous for a 3-D x stored (N, L, C) (elementwise ops keep x's)
    return bn_output_as_torch(act_forward(z, activation, negative_slope).to(x.dtype))


def _dz_xhat(grad_out, saved, weight, bias, mean, invstd, activation, negative_slope, gamma_floor,
             saved_is_output):
    acc = acc_dtype(saved.dtype)
    shape = _shape(saved)
    C = saved.shape[1]
    g = torch.ones(C, dtype=acc, device=saved.device) if weight is None else effective_gamma(weight.to(acc), gamma_floor)
    b = torch.zeros(C, dtype=acc, device=saved.device) if bias is None else bias.to(acc)
    s = saved.to(acc)
    if saved_is_output:
        z = torch.where(s > 0, s, s / negative_slope) if activation == "leaky_relu" else s
        xhat = (z - b.view(shape)) / g.view(shape)
    else:
        xhat = (s - mean.to(acc).view(shape)) * invstd.to(acc).view(shape)
        z = xhat * g.view(shape) + b.view(shape)
    return act_backward(grad_out.to(acc), z, activation, negative_slope), xhat, g


def bwd_reduce(grad_out, saved, weight, bias, mean, invstd, activation, negative_slope,
               gamma_floor=0.0, saved_is_output=False):
    dz, xhat, _ = _dz_xhat(grad_out, saved, weight, bias, mean, invstd, activation, negative_slope,
                           gamma_floor, saved_is_output)
    dims = _dims(saved)
    return dz.sum(dims), (dz * xhat).sum(dims)


def bwd_dx(grad_out, saved, weight, bias, mean, invstd, sum_dz, sum_dz_xhat, count, activation,
           negative_slope, gamma_floor=0.0, saved_is_output=False):
    dz, xhat, g = _dz_xhat(grad_out, saved, weight, bias, mean, invstd, activation, negative_slope,
                           gamma_floor, saved_is_output)
    shape = _shape(saved)
    acc = dz.dtype
    k = (g * invstd.to(acc)).view(shape)
    a = (sum_dz.to(acc) / count).view(shape) if count > 0 else 0
    b = (sum_dz_xhat.to(acc) / count).view(shape) if count > 0 else 0
    return (k * (dz - a - xhat * b)).to(saved.dtype)
