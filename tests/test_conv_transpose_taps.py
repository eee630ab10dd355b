"""The CPU transposed convolution's tap product (csrc/cpu/conv_transpose_taps.cpp: our own AVX2
GEMM over the (pixel, tap) pairs that land in the output, added straight into the output) and its
place in the forward (before the GEMM form and ATen's product, after Winograd's). Every expected
value comes from F.conv_transpose2d and torch's activations in float64; genfast's counter
(cpu_tap_products) shows which calls ran it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import genfast  # noqa: F401  (registers the ops)
import genfast.functional as GF
import genfast.nn as gnn
from genfast import backend as B
from tests.utils import assert_close, avx2_host, has_avx512, on_threads


pytestmark = pytest.mark.skipif(not avx2_host(), reason="the tap product needs genfast._C on an AVX2 + FMA CPU")

CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "tanh": 3, "sigmoid": 4}
SLOPE = 0.2
TORCH_ACT = {"identity": lambda z: z, "relu": F.relu, "leaky_relu": lambda z: F.leaky_relu(z, SLOPE),
             "tanh": torch.tanh, "sigmoid": torch.sigmoid}

# (N, C_in, C_out, H, W, kernel, stride, padding, output_padding, dilation). Between them: the
# DCGAN k4 s2 p1 and Keras k5 s2 p2 layers at small sizes, output channels that are not a
# multiple of 16 (a partial last block: 17, 5, 40), a batch that is not a multiple of the 4-row
# tile (1, 3, 5: tiles mixing pixels), one input channel, stride 1 and 3, dilation, output
# padding, padding larger than the kernel's reach (taps all outside for some pixels),
# non-square maps and kernels, a 1x1 input.
CASES = [
    (8, 32, 32, 4, 4, (4, 4), (2, 2), (1, 1), (0, 0), (1, 1)),
    (3, 20, 17, 7, 7, (5, 5), (2, 2), (2, 2), (1, 1), (1, 1)),
    (1, 9, 40, 5, 3, (3, 4), (3, 2), (1, 2), (2, 1), (1, 1)),
    (5, 1, 5, 6, 6, (3, 3), (1, 1), (1, 1), (0, 0), (2, 2)),
    (2, 300, 33, 3, 4, (4, 4), (2, 2), (1, 1), (0, 0), (1, 1)),
    (4, 7, 18, 1, 1, (4, 4), (1, 1), (0, 0), (0, 0), (1, 1)),
    (2, 6, 16, 4, 4, (2, 2), (2, 2), (3, 3), (1, 1), (1, 1)),
    (5, 12, 21, 5, 6, (5, 5), (2, 2), (2, 2), (1, 1), (1, 1)),
]


def _inputs(case, g, bias=True):
    N, ci, co, H, W, k, s, p, op, d = case
    x = torch.randn(N, ci, H, W, generator=g)
    w = torch.randn(ci, co, *k, generator=g) / (ci * k[0] * k[1]) ** 0.5
    b = torch.randn(co, generator=g) if bias else None
    return x, w, b


def _ref(x, w, b, case, act):
    N, ci, co, H, W, k, s, p, op, d = case
    bd = b.double() if b is not None else None
    return TORCH_ACT[act](F.conv_transpose2d(x.double(), w.double(), bd, s, p, op, 1, d))


@pytest.fixture(autouse=True)
def _tap_always():
    """This module tests the tap product itself, at every shape (Winograd's product, which goes
    first where it takes the shape, off)."""
    with B.cpu_tap_gemm("always"), B.cpu_winograd("never"):
        yield


@pytest.mark.parametrize("act", list(CODES))
@pytest.mark.parametrize("ci", range(len(CASES)))
def test_tap_product_matches_float64(ci, act):
    """Output and the epilogue's BatchNorm statistics (count, mean, M2 of the stored output) of the
    forward op that runs the tap product, against float64; one tap product per call."""
    case = CASES[ci]
    N, _, co, H, W, k, s, p, op, d = case
    g = torch.Generator().manual_seed(1000 + ci)
    x, w, b = _inputs(case, g, bias=ci % 2 == 0)
    before = B.extension().cpu_tap_products()
    y, part, _ = torch.ops.genfast.conv_transpose2d_fwd(x, w, b, s, p, op, 1, d, CODES[act], SLOPE, True)
    assert B.extension().cpu_tap_products() == before + 1
    yr = _ref(x, w, b, case, act)
    assert y.shape == yr.shape and y.is_contiguous()
    assert_close(y, yr, msg="output")
    count = y.numel() // co
    assert torch.equal(part[0, 0], torch.full((co,), float(count), dtype=torch.float64))
    assert_close(part[1, 0], yr.mean((0, 2, 3)), dtype=torch.float32, msg="mean")
    m2 = ((yr - yr.mean((0, 2, 3), keepdim=True)) ** 2).sum((0, 2, 3))
    assert_close(part[2, 0], m2, dtype=torch.float32, msg="M2", scale=count)


@pytest.mark.parametrize("ci", [0, 1, 2])
def test_tap_product_gradients_through_the_eager_op(ci):
    """Forward by the tap product, backward by the existing paths: the output and all three
    gradients of the eager op match float64."""
    case = CASES[ci]
    N, _, co, H, W, k, s, p, op, d = case
    g = torch.Generator().manual_seed(2000 + ci)
    x, w, b = _inputs(case, g)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    before = B.extension().cpu_tap_products()
    y = torch.ops.genfast.conv_transpose2d_act(xs, ws, bs, s, p, op, 1, d, CODES["leaky_relu"], SLOPE)
    assert B.extension().cpu_tap_products() == before + 1
    dy = torch.randn(y.shape, generator=g)
    xd, wd, bd = (t.double().requires_grad_() for t in (x, w, b))
    yr = F.leaky_relu(F.conv_transpose2d(xd, wd, bd, s, p, op, 1, d), SLOPE)
    want = torch.autograd.grad(yr, (xd, wd, bd), dy.double())
    assert_close(y, yr, msg="output")
    for got, ref, name in zip(torch.autograd.grad(y, (xs, ws, bs), dy), want, ("input", "weight", "bias")):
        assert_close(got, ref, msg=f"grad_{name}")


@pytest.mark.parametrize("special", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["x_corner", "x_inner", "w_edge_tap"])
@pytest.mark.parametrize("ci", [0, 1])
def test_tap_product_special_values_like_torch(ci, where, special):
    """A NaN or inf reaches exactly the outputs torch's float64 result has it in: a corner pixel
    (whose outside taps the tap product skips and torch's product computes and drops), an inner
    one, and a weight tap that lands outside for the edge pixels."""
    case = CASES[ci]
    N, _, co, H, W, k, s, p, op, d = case
    g = torch.Generator().manual_seed(3000 + ci)
    x, w, b = _inputs(case, g)
    if where == "x_corner":
        x[N - 1, 2, 0, 0] = special
    elif where == "x_inner":
        x[0, 1, H // 2, W // 2] = special
    else:
        w[3, 5, 0, 0] = special
    before = B.extension().cpu_tap_products()
    y = torch.ops.genfast.conv_transpose2d_act(x, w, b, s, p, op, 1, d, CODES["identity"], SLOPE)
    assert B.extension().cpu_tap_products() == before + 1
    yr = _ref(x, w, b, case, "identity")
    assert torch.equal(torch.isnan(y), torch.isnan(yr))
    assert torch.equal(torch.isinf(y) & (y > 0), torch.isinf(yr) & (yr > 0))
    assert torch.equal(torch.isinf(y) & (y < 0), torch.isinf(yr) & (yr < 0))
    fin = torch.isfinite(yr)
    assert fin.any()
    assert_close(y[fin], yr[fin], msg="finite outputs")


@pytest.mark.parametrize("ci", [0, 1, 4])
def test_tap_product_deterministic_across_thread_counts(ci):
    """Each output value sums its terms in a fixed order whatever the thread count: bitwise equal
    results on 1, 2 and 3 threads, and from call to call."""
    case = CASES[ci]
    N, _, co, H, W, k, s, p, op, d = case
    g = torch.Generator().manual_seed(4000 + ci)
    x, w, b = _inputs(case, g)
    outs = on_threads((1, 2, 3, 2),
                       lambda: torch.ops.genfast.conv_transpose2d_act(x, w, b, s, p, op, 1, d, CODES["relu"], SLOPE))
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    assert_close(outs[0], _ref(x, w, b, case, "relu"))


def test_tap_product_not_taken_where_it_does_not_apply():
    """float64, a channels_last input or weight, groups > 1 and an empty batch do not take the tap
    product (even under "always") and still match torch; "never" turns it off."""
    g = torch.Generator().manual_seed(5)
    case = CASES[0]
    N, ci, co, H, W, k, s, p, op, d = case
    x, w, b = _inputs(case, g)
    ext = B.extension()
    variants = {
        "float64": (x.double(), w.double(), b.double(), 1),
        "channels_last x": (x.contiguous(memory_format=torch.channels_last), w, b, 1),
        "channels_last w": (x, w.contiguous(memory_format=torch.channels_last), b, 1),
        "groups 2": (x, w[:, : co // 2].contiguous(), b, 2),
        "empty batch": (x[:0], w, b, 1),
    }
    for name, (xv, wv, bv, groups) in variants.items():
        before = ext.cpu_tap_products()
        y = torch.ops.genfast.conv_transpose2d_act(xv, wv, bv, s, p, op, groups, d, CODES["relu"], SLOPE)
        assert ext.cpu_tap_products() == before, name
        yr = F.relu(F.conv_transpose2d(xv.double(), wv.double(), bv.double(), s, p, op, groups, d))
        assert y.shape == yr.shape, name
        assert_close(y, yr, dtype=torch.float32, msg=name)
    with B.cpu_tap_gemm("never"):
        before = ext.cpu_tap_products()
        y = torch.ops.genfast.conv_transpose2d_act(x, w, b, s, p, op, 1, d, CODES["relu"], SLOPE)
        assert ext.cpu_tap_products() == before
    assert_close(y, _ref(x, w, b, case, "relu"))


@pytest.mark.parametrize("layer", ["dcgan2", "keras1", "dcgan4"])
def test_tap_product_auto_by_shape(layer):
    """Under "auto" (Winograd off) the tap product takes the layers where at most 90% of the
    (pixel, tap) pairs land in the output, on CPUs without AVX-512: the DCGAN 4x4 -> 8x8 layer
    (76.6%) and the Keras 7x7 -> 14x14 k5 s2 layer (83.5%), not the 16x16 -> 32x32 one (93.8%)."""
    shapes = {"dcgan2": (2, 64, 32, 4, 4, 2, 1, 0), "keras1": (2, 32, 32, 7, 5, 2, 2, 1),
              "dcgan4": (2, 16, 32, 16, 4, 2, 1, 0)}
    N, ci, co, H, k, s, p, op = shapes[layer]
    g = torch.Generator().manual_seed(6)
    x, w, b = torch.randn(N, ci, H, H, generator=g), torch.randn(ci, co, k, k, generator=g) / 8, torch.randn(co)
    ext = B.extension()
    with B.cpu_tap_gemm("auto"):
        assert B.get_cpu_tap_gemm() == "auto"
        before = ext.cpu_tap_products()
        (y,) = on_threads((2,), lambda: GF.conv_transpose2d(x, w, b, s, p, op, activation="relu"))
        took = ext.cpu_tap_products() - before
    assert took == (0 if layer == "dcgan4" or has_avx512() else 1)
    assert_close(y, F.relu(F.conv_transpose2d(x.double(), w.double(), b.double(), s, p, op)))


def test_tap_gemm_mode_setting():
    """set_cpu_tap_gemm takes "auto", "always" or "never" (anything else: ValueError naming the
    mode, the setting unchanged); the context manager restores the previous mode."""
    assert B.get_cpu_tap_gemm() == "always"
    with B.cpu_tap_gemm("never"):
        assert B.get_cpu_tap_gemm() == "never"
        with pytest.raises(ValueError, match="mode must be 'auto', 'always' or 'never', got 'fast'"):
            B.set_cpu_tap_gemm("fast")
        assert B.get_cpu_tap_gemm() == "never"
    assert B.get_cpu_tap_gemm() == "always"


def test_block_training_step_with_the_tap_product():
    """ConvTransposeBNAct2d in training (its forward takes the tap product with the epilogue's
    statistics) against nn.ConvTranspose2d -> nn.BatchNorm2d -> nn.ReLU in float64: output, running
    statistics and parameter gradients."""
    torch.manual_seed(7)
    block = gnn.ConvTransposeBNAct2d(24, 20, 5, 2, 2, 1, activation="relu")
    ref = torch.nn.Sequential(torch.nn.ConvTranspose2d(24, 20, 5, 2, 2, 1), torch.nn.BatchNorm2d(20),
                              torch.nn.ReLU()).double()
    ref.load_state_dict(block.state_dict())
    x = torch.randn(3, 24, 7, 7)
    ext = B.extension()
    with B.use_backend("cpu"):
        before = ext.cpu_tap_products()
        y = block(x)
        assert ext.cpu_tap_products() == before + 1
    yr = ref(x.double())
    assert_close(y, yr, msg="output")
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy.double())
    # (4x float32's tolerance: the conv bias's gradient is 0 in exact arithmetic - BatchNorm
    # removes the mean - and float32 leaves a residue of a sum of 3 * 14 * 14 terms, up to 2.3e-5)
    for (name, p), (_, q) in zip(block.named_parameters(), ref.named_parameters()):
        assert_close(p.grad, q.grad, dtype=torch.float32, scale=4, msg=name)
    for (name, bt), (_, bq) in zip(block.named_buffers(), ref.named_buffers()):
        assert_close(bt.double(), bq, dtype=torch.float32, msg=name)


# backward cases that do not take the GEMM form's backward (k5 s2: more than 4 columns per
# output value; stride 1), so that grad_input and grad_weight come from the tap products
BWD_CASES = [1, 3, 7]


@pytest.mark.parametrize("act", ["leaky_relu", "identity", "tanh"])
@pytest.mark.parametrize("ci", BWD_CASES)
def test_tap_backward_matches_float64(ci, act):
    """grad_input and grad_weight by the tap products (one each, seen on genfast's counter), and
    grad_bias, against float64."""
    case = CASES[ci]
    N, _, co, H, W, k, s, p, op, d = case
    g = torch.Generator().manual_seed(8000 + ci)
    x, w, b = _inputs(case, g)
    y = torch.ops.genfast.conv_transpose2d_act(x, w, b, s, p, op, 1, d, CODES[act], SLOPE)
    dy = torch.randn(y.shape, generator=g)
    before = B.extension().cpu_tap_products()
    dx, dw, db = torch.ops.genfast.conv_transpose2d_bwd(dy, x, w, y, s, p, d, 1, CODES[act], SLOPE, True, True, True)
    assert B.extension().cpu_tap_products() == before + 2
    xd, wd, bd = (t.double().requires_grad_() for t in (x, w, b))
    yr = TORCH_ACT[act](F.conv_transpose2d(xd, wd, bd, s, p, op, 1, d))
    want = torch.autograd.grad(yr, (xd, wd, bd), dy.double())
    for got, ref, name in zip((dx, dw, db), want, ("input", "weight", "bias")):
        assert got.shape == ref.shape and got.is_contiguous()
        assert_close(got, ref, msg=f"grad_{name}")
    # one of the two asked for: one product
    before = B.extension().cpu_tap_products()
    dx2, dw2, _ = torch.ops.genfast.conv_transpose2d_bwd(dy, x, w, y, s, p, d, 1, CODES[act], SLOPE, False, True, True)
    assert B.extension().cpu_tap_products() == before + 1 and dx2.numel() == 0
    assert torch.equal(dw2, dw)


@pytest.mark.parametrize("special", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["x", "w", "dy"])
def test_tap_backward_special_values_like_torch(where, special):
    """A non-finite value in x, w or dy reaches the gradients through the (pixel, tap) pairs that
    land in the output only: NaN and inf exactly where torch's float32 gradients (oneDNN's product,
    which skips the same pairs) have them; torch's float64 product multiplies the zeros it puts
    outside the output, so its NaN pattern covers at least ours. Finite values as float64's."""
    case = CASES[1]
    N, _, co, H, W, k, s, p, op, d = case
    g = torch.Generator().manual_seed(9)
    x, w, b = _inputs(case, g)
    y = torch.ops.genfast.conv_transpose2d_act(x, w, b, s, p, op, 1, d, CODES["identity"], SLOPE)
    dy = torch.randn(y.shape, generator=g)
    if where == "x":
        x[0, 1, 0, 0] = special
    elif where == "w":
        w[2, 3, 0, 0] = special
    else:
        dy[1, 4, 0, 1] = special
    before = B.extension().cpu_tap_products()
    dx, dw, _ = torch.ops.genfast.conv_transpose2d_bwd(dy, x, w, y, s, p, d, 1, CODES["identity"], SLOPE, True, True,
                                                       True)
    assert B.extension().cpu_tap_products() == before + 2
    x32, w32 = x.clone().requires_grad_(), w.clone().requires_grad_()
    t32 = torch.autograd.grad(F.conv_transpose2d(x32, w32, b, s, p, op, 1, d), (x32, w32), dy)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    t64 = torch.autograd.grad(F.conv_transpose2d(xd, wd, b.double(), s, p, op, 1, d), (xd, wd), dy.double())
    for got, ref32, ref, name in zip((dx, dw), t32, t64, ("input", "weight")):
        assert torch.equal(torch.isnan(got), torch.isnan(ref32)), name
        assert torch.equal(torch.isinf(got), torch.isinf(ref32)), name
        assert not (torch.isnan(got) & ~torch.isnan(ref)).any(), name
        fin = torch.isfinite(ref)
        assert fin.any()
        assert_close(got[fin], ref[fin], msg=name)


def test_tap_backward_deterministic_across_thread_counts():
    """The backward's products split the channels over threads, each value summed in a fixed
    order: bitwise equal on 1, 2 and 3 threads."""
    case = CASES[7]
    N, _, co, H, W, k, s, p, op, d = case
    g = torch.Generator().manual_seed(10)
    x, w, b = _inputs(case, g)
    y = torch.ops.genfast.conv_transpose2d_act(x, w, b, s, p, op, 1, d, CODES["relu"], SLOPE)
    dy = torch.randn(y.shape, generator=g)
    outs = on_threads((1, 2, 3), lambda: torch.ops.genfast.conv_transpose2d_bwd(
        dy, x, w, y, s, p, d, 1, CODES["relu"], SLOPE, True, True, True))
    for o in outs[1:]:
        for a, r in zip(o, outs[0]):
            assert torch.equal(a, r)
