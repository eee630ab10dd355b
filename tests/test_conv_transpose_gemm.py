"""The CPU transposed convolution's GEMM form (csrc/cpu/conv_transpose.cpp: one BLAS product, then
our col2im epilogue; backward: our im2col prologue, then two products) and the eager op around it,
genfast::conv_transpose2d_act (C++ autograd; torch's own op for arguments its kernel does not
take). Every expected value comes from F.conv_transpose2d and torch's activations in float64."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import genfast  # noqa: F401  (registers the ops)
import genfast.nn as gnn
from genfast import backend as B
from tests.utils import assert_close

pytestmark = pytest.mark.skipif(not B.has_cpu_ext(), reason="genfast._C not built")

CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "tanh": 3, "sigmoid": 4}
SLOPE = 0.2
TORCH_ACT = {"identity": lambda z: z, "relu": F.relu, "leaky_relu": lambda z: F.leaky_relu(z, SLOPE),
             "tanh": torch.tanh, "sigmoid": torch.sigmoid}

# (N, C_in, C_out, H, W, kernel, stride, padding, output_padding, dilation): each takes the GEMM
# form's forward (groups 1, NCHW, stride > 1 or a 1x1 input). Cases 0-5 and 11 have up to 8
# output channels (the plane layout of the columns), 6-10 more (the row layout). Between them:
# one image (products on views), products over the batch, a thread per image (>= 128 input
# pixels, at least as many images as threads: N = 4 here), 1x1 inputs, odd strides (the
# general interleave), dilation and output padding, border taps, phase rows wider than the
# input (11: no flat runs).
GEMM_CASES = [
    (1, 3, 5, 4, 5, (4, 4), (2, 2), (1, 1), (0, 0), (1, 1)),
    (3, 4, 6, 4, 4, (4, 4), (2, 2), (1, 1), (0, 0), (1, 1)),
    (2, 5, 7, 1, 1, (4, 4), (1, 1), (0, 0), (0, 0), (1, 1)),
    (2, 4, 1, 7, 6, (5, 5), (2, 2), (2, 2), (1, 1), (1, 1)),
    (4, 3, 5, 12, 11, (4, 3), (2, 3), (1, 0), (1, 2), (1, 1)),
    (2, 3, 4, 4, 4, (3, 2), (3, 1), (0, 1), (2, 0), (2, 3)),
    (1, 6, 12, 5, 4, (4, 4), (2, 2), (1, 1), (0, 0), (1, 1)),
    (3, 5, 10, 4, 4, (3, 3), (2, 2), (1, 1), (1, 1), (1, 1)),
    (2, 6, 16, 1, 1, (4, 4), (1, 1), (0, 0), (0, 0), (1, 1)),
    (4, 3, 9, 12, 11, (4, 3), (2, 3), (1, 0), (1, 2), (1, 1)),
    (2, 3, 10, 4, 4, (3, 2), (3, 1), (0, 1), (2, 0), (2, 3)),
    (2, 3, 2, 5, 5, (4, 4), (2, 2), (0, 0), (0, 0), (1, 1)),
]
PLANE, ROWS = 1, 7  # a case of each layout, over a batch


@pytest.fixture(autouse=True)
def _row_gemm_always():
    """The row layout's forward runs by default only for some shapes (B.set_cpu_row_gemm): this
    module tests the GEMM form itself, at every shape."""
    with B.cpu_row_gemm("always"):
        yield


def _ref(x, w, b, case, act, dy):
    N, ci, co, H, W, k, s, p, op, d = case
    xs, ws = x.double().requires_grad_(), w.double().requires_grad_()
    bs = b.double().requires_grad_() if b is not None else None
    y = TORCH_ACT[act](F.conv_transpose2d(xs, ws, bs, s, p, op, 1, d))
    grads = torch.autograd.grad(y, [t for t in (xs, ws, bs) if t is not None], dy.double())
    return y.detach(), grads


def _inputs(case, dtype, bias=True):
    N, ci, co, H, W, k, s, p, op, d = case
    x = torch.randn(N, ci, H, W, dtype=dtype)
    w = torch.randn(ci, co, *k, dtype=dtype) / (ci * k[0] * k[1]) ** 0.5
    b = torch.randn(co, dtype=dtype) if bias else None
    return x, w, b


def _check_output_and_statistics(y, part, yr, dtype):
    """The forward's output against float64, and the epilogue's per-channel statistics of the
    stored output: count, mean and M2."""
    co = y.shape[1]
    assert_close(y, yr, msg="output")
    count = y.numel() // co
    assert torch.equal(part[0, 0], torch.full((co,), float(count), dtype=torch.float64))
    assert_close(part[1, 0], yr.mean((0, 2, 3)), dtype=dtype, msg="mean")
    m2 = ((yr - yr.mean((0, 2, 3), keepdim=True)) ** 2).sum((0, 2, 3))
    assert_close(part[2, 0], m2, dtype=dtype, msg="M2", scale=count)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", list(CODES))
@pytest.mark.parametrize("ci", range(len(GEMM_CASES)))
def test_gemm_form_matches_float64(ci, act, dtype):
    case = GEMM_CASES[ci]
    N, _, co, H, W, k, s, p, op, d = case
    x, w, b = _inputs(case, dtype, bias=ci % 2 == 0)
    y, part, _ = torch.ops.genfast.conv_transpose2d_fwd(x, w, b, s, p, op, 1, d, CODES[act], SLOPE, True)
    dy = torch.randn_like(y)
    yr, grads = _ref(x, w, b, case, act, dy)
    _check_output_and_statistics(y, part, yr, dtype)
    dx, dw, db = torch.ops.genfast.conv_transpose2d_bwd(dy, x, w, y, s, p, d, 1, CODES[act], SLOPE,
                                                        True, True, b is not None)
    assert_close(dx, grads[0], msg="grad_input")
    assert_close(dw, grads[1], msg="grad_weight")
    if b is not None:
        assert_close(db, grads[2], msg="grad_bias")
    else:
        assert db.numel() == 0


@pytest.mark.parametrize("layout", [PLANE, ROWS, 4, 9])  # 4, 9: a thread per image
@pytest.mark.parametrize("special", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu", "tanh"])
def test_gemm_form_special_values_like_torch(special, act, layout):
    """A NaN or inf in the input reaches exactly the outputs (and the weight gradient) torch's
    float64 result has it in: the product, col2im and im2col drop no tap and mix no tap in."""
    case = GEMM_CASES[layout]
    N, _, co, H, W, k, s, p, op, d = case
    x, w, b = _inputs(case, torch.float32)
    x[1, 2, 1, 3] = special
    y = torch.ops.genfast.conv_transpose2d_act(x, w, b, s, p, op, 1, d, CODES[act], SLOPE)
    wg = w.clone().requires_grad_()
    dy = torch.randn_like(y)
    yr, grads = _ref(x, w, b, case, act, dy)
    assert torch.equal(torch.isnan(y), torch.isnan(yr))
    assert torch.equal(torch.isinf(y) & (y > 0), torch.isinf(yr) & (yr > 0))
    assert torch.equal(torch.isinf(y) & (y < 0), torch.isinf(yr) & (yr < 0))
    fin = torch.isfinite(yr)
    assert_close(y[fin], yr[fin], msg="finite outputs")
    y2 = torch.ops.genfast.conv_transpose2d_act(x, wg, b, s, p, op, 1, d, CODES[act], SLOPE)
    (gw,) = torch.autograd.grad(y2, wg, dy)
    assert torch.equal(torch.isnan(gw), torch.isnan(grads[1]))
    fin = torch.isfinite(grads[1])
    assert_close(gw[fin], grads[1][fin], msg="finite grad_weight")


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "tanh", "sigmoid", "identity"])
def test_eager_op_gradcheck_and_gradgradcheck(act):
    torch.manual_seed(1)
    case = GEMM_CASES[3]
    N, _, co, H, W, k, s, p, op, d = case
    x, w, b = _inputs((2, 2, 3, 3, 3, k, s, p, op, d), torch.float64)
    x, w, b = (t.requires_grad_() for t in (x, w, b))

    def fn(x, w, b):
        return torch.ops.genfast.conv_transpose2d_act(x, w, b, s, p, op, 1, d, CODES[act], SLOPE)

    # the C++ node, not torch's fallback
    assert fn(x, w, b).grad_fn.name().endswith("ConvTransposeAct>")
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("ci", [1, 9])  # over the batch; a thread per image
def test_eager_op_only_the_requested_gradients(ci):
    case = GEMM_CASES[ci]
    N, _, co, H, W, k, s, p, op, d = case
    x, w, b = _inputs(case, torch.float64)
    w.requires_grad_()
    y = torch.ops.genfast.conv_transpose2d_act(x, w, b, s, p, op, 1, d, CODES["relu"], SLOPE)
    dy = torch.randn_like(y)
    (gw,) = torch.autograd.grad(y, w, dy)
    _, grads = _ref(x, w.detach(), b, case, "relu", dy)
    assert_close(gw, grads[1])
    assert x.grad is None


@pytest.mark.parametrize("kind", ["groups", "channels_last", "unbatched", "bfloat16", "empty_batch", "stride_one"])
def test_eager_op_falls_back_to_torch(kind):
    """Arguments the C++ kernel does not take run torch's own op: the result is torch's, bit for
    bit (the same ATen calls), with torch's autograd node."""
    g, x_shape, dtype, stride = 1, (2, 4, 3, 3), torch.float32, 2
    if kind == "groups":
        g = 2
    elif kind == "unbatched":
        x_shape = (4, 3, 3)
    elif kind == "bfloat16":
        dtype = torch.bfloat16
    elif kind == "empty_batch":
        x_shape = (0, 4, 3, 3)
    elif kind == "stride_one":
        stride = 1  # stride 1 from a 3x3 input: ATen's product
    x = torch.randn(*x_shape, dtype=dtype)
    if kind == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(4, 12 // g, 4, 4, dtype=dtype, requires_grad=True)
    b = torch.randn(12, dtype=dtype, requires_grad=True)
    y = torch.ops.genfast.conv_transpose2d_act(x, w, b, (stride, stride), (1, 1), (0, 0), g, (1, 1), 2, SLOPE)
    expect = F.leaky_relu(F.conv_transpose2d(x, w, b, stride, 1, 0, g, 1), SLOPE)
    assert torch.equal(y, expect)
    assert not y.grad_fn.name().endswith("ConvTransposeAct>")
    dy = torch.randn_like(y)
    assert all(torch.equal(a, e) for a, e in zip(torch.autograd.grad(y, (w, b), dy),
                                                  torch.autograd.grad(expect, (w, b), dy)))


def test_eager_op_bad_input_raises_torch_exception():
    x, w = torch.randn(2, 4, 3, 3), torch.randn(5, 6, 4, 4)
    with pytest.raises(RuntimeError) as ours:
        torch.ops.genfast.conv_transpose2d_act(x, w, None, (2, 2), (1, 1), (0, 0), 1, (1, 1), 1, 0.0)
    with pytest.raises(RuntimeError) as theirs:
        F.conv_transpose2d(x, w, None, 2, 1)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("ci", [1, 4, 7, 9])
def test_gemm_form_deterministic_across_thread_counts(ci):
    """Over the batch (1, 7) and a thread per image (4, 9; N = 4 >= both thread counts), in each
    layout of the columns."""
    case = GEMM_CASES[ci]
    N, _, co, H, W, k, s, p, op, d = case
    x, w, b = _inputs(case, torch.float32)
    Ho, Wo = ((H - 1) * s[0] - 2 * p[0] + d[0] * (k[0] - 1) + op[0] + 1,
              (W - 1) * s[1] - 2 * p[1] + d[1] * (k[1] - 1) + op[1] + 1)
    dy = torch.linspace(-1, 1, N * co * Ho * Wo).view(N, co, Ho, Wo)

    def run():
        y, part, _ = torch.ops.genfast.conv_transpose2d_fwd(x, w, b, s, p, op, 1, d, 2, SLOPE, True)
        return (y, part, *torch.ops.genfast.conv_transpose2d_bwd(dy, x, w, y, s, p, d, 1, 2, SLOPE,
                                                                 True, True, True))

    prev = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            first, again = run(), run()
            # the same thread count: bit for bit, outputs, statistics and every gradient
            assert all(torch.equal(a, e) for a, e in zip(first, again))
            results[threads] = first
    finally:
        torch.set_num_threads(prev)
    # across thread counts BLAS may block its sums differently; our passes add nothing to that
    for a, e in zip(results[1], results[2]):
        assert_close(a, e)


def test_module_and_block_take_the_eager_op():
    """gnn.ConvTranspose2d and the ConvT+BN+act block on eager CPU calls run the C++ op (its
    autograd node), and match torch's modules in float64."""
    torch.manual_seed(2)
    m = gnn.ConvTranspose2d(8, 6, 4, 2, 1, activation="relu").double()
    ref = torch.nn.ConvTranspose2d(8, 6, 4, 2, 1).double()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    y = m(x)
    assert y.grad_fn.name().endswith("ConvTransposeAct>")
    assert_close(y, F.relu(ref(x)))
    blk = gnn.ConvTransposeBNAct2d(8, 6, 4, 2, 1, activation="relu").double()
    seq = torch.nn.Sequential(torch.nn.ConvTranspose2d(8, 6, 4, 2, 1), torch.nn.BatchNorm2d(6),
                              torch.nn.ReLU()).double()
    seq.load_state_dict(blk.state_dict())
    yb, ys = blk(x), seq(x)
    assert_close(yb, ys)
    gb = torch.autograd.grad(yb.sum(), blk[0].weight)[0]
    gs = torch.autograd.grad(ys.sum(), seq[0].weight)[0]
    assert_close(gb, gs, scale=10)
    assert_close(blk[1].running_var, seq[1].running_var)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_eager_op_opcheck(requires_grad):
    """Schema, fake (meta) output, autograd registration and dispatch of genfast::conv_transpose2d_act."""
    case = GEMM_CASES[1]
    N, _, co, H, W, k, s, p, op, d = case
    x, w, b = _inputs(case, torch.float32)
    for t in (x, w, b):
        t.requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.genfast.conv_transpose2d_act.default,
                          (x, w, b, list(s), list(p), list(op), 1, list(d), CODES["leaky_relu"], SLOPE))


def test_eager_op_compiles_fullgraph():
    """The op traces under torch.compile(fullgraph=True) through its fake and matches eager."""
    case = GEMM_CASES[1]
    N, _, co, H, W, k, s, p, op, d = case
    x, w, b = _inputs(case, torch.float32)

    def fn(x, w, b):
        return torch.ops.genfast.conv_transpose2d_act(x, w, b, s, p, op, 1, d, CODES["tanh"], SLOPE)

    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend="eager")(x, w, b)
    assert_close(got, fn(x, w, b))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gemm_form_large_batch_in_chunks(dtype):
    """A batch whose columns exceed one product's budget (32 MiB) runs chunk by chunk of images:
    outputs, statistics and every gradient (grad_weight summed over the chunks) as in float64."""
    case = (600, 2, 64, 4, 4, (4, 4), (2, 2), (1, 1), (0, 0), (1, 1))  # 64 KiB of float columns per image
    N, _, co, H, W, k, s, p, op, d = case
    x, w, b = _inputs(case, dtype)
    y, part, _ = torch.ops.genfast.conv_transpose2d_fwd(x, w, b, s, p, op, 1, d, CODES["leaky_relu"], SLOPE, True)
    dy = torch.randn_like(y)
    yr, grads = _ref(x, w, b, case, "leaky_relu", dy)
    assert_close(y, yr, msg="output")
    assert_close(part[1, 0], yr.mean((0, 2, 3)), dtype=dtype, msg="mean")
    dx, dw, db = torch.ops.genfast.conv_transpose2d_bwd(dy, x, w, y, s, p, d, 1, CODES["leaky_relu"], SLOPE,
                                                        True, True, True)
    assert_close(dx, grads[0], msg="grad_input")
    assert_close(dw, grads[1], msg="grad_weight", scale=10)
    assert_close(db, grads[2], msg="grad_bias", scale=10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemm_form_low_precision(dtype):
    """float16 / bfloat16 (the registered op, as torch.compile runs it): the products in float32
    on float32 copies, one rounding on the way out; the error against float64 stays within a few
    units in the last place of the dtype."""
    case = GEMM_CASES[1]
    N, _, co, H, W, k, s, p, op, d = case
    x, w, b = _inputs(case, torch.float32)
    xl, wl, bl = x.to(dtype), w.to(dtype), b.to(dtype)
    y, _, _ = torch.ops.genfast.conv_transpose2d_fwd(xl, wl, bl, s, p, op, 1, d, CODES["relu"], SLOPE, False)
    assert y.dtype == dtype
    dy = torch.randn(y.shape).to(dtype)
    yr, grads = _ref(xl.float(), wl.float(), bl.float(), case, "relu", dy.float())
    eps = torch.finfo(dtype).eps
    assert ((y.double() - yr).abs() <= 4 * eps * (yr.abs() + 1)).all()
    dx, dw, db = torch.ops.genfast.conv_transpose2d_bwd(dy, xl, wl, y, s, p, d, 1, CODES["relu"], SLOPE,
                                                        True, True, True)
    for got, want in zip((dx, dw, db), grads):
        assert got.dtype == dtype
        assert ((got.double() - want).abs() <= 8 * eps * (want.abs().max() + 1)).all()


@pytest.mark.parametrize("ci", [4, 9])
def test_thread_per_image_with_inputs_that_require_grad(ci):
    """The registered forward called on tensors that require grad (as export and the block's
    autograd.Function call it): the products on the pool's threads run below autograd too."""
    case = GEMM_CASES[ci]
    N, _, co, H, W, k, s, p, op, d = case
    x, w, b = _inputs(case, torch.float64)
    for t in (x, w, b):
        t.requires_grad_()
    y, _, _ = torch.ops.genfast.conv_transpose2d_fwd(x, w, b, s, p, op, 1, d, CODES["relu"], SLOPE, False)
    yr, _ = _ref(x.detach(), w.detach(), b.detach(), case, "relu", torch.zeros(y.shape, dtype=torch.float64))
    assert_close(y.detach(), yr)


@pytest.mark.parametrize("act", ["tanh", "sigmoid"])
def test_float32_tanh_sigmoid_epilogue_accuracy(act):
    """The epilogues' own float32 tanh and sigmoid (vectorised, not libm) against float64: within
    2 float32 ulps over magnitudes 1e-6 to 100; sigmoid's outputs below float32's normal range
    within two subnormal steps of the true value (torch's float32 sigmoid flushes them to 0 from
    x < -88.7); NaN and +-inf as torch. The values pass through exactly: a 1x1 kernel of weight 1 at stride 2 puts
    act(x) at the even output pixels."""
    torch.manual_seed(5)
    v = torch.cat([torch.randn(20000) * s for s in (1e-6, 1e-3, 0.1, 1, 3, 10, 30, 100)]
                  + [torch.tensor([0.0, float("inf"), -float("inf"), float("nan"), 87.0, -87.0, -87.4, -100.0,
                                   -103.0, -105.0, 1e-30, -1e-30, 9.0, 44.0, -44.0])])
    y = torch.ops.genfast.conv_transpose2d_act(v.view(1, 1, 1, -1), torch.ones(1, 1, 1, 1), None, (2, 2), (0, 0),
                                               (0, 0), 1, (1, 1), CODES[act], 0.0)[0, 0, 0, ::2]
    ref = TORCH_ACT[act](v.double())
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    fin = torch.isfinite(ref)
    tiny = torch.finfo(torch.float32).tiny
    normal = fin & (ref.abs() >= tiny)
    ulps = (y.double() - ref).abs()[normal] / (torch.finfo(torch.float32).eps * ref.abs()[normal])
    assert ulps.max() <= 2.0, ulps.max()
    sub = fin & ~normal
    assert (sub & (ref != 0)).any() == (act == "sigmoid")  # sigmoid reaches subnormal outputs
    assert ((y.double() - ref).abs()[sub] <= 2.0 ** -148).all()
    assert torch.equal(y[torch.isinf(v)], TORCH_ACT[act](v[torch.isinf(v)]))


def test_row_gemm_mode_setting():
    """set_cpu_row_gemm takes "auto", "always", "never" or "images_inner" (anything else:
    ValueError naming the argument, the mode unchanged); the row layout can run unless the mode
    is "never"."""
    ext = B.extension()
    with B.cpu_row_gemm("never"):
        assert B.get_cpu_row_gemm() == "never" and not ext.cpu_row_gemm_active()
        with pytest.raises(ValueError, match="mode"):
            B.set_cpu_row_gemm("fast")
        with pytest.raises(ValueError, match="mode"):
            ext.set_cpu_row_gemm("sometimes")
        assert B.get_cpu_row_gemm() == "never"
        B.set_cpu_row_gemm("images_inner")
        assert B.get_cpu_row_gemm() == "images_inner" and ext.cpu_row_gemm_active()
        B.set_cpu_row_gemm("auto")
        assert ext.cpu_row_gemm_active()
    assert B.get_cpu_row_gemm() == "always"  # the module's fixture, restored on exit
    assert ext.cpu_row_gemm_active()


# (N, C_in, C_out, H, kernel, stride, padding, output_padding, whether "auto" runs a GEMM form)
AUTO_CASES = [
    (2, 16, 12, 4, 4, 2, 1, 0, True),    # k4 s2: 4 columns per output value: the row layout
    (2, 16, 12, 5, 3, 2, 1, 1, True),    # k3 s2: 2.25: the row layout
    (2, 16, 12, 1, 4, 1, 0, 0, True),    # from a 1x1 input: the row layout
    (2, 16, 12, 4, 5, 2, 2, 1, False),   # k5 s2: 6.25: ATen's product (images-inner: its own mode)
    (2, 16, 12, 4, 3, 1, 1, 0, False),   # stride 1 from 4x4: not eligible at all
]


@pytest.mark.parametrize("case", AUTO_CASES, ids=lambda c: f"k{c[4]}s{c[5]}h{c[3]}")
def test_row_gemm_auto_by_shape(case):
    """Under "auto" the row layout's forward runs from a 1x1 input or where each output value has
    at most 4 columns (KH*KW <= 4*SH*SW); ATen's product where it has more (the k5 s2 layers:
    the images-inner layout lost 20-30% to it on the CI host's slow state) and where the GEMM
    form is not eligible (under no_grad torch's own call): seen by the profiler; the result
    matches float64 either way."""
    from torch.profiler import profile

    N, ci, co, H, k, s, p, op, rows = case
    x, w, b = torch.randn(N, ci, H, H), torch.randn(ci, co, k, k), torch.randn(co)
    with B.cpu_row_gemm("auto"), torch.no_grad(), profile() as prof:
        y = torch.ops.genfast.conv_transpose2d_act(x, w, b, s, p, op, 1, 1, CODES["relu"], 0.0)
    ops = {e.name for e in prof.events()}
    assert ("aten::convolution" not in ops) == rows, ops
    ref = F.relu(F.conv_transpose2d(x.double(), w.double(), b.double(), s, p, op))
    assert_close(y, ref.float())


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("ci", [ROWS, 8, PLANE])
def test_row_gemm_never_runs_atens_product(ci, train):
    """With the row layout off, a row-layout case runs ATen's product: under no_grad torch's own
    call (bitwise torch's result), in training ATen's product inside our forward op (and, up to 16
    input pixels, the GEMM backward) - every result matching float64. The plane layout runs the
    GEMM form in every mode."""
    from torch.profiler import profile

    case = GEMM_CASES[ci]
    N, _, co, H, W, k, s, p, op, d = case
    x, w, b = _inputs(case, torch.float32)
    torch_y = F.leaky_relu(F.conv_transpose2d(x, w, b, s, p, op, 1, d), SLOPE)
    for mode in ("never", "always"):
        with B.cpu_row_gemm(mode):
            xs, ws, bs = (t.clone().requires_grad_(train) for t in (x, w, b))
            with torch.set_grad_enabled(train), profile() as prof:
                y = torch.ops.genfast.conv_transpose2d_act(xs, ws, bs, s, p, op, 1, d, CODES["leaky_relu"],
                                                           SLOPE)
            ops = {e.name for e in prof.events()}
            dy = torch.randn_like(y)
            yr, grads = _ref(x, w, b, case, "leaky_relu", dy)
            assert_close(y, yr, msg=f"output ({mode})")
            if train:
                for got, want in zip(torch.autograd.grad(y, (xs, ws, bs), dy), grads):
                    assert_close(got, want, msg=f"gradient ({mode})")
            if mode == "always" or co <= 8:  # the GEMM form: BLAS products, no ATen convolution
                assert "genfast::conv_transpose2d_fwd" in ops and "aten::convolution" not in ops, ops
            elif train:  # ATen's product inside our forward op
                assert "genfast::conv_transpose2d_fwd" in ops and "aten::convolution" in ops, ops
            else:  # torch's own call
                assert "genfast::conv_transpose2d_fwd" not in ops, ops
                assert torch.equal(y, torch_y)


@pytest.mark.parametrize("shape", [(4, 16, 1, 6, 5, 2, 2, 1), (2, 8, 6, 5, 5, 1, 2, 0), (2, 12, 8, 4, 4, 2, 1, 0)],
                         ids=["cout1_k5s2", "k5s1", "k4s2"])
def test_registered_op_cpu_forward_takes_the_eager_op(shape):
    """The registered op's CPU forward in float32 / float64 (what torch.compile and an exported
    program run) is the eager path's C++ op, not oneDNN's transposed convolution with a post-op
    (measured 1.0-2.9x slower at generator layers on the CI CPU): no mkldnn call in the profile,
    the eager op in it, and torch's float64 result."""
    from torch.profiler import profile

    n, cin, cout, h, k, s, p, op = shape
    torch.manual_seed(0)
    x, w, b = torch.randn(n, cin, h, h), 0.1 * torch.randn(cin, cout, k, k), torch.randn(cout)
    with profile() as prof:
        y = torch.ops.genfast.conv_transpose2d(x, w, b, [s, s], [p, p], [op, op], 1, [1, 1],
                                               B.ACTIVATIONS["tanh"], 0.01, "cpu")
    names = {e.name for e in prof.events()}
    assert not any("mkldnn" in nm for nm in names), names
    assert "genfast::conv_transpose2d_act" in names, names
    want = torch.tanh(F.conv_transpose2d(x.double(), w.double(), b.double(), s, p, op))
    assert_close(y, want.float(), torch.float32)


# (N, C_in, C_out, H, W, kernel, stride, padding, output_padding, dilation) where the mode
# "images_inner" takes that layout (more than 8 output channels, more than 4 columns per output
# value):
# a batch, one rectangular image, a batch in several chunks (3 images of 20x20 per product),
# dilation with unequal strides, stride 3, and phases wider than the input (2x2, no padding).
IMAGES_CASES = [
    (3, 5, 12, 4, 4, (5, 5), (2, 2), (2, 2), (1, 1), (1, 1)),
    (1, 4, 10, 7, 6, (5, 5), (2, 2), (2, 2), (1, 1), (1, 1)),
    (7, 3, 9, 20, 20, (5, 5), (2, 2), (2, 2), (1, 1), (1, 1)),
    (2, 3, 10, 5, 4, (3, 5), (1, 2), (1, 2), (0, 1), (2, 1)),
    (2, 4, 16, 3, 3, (7, 7), (3, 3), (3, 3), (2, 2), (1, 1)),
    (2, 4, 12, 2, 2, (5, 5), (2, 2), (0, 0), (0, 0), (1, 1)),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu", "tanh"])
@pytest.mark.parametrize("ci", range(len(IMAGES_CASES)))
def test_images_inner_layout_matches_float64(ci, act, dtype):
    """The images-inner layout (csrc/cpu/conv_transpose.cpp, col2im_images): output and the
    epilogue's per-channel statistics as torch's float64, run as our products (no ATen
    convolution in the profile), then the backward's gradients."""
    from torch.profiler import profile

    case = IMAGES_CASES[ci]
    N, _, co, H, W, k, s, p, op, d = case
    x, w, b = _inputs(case, dtype, bias=ci % 2 == 0)
    with B.cpu_row_gemm("images_inner"):
        with profile() as prof:
            y, part, _ = torch.ops.genfast.conv_transpose2d_fwd(x, w, b, s, p, op, 1, d, CODES[act], SLOPE, True)
        assert "aten::convolution" not in {e.name for e in prof.events()}
        dy = torch.randn_like(y)
        yr, grads = _ref(x, w, b, case, act, dy)
        _check_output_and_statistics(y, part, yr, dtype)
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        y2 = torch.ops.genfast.conv_transpose2d_act(xs, ws, b, s, p, op, 1, d, CODES[act], SLOPE)
        assert_close(y2, yr, msg="eager op output")
        gx, gw = torch.autograd.grad(y2, (xs, ws), dy)
        assert_close(gx, grads[0], msg="grad_input")
        # (sums over up to 7 * 40 * 40 output values per weight: the chunked batch test's scale)
        assert_close(gw, grads[1], msg="grad_weight", scale=10)


@pytest.mark.parametrize("special", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu", "tanh"])
@pytest.mark.parametrize("ci", [0, 4])
def test_images_inner_layout_special_values_like_torch(special, act, ci):
    """A NaN or inf in one image reaches exactly the outputs torch's float64 result has it in (no
    other image's planes: the images share each flat run of col2im_images)."""
    case = IMAGES_CASES[ci]
    N, _, co, H, W, k, s, p, op, d = case
    x, w, b = _inputs(case, torch.float32)
    x[1, 2, 1, 2] = special
    with B.cpu_row_gemm("images_inner"):
        y = torch.ops.genfast.conv_transpose2d_act(x, w, b, s, p, op, 1, d, CODES[act], SLOPE)
    yr, _ = _ref(x, w, b, case, act, torch.zeros(y.shape, dtype=torch.float64))
    assert torch.equal(torch.isnan(y), torch.isnan(yr))
    assert torch.equal(torch.isinf(y) & (y > 0), torch.isinf(yr) & (yr > 0))
    assert torch.equal(torch.isinf(y) & (y < 0), torch.isinf(yr) & (yr < 0))
    fin = torch.isfinite(yr)
    assert fin[0].all()  # the other images stay finite
    assert_close(y[fin], yr[fin], msg="finite outputs")


def test_images_inner_layout_deterministic_and_in_the_block():
    """Bit for bit the same output and statistics on a second call (per-channel tasks, no shared
    sums); the ConvT + BatchNorm + ReLU block at a k5 s2 shape (its statistics from this layout's
    epilogue) matches torch's three modules in float64, running statistics included."""
    case = IMAGES_CASES[2]
    N, _, co, H, W, k, s, p, op, d = case
    x, w, b = _inputs(case, torch.float32)
    with B.cpu_row_gemm("images_inner"):
        first = torch.ops.genfast.conv_transpose2d_fwd(x, w, b, s, p, op, 1, d, CODES["relu"], SLOPE, True)
        again = torch.ops.genfast.conv_transpose2d_fwd(x, w, b, s, p, op, 1, d, CODES["relu"], SLOPE, True)
        assert all(torch.equal(a, e) for a, e in zip(first[:2], again[:2]))
        torch.manual_seed(3)
        blk = gnn.ConvTransposeBNAct2d(6, 12, 5, 2, 2, 1, activation="relu").double()
        seq = torch.nn.Sequential(torch.nn.ConvTranspose2d(6, 12, 5, 2, 2, 1), torch.nn.BatchNorm2d(12),
                                  torch.nn.ReLU()).double()
        seq.load_state_dict(blk.state_dict())
        xb = torch.randn(5, 6, 7, 7, dtype=torch.float64)
        yb, ys = blk(xb), seq(xb)
        assert_close(yb, ys)
        gb = torch.autograd.grad(yb.sum(), blk[0].weight)[0]
        gs = torch.autograd.grad(ys.sum(), seq[0].weight)[0]
        assert_close(gb, gs, scale=10)
        assert_close(blk[1].running_mean, seq[1].running_mean)
        assert_close(blk[1].running_var, seq[1].running_var)
