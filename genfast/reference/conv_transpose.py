"""Transposed convolution + bias + activation in plain PyTorch: the ground truth for tests, the
"reference" backend, and the differentiable path for double backward.

F.conv_transpose2d computes the convolution (the tests check this module against torch.nn
directly); the activation comes from the shared table in genfast/reference/activation.py."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from genfast.reference.activation import act_forward


def conv_transpose2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     stride: Sequence[int], padding: Sequence[int],
                     output_padding: Sequence[int], groups: int, dilation: Sequence[int],
                     activation: str = "identity", negative_slope: float = 0.01) -> torch.Tensor:
    """act(conv_transpose2d(x, weight) + bias) for a 4-D x. Differentiable to any order."""
    z = F.conv_transpose2d(x, weight, bias, tuple(stride), tuple(padding), tuple(output_padding),
                           groups, tuple(dilation))
    return act_forward(z, activation, negative_slope)


def output_size(in_hw: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                padding: Sequence[int], output_padding: Sequence[int],
                dilation: Sequence[int]) -> tuple[int, int]:
    """(H_out, W_out) = (H_in - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1."""
    return tuple((i - 1) * s - 2 * p + d * (k - 1) + op + 1
                 for i, k, s, p, op, d in zip(in_hw, kernel, stride, padding, output_padding, dilation))


def phase_taps(phase: int, kernel: int, stride: int, padding: int, dilation: int) -> list[tuple[int, int]]:
    """The kernel taps that reach the output rows oh = phase + stride * j, as (tap, offset)
    pairs with input row ih = j + offset. Every tap belongs to exactly one phase."""
    taps = []
    for t in range(kernel):
        r = phase + padding - t * dilation
        if r % stride == 0:
            taps.append((t, r // stride))
    return taps
