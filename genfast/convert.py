"""Model surgery: swap torch layers for their genfast drop-ins, in place, keeping every
parameter and buffer (the same tensor objects) and every state_dict key."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

import genfast.nn as gnn
from genfast.nn.batchnorm_act import bias_kwargs
from genfast.nn.conv_transpose import FoldedBatchNormAct2d, fold_bn_into_conv

_BN_FUSED = {nn.BatchNorm1d: gnn.BatchNormAct1d, nn.BatchNorm2d: gnn.BatchNormAct2d}


@dataclass
class ConvertReport:
    """What :func:`convert` swapped: one line per swap, ``print(report)`` shows them."""

    swaps: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __len__(self):
        return len(self.swaps)

    def __str__(self):
        lines = [f"genfast.convert: {len(self.swaps)} swap(s)"] + [f"  {s}" for s in self.swaps]
        lines += [f"  skipped {s}" for s in self.skipped]
        return "\n".join(lines)


def _activation_of(m):
    """(activation, negative_slope) for the activations fused after BatchNorm, else None."""
    if type(m) is nn.ReLU:
        return "relu", 0.01
    if type(m) is nn.LeakyReLU:
        return "leaky_relu", float(m.negative_slope)
    return None


def _epilogue_of(m):
    if type(m) is nn.Tanh:
        return "tanh"
    if type(m) is nn.Sigmoid:
        return "sigmoid"
    return None


def _move_state(old: nn.Module, new: nn.Module) -> nn.Module:
    """Give `new` the very parameter and buffer tensors of `old` (optimisers holding them keep
    working) and its train/eval mode."""
    for name, p in old.named_parameters(recurse=False):
        setattr(new, name, p)
    for name, b in old.named_buffers(recurse=False):
        setattr(new, name, b)
    new.train(old.training)
    return new


def _fused_bn(bn, activation, slope, cls=None):
    cls = cls or _BN_FUSED[type(bn)]
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
              device="meta", activation=activation, negative_slope=slope,
              **bias_kwargs(not bn.affine or bn.bias is not None))
    return _move_state(bn, new)


def _conv_transpose(ct, activation=None):
    new = gnn.ConvTranspose2d(ct.in_channels, ct.out_channels, ct.kernel_size, ct.stride, ct.padding,
                              ct.output_padding, ct.groups, ct.bias is not None, ct.dilation,
                              ct.padding_mode, device="meta", activation=activation)
    return _move_state(ct, new)


def convert(model: nn.Module, *, skip=(), fuse_conv_bn: bool = True, return_report: bool = False):
    """Swap, in place, the layers of ``model`` that genfast fuses, and return the model.

    Swapped (and nothing else):
      * ``nn.ConvTranspose2d`` -> ``gnn.ConvTranspose2d`` (anywhere in the model);
      * inside an ``nn.Sequential``: ``nn.ConvTranspose2d`` directly followed by ``nn.Tanh`` /
        ``nn.Sigmoid`` -> the activation fused into the convolution's epilogue;
      * inside an ``nn.Sequential``: ``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` directly followed
        by ``nn.ReLU`` / ``nn.LeakyReLU`` (``inplace`` or not) -> ``gnn.BatchNormAct1d/2d``;
      * inside an ``nn.Sequential`` (with ``fuse_conv_bn``): ``nn.ConvTranspose2d`` ->
        ``nn.BatchNorm2d`` -> ``nn.ReLU`` / ``nn.LeakyReLU`` -> one fused block: the
        convolution takes the BatchNorm statistics in its epilogue (training) or folds the
        BatchNorm in (eval); the BatchNorm slot becomes a ``FoldedBatchNormAct2d`` that holds
        the parameters and buffers and passes its input through.
    A fused activation's slot becomes ``nn.Identity``, so the ``state_dict`` keeps exactly the
    original keys and the original checkpoint loads with ``strict=True`` (and back). Parameters
    and buffers are the same tensor objects as before. Converting twice changes nothing.

    Args:
        model: any ``nn.Module``.
        skip: qualified module names (as in ``model.named_modules()``) to leave untouched.
        fuse_conv_bn: fuse ConvTranspose2d -> BatchNorm2d -> activation triples (default True).
            Use False before ``SyncBatchNormAct2d.convert_sync_batchnorm``, which needs the
            BatchNorm to run on its own.
        return_report: also return a :class:`ConvertReport` of the swaps.

    Returns:
        ``model``, or ``(model, report)`` with ``return_report=True``.
    """
    skip = set(skip)
    report = ConvertReport()
    # Collect first, then swap: the module tree must not change while it is walked.
    parents = list(model.named_modules())
    for pname, parent in parents:
        if pname in skip:
            continue
        children = list(parent.named_children())
        qual = {n: f"{pname}.{n}" if pname else n for n, _ in children}
        if isinstance(parent, nn.Sequential) and fuse_conv_bn:
            for (n, m), (n2, m2), (n3, m3) in zip(children, children[1:], children[2:]):
                if any(qual[k] in skip for k in (n, n2, n3)):
                    continue
                act = _activation_of(m3)
                untouched = all(getattr(parent, k) is v for k, v in ((n, m), (n2, m2), (n3, m3)))
                if (untouched and type(m) is nn.ConvTranspose2d and type(m2) is nn.BatchNorm2d
                        and act is not None and m.padding_mode == "zeros"):
                    conv = _conv_transpose(m)
                    bn = _fused_bn(m2, *act, cls=FoldedBatchNormAct2d)
                    fold_bn_into_conv(conv, bn)
                    setattr(parent, n, conv)
                    setattr(parent, n2, bn)
                    setattr(parent, n3, nn.Identity())
                    report.swaps.append(f"{qual[n]} (ConvTranspose2d) + {qual[n2]} (BatchNorm2d) + {qual[n3]} "
                                        f"({type(m3).__name__}) -> ConvTranspose2d with BatchNorm statistics "
                                        f"epilogue (activation={act[0]!r})")
            children = list(parent.named_children())
        if isinstance(parent, nn.Sequential):
            for (n, m), (n2, m2) in zip(children, children[1:]):
                if qual[n] in skip or qual[n2] in skip:
                    if type(m) in _BN_FUSED or type(m) is nn.ConvTranspose2d:
                        report.skipped.append(qual[n])
                    continue
                act = _activation_of(m2)
                if type(m) in _BN_FUSED and act is not None:
                    setattr(parent, n, _fused_bn(m, *act))
                    setattr(parent, n2, nn.Identity())
                    report.swaps.append(f"{qual[n]} ({type(m).__name__}) + {qual[n2]} "
                                        f"({type(m2).__name__}) -> {_BN_FUSED[type(m)].__name__}"
                                        f"(activation={act[0]!r})")
                epi = _epilogue_of(m2)
                if type(m) is nn.ConvTranspose2d and epi is not None:
                    setattr(parent, n, _conv_transpose(m, epi))
                    setattr(parent, n2, nn.Identity())
                    report.swaps.append(f"{qual[n]} (ConvTranspose2d) + {qual[n2]} "
                                        f"({type(m2).__name__}) -> ConvTranspose2d(activation={epi!r})")
        for n, m in parent.named_children():
            if type(m) is nn.ConvTranspose2d and qual.get(n) not in skip:
                setattr(parent, n, _conv_transpose(m))
                report.swaps.append(f"{qual[n]} (ConvTranspose2d) -> ConvTranspose2d")
    return (model, report) if return_report else model
