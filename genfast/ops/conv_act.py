"""The genfast::product_act ops: Conv2d and Linear with the bias, an activation and (for the
BatchNorm block) the per-channel statistics fused around the vendor's product.

One mechanism for the two products of a discriminator, an MLP or a VAE encoder, the same as
the transposed convolution's (genfast/ops/conv_transpose.py): the matrix work comes from the
vendor library through ATen (cuDNN convolution, cuBLAS matmul; oneDNN on the CPU) and
genfast's kernels do what surrounds it. ``kind`` names the product:
  "conv2d"  aten.convolution of a 4-D input with zero padding (the entry points apply other
            padding modes and asymmetric "same" padding first, as nn.Conv2d does);
  "linear"  a 2-D (M, in_features) input times weight.T (the entry points flatten (*, in)).
The output's channel dimension is dim 1 in both cases ((N, C, H, W) or (M, C)), which is what
the epilogue kernels of genfast/kernels/conv_epilogue.py take.

Backends (the `backend` argument of each op; "triton" runs the "cuda" path):
  "cuda"    the product without bias through ATen, then genfast's Triton kernels: bias +
            activation in one read-modify-write pass of the output; backward dz = dy * act'(y)
            with the bias-gradient sums in one pass, then ATen's products for grad_input and
            grad_weight. What `auto` runs on CUDA tensors (backend.AUTO_CUDA).
  "cpu"     oneDNN's convolution with the activation as a post-op where oneDNN treats NaN
            and inf as torch does (identity, leaky_relu, tanh); otherwise (and for linear,
            where oneDNN's post-op path measured slower) ATen's product with its bias and
            torch's activation in place on the product's output. Backward:
            torch's activation-backward kernel (dz, from the saved output), ATen's products.
Ops:
  genfast::product_act / product_act_backward   the registered pair (autograd, fake).
  genfast::product_stats   the product without bias and the (3, P, C) Welford partials of its
      output, for the BatchNorm block; the block's finalize / apply / backward are the
      transposed convolution's bn_block_* ops (they only see the product's output).
Autograd saves x, weight and the output y (not the pre-activation): act' is computed from y.
With create_graph=True the backward runs the reference (composite PyTorch) path instead.

Launches, cuda path: standalone forward = product + 1 (epilogue; none without bias and
activation); backward = prologue (+1 fixed-order bias sum) + the products. BatchNorm block
forward = product + stats + finalize (running statistics and num_batches_tracked in place) +
apply; backward = bn reduce + bn finalize + bn dx + the products.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor

from genfast import backend as B
from genfast.ops import conv_transpose as _ct
from genfast.reference import conv_act as ref

FAMILY = "conv_act"
KINDS = ("conv2d", "linear")
ACTIVATIONS = _ct.ACTIVATIONS
_ACT_NAMES = {v: k for k, v in B.ACTIVATIONS.items()}
_memory_format = _ct._memory_format
_acc = _ct._acc


def conv2d_out_hw(in_hw: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                  padding: Sequence[int], dilation: Sequence[int]) -> list[int]:
    """floor((H + 2 * padding - dilation * (kernel - 1) - 1) / stride) + 1 per dimension."""
    return [(i + 2 * p - d * (k - 1) - 1) // s + 1
            for i, k, s, p, d in zip(in_hw, kernel, stride, padding, dilation)]


def _out_fake(kind, input, weight, stride, padding, dilation, elementwise_after):
    if kind == "linear":
        return input.new_empty((input.shape[0], weight.shape[0]))
    hw = conv2d_out_hw(input.shape[2:], weight.shape[2:], stride, padding, dilation)
    shape = (input.shape[0], weight.shape[0], *hw)
    return torch.empty(shape, device=input.device, dtype=input.dtype,
                       memory_format=_ct.fused_out_format(input, weight, shape, elementwise_after))


def _in_format(y: Tensor, input: Tensor, weight: Tensor, elementwise_after: bool = False) -> Tensor:
    """y in torch's output layout for a convolution of input by weight, followed by an
    activation or BatchNorm (elementwise_after) or not (_ct.fused_out_format)."""
    return _ct.to_format(y, _ct.fused_out_format(input, weight, y.shape, elementwise_after))


def _grad_format(g: Tensor, like: Tensor) -> Tensor:
    """A gradient in the layout of the tensor it is the gradient of (the backward fake's)."""
    return _ct.to_format(g, _memory_format(like) if like.dim() == 4 else torch.contiguous_format)


def _vendor_product(kind, input, weight, stride, padding, dilation, groups):
    """The product without bias through ATen (cuDNN / cuBLAS on CUDA tensors), in the memory
    format the fake implementation promises."""
    if kind == "linear":
        return torch.ops.aten.mm(input, weight.t())
    y = torch.ops.aten.convolution(input, weight, None, stride, padding, dilation, False, [0, 0],
                                   groups)
    return _in_format(y, input, weight)


# oneDNN's convolution / linear with the activation as a post-op (CPU; float32, and the reduced
# precisions this CPU's oneDNN supports):
# the same post-ops as for the transposed convolution, those that treat NaN and +-inf as torch
# does (oneDNN's relu post-op turns -inf into NaN, its sigmoid NaN into a number).
_ONEDNN_ATTR = _ct._ONEDNN_ATTR
_ONEDNN_DTYPES = _ct._ONEDNN_DTYPES


def _onednn_ok(kind, input, weight, bias, activation, stride, padding, dilation, groups) -> bool:
    if not (activation in _ONEDNN_ATTR and input.dtype in _ONEDNN_DTYPES
            and input.dtype == weight.dtype and input.numel() > 0 and weight.numel() > 0
            and (bias is None or (bias.is_contiguous() and bias.dtype == input.dtype))
            and torch.backends.mkldnn.is_available()):
        return False
    if kind == "linear":
        # oneDNN's linear post-op path reorders the plain weight on every call: measured slower
        # than ATen's addmm + the in-place activation on a 2-core AVX2 CPU (64x784 @ 784x512:
        # 0.85-1.1 ms vs 0.75-0.94 ms, one thread), so linear takes ATen's path.
        return False
    # Only well-formed convolutions: anything else takes ATen's path, which raises torch's error.
    return (input.dim() == 4 and weight.dim() == 4 and input.shape[1] == weight.shape[1] * groups
            and weight.shape[0] % groups == 0
            and all(h > 0 for h in conv2d_out_hw(input.shape[2:], weight.shape[2:], stride,
                                                 padding, dilation))
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


def _act_inplace(y: Tensor, activation: int, negative_slope: float) -> Tensor:
    """torch's own activation kernels, in place on a product output genfast owns."""
    if activation == 1:
        return torch.relu_(y)
    if activation == 2:
        return torch.nn.functional.leaky_relu_(y, negative_slope)
    if activation == 3:
        return y.tanh_()
    if activation == 4:
        return y.sigmoid_()
    return y


def _act_backward(grad_out: Tensor, y: Tensor, activation: int, negative_slope: float) -> Tensor:
    """dz = grad_out * act'(z) from the activation's output y, by torch's own backward kernels
    (so NaN and the value at 0 follow torch)."""
    aten = torch.ops.aten
    if activation == 1:
        return aten.threshold_backward(grad_out, y, 0)
    if activation == 2:
        return aten.leaky_relu_backward(grad_out, y, negative_slope, True)
    if activation == 3:
        return aten.tanh_backward(grad_out, y)
    if activation == 4:
        return aten.sigmoid_backward(grad_out, y)
    return grad_out


def _forward(backend, kind, input, weight, bias, stride, padding, dilation, groups, activation,
             negative_slope):
    backend = B.at_run(FAMILY, backend, input.device)
    if backend == "cpu":
        if _onednn_ok(kind, input, weight, bias, activation, stride, padding, dilation, groups):
            attr = _ONEDNN_ATTR[activation]
            scalars = [negative_slope] if activation == 2 else []
            if kind == "linear":
                return torch.ops.mkldnn._linear_pointwise(input, weight, bias, attr, scalars, "")
            y = torch.ops.mkldnn._convolution_pointwise(input, weight, bias, padding, stride,
                                                        dilation, groups, attr, scalars, "")
            return _in_format(y, input, weight, activation != 0)
        if kind == "linear":
            y = (torch.ops.aten.addmm(bias, input, weight.t()) if bias is not None
                 else torch.ops.aten.mm(input, weight.t()))
        else:
            y = _in_format(torch.ops.aten.convolution(input, weight, bias, stride, padding,
                                                      dilation, False, [0, 0], groups), input, weight,
                           activation != 0)
        return _act_inplace(y, activation, negative_slope)
    if backend in ("cuda", "triton"):
        from genfast.kernels import conv_epilogue as E

        y = _vendor_product(kind, input, weight, stride, padding, dilation, groups)
        y = E.epilogue_(y, bias, activation, negative_slope)
        return _in_format(y, input, weight, activation != 0) if kind != "linear" else y
    raise ValueError(f"product_act: backend must be 'cpu', 'cuda' or 'triton', got {backend!r}")


def _products_backward(kind, dz, input, weight, stride, padding, dilation, groups, need_input,
                       need_weight, bias_sizes):
    """(grad_input, grad_weight, grad_bias) of the product from dz; grad_bias (ATen's) only
    when bias_sizes is given."""
    if kind == "linear":
        dx = torch.ops.aten.mm(dz, weight) if need_input else None
        dw = torch.ops.aten.mm(dz.t(), input) if need_weight else None
        db = dz.sum(0) if bias_sizes is not None else None
        return dx, dw, db
    if not (need_input or need_weight or bias_sizes is not None):
        return None, None, None
    dx, dw, db = torch.ops.aten.convolution_backward(
        dz, input, weight, bias_sizes, stride, padding, dilation, False, [0, 0], groups,
        [need_input, need_weight, bias_sizes is not None])
    if need_input:
        dx = _grad_format(dx, input)
    if need_weight:
        dw = _grad_format(dw, weight)
    return dx, dw, db


def _backward(backend, grad_out, kind, input, weight, output, stride, padding, dilation, groups,
              activation, negative_slope, need_input, need_weight, has_bias):
    backend = B.at_run(FAMILY, backend, grad_out.device)
    empty = input.new_empty
    if backend == "cpu":
        dz = _act_backward(grad_out, output, activation, negative_slope)
        dx, dw, db = _products_backward(kind, dz, input, weight, stride, padding, dilation,
                                        groups, need_input, need_weight,
                                        [weight.shape[0]] if has_bias else None)
    elif backend in ("cuda", "triton"):
        from genfast.kernels import conv_epilogue as E

        dz, db = E.prologue(grad_out, output, activation, negative_slope, has_bias, weight.dtype)
        dx, dw, _ = _products_backward(kind, dz, input, weight, stride, padding, dilation, groups,
                                       need_input, need_weight, None)
    else:
        raise ValueError(f"product_act: backend must be 'cpu', 'cuda' or 'triton', got {backend!r}")
    return (dx if need_input else empty((0,)), dw if need_weight else empty((0,)),
            db.to(weight.dtype) if has_bias else empty((0,)))


# --- the registered ops ------------------------------------------------------------------------

@torch.library.custom_op("genfast::product_act", mutates_args=())
def product_act_op(input: Tensor, weight: Tensor, bias: Optional[Tensor], kind: str,
                   stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                   groups: int, activation: int, negative_slope: float, backend: str) -> Tensor:
    return _forward(backend, kind, input, weight, bias, list(stride), list(padding),
                    list(dilation), groups, activation, negative_slope)


@product_act_op.register_fake
def _(input, weight, bias, kind, stride, padding, dilation, groups, activation, negative_slope,
      backend):
    return _out_fake(kind, input, weight, stride, padding, dilation, activation != 0)


@torch.library.custom_op("genfast::product_act_backward", mutates_args=())
def product_act_backward_op(grad_out: Tensor, input: Tensor, weight: Tensor, output: Tensor,
                            kind: str, stride: Sequence[int], padding: Sequence[int],
                            dilation: Sequence[int], groups: int, activation: int,
                            negative_slope: float, need_input: bool, need_weight: bool,
                            has_bias: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(backend, grad_out, kind, input, weight, output, list(stride), list(padding),
                     list(dilation), groups, activation, negative_slope, need_input, need_weight,
                     has_bias)


@product_act_backward_op.register_fake
def _(grad_out, input, weight, output, kind, stride, padding, dilation, groups, activation,
      negative_slope, need_input, need_weight, has_bias, backend):
    fmt = _memory_format(input) if input.dim() == 4 else torch.contiguous_format
    wfmt = _memory_format(weight) if weight.dim() == 4 else torch.contiguous_format
    dx = (torch.empty(input.shape, device=input.device, dtype=input.dtype, memory_format=fmt)
          if need_input else input.new_empty((0,)))
    dw = (torch.empty(weight.shape, device=weight.device, dtype=weight.dtype, memory_format=wfmt)
          if need_weight else input.new_empty((0,)))
    db = weight.new_empty((weight.shape[0],)) if has_bias else input.new_empty((0,))
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    (input, weight, bias, kind, stride, padding, dilation, groups, activation, negative_slope,
     backend) = inputs
    # the output only where the backward reads it (an activation): with none, the caller may
    # modify it in place before the backward, as after torch's own product
    ctx.save_for_backward(input, weight, bias, output if activation != 0 else None)
    ctx.cfg = (kind, list(stride), list(padding), list(dilation), groups, activation,
               negative_slope, backend)


def _backward_formula(ctx, grad_out):
    input, weight, bias, y = ctx.saved_tensors
    y = grad_out if y is None else y  # no activation: the kernels do not read it
    kind, stride, padding, dilation, groups, activation, slope, backend = ctx.cfg
    need = ctx.needs_input_grad
    if torch.is_grad_enabled():
        # create_graph=True: differentiate the composite reference, so that the gradients are
        # themselves differentiable (gradient penalties).
        wrt = [t for t, n in zip((input, weight, bias), need[:3]) if n]
        z = ref.product_act(kind, input, weight, bias, stride, padding, dilation, groups,
                            _ACT_NAMES[activation], slope)
        grads = iter(torch.autograd.grad(z, wrt, grad_out, create_graph=True))
        dx, dw, db = (next(grads) if n else None for n in need[:3])
    else:
        dx, dw, db = product_act_backward_op(
            grad_out, input, weight, y, kind, stride, padding, dilation, groups, activation, slope,
            bool(need[0]), bool(need[1]), bias is not None and bool(need[2]), backend)
        dx = dx if need[0] else None
        dw = dw if need[1] else None
        db = db if bias is not None and need[2] else None
    return dx, dw, db, None, None, None, None, None, None, None, None


product_act_op.register_autograd(_backward_formula, setup_context=_setup_context)


@torch.library.custom_op("genfast::product_stats", mutates_args=())
def product_stats_op(input: Tensor, weight: Tensor, kind: str, stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int], groups: int,
                     backend: str) -> tuple[Tensor, Tensor]:
    """(y, partials): the product without bias and the (3, P, C) float64 (count, mean, M2)
    partials of y per channel (one read of y after the product)."""
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    backend = B.at_run(FAMILY, backend, input.device)
    y = _vendor_product(kind, input, weight, stride, padding, dilation, groups)
    if kind != "linear":
        y = _in_format(y, input, weight, True)  # a BatchNorm follows
    if backend == "cpu":
        # The CPU block runs product + the fused C++ BatchNorm (genfast/nn); this path serves an
        # exported CUDA graph run on CPU tensors: plain float64 partials, one row.
        dims = [d for d in range(y.dim()) if d != 1]
        y64 = y.to(torch.float64)
        n = y.numel() // max(y.shape[1], 1)
        mean = y64.mean(dims) if n > 0 else y64.new_zeros((y.shape[1],))
        m2 = ((y64 - mean.view(1, -1, *([1] * (y.dim() - 2)))) ** 2).sum(dims)
        return y, torch.stack([torch.full_like(mean, float(n)), mean, m2]).unsqueeze(1)
    if backend not in ("cuda", "triton"):
        raise ValueError(f"product_stats: unknown backend {backend!r}")
    from genfast.kernels import conv_epilogue as E

    if y.numel() == 0:
        return y, y.new_zeros((3, 0, y.shape[1]), dtype=torch.float64)
    return y, E.bn_stats_partials(y)


@product_stats_op.register_fake
def _(input, weight, kind, stride, padding, dilation, groups, backend):
    y = _out_fake(kind, input, weight, stride, padding, dilation, True)  # a BatchNorm follows
    if B.at_run(FAMILY, backend, y.device) == "cpu":
        return y, y.new_empty((3, 1, y.shape[1]), dtype=torch.float64)
    from genfast.kernels import conv_epilogue as E

    progs = E.PlaneView(y).split(y)[0] if y.numel() > 0 else 0
    return y, y.new_empty((3, progs, y.shape[1]), dtype=torch.float64)


# --- checks shared by the functional and the modules ----------------------------------------

def check_activation(activation: Optional[str], negative_slope: float) -> str:
    act = "identity" if activation is None else activation
    if act not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {ACTIVATIONS}, got {activation!r}")
    if act == "leaky_relu":
        _ct.check_int_slope(negative_slope)
    if act == "leaky_relu" and not negative_slope >= 0:
        raise ValueError(
            "negative_slope must be >= 0 for a fused activation (the backward recovers f'(z) "
            f"from the output), got {negative_slope}")
    return act


_check_slope_range = _ct.check_slope_range


def _pair(value, name: str, op: str = "conv2d") -> tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return (int(value), int(value))
    if isinstance(value, (tuple, list, torch.Size)):
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
            raise TypeError(f"{op}(): argument '{name}' must be tuple of ints, got {value!r}")
        vals = [int(v) for v in value]
        if len(vals) == 1:
            return (vals[0], vals[0])
        if len(vals) == 2:
            return (vals[0], vals[1])
        raise RuntimeError(
            f"expected {name} to be a single integer value or a list of 2 values to match the "
            f"convolution dimensions, but got {name}={vals}")
    raise TypeError(f"{op}(): argument '{name}' must be tuple of ints, not {type(value).__name__}")


def _check_tensors(op: str, input, weight, bias) -> None:
    for name, t in (("input", input), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}(): argument '{name}' must be Tensor, not {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"{op}(): argument 'bias' must be Tensor, not {type(bias).__name__}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.device != input.device:
            raise RuntimeError("Expected all tensors to be on the same device, but found input on "
                               f"{input.device} and argument {name} on {t.device}")
        if t.dtype != input.dtype:
            raise RuntimeError(f"{op}: expected {name} to have the input's dtype {input.dtype}, "
                               f"got {t.dtype}")
    if not input.is_floating_point():
        raise RuntimeError(f"{op}: genfast supports floating-point input only, got {input.dtype}")


def check_conv2d_args(input, weight, bias, stride, padding, dilation, groups):
    """torch's exception types for the bad arguments of F.conv2d, checked before any kernel
    runs (and before anything is written). ``padding`` is a pair of ints here. Returns the
    normalised (stride, padding, dilation) pairs."""
    _check_tensors("conv2d", input, weight, bias)
    if input.dim() not in (3, 4):
        raise RuntimeError("Expected 3D (unbatched) or 4D (batched) input to conv2d, but got "
                           f"input of size: {list(input.shape)}")
    if not isinstance(groups, numbers.Integral) or isinstance(groups, bool):
        raise TypeError(f"conv2d(): argument 'groups' must be int, not {type(groups).__name__}")
    stride, padding, dilation = (_pair(stride, "stride"), _pair(padding, "padding"),
                                 _pair(dilation, "dilation"))
    if weight.dim() != 4:
        raise RuntimeError(f"conv2d: expected weight to be 4-D (C_out, C_in/groups, kH, kW), got "
                           f"weight of size {list(weight.shape)}")
    if any(s <= 0 for s in stride):
        raise RuntimeError(f"non-positive stride is not supported (stride={list(stride)})")
    if any(p < 0 for p in padding):
        raise RuntimeError(f"negative padding is not supported (padding={list(padding)})")
    if any(d <= 0 for d in dilation):
        raise RuntimeError(f"dilation should be greater than zero (dilation={list(dilation)})")
    if groups <= 0:
        raise RuntimeError(f"non-positive groups is not supported (groups={groups})")
    if weight.shape[0] == 0 or weight.shape[0] % groups != 0:
        raise RuntimeError(
            f"Given groups={groups}, expected weight to be divisible by {groups} at dimension 0 "
            f"(and non-empty), but got weight of size {list(weight.shape)} instead")
    c_in = input.shape[-3]
    if c_in != weight.shape[1] * groups:
        raise RuntimeError(
            f"Given groups={groups}, weight of size {list(weight.shape)}, expected input"
            f"{list(input.shape)} to have {weight.shape[1] * groups} channels, but got {c_in} "
            "channels instead")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise RuntimeError(
            f"Given weight of size {list(weight.shape)}, expected bias to be 1-dimensional with "
            f"{weight.shape[0]} elements, but got bias of size {list(bias.shape)} instead")
    batched = list(input.shape) if input.dim() == 4 else [1, *input.shape]
    if batched[0] != 0 and any(d == 0 for d in batched[2:]):
        raise RuntimeError("Expected non-zero spatial dimensions for conv2d input, but got input "
                           f"shape: {batched}")
    padded = [i + 2 * p for i, p in zip(input.shape[-2:], padding)]
    kext = [d * (k - 1) + 1 for k, d in zip(weight.shape[2:], dilation)]
    if any(p < k for p, k in zip(padded, kext)):
        raise RuntimeError(
            f"Calculated padded input size per channel: ({padded[0]} x {padded[1]}). Kernel "
            f"size: ({kext[0]} x {kext[1]}). Kernel size can't be greater than actual input size")
    return stride, padding, dilation


def check_linear_args(input, weight, bias) -> None:
    """torch's exception types for the bad arguments of F.linear."""
    _check_tensors("linear", input, weight, bias)
    if input.dim() == 0:
        raise RuntimeError("both arguments to linear need to be at least 1D, but they are 0D and "
                           f"{weight.dim()}D")
    if weight.dim() != 2:
        raise RuntimeError(f"linear: expected weight to be 2-D (out_features, in_features), got "
                           f"weight of size {list(weight.shape)}")
    if input.shape[-1] != weight.shape[1]:
        rows = input.numel() // input.shape[-1] if input.shape[-1] else 0
        raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({rows}x{input.shape[-1]} "
                           f"and {weight.shape[1]}x{weight.shape[0]})")
    if bias is not None and (bias.dim() > 1 or bias.numel() != weight.shape[0]):
        raise RuntimeError(f"linear: expected bias of size [{weight.shape[0]}], got bias of size "
                           f"{list(bias.shape)}")


def resolve_padding(input: Tensor, weight: Tensor, stride, padding, dilation):
    """(input, padding pair) for F.conv2d's padding argument: ints as they are; "valid" is 0;
    "same" pads dilation * (kernel - 1) in total per dimension, half on each side, the odd
    extra element at the end (the input is padded with it, as torch does)."""
    if not isinstance(padding, str):
        return input, padding
    if padding == "valid":
        return input, (0, 0)
    if padding != "same":
        raise RuntimeError(f"Invalid padding string: '{padding}'")
    if any(s != 1 for s in _pair(stride, "stride")):
        raise RuntimeError("padding='same' is not supported for strided convolutions")
    dil = _pair(dilation, "dilation")
    if weight.dim() != 4:
        raise RuntimeError(f"conv2d: expected weight to be 4-D (C_out, C_in/groups, kH, kW), got "
                           f"weight of size {list(weight.shape)}")
    total = [d * (k - 1) for k, d in zip(weight.shape[2:], dil)]
    half = (total[0] // 2, total[1] // 2)
    extra = [t - 2 * h for t, h in zip(total, half)]
    if any(extra):
        input = torch.nn.functional.pad(input, [0, extra[1], 0, extra[0]])
    return input, half


def _act_eager(y: Tensor, act: str, negative_slope: float) -> Tensor:
    F = torch.nn.functional
    if act in ("relu", "leaky_relu", "tanh", "sigmoid") and y.dim() == 4 and y.is_contiguous():
        # torch's own (out-of-place) activation gives contiguous strides to a product whose
        # channels_last strides are also contiguous (one channel, 1x1 maps): so does this one
        y = _ct.to_format(y, torch.contiguous_format)
    if act == "relu":
        return F.relu(y, inplace=True)
    if act == "leaky_relu":
        return F.leaky_relu(y, negative_slope, inplace=True)
    if act == "tanh":
        return y.tanh_()
    if act == "sigmoid":
        return y.sigmoid_()
    return y


def _conv2d_act_fake(input, weight, bias, stride, padding, dilation, groups, activation,
                     negative_slope):
    y = torch.ops.aten.convolution(input, weight, bias, stride, padding, dilation, False, [0, 0],
                                   groups)  # (torch's checks and output shape)
    if y.dim() != 4:
        return y
    # the C++ op's layout: torch's product, then after an activation torch's elementwise rule
    return torch.empty(y.shape, dtype=y.dtype, device=y.device,
                       memory_format=_ct.fused_out_format(input, weight, y.shape, activation != 0))


def _linear_act_fake(input, weight, bias, activation, negative_slope):
    return torch.ops.aten.linear(input, weight, bias)


if _ct.HAS_CPP_OPS:
    torch.library.register_fake("genfast::conv2d_act", _conv2d_act_fake, lib=_ct._lib)
    torch.library.register_fake("genfast::linear_act", _linear_act_fake, lib=_ct._lib)
    _CONV_ACT = torch.ops.genfast.conv2d_act.default
    _LINEAR_ACT = torch.ops.genfast.linear_act.default


def _needs_grad(input, weight, bias) -> bool:
    """Whether an eager call records a backward. Without one, genfast's conv2d_act / linear_act
    forward is torch's own product and in-place activation behind a custom op's dispatch and C++
    autograd wrapper, which cost 15-35 us per call on the CI CPU (GF.linear at 1x256 -> 1: 43 us
    against F.linear's 11 us): those calls run torch's ops directly."""
    return torch.is_grad_enabled() and (
        getattr(input, "requires_grad", False) or getattr(weight, "requires_grad", False)
        or getattr(bias, "requires_grad", False))


def conv2d_eager(input, weight, bias, stride, padding, dilation, groups, act: str,
                 negative_slope: float) -> Tensor:
    """act(conv2d(input) + bias) for an eager CPU call (B.eager_cpu; ``act`` checked; ``padding``
    as conv2d takes it): genfast::conv2d_act, torch's oneDNN product forward with its autograd
    in C++, whose backward takes grad_input from the transposed convolution's GEMM form where
    that measured faster (csrc/conv_act_autograd.cpp). Calls without a backward (_needs_grad),
    string padding, autocast, and arguments the op does not take run torch's own conv2d (its
    checks and exceptions) and activation in place."""
    _check_slope_range(act, negative_slope, input)
    if (not torch.is_autocast_enabled("cpu") and not isinstance(padding, str)
            and _ct.int_args(stride, padding, dilation, groups) and _needs_grad(input, weight, bias)):
        try:
            return _CONV_ACT(input, weight, bias, stride, padding, dilation, groups,
                             B.ACTIVATIONS[act], float(negative_slope))
        except (RuntimeError, TypeError, ValueError):
            pass  # arguments of types the schema does not take: torch's call raises its exception
    return _act_eager(torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation,
                                                 groups), act, negative_slope)


def linear_eager(input, weight, bias, act: str, negative_slope: float) -> Tensor:
    """act(linear(input) + bias) for an eager CPU call (B.eager_cpu; ``act`` checked):
    genfast::linear_act (for 2-128 rows the BLAS product transposed and one bias + activation pass
    of ours, else ATen's addmm and torch's activation in place; autograd in C++ with the two
    backward products side by side on a two-thread CPU) for 2-D float32 / float64 input; calls
    without a backward (_needs_grad), autocast and everything else run torch's own linear (its
    checks and exceptions) and activation in place."""
    _check_slope_range(act, negative_slope, input)
    if not torch.is_autocast_enabled("cpu") and _needs_grad(input, weight, bias):
        try:
            return _LINEAR_ACT(input, weight, bias, B.ACTIVATIONS[act], float(negative_slope))
        except (RuntimeError, TypeError, ValueError):
            pass  # arguments of types the schema does not take: torch's call raises its exception
    return _act_eager(torch.nn.functional.linear(input, weight, bias), act, negative_slope)


def conv2d_fast(input, weight, bias, stride, padding, dilation, groups, activation,
                negative_slope) -> Optional[Tensor]:
    """The common eager CPU call (batched float32 / float64 tensors, int geometry, a known
    activation, autocast off, the cpu backend by "auto" or pin, not traced) straight to the C++
    entry genfast._C.conv2d_act_eager: genfast::conv2d_act when the call records a backward, else
    torch's conv2d and activation in place. None for every other call, which takes the checked path
    (and raises there when it must)."""
    act = _ct.fast_act(activation, negative_slope)
    if (act is None or type(input) is not Tensor or type(groups) is not int or not B.eager_cpu(input)
            or torch._C._has_torch_function((weight, bias)) or B.dual_among(input, weight, bias)):
        # (a forward-AD dual: the entry's product for a call without a backward, Winograd's, has
        # no jvp and dropped the tangent; the checked path runs torch's conv2d there)
        return None
    s, p, d = _ct.fast_pair(stride), _ct.fast_pair(padding), _ct.fast_pair(dilation)
    if s is None or p is None or d is None:
        return None
    try:
        return B.extension().conv2d_act_eager(input, weight, bias, s, p, d, groups, act,
                                              float(negative_slope))
    except (TypeError, OverflowError):  # see conv_transpose2d_fast
        return None


def linear_fast(input, weight, bias, activation, negative_slope) -> Optional[Tensor]:
    """The common eager CPU call ((*, in_features) float32 / float64 input matching the weight, a
    known activation, autocast off, the cpu backend by "auto" or pin, not traced) straight to the
    C++ entry genfast._C.linear_act_eager: genfast::linear_act when the call records a backward,
    else torch's linear and activation in place. None for every other call, which takes the
    checked path (and raises there when it must)."""
    act = _ct.fast_act(activation, negative_slope)
    if (act is None or type(input) is not Tensor or not B.eager_cpu(input)
            or torch._C._has_torch_function((weight, bias)) or B.dual_among(input, weight, bias)):
        return None  # (a forward-AD dual: as in conv2d_fast, the entry's BLAS product has no jvp)
    try:
        return B.extension().linear_act_eager(input, weight, bias, act, float(negative_slope))
    except (TypeError, OverflowError):  # see conv_transpose2d_fast
        return None


def conv2d_act(input, weight, bias, stride, padding, dilation, groups, activation,
               negative_slope):
    """The checked entry point of act(conv2d(input, weight) + bias): argument checks, "same"
    padding, unbatched input, autocast, backend choice."""
    act = check_activation(activation, negative_slope)
    if B.eager_cpu(input):
        # Eager CPU calls: genfast::conv2d_act (torch's product, C++ autograd), or torch's own
        # conv2d and activation where it does not apply (see conv2d_eager, B.eager_cpu).
        return conv2d_eager(input, weight, bias, stride, padding, dilation, groups, act,
                            negative_slope)
    # under torch.autocast the product runs in the autocast dtype: the checks see the tensors it
    # will see (a float32 weight with a bfloat16 input is autocast's case)
    input, weight, bias = _ct.autocast_lower_precision(input, weight, bias)
    _check_tensors("conv2d", input, weight, bias)
    _check_slope_range(act, negative_slope, input)
    input, padding = resolve_padding(input, weight, stride, padding, dilation)
    stride, padding, dilation = check_conv2d_args(input, weight, bias, stride, padding, dilation,
                                                  groups)
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    name = B.resolve(FAMILY, x.device)
    if name == "reference":
        y = ref.product_act("conv2d", x, weight, bias, stride, padding, dilation, int(groups),
                            act, negative_slope)
    else:
        y = product_act_op(x, weight, bias, "conv2d", list(stride), list(padding), list(dilation),
                           int(groups), B.ACTIVATIONS[act], float(negative_slope), B.for_op(name))
    return y.squeeze(0) if unbatched else y


def linear_act(input, weight, bias, activation, negative_slope):
    """The checked entry point of act(input @ weight.T + bias) for input (*, in_features)."""
    act = check_activation(activation, negative_slope)
    if B.eager_cpu(input):
        # Eager CPU calls: torch's matmul with the bias (its checks), torch's activation in place.
        return linear_eager(input, weight, bias, act, negative_slope)
    input, weight, bias = _ct.autocast_lower_precision(input, weight, bias)  # (as conv2d_act)
    check_linear_args(input, weight, bias)
    _check_slope_range(act, negative_slope, input)
    flat = input.dim() != 2  # (*, in) runs as (M, in); a 2-D input needs no view (nor its
    lead = input.shape[:-1]  # autograd node)
    x = input.reshape(-1, input.shape[-1]) if flat else input
    name = B.resolve(FAMILY, x.device)
    if name == "reference":
        y = ref.product_act("linear", x, weight, bias, activation=act,
                            negative_slope=negative_slope)
    else:
        y = product_act_op(x, weight, bias, "linear", [1, 1], [0, 0], [1, 1], 1,
                           B.ACTIVATIONS[act], float(negative_slope), B.for_op(name))
    return y.reshape(*lead, weight.shape[0]) if flat else y


# --- product + BatchNorm + activation (training) ---------------------------------------------

class _ProductBNAct(torch.autograd.Function):
    """Training forward/backward of Conv2d / Linear -> BatchNorm (batch statistics) ->
    activation through the registered ops: the product without bias, its statistics partials,
    then the transposed convolution's bn_block finalize / apply / backward ops. The product's
    bias only shifts the running mean (added in the finalize); its gradient is the sum of the
    BatchNorm input gradient. create_graph=True differentiates the reference composition."""

    @staticmethod
    def forward(ctx, input, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
                num_batches_tracked, cfg):
        kind, stride, padding, dilation, groups, momentum, cumulative, eps, act, slope, backend = cfg
        y, part = product_stats_op(input, weight, kind, stride, padding, dilation, groups, backend)
        mean, invstd, scale, shift = _ct.bn_block_finalize_op(
            part, conv_bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
            momentum, cumulative, eps, _acc(input.dtype), backend)
        out = _ct.bn_block_apply_op(y, mean, invstd, scale, shift, bn_weight, bn_bias,
                                    B.ACTIVATIONS[act], slope, backend)
        ctx.save_for_backward(input, weight, conv_bias, bn_weight, bn_bias, y, mean, invstd)
        ctx.cfg = cfg
        return out

    @staticmethod
    def backward(ctx, grad_out):
        input, weight, conv_bias, bn_weight, bn_bias, y, mean, invstd = ctx.saved_tensors
        kind, stride, padding, dilation, groups, momentum, cumulative, eps, act, slope, backend = ctx.cfg
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():
            from genfast.reference import batchnorm_act as bnref

            pairs = list(zip((input, weight, conv_bias, bn_weight, bn_bias), need[:5]))
            wrt = [t for t, n in pairs if n]
            z = ref.product(kind, input, weight, conv_bias, stride, padding, dilation, groups)
            out = bnref.batch_norm_act(z, None, None, bn_weight, bn_bias, True, 0.0, eps, act, slope)
            grads = iter(torch.autograd.grad(out, wrt, grad_out, create_graph=True))
            return (*(next(grads) if n else None for _, n in pairs), None, None, None, None)
        has_cb = conv_bias is not None and bool(need[2])
        dy, dgw, dgb, dcb = _ct.bn_block_backward_op(grad_out, y, mean, invstd, bn_weight, bn_bias,
                                                     B.ACTIVATIONS[act], slope, has_cb, backend)
        dx = dw = None
        if need[0] or need[1]:
            dx, dw, _ = product_act_backward_op(dy, input, weight, y, kind, stride, padding,
                                                dilation, groups, 0, 0.0, bool(need[0]),
                                                bool(need[1]), False, backend)
        return (dx if need[0] else None, dw if need[1] else None, dcb if has_cb else None,
                dgw if bn_weight is not None and need[3] else None,
                dgb if bn_bias is not None and need[4] else None, None, None, None, None)


def product_bn_act_train(kind, input, weight, bias, stride, padding, dilation, groups,
                         bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                         momentum, eps, activation, negative_slope, backend):
    """Training forward of product -> BatchNorm (batch statistics) -> activation on the fused
    path (``backend`` "cuda"/"triton", or "auto" resolved when the ops run), arguments already
    checked (conv2d input 4-D with zero padding; linear input 2-D). Updates running_mean /
    running_var (unbiased variance) and num_batches_tracked in place; momentum None is the
    cumulative average."""
    input, weight, bias = _ct.autocast_lower_precision(input, weight, bias)
    cumulative = momentum is None and running_mean is not None
    cfg = (kind, list(stride), list(padding), list(dilation), int(groups),
           0.0 if momentum is None else float(momentum), cumulative, float(eps), activation,
           float(negative_slope), backend)
    return _ProductBNAct.apply(input, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                               num_batches_tracked, cfg)
