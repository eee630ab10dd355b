"""Convolution / linear + bias + activation in plain PyTorch: the ground truth for tests, the
"reference" backend of the conv_act family, and the differentiable path for double backward.

F.conv2d and F.linear compute the products; the activation comes from the shared table in
genfast/reference/activation.py."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from genfast.reference.activation import act_forward


def product(kind: str, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0),
            dilation: Sequence[int] = (1, 1), groups: int = 1) -> torch.Tensor:
    """conv2d(x, weight) + bias (kind "conv2d", 4-D x, zero padding) or x @ weight.T + bias
    (kind "linear", any x of shape (*, in_features))."""
    if kind == "conv2d":
        return F.conv2d(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups)
    if kind == "linear":
        return F.linear(x, weight, bias)
    raise ValueError(f"unknown product kind {kind!r}")


def product_act(kind: str, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0),
                dilation: Sequence[int] = (1, 1), groups: int = 1, activation: str = "identity",
                negative_slope: float = 0.01) -> torch.Tensor:
    """act(product(x, weight) + bias). Differentiable to any order."""
    z = product(kind, x, weight, bias, stride, padding, dilation, groups)
    return act_forward(z, activation, negative_slope)
