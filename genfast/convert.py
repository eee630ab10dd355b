"""Model surgery: swap torch layers for their genfast drop-ins, in place, keeping every module
object, parameter, buffer, hook and state_dict key; fusions are planned in the containers."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, Union, overload

from torch import nn
from torch.nn.utils import parametrize

import genfast.nn as gnn
from genfast.nn.conv_transpose import has_hooks
from genfast.nn.fused_sequential import KINDS, FusedSequential, plan_fusions


@dataclass
class ConvertReport:
    """What :func:`convert` did: one line per swap or fusion (``len(report)`` counts them), and
    one per module left alone with the reason; ``print(report)`` shows both."""

    swaps: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.swaps)

    def __str__(self) -> str:
        lines = [f"genfast.convert: {len(self.swaps)} swap(s)"] + [f"  {s}" for s in self.swaps]
        lines += [f"  skipped {s}" for s in self.skipped]
        return "\n".join(lines)


def _hook_names(m: nn.Module) -> str:
    kinds = [name for name, d in (("forward pre-hook", m._forward_pre_hooks),
                                  ("forward hook", m._forward_hooks),
                                  ("backward pre-hook", m._backward_pre_hooks),
                                  ("backward hook", m._backward_hooks)) if d]
    return ", ".join(kinds) or "global module hooks"


def _describe(kind: str, names: list[str], mods: tuple[nn.Module, ...]) -> str:
    parts = " + ".join(f"{n} ({type(m).__name__})" for n, m in zip(names, mods))
    prod = "ConvTranspose2d" if isinstance(mods[0], nn.ConvTranspose2d) else type(mods[0]).__name__
    if kind == "conv_bn_act":
        act = type(mods[2]).__name__
        return f"{parts} -> fused {prod} with BatchNorm statistics epilogue + {act}"
    if kind == "bn_act":
        return f"{parts} -> fused BatchNormAct{type(mods[0]).__name__[-2:]} ({type(mods[1]).__name__})"
    return f"{parts} -> {prod} with {type(mods[1]).__name__} in its epilogue"


def _in_skip(name: str, skip: set[str]) -> bool:
    """Whether ``name`` or a module containing it is in ``skip``."""
    parts = name.split(".") if name else []
    return any(".".join(parts[:k]) in skip for k in range(len(parts) + 1)) if skip else False


@overload
def convert(model: nn.Module, *, skip: Iterable[str] = ..., fuse_conv_bn: bool = ...,
            return_report: Literal[False] = ...) -> nn.Module: ...


@overload
def convert(model: nn.Module, *, skip: Iterable[str] = ..., fuse_conv_bn: bool = ...,
            return_report: Literal[True]) -> tuple[nn.Module, ConvertReport]: ...


def convert(model: nn.Module, *, skip: Iterable[str] = (), fuse_conv_bn: bool = True,
            return_report: bool = False) -> Union[nn.Module, tuple[nn.Module, ConvertReport]]:
    """Swap, in place, the layers of ``model`` that genfast fuses, and return the model.

    What changes (and nothing else):
      * every ``nn.ConvTranspose2d`` becomes a ``gnn.ConvTranspose2d`` (the same module object:
        its class is swapped, so its parameters, buffers and hooks, e.g. the pre-hooks of
        ``torch.nn.utils.spectral_norm`` / ``weight_norm``, stay and keep working);
      * every ``nn.Sequential`` holding one of these runs of children becomes a
        :class:`genfast.nn.FusedSequential` (the same object and children) that runs the run
        as one fused op: ``ConvTranspose2d / Conv2d -> BatchNorm2d -> ReLU/LeakyReLU`` and
        ``Linear -> BatchNorm1d -> ReLU/LeakyReLU`` (the BatchNorm statistics taken right after
        the product in training, in eval folded into the product or applied in one pass after
        it; not with
        ``fuse_conv_bn=False``), ``BatchNorm1d/2d -> ReLU/LeakyReLU``, ``ConvTranspose2d ->
        Tanh/Sigmoid`` and ``Conv2d / Linear -> ReLU/LeakyReLU/Tanh/Sigmoid`` (the activation
        in the product's epilogue). Conv2d and Linear modules keep their class.
    The BatchNorm and activation children stay the torch modules they were, so the state_dict
    keys do not change (the original checkpoint loads with ``strict=True``, and back), parameters
    and buffers are the same tensor objects, and a fusion stands down (its children run one by
    one, as in nn.Sequential) as soon as one of its children is replaced, changes type (e.g. is
    parametrized) or gets a hook. Children that already have a hook, or are parametrized
    (``torch.nn.utils.parametrize``), are not fused, and the report says so. Converting twice
    changes nothing.

    Args:
        model: any ``nn.Module``.
        skip: qualified module names (as in ``model.named_modules()``) to leave untouched,
            with everything inside them.
        fuse_conv_bn: plan ConvTranspose2d -> BatchNorm2d -> activation triples (default True);
            with False the BatchNorm -> activation pair is fused on its own.
        return_report: also return a :class:`ConvertReport`.

    Returns:
        ``model``, or ``(model, report)`` with ``return_report=True``.
    """
    skip = set(skip)
    report = ConvertReport()
    modules = list(model.named_modules())
    for name in sorted(skip):
        report.skipped.append(f"{name} (in skip=)")
    # 1. transposed convolutions: swap the class of the very object.
    for name, m in modules:
        if _in_skip(name, skip):
            continue
        if type(m) is nn.ConvTranspose2d:
            m.__class__ = gnn.ConvTranspose2d
            setattr(m, "activation", None)  # plain attributes (nn.Module's stubs type them as Tensor | Module)
            setattr(m, "negative_slope", 0.01)
            kept = f" (its {_hook_names(m)} kept)" if has_hooks(m) else ""
            report.swaps.append(f"{name or '<model>'} (ConvTranspose2d) -> ConvTranspose2d{kept}")
        elif isinstance(m, nn.ConvTranspose2d) and parametrize.is_parametrized(m):
            report.skipped.append(f"{name or '<model>'} (parametrized ConvTranspose2d: "
                                  "torch.nn.utils.parametrize; left as it is, unfused)")
    # 2. containers: plan the fusions of each plain nn.Sequential.
    kinds = tuple(k for k in KINDS if fuse_conv_bn or k != "conv_bn_act")
    for pname, parent in modules:
        if type(parent) not in (nn.Sequential, FusedSequential) or _in_skip(pname, skip):
            continue
        named = list(parent.named_children())
        qual = [f"{pname}.{n}" if pname else n for n, _ in named]
        children = [m for _, m in named]
        blocked = frozenset(i for i, q in enumerate(qual) if _in_skip(q, skip))
        plan, hooked = plan_fusions(children, kinds, blocked)
        for start, step in hooked:
            names = qual[start:start + len(step.modules)]
            why = "; ".join(f"{q} has {_hook_names(m)}" for q, m in zip(names, step.modules)
                            if has_hooks(m))
            report.skipped.append(f"{' + '.join(names)} (not fused: {why})")
        if not plan and type(parent) is nn.Sequential:
            continue
        old = {step.modules for _, step in parent.fusion_plan()} if isinstance(parent, FusedSequential) else set()
        if type(parent) is nn.Sequential:
            parent.__class__ = FusedSequential
        parent.set_fusion_plan(plan)
        for start, step in plan:
            if step.modules not in old:
                report.swaps.append(_describe(step.kind, qual[start:start + len(step.modules)], step.modules))
    return (model, report) if return_report else model
