"""BatchNorm + activation at the edges, on every backend that runs here (cpu C++, triton under
the interpreter, reference): the activation table on NaN/inf/-0.0 (Triton, reference, and the C++
table through an eval BatchNorm with unit coefficients), NaN and inf through the statistics and
the running buffers, long float32 reductions and large mean offsets, strided and expanded running
buffers, no state change before a failing check, empty batches, opcheck with requires_grad,
autocast, and the Triton launchers' device guard and partial-row cap."""
import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

import genfast
import genfast.functional as GF
import genfast.nn as gnn
from genfast.kernels import activation as KA
from genfast.kernels import batchnorm_act as K
from genfast.reference import activation as RA
from tests.utils import CPU_BACKENDS, backend

NAN, INF = float("nan"), float("inf")
SPECIAL = [NAN, -0.0, 0.0, INF, -INF, 1.5, -1.5, 3e-39, -3e-39]
ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2}
SLOPE = 0.2


def torch_act(z, activation, slope=SLOPE):
    if activation == "relu":
        return F.relu(z)
    if activation == "leaky_relu":
        return F.leaky_relu(z, slope)
    return z


def torch_act_and_grad(z, activation, slope=SLOPE):
    """(f(z), f'(z)) as torch's autograd computes them (the gradient of a unit upstream)."""
    zz = z.detach().clone().requires_grad_()
    y = torch_act(zz, activation, slope)
    (g,) = torch.autograd.grad(y, zz, torch.ones_like(y)) if y.requires_grad else (torch.ones_like(z),)
    return y.detach(), g


def assert_same_values(actual, expected, msg=""):
    """Equal including NaN positions and the sign of zero."""
    assert actual.dtype == expected.dtype, msg
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=msg)
    assert torch.equal(torch.signbit(actual), torch.signbit(expected)), f"{msg}: sign of zero differs"


# --- the activation table itself -----------------------------------------------------------------

@triton.jit
def _act_table_kernel(Z, OUT_F, OUT_GZ, OUT_GY, OUT_INV, n, slope,
                      ACT: tl.constexpr, BLOCK: tl.constexpr):
    # Z: inputs; OUT_F: f(z); OUT_GZ: f'(z) from z; OUT_GY: f'(z) from y = f(z);
    # OUT_INV: f^-1(f(z)); n: element count; slope: leaky_relu slope; ACT: activation code;
    # BLOCK: elements (>= n).
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    z = tl.load(Z + offs, mask=mask, other=0.0)
    y = KA.act_forward(z, ACT, slope)
    tl.store(OUT_F + offs, y, mask=mask)
    tl.store(OUT_GZ + offs, KA.act_grad_from_z(z, ACT, slope), mask=mask)
    tl.store(OUT_GY + offs, KA.act_grad_from_y(y, ACT, slope), mask=mask)
    tl.store(OUT_INV + offs, KA.act_invert(y, ACT, slope), mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "identity"])
def test_triton_activation_table_matches_torch(activation, dtype):
    z = torch.tensor(SPECIAL, dtype=dtype)
    outs = [torch.empty_like(z) for _ in range(4)]
    _act_table_kernel[(1,)](z, *outs, z.numel(), SLOPE, ACT=ACT_CODES[activation], BLOCK=16)
    y_t, g_t = torch_act_and_grad(z, activation)
    assert_same_values(outs[0], y_t, "f(z)")
    assert_same_values(outs[1], g_t, "f'(z) from z")
    if activation != "relu":  # relu is not invertible; its gradient from y still is torch's
        # y / slope rounds: exact up to an ulp, NaN and the signs kept.
        torch.testing.assert_close(outs[3], z, equal_nan=True, msg="f^-1(f(z))")
        assert torch.equal(torch.signbit(outs[3]), torch.signbit(z))
    g_from_y = torch_act_and_grad(y_t, activation)[1] if activation == "relu" else g_t
    assert_same_values(outs[2], g_from_y, "f'(z) from y")


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "identity"])
def test_reference_activation_table_matches_torch(activation):
    z = torch.tensor(SPECIAL, dtype=torch.float64)
    y_t, g_t = torch_act_and_grad(z, activation)
    assert_same_values(RA.act_forward(z, activation, SLOPE), y_t, "f(z)")
    assert_same_values(RA.act_grad(z, activation, SLOPE), g_t, "f'(z)")


# eps = 2^-10 and running_var = 1 - eps make invstd exactly 1; with weight 1, bias 0 and
# running_mean 0 an eval BatchNorm is then the activation alone, forward and backward, so the
# C++ table (csrc/common/activation.h) is checked value by value through the public op.
EXACT_EPS = 2.0 ** -10


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("memory_efficient", [False, True])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "identity"])
def test_activation_table_through_eval_batchnorm(backend_name, activation, memory_efficient):
    if memory_efficient and activation == "relu":
        pytest.skip("memory_efficient needs an invertible activation (tested to raise elsewhere)")
    vals = [v for v in SPECIAL if v != -0.0]  # x * 1 + 0 turns -0.0 into +0.0 in any BatchNorm
    z = torch.tensor(vals, dtype=torch.float64).repeat(2, 1).reshape(2, 1, -1).expand(2, 3, -1).contiguous()
    m = gnn.BatchNormAct1d(3, eps=EXACT_EPS, activation=activation, negative_slope=SLOPE,
                           memory_efficient=memory_efficient, dtype=torch.float64).eval()
    with torch.no_grad():
        m.running_var.fill_(1 - EXACT_EPS)
    x = z.clone().requires_grad_()
    with backend(backend_name):
        y = m(x)
        (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    y_t, g_t = torch_act_and_grad(z, activation)
    assert_same_values(y.detach(), y_t, "output")
    assert_same_values(dx, g_t, "grad_input")


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_conv_transpose_activation_propagates_nan(backend_name, activation):
    """The activation table is shared with the transposed convolution's epilogue."""
    x = torch.randn(2, 3, 4, 4)
    x[0, 1, 2, 3] = NAN
    w = torch.randn(3, 2, 3, 3)
    b = torch.randn(2)
    y_t = torch_act(F.conv_transpose2d(x, w, b), activation)
    with backend(backend_name):
        y = GF.conv_transpose2d(x, w, b, activation=activation, negative_slope=SLOPE)
    assert int(y_t.isnan().sum()) > 0
    assert torch.equal(y.isnan(), y_t.isnan())


# --- NaN and inf through the statistics ------------------------------------------------------------

def make_pair(C, activation, dtype=torch.float32, cls=gnn.BatchNormAct2d):
    tcls = nn.BatchNorm2d if cls is gnn.BatchNormAct2d else nn.BatchNorm1d
    g = cls(C, activation=activation, negative_slope=SLOPE, dtype=dtype)
    t = tcls(C, dtype=dtype)
    with torch.no_grad():
        g.weight.uniform_(0.5, 1.5)
        g.bias.uniform_(-0.5, 0.5)
    t.load_state_dict(g.state_dict())
    return g, t


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "identity"])
def test_nan_input_propagates_like_torch(backend_name, activation):
    g, t = make_pair(3, activation)
    x = torch.randn(2, 3, 4, 4)
    x[0, 1, 2, 3] = NAN
    with backend(backend_name):
        y = g(x)
    y_t = torch_act(t(x), activation)
    assert int(y_t.isnan().sum()) == 32
    assert torch.equal(y.isnan(), y_t.isnan())
    assert torch.equal(g.running_mean.isnan(), t.running_mean.isnan())
    assert torch.equal(g.running_var.isnan(), t.running_var.isnan())
    # Eval after the NaN batch: the NaN running statistics reach the output, as in torch.
    g.eval()
    t.eval()
    x2 = torch.randn(2, 3, 4, 4)
    with backend(backend_name):
        y2 = g(x2)
    y2_t = torch_act(t(x2), activation)
    assert int(y2_t.isnan().sum()) == 32
    assert torch.equal(y2.isnan(), y2_t.isnan())


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_inf_input_running_stats_like_torch(backend_name, channels_last):
    g, t = make_pair(3, "leaky_relu")
    x = torch.randn(4, 3, 5, 5)
    x[0, 0, 1, 1] = INF
    x[2, 1, 3, 0] = -INF
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with backend(backend_name):
        y = g(x)
    y_t = torch_act(t(x), "leaky_relu")
    assert t.running_mean[0].item() == INF and t.running_mean[1].item() == -INF
    assert g.running_mean[0].item() == INF and g.running_mean[1].item() == -INF
    assert torch.equal(g.running_var.isnan(), t.running_var.isnan())
    torch.testing.assert_close(g.running_mean[2], t.running_mean[2])
    torch.testing.assert_close(g.running_var[2], t.running_var[2])
    assert torch.equal(y.isnan(), y_t.isnan())


# --- long float32 reductions and large offsets ------------------------------------------------------

def _backend_call(backend_name, x, rm, rv, w, b, dy):
    """One training forward + backward; on triton with large tiles (the interpreter's cost is per
    tile), the kernel choice being the same split kernels."""
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    if backend_name == "triton":
        y, mean, invstd = K.bn_act_fwd(x.detach(), w.detach(), b.detach(), rm, rv, True, 0.1, 1e-5, 0,
                                       SLOPE, 0.0, _path="split", _tile=1 << 18)
        dx, gw, gb = K.bn_act_bwd(dy, x.detach(), w.detach(), b.detach(), mean, invstd, True, 0, SLOPE,
                                  0.0, False, _path="split", _tile=1 << 18)
        return y, gb
    with backend(backend_name):
        y = GF.batch_norm_act(x, rm, rv, w, b, True, 0.1, 1e-5, activation="identity")
        y.backward(dy)
    return y.detach(), b.grad


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 4096, 4608), (2 ** 24 + 2 ** 21, 1)], ids=["plane", "column"])
def test_long_float32_reduction_matches_torch(backend_name, shape):
    """1.125 * 2^24 float32 values of one channel: a float32 running sum or count saturates at
    2^24; torch (double accumulation on CPU) does not."""
    C = shape[1]
    x = torch.randn(shape) * 2 + 3
    dy = torch.ones_like(x)
    w, b = torch.ones(C), torch.zeros(C)
    rm, rv = torch.zeros(C), torch.ones(C)
    rm_t, rv_t = torch.zeros(C), torch.ones(C)
    y, gb = _backend_call(backend_name, x, rm, rv, w, b, dy)
    y_t = F.batch_norm(x, rm_t, rv_t, w, b, True, 0.1, 1e-5)
    x64 = x.double()
    n = x.numel()
    exact_mean = x64.mean().item()
    exact_var = x64.var().item()
    assert abs(rm.item() - 0.1 * exact_mean) <= 2 * abs(rm_t.item() - 0.1 * exact_mean) + 1e-6
    assert abs(rv.item() - (0.9 + 0.1 * exact_var)) <= 2 * abs(rv_t.item() - (0.9 + 0.1 * exact_var)) + 1e-6
    assert abs(y.double().mean().item()) < 1e-4, "output mean"
    assert gb.item() == n, "grad_bias = the sum of n ones"
    del y_t


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_error_at_large_mean_offset_reaches_torch(backend_name, channels_last):
    """x = randn + 1e4 in float32: genfast's error against float64 is no larger than torch's."""
    x = torch.randn(16, 8, 32, 32, dtype=torch.float64) + 1e4
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x32 = x.float()
    w = torch.rand(8, dtype=torch.float64) + 0.5
    b = torch.randn(8, dtype=torch.float64)
    y64 = F.batch_norm(x32.double(), None, None, w, b, True, 0.1, 1e-5)
    y_t = F.batch_norm(x32, None, None, w.float(), b.float(), True, 0.1, 1e-5)
    with backend(backend_name):
        y = GF.batch_norm_act(x32, None, None, w.float(), b.float(), True, 0.1, 1e-5,
                              activation="identity")
    err = (y.double() - y64).abs().max().item()
    err_t = (y_t.double() - y64).abs().max().item()
    assert err <= 1.25 * err_t, f"error {err:.3e} vs torch's {err_t:.3e}"


# --- strided and expanded running statistics --------------------------------------------------------

# (overlapping buffers on the fused backends only: the reference backend updates one whole buffer
# after the other with torch's composite ops, not channel by channel)
@pytest.mark.parametrize("backend_name,kind", [
    (b, k) for b in CPU_BACKENDS for k in ["every_other", "expanded", "expanded_whole_storage", "overlapping"]
    if not (b == "reference" and k == "overlapping")])
def test_strided_running_stats_written_through_the_view(backend_name, kind):
    def bufs():
        if kind == "overlapping":
            # contiguous, but running_var starts inside running_mean: channel order matters
            base = torch.arange(4.0) + 1
            return (base, base), base[0:3], base[1:4]
        if kind == "every_other":
            base_m, base_v = torch.arange(6.0) * 100, torch.arange(6.0) + 1
            return (base_m, base_v), base_m[::2], base_v[::2]
        if kind == "expanded":
            base_m, base_v = torch.arange(5.0) * 100, torch.arange(5.0) + 1
            return (base_m, base_v), base_m[4:5].expand(3), base_v[4:5].expand(3)
        base_m, base_v = torch.full((1,), 7.0), torch.full((1,), 2.0)
        return (base_m, base_v), base_m.expand(3), base_v.expand(3)

    x = torch.randn(4, 3, 5) + 1
    (gm, gv), rm, rv = bufs()
    (tm, tv), rm_t, rv_t = bufs()
    with backend(backend_name):
        y = GF.batch_norm_act(x, rm, rv, None, None, True, 0.1, 1e-5, activation="identity")
    # torch's CPU kernel updates the channels in a parallel loop: through an expanded buffer
    # its result depends on the thread schedule, and on one thread it compounds the updates in
    # channel order (the order genfast follows).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        y_t = F.batch_norm(x, rm_t, rv_t, None, None, True, 0.1, 1e-5)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(y, y_t)
    # The whole base storage, so that a write outside the view would show.
    torch.testing.assert_close(gm, tm)
    torch.testing.assert_close(gv, tv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 4096), (1, 3, 7), (5, 300, 2, 3)])
def test_running_stats_of_wide_short_batches(shape, dtype):
    """The vectorised per-channel finish (contiguous, separate running buffers): running mean and
    unbiased variance, saved statistics and output as torch's, on a BatchNorm1d of 4096 channels
    and 2 rows, a single row of short channels and a 4-D batch."""
    x = torch.randn(*shape, dtype=dtype) * 3 + 2
    C = shape[1]
    rm, rv = torch.randn(C, dtype=dtype), torch.rand(C, dtype=dtype) + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    w, b = torch.randn(C, dtype=dtype), torch.randn(C, dtype=dtype)
    with backend("cpu"):
        y = GF.batch_norm_act(x, rm, rv, w, b, True, 0.3, 1e-5, negative_slope=0.2)
    y_t = F.leaky_relu(F.batch_norm(x, rm_t, rv_t, w, b, True, 0.3, 1e-5), 0.2)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(rm, rm_t, **tol)
    torch.testing.assert_close(rv, rv_t, **tol)
    torch.testing.assert_close(y, y_t, **(tol if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)))


@pytest.mark.parametrize("shape", [(64, 8192), (40, 3000), (300, 520)])
def test_wide_tiled_batches_against_float64(shape):
    """(N, C) batches cut into tiles of 256 channels by 256 rows (C > 256 and at least 32 rows;
    a partial last tile of channels and of rows in the last two): output, running statistics and
    all three gradients against torch's float64 BatchNorm1d + LeakyReLU, on inputs offset far
    from 0 and with a NaN and an inf in two channels (NaN / inf where the reference has them)."""
    N, C = shape
    x = torch.randn(N, C) * 3 + 50
    x[N // 2, 7] = float("nan")
    x[N - 1, C - 2] = float("inf")
    rm, rv = torch.randn(C), torch.rand(C) + 0.5
    rm64, rv64 = rm.double(), rv.double()
    w, b = torch.randn(C), torch.randn(C)
    dy = torch.randn(N, C)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    with backend("cpu"):
        y = GF.batch_norm_act(xs, rm, rv, ws, bs, True, 0.3, 1e-5, negative_slope=0.2)
    gx, gw, gb = torch.autograd.grad(y, (xs, ws, bs), dy)
    xd, wd, bd = (t.double().requires_grad_() for t in (x, w, b))
    yd = F.leaky_relu(F.batch_norm(xd, rm64, rv64, wd, bd, True, 0.3, 1e-5), 0.2)
    gxd, gwd, gbd = torch.autograd.grad(yd, (xd, wd, bd), dy.double())
    # the NaN and inf channels: the reference's NaN / inf in the same places (equal_nan)
    assert rv[7].isnan() and y[:, 7].isnan().all() and gx[:, C - 2].isnan().all()
    for got, want, tol in ((rm, rm64, 1e-5), (rv, rv64, 1e-5), (y, yd, 1e-4), (gx, gxd, 1e-4), (gw, gwd, 1e-3),
                           (gb, gbd, 1e-4)):
        torch.testing.assert_close(got.double(), want.detach(), rtol=tol * 10, atol=tol, equal_nan=True)


# --- nothing is written before every check has passed ------------------------------------------

def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("what", ["gelu_attribute", "memory_efficient_relu", "unavailable_backend"])
def test_failed_call_changes_no_state(backend_name, what):
    m = gnn.BatchNormAct2d(3)
    x = torch.randn(2, 3, 4, 4)
    ctx = backend(backend_name)
    if what == "gelu_attribute":
        m.activation = "gelu"
        exc = ValueError
    elif what == "memory_efficient_relu":
        m.activation = "relu"
        m.memory_efficient = True
        exc = ValueError
    else:
        ctx = backend("cuda")  # no CUDA here: the selected backend cannot run on CPU tensors
        exc = RuntimeError
    before = _state(m)
    with ctx, pytest.raises(exc):
        m(x)
    after = _state(m)
    assert all(torch.equal(before[k], after[k]) for k in before), "state changed by a failed call"


def test_momentum_none_counts_after_the_call():
    """momentum=None: cumulative average with the count including this batch, as torch."""
    g = gnn.BatchNormAct2d(3, momentum=None, activation="identity")
    t = nn.BatchNorm2d(3, momentum=None)
    for _ in range(3):
        x = torch.randn(4, 3, 2, 2)
        g(x)
        t(x)
    torch.testing.assert_close(g.running_mean, t.running_mean)
    torch.testing.assert_close(g.running_var, t.running_var)
    assert int(g.num_batches_tracked) == 3


# --- empty batches ------------------------------------------------------------------------------------

EMPTY = [(gnn.BatchNormAct1d, (0, 3), False), (gnn.BatchNormAct1d, (0, 3, 5), False),
         (gnn.BatchNormAct2d, (0, 3, 4, 4), False), (gnn.BatchNormAct2d, (0, 3, 4, 4), True),
         (gnn.BatchNormAct2d, (2, 3, 0, 4), False), (gnn.BatchNormAct1d, (0, 1), False)]


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("cls,shape,channels_last", EMPTY)
def test_empty_batch_like_torch(backend_name, train, cls, shape, channels_last):
    C = shape[1]
    g, t = make_pair(C, "leaky_relu", torch.float64, cls)
    with torch.no_grad():
        g.running_mean.uniform_(-1, 1)
        g.running_var.uniform_(0.5, 2)
    t.load_state_dict(g.state_dict())
    g.train(train)
    t.train(train)
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    xg = x.clone().requires_grad_()
    xt = x.clone().requires_grad_()
    with backend(backend_name):
        y = g(xg)
        y.sum().backward()
    y_t = torch_act(t(xt), "leaky_relu")
    y_t.sum().backward()
    assert y.shape == y_t.shape and xg.grad.shape == xt.grad.shape
    for k, v in t.state_dict().items():
        assert torch.equal(g.state_dict()[k], v), k
    assert torch.equal(g.weight.grad, t.weight.grad) and torch.equal(g.bias.grad, t.bias.grad)


# --- opcheck with requires_grad, autocast --------------------------------------------------------------

@pytest.mark.parametrize("backend_name", ["cpu", "triton"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("gamma_floor", [0.0, 1e-3])
def test_opcheck_with_requires_grad(backend_name, training, gamma_floor):
    x = torch.randn(3, 4, 2, 3, requires_grad=True)
    w = (torch.rand(4) + 0.5).requires_grad_()
    b = torch.randn(4, requires_grad=True)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    args = (x, w, b, rm, rv, training, 0.1, 1e-5, 2, 0.2, gamma_floor, backend_name)
    torch.library.opcheck(torch.ops.genfast.batch_norm_act.default, args)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cast_dtype", [torch.bfloat16, torch.float16])
def test_autocast_output_dtype_like_torch(backend_name, in_dtype, cast_dtype):
    g, t = make_pair(4, "relu")
    x = torch.randn(3, 4, 5, 5).to(in_dtype).requires_grad_()
    with torch.autocast("cpu", dtype=cast_dtype):
        y_t = F.relu(t(x))
        with backend(backend_name):
            y = g(x)
    assert y.dtype == y_t.dtype == in_dtype
    torch.testing.assert_close(y.float(), y_t.float(), atol=2e-2, rtol=2e-2)
    y.float().sum().backward()
    assert x.grad.dtype == in_dtype


# --- Triton launchers: device guard, partial rows ---------------------------------------------------

def test_every_triton_launch_runs_under_the_device_guard(monkeypatch):
    state = {"inside": 0, "launches": 0, "entered": 0}

    @contextlib.contextmanager
    def guard(t):
        state["entered"] += 1
        state["inside"] += 1
        try:
            yield
        finally:
            state["inside"] -= 1

    class Checked:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def run(*args, **kwargs):
                assert state["inside"] == 1, "Triton launch outside the device guard"
                state["launches"] += 1
                return launch(*args, **kwargs)
            return run

    monkeypatch.setattr(K, "_on_device", guard)
    for name in ("_stats_partial_kernel", "_normalize_kernel", "_fused_fwd_kernel",
                 "_bwd_partial_kernel", "_bwd_dx_kernel", "_fused_bwd_kernel"):
        monkeypatch.setattr(K, name, Checked(getattr(K, name)))
    x = torch.randn(4, 3, 6)
    w, b = torch.ones(3), torch.zeros(3)
    for path in ("resident", "split"):
        for training in (True, False):
            y, mean, invstd = K.bn_act_fwd(x, w, b, torch.zeros(3), torch.ones(3), training, 0.1,
                                           1e-5, 2, SLOPE, 0.0, _path=path, _tile=8)
            K.bn_act_bwd(torch.randn_like(y), x, w, b, mean, invstd, training, 2, SLOPE, 0.0, False,
                         _path=path, _tile=8)
    # resident: 1 launch per call; split: training 2 + 2, eval 1 + 2.
    assert state["launches"] == 4 + 7 and state["entered"] == 8


@pytest.mark.parametrize("shape,cl", [((128, 64, 32, 32), True), ((8, 3, 512, 512), False),
                                      ((4096, 16), True)])
def test_split_plan_caps_partial_rows(monkeypatch, shape, cl):
    """Every consumer program merges all S partial rows: S stays <= 64 even on a 132-SM GPU."""
    monkeypatch.setattr(K, "_num_sms", lambda device: 132)
    N, C = shape[0], shape[1]
    L = 1
    for s in shape[2:]:
        L *= s
    p = K._Plan(torch.device("cuda"), torch.float32, cl, N, C, L, K.RESIDENT_MAX_FWD, "split",
                None, None)
    assert 1 <= p.S <= K.MAX_SPLITS == 64


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_nc_statistics_over_blocks_with_offset_and_nonfinite_pivots(backend_name):
    """BatchNorm1d on (N, C) with N spanning several of the CPU kernel's row blocks: the block
    statistics are sums shifted by each block's first row (the pivot). A mean offset of 1e4 still
    gives the float64 statistics; an infinite or NaN first row (a pivot that is not finite), or
    an infinity in a later block, gives torch's infinities and NaNs."""
    N, C = 5000, 37
    x = (torch.randn(N, C, dtype=torch.float64) * 0.5 + 1e4).float()
    x[0, 3] = INF
    x[0, 5] = float("nan")
    x[4000, 7] = -INF
    rm, rv = torch.zeros(C), torch.ones(C)
    rm_t, rv_t = torch.zeros(C), torch.ones(C)
    with backend(backend_name):
        y = GF.batch_norm_act(x, rm, rv, torch.ones(C), torch.zeros(C), True, 0.1, 1e-5, activation="identity")
    y_t = F.batch_norm(x, rm_t, rv_t, torch.ones(C), torch.zeros(C), True, 0.1, 1e-5)
    assert torch.equal(rm.isnan(), rm_t.isnan()) and torch.equal(rm.isinf(), rm_t.isinf())
    assert torch.equal(rv.isnan(), rv_t.isnan()) and torch.equal(rv.isinf(), rv_t.isinf())
    assert rm[3].item() == INF and rm[7].item() == -INF and rm[5].isnan()
    fin = torch.isfinite(rm_t)
    x64 = x.double()[:, fin]
    torch.testing.assert_close(rm[fin].double(), 0.1 * x64.mean(0), rtol=1e-7, atol=0)
    torch.testing.assert_close(rv[fin].double(), 0.9 + 0.1 * x64.var(0), rtol=1e-5, atol=0)
    assert torch.equal(y.isnan(), y_t.isnan())
    y64 = F.batch_norm(x64, None, None, None, None, True, 0.1, 1e-5)
    err = (y[:, fin].double() - y64).abs().max().item()
    err_t = (y_t[:, fin].double() - y64).abs().max().item()
    assert err <= 1.25 * err_t, f"output error {err:.3e} vs torch's {err_t:.3e}"


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(64, 1000), (40, 300, 3, 1)], ids=["nc", "nhwc"])
def test_wide_channels_split_into_tiles_match_float64(backend_name, shape):
    """Wide (N, C) and channels-last batches, which the CPU kernels cut into tiles of 256
    channels (1000 = 3 whole tiles and a partial one): statistics, output and every gradient
    match float64, and a NaN in one channel of one tile stays in that channel."""
    torch.manual_seed(7)
    C = shape[1]
    x = torch.randn(shape, dtype=torch.float64) * 1.5 + 0.7
    if len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    x[1, 600 % C] = float("nan")  # channel 600 (nc: tile 2) or 0 (nhwc)
    bad = 600 % C
    w = torch.randn(C, dtype=torch.float64)
    b = torch.randn(C, dtype=torch.float64)
    dy = torch.randn(shape, dtype=torch.float64)
    rm, rv = torch.zeros(C), torch.ones(C)
    xf, wf, bf = (t.float().detach().requires_grad_() for t in (x, w, b))
    with backend(backend_name):
        y = GF.batch_norm_act(xf, rm, rv, wf, bf, True, 0.1, 1e-5, activation="leaky_relu",
                              negative_slope=SLOPE)
    y.backward(dy.float())
    x64, w64, b64 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y64 = F.leaky_relu(F.batch_norm(x64, None, None, w64, b64, True, 0.1, 1e-5), SLOPE)
    y64.backward(dy)
    ok = [c for c in range(C) if c != bad]
    assert y.is_contiguous(memory_format=torch.channels_last) == (len(shape) == 4)
    assert y[:, bad].isnan().all() and not y[:, ok].isnan().any()
    assert rm[bad].isnan() and not rm[ok].isnan().any()
    rest = x.detach()[:, ok]
    dims = [d for d in range(x.dim()) if d != 1]
    torch.testing.assert_close(rm[ok].double(), 0.1 * rest.mean(dims), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rv[ok].double(), 0.9 + 0.1 * rest.var(dims), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y[:, ok].double(), y64[:, ok], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xf.grad[:, ok].double(), x64.grad[:, ok], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(wf.grad[ok].double(), w64.grad[ok], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(bf.grad[ok].double(), b64.grad[ok], rtol=1e-4, atol=1e-4)
    assert xf.grad[:, bad].isnan().all() and wf.grad[bad].isnan()


@pytest.mark.parametrize("activation", ["leaky_relu", "relu", "identity"])
@pytest.mark.parametrize("affine", [True, False])
def test_cpu_eager_batchnorm_autograd_in_cpp_double_backward(activation, affine):
    """Eager CPU BatchNorm+act runs genfast::batch_norm_act_train, whose autograd node is C++;
    its create_graph backward goes through the differentiable reference formulas
    (batch_norm_act_ref_grad): gradgradcheck in training and eval, the node's name, inference
    mode, and memory_efficient's double backward refused with RuntimeError."""
    dt = torch.float64
    torch.manual_seed(3)
    x = (torch.randn(6, 3, 2, dtype=dt) * 1.5 + 0.5).requires_grad_()
    w = (torch.rand(3, dtype=dt) + 0.5).requires_grad_() if affine else None
    b = torch.randn(3, dtype=dt).requires_grad_() if affine else None
    rm, rv = torch.zeros(3, dtype=dt), torch.ones(3, dtype=dt)
    with backend("cpu"):
        y = GF.batch_norm_act(x, rm, rv, w, b, True, 0.1, 1e-5, activation=activation, negative_slope=SLOPE)
        assert "BatchNormActTrain" in y.grad_fn.name(), y.grad_fn.name()
        ins = (x, w, b) if affine else (x,)
        for training in (True, False):
            def f(*t, training=training):
                return GF.batch_norm_act(t[0], rm.clone(), rv.clone() + 0.5, *(t[1:] if affine else (None, None)),
                                         training, 0.1, 1e-5, activation=activation, negative_slope=SLOPE)
            assert torch.autograd.gradcheck(f, ins)
            assert torch.autograd.gradgradcheck(f, ins)
        with torch.inference_mode():
            got = GF.batch_norm_act(x.detach(), rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5,
                                    activation=activation, negative_slope=SLOPE)
        want = torch_act(F.batch_norm(x.detach(), None, None, w, b, True, 0.1, 1e-5), activation)
        torch.testing.assert_close(got, want)
        if affine and activation != "relu":
            y = GF.batch_norm_act(x, rm, rv, w, b, True, 0.1, 1e-5, activation=activation,
                                  negative_slope=SLOPE, memory_efficient=True)
            (g,) = torch.autograd.grad(y.sum(), x, retain_graph=True)  # first order works
            assert torch.isfinite(g).all()
            with pytest.raises(RuntimeError, match="double backward is not supported with memory_efficient"):
                torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(300, 64, 4), (5, 7, 3), (9, 4, 2, 2), (16, 256, 4, 4), (4, 257, 16),
                                   (3, 5, 17)],
                         ids=["two_blocks", "odd", "2x2", "at_cap", "over_cap", "long_rows"])
def test_short_rows_match_torch_with_nonfinite_values(backend_name, shape):
    """(N, C, L) batches with short rows, which the CPU kernels read as N rows of C * L virtual
    channels up to 4096 of them (the last two shapes stay rows): float64 output, every gradient
    and the running statistics match torch's; a NaN in the first row (the block pivot) and an inf
    in a later block stay in their channels, and give torch's NaN / inf running statistics."""
    torch.manual_seed(11)
    N, C = shape[:2]
    x = torch.randn(shape, dtype=torch.float64) * 1.3 + 0.4
    flat = x.view(N, C, -1)
    flat[0, 1, 0] = NAN
    flat[N - 1, 2, -1] = INF
    bad = [1, 2]
    w = torch.randn(C, dtype=torch.float64)
    b = torch.randn(C, dtype=torch.float64)
    rm0, rv0 = torch.rand(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    dy = torch.randn(shape, dtype=torch.float64)
    results = []
    for which in ("genfast", "torch"):
        xg, wg, bg = (t.detach().clone().requires_grad_() for t in (x, w, b))
        rm, rv = rm0.clone(), rv0.clone()
        if which == "genfast":
            with backend(backend_name):
                y = GF.batch_norm_act(xg, rm, rv, wg, bg, True, 0.1, 1e-5, activation="leaky_relu",
                                      negative_slope=SLOPE)
        else:
            y = F.leaky_relu(F.batch_norm(xg, rm, rv, wg, bg, True, 0.1, 1e-5), SLOPE)
        y.backward(dy)
        results.append((y.detach(), xg.grad, wg.grad, bg.grad, rm, rv))
    (y, dx, dw, db, rm, rv), (y_t, dx_t, dw_t, db_t, rm_t, rv_t) = results
    ok = [c for c in range(C) if c not in bad]
    assert y[:, bad].isnan().all() and not y[:, ok].isnan().any()
    assert rm[1].isnan() and rm[2].item() == INF == rm_t[2].item()
    assert torch.equal(rm.isnan(), rm_t.isnan()) and torch.equal(rv.isnan(), rv_t.isnan())
    torch.testing.assert_close(y[:, ok], y_t[:, ok], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dx[:, ok], dx_t[:, ok], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(dw[ok], dw_t[ok], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(db[ok], db_t[ok], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(rm[ok], rm_t[ok], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rv[ok], rv_t[ok], rtol=1e-10, atol=1e-12)
    assert dx[:, bad].isnan().all() and dw[bad].isnan().all()


# --- argument types as torch's parser takes them, buffers that require grad, float64 overflow -----

_TYPE_CASES = [("training", torch.tensor(True)), ("training", None), ("training", 2), ("training", ""),
               ("training", "no"), ("momentum", "0.3"), ("momentum", torch.tensor([0.3])), ("momentum", None),
               ("eps", "1e-3"), ("negative_slope", "0.2"), ("running_mean", [0.0, 0.0, 0.0]),
               ("running_var", [1.0, 1.0, 1.0])]


@pytest.mark.parametrize("name,value", _TYPE_CASES, ids=[f"{n}={v!r}" for n, v in _TYPE_CASES])
def test_argument_of_a_type_torch_refuses_raises_typeerror(name, value):
    """An argument whose type torch's F.batch_norm / F.leaky_relu refuse (TypeError) is refused
    by genfast with TypeError too, before the running buffers change."""
    x = torch.randn(4, 3, 5)
    args = dict(running_mean=torch.zeros(3), running_var=torch.ones(3), training=True, momentum=0.1,
                eps=1e-5, negative_slope=0.2)
    args[name] = value
    with pytest.raises(TypeError):
        t_args = {k: v for k, v in args.items() if k != "negative_slope"}
        if name == "negative_slope":
            F.leaky_relu(x, value)
        else:
            F.batch_norm(x, t_args.pop("running_mean"), t_args.pop("running_var"), **t_args)
    rm, rv = args["running_mean"], args["running_var"]
    snap = [t.clone() if isinstance(t, torch.Tensor) else t for t in (rm, rv)]
    with pytest.raises(TypeError, match=name):
        GF.batch_norm_act(x, rm, rv, None, None, args["training"], args["momentum"], args["eps"],
                          negative_slope=args["negative_slope"])
    for t, s in zip((rm, rv), snap):
        if isinstance(t, torch.Tensor):
            assert torch.equal(t, s)


@pytest.mark.parametrize("name,value", [("momentum", torch.tensor(0.3)), ("momentum", np.float32(0.3)),
                                        ("eps", torch.tensor(1e-3)), ("momentum", 1)])
def test_numbers_torch_takes_give_torchs_result(name, value):
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    kw = dict(momentum=0.1, eps=1e-5)
    kw[name] = value
    rm, rv, rm_t, rv_t = (torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                          torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    y = GF.batch_norm_act(x, rm, rv, None, None, True, activation="identity", **kw)
    y_t = F.batch_norm(x, rm_t, rv_t, None, None, True, **kw)
    torch.testing.assert_close(y, y_t)
    torch.testing.assert_close(rm, rm_t)
    torch.testing.assert_close(rv, rv_t)


def test_running_buffer_requiring_grad_raises_like_torch():
    """torch refuses a running buffer that requires grad while grad mode is on (RuntimeError) and
    takes it under no_grad; genfast does the same, and leaves it unchanged when it refuses."""
    x = torch.randn(4, 3, 5)
    rm = torch.zeros(3, requires_grad=True)
    with pytest.raises(RuntimeError):
        F.batch_norm(x, rm, torch.ones(3), None, None, True)
    with pytest.raises(RuntimeError, match="running_mean"):
        GF.batch_norm_act(x, rm, torch.ones(3), None, None, True)
    assert torch.equal(rm.detach(), torch.zeros(3))
    rm_t = torch.zeros(3, requires_grad=True)
    with torch.no_grad():
        y = GF.batch_norm_act(x, rm, torch.ones(3), None, None, True, activation="identity")
        y_t = F.batch_norm(x, rm_t, torch.ones(3), None, None, True)
    torch.testing.assert_close(y, y_t)
    torch.testing.assert_close(rm.detach(), rm_t.detach())


def test_split_pass_bwd_dx_checks_the_sum_sizes():
    """batch_norm_act_bwd_dx refuses per-channel sums of the wrong size instead of reading past
    them."""
    C = 4
    x = torch.randn(8, C, 3)
    m, s = torch.zeros(C), torch.ones(C)
    with pytest.raises(RuntimeError, match="sum_dz"):
        torch.ops.genfast.batch_norm_act_bwd_dx(torch.randn_like(x), x, None, None, m, s, torch.zeros(1),
                                                torch.zeros(1), 24.0, 0, 0.0, 0.0, False)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(4, 2, 3), (4, 2)], ids=["short_rows", "nc"])
def test_float64_sum_past_the_largest_double_keeps_torchs_sign(backend_name, shape):
    """float64 values whose per-channel sum overflows: the running mean is +inf as torch's (the
    pivot-shifted sum k * n + s gave -inf)."""
    x = torch.zeros(shape, dtype=torch.float64)
    x[:2, 0] = 1.7e308
    rm, rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    rm_t, rv_t = rm.clone(), rv.clone()
    with backend(backend_name):
        GF.batch_norm_act(x, rm, rv, None, None, True, 0.1, 1e-5)
    F.batch_norm(x, rm_t, rv_t, None, None, True, 0.1, 1e-5)
    assert rm_t[0].item() == INF and rm[0].item() == INF
    assert rm[1].item() == rm_t[1].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("special", [float("nan"), float("inf")])
def test_relu_backward_masks_a_special_gradient_like_torch(dtype, special):
    """BatchNorm + ReLU, converted: a NaN or inf incoming gradient where the ReLU's output is 0
    gives 0 there, as torch's threshold_backward (a product with relu' = 0 gave NaN), so every
    gradient stays finite and equal to torch's."""
    import copy

    torch.manual_seed(0)
    ref = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()).to(dtype)
    ours = genfast.convert(copy.deepcopy(ref))
    x = torch.randn(4, 3, 5, 5, dtype=dtype)
    with torch.no_grad():
        y0 = ref(x.clone())
    g = torch.randn_like(y0)
    zero = (y0 == 0).nonzero()[0].tolist()
    g[tuple(zero)] = special
    grads = []
    for m in (ref, ours):
        xr = x.clone().requires_grad_()
        grads.append(torch.autograd.grad(m(xr), (xr, m[0].weight, m[0].bias), g))
    for a, r in zip(grads[1], grads[0]):
        assert a.isfinite().all() and r.isfinite().all()
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(64, 48), (8, 6, 5, 5)])
def test_eval_relu_gradient_mask_agrees_with_the_output(shape, dtype):
    """Eval mode, values at the activation's kink (x within rounding of running_mean, bias 0):
    the gradient passes exactly where the output is positive (the backward's recomputed z and the
    forward's output round alike), as torch's relu backward, which masks on the output."""
    torch.manual_seed(7)
    C = shape[1]
    rm = torch.randn(C, dtype=dtype) * 3
    rv = torch.rand(C, dtype=dtype) + 0.5
    w = torch.rand(C, dtype=dtype) + 0.5
    b = torch.zeros(C, dtype=dtype)
    view = (1, C) + (1,) * (len(shape) - 2)
    eps = torch.finfo(dtype).eps
    x = (rm.view(view) * (1 + eps * torch.randint(-4, 5, shape).to(dtype))).requires_grad_()
    with backend("cpu"):
        y = GF.batch_norm_act(x, rm.clone(), rv.clone(), w, b, False, 0.1, 1e-5, activation="relu")
    dy = torch.rand_like(y) + 0.5
    (dx,) = torch.autograd.grad(y, x, dy)
    assert (y > 0).any() and (y == 0).any()
    assert torch.equal(dx != 0, y > 0)


# --- (N, C, L) stored (N, L, C): torch's output strides ---------------------------------------

@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_sequence_layout_output_is_contiguous_like_torch(backend_name, training, activation):
    """A sequence batch (N, L, C).transpose(1, 2): torch's BatchNorm returns a contiguous output
    (user code views it); genfast's kernels read that layout in place and return the same strides
    and values, and the fused kernels' input gradient in torch's strides."""
    torch.manual_seed(5)
    x0 = torch.randn(4, 5, 6, dtype=torch.float64).transpose(1, 2)  # (N=4, C=6, L=5), strides (30, 1, 6)
    w, b = torch.rand(6, dtype=torch.float64) + 0.5, torch.randn(6, dtype=torch.float64)
    rm, rv = torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.5
    act = (lambda z: F.relu(z)) if activation == "relu" else (lambda z: F.leaky_relu(z, SLOPE))
    x, xt = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    rm_g, rv_g, rm_t, rv_t = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    with backend(backend_name):
        y = GF.batch_norm_act(x, rm_g, rv_g, w, b, training, 0.1, 1e-5, activation=activation,
                              negative_slope=SLOPE)
    yt = act(F.batch_norm(xt, rm_t, rv_t, w, b, training, 0.1, 1e-5))
    assert y.stride() == yt.stride() == (30, 5, 1)
    torch.testing.assert_close(y, yt)
    torch.testing.assert_close((rm_g, rv_g), (rm_t, rv_t))
    dy = torch.randn(4, 6, 5, dtype=torch.float64)
    (dx,) = torch.autograd.grad(y, x, dy)
    (dxt,) = torch.autograd.grad(yt, xt, dy)
    if backend_name != "reference":  # (the reference's autograd gives the ops' own strides)
        assert dx.stride() == dxt.stride()
    torch.testing.assert_close(dx, dxt)
    y.view(4, -1)  # raised before: the output kept the input's strides


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_sequence_layout_module_output_is_contiguous_like_torch(backend_name):
    torch.manual_seed(6)
    x = torch.randn(3, 7, 8).transpose(1, 2)
    m, ref = gnn.BatchNormAct1d(8, activation="relu"), nn.Sequential(nn.BatchNorm1d(8), nn.ReLU())
    for train in (True, False):
        m.train(train), ref.train(train)
        with backend(backend_name):
            y = m(x)
        yt = ref(x)
        assert y.stride() == yt.stride()
        torch.testing.assert_close(y, yt)


@pytest.mark.parametrize("backend_name", ["cpu", "triton"])
@pytest.mark.parametrize("training", [True, False])
def test_opcheck_sequence_layout(backend_name, training):
    """The registered op's fake gives the strides its kernel returns for the sequence layout."""
    x = torch.randn(3, 5, 4).transpose(1, 2).requires_grad_()
    w = (torch.rand(4) + 0.5).requires_grad_()
    b = torch.randn(4, requires_grad=True)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    args = (x, w, b, rm, rv, training, 0.1, 1e-5, 1, 0.0, 0.0, backend_name)
    torch.library.opcheck(torch.ops.genfast.batch_norm_act.default, args)


# --- weight, bias and running buffers take one dtype, as torch's ------------------------------

@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_parameters_of_two_dtypes_raise_like_torch(backend_name):
    """bfloat16 input, bfloat16 weight / bias and float32 running buffers: torch raises
    RuntimeError before writing anything; so does genfast (naming the argument), while the two
    combinations torch takes (all bfloat16, all float32) still run."""
    x = torch.randn(4, 5, 3).bfloat16()
    w, b = torch.ones(5, dtype=torch.bfloat16), torch.zeros(5, dtype=torch.bfloat16)
    rm, rv = torch.zeros(5), torch.ones(5)
    with pytest.raises(RuntimeError):
        F.batch_norm(x, rm.clone(), rv.clone(), w, b, True)
    with backend(backend_name), pytest.raises(RuntimeError, match="running_mean"):
        GF.batch_norm_act(x, rm, rv, w, b, True, activation="identity")
    assert torch.equal(rm, torch.zeros(5)) and torch.equal(rv, torch.ones(5))
    for dt in (torch.bfloat16, torch.float32):
        args = [t.to(dt) for t in (rm, rv, w, b)]
        ref_args = [t.clone() for t in args]
        with backend(backend_name):
            y = GF.batch_norm_act(x, *args[:2], *args[2:], True, activation="identity")
        yt = F.batch_norm(x, *ref_args[:2], *ref_args[2:], True)
        torch.testing.assert_close(y.float(), yt.float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(args[0].float(), ref_args[0].float(), atol=1e-2, rtol=1e-2)
