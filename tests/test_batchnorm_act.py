"""BatchNorm + activation: reference vs torch.nn, every backend vs the float64 reference,
memory_efficient mode, opcheck, gradcheck, double backward, torch.compile, bad input, and the
profiler check that the CPU path runs no PyTorch compute operator."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import genfast
import genfast.functional as GF
import genfast.nn as gnn
from genfast.ops import batchnorm_act as bn_ops
from genfast.reference import batchnorm_act as ref
from tests.utils import CPU_BACKENDS, TOL, assert_close, assert_error_not_worse, backend

ACTS = ["leaky_relu", "relu", "identity"]


def torch_act(y, activation, slope):
    if activation == "leaky_relu":
        return F.leaky_relu(y, slope)
    if activation == "relu":
        return F.relu(y)
    return y


def make_pair(cls, C, activation, slope=0.2, dtype=torch.float64, **kw):
    """A genfast module and the torch BatchNorm with the same random parameters and buffers."""
    torch_cls = nn.BatchNorm2d if cls is gnn.BatchNormAct2d else nn.BatchNorm1d
    g = cls(C, activation=activation, negative_slope=slope, dtype=dtype, **kw)
    t = torch_cls(C, eps=g.eps, momentum=g.momentum, affine=g.affine,
                  track_running_stats=g.track_running_stats, dtype=dtype)
    with torch.no_grad():
        if g.affine:
            g.weight.uniform_(0.5, 1.5)
            g.weight[::2].neg_()
            g.bias.uniform_(-0.5, 0.5)
        if g.track_running_stats:
            g.running_mean.uniform_(-0.3, 0.3)
            g.running_var.uniform_(0.5, 2.0)
    t.load_state_dict(g.state_dict())
    return g, t


def run_pair(g, t, x, activation, slope, train=True):
    """Forward + backward of both modules on copies of x; returns both sets of results."""
    g.train(train)
    t.train(train)
    xg = x.detach().clone().requires_grad_()
    xt = x.detach().clone().requires_grad_()
    yg = g(xg)
    yt = torch_act(t(xt), activation, slope)
    dy = torch.randn_like(yt)
    yg.backward(dy)
    yt.backward(dy)
    return (yg, xg.grad, g), (yt, xt.grad, t)


def check_same(res_g, res_t, dtype, scale=1.0):
    (yg, dxg, g), (yt, dxt, t) = res_g, res_t
    assert_close(yg, yt, dtype, "output", scale)
    assert_close(dxg, dxt, dtype, "grad_input", scale)
    if g.affine:
        assert_close(g.weight.grad, t.weight.grad, dtype, "grad_weight", scale * 10)
        assert_close(g.bias.grad, t.bias.grad, dtype, "grad_bias", scale * 10)
    if g.track_running_stats:
        assert_close(g.running_mean, t.running_mean, dtype, "running_mean", scale)
        assert_close(g.running_var, t.running_var, dtype, "running_var", scale)
        assert int(g.num_batches_tracked) == int(t.num_batches_tracked)


# --- the reference against torch.nn ----------------------------------------------------------

@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_reference_matches_torch_nn(activation, train, momentum):
    with backend("reference"):
        g, t = make_pair(gnn.BatchNormAct2d, 5, activation, momentum=momentum)
        x = torch.randn(3, 5, 4, 6, dtype=torch.float64)
        for _ in range(2):  # two steps: momentum=None averages cumulatively
            res_g, res_t = run_pair(g, t, x, activation, 0.2, train)
            check_same(res_g, res_t, torch.float64)


# --- every backend against torch.nn / the reference in float64 -------------------------------

SHAPES = [
    (gnn.BatchNormAct2d, (2, 3, 5, 7)),
    (gnn.BatchNormAct2d, (1, 4, 3, 1)),
    (gnn.BatchNormAct2d, (5, 1, 2, 2)),
    (gnn.BatchNormAct1d, (6, 5)),
    (gnn.BatchNormAct1d, (3, 4, 9)),
    (gnn.BatchNormAct1d, (2, 3, 1)),
]


LAYOUT_CASES = [(cls, shape, cl) for cls, shape in SHAPES for cl in (False, True)
                if not (cl and len(shape) == 2)]  # a 2-D input has one layout


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("cls,shape,channels_last", LAYOUT_CASES)
def test_backend_float64_train(backend_name, cls, shape, channels_last):
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        if x.dim() == 4:
            x = x.to(memory_format=torch.channels_last)
        else:
            x = x.transpose(1, 2).contiguous().transpose(1, 2)  # (N, C, L) stored as (N, L, C)
    with backend(backend_name):
        for activation in ACTS:
            g, t = make_pair(cls, shape[1], activation)
            res_g, res_t = run_pair(g, t, x, activation, 0.2, train=True)
            check_same(res_g, res_t, torch.float64)
            if channels_last and x.dim() == 4:
                assert res_g[0].is_contiguous(memory_format=torch.channels_last)
                assert res_g[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ACTS)
def test_backend_eval_and_options(backend_name, activation):
    x = torch.randn(3, 4, 5, 3, dtype=torch.float64)
    with backend(backend_name):
        for kw in ({}, {"affine": False}, {"track_running_stats": False}, {"momentum": None}):
            g, t = make_pair(gnn.BatchNormAct2d, 4, activation, slope=0.3, **kw)
            for train in (True, False, True):
                res_g, res_t = run_pair(g, t, x, activation, 0.3, train)
                check_same(res_g, res_t, torch.float64)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_noncontiguous_and_mixed_layout_grad(backend_name):
    """A strided (sliced) input is copied and still right; a grad_output in another layout than
    the input is read correctly."""
    base = torch.randn(3, 8, 5, 4, dtype=torch.float64)
    x = base[:, ::2]
    g, t = make_pair(gnn.BatchNormAct2d, 4, "leaky_relu")
    with backend(backend_name):
        res_g, res_t = run_pair(g, t, x, "leaky_relu", 0.2)
        check_same(res_g, res_t, torch.float64)
        xc = torch.randn(2, 4, 3, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
        xg = xc.clone().requires_grad_()
        y = GF.batch_norm_act(xg, None, None, g.weight, g.bias, True, 0.1, 1e-5)
        dy = torch.randn(2, 4, 3, 5, dtype=torch.float64)  # contiguous, unlike x
        y.backward(dy)
    xr = xc.clone().requires_grad_()
    yr = F.leaky_relu(F.batch_norm(xr, None, None, g.weight, g.bias, True, 0.1, 1e-5), 0.01)
    yr.backward(dy)
    assert_close(xg.grad, xr.grad, torch.float64, "grad_input (mixed layouts)")


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_empty_batch(backend_name):
    g, t = make_pair(gnn.BatchNormAct2d, 3, "relu")
    x = torch.randn(0, 3, 4, 4, dtype=torch.float64)
    with backend(backend_name):
        res_g, res_t = run_pair(g, t, x, "relu", 0.2)
    assert res_g[0].shape == (0, 3, 4, 4)
    check_same(res_g, res_t, torch.float64)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_float32_against_float64(backend_name):
    x64 = torch.randn(4, 6, 5, 5, dtype=torch.float64) * 3 + 2
    dy64 = torch.randn_like(x64)
    g64, _ = make_pair(gnn.BatchNormAct2d, 6, "leaky_relu")
    g32 = copy.deepcopy(g64).float()
    x32 = x64.float().requires_grad_()
    with backend(backend_name):
        y32 = g32(x32)
        y32.backward(dy64.float())
    x = x64.clone().requires_grad_()
    with backend("reference"):
        y64 = g64(x)
        y64.backward(dy64)
    assert y32.dtype == torch.float32
    assert_close(y32, y64, torch.float32, "output float32")
    assert_close(x32.grad, x.grad, torch.float32, "grad_input float32")
    assert_close(g32.weight.grad, g64.weight.grad, torch.float32, "grad_weight float32", scale=10)
    assert_close(g32.running_var, g64.running_var, torch.float32, "running_var float32")


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_bounded_by_torch(backend_name, dtype):
    """float16/bfloat16 in, statistics in float32: genfast's error against the float64 result is
    no worse than twice PyTorch's own error in that dtype."""
    x64 = torch.randn(4, 8, 6, 6, dtype=torch.float64) * 2 + 1
    g, t = make_pair(gnn.BatchNormAct2d, 8, "leaky_relu")
    gl = copy.deepcopy(g).to(dtype)
    tl = copy.deepcopy(t).to(dtype)
    x = x64.to(dtype)
    dy64 = torch.randn_like(x64)
    dy = dy64.to(dtype)
    exact_x = x.double().requires_grad_()
    exact = F.leaky_relu(t(exact_x), 0.2)
    exact.backward(dy.double())
    xl = x.clone().requires_grad_()
    yl = F.leaky_relu(tl(xl), 0.2)
    yl.backward(dy)
    xg = x.clone().requires_grad_()
    with backend(backend_name):
        yg = gl(xg)
    yg.backward(dy)
    assert yg.dtype == dtype and xg.grad.dtype == dtype
    floor = 4 * torch.finfo(dtype).eps
    assert_error_not_worse(yg, yl, exact, floor=floor, msg="output")
    assert_error_not_worse(xg.grad, xl.grad, exact_x.grad, floor=floor, msg="grad_input")
    assert_error_not_worse(gl.running_var, tl.running_var, t.running_var, floor=floor, msg="running_var")


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_half_input_float_params(backend_name):
    """Mixed precision as nn.BatchNorm2d allows: float16 input, float32 parameters and buffers."""
    g, t = make_pair(gnn.BatchNormAct2d, 4, "relu", dtype=torch.float32)
    x = torch.randn(3, 4, 5, 5).half()
    with backend(backend_name):
        yg = g(x)
    yt = F.relu(t(x))
    assert yg.dtype == torch.float16 and g.running_mean.dtype == torch.float32
    assert_close(yg, yt, torch.float16, "output")
    assert_close(g.running_mean, t.running_mean, torch.float32, "running_mean")


# --- memory_efficient mode --------------------------------------------------------------------

@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ["leaky_relu", "identity"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_memory_efficient_matches_standard(backend_name, activation, channels_last):
    x = torch.randn(3, 5, 4, 3, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    g, t = make_pair(gnn.BatchNormAct2d, 5, activation, memory_efficient=True)
    with backend(backend_name):
        for train in (True, False):
            res_g, res_t = run_pair(g, t, x, activation, 0.2, train)
            check_same(res_g, res_t, torch.float64, scale=100)


def test_memory_efficient_saves_output_not_input():
    """The autograd graph keeps y (and per-channel vectors), not x."""
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    m = gnn.BatchNormAct2d(3, memory_efficient=True, dtype=torch.float64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = m(x)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == y.data_ptr()


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_memory_efficient_gamma_near_zero(backend_name):
    """|weight| is kept >= GAMMA_FLOOR: a zero weight gives finite outputs and gradients that
    match the reference with the clamped weight, and only that channel differs from nn."""
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    g, t = make_pair(gnn.BatchNormAct2d, 3, "leaky_relu", memory_efficient=True)
    with torch.no_grad():
        g.weight[1] = 0.0
    t.load_state_dict(g.state_dict())
    with backend(backend_name):
        (yg, dxg, _), (yt, _, _) = run_pair(g, t, x, "leaky_relu", 0.2)
    assert torch.isfinite(yg).all() and torch.isfinite(dxg).all() and torch.isfinite(g.weight.grad).all()
    assert_close(yg[:, [0, 2]], yt[:, [0, 2]], torch.float64, "untouched channels")
    diff = (yg[:, 1] - yt[:, 1]).abs().max().item()
    assert 0 < diff <= bn_ops.GAMMA_FLOOR * 10  # |xhat| stays below 10 for these inputs


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_memory_efficient_16bit_input_saves_the_input(backend_name, dtype):
    """A float16 / bfloat16 input in memory_efficient mode saves the input (one RuntimeWarning):
    recovering it from the 16-bit output divides that output's rounding by |weight| (bfloat16,
    weight 0.05, bias 2: grad_weight 10% off where torch's is 0.1%). Output bitwise the default
    mode's; gradients within twice torch's own 16-bit error against float64."""
    from genfast import backend as B

    C = 4
    w = torch.tensor([1.0, 0.2, 0.05, 0.05])
    b = torch.tensor([0.0, 1.0, 0.0, 2.0])
    x = torch.randn(16, C, 8, 8)
    dy = torch.randn(16, C, 8, 8)
    res = {}
    for name in ("exact", "torch", "default", "memory_efficient"):
        m = (nn.BatchNorm2d(C) if name in ("exact", "torch")
             else gnn.BatchNormAct2d(C, negative_slope=0.2, memory_efficient=name == "memory_efficient"))
        with torch.no_grad():
            m.weight.copy_(w)
            m.bias.copy_(b)
        xi = x.double() if name == "exact" else x.to(dtype)  # float32 parameters with a 16-bit input
        m = m.double() if name == "exact" else m
        xi.requires_grad_()
        saved = []
        B._warned.discard("bn-memory-efficient-16bit")
        with backend(backend_name), torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t) or t, lambda t: t):
            if name == "memory_efficient":
                with pytest.warns(RuntimeWarning, match="memory_efficient=True with a"):
                    y = m(xi)
            else:
                y = m(xi)
                y = F.leaky_relu(y, 0.2) if name in ("exact", "torch") else y
        if name == "memory_efficient" and backend_name != "reference":  # (whose autograd is torch's)
            assert any(t.data_ptr() == xi.data_ptr() for t in saved), "the input is saved"
        y.backward(dy.to(y.dtype))
        res[name] = (y, xi.grad, m.weight.grad, m.bias.grad)
    assert torch.equal(res["memory_efficient"][0], res["default"][0])
    for i, what in enumerate(("output", "grad_input", "grad_weight", "grad_bias")):
        exact = res["exact"][i]
        assert_error_not_worse(res["memory_efficient"][i], res["torch"][i], exact,
                               floor=torch.finfo(dtype).eps * exact.abs().max().item(), msg=what)


def test_memory_efficient_rejects_non_invertible():
    with pytest.raises(ValueError, match="memory_efficient"):
        gnn.BatchNormAct2d(4, activation="relu", memory_efficient=True)
    with pytest.raises(ValueError, match="memory_efficient"):
        gnn.BatchNormAct2d(4, negative_slope=0.0, memory_efficient=True)
    with pytest.raises(ValueError, match="memory_efficient"):
        GF.batch_norm_act(torch.randn(2, 3), None, None, training=True, activation="relu",
                          memory_efficient=True)


def test_memory_efficient_double_backward_raises():
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    m = gnn.BatchNormAct2d(3, memory_efficient=True, dtype=torch.float64)
    y = m(x)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


# --- registration, gradcheck, double backward, compile ----------------------------------------

@pytest.mark.parametrize("backend_name", ["cpu", "triton"])
@pytest.mark.parametrize("training", [True, False])
def test_opcheck(backend_name, training):
    x = torch.randn(3, 4, 2, 3)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    args = (x, w, b, rm, rv, training, 0.1, 1e-5, 2, 0.2, 0.0, backend_name)
    torch.library.opcheck(torch.ops.genfast.batch_norm_act.default, args)
    y, mean, invstd = torch.ops.genfast.batch_norm_act(x, w, b, rm.clone(), rv.clone(), training,
                                                       0.1, 1e-5, 2, 0.2, 0.0, backend_name)
    bargs = (torch.randn_like(y), x, w, b, mean, invstd, training, 2, 0.2, 0.0, False, backend_name)
    torch.library.opcheck(torch.ops.genfast.batch_norm_act_backward.default, bargs)
    if backend_name == "cpu":
        torch.library.opcheck(torch.ops.genfast.batch_norm_act_fwd.default, args[:-1])
        torch.library.opcheck(torch.ops.genfast.batch_norm_act_bwd.default, bargs[:-1])


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(backend_name, training):
    x = torch.randn(3, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.5

    def f(x, w, b):
        return GF.batch_norm_act(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5,
                                 negative_slope=0.3)

    with backend(backend_name):
        assert torch.autograd.gradcheck(f, (x, w, b))
        assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_double_backward_matches_torch():
    """A gradient penalty through the fused layer equals the same penalty through nn modules."""
    g, t = make_pair(gnn.BatchNormAct2d, 3, "leaky_relu")
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    out = []
    for mod, act in ((g, lambda y: y), (t, lambda y: F.leaky_relu(y, 0.2))):
        xi = x.clone().requires_grad_()
        y = act(mod(xi))
        (gx,) = torch.autograd.grad((y * y).sum(), xi, create_graph=True)
        penalty = gx.square().sum()
        penalty.backward()
        out.append((penalty.detach(), mod.weight.grad.clone()))
    assert_close(out[0][0], out[1][0], torch.float64, "penalty")
    assert_close(out[0][1], out[1][1], torch.float64, "penalty grad wrt weight")


def test_compile_fullgraph_matches_eager():
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), gnn.BatchNormAct2d(4),
                             nn.Conv2d(4, 2, 1), gnn.BatchNormAct2d(2, activation="relu"))

    eager, compiled_model = make(), make()
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 6, 6)
    ye = eager(x)
    yc = compiled(x)
    assert_close(yc, ye, torch.float32, "compiled output")
    ye.sum().backward()
    yc.sum().backward()
    assert_close(compiled_model[1].weight.grad, eager[1].weight.grad, torch.float32, "compiled grad")
    assert_close(compiled_model[1].running_mean, eager[1].running_mean, torch.float32, "compiled running_mean")
    assert int(compiled_model[1].num_batches_tracked) == 1


def test_compile_inductor_eval():
    m = nn.Sequential(gnn.BatchNormAct2d(3)).eval()
    with torch.no_grad():
        m[0].running_mean.uniform_(-1, 1)
    x = torch.randn(2, 3, 4, 4)
    assert_close(torch.compile(m, fullgraph=True)(x), m(x), torch.float32, "inductor eval")


# --- modules: state_dict compatibility, repr, activation names -------------------------------

def test_state_dict_interchangeable_with_torch():
    t = nn.BatchNorm2d(6)
    with torch.no_grad():
        t.weight.uniform_()
        t.running_var.uniform_(1, 2)
    t.num_batches_tracked += 3
    g = gnn.BatchNormAct2d(6)
    g.load_state_dict(t.state_dict(), strict=True)
    assert set(g.state_dict()) == set(t.state_dict())
    t2 = nn.BatchNorm2d(6)
    t2.load_state_dict(g.state_dict(), strict=True)
    assert torch.equal(t2.running_var, t.running_var) and int(t2.num_batches_tracked) == 3
    assert isinstance(g, nn.BatchNorm2d) and isinstance(gnn.BatchNormAct1d(3), nn.BatchNorm1d)
    assert "activation='leaky_relu'" in repr(g)


def test_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        gnn.BatchNormAct2d(3, activation="gelu")
    with pytest.raises(ValueError, match="activation"):
        GF.batch_norm_act(torch.randn(2, 3), None, None, training=True, activation="tanh")


# --- bad input ------------------------------------------------------------------------------

def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


BAD = [
    ("one value per channel", lambda: torch.randn(1, 4, 1, 1), ValueError, "more than 1 value per channel"),
    ("wrong channels", lambda: torch.randn(2, 5, 3, 3), RuntimeError, "running_mean should contain 5 elements"),
    ("wrong dims", lambda: torch.randn(2, 4, 3), ValueError, "expected 4D input"),
    ("integer input", lambda: torch.ones(2, 4, 3, 3, dtype=torch.int64), RuntimeError, "floating"),
]


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("what,make_x,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input_same_exception_as_torch(backend_name, what, make_x, exc, msg):
    g = gnn.BatchNormAct2d(4)
    t = nn.BatchNorm2d(4)
    before = _snapshot(g)
    with pytest.raises(exc):
        t(make_x())
    with backend(backend_name), pytest.raises(exc, match=msg):
        g(make_x())
    after = _snapshot(g)
    assert all(torch.equal(before[k], after[k]) for k in before), "state changed by a failed call"


def test_bad_dtype_and_device_name_the_argument():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="weight"):
        GF.batch_norm_act(x, None, None, torch.ones(3, dtype=torch.float64), None, True)
    with pytest.raises(RuntimeError, match="running_var"):
        GF.batch_norm_act(x, torch.zeros(3), torch.ones(3, device="meta"), None, None, True)
    with pytest.raises(RuntimeError, match="bias should contain 3 elements"):
        GF.batch_norm_act(x, None, None, None, torch.zeros(4), True)
    with pytest.raises(RuntimeError, match="required when training=False"):
        GF.batch_norm_act(x, None, None, None, None, False)


def test_backend_selection_errors():
    x = torch.randn(2, 3)
    with backend("cuda"), pytest.raises(RuntimeError, match="cuda"):
        GF.batch_norm_act(x, None, None, training=True)
    with pytest.raises(ValueError, match="backend"):
        genfast.set_backend("fast")


# --- the fused CPU path runs no PyTorch compute operator --------------------------------------

# Allocation and views (autograd detaches the gradient it stores in x.grad): no arithmetic.
ALLOWED_ATEN = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resize_",
                "aten::detach"}


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_cpu_path_runs_no_torch_compute_op(channels_last, memory_efficient):
    m = gnn.BatchNormAct2d(8, memory_efficient=memory_efficient)
    x = torch.randn(4, 8, 6, 6)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    dy = torch.randn_like(x)
    with backend("cpu"):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y = m(x)
            y.backward(dy)
    names = {e.name for e in prof.events()}
    assert "genfast::batch_norm_act_fwd" in names and "genfast::batch_norm_act_bwd" in names
    aten = {n for n in names if n.startswith("aten::")} - ALLOWED_ATEN
    # num_batches_tracked += 1 is the module's bookkeeping, as in nn.BatchNorm2d.
    assert aten <= {"aten::add_"}, aten
    assert len([e for e in prof.events() if e.name == "aten::add_"]) == 1


# --- the eager CPU entry: its checks in C++ ---------------------------------------------------

def _eager_args(**over):
    C = 5
    args = dict(input=torch.randn(4, C, 3), running_mean=torch.zeros(C), running_var=torch.ones(C),
                weight=torch.rand(C) + 0.5, bias=torch.randn(C), training=True, momentum=0.1, eps=1e-5,
                act=2, slope=0.2)
    args.update(over)
    return args


@pytest.mark.parametrize("case", [
    "float16", "int", "1d", "5d", "no_channels", "rm_without_rv", "eval_without_buffers", "eps_zero_train",
    "eps_negative_eval", "weight_2d", "weight_wrong_size", "bias_other_dtype", "rv_float64",
    "one_value_per_channel", "empty_batch"])
def test_eager_entry_declines_what_the_checked_path_must_see(case):
    """genfast._C.batch_norm_act_eager returns None for every call it does not take (the
    checked path then raises torch's exception or runs the general path), before touching the
    running buffers."""
    C = 5
    over = {
        "float16": dict(input=torch.randn(4, C, 3).half()),
        "int": dict(input=torch.ones(4, C, 3, dtype=torch.int32)),
        "1d": dict(input=torch.randn(C)),
        "5d": dict(input=torch.randn(2, C, 2, 2, 2)),
        "no_channels": dict(input=torch.randn(4, 0, 3), running_mean=torch.zeros(0), running_var=torch.ones(0),
                            weight=None, bias=None),
        "rm_without_rv": dict(running_var=None),
        "eval_without_buffers": dict(running_mean=None, running_var=None, training=False),
        "eps_zero_train": dict(eps=0.0),
        "eps_negative_eval": dict(eps=-1e-5, training=False),
        "weight_2d": dict(weight=torch.ones(C, 1)),
        "weight_wrong_size": dict(weight=torch.ones(C + 1)),
        "bias_other_dtype": dict(bias=torch.zeros(C, dtype=torch.float64)),
        "rv_float64": dict(running_var=torch.ones(C, dtype=torch.float64)),
        "one_value_per_channel": dict(input=torch.randn(1, C)),
        "empty_batch": dict(input=torch.randn(0, C, 3)),
    }[case]
    args = _eager_args(**over)
    rm, rv = args["running_mean"], args["running_var"]
    before = [t.clone() for t in (rm, rv) if t is not None]
    assert genfast.backend.extension().batch_norm_act_eager(*args.values()) is None
    assert all(torch.equal(a, t) for a, t in zip(before, [t for t in (rm, rv) if t is not None]))


def test_eager_entry_runs_the_cpp_op_and_matches_torch():
    """An eligible call runs genfast::batch_norm_act_train (autograd in C++), not the registered
    Python op, and gives torch's output, running statistics and gradients in float64."""
    C = 6
    x = torch.randn(8, C, 5, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(C, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(C, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.rand(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    dy = torch.randn(8, C, 5, dtype=torch.float64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = GF.batch_norm_act(x, rm, rv, w, b, True, 0.3, 1e-3, negative_slope=0.1)
    names = {e.name for e in prof.events()}
    assert "genfast::batch_norm_act_train" in names and "genfast::batch_norm_act" not in names
    grads = torch.autograd.grad(y, (x, w, b), dy)
    y_t = F.leaky_relu(F.batch_norm(x, rm_t, rv_t, w, b, True, 0.3, 1e-3), 0.1)
    grads_t = torch.autograd.grad(y_t, (x, w, b), dy)
    assert_close(y, y_t, torch.float64, "output")
    assert_close(rm, rm_t, torch.float64, "running_mean")
    assert_close(rv, rv_t, torch.float64, "running_var")
    for g, t, name in zip(grads, grads_t, ("grad_input", "grad_weight", "grad_bias")):
        assert_close(g, t, torch.float64, name)


def test_eager_entry_bad_argument_types_raise_torchs_exception():
    """Arguments of types the C++ entry does not take (a list as weight) go to the checked path,
    which raises the exception type torch raises, and the running buffers are unchanged."""
    x = torch.randn(4, 3, 2)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(TypeError):
        F.batch_norm(x, rm.clone(), rv.clone(), [1.0, 1.0, 1.0], None, True)
    with pytest.raises(TypeError):
        GF.batch_norm_act(x, rm, rv, [1.0, 1.0, 1.0], None, True)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


@pytest.mark.parametrize("be", CPU_BACKENDS + [None])  # None: the eager path (C++ entry)
@pytest.mark.parametrize("shape, made_cl", [((4, 6, 1, 1), True), ((3, 1, 5, 5), True),
                                            ((3, 6, 5, 5), True), ((3, 6, 5, 5), False)])
def test_output_strides_like_torch(be, shape, made_cl):
    """torch's BatchNorm gives contiguous strides for an input that is contiguous whatever its
    strides ((N, C, 1, 1) noise or a one-channel map made channels_last), channels_last for a
    channels_last one: the fused BatchNorm + activation too, on every backend, in training and
    eval, so that the next layer picks torch's layout."""
    torch.manual_seed(11)
    x = torch.randn(shape, dtype=torch.float64)
    if made_cl:
        x = x.to(memory_format=torch.channels_last)
    C = shape[1]
    for training in (True, False):
        rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
        w, b = torch.rand(C, dtype=torch.float64) + 0.5, torch.randn(C, dtype=torch.float64)
        want = F.leaky_relu(F.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5), 0.2)
        if be is None:
            y = GF.batch_norm_act(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5,
                                  activation="leaky_relu", negative_slope=0.2)
        else:
            with backend(be):
                y = GF.batch_norm_act(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5,
                                      activation="leaky_relu", negative_slope=0.2)
        assert y.stride() == want.stride(), (be, training, y.stride(), want.stride())
        assert_close(y, want, torch.float64)


@pytest.mark.parametrize("how", ["eager", "aot_eager"])
def test_noise_made_channels_last_keeps_torch_layout_through_a_generator(how):
    """BatchNorm2d -> ReLU -> ConvTranspose2d on (N, C, 1, 1) noise made channels_last: torch's
    BatchNorm collapses it to contiguous, so the transposed convolution after it runs (and
    returns) contiguous; the converted model gives the same strides and values."""
    torch.manual_seed(12)
    unfused = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.ConvTranspose2d(16, 8, 4, 1, 0)).double()
    fused = genfast.convert(copy.deepcopy(unfused))
    if how == "aot_eager":
        torch._dynamo.reset()
    model = fused if how == "eager" else torch.compile(fused, backend="aot_eager", fullgraph=True)
    z = torch.randn(4, 16, 1, 1, dtype=torch.float64).to(memory_format=torch.channels_last)
    for mode in ("train", "eval"):
        unfused.train(mode == "train")
        fused.train(mode == "train")
        want, y = unfused(z), model(z)
        assert y.stride() == want.stride(), (mode, y.stride(), want.stride())
        assert_close(y, want, torch.float64)


@pytest.mark.parametrize("kind", ["channels_last_slice", "nc1_made_cl", "contiguous_slice", "ncl_transposed"])
def test_fakes_promise_the_kernels_strides(kind):
    """The C++ ops' fakes give the strides the kernels return (inductor asserts them: a converted
    model compiled with inductor failed on a slice of a channels_last batch, the fake promising
    channels_last where the kernel, which first copies a non-dense input, writes contiguous)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(13)
    x = {"channels_last_slice": lambda: torch.randn(2, 4, 12, 6).to(memory_format=torch.channels_last)[:, :, ::2],
         "nc1_made_cl": lambda: torch.randn(3, 4, 1, 1).to(memory_format=torch.channels_last),
         "contiguous_slice": lambda: torch.randn(2, 8, 5, 5)[:, ::2],
         "ncl_transposed": lambda: torch.randn(3, 7, 4).transpose(1, 2)}[kind]()
    C = x.shape[1]
    w, b, rm, rv = torch.rand(C) + 0.5, torch.randn(C), torch.zeros(C), torch.ones(C)
    args = (True, 0.1, 1e-5, 2, 0.2, 1e-3)
    ops = torch.ops.genfast
    real = ops.batch_norm_act_fwd(x, w, b, rm.clone(), rv.clone(), *args)[0]
    real_train = ops.batch_norm_act_train(x, w, b, rm.clone(), rv.clone(), *args)
    with FakeTensorMode() as mode:
        f = [mode.from_tensor(t) for t in (x, w, b, rm, rv)]
        fake = ops.batch_norm_act_fwd(*f, *args)[0]
        fake_train = ops.batch_norm_act_train(*f, *args)
    assert real.stride() == fake.stride() and real_train.stride() == fake_train.stride()
    want = F.leaky_relu(F.batch_norm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5), 0.2)
    torch.testing.assert_close(real, want)


@pytest.mark.parametrize("kind", ["bn_relu", "linear_bn_leaky", "convT_bn_relu", "module"])
def test_non_reentrant_checkpoint_counts_like_torch(kind):
    """torch.utils.checkpoint(use_reentrant=False) recomputes the forward in the backward and
    stops once its last saved tensor is back: torch's BatchNorm counts num_batches_tracked before
    its kernel, so the recompute updates the running statistics and the count again. genfast
    counted after its fused call, which the recompute's stop skipped (statistics updated twice,
    the count once; with momentum=None the statistics then diverged). Three steps: state as
    torch's."""
    from torch.utils.checkpoint import checkpoint

    build = {
        "bn_relu": lambda: nn.Sequential(nn.BatchNorm2d(3, momentum=None), nn.ReLU()),
        "linear_bn_leaky": lambda: nn.Sequential(nn.Linear(6, 3), nn.BatchNorm1d(3), nn.LeakyReLU(0.2)),
        "convT_bn_relu": lambda: nn.Sequential(nn.ConvTranspose2d(4, 3, 4, 2, 1), nn.BatchNorm2d(3, momentum=None),
                                               nn.ReLU(True)),
        "module": lambda: nn.Sequential(nn.BatchNorm2d(3, momentum=None), nn.LeakyReLU(0.2)),
    }[kind]
    shape = {"linear_bn_leaky": (8, 6), "convT_bn_relu": (2, 4, 3, 3)}.get(kind, (4, 3, 5, 5))
    torch.manual_seed(0)
    ref_m = build().double()
    ours = (genfast.convert(copy.deepcopy(ref_m)) if kind != "module"
            else gnn.BatchNormAct2d(3, momentum=None, negative_slope=0.2, dtype=torch.float64))
    if kind != "module":
        assert len(ours.fusion_plan()) == 1
    for _ in range(3):
        x = torch.randn(*shape, dtype=torch.float64)
        for m in (ref_m, ours):
            checkpoint(m, x.clone().requires_grad_(), use_reentrant=False).pow(2).sum().backward()
    want = {k.split(".", 1)[-1] if kind == "module" else k: v for k, v in ref_m.state_dict().items()}
    got = ours.state_dict()
    assert set(want) == set(got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)
    assert int(want[[k for k in want if k.endswith("num_batches_tracked")][0]]) == 6
