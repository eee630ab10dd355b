"""ConvTranspose2d: nn.ConvTranspose2d with the bias and an activation fused into one op."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from genfast import functional as GF
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

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 output_padding=0, groups=1, bias=True, dilation=1, padding_mode="zeros",
                 device=None, dtype=None, *, activation: Optional[str] = None,
                 negative_slope: float = 0.01):
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
        if self.padding_mode != "zeros":
            raise ValueError("Only `zeros` padding mode is supported for ConvTranspose2d")
        output_padding = self._output_padding(input, output_size, self.stride, self.padding,
                                              self.kernel_size, 2, self.dilation)
        return GF.conv_transpose2d(input, self.weight, self.bias, self.stride, self.padding,
                                   output_padding, self.groups, self.dilation,
                                   activation=self.activation, negative_slope=self.negative_slope)
