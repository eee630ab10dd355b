"""FusedSequential: an nn.Sequential that holds the fusion plan genfast.convert made for it, and
runs a planned run of children fused only while those children are still the ones planned."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn.modules import module as _m

from genfast import backend as B

from genfast.nn.batchnorm_act import batch_norm_act_forward
from genfast.nn.conv_act import (can_fuse_product_bn, plain_product, product_act_forward,
                                 product_bn_act_forward)
from genfast.nn.conv_transpose import (ConvTranspose2d, can_fuse_conv_bn, check_conv_bn_input,
                                       conv_bn_act_forward, conv_transpose_act_forward, has_hooks)

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
KINDS = {"conv_bn_act": 3, "bn_act": 2, "conv_act": 2}


def _plain_conv(m: nn.Module) -> bool:
    return type(m) is ConvTranspose2d and m.activation is None and m.padding_mode == "zeros"


def activation_of(m: nn.Module) -> Optional[tuple[str, float]]:
    """(activation, negative_slope) of an nn.ReLU / nn.LeakyReLU module (exact types), else
    None. A LeakyReLU with a negative or NaN slope is not fused."""
    if type(m) is nn.ReLU:
        return "relu", 0.01
    if type(m) is nn.LeakyReLU and m.negative_slope >= 0:
        return "leaky_relu", float(m.negative_slope)
    return None


def saves_input(m: nn.Module) -> bool:
    """Whether torch's backward of activation module ``m`` reads its input rather than its output:
    nn.LeakyReLU(inplace=False) (ReLU, Tanh, Sigmoid and an in-place LeakyReLU read the output, as
    genfast's fused activations do). Its output may then be modified in place before the
    backward, so the fused op, which saves the output, does not apply the activation itself."""
    return type(m) is nn.LeakyReLU and not m.inplace


def epilogue_of(m: nn.Module) -> Optional[str]:
    """The conv_transpose2d epilogue activation of an nn.Tanh / nn.Sigmoid module, else None."""
    if type(m) is nn.Tanh:
        return "tanh"
    if type(m) is nn.Sigmoid:
        return "sigmoid"
    return None


@dataclass(eq=False)
class FusionStep:
    """Children ``modules`` (the very objects, in order) that run as one fused op; ``kind`` is
    "conv_bn_act" (ConvTranspose2d or Conv2d -> BatchNorm2d, or Linear -> BatchNorm1d, then
    ReLU/LeakyReLU), "bn_act" (BatchNorm1d/2d -> ReLU/LeakyReLU) or "conv_act" (ConvTranspose2d
    -> Tanh/Sigmoid; Conv2d or Linear -> ReLU/LeakyReLU/Tanh/Sigmoid)."""

    kind: str
    modules: tuple[nn.Module, ...]

    def matches(self) -> bool:
        """Whether the children have the types (and settings) this kind fuses."""
        mods = self.modules
        if self.kind == "conv_bn_act":
            if activation_of(mods[2]) is None:
                return False
            return ((_plain_conv(mods[0]) and type(mods[1]) is nn.BatchNorm2d)
                    or can_fuse_product_bn(mods[0], mods[1]))
        if self.kind == "bn_act":
            return type(mods[0]) in _BN_TYPES and activation_of(mods[1]) is not None
        if plain_product(mods[0]):
            return activation_of(mods[1]) is not None or epilogue_of(mods[1]) is not None
        return _plain_conv(mods[0]) and epilogue_of(mods[1]) is not None

    def still_valid(self) -> bool:
        """Whether the planned children may run fused: :meth:`matches`, and no hook on any of
        them (a hook must see each child's own input and output)."""
        return self.matches() and not any(has_hooks(m) for m in self.modules)

    def left_to_inductor(self) -> bool:
        """Whether, traced by torch.compile on the CPU (B.inductor_cpu), the children run as they
        are, for inductor to fuse: a Conv2d / Linear with its activation, or with a BatchNorm in
        eval mode or a BatchNorm1d (genfast's products are torch's on the CPU, and inductor fuses
        the bias, BatchNorm and activation into the loops around them: measured on the CI CPU,
        the MLP discriminator's fwd+bwd ran 20% slower compiled through the fused path, whose
        activation is out of place, and the MLP generator's 6% slower with genfast's (N, C)
        BatchNorm op). Transposed convolutions and the BatchNorms of convolutions keep genfast's
        C++ ops (an (N, C, H, W) BatchNorm + LeakyReLU fwd+bwd compiled by inductor alone ran
        4-5x slower than genfast's op)."""
        mods = self.modules
        if not plain_product(mods[0]):
            return False
        return (self.kind == "conv_act" or isinstance(mods[0], nn.Linear)
                or not mods[1].training)

    def ready_at(self, children: list, start: int) -> bool:
        """Whether the step runs fused now in a container whose children are ``children``: the
        planned objects at ``start`` onwards, none with a hook of its own (the caller checks the
        global module hooks), and :meth:`matches`. One pass, run at every forward."""
        mods = self.modules
        if start + len(mods) > len(children):
            return False
        for k, m in enumerate(mods):
            if (children[start + k] is not m or m._forward_hooks or m._forward_pre_hooks
                    or m._backward_hooks or m._backward_pre_hooks):
                return False
        return self.matches()

    def run(self, input: torch.Tensor) -> torch.Tensor:
        mods = self.modules
        if self.kind == "conv_bn_act":
            act, slope = activation_of(mods[2])
            keep = saves_input(mods[2])
            if plain_product(mods[0]):
                return product_bn_act_forward(mods[0], mods[1], act, slope, input, keep_input=keep)
            check_conv_bn_input(mods[1], input)
            return conv_bn_act_forward(mods[0], mods[1], act, slope, input, None, keep_input=keep)
        if self.kind == "bn_act":
            act, slope = activation_of(mods[1])
            return batch_norm_act_forward(mods[0], input, act, slope)
        pair = activation_of(mods[1])
        act, slope = pair if pair is not None else (epilogue_of(mods[1]), 0.01)
        if plain_product(mods[0]):
            if saves_input(mods[1]):
                # the product (bias in its epilogue), then torch's LeakyReLU out of place
                return mods[1](product_act_forward(mods[0], input, None))
            return product_act_forward(mods[0], input, act, slope)
        return conv_transpose_act_forward(mods[0], input, act)


def plan_fusions(children: list[nn.Module], kinds: tuple[str, ...] = tuple(KINDS),
                 blocked: frozenset = frozenset()) -> tuple[list[tuple[int, FusionStep]], list[tuple[int, FusionStep]]]:
    """Plan the fusions of a run of children, greedy from the left (the ConvTranspose2d ->
    BatchNorm2d -> activation triple first), never using an index in ``blocked``. Returns
    (plan, hooked): the steps as (index of the first child, step), and the steps whose children
    match a fused pattern but are not planned because one of them has a hook."""
    plan, hooked = [], []
    i = 0
    while i < len(children):
        step = None
        for kind in kinds:
            n = KINDS[kind]
            if i + n > len(children) or any(i + k in blocked for k in range(n)):
                continue
            candidate = FusionStep(kind, tuple(children[i:i + n]))
            if not candidate.matches():
                continue
            if candidate.still_valid():
                step = candidate
                break
            hooked.append((i, candidate))
        if step is None:
            i += 1
        else:
            plan.append((i, step))
            i += len(step.modules)
    return plan, hooked


class FusedSequential(nn.Sequential):
    """An ``nn.Sequential`` (same children, same state_dict keys, same indexing) in which
    ``genfast.convert`` planned runs of children to run as one fused op:
    ConvTranspose2d / Conv2d -> BatchNorm2d -> ReLU/LeakyReLU and Linear -> BatchNorm1d ->
    ReLU/LeakyReLU (BatchNorm statistics right after the product in training; in eval the
    BatchNorm folded into the product, or its affine map applied in one pass after it where the
    fold would cost more: see conv_transpose.fold_pays), BatchNorm1d/2d -> ReLU/LeakyReLU, ConvTranspose2d ->
    Tanh/Sigmoid, Conv2d / Linear -> ReLU/LeakyReLU/Tanh/Sigmoid (bias and activation in one
    pass after the product). A fused activation saves its output for the backward, as torch's
    ReLU, Tanh, Sigmoid and in-place LeakyReLU do; after an nn.LeakyReLU(inplace=False), whose
    output torch lets the caller modify in place, the pair or eval block runs the product fused
    and the LeakyReLU as torch's own (the training blocks save the BatchNorm's input).

    The children stay the torch modules they were (the transposed convolutions become
    gnn.ConvTranspose2d; Conv2d and Linear keep their class). At each forward, a planned run runs fused only while its children are
    still the planned objects at the planned positions, of the planned types, with no hook on
    any of them (and no global module hook); otherwise those children run one by one, exactly
    as in nn.Sequential. Replacing a child (e.g. ``nn.SyncBatchNorm.convert_sync_batchnorm``),
    hooking it or parametrizing it therefore never changes what the model computes. Traced by
    torch.compile on the CPU, the runs :meth:`FusionStep.left_to_inductor` names also run one by
    one (inductor fuses them itself).
    """

    _genfast_plan: tuple = ()

    def set_fusion_plan(self, plan: list[tuple[int, FusionStep]]) -> None:
        """Record ``plan`` (from :func:`plan_fusions` over this container's children)."""
        self.__dict__["_genfast_plan"] = tuple(plan)
        # (index of the first child -> step, read at every forward; None without a plan)
        self.__dict__["_genfast_steps"] = dict(plan) or None

    def fusion_plan(self) -> tuple:
        """The recorded plan: (index of the first child, FusionStep) pairs."""
        return self.__dict__.get("_genfast_plan", ())

    def active_fusions(self) -> list[FusionStep]:
        """The planned steps that would run fused now in an eager call (under torch.compile on the
        CPU, less those left to inductor)."""
        children = list(self._modules.values())
        return [step for start, step in self.fusion_plan() if self._runs_fused(children, start, step)]

    @staticmethod
    def _runs_fused(children: list, start: int, step: FusionStep) -> bool:
        return not _global_hooks() and step.ready_at(children, start)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        children = list(self._modules.values())
        steps = self.__dict__.get("_genfast_steps")
        if steps is None and self.__dict__.get("_genfast_plan"):
            # (a container unpickled from a version that recorded the plan alone)
            steps = self.__dict__["_genfast_steps"] = dict(self.__dict__["_genfast_plan"])
        if steps is None or _global_hooks():
            # no plan, or a global module hook, which must see every child: nn.Sequential's loop
            for module in children:
                input = module(input)
            return input
        inductor = isinstance(input, torch.Tensor) and B.inductor_cpu(input)
        i, n = 0, len(children)
        while i < n:
            step = steps.get(i)
            # (anything but a tensor goes to the children, which raise torch's TypeError)
            if (step is not None and isinstance(input, torch.Tensor)
                    and not (inductor and step.left_to_inductor()) and step.ready_at(children, i)):
                input = step.run(input)
                i += len(step.modules)
            else:
                input = children[i](input)
                i += 1
        return input


def _global_hooks() -> bool:
    return bool(_m._global_forward_hooks or _m._global_forward_pre_hooks
                or _m._global_backward_hooks or _m._global_backward_pre_hooks)
