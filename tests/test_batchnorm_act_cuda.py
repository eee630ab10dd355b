"""The cuda backend of batch_norm_act (csrc/cuda/batchnorm_act.cu) against the float64
reference, on a GPU. Every test is marked gpu: skipped on a machine without one, run by
benchmarks/gpu_suite.sh with GENFAST_TEST_DEVICE=cuda.

Shapes are chosen to reach every kernel path: split reductions (few channels, many elements
per channel) and the single-launch path (many channels or tiny inputs), both layouts, 16-byte
vector accesses and the scalar fallback (odd inner sizes, misaligned pointers)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import genfast.functional as GF
import genfast.nn as gnn
from genfast.ops.batchnorm_act import GAMMA_FLOOR
from tests.utils import assert_close, assert_error_not_worse, backend

pytestmark = pytest.mark.gpu

# DCGAN discriminator/generator BatchNorm shapes (batch reduced where the size adds nothing)
# plus shapes for the other kernel paths.
SHAPES = [
    (32, 64, 32, 32),    # few channels, many elements: split reductions (NCL and NLC)
    (128, 256, 8, 8),    # many channels: single launch in NCL
    (128, 512, 4, 4),    # single launch, NLC split over rows
    (64, 128, 16, 16),
    (3, 5, 7, 9),        # odd sizes: scalar (non-vector) path
    (2, 3, 1, 1),        # tiny
    (1024, 16, 1, 3),    # tiny rows, many of them
]
SHAPES_3D = [(16, 24, 100), (64, 33, 7), (512, 8, 1)]
SHAPES_2D = [(256, 40), (3, 7)]
LAYOUTS = ["ncl", "nlc"]
ACTS = [("leaky_relu", 0.2), ("relu", 0.0), ("identity", 0.0), ("leaky_relu", 0.01)]


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "ncl":
        return x.contiguous()
    if layout == "nlc":
        if x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        if x.dim() == 3:
            return x.transpose(1, 2).contiguous().transpose(1, 2)
        return x.contiguous()
    if layout == "strided":  # neither layout: the kernel works on a contiguous copy
        big = torch.empty(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype, device=x.device)
        view = big[..., ::2]
        view.copy_(x)
        return view
    if layout == "misaligned":  # contiguous, but 2 bytes off a 16-byte boundary
        flat = torch.empty(x.numel() + 8, dtype=x.dtype, device=x.device)
        view = flat[1:1 + x.numel()].view(x.shape)
        view.copy_(x)
        return view
    raise ValueError(layout)


def _inputs(shape, dtype, device, layout="ncl", affine=True, param_dtype=None, running=True):
    C = shape[1]
    pdt = param_dtype or dtype
    x = _layout(torch.randn(shape, dtype=torch.float64, device=device).mul_(1.7).add_(0.3).to(dtype), layout)
    dy = _layout(torch.randn(shape, dtype=torch.float64, device=device).to(dtype), layout)
    w = (torch.rand(C, dtype=torch.float64, device=device) * 1.5 + 0.25).to(pdt) if affine else None
    if w is not None:
        w[0] = -w[0]  # a negative gamma
    b = (torch.randn(C, dtype=torch.float64, device=device) * 0.5).to(pdt) if affine else None
    rm = (torch.randn(C, dtype=torch.float64, device=device) * 0.1).to(pdt) if running else None
    rv = (torch.rand(C, dtype=torch.float64, device=device) + 0.5).to(pdt) if running else None
    return x, dy, w, b, rm, rv


def _run(name, x, dy, w, b, rm, rv, training, act, slope, memory_efficient=False, momentum=0.1,
         eps=1e-5, to=None):
    """Forward + backward through GF.batch_norm_act on backend `name`; inputs cast to `to`
    (e.g. float64 for the reference). Returns (y, dx, dw, db, rm, rv) with the running buffers
    after the call."""
    def cast(t):
        if t is None:
            return None
        return t.detach().clone().to(to) if to is not None else t.detach().clone()

    xx, ww, bb, rmm, rvv, dd = (cast(t) for t in (x, w, b, rm, rv, dy))
    if to is not None and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        xx = xx.contiguous(memory_format=torch.channels_last)
    xx.requires_grad_(True)
    params = [t for t in (ww, bb) if t is not None]
    for p in params:
        p.requires_grad_(True)
    with backend(name):
        y = GF.batch_norm_act(xx, rmm, rvv, ww, bb, training, momentum, eps, activation=act,
                              negative_slope=slope, memory_efficient=memory_efficient)
    grads = torch.autograd.grad(y, [xx] + params, dd)
    dx = grads[0]
    dw = grads[1] if ww is not None else None
    db = grads[2] if bb is not None else None
    return y.detach(), dx, dw, db, rmm, rvv


def _compare(got, exp, dtype, what):
    for name, g, e in zip(("y", "dx", "dw", "db", "running_mean", "running_var"), got, exp):
        if g is None:
            assert e is None, f"{what}: {name} missing"
            continue
        assert_close(g, e, dtype=dtype, msg=f"{what}: {name}")


@pytest.mark.parametrize("shape", SHAPES + SHAPES_3D + SHAPES_2D)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_float64_matches_reference(cuda_device, shape, layout, training):
    for act, slope in ACTS:
        x, dy, w, b, rm, rv = _inputs(shape, torch.float64, cuda_device, layout)
        got = _run("cuda", x, dy, w, b, rm, rv, training, act, slope)
        exp = _run("reference", x, dy, w, b, rm, rv, training, act, slope)
        _compare(got, exp, torch.float64, f"{shape} {layout} {act} training={training}")
        # torch's strides: the input's for 4-D, contiguous for other ranks (an (N, C, L) input
        # stored (N, L, C) is read in place, its results copied to contiguous)
        want = x.stride() if x.dim() == 4 else torch.empty(x.shape).stride()
        assert got[0].stride() == want, "output in torch's strides"
        assert got[1].stride() == want, "grad_input in torch's strides"


@pytest.mark.parametrize("shape", SHAPES + SHAPES_3D)
@pytest.mark.parametrize("layout", LAYOUTS + ["strided", "misaligned"])
@pytest.mark.parametrize("training", [True, False])
def test_float32_matches_float64_reference(cuda_device, shape, layout, training):
    act, slope = "leaky_relu", 0.2
    x, dy, w, b, rm, rv = _inputs(shape, torch.float32, cuda_device, layout)
    got = _run("cuda", x, dy, w, b, rm, rv, training, act, slope)
    exp = _run("reference", x, dy, w, b, rm, rv, training, act, slope, to=torch.float64)
    _compare(got, exp, torch.float32, f"{shape} {layout} training={training}")


@pytest.mark.parametrize("shape", [(128, 64, 32, 32), (128, 256, 8, 8), (128, 512, 4, 4), (5, 6, 7, 3)])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("param_dtype", ["same", torch.float32])
def test_low_precision_error_not_worse_than_pytorch(cuda_device, shape, layout, dtype, param_dtype):
    """float16/bfloat16 (with parameters and running statistics in the input dtype or in
    float32): error against float64 at most twice PyTorch's own error in that dtype."""
    pdt = dtype if param_dtype == "same" else param_dtype
    act, slope = "leaky_relu", 0.2
    x, dy, w, b, rm, rv = _inputs(shape, dtype, cuda_device, layout, param_dtype=pdt)
    got = _run("cuda", x, dy, w, b, rm, rv, True, act, slope)
    exact = _run("reference", x, dy, w, b, rm, rv, True, act, slope, to=torch.float64)
    # PyTorch in the low precision dtype.
    xx = x.detach().clone().requires_grad_(True)
    ww = w.detach().clone().requires_grad_(True)
    bb = b.detach().clone().requires_grad_(True)
    rmm, rvv = rm.clone(), rv.clone()
    yt = F.leaky_relu(F.batch_norm(xx, rmm, rvv, ww, bb, True, 0.1, 1e-5), slope)
    dxt, dwt, dbt = torch.autograd.grad(yt, [xx, ww, bb], dy)
    torch_res = (yt.detach(), dxt, dwt, dbt, rmm, rvv)
    names = ("y", "dx", "dw", "db", "running_mean", "running_var")
    for name, g, t, e in zip(names, got, torch_res, exact):
        # One rounding step of the stored dtype is the least any implementation can do.
        ulp = torch.finfo(g.dtype).eps * e.abs().max().item()
        assert_error_not_worse(g, t, e, factor=2.0, floor=ulp, msg=f"{shape} {layout} {dtype} {name}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("act,slope", [("leaky_relu", 0.2), ("identity", 0.0)])
@pytest.mark.parametrize("shape", [(32, 64, 32, 32), (128, 512, 4, 4), (16, 24, 100), (3, 5, 7, 9)])
def test_memory_efficient(cuda_device, layout, act, slope, shape):
    x, dy, w, b, rm, rv = _inputs(shape, torch.float64, cuda_device, layout)
    w[1] = 1e-5  # below GAMMA_FLOOR: clamped in the forward, recovered in the backward
    assert GAMMA_FLOOR > 1e-5
    for training in (True, False):
        got = _run("cuda", x, dy, w, b, rm, rv, training, act, slope, memory_efficient=True)
        exp = _run("reference", x, dy, w, b, rm, rv, training, act, slope, memory_efficient=True)
        _compare(got, exp, torch.float64, f"memory_efficient {shape} {layout} training={training}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_affine_no_running_stats(cuda_device, layout):
    shape = (32, 64, 16, 16)
    x, dy, w, b, rm, rv = _inputs(shape, torch.float64, cuda_device, layout, affine=False, running=False)
    got = _run("cuda", x, dy, w, b, rm, rv, True, "relu", 0.0)
    exp = _run("reference", x, dy, w, b, rm, rv, True, "relu", 0.0)
    _compare(got, exp, torch.float64, "affine=False, no running stats")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_grad_output_in_other_layout(cuda_device, layout):
    shape = (16, 64, 8, 8)
    x, dy, w, b, rm, rv = _inputs(shape, torch.float64, cuda_device, layout)
    other = "ncl" if layout == "nlc" else "nlc"
    dy = _layout(dy, other)
    got = _run("cuda", x, dy, w, b, rm, rv, True, "leaky_relu", 0.2)
    exp = _run("reference", x, dy, w, b, rm, rv, True, "leaky_relu", 0.2)
    _compare(got, exp, torch.float64, "grad_output layout differs from input")
    assert got[1].stride() == x.stride()


def test_large_mean_offset_is_stable(cuda_device):
    """Welford statistics: a large common offset does not cancel the variance in float32."""
    shape = (64, 8, 64, 64)
    x64 = torch.randn(shape, dtype=torch.float64, device=cuda_device) + 1e4
    for layout in LAYOUTS:
        x = _layout(x64.float(), layout)
        with backend("cuda"):
            _, mean, invstd = torch.ops.genfast.batch_norm_act_fwd(
                x, None, None, None, None, True, 0.1, 1e-5, 0, 0.0, 0.0)
        var = x.double().var(dim=(0, 2, 3), unbiased=False)
        # float32 holds values near 1e4 to 2**-10: a few of those steps for the mean; the
        # variance (about 1) within 0.1%, where sum / sum-of-squares would be off by O(1).
        torch.testing.assert_close(mean.double(), x.double().mean(dim=(0, 2, 3)), atol=4 * 2.0**-10, rtol=0)
        torch.testing.assert_close(invstd.double(), torch.rsqrt(var + 1e-5), atol=0, rtol=1e-3)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(128, 64, 32, 32), (128, 512, 4, 4)])
def test_deterministic(cuda_device, layout, shape):
    x, dy, w, b, rm, rv = _inputs(shape, torch.float32, cuda_device, layout)
    first = _run("cuda", x, dy, w, b, rm, rv, True, "leaky_relu", 0.2)
    for _ in range(3):
        again = _run("cuda", x, dy, w, b, rm, rv, True, "leaky_relu", 0.2)
        for a, c in zip(first, again):
            assert torch.equal(a, c), "results must not depend on block timing"


def test_matches_cpu_backend(cuda_device):
    """The CUDA and CPU kernels share csrc/common: same results in float64."""
    for layout in LAYOUTS:
        x, dy, w, b, rm, rv = _inputs((8, 16, 12, 10), torch.float64, cuda_device, layout)
        got = _run("cuda", x, dy, w, b, rm, rv, True, "leaky_relu", 0.2)
        cpu = [t.cpu() if t is not None else None for t in (x, dy, w, b, rm, rv)]
        exp = _run("cpu", *cpu, True, "leaky_relu", 0.2)
        _compare([t.cpu() for t in got], exp, torch.float64, f"cuda vs cpu {layout}")


def test_empty_batch_eval(cuda_device):
    x, dy, w, b, rm, rv = _inputs((0, 6, 4, 4), torch.float32, cuda_device)
    got = _run("cuda", x, dy, w, b, rm, rv, False, "leaky_relu", 0.2)
    exp = _run("reference", x, dy, w, b, rm, rv, False, "leaky_relu", 0.2)
    assert got[0].shape == x.shape
    assert torch.equal(got[2], torch.zeros_like(w)) and torch.equal(got[3], torch.zeros_like(b))
    _compare(got, exp, torch.float32, "empty batch, eval")


def test_empty_batch_training_leaves_running_stats(cuda_device):
    """As nn.BatchNorm2d: an empty training batch leaves the running statistics unchanged
    (finish_stats in csrc/common) and gives zero weight/bias gradients."""
    for layout in LAYOUTS:
        x, dy, w, b, rm, rv = _inputs((0, 6, 4, 4), torch.float32, cuda_device, layout)
        y, dx, dw, db, rm_after, rv_after = _run("cuda", x, dy, w, b, rm, rv, True, "leaky_relu", 0.2)
        assert y.shape == x.shape and dx.shape == x.shape
        assert torch.equal(rm_after, rm) and torch.equal(rv_after, rv)
        assert torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros_like(b))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_module_against_torch(cuda_device, layout):
    """BatchNormAct2d (cuda backend) == nn.BatchNorm2d + LeakyReLU in float64, over several
    steps with momentum=None (cumulative average) and num_batches_tracked, then eval."""
    torch.manual_seed(0)
    m = gnn.BatchNormAct2d(32, momentum=None, activation="leaky_relu", negative_slope=0.2).to(cuda_device).double()
    ref_bn = torch.nn.BatchNorm2d(32, momentum=None).to(cuda_device).double()
    ref_bn.load_state_dict(m.state_dict())
    with backend("cuda"):
        for step in range(3):
            x = _layout(torch.randn(16, 32, 9, 9, dtype=torch.float64, device=cuda_device), layout)
            x1 = x.clone().requires_grad_(True)
            x2 = x.clone().requires_grad_(True)
            y1 = m(x1)
            y2 = F.leaky_relu(ref_bn(x2), 0.2)
            g = torch.randn_like(y1)
            y1.backward(g)
            y2.backward(g)
            assert_close(y1, y2, msg=f"step {step} y")
            assert_close(x1.grad, x2.grad, msg=f"step {step} dx")
            assert_close(m.weight.grad, ref_bn.weight.grad, msg=f"step {step} dw")
            assert_close(m.bias.grad, ref_bn.bias.grad, msg=f"step {step} db")
        for k in ("running_mean", "running_var", "num_batches_tracked"):
            assert_close(getattr(m, k).double(), getattr(ref_bn, k).double(), dtype=torch.float64, msg=k)
        m.eval()
        ref_bn.eval()
        x = torch.randn(4, 32, 5, 5, dtype=torch.float64, device=cuda_device)
        assert_close(m(x), F.leaky_relu(ref_bn(x), 0.2), msg="eval")


def test_side_stream_and_graph_capture(cuda_device):
    """The split reductions' arrival counters: on a side stream, and inside a captured CUDA
    graph replayed several times, results equal the default-stream eager ones."""
    shape = (64, 16, 32, 32)  # few channels: split reductions
    x, dy, w, b, rm, rv = _inputs(shape, torch.float32, cuda_device)
    eager = _run("cuda", x, dy, w, b, rm, rv, True, "leaky_relu", 0.2)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = _run("cuda", x, dy, w, b, rm, rv, True, "leaky_relu", 0.2)
    torch.cuda.current_stream().wait_stream(side)
    for a, c in zip(eager, on_side):
        assert torch.equal(a, c)

    static_x = x.clone()
    rmg, rvg = rm.clone(), rv.clone()
    with backend("cuda"):
        # Warm up on a side stream, as torch.cuda.graphs recommends.
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            torch.ops.genfast.batch_norm_act_fwd(static_x, w, b, rmg.clone(), rvg.clone(), True, 0.1, 1e-5, 2, 0.2, 0.0)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_g, mean_g, invstd_g = torch.ops.genfast.batch_norm_act_fwd(
                static_x, w, b, rmg, rvg, True, 0.1, 1e-5, 2, 0.2, 0.0)
            dx_g, dw_g, db_g = torch.ops.genfast.batch_norm_act_bwd(
                dy, static_x, w, b, mean_g, invstd_g, True, 2, 0.2, 0.0, False)
        for _ in range(3):
            rmg.copy_(rm)
            rvg.copy_(rv)
            graph.replay()
            # Eager launches between replays share nothing with the graph.
            _run("cuda", x, dy, w, b, rm, rv, True, "leaky_relu", 0.2)
        torch.cuda.synchronize()
    for name, g, e in zip(("y", "dx", "dw", "db", "running_mean", "running_var"),
                          (y_g, dx_g, dw_g, db_g, rmg, rvg), eager):
        assert torch.equal(g, e), name


def test_opcheck(cuda_device):
    for layout in LAYOUTS:
        x, dy, w, b, rm, rv = _inputs((4, 8, 5, 6), torch.float32, cuda_device, layout)
        torch.library.opcheck(torch.ops.genfast.batch_norm_act_fwd,
                              (x, w, b, rm, rv, True, 0.1, 1e-5, 2, 0.2, 0.0))
        torch.library.opcheck(torch.ops.genfast.batch_norm_act_fwd,
                              (x, w, b, rm, rv, False, 0.1, 1e-5, 1, 0.0, 0.0))
        y, mean, invstd = torch.ops.genfast.batch_norm_act_fwd(x, w, b, rm, rv, True, 0.1, 1e-5, 2, 0.2, 0.0)
        torch.library.opcheck(torch.ops.genfast.batch_norm_act_bwd,
                              (dy, x, w, b, mean, invstd, True, 2, 0.2, 0.0, False))


def test_errors_before_any_write(cuda_device):
    x, dy, w, b, rm, rv = _inputs((4, 8, 5, 6), torch.float32, cuda_device)
    rm0, rv0 = rm.clone(), rv.clone()
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.genfast.batch_norm_act_fwd(x, w.cpu(), b, rm, rv, True, 0.1, 1e-5, 2, 0.2, 0.0)
    with pytest.raises(RuntimeError, match="running_var"):
        torch.ops.genfast.batch_norm_act_fwd(x, w, b, rm, rv.int(), True, 0.1, 1e-5, 2, 0.2, 0.0)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


# --- the split-pass ops of SyncBatchNormAct2d: genfast::batch_norm_act_{stats,apply,bwd_reduce,bwd_dx}
# on CUDA tensors (same kernels, finalisation replaced). Each op is compared alone: its
# per-channel inputs (mean, invstd, global sums) come from the float64 reference, rounded to the
# accumulation dtype, and the reference runs on float64 copies of the same values.

SPLIT_SHAPES = [
    (32, 64, 32, 32),    # split reductions in both layouts
    (128, 256, 8, 8),    # one split per channel group
    (3, 5, 7, 9),        # odd sizes: scalar path
    (2, 3, 1, 1),        # tiny
    (16, 24, 100),       # (N, C, L)
    (256, 40),           # (N, C): read as rows of C
]


def _split_pass(x, dy, w, b, act, slope, gamma_floor=0.0, saved_is_output=False, keeps_layout=True):
    """Runs the four ops on x's device and dtype and the reference in float64; returns
    [(name, got, expected)]. keeps_layout: x is in the NCL or NLC layout, so y and dx must have
    torch's strides (x's for 4-D, contiguous otherwise; other inputs are read through a
    contiguous copy)."""
    from genfast import backend as B
    from genfast.reference import batchnorm_act as ref

    ops = torch.ops.genfast
    acc = ref.acc_dtype(x.dtype)
    code = B.ACTIVATIONS[act]
    count = x.numel() // x.shape[1]

    def f64(t):
        return None if t is None else t.double()

    x64, dy64, w64, b64 = f64(x), f64(dy), f64(w), f64(b)
    out = []
    mean, m2 = ops.batch_norm_act_stats(x)
    rmean, rm2 = ref.stats(x64)
    assert mean.dtype == acc and m2.dtype == acc
    out += [("mean", mean, rmean), ("M2", m2, rm2)]
    mean_a = rmean.to(acc)
    invstd_a = torch.rsqrt(rm2 / count + 1e-5).to(acc)
    m64, i64 = mean_a.double(), invstd_a.double()
    y = ops.batch_norm_act_apply(x, mean_a, invstd_a, w, b, code, slope, gamma_floor)
    want = x.stride() if x.dim() == 4 else torch.empty(x.shape).stride()  # torch's strides
    assert y.dtype == x.dtype and (y.stride() == want or not keeps_layout), "apply keeps dtype and layout"
    out.append(("apply", y, ref.apply(x64, m64, i64, w64, b64, act, slope, gamma_floor)))
    saved, saved64 = (y, f64(y)) if saved_is_output else (x, x64)
    s, sx = ops.batch_norm_act_bwd_reduce(dy, saved, w, b, mean_a, invstd_a, code, slope, gamma_floor,
                                          saved_is_output)
    rs, rsx = ref.bwd_reduce(dy64, saved64, w64, b64, m64, i64, act, slope, gamma_floor, saved_is_output)
    assert s.dtype == acc and sx.dtype == acc
    out += [("sum dz", s, rs), ("sum dz xhat", sx, rsx)]
    s_a, sx_a = rs.to(acc), rsx.to(acc)
    dx = ops.batch_norm_act_bwd_dx(dy, saved, w, b, mean_a, invstd_a, s_a, sx_a, float(count), code, slope,
                                   gamma_floor, saved_is_output)
    assert dx.dtype == x.dtype and (dx.stride() == want or not keeps_layout), "bwd_dx keeps dtype and layout"
    out.append(("dx", dx, ref.bwd_dx(dy64, saved64, w64, b64, m64, i64, s_a.double(), sx_a.double(),
                                     float(count), act, slope, gamma_floor, saved_is_output)))
    return out


@pytest.mark.parametrize("shape", SPLIT_SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_split_pass_ops_float64_match_reference(cuda_device, shape, layout):
    for act, slope in ACTS:
        x, dy, w, b, _, _ = _inputs(shape, torch.float64, cuda_device, layout, running=False)
        for name, got, exp in _split_pass(x, dy, w, b, act, slope):
            assert_close(got, exp, torch.float64, f"{shape} {layout} {act}: {name}")


@pytest.mark.parametrize("shape", SPLIT_SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS + ["strided", "misaligned"])
def test_split_pass_ops_float32_match_float64_reference(cuda_device, shape, layout):
    x, dy, w, b, _, _ = _inputs(shape, torch.float32, cuda_device, layout, running=False)
    for name, got, exp in _split_pass(x, dy, w, b, "leaky_relu", 0.2, keeps_layout=layout != "strided"):
        assert_close(got, exp, torch.float32, f"{shape} {layout}: {name}")


@pytest.mark.parametrize("shape", [(32, 64, 32, 32), (3, 5, 7, 9)])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_split_pass_ops_low_precision(cuda_device, shape, layout, dtype):
    """float32 accumulation: the per-channel results are within float32 tolerance of the float64
    reference on the same (rounded) inputs; y and dx within the rounding of their dtype."""
    x, dy, w, b, _, _ = _inputs(shape, dtype, cuda_device, layout, running=False, param_dtype=torch.float32)
    for name, got, exp in _split_pass(x, dy, w, b, "leaky_relu", 0.2):
        assert_close(got, exp, dtype if name in ("apply", "dx") else torch.float32, f"{shape} {layout}: {name}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("act,slope", [("leaky_relu", 0.2), ("identity", 0.0)])
def test_split_pass_ops_saved_output(cuda_device, layout, act, slope):
    x, dy, w, b, _, _ = _inputs((16, 12, 9, 10), torch.float64, cuda_device, layout, running=False)
    for name, got, exp in _split_pass(x, dy, w, b, act, slope, gamma_floor=GAMMA_FLOOR, saved_is_output=True):
        assert_close(got, exp, torch.float64, f"{layout} {act} saved output: {name}")


def test_split_pass_ops_match_cpu(cuda_device):
    for layout in LAYOUTS:
        x, dy, w, b, _, _ = _inputs((8, 16, 12, 10), torch.float64, cuda_device, layout, running=False)
        got = _split_pass(x, dy, w, b, "leaky_relu", 0.2)
        cpu = _split_pass(*(t.cpu() for t in (x, dy, w, b)), "leaky_relu", 0.2)
        for (name, g, _), (_, c, _) in zip(got, cpu):
            assert_close(g.cpu(), c, torch.float64, f"cuda vs cpu {layout}: {name}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_split_pass_ops_deterministic(cuda_device, layout):
    x, dy, w, b, _, _ = _inputs((128, 64, 32, 32), torch.float32, cuda_device, layout, running=False)
    first = _split_pass(x, dy, w, b, "leaky_relu", 0.2)
    for _ in range(3):
        for (name, a, _), (_, c, _) in zip(first, _split_pass(x, dy, w, b, "leaky_relu", 0.2)):
            assert torch.equal(a, c), f"{name}: results must not depend on block timing"


def test_split_pass_ops_empty_batch(cuda_device):
    x, dy, w, b, _, _ = _inputs((0, 6, 4, 4), torch.float32, cuda_device, running=False)
    mean, m2 = torch.ops.genfast.batch_norm_act_stats(x)
    s, sx = torch.ops.genfast.batch_norm_act_bwd_reduce(dy, x, w, b, mean, m2, 2, 0.2, 0.0, False)
    for name, t in (("mean", mean), ("M2", m2), ("sum dz", s), ("sum dz xhat", sx)):
        assert t.shape == (6,) and torch.equal(t, torch.zeros_like(t)), name


def test_split_pass_ops_opcheck(cuda_device):
    ops = torch.ops.genfast
    for layout in LAYOUTS:
        x, dy, w, b, _, _ = _inputs((4, 8, 5, 6), torch.float32, cuda_device, layout, running=False)
        mean, m2 = ops.batch_norm_act_stats(x)
        invstd = torch.rsqrt(m2 / 120 + 1e-5)
        s, sx = ops.batch_norm_act_bwd_reduce(dy, x, w, b, mean, invstd, 2, 0.2, 0.0, False)
        torch.library.opcheck(ops.batch_norm_act_stats.default, (x,))
        torch.library.opcheck(ops.batch_norm_act_apply.default, (x, mean, invstd, w, b, 2, 0.2, 0.0))
        torch.library.opcheck(ops.batch_norm_act_bwd_reduce.default, (dy, x, w, b, mean, invstd, 2, 0.2, 0.0, False))
        torch.library.opcheck(ops.batch_norm_act_bwd_dx.default,
                              (dy, x, w, b, mean, invstd, s, sx, 120.0, 2, 0.2, 0.0, False))


def test_split_pass_ops_errors(cuda_device):
    ops = torch.ops.genfast
    x, dy, w, b, _, _ = _inputs((4, 8, 5, 6), torch.float32, cuda_device, running=False)
    mean, m2 = ops.batch_norm_act_stats(x)
    with pytest.raises(RuntimeError, match="mean"):
        ops.batch_norm_act_apply(x, mean[:5], m2, w, b, 2, 0.2, 0.0)
    with pytest.raises(RuntimeError, match="invstd"):
        ops.batch_norm_act_bwd_reduce(dy, x, w, b, mean, m2.cpu(), 2, 0.2, 0.0, False)
    with pytest.raises(RuntimeError, match="grad_output"):
        ops.batch_norm_act_bwd_reduce(dy.double(), x, w, b, mean, m2, 2, 0.2, 0.0, False)
    with pytest.raises(RuntimeError, match="sum_dz_xhat"):
        ops.batch_norm_act_bwd_dx(dy, x, w, b, mean, m2, mean, m2[:3], 120.0, 2, 0.2, 0.0, False)


def test_sync_batchnorm_uses_cuda_ops(cuda_device):
    """SyncBatchNormAct2d runs its passes on these kernels for CUDA tensors, the reference
    formulas only under the reference backend."""
    import genfast
    from genfast.ops.sync_batchnorm_act import _use_cpp

    assert genfast.backend.has_cuda_ext(), "the GPU suite needs genfast._C built with CUDA"
    x = torch.randn(2, 3, 4, 4, device=cuda_device)
    assert _use_cpp(x)
    with backend("reference"):
        assert not _use_cpp(x)


# --- issue 11 at the edges: double statistics, overlapping running buffers ---------------------

def _ulp32(v: float) -> float:
    a = abs(v)
    return float(torch.nextafter(torch.tensor(a, dtype=torch.float32), torch.tensor(float("inf"))).item() - a)


@pytest.mark.parametrize("shape,layout", [((1, 1, 4096, 4608), "ncl"), ((2 ** 24 + 2 ** 21, 1), "ncl"),
                                          ((2 ** 21 + 2 ** 18, 8, 1, 1), "nlc")],
                         ids=["plane", "column", "channels_last"])
@pytest.mark.parametrize("offset", [3.0, 1e4])
def test_long_float32_reduction_float64_parity(cuda_device, shape, layout, offset):
    """1.125 * 2^24 float32 values per channel (a float count or sum saturates at 2^24), mean
    offset 3 or 1e4: the batch mean and the running statistics are the float64 values rounded
    once (within 1 ulp), invstd within float rounding, and grad_bias of unit gradients is the
    exact count. Expected values: float64 statistics of the same float32 data."""
    x = _layout((torch.randn(shape, dtype=torch.float64, device=cuda_device) * 2 + offset).float(), layout)
    C = x.shape[1]
    rm, rv = torch.zeros(C, device=cuda_device), torch.ones(C, device=cuda_device)
    _, mean, invstd = torch.ops.genfast.batch_norm_act_fwd(x, None, None, rm, rv, True, 0.1, 1e-5, 0, 0.0, 0.0)
    dims = [d for d in range(x.dim()) if d != 1]
    x64 = x.double()
    m64 = x64.mean(dim=dims)
    var64 = x64.var(dim=dims, unbiased=False)
    n = x.numel() // C
    for c in range(C):
        assert abs(mean[c].item() - m64[c].item()) <= _ulp32(m64[c].item()), "batch mean"
        rm_exact = 0.1 * m64[c].item()
        assert abs(rm[c].item() - rm_exact) <= _ulp32(rm_exact), "running_mean"
        rv_exact = 0.9 + 0.1 * var64[c].item() * n / (n - 1)
        assert abs(rv[c].item() - rv_exact) <= 2 * _ulp32(rv_exact), "running_var"
    torch.testing.assert_close(invstd.double(), torch.rsqrt(var64 + 1e-5), atol=0, rtol=3e-7)
    xg = x.clone().requires_grad_()
    b = torch.zeros(C, device=cuda_device, requires_grad=True)
    with backend("cuda"):
        y = GF.batch_norm_act(xg, None, None, None, b, True, 0.1, 1e-5, activation="identity")
    (gb,) = torch.autograd.grad(y, [b], torch.ones_like(y))
    assert torch.equal(gb, torch.full_like(gb, float(n))), "grad_bias = the sum of n ones"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(16, 8, 32, 32), (128, 64, 4, 4)])
def test_float32_error_at_large_mean_offset_reaches_torch(cuda_device, layout, shape):
    """x = randn + 1e4 in float32: the output's error against float64 is no larger than torch's
    CUDA kernel's (x * scale + shift rounded at the offset: 3x torch's before)."""
    C = shape[1]
    x64 = torch.randn(shape, dtype=torch.float64, device=cuda_device) + 1e4
    x32 = _layout(x64.float(), layout)
    w = torch.rand(C, dtype=torch.float64, device=cuda_device) + 0.5
    b = torch.randn(C, dtype=torch.float64, device=cuda_device)
    y64 = F.batch_norm(x32.double(), None, None, w, b, True, 0.1, 1e-5)
    y_t = F.batch_norm(x32, None, None, w.float(), b.float(), True, 0.1, 1e-5)
    with backend("cuda"):
        y = GF.batch_norm_act(x32, None, None, w.float(), b.float(), True, 0.1, 1e-5, activation="identity")
    err = (y.double() - y64).abs().max().item()
    err_t = (y_t.double() - y64).abs().max().item()
    assert err <= 1.25 * err_t, f"error {err:.3e} vs torch's {err_t:.3e}"


def _running_views(kind, C, device, dtype):
    """(base storages, running_mean view, running_var view) for C channels; the bases hold
    every element the views can reach, so that a write outside the views would show."""
    def t(vals):
        return torch.tensor(vals, dtype=dtype, device=device)
    if kind == "every_other":  # strided, no overlap: the parallel path
        bm, bv = t([100.0 * i for i in range(2 * C)]), t([1.0 + i for i in range(2 * C)])
        return (bm, bv), bm[::2], bv[::2]
    if kind == "expanded":
        bm, bv = t([100.0 * i for i in range(5)]), t([1.0 + i for i in range(5)])
        return (bm, bv), bm[4:5].expand(C), bv[4:5].expand(C)
    if kind == "expanded_whole_storage":
        bm, bv = t([7.0]), t([2.0])
        return (bm, bv), bm.expand(C), bv.expand(C)
    # "shared": running_mean and running_var are overlapping views of one storage
    base = t([0.5 + i for i in range(C + 1)])
    return (base,), base[0:C], base[1:C + 1]


@pytest.mark.parametrize("kind", ["every_other", "expanded", "expanded_whole_storage", "shared"])
@pytest.mark.parametrize("shape,layout", [((4, 3, 5), "ncl"), ((64, 3, 64, 64), "ncl"),
                                          ((32, 3, 16, 16), "nlc"), ((4096, 3), "ncl")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_overlapping_running_stats_like_cpu(cuda_device, kind, shape, layout, dtype):
    """Running buffers that are strided, expanded (stride 0) or overlap each other: the cuda
    backend writes them through the views exactly as genfast's CPU kernel does (channel after
    channel, both buffers of a channel read before either is written; an expanded buffer
    compounds the updates in channel order, as torch's CPU kernel on one thread), with no race
    and nothing written outside the views: the whole base storage is compared. Shapes reach
    the one-launch and the split paths in both layouts."""
    C = shape[1]
    tol = dict(rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    x = torch.randn(shape, dtype=torch.float64).add_(1).to(dtype)
    bases, rm, rv = _running_views(kind, C, cuda_device, dtype)
    bases_c, rm_c, rv_c = _running_views(kind, C, "cpu", dtype)
    with backend("cuda"):
        y = GF.batch_norm_act(_layout(x.to(cuda_device), layout), rm, rv, None, None, True, 0.1, 1e-5,
                              activation="identity")
    with backend("cpu"):
        y_c = GF.batch_norm_act(x, rm_c, rv_c, None, None, True, 0.1, 1e-5, activation="identity")
    torch.testing.assert_close(y.cpu(), y_c)
    for got, exp in zip(bases, bases_c):
        torch.testing.assert_close(got.cpu(), exp, **tol)
    if kind.startswith("expanded"):
        # torch's CPU kernel on one thread: the updates compounded in channel order.
        bases_t, rm_t, rv_t = _running_views(kind, C, "cpu", dtype)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            F.batch_norm(x, rm_t, rv_t, None, None, True, 0.1, 1e-5)
        finally:
            torch.set_num_threads(threads)
        for got, exp in zip(bases, bases_t):
            torch.testing.assert_close(got.cpu(), exp, **tol)


def test_expanded_running_stats_module(cuda_device):
    """BatchNormAct2d whose running buffers were replaced by expanded views: several training
    steps on CUDA leave the same buffers as on the CPU backend."""
    def make(device):
        m = gnn.BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.2).to(device)
        m.running_mean = torch.zeros(1, device=device).expand(4)
        m.running_var = torch.ones(1, device=device).expand(4)
        return m
    g, c = make(cuda_device), make("cpu")
    for _ in range(3):
        x = torch.randn(8, 4, 6, 6) * 2 + 1
        with backend("cuda"):
            y = g(x.to(cuda_device))
        with backend("cpu"):
            y_c = c(x)
        torch.testing.assert_close(y.cpu(), y_c)
    torch.testing.assert_close(g.running_mean.cpu(), c.running_mean)
    torch.testing.assert_close(g.running_var.cpu(), c.running_var)
    assert int(g.num_batches_tracked) == 3
