"""BatchNormAct1d / BatchNormAct2d: nn.BatchNorm1d / nn.BatchNorm2d followed by an activation,
in one fused op."""
from __future__ import annotations

import inspect

import torch
from torch import nn

from genfast import functional as GF
from genfast.ops import batchnorm_act as _bn


# torch >= 2.12 gives nn.BatchNorm a keyword-only `bias` flag (affine weight without bias).
BN_HAS_BIAS_FLAG = "bias" in inspect.signature(nn.BatchNorm2d.__init__).parameters


def bias_kwargs(bias: bool) -> dict:
    """The `bias` keyword for the torch BatchNorm constructor, as this torch accepts it."""
    if BN_HAS_BIAS_FLAG:
        return {"bias": bias}
    if not bias:
        raise TypeError("__init__() got an unexpected keyword argument 'bias' (this torch's "
                        "BatchNorm has no bias flag)")
    return {}


class _BatchNormActMixin:
    def _init_act(self, activation: str, negative_slope: float, memory_efficient: bool) -> None:
        _bn.check_activation(activation, negative_slope, memory_efficient)
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.memory_efficient = bool(memory_efficient)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", activation={self.activation!r}"
        if self.activation == "leaky_relu":
            s += f", negative_slope={self.negative_slope}"
        if self.memory_efficient:
            s += ", memory_efficient=True"
        return s

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return batch_norm_act_forward(self, input, self.activation, self.negative_slope,
                                      self.memory_efficient)


def batch_norm_act_forward(bn: nn.modules.batchnorm._BatchNorm, input: torch.Tensor,
                           activation: str, negative_slope: float,
                           memory_efficient: bool = False) -> torch.Tensor:
    """activation(bn(input)) in one fused op, with ``bn``'s parameters, buffers and mode (any
    nn.BatchNorm1d/2d or BatchNormAct module): what nn.BatchNorm's forward does, checks first."""
    bn._check_input_dim(input)
    bn_training = bn.training or (bn.running_mean is None and bn.running_var is None)
    # Buffers are passed only when they are to be used or updated, as in nn.BatchNorm.
    use_buffers = not bn.training or bn.track_running_stats
    rm = bn.running_mean if use_buffers else None
    rv = bn.running_var if use_buffers else None
    # Every check runs before num_batches_tracked or the running statistics change: the
    # inputs, the activation attributes (which may have been reassigned) and the backend.
    weight, bias, eps = bn.weight, bn.bias, bn.eps
    momentum = 0.0 if bn.momentum is None else bn.momentum
    count = bn.training and bn.track_running_stats and bn.num_batches_tracked is not None
    if count and bn.momentum is None:
        momentum = 1.0 / (float(bn.num_batches_tracked) + 1.0)
    # Counted before the fused call, as nn.BatchNorm counts before F.batch_norm: a non-reentrant
    # torch.utils.checkpoint recompute stops as soon as its last saved tensor is recomputed, so
    # a count after the call was skipped there (running statistics updated twice, the count
    # once). A call that raises torch's exception for bad input takes the count back: the fused
    # ops check everything before they write the running statistics. (Not the recompute's own
    # stop, which comes once the op has run: an exception of another type.)
    if count:
        bn.num_batches_tracked.add_(1)
    try:
        # the common eager CPU call, whose arguments pass every check below, straight to the op
        y = _bn.eager_fast(input, rm, rv, weight, bias, bn_training, momentum, eps, activation,
                           negative_slope, memory_efficient)
        if y is None:
            GF.check_batch_norm_args(input, rm, rv, weight, bias, bn_training, eps)
            _bn.check_inputs(input, rm, rv, weight, bias, bn_training)
            name = _bn.resolve_backend(input, activation, negative_slope, memory_efficient)
            # The checks of GF.batch_norm_act have all run above (a module's parameters are (C,)).
            y = _bn.run_resolved(name, input, rm, rv, weight, bias, bn_training, momentum, eps,
                                 activation, negative_slope, memory_efficient)
    except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError):
        if count:
            bn.num_batches_tracked.sub_(1)
        raise
    return y


class BatchNormAct2d(_BatchNormActMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` followed by an activation, fused. Input (N, C, H, W).

    Constructor arguments as ``nn.BatchNorm2d``, plus keyword-only ``activation``
    ("leaky_relu" default, "relu", "identity"), ``negative_slope`` (0.01) and
    ``memory_efficient`` (False: save the output instead of the input for backward; needs an
    invertible activation; float16/bfloat16 inputs save the input). Parameters, buffers and
    state_dict keys are nn.BatchNorm2d's.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: torch.device | str | None = None, dtype: torch.dtype | None = None, *, bias: bool = True,
                 activation: str = "leaky_relu", negative_slope: float = 0.01, memory_efficient: bool = False
                 ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         **bias_kwargs(bias))
        self._init_act(activation, negative_slope, memory_efficient)


class BatchNormAct1d(_BatchNormActMixin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` followed by an activation, fused. Input (N, C) or (N, C, L).

    Arguments as :class:`BatchNormAct2d`; parameters and state_dict keys are nn.BatchNorm1d's.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: torch.device | str | None = None, dtype: torch.dtype | None = None, *, bias: bool = True,
                 activation: str = "leaky_relu", negative_slope: float = 0.01, memory_efficient: bool = False
                 ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         **bias_kwargs(bias))
        self._init_act(activation, negative_slope, memory_efficient)
