"""Conv2d and Linear with bias + activation (+ BatchNorm) fused around the vendor's product
(genfast/ops/conv_act.py): float64 parity with torch's unfused modules on every backend that
runs here (cpu = oneDNN post-ops / ATen; triton and cuda = ATen's CPU product + genfast's
Triton epilogue kernels under the interpreter; reference), outputs, every gradient, running
statistics and num_batches_tracked; special values, empty batches, bad input, launch budgets,
opcheck, gradcheck, compile, autocast, and convert on the seed discriminators and MLP models."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import genfast
import genfast.functional as GF
import genfast.nn as gnn
from genfast import models
from genfast.backend import use_backend
from genfast.ops import conv_act as CA
from launches import count_launches

BACKENDS = ["reference", "cpu", "triton"]
ACTS = ["identity", "relu", "leaky_relu", "tanh", "sigmoid"]
ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "tanh": 3, "sigmoid": 4}
D = torch.float64


def torch_act(name, slope=0.2):
    return {"identity": lambda t: t, "relu": F.relu, "leaky_relu": lambda t: F.leaky_relu(t, slope),
            "tanh": torch.tanh, "sigmoid": torch.sigmoid}[name]


def _grads(out, tensors, g):
    return torch.autograd.grad(out, tensors, g)


# --- standalone: GF.conv2d / GF.linear and the modules -----------------------------------------

CONV_CASES = [
    dict(n=3, cin=4, cout=6, hw=(9, 8), k=3, s=2, p=1, d=1, g=2, bias=True, cl=False),
    dict(n=2, cin=3, cout=5, hw=(7, 7), k=4, s=1, p=0, d=2, g=1, bias=False, cl=True),
    dict(n=1, cin=1, cout=3, hw=(6, 5), k=(3, 2), s=(1, 2), p=(2, 0), d=1, g=1, bias=True, cl=False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_matches_torch_float64(backend, act, case):
    x = torch.randn(case["n"], case["cin"], *case["hw"], dtype=D)
    if case["cl"]:
        x = x.contiguous(memory_format=torch.channels_last)
    k = case["k"] if isinstance(case["k"], tuple) else (case["k"], case["k"])
    w = torch.randn(case["cout"], case["cin"] // case["g"], *k, dtype=D)
    b = torch.randn(case["cout"], dtype=D) if case["bias"] else None
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    ref = torch_act(act)(F.conv2d(x, w, b, case["s"], case["p"], case["d"], case["g"]))
    with use_backend(backend):
        out = GF.conv2d(x, w, b, case["s"], case["p"], case["d"], case["g"],
                        activation=None if act == "identity" else act, negative_slope=0.2)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-11)
    if case["cl"]:
        assert out.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(ref)
    for a, r in zip(_grads(out, leaves, g), _grads(ref, leaves, g)):
        torch.testing.assert_close(a, r, atol=1e-11, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", [(7, 5), (5,), (2, 3, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch_float64(backend, act, shape, bias):
    x = torch.randn(*shape, dtype=D, requires_grad=True)
    w = torch.randn(4, 5, dtype=D, requires_grad=True)
    b = torch.randn(4, dtype=D, requires_grad=True) if bias else None
    leaves = [t for t in (x, w, b) if t is not None]
    ref = torch_act(act)(F.linear(x, w, b))
    with use_backend(backend):
        out = GF.linear(x, w, b, activation=None if act == "identity" else act, negative_slope=0.2)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-11)
    g = torch.randn_like(ref)
    for a, r in zip(_grads(out, leaves, g), _grads(ref, leaves, g)):
        torch.testing.assert_close(a, r, atol=1e-11, rtol=1e-10)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("rows", [1, 2, 63, 128, 129])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grad", [True, False])
def test_linear_rows_either_product_orientation(act, rows, dtype, grad):
    """The CPU Linear runs its product transposed (w x^T, then one pass of bias + activation
    writing y's rows in blocks of 16 features x 64 rows) for 2-128 rows, torch's addmm
    elsewhere: both sides of that bound, with and without a backward, 37 features (not a multiple
    of the block), a non-contiguous input and a transposed weight view, against float64."""
    torch.manual_seed(rows)
    base = [torch.randn(rows, 46, dtype=D) * 3, torch.randn(23, 37, dtype=D), torch.randn(37, dtype=D)]
    ref_leaves = [t.clone().requires_grad_() for t in base]
    ref = torch_act(act)(F.linear(ref_leaves[0][:, ::2], ref_leaves[1].t(), ref_leaves[2]))
    leaves = [t.to(dtype).requires_grad_(grad) for t in base]
    x, w = leaves[0][:, ::2], leaves[1].t()
    assert not x.is_contiguous() and not w.is_contiguous()
    with use_backend("cpu"):
        out = GF.linear(x, w, leaves[2], activation=None if act == "identity" else act, negative_slope=0.2)
    assert out.shape == (rows, 37) and out.is_contiguous() and out.dtype == dtype
    tol = dict(atol=1e-12, rtol=1e-11) if dtype == D else dict(atol=3e-5, rtol=3e-5)
    torch.testing.assert_close(out.double(), ref, **tol)
    assert out.requires_grad == grad
    if grad:
        g = torch.randn(rows, 37, dtype=D)
        for a, r in zip(_grads(out, leaves, g.to(dtype)), _grads(ref, ref_leaves, g)):
            torch.testing.assert_close(a.double(), r, **(tol if dtype == D else dict(atol=3e-4, rtol=3e-4)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular", "same", "same_even", "valid"])
def test_conv2d_module_padding_modes(backend, mode):
    """gnn.Conv2d takes every nn.Conv2d padding mode and string padding (asymmetric "same"
    for an even kernel) and matches nn.Conv2d + activation, state_dict included."""
    kw = dict(padding=1, padding_mode=mode) if mode in ("reflect", "replicate", "circular") else \
        dict(padding="same", kernel_size=4) if mode == "same_even" else dict(padding=mode)
    k = kw.pop("kernel_size", 3)
    ref_conv = nn.Conv2d(3, 4, k, dilation=1, dtype=D, **kw)
    ours = gnn.Conv2d(3, 4, k, dtype=D, activation="leaky_relu", negative_slope=0.1, **kw)
    ours.load_state_dict(ref_conv.state_dict())
    assert list(ours.state_dict()) == list(ref_conv.state_dict())
    x = torch.randn(2, 3, 6, 7, dtype=D)
    with use_backend(backend):
        out = ours(x)
    torch.testing.assert_close(out, F.leaky_relu(ref_conv(x), 0.1), atol=1e-12, rtol=1e-11)


def test_modules_repr_and_unbatched():
    conv = gnn.Conv2d(3, 4, 3, activation="relu")
    lin = gnn.Linear(5, 2, activation="leaky_relu", negative_slope=0.3)
    assert "activation='relu'" in repr(conv) and "negative_slope=0.3" in repr(lin)
    x = torch.randn(3, 6, 6)
    torch.testing.assert_close(conv(x), F.relu(F.conv2d(x, conv.weight, conv.bias)))
    assert conv(x).shape == (4, 4, 4)
    assert isinstance(conv, nn.Conv2d) and isinstance(lin, nn.Linear)


GW_CASES = [  # (C_in, kernel, stride, padding, dilation, bias): few input channels (our grad_weight
    # products) and one more than their bound (ATen's), odd sizes, padding past the kernel's reach
    (1, 5, 2, 2, 1, True), (3, 4, 2, 1, 1, False), (4, (3, 2), (1, 2), (2, 0), 2, True),
    (2, 1, 3, 0, 1, True), (5, 3, 2, 1, 1, True)]


@pytest.mark.parametrize("case", GW_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("need_x", [True, False])
@pytest.mark.parametrize("act", ["identity", "leaky_relu", "tanh"])
def test_conv2d_grad_weight_few_input_channels(case, dtype, need_x, act):
    """grad_weight (and grad_bias, grad_input) of the CPU Conv2d + activation against float64
    torch, for the first-layer shapes whose weight gradient runs as per-image BLAS products over
    our im2col (up to 4 input channels), with and without grad_input, batch 5 (threads with
    uneven image ranges)."""
    cin, k, s, p, d, bias = case
    torch.manual_seed(cin)
    base = [torch.randn(5, cin, 13, 11, dtype=D), torch.randn(6, cin, *((k, k) if isinstance(k, int) else k),
                                                                   dtype=D)]
    base.append(torch.randn(6, dtype=D) if bias else None)
    ref_leaves = [t.clone().requires_grad_(i > 0 or need_x) if t is not None else None for i, t in enumerate(base)]
    ref = torch_act(act)(F.conv2d(ref_leaves[0], ref_leaves[1], ref_leaves[2], s, p, d))
    leaves = [t.to(dtype).requires_grad_(i > 0 or need_x) if t is not None else None for i, t in enumerate(base)]
    with use_backend("cpu"):
        out = GF.conv2d(leaves[0], leaves[1], leaves[2], s, p, d, activation=None if act == "identity" else act,
                        negative_slope=0.2)
    g = torch.randn(ref.shape, dtype=D)
    want = [t for t in ref_leaves if t is not None and t.requires_grad]
    got = [t for t in leaves if t is not None and t.requires_grad]
    tol = dict(atol=1e-11, rtol=1e-10) if dtype == D else dict(atol=1e-4, rtol=1e-4)
    gg = g.to(dtype)
    if need_x:  # a channels_last incoming gradient as well (copied once, same values)
        gg = gg.contiguous(memory_format=torch.channels_last)
    for a, r in zip(_grads(out, got, gg), _grads(ref, want, g)):
        assert a.shape == r.shape and a.dtype == dtype
        torch.testing.assert_close(a.double(), r, **tol)


@pytest.mark.parametrize("special", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
def test_conv2d_grad_weight_special_values_like_torch(special, dtype, act):
    """A NaN or inf in a one-channel input, and one in the incoming gradient at a border position
    (whose taps reach into the padding: torch's products skip it, so 0 * inf never happens there),
    reach the weight gradient as in torch's (float64: torch's products multiply zero columns,
    and so do ours); relu gives 0 where its output is 0, whatever the incoming gradient."""
    x = torch.randn(3, 1, 9, 9, dtype=dtype)
    x[1, 0, 4, 5] = special
    w = torch.randn(4, 1, 5, 5, dtype=dtype, requires_grad=True)
    ref_w = w.detach().clone().requires_grad_()
    with use_backend("cpu"):
        out = GF.conv2d(x, w, None, 2, 2, activation=act, negative_slope=0.2)
    ref = torch_act(act)(F.conv2d(x, ref_w, None, 2, 2))
    g = torch.rand_like(ref) + 0.5
    g[2, 1, 0, 0] = special
    (a,), (r,) = _grads(out, [w], g), _grads(ref, [ref_w], g)
    assert torch.equal(a.isnan(), r.isnan()) and torch.equal(a.isinf(), r.isinf())
    fin = r.isfinite()
    torch.testing.assert_close(a[fin], r[fin], atol=1e-4, rtol=1e-4)


# (batch, C_in, H, W, kernel, stride, padding, activation): shapes where torch's float32 product
# does not skip the padding (found by a bad-input hunt), and tanh on a NaN input
_NONFINITE_DZ_CASES = [
    (1, 3, 8, 8, (3, 3), 1, 1, None),
    (1, 3, 8, 8, (3, 3), 1, 2, None),
    (16, 2, 6, 6, (1, 1), 1, 1, None),
    (16, 2, 7, 7, (3, 3), 1, 3, None),
    (4, 1, 9, 8, (2, 3), 1, 2, "sigmoid"),
    (3, 1, 9, 8, (2, 3), 2, 3, "tanh"),
]


@pytest.mark.parametrize("case", _NONFINITE_DZ_CASES)
@pytest.mark.parametrize("special", [float("nan"), float("inf")])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv2d_grad_weight_nonfinite_dz_places_nan_as_torch(case, special, channels_last):
    """Few input channels, float32, a NaN / inf reaching dz (in the incoming gradient at a border
    position, or through tanh / sigmoid of a NaN input): grad_weight has NaN / inf exactly where
    torch's has them (its product's pattern depends on the shape, so genfast takes that product
    for such a batch) and torch's values elsewhere; grad_input and grad_bias too."""
    N, C, H, W, k, s, p, act = case
    torch.manual_seed(7)
    x = torch.randn(N, C, H, W)
    w = torch.randn(5, C, *k)
    b = torch.randn(5)
    if act is not None:
        x[N - 1, 0, H // 2, W // 2] = float("nan")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref_act = {None: lambda z: z, "tanh": torch.tanh, "sigmoid": torch.sigmoid}[act]
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    with use_backend("cpu"):
        out = GF.conv2d(xs, ws, bs, s, p, activation=act)
    ref = ref_act(F.conv2d(xr, wr, br, s, p))
    g = torch.rand_like(ref) + 0.5
    g[0, 0, 0, 0] = special
    got = torch.autograd.grad(out, (xs, ws, bs), g)
    want = torch.autograd.grad(ref, (xr, wr, br), g)
    for name, a, r in zip(("grad_input", "grad_weight", "grad_bias"), got, want):
        assert torch.equal(a.isnan(), r.isnan()), name
        assert torch.equal(a.isposinf(), r.isposinf()) and torch.equal(a.isneginf(), r.isneginf()), name
        fin = r.isfinite()
        torch.testing.assert_close(a[fin], r[fin], atol=1e-4, rtol=1e-4, msg=name)
    assert got[1].isnan().any()  # the case reaches the non-finite path


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("special", [float("nan"), float("inf"), -float("inf")])
def test_special_values_like_torch(backend, act, special):
    """NaN and +-inf give torch's pattern in float32 (oneDNN post-ops only where they agree)."""
    x = torch.randn(2, 3, 6, 6)
    x[0, 1, 2, 3] = special
    w, b = torch.randn(4, 3, 3, 3), torch.randn(4)
    xl = torch.randn(4, 6)
    xl[1, 2] = special
    wl, bl = torch.randn(3, 6), torch.randn(3)
    name = None if act == "identity" else act
    with use_backend(backend):
        outs = [GF.conv2d(x, w, b, activation=name, negative_slope=0.2),
                GF.linear(xl, wl, bl, activation=name, negative_slope=0.2)]
    refs = [torch_act(act)(F.conv2d(x, w, b)), torch_act(act)(F.linear(xl, wl, bl))]
    for y, r in zip(outs, refs):
        assert torch.equal(y.isnan(), r.isnan()) and torch.equal(y.isposinf(), r.isposinf())
        assert torch.equal(y.isneginf(), r.isneginf())
        fin = r.isfinite()
        torch.testing.assert_close(y[fin], r[fin], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.randn(0, 3, 5, 5, dtype=D, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=D, requires_grad=True)
    b = torch.randn(4, dtype=D, requires_grad=True)
    xl = torch.randn(0, 5, dtype=D, requires_grad=True)
    wl = torch.randn(2, 5, dtype=D, requires_grad=True)
    with use_backend(backend):
        y = GF.conv2d(x, w, b, activation="relu")
        yl = GF.linear(xl, wl, None, activation="tanh")
    assert y.shape == (0, 4, 3, 3) and yl.shape == (0, 2)
    (y.sum() + yl.sum()).backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
    assert torch.equal(wl.grad, torch.zeros_like(wl)) and x.grad.shape == x.shape


def test_gradcheck_and_gradgradcheck():
    """float64 gradcheck of the fused op on the cpu and cuda (interpreted) paths, and
    gradgradcheck through the create_graph (reference) backward."""
    x = torch.randn(2, 2, 5, 5, dtype=D, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=D, requires_grad=True)
    b = torch.randn(3, dtype=D, requires_grad=True)
    xl = torch.randn(3, 4, dtype=D, requires_grad=True)
    wl = torch.randn(2, 4, dtype=D, requires_grad=True)
    for be in ("cpu", "cuda"):
        fc = lambda x, w, b: CA.product_act_op(x, w, b, "conv2d", [2, 1], [1, 0], [1, 1], 1, 3, 0.0, be)  # noqa: E731
        fl = lambda x, w: CA.product_act_op(x, w, None, "linear", [1, 1], [0, 0], [1, 1], 1, 4, 0.0, be)  # noqa: E731
        assert torch.autograd.gradcheck(fc, (x, w, b))
        assert torch.autograd.gradcheck(fl, (xl, wl))
        assert torch.autograd.gradgradcheck(fc, (x, w, b))


def test_opcheck():
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    xl = torch.randn(5, 3, requires_grad=True)
    wl = torch.randn(4, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.genfast.product_act.default,
                          (x, w, b, "conv2d", [2, 2], [1, 1], [1, 1], 1, 2, 0.2, "cpu"))
    torch.library.opcheck(torch.ops.genfast.product_act.default,
                          (xl, wl, None, "linear", [1, 1], [0, 0], [1, 1], 1, 1, 0.0, "cpu"))
    torch.library.opcheck(torch.ops.genfast.product_stats.default,
                          (x.detach(), w.detach(), "conv2d", [1, 1], [0, 0], [1, 1], 1, "cuda"))
    torch.library.opcheck(torch.ops.genfast.product_stats.default,
                          (xl.detach(), wl.detach(), "linear", [1, 1], [0, 0], [1, 1], 1, "cpu"))


# --- bad input -------------------------------------------------------------------------------

BAD = [
    (lambda: GF.conv2d(torch.randn(2, 3, 5, 5), torch.randn(4, 2, 3, 3)),
     lambda: F.conv2d(torch.randn(2, 3, 5, 5), torch.randn(4, 2, 3, 3)), RuntimeError),
    (lambda: GF.conv2d(torch.randn(1, 2, 2, 5, 5), torch.randn(4, 2, 3, 3)),
     lambda: F.conv2d(torch.randn(1, 2, 2, 5, 5), torch.randn(4, 2, 3, 3)), RuntimeError),
    (lambda: GF.conv2d(torch.randn(5, 5), torch.randn(4, 2, 3, 3)),
     lambda: F.conv2d(torch.randn(5, 5), torch.randn(4, 2, 3, 3)), RuntimeError),
    (lambda: GF.conv2d(torch.randn(1, 3, 2, 2), torch.randn(4, 3, 3, 3)),
     lambda: F.conv2d(torch.randn(1, 3, 2, 2), torch.randn(4, 3, 3, 3)), RuntimeError),
    (lambda: GF.conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(3)),
     lambda: F.conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(3)), RuntimeError),
    (lambda: GF.conv2d(torch.randn(1, 4, 5, 5), torch.randn(3, 2, 3, 3), groups=2),
     lambda: F.conv2d(torch.randn(1, 4, 5, 5), torch.randn(3, 2, 3, 3), groups=2), RuntimeError),
    (lambda: GF.conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), stride=0),
     lambda: F.conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), stride=0), RuntimeError),
    (lambda: GF.conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), padding=-1),
     lambda: F.conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), padding=-1), RuntimeError),
    (lambda: GF.conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), stride=2, padding="same"),
     lambda: F.conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), stride=2, padding="same"),
     RuntimeError),
    (lambda: GF.conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), padding="full"),
     lambda: F.conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), padding="full"), RuntimeError),
    (lambda: GF.conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3, dtype=D)),
     lambda: F.conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3, dtype=D)), RuntimeError),
    (lambda: GF.conv2d("x", torch.randn(4, 3, 3, 3)),
     lambda: F.conv2d("x", torch.randn(4, 3, 3, 3)), TypeError),
    (lambda: GF.linear(torch.randn(4, 5), torch.randn(3, 4)),
     lambda: F.linear(torch.randn(4, 5), torch.randn(3, 4)), RuntimeError),
    (lambda: GF.linear(torch.randn(()), torch.randn(3, 4)),
     lambda: F.linear(torch.randn(()), torch.randn(3, 4)), RuntimeError),
    (lambda: GF.linear(torch.randn(4, 5), torch.randn(3, 5), torch.randn(4)),
     lambda: F.linear(torch.randn(4, 5), torch.randn(3, 5), torch.randn(4)), RuntimeError),
    (lambda: GF.linear(torch.randn(4, 5), torch.randn(3, 5, dtype=D)),
     lambda: F.linear(torch.randn(4, 5), torch.randn(3, 5, dtype=D)), RuntimeError),
    (lambda: gnn.Linear(4, 3, activation="gelu"), lambda: (_ for _ in ()).throw(ValueError()), ValueError),
    (lambda: gnn.Conv2d(4, 3, 3, activation="leaky_relu", negative_slope=-1.0),
     lambda: (_ for _ in ()).throw(ValueError()), ValueError),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_input_raises_torch_exception_type(backend, i):
    ours, theirs, exc = BAD[i]
    with pytest.raises(exc):
        theirs()
    with use_backend(backend), pytest.raises(exc):
        ours()


# --- the BatchNorm block through convert ------------------------------------------------------

def _conv_block(act_mod, bias=False, momentum=0.1, track=True):
    seq = nn.Sequential(nn.Conv2d(4, 6, 4, 2, 1, bias=bias), nn.BatchNorm2d(6, momentum=momentum,
                        track_running_stats=track), act_mod).to(D)
    return _randomise(seq)


def _linear_block(act_mod, bias=True, momentum=0.1, track=True):
    seq = nn.Sequential(nn.Linear(5, 70, bias=bias), nn.BatchNorm1d(70, momentum=momentum,
                        track_running_stats=track), act_mod).to(D)
    return _randomise(seq)


def _randomise(seq):
    bn = seq[1]
    with torch.no_grad():
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        if bn.track_running_stats:
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return seq


def _converted(seq):
    twin = copy.deepcopy(seq)
    genfast.convert(twin)
    assert isinstance(twin, gnn.FusedSequential) and len(twin.active_fusions()) == 1, twin
    return twin


def _check_step(seq, twin, x, backend, train=True, steps=1):
    seq.train(train)
    twin.train(train)
    for _ in range(steps):
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref = seq(x1)
        with use_backend(backend):
            out = twin(x2)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
        g = torch.randn_like(ref)
        ref.backward(g)
        with use_backend(backend):
            out.backward(g)
        torch.testing.assert_close(x2.grad, x1.grad, atol=1e-9, rtol=1e-8)
    for (n, p1), p2 in zip(seq.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, atol=1e-9, rtol=1e-8, msg=n)
    for k, v in seq.state_dict().items():
        torch.testing.assert_close(twin.state_dict()[k], v, atol=1e-12, rtol=1e-12, msg=k)


BLOCKS = {
    "conv_relu": lambda **kw: _conv_block(nn.ReLU(), **kw),
    "conv_leaky_bias": lambda **kw: _conv_block(nn.LeakyReLU(0.2), bias=True, **kw),
    "linear_leaky": lambda **kw: _linear_block(nn.LeakyReLU(0.2, inplace=True), **kw),
    "linear_relu_nobias": lambda **kw: _linear_block(nn.ReLU(), bias=False, **kw),
}


def _input(name, n=3):
    return torch.randn(n, 4, 6, 5, dtype=D) if name.startswith("conv") else torch.randn(n, 5, dtype=D)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_train_matches_torch(backend, name):
    seq = BLOCKS[name]()
    _check_step(seq, _converted(seq), _input(name), backend, steps=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_eval_folds_like_torch(backend, name):
    seq = BLOCKS[name]()
    _check_step(seq, _converted(seq), _input(name), backend, train=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum,track", [(None, True), (0.1, False)])
def test_block_cumulative_momentum_and_no_running_stats(backend, momentum, track):
    for name in ("conv_leaky_bias", "linear_leaky"):
        seq = BLOCKS[name](momentum=momentum, track=track)
        _check_step(seq, _converted(seq), _input(name), backend, steps=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_channels_last(backend):
    seq = BLOCKS["conv_leaky_bias"]()
    twin = _converted(seq)
    x = _input("conv_leaky_bias").contiguous(memory_format=torch.channels_last)
    _check_step(seq, twin, x, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_empty_batch_leaves_running_stats(backend, name):
    seq = BLOCKS[name]()
    twin = _converted(seq)
    rm = twin[1].running_mean.clone()
    x = _input(name, n=0)
    with use_backend(backend):
        out = twin(x)
    assert out.shape == seq(x).shape
    assert torch.equal(twin[1].running_mean, rm) and torch.equal(seq[1].running_mean, rm)
    assert int(twin[1].num_batches_tracked) == int(seq[1].num_batches_tracked) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("special", [float("nan"), float("inf"), -float("inf")])
def test_block_special_values_like_torch(backend, special):
    for name in ("conv_leaky_bias", "linear_leaky"):
        seq = BLOCKS[name]()
        twin = _converted(seq)
        x = _input(name)
        x.view(-1)[7] = special
        ref = seq(x)
        with use_backend(backend):
            out = twin(x)
        assert torch.equal(out.isnan(), ref.isnan()), name
        fin = ref.isfinite()
        torch.testing.assert_close(out[fin], ref[fin])
        torch.testing.assert_close(twin[1].running_mean, seq[1].running_mean, equal_nan=True)
        torch.testing.assert_close(twin[1].running_var, seq[1].running_var, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_bad_input_changes_nothing(backend):
    """Bad input to a fused block raises torch's exception type and leaves every buffer as it
    was (the checks run before the finalize writes)."""
    cases = [("conv_relu", torch.randn(3, 5, 6, 5, dtype=D), RuntimeError),   # channels
             ("conv_relu", torch.randn(4, 6, 5, dtype=D), ValueError),         # 3-D into BN2d
             ("conv_relu", torch.randn(1, 4, 2, 2, dtype=D), ValueError),      # one value per channel
             ("linear_leaky", torch.randn(3, 6, dtype=D), RuntimeError),       # features
             ("linear_leaky", torch.randn(1, 5, dtype=D), ValueError)]         # one value per channel
    for name, x, exc in cases:
        seq = BLOCKS[name]()
        twin = _converted(seq)
        with pytest.raises(exc):
            seq(x)
        before = {k: v.clone() for k, v in twin.state_dict().items()}
        with use_backend(backend), pytest.raises(exc):
            twin(x)
        for k, v in twin.state_dict().items():
            assert torch.equal(v, before[k]), (name, k)


def test_linear_block_on_3d_input_runs_like_torch():
    """Linear on (N, L, in) followed by BatchNorm1d(L): BatchNorm normalises dim 1 (L), as in
    torch; the fusion must not normalise the features instead."""
    seq = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(3), nn.ReLU()).to(D)
    twin = copy.deepcopy(seq)
    genfast.convert(twin)
    x = torch.randn(2, 3, 5, dtype=D)
    torch.testing.assert_close(twin(x), seq(x))
    torch.testing.assert_close(twin[1].running_mean, seq[1].running_mean)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_block_compiles_fullgraph(backend):
    torch._dynamo.reset()
    seq = BLOCKS["linear_leaky"]()
    twin = _converted(seq)
    x = _input("linear_leaky")
    with use_backend(backend):
        compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
        out = compiled(x)
    torch.testing.assert_close(out, seq(x))
    for k, v in seq.state_dict().items():
        torch.testing.assert_close(twin.state_dict()[k], v, msg=k)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_autocast_like_torch(backend):
    """Under torch.autocast the products run in the autocast dtype, as nn.Conv2d / nn.Linear
    do, alone and in a fused block."""
    conv = gnn.Conv2d(3, 4, 3, activation="relu")
    lin = gnn.Linear(6, 4, activation="tanh")
    seq = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU())
    twin = _converted(seq)
    x, xl = torch.randn(2, 3, 5, 5), torch.randn(4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16), use_backend(backend):
        assert conv(x).dtype == F.conv2d(x, conv.weight).dtype == torch.bfloat16
        assert lin(xl).dtype == torch.bfloat16
        assert twin(xl).dtype == seq(xl).dtype
        # a bfloat16 input with the float32 weights (the output of a layer before): autocast
        # casts the weights first (the checks ran before the cast and raised on "reference")
        for m, xi, want in ((conv, x, lambda z: F.relu(F.conv2d(z, conv.weight, conv.bias))),
                            (lin, xl, lambda z: torch.tanh(F.linear(z, lin.weight, lin.bias)))):
            got, ref_out = m(xi.bfloat16()), want(xi.bfloat16())
            assert got.dtype == ref_out.dtype == torch.bfloat16
            torch.testing.assert_close(got, ref_out, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend,dtype,act", [("cpu", torch.bfloat16, "tanh"), ("cpu", torch.bfloat16, "relu"),
                                               ("triton", torch.float16, "tanh")])
def test_stacked_training_blocks_under_autocast(backend, dtype, act):
    """Training under torch.autocast("cpu", bfloat16 or float16; float16 for Triton, whose
    interpreter's bfloat16 products are wrong, DESIGN.md): each fused block takes the 16-bit
    output of the block before it with float32 weights, which autocast casts first as it does for
    torch's own modules (the blocks' argument checks ran on the uncast weight and raised
    RuntimeError: ConvTransposeBNAct2d with tanh on the CPU, every training block on Triton).
    Two ConvTransposeBNAct2d, then a converted Conv2d -> BatchNorm2d -> LeakyReLU and Linear ->
    BatchNorm1d -> ReLU; output dtype as torch's, values and every parameter's float32 gradient
    within twice torch's own error against float64 (plus one 16-bit rounding of the largest
    value)."""
    from utils import assert_error_not_worse

    A = {"tanh": nn.Tanh, "relu": nn.ReLU}[act]
    torch.manual_seed(0)
    twin = nn.Sequential(gnn.ConvTransposeBNAct2d(4, 6, 4, 2, 1, activation=act),
                         gnn.ConvTransposeBNAct2d(6, 5, 4, 2, 1, activation=act),
                         genfast.convert(nn.Sequential(
                             nn.Conv2d(5, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.LeakyReLU(0.2),
                             nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.BatchNorm1d(8), nn.ReLU())))
    assert len(twin[2].fusion_plan()) == 2
    ref = nn.Sequential(nn.Sequential(nn.ConvTranspose2d(4, 6, 4, 2, 1), nn.BatchNorm2d(6), A()),
                        nn.Sequential(nn.ConvTranspose2d(6, 5, 4, 2, 1), nn.BatchNorm2d(5), A()),
                        nn.Sequential(nn.Conv2d(5, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.LeakyReLU(0.2),
                                      nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.BatchNorm1d(8),
                                      nn.ReLU()))
    ref.load_state_dict(twin.state_dict())
    exact = copy.deepcopy(ref).double()
    x = torch.randn(16, 4, 2, 2)  # 16 values per channel in the BatchNorm1d: a well-conditioned backward
    g = torch.randn(16, 8)
    outs = {}
    for name, model in (("torch", ref), ("genfast", twin)):
        with torch.autocast("cpu", dtype=dtype), use_backend(backend if name == "genfast" else "auto"):
            out = model(x.to(dtype))
        out.backward(g.to(out.dtype))
        outs[name] = (out, [p.grad for p in model.parameters()])
    out_e = exact(x.double())
    out_e.backward(g.double())
    ulp = torch.finfo(dtype).eps / 2
    assert outs["genfast"][0].dtype == outs["torch"][0].dtype == dtype
    assert_error_not_worse(outs["genfast"][0], outs["torch"][0], out_e,
                           floor=ulp * out_e.abs().max().item(), msg="output")
    # (the products' biases ahead of a BatchNorm have an exact gradient of 0, computed as a sum of
    # terms of the other gradients' size: the floor is one rounding of the largest gradient)
    floor = ulp * max(p.grad.abs().max().item() for p in exact.parameters())
    for i, (pg, pt, pe) in enumerate(zip(outs["genfast"][1], outs["torch"][1], exact.parameters())):
        assert pg is not None and pg.dtype == torch.float32, i
        assert_error_not_worse(pg, pt, pe.grad, floor=floor, msg=f"grad {i}")


@pytest.mark.parametrize("backend,dtype", [("reference", torch.bfloat16), ("cpu", torch.bfloat16),
                                           ("triton", torch.float16)])
def test_folded_eval_blocks_take_a_16bit_input_under_autocast(backend, dtype):
    """Eval blocks (Conv2d / Linear with the BatchNorm folded into the product) under autocast
    with a 16-bit input (the output of a layer before) and the float32 folded weight: autocast
    casts the weight first (the functional conv2d / linear checked the uncast weight and raised
    on the reference and Triton backends). Output as torch's within twice its own error."""
    from utils import assert_error_not_worse

    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.LeakyReLU(0.2), nn.Flatten(),
                        nn.Linear(16, 6), nn.BatchNorm1d(6), nn.ReLU())
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    twin = genfast.convert(copy.deepcopy(ref)).eval()
    ref.eval()
    assert len(twin.fusion_plan()) == 2
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        want = ref(x.to(dtype))
        with use_backend(backend):
            got = twin(x.to(dtype))
        exact = copy.deepcopy(ref).double()(x.double())
    assert got.dtype == want.dtype == dtype
    assert_error_not_worse(got, want, exact, floor=torch.finfo(dtype).eps / 2 * exact.abs().max().item())


# --- launch budgets (cuda path on CPU tensors; Triton under the interpreter) -----------------

def test_standalone_launches():
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    xl = torch.randn(2, 108, requires_grad=True)
    wl, bl = torch.randn(5, 108, requires_grad=True), torch.randn(5, requires_grad=True)
    for kind, (xi, wi, bi) in (("conv2d", (x, w, b)), ("linear", (xl, wl, bl))):
        with count_launches() as fwd:
            y = CA.product_act_op(xi, wi, bi, kind, [1, 1], [0, 0], [1, 1], 1, 2, 0.2, "cuda")
        g = torch.randn_like(y)
        with count_launches() as bwd:
            y.backward(g)
        assert len(fwd.products) == 1 and fwd.triton == ["_epilogue_kernel"] and not fwd.ops, str(fwd)
        assert bwd.triton == ["_prologue_kernel", "_row_sum_kernel"] and not bwd.ops, str(bwd)
        assert len(bwd.products) == (1 if kind == "conv2d" else 2), str(bwd)


@pytest.mark.parametrize("name", ["conv_leaky_bias", "linear_leaky"])
def test_block_launch_budget(name):
    """Training forward = product + 3 launches (stats, finalize with the running statistics and
    num_batches_tracked, apply); backward = 3 launches + the products."""
    seq = BLOCKS[name]().float()
    twin = _converted(seq)
    x = _input(name).float().requires_grad_()
    with use_backend("triton"):
        with count_launches() as fwd:
            out = twin(x)
        g = torch.randn_like(out)
        with count_launches() as bwd:
            out.backward(g)
    assert len(fwd.products) == 1 and not fwd.ops, str(fwd)
    assert fwd.triton == ["_stats_kernel", "_finalize_kernel", "_apply_kernel"], str(fwd)
    assert bwd.triton == ["_bn_bwd_reduce_kernel", "_bn_bwd_finalize_kernel", "_bn_bwd_dx_kernel"], str(bwd)
    assert not bwd.ops, str(bwd)


# --- convert on the seed discriminators and MLP models ----------------------------------------

SEEDS = {
    "dcgan_D": (lambda: models.DCGANDiscriminator(ndf=8), lambda: torch.randn(4, 3, 64, 64, dtype=D), 3, 1),
    "keras_D": (lambda: models.KerasDCGANDiscriminator(), lambda: torch.randn(4, 1, 28, 28, dtype=D), 1, 1),
    "mlp_G": (lambda: models.MLPGenerator(nz=16, out_dim=20, hidden=(24, 32)), lambda: torch.randn(6, 16, dtype=D), 2, 1),
    "mlp_D": (lambda: models.MLPDiscriminator(in_dim=20, hidden=(16, 8)), lambda: torch.randn(6, 20, dtype=D), 0, 2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SEEDS))
def test_convert_seed_models(backend, name):
    """convert fuses every Conv2d/Linear -> BatchNorm -> act triple and Conv2d/Linear -> act
    pair of the seed discriminators and MLP models; the converted model keeps its state_dict
    keys and matches the original in float64 (outputs, gradients, running statistics) for two
    training steps and in eval."""
    make, data, triples, pairs = SEEDS[name]
    torch.manual_seed(0)
    model = make().to(D)
    twin = copy.deepcopy(model)
    _, report = genfast.convert(twin, return_report=True)
    assert list(twin.state_dict()) == list(model.state_dict())
    fused = twin.main.active_fusions()
    assert sum(s.kind == "conv_bn_act" for s in fused) == triples, report
    assert sum(s.kind == "conv_act" for s in fused) == pairs, report
    for train in (True, True, False):
        model.train(train)
        twin.train(train)
        x = data()
        ref = model(x)
        with use_backend(backend):
            out = twin(x)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
        if train:
            ref.sum().backward()
            with use_backend(backend):
                out.sum().backward()
    for (n, p1), p2 in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, atol=1e-9, rtol=1e-8, msg=n)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(twin.state_dict()[k], v, atol=1e-12, rtol=1e-12, msg=k)


def test_fusion_stands_down_when_a_child_is_hooked_or_replaced():
    seq = BLOCKS["linear_leaky"]()
    twin = _converted(seq)
    seen = []
    h = twin[1].register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    x = _input("linear_leaky")
    out = twin(x)
    assert len(seen) == 1 and not twin.active_fusions()
    torch.testing.assert_close(seen[0], seq[1](seq[0](x)))
    torch.testing.assert_close(out, seq[2](seen[0]))
    h.remove()
    assert len(twin.active_fusions()) == 1
    twin[2] = nn.Tanh()
    assert not twin.active_fusions()
    torch.testing.assert_close(twin(x), torch.tanh(seq[1](seq[0](x))))


# --- GPU (run by benchmarks/gpu_suite.sh) ------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("name", ["conv_leaky_bias", "linear_leaky"])
def test_gpu_block_matches_torch_and_launches_no_aten_elementwise(cuda_device, name):
    """On the GPU the converted block matches torch in float64 (outputs, gradients, running
    statistics), and in float32 it launches the vendor's product kernels plus exactly our three
    Triton kernels forward and three backward; no ATen elementwise or reduction kernel."""
    from torch.profiler import ProfilerActivity, profile

    seq = BLOCKS[name]().to(cuda_device)
    _check_step(seq, _converted(seq), _input(name).to(cuda_device), "auto", steps=2)
    seq = BLOCKS[name]().float().to(cuda_device)
    twin = _converted(seq)
    x = _input(name, n=16).float().to(cuda_device).requires_grad_()
    twin(x).sum().backward()  # warm-up (compiles)
    torch.cuda.synchronize()

    def kernels(fn):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out = fn()
            torch.cuda.synchronize()
        return out, [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]

    out, fwd = kernels(lambda: twin(x))
    g = torch.randn_like(out)
    _, bwd = kernels(lambda: out.backward(g))
    ours_f = [n for n in fwd if n in ("_stats_kernel", "_finalize_kernel", "_apply_kernel")]
    ours_b = [n for n in bwd if n.startswith("_bn_bwd_")]
    assert len(ours_f) == 3 and len(ours_b) == 3, (fwd, bwd)
    for n in fwd + bwd:
        assert "elementwise" not in n and "reduce_kernel" not in n, (fwd, bwd)


@pytest.mark.parametrize("be", BACKENDS + [None])  # None: the eager path (C++ entry)
@pytest.mark.parametrize("xcl, wcl", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv2d_output_layout_follows_torch(be, xcl, wcl, dtype):
    """A Conv2d of a model made channels_last, fed a contiguous batch, gives a channels_last
    output in torch (the input or the weight suggesting channels_last is enough): the fused
    Conv2d + activation and its fake as torch, on every path."""
    torch.manual_seed(5)
    x = torch.randn(2, 4, 6, 6, dtype=dtype)
    w = torch.randn(5, 4, 3, 3, dtype=dtype)
    b = torch.randn(5, dtype=dtype)
    if xcl:
        x = x.to(memory_format=torch.channels_last)
    if wcl:
        w = w.to(memory_format=torch.channels_last)
    want = F.leaky_relu(F.conv2d(x.double(), w.double(), b.double(), 1, 1), 0.2)
    if be is None:
        y = GF.conv2d(x, w, b, 1, 1, activation="leaky_relu", negative_slope=0.2)
    else:
        with use_backend(be):
            y = GF.conv2d(x, w, b, 1, 1, activation="leaky_relu", negative_slope=0.2)
    assert y.stride() == F.conv2d(x, w, b, 1, 1).stride()
    torch.testing.assert_close(y.double(), want, atol=1e-4 if dtype == torch.float32 else 1e-10,
                               rtol=1e-4 if dtype == torch.float32 else 1e-9)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx, fw, fb = mode.from_tensor(x), mode.from_tensor(w), mode.from_tensor(b)
        ops = torch.ops.genfast
        fy = ops.product_act(fx, fw, fb, "conv2d", [1, 1], [1, 1], [1, 1], 1, 2, 0.2, be or "cpu")
    assert fy.stride() == y.stride()


@pytest.mark.parametrize("padding", ["same", 1])
def test_one_channel_activation_strides_like_torch(padding):
    """A one-channel Conv2d + activation with a channels_last weight (the layouts coincide):
    torch's out-of-place activation gives contiguous strides, on the C++ path and on the Python
    fallback (string padding) alike; and the registered backward's grad_input has the strides
    its fake promises."""
    torch.manual_seed(6)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    w = torch.randn(1, 4, 3, 3, dtype=torch.float64).to(memory_format=torch.channels_last)
    b = torch.randn(1, dtype=torch.float64)
    want = F.leaky_relu(F.conv2d(x, w, b, 1, padding), 0.2)
    y = GF.conv2d(x, w, b, 1, padding, activation="leaky_relu", negative_slope=0.2)
    assert y.stride() == want.stride()
    torch.testing.assert_close(y, want)


def test_product_backward_grad_strides_match_the_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(6)
    x = torch.randn(3, 4, 1, 1, dtype=torch.float64).to(memory_format=torch.channels_last)
    w = torch.randn(5, 4, 1, 1, dtype=torch.float64)
    ops = torch.ops.genfast
    y = ops.product_act(x, w, None, "conv2d", [1, 1], [0, 0], [1, 1], 1, 2, 0.2, "cpu")
    dy = torch.randn_like(y)
    args = ("conv2d", [1, 1], [0, 0], [1, 1], 1, 2, 0.2, True, True, False, "cpu")
    dx, dw, _ = ops.product_act_backward(dy, x, w, y, *args)
    with FakeTensorMode() as mode:
        f = [mode.from_tensor(t) for t in (dy, x, w, y)]
        fdx, fdw, _ = ops.product_act_backward(*f, *args)
    assert (dx.stride(), dw.stride()) == (fdx.stride(), fdw.stride())
