"""Shared test helpers."""
from __future__ import annotations

import contextlib

import torch

import genfast

# Backends exercised on CPU tensors on a machine without a GPU (triton through the interpreter).
CPU_BACKENDS = ["reference", "cpu", "triton"]
# Backends exercised on CUDA tensors by the GPU suite.
GPU_BACKENDS = ["cuda", "triton"]

# Absolute/relative tolerances against a float64 reference, per dtype of the computation.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def avx2_host() -> bool:
    """Whether genfast._C is loaded on an x86-64 CPU with AVX2 and FMA (what genfast's own AVX2
    products, the tap product and the linear GEMM, need)."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64") or not genfast.backend.has_cpu_ext():
        return False
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def has_avx512() -> bool:
    """Whether the CPU has AVX-512 (where the AVX2 products' "auto" steps aside); True when
    /proc/cpuinfo cannot be read."""
    try:
        return " avx512f" in open("/proc/cpuinfo").read()
    except OSError:
        return True


def on_threads(counts, fn):
    """[fn() on each thread count in turn] (torch.set_num_threads), the caller's count restored."""
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in counts:
            torch.set_num_threads(n)
            outs.append(fn())
        return outs
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def backend(name: str):
    with genfast.backend.use_backend(name):
        yield


def assert_close(actual, expected, dtype=None, msg="", scale=1.0):
    """assert actual ~ expected with the tolerance of `dtype` (default actual's dtype), scaled."""
    tol = TOL[dtype or actual.dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol["atol"] * scale,
                               rtol=tol["rtol"] * scale, msg=lambda m: f"{msg}: {m}")


def assert_error_not_worse(actual, reference_lowp, exact, factor=2.0, floor=0.0, msg=""):
    """For float16/bfloat16: genfast's max error against the float64 result must be at most
    `factor` times PyTorch's own error in that dtype (plus `floor`)."""
    err = (actual.double() - exact.double()).abs().max().item()
    base = (reference_lowp.double() - exact.double()).abs().max().item()
    assert err <= factor * base + floor, f"{msg}: error {err:.3e} vs PyTorch's {base:.3e}"


def check_winograd_conv2d(shape, act, act_fn, kernel, padding, fan, slope, g, products, scale=1.0):
    """A stride-2 Conv2d (kernel, padding) + bias + activation under set_cpu_winograd("always"):
    its forward and its grad_input each take one Winograd product (`products()`: genfast's
    counter), and the output and the three gradients match F.conv2d in float64 (output and
    grad_input, the Winograd values, to `scale` times float32's tolerance). shape: (N, C_in,
    C_out, H, W); the weight ~ N(0, 1 / (C_in * fan)); g: the inputs' torch.Generator; act_fn:
    torch's activation for `act`."""
    import torch.nn.functional as F

    import genfast.functional as GF
    from genfast import backend as B

    N, ci, co, H, W = shape
    x = torch.randn(N, ci, H, W, generator=g, requires_grad=True)
    w = (torch.randn(co, ci, kernel, kernel, generator=g) / (ci * fan) ** 0.5).requires_grad_()
    b = torch.randn(co, generator=g, requires_grad=True)
    dy = torch.randn(N, co, H // 2, W // 2, generator=g)
    with B.cpu_winograd("always"), B.use_backend("cpu"):
        before = products()
        y = GF.conv2d(x, w, b, 2, padding, activation=act, negative_slope=slope)
        assert products() == before + 1, "the forward did not take the Winograd product"
        gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy)
        assert products() == before + 2, "grad_input did not take the Winograd product"
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    yr = act_fn(F.conv2d(xr, wr, br, 2, padding))
    rx, rw, rb = torch.autograd.grad(yr, (xr, wr, br), dy.double())
    assert_close(y, yr.detach(), msg="output", scale=scale)
    assert_close(gx, rx, msg="grad_input", scale=scale)
    assert_close(gw, rw, msg="grad_weight")
    assert_close(gb, rb, msg="grad_bias")


def plant_non_finite(x, w, where: str) -> bool:
    """Put one inf or NaN into x (N >= 2, C >= 4, 8x8) or w (C_in >= 5, C_out >= 8) in place, as
    `where` says ("x_inf", "x_nan", "w_inf", "w_nan"); False for any other `where`."""
    spots = {"x_inf": (x, (1, 3, 2, 5), float("inf")), "x_nan": (x, (0, 0, 7, 0), float("nan")),
             "w_inf": (w, (4, 2, 1, 3), float("-inf")), "w_nan": (w, (0, 7, 0, 0), float("nan"))}
    if where not in spots:
        return False
    t, idx, value = spots[where]
    t[idx] = value
    return True
