"""SyncBatchNormAct2d: nn.SyncBatchNorm followed by an activation, statistics synchronised over
a torch.distributed process group."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from genfast import functional as GF
from genfast.nn.batchnorm_act import BatchNormAct1d, BatchNormAct2d, _BatchNormActMixin, bias_kwargs
from genfast.ops import batchnorm_act as _bn
from genfast.ops.sync_batchnorm_act import SyncBatchNormActFunction


class SyncBatchNormAct2d(_BatchNormActMixin, nn.modules.batchnorm._BatchNorm):
    """``nn.SyncBatchNorm`` followed by an activation. Input (N, C, *).

    It mirrors nn.SyncBatchNorm (constructor, state_dict, semantics) without subclassing it:
    DistributedDataParallel refuses nn.SyncBatchNorm instances in CPU modules, and this layer
    also serves gloo/CPU training.

    Constructor arguments as ``nn.SyncBatchNorm`` (``process_group`` included), plus keyword-only
    ``activation`` ("leaky_relu" default, "relu", "identity") and ``negative_slope`` (0.01).
    Parameters, buffers and state_dict keys are nn.SyncBatchNorm's (= nn.BatchNorm2d's). In
    training with a process group of more than one rank, the batch statistics are taken over
    all ranks (uneven per-rank batches are fine); otherwise it is :class:`BatchNormAct2d`.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: dist.ProcessGroup | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, *, bias: bool = True, activation: str = "leaky_relu",
                 negative_slope: float = 0.01) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         **bias_kwargs(bias))
        self.process_group = process_group
        self._init_act(activation, negative_slope, False)

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input):
        if input.size(1) == 0:
            raise ValueError("SyncBatchNormAct2d number of input channels should be non-zero")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        need_sync = self.training and dist.is_available() and dist.is_initialized()
        if need_sync:
            group = self.process_group or dist.group.WORLD
            need_sync = dist.get_world_size(group) > 1
        if not need_sync:
            return _BatchNormActMixin.forward(self, input)
        rm = self.running_mean if self.track_running_stats else None
        rv = self.running_var if self.track_running_stats else None
        _bn.check_inputs(input, rm, rv, self.weight, self.bias, training=True, check_batch=False)
        momentum = 0.0 if self.momentum is None else self.momentum
        track = self.track_running_stats and self.num_batches_tracked is not None
        if track and self.momentum is None:
            momentum = 1.0 / (float(self.num_batches_tracked) + 1.0)
        if track:  # counted first, as in batch_norm_act_forward (a checkpoint's recompute)
            self.num_batches_tracked.add_(1)
        try:
            return SyncBatchNormActFunction.apply(input, self.weight, self.bias, rm, rv, self.eps, momentum,
                                                  group, dist.get_world_size(group), self.activation,
                                                  self.negative_slope)
        except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError):
            if track:  # the global statistics were refused: nothing else was written
                self.num_batches_tracked.sub_(1)
            raise

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
        """Like ``nn.SyncBatchNorm.convert_sync_batchnorm``: ``BatchNormAct1d/2d`` become
        ``SyncBatchNormAct2d`` (keeping their activation), a BatchNorm that a
        ``genfast.convert``-ed container fuses with the next ReLU/LeakyReLU becomes a
        ``SyncBatchNormAct2d`` with that activation (the activation's slot an ``nn.Identity``),
        other plain ``nn.BatchNorm*`` become ``nn.SyncBatchNorm``; parameters and buffers are
        the same tensors, state_dict keys unchanged. Returns the module (a new one when
        ``module`` itself is converted)."""
        from genfast.nn.fused_sequential import FusedSequential, activation_of

        if isinstance(module, FusedSequential):
            names = {id(m): n for n, m in module.named_children()}
            for step in module.active_fusions():
                if step.kind not in ("bn_act", "conv_bn_act"):
                    continue
                bn, act = step.modules[-2:]
                activation, slope = activation_of(act)
                module.add_module(names[id(bn)], cls._from_batchnorm(bn, process_group, activation, slope))
                module.add_module(names[id(act)], nn.Identity())
        out = module
        if isinstance(module, (BatchNormAct1d, BatchNormAct2d)):
            if module.memory_efficient:
                raise ValueError("convert_sync_batchnorm: memory_efficient BatchNormAct has no synchronised "
                                 "variant; construct it with memory_efficient=False")
            out = cls._from_batchnorm(module, process_group, module.activation, module.negative_slope)
        elif (isinstance(module, nn.modules.batchnorm._BatchNorm)
              and not isinstance(module, (nn.SyncBatchNorm, SyncBatchNormAct2d))):
            out = _move(module, nn.SyncBatchNorm(
                module.num_features, module.eps, module.momentum, module.affine,
                module.track_running_stats, process_group, device="meta",
                **bias_kwargs(not module.affine or module.bias is not None)))
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out

    @classmethod
    def _from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm, process_group: Any, activation: str,
                        negative_slope: float) -> "SyncBatchNormAct2d":
        return _move(bn, cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                             process_group, device="meta", activation=activation,
                             negative_slope=negative_slope,
                             **bias_kwargs(not bn.affine or bn.bias is not None)))


def _move(old: nn.Module, new: nn.Module) -> nn.Module:
    """``new`` with the very parameters and buffers of ``old``, its mode and qconfig."""
    for name, p in old.named_parameters(recurse=False):
        setattr(new, name, p)
    for name, b in old.named_buffers(recurse=False):
        setattr(new, name, b)
    new.train(old.training)
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    return new
