"""The genfast::conv_transpose2d ops: fake implementations, autograd and backend choice.

Ops:
  genfast::conv_transpose2d / conv_transpose2d_backward   the registered pair (autograd, fake);
      the `backend` argument picks the kernels: "cpu" calls the C++ ops
      genfast::conv_transpose2d_fwd / _bwd (schemas in csrc/ops.cpp), "triton" calls
      genfast/kernels/conv_transpose.py. "cuda" runs the Triton kernels too: this family has no
      CUDA C++ kernel (none was measured to beat Triton).
  genfast::conv_transpose2d_stats   the forward that also returns the per-channel mean and
      biased variance of its output (the statistics epilogue), for ConvTransposeBNAct2d.
Autograd saves x, weight and the output y (not the pre-activation): act' is computed from y.
When the backward must itself be differentiable (create_graph=True), it runs the reference
(composite PyTorch) path instead of the fused kernels.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor

from genfast import backend as B
from genfast.reference import conv_transpose as ref

FAMILY = "conv_transpose"
ACTIVATIONS = ("identity", "relu", "leaky_relu", "tanh", "sigmoid")
_ACT_NAMES = {v: k for k, v in B.ACTIVATIONS.items()}

_lib = torch.library.Library("genfast", "FRAGMENT")


def _out_hw(input, weight, stride, padding, output_padding, dilation):
    return ref.output_size(input.shape[2:], weight.shape[2:], stride, padding, output_padding, dilation)


def _memory_format(x: Tensor) -> torch.memory_format:
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd_fake_cpp(input, weight, bias, stride, padding, output_padding, groups, dilation, activation,
                  negative_slope, stats):
    H, W = _out_hw(input, weight, stride, padding, output_padding, dilation)
    y = torch.empty((input.shape[0], weight.shape[1] * groups, H, W), device=input.device,
                    dtype=input.dtype, memory_format=_memory_format(input))
    n = y.shape[1] if stats else 0
    return y, input.new_empty((n,), dtype=_acc(input.dtype)), input.new_empty((n,), dtype=_acc(input.dtype))


def _bwd_fake_cpp(grad_out, input, weight, output, stride, padding, dilation, groups, activation,
                  negative_slope, need_input, need_weight, has_bias):
    dx = (torch.empty(input.shape, device=input.device, dtype=input.dtype,
                      memory_format=_memory_format(input)) if need_input else input.new_empty((0,)))
    dw = torch.empty(weight.shape, device=weight.device, dtype=weight.dtype) if need_weight else input.new_empty((0,))
    db = weight.new_empty((weight.shape[1] * groups,)) if has_bias else input.new_empty((0,))
    return dx, dw, db


# --- kernels per backend -----------------------------------------------------------------------

def _forward(backend, input, weight, bias, stride, padding, output_padding, groups, dilation,
             activation, negative_slope, stats):
    backend = B.at_run(FAMILY, backend, input.device)
    if backend == "cpu":
        return torch.ops.genfast.conv_transpose2d_fwd(input, weight, bias, stride, padding,
                                                      output_padding, groups, dilation, activation,
                                                      negative_slope, stats)
    if backend in ("triton", "cuda"):
        from genfast.kernels import conv_transpose as K

        out = K.conv_transpose2d_fwd(input, weight, bias, stride, padding, output_padding, groups,
                                     dilation, activation, negative_slope, stats=stats)
        if stats:
            return out
        return (out, input.new_empty((0,), dtype=_acc(input.dtype)),
                input.new_empty((0,), dtype=_acc(input.dtype)))
    raise ValueError(f"conv_transpose2d: backend must be 'cpu', 'cuda' or 'triton', got {backend!r}")


def _backward(backend, grad_out, input, weight, output, stride, padding, dilation, groups,
              activation, negative_slope, need_input, need_weight, has_bias):
    backend = B.at_run(FAMILY, backend, grad_out.device)
    if backend == "cpu":
        return torch.ops.genfast.conv_transpose2d_bwd(grad_out, input, weight, output, stride,
                                                      padding, dilation, groups, activation,
                                                      negative_slope, need_input, need_weight,
                                                      has_bias)
    if backend in ("triton", "cuda"):
        from genfast.kernels import conv_transpose as K

        return K.conv_transpose2d_bwd(grad_out, input, weight, output, stride, padding, dilation,
                                      groups, activation, negative_slope, need_input, need_weight,
                                      has_bias)
    raise ValueError(f"conv_transpose2d: backend must be 'cpu', 'cuda' or 'triton', got {backend!r}")


# --- the registered ops ------------------------------------------------------------------------

@torch.library.custom_op("genfast::conv_transpose2d", mutates_args=())
def conv_transpose2d_op(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                        padding: Sequence[int], output_padding: Sequence[int], groups: int,
                        dilation: Sequence[int], activation: int, negative_slope: float,
                        backend: str) -> Tensor:
    return _forward(backend, input, weight, bias, list(stride), list(padding), list(output_padding),
                    groups, list(dilation), activation, negative_slope, False)[0]


@torch.library.custom_op("genfast::conv_transpose2d_stats", mutates_args=())
def conv_transpose2d_stats_op(input: Tensor, weight: Tensor, bias: Optional[Tensor],
                              stride: Sequence[int], padding: Sequence[int],
                              output_padding: Sequence[int], groups: int, dilation: Sequence[int],
                              activation: int, negative_slope: float,
                              backend: str) -> tuple[Tensor, Tensor, Tensor]:
    y, mean, var = _forward(backend, input, weight, bias, list(stride), list(padding),
                            list(output_padding), groups, list(dilation), activation,
                            negative_slope, True)
    return y, mean, var


@torch.library.custom_op("genfast::conv_transpose2d_backward", mutates_args=())
def conv_transpose2d_backward_op(grad_out: Tensor, input: Tensor, weight: Tensor, output: Tensor,
                                 stride: Sequence[int], padding: Sequence[int],
                                 dilation: Sequence[int], groups: int, activation: int,
                                 negative_slope: float, need_input: bool, need_weight: bool,
                                 has_bias: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(backend, grad_out, input, weight, output, list(stride), list(padding),
                     list(dilation), groups, activation, negative_slope, need_input, need_weight,
                     has_bias)


@conv_transpose2d_op.register_fake
def _(input, weight, bias, stride, padding, output_padding, groups, dilation, activation,
      negative_slope, backend):
    return _fwd_fake_cpp(input, weight, bias, stride, padding, output_padding, groups, dilation,
                         activation, negative_slope, False)[0]


@conv_transpose2d_stats_op.register_fake
def _(input, weight, bias, stride, padding, output_padding, groups, dilation, activation,
      negative_slope, backend):
    return _fwd_fake_cpp(input, weight, bias, stride, padding, output_padding, groups, dilation,
                         activation, negative_slope, True)


@conv_transpose2d_backward_op.register_fake
def _(grad_out, input, weight, output, stride, padding, dilation, groups, activation,
      negative_slope, need_input, need_weight, has_bias, backend):
    return _bwd_fake_cpp(grad_out, input, weight, output, stride, padding, dilation, groups,
                         activation, negative_slope, need_input, need_weight, has_bias)


def _setup_context(ctx, inputs, output):
    (input, weight, bias, stride, padding, output_padding, groups, dilation, activation,
     negative_slope, backend) = inputs
    y = output[0] if isinstance(output, tuple) else output
    if isinstance(output, tuple):
        # the statistics are inputs to a following BatchNorm whose backward differentiates
        # through them itself (BNActGivenStats): no gradient flows back through them here
        ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(input, weight, bias, y)
    ctx.cfg = (list(stride), list(padding), list(output_padding), groups, list(dilation),
               activation, negative_slope, backend)


def _backward_formula(ctx, grad_out):
    input, weight, bias, y = ctx.saved_tensors
    stride, padding, output_padding, groups, dilation, activation, slope, backend = ctx.cfg
    need = ctx.needs_input_grad
    if torch.is_grad_enabled():
        # create_graph=True: differentiate the composite reference, so that the gradients are
        # themselves differentiable (gradient penalties).
        wrt = [t for t, n in zip((input, weight, bias), need[:3]) if n]
        z = ref.conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups,
                                 dilation, _ACT_NAMES[activation], slope)
        grads = iter(torch.autograd.grad(z, wrt, grad_out, create_graph=True))
        dx, dw, db = (next(grads) if n else None for n in need[:3])
    else:
        dx, dw, db = conv_transpose2d_backward_op(
            grad_out, input, weight, y, stride, padding, dilation, groups, activation, slope,
            bool(need[0]), bool(need[1]), bias is not None and bool(need[2]), backend)
        dx = dx if need[0] else None
        dw = dw if need[1] else None
        db = db if bias is not None and need[2] else None
    return dx, dw, db, None, None, None, None, None, None, None, None


def _backward_plain(ctx, grad_out):
    return _backward_formula(ctx, grad_out)


def _backward_stats(ctx, grad_out, grad_mean, grad_var):
    # mean and var are marked non-differentiable in _setup_context
    return _backward_formula(ctx, grad_out)


conv_transpose2d_op.register_autograd(_backward_plain, setup_context=_setup_context)
conv_transpose2d_stats_op.register_autograd(_backward_stats, setup_context=_setup_context)

HAS_CPP_OPS = B.has_cpu_ext()
if HAS_CPP_OPS:
    torch.library.register_fake("genfast::conv_transpose2d_fwd", _fwd_fake_cpp, lib=_lib)
    torch.library.register_fake("genfast::conv_transpose2d_bwd", _bwd_fake_cpp, lib=_lib)


# --- checks shared by the functional and the module -------------------------------------------

def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return (int(value), int(value))
    if isinstance(value, (tuple, list, torch.Size)):
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
            raise TypeError(f"conv_transpose2d(): argument '{name}' must be tuple of ints, got {value!r}")
        vals = [int(v) for v in value]
        if len(vals) == 1:
            return (vals[0], vals[0])
        if len(vals) == 2:
            return (vals[0], vals[1])
        raise RuntimeError(
            f"expected {name} to be a single integer value or a list of 2 values to match the "
            f"convolution dimensions, but got {name}={vals}")
    raise TypeError(f"conv_transpose2d(): argument '{name}' must be tuple of ints, not {type(value).__name__}")


def check_activation(activation: Optional[str], negative_slope: float) -> str:
    act = "identity" if activation is None else activation
    if act not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {ACTIVATIONS}, got {activation!r}")
    if act == "leaky_relu" and not negative_slope >= 0:
        raise ValueError(
            "negative_slope must be >= 0 for the fused conv_transpose2d activation (the backward "
            f"recovers f'(z) from the output), got {negative_slope}")
    return act


def check_args(input, weight, bias, stride, padding, output_padding, groups, dilation):
    """torch's exception types for the bad arguments of F.conv_transpose2d, checked before any
    kernel runs. Returns the normalised (stride, padding, output_padding, dilation) pairs."""
    for name, t in (("input", input), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"conv_transpose2d(): argument '{name}' must be Tensor, not {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"conv_transpose2d(): argument 'bias' must be Tensor, not {type(bias).__name__}")
    if input.dim() not in (3, 4):
        raise RuntimeError(
            "Expected 3D (unbatched) or 4D (batched) input to conv_transpose2d, but got input of "
            f"size: {list(input.shape)}")
    if not isinstance(groups, numbers.Integral) or isinstance(groups, bool):
        raise TypeError(f"conv_transpose2d(): argument 'groups' must be int, not {type(groups).__name__}")
    stride, padding = _pair(stride, "stride"), _pair(padding, "padding")
    output_padding, dilation = _pair(output_padding, "output_padding"), _pair(dilation, "dilation")
    if weight.dim() != 4:
        raise RuntimeError(f"conv_transpose2d: expected weight to be 4-D (C_in, C_out/groups, kH, kW), "
                           f"got weight of size {list(weight.shape)}")
    if any(s <= 0 for s in stride):
        raise RuntimeError(f"non-positive stride is not supported (stride={list(stride)})")
    if any(p < 0 for p in padding):
        raise RuntimeError(f"negative padding is not supported (padding={list(padding)})")
    if any(p < 0 for p in output_padding):
        raise RuntimeError(f"negative output_padding is not supported (output_padding={list(output_padding)})")
    if any(d <= 0 for d in dilation):
        raise RuntimeError(f"non-positive dilation is not supported (dilation={list(dilation)})")
    if groups <= 0:
        raise RuntimeError(f"non-positive groups is not supported (groups={groups})")
    for i, dim in enumerate(("height", "width")):
        if not (output_padding[i] < stride[i] or output_padding[i] < dilation[i]):
            raise RuntimeError(
                "output padding must be smaller than either stride or dilation, but got "
                f"output_padding_{dim}: {output_padding[i]} stride_{dim}: {stride[i]} "
                f"dilation_{dim}: {dilation[i]}")
    if weight.shape[0] == 0 or weight.shape[0] % groups != 0:
        raise RuntimeError(
            f"Given groups={groups}, expected weight to be divisible by {groups} at dimension 0 "
            f"(and non-empty), but got weight of size {list(weight.shape)} instead")
    c_in = input.shape[-3]
    if c_in != weight.shape[0]:
        raise RuntimeError(
            f"Given transposed=1, weight of size {list(weight.shape)}, expected input"
            f"{list(input.shape)} to have {weight.shape[0]} channels, but got {c_in} channels instead")
    c_out = weight.shape[1] * groups
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != c_out):
        raise RuntimeError(
            f"Given transposed=1, weight of size {list(weight.shape)}, expected bias to be "
            f"1-dimensional with {c_out} elements, but got bias of size {list(bias.shape)} instead")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.device != input.device:
            raise RuntimeError(
                "Expected all tensors to be on the same device, but found input on "
                f"{input.device} and argument {name} on {t.device}")
        if t.dtype != input.dtype:
            raise RuntimeError(
                f"conv_transpose2d: expected {name} to have the input's dtype {input.dtype}, got {t.dtype}")
    if not input.is_floating_point():
        raise RuntimeError(f"conv_transpose2d: genfast supports floating-point input only, got {input.dtype}")
    hw = ref.output_size(input.shape[-2:], weight.shape[2:], stride, padding, output_padding, dilation)
    if hw[0] <= 0 or hw[1] <= 0:
        raise RuntimeError(
            f"Given input size per channel: ({input.shape[-2]} x {input.shape[-1]}). Calculated "
            f"output size per channel: ({hw[0]} x {hw[1]}). Output size is too small")
    return stride, padding, output_padding, dilation


def conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation,
                     activation, negative_slope):
    """The checked entry point: argument checks, unbatched input, backend choice."""
    act = check_activation(activation, negative_slope)
    stride, padding, output_padding, dilation = check_args(input, weight, bias, stride, padding,
                                                           output_padding, groups, dilation)
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    name = B.resolve(FAMILY, x.device)
    if name == "cuda":
        name = "triton"  # no CUDA C++ kernel for this family (see backend.FAMILY_BACKENDS)
    if name == "reference":
        y = ref.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups,
                                 dilation, act, negative_slope)
    else:
        y = conv_transpose2d_op(x, weight, bias, list(stride), list(padding), list(output_padding),
                                int(groups), list(dilation), B.ACTIVATIONS[act],
                                float(negative_slope), B.for_op(name))
    return y.squeeze(0) if unbatched else y


# --- ConvTranspose2d + BatchNorm2d + activation (training) from the epilogue's statistics -------

class BNActGivenStats(torch.autograd.Function):
    """Training-mode BatchNorm + activation of y whose batch statistics (mean, biased var) the
    conv forward's epilogue already computed, so y is read once (normalise) instead of twice.
    The backward is BatchNorm's training backward (the statistics are functions of y).
    `kernel` picks the passes: "cpp" (CPU tensors, activation identity/relu/leaky_relu) runs the
    C++ split-pass ops genfast::batch_norm_act_apply / _bwd_reduce / _bwd_dx
    (csrc/cpu/batchnorm_act.cpp); "triton" the kernels in genfast/kernels/conv_transpose.py (one
    pass forward; a split partial reduction then one pass backward); "reference" the formulas of
    genfast/reference/batchnorm_act.py. create_graph=True differentiates the reference forward.
    Called from torch.compile'd code these run eagerly inside the traced autograd.Function."""

    @staticmethod
    def forward(ctx, y, mean, var, weight, bias, eps, activation, slope, kernel):
        from genfast.reference import batchnorm_act as bnref
        from genfast.reference.activation import act_forward

        acc = bnref.acc_dtype(y.dtype)
        invstd = torch.rsqrt(var.to(acc) + eps)
        ctx.save_for_backward(y, weight, bias, mean, invstd)
        ctx.cfg = (eps, activation, slope, kernel)
        if kernel == "cpp":
            return torch.ops.genfast.batch_norm_act_apply(y, mean, invstd, weight, bias,
                                                          B.ACTIVATIONS[activation], slope, 0.0)
        if kernel == "triton":
            from genfast.kernels import conv_transpose as K

            return K.bn_act_given_stats_fwd(y, mean, invstd, weight, bias, B.ACTIVATIONS[activation], slope)
        shape = (1, -1, 1, 1)
        z = (y.to(acc) - mean.to(acc).view(shape)) * invstd.view(shape)
        if weight is not None:
            z = z * weight.to(acc).view(shape)
        if bias is not None:
            z = z + bias.to(acc).view(shape)
        return act_forward(z, activation, slope).to(y.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        from genfast.reference import batchnorm_act as bnref

        y, weight, bias, mean, invstd = ctx.saved_tensors
        eps, activation, slope, kernel = ctx.cfg
        if torch.is_grad_enabled():
            wrt = [t for t in (y, weight, bias) if t is not None and t.requires_grad]
            out = bnref.batch_norm_act(y, None, None, weight, bias, True, 0.0, eps, activation, slope)
            grads = iter(torch.autograd.grad(out, wrt, grad_out, create_graph=True))
            dy, dw, db = (next(grads) if t is not None and t.requires_grad else None for t in (y, weight, bias))
        elif kernel == "triton":
            from genfast.kernels import conv_transpose as K

            dy, dw, db = K.bn_act_given_stats_bwd(grad_out, y, mean, invstd, weight, bias,
                                                  B.ACTIVATIONS[activation], slope)
        elif kernel == "cpp":
            code = B.ACTIVATIONS[activation]
            sum_dz, sum_dzx = torch.ops.genfast.batch_norm_act_bwd_reduce(
                grad_out, y, weight, bias, mean, invstd, code, slope, 0.0, False)
            count = float(y.numel() // max(y.shape[1], 1))
            dy = torch.ops.genfast.batch_norm_act_bwd_dx(grad_out, y, weight, bias, mean, invstd,
                                                         sum_dz, sum_dzx, count, code, slope, 0.0,
                                                         False)
            dw = sum_dzx.to(weight.dtype) if weight is not None else None
            db = sum_dz.to(bias.dtype) if bias is not None else None
        else:
            dy, dw, db = bnref.batch_norm_act_backward(grad_out, y, weight, bias, mean, invstd, True,
                                                       activation, slope)
            dw = dw.to(weight.dtype) if weight is not None else None
            db = db.to(bias.dtype) if bias is not None else None
        return dy, None, None, dw, db, None, None, None, None


def conv_transpose_bn_act_train(input, weight, bias, stride, padding, output_padding, groups,
                                dilation, bn_weight, bn_bias, running_mean, running_var, momentum,
                                eps, activation, negative_slope):
    """Training forward of ConvTranspose2d -> BatchNorm2d (batch statistics) -> activation,
    arguments already checked. Updates the running statistics in place (unbiased variance)."""
    name = B.resolve(FAMILY, input.device)
    if name == "cuda":
        name = "triton"
    if name == "reference":
        from genfast.reference import batchnorm_act as bnref

        y = ref.conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups,
                                 dilation)
        return bnref.batch_norm_act(y, running_mean, running_var, bn_weight, bn_bias, True,
                                    momentum, eps, activation, negative_slope)
    y, mean, var = conv_transpose2d_stats_op(input, weight, bias, list(stride), list(padding),
                                             list(output_padding), int(groups), list(dilation),
                                             0, 0.0, B.for_op(name))
    if running_mean is not None:
        n = y.numel() // max(y.shape[1], 1)
        with torch.no_grad():
            running_mean.copy_((1 - momentum) * running_mean + momentum * mean.to(running_mean.dtype))
            running_var.copy_((1 - momentum) * running_var
                              + momentum * (var * (n / max(n - 1, 1))).to(running_var.dtype))
    if name == "triton":
        kernel = "triton"
    elif name == "cpu" and activation in ("identity", "relu", "leaky_relu"):
        kernel = "cpp"
    else:
        kernel = "reference"
    return BNActGivenStats.apply(y, mean, var, bn_weight, bn_bias, float(eps), activation,
                                 float(negative_slope), kernel)
