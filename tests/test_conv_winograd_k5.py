"""The CPU k5 s2 p2 layers (the Keras-style 28x28 models' transposed convolutions and Conv2d) by
Winograd's F(4x4, 3x3) (csrc/cpu/conv_transpose_winograd.cpp): values and gradients against
torch in float64, where "auto" takes it, the fallback on non-finite values and outliers, and the
geometries that never take it. genfast._C.cpu_winograd_products() counts the Winograd products
returned: the evidence that a call took (or did not take) the path.

F(4x4, 3x3) rounds more than the direct product: its error against float64 measured 10-14x the
direct float32 product's (F(4x4, 2x2), the k4 layers': about 4x), so its values are held to
WINO_SCALE times float32's test tolerance, and to 16x the direct product's error."""
from __future__ import annotations

import copy
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import genfast
import genfast.functional as GF
from genfast import backend as B
from tests.utils import assert_close, check_winograd_conv2d, plant_non_finite

pytestmark = pytest.mark.skipif(not B.has_cpu_ext(), reason="genfast._C not built")

SLOPE = 0.3
WINO_SCALE = 4.0  # float32's test tolerance scaled for F(4x4, 3x3)'s rounding (see above)
ACT = {"identity": lambda z: z, "leaky_relu": lambda z: F.leaky_relu(z, SLOPE), "tanh": torch.tanh}


def products() -> int:
    return int(B.extension().cpu_winograd_products())


def gen(*key) -> torch.Generator:
    """A generator seeded from key, fixed across processes (hash() of a string is not)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()) % 100_000)


def convt_inputs(N, ci, co, H, W, g):
    x = torch.randn(N, ci, H, W, generator=g)
    w = torch.randn(ci, co, 5, 5, generator=g) / (ci * 6) ** 0.5
    b = torch.randn(co, generator=g)
    return x, w, b


def convt_ref(x, w, b, act="identity"):
    return ACT[act](F.conv_transpose2d(x.double(), w.double(), None if b is None else b.double(), 2, 2, 1))


def convt(x, w, b, act="identity"):
    with B.use_backend("cpu"):
        return GF.conv_transpose2d(x, w, b, 2, 2, 1, activation=act, negative_slope=SLOPE)


# (N, C_in, C_out, H, W): channel counts off the 8-channel blocks and on them, maps off the 4x4
# tiles (1, 3, 5, 7) and on them, one image and several
SHAPES = [(1, 3, 5, 1, 1), (2, 13, 9, 5, 7), (3, 8, 16, 4, 4), (2, 16, 8, 7, 7), (1, 21, 11, 8, 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act", ["identity", "leaky_relu", "tanh"])
def test_conv_transpose_against_float64(shape, act):
    """Forward (the product + bias + activation) and the three gradients: grad_input is the
    Winograd Conv2d-form routine (the four phases summed inside the products)."""
    g = gen(shape, act)
    x, w, b = convt_inputs(*shape, g)
    N, ci, co, H, W = shape
    dy = torch.randn(N, co, 2 * H, 2 * W, generator=g)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    with B.cpu_winograd("always"):
        before = products()
        y = convt(xs, ws, bs, act)
        assert products() == before + 1, "the forward did not take the Winograd product"
        gx, gw, gb = torch.autograd.grad(y, (xs, ws, bs), dy)
        assert products() == before + 2, "grad_input did not take the Winograd product"
    assert y.shape == (N, co, 2 * H, 2 * W) and y.is_contiguous()
    xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
    yr = convt_ref(xr, wr, br, act)
    rx, rw, rb = torch.autograd.grad(yr, (xr, wr, br), dy.double())
    assert_close(y, yr.detach(), msg="output", scale=WINO_SCALE)
    assert_close(gx, rx, msg="grad_input", scale=WINO_SCALE)
    assert_close(gw, rw, msg="grad_weight")
    assert_close(gb, rb, msg="grad_bias")


CONV_SHAPES = [(2, 5, 9, 8, 6), (1, 8, 16, 2, 2), (3, 13, 8, 10, 14), (2, 24, 40, 14, 14)]  # N, C_in, C_out, H, W


@pytest.mark.parametrize("shape", CONV_SHAPES)
@pytest.mark.parametrize("act", ["identity", "leaky_relu"])
def test_conv2d_against_float64(shape, act):
    """Conv2d k5 s2 p2 (forward: the transposed convolution's grad_input routine; grad_input:
    the Winograd transposed convolution) + bias + activation, against F.conv2d in float64."""
    check_winograd_conv2d(shape, act, ACT[act], 5, 2, 6, SLOPE, gen(shape, act, "conv2d"), products,
                          scale=WINO_SCALE)


def test_keras_layers_error_and_auto():
    """The Keras transposed convolution 128 -> 64 at 7x7 and Conv2d 64 -> 128 at 14x14: "auto"
    takes them from batch 16 (64 tiles), not at batch 8; the error against float64 stays within
    WINO_SCALE times float32's test tolerance and within 16x the direct float32 product's."""
    g = gen("keras")
    for N, taken in [(16, True), (8, False)]:
        x, w, b = convt_inputs(N, 128, 64, 7, 7, g)
        r = convt_ref(x, w, b, "leaky_relu")
        before = products()
        y = convt(x, w, b, "leaky_relu")
        assert products() == before + int(taken), N
        with B.cpu_winograd("never"):
            yd = convt(x, w, b, "leaky_relu")
        assert_close(y, r, scale=WINO_SCALE)
        err, err_direct = (y.double() - r).abs().max().item(), (yd.double() - r).abs().max().item()
        assert err <= 16 * max(err_direct, 1e-6), (err, err_direct)
        xc = torch.randn(N, 64, 14, 14, generator=g)
        wc = torch.randn(128, 64, 5, 5, generator=g) / 40
        rc = F.conv2d(xc.double(), wc.double(), None, 2, 2)
        before = products()
        with B.use_backend("cpu"):
            yc = GF.conv2d(xc, wc, None, 2, 2)
            with B.cpu_winograd("never"):
                ycd = GF.conv2d(xc, wc, None, 2, 2)
        assert products() == before + int(taken), N
        assert_close(yc, rc, scale=WINO_SCALE)
        err, err_direct = (yc.double() - rc).abs().max().item(), (ycd.double() - rc).abs().max().item()
        assert err <= 16 * max(err_direct, 1e-6), (err, err_direct)


def test_keras_discriminator_block_trains_like_torch():
    """Conv2d 64 -> 128 14 -> 7 + BatchNorm + LeakyReLU(0.3) at batch 16, converted, with both
    products by Winograd (auto): forward, running statistics and the input and weight gradients
    against the float64 torch block, each error within 16x torch's own float32 block's (BatchNorm
    divides by the batch's deviation, so the forward's rounding reaches the gradients scaled)."""
    g = gen("block")
    seq = nn.Sequential(nn.Conv2d(64, 128, 5, 2, 2, bias=False), nn.BatchNorm2d(128), nn.LeakyReLU(0.3))
    fused = genfast.convert(copy.deepcopy(seq))
    ref = copy.deepcopy(seq).double()
    x = torch.randn(16, 64, 14, 14, generator=g)
    dy = torch.randn(16, 128, 7, 7, generator=g)
    before = products()
    outs = {}
    for name, mod in (("genfast", fused), ("torch32", seq), ("ref", ref)):
        xs = (x.double() if name == "ref" else x.clone()).requires_grad_()
        with B.use_backend("cpu"):
            y = mod(xs)
            gx, gw = torch.autograd.grad(y, (xs, mod[0].weight), dy.to(y.dtype))
        outs[name] = (y.detach(), gx, gw, mod[1].running_mean, mod[1].running_var)
        if name == "genfast":
            assert products() == before + 2, "forward and grad_input did not both take Winograd"
    names = ("output", "grad_input", "grad_weight", "running_mean", "running_var")
    for i, what in enumerate(names):
        r = outs["ref"][i]
        err = (outs["genfast"][i].double() - r).abs().max().item()
        err32 = (outs["torch32"][i].double() - r).abs().max().item()
        assert err <= 16 * max(err32, 1e-7), (what, err, err32)
        assert_close(outs["genfast"][i], r, msg=what, scale=WINO_SCALE)


@pytest.mark.parametrize("co", [8, 16])
@pytest.mark.parametrize("where", ["x_inf", "x_nan", "w_inf", "w_nan", "overflow", "dz_inf"])
def test_non_finite_values_fall_back_to_the_direct_product(where, co):
    """A transform spreads an inf over its tile; such a call returns the direct product's
    values (torch's NaN / inf pattern), bit for bit the "never" result. With 8 output channels
    the backward is the GEMM form's (the plane layout), with 16 our dz pass and ATen's product."""
    g = gen(where, co)
    x, w, b = convt_inputs(2, 16, co, 8, 8, g)
    dy = torch.randn(2, co, 16, 16, generator=g)
    if where == "overflow":
        # dense values of one sign (the outlier check passes): the direct sums stay near 1e37, the
        # input transform's (row sums up to 18, squared) pass float32's 3.4e38
        x[1] = 3e36 * (1.0 + 0.1 * torch.rand(x[1].shape, generator=g))
    elif where == "dz_inf":
        dy[1, 2, 5, 6] = float("inf")
    else:
        assert plant_non_finite(x, w, where)
    xs = x.clone().requires_grad_()
    with B.cpu_winograd("always"):
        before = products()
        y = convt(xs, w, b)
        (gx,) = torch.autograd.grad(y, (xs,), dy)
        # only an operand without the bad value may take Winograd: x's forward when the inf is
        # in dz, dz's grad_input when it is in x (all its products finite)
        assert products() - before == {"dz_inf": 1, "x_inf": 1, "x_nan": 1, "overflow": 1}.get(where, 0)
    with B.cpu_winograd("never"):
        yd = convt(x, w, b)
    if where != "dz_inf":  # (there the forward's operands are finite: Winograd's rounding)
        torch.testing.assert_close(y, yd, rtol=0, atol=0, equal_nan=True)
    # grad_input after a fallback: ATen's product (torch's float32 values and NaN pattern)
    xt = x.clone().requires_grad_()
    (gt,) = torch.autograd.grad(F.conv_transpose2d(xt, w, b, 2, 2, 1), (xt,), dy)
    torch.testing.assert_close(gx, gt, equal_nan=True, atol=1e-5 * WINO_SCALE, rtol=1.3e-6 * WINO_SCALE)
    r = convt_ref(x, w, b)
    fin = torch.isfinite(r)
    if where == "overflow":
        # the direct product's finite values, within twice torch's float32 product's error (ATen's
        # product for 16 output channels rounds these sums to 5e-4 of an output, relative)
        assert torch.isfinite(y).all() and r.abs().max() > 1e36
        err = (y.double() - r).abs().max().item()
        err32 = (F.conv_transpose2d(x, w, b, 2, 2, 1).double() - r).abs().max().item()
        assert err <= 2 * err32, (err, err32)
    else:
        assert_close(y[fin], r[fin], scale=WINO_SCALE)


@pytest.mark.parametrize("where", ["x", "w_tail", "conv2d_x"])
def test_outliers_run_the_direct_product(where):
    """One value far outside the rest (1e8 among values of order 1) would spread its rounding
    over its tile; such an operand runs the direct product, accurate against float64; a
    moderate one (10x) keeps Winograd. w_tail: the outlier in the last of a weight's 375 values
    (not a multiple of the 8-value vectors: the scalar tail of the check)."""
    for big, taken in [(1e8, False), (10.0, True)]:
        g = gen(where, big)
        with B.cpu_winograd("always"), B.use_backend("cpu"):
            if where == "conv2d_x":
                xc = torch.randn(2, 8, 16, 16, generator=g)
                xc[0, 2, 7, 7] = big
                wc = torch.randn(16, 8, 5, 5, generator=g) / 10
                before = products()
                y = GF.conv2d(xc, wc, None, 2, 2)
                assert products() == before + int(taken), (where, big)
                assert_close(y, F.conv2d(xc.double(), wc.double(), None, 2, 2), msg=f"{where} {big}")
                continue
            ci, co = (3, 5) if where == "w_tail" else (16, 8)
            x, w, b = convt_inputs(2, ci, co, 8, 8, g)
            if where == "x":
                x[1, 2, 2, 5] = big
            else:
                w[-1, -1, -1, -1] = big * w.abs().mean()
            before = products()
            y = convt(x, w, b)
            assert products() == before + int(taken), (where, big)
        assert_close(y, convt_ref(x, w, b), msg=f"{where} {big}")


def test_other_geometries_do_not_take_it():
    """k5 with output_padding 0 (2H - 1 outputs), padding 1, stride 1, dilation 2, groups 2,
    float64, and an odd-sized Conv2d input run the direct product."""
    g = gen("geometries")
    x, w, b = convt_inputs(2, 16, 8, 8, 8, g)
    cases = [
        (lambda: GF.conv_transpose2d(x, w, b, 2, 2, 0), lambda: F.conv_transpose2d(x.double(), w.double(), b.double(), 2, 2, 0)),
        (lambda: GF.conv_transpose2d(x, w, b, 2, 1, 1), lambda: F.conv_transpose2d(x.double(), w.double(), b.double(), 2, 1, 1)),
        (lambda: GF.conv_transpose2d(x, w, b, 1, 2), lambda: F.conv_transpose2d(x.double(), w.double(), b.double(), 1, 2)),
        (lambda: GF.conv_transpose2d(x, w, b, 2, 2, 1, 1, 2), lambda: F.conv_transpose2d(x.double(), w.double(), b.double(), 2, 2, 1, 1, 2)),
        (lambda: GF.conv_transpose2d(x, w[:, :4], b, 2, 2, 1, 2),
         lambda: F.conv_transpose2d(x.double(), w[:, :4].double(), b.double(), 2, 2, 1, 2)),
        (lambda: GF.conv_transpose2d(x.double(), w.double(), b.double(), 2, 2, 1),
         lambda: F.conv_transpose2d(x.double(), w.double(), b.double(), 2, 2, 1)),
    ]
    xo = torch.randn(2, 8, 15, 15, generator=g)
    wc = torch.randn(16, 8, 5, 5, generator=g) / 10
    cases.append((lambda: GF.conv2d(xo, wc, None, 2, 2), lambda: F.conv2d(xo.double(), wc.double(), None, 2, 2)))
    with B.cpu_winograd("always"), B.use_backend("cpu"):
        for i, (ours, theirs) in enumerate(cases):
            before = products()
            y = ours()
            assert products() == before, f"case {i} took the Winograd product"
            assert_close(y, theirs(), msg=f"case {i}")


@pytest.mark.parametrize("co", [8, 16])
def test_grad_input_fallback_without_onednn(co):
    """A non-finite dz makes grad_input run ATen's transposed-convolution backward with the
    layer's output_padding (1): also torch's own slow kernel, which checks the sizes exactly
    (oneDNN's size arithmetic would also accept 0). 8 output channels: the GEMM form's backward;
    16: our dz pass and ATen's product."""
    g = gen("no-onednn", co)
    x, w, b = convt_inputs(2, 16, co, 8, 8, g)
    dy = torch.randn(2, co, 16, 16, generator=g)
    dy[0, 1, 3, 3] = float("inf")
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.backends.mkldnn.flags(enabled=False), B.cpu_winograd("always"):
        (gx,) = torch.autograd.grad(convt(xs, w, b), (xs,), dy)
        (rx,) = torch.autograd.grad(F.conv_transpose2d(xr, w, b, 2, 2, 1), (xr,), dy)
    torch.testing.assert_close(gx, rx, equal_nan=True)
    assert not torch.isfinite(gx).all() and torch.isfinite(gx).any()


def test_keras_generator_layer_trains_by_winograd_under_auto():
    """The Keras 128 -> 64 7x7 transposed convolution + LeakyReLU in training at batch 16: under
    "auto" the forward is the Winograd product (not ATen's convolution), the backward our dz
    pass, Winograd's grad_input and ATen's grad_weight; values and gradients as float64's within
    F(4x4, 3x3)'s bound. At batch 8 (32 tiles) neither product is Winograd's (the tap product,
    which "auto" gives that layer on AVX2 CPUs, off here: tests/test_conv_transpose_taps.py)."""
    from torch.profiler import profile

    g = gen("keras-train")
    with B.cpu_tap_gemm("never"):
        for N, taken in [(16, True), (8, False)]:
            x, w, b = convt_inputs(N, 128, 64, 7, 7, g)
            # dy 0 where the output is within rounding of LeakyReLU's kink (which side float32 puts it
            # on is a coin toss that moves grad_weight by far more than the products' rounding)
            dy = torch.randn(N, 64, 14, 14, generator=g).masked_fill(convt_ref(x, w, b).abs() < 1e-3, 0)
            xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
            before = products()
            with profile() as prof:
                y = convt(xs, ws, bs, "leaky_relu")
            assert ("aten::convolution" in {e.name for e in prof.events()}) != taken, N
            gx, gw, gb = torch.autograd.grad(y, (xs, ws, bs), dy)
            assert products() == before + 2 * int(taken), N
            xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
            yr = convt_ref(xr, wr, br, "leaky_relu")
            rx, rw, rb = torch.autograd.grad(yr, (xr, wr, br), dy.double())
            assert_close(y, yr.detach(), msg="output", scale=WINO_SCALE)
            assert_close(gx, rx, msg="grad_input", scale=WINO_SCALE)
            # (grad_weight sums N * 14 * 14 output values per weight: up to 3136 terms)
            assert_close(gw, rw, msg="grad_weight", scale=10)
            assert_close(gb, rb, msg="grad_bias")
