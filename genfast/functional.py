"""Public functions (thin): checks, then the registered op of the chosen backend."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from genfast.ops import batchnorm_act as _bn
from genfast.ops import conv_transpose as _ct


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
            invertible activation; |weight| is kept >= 1e-3 in that mode).

    Returns:
        Tensor of the shape, dtype and memory format of ``input``.
    """
    _bn.check_activation(activation, negative_slope, memory_efficient)
    _bn.check_inputs(input, running_mean, running_var, weight, bias, training)
    return _bn.batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum,
                              eps, activation, negative_slope, memory_efficient)


def conv_transpose2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1,
                     padding=0, output_padding=0, groups: int = 1, dilation=1, *,
                     activation: Optional[str] = None, negative_slope: float = 0.01) -> Tensor:
    """Fused ``activation(F.conv_transpose2d(input, weight, bias, ...))``; arguments as
    ``F.conv_transpose2d``.

    Args:
        input: (N, C_in, H_in, W_in) or unbatched (C_in, H_in, W_in); float16/bfloat16/float32/
            float64, contiguous or channels_last (any strides are read without a copy).
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
    return _ct.conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups,
                                dilation, activation, negative_slope)
