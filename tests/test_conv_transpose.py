"""conv_transpose family: gnn.ConvTranspose2d / GF.conv_transpose2d on the reference, cpu and
triton (interpreter) backends against F.conv_transpose2d + activation in float64/float32."""
from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import genfast
import genfast.functional as GF
import genfast.nn as gnn
from genfast.reference import conv_transpose as ref
from genfast.reference.activation import act_forward
from tests.utils import CPU_BACKENDS, assert_close, assert_error_not_worse, backend

ACTS = ["identity", "relu", "leaky_relu", "tanh", "sigmoid"]
TORCH_ACT = {"identity": nn.Identity(), "relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(0.2),
             "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid()}


def random_config(rng: random.Random) -> dict:
    groups = rng.choice([1, 1, 2, 3])
    kh, kw = rng.randint(1, 5), rng.randint(1, 5)
    sh, sw = rng.randint(1, 3), rng.randint(1, 3)
    dh, dw = rng.choice([1, 1, 2]), rng.choice([1, 2, 3])
    return dict(
        N=rng.randint(1, 2), cin=groups * rng.randint(1, 3), cout=groups * rng.randint(1, 3),
        H=rng.randint(1, 4), W=rng.randint(1, 4), kernel=(kh, kw), stride=(sh, sw),
        padding=(rng.randint(0, dh * (kh - 1) // 2), rng.randint(0, dw * (kw - 1) // 2)),
        output_padding=(rng.randint(0, max(sh, dh) - 1), rng.randint(0, max(sw, dw) - 1)),
        groups=groups, dilation=(dh, dw), bias=rng.random() < 0.75, activation=rng.choice(ACTS),
        channels_last=rng.random() < 0.3)


def make(cfg, dtype):
    x = torch.randn(cfg["N"], cfg["cin"], cfg["H"], cfg["W"], dtype=dtype)
    if cfg.get("channels_last"):
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(cfg["cin"], cfg["cout"] // cfg["groups"], *cfg["kernel"], dtype=dtype) * 0.5
    b = torch.randn(cfg["cout"], dtype=dtype) if cfg["bias"] else None
    return x, w, b


def expected(cfg, x, w, b, dy):
    """float64 forward and (dx, dw, db) from F.conv_transpose2d + torch's activation."""
    xs = x.detach().double().requires_grad_()
    ws = w.detach().double().requires_grad_()
    bs = b.detach().double().requires_grad_() if b is not None else None
    z = F.conv_transpose2d(xs, ws, bs, cfg["stride"], cfg["padding"], cfg["output_padding"],
                           cfg["groups"], cfg["dilation"])
    y = TORCH_ACT[cfg["activation"]](z)
    grads = torch.autograd.grad(y, [t for t in (xs, ws, bs) if t is not None], dy.double())
    return y, grads


def run_genfast(cfg, x, w, b, dy):
    xs = x.detach().clone().requires_grad_()
    ws = w.detach().clone().requires_grad_()
    bs = b.detach().clone().requires_grad_() if b is not None else None
    y = GF.conv_transpose2d(xs, ws, bs, cfg["stride"], cfg["padding"], cfg["output_padding"],
                            cfg["groups"], cfg["dilation"], activation=cfg["activation"],
                            negative_slope=0.2)
    grads = torch.autograd.grad(y, [t for t in (xs, ws, bs) if t is not None], dy)
    return y, grads


def check(cfg, be, dtype):
    x, w, b = make(cfg, dtype)
    with backend(be):
        y_shape = GF.conv_transpose2d(x, w, b, cfg["stride"], cfg["padding"], cfg["output_padding"],
                                      cfg["groups"], cfg["dilation"]).shape
        dy = torch.randn(y_shape, dtype=dtype)
        y, grads = run_genfast(cfg, x, w, b, dy)
    y_ref, grads_ref = expected(cfg, x, w, b, dy)
    assert y.dtype == dtype and y.shape == y_ref.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, y_ref, dtype, msg=f"{be} output {cfg}")
    for name, g, gr in zip(("input", "weight", "bias"), grads, grads_ref):
        assert_close(g, gr, dtype, msg=f"{be} grad {name} {cfg}", scale=4.0 if dtype == torch.float32 else 1.0)


# --- reference against torch.nn --------------------------------------------------------------

@pytest.mark.parametrize("activation", ACTS)
def test_reference_matches_torch_nn(activation):
    m = nn.ConvTranspose2d(4, 6, (3, 5), stride=(2, 3), padding=(1, 2), output_padding=(1, 0),
                           groups=2, dilation=(2, 1), dtype=torch.float64)
    x = torch.randn(2, 4, 5, 3, dtype=torch.float64)
    y = ref.conv_transpose2d(x, m.weight, m.bias, m.stride, m.padding, m.output_padding, m.groups,
                             m.dilation, activation, 0.2)
    torch.testing.assert_close(y, TORCH_ACT[activation](m(x)), atol=1e-12, rtol=1e-12)


def test_phase_taps_partition_the_kernel():
    for k, s, p, d in [(4, 2, 1, 1), (5, 2, 2, 1), (3, 3, 0, 2), (5, 3, 4, 2), (1, 4, 0, 1)]:
        taps = sorted(t for ph in range(s) for t, _ in ref.phase_taps(ph, k, s, p, d))
        assert taps == list(range(k))
    # k4 s2 p1: two taps per phase; k5 s2 p2: uneven phases (3 and 2 taps)
    assert [len(ref.phase_taps(ph, 4, 2, 1, 1)) for ph in range(2)] == [2, 2]
    assert sorted(len(ref.phase_taps(ph, 5, 2, 2, 1)) for ph in range(2)) == [2, 3]


# --- every backend against F.conv_transpose2d --------------------------------------------------

FIXED = {
    "dcgan_k4s2p1": dict(N=2, cin=3, cout=4, H=3, W=3, kernel=(4, 4), stride=(2, 2), padding=(1, 1),
                         output_padding=(0, 0), groups=1, dilation=(1, 1), bias=True, activation="relu"),
    "dcgan_first_k4s1p0": dict(N=2, cin=5, cout=4, H=1, W=1, kernel=(4, 4), stride=(1, 1),
                               padding=(0, 0), output_padding=(0, 0), groups=1, dilation=(1, 1),
                               bias=False, activation="leaky_relu"),
    "keras_k5s2p2op1": dict(N=2, cin=3, cout=2, H=3, W=2, kernel=(5, 5), stride=(2, 2),
                            padding=(2, 2), output_padding=(1, 1), groups=1, dilation=(1, 1),
                            bias=True, activation="tanh", channels_last=True),
    "groups_dilation_nonsquare": dict(N=1, cin=6, cout=3, H=2, W=4, kernel=(3, 2), stride=(3, 2),
                                      padding=(1, 0), output_padding=(2, 1), groups=3,
                                      dilation=(2, 3), bias=True, activation="sigmoid"),
    "stride_gt_kernel": dict(N=2, cin=2, cout=3, H=2, W=2, kernel=(1, 2), stride=(3, 3),
                             padding=(0, 0), output_padding=(2, 1), groups=1, dilation=(1, 1),
                             bias=True, activation="identity"),
}


@pytest.mark.parametrize("be", CPU_BACKENDS)
@pytest.mark.parametrize("name", sorted(FIXED))
def test_fixed_configs_float64(be, name):
    check(FIXED[name], be, torch.float64)


@pytest.mark.parametrize("be", CPU_BACKENDS)
def test_random_configs_float64(be):
    rng = random.Random(20261123)
    for _ in range(10):
        check(random_config(rng), be, torch.float64)


@pytest.mark.parametrize("be", ["cpu", "triton"])
def test_random_configs_float32(be):
    rng = random.Random(7)
    for _ in range(4):
        check(random_config(rng), be, torch.float32)


@pytest.mark.parametrize("be", CPU_BACKENDS)
def test_unbatched_noncontiguous_and_empty_batch(be):
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)
    x = torch.randn(4, 5, 4, dtype=torch.float64)
    wt = torch.randn(4, 3, 3, 3, dtype=torch.float64).transpose(2, 3)  # non-contiguous weight
    xt = torch.randn(2, 4, 4, 5, dtype=torch.float64).transpose(2, 3)  # non-contiguous input
    with backend(be):
        y = GF.conv_transpose2d(x, w, b, 2, 1, 1, activation="relu")
        yt = GF.conv_transpose2d(xt, wt, b, 2, 1)
        xe = torch.randn(0, 4, 3, 3, dtype=torch.float64, requires_grad=True)
        we = w.clone().requires_grad_()
        be_ = b.clone().requires_grad_()
        ye = GF.conv_transpose2d(xe, we, be_, 2, 1, activation="tanh")
        ge = torch.autograd.grad(ye.sum(), (xe, we, be_))
    assert_close(y, F.relu(F.conv_transpose2d(x, w, b, 2, 1, 1)), torch.float64)
    assert_close(yt, F.conv_transpose2d(xt, wt, b, 2, 1), torch.float64)
    assert ye.shape == (0, 3, 5, 5)
    assert ge[0].shape == xe.shape and torch.equal(ge[1], torch.zeros_like(w))
    assert torch.equal(ge[2], torch.zeros_like(b))


@pytest.mark.parametrize("be", ["cpu", "triton"])
def test_float16_error_not_worse_than_torch(be):
    # bfloat16 matrix paths are tested on the GPU only (the interpreter's bf16 tl.dot is wrong)
    from tests.utils import assert_error_not_worse

    cfg = dict(FIXED["keras_k5s2p2op1"], cin=8, cout=6, H=4, W=4)
    x, w, b = make(cfg, torch.float16)
    dy = torch.randn(2, 6, 8, 8, dtype=torch.float16)
    with backend(be):
        y, g = run_genfast(cfg, x, w, b, dy)
    y64, g64 = expected(cfg, x, w, b, dy)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    yl = torch.tanh(F.conv_transpose2d(xs, ws, bs, 2, 2, 1))
    gl = torch.autograd.grad(yl, (xs, ws, bs), dy)
    assert y.dtype == torch.float16
    assert_error_not_worse(y, yl, y64, factor=2.0, floor=1e-3, msg="fp16 output")
    for a, l, e in zip(g, gl, g64):
        assert_error_not_worse(a, l, e, factor=2.0, floor=1e-3 * e.abs().max().item(), msg="fp16 grad")


# --- the module ----------------------------------------------------------------------------------

@pytest.mark.parametrize("be", CPU_BACKENDS)
def test_module_matches_nn_with_output_size(be):
    torch.manual_seed(0)
    kw = dict(stride=2, padding=1, groups=2, dilation=(1, 2))
    m = gnn.ConvTranspose2d(4, 6, 3, **kw, dtype=torch.float64, activation="leaky_relu", negative_slope=0.2)
    r = nn.ConvTranspose2d(4, 6, 3, **kw, dtype=torch.float64)
    r.load_state_dict(m.state_dict())
    assert list(m.state_dict()) == list(r.state_dict())
    x = torch.randn(2, 4, 3, 4, dtype=torch.float64)
    with backend(be):
        for size in (None, (6, 9), (2, 3, 6, 9)):
            y = m(x, output_size=size)
            y_ref = F.leaky_relu(r(x, output_size=size), 0.2)
            assert_close(y, y_ref, torch.float64, msg=f"output_size={size}")
        y3 = m(x[0], output_size=[6, 9])
        assert_close(y3, F.leaky_relu(r(x[0], output_size=[6, 9]), 0.2), torch.float64)
        with pytest.raises(ValueError):
            m(x, output_size=(20, 20))
    assert "activation='leaky_relu'" in repr(m)


def test_module_arguments_and_errors_match_torch():
    for kwargs in (dict(padding_mode="reflect"), dict(groups=0), dict(groups=4)):
        with pytest.raises(ValueError):
            nn.ConvTranspose2d(4, 6, 3, **kwargs)
        with pytest.raises(ValueError):
            gnn.ConvTranspose2d(4, 6, 3, **kwargs)
    with pytest.raises(ValueError):
        gnn.ConvTranspose2d(4, 6, 3, activation="gelu")
    with pytest.raises(ValueError):
        gnn.ConvTranspose2d(4, 6, 3, activation="leaky_relu", negative_slope=-0.1)
    m = gnn.ConvTranspose2d(4, 6, 3, bias=False)
    assert isinstance(m, nn.ConvTranspose2d) and m.bias is None
    assert set(m.state_dict()) == set(nn.ConvTranspose2d(4, 6, 3, bias=False).state_dict())
    m.padding_mode = "circular"
    with pytest.raises(ValueError):
        m(torch.randn(1, 4, 3, 3))


BAD = [
    dict(stride=2, output_padding=2),
    dict(stride=1, dilation=1, output_padding=1),
    dict(groups=3),
    dict(groups=0),
    dict(stride=0),
    dict(padding=-1),
    dict(dilation=0),
    dict(stride=(1, 2, 3)),
    dict(padding=4),
    dict(bias=torch.randn(4)),
    dict(weight=torch.randn(5, 3, 3, 3)),
    dict(weight=torch.randn(4, 3, 3, 3, dtype=torch.float64)),
    dict(x=torch.randn(5, 5)),
    dict(x=torch.randn(1, 2, 4, 5, 5)),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_invalid_arguments_raise_like_torch(i):
    args = dict(x=torch.randn(2, 4, 5, 5), weight=torch.randn(4, 3, 3, 3), bias=None, stride=1,
                padding=0, output_padding=0, groups=1, dilation=1)
    args.update(BAD[i])
    x, w = args.pop("x"), args.pop("weight")
    with pytest.raises(Exception) as torch_exc:
        F.conv_transpose2d(x, w, **args)
    for be in CPU_BACKENDS:
        with backend(be), pytest.raises(torch_exc.type):
            GF.conv_transpose2d(x, w, **args)


# --- registration, gradcheck, compile ---------------------------------------------------------

@pytest.mark.parametrize("be", ["cpu", "triton", "cuda"])  # cuda: ATen product + Triton epilogue
def test_opcheck(be):
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64)
    w = torch.randn(4, 3, 4, 3, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    geo = ([2, 1], [1, 1], [1, 0], 2, [1, 2])
    act = genfast.backend.ACTIVATIONS["leaky_relu"]
    ops = torch.ops.genfast
    torch.library.opcheck(ops.conv_transpose2d.default, (x, w, b, *geo, act, 0.1, be))
    torch.library.opcheck(ops.conv_transpose2d.default,
                          (x.to(memory_format=torch.channels_last), w, None, *geo, 3, 0.0, be))
    torch.library.opcheck(ops.conv_transpose2d_stats.default, (x, w, *geo, be))
    y = ops.conv_transpose2d(x, w, b, *geo, act, 0.1, be)
    # the BatchNorm block's ops
    yb, part = ops.conv_transpose2d_stats(x, w, *geo, be)
    C = yb.shape[1]
    gamma, beta = torch.rand(C, dtype=torch.float64) + 0.5, torch.randn(C, dtype=torch.float64)
    rm, rv, nbt = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64), torch.tensor(0)
    torch.library.opcheck(ops.bn_block_finalize_.default,
                          (part, b, gamma, beta, rm, rv, nbt, 0.1, False, 1e-5, torch.float64, be))
    mean, invstd, scale, shift = ops.bn_block_finalize_(part, b, gamma, beta, None, None, None, 0.1,
                                                        False, 1e-5, torch.float64, be)
    torch.library.opcheck(ops.bn_block_apply.default,
                          (yb, mean, invstd, scale, shift, gamma, beta, act, 0.1, be))
    torch.library.opcheck(ops.bn_block_backward.default,
                          (torch.randn_like(yb), yb, mean, invstd, gamma, beta, act, 0.1, True, be))
    dy = torch.randn_like(y)
    stride, padding, _, groups, dilation = geo
    for flags in ((True, True, True), (False, True, False), (True, False, False)):
        torch.library.opcheck(ops.conv_transpose2d_backward.default,
                              (dy, x, w, y, stride, padding, dilation, groups, act, 0.1, *flags, be))
    if be == "cpu":
        torch.library.opcheck(ops.conv_transpose2d_fwd.default, (x, w, b, *geo, act, 0.1, True))
        torch.library.opcheck(ops.conv_transpose2d_bwd.default,
                              (dy, x, w, y, stride, padding, dilation, groups, act, 0.1, True, True, True))


@pytest.mark.parametrize("be", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ["leaky_relu", "tanh"])
def test_gradcheck_and_gradgradcheck(be, activation):
    # tiny: the interpreter runs one forward per perturbed element
    x = torch.randn(1, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 1, 3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return GF.conv_transpose2d(x, w, b, 2, 1, 1, 2, 1, activation=activation, negative_slope=0.3)

    with backend(be):
        # fast_mode on the interpreter: random projections instead of the full Jacobian
        assert torch.autograd.gradcheck(f, (x, w, b), fast_mode=be == "triton")
        if be != "triton":  # the triton double backward is the reference path: covered below
            assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("be", ["cpu", "triton"])
def test_double_backward_gradient_penalty(be):
    torch.manual_seed(1)
    m = gnn.ConvTranspose2d(3, 2, 4, stride=2, padding=1, activation="tanh", dtype=torch.float64)
    r = nn.ConvTranspose2d(3, 2, 4, stride=2, padding=1, dtype=torch.float64)
    r.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)

    def penalty(mod):
        gx, = torch.autograd.grad(torch.tanh(mod(x)).sum() if mod is r else mod(x).sum(), x,
                                  create_graph=True)
        return gx.square().sum()

    with backend(be):
        pm = torch.autograd.grad(penalty(m), list(m.parameters()))
    pr = torch.autograd.grad(penalty(r), list(r.parameters()))
    for a, b in zip(pm, pr):
        assert_close(a, b, torch.float64)


@pytest.mark.parametrize("be", ["cpu", "triton"])
def test_backward_is_deterministic(be):
    x, w, b = make(FIXED["keras_k5s2p2op1"], torch.float32)
    with backend(be):
        outs = []
        for _ in range(2):
            xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
            y = GF.conv_transpose2d(xs, ws, bs, 2, 2, 1, activation="relu")
            outs.append(torch.autograd.grad(y, (xs, ws, bs), torch.ones_like(y)))
    for a, b2 in zip(*outs):
        assert torch.equal(a, b2)


def test_compile_fullgraph_cpu():
    torch.manual_seed(3)
    model = nn.Sequential(gnn.ConvTranspose2d(4, 3, 4, 1, 0, activation="relu"),
                          gnn.ConvTransposeBNAct2d(3, 3, 4, 2, 1, activation="relu"),
                          gnn.ConvTranspose2d(3, 2, 4, 2, 1, activation="tanh"))
    x = torch.randn(2, 4, 1, 1, requires_grad=True)
    with backend("cpu"):
        y_eager = model(x)
        g_eager = torch.autograd.grad(y_eager.sum(), [x] + list(model.parameters()))
        compiled = torch.compile(model, fullgraph=True)
        y_comp = compiled(x)
        g_comp = torch.autograd.grad(y_comp.sum(), [x] + list(model.parameters()))
    assert_close(y_comp, y_eager, torch.float32)
    # The block's conv-bias gradient is zero up to rounding (the BatchNorm removes the bias): eager
    # CPU sums ATen's bias gradient, the compiled block its own; compared at the gradients' scale.
    scale = max(float(g.abs().max()) for g in g_eager)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)


# --- the BatchNorm-statistics epilogue ---------------------------------------------------------

@pytest.mark.parametrize("be", ["cpu", "triton", "cuda"])
def test_statistics_epilogue(be):
    torch.manual_seed(5)
    for cfg in (FIXED["dcgan_k4s2p1"], FIXED["groups_dilation_nonsquare"]):
        x, w, b = make(cfg, torch.float64)
        w.requires_grad_()
        geo = (list(cfg["stride"]), list(cfg["padding"]), list(cfg["output_padding"]), cfg["groups"],
               list(cfg["dilation"]))
        y, part = torch.ops.genfast.conv_transpose2d_stats(x, w, *geo, be)
        z = F.conv_transpose2d(x, w, None, *geo[:3], geo[3], geo[4])
        assert_close(y, z, torch.float64)
        # merge the (count, mean, M2) partials with the textbook formulas
        n, m, m2 = part[0], part[1], part[2]
        total = n.sum(0)
        mean = (n * m).sum(0) / total
        var = (m2.sum(0) + (n * (m - mean) ** 2).sum(0)) / total
        assert torch.equal(total, torch.full_like(total, z.numel() // z.shape[1]))
        assert_close(mean, z.mean((0, 2, 3)), torch.float64)
        assert_close(var, z.var((0, 2, 3), unbiased=False), torch.float64)


@pytest.mark.parametrize("be", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh"])
def test_conv_bn_act_block_matches_unfused_sequential(be, activation):
    torch.manual_seed(6)
    kw = dict(stride=2, padding=1, output_padding=1, groups=2)
    block = gnn.ConvTransposeBNAct2d(4, 6, 3, **kw, momentum=0.2, dtype=torch.float64,
                                     activation=activation, negative_slope=0.2)
    unfused = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, **kw, dtype=torch.float64),
                            nn.BatchNorm2d(6, momentum=0.2, dtype=torch.float64), TORCH_ACT[activation])
    with torch.no_grad():
        block[1].weight.uniform_(0.5, 1.5)
        block[1].bias.normal_()
    assert list(block.state_dict()) == list(unfused.state_dict())
    unfused.load_state_dict(block.state_dict())
    x = torch.randn(3, 4, 3, 2, dtype=torch.float64)
    for step in range(2):  # two training steps (running statistics), then eval
        xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        with backend(be):
            y = block(xs)
            dy = torch.randn_like(y)
            g = torch.autograd.grad(y, [xs] + list(block.parameters()), dy)
        y_ref = unfused(xr)
        g_ref = torch.autograd.grad(y_ref, [xr] + list(unfused.parameters()), dy)
        assert_close(y, y_ref, torch.float64, msg=f"step {step} output")
        for a, b in zip(g, g_ref):
            assert_close(a, b, torch.float64, msg=f"step {step} grad")
        for k, v in unfused.state_dict().items():
            assert_close(block.state_dict()[k].double(), v.double(), torch.float64, msg=k)
        x = x * 1.5 + 0.3
    block.eval()
    unfused.eval()
    with backend(be), torch.no_grad():
        assert_close(block(x), unfused(x), torch.float64, msg="eval")


@pytest.mark.parametrize("be", CPU_BACKENDS)
def test_conv_bn_act_block_channels_last_no_affine_no_running_stats(be):
    torch.manual_seed(8)
    block = gnn.ConvTransposeBNAct2d(3, 5, 4, 2, 1, bias=False, affine=False,
                                     track_running_stats=False, dtype=torch.float64,
                                     activation="sigmoid")
    unfused = nn.Sequential(nn.ConvTranspose2d(3, 5, 4, 2, 1, bias=False, dtype=torch.float64),
                            nn.BatchNorm2d(5, affine=False, track_running_stats=False,
                                           dtype=torch.float64), nn.Sigmoid())
    assert list(block.state_dict()) == list(unfused.state_dict())
    unfused.load_state_dict(block.state_dict())
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64).to(memory_format=torch.channels_last)
    for mode in ("train", "eval"):  # no running statistics: batch statistics in both modes
        block.train(mode == "train")
        unfused.train(mode == "train")
        xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        with backend(be):
            y = block(xs)
            dy = torch.randn_like(y)
            g = torch.autograd.grad(y, [xs, block[0].weight], dy)
        y_ref = unfused(xr)
        g_ref = torch.autograd.grad(y_ref, [xr, unfused[0].weight], dy)
        assert_close(y, y_ref, torch.float64, msg=mode)
        for a, b in zip(g, g_ref):
            assert_close(a, b, torch.float64, msg=mode)


@pytest.mark.parametrize("be", ["cpu", "triton"])
def test_conv_bn_act_block_gradcheck_and_double_backward(be):
    torch.manual_seed(9)
    block = gnn.ConvTransposeBNAct2d(2, 2, 3, 2, 1, track_running_stats=False, dtype=torch.float64,
                                     activation="leaky_relu", negative_slope=0.2)
    x = torch.randn(2, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    with backend(be):
        assert torch.autograd.gradcheck(block, (x,), fast_mode=be == "triton")
        if be == "cpu":
            assert torch.autograd.gradgradcheck(block, (x,))


# --- GPU (run by benchmarks/gpu_suite.sh) --------------------------------------------------------

DCGAN_LAYERS = [(100, 512, 1, 4, 1, 0, "relu"), (512, 256, 4, 4, 2, 1, "relu"),
                (256, 128, 8, 4, 2, 1, "relu"), (128, 64, 16, 4, 2, 1, "relu"),
                (64, 3, 32, 4, 2, 1, "tanh")]


@pytest.mark.gpu
@pytest.mark.parametrize("layer", DCGAN_LAYERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_dcgan_layers(cuda_device, layer, dtype, channels_last):
    cin, cout, hin, k, s, p, act = layer
    torch.manual_seed(0)
    x = torch.randn(16, cin, hin, hin, device=cuda_device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = (torch.randn(cin, cout, k, k, device=cuda_device) / (cin * k) ** 0.5).to(dtype)
    b = torch.randn(cout, device=cuda_device, dtype=dtype)
    dy = torch.randn(16, cout, (hin - 1) * s - 2 * p + k, (hin - 1) * s - 2 * p + k, device=cuda_device, dtype=dtype)
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # float32 compared without TF32 here
    try:
        with backend("triton"):
            y, g = run_genfast(dict(stride=s, padding=p, output_padding=0, groups=1, dilation=1, activation=act),
                               x, w, b, dy)
        y64, g64 = expected(dict(stride=s, padding=p, output_padding=0, groups=1, dilation=1, activation=act),
                            x, w, b, dy)
        yl, gl = (y64, g64)
        if dtype != torch.float32:
            yl, gl = expected_lowp(s, p, act, x, w, b, dy)
    finally:
        torch.backends.cudnn.allow_tf32 = prev
    if dtype == torch.float32:
        assert_close(y, y64, torch.float32, scale=10)
        for a, e in zip(g, g64):
            assert_close(a, e, torch.float32, scale=10 * max(1.0, e.abs().max().item()))
    else:
        from tests.utils import assert_error_not_worse

        assert_error_not_worse(y, yl, y64, factor=2.0, floor=1e-2, msg="bf16 output")
        for a, l, e in zip(g, gl, g64):
            assert_error_not_worse(a, l, e, factor=2.0, floor=1e-2 * e.abs().max().item(), msg="bf16 grad")


def expected_lowp(s, p, act, x, w, b, dy):
    xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = TORCH_ACT[act](F.conv_transpose2d(xs, ws, bs, s, p))
    return y, torch.autograd.grad(y, (xs, ws, bs), dy)


@pytest.mark.gpu
def test_gpu_tf32_follows_cudnn_flag(cuda_device):
    x = torch.randn(8, 64, 16, 16, device=cuda_device)
    w = torch.randn(64, 32, 4, 4, device=cuda_device) / 32
    exact = F.conv_transpose2d(x.double(), w.double(), None, 2, 1)
    prev = torch.backends.cudnn.allow_tf32
    try:
        errs = {}
        for flag in (False, True):
            torch.backends.cudnn.allow_tf32 = flag
            with backend("triton"):
                errs[flag] = (GF.conv_transpose2d(x, w, None, 2, 1).double() - exact).abs().max().item()
    finally:
        torch.backends.cudnn.allow_tf32 = prev
    assert errs[False] < 1e-4 and errs[True] < 5e-2


@pytest.mark.parametrize("how", ["compiled", "reference"])
def test_converted_generator_under_cpu_autocast(how):
    """A converted DCGAN generator under torch.autocast("cpu", bfloat16), compiled (fullgraph) or
    with the backend pinned to "reference": each transposed convolution takes the bfloat16 output
    of the one before with float32 weights, which autocast casts first as torch does (the checks
    ran before the cast and raised). Output as the torch model's under the same autocast."""
    import copy

    from genfast import models

    torch.manual_seed(0)
    ref = models.DCGANGenerator(nz=16, ngf=8).eval()
    with torch.no_grad():  # running statistics away from their defaults: an output of real size
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    conv = genfast.convert(copy.deepcopy(ref)).eval()
    z = torch.randn(2, 16, 1, 1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = ref(z)
        if how == "compiled":
            torch._dynamo.reset()
            got = torch.compile(conv, backend="aot_eager", fullgraph=True)(z)
        else:
            with backend("reference"):
                got = conv(z)
    with torch.no_grad():
        exact = copy.deepcopy(ref).double()(z.double())
    assert got.dtype == want.dtype == torch.bfloat16
    # genfast's error against float64 within twice torch's own bfloat16 error
    assert_error_not_worse(got, want, exact, msg=how)


@pytest.mark.parametrize("dynamic", [None, True])
def test_compiled_unbatched_input_on_cpu(dynamic):
    """gnn.ConvTranspose2d compiled on the CPU with an unbatched (C, H, W) input, at two spatial
    sizes (the second recompiles with symbolic sizes) and with dynamic=True: as
    nn.ConvTranspose2d (the C++ op, whose kernel and fake take batched input only, is used for
    batched input alone)."""
    torch.manual_seed(0)
    m = gnn.ConvTranspose2d(4, 3, 3, 2, 1, activation="tanh")
    ref = nn.ConvTranspose2d(4, 3, 3, 2, 1)
    ref.load_state_dict(m.state_dict())
    torch._dynamo.reset()
    c = torch.compile(m, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    for hw in (5, 6):
        x = torch.randn(4, hw, hw)
        assert_close(c(x), torch.tanh(ref(x)), torch.float32)


# --- output layout: torch's rule ------------------------------------------------------------
# (input shape, input made channels_last, weight made channels_last): torch's convolutions give
# a channels_last output when the input or the weight suggests it, e.g. a model made
# channels_last fed a contiguous batch, or the (N, C, 1, 1) noise of a generator made
# channels_last (whose strides alone tell the two layouts apart).
LAYOUTS = [((2, 4, 3, 3), False, False), ((2, 4, 3, 3), True, False), ((2, 4, 3, 3), False, True),
           ((2, 4, 3, 3), True, True), ((3, 4, 1, 1), True, False), ((3, 4, 1, 1), False, True),
           ((3, 4, 1, 1), False, False)]


def _converted_pair(unfused, model_cl, how, x_shape, x_cl):
    """(the converted copy, what runs it: itself or torch.compile(aot_eager) of it, a float64
    input), the model made channels_last or the input when asked."""
    fused = genfast.convert(copy.deepcopy(unfused))
    if model_cl:
        unfused.to(memory_format=torch.channels_last)
        fused.to(memory_format=torch.channels_last)
    if how != "eager":
        torch._dynamo.reset()  # each case compiles a new model: keep within the recompile limit
    model = fused if how == "eager" else torch.compile(fused, backend="aot_eager", fullgraph=True)
    x = torch.randn(x_shape, dtype=torch.float64)
    return fused, model, x.to(memory_format=torch.channels_last) if x_cl else x


def _layout_inputs(case, dtype=torch.float64):
    shape, xcl, wcl = LAYOUTS[case]
    x = torch.randn(shape, dtype=dtype)
    w = torch.randn(4, 3, 4, 4, dtype=dtype) * 0.5
    if xcl:
        x = x.to(memory_format=torch.channels_last)
    if wcl:
        w = w.to(memory_format=torch.channels_last)
    return x, w, torch.randn(3, dtype=dtype)


@pytest.mark.parametrize("be", CPU_BACKENDS + [None])  # None: the eager path (C++ entry)
@pytest.mark.parametrize("case", range(len(LAYOUTS)))
def test_output_layout_follows_torch(be, case):
    torch.manual_seed(30 + case)
    x, w, b = _layout_inputs(case)
    want = F.conv_transpose2d(x, w, b, 2, 1)  # 2x2 or 6x6 output: the strides tell the layouts apart
    for act in ("identity", "leaky_relu"):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        if be is None:
            y = GF.conv_transpose2d(xs, ws, b, 2, 1, activation=act, negative_slope=0.2)
        else:
            with backend(be):
                y = GF.conv_transpose2d(xs, ws, b, 2, 1, activation=act, negative_slope=0.2)
        assert y.stride() == want.stride(), (be, act, LAYOUTS[case])
        ref_y = want if act == "identity" else F.leaky_relu(want, 0.2)
        assert_close(y, ref_y, torch.float64)
        dy = torch.randn_like(y)
        gx, gw = torch.autograd.grad(y, (xs, ws), dy)
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        yr = F.conv_transpose2d(xr, wr, b, 2, 1)
        yr = yr if act == "identity" else F.leaky_relu(yr, 0.2)
        for name, g, gr in zip(("grad_input", "grad_weight"), (gx, gw), torch.autograd.grad(yr, (xr, wr), dy)):
            assert_close(g, gr, torch.float64)
            # torch's layout too (a contiguous input with a channels_last weight gives a
            # channels_last grad_input: found by a bad-input hunt)
            assert g.stride() == gr.stride(), (name, be, act, LAYOUTS[case])


@pytest.mark.parametrize("how", ["eager", "compiled"])
@pytest.mark.parametrize("case", range(len(LAYOUTS)))
def test_channels_last_model_layout_and_values_like_torch(case, how):
    """A converted generator in a model made channels_last (or fed channels_last noise): the
    output's strides, values, weight gradient and running statistics as torch's, a training step
    then eval, eager and through torch.compile (whose fakes must promise the strides the kernels
    give)."""
    torch.manual_seed(40 + case)
    shape, xcl, wcl = LAYOUTS[case]
    unfused = nn.Sequential(nn.ConvTranspose2d(4, 3, 4, 2, 1, bias=False), nn.BatchNorm2d(3),
                            nn.ReLU(), nn.ConvTranspose2d(3, 2, 4, 2, 1), nn.Tanh()).double()
    fused, model, x = _converted_pair(unfused, wcl, how, shape, xcl)
    for mode in ("train", "eval"):
        unfused.train(mode == "train")
        fused.train(mode == "train")
        want, y = unfused(x), model(x)
        assert y.stride() == want.stride(), (mode, LAYOUTS[case])
        assert_close(y, want, torch.float64, msg=mode)
        if mode == "train":
            dy = torch.randn_like(want)
            (g,) = torch.autograd.grad(want, [unfused[0].weight], dy)
            (gf,) = torch.autograd.grad(y, [fused[0].weight], dy)
            assert_close(gf, g, torch.float64)
            assert_close(fused[1].running_var, unfused[1].running_var, torch.float64)


@pytest.mark.parametrize("how", ["eager", "aot_eager"])
@pytest.mark.parametrize("model_cl, x_shape, x_cl, layers", [
    # one output channel (the image layer): both layouts are one memory order
    (True, (2, 8, 7, 7), False, "convt_c1"),
    (True, (2, 8, 7, 7), False, "convt_c1_tanh"),
    (True, (2, 8, 7, 7), False, "convt_c1_bn_relu"),
    # 1x1 maps: noise into a stride-1 k1 layer, a discriminator's last layers
    (False, (3, 16, 1, 1), True, "convt_k1_relu"),
    (True, (3, 16, 1, 1), False, "convt_k1_relu"),
    (True, (3, 4, 4, 4), False, "conv_to_1x1_leaky"),
    (True, (3, 4, 4, 4), False, "conv_to_1x1_bn_leaky"),
    (True, (3, 4, 6, 6), False, "conv_c1_sigmoid"),
])
def test_fused_output_strides_like_torch_where_layouts_coincide(how, model_cl, x_shape, x_cl, layers):
    """Where the shape makes channels_last and contiguous one memory order (one channel, 1x1
    maps), torch's product keeps channels_last strides but an activation or BatchNorm after it
    gives contiguous ones: the fused block's output has torch's strides, so the next layer picks
    torch's layout (values equal in any case)."""
    torch.manual_seed(7)
    make = {
        "convt_c1": lambda: nn.Sequential(nn.ConvTranspose2d(8, 1, 4, 2, 1)),
        "convt_c1_tanh": lambda: nn.Sequential(nn.ConvTranspose2d(8, 1, 4, 2, 1), nn.Tanh()),
        "convt_c1_bn_relu": lambda: nn.Sequential(nn.ConvTranspose2d(8, 1, 4, 2, 1, bias=False),
                                                  nn.BatchNorm2d(1), nn.ReLU()),
        "convt_k1_relu": lambda: nn.Sequential(nn.ConvTranspose2d(16, 6, 1, 1, 0), nn.ReLU()),
        "conv_to_1x1_leaky": lambda: nn.Sequential(nn.Conv2d(4, 6, 4, 1, 0), nn.LeakyReLU(0.2)),
        "conv_to_1x1_bn_leaky": lambda: nn.Sequential(nn.Conv2d(4, 6, 4, 1, 0, bias=False),
                                                      nn.BatchNorm2d(6), nn.LeakyReLU(0.2)),
        "conv_c1_sigmoid": lambda: nn.Sequential(nn.Conv2d(4, 1, 3, 1, 1), nn.Sigmoid()),
    }[layers]
    unfused = make().double()
    fused, model, x = _converted_pair(unfused, model_cl, how, x_shape, x_cl)
    for mode in ("train", "eval"):
        unfused.train(mode == "train")
        fused.train(mode == "train")
        want, y = unfused(x), model(x)
        assert y.stride() == want.stride(), (how, mode, layers, y.stride(), want.stride())
        assert_close(y, want, torch.float64, msg=f"{mode} {layers}")


@pytest.mark.parametrize("be", CPU_BACKENDS + [None])
def test_empty_batch_layout_like_torch(be):
    """An empty batch: torch's convolution gives a contiguous output even from a channels_last
    weight; so does genfast (and its fake)."""
    x = torch.randn(0, 4, 3, 3, dtype=torch.float64)
    w = torch.randn(4, 3, 4, 4, dtype=torch.float64).to(memory_format=torch.channels_last)
    want = F.conv_transpose2d(x, w, None, 2, 1)
    if be is None:
        y = GF.conv_transpose2d(x, w, None, 2, 1)
    else:
        with backend(be):
            y = GF.conv_transpose2d(x, w, None, 2, 1)
    assert y.shape == want.shape and y.stride() == want.stride()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.inference_mode():
        real = torch.ops.genfast.conv_transpose2d_act(x, w, None, [2, 2], [1, 1], [0, 0], 1, [1, 1], 0, 0.0)
    with FakeTensorMode() as mode:
        fake = torch.ops.genfast.conv_transpose2d_act(mode.from_tensor(x), mode.from_tensor(w), None,
                                                       [2, 2], [1, 1], [0, 0], 1, [1, 1], 0, 0.0)
    assert real.stride() == fake.stride() == want.stride()


@pytest.mark.parametrize("be", ["cpu", "triton"])
def test_backward_gradient_strides_match_the_fakes(be):
    """(N, C, 1, 1) noise made channels_last, and a channels_last weight: the registered
    backward's grad_input / grad_weight have exactly the strides its fake promises (a compiled
    graph reads them as the fake says)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(3)
    x = torch.randn(3, 4, 1, 1, dtype=torch.float64).to(memory_format=torch.channels_last)
    w = torch.randn(4, 3, 4, 4, dtype=torch.float64).to(memory_format=torch.channels_last)
    ops = torch.ops.genfast
    y = ops.conv_transpose2d(x, w, None, [1, 1], [0, 0], [0, 0], 1, [1, 1], 2, 0.2, be)
    dy = torch.randn_like(y)
    args = ([1, 1], [0, 0], [1, 1], 1, 2, 0.2, True, True, False, be)
    dx, dw, _ = ops.conv_transpose2d_backward(dy, x, w, y, *args)
    with FakeTensorMode() as mode:
        f = [mode.from_tensor(t) for t in (dy, x, w, y)]
        fdx, fdw, _ = ops.conv_transpose2d_backward(*f, *args)
    assert (dx.stride(), dw.stride()) == (fdx.stride(), fdw.stride())
