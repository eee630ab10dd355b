"""genfast::conv2d_act and genfast::linear_act, the eager CPU paths of Conv2d / Linear + bias +
activation (the drop-in modules, GF.conv2d / GF.linear, and the products of the blocks with a
BatchNorm), with their autograd formulas in C++ (csrc/conv_act_autograd.cpp). conv2d_act:
torch's product forward, grad_input from the transposed convolution's GEMM form where that
applies, ATen's convolution backward elsewhere. linear_act: BLAS products, our bias + activation
and dz + grad_bias passes, the backward's two products side by side on two threads.
float64 parity of the output and every gradient with torch's unfused modules, which path the
backward takes, subsets of requested gradients, special values in the input and in the
incoming gradient, gradcheck / gradgradcheck, a gradient penalty (create_graph), opcheck,
determinism, and torch's behaviour for what the ops do not take."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import profile

import genfast
import genfast.functional as GF
import genfast.nn as gnn

D = torch.float64
ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "tanh": 3, "sigmoid": 4}
SLOPE = 0.2

# (N, C_in, C_out, (H, W), kernel, stride, padding, dilation, groups, gemm): gemm = whether the
# backward's grad_input takes the transposed convolution's GEMM form.
CASES = {
    # 3 input channels: grad_input's GEMM in the plane layout (C_in <= 8), k4 s2 p1
    "plane_k4s2": (2, 3, 6, (10, 9), 4, 2, 1, 1, 1, True),
    # 10 input channels: the row layout over the batch (grad_output planes of up to 16 pixels),
    # k5 s2 p2 with odd sizes (output_padding 1 / 0)
    "rows_k5s2": (2, 10, 4, (7, 8), 5, 2, 2, 1, 1, True),
    # the row layout over the batch with 5x4 grad_output planes (20 pixels)
    "rows_chunks": (2, 10, 4, (9, 8), 5, 2, 2, 1, 1, True),
    # a thread per image: N = 4 and grad_output planes of 16x16 = 256 pixels (>= 128)
    "threads": (4, 9, 5, (32, 33), 4, 2, 1, 1, 1, True),
    # stride (1, 3), padding (2, 0), dilation (1, 2), a non-square kernel
    "mixed": (2, 2, 3, (8, 13), (3, 2), (1, 3), (2, 0), (1, 2), 1, True),
    # a 1x1 output (stride 1): grad_input's GEMM over the batch
    "one_pixel": (3, 5, 7, (4, 4), 4, 1, 0, 1, 1, True),
    # stride 1 with many output pixels, and groups: ATen's convolution backward
    "stride1": (2, 4, 6, (7, 6), 3, 1, 1, 1, 1, False),
    "groups": (2, 4, 6, (9, 9), 3, 2, 1, 1, 2, False),
}


@pytest.fixture(autouse=True)
def _row_gemm_always():
    """The GEMM form's row layout (grad_input with more than 8 channels) runs by default only on
    CPUs with AVX-512: these tests check its results on any host."""
    with genfast.backend.cpu_row_gemm("always"):
        yield


def _case(name, dtype=D, seed=0):
    N, ci, co, hw, k, s, p, d, g, _ = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    k2 = k if isinstance(k, tuple) else (k, k)
    x = torch.randn(N, ci, *hw, dtype=dtype, generator=gen)
    w = torch.randn(co, ci // g, *k2, dtype=dtype, generator=gen) / (ci * k2[0] * k2[1]) ** 0.5
    b = torch.randn(co, dtype=dtype, generator=gen)
    return x, w, b, dict(stride=s, padding=p, dilation=d, groups=g)


def torch_act(name):
    return {"identity": lambda t: t, "relu": F.relu, "leaky_relu": lambda t: F.leaky_relu(t, SLOPE),
            "tanh": torch.tanh, "sigmoid": torch.sigmoid}[name]


def _ours(x, w, b, geo, act):
    return GF.conv2d(x, w, b, geo["stride"], geo["padding"], geo["dilation"], geo["groups"],
                     activation=None if act == "identity" else act, negative_slope=SLOPE)


def _theirs(x, w, b, geo, act):
    return torch_act(act)(F.conv2d(x, w, b, geo["stride"], geo["padding"], geo["dilation"],
                                   geo["groups"]))


@pytest.mark.parametrize("act", list(ACT_CODES))
@pytest.mark.parametrize("name", list(CASES))
def test_matches_torch_float64(name, act):
    x, w, b, geo = _case(name)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    out = _ours(x, w, b, geo, act)
    ref = _theirs(x, w, b, geo, act)
    assert "Conv2dAct" in out.grad_fn.name()
    torch.testing.assert_close(out, ref, atol=1e-13, rtol=1e-12)
    dy = torch.randn(ref.shape, dtype=D, generator=torch.Generator().manual_seed(1))
    for a, r in zip(torch.autograd.grad(out, leaves, dy), torch.autograd.grad(ref, leaves, dy)):
        torch.testing.assert_close(a, r, atol=1e-12, rtol=1e-11)


def _backward_ops(fn):
    with profile() as prof:
        fn()
    return {e.name for e in prof.events()}


# cases whose grad_input takes the row layout under "auto" (k4 s2: at most 4 columns per
# output value; a 1x1 grad_output): k5 s2 with more than 8 input channels keeps ATen's product
# there (the transposed convolution's images-inner layout is not taken by this backward)
AUTO_ROWS = {"threads", "one_pixel"}


@pytest.mark.parametrize("row_gemm", ["always", "never", "auto"])
@pytest.mark.parametrize("name", list(CASES))
def test_grad_input_path(name, row_gemm):
    """grad_input from genfast::conv_transpose2d_fwd exactly where the GEMM form applies (and not
    when only grad_weight is asked for); with the row layout off (genfast.backend.
    set_cpu_row_gemm), only where grad_input has up to 8 channels (the plane layout); under
    "auto", there and where the row layout is taken by shape."""
    x, w, b, geo = _case(name, torch.float32)
    x.requires_grad_()
    w.requires_grad_()
    out = _ours(x, w, b, geo, "leaky_relu")
    dy = torch.randn_like(out)
    with genfast.backend.cpu_row_gemm(row_gemm):
        ops = _backward_ops(lambda: torch.autograd.grad(out, (x, w), dy, retain_graph=True))
    expected = CASES[name][-1] and (row_gemm == "always" or x.shape[1] <= 8
                                    or (row_gemm == "auto" and name in AUTO_ROWS))
    assert ("genfast::conv_transpose2d_fwd" in ops) == expected, ops
    ops = _backward_ops(lambda: torch.autograd.grad(out, (w,), dy))
    assert "genfast::conv_transpose2d_fwd" not in ops


@pytest.mark.parametrize("wanted", [(0,), (1,), (2,), (0, 2), (1, 2)])
@pytest.mark.parametrize("name", ["plane_k4s2", "threads", "groups"])
def test_requested_gradients(name, wanted):
    x, w, b, geo = _case(name)
    leaves = (x, w, b)
    for i in wanted:
        leaves[i].requires_grad_()
    out = _ours(x, w, b, geo, "relu")
    ref = _theirs(x, w, b, geo, "relu")
    dy = torch.randn_like(ref)
    got = torch.autograd.grad(out, [leaves[i] for i in wanted], dy)
    exp = torch.autograd.grad(ref, [leaves[i] for i in wanted], dy)
    for a, r in zip(got, exp):
        torch.testing.assert_close(a, r, atol=1e-12, rtol=1e-11)


@pytest.mark.parametrize("special", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu", "tanh"])
@pytest.mark.parametrize("name", ["plane_k4s2", "rows_k5s2", "threads", "rows_chunks"])
def test_special_values_like_torch(name, act, special):
    """A NaN / inf in the input and another in the incoming gradient: torch's NaN and inf pattern
    in the output and in every gradient (float32), finite values close."""
    x, w, b, geo = _case(name, torch.float32)
    x[0, 0, 1, 2] = special
    _special_like_torch(lambda *a: _ours(*a, geo, act), lambda *a: _theirs(*a, geo, act), (x, w, b),
                        (-1, -1, -1, 0), special, 1e-4)


def _special_like_torch(ours, theirs, inputs, dy_index, special, tol):
    """ours(*inputs) against theirs(*inputs) with `special` also in the incoming gradient at
    dy_index: the same NaN / +inf / -inf pattern in the output and every gradient, finite values
    close."""
    mine = [t.clone().requires_grad_() for t in inputs]
    ref_in = [t.clone().requires_grad_() for t in inputs]
    out, ref = ours(*mine), theirs(*ref_in)
    dy = torch.randn_like(ref)
    dy[dy_index] = special
    got = (out,) + torch.autograd.grad(out, mine, dy)
    exp = (ref,) + torch.autograd.grad(ref, ref_in, dy)
    for a, r in zip(got, exp):
        assert torch.equal(a.isnan(), r.isnan())
        assert torch.equal(a.isposinf(), r.isposinf()) and torch.equal(a.isneginf(), r.isneginf())
        fin = r.isfinite()
        torch.testing.assert_close(a[fin], r[fin], atol=tol, rtol=tol)


@pytest.mark.parametrize("name", ["plane_k4s2", "rows_k5s2", "mixed"])
def test_gradcheck_and_gradgradcheck(name):
    x, w, b, geo = _case(name)
    x = x[:1].clone()
    ints = lambda v: list(v) if isinstance(v, tuple) else [v, v]  # noqa: E731

    def f(x, w, b):
        return torch.ops.genfast.conv2d_act(x, w, b, ints(geo["stride"]), ints(geo["padding"]),
                                            ints(geo["dilation"]), geo["groups"], 3, 0.0)

    args = tuple(t.requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


def test_gradient_penalty_matches_torch():
    """A WGAN-GP style penalty on a converted two-layer discriminator: the create_graph backward
    (differentiable formula) gives torch's parameter gradients."""
    torch.manual_seed(3)
    ref = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(8, 4, 4, 2, 1),
                        nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(4 * 4 * 4, 1)).double()
    ours = genfast.convert(copy.deepcopy(ref))
    x = torch.randn(3, 3, 16, 16, dtype=D)

    def penalty(model):
        xi = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(model(xi).sum(), xi, create_graph=True)
        return ((g.flatten(1).norm(dim=1) - 1) ** 2).mean()

    p_ours, p_ref = penalty(ours), penalty(ref)
    assert p_ours.grad_fn is not None
    torch.testing.assert_close(p_ours, p_ref, atol=1e-12, rtol=1e-11)
    # (the last bias does not reach the penalty: None on both sides)
    got = torch.autograd.grad(p_ours, list(ours.parameters()), allow_unused=True)
    exp = torch.autograd.grad(p_ref, list(ref.parameters()), allow_unused=True)
    assert [a is None for a in got] == [r is None for r in exp]
    for a, r in zip(got, exp):
        if r is not None:
            torch.testing.assert_close(a, r, atol=1e-11, rtol=1e-10)


def test_deterministic():
    x, w, b, geo = _case("threads", torch.float32)
    leaves = [t.requires_grad_() for t in (x, w, b)]

    def run():
        out = _ours(x, w, b, geo, "leaky_relu")
        return (out,) + torch.autograd.grad(out, leaves, torch.ones_like(out))

    first, again = run(), run()
    assert all(torch.equal(a, e) for a, e in zip(first, again))


def test_opcheck():
    x, w, b, _ = _case("plane_k4s2", torch.float32)
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), [2, 2], [1, 1], [1, 1], 1,
            2, SLOPE)
    torch.library.opcheck(torch.ops.genfast.conv2d_act.default, args)


@pytest.mark.parametrize("kind", ["unbatched", "same", "channels_last", "float16", "reflect",
                                  "inference"])
def test_what_the_op_does_not_take_runs_like_torch(kind):
    """Unbatched input, string padding, channels_last, half precision, a padding mode and
    inference mode: torch's result (and torch's gradients)."""
    torch.manual_seed(4)
    m = gnn.Conv2d(3, 5, 3, 2 if kind != "same" else 1, "same" if kind == "same" else 1,
                   padding_mode="reflect" if kind == "reflect" else "zeros", activation="leaky_relu",
                   negative_slope=SLOPE)
    ref = nn.Sequential(nn.Conv2d(3, 5, 3, m.stride, m.padding, padding_mode=m.padding_mode),
                        nn.LeakyReLU(SLOPE))
    ref[0].load_state_dict(m.state_dict())
    x = torch.randn(3, 9, 9) if kind == "unbatched" else torch.randn(2, 3, 9, 9)
    if kind == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    _runs_like_torch(m, ref, x, kind, 1e-5)


def _runs_like_torch(m, ref, x, kind, tol):
    """m(x) against ref(x) (ref[0] holding m's parameters): outputs and the gradients of x and
    of every parameter; float16 and inference mode as ``kind`` says."""
    if kind == "float16":
        m, ref, x = m.half(), ref.half(), x.half()
        tol = 1e-2
    if kind == "inference":
        with torch.inference_mode():
            torch.testing.assert_close(m(x), ref(x))
        return
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, exp = m(xa), ref(xb)
    torch.testing.assert_close(out, exp, atol=tol, rtol=tol)
    dy = torch.randn_like(exp)
    for a, r in zip(torch.autograd.grad(out, (xa, *m.parameters()), dy),
                    torch.autograd.grad(exp, (xb, *ref[0].parameters()), dy)):
        torch.testing.assert_close(a, r, atol=tol, rtol=tol)


# --- genfast::linear_act ----------------------------------------------------------------------


def _lin(M, fin, fout, bias, dtype=D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, fin, dtype=dtype, generator=gen)
    w = torch.randn(fout, fin, dtype=dtype, generator=gen) / fin ** 0.5
    b = torch.randn(fout, dtype=dtype, generator=gen) if bias else None
    return x, w, b


def _lin_ours(x, w, b, act):
    return GF.linear(x, w, b, activation=None if act == "identity" else act, negative_slope=SLOPE)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", list(ACT_CODES))
@pytest.mark.parametrize("shape", [(64, 33, 70), (1, 5, 3), (300, 17, 9)])
def test_linear_matches_torch_float64(shape, act, bias):
    x, w, b = _lin(*shape, bias)
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    out = _lin_ours(x, w, b, act)
    ref = torch_act(act)(F.linear(x, w, b))
    assert "LinearAct" in out.grad_fn.name()
    torch.testing.assert_close(out, ref, atol=1e-13, rtol=1e-12)
    dy = torch.randn(ref.shape, dtype=D, generator=torch.Generator().manual_seed(1))
    for a, r in zip(torch.autograd.grad(out, leaves, dy), torch.autograd.grad(ref, leaves, dy)):
        torch.testing.assert_close(a, r, atol=1e-12, rtol=1e-11)


@pytest.mark.parametrize("wanted", [(0,), (1,), (2,), (0, 1), (1, 2)])
def test_linear_requested_gradients(wanted):
    x, w, b = _lin(8, 6, 5, True)
    leaves = (x, w, b)
    for i in wanted:
        leaves[i].requires_grad_()
    out, ref = _lin_ours(x, w, b, "tanh"), torch.tanh(F.linear(x, w, b))
    dy = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(out, [leaves[i] for i in wanted], dy),
                    torch.autograd.grad(ref, [leaves[i] for i in wanted], dy)):
        torch.testing.assert_close(a, r, atol=1e-12, rtol=1e-11)


@pytest.mark.parametrize("special", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("act", list(ACT_CODES))
def test_linear_special_values_like_torch(act, special):
    x, w, b = _lin(6, 5, 4, True, torch.float32)
    x[1, 2] = special
    _special_like_torch(lambda *a: _lin_ours(*a, act), lambda x, w, b: torch_act(act)(F.linear(x, w, b)),
                        (x, w, b), (4, 3), special, 1e-5)


def test_linear_gradcheck_and_gradgradcheck():
    x, w, b = _lin(4, 5, 3, True)
    args = tuple(t.requires_grad_() for t in (x, w, b))
    for act in (0, 2, 4):
        f = lambda x, w, b, a=act: torch.ops.genfast.linear_act(x, w, b, a, SLOPE)  # noqa: E731
        assert torch.autograd.gradcheck(f, args)
        assert torch.autograd.gradgradcheck(f, args)


def test_linear_same_results_on_one_and_two_threads():
    """With two threads the backward's two products run side by side, one thread each: the same
    BLAS calls as on one thread, so the same bits."""
    x, w, b = _lin(64, 96, 80, True, torch.float32)
    leaves = [t.requires_grad_() for t in (x, w, b)]

    def run():
        out = _lin_ours(x, w, b, "leaky_relu")
        return (out,) + torch.autograd.grad(out, leaves, torch.linspace(-1, 1, out.numel()).view_as(out))

    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two, again = run(), run()
    finally:
        torch.set_num_threads(prev)
    assert all(torch.equal(a, e) for a, e in zip(two, again))
    assert all(torch.equal(a, e) for a, e in zip(one, two))
    ref = F.leaky_relu(F.linear(*leaves), SLOPE)
    torch.testing.assert_close(one[0], ref)


def test_linear_opcheck():
    x, w, b = _lin(5, 4, 3, True, torch.float32)
    torch.library.opcheck(torch.ops.genfast.linear_act.default,
                          (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), 2, SLOPE))


@pytest.mark.parametrize("kind", ["3d", "1d", "float16", "inference", "empty"])
def test_linear_what_the_op_does_not_take_runs_like_torch(kind):
    torch.manual_seed(5)
    m = gnn.Linear(6, 4, activation="relu")
    ref = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
    ref[0].load_state_dict(m.state_dict())
    x = {"3d": torch.randn(2, 3, 6), "1d": torch.randn(6), "empty": torch.randn(0, 6)}.get(
        kind, torch.randn(5, 6))
    _runs_like_torch(m, ref, x, kind, 1e-5)


# --- calls without a backward: torch's own ops ------------------------------------------------

@pytest.mark.parametrize("product", ["linear", "conv2d"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "no_requires_grad"])
@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu", "tanh", "sigmoid"])
def test_call_without_backward_runs_torchs_ops(product, mode, activation):
    """An eager CPU call that records no backward runs torch's product and activation directly
    (genfast's op would add only its dispatch), with torch's result in float64; a call that
    records one runs genfast's op."""
    torch.manual_seed(3)
    if product == "linear":
        x, w, b = torch.randn(5, 7, dtype=D), torch.randn(4, 7, dtype=D), torch.randn(4, dtype=D)
        fused, plain, op = (lambda *a: GF.linear(*a, activation=activation, negative_slope=SLOPE),
                            F.linear, "genfast::linear_act")
    else:
        x, w, b = torch.randn(2, 3, 9, 9, dtype=D), torch.randn(4, 3, 3, 3, dtype=D), torch.randn(4, dtype=D)
        fused, plain, op = (lambda *a: GF.conv2d(*a, 2, 1, activation=activation, negative_slope=SLOPE),
                            lambda *a: F.conv2d(*a, 2, 1), "genfast::conv2d_act")
    acts = {None: lambda z: z, "relu": F.relu, "leaky_relu": lambda z: F.leaky_relu(z, SLOPE),
            "tanh": torch.tanh, "sigmoid": torch.sigmoid}
    expected = acts[activation](plain(x, w, b))
    wg = w.clone().requires_grad_(mode != "no_requires_grad")
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
           "no_requires_grad": torch.enable_grad}[mode]
    with ctx(), profile() as prof:
        y = fused(x, wg, b)
    names = {e.name for e in prof.events()}
    assert op not in names, names
    assert not y.requires_grad
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    with profile() as prof:
        y = fused(x, w.clone().requires_grad_(), b)
    assert op in {e.name for e in prof.events()}
    torch.testing.assert_close(y.detach(), expected, rtol=1e-12, atol=1e-12)


# --- eval blocks (product -> eval BatchNorm -> activation) on the eager CPU path --------------

def _eval_block(kind, act_mod, dtype=torch.float32):
    torch.manual_seed(3)
    if kind == "linear":
        seq = nn.Sequential(nn.Linear(12, 10), nn.BatchNorm1d(10), act_mod)
        x = torch.randn(5, 12, dtype=dtype)
    elif kind == "conv":
        seq = nn.Sequential(nn.Conv2d(3, 6, 3, 2, 1), nn.BatchNorm2d(6), act_mod)
        x = torch.randn(4, 3, 9, 8, dtype=dtype)
    else:  # a grouped transposed convolution with output_padding and dilation
        seq = nn.Sequential(nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1,
                                               groups=2, dilation=(1, 2)),
                            nn.BatchNorm2d(4), act_mod)
        x = torch.randn(3, 6, 5, 7, dtype=dtype)
    seq = seq.to(dtype)
    bn = seq[1]
    with torch.no_grad():  # running statistics and affine parameters away from their defaults
        bn.running_mean.copy_(torch.randn(bn.num_features))
        bn.running_var.copy_(torch.rand(bn.num_features) + 0.5)
        bn.weight.copy_(torch.randn(bn.num_features))
        bn.bias.copy_(torch.randn(bn.num_features))
    seq.eval()
    return seq, x


@pytest.mark.parametrize("kind", ["linear", "conv", "convt"])
@pytest.mark.parametrize("act_mod", [nn.ReLU(), nn.LeakyReLU(0.2), nn.LeakyReLU(0.2, inplace=True)],
                         ids=["relu", "leaky", "leaky_inplace"])
def test_eval_block_no_grad_one_pass(kind, act_mod):
    """Under no_grad, a converted eval block runs the product (torch's linear / conv2d, genfast's
    transposed convolution) then one in-place pass of the BatchNorm's affine map and the
    activation (genfast._C.product_bn_eval_eager: no batch_norm and no weight fold in the
    profile), matching torch's float64 modules; a NaN input row stays NaN."""
    ref, x = _eval_block(kind, act_mod)
    x[1].view(-1)[0] = float("nan")
    ours = genfast.convert(copy.deepcopy(ref))
    with torch.no_grad(), profile() as prof:
        y = ours(x)
    names = {e.name for e in prof.events()}
    assert not any("batch_norm" in n for n in names), names
    assert "aten::mul" not in names and "aten::rsqrt" not in names, names  # no fold of the weight
    want = copy.deepcopy(ref).double()(x.double())
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert y[1].isnan().any() and not y[0].isnan().any()


@pytest.mark.parametrize("kind", ["linear", "conv", "convt"])
def test_eval_block_strided_running_buffers(kind):
    """The eval pass reads the running statistics through their strides (a buffer replaced by a
    strided view of a larger tensor)."""
    ref, x = _eval_block(kind, nn.ReLU())
    bn = ref[1]
    C = bn.num_features
    big = torch.rand(2 * C) + 0.5
    bn.running_var = big[::2]
    ours = genfast.convert(copy.deepcopy(ref))
    ours[1].running_var = big[::2]
    with torch.no_grad():
        y = ours(x)
        want = ref(x)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv", "convt"])
def test_eval_block_no_grad_float64(kind):
    """The no-grad eval block in float64 (the per-channel map in float64) against torch's float64
    modules, to float64 rounding."""
    ref, x = _eval_block(kind, nn.LeakyReLU(0.2), torch.float64)
    ours = genfast.convert(copy.deepcopy(ref))
    with torch.no_grad():
        y = ours(x)
        want = ref(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "conv", "convt"])
def test_eval_block_with_grad_small_batch(kind):
    """An eval block that records a backward at a small batch (output not much larger than the
    weight: no fold, see fold_pays): the product, then the fused eval BatchNorm + activation;
    output and the weight and input gradients as torch's float64 modules."""
    ref, x = _eval_block(kind, nn.LeakyReLU(0.2))
    ours = genfast.convert(copy.deepcopy(ref))
    xs = x.clone().requires_grad_()
    y = ours(xs)
    dy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (xs, ours[0].weight), dy)
    r64 = copy.deepcopy(ref).double()
    xd = x.double().requires_grad_()
    yd = r64(xd)
    gxd, gwd = torch.autograd.grad(yd, (xd, r64[0].weight), dy.double())
    for got, want in ((y, yd), (gx, gxd), (gw, gwd)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
