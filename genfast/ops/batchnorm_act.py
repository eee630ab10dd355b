"""The genfast::batch_norm_act ops: fake implementations, autograd and backend choice.

Ops:
  genfast::batch_norm_act / batch_norm_act_backward   the registered pair (autograd, fake); the
      `backend` argument picks the kernels: "cpu"/"cuda" call the C++ ops
      genfast::batch_norm_act_fwd / _bwd (schemas in csrc/ops.cpp), "triton" calls
      genfast/kernels/batchnorm_act.py.
The autograd formula is registered on genfast::batch_norm_act itself (so opcheck's aot_dispatch
tests and torch.compile see one differentiable op). It saves x (or y in memory_efficient mode,
marked by gamma_floor > 0) plus the per-channel mean and invstd. When the backward itself must be
differentiable (create_graph=True), it runs the reference formulas instead of the fused kernel.
Under torch.autocast the op runs in the input's dtype, as F.batch_norm does (custom ops fall
through the autocast keys).
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from genfast import backend as B
from genfast.ops import conv_transpose as _ct
from genfast.reference import batchnorm_act as ref

FAMILY = "batchnorm_act"

# memory_efficient mode keeps |weight| >= GAMMA_FLOOR in the forward so that the backward can
# recover xhat = (z - beta) / weight from the output. Only channels whose |weight| is below it
# differ from nn.BatchNorm (by at most GAMMA_FLOOR * |xhat| before the activation).
GAMMA_FLOOR = 1e-3

_lib = torch.library.Library("genfast", "FRAGMENT")


def _fwd_fake(input, weight, bias, running_mean, running_var, training, momentum, eps,
              activation, negative_slope, gamma_floor):
    C = input.shape[1]
    acc = ref.acc_dtype(input.dtype)
    out = ref.empty_bn_output(input)
    return out, input.new_empty((C,), dtype=acc), input.new_empty((C,), dtype=acc)


def _bwd_fake(grad_out, saved, weight, bias, save_mean, save_invstd, training, activation,
              negative_slope, gamma_floor, saved_is_output):
    C = saved.shape[1]
    gw = saved.new_empty((C,), dtype=weight.dtype if weight is not None else saved.dtype)
    gb = saved.new_empty((C,), dtype=bias.dtype if bias is not None else saved.dtype)
    return ref.bn_output_as_torch(ref.bn_write_buffer(saved)), gw, gb  # (the kernels' layout of saved)


# --- the registered op pair ----------------------------------------------------------------
# One custom op per direction for every fused backend: the kernel choice is the `backend`
# argument (a constant under torch.compile), so fake, autograd and opcheck are written once.

def _fwd_kernel(backend: str):
    if backend in ("cpu", "cuda"):
        return torch.ops.genfast.batch_norm_act_fwd
    if backend == "triton":
        from genfast.kernels import batchnorm_act as K

        return K.bn_act_fwd
    raise ValueError(f"batch_norm_act: backend must be 'cpu', 'cuda' or 'triton', got {backend!r}")


def _bwd_kernel(backend: str):
    if backend in ("cpu", "cuda"):
        return torch.ops.genfast.batch_norm_act_bwd
    if backend == "triton":
        from genfast.kernels import batchnorm_act as K

        return K.bn_act_bwd
    raise ValueError(f"batch_norm_act: backend must be 'cpu', 'cuda' or 'triton', got {backend!r}")


@torch.library.custom_op("genfast::batch_norm_act", mutates_args=("running_mean", "running_var"))
def batch_norm_act_op(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                      running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
                      momentum: float, eps: float, activation: int, negative_slope: float,
                      gamma_floor: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    backend = B.at_run(FAMILY, backend, input.device)
    return _fwd_kernel(backend)(input, weight, bias, running_mean, running_var, training, momentum,
                                eps, activation, negative_slope, gamma_floor)


@torch.library.custom_op("genfast::batch_norm_act_backward", mutates_args=())
def batch_norm_act_backward_op(grad_out: Tensor, saved: Tensor, weight: Optional[Tensor],
                               bias: Optional[Tensor], save_mean: Tensor, save_invstd: Tensor,
                               training: bool, activation: int, negative_slope: float,
                               gamma_floor: float, saved_is_output: bool,
                               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    backend = B.at_run(FAMILY, backend, saved.device)
    return _bwd_kernel(backend)(grad_out, saved, weight, bias, save_mean, save_invstd, training,
                                activation, negative_slope, gamma_floor, saved_is_output)


@batch_norm_act_op.register_fake
def _(input, weight, bias, running_mean, running_var, training, momentum, eps, activation,
      negative_slope, gamma_floor, backend):
    return _fwd_fake(input, weight, bias, running_mean, running_var, training, momentum, eps,
                     activation, negative_slope, gamma_floor)


@batch_norm_act_backward_op.register_fake
def _(grad_out, saved, weight, bias, save_mean, save_invstd, training, activation, negative_slope,
      gamma_floor, saved_is_output, backend):
    return _bwd_fake(grad_out, saved, weight, bias, save_mean, save_invstd, training, activation,
                     negative_slope, gamma_floor, saved_is_output)


_ACT_NAMES = {v: k for k, v in B.ACTIVATIONS.items()}


def _setup_context(ctx, inputs, output):
    (input, weight, bias, _rm, _rv, training, _momentum, eps, activation, slope, gamma_floor,
     backend) = inputs
    y, mean, invstd = output
    ctx.mark_non_differentiable(mean, invstd)
    # mean and invstd never carry a gradient: no zero tensors materialised for them.
    ctx.set_materialize_grads(False)
    ctx.saved_is_output = gamma_floor > 0
    ctx.save_for_backward(y if ctx.saved_is_output else input, weight, bias, mean, invstd)
    ctx.cfg = (training, activation, slope, gamma_floor, eps, backend)


def _backward(ctx, grad_out, _grad_mean, _grad_invstd):
    saved, weight, bias, mean, invstd = ctx.saved_tensors
    training, activation, slope, gamma_floor, eps, backend = ctx.cfg
    need = ctx.needs_input_grad
    if grad_out is None:
        return (None,) * 12
    if torch.is_grad_enabled():
        # create_graph=True: the differentiable reference formulas.
        if ctx.saved_is_output:
            raise RuntimeError(
                "batch_norm_act: double backward is not supported with memory_efficient=True "
                "(the input is not saved); use memory_efficient=False for gradient penalties")
        dx, dw, db = _ref_grad(grad_out, saved, weight, bias, mean, invstd, training, activation,
                               slope, gamma_floor, eps)
        dw = dw if weight is not None else None
        db = db if bias is not None else None
    else:
        dx, dw, db = batch_norm_act_backward_op(grad_out, saved, weight, bias, mean, invstd,
                                                training, activation, slope, gamma_floor,
                                                ctx.saved_is_output, backend)
    return ((dx if need[0] else None, dw if need[1] else None, db if need[2] else None)
            + (None,) * 9)


def _register_autograd_on_mutating_op(op, backward, setup_context) -> None:
    # torch.library.register_autograd refuses ops that mutate an argument, and this one mutates
    # the running statistics (which never need a gradient). The autograd kernel that
    # torch.library.custom_op installs reads the formula from these two attributes at call time,
    # so setting them gives the op its formula; a torch without them fails here, at import.
    for attr in ("_backward_fn", "_setup_context_fn"):
        if not hasattr(op, attr):
            raise RuntimeError(f"genfast: this torch's custom_op has no {attr}; cannot register "
                               "the autograd formula of genfast::batch_norm_act")
    op._backward_fn = backward
    op._setup_context_fn = setup_context


_register_autograd_on_mutating_op(batch_norm_act_op, _backward, _setup_context)


def _ref_grad(grad_out, saved, weight, bias, save_mean, save_invstd, training, activation,
              negative_slope, gamma_floor, eps):
    """Kernel of genfast::batch_norm_act_ref_grad (CompositeImplicitAutograd: differentiable):
    the reference backward with the batch statistics recomputed from x in training, so that the
    gradients are differentiable in x too; empty tensors for a missing weight or bias."""
    dx, dw, db = ref.batch_norm_act_backward(
        grad_out, saved, weight, bias, None if training else save_mean,
        None if training else save_invstd, training, _ACT_NAMES[activation], negative_slope,
        gamma_floor, eps)
    empty = saved.new_empty((0,))
    return (dx, dw.to(weight.dtype) if weight is not None else empty,
            db.to(bias.dtype) if bias is not None else empty)


def _train_fake(input, weight, bias, running_mean, running_var, training, momentum, eps,
                activation, negative_slope, gamma_floor):
    return ref.empty_bn_output(input)


HAS_CPP_OPS = B.has_cpu_ext()
if HAS_CPP_OPS:
    torch.library.register_fake("genfast::batch_norm_act_fwd", _fwd_fake, lib=_lib)
    torch.library.register_fake("genfast::batch_norm_act_bwd", _bwd_fake, lib=_lib)
    torch.library.register_fake("genfast::batch_norm_act_train", _train_fake, lib=_lib)
    _lib.impl("batch_norm_act_ref_grad", _ref_grad, "CompositeImplicitAutograd")


# --- checks shared by the functional and the modules -----------------------------------------

def check_float_arg(name: str, value: object) -> None:
    """TypeError, as torch's argument parser raises, for a float argument that is not a real
    number (a Python or numpy int / float / bool, or a 0-dim tensor): e.g. a string or None."""
    if isinstance(value, numbers.Real) or (isinstance(value, torch.Tensor) and value.dim() == 0):
        return
    raise TypeError(f"batch_norm_act(): argument '{name}' must be float, not {type(value).__name__}")


def check_activation(activation: str, negative_slope: float, memory_efficient: bool) -> None:
    check_float_arg("negative_slope", negative_slope)
    if activation not in ("leaky_relu", "relu", "identity"):
        raise ValueError(
            f"activation must be 'leaky_relu', 'relu' or 'identity', got {activation!r}")
    if activation == "leaky_relu":
        _ct.check_int_slope(negative_slope)
    if memory_efficient:
        if activation == "relu" or (activation == "leaky_relu" and not negative_slope > 0):
            raise ValueError(
                "memory_efficient=True needs an invertible activation ('identity', or "
                f"'leaky_relu' with negative_slope > 0); got activation={activation!r}, "
                f"negative_slope={negative_slope}")


def check_inputs(input: Tensor, running_mean, running_var, weight, bias, training: bool,
                 check_batch: bool = True) -> None:
    """torch's exception types for the bad inputs of F.batch_norm, checked before anything is
    written (so that running statistics are untouched when a call fails). check_batch=False
    skips the more-than-one-value-per-channel check (SyncBatchNormAct checks the global count)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm_act(): argument 'input' must be Tensor, not {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"batch_norm_act: expected input with at least 2 dims (N, C, *), got {input.dim()}D input")
    if not input.is_floating_point():
        raise RuntimeError(f"batch_norm_act: input must be a floating-point tensor, got {input.dtype}")
    C = input.shape[1]
    low = input.dtype in (torch.float16, torch.bfloat16)
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dim() != 1 or t.numel() != C:
            raise RuntimeError(f"batch_norm_act: {name} should contain {C} elements not {t.numel()}")
        if t.device != input.device:
            raise RuntimeError(
                "Expected all tensors to be on the same device, but found input on "
                f"{input.device} and argument {name} on {t.device}")
        if t.dtype != input.dtype and not (low and t.dtype == torch.float32):
            raise RuntimeError(
                f"batch_norm_act: expected {name} to have dtype {input.dtype}"
                + (" or torch.float32" if low else "") + f", got {t.dtype}")
    # as torch: the four take one dtype (the input's, or float32 for a float16 / bfloat16 input)
    given = [(n, t) for n, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                                 ("running_var", running_var)) if t is not None]
    for name, t in given[1:]:
        if t.dtype != given[0][1].dtype:
            raise RuntimeError(
                f"batch_norm_act: expected {name} to have dtype {given[0][1].dtype}, the dtype of "
                f"{given[0][0]} (weight, bias, running_mean and running_var take one dtype), got "
                f"{t.dtype}")
    if (running_mean is None) != (running_var is None):
        raise RuntimeError("batch_norm_act: running_mean and running_var must be given together")
    if not training and running_mean is None:
        raise RuntimeError("batch_norm_act: running_mean and running_var are required when training=False")
    if training and check_batch:
        size_prods = input.shape[0]
        for s in input.shape[2:]:
            size_prods *= s
        if size_prods == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {input.size()}")


_FAST_ACTS = {"identity": 0, "relu": 1, "leaky_relu": 2}
# the number types the fast path takes as they are (others, e.g. 0-dim tensors and numpy
# scalars, which torch also takes, and strings, which it refuses, go through the checked path)
_NUMBERS = (float, int)


def eager_fast(input, running_mean, running_var, weight, bias, training, momentum, eps,
               activation, negative_slope, memory_efficient) -> Optional[Tensor]:
    """The common eager CPU call straight to the C++ op (with its C++ autograd): a float32 /
    float64 CPU input of 2 to 4 dims and C > 0 channels, (C,) parameters and buffers of its dtype, a valid eps and
    activation, more than one value per channel when training, the cpu backend by "auto" or
    pin, not traced. None for every other call, which takes the checked path (and raises there
    when it must). The tensor checks run in C++ (genfast._C.batch_norm_act_eager): in Python they
    cost 7-15 us per call on the CI CPU, half of a (64, 64) BatchNorm1d's time."""
    act = _FAST_ACTS.get(activation) if type(activation) is str else None
    if (act is None or memory_efficient or type(input) is not Tensor or type(training) is not bool
            or type(momentum) not in _NUMBERS or type(eps) not in _NUMBERS
            or type(negative_slope) not in _NUMBERS or not B.eager_cpu(input)
            or torch._C._has_torch_function((running_mean, running_var, weight, bias))
            or not _ct.int64_slope(negative_slope) or B.composite_only(input, weight, bias)
            or _ct.slope_beyond_float32(activation, negative_slope, input)):
        return None
    try:
        return B.extension().batch_norm_act_eager(input, running_mean, running_var, weight, bias,
                                                  training, float(momentum), float(eps), act,
                                                  float(negative_slope))
    except TypeError:
        # an argument of a type the C++ signature does not take (pybind11 raises TypeError before
        # the call): the checked path raises torch's exception for it
        return None


def resolve_backend(input: Tensor, activation: str, negative_slope: float,
                    memory_efficient: bool) -> str:
    """The backend that will run this call; raises (before anything is written) when the
    activation settings are invalid or the selected backend cannot run on input's device."""
    check_activation(activation, negative_slope, memory_efficient)
    _ct.check_slope_range(activation, negative_slope, input)
    return B.resolve(FAMILY, input.device)


def batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps,
                   activation, negative_slope, memory_efficient):
    name = resolve_backend(input, activation, negative_slope, memory_efficient)
    return run_resolved(name, input, running_mean, running_var, weight, bias, training, momentum,
                        eps, activation, negative_slope, memory_efficient)


def run_resolved(name, input, running_mean, running_var, weight, bias, training, momentum, eps,
                 activation, negative_slope, memory_efficient):
    """batch_norm_act on backend ``name`` (from resolve_backend), inputs already checked."""
    if memory_efficient and input.dtype in (torch.float16, torch.bfloat16):
        # The input recovered from a 16-bit output, (y - bias) / weight, carries that output's
        # rounding divided by |weight|: gradients off by several percent where |bias| >> |weight|
        # (bfloat16, weight 0.05 and bias 2: grad_weight 10% off, torch's 0.1%). Such calls save
        # the input as the default mode does.
        B.warn_once("bn-memory-efficient-16bit",
                    f"batch_norm_act: memory_efficient=True with a {input.dtype} input saves the "
                    "input for the backward, as memory_efficient=False does (the input recovered "
                    "from a 16-bit output is not accurate enough for the gradients)")
        memory_efficient = False
    gamma_floor = GAMMA_FLOOR if memory_efficient else 0.0
    if name != "reference" and B.composite_only(input, weight, bias):
        name = "reference"  # forward AD / torch.func: the fused ops' nodes have no rule for them
    if name == "reference":
        return ref.batch_norm_act(input, running_mean, running_var, weight, bias, training,
                                  momentum, eps, activation, negative_slope, gamma_floor)
    if name == "cpu" and (not torch.compiler.is_compiling() or B.inductor_cpu(input)):
        # Eager CPU calls and torch.compile's CPU graphs (B.inductor_cpu): the C++ op with its
        # autograd in C++ (csrc/batchnorm_autograd.cpp; AOTAutograd traces its backward into the
        # compiled graph). The registered op genfast::batch_norm_act (what torch.export sees)
        # runs the same kernels with the same formula, but a Python custom op with a Python
        # autograd kernel costs its dispatch twice per direction: 60-150 us per forward +
        # backward on the 2-core CI CPU, as much as the kernels at discriminator and MLP sizes.
        return torch.ops.genfast.batch_norm_act_train.default(
            input, weight, bias, running_mean, running_var, training, float(momentum), float(eps),
            B.ACTIVATIONS[activation], float(negative_slope), gamma_floor)
    y, _, _ = batch_norm_act_op(input, weight, bias, running_mean, running_var, training,
                                float(momentum), float(eps), B.ACTIVATIONS[activation],
                                float(negative_slope), gamma_floor, B.for_op(name))
    return y
