"""Count kernel launches of a genfast call on CPU tensors (Triton kernels under the interpreter).

A launch is one Triton kernel launch, one genfast C++ kernel op, or one ATen compute op called
from genfast's Python code (allocations, views and dtype no-ops are free). ATen's convolution
products are counted apart (`products`), so budgets read "product + N launches". Work done by
the Triton interpreter itself, and ATen ops called inside a C++ kernel op, are not counted.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile, record_function

_TRITON_MARK = "genfast_test::triton_launch"
# genfast C++ ops that are one kernel each (their inner ATen calls are not counted again);
# the ones that contain a convolution product count one product too.
_CPP_KERNEL_OPS = {
    "genfast::conv_transpose2d_fwd": 1, "genfast::conv_transpose2d_bwd": 1,
    "genfast::bn_block_finalize": 0, "genfast::batch_norm_act_apply": 0,
    "genfast::batch_norm_act_bwd_reduce": 0, "genfast::batch_norm_act_bwd_dx": 0,
    "genfast::batch_norm_act_fwd": 0, "genfast::batch_norm_act_bwd": 0,
    "genfast::batch_norm_act_stats": 0,
}
_PRODUCTS = {"aten::convolution", "aten::convolution_backward", "aten::mm", "aten::addmm",
             "aten::linear", "aten::conv_transpose2d", "aten::conv2d"}
_FREE = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
    "aten::new_empty_strided", "aten::view", "aten::reshape", "aten::as_strided", "aten::detach",
    "aten::alias", "aten::t", "aten::unsqueeze", "aten::squeeze", "aten::expand", "aten::permute",
    "aten::select", "aten::slice", "aten::contiguous", "aten::to", "aten::lift_fresh",
    "aten::resolve_conj", "aten::resolve_neg", "aten::_unsafe_view", "aten::result_type",
    "aten::set_", "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense", "detach",
}


@dataclass
class Launches:
    triton: list[str] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)
    products: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Launches besides the products."""
        return len(self.triton) + len(self.ops)

    def __str__(self):
        return f"products={self.products} triton={self.triton} ops={self.ops}"


@contextlib.contextmanager
def count_launches():
    """with count_launches() as n: ...  then n.total, n.products, n.triton, n.ops."""
    from triton.runtime.interpreter import InterpretedFunction

    result = Launches()
    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        result.triton.append(self.fn.__name__)
        with record_function(_TRITON_MARK):
            return original(self, *args, **kwargs)

    InterpretedFunction.run = run
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            yield result
    finally:
        InterpretedFunction.run = original
    for ev in prof.events():
        name = ev.name
        if name == _TRITON_MARK or name in _FREE:
            continue
        parent, inside = ev.cpu_parent, False
        while parent is not None:
            if (parent.name == _TRITON_MARK or parent.name in _CPP_KERNEL_OPS
                    or parent.name.startswith("aten::")):
                inside = True
                break
            parent = parent.cpu_parent
        if inside:
            continue
        if name in _CPP_KERNEL_OPS:
            result.ops.append(name)
            result.products.extend([name] * _CPP_KERNEL_OPS[name])
        elif name in _PRODUCTS:
            result.products.append(name)
        elif name.startswith("aten::"):
            result.ops.append(name)
