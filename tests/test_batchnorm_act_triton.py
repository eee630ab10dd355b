"""The Triton BatchNorm + activation kernels (genfast/kernels/batchnorm_act.py) against the float64
reference: both paths (resident one-read kernels and the split two-launch kernels, forced with
small tiles and several splits so that partial tiles and the partial-statistics merge run),
contiguous and channels_last, 2D/3D/4D inputs, every activation, training and eval, running
statistics, memory_efficient (backward from the output), float32/float16/bfloat16, and the
modules on the triton backend. CPU tests run the kernels under TRITON_INTERPRET=1 (tests/conftest.py);
the gpu-marked tests run real kernels on DCGAN-sized tensors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import genfast.nn as gnn
from genfast.kernels import batchnorm_act as K
from genfast.reference import batchnorm_act as ref
from tests.utils import TOL, assert_close, assert_error_not_worse, backend

ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2}
SLOPE = 0.2
EPS = 1e-5
MOMENTUM = 0.1
# Small tiles and two splits make the split kernels loop over several tiles per program, mask
# partial tiles and merge partial statistics even on tiny inputs.
PATHS = {"resident": dict(_path="resident"), "split": dict(_path="split", _tile=16, _splits=2)}

# (shape, layout); channels_last for 3D inputs means (N, C, L) stored as (N, L, C).
CASES = [
    ((5, 3), "contiguous"),
    ((4, 3, 7), "contiguous"),
    ((4, 3, 7), "channels_last"),
    ((3, 5, 3, 5), "contiguous"),
    ((3, 5, 3, 5), "channels_last"),
    ((1, 4, 1, 5), "contiguous"),
    ((2, 1, 3, 3), "channels_last"),
    ((6, 4, 1, 1), "channels_last"),
    ((7, 1, 5), "contiguous"),
    ((2, 20, 3), "channels_last"),  # two channel blocks, the second one partial
]


def to_layout(x, layout):
    if layout == "contiguous":
        return x.contiguous()
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def make_inputs(shape, layout, dtype=torch.float64, param_dtype=None, device="cpu"):
    param_dtype = param_dtype or dtype
    C = shape[1]
    x = to_layout(torch.randn(shape, dtype=torch.float64, device=device) * 1.5 + 0.7, layout).to(dtype)
    w = torch.empty(C, dtype=torch.float64, device=device).uniform_(0.5, 1.5)
    w[::2] = -w[::2]
    b = torch.empty(C, dtype=torch.float64, device=device).uniform_(-0.5, 0.5)
    rm = torch.empty(C, dtype=torch.float64, device=device).uniform_(-0.3, 0.3)
    rv = torch.empty(C, dtype=torch.float64, device=device).uniform_(0.5, 2.0)
    return x, w.to(param_dtype), b.to(param_dtype), rm.to(param_dtype), rv.to(param_dtype)


def reference_stats(x, training, rm, rv):
    if training:
        mean, _, invstd = ref.batch_stats(x.double(), EPS)
        return mean, invstd
    return rm.double(), torch.rsqrt(rv.double() + EPS)


def run_kernels(x, w, b, rm, rv, training, act, path, floor=0.0, saved_is_output=False, dy=None):
    """`path`: a key of PATHS, or the launcher options themselves."""
    opts = PATHS[path] if isinstance(path, str) else path
    y, mean, invstd = K.bn_act_fwd(x, w, b, rm, rv, training, MOMENTUM, EPS, ACT_CODES[act], SLOPE,
                                   floor, **opts)
    if dy is None:
        dy = torch.randn_like(y)
    grads = K.bn_act_bwd(dy, y if saved_is_output else x, w, b, mean, invstd, training,
                         ACT_CODES[act], SLOPE, floor, saved_is_output, **opts)
    return y, mean, invstd, dy, grads


def run_reference(x, w, b, rm, rv, training, act, dy, floor=0.0):
    y = ref.batch_norm_act(x, rm, rv, w, b, training, MOMENTUM, EPS, act, SLOPE, floor)
    mean, invstd = reference_stats(x, training, rm, rv)
    grads = ref.batch_norm_act_backward(dy, x, w, b, mean, invstd, training, act, SLOPE, floor)
    return y, mean, invstd, grads


# --- float64: every layout, shape, activation and mode ------------------------------------------

@pytest.mark.parametrize("path", ["resident", "split"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("act", list(ACT_CODES))
@pytest.mark.parametrize("shape,layout", CASES)
def test_kernels_match_reference_float64(shape, layout, act, training, path):
    x, w, b, rm, rv = make_inputs(shape, layout)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    y, mean, invstd, dy, (dx, gw, gb) = run_kernels(x, w, b, rm, rv, training, act, path)
    y_r, mean_r, invstd_r, (dx_r, gw_r, gb_r) = run_reference(x, w, b, rm_ref, rv_ref, training, act, dy)
    # torch's strides: x's for 4-D, contiguous for other ranks (an (N, C, L) x stored (N, L, C)
    # is read in place and its results copied to contiguous)
    want = x.stride() if x.dim() == 4 else torch.empty(x.shape).stride()
    assert y.stride() == want and dx.stride() == want
    assert mean.dtype == invstd.dtype == torch.float64
    assert_close(y, y_r, msg="output")
    assert_close(mean, mean_r, msg="save_mean")
    assert_close(invstd, invstd_r, msg="save_invstd")
    assert_close(rm, rm_ref, msg="running_mean")
    assert_close(rv, rv_ref, msg="running_var")
    assert_close(dx, dx_r, msg="grad_input")
    assert_close(gw, gw_r, msg="grad_weight")
    assert_close(gb, gb_r, msg="grad_bias")


@pytest.mark.parametrize("path", ["resident", "split"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_no_affine_no_running_stats(path, layout):
    x, _, _, _, _ = make_inputs((4, 3, 5, 2), layout)
    y, mean, invstd, dy, (dx, gw, gb) = run_kernels(x, None, None, None, None, True, "leaky_relu", path)
    y_r, mean_r, invstd_r, (dx_r, gw_r, gb_r) = run_reference(x, None, None, None, None, True,
                                                             "leaky_relu", dy)
    assert gw.dtype == gb.dtype == x.dtype
    for a, e, name in ((y, y_r, "output"), (dx, dx_r, "grad_input"), (gw, gw_r, "grad_weight"),
                       (gb, gb_r, "grad_bias"), (invstd, invstd_r, "save_invstd")):
        assert_close(a, e, msg=name)


# --- memory_efficient: backward from the output -------------------------------------------------

@pytest.mark.parametrize("path", ["resident", "split"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("act", ["leaky_relu", "identity"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_from_output(layout, act, training, path):
    floor = 1e-3
    x, w, b, rm, rv = make_inputs((3, 6, 5, 3), layout)
    # Gammas below the floor (and exactly 0) use sign(g) * floor in the forward and backward.
    w[1], w[2], w[3] = 0.0, 2e-4, -5e-4
    rm_ref, rv_ref = rm.clone(), rv.clone()
    y, mean, invstd, dy, (dx, gw, gb) = run_kernels(x, w, b, rm, rv, training, act, path,
                                                    floor=floor, saved_is_output=True)
    y_r, _, _, (dx_r, gw_r, gb_r) = run_reference(x, w, b, rm_ref, rv_ref, training, act, dy, floor)
    assert_close(y, y_r, msg="output")
    assert_close(dx, dx_r, msg="grad_input")
    assert_close(gw, gw_r, msg="grad_weight")
    assert_close(gb, gb_r, msg="grad_bias")


@pytest.mark.parametrize("saved_is_output", [False, True])
@pytest.mark.parametrize("act", ["leaky_relu", "relu"])
@pytest.mark.parametrize("path", ["resident", "split"])
def test_derivative_at_zero_is_the_negative_slope(path, act, saved_is_output):
    """Eval with bias 0 and x == running_mean gives z == 0 exactly; f'(0) is the negative side's
    slope (torch's convention)."""
    if saved_is_output and act == "relu":
        pytest.skip("relu is not invertible")
    x, w, _, rm, rv = make_inputs((4, 3, 5), "contiguous")
    b = torch.zeros_like(w)
    x[:, :, ::2] = rm.view(1, 3, 1)
    y, mean, invstd, dy, (dx, _, _) = run_kernels(x, w, b, rm, rv, False, act, path,
                                                  saved_is_output=saved_is_output)
    assert (y[:, :, ::2] == 0).all()
    slope = SLOPE if act == "leaky_relu" else 0.0
    expected = dy[:, :, ::2] * slope * (w * invstd).view(1, 3, 1)
    assert_close(dx[:, :, ::2], expected, msg="grad_input at z == 0")



@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("path", ["resident", "split"])
def test_relu_backward_masks_a_special_gradient_like_torch(path, training):
    """relu's backward selects as torch's threshold_backward: a NaN or inf incoming gradient where
    the output is 0 gives a 0 dz there, so every gradient stays finite and equal to torch's."""
    x, w, b, rm, rv = make_inputs((4, 3, 5), "contiguous")
    y, _, _ = K.bn_act_fwd(x, w, b, rm.clone(), rv.clone(), training, MOMENTUM, EPS, ACT_CODES["relu"], SLOPE,
                           0.0, **PATHS[path])
    dead = y <= 0
    assert dead.any() and (~dead).any()
    dy = torch.randn_like(y)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=y.dtype)
    dy[dead] = specials.repeat(int(dead.sum()) // 3 + 1)[: int(dead.sum())]
    _, _, _, _, grads = run_kernels(x, w, b, rm.clone(), rv.clone(), training, "relu", path, dy=dy)
    _, _, _, grads_ref = run_reference(x, w, b, rm.clone(), rv.clone(), training, "relu", dy)
    for g, gr, name in zip(grads, grads_ref, ("grad_input", "grad_weight", "grad_bias")):
        assert torch.isfinite(gr).all(), name
        assert_close(g, gr, msg=name)

# --- layouts of grad_out and input ----------------------------------------------------------------

@pytest.mark.parametrize("path", ["resident", "split"])
@pytest.mark.parametrize("dy_kind", ["channels_last", "contiguous", "expanded"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_grad_out_in_another_layout(layout, dy_kind, path):
    x, w, b, rm, rv = make_inputs((3, 4, 3, 5), layout)
    if dy_kind == "expanded":
        dy = torch.randn(1, 4, 1, 1, dtype=x.dtype).expand(x.shape)
    else:
        dy = to_layout(torch.randn(x.shape, dtype=x.dtype), dy_kind)
    y, mean, invstd, _, (dx, gw, gb) = run_kernels(x, w, b, rm, rv, True, "leaky_relu", path, dy=dy)
    dx_r, gw_r, gb_r = ref.batch_norm_act_backward(dy, x, w, b, mean, invstd, True, "leaky_relu", SLOPE)
    assert dx.stride() == x.stride()
    assert_close(dx, dx_r, msg="grad_input")
    assert_close(gw, gw_r, msg="grad_weight")
    assert_close(gb, gb_r, msg="grad_bias")


@pytest.mark.parametrize("path", ["resident", "split"])
def test_non_dense_input_is_copied(path):
    base, w, b, rm, rv = make_inputs((4, 3, 6, 8), "contiguous")
    x = base[:, :, ::2, 1:7]
    assert not x.is_contiguous()
    rm_ref, rv_ref = rm.clone(), rv.clone()
    y, mean, invstd, dy, (dx, gw, gb) = run_kernels(x, w, b, rm, rv, True, "relu", path)
    y_r, _, _, (dx_r, gw_r, gb_r) = run_reference(x, w, b, rm_ref, rv_ref, True, "relu", dy)
    assert y.is_contiguous()
    assert_close(y, y_r, msg="output")
    assert_close(rv, rv_ref, msg="running_var")
    assert_close(dx, dx_r, msg="grad_input")
    assert_close(gw, gw_r, msg="grad_weight")


@pytest.mark.parametrize("path", ["resident", "split"])
def test_strided_parameters_and_running_stats(path):
    """(C,) vectors that are views with stride 2: read correctly, running stats updated in place."""
    x, w, b, rm, rv = make_inputs((4, 3, 5), "contiguous")
    bufs = [torch.randn(6, dtype=torch.float64) for _ in range(4)]
    for buf, v in zip(bufs, (w, b, rm, rv)):
        buf[::2] = v
    ws, bs, rms, rvs = (buf[::2] for buf in bufs)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    y, mean, invstd, dy, (dx, gw, gb) = run_kernels(x, ws, bs, rms, rvs, True, "leaky_relu", path)
    y_r, _, _, (dx_r, gw_r, gb_r) = run_reference(x, w, b, rm_ref, rv_ref, True, "leaky_relu", dy)
    assert_close(y, y_r, msg="output")
    assert_close(dx, dx_r, msg="grad_input")
    assert_close(gw, gw_r, msg="grad_weight")
    assert_close(bufs[2][::2], rm_ref, msg="running_mean")
    assert_close(bufs[3][::2], rv_ref, msg="running_var")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("path", ["resident", "split"])
def test_empty_batch(path, training):
    """N = 0: empty output; torch leaves the running statistics unchanged."""
    x, w, b, rm, rv = make_inputs((0, 3, 4), "contiguous")
    rm0, rv0 = rm.clone(), rv.clone()
    y, mean, invstd = K.bn_act_fwd(x, w, b, rm, rv, training, MOMENTUM, EPS, 2, SLOPE, 0.0,
                                   **PATHS[path])
    t = torch.nn.BatchNorm1d(3, dtype=torch.float64).train(training)
    t.running_mean.copy_(rm0)
    t.running_var.copy_(rv0)
    y_t = t(x)
    assert y.shape == x.shape == y_t.shape
    assert torch.equal(rm, t.running_mean) and torch.equal(rv, t.running_var)
    if not training:
        assert_close(mean, rm0, msg="save_mean")
        assert_close(invstd, torch.rsqrt(rv0 + EPS), msg="save_invstd")
    dx, gw, gb = K.bn_act_bwd(torch.empty_like(y), x, w, b, mean, invstd, training, 2, SLOPE,
                              0.0, False, **PATHS[path])
    assert dx.shape == x.shape
    assert (gw == 0).all() and (gb == 0).all()


# --- precision -------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["resident", "split"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float32_against_float64(layout, training, path):
    x, w, b, rm, rv = make_inputs((4, 5, 6, 7), layout, dtype=torch.float32)
    rm64, rv64 = rm.double(), rv.double()
    y, mean, invstd, dy, (dx, gw, gb) = run_kernels(x, w, b, rm, rv, training, "leaky_relu", path)
    y_r, _, invstd_r, (dx_r, gw_r, gb_r) = run_reference(
        x.double(), w.double(), b.double(), rm64, rv64, training, "leaky_relu", dy.double())
    assert mean.dtype == torch.float32 and gw.dtype == torch.float32
    assert_close(y, y_r, torch.float32, "output")
    assert_close(invstd, invstd_r, torch.float32, "save_invstd")
    assert_close(rm, rm64, torch.float32, "running_mean")
    assert_close(rv, rv64, torch.float32, "running_var")
    assert_close(dx, dx_r, torch.float32, "grad_input")
    assert_close(gw, gw_r, torch.float32, "grad_weight")
    assert_close(gb, gb_r, torch.float32, "grad_bias")


@pytest.mark.parametrize("path", ["resident", "split"])
def test_float32_statistics_are_robust_to_a_large_mean(path):
    """A channel with mean 3000 and std 1: raw sum / sum-of-squares in float32 loses the variance
    (checked below), the per-tile mean/M2 merged with Chan's formula keeps it."""
    x = (torch.randn(16, 2, 16, 16) + 3000.0).float()
    kw = dict(_path="split", _tile=256, _splits=3) if path == "split" else PATHS[path]
    _, _, invstd = K.bn_act_fwd(x, None, None, None, None, True, MOMENTUM, EPS, 0, SLOPE, 0.0, **kw)
    var_exact = x.double().var(dim=(0, 2, 3), unbiased=False)
    var = invstd.double().pow(-2) - EPS
    err = ((var - var_exact).abs() / var_exact).max().item()
    n = x[:, 0].numel()
    naive = (x.sum(dim=(0, 2, 3)) ** 2 / n).neg().add(x.pow(2).sum(dim=(0, 2, 3))).div(n).double()
    naive_err = ((naive - var_exact).abs() / var_exact).max().item()
    assert err < 1e-3, err
    assert naive_err > 1e-3, naive_err


def check_deterministic(shape, device, path):
    x, w, b, rm, rv = make_inputs(shape, "channels_last", dtype=torch.float32, device=device)
    first = run_kernels(x, w, b, rm.clone(), rv.clone(), True, "leaky_relu", path)
    second = run_kernels(x, w, b, rm.clone(), rv.clone(), True, "leaky_relu", path, dy=first[3])
    for a, e in zip(first[:3] + first[4], second[:3] + second[4]):
        assert torch.equal(a, e)


def test_split_path_is_deterministic():
    check_deterministic((4, 4, 5, 5), "cpu", "split")


def torch_bn_act(x, w, b, rm, rv, training, act):
    y = F.batch_norm(x, rm, rv, w, b, training, MOMENTUM, EPS)
    return F.leaky_relu(y, SLOPE) if act == "leaky_relu" else F.relu(y)


def check_low_precision(shape, layout, dtype, param_dtype, path, device="cpu"):
    """genfast's error against float64 at most twice PyTorch's own error in `dtype` (output and
    every gradient), plus a float32-level floor for results PyTorch happens to get exact.
    `path` None: the launcher's own choice; on GPU a forced path keeps the default tiling."""
    x, w, b, rm, rv = make_inputs(shape, layout, dtype=dtype, param_dtype=param_dtype, device=device)
    dy = torch.randn(shape, device=device).to(dtype)
    if path is None:
        kw = {}
    else:
        kw = PATHS[path] if str(device) == "cpu" else dict(_path=path)
    y, mean, invstd = K.bn_act_fwd(x, w, b, rm.clone(), rv.clone(), True, MOMENTUM, EPS, 2, SLOPE,
                                   0.0, **kw)
    dx, gw, gb = K.bn_act_bwd(dy, x, w, b, mean, invstd, True, 2, SLOPE, 0.0, False, **kw)
    assert y.dtype == dx.dtype == dtype and mean.dtype == torch.float32
    assert gw.dtype == param_dtype and gb.dtype == param_dtype
    # Exact: float64 reference on the same (rounded) inputs.
    args64 = [t.double().requires_grad_(t is not rm and t is not rv) for t in (x, w, b, rm, rv)]
    y64 = torch_bn_act(args64[0], args64[1], args64[2], args64[3].detach().clone(),
                       args64[4].detach().clone(), True, "leaky_relu")
    g64 = torch.autograd.grad(y64, args64[:3], dy.double())
    # PyTorch in the low precision (parameters in the same dtype as the input, as torch needs).
    argsl = [t.detach().to(dtype).requires_grad_(i < 3) for i, t in enumerate((x, w, b, rm, rv))]
    yl = torch_bn_act(argsl[0], argsl[1], argsl[2], argsl[3], argsl[4], True, "leaky_relu")
    gl = torch.autograd.grad(yl, argsl[:3], dy)
    floor = 1e-5 * max(1.0, y64.abs().max().item())
    assert_error_not_worse(y, yl, y64, floor=floor, msg="output")
    for name, a, l, e in zip(("grad_input", "grad_weight", "grad_bias"), (dx, gw, gb), gl, g64):
        assert_error_not_worse(a, l, e, floor=1e-5 * max(1.0, e.abs().max().item()), msg=name)


@pytest.mark.parametrize("path", ["resident", "split"])
@pytest.mark.parametrize("param_dtype", ["same", torch.float32])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_bounded_by_torch(dtype, param_dtype, path):
    param_dtype = dtype if param_dtype == "same" else param_dtype
    check_low_precision((8, 3, 5, 6), "channels_last", dtype, param_dtype, path)


# --- through the modules on the triton backend --------------------------------------------------

def torch_act(y, activation):
    if activation == "leaky_relu":
        return F.leaky_relu(y, SLOPE)
    if activation == "relu":
        return F.relu(y)
    return y


@pytest.mark.parametrize("cfg", [
    dict(cls="2d", shape=(4, 3, 5, 5), layout="contiguous", act="leaky_relu"),
    dict(cls="2d", shape=(3, 4, 3, 5), layout="channels_last", act="relu", momentum=None),
    dict(cls="2d", shape=(2, 5, 4, 3), layout="contiguous", act="leaky_relu", memory_efficient=True),
    dict(cls="2d", shape=(2, 5, 4, 3), layout="channels_last", act="identity", memory_efficient=True),
    dict(cls="1d", shape=(9, 4), layout="contiguous", act="leaky_relu"),
    dict(cls="1d", shape=(5, 3, 7), layout="channels_last", act="identity", momentum=None),
    dict(cls="1d", shape=(5, 3, 7), layout="contiguous", act="relu", affine=False),
    dict(cls="2d", shape=(3, 2, 4, 4), layout="contiguous", act="leaky_relu", track_running_stats=False),
])
def test_module_on_triton_matches_torch(cfg):
    cls, tcls = (gnn.BatchNormAct2d, nn.BatchNorm2d) if cfg["cls"] == "2d" else (gnn.BatchNormAct1d, nn.BatchNorm1d)
    C = cfg["shape"][1]
    kw = dict(momentum=cfg.get("momentum", 0.1), affine=cfg.get("affine", True),
              track_running_stats=cfg.get("track_running_stats", True), dtype=torch.float64)
    g = cls(C, activation=cfg["act"], negative_slope=SLOPE,
            memory_efficient=cfg.get("memory_efficient", False), **kw)
    t = tcls(C, **kw)
    with torch.no_grad():
        if g.affine:
            g.weight.uniform_(0.5, 1.5)
            g.bias.uniform_(-0.5, 0.5)
        if g.track_running_stats:
            g.running_mean.uniform_(-0.3, 0.3)
            g.running_var.uniform_(0.5, 2.0)
    t.load_state_dict(g.state_dict())
    for step, train in enumerate((True, True, False)):
        g.train(train)
        t.train(train)
        x = to_layout(torch.randn(cfg["shape"], dtype=torch.float64) + step, cfg["layout"])
        xg = x.clone().requires_grad_()
        xt = x.clone().requires_grad_()
        with backend("triton"):
            yg = g(xg)
        yt = torch_act(t(xt), cfg["act"])
        dy = torch.randn_like(yt)
        with backend("triton"):
            yg.backward(dy)
        yt.backward(dy)
        assert yg.stride() == yt.stride()
        assert_close(yg, yt, msg=f"output, step {step}")
        assert_close(xg.grad, xt.grad, msg=f"grad_input, step {step}")
        if g.affine:
            assert_close(g.weight.grad, t.weight.grad, msg=f"grad_weight, step {step}")
            assert_close(g.bias.grad, t.bias.grad, msg=f"grad_bias, step {step}")
        if g.track_running_stats:
            assert_close(g.running_mean, t.running_mean, msg=f"running_mean, step {step}")
            assert_close(g.running_var, t.running_var, msg=f"running_var, step {step}")
            assert int(g.num_batches_tracked) == int(t.num_batches_tracked)


@pytest.mark.parametrize("shape,resident", [((128, 512, 4, 4), True), ((128, 256, 8, 8), True),
                                            ((128, 128, 16, 16), False), ((128, 64, 32, 32), False)])
def test_plan_for_dcgan_shapes(shape, resident):
    """Channels that fit one program take the one-read path; larger ones are split so that the
    programs (channel blocks x splits) cover 4 per SM (the CPU plan assumes 4 SMs)."""
    N, C, L = shape[0], shape[1], shape[2] * shape[3]
    for resident_max in (K.RESIDENT_MAX_FWD, K.RESIDENT_MAX_BWD):
        p = K._Plan(torch.device("cpu"), torch.float32, False, N, C, L, resident_max, None, None, None)
        assert (p.path == "resident") == resident
        if p.path == "split":
            assert p.n_cblocks * p.S >= 4 * K._num_sms(torch.device("cpu"))
            assert p.S * p.tiles_per_split >= p.n_tiles > (p.S - 1) * p.tiles_per_split
    small_c = K._Plan(torch.device("cpu"), torch.float32, True, 64, 2, 64 * 64, K.RESIDENT_MAX_FWD,
                      None, None, None)
    assert small_c.path == "split" and small_c.S >= 16


@pytest.mark.parametrize("memory_efficient", [False, True])
@pytest.mark.parametrize("path", ["resident", "split"])
def test_gradcheck_on_triton(path, memory_efficient, monkeypatch):
    """gradcheck (float64, fast mode) of the functional on the triton backend; the split path is forced by
    making the resident limit 0, with 8-element tiles."""
    import genfast.functional as GF

    if path == "split":
        monkeypatch.setattr(K, "RESIDENT_MAX_FWD", 0)
        monkeypatch.setattr(K, "RESIDENT_MAX_BWD", 0)
        monkeypatch.setattr(K, "TILE_INTERPRET", 16)
    K._plan.cache_clear()
    x = to_layout(torch.randn(3, 2, 2, 3, dtype=torch.float64), "channels_last").requires_grad_()
    w = torch.empty(2, dtype=torch.float64).uniform_(0.5, 1.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return GF.batch_norm_act(x, None, None, w, b, True, MOMENTUM, EPS, activation="leaky_relu",
                                 negative_slope=SLOPE, memory_efficient=memory_efficient)

    try:
        with backend("triton"):
            assert torch.autograd.gradcheck(f, (x, w, b), fast_mode=True)
    finally:
        K._plan.cache_clear()


# --- GPU: real kernels on DCGAN-sized tensors ---------------------------------------------------

DCGAN = [(128, 64, 32, 32), (128, 128, 16, 16), (128, 256, 8, 8), (128, 512, 4, 4)]


@pytest.mark.gpu
@pytest.mark.parametrize("path", [None, "split", "resident"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", DCGAN)
def test_gpu_dcgan(cuda_device, shape, layout, dtype, path):
    if path == "resident":
        x = torch.empty(shape, device=cuda_device).to(memory_format=torch.channels_last
                                                      if layout == "channels_last" else
                                                      torch.contiguous_format)
        _, cl, N, C, L = K._layout(x)
        try:
            K._Plan(x.device, x.dtype, cl, N, C, L, K.RESIDENT_MAX_BWD, "resident", None, None)
        except ValueError:
            pytest.skip("channel too large for the resident kernels")
    check_low_precision(shape, layout, dtype, torch.float32, path, device=cuda_device)


@pytest.mark.gpu
@pytest.mark.parametrize("path", [None, "split", "resident"])
def test_gpu_running_stats_float32(cuda_device, path):
    x, w, b, rm, rv = make_inputs((128, 256, 8, 8), "contiguous", dtype=torch.float32,
                                  device=cuda_device)
    rm64, rv64 = rm.double(), rv.double()
    kw = {} if path is None else dict(_path=path)
    y, mean, invstd = K.bn_act_fwd(x, w, b, rm, rv, True, MOMENTUM, EPS, 2, SLOPE, 0.0, **kw)
    y_r = ref.batch_norm_act(x.double(), rm64, rv64, w.double(), b.double(), True, MOMENTUM, EPS,
                             "leaky_relu", SLOPE)
    assert_close(y, y_r, torch.float32, "output")
    assert_close(rm, rm64, torch.float32, "running_mean")
    assert_close(rv, rv64, torch.float32, "running_var")


@pytest.mark.gpu
def test_gpu_split_path_is_deterministic(cuda_device):
    check_deterministic((128, 64, 32, 32), cuda_device, dict(_path="split"))


@pytest.mark.gpu
def test_gpu_resident_path_is_chosen_for_small_channels(cuda_device):
    x = torch.randn(128, 512, 4, 4, device=cuda_device)
    plan = K._Plan(x.device, x.dtype, False, 128, 512, 16, K.RESIDENT_MAX_FWD, None, None, None)
    assert plan.path == "resident"
