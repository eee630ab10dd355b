"""The discriminator / MLP half at the edges, against torch on the same inputs (CPU, float64
where the values are compared): eval-mode BatchNorm folding on inputs torch rejects, an
activation output modified in place before the backward, empty channels, infinite and
out-of-range LeakyReLU slopes, double backward into a BatchNorm bias, bool conv arguments."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import genfast
import genfast.functional as GF
import genfast.nn as gnn

pytestmark = pytest.mark.skipif(not genfast.backend.has_cpu_ext(), reason="needs the C++ extension")


def _raised(fn):
    """The exception type fn raises, or None (and its value)."""
    try:
        return None, fn()
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return type(e), None


def _same_outcome(ref_fn, fn):
    """fn raises what ref_fn raises (the type), or returns the same values."""
    ref_exc, ref = _raised(ref_fn)
    exc, out = _raised(fn)
    assert exc is ref_exc, f"torch raised {ref_exc}, genfast {exc}"
    if ref_exc is None:
        torch.testing.assert_close(out, ref, equal_nan=True)


# --- eval-mode BatchNorm folding: what the unfused modules reject is rejected ------------------

def _blocks(act):
    return {
        "conv": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), act()), (2, 3, 8, 8)),
        "linear": (lambda: nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), act()), (6, 5)),
        "convT": (lambda: nn.Sequential(nn.ConvTranspose2d(3, 4, 4, 2, 1), nn.BatchNorm2d(4), act()),
                  (2, 3, 5, 5)),
    }


def _randomise_bn(model):
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn_like(bn.running_mean))
        bn.running_var.copy_(torch.rand_like(bn.running_var) + 0.5)
        bn.weight.copy_(torch.randn_like(bn.weight))
        bn.bias.copy_(torch.randn_like(bn.bias))
    return model


@pytest.mark.parametrize("kind", ["conv", "convT"])
def test_eval_fold_unbatched_input_raises_like_torch(kind):
    make, shape = _blocks(nn.ReLU)[kind]
    torch.manual_seed(0)
    m = _randomise_bn(make()).eval()
    g = genfast.convert(copy.deepcopy(m))
    x = torch.randn(*shape[1:])  # unbatched: the product takes it, BatchNorm2d does not
    with pytest.raises(ValueError):
        m(x)
    with pytest.raises(ValueError):
        g(x)


@pytest.mark.parametrize("kind", ["conv", "linear", "convT"])
@pytest.mark.parametrize("bn_dtype,prod_dtype", [(torch.float64, torch.float32),
                                                 (torch.float32, torch.float64)])
def test_eval_fold_mixed_dtypes_as_torch(kind, bn_dtype, prod_dtype):
    make, shape = _blocks(nn.ReLU)[kind]
    torch.manual_seed(1)
    m = _randomise_bn(make())
    m[0].to(prod_dtype)
    m[1].to(bn_dtype)
    m.eval()
    g = genfast.convert(copy.deepcopy(m))
    x = torch.randn(*shape, dtype=prod_dtype)
    ref_exc, _ = _raised(lambda: m(x))
    assert ref_exc is not None  # torch's CPU batch_norm rejects the mix: the case tests something
    _same_outcome(lambda: m(x), lambda: g(x))


# --- an activation output modified in place before the backward -------------------------------

def _inplace_then_backward(model, x):
    x = x.detach().requires_grad_()
    y = model(x)
    y += 1.0  # e.g. a residual added in place
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)).sum().backward()
    return x.grad, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("case", ["linear_pair", "conv_pair", "conv_bn_eval", "linear_bn_eval",
                                  "convT_bn_eval"])
def test_leaky_relu_output_modified_in_place(case):
    """After nn.LeakyReLU(inplace=False), torch's backward reads the activation's input, so the
    output may be modified in place: the converted model gives torch's gradients."""
    torch.manual_seed(2)
    act = lambda: nn.LeakyReLU(0.2)  # noqa: E731
    if case == "linear_pair":
        m, shape = nn.Sequential(nn.Linear(5, 6), act()), (7, 5)
    elif case == "conv_pair":
        m, shape = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), act()), (2, 3, 8, 8)
    else:
        make, shape = _blocks(act)[case.split("_")[0]]
        m = _randomise_bn(make()).eval()
    m = m.double()
    g = genfast.convert(copy.deepcopy(m))
    assert g.fusion_plan(), "the pair / block is planned as a fusion"
    x = torch.randn(*shape, dtype=torch.float64)
    rx, rp = _inplace_then_backward(m, x)
    gx, gp = _inplace_then_backward(g, x)
    torch.testing.assert_close(gx, rx)
    for a, b in zip(gp, rp):
        torch.testing.assert_close(a, b)


def test_inplace_leaky_relu_pair_keeps_torch_error():
    """nn.LeakyReLU(inplace=True) saves its output in torch too: modifying it in place before the
    backward raises in both (autograd's RuntimeError)."""
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(5, 6), nn.LeakyReLU(0.2, inplace=True)).double()
    g = genfast.convert(copy.deepcopy(m))
    x = torch.randn(4, 5, dtype=torch.float64)
    for model in (m, g):
        with pytest.raises(RuntimeError, match="inplace"):
            _inplace_then_backward(model, x)


# --- zero input channels --------------------------------------------------------------------

def test_conv2d_zero_input_channels_backward_as_torch():
    """torch's conv2d of an input with 0 channels returns an empty output (and zero weight and
    bias gradients): the fused module's backward runs instead of raising."""
    torch.manual_seed(4)
    c = gnn.Conv2d(0, 4, 3, activation="leaky_relu", negative_slope=0.2).double()
    with torch.no_grad():
        c.bias.copy_(torch.randn(4))
    x = torch.randn(2, 0, 6, 6, dtype=torch.float64, requires_grad=True)
    xr = x.detach().requires_grad_()
    w = c.weight.detach().requires_grad_()
    b = c.bias.detach().requires_grad_()
    ref = F.leaky_relu(F.conv2d(xr, w, b), 0.2)
    out = c(x)
    assert out.shape == ref.shape
    dy = torch.randn_like(ref)
    ref.backward(dy)
    out.backward(dy)
    assert x.grad.shape == xr.grad.shape == (2, 0, 6, 6)
    torch.testing.assert_close(c.weight.grad, w.grad)
    torch.testing.assert_close(c.bias.grad, b.grad)


# --- LeakyReLU slopes at the edge ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_infinite_slope_as_torch(dtype):
    torch.manual_seed(5)
    slope = float("inf")
    x = torch.randn(9, 3, dtype=dtype)
    lin = gnn.Linear(3, 4, activation="leaky_relu", negative_slope=slope, dtype=dtype)
    ref = F.leaky_relu(F.linear(x, lin.weight, lin.bias), slope)
    assert (ref > 0).any() and (ref < 0).any()
    torch.testing.assert_close(lin(x).detach(), ref.detach(), equal_nan=True)
    conv = gnn.Conv2d(2, 3, 3, activation="leaky_relu", negative_slope=slope, dtype=dtype)
    xc = torch.randn(2, 2, 6, 6, dtype=dtype)
    torch.testing.assert_close(conv(xc).detach(),
                               F.leaky_relu(F.conv2d(xc, conv.weight, conv.bias), slope).detach(),
                               equal_nan=True)
    xb = torch.randn(8, 4, dtype=dtype)
    w, b = torch.randn(4, dtype=dtype), torch.randn(4, dtype=dtype)
    out = GF.batch_norm_act(xb, None, None, w, b, True, activation="leaky_relu",
                            negative_slope=slope)
    ref = F.leaky_relu(F.batch_norm(xb, None, None, w, b, True), slope)
    torch.testing.assert_close(out, ref, equal_nan=True)


def test_slope_beyond_float32_raises_like_torch():
    torch.manual_seed(6)
    x = torch.randn(4, 3)
    lin = gnn.Linear(3, 4, activation="leaky_relu", negative_slope=1e39)
    with pytest.raises(RuntimeError):
        F.leaky_relu(F.linear(x, lin.weight, lin.bias), 1e39)
    with pytest.raises(RuntimeError, match="overflow"):
        lin(x)
    with pytest.raises(RuntimeError, match="overflow"):
        GF.conv2d(torch.randn(1, 1, 4, 4), torch.randn(2, 1, 3, 3), activation="leaky_relu",
                  negative_slope=1e39)
    # the transposed convolution too, on its C++ fast path (float32 CPU tensors) and the checked
    # one (a 0-dim tensor slope), and its module with an activation
    xt, wt = torch.randn(2, 4, 3, 3), torch.randn(4, 3, 4, 4)
    for slope in (1e39, torch.tensor(1e39, dtype=torch.float64)):
        with pytest.raises(RuntimeError, match="overflow"):
            GF.conv_transpose2d(xt, wt, None, 2, 1, activation="leaky_relu", negative_slope=slope)
    with pytest.raises(RuntimeError, match="overflow"):
        gnn.ConvTranspose2d(4, 3, 4, 2, 1, activation="leaky_relu", negative_slope=1e39)(xt)
    yt = GF.conv_transpose2d(xt.double(), wt.double(), None, 2, 1, activation="leaky_relu", negative_slope=1e39)
    torch.testing.assert_close(yt, F.leaky_relu(F.conv_transpose2d(xt.double(), wt.double(), None, 2, 1), 1e39))
    # BatchNorm + LeakyReLU: the functional, the module and the ConvT -> BN -> act block
    xb = torch.randn(8, 4, 3, 3)
    with pytest.raises(RuntimeError, match="overflow"):
        GF.batch_norm_act(xb, None, None, torch.ones(4), torch.zeros(4), True, activation="leaky_relu",
                          negative_slope=1e39)
    with pytest.raises(RuntimeError, match="overflow"):
        gnn.BatchNormAct2d(4, activation="leaky_relu", negative_slope=1e39)(xb)
    block = genfast.convert(nn.Sequential(nn.ConvTranspose2d(4, 3, 4, 2, 1), nn.BatchNorm2d(3),
                                          nn.LeakyReLU(1e39)))
    with pytest.raises(RuntimeError, match="overflow"):
        block(xt)
    # float64 holds it: no error, torch's values
    x64 = x.double()
    lin64 = lin.double()
    torch.testing.assert_close(lin64(x64).detach(),
                               F.leaky_relu(F.linear(x64, lin64.weight, lin64.bias), 1e39).detach())


# --- double backward into a BatchNorm bias ------------------------------------------------------

@pytest.mark.parametrize("act", [lambda: nn.LeakyReLU(0.2), nn.ReLU])
def test_double_backward_reaches_bn_bias_as_torch(act):
    torch.manual_seed(7)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), act()).double().train()
    g = genfast.convert(copy.deepcopy(m))
    x0 = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    grads = []
    for model in (m, g):
        x = x0.clone().requires_grad_()
        (gx,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        gx.pow(2).sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a, b)
    assert grads[0][-1] is not None  # torch's BatchNorm bias gets (zero) gradients


# --- bool conv arguments ------------------------------------------------------------------------

@pytest.mark.parametrize("arg", ["stride", "padding", "dilation"])
def test_bool_conv_argument_type_error_as_torch(arg):
    x, w = torch.randn(1, 2, 6, 6), torch.randn(3, 2, 3, 3)
    with pytest.raises(TypeError):
        F.conv2d(x, w, **{arg: True})
    with pytest.raises(TypeError):
        GF.conv2d(x, w, **{arg: True}, activation="relu")


@pytest.mark.parametrize("slope", ["0.2", None, [0.2]])
def test_non_numeric_negative_slope_raises_typeerror_naming_it(slope):
    """As torch's F.leaky_relu(x, "0.2"): TypeError naming negative_slope (it was a bare
    comparison error), from the functionals and the modules' constructors."""
    x, w = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    with pytest.raises(TypeError):
        F.leaky_relu(x, slope)
    calls = [lambda: GF.conv2d(x, w, activation="leaky_relu", negative_slope=slope),
             lambda: GF.linear(torch.randn(2, 3), torch.randn(4, 3), activation="leaky_relu",
                               negative_slope=slope),
             lambda: GF.conv_transpose2d(x, torch.randn(3, 4, 3, 3), activation="leaky_relu",
                                         negative_slope=slope),
             lambda: gnn.Conv2d(3, 4, 3, activation="leaky_relu", negative_slope=slope)]
    for call in calls:
        with pytest.raises(TypeError, match="negative_slope"):
            call()


# --- dtypes genfast has no kernel for: torch's own answer (a bad-input hunt) ----------------------

_TORCH_ACT = {None: lambda y: y, "relu": torch.relu, "leaky_relu": lambda y: F.leaky_relu(y, 0.2),
              "tanh": torch.tanh, "sigmoid": torch.sigmoid}


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
@pytest.mark.parametrize("act", [None, "relu", "leaky_relu", "tanh"])
@pytest.mark.parametrize("op", ["conv_transpose2d", "conv2d", "linear"])
def test_non_floating_dtypes_give_torchs_result_or_exception(op, act, dtype):
    """int64 and complex64 products run on the CPU in torch (its slow paths), the other integer
    types and bool raise there: genfast's functions give torch's result of activation(product)
    where torch computes one (exactly, for integers) and torch's exception type where it does
    not (genfast used to raise NotImplementedError for all of them)."""
    g = torch.Generator().manual_seed(7)

    def draw(*shape):
        v = torch.randint(-4, 5, shape, generator=g)
        return v.to(dtype) if dtype is not torch.complex64 else torch.complex(v.float(), v.flip(-1).float())

    if op == "conv_transpose2d":
        x, w, b = draw(2, 4, 5, 5), draw(4, 3, 3, 3), draw(3)
        ref = lambda: _TORCH_ACT[act](F.conv_transpose2d(x, w, b, 2, 1, 1))  # noqa: E731
        ours = lambda: GF.conv_transpose2d(x, w, b, 2, 1, 1, activation=act, negative_slope=0.2)  # noqa: E731
    elif op == "conv2d":
        x, w, b = draw(2, 4, 6, 6), draw(3, 4, 3, 3), draw(3)
        ref = lambda: _TORCH_ACT[act](F.conv2d(x, w, b, 1, "same"))  # noqa: E731
        ours = lambda: GF.conv2d(x, w, b, 1, "same", activation=act, negative_slope=0.2)  # noqa: E731
    else:
        x, w, b = draw(3, 7, 5), draw(6, 5), draw(6)
        ref = lambda: _TORCH_ACT[act](F.linear(x, w, b))  # noqa: E731
        ours = lambda: GF.linear(x, w, b, activation=act, negative_slope=0.2)  # noqa: E731
    ref_exc, expected = _raised(ref)
    exc, out = _raised(ours)
    assert exc is ref_exc, f"torch raised {ref_exc}, genfast {exc}"
    if ref_exc is None:
        assert out.dtype == expected.dtype and out.shape == expected.shape
        assert torch.equal(out, expected) if not out.is_floating_point() else torch.allclose(out, expected)
    if dtype is torch.int64 and act in (None, "relu"):
        assert ref_exc is None  # the case this test is about: torch computes it


def test_non_floating_dtype_bad_activation_is_still_valueerror():
    x, w = torch.ones(1, 2, 3, 3, dtype=torch.int64), torch.ones(2, 2, 3, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="activation"):
        GF.conv_transpose2d(x, w, activation="gelu")
    with pytest.raises(ValueError, match="activation"):
        GF.conv2d(x, w, activation="gelu")
