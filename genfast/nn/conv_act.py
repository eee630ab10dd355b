"""Conv2d and Linear: nn.Conv2d / nn.Linear with the bias and an activation fused around the
vendor's product, and the product -> BatchNorm -> activation block that genfast.convert plans
(discriminators, MLP GANs, VAE encoders)."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union, cast

import torch
import torch.nn.functional as F
from torch import nn

from genfast import backend as B
from genfast import functional as GF
from genfast.nn.batchnorm_act import batch_norm_act_forward
from genfast.nn.conv_transpose import (apply_activation, bn_eval_act, bn_foldable, fold_pays,
                                       product_bn_eval_fast)
from genfast.ops import conv_act as _ca
from genfast.ops import conv_transpose as _ct


def _extra_repr(m: nn.Module, base: str) -> str:
    act = getattr(m, "activation", None)
    if act is not None:
        base += f", activation={act!r}"
        if act == "leaky_relu":
            base += f", negative_slope={getattr(m, 'negative_slope', 0.01)}"
    return base


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` followed by an optional activation, fused (bias and activation applied in
    one pass over the convolution's output; on the CPU a oneDNN post-op where one exists).
    Input (N, C_in, H, W) or unbatched (C_in, H, W).

    Constructor arguments, defaults, parameters and state_dict keys are nn.Conv2d's
    (in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
    bias=True, padding_mode="zeros", device=None, dtype=None), plus keyword-only
    ``activation`` (None = identity, "relu", "leaky_relu", "tanh", "sigmoid") and
    ``negative_slope`` (0.01, leaky_relu only, >= 0). Every padding mode and "same"/"valid"
    padding works as in nn.Conv2d. The activation's backward reads the output, as after
    nn.LeakyReLU(inplace=True): modify the output in place only after the backward.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Union[int, tuple[int, int]],
                 stride: Union[int, tuple[int, int]] = 1, padding: Union[str, int, tuple[int, int]] = 0,
                 dilation: Union[int, tuple[int, int]] = 1, groups: int = 1, bias: bool = True,
                 padding_mode: Literal["zeros", "reflect", "replicate", "circular"] = "zeros",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
                 activation: Optional[str] = None, negative_slope: float = 0.01) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode, device, dtype)
        _ca.check_activation(activation, negative_slope)
        self.activation = activation
        self.negative_slope = float(negative_slope)

    def extra_repr(self) -> str:
        return _extra_repr(self, super().extra_repr())

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return conv2d_act_forward(self, input, self.activation, self.negative_slope)


class Linear(nn.Linear):
    """``nn.Linear`` followed by an optional activation, fused (bias and activation applied in
    one pass over the matmul's output; on the CPU a oneDNN post-op where one exists). Input
    (*, in_features).

    Constructor arguments, parameters and state_dict keys are nn.Linear's (in_features,
    out_features, bias=True, device=None, dtype=None), plus keyword-only ``activation`` and
    ``negative_slope`` as :class:`Conv2d`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
                 activation: Optional[str] = None, negative_slope: float = 0.01) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        _ca.check_activation(activation, negative_slope)
        self.activation = activation
        self.negative_slope = float(negative_slope)

    def extra_repr(self) -> str:
        return _extra_repr(self, super().extra_repr())

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear_act_forward(self, input, self.activation, self.negative_slope)


def _conv_input(conv: nn.Conv2d, input: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """(input, padding) as nn.Conv2d's _conv_forward uses them: a non-zeros padding mode pads
    the input first and convolves with zero padding."""
    if conv.padding_mode != "zeros":
        return F.pad(input, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), (0, 0)
    return input, conv.padding


def product_eager(m: nn.Module, input: torch.Tensor) -> torch.Tensor:
    """The product of an nn.Conv2d / nn.Linear ``m`` (bias included; every padding mode and
    string padding as nn.Conv2d; torch's checks and exceptions), whatever activation a genfast
    subclass carries: the eager CPU path (B.eager_cpu): genfast::conv2d_act (torch's product,
    grad_input from the transposed convolution's GEMM form) / genfast::linear_act."""
    if isinstance(m, nn.Conv2d):
        return conv2d_act_forward(m, input, "identity", 0.0)
    return linear_act_forward(cast(nn.Linear, m), input, "identity", 0.0)


def conv2d_act_forward(conv: nn.Conv2d, input: torch.Tensor, activation: Optional[str],
                       negative_slope: float = 0.01) -> torch.Tensor:
    """activation(conv(input)) with ``conv``'s weight, bias and geometry, fused (``conv`` is any
    nn.Conv2d; its own activation attribute is ignored). Eager CPU calls: genfast::conv2d_act
    (torch's oneDNN product with the bias, the activation in place, C++ autograd). Traced by
    torch.compile on the CPU (B.inductor_cpu): torch's conv2d and activation, for inductor."""
    if B.inductor_cpu(input):
        _ca.check_activation(activation, negative_slope)
        return apply_activation(nn.Conv2d.forward(conv, input), activation, negative_slope)
    if B.eager_cpu(input):
        x, padding = _conv_input(conv, input)
        # the common call straight to the C++ entry (its Python gate: ~2 us), else the checked path
        y = _ca.conv2d_fast(x, conv.weight, conv.bias, conv.stride, padding, conv.dilation,
                            conv.groups, activation, negative_slope)
        if y is not None:
            return y
        act = _ca.check_activation(activation, negative_slope)
        return _ca.conv2d_eager(x, conv.weight, conv.bias, conv.stride, padding, conv.dilation,
                                conv.groups, act, negative_slope)
    x, padding = _conv_input(conv, input)
    return GF.conv2d(x, conv.weight, conv.bias, conv.stride, padding, conv.dilation, conv.groups,
                     activation=activation, negative_slope=negative_slope)


def linear_act_forward(lin: nn.Linear, input: torch.Tensor, activation: Optional[str],
                       negative_slope: float = 0.01) -> torch.Tensor:
    """activation(lin(input)) with ``lin``'s weight and bias, fused (eager CPU calls:
    genfast::linear_act: the BLAS product, transposed for 2-128 rows, with our bias + activation
    pass, C++ autograd). Traced by
    torch.compile on the CPU (B.inductor_cpu): torch's linear and activation, for inductor."""
    if B.inductor_cpu(input):
        _ca.check_activation(activation, negative_slope)
        return apply_activation(F.linear(input, lin.weight, lin.bias), activation, negative_slope)
    if B.eager_cpu(input):
        y = _ca.linear_fast(input, lin.weight, lin.bias, activation, negative_slope)
        if y is not None:
            return y
        act = _ca.check_activation(activation, negative_slope)
        return _ca.linear_eager(input, lin.weight, lin.bias, act, negative_slope)
    return GF.linear(input, lin.weight, lin.bias, activation=activation,
                     negative_slope=negative_slope)


def product_act_forward(m: nn.Module, input: torch.Tensor, activation: Optional[str],
                        negative_slope: float = 0.01) -> torch.Tensor:
    """activation(m(input)) for an nn.Conv2d or nn.Linear ``m``, fused."""
    if isinstance(m, nn.Conv2d):
        return conv2d_act_forward(m, input, activation, negative_slope)
    return linear_act_forward(cast(nn.Linear, m), input, activation, negative_slope)


def can_fuse_product_bn(m: nn.Module, bn: nn.Module) -> bool:
    """Whether product -> bn may run as one product_bn_act_forward: an nn.Conv2d (or a genfast
    Conv2d without activation) followed by an nn.BatchNorm2d, or an nn.Linear (or genfast Linear
    without activation) followed by an nn.BatchNorm1d, with matching channel counts (otherwise
    torch's modules run, and raise). Exact types: a parametrized module has another type."""
    return plain_product(m) and (
        (isinstance(m, nn.Conv2d) and type(bn) is nn.BatchNorm2d and bn.num_features == m.out_channels)
        or (isinstance(m, nn.Linear) and type(bn) is nn.BatchNorm1d
            and bn.num_features == m.out_features))


def plain_product(m: nn.Module) -> bool:
    """An nn.Conv2d / nn.Linear, or a genfast Conv2d / Linear without its own activation."""
    return (type(m) in (nn.Conv2d, nn.Linear)
            or (type(m) in (Conv2d, Linear) and getattr(m, "activation", None) is None))


def _check_bn(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    bn_training = bn.training or (bn.running_mean is None and bn.running_var is None)
    if bn_training and bn.eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {bn.eps}")
    if not bn_training and bn.eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {bn.eps}")
    return bn_training


def product_bn_act_forward(m: nn.Module, bn: nn.modules.batchnorm._BatchNorm, activation: str,
                           negative_slope: float, input: torch.Tensor,
                           keep_input: bool = False) -> torch.Tensor:
    """activation(bn(m(input))) for m = genfast Conv2d -> nn.BatchNorm2d or genfast Linear ->
    nn.BatchNorm1d (``can_fuse_product_bn``). Training: on CUDA tensors the BatchNorm
    statistics are taken right after the vendor's product and the bias, normalisation,
    activation and running-statistics update run in the block's kernels; on CPU tensors the
    product (oneDNN) is followed by genfast's fused BatchNorm + activation. Eval: the BatchNorm
    is folded into the product's weight and bias (one fused product + activation) on CUDA
    tensors and in exported graphs; eager CPU calls that record no backward run the product,
    then one in-place pass of the BatchNorm's affine map and the activation; eager CPU calls
    whose output is not much larger than the weight (fold_pays) the product, then the fused eval
    BatchNorm + activation; CPU calls traced by torch.compile torch's modules (B.inductor_cpu).
    ``keep_input``: the activation is an nn.LeakyReLU(inplace=False), whose backward torch
    takes from its input, so that its output may be modified in place before the backward; the
    eval block then applies it out of place after the folded product (the training block saves
    the BatchNorm's input, never the output)."""
    if not bn.training:
        # sampling: the common eager CPU call that records no backward, checked in C++
        y = product_bn_eval_fast(m, bn, activation, negative_slope, input)
        if y is not None:
            return y
    _ca.check_activation(activation, negative_slope)
    linear = isinstance(m, nn.Linear)
    if linear and isinstance(input, torch.Tensor) and input.dim() != 2:
        # (N, L, in) -> BatchNorm1d normalises over dim 1 (L), not over the features: the
        # product runs on its own and the BatchNorm decides (and raises) as torch's does.
        return batch_norm_act_forward(bn, product_act_forward(m, input, None), activation,
                                      negative_slope)
    bn_training = _check_bn(bn)
    if not bn_training:
        if B.inductor_cpu(input):
            # traced by torch.compile on the CPU: torch's modules, which inductor fuses (the
            # BatchNorm's affine map and the activation into one loop after the product)
            return apply_activation(bn(product_act_forward(m, input, None)), activation,
                                    negative_slope)
        if not bn_foldable(bn, cast(torch.Tensor, m.weight), input, 2 if linear else 4):
            # torch's modules one by one: their checks and exceptions (an unbatched conv input
            # that BatchNorm2d rejects, parameters of another dtype than the product's)
            return apply_activation(bn(m(input)), activation, negative_slope)
        w = cast(torch.Tensor, m.weight)
        pays = (fold_pays(input, w, activation, w.shape[0], channel_dim=-1) if linear else
                fold_pays(input, w, activation, w.shape[0], cast(nn.Conv2d, m).stride))
        if not pays:
            # the product with its bias as torch runs it, then genfast's fused eval BatchNorm +
            # activation (running statistics: one pass over the output)
            return bn_eval_act(bn, product_eager(m, input), activation, negative_slope, keep_input)
        if keep_input and activation == "leaky_relu":
            return apply_activation(_product_bn_act_eval(m, bn, None, negative_slope, input),
                                    activation, negative_slope)
        return _product_bn_act_eval(m, bn, activation, negative_slope, input)
    if B.eager_cpu(input):
        # The product as torch runs it (its checks raise before anything is written), then
        # genfast's fused C++ BatchNorm + activation, which checks its input first.
        return batch_norm_act_forward(bn, product_eager(m, input), activation, negative_slope)
    # under torch.autocast the product runs in the autocast dtype: the checks see the tensors it
    # will see (a float32 weight with the bfloat16 output of the block before is autocast's case)
    input, weight, bias = _ct.autocast_lower_precision(input, m.weight, m.bias)
    if linear:
        _ca.check_linear_args(input, weight, bias)
    else:
        if isinstance(input, torch.Tensor) and input.dim() != 4:
            if input.dim() == 3:  # the convolution takes it, the BatchNorm2d does not
                raise ValueError("expected 4D input (got 3D input)")
            raise RuntimeError("Expected 3D (unbatched) or 4D (batched) input to conv2d, but got "
                               f"input of size: {list(input.shape)}")
    name = B.resolve(_ca.FAMILY, input.device)
    if name not in ("cuda", "triton"):
        # CPU and reference: the product (bias included, oneDNN on the CPU), then the fused
        # BatchNorm + activation (which checks its input before writing anything).
        y = product_act_forward(m, input, None)
        return batch_norm_act_forward(bn, y, activation, negative_slope)
    hw: list[int] = []
    if linear:
        x, padding, stride, dilation, groups = input, [0, 0], [1, 1], [1, 1], 1
        rows = input.shape[0]
    else:
        conv = cast(nn.Conv2d, m)
        x, pad = _conv_input(conv, input)
        x, pad = _ca.resolve_padding(x, weight, conv.stride, pad, conv.dilation)
        stride, padding, dilation = _ca.check_conv2d_args(x, weight, bias, conv.stride, pad,
                                                          conv.dilation, conv.groups)
        groups = conv.groups
        hw = _ca.conv2d_out_hw(x.shape[2:], weight.shape[2:], stride, padding, dilation)
        rows = x.shape[0] * hw[0] * hw[1]
    if rows == 1:
        c = weight.shape[0]
        size = [1, c] if linear else [1, c, *hw]
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{torch.Size(size)}")
    # Every check above runs before anything is written; the running statistics and
    # num_batches_tracked are updated inside the block's finalize launch.
    track = bn.training and bn.track_running_stats and bn.running_mean is not None
    return _ca.product_bn_act_train(
        "linear" if linear else "conv2d", x, weight, bias, list(stride), list(padding),
        list(dilation), groups, bn.weight, bn.bias, bn.running_mean if track else None,
        bn.running_var if track else None, bn.num_batches_tracked if track else None,
        bn.momentum, bn.eps, activation, negative_slope, B.for_op(name))


def _product_bn_act_eval(m, bn, activation, negative_slope, input):
    # Eval: BatchNorm with running statistics is a per-channel affine map, folded into the
    # product's weight (output channel = dim 0 for both Conv2d and Linear) and bias, computed in
    # float32 (or float64): one fused product with the activation in its epilogue.
    w = m.weight
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(acc)
    shift = -bn.running_mean.to(acc) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(acc)
    wf = (w.to(acc) * scale.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
    bf = (shift if m.bias is None else m.bias.to(acc) * scale + shift).to(w.dtype)
    if isinstance(m, nn.Linear):
        return GF.linear(input, wf, bf, activation=activation, negative_slope=negative_slope)
    x, padding = _conv_input(m, input)
    return GF.conv2d(x, wf, bf, m.stride, padding, m.dilation, m.groups, activation=activation,
                     negative_slope=negative_slope)
