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
