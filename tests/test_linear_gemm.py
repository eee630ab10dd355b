"""The CPU Linear layer's own backward GEMM (csrc/cpu/linear_gemm.cpp: grad_input dz w and
grad_weight dz^T x by an AVX2 4 x 16 register tile) and where it runs (before MKL's products in
genfast::linear_act's backward; the forward stays MKL's). Every expected value comes from
F.linear and torch's activations in float64; genfast's counter (cpu_linear_products: one per
product) shows which calls ran it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import genfast
import genfast.functional as GF
from genfast import backend as B
from genfast import models
from tests.utils import assert_close, avx2_host, has_avx512, on_threads


pytestmark = pytest.mark.skipif(not avx2_host(), reason="the linear GEMM needs genfast._C on an AVX2 + FMA CPU")

CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "tanh": 3, "sigmoid": 4}
SLOPE = 0.2
TORCH_ACT = {"identity": lambda z: z, "relu": F.relu, "leaky_relu": lambda z: F.leaky_relu(z, SLOPE),
             "tanh": torch.tanh, "sigmoid": torch.sigmoid}

# (M rows, K in_features, N out_features). Between them: the MLP discriminator's first layer,
# one of everything, rows / columns that are not multiples of the 4 x 16 tile (tails of 1-3 rows
# and 1-15 columns, in every operand's role), more rows than "auto" takes, a single output
# feature.
CASES = [
    (64, 784, 512),
    (1, 1, 1),
    (3, 5, 7),
    (4, 16, 4),
    (17, 33, 19),
    (130, 600, 21),
    (8, 17, 16),
    (64, 256, 1),
    (2, 20, 35),
]


def _inputs(case, g):
    M, K, N = case
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    b = torch.randn(N, generator=g)
    return x, w, b


def _count():
    return B.extension().cpu_linear_products()


@pytest.fixture(autouse=True)
def _linear_always():
    """This module tests the linear GEMM itself, at every shape."""
    with B.cpu_linear_gemm("always"):
        yield


def test_linear_gemm_not_in_the_forward():
    """The forward (with or without a backward to come) is MKL's product: no linear GEMM call."""
    g = torch.Generator().manual_seed(100)
    x, w, b = _inputs(CASES[0], g)
    before = _count()
    with torch.no_grad():
        y0 = torch.ops.genfast.linear_act(x, w, b, CODES["leaky_relu"], SLOPE)
    y1 = torch.ops.genfast.linear_act(x, w.clone().requires_grad_(), b, CODES["leaky_relu"], SLOPE)
    assert _count() == before
    yr = F.leaky_relu(F.linear(x.double(), w.double(), b.double()), SLOPE)
    assert_close(y0, yr, msg="no_grad output")
    assert_close(y1, yr, msg="output")


@pytest.mark.parametrize("act", list(CODES))
@pytest.mark.parametrize("ci", range(len(CASES)))
def test_linear_gemm_gradients_match_float64(ci, act):
    """Forward and backward through autograd: two products (grad_input, grad_weight), and the
    output and the three gradients match float64."""
    g = torch.Generator().manual_seed(200 + ci)
    x, w, b = _inputs(CASES[ci], g)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    before = _count()
    y = torch.ops.genfast.linear_act(xs, ws, bs, CODES[act], SLOPE)
    dy = torch.randn(y.shape, generator=g)
    got = torch.autograd.grad(y, (xs, ws, bs), dy)
    assert _count() == before + 2
    xd, wd, bd = (t.double().requires_grad_() for t in (x, w, b))
    yr = TORCH_ACT[act](F.linear(xd, wd, bd))
    want = torch.autograd.grad(yr, (xd, wd, bd), dy.double())
    assert_close(y, yr, msg="output")
    for gv, ref, name in zip(got, want, ("input", "weight", "bias")):
        assert gv.shape == ref.shape and gv.is_contiguous(), name
        assert_close(gv, ref, msg=f"grad_{name}")


def test_linear_gemm_weight_gradient_only():
    """An input that needs no gradient (a discriminator's real batch): grad_weight only, no
    grad_input product."""
    g = torch.Generator().manual_seed(3)
    x, w, b = _inputs((17, 33, 19), g)
    ws = w.clone().requires_grad_()
    before = _count()
    y = torch.ops.genfast.linear_act(x, ws, b, CODES["leaky_relu"], SLOPE)
    dy = torch.randn(y.shape, generator=g)
    (dw,) = torch.autograd.grad(y, (ws,), dy)
    assert _count() == before + 1
    wd = w.double().requires_grad_()
    (want,) = torch.autograd.grad(F.leaky_relu(F.linear(x.double(), wd, b.double()), SLOPE), (wd,), dy.double())
    assert_close(dw, want, msg="grad_weight")


def _patterns_equal(got, ref, name):
    assert torch.equal(torch.isnan(got), torch.isnan(ref)), f"{name}: NaN pattern"
    assert torch.equal(torch.isinf(got) & (got > 0), torch.isinf(ref) & (ref > 0)), f"{name}: +inf pattern"
    assert torch.equal(torch.isinf(got) & (got < 0), torch.isinf(ref) & (ref < 0)), f"{name}: -inf pattern"
    fin = torch.isfinite(ref)
    assert fin.any(), name
    assert_close(got[fin], ref[fin], msg=f"{name}: finite values")


@pytest.mark.parametrize("special", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["x", "w", "dy", "x_tail"])
def test_linear_gemm_special_values_like_float64(where, special):
    """A NaN or inf in the input, the weight or the output gradient reaches exactly the gradients
    that its direct sums reach in float64 (also from a row in the last, partial tile of rows and
    a column in the last, partial tile of columns); the output as torch's."""
    g = torch.Generator().manual_seed(4)
    M, K, N = 17, 33, 19
    x, w, b = _inputs((M, K, N), g)
    dy = torch.randn(M, N, generator=g)
    if where == "x":
        x[5, 7] = special
    elif where == "x_tail":
        x[M - 1, K - 1] = special
    elif where == "w":
        w[N - 2, 3] = special
    else:
        dy[2, N - 1] = special
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    before = _count()
    y = torch.ops.genfast.linear_act(xs, ws, bs, CODES["identity"], SLOPE)
    got = torch.autograd.grad(y, (xs, ws), dy)
    assert _count() == before + 2
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    yr = F.linear(xd, wd, b.double())
    want = torch.autograd.grad(yr, (xd, wd), dy.double())
    _patterns_equal(y.detach(), yr.detach(), "output")
    _patterns_equal(got[0], want[0], "grad_input")
    _patterns_equal(got[1], want[1], "grad_weight")


@pytest.mark.parametrize("ci", [0, 4, 5])
def test_linear_gemm_deterministic_across_thread_counts(ci):
    """Each value sums its terms in one fixed order whatever the thread count: both products'
    gradients bitwise equal on 1, 2 and 3 threads, and from call to call."""
    g = torch.Generator().manual_seed(500 + ci)
    x, w, b = _inputs(CASES[ci], g)
    dy = torch.randn(CASES[ci][0], CASES[ci][2], generator=g)

    def run():
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = torch.ops.genfast.linear_act(xs, ws, b, CODES["relu"], SLOPE)
        # dz from one forward (MKL's, whose bits may depend on the thread count): relu's mask
        return torch.autograd.grad(y, (xs, ws), dy * (y0 > 0))

    y0 = torch.ops.genfast.linear_act(x, w, b, CODES["relu"], SLOPE)
    outs = on_threads((1, 2, 3, 2), run)
    for o in outs[1:]:
        for a, ref in zip(o, outs[0]):
            assert torch.equal(a, ref)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    want = torch.autograd.grad(F.linear(xd, wd, b.double()), (xd, wd), (dy * (y0 > 0)).double())
    assert_close(outs[0][0], want[0], msg="grad_input")
    assert_close(outs[0][1], want[1], msg="grad_weight")


def test_linear_gemm_not_taken_where_it_does_not_apply():
    """float64, a non-contiguous input or weight do not take the linear GEMM (even under
    "always") and their gradients still match torch's; "never" turns it off."""
    g = torch.Generator().manual_seed(6)
    x, w, b = _inputs((17, 33, 19), g)
    wide = torch.randn(17, 66, generator=g)
    variants = {
        "float64": (x.double(), w.double(), b.double()),
        "strided x": (wide[:, ::2], w, b),
        "transposed w": (x, torch.randn(33, 19, generator=g).t(), b),
    }
    for name, (xv, wv, bv) in variants.items():
        _check_grads(xv, wv, bv, 0, name)
    with B.cpu_linear_gemm("never"):
        _check_grads(x, w, b, 0, "never")


def _check_grads(x, w, b, products, name):
    """Forward and backward of GF.linear(x, w, b, leaky_relu) ran `products` linear GEMM products;
    the gradients of x and w match float64 (to float32's tolerance)."""
    xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()  # detach keeps the strides
    before = _count()
    y = GF.linear(xs, ws, b, activation="leaky_relu", negative_slope=SLOPE)
    dy = torch.ones_like(y)
    got = torch.autograd.grad(y, (xs, ws), dy)
    assert _count() - before == products, name
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    want = torch.autograd.grad(F.leaky_relu(F.linear(xd, wd, b.double()), SLOPE), (xd, wd), dy.double())
    for gv, ref, what in zip(got, want, ("input", "weight")):
        assert_close(gv, ref, dtype=torch.float32, msg=f"{name}: grad_{what}")


@pytest.mark.parametrize("shape,threads", [((64, 784, 512), 2), ((16, 128, 128), 2), ((8, 784, 512), 2),
                                           ((256, 784, 512), 2), ((64, 784, 64), 2), ((64, 100, 256), 2),
                                           ((64, 784, 512), 1)])
def test_linear_gemm_auto_by_shape(shape, threads):
    """Under "auto" the linear GEMM takes MLP batches of 16 to 128 rows with at least 128 input
    and output features on more than one thread, on CPUs without AVX-512; not 8 or 256 rows, 64
    output or 100 input features, or one thread."""
    M, K, N = shape
    g = torch.Generator().manual_seed(7)
    x, w, b = _inputs(shape, g)
    takes = 16 <= M <= 128 and K >= 128 and N >= 128 and threads > 1 and not has_avx512()
    with B.cpu_linear_gemm("auto"):
        assert B.get_cpu_linear_gemm() == "auto"
        on_threads((threads,), lambda: _check_grads(x, w, b, 2 if takes else 0, str(shape)))


def test_linear_gemm_mode_setting():
    """set_cpu_linear_gemm takes "auto", "always" or "never" (anything else: ValueError naming
    the mode, the setting unchanged); the context manager restores the previous mode."""
    assert B.get_cpu_linear_gemm() == "always"
    with B.cpu_linear_gemm("never"):
        assert B.get_cpu_linear_gemm() == "never"
        with pytest.raises(ValueError, match="mode must be 'auto', 'always' or 'never', got 'fast'"):
            B.set_cpu_linear_gemm("fast")
        assert B.get_cpu_linear_gemm() == "never"
    assert B.get_cpu_linear_gemm() == "always"


def test_converted_mlp_discriminator_training_step():
    """A converted MLP discriminator (its Linear + LeakyReLU layers on the linear GEMM) against
    the same model in float64: logits, the loss's input gradient and every parameter gradient."""
    torch.manual_seed(8)
    ref = models.MLPDiscriminator(in_dim=60, hidden=(48, 20))
    conv = models.MLPDiscriminator(in_dim=60, hidden=(48, 20))
    conv.load_state_dict(ref.state_dict())
    genfast.convert(conv)
    ref = ref.double()
    x = torch.randn(24, 60)
    xs, xd = x.clone().requires_grad_(), x.double().requires_grad_()
    before = _count()
    out = conv(xs)
    out.square().mean().backward()
    # the two Linear + LeakyReLU pairs, two products each (the first layer's grad_input too: x
    # needs it); the last Linear, with no activation to fuse, stays torch's
    assert _count() - before == 4
    outr = ref(xd)
    outr.square().mean().backward()
    assert_close(out, outr, msg="logits")
    assert_close(xs.grad, xd.grad, msg="input gradient")
    for (name, p), (_, pr) in zip(conv.named_parameters(), ref.named_parameters()):
        assert_close(p.grad, pr.grad, msg=name)
