"""ConvTranspose2d: nn.ConvTranspose2d with the bias and an activation fused into one op."""
from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import nn

from genfast import functional as GF
from genfast.nn.batchnorm_act import BatchNormAct2d
from genfast.ops import conv_transpose as _ct


class ConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` followed by an optional activation, fused (bias and activation in
    the kernel's epilogue). Input (N, C_in, H, W) or unbatched (C_in, H, W).

    Constructor arguments, defaults, parameters and state_dict keys are nn.ConvTranspose2d's
    (in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, groups=1,
    bias=True, dilation=1, padding_mode="zeros", device=None, dtype=None), plus keyword-only
    ``activation`` (None = identity, "relu", "leaky_relu", "tanh", "sigmoid") and
    ``negative_slope`` (0.01, leaky_relu only, >= 0). ``forward(input, output_size=None)``
    accepts ``output_size`` as nn.ConvTranspose2d does.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] = 1,
                 padding: int | tuple[int, int] = 0, output_padding: int | tuple[int, int] = 0, groups: int = 1, bias: bool = True,
                 dilation: int | tuple[int, int] = 1, padding_mode: Literal["zeros", "reflect", "replicate", "circular"] = "zeros",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, *, activation: Optional[str] = None,
                 negative_slope: float = 0.01) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, output_padding,
                         groups, bias, dilation, padding_mode, device, dtype)
        _ct.check_activation(activation, negative_slope)
        self.activation = activation
        self.negative_slope = float(negative_slope)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.activation is not None:
            s += f", activation={self.activation!r}"
            if self.activation == "leaky_relu":
                s += f", negative_slope={self.negative_slope}"
        return s

    def forward(self, input: torch.Tensor, output_size: Optional[list[int]] = None) -> torch.Tensor:
        bn = self.__dict__.get("_folded_bn")
        if bn is not None:  # set by genfast.convert: this conv also runs the next BatchNorm + act
            return conv_bn_act_forward(self, bn, bn.activation, bn.negative_slope, input, output_size)
        if self.padding_mode != "zeros":
            raise ValueError("Only `zeros` padding mode is supported for ConvTranspose2d")
        output_padding = self._output_padding(input, output_size, self.stride, self.padding,
                                              self.kernel_size, 2, self.dilation)
        return GF.conv_transpose2d(input, self.weight, self.bias, self.stride, self.padding,
                                   output_padding, self.groups, self.dilation,
                                   activation=self.activation, negative_slope=self.negative_slope)


class ConvTransposeBNAct2d(nn.Sequential):
    """``nn.Sequential(nn.ConvTranspose2d(...), nn.BatchNorm2d(out_channels, ...))`` followed by
    an activation: the DCGAN generator block. Its state_dict keys ("0.weight", "0.bias",
    "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked") are those
    of that unfused pair, and of the triple with a parameter-free activation module appended, so
    checkpoints load either way.

    Arguments: ConvTranspose2d's (in_channels, out_channels, kernel_size, stride=1, padding=0,
    output_padding=0, groups=1, bias=True, dilation=1), then BatchNorm2d's (eps=1e-5,
    momentum=0.1, affine=True, track_running_stats=True), device=None, dtype=None; keyword-only
    activation ("relu" default, "leaky_relu", "identity", "tanh", "sigmoid") and
    negative_slope (0.01). Input (N, C_in, H, W); forward(input, output_size=None).

    In training mode the transposed convolution's epilogue also computes the per-channel batch
    statistics of its output, so the BatchNorm step reads the output once (normalise) instead of
    twice. In eval mode the BatchNorm (running statistics) is folded into the convolution's
    weight and bias: one fused transposed convolution with the activation in its epilogue.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] = 1,
                 padding: int | tuple[int, int] = 0, output_padding: int | tuple[int, int] = 0, groups: int = 1, bias: bool = True,
                 dilation: int | tuple[int, int] = 1, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
                 activation: str = "relu", negative_slope: float = 0.01) -> None:
        _ct.check_activation(activation, negative_slope)
        super().__init__(
            ConvTranspose2d(in_channels, out_channels, kernel_size, stride, padding, output_padding,
                            groups, bias, dilation, "zeros", device, dtype),
            nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, device, dtype))
        self.activation = activation
        self.negative_slope = float(negative_slope)

    def extra_repr(self) -> str:
        s = f"activation={self.activation!r}"
        if self.activation == "leaky_relu":
            s += f", negative_slope={self.negative_slope}"
        return s

    def forward(self, input: torch.Tensor, output_size: Optional[list[int]] = None) -> torch.Tensor:
        return conv_bn_act_forward(self[0], self[1], self.activation, self.negative_slope, input,
                                   output_size)


def conv_bn_act_forward(conv: nn.ConvTranspose2d, bn: nn.BatchNorm2d, activation: str,
                        negative_slope: float, input: torch.Tensor,
                        output_size: Optional[list[int]] = None) -> torch.Tensor:
    """activation(bn(conv(input))) with the BatchNorm statistics taken in the convolution's
    epilogue (training) or the BatchNorm folded into the convolution (eval)."""
    bn_training = bn.training or (bn.running_mean is None and bn.running_var is None)
    if not bn_training:
        return _conv_bn_act_eval(conv, bn, activation, negative_slope, input, output_size)
    if input.dim() != 4:
        raise ValueError(f"expected 4D input (got {input.dim()}D input)")
    output_padding = conv._output_padding(input, output_size, conv.stride, conv.padding,
                                          conv.kernel_size, 2, conv.dilation)
    stride, padding, output_padding, dilation = _ct.check_args(
        input, conv.weight, conv.bias, conv.stride, conv.padding, output_padding, conv.groups,
        conv.dilation)
    use_buffers = bn.track_running_stats
    rm = bn.running_mean if use_buffers else None
    rv = bn.running_var if use_buffers else None
    hw = [(i - 1) * s - 2 * p + d * (k - 1) + op + 1 for i, k, s, p, op, d in
          zip(input.shape[2:], conv.kernel_size, stride, padding, output_padding, dilation)]
    if input.shape[0] * hw[0] * hw[1] == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{torch.Size([1, conv.out_channels, *hw])}")
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    return _ct.conv_transpose_bn_act_train(
        input, conv.weight, conv.bias, stride, padding, output_padding, conv.groups, dilation,
        bn.weight, bn.bias, rm, rv, momentum, bn.eps, activation, negative_slope)



def _conv_bn_act_eval(conv, bn, activation, negative_slope, input, output_size):
    # Eval: BatchNorm with running statistics is a per-channel affine map, folded into the
    # transposed convolution's weight and bias (computed in float32, or float64), so the
    # whole block is one fused conv_transpose2d with the activation in its epilogue.
    acc = torch.float64 if conv.weight.dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(acc)
    shift = -bn.running_mean.to(acc) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(acc)
    w = conv.weight
    G, cog = conv.groups, w.shape[1]
    wf = (w.to(acc).view(G, w.shape[0] // G, cog, *w.shape[2:])
          * scale.view(G, 1, cog, 1, 1)).view(w.shape).to(w.dtype)
    bf = shift if conv.bias is None else conv.bias.to(acc) * scale + shift
    if conv.padding_mode != "zeros":
        raise ValueError("Only `zeros` padding mode is supported for ConvTranspose2d")
    output_padding = conv._output_padding(input, output_size, conv.stride, conv.padding,
                                          conv.kernel_size, 2, conv.dilation)
    return GF.conv_transpose2d(input, wf, bf.to(w.dtype), conv.stride, conv.padding,
                               output_padding, conv.groups, conv.dilation,
                               activation=activation, negative_slope=negative_slope)


class FoldedBatchNormAct2d(BatchNormAct2d):
    """A BatchNormAct2d whose normalisation and activation run inside the preceding
    gnn.ConvTranspose2d (``genfast.convert`` builds the pair from ConvTranspose2d -> BatchNorm2d
    -> ReLU/LeakyReLU in an nn.Sequential). It keeps the parameters, buffers and state_dict keys
    of the BatchNorm it replaces and passes its input through unchanged."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input


def fold_bn_into_conv(conv: ConvTranspose2d, bn: FoldedBatchNormAct2d) -> None:
    """Make ``conv`` compute ``bn``'s normalisation and activation in its epilogue (the
    reference is kept outside the module tree, so state_dict keys do not change)."""
    if conv.activation is not None:
        raise ValueError("fold_bn_into_conv: the transposed convolution already has an activation")
    conv.__dict__["_folded_bn"] = bn
