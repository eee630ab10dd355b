"""The eager CPU entries in C++ (genfast._C.*_eager, csrc/eager_entries.cpp): GF.linear,
GF.conv2d, GF.conv_transpose2d, the GAN losses and GF.reparameterize hand the common call (float32 /
float64 CPU tensors, int geometry, autocast off) to them, skipping the checked Python path and
torch.ops' Python call. Checked here: that those calls do take the entry (the checked path is made
to fail), with torch's float64 results and gradients; that every call an entry does not take
returns None from it (so the checked path runs), including arguments torch's own product refuses
inside the op; that the public functions then raise torch's exception types; and the
reparameterisation's one-pass backward (no exp: it keeps exp(0.5 logvar) from the forward)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

import genfast
import genfast.functional as GF
from genfast.ops import conv_act as _ca
from genfast.ops import conv_transpose as _ct
from genfast.ops import losses as _loss

EXT = genfast.backend.extension()
pytestmark = pytest.mark.skipif(EXT is None or not genfast.backend.cpu_losses_supported(),
                                reason="genfast._C not built, or this CPU lacks the loss kernels' ISA")
D = torch.float64
SLOPE = 0.2
ACTS = {None: lambda z: z, "relu": F.relu, "leaky_relu": lambda z: F.leaky_relu(z, SLOPE),
        "tanh": torch.tanh, "sigmoid": torch.sigmoid}


@pytest.fixture
def no_checked_path(monkeypatch):
    """The checked Python paths fail the test when reached: a call that passes is the entry's."""
    def fail(*args, **kwargs):
        raise AssertionError("the checked Python path ran")

    for mod, name in ((_ca, "linear_act"), (_ca, "conv2d_act"), (_ct, "conv_transpose2d"),
                      (_loss, "reparameterize"), (_loss, "generator_loss"),
                      (_loss, "discriminator_loss")):
        monkeypatch.setattr(mod, name, fail)


def _rand(*shape, dtype=D, grad=True, gen=None):
    return torch.randn(*shape, dtype=dtype, generator=gen).requires_grad_(grad)


def _same_grads(ours, theirs, inputs, tol):
    """Output and the gradients of every input w.r.t. one fresh random incoming gradient."""
    torch.testing.assert_close(ours.detach(), theirs.detach(), **tol)
    gy = torch.randn_like(theirs)
    wrt = [t for t in inputs if t.requires_grad]
    for a, b in zip(torch.autograd.grad(ours, wrt, gy), torch.autograd.grad(theirs, wrt, gy)):
        torch.testing.assert_close(a, b, **tol)


TOL = {D: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-5)}


@pytest.mark.parametrize("dtype", [D, torch.float32])
@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("shape", [(1, 256, 1), (16, 33, 9), ((2, 5), 7, 4), ((), 6, 3)])
def test_linear_takes_the_entry(no_checked_path, shape, activation, dtype):
    lead, fin, fout = shape
    lead = lead if isinstance(lead, tuple) else (lead,)
    x, w, b = _rand(*lead, fin, dtype=dtype), _rand(fout, fin, dtype=dtype), _rand(fout, dtype=dtype)
    y = GF.linear(x, w, b, activation=activation, negative_slope=SLOPE)
    _same_grads(y, ACTS[activation](F.linear(x, w, b)), (x, w, b), TOL[dtype])


@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("geometry", [(2, 1, 1, 1), ((2, 1), [1, 0], (1, 2), 1), (1, 1, 1, 2)])
def test_conv2d_takes_the_entry(no_checked_path, geometry, activation):
    stride, padding, dilation, groups = geometry
    x, w, b = _rand(2, 4, 9, 8), _rand(6, 4 // groups, 3, 3), _rand(6)
    y = GF.conv2d(x, w, b, stride, padding, dilation, groups, activation=activation,
                  negative_slope=SLOPE)
    _same_grads(y, ACTS[activation](F.conv2d(x, w, b, stride, padding, dilation, groups)),
                (x, w, b), TOL[D])


@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("geometry", [(2, 1, 0, 1, 1), ((2, 1), [1, 0], (1, 0), 1, (1, 2)),
                                      (1, 0, 0, 2, 1)])
def test_conv_transpose2d_takes_the_entry(no_checked_path, geometry, activation):
    stride, padding, output_padding, groups, dilation = geometry
    x, w, b = _rand(2, 4, 5, 6), _rand(4, 6 // groups, 4, 3), _rand(6)
    y = GF.conv_transpose2d(x, w, b, stride, padding, output_padding, groups, dilation,
                            activation=activation, negative_slope=SLOPE)
    want = ACTS[activation](F.conv_transpose2d(x, w, b, stride, padding, output_padding, groups,
                                               dilation))
    _same_grads(y, want, (x, w, b), TOL[D])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["bce", "minimax", "hinge", "wasserstein", "lsgan"])
def test_gan_losses_take_the_entry(no_checked_path, kind, reduction):
    real, fake = _rand(64, 1), _rand(48, 1)
    red = (lambda t: t.mean()) if reduction == "mean" else (lambda t: t.sum())
    with torch.no_grad():
        real *= 3
        fake *= 3
    g_terms = {"bce": F.softplus(-fake), "minimax": -F.softplus(fake), "hinge": -fake,
               "wasserstein": -fake, "lsgan": (fake - 1) ** 2}[kind]
    _same_grads(GF.generator_loss(fake, kind, reduction), red(g_terms), (fake,), TOL[D])
    label = 1.0 if kind in ("hinge", "wasserstein") else 0.9
    bce_real = label * F.softplus(-real) + (1 - label) * F.softplus(real)
    d_real, d_fake = {"bce": (bce_real, F.softplus(fake)),
                      "minimax": (bce_real, F.softplus(fake)),
                      "hinge": (F.relu(1 - real), F.relu(1 + fake)),
                      "wasserstein": (-real, fake),
                      "lsgan": ((real - label) ** 2, fake ** 2)}[kind]
    got = GF.discriminator_loss(real, fake, kind, reduction, real_label=label)
    _same_grads(got, red(d_real) + red(d_fake), (real, fake), TOL[D])


@pytest.mark.parametrize("dtype", [torch.float32, D])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "empty"])
def test_reparameterize_takes_the_entry(no_checked_path, dtype, layout):
    """z bitwise torch's expression under the same seed (torch's generator draws the noise);
    gradients as torch's (d logvar from the saved exp(0.5 logvar): one rounding order apart)."""
    shape = {"contiguous": (33, 17), "transposed": (17, 33), "empty": (0, 5)}[layout]
    mu = _rand(*shape, dtype=dtype)
    lv = torch.randn(*shape, dtype=dtype) * 3
    if lv.numel():
        lv[0, :3] = torch.tensor([-200.0, 80.0, math.nan], dtype=dtype)  # exp under/overflow, NaN
    lv.requires_grad_()
    if layout == "transposed":
        mu = mu.detach().t().requires_grad_()
        lv = lv.detach().t().requires_grad_()
    torch.manual_seed(5)
    z = GF.reparameterize(mu, lv)
    torch.manual_seed(5)
    want = mu + torch.randn_like(mu) * torch.exp(0.5 * lv)
    assert z.shape == want.shape and z.dtype == dtype
    assert torch.equal(z.detach().nan_to_num(), want.detach().nan_to_num())
    assert torch.equal(z.isnan(), want.isnan())
    gz = torch.randn_like(want)
    got = torch.autograd.grad(z, (mu, lv), gz)
    exp = torch.autograd.grad(want, (mu, lv), gz)
    # one rounding order apart: a few ulps, or subnormal results (exp(-100) factors) off by one
    tol = dict(rtol=4 * torch.finfo(dtype).eps, atol=torch.finfo(dtype).tiny)
    for a, b in zip(got, exp):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), **tol)


@pytest.mark.parametrize("layouts", [("channels_last", "contiguous"), ("contiguous", "channels_last"),
                                     ("channels_last", "channels_last"), ("transposed", "contiguous")])
@pytest.mark.parametrize("grad", ["dense", "expanded"])
def test_reparameterize_strides_like_torch(no_checked_path, layouts, grad):
    """z and the gradients in the strides torch's expression gives, for mu and logvar of
    different layouts (found by a bad-input hunt: they came back contiguous), with torch's values
    (z bitwise under the same seed)."""
    def make(layout):
        if layout == "transposed":
            return torch.randn(5, 6, dtype=D).t()
        t = torch.randn(2, 3, 4, 5, dtype=D)
        return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t

    mu0, lv0 = make(layouts[0]), None
    lv0 = make(layouts[1]) if layouts[0] != "transposed" else torch.randn(*mu0.shape, dtype=D)
    mu, lv = mu0.clone().requires_grad_(), lv0.clone().requires_grad_()
    mu_t, lv_t = mu0.clone().requires_grad_(), lv0.clone().requires_grad_()
    torch.manual_seed(9)
    z = GF.reparameterize(mu, lv)
    torch.manual_seed(9)
    want = mu_t + torch.randn_like(mu_t) * torch.exp(0.5 * lv_t)
    assert z.stride() == want.stride()
    assert torch.equal(z, want)
    gz = torch.ones((), dtype=D).expand(want.shape) if grad == "expanded" else torch.randn_like(want)
    got = torch.autograd.grad(z, (mu, lv), gz)
    exp = torch.autograd.grad(want, (mu_t, lv_t), gz)
    for a, b in zip(got, exp):
        assert a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=4 * torch.finfo(D).eps, atol=0)


@pytest.mark.parametrize("wanted", ["mu", "logvar"])
def test_reparameterize_one_input_requiring_grad(no_checked_path, wanted):
    mu, lv = torch.randn(4, 6, dtype=D), torch.randn(4, 6, dtype=D)
    (mu if wanted == "mu" else lv).requires_grad_()
    torch.manual_seed(2)
    eps = torch.randn_like(mu)
    torch.manual_seed(2)
    z = GF.reparameterize(mu, lv)
    gz = torch.randn_like(mu)
    (g,) = torch.autograd.grad(z, mu if wanted == "mu" else lv, gz)
    torch.testing.assert_close(g, gz if wanted == "mu" else 0.5 * gz * eps * torch.exp(0.5 * lv),
                               rtol=1e-15, atol=0.0)


def test_reparameterize_double_backward(no_checked_path):
    """create_graph: the backward of the entry's node is differentiable (a gradient penalty on
    an encoder), second derivatives as torch's expression's."""
    mu, lv = _rand(3, 4), _rand(3, 4)

    def run(fn):
        torch.manual_seed(9)
        z = fn(mu, lv)
        g_mu, g_lv = torch.autograd.grad((z ** 2).sum(), (mu, lv), create_graph=True)
        return torch.autograd.grad((g_mu ** 2).sum() + (g_lv ** 2).sum(), (mu, lv))

    for a, b in zip(run(GF.reparameterize),
                    run(lambda m, v: m + torch.randn_like(m) * torch.exp(0.5 * v))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_reparameterize_backward_is_one_pass():
    """Forward: the noise, torch's mul and exp (bitwise torch's exp), the combine pass; backward:
    one genfast pass, no exp and no other torch compute op."""
    mu, lv = _rand(64, 128, dtype=torch.float32), _rand(64, 128, dtype=torch.float32)
    z = GF.reparameterize(mu, lv)
    gz = torch.randn_like(z)
    with profile() as prof:
        torch.autograd.grad(z, (mu, lv), gz)
    names = [e.name for e in prof.events()]
    assert names.count("genfast::reparam_bwd_scale") == 1, names
    compute = {n for n in names if n.startswith("aten::")} - {
        "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::contiguous"}
    assert not compute, compute
    with profile() as prof:
        GF.reparameterize(mu, lv)
    names = [e.name for e in prof.events()]
    assert names.count("genfast::reparam_fwd_scale") == 1, names
    assert names.count("aten::exp_") == 1, names


# --- what the entries do not take --------------------------------------------------------------

def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


F32, I64 = torch.float32, torch.int64
REFUSED = {
    # linear_act_eager(x, w, b, act, slope)
    "linear_int": ("linear_act_eager", lambda: (_x(2, 3).long(), _x(4, 3).long(), None, 0, 0.0)),
    "linear_dtypes": ("linear_act_eager", lambda: (_x(2, 3), _x(4, 3, dtype=D), None, 0, 0.0)),
    "linear_half": ("linear_act_eager", lambda: (_x(2, 3).half(), _x(4, 3).half(), None, 0, 0.0)),
    "linear_shapes": ("linear_act_eager", lambda: (_x(2, 3), _x(4, 5), None, 0, 0.0)),
    "linear_weight_1d": ("linear_act_eager", lambda: (_x(2, 3), _x(3), None, 0, 0.0)),
    "linear_bias_size": ("linear_act_eager", lambda: (_x(2, 3), _x(4, 3), _x(5), 0, 0.0)),
    "linear_bias_0d": ("linear_act_eager", lambda: (_x(2, 3), _x(1, 3), _x(()), 0, 0.0)),
    "linear_0d_input": ("linear_act_eager", lambda: (_x(()), _x(4, 3), None, 0, 0.0)),
    "linear_meta": ("linear_act_eager", lambda: (_x(2, 3).to("meta"), _x(4, 3).to("meta"), None, 0, 0.0)),
    "linear_act_code": ("linear_act_eager", lambda: (_x(2, 3), _x(4, 3), None, 7, 0.0)),
    "linear_negative_slope": ("linear_act_eager", lambda: (_x(2, 3), _x(4, 3), None, 2, -0.5)),
    "linear_nan_slope": ("linear_act_eager", lambda: (_x(2, 3), _x(4, 3), None, 2, math.nan)),
    "linear_slope_beyond_float": ("linear_act_eager", lambda: (_x(2, 3), _x(4, 3), None, 2, 1e39)),
    # conv2d_act_eager(x, w, b, stride, padding, dilation, groups, act, slope)
    "conv_unbatched": ("conv2d_act_eager", lambda: (_x(3, 8, 8), _x(4, 3, 3, 3), None, [1, 1], [0, 0], [1, 1], 1, 0, 0.0)),
    "conv_three_strides": ("conv2d_act_eager", lambda: (_x(1, 3, 8, 8), _x(4, 3, 3, 3), None, [1, 1, 1], [0, 0], [1, 1], 1, 0, 0.0)),
    "conv_kernel_too_big": ("conv2d_act_eager", lambda: (_x(1, 3, 2, 2), _x(4, 3, 3, 3), None, [1, 1], [0, 0], [1, 1], 1, 0, 0.0)),
    "conv_zero_stride": ("conv2d_act_eager", lambda: (_x(1, 3, 8, 8), _x(4, 3, 3, 3), None, [0, 1], [0, 0], [1, 1], 1, 0, 0.0)),
    "conv_groups": ("conv2d_act_eager", lambda: (_x(1, 3, 8, 8), _x(4, 3, 3, 3), None, [1, 1], [0, 0], [1, 1], 2, 0, 0.0)),
    "conv_channels": ("conv2d_act_eager", lambda: (_x(1, 2, 8, 8), _x(4, 3, 3, 3), None, [1, 1], [0, 0], [1, 1], 1, 0, 0.0)),
    # conv_transpose2d_act_eager(x, w, b, stride, padding, output_padding, groups, dilation, act, slope)
    "convt_output_padding": ("conv_transpose2d_act_eager", lambda: (_x(1, 3, 4, 4), _x(3, 2, 3, 3), None, [1, 1], [0, 0], [1, 1], 1, [1, 1], 0, 0.0)),
    "convt_negative_padding": ("conv_transpose2d_act_eager", lambda: (_x(1, 3, 4, 4), _x(3, 2, 3, 3), None, [1, 1], [-1, 0], [0, 0], 1, [1, 1], 0, 0.0)),
    "convt_channels": ("conv_transpose2d_act_eager", lambda: (_x(1, 2, 4, 4), _x(3, 2, 3, 3), None, [1, 1], [0, 0], [0, 0], 1, [1, 1], 0, 0.0)),
    "convt_bias_dtype": ("conv_transpose2d_act_eager", lambda: (_x(1, 3, 4, 4), _x(3, 2, 3, 3), _x(2, dtype=D), [1, 1], [0, 0], [0, 0], 1, [1, 1], 0, 0.0)),
    # gan_loss_eager(real, fake, kind, generator, reduction, real_label)
    "gan_int": ("gan_loss_eager", lambda: (None, _x(4).long(), 0, True, 1, 1.0)),
    "gan_dtypes": ("gan_loss_eager", lambda: (_x(4, dtype=D), _x(4), 0, False, 1, 1.0)),
    "gan_half": ("gan_loss_eager", lambda: (None, _x(4).half(), 0, True, 1, 1.0)),
    # reparameterize_eager(mu, logvar)
    "reparam_shapes": ("reparameterize_eager", lambda: (_x(2, 3), _x(3, 2))),
    "reparam_dtypes": ("reparameterize_eager", lambda: (_x(2, 3), _x(2, 3, dtype=D))),
    "reparam_int": ("reparameterize_eager", lambda: (_x(2, 3).long(), _x(2, 3).long())),
    "reparam_bfloat16": ("reparameterize_eager", lambda: (_x(2, 3).bfloat16(), _x(2, 3).bfloat16())),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_entry_returns_none_for_what_it_does_not_take(name):
    """None, not an exception or a result: the caller's checked path then decides (and raises
    torch's exception where torch does), including when torch's own product refuses the
    arguments inside the op (a kernel larger than the input, zero stride, channel mismatch)."""
    entry, make_args = REFUSED[name]
    args = make_args()
    state = torch.get_rng_state()
    assert getattr(EXT, entry)(*args) is None
    assert torch.equal(torch.get_rng_state(), state)  # no noise drawn by a refused call


def test_entries_return_none_under_autocast():
    x, w = _x(2, 3), _x(4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert EXT.linear_act_eager(x, w, None, 1, 0.0) is None
        assert EXT.conv2d_act_eager(_x(1, 3, 5, 5), _x(2, 3, 3, 3), None, [1, 1], [0, 0], [1, 1], 1, 0, 0.0) is None
        y = GF.linear(x, w, activation="relu")
    assert y.dtype == torch.bfloat16  # torch's linear under autocast, then the activation
    torch.testing.assert_close(y, F.relu(F.linear(x.bfloat16(), w.bfloat16())))


def _raises_like(ours, theirs):
    try:
        theirs()
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        with pytest.raises(type(e)):
            ours()
    else:
        pytest.fail("torch accepted the call")


BAD_CALLS = {
    "conv2d_bool_stride": (lambda x, w: GF.conv2d(x, w, stride=True), lambda x, w: F.conv2d(x, w, stride=True)),
    "conv2d_bool_padding": (lambda x, w: GF.conv2d(x, w, padding=(True, 0)),
                            lambda x, w: F.conv2d(x, w, padding=(True, 0))),
    "conv2d_float_stride": (lambda x, w: GF.conv2d(x, w, stride=1.5), lambda x, w: F.conv2d(x, w, stride=1.5)),
    "conv2d_kernel_too_big": (lambda x, w: GF.conv2d(x[..., :2, :2], w), lambda x, w: F.conv2d(x[..., :2, :2], w)),
    "conv2d_zero_stride": (lambda x, w: GF.conv2d(x, w, stride=0), lambda x, w: F.conv2d(x, w, stride=0)),
    "conv2d_groups": (lambda x, w: GF.conv2d(x, w, groups=2), lambda x, w: F.conv2d(x, w, groups=2)),
    "convt_output_padding": (lambda x, w: GF.conv_transpose2d(x, w.transpose(0, 1), output_padding=1),
                             lambda x, w: F.conv_transpose2d(x, w.transpose(0, 1), output_padding=1)),
    "convt_bool_groups": (lambda x, w: GF.conv_transpose2d(x, w.transpose(0, 1), groups=True),
                          lambda x, w: F.conv_transpose2d(x, w.transpose(0, 1), groups=True)),
    "linear_shapes": (lambda x, w: GF.linear(x, w), lambda x, w: F.linear(x, w)),
    "linear_dtypes": (lambda x, w: GF.linear(torch.randn(2, 3, dtype=D), torch.randn(4, 3)),
                      lambda x, w: F.linear(torch.randn(2, 3, dtype=D), torch.randn(4, 3))),
    "linear_slope_beyond_float": (lambda x, w: GF.linear(x.flatten(1), torch.randn(2, 192),
                                                         activation="leaky_relu", negative_slope=1e39),
                                  lambda x, w: F.leaky_relu(F.linear(x.flatten(1), torch.randn(2, 192)), 1e39)),
    "reparam_shapes": (lambda x, w: GF.reparameterize(x, w), lambda x, w: x + torch.randn_like(x) * torch.exp(0.5 * w)),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_refused_calls_raise_torchs_exception(name):
    ours, theirs = BAD_CALLS[name]
    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3, requires_grad=True)
    _raises_like(lambda: ours(x, w), lambda: theirs(x, w))


def test_numpy_and_tensor_numbers_run_the_checked_path_with_torchs_result():
    """numpy ints and 0-dim tensor slopes, which torch takes, are not the entries' (their gates
    take int / float only): the checked path gives torch's result."""
    x, w, b = _rand(2, 3, 7, 7), _rand(4, 3, 3, 3), _rand(4)
    y = GF.conv2d(x, w, b, np.int64(2), (np.int64(1), 1), activation="leaky_relu",
                  negative_slope=torch.tensor(SLOPE, dtype=D))
    _same_grads(y, F.leaky_relu(F.conv2d(x, w, b, 2, 1), SLOPE), (x, w, b), TOL[D])


# --- what the gates leave to the checked path (bad-input hunt of the entries) -------------------

class _Sub(torch.Tensor):
    pass


SUBCLASS_CALLS = {
    "linear_weight": lambda t, s: GF.linear(t(3, 4), s(t(2, 4))),
    "linear_bias": lambda t, s: GF.linear(t(3, 4), t(2, 4), s(t(2)), activation="relu"),
    "conv2d_weight": lambda t, s: GF.conv2d(t(1, 2, 5, 5), s(t(3, 2, 3, 3)), activation="tanh"),
    "conv_transpose2d_weight": lambda t, s: GF.conv_transpose2d(t(1, 2, 3, 3), s(t(2, 3, 3, 3)), stride=2),
    "generator_loss": lambda t, s: GF.generator_loss(s(t(6, 1)), "hinge"),
    "discriminator_loss_real": lambda t, s: GF.discriminator_loss(s(t(6, 1)), t(6, 1)),
    "reparameterize_logvar": lambda t, s: GF.reparameterize(t(3, 4), s(t(3, 4))),
    "batch_norm_act_weight": lambda t, s: GF.batch_norm_act(t(4, 3), None, None, s(t(3)), None, True, 0.1, 1e-5),
}


@pytest.mark.parametrize("name", list(SUBCLASS_CALLS))
def test_tensor_subclass_arguments_keep_torch_function(name):
    """A tensor subclass in any argument (not only the input) takes the checked path, whose torch
    calls dispatch its __torch_function__: the result is the subclass, as torch's would be."""
    def t(*shape):
        return torch.randn(*shape, dtype=D)

    def sub(x):
        return x.as_subclass(_Sub)

    assert type(SUBCLASS_CALLS[name](t, sub)) is _Sub


@pytest.mark.parametrize("name", list(SUBCLASS_CALLS))
def test_torch_function_mode_sees_the_call(name):
    """Under an active TorchFunctionMode the entries step aside: the mode sees the product or op
    (not only attribute reads of the checks)."""
    from torch.overrides import TorchFunctionMode

    class Record(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    def t(*shape):
        return torch.randn(*shape, dtype=D)

    with Record() as rec:
        SUBCLASS_CALLS[name](t, lambda x: x)  # plain tensors: only the mode is there
    assert set(rec.names) - {"__get__", "is_floating_point", "dim", "randn"}, rec.names


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("call", ["linear", "conv2d", "conv_transpose2d", "batch_norm_act"])
def test_int_slope_beyond_int64_raises_overflow_error_like_torch(call, grad):
    x = torch.randn(2, 3, 4, 4)
    w = torch.randn(3, 3, 3, 3, requires_grad=grad)
    fns = {"linear": lambda s: GF.linear(x.flatten(1)[:, :3], w[0, 0], activation="leaky_relu", negative_slope=s),
           "conv2d": lambda s: GF.conv2d(x, w, activation="leaky_relu", negative_slope=s),
           "conv_transpose2d": lambda s: GF.conv_transpose2d(x, w, activation="leaky_relu", negative_slope=s),
           "batch_norm_act": lambda s: GF.batch_norm_act(x, None, None, w[0, 0, 0], None, True, 0.1, 1e-5,
                                                         negative_slope=s)}
    for slope in (1 << 64, -(1 << 63) - 1, 10 ** 40):
        _raises_like(lambda: fns[call](slope), lambda: F.leaky_relu(x, slope))
    y = fns[call](1 << 62)  # an int torch converts: taken, as torch takes it
    assert y.shape[0] == 2


def test_reparameterize_logvar_from_inference_mode():
    """logvar made under inference_mode with mu requiring grad: torch's expression works (it keeps
    exp's result, not logvar), and so does the entry, with one noise draw."""
    with torch.inference_mode():
        lv = torch.randn(4, 3, dtype=D)
    mu = torch.randn(4, 3, dtype=D, requires_grad=True)
    torch.manual_seed(4)
    z = GF.reparameterize(mu, lv)
    after = torch.get_rng_state()
    torch.manual_seed(4)
    want = mu + torch.randn_like(mu) * torch.exp(0.5 * lv)
    assert torch.equal(torch.get_rng_state(), after)
    assert torch.equal(z, want)
    gz = torch.randn_like(z)
    (g,) = torch.autograd.grad(z, mu, gz)
    assert torch.equal(g, gz)


def test_reparameterize_logvar_changed_in_place_before_backward():
    """An optimizer step on logvar between forward and backward: torch's expression gives the
    gradient at the forward's values; so does the entry (it keeps exp(0.5 logvar), not logvar)."""
    mu, lv = _rand(4, 3), _rand(4, 3)
    torch.manual_seed(6)
    z = GF.reparameterize(mu, lv)
    torch.manual_seed(6)
    want = mu + torch.randn_like(mu) * torch.exp(0.5 * lv)
    with torch.no_grad():
        lv.add_(1.0)
    gz = torch.randn_like(z)
    for a, b in zip(torch.autograd.grad(z, (mu, lv), gz), torch.autograd.grad(want, (mu, lv), gz)):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=0.0)


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "mixed"])
def test_reparameterize_keeps_torchs_layout(layout):
    """z's strides are those of torch's expression where mu and logvar share a layout (channels_last,
    transposed); a mix of layouts gives the same values (contiguous z)."""
    mu, lv = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    if layout == "channels_last":
        mu, lv = mu.to(memory_format=torch.channels_last), lv.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        mu, lv = mu.transpose(1, 3), lv.transpose(1, 3)
    else:
        mu = mu.to(memory_format=torch.channels_last)
    torch.manual_seed(8)
    z = GF.reparameterize(mu, lv)
    torch.manual_seed(8)
    want = mu + torch.randn_like(mu) * torch.exp(0.5 * lv)
    assert torch.equal(z, want)
    if layout != "mixed":
        assert z.stride() == want.stride()


def test_entries_under_a_torch_dispatch_mode():
    """The entries run without the GIL; a Python dispatch mode (not a __torch_function__ one, so
    the entries do run) is reached through the dispatcher, which takes the GIL for it: the mode
    sees the entries' ATen ops and the results are torch's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x, w, b = _rand(4, 6), _rand(3, 6), _rand(3)
    xc, wc = _rand(2, 3, 6, 6), _rand(3, 4, 4, 4)
    with Record() as rec:
        y = GF.linear(x, w, b, activation="tanh")
        yc = GF.conv_transpose2d(xc, wc, None, 2, 1, activation="relu")
        loss = GF.generator_loss(y[:, :1], "bce")
    assert any(o == "aten.mm.default" for o in rec.ops), rec.ops  # the Linear product (transposed for 4 rows)
    torch.testing.assert_close(y, torch.tanh(F.linear(x, w, b)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(yc, F.relu(F.conv_transpose2d(xc, wc, None, 2, 1)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, F.softplus(-y[:, :1]).mean(), rtol=1e-12, atol=1e-12)


FUNC_CALLS = {
    "generator_loss": (lambda x: GF.generator_loss(x, "bce"), lambda x: F.softplus(-x).mean()),
    "discriminator_loss": (lambda x: GF.discriminator_loss(x, x * 2, "hinge"),
                           lambda x: F.relu(1 - x).mean() + F.relu(1 + 2 * x).mean()),
    "reparameterize": (lambda x: _seeded(GF.reparameterize, x, x.sin()),
                       lambda x: _seeded(lambda m, v: m + torch.randn_like(m) * torch.exp(0.5 * v), x, x.sin())),
    "vae_loss": (lambda x: GF.vae_loss(x, x.detach().cos(), x[:, :2], x[:, 2:], recon_loss="mse"),
                 lambda x: F.mse_loss(x, x.detach().cos(), reduction="sum")
                 - 0.5 * (1 + x[:, 2:] - x[:, :2] ** 2 - x[:, 2:].exp()).sum()),
    "batch_norm_act": (lambda x: GF.batch_norm_act(x, None, None, None, None, True, 0.1, 1e-5,
                                                   negative_slope=0.2),
                       lambda x: F.leaky_relu(F.batch_norm(x, None, None, None, None, True, 0.1, 1e-5), 0.2)),
}


def _seeded(fn, *args):
    torch.manual_seed(12)
    return fn(*args)


@pytest.mark.parametrize("name", list(FUNC_CALLS))
def test_forward_ad_and_torch_func_like_torch(name):
    """Forward-mode AD and torch.func.grad through the losses, reparameterize and BatchNorm: the
    fused nodes have no jvp / functorch rule, so those calls run the reference formulas; the
    results are torch's expression's."""
    import torch.autograd.forward_ad as fwAD

    ours, theirs = FUNC_CALLS[name]
    x = torch.randn(6, 4, dtype=D)
    t = torch.randn_like(x)
    with fwAD.dual_level():
        a = fwAD.unpack_dual(ours(fwAD.make_dual(x, t))).tangent
        b = fwAD.unpack_dual(theirs(fwAD.make_dual(x, t))).tangent
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    ga = torch.func.grad(lambda v: ours(v).sum())(x)
    gb = torch.func.grad(lambda v: theirs(v).sum())(x)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


PRODUCTS = {
    "linear": (lambda x, w, b: GF.linear(x, w, b, activation="tanh"),
               lambda x, w, b: torch.tanh(F.linear(x, w, b)), (4, 5), (3, 5), 3),
    "conv2d": (lambda x, w, b: GF.conv2d(x, w, b, 1, 1, activation="leaky_relu", negative_slope=0.2),
               lambda x, w, b: F.leaky_relu(F.conv2d(x, w, b, 1, 1), 0.2), (2, 3, 6, 6), (4, 3, 3, 3), 4),
    # the DCGAN discriminator's layer, whose product without a backward is Winograd's
    "conv2d_winograd": (lambda x, w, b: GF.conv2d(x, w, b, 2, 1, activation="leaky_relu", negative_slope=0.2),
                        lambda x, w, b: F.leaky_relu(F.conv2d(x, w, b, 2, 1), 0.2),
                        (4, 32, 32, 32), (64, 32, 4, 4), 64),
    "conv_transpose2d": (lambda x, w, b: GF.conv_transpose2d(x, w, b, 2, 1, activation="relu"),
                         lambda x, w, b: F.relu(F.conv_transpose2d(x, w, b, 2, 1)), (2, 4, 5, 5), (4, 3, 4, 4), 3),
}


@pytest.mark.parametrize("dual", ["input_no_grad", "input_weight_requires_grad", "weight"])
@pytest.mark.parametrize("name", list(PRODUCTS))
def test_products_carry_forward_ad_tangents(name, dual):
    """Forward-mode AD through the products with their activation on the eager CPU path: a dual
    input under no_grad, a dual input with parameters that require grad, a dual (detached)
    weight. The entries' products for calls without a backward (the transposed BLAS product of
    Linear, Winograd's Conv2d) have no jvp and dropped the tangent (None); those calls now run
    torch's product. Tangents as torch's expression's (float32: the Winograd layer)."""
    import torch.autograd.forward_ad as fwAD

    ours, theirs, xs, ws, c_out = PRODUCTS[name]
    dt = torch.float32 if name == "conv2d_winograd" else D
    x, w, b = torch.randn(xs, dtype=dt), torch.randn(ws, dtype=dt) / 8, torch.randn(c_out, dtype=dt)
    tx, tw = torch.randn_like(x), torch.randn_like(w)
    got = []
    for fn in (ours, theirs):
        xi, wi, bi = x.clone(), w.clone(), b.clone()
        if dual == "input_weight_requires_grad":
            wi.requires_grad_()
            bi.requires_grad_()
        with fwAD.dual_level(), torch.set_grad_enabled(dual != "input_no_grad"):
            if dual == "weight":
                wi = fwAD.make_dual(wi, tw)
            else:
                xi = fwAD.make_dual(xi, tx)
            got.append(fwAD.unpack_dual(fn(xi, wi, bi)).tangent)
    assert got[0] is not None and got[1] is not None
    tol = dict(rtol=1e-4, atol=1e-4) if dt == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[0], got[1], **tol)
