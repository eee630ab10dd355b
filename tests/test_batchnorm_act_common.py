"""The statistics arithmetic of the CUDA BatchNorm kernels, on the host. bn_fwd_stats_kernel
(csrc/cuda/batchnorm_act.cu) reduces short runs of values in float, adds them into double
partials with 64-bit counts and merges the partials of threads, warps, blocks and splits with
the csrc/common functions sum_partial_of_run / sum_partial_merge_with / sum_partial_merge /
sum_partial_stats. tests/cpp/bn_stats_driver.cpp runs that same reduction (threads taking every
T-th run of R values, then a pairwise tree) with the same header compiled by the host C++
compiler, so these checks run without a GPU; the GPU tests (tests/test_batchnorm_act_cuda.py)
check the kernels themselves. Expected values: float64 torch on the same float32 data."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER_SRC = os.path.join(ROOT, "tests", "cpp", "bn_stats_driver.cpp")
# (run length, threads): the NCL float run (kUnroll = 4 vectors of 4), the NLC run (kUnroll = 4
# rows), the scalar run, a bfloat16 NCL run (4 vectors of 8), with more threads than runs.
GEOMETRIES = [(16, 256), (4, 96), (4, 1), (32, 1024)]


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    exe = str(tmp_path_factory.mktemp("bn_stats") / "bn_stats_driver")
    subprocess.run([cxx, "-std=c++17", "-O2", "-Wall", "-Werror", "-I", os.path.join(ROOT, "csrc"), DRIVER_SRC,
                    "-o", exe], check=True, capture_output=True, text=True)

    def run(x: torch.Tensor, R: int, T: int):
        kind = {torch.float32: "float", torch.float64: "double"}[x.dtype]
        out = subprocess.run([exe, kind, str(R), str(T)], input=x.contiguous().numpy().tobytes(),
                             capture_output=True, check=True).stdout.decode().split()
        return int(out[0]), float(out[1]), float(out[2])
    return run


def _exact(x: torch.Tensor):
    x64 = x.double()
    mean = x64.mean()
    return x64.numel(), mean.item(), ((x64 - mean) ** 2).sum().item()


@pytest.mark.parametrize("R,T", GEOMETRIES)
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_float32_statistics_match_float64(driver, R, T, offset):
    """2^20 + 3 float32 values (a ragged last run): the mean within 1e-9 of (std + |mean|),
    far below float32's resolution (a float running mean holds 1e4 to 2^-10 only; the runs'
    float rounding averages out), and M2 to float rounding, at a 1e4 mean offset too."""
    std = 1.5
    x = (torch.randn(2 ** 20 + 3, dtype=torch.float64) * std + offset).float()
    n, mean, m2 = driver(x, R, T)
    n_e, mean_e, m2_e = _exact(x)
    assert n == n_e
    assert abs(mean - mean_e) <= 1e-9 * (std + offset), (mean, mean_e)
    assert abs(m2 - m2_e) <= 2e-7 * m2_e, (m2, m2_e)


@pytest.mark.parametrize("R,T", GEOMETRIES[:2])
def test_float64_statistics_match_float64(driver, R, T):
    x = torch.randn(100003, dtype=torch.float64) * 3 + 1e6
    n, mean, m2 = driver(x, R, T)
    n_e, mean_e, m2_e = _exact(x)
    assert n == n_e
    assert abs(mean - mean_e) <= 1e-15 * abs(mean_e)
    assert abs(m2 - m2_e) <= 1e-10 * m2_e


def test_long_reduction_does_not_saturate(driver):
    """1.125 * 2^24 values of one channel on one thread: a float count or float sum stops
    growing at 2^24 (2^24 + 1 == 2^24 in float); the 64-bit count and double sums do not."""
    n_total = 2 ** 24 + 2 ** 21
    ones = torch.ones(n_total, dtype=torch.float32)
    n, mean, m2 = driver(ones, 16, 1)
    assert (n, mean, m2) == (n_total, 1.0, 0.0)
    x = (torch.randn(n_total, dtype=torch.float64) * 2 + 3).float()
    n, mean, m2 = driver(x, 16, 4)
    n_e, mean_e, m2_e = _exact(x)
    assert n == n_e
    assert abs(mean - mean_e) <= 1e-9 * (2 + 3)
    assert abs(m2 - m2_e) <= 2e-7 * m2_e


@pytest.mark.parametrize("R,T", GEOMETRIES)
@pytest.mark.parametrize("specials,expect_mean", [
    ([float("inf")], float("inf")),
    ([float("-inf"), float("-inf")], float("-inf")),
    ([float("inf"), float("-inf")], float("nan")),
    ([float("nan")], float("nan")),
], ids=["inf", "-inf", "inf-inf", "nan"])
def test_special_values_as_torch(driver, R, T, specials, expect_mean):
    """torch's mean is the sum over the count: an inf gives an inf mean (a running-mean update
    would give inf - inf = NaN), inf and -inf or a NaN give NaN; the variance is NaN."""
    x = torch.randn(5000, dtype=torch.float32) + 2
    for i, v in enumerate(specials):
        x[37 + 1001 * i] = v
    n, mean, m2 = driver(x, R, T)
    t_mean = x.double().mean().item()
    t_var = x.double().var().item()
    assert n == x.numel()
    if expect_mean != expect_mean:
        assert mean != mean and t_mean != t_mean
    else:
        assert mean == expect_mean == t_mean
    assert m2 != m2 and t_var != t_var, "M2 (variance) must be NaN, as torch's"


def test_empty_and_single(driver):
    assert driver(torch.empty(0), 16, 8) == (0, 0.0, 0.0)
    assert driver(torch.tensor([2.5]), 16, 8) == (1, 2.5, 0.0)
