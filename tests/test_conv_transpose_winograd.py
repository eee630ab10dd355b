"""The CPU transposed convolution k4 s2 p1 by Winograd's F(4x4, 2x2)
(csrc/cpu/conv_transpose_winograd.cpp): values against F.conv_transpose2d in float64, the
fallback to the direct product on non-finite values, where "auto" takes it, and the switch.
genfast._C.cpu_winograd_products() counts the Winograd products returned: the evidence that a
call took (or did not take) the path."""
from __future__ import annotations

import copy
import threading
import zlib

import pytest
import torch
import torch.nn.functional as F

import genfast  # noqa: F401  (registers the ops)
import genfast.functional as GF
import genfast.nn as gnn
from genfast import backend as B
from tests.utils import assert_close, check_winograd_conv2d, plant_non_finite

pytestmark = pytest.mark.skipif(not B.has_cpu_ext(), reason="genfast._C not built")

SLOPE = 0.2
TORCH_ACT = {"identity": lambda z: z, "relu": F.relu, "leaky_relu": lambda z: F.leaky_relu(z, SLOPE),
             "tanh": torch.tanh, "sigmoid": torch.sigmoid}


def products() -> int:
    return int(B.extension().cpu_winograd_products())


def ref(x, w, b, act="identity", op=0):
    y = F.conv_transpose2d(x.double(), w.double(), None if b is None else b.double(), 2, 1, op)
    return TORCH_ACT[act](y)


def run(x, w, b, act="identity", op=0):
    with B.use_backend("cpu"):
        return GF.conv_transpose2d(x, w, b, 2, 1, op, activation=act, negative_slope=SLOPE)


def seed_of(*key) -> int:
    """A seed fixed across processes (hash() of a string is not)."""
    return zlib.crc32(repr(key).encode()) % 100_000


def inputs(N, ci, co, H, W, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, ci, H, W, generator=g)
    w = torch.randn(ci, co, 4, 4, generator=g) / (ci * 4) ** 0.5
    b = torch.randn(co, generator=g)
    return x, w, b


# (N, C_in, C_out, H, W): channel counts off the 8-channel blocks (3, 13) and on them, maps off
# the 4x4 tiles (1, 5, 7, 6) and on them, one image and several
SHAPES = [(1, 3, 5, 1, 1), (2, 13, 9, 5, 7), (3, 8, 16, 4, 4), (2, 16, 8, 6, 9), (1, 21, 3, 8, 3),
          (4, 32, 24, 12, 8)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu", "tanh"])
def test_values_against_float64(shape, act):
    x, w, b = inputs(*shape, seed=seed_of(shape, act))
    before = products()
    with B.cpu_winograd("always"):
        y = run(x, w, b, act)
    assert products() == before + 1, "the call did not take the Winograd product"
    assert y.shape == (shape[0], shape[2], 2 * shape[3], 2 * shape[4]) and y.is_contiguous()
    assert_close(y, ref(x, w, b, act), msg=f"{shape} {act}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act", ["identity", "leaky_relu"])
def test_grad_input_against_float64(shape, act):
    """grad_input by Winograd from dz (the four phases summed inside the products), with
    grad_weight and grad_bias from the direct columns, against torch in float64."""
    x, w, b = inputs(*shape, seed=seed_of(shape, act, "bwd"))
    N, ci, co, H, W = shape
    dy = torch.randn(N, co, 2 * H, 2 * W)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    with B.cpu_winograd("always"):
        y = run(xs, ws, bs, act)
        before = products()
        gx, gw, gb = torch.autograd.grad(y, (xs, ws, bs), dy)
    assert products() == before + 1, "grad_input did not take the Winograd product"
    xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
    rx, rw, rb = torch.autograd.grad(ref(xr, wr, br, act), (xr, wr, br), dy.double())
    assert_close(gx, rx, msg="grad_input")
    assert_close(gw, rw, msg="grad_weight")
    assert_close(gb, rb, msg="grad_bias")
    # grad_input alone (no weight gradient asked: the columns are skipped)
    with B.cpu_winograd("always"):
        y = run(xs, w, None, act)
        before = products()
        (gx2,) = torch.autograd.grad(y, (xs,), dy)
        assert products() == before + 1
    xr = x.double().requires_grad_()
    (rx2,) = torch.autograd.grad(ref(xr, w, None, act), (xr,), dy.double())
    assert_close(gx2, rx2, msg="grad_input alone")


def test_grad_input_non_finite_falls_back():
    """A non-finite dz gives ATen's grad_input (torch's values, NaN where torch has NaN)."""
    x, w, b = inputs(2, 16, 8, 8, 8, seed=8)
    dy = torch.randn(2, 8, 16, 16)
    dy[1, 2, 5, 6] = float("inf")
    xs = x.clone().requires_grad_()
    with B.cpu_winograd("always"):
        y = run(xs, w, b)
        before = products()
        (gx,) = torch.autograd.grad(y, (xs,), dy)
    assert products() == before
    xr = x.clone().requires_grad_()
    (rx,) = torch.autograd.grad(F.conv_transpose2d(xr, w, b, 2, 1), (xr,), dy)
    torch.testing.assert_close(gx, rx, equal_nan=True)
    assert torch.isfinite(gx).sum() > 0 and not torch.isfinite(gx).all()


def test_dcgan_layer_error_and_auto():
    """DCGAN's 16x16 -> 32x32 layer at batch 8 (128 -> 64 channels): "auto" takes it, and its
    error against float64 stays within float32's test tolerance and within 8x the direct
    float32 product's ("never")."""
    x, w, b = inputs(8, 128, 64, 16, 16, seed=5)
    r = ref(x, w, b, "relu")
    before = products()
    y = run(x, w, b, "relu")
    assert products() == before + 1
    with B.cpu_winograd("never"):
        yd = run(x, w, b, "relu")
    assert products() == before + 1
    assert_close(y, r)
    err, err_direct = (y.double() - r).abs().max().item(), (yd.double() - r).abs().max().item()
    assert err <= 8 * max(err_direct, 1e-6), (err, err_direct)


@pytest.mark.parametrize("shape", [(8, 32, 16, 16, 16), (8, 128, 16, 16, 16), (32, 256, 128, 4, 4),
                                   (8, 256, 128, 8, 8), (1, 256, 128, 8, 8), (8, 128, 64, 7, 7),
                                   (16, 128, 64, 16, 9)])
def test_auto_keeps_the_direct_form_for_small_products(shape):
    """"auto" leaves the shapes where it measured slower or tied: fewer than 64 input or 32
    output channels, 4x4 maps (one tile per image), fewer than 64 tiles over the batch (unless
    one image has 16), maps that are not multiples of 4 (padded tiles)."""
    x, w, b = inputs(*shape, seed=1)
    before = products()
    y = run(x, w, b, "relu")
    assert products() == before
    assert_close(y, ref(x, w, b, "relu"))


@pytest.mark.parametrize("shape", [(1, 128, 64, 16, 16), (2, 64, 32, 16, 16), (16, 256, 128, 8, 8)])
def test_auto_takes_the_shapes_where_it_won(shape):
    x, w, b = inputs(*shape, seed=seed_of(shape, "auto"))
    before = products()
    y = run(x, w, b, "relu")
    assert products() == before + 1
    assert_close(y, ref(x, w, b, "relu"))


def test_other_geometries_and_layouts_do_not_take_it():
    """Only k4 s2 p1 with a 2H x 2W output, float32, NCHW: output_padding, channels_last and
    float64 run the direct forms even under "always"."""
    x, w, b = inputs(2, 8, 8, 4, 4, seed=2)
    before = products()
    with B.cpu_winograd("always"):
        y_op = run(x, w, b, "relu", op=1)
        y_cl = run(x.to(memory_format=torch.channels_last), w, b, "relu")
        y_64 = run(x.double(), w.double(), b.double(), "relu")
        # a channels_last weight (torch's output then channels_last) and non-contiguous inputs
        w_cl = w.to(memory_format=torch.channels_last)
        y_wcl = run(x, w_cl, b, "relu")
        x_wide = torch.randn(2, 8, 4, 8)
        y_view = run(x_wide[:, :, :, ::2], w, b, "relu")
    assert products() == before
    assert_close(y_op, ref(x, w, b, "relu", op=1))
    assert_close(y_cl, ref(x, w, b, "relu"))
    assert_close(y_64, ref(x, w, b, "relu"))
    assert_close(y_wcl, ref(x, w, b, "relu"))
    assert y_wcl.is_contiguous(memory_format=torch.channels_last)
    assert_close(y_view, ref(x_wide[:, :, :, ::2], w, b, "relu"))


@pytest.mark.parametrize("where", ["x_inf", "x_nan", "w_inf", "w_nan", "overflow"])
def test_non_finite_values_fall_back_to_the_direct_product(where):
    """A Winograd transform spreads an inf over its tile (as NaN where torch gives a finite
    value); such a call returns the direct product's values, torch's, bit for bit."""
    x, w, b = inputs(2, 16, 8, 8, 8, seed=3)
    if not plant_non_finite(x, w, where):
        # "overflow": finite, but 4 * (d2 + d3) in the input transform overflows float32
        x[1, 5, 3, 3] = 3e38
        x[1, 5, 3, 4] = 3e38
    before = products()
    with B.cpu_winograd("always"):
        y = run(x, w, b)
    assert products() == before, "a non-finite Winograd product was returned"
    with B.cpu_winograd("never"):
        yd = run(x, w, b)
    torch.testing.assert_close(y, yd, rtol=0, atol=0, equal_nan=True)
    r = ref(x, w, b)
    fin = torch.isfinite(r)
    assert torch.equal(torch.isnan(y), torch.isnan(r.float())) or where == "overflow"
    assert_close(y[fin], r[fin])


def test_batch_in_chunks():
    """A batch whose transforms exceed one chunk's 32 MB runs in chunks (here 10 images, then 2)."""
    x, w, b = inputs(12, 256, 256, 16, 16, seed=4)
    before = products()
    y = run(x, w, b, "leaky_relu")
    assert products() == before + 1
    assert_close(y, ref(x, w, b, "leaky_relu"))


def test_backward_and_batchnorm_block():
    """The backward (unchanged: from the saved output) and the ConvTranspose2d -> BatchNorm2d ->
    ReLU block's statistics over a Winograd forward, against torch in float64."""
    x, w, b = inputs(3, 16, 12, 6, 5, seed=6)
    dy = torch.randn(3, 12, 12, 10)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    with B.cpu_winograd("always"):
        before = products()
        y = run(xs, ws, bs, "leaky_relu")
        assert products() == before + 1
        gx, gw, gb = torch.autograd.grad(y, (xs, ws, bs), dy)
        assert products() == before + 2
        xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
        yr = ref(xr, wr, br, "leaky_relu")
        rx, rw, rb = torch.autograd.grad(yr, (xr, wr, br), dy.double())
        assert_close(y, yr.detach())
        assert_close(gx, rx, msg="grad_input")
        assert_close(gw, rw, msg="grad_weight")
        assert_close(gb, rb, msg="grad_bias")

        block = gnn.ConvTransposeBNAct2d(16, 12, 4, 2, 1, activation="relu")
        seq = torch.nn.Sequential(torch.nn.ConvTranspose2d(16, 12, 4, 2, 1), torch.nn.BatchNorm2d(12),
                                  torch.nn.ReLU()).double()
        seq.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in block.state_dict().items()})
        before = products()
        with B.use_backend("cpu"):
            out = block(x)
        assert products() == before + 1
        assert_close(out, seq(x.double()).detach(), msg="block output")
        assert_close(block[1].running_mean, seq[1].running_mean, msg="running_mean")
        assert_close(block[1].running_var, seq[1].running_var, msg="running_var")


def test_mode_switch_and_errors():
    assert B.get_cpu_winograd() == "auto"
    with B.cpu_winograd("never"):
        assert B.get_cpu_winograd() == "never"
        with B.cpu_winograd("always"):
            assert B.get_cpu_winograd() == "always"
        assert B.get_cpu_winograd() == "never"
    assert B.get_cpu_winograd() == "auto"
    with pytest.raises(ValueError, match="mode"):
        B.set_cpu_winograd("sometimes")
    assert B.get_cpu_winograd() == "auto"


# --- Conv2d k4 s2 p1: the grad_input of the transposed convolution with the same weight -------

CONV_SHAPES = [(2, 5, 9, 8, 6), (1, 8, 16, 2, 2), (3, 13, 8, 10, 14), (2, 24, 40, 16, 16)]  # N, C_in, C_out, H, W


@pytest.mark.parametrize("shape", CONV_SHAPES)
@pytest.mark.parametrize("act", ["identity", "leaky_relu"])
def test_conv2d_forward_and_backward_against_float64(shape, act):
    """conv2d (forward: the Winograd grad_input routine; grad_input: the Winograd transposed
    convolution) + bias + activation, against F.conv2d in float64."""
    g = torch.Generator().manual_seed(seed_of(shape, act, "conv2d"))
    check_winograd_conv2d(shape, act, TORCH_ACT[act], 4, 1, 4, SLOPE, g, products)


def test_conv2d_odd_sizes_and_non_finite_run_torchs_product():
    g = torch.Generator().manual_seed(9)
    w = torch.randn(8, 6, 4, 4, generator=g)
    x_odd = torch.randn(2, 6, 7, 8, generator=g)
    x_inf = torch.randn(2, 6, 8, 8, generator=g)
    x_inf[0, 1, 3, 3] = float("inf")
    with B.cpu_winograd("always"), B.use_backend("cpu"):
        before = products()
        y_odd = GF.conv2d(x_odd, w, None, 2, 1)
        y_inf = GF.conv2d(x_inf, w, None, 2, 1)
        assert products() == before
    assert_close(y_odd, F.conv2d(x_odd.double(), w.double(), None, 2, 1))
    torch.testing.assert_close(y_inf, F.conv2d(x_inf, w, None, 2, 1), equal_nan=True)
    assert not torch.isfinite(y_inf).all() and torch.isfinite(y_inf).any()


def test_conv2d_auto_takes_the_dcgan_discriminator_layer():
    """"auto": the DCGAN discriminator's 64 -> 128, 32x32 -> 16x16 layer at batch 16 (1.2-1.4x
    oneDNN's product, measured), not its 256 -> 512 8x8 -> 4x4 layer (0.5x)."""
    x = torch.randn(16, 64, 32, 32)
    w = torch.randn(128, 64, 4, 4) / 16
    before = products()
    with B.use_backend("cpu"):
        y = GF.conv2d(x, w, None, 2, 1)
    assert products() == before + 1
    assert_close(y, F.conv2d(x.double(), w.double(), None, 2, 1))
    x4 = torch.randn(16, 256, 8, 8)
    w4 = torch.randn(512, 256, 4, 4) / 32
    with B.use_backend("cpu"):
        y4 = GF.conv2d(x4, w4, None, 2, 1)
    assert products() == before + 1
    assert_close(y4, F.conv2d(x4.double(), w4.double(), None, 2, 1))


def test_conv2d_strided_grad_output_takes_the_winograd_grad_input():
    """A non-contiguous grad_output (a strided slice) of the DCGAN discriminator layer: the
    backward makes dz contiguous, so its grad_input is the Winograd transposed convolution as
    for a contiguous one (the rule was once asked with a meta tensor, which it refused), and the
    gradients match float64."""
    x = torch.randn(16, 64, 32, 32)
    w = torch.randn(128, 64, 4, 4) / 16
    dy = torch.randn(16, 128, 16, 32)[..., ::2]
    assert not dy.is_contiguous()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    before = products()
    with B.use_backend("cpu"):
        y = GF.conv2d(xr, wr, None, 2, 1)
        gx, gw = torch.autograd.grad(y, (xr, wr), dy)
    assert products() == before + 2  # the forward and grad_input
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    rx, rw = torch.autograd.grad(F.conv2d(xd, wd, None, 2, 1), (xd, wd), dy.double())
    assert_close(gx, rx)
    # grad_weight (ATen's product, sums of 4096 terms of magnitude ~100): within twice torch's
    # own float32 error
    xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
    (tw,) = torch.autograd.grad(F.conv2d(xt, wt, None, 2, 1), (wt,), dy)
    assert (gw.double() - rw).abs().max() <= 2 * (tw.double() - rw).abs().max()


# --- a region of large values (a bad-input hunt) --------------------------------------------------

@pytest.mark.parametrize("k", [4, 5])
@pytest.mark.parametrize("where", ["convT_x", "convT_dz", "conv2d_x", "conv2d_dz"])
def test_region_of_large_values_runs_the_direct_product(k, where):
    """The top rows of every map 1000x the rest pass the per-block outlier check (29% of the
    values lie near the maximum), but a tile's transforms would spread their rounding onto the
    outputs that read only the other rows (measured: 6e-3 on outputs of order 2, against 7e-7
    for the direct product). The local check sends the product (forward or grad_input) to the
    direct form: values and gradients within float32's tolerance of float64, and the other
    product of the pair still Winograd."""
    g = torch.Generator().manual_seed(seed_of("region", k, where))
    p, op = (1, 0) if k == 4 else (2, 1)
    conv = where.startswith("conv2d")
    if conv:  # Conv2d 64 -> 128, 16x16 -> 8x8 (k4) or 14x14 -> 7x7 (k5), batch 16
        H = 16 if k == 4 else 14
        x = torch.randn(16, 64, H, H, generator=g)
        w = torch.randn(128, 64, k, k, generator=g) / (64 * k * k) ** 0.5
        dy = torch.randn(16, 128, H // 2, H // 2, generator=g)
    else:  # transposed 128 -> 64, 8x8 -> 16x16 (k4) or 7x7 -> 14x14 (k5), batch 16
        H = 8 if k == 4 else 7
        x = torch.randn(16, 128, H, H, generator=g)
        w = torch.randn(128, 64, k, k, generator=g) / (128 * k * k / 4) ** 0.5
        dy = torch.randn(16, 64, 2 * H, 2 * H, generator=g)
    big = x if where.endswith("_x") else dy
    big[:, :, : big.shape[2] // 4] *= 1000.0
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    before = products()
    with B.use_backend("cpu"):
        y = (GF.conv2d(xr, wr, None, 2, p) if conv else GF.conv_transpose2d(xr, wr, None, 2, p, op))
        after_forward = products()
        gx, gw = torch.autograd.grad(y, (xr, wr), dy)
    # the product fed the region runs directly; the other one still takes Winograd
    assert after_forward - before == (0 if where.endswith("_x") else 1)
    assert products() - after_forward == (1 if where.endswith("_x") else 0)
    # the direct product against float64, element by element: within 32 float32 roundings of
    # the sum of the magnitudes of each value's terms (torch's own float32 products came within
    # 10 here; the spread was about 9000: 6e-3 where this bound is 2e-5); the Winograd one
    # (ordinary values) to its tests' tolerance
    eps = 2.0 ** -24

    def fwd(a, b):
        return F.conv2d(a, b, None, 2, p) if conv else F.conv_transpose2d(a, b, None, 2, p, op)

    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    rx, rw = torch.autograd.grad(fwd(xd, wd), (xd, wd), dy.double())
    xa = x.double().abs().requires_grad_()
    ya = fwd(xa, w.double().abs())
    (ga,) = torch.autograd.grad(ya, (xa,), dy.double().abs())
    yd = fwd(x.double(), w.double())
    if where.endswith("_x"):
        assert ((y.double() - yd).abs() <= 32 * eps * ya.detach()).all()
        assert_close(gx, rx, msg="grad_input (Winograd)", scale=1 if k == 4 else 4)
    else:
        assert_close(y, yd, msg="output (Winograd)", scale=1 if k == 4 else 4)
        assert ((gx.double() - rx).abs() <= 32 * eps * ga).all()
    # grad_weight: ATen's product over sums of up to 4096 terms, some 1000x: within twice
    # torch's own float32 error
    xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
    (tw,) = torch.autograd.grad(fwd(xt, wt), (wt,), dy)
    assert (gw.double() - rw).abs().max() <= 2 * (tw.double() - rw).abs().max() + 1e-6


# --- from the review: tracing, chunks, fallbacks, blocks, scratch, threads ------------------------

def test_opcheck_under_winograd():
    """Fake and functional tensors (opcheck's tracing) take torch's product, never the Winograd
    code (which reads storage); the real calls take it. The traced graph's products are then
    torch's, whose rounding differs from the eager Winograd product's by a few float32 ulps of
    the output scale: compared at 2e-5 (float32's test tolerance here)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 8, 8, 8, generator=g, requires_grad=True)
    w = (torch.randn(16, 8, 4, 4, generator=g) / 8).requires_grad_()
    b = torch.randn(16, generator=g, requires_grad=True)
    xt = torch.randn(2, 16, 4, 4, generator=g, requires_grad=True)
    wt = (torch.randn(16, 8, 4, 4, generator=g) / 8).requires_grad_()
    with B.cpu_winograd("always"):
        before = products()
        torch.library.opcheck(torch.ops.genfast.conv2d_act.default, (x, w, b, [2, 2], [1, 1], [1, 1], 1, 2, SLOPE),
                              rtol=2e-5, atol=2e-5)
        torch.library.opcheck(torch.ops.genfast.conv_transpose2d_act.default,
                              (xt, wt, None, [2, 2], [1, 1], [0, 0], 1, [1, 1], 1, 0.0), rtol=2e-5, atol=2e-5)
        assert products() > before


def test_chunked_grad_input_and_non_finite_in_the_last_chunk():
    """The forward over 18 images in two chunks (10 + 8) and grad_input in two (16 + 2: its
    transforms take 2 MB per image against the forward's 3.3 MB), and an inf only in the last
    image (the second chunk's check) falls back for the forward."""
    x, w, b = inputs(18, 256, 256, 16, 16, seed=12)
    dy = torch.randn(18, 256, 32, 32)
    xs = x.clone().requires_grad_()
    before = products()
    y = run(xs, w, b)
    (gx,) = torch.autograd.grad(y, (xs,), dy)
    assert products() == before + 2
    xr = x.double().requires_grad_()
    (rx,) = torch.autograd.grad(ref(xr, w, b), (xr,), dy.double())
    assert_close(gx, rx, msg="grad_input")
    x[17, 7, 3, 3] = float("inf")
    before = products()
    y = run(x, w, b)
    assert products() == before
    r = ref(x, w, b)
    assert torch.equal(torch.isnan(y), torch.isnan(r)) and torch.equal(torch.isinf(y), torch.isinf(r))
    fin = torch.isfinite(r)
    assert_close(y[fin], r[fin])


def test_non_finite_weight_in_the_backward_and_conv2d_backward():
    x, w, b = inputs(2, 16, 8, 8, 8, seed=13)
    w[3, 1, 2, 2] = float("nan")
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    dy = torch.randn(2, 8, 16, 16)
    with B.cpu_winograd("always"):
        # the same call with a finite weight takes the Winograd products both ways
        before = products()
        wf = torch.nan_to_num(w).requires_grad_()
        torch.autograd.grad(run(xs, wf, b), (xs, wf), dy)
        assert products() == before + 2
        before = products()
        y = run(xs, ws, b)
        gx, gw = torch.autograd.grad(y, (xs, ws), dy)
        assert products() == before
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    yr = F.conv_transpose2d(xr, wr, b.double(), 2, 1)
    rx, rw = torch.autograd.grad(yr, (xr, wr), dy.double())
    for name, a, e in [("output", y, yr.detach()), ("grad_input", gx, rx)]:
        assert torch.equal(torch.isnan(a), torch.isnan(e)), name  # torch's NaN pattern
        fin = torch.isfinite(e)
        assert fin.any() and not fin.all(), name
        assert_close(a[fin], e[fin], msg=name)
    assert_close(gw, rw, msg="grad_weight")  # x^T dz: no NaN weight involved
    # Conv2d: a finite forward (Winograd), then a dz with inf: grad_input falls back
    xc = torch.randn(2, 8, 8, 8, requires_grad=True)
    wc = torch.randn(16, 8, 4, 4)
    dyc = torch.randn(2, 16, 4, 4)
    dyc[1, 5, 2, 1] = float("inf")
    with B.cpu_winograd("always"), B.use_backend("cpu"):
        yc = GF.conv2d(xc, wc, None, 2, 1)
        before = products()
        torch.autograd.grad(yc, (xc,), torch.nan_to_num(dyc, posinf=1.0), retain_graph=True)
        assert products() == before + 1  # a finite dz takes it
        before = products()
        (gxc,) = torch.autograd.grad(yc, (xc,), dyc)
        assert products() == before
    xr = xc.detach().clone().requires_grad_()
    (rxc,) = torch.autograd.grad(F.conv2d(xr, wc, None, 2, 1), (xr,), dyc)
    torch.testing.assert_close(gxc, rxc, equal_nan=True)


def test_eval_conv_bn_block_and_training_block_backward():
    """A converted Conv2d k4 s2 p1 -> BatchNorm2d -> LeakyReLU in eval mode under no_grad (the
    eval block entry), and the ConvTranspose2d -> BatchNorm2d -> ReLU block's backward over a
    Winograd forward, against float64 (ReLU's mask from genfast's own output)."""
    torch.manual_seed(14)
    seq = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 4, 2, 1), torch.nn.BatchNorm2d(16), torch.nn.LeakyReLU(0.2))
    seq[1].running_mean.uniform_(-1, 1)
    seq[1].running_var.uniform_(0.5, 2)
    seq.eval()
    torch_seq = copy.deepcopy(seq).double()  # convert works in place
    conv = genfast.convert(seq)
    x = torch.randn(3, 8, 10, 12)
    with B.cpu_winograd("always"), B.use_backend("cpu"), torch.no_grad():
        before = products()
        y = conv(x)
        assert products() == before + 1
        assert_close(y, torch_seq(x.double()))

    block = gnn.ConvTransposeBNAct2d(16, 12, 4, 2, 1, activation="relu")
    ref_seq = torch.nn.Sequential(torch.nn.ConvTranspose2d(16, 12, 4, 2, 1), torch.nn.BatchNorm2d(12)).double()
    ref_seq.load_state_dict({k: v.double() if v.is_floating_point() else v
                             for k, v in block.state_dict().items()})
    x = torch.randn(3, 16, 6, 5)
    dy = torch.randn(3, 12, 12, 10)
    xs = x.clone().requires_grad_()
    with B.cpu_winograd("always"), B.use_backend("cpu"):
        before = products()
        out = block(xs)
        grads = torch.autograd.grad(out, [xs] + list(block.parameters()), dy)
        assert products() == before + 2
    xr = x.double().requires_grad_()
    pre = ref_seq(xr)
    rgrads = torch.autograd.grad(pre * (out > 0).double(), [xr] + list(ref_seq.parameters()), dy.double())
    for name, a, e in zip(["x", "conv.weight", "conv.bias", "bn.weight", "bn.bias"], grads, rgrads):
        assert_close(a, e, msg=name, scale=10)


def test_scratch_reuse_after_a_fallback_with_padded_channels():
    """A call that falls back (NaN weight, padded channels) leaves the thread's scratch dirty;
    the next call of another padded shape must not read it."""
    x, w, b = inputs(4, 21, 13, 12, 12, seed=15)  # larger in every dimension than the next call
    w[0, 0, 0, 0] = float("nan")
    with B.cpu_winograd("always"):
        before = products()
        run(x, w, b)
        assert products() == before
        x2, w2, b2 = inputs(3, 11, 5, 7, 9, seed=16)
        before = products()
        y2 = run(x2, w2, b2)
        assert products() == before + 1
    assert torch.isfinite(y2).all()
    assert_close(y2, ref(x2, w2, b2))


def test_concurrent_calls_from_two_threads():
    """Each thread keeps its own scratch: two threads calling different shapes at once."""
    shapes = [(2, 13, 9, 8, 8), (3, 24, 16, 12, 8)]
    data = [inputs(*s, seed=seed_of(s, "thread")) for s in shapes]
    results, errors = {}, []

    def work(i):
        try:
            x, w, b = data[i]
            with B.use_backend("cpu"):
                for _ in range(20):
                    y = GF.conv_transpose2d(x, w, b, 2, 1, activation="leaky_relu", negative_slope=SLOPE)
            results[i] = y
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    with B.cpu_winograd("always"):
        before = products()
        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert products() == before + 40, "a call fell back (an error under concurrency?)"
    assert not errors, errors
    for i, (x, w, b) in enumerate(data):
        assert_close(results[i], ref(x, w, b, "leaky_relu"))


@pytest.mark.parametrize("where", ["x", "w", "dz", "conv2d_x"])
def test_outliers_run_the_direct_product(where):
    """One value far outside the rest (1e8 among values of order 1) would spread its rounding
    over its tile's outputs that do not depend on it; such an operand (fewer than 10% of its
    nonzero values within 16x of its largest magnitude) runs the direct product, accurate
    against float64. A moderate one (10x) keeps the Winograd product."""
    for big, taken in [(1e8, False), (10.0, True)]:
        x, w, b = inputs(2, 16, 8, 8, 8, seed=seed_of(where, big))
        dy = torch.randn(2, 8, 16, 16)
        if where == "x":
            x[1, 3, 2, 5] = big
        elif where == "w":
            w[4, 2, 1, 3] = big * w.abs().mean()
        elif where == "dz":
            dy[0, 1, 4, 4] = big
        with B.cpu_winograd("always"), B.use_backend("cpu"):
            if where == "conv2d_x":
                xc = torch.randn(2, 8, 16, 16)
                xc[0, 2, 7, 7] = big
                wc = torch.randn(16, 8, 4, 4) / 8
                before = products()
                y = GF.conv2d(xc, wc, None, 2, 1)
                assert products() == before + int(taken), (where, big)
                assert_close(y, F.conv2d(xc.double(), wc.double(), None, 2, 1), msg=f"{where} {big}")
                continue
            xs = x.clone().requires_grad_()
            before = products()
            y = run(xs, w, b)
            (gx,) = torch.autograd.grad(y, (xs,), dy)
        # an outlier in x leaves grad_input (from dz and w) to Winograd, one in dz the forward
        expect = 2 if taken else (0 if where == "w" else 1)
        assert products() == before + expect, (where, big)
        xr = x.double().requires_grad_()
        yr = ref(xr, w, b)
        (rx,) = torch.autograd.grad(yr, (xr,), dy.double())
        # the direct product's error is relative to the terms each value sums (the outlier's
        # own outputs are of order 1e8); elsewhere it must be float32's usual
        assert_close(y, yr.detach(), msg=f"{where} {big} output")
        assert_close(gx, rx, msg=f"{where} {big} grad_input")
