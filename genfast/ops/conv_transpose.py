"""The genfast::conv_transpose2d ops: fake implementations, autograd and backend choice.

Backends (the `backend` argument of each op):
  "cuda"    the products come from cuDNN through ATen (transposed convolution without bias;
            convolution_backward for grad_input and grad_weight) and genfast's Triton kernels
            (genfast/kernels/conv_epilogue.py) do what surrounds them: bias + activation in one
            read-modify-write pass of the output; dz = dy * act'(y) with the bias-gradient sums
            in one pass. What `auto` runs on CUDA tensors (backend.AUTO_CUDA).
  "triton"  genfast's implicit GEMM (genfast/kernels/conv_transpose.py) for the products too.
  "cpu"     the C++ ops genfast::conv_transpose2d_fwd / _bwd (ATen's CPU products, our epilogue).
Ops:
  genfast::conv_transpose2d / conv_transpose2d_backward   the registered pair (autograd, fake).
  genfast::conv_transpose2d_stats   the product without bias plus the (3, P, C) Welford partials
      of its output, for the BatchNorm block below.
  genfast::bn_block_finalize / bn_block_apply / bn_block_backward   the BatchNorm + activation
      that follows (ConvTranspose2d -> BatchNorm2d -> activation, training).
Autograd saves x, weight and the output y (not the pre-activation): act' is computed from y.
When the backward must itself be differentiable (create_graph=True), it runs the reference
(composite PyTorch) path instead of the fused kernels.

Launches of the training block (counted by tests/test_conv_transpose.py::test_launch_budget):
forward = product + stats + finalize (running statistics and num_batches_tracked in place) +
apply; backward = bn reduce + bn finalize + bn dx + the products (grad_input, grad_weight).
"""
from __future__ import annotations

import functools
import numbers
from typing import Optional, Sequence

import torch
import torch._prims_common as _prims
from torch import Tensor

from genfast import backend as B
from genfast.reference import batchnorm_act as _bnref
from genfast.reference import conv_transpose as ref

FAMILY = "conv_transpose"
ACTIVATIONS = ("identity", "relu", "leaky_relu", "tanh", "sigmoid")
_ACT_NAMES = {v: k for k, v in B.ACTIVATIONS.items()}

_lib = torch.library.Library("genfast", "FRAGMENT")


def _out_hw(input, weight, stride, padding, output_padding, dilation):
    return ref.output_size(input.shape[2:], weight.shape[2:], stride, padding, output_padding, dilation)


def _memory_format(x: Tensor) -> torch.memory_format:
    """A gradient's layout (grad_input in the input's, grad_weight in the weight's):
    channels_last when x is channels_last-dense and not contiguous, else contiguous."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def out_format(input: Tensor, weight: Tensor) -> torch.memory_format:
    """The output's layout, torch's rule for its convolutions (and transposed convolutions):
    channels_last when the input or the weight suggests it (the order of its strides: a model
    made channels_last gives channels_last outputs from a contiguous input, and an (N, C, 1, 1)
    input made channels_last counts), except float64 on CUDA (cuDNN's rule), else contiguous.
    csrc/cpu/conv_transpose.cpp's output_format is the CPU half of it."""
    if input.dim() != 4 or weight.dim() != 4:
        return torch.contiguous_format
    if input.shape[0] == 0 or input.shape[1] == 0:  # torch's empty-input convolution: contiguous
        return torch.contiguous_format
    if input.device.type == "cuda" and torch.float64 in (input.dtype, weight.dtype):
        return torch.contiguous_format
    if _suggests_channels_last(input) or _suggests_channels_last(weight):
        return torch.channels_last
    return torch.contiguous_format


def _suggests_channels_last(t: Tensor) -> bool:
    """suggest_memory_format(t) == channels_last for a 4-D t, without its stride walk where the
    answer is plain (a tensor dense in exactly one of the two layouts; the walk costs ~5 us)."""
    cl = t.is_contiguous(memory_format=torch.channels_last)
    if cl != t.is_contiguous():
        return cl
    return _prims.suggest_memory_format(t) == torch.channels_last


def fused_out_format(input: Tensor, weight: Tensor, out_shape: Sequence[int],
                     elementwise_after: bool) -> torch.memory_format:
    """The layout of a fused product whose activation (or following BatchNorm) torch would run
    as its own op: out_format, except that torch's elementwise ops and CPU BatchNorm give a
    contiguous output for an input that is contiguous whatever its strides, so a channels_last
    product whose shape makes the two layouts one memory order (one channel, a 1x1 map, or
    empty) comes out contiguous after them. csrc/cpu/conv_transpose.cpp's fused_output_format."""
    fmt = out_format(input, weight)
    if elementwise_after and fmt == torch.channels_last and len(out_shape) == 4:
        N, C, H, W = out_shape
        if N * C * H * W == 0 or C == 1 or H * W == 1:
            return torch.contiguous_format
    return fmt


def grad_formats(input: Tensor, weight: Tensor) -> tuple[torch.memory_format, torch.memory_format]:
    """The layouts of (grad_input, grad_weight). CPU tensors: torch's rule for its transposed
    convolution's gradients (checked on torch 2.14 over contiguous / channels_last inputs and
    weights, empty batches, 1x1 maps, one channel): both follow the output's rule (out_format:
    a contiguous input with a channels_last weight gives channels_last gradients, and so does a
    channels_last input with a contiguous weight), except grad_weight for an empty input (the
    weight's own layout). csrc/cpu/conv_transpose.cpp's backward is the same rule. Elsewhere
    (not measured on a GPU): each in its own tensor's layout."""
    if input.dim() != 4 or weight.dim() != 4 or input.device.type != "cpu":
        return _memory_format(input), _memory_format(weight)
    fmt = out_format(input, weight)
    empty = input.shape[0] == 0 or input.shape[1] == 0
    return fmt, (_memory_format(weight) if empty else fmt)


@functools.lru_cache(maxsize=1024)
def _canonical_strides(shape: tuple, fmt: torch.memory_format) -> tuple:
    return torch.empty(shape, device="meta", memory_format=fmt).stride()


def to_format(y: Tensor, fmt: torch.memory_format) -> Tensor:
    """y with exactly the strides torch.empty gives for fmt (the fakes'): y itself, or a copy."""
    if y.dim() != 4:
        return y
    if y.stride() == _canonical_strides(tuple(y.shape), fmt):
        return y
    return torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=fmt).copy_(y)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd_fake_cpp(input, weight, bias, stride, padding, output_padding, groups, dilation, activation,
                  negative_slope, stats):
    H, W = _out_hw(input, weight, stride, padding, output_padding, dilation)
    shape = (input.shape[0], weight.shape[1] * groups, H, W)
    y = torch.empty(shape, device=input.device, dtype=input.dtype,
                    memory_format=fused_out_format(input, weight, shape, activation != 0 or stats))
    part = (input.new_empty((3, 1, y.shape[1]), dtype=torch.float64) if stats
            else input.new_empty((0,), dtype=_acc(input.dtype)))
    return y, part, input.new_empty((0,), dtype=_acc(input.dtype))


def _bwd_fake_cpp(grad_out, input, weight, output, stride, padding, dilation, groups, activation,
                  negative_slope, need_input, need_weight, has_bias):
    dx_fmt, dw_fmt = grad_formats(input, weight)
    dx = (torch.empty(input.shape, device=input.device, dtype=input.dtype,
                      memory_format=dx_fmt) if need_input else input.new_empty((0,)))
    dw = (torch.empty(weight.shape, device=weight.device, dtype=weight.dtype,
                      memory_format=dw_fmt) if need_weight else input.new_empty((0,)))
    db = weight.new_empty((weight.shape[1] * groups,)) if has_bias else input.new_empty((0,))
    return dx, dw, db


# --- kernels per backend -----------------------------------------------------------------------

def _vendor_product(input, weight, stride, padding, output_padding, groups, dilation):
    """conv_transpose2d(input, weight) without bias through ATen (cuDNN on CUDA tensors), in
    the memory format the fake implementation promises."""
    y = torch.ops.aten.convolution(input, weight, None, stride, padding, dilation, True,
                                   output_padding, groups)
    fmt = out_format(input, weight)
    return y if y.is_contiguous(memory_format=fmt) else y.contiguous(memory_format=fmt)


# oneDNN's transposed convolution with the activation as a post-op, for the registered op's CPU
# calls in bfloat16 and float16 (and float32 without genfast._C; float32 and float64 otherwise
# take the eager path's C++ op, measured faster): bias and activation cost no extra pass over
# the output. Only the post-ops that
# treat NaN and +-inf as torch does (checked on torch 2.14: oneDNN's relu post-op turns -inf
# into NaN and its sigmoid turns NaN into a number); relu and sigmoid take the C++ path.
_ONEDNN_ATTR = {0: "none", 2: "leaky_relu", 3: "tanh"}
# Reduced-precision primitives need CPU features (AVX-512 BW/VL/DQ or AVX-NE-CONVERT) that
# not every CPU has: asked of torch once, at import.
_ONEDNN_DTYPES = ((torch.float32,)
                  + ((torch.bfloat16,) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else ())
                  + ((torch.float16,) if torch.ops.mkldnn._is_mkldnn_fp16_supported() else ()))


def _onednn_ok(input: Tensor, weight: Tensor, bias: Optional[Tensor], activation: int,
               stride, output_padding) -> bool:
    # oneDNN's deconvolution needs output_padding < stride (torch also allows < dilation)
    return (activation in _ONEDNN_ATTR and input.dtype in _ONEDNN_DTYPES
            and all(op < s for op, s in zip(output_padding, stride))
            and input.dtype == weight.dtype and input.shape[0] > 0
            and (bias is None or bias.is_contiguous()) and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_transpose_pointwise"))


def _forward(backend, input, weight, bias, stride, padding, output_padding, groups, dilation,
             activation, negative_slope):
    backend = B.at_run(FAMILY, backend, input.device)
    if backend == "cpu" and HAS_CPP_OPS and input.dtype in (torch.float32, torch.float64):
        # the eager path's op: genfast's GEMM form or ATen's product with our epilogue, by shape
        # (oneDNN's transposed convolution with the activation post-op measured 1.0-2.9x slower
        # on the CI CPU at every generator layer tried: 2.4 ms against 0.4 ms for a 16 -> 1
        # channel k5 s2 layer at batch 64, 5.9 against 2.0 ms for a 64 -> 32 k5 s1 one)
        y = _CT_ACT(input, weight, bias, stride, padding, output_padding, groups, dilation,
                    activation, float(negative_slope))
        return to_format(y, fused_out_format(input, weight, y.shape, activation != 0))
    if backend == "cpu" and _onednn_ok(input, weight, bias, activation, stride, output_padding):
        y = torch.ops.mkldnn._convolution_transpose_pointwise(
            input, weight, bias, padding, output_padding, stride, dilation, groups,
            _ONEDNN_ATTR[activation], [negative_slope] if activation == 2 else [], "")
        return to_format(y, fused_out_format(input, weight, y.shape, activation != 0))
    if backend == "cpu":
        return torch.ops.genfast.conv_transpose2d_fwd(input, weight, bias, stride, padding,
                                                      output_padding, groups, dilation, activation,
                                                      negative_slope, False)[0]
    if backend == "cuda":
        from genfast.kernels import conv_epilogue as E

        y = _vendor_product(input, weight, stride, padding, output_padding, groups, dilation)
        y = E.epilogue_(y, bias, activation, negative_slope)
        return to_format(y, fused_out_format(input, weight, y.shape, activation != 0))
    if backend == "triton":
        from genfast.kernels import conv_transpose as K

        return K.conv_transpose2d_fwd(input, weight, bias, stride, padding, output_padding, groups,
                                      dilation, activation, negative_slope)
    raise ValueError(f"conv_transpose2d: backend must be 'cpu', 'cuda' or 'triton', got {backend!r}")


def _output_padding_of(input, weight, output, stride, padding, dilation):
    return [o - ((i - 1) * s - 2 * p + d * (k - 1) + 1) for o, i, k, s, p, d in
            zip(output.shape[2:], input.shape[2:], weight.shape[2:], stride, padding, dilation)]


def _backward(backend, grad_out, input, weight, output, stride, padding, dilation, groups,
              activation, negative_slope, need_input, need_weight, has_bias):
    backend = B.at_run(FAMILY, backend, grad_out.device)
    if backend == "cpu":
        return torch.ops.genfast.conv_transpose2d_bwd(grad_out, input, weight, output, stride,
                                                      padding, dilation, groups, activation,
                                                      negative_slope, need_input, need_weight,
                                                      has_bias)
    if backend == "cuda":
        from genfast.kernels import conv_epilogue as E

        dz, db = E.prologue(grad_out, output, activation, negative_slope, has_bias, weight.dtype)
        dx = dw = None
        if need_input or need_weight:
            dx, dw, _ = torch.ops.aten.convolution_backward(
                dz, input, weight, None, stride, padding, dilation, True,
                _output_padding_of(input, weight, output, stride, padding, dilation), groups,
                [need_input, need_weight, False])
        # in the layouts (and exact strides) the fake promises
        dx_fmt, dw_fmt = grad_formats(input, weight)
        if need_input:
            dx = to_format(dx, dx_fmt)
        if need_weight:
            dw = to_format(dw, dw_fmt)
        return (dx if need_input else input.new_empty((0,)),
                dw if need_weight else input.new_empty((0,)),
                db if has_bias else input.new_empty((0,)))
    if backend == "triton":
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
                    groups, list(dilation), activation, negative_slope)


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


@conv_transpose2d_backward_op.register_fake
def _(grad_out, input, weight, output, stride, padding, dilation, groups, activation,
      negative_slope, need_input, need_weight, has_bias, backend):
    return _bwd_fake_cpp(grad_out, input, weight, output, stride, padding, dilation, groups,
                         activation, negative_slope, need_input, need_weight, has_bias)


def _setup_context(ctx, inputs, output):
    (input, weight, bias, stride, padding, output_padding, groups, dilation, activation,
     negative_slope, backend) = inputs
    # the output only where the backward reads it (an activation): with none, the caller may
    # modify it in place before the backward, as after torch's own product
    ctx.save_for_backward(input, weight, bias, output if activation != 0 else None)
    ctx.cfg = (list(stride), list(padding), list(output_padding), groups, list(dilation),
               activation, negative_slope, backend)


def _backward_formula(ctx, grad_out):
    input, weight, bias, y = ctx.saved_tensors
    y = grad_out if y is None else y  # no activation: the kernels do not read it
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


conv_transpose2d_op.register_autograd(_backward_formula, setup_context=_setup_context)


# --- the BatchNorm block's ops (no autograd of their own: _ConvTransposeBNAct below) ----------

def _channel_sum(t: Tensor) -> Tensor:
    """Per-channel sum of an (N, C, *) or (N, C) tensor."""
    return t.sum([d for d in range(t.dim()) if d != 1])


# Activations of the C++ BatchNorm kernels (identity, relu, leaky_relu); tanh and sigmoid after
# a BatchNorm run the reference formulas on CPU tensors.
_CPP_BN_ACTS = (0, 1, 2)


def _partials_fake(y: Tensor, backend: str) -> Tensor:
    C = y.shape[1]
    if B.at_run(FAMILY, backend, y.device) == "cpu":
        return y.new_empty((3, 1, C), dtype=torch.float64)
    from genfast.kernels import conv_epilogue as E

    progs = E.PlaneView(y).split(y)[0] if y.numel() > 0 else 0
    return y.new_empty((3, progs, C), dtype=torch.float64)


@torch.library.custom_op("genfast::conv_transpose2d_stats", mutates_args=())
def conv_transpose2d_stats_op(input: Tensor, weight: Tensor, stride: Sequence[int],
                              padding: Sequence[int], output_padding: Sequence[int], groups: int,
                              dilation: Sequence[int], backend: str) -> tuple[Tensor, Tensor]:
    """(y, partials): the transposed convolution without bias and the (3, P, C_out) per-channel
    (count, mean, M2) partials of y (one read of y after the product on cuda/triton; inside the
    C++ epilogue on cpu)."""
    stride, padding, output_padding, dilation = (list(stride), list(padding), list(output_padding),
                                                 list(dilation))
    backend = B.at_run(FAMILY, backend, input.device)
    if backend == "cpu":
        y, part, _ = torch.ops.genfast.conv_transpose2d_fwd(input, weight, None, stride, padding,
                                                            output_padding, groups, dilation, 0,
                                                            0.0, True)
        return y, part
    from genfast.kernels import conv_epilogue as E

    if backend == "cuda":
        y = _vendor_product(input, weight, stride, padding, output_padding, groups, dilation)
    elif backend == "triton":
        from genfast.kernels import conv_transpose as K

        y = K.conv_transpose2d_fwd(input, weight, None, stride, padding, output_padding, groups,
                                   dilation, 0, 0.0)
    else:
        raise ValueError(f"conv_transpose2d_stats: unknown backend {backend!r}")
    y = to_format(y, fused_out_format(input, weight, y.shape, True))  # a BatchNorm follows
    if y.numel() == 0:
        return y, y.new_zeros((3, 0, y.shape[1]), dtype=torch.float64)
    return y, E.bn_stats_partials(y)


@conv_transpose2d_stats_op.register_fake
def _(input, weight, stride, padding, output_padding, groups, dilation, backend):
    y = _fwd_fake_cpp(input, weight, None, stride, padding, output_padding, groups, dilation, 0,
                      0.0, True)[0]  # (True: a BatchNorm follows, the layout rule's only use here)
    return y, _partials_fake(y, backend)


@torch.library.custom_op("genfast::bn_block_finalize_",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def bn_block_finalize_op(partials: Tensor, conv_bias: Optional[Tensor], weight: Optional[Tensor],
                         bias: Optional[Tensor], running_mean: Optional[Tensor],
                         running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
                         momentum: float, cumulative: bool, eps: float, acc_dtype: torch.dtype,
                         backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean, invstd, scale, shift) per channel from the partials (merged in fixed order); the
    running statistics (batch mean + conv_bias, unbiased variance) and num_batches_tracked are
    updated in place in the same launch."""
    backend = B.at_run(FAMILY, backend, partials.device)
    if backend == "cpu":
        return torch.ops.genfast.bn_block_finalize(partials, conv_bias, weight, bias, running_mean,
                                                   running_var, num_batches_tracked, momentum,
                                                   cumulative, eps, acc_dtype)
    from genfast.kernels import conv_epilogue as E

    return E.bn_finalize(partials, conv_bias, weight, bias, running_mean, running_var,
                         num_batches_tracked, momentum, cumulative, eps, acc_dtype)


@bn_block_finalize_op.register_fake
def _(partials, conv_bias, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
      cumulative, eps, acc_dtype, backend):
    C = partials.shape[2]
    return tuple(partials.new_empty((C,), dtype=acc_dtype) for _ in range(4))


@torch.library.custom_op("genfast::bn_block_apply", mutates_args=())
def bn_block_apply_op(y: Tensor, mean: Tensor, invstd: Tensor, scale: Tensor, shift: Tensor,
                      weight: Optional[Tensor], bias: Optional[Tensor], activation: int,
                      negative_slope: float, backend: str) -> Tensor:
    """act(y * scale + shift) = act(weight * (y - mean) * invstd + bias): one read of y."""
    backend = B.at_run(FAMILY, backend, y.device)
    if backend == "cpu":
        if activation in _CPP_BN_ACTS:
            return torch.ops.genfast.batch_norm_act_apply(y, mean, invstd, weight, bias,
                                                          activation, negative_slope, 0.0)
        from genfast.reference.activation import act_forward

        shape = (1, -1) + (1,) * (y.dim() - 2)
        z = y.to(scale.dtype) * scale.view(shape) + shift.view(shape)
        return act_forward(z, _ACT_NAMES[activation], negative_slope).to(y.dtype)
    from genfast.kernels import conv_epilogue as E

    return E.bn_apply(y, scale, shift, activation, negative_slope)


@bn_block_apply_op.register_fake
def _(y, mean, invstd, scale, shift, weight, bias, activation, negative_slope, backend):
    return _bnref.empty_bn_output(y)


@torch.library.custom_op("genfast::bn_block_backward", mutates_args=())
def bn_block_backward_op(grad_out: Tensor, y: Tensor, mean: Tensor, invstd: Tensor,
                         weight: Optional[Tensor], bias: Optional[Tensor], activation: int,
                         negative_slope: float, conv_bias_grad: bool,
                         backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dy, grad_weight, grad_bias, grad_conv_bias) of training-mode BatchNorm + activation
    (the statistics are functions of y); absent gradients are empty (0,) tensors.
    grad_conv_bias (the sum of dy per channel) when conv_bias_grad."""
    backend = B.at_run(FAMILY, backend, y.device)
    def empty():  # a distinct tensor per absent gradient (custom-op outputs must not alias)
        return y.new_empty((0,))

    if backend == "cpu" and activation not in _CPP_BN_ACTS:
        from genfast.reference import batchnorm_act as bnref

        dy, dw, db = bnref.batch_norm_act_backward(grad_out, y, weight, bias, mean, invstd, True,
                                                   _ACT_NAMES[activation], negative_slope)
        return (dy, dw.to(weight.dtype) if weight is not None else empty(),
                db.to(bias.dtype) if bias is not None else empty(),
                _channel_sum(dy) if conv_bias_grad else empty())
    if backend == "cpu":
        sum_dz, sum_dzx = torch.ops.genfast.batch_norm_act_bwd_reduce(
            grad_out, y, weight, bias, mean, invstd, activation, negative_slope, 0.0, False)
        count = float(y.numel() // max(y.shape[1], 1))
        dy = torch.ops.genfast.batch_norm_act_bwd_dx(grad_out, y, weight, bias, mean, invstd,
                                                     sum_dz, sum_dzx, count, activation,
                                                     negative_slope, 0.0, False)
        dw = sum_dzx.to(weight.dtype) if weight is not None else empty()
        db = sum_dz.to(bias.dtype) if bias is not None else empty()
        return dy, dw, db, _channel_sum(dy) if conv_bias_grad else empty()
    from genfast.kernels import conv_epilogue as E

    dy, dw, db, dcb = E.bn_act_backward(grad_out, y, mean, invstd, weight, bias, activation,
                                        negative_slope, conv_bias_grad)
    return (dy, dw if dw is not None else empty(), db if db is not None else empty(),
            dcb if dcb is not None else empty())


@bn_block_backward_op.register_fake
def _(grad_out, y, mean, invstd, weight, bias, activation, negative_slope, conv_bias_grad, backend):
    C = y.shape[1]
    return (torch.empty_like(y), weight.new_empty((C,)) if weight is not None else y.new_empty((0,)),
            bias.new_empty((C,)) if bias is not None else y.new_empty((0,)),
            y.new_empty((C,)) if conv_bias_grad else y.new_empty((0,)))


def _act_fake_cpp(input, weight, bias, stride, padding, output_padding, groups, dilation, activation,
                  negative_slope):
    return _fwd_fake_cpp(input, weight, bias, stride, padding, output_padding, groups, dilation,
                         activation, negative_slope, False)[0]


HAS_CPP_OPS = B.has_cpu_ext()
if HAS_CPP_OPS:
    torch.library.register_fake("genfast::conv_transpose2d_fwd", _fwd_fake_cpp, lib=_lib)
    torch.library.register_fake("genfast::conv_transpose2d_bwd", _bwd_fake_cpp, lib=_lib)
    torch.library.register_fake("genfast::conv_transpose2d_act", _act_fake_cpp, lib=_lib)
    _CT_ACT = torch.ops.genfast.conv_transpose2d_act.default


# --- the gates of the eager CPU entries (genfast._C.*_eager, csrc/eager_entries.cpp) ---------

_FAST_ACTS: dict = {None: 0, **B.ACTIVATIONS}


def fast_act(activation, negative_slope) -> Optional[int]:
    """The activation code a C++ eager entry takes, or None where the checked path must run: an
    activation other than None or one of the known names, a slope of a type other than float / int
    (0-dim tensors and numpy numbers, which torch also takes, go the checked way), a negative
    leaky_relu slope (the checked path raises)."""
    if (activation is not None and type(activation) is not str) or type(negative_slope) not in (float, int):
        return None
    if not int64_slope(negative_slope):
        return None
    act = _FAST_ACTS.get(activation)
    return None if act == 2 and not negative_slope >= 0 else act


def int64_slope(negative_slope) -> bool:
    """False for an int slope beyond int64, which the C++ entries' double would take silently:
    those go the checked way, which raises torch's OverflowError for leaky_relu
    (check_int_slope)."""
    return type(negative_slope) is not int or -(1 << 63) <= negative_slope < (1 << 63)


def fast_pair(value):
    """An int or a 2-tuple / list of ints as a pair, else None (bools, which torch's products
    refuse with TypeError and the C++ argument would take as 1, and other types go the checked
    way)."""
    t = type(value)
    if t is int:
        return (value, value)
    if (t is tuple or t is list) and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return value
    return None


def int_args(*values) -> bool:
    """Whether each value is an int or a tuple/list of ints, none of them a bool (the op schema
    would take True as 1; torch's products raise TypeError)."""
    for v in values:
        items = v if isinstance(v, (tuple, list)) else (v,)
        if any(isinstance(e, bool) for e in items):
            return False
    return True


def conv_transpose2d_fast(input, weight, bias, stride, padding, output_padding, groups, dilation,
                          activation, negative_slope) -> Optional[Tensor]:
    """The common eager CPU call (batched float32 / float64 tensors, int geometry, a known
    activation, autocast off, the cpu backend by "auto" or pin, not traced) straight to
    genfast::conv_transpose2d_act through genfast._C.conv_transpose2d_act_eager; None for every
    other call, which takes the checked path (and raises there when it must)."""
    act = fast_act(activation, negative_slope)
    if (act is None or type(input) is not Tensor or type(groups) is not int or not B.eager_cpu(input)
            or torch._C._has_torch_function((weight, bias))):
        return None
    s, p, op, d = fast_pair(stride), fast_pair(padding), fast_pair(output_padding), fast_pair(dilation)
    if (s is None or p is None or op is None or d is None
            or slope_beyond_float32(activation, negative_slope, input)):
        return None
    try:
        return B.extension().conv_transpose2d_act_eager(input, weight, bias, s, p, op, groups, d, act,
                                                       float(negative_slope))
    except (TypeError, OverflowError):
        # an argument of a type the C++ signature does not take (pybind11 raises TypeError before
        # the call) or an int slope beyond float's range: the checked path raises torch's exception
        return None


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


def check_int_slope(negative_slope) -> None:
    """torch's argument-parser errors for a leaky_relu slope: TypeError naming the argument for
    anything but a real number or a 0-dim tensor (a string, None), and OverflowError for an int
    it cannot convert (outside [-2**63, 2**64)), which float(slope) would take."""
    if not (isinstance(negative_slope, numbers.Real)
            or (isinstance(negative_slope, torch.Tensor) and negative_slope.dim() == 0)):
        raise TypeError("leaky_relu(): argument 'negative_slope' must be Number, not "
                        f"{type(negative_slope).__name__}")
    if (type(negative_slope) is int
            and not -(1 << 63) <= negative_slope < (1 << 64)):  # noqa: E721 - bools are not ints here
        raise OverflowError("int too big to convert")


_F32_MAX = torch.finfo(torch.float32).max


def slope_beyond_float32(act, negative_slope, input) -> bool:
    """A finite leaky_relu slope beyond float32's range with a float32 / float16 / bfloat16
    input (torch raises; the C++ entries would round it to inf)."""
    return (act == "leaky_relu" and isinstance(input, torch.Tensor) and input.dtype != torch.float64
            and -float("inf") < negative_slope < float("inf") and abs(negative_slope) > _F32_MAX)


def check_slope_range(act, negative_slope, input) -> None:
    """torch's error for a LeakyReLU slope that the input's (accumulation) dtype cannot hold."""
    if slope_beyond_float32(act, negative_slope, input):
        raise RuntimeError("value cannot be converted to type float without overflow")


def apply_activation(x: Tensor, activation: Optional[str], negative_slope: float) -> Tensor:
    """torch's own (out-of-place) activation function named by ``activation``: the modules'
    unfused paths, and the functions' dtypes without a genfast kernel (integers, complex)."""
    if activation is None or activation == "identity":
        return x
    if activation == "relu":
        return torch.relu(x)
    if activation == "leaky_relu":
        return torch.nn.functional.leaky_relu(x, negative_slope)
    if activation == "tanh":
        return torch.tanh(x)
    if activation == "sigmoid":
        return torch.sigmoid(x)
    raise ValueError(f"activation must be None or one of {ACTIVATIONS}, got {activation!r}")


def check_activation(activation: Optional[str], negative_slope: float) -> str:
    act = "identity" if activation is None else activation
    if act not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {ACTIVATIONS}, got {activation!r}")
    if act == "leaky_relu":
        check_int_slope(negative_slope)
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
    batched = list(input.shape) if input.dim() == 4 else [1, *input.shape]
    if batched[0] != 0 and any(d == 0 for d in batched[2:]):
        raise RuntimeError("Only zero batch or zero channel inputs are supported, but got input "
                           f"shape: {batched}")
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


_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)


def autocast_lower_precision(*tensors):
    """Under torch.autocast on the tensors' device type, the floating-point tensors (not float64)
    cast to the autocast dtype, as autocast does for F.conv_transpose2d (a lower-precision op);
    the tensors unchanged otherwise. The custom ops themselves have no autocast rule."""
    t0 = tensors[0]
    if not isinstance(t0, Tensor):
        return tensors  # (the argument checks raise torch's TypeError)
    dev = t0.device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
        return tensors
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if isinstance(t, Tensor) and t.dtype in _AUTOCAST_CASTS else t
                 for t in tensors)


def conv_transpose_eager(input, weight, bias, stride, padding, output_padding, groups, dilation,
                         act, negative_slope):
    """act(conv_transpose2d(input) + bias) for an eager CPU call (B.eager_cpu; ``act`` checked):
    genfast::conv_transpose2d_act, whose autograd is C++ and whose kernel is the GEMM product with
    our col2im epilogue, for the shapes (and CPUs: B.set_cpu_row_gemm) where that measured faster
    than ATen's oneDNN product (csrc/cpu/conv_transpose.cpp), or ATen's product with our epilogue
    where only the backward's GEMM form applies; everything else (and arguments the kernel does not
    take) runs torch's own conv_transpose2d (its checks and exceptions) and activation. The op's
    int[2] arguments take an int or a pair, as torch's do. Python checks of our own measured
    50-100 us per call on the 2-core CI CPU, so there are none here. Under CPU autocast: torch's product in the
    autocast dtype, then torch's activation in place. The common call goes straight to the C++
    entry (conv_transpose2d_fast: the same op without torch.ops' Python call)."""
    y = conv_transpose2d_fast(input, weight, bias, stride, padding, output_padding, groups,
                              dilation, act, negative_slope)
    if y is not None:
        return y
    if not torch.is_autocast_enabled("cpu") and int_args(stride, padding, output_padding, groups,
                                                        dilation):
        try:
            return _CT_ACT(input, weight, bias, stride, padding, output_padding, groups, dilation,
                           B.ACTIVATIONS[act], float(negative_slope))
        except (RuntimeError, TypeError, ValueError):
            pass  # arguments of types the schema does not take: torch's call raises its exception
    from genfast.ops.conv_act import _act_eager

    return _act_eager(torch.nn.functional.conv_transpose2d(
        input, weight, bias, stride, padding, output_padding, groups, dilation), act, negative_slope)


def conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation,
                     activation, negative_slope):
    """The checked entry point: argument checks, unbatched input, backend choice."""
    act = check_activation(activation, negative_slope)
    check_slope_range(act, negative_slope, input)
    if B.eager_cpu(input):
        return conv_transpose_eager(input, weight, bias, stride, padding, output_padding, groups,
                                    dilation, act, negative_slope)
    # under autocast the tensors are cast first, as torch's conv_transpose2d does (a bfloat16
    # input from a previous layer meets float32 weights)
    input, weight, bias = autocast_lower_precision(input, weight, bias)
    stride, padding, output_padding, dilation = check_args(input, weight, bias, stride, padding,
                                                           output_padding, groups, dilation)
    if (HAS_CPP_OPS and B.inductor_cpu(input) and input.dim() == 4
            and not torch.is_autocast_enabled("cpu")):
        # traced by torch.compile on the CPU: the eager path's C++ op (its autograd in C++, which
        # AOTAutograd traces), which the compiled graph calls without Python (the registered
        # Python op's call cost ~60 us in a compiled generator at batch 1); torch's product for
        # arguments its kernel does not take. Batched input only: with symbolic sizes the op
        # takes every call to its kernel and fake, which expect (N, C, H, W); an unbatched one
        # goes the registered op's way below
        return _CT_ACT(input, weight, bias, list(stride), list(padding), list(output_padding),
                       int(groups), list(dilation), B.ACTIVATIONS[act], float(negative_slope))
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    name = B.resolve(FAMILY, x.device)
    if name == "reference":
        y = ref.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups,
                                 dilation, act, negative_slope)
    else:
        y = conv_transpose2d_op(x, weight, bias, list(stride), list(padding), list(output_padding),
                                int(groups), list(dilation), B.ACTIVATIONS[act],
                                float(negative_slope), B.for_op(name))
    return y.squeeze(0) if unbatched else y


# --- ConvTranspose2d + BatchNorm2d + activation (training) -----------------------------------

class _ConvTransposeBNAct(torch.autograd.Function):
    """Training forward/backward of ConvTranspose2d -> BatchNorm2d (batch statistics) ->
    activation through the registered ops above. The convolution's bias is not added to its
    output: BatchNorm subtracts the batch mean, so the bias only shifts the running mean (added
    in the finalize) and its gradient is the sum of the BatchNorm input gradient.
    create_graph=True differentiates the reference composition instead."""

    @staticmethod
    def forward(ctx, input, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
                num_batches_tracked, cfg):
        (stride, padding, output_padding, groups, dilation, momentum, cumulative, eps, act,
         slope, backend) = cfg
        y, part = conv_transpose2d_stats_op(input, weight, stride, padding, output_padding,
                                            groups, dilation, backend)
        acc = _acc(input.dtype)
        mean, invstd, scale, shift = bn_block_finalize_op(
            part, conv_bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
            momentum, cumulative, eps, acc, backend)
        out = bn_block_apply_op(y, mean, invstd, scale, shift, bn_weight, bn_bias,
                                B.ACTIVATIONS[act], slope, backend)
        ctx.save_for_backward(input, weight, conv_bias, bn_weight, bn_bias, y, mean, invstd)
        ctx.cfg = cfg
        return out

    @staticmethod
    def backward(ctx, grad_out):
        input, weight, conv_bias, bn_weight, bn_bias, y, mean, invstd = ctx.saved_tensors
        (stride, padding, output_padding, groups, dilation, momentum, cumulative, eps, act,
         slope, backend) = ctx.cfg
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():
            from genfast.reference import batchnorm_act as bnref

            pairs = [(t, n) for t, n in zip((input, weight, conv_bias, bn_weight, bn_bias), need[:5])]
            wrt = [t for t, n in pairs if n]
            z = ref.conv_transpose2d(input, weight, conv_bias, stride, padding, output_padding,
                                     groups, dilation)
            out = bnref.batch_norm_act(z, None, None, bn_weight, bn_bias, True, 0.0, eps, act, slope)
            grads = iter(torch.autograd.grad(out, wrt, grad_out, create_graph=True))
            return (*(next(grads) if n else None for _, n in pairs), None, None, None, None)
        has_cb = conv_bias is not None and bool(need[2])
        dy, dgw, dgb, dcb = bn_block_backward_op(grad_out, y, mean, invstd, bn_weight, bn_bias,
                                                 B.ACTIVATIONS[act], slope, has_cb, backend)
        dx = dw = None
        if need[0] or need[1]:
            dx, dw, _ = conv_transpose2d_backward_op(
                dy, input, weight, y, stride, padding, dilation, groups, 0, 0.0, bool(need[0]),
                bool(need[1]), False, backend)
        return (dx if need[0] else None, dw if need[1] else None, dcb if has_cb else None,
                dgw if bn_weight is not None and need[3] else None,
                dgb if bn_bias is not None and need[4] else None, None, None, None, None)


def _count_batch(num_batches_tracked, momentum) -> float:
    """nn.BatchNorm's training step bookkeeping for the unfused paths: num_batches_tracked + 1
    (in place, when tracked) and the momentum to use, 1 / num_batches_tracked for the cumulative
    average (momentum None); 0.0 when momentum is None and nothing is tracked."""
    mom = momentum
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            mom = 1.0 / float(num_batches_tracked)
    return 0.0 if mom is None else mom


def conv_transpose_bn_act_train(input, weight, bias, stride, padding, output_padding, groups,
                                dilation, bn_weight, bn_bias, running_mean, running_var,
                                num_batches_tracked, momentum, eps, activation, negative_slope,
                                backend=None):
    """Training forward of ConvTranspose2d -> BatchNorm2d (batch statistics) -> activation,
    arguments already checked. Updates running_mean / running_var (unbiased variance) and
    num_batches_tracked in place; momentum None is the cumulative average. `backend` overrides
    the resolved backend (tests run the cuda path on CPU tensors this way)."""
    input, weight, bias = autocast_lower_precision(input, weight, bias)
    name = backend or B.resolve(FAMILY, input.device)
    if name == "reference":
        from genfast.reference import batchnorm_act as bnref

        y = ref.conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups,
                                 dilation)
        return bnref.batch_norm_act(y, running_mean, running_var, bn_weight, bn_bias, True,
                                    _count_batch(num_batches_tracked, momentum), eps, activation,
                                    negative_slope)
    if name == "cpu" and activation in ("relu", "leaky_relu", "identity") \
            and not torch.compiler.is_compiling():
        # Eager CPU calls: ATen's product (bias included), then genfast's fused C++ BatchNorm +
        # activation with its autograd in C++ kernels (ops/batchnorm_act.py); the registered
        # block ops (what compile and export trace) cost their Python dispatch per op here.
        from genfast.ops import batchnorm_act as _bn

        y = torch.nn.functional.conv_transpose2d(input, weight, bias, stride, padding,
                                                 output_padding, int(groups), dilation)
        return _bn.batch_norm_act(y, running_mean, running_var, bn_weight, bn_bias, True,
                                  _count_batch(num_batches_tracked, momentum), eps, activation,
                                  negative_slope, False)
    cumulative = momentum is None and running_mean is not None
    cfg = (list(stride), list(padding), list(output_padding), int(groups), list(dilation),
           0.0 if momentum is None else float(momentum), cumulative, float(eps), activation,
           float(negative_slope), backend or B.for_op(name))
    return _ConvTransposeBNAct.apply(input, weight, bias, bn_weight, bn_bias, running_mean,
                                     running_var, num_batches_tracked, cfg)
