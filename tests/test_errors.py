"""Bad input over the public API, as a table: each case calls genfast and, where torch has the
equivalent call, torch itself; genfast must raise the exception type torch raises (taken from
running torch's call, never written down by hand where torch can be run), and must not have
changed any parameter, buffer or input tensor when it raises. Every case runs on the reference,
cpu and triton (interpreted) backends."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import genfast
import genfast.functional as GF
import genfast.nn as gnn
from tests.utils import CPU_BACKENDS, backend


@dataclass
class Case:
    ours: Callable[[], object]                   # the genfast call
    ref: Optional[Callable[[], object]]          # torch's equivalent call, or None
    expected: Optional[type] = None              # the exception type when torch has no equivalent
    state: tuple = ()                            # tensors that must not change


CASES: dict[str, Callable[[], Case]] = {}


def add(name: str, build: Callable[[], Case]) -> None:
    assert name not in CASES, name
    CASES[name] = build


def _state(*modules_or_tensors) -> tuple:
    out = []
    for x in modules_or_tensors:
        if isinstance(x, nn.Module):
            out += list(x.parameters()) + list(x.buffers())
        elif isinstance(x, torch.Tensor):
            out.append(x)
    return tuple(out)


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _full(shape, dtype):
    """A tensor of `dtype` (any dtype, integers and complex included) with varied values."""
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype)
    if not dtype.is_floating_point:
        return torch.randint(0, 5, shape, dtype=dtype)
    return torch.randn(shape, dtype=dtype)


BAD_DTYPES = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64]


# --- GF.conv_transpose2d vs F.conv_transpose2d --------------------------------------------------

def _ct_case(x, w, b=None, *args, activation=None, negative_slope=0.01, **kwargs):
    def build():
        xx, ww, bb = x(), w(), (b() if b is not None else None)
        return Case(lambda: GF.conv_transpose2d(xx, ww, bb, *args, activation=activation,
                                                negative_slope=negative_slope, **kwargs),
                    lambda: F.conv_transpose2d(xx, ww, bb, *args, **kwargs),
                    state=_state(xx, ww, bb))
    return build


X4 = lambda: _randn(2, 4, 5, 5)          # noqa: E731
W4 = lambda: _randn(4, 3, 3, 3)          # noqa: E731
B3 = lambda: _randn(3)                   # noqa: E731

add("ct_input_list", _ct_case(lambda: [[1.0]], W4))
add("ct_weight_list", _ct_case(X4, lambda: [[1.0]]))
add("ct_input_2d", _ct_case(lambda: _randn(4, 5), W4))
add("ct_input_5d", _ct_case(lambda: _randn(1, 2, 4, 5, 5), W4))
add("ct_weight_3d", _ct_case(X4, lambda: _randn(4, 3, 3)))
add("ct_weight_5d", _ct_case(X4, lambda: _randn(4, 3, 3, 3, 1)))
add("ct_channels_mismatch", _ct_case(lambda: _randn(2, 5, 5, 5), W4))
add("ct_channels_mismatch_unbatched", _ct_case(lambda: _randn(5, 5, 5), W4))
add("ct_groups_not_dividing", _ct_case(lambda: _randn(2, 3, 5, 5), lambda: _randn(3, 3, 3, 3), None, 1, 0, 0, 2))
add("ct_groups_zero", _ct_case(X4, W4, None, 1, 0, 0, 0))
add("ct_groups_negative", _ct_case(X4, W4, None, 1, 0, 0, -1))
add("ct_stride_zero", _ct_case(X4, W4, None, 0))
add("ct_stride_negative", _ct_case(X4, W4, None, -1))
add("ct_stride_zero_pair", _ct_case(X4, W4, None, (1, 0)))
add("ct_stride_three", _ct_case(X4, W4, None, (1, 1, 1)))
add("ct_padding_negative", _ct_case(X4, W4, None, 1, -1))
add("ct_padding_three", _ct_case(X4, W4, None, 1, (0, 0, 0)))
add("ct_dilation_zero", _ct_case(X4, W4, None, 1, 0, 0, 1, 0))
add("ct_dilation_negative", _ct_case(X4, W4, None, 1, 0, 0, 1, -2))
add("ct_output_padding_ge_stride", _ct_case(X4, W4, None, 1, 0, 1))
add("ct_output_padding_ge_stride2", _ct_case(X4, W4, None, 2, 0, 2))
add("ct_output_padding_negative", _ct_case(X4, W4, None, 2, 0, -1))
add("ct_output_nonpositive", _ct_case(lambda: _randn(2, 4, 1, 1), W4, None, 1, 3))
add("ct_dtype_mismatch_weight", _ct_case(X4, lambda: _randn(4, 3, 3, 3, dtype=torch.float64)))
add("ct_dtype_mismatch_input", _ct_case(lambda: _randn(2, 4, 5, 5, dtype=torch.float64), W4))
add("ct_dtype_half_float", _ct_case(lambda: _randn(2, 4, 5, 5, dtype=torch.float16), W4))
add("ct_bias_size", _ct_case(X4, W4, lambda: _randn(4)))
add("ct_bias_2d", _ct_case(X4, W4, lambda: _randn(3, 1)))
add("ct_bias_dtype", _ct_case(X4, W4, lambda: _randn(3, dtype=torch.float64)))
add("ct_bias_list", _ct_case(X4, W4, lambda: [0.0, 0.0, 0.0]))
for _dt in (torch.int32, torch.uint8, torch.bool):  # torch runs int64 and complex64 (slow path)
    add(f"ct_input_{_dt}", _ct_case(lambda dt=_dt: _full((2, 4, 5, 5), dt), lambda dt=_dt: _full((4, 3, 3, 3), dt)))


def _ct_no_torch(name, **kwargs):
    add(name, lambda: (lambda x, w: Case(lambda: GF.conv_transpose2d(x, w, **kwargs), None, ValueError,
                                         _state(x, w)))(X4(), W4()))


_ct_no_torch("ct_activation_unknown", activation="gelu")
_ct_no_torch("ct_activation_upper", activation="ReLU")
_ct_no_torch("ct_negative_slope_negative", activation="leaky_relu", negative_slope=-0.1)
_ct_no_torch("ct_negative_slope_nan", activation="leaky_relu", negative_slope=math.nan)


# --- gnn.ConvTranspose2d vs nn.ConvTranspose2d ---------------------------------------------------

def _ctm_case(args=(4, 3, 3), kwargs=None, x=X4, fwd_kwargs=None, ours_kwargs=None):
    kwargs, fwd_kwargs, ours_kwargs = kwargs or {}, fwd_kwargs or {}, ours_kwargs or {}

    def build():
        ours, ref = [], []
        xx = x()

        def ours_call():
            torch.manual_seed(0)
            ours.append(gnn.ConvTranspose2d(*args, **kwargs, **ours_kwargs))
            return ours[0](xx, **fwd_kwargs)

        def ref_call():
            torch.manual_seed(0)
            ref.append(nn.ConvTranspose2d(*args, **kwargs))
            return ref[0](xx, **fwd_kwargs)
        return Case(ours_call, ref_call, state=_state(xx))
    return build


def _ctm_forward_case(args=(4, 3, 3), kwargs=None, x=X4, fwd_kwargs=None, mutate=None):
    """A module built fine, then called badly (or mutated first): its parameters must not change."""
    kwargs, fwd_kwargs = kwargs or {}, fwd_kwargs or {}

    def build():
        torch.manual_seed(0)
        ours = gnn.ConvTranspose2d(*args, **kwargs)
        ref = nn.ConvTranspose2d(*args, **kwargs)
        ref.load_state_dict(ours.state_dict())
        if mutate is not None:
            mutate(ours), mutate(ref)
        xx = x()
        return Case(lambda: ours(xx, **fwd_kwargs), lambda: ref(xx, **fwd_kwargs), state=_state(ours, xx))
    return build


add("ctm_groups_not_dividing_in", _ctm_case((3, 4, 3), {"groups": 2}))
add("ctm_groups_not_dividing_out", _ctm_case((4, 3, 3), {"groups": 2}))
add("ctm_groups_zero", _ctm_case((4, 3, 3), {"groups": 0}))
add("ctm_padding_mode_reflect", _ctm_case((4, 3, 3), {"padding_mode": "reflect"}))
add("ctm_padding_mode_unknown", _ctm_case((4, 3, 3), {"padding_mode": "wrap"}))
add("ctm_kernel_three", _ctm_case((4, 3, (3, 3, 3))))
add("ctm_padding_string", _ctm_case((4, 3, 3), {"padding": "same"}))
add("ctm_in_channels_negative", _ctm_case((-1, 3, 3)))
add("ctm_out_channels_negative", _ctm_case((4, -3, 3)))
add("ctm_dtype_int", _ctm_case((4, 3, 3), {"dtype": torch.int64}))
add("ctm_input_channels", _ctm_forward_case(x=lambda: _randn(2, 5, 5, 5)))
add("ctm_input_2d", _ctm_forward_case(x=lambda: _randn(4, 5)))
add("ctm_input_5d", _ctm_forward_case(x=lambda: _randn(1, 2, 4, 5, 5)))
add("ctm_input_double", _ctm_forward_case(x=lambda: _randn(2, 4, 5, 5, dtype=torch.float64)))
add("ctm_input_half", _ctm_forward_case(x=lambda: _randn(2, 4, 5, 5, dtype=torch.float16)))
add("ctm_input_int", _ctm_forward_case(x=lambda: _full((2, 4, 5, 5), torch.int64)))
add("ctm_input_list", _ctm_forward_case(x=lambda: [1.0, 2.0]))
add("ctm_output_size_too_big", _ctm_forward_case((4, 3, 3, 2), fwd_kwargs={"output_size": [100, 100]}))
add("ctm_output_size_too_small", _ctm_forward_case((4, 3, 3, 2), fwd_kwargs={"output_size": [2, 2]}))
add("ctm_output_size_length", _ctm_forward_case((4, 3, 3, 2), fwd_kwargs={"output_size": [1, 2, 3, 4, 5]}))
add("ctm_output_too_small_padding", _ctm_forward_case((4, 3, 3, 1, 3), x=lambda: _randn(2, 4, 1, 1)))
add("ctm_mutated_padding_mode", _ctm_forward_case(mutate=lambda m: setattr(m, "padding_mode", "circular")))
add("ctm_mutated_stride_zero", _ctm_forward_case(mutate=lambda m: setattr(m, "stride", (0, 1))))
add("ctm_mutated_groups", _ctm_forward_case(mutate=lambda m: setattr(m, "groups", 3)))
add("ctm_activation_unknown", lambda: Case(lambda: gnn.ConvTranspose2d(4, 3, 3, activation="gelu"), None, ValueError))
add("ctm_negative_slope_negative", lambda: Case(
    lambda: gnn.ConvTranspose2d(4, 3, 3, activation="leaky_relu", negative_slope=-1.0), None, ValueError))


def _ctm_mutated_activation():
    m = gnn.ConvTranspose2d(4, 3, 3)
    m.activation = "gelu"
    x = X4()
    return Case(lambda: m(x), None, ValueError, _state(m, x))


add("ctm_mutated_activation", _ctm_mutated_activation)


# --- GF.batch_norm_act vs F.batch_norm ---------------------------------------------------------

def _bn_case(x=lambda: _randn(4, 3, 5, 5), rm=lambda: torch.rand(3), rv=lambda: torch.rand(3) + 0.5,
             w=lambda: torch.rand(3) + 0.5, b=lambda: _randn(3), training=True, momentum=0.1, eps=1e-5,
             **kwargs):
    def build():
        xx = x()
        rmm, rvv, ww, bb = (f() if f is not None else None for f in (rm, rv, w, b))
        # torch gets its own copies of the running statistics, so that genfast's stay pristine
        # for the no-write check even when torch writes before raising.
        trm, trv = (t.clone() if isinstance(t, torch.Tensor) else t for t in (rmm, rvv))
        return Case(lambda: GF.batch_norm_act(xx, rmm, rvv, ww, bb, training, momentum, eps, **kwargs),
                    lambda: F.batch_norm(xx, trm, trv, ww, bb, training, momentum, eps),
                    state=_state(xx, rmm, rvv, ww, bb))
    return build


for _training in (True, False):
    _t = "train" if _training else "eval"
    add(f"bn_eps_negative_{_t}", _bn_case(training=_training, eps=-1.0))
    add(f"bn_rm_only_{_t}", _bn_case(rv=None, training=_training))
    add(f"bn_rv_only_{_t}", _bn_case(rm=None, training=_training))
    add(f"bn_rm_c1_{_t}", _bn_case(rm=lambda: torch.rand(3, 1), training=_training))
    add(f"bn_rv_c1_{_t}", _bn_case(rv=lambda: torch.rand(3, 1) + 0.5, training=_training))
    add(f"bn_rm_size_{_t}", _bn_case(rm=lambda: torch.rand(4), training=_training))
    add(f"bn_rv_size_{_t}", _bn_case(rv=lambda: torch.rand(2) + 0.5, training=_training))
    add(f"bn_weight_size_{_t}", _bn_case(w=lambda: torch.rand(4), training=_training))
    add(f"bn_bias_size_{_t}", _bn_case(b=lambda: torch.rand(2), training=_training))
    add(f"bn_input_1d_{_t}", _bn_case(x=lambda: _randn(3), training=_training))
    add(f"bn_channels_{_t}", _bn_case(x=lambda: _randn(4, 5, 2, 2), training=_training))
    add(f"bn_zero_channels_{_t}", _bn_case(x=lambda: _randn(4, 0, 2, 2), rm=lambda: torch.rand(0),
                                           rv=lambda: torch.rand(0) + 0.5, w=lambda: torch.rand(0),
                                           b=lambda: torch.rand(0), training=_training))
    for _dt in BAD_DTYPES:
        add(f"bn_input_{_dt}_{_t}", _bn_case(x=lambda dt=_dt: _full((4, 3, 5, 5), dt), training=_training))
    add(f"bn_meta_running_mean_{_t}", _bn_case(rm=lambda: torch.rand(3, device="meta"), training=_training))
add("bn_eps_zero_train", _bn_case(eps=0.0))
add("bn_eps_zero_int_train", _bn_case(eps=0))
add("bn_none_eval", _bn_case(rm=None, rv=None, training=False))
add("bn_single_value_train", _bn_case(x=lambda: _randn(1, 3, 1, 1)))
add("bn_single_row_1d_train", _bn_case(x=lambda: _randn(1, 3)))
add("bn_single_value_3d_train", _bn_case(x=lambda: _randn(1, 3, 1)))
add("bn_single_value_no_stats_train", _bn_case(x=lambda: _randn(1, 3, 1, 1), rm=None, rv=None))
# no channels and one value per channel: torch checks the batch before the parameters
for _shape in ((1, 0), (1, 0, 1), (1, 0, 1, 1)):
    add(f"bn_zero_channels_single_value_{len(_shape)}d_train",
        _bn_case(x=lambda s=_shape: _randn(*s), rm=lambda: torch.rand(0), rv=lambda: torch.rand(0) + 0.5,
                 w=lambda: torch.rand(0), b=lambda: torch.rand(0)))
add("bn_activation_unknown", lambda: Case(lambda: GF.batch_norm_act(
    _randn(4, 3), None, None, training=True, activation="tanh"), None, ValueError))
add("bn_memory_efficient_relu", lambda: (lambda rm, rv: Case(lambda: GF.batch_norm_act(
    _randn(4, 3), rm, rv, training=True, activation="relu", memory_efficient=True), None, ValueError,
    _state(rm, rv)))(torch.zeros(3), torch.ones(3)))
add("bn_memory_efficient_zero_slope", lambda: (lambda rm, rv: Case(lambda: GF.batch_norm_act(
    _randn(4, 3), rm, rv, training=True, negative_slope=0.0, memory_efficient=True), None, ValueError,
    _state(rm, rv)))(torch.zeros(3), torch.ones(3)))


# --- gnn.BatchNormAct1d/2d vs nn.BatchNorm1d/2d (+ the activation) ------------------------------

def _align(ours, ref, training, mutate):
    """Give torch's module genfast's state, then set both modes and apply the same mutation."""
    ref.load_state_dict(ours.state_dict())
    for m in (ours, ref):
        m.train(training)
        if mutate is not None:
            mutate(m)


def _bnm_case(dim, x, ctor=(3,), kwargs=None, training=True, mutate=None, act_kwargs=None):
    kwargs, act_kwargs = kwargs or {}, act_kwargs or {}
    ours_cls = gnn.BatchNormAct2d if dim == 2 else gnn.BatchNormAct1d
    ref_cls = nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d

    def build():
        ours = ours_cls(*ctor, **kwargs, **act_kwargs)
        ref = ref_cls(*ctor, **kwargs)
        with torch.no_grad():
            for p in ours.parameters():
                p.uniform_(0.5, 1.5)
            if ours.running_mean is not None:
                ours.running_mean.uniform_(-1, 1)
                ours.running_var.uniform_(0.5, 1.5)
        _align(ours, ref, training, mutate)
        xx = x()
        return Case(lambda: ours(xx), lambda: F.leaky_relu(ref(xx)), state=_state(ours, xx))
    return build


for _training in (True, False):
    _t = "train" if _training else "eval"
    add(f"bnm2_input_3d_{_t}", _bnm_case(2, lambda: _randn(4, 3, 5), training=_training))
    add(f"bnm2_input_5d_{_t}", _bnm_case(2, lambda: _randn(4, 3, 5, 5, 1), training=_training))
    add(f"bnm2_input_2d_{_t}", _bnm_case(2, lambda: _randn(4, 3), training=_training))
    add(f"bnm1_input_4d_{_t}", _bnm_case(1, lambda: _randn(4, 3, 5, 5), training=_training))
    add(f"bnm1_input_1d_{_t}", _bnm_case(1, lambda: _randn(3), training=_training))
    add(f"bnm2_channels_{_t}", _bnm_case(2, lambda: _randn(4, 5, 2, 2), training=_training))
    add(f"bnm1_channels_{_t}", _bnm_case(1, lambda: _randn(4, 5), training=_training))
    add(f"bnm2_eps_negative_{_t}", _bnm_case(2, lambda: _randn(4, 3, 2, 2), kwargs={"eps": -1e-3},
                                             training=_training))
    add(f"bnm1_eps_negative_{_t}", _bnm_case(1, lambda: _randn(4, 3), kwargs={"eps": -1.0}, training=_training))
    add(f"bnm2_zero_features_{_t}", _bnm_case(2, lambda: _randn(4, 0, 2, 2), ctor=(0,), training=_training))
    add(f"bnm1_zero_features_{_t}", _bnm_case(1, lambda: _randn(4, 0), ctor=(0,), training=_training))
    add(f"bnm2_input_double_{_t}", _bnm_case(2, lambda: _randn(4, 3, 2, 2, dtype=torch.float64), training=_training))
    add(f"bnm2_input_list_{_t}", _bnm_case(2, lambda: [[1.0]], training=_training))
    for _dt in BAD_DTYPES:
        add(f"bnm2_input_{_dt}_{_t}", _bnm_case(2, lambda dt=_dt: _full((4, 3, 2, 2), dt), training=_training))
        add(f"bnm1_input_{_dt}_{_t}", _bnm_case(1, lambda dt=_dt: _full((4, 3), dt), training=_training))
add("bnm2_eps_zero_train", _bnm_case(2, lambda: _randn(4, 3, 2, 2), kwargs={"eps": 0.0}))
add("bnm1_eps_zero_train", _bnm_case(1, lambda: _randn(4, 3, 2), kwargs={"eps": 0.0}))
add("bnm2_eps_zero_no_stats_train", _bnm_case(2, lambda: _randn(4, 3, 2, 2),
                                              kwargs={"eps": 0.0, "track_running_stats": False}))
add("bnm2_eps_mutated_train", _bnm_case(2, lambda: _randn(4, 3, 2, 2), mutate=lambda m: setattr(m, "eps", -2.0)))
add("bnm2_single_value_train", _bnm_case(2, lambda: _randn(1, 3, 1, 1)))
add("bnm1_single_row_train", _bnm_case(1, lambda: _randn(1, 3)))
add("bnm1_single_value_3d_train", _bnm_case(1, lambda: _randn(1, 3, 1)))
add("bnm2_single_value_momentum_none_train", _bnm_case(2, lambda: _randn(1, 3, 1, 1), kwargs={"momentum": None}))
add("bnm2_running_mean_dropped_train", _bnm_case(2, lambda: _randn(4, 3, 2, 2),
                                                 mutate=lambda m: setattr(m, "running_var", None)))
add("bnm2_running_mean_dropped_eval", _bnm_case(2, lambda: _randn(4, 3, 2, 2), training=False,
                                                mutate=lambda m: setattr(m, "running_var", None)))
add("bnm2_running_mean_c1_train", _bnm_case(2, lambda: _randn(4, 3, 2, 2),
                                            mutate=lambda m: setattr(m, "running_mean", torch.zeros(3, 1))))
add("bnm2_negative_features", lambda: Case(lambda: gnn.BatchNormAct2d(-2), lambda: nn.BatchNorm2d(-2)))
add("bnm1_negative_features", lambda: Case(lambda: gnn.BatchNormAct1d(-1), lambda: nn.BatchNorm1d(-1)))
add("bnm2_float_features", lambda: Case(lambda: gnn.BatchNormAct2d(2.5), lambda: nn.BatchNorm2d(2.5)))
add("bnm2_activation_unknown", lambda: Case(lambda: gnn.BatchNormAct2d(3, activation="gelu"), None, ValueError))
add("bnm1_activation_tanh", lambda: Case(lambda: gnn.BatchNormAct1d(3, activation="tanh"), None, ValueError))
add("bnm2_memory_efficient_relu", lambda: Case(
    lambda: gnn.BatchNormAct2d(3, activation="relu", memory_efficient=True), None, ValueError))


def _bnm_mutated(attr, value, **kwargs):
    def build():
        m = gnn.BatchNormAct2d(3, **kwargs)
        setattr(m, attr, value)
        x = _randn(4, 3, 2, 2)
        return Case(lambda: m(x), None, ValueError, _state(m, x))
    return build


add("bnm2_mutated_activation", _bnm_mutated("activation", "gelu"))
add("bnm2_mutated_memory_efficient_relu", _bnm_mutated("memory_efficient", True, activation="relu"))


# --- ConvTransposeBNAct2d vs nn.Sequential(ConvTranspose2d, BatchNorm2d, act) ----------------------

def _block_case(x, training=True, ct=(4, 3, 3), kwargs=None, mutate=None, fwd_kwargs=None):
    kwargs, fwd_kwargs = kwargs or {}, fwd_kwargs or {}

    def build():
        torch.manual_seed(0)
        ours = gnn.ConvTransposeBNAct2d(*ct, **kwargs)
        ref = nn.Sequential(nn.ConvTranspose2d(*ct[:3], *ct[3:], bias=kwargs.get("bias", True)),
                            nn.BatchNorm2d(ct[1], eps=kwargs.get("eps", 1e-5)))
        with torch.no_grad():
            ours[1].running_mean.uniform_(-1, 1)
            ours[1].running_var.uniform_(0.5, 1.5)
        _align(ours, ref, training, mutate)
        xx = x()

        def ref_call():
            return F.relu(ref[1](ref[0](xx, **fwd_kwargs)))
        return Case(lambda: ours(xx, **fwd_kwargs), ref_call, state=_state(ours, xx))
    return build


for _training in (True, False):
    _t = "train" if _training else "eval"
    add(f"block_channels_{_t}", _block_case(lambda: _randn(2, 5, 3, 3), _training))
    add(f"block_input_3d_{_t}", _block_case(lambda: _randn(4, 3, 3), _training))
    add(f"block_input_5d_{_t}", _block_case(lambda: _randn(1, 2, 4, 3, 3), _training))
    add(f"block_input_int_{_t}", _block_case(lambda: _full((2, 4, 3, 3), torch.int64), _training))
    add(f"block_input_double_{_t}", _block_case(lambda: _randn(2, 4, 3, 3, dtype=torch.float64), _training))
    add(f"block_eps_negative_{_t}", _block_case(lambda: _randn(2, 4, 3, 3), _training,
                                                mutate=lambda m: setattr(m[1], "eps", -1.0)))
    add(f"block_output_size_{_t}", _block_case(lambda: _randn(2, 4, 3, 3), _training, (4, 3, 3, 2),
                                               fwd_kwargs={"output_size": [50, 50]}))
    add(f"block_output_nonpositive_{_t}", _block_case(lambda: _randn(2, 4, 1, 1), _training, (4, 3, 3, 1, 3)))
add("block_eps_zero_train", _block_case(lambda: _randn(2, 4, 3, 3), mutate=lambda m: setattr(m[1], "eps", 0.0)))
add("block_single_value_train", _block_case(lambda: _randn(1, 4, 1, 1), ct=(4, 3, 1)))
add("block_activation_unknown", lambda: Case(lambda: gnn.ConvTransposeBNAct2d(4, 3, 3, activation="gelu"),
                                             None, ValueError))
add("block_groups_not_dividing", lambda: Case(lambda: gnn.ConvTransposeBNAct2d(3, 4, 3, groups=2),
                                              lambda: nn.ConvTranspose2d(3, 4, 3, groups=2)))


def _block_mutated_activation():
    m = gnn.ConvTransposeBNAct2d(4, 3, 3)
    m.activation = "gelu"
    x = _randn(2, 4, 3, 3)
    return Case(lambda: m(x), None, ValueError, _state(m, x))


add("block_mutated_activation", _block_mutated_activation)


# --- losses: GF / GANLoss / VAELoss vs torch's formulas -----------------------------------------

def _torch_d_loss(real, fake, kind, reduction="mean"):
    if kind in ("bce", "minimax"):
        return (F.binary_cross_entropy_with_logits(real, torch.ones_like(real), reduction=reduction)
                + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake), reduction=reduction))
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    if kind == "wasserstein":
        return fake.mean() - real.mean()
    return F.mse_loss(real, torch.ones_like(real)) + F.mse_loss(fake, torch.zeros_like(fake))


def _torch_g_loss(fake, kind):
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
    if kind in ("hinge", "wasserstein"):
        return -fake.mean()
    return F.mse_loss(fake, torch.ones_like(fake))


def _gan_case(real, fake, kind, module=False):
    def build():
        r, f = real(), fake()
        ours = (lambda: gnn.GANLoss(kind).discriminator(r, f)) if module else \
            (lambda: GF.discriminator_loss(r, f, kind))
        return Case(ours, lambda: _torch_d_loss(r, f, kind), state=_state(r, f))
    return build


def _gen_case(fake, kind):
    def build():
        f = fake()
        return Case(lambda: GF.generator_loss(f, kind), lambda: _torch_g_loss(f, kind), state=_state(f))
    return build


for _kind in ("bce", "hinge", "wasserstein", "lsgan"):
    add(f"gan_{_kind}_int_logits", _gan_case(lambda: _full((4,), torch.int64), lambda: _full((4,), torch.int64), _kind))
for _kind in ("bce", "hinge", "lsgan"):  # (where torch's formula fails on the list itself)
    add(f"gan_{_kind}_list_logits", _gan_case(lambda: [1.0, 2.0], lambda: _randn(4), _kind))
for _kind in ("bce", "lsgan"):
    add(f"gen_{_kind}_list_logits", _gen_case(lambda: [1.0, 2.0], _kind))
add("gan_bce_bool_logits", _gan_case(lambda: _full((4,), torch.bool), lambda: _full((4,), torch.bool), "bce"))
add("gan_bce_complex_logits", _gan_case(lambda: _full((4,), torch.complex64), lambda: _full((4,), torch.complex64), "bce"))
add("gan_bce_module_int_logits", _gan_case(lambda: _full((4,), torch.int64), lambda: _full((4,), torch.int64), "bce", True))
add("gen_bce_int_logits", _gen_case(lambda: _full((4,), torch.int64), "bce"))
add("gen_lsgan_int_logits", _gen_case(lambda: _full((4,), torch.int64), "lsgan"))
add("gan_bce_reduction_unknown", lambda: (lambda r, f: Case(
    lambda: GF.discriminator_loss(r, f, "bce", "batchmean"),
    lambda: F.binary_cross_entropy_with_logits(r, torch.ones_like(r), reduction="batchmean"),
    state=_state(r, f)))(_randn(4), _randn(4)))
add("gan_kind_unknown", lambda: Case(lambda: GF.discriminator_loss(_randn(4), _randn(4), "wgan"), None, ValueError))
add("gen_kind_unknown", lambda: Case(lambda: GF.generator_loss(_randn(4), "nsgan"), None, ValueError))
add("ganloss_kind_unknown", lambda: Case(lambda: gnn.GANLoss("relativistic"), None, ValueError))
add("gan_hinge_real_label", lambda: Case(lambda: GF.discriminator_loss(_randn(4), _randn(4), "hinge", real_label=0.9),
                                         None, ValueError))
add("gan_dtype_mismatch", lambda: Case(lambda: GF.discriminator_loss(_randn(4), _randn(4, dtype=torch.float64)),
                                       None, RuntimeError))


def _torch_vae(recon, target, mu, logvar, recon_loss="mse"):
    if recon_loss == "mse":
        rec = F.mse_loss(recon, target, reduction="sum")
    elif recon_loss == "bce":
        rec = F.binary_cross_entropy(recon, target, reduction="sum")
    else:
        rec = F.binary_cross_entropy_with_logits(recon, target, reduction="sum")
    return rec - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def _vae_case(recon=lambda: torch.rand(4, 6), target=lambda: torch.rand(4, 6), mu=lambda: _randn(4, 2),
              logvar=lambda: _randn(4, 2), recon_loss="mse", module=False):
    def build():
        r, t, m, lv = recon(), target(), mu(), logvar()
        ours = (lambda: gnn.VAELoss(recon_loss)(r, t, m, lv)) if module else \
            (lambda: GF.vae_loss(r, t, m, lv, recon_loss=recon_loss))
        return Case(ours, lambda: _torch_vae(r, t, m, lv, recon_loss), state=_state(r, t, m, lv))
    return build


for _rl in ("mse", "bce", "bce_logits"):
    add(f"vae_{_rl}_recon_target_shape", _vae_case(target=lambda: torch.rand(4, 5), recon_loss=_rl))
    add(f"vae_{_rl}_mu_logvar_shape", _vae_case(logvar=lambda: _randn(4, 3), recon_loss=_rl))
    add(f"vae_{_rl}_int_recon", _vae_case(recon=lambda: _full((4, 6), torch.int64),
                                          target=lambda: _full((4, 6), torch.int64), recon_loss=_rl))
    add(f"vae_{_rl}_module_recon_target_shape", _vae_case(target=lambda: torch.rand(4, 5), recon_loss=_rl,
                                                          module=True))
for _rl in ("bce", "bce_logits"):  # (mse_loss promotes an integer target)
    add(f"vae_{_rl}_int_target", _vae_case(target=lambda: _full((4, 6), torch.int64), recon_loss=_rl))
add("vae_bce_recon_above_one", _vae_case(recon=lambda: torch.rand(4, 6) + 1.0, recon_loss="bce"))
add("vae_bce_recon_negative", _vae_case(recon=lambda: torch.rand(4, 6) - 1.0, recon_loss="bce"))
add("vae_bce_recon_nan", _vae_case(recon=lambda: torch.full((4, 6), math.nan), recon_loss="bce"))
add("vae_bce_module_recon_above_one", _vae_case(recon=lambda: torch.rand(4, 6) + 1.0, recon_loss="bce",
                                                module=True))
add("vae_recon_loss_unknown", lambda: Case(lambda: GF.vae_loss(torch.rand(2, 3), torch.rand(2, 3), _randn(2, 1),
                                                               _randn(2, 1), recon_loss="l1"), None, ValueError))
add("vae_reduction_unknown", lambda: Case(lambda: GF.vae_loss(torch.rand(2, 3), torch.rand(2, 3), _randn(2, 1),
                                                              _randn(2, 1), reduction="mean"), None, ValueError))
def _bce_case(logits, **kw):
    def build():
        x = _randn(4, 3) if logits else torch.rand(4, 3)
        t = torch.rand(4, 3)
        ours = (gnn.BCEWithLogitsLoss if logits else gnn.BCELoss)(**kw)
        theirs = (nn.BCEWithLogitsLoss if logits else nn.BCELoss)(**kw)
        return Case(lambda: ours(x, t), lambda: theirs(x, t), state=_state(x, t))
    return build


for _name, _kw in (("weight", dict(weight=torch.rand(5))), ("weight_rank", dict(weight=torch.rand(2, 4, 3))),
                   ("pos_weight", dict(pos_weight=torch.rand(5))),
                   ("pos_weight_rank", dict(pos_weight=torch.rand(2, 4, 3)))):
    add(f"bce_logits_{_name}_not_broadcastable", _bce_case(True, **_kw))
add("bce_weight_not_broadcastable", _bce_case(False, weight=torch.rand(5)))


def test_bce_weight_error_names_the_argument():
    x, t = torch.randn(4, 3), torch.rand(4, 3)
    for kw, what in ((dict(weight=torch.rand(5)), "weight"), (dict(pos_weight=torch.rand(2, 4, 3)), "pos_weight")):
        with pytest.raises(RuntimeError, match=f"^{what} of shape .* cannot be broadcast to the input's shape"):
            gnn.BCEWithLogitsLoss(**kw)(x, t)
    with pytest.raises(RuntimeError, match="^weight of shape"):
        gnn.BCELoss(weight=torch.rand(5))(torch.rand(4, 3), t)


add("vaeloss_recon_loss_unknown", lambda: Case(lambda: gnn.VAELoss("huber"), None, ValueError))


def _torch_reparameterize(mu, logvar):
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


def _rep_case(mu, logvar):
    def build():
        m, lv = mu(), logvar()
        return Case(lambda: GF.reparameterize(m, lv), lambda: _torch_reparameterize(m, lv), state=_state(m, lv))
    return build


add("rep_shape", _rep_case(lambda: _randn(4, 2), lambda: _randn(4, 3)))
add("rep_shape_rank", _rep_case(lambda: _randn(4, 2), lambda: _randn(3, 4, 3)))
add("rep_mu_list", _rep_case(lambda: [0.0], lambda: _randn(1)))
add("rep_logvar_list", _rep_case(lambda: _randn(1), lambda: [0.0]))
add("rep_int", _rep_case(lambda: _full((4, 2), torch.int64), lambda: _full((4, 2), torch.int64)))
add("rep_bool", _rep_case(lambda: _full((4, 2), torch.bool), lambda: _full((4, 2), torch.bool)))
add("rep_meta_mu", _rep_case(lambda: torch.randn(4, 2, device="meta"), lambda: _randn(4, 2)))


# --- genfast.convert ------------------------------------------------------------------------------

add("convert_not_a_module", lambda: Case(lambda: genfast.convert([nn.ReLU()]), None, AttributeError))
add("convert_skip_not_iterable", lambda: Case(lambda: genfast.convert(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()),
                                                                      skip=5), None, TypeError))
add("convert_none", lambda: Case(lambda: genfast.convert(None), None, AttributeError))


# --- the test ---------------------------------------------------------------------------------------

def test_table_is_large_enough():
    assert len(CASES) >= 150, len(CASES)


def _expected(case: Case) -> type:
    if case.ref is None:
        return case.expected
    try:
        case.ref()
    except Exception as e:  # torch's own answer to the same bad input
        return type(e)
    raise AssertionError("torch accepts this input: not a bad-input case")


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_raises_torch_exception_and_writes_nothing(name, backend_name):
    expected = _expected(CASES[name]())
    case = CASES[name]()
    before = [t.clone() for t in case.state]
    with backend(backend_name):
        with pytest.raises(Exception) as info:
            case.ours()
    assert type(info.value) is expected, (
        f"{name}: torch raises {expected.__name__}, genfast raised {type(info.value).__name__}: {info.value}")
    for i, (t, b) in enumerate(zip(case.state, before)):
        if t.device.type == "meta":
            continue
        assert torch.equal(t, b) or (t.is_floating_point() and torch.equal(t.isnan(), b.isnan())
                                     and torch.equal(t.nan_to_num(), b.nan_to_num())), \
            f"{name}: state tensor {i} changed although the call raised"
