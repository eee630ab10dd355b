"""Transposed convolution + bias + activation: forward, and forward+backward.

Cases: the DCGAN 64x64 generator layers at batch 128 (100->512 1x1->4x4 k4 s1 p0; 512->256,
256->128, 128->64 k4 s2 p1; 64->3 32->64 + tanh) and the Keras-style MNIST generator layers
(k5 s2 p2 output_padding 1, 7->14->28), float32 (TF32 off for every variant, so float32 rows
compare float32 arithmetic) and bfloat16, NCHW and channels_last. Baselines: eager PyTorch (cudnn.benchmark=True) and
torch.compile of the same function. The DCGAN block ConvTranspose2d -> BatchNorm2d -> ReLU
(training, forward+backward) compares gnn.ConvTransposeBNAct2d with the same three baselines.
FLOPs: 2 * N * C_in * H_in * W_in * C_out * kH * kW / groups
per pass (forward: 1 pass; forward+backward: 3). On a GPU each row also records the CUDA kernels
one call launches per variant (torch.profiler), the launch budget of DESIGN.md.
On CPU (quick) the batch is reduced and only float32 NCHW runs."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from torch import nn

import genfast
import genfast.functional as GF
import genfast.nn as gnn
from benchmarks import harness

FAMILY = "conv_transpose"
# (name, C_in, C_out, H_in, kernel, stride, padding, output_padding, activation)
DCGAN = [
    ("dcgan1 100-512 1->4", 100, 512, 1, 4, 1, 0, 0, "relu"),
    ("dcgan2 512-256 4->8", 512, 256, 4, 4, 2, 1, 0, "relu"),
    ("dcgan3 256-128 8->16", 256, 128, 8, 4, 2, 1, 0, "relu"),
    ("dcgan4 128-64 16->32", 128, 64, 16, 4, 2, 1, 0, "relu"),
    ("dcgan5 64-3 32->64 tanh", 64, 3, 32, 4, 2, 1, 0, "tanh"),
]
KERAS = [
    ("keras1 128-64 7->14", 128, 64, 7, 5, 2, 2, 1, "leaky_relu"),
    ("keras2 64-1 14->28 tanh", 64, 1, 14, 5, 2, 2, 1, "tanh"),
]
ACT = {"relu": F.relu, "leaky_relu": lambda z: F.leaky_relu(z, 0.2), "tanh": torch.tanh}


def _eager(stride, padding, output_padding, activation):
    act = ACT[activation]

    def fn(x, w, b):
        return act(F.conv_transpose2d(x, w, b, stride, padding, output_padding))
    return fn


def _genfast(backend, stride, padding, output_padding, activation):
    def fn(x, w, b):
        with genfast.backend.use_backend(backend):
            return GF.conv_transpose2d(x, w, b, stride, padding, output_padding,
                                       activation=activation, negative_slope=0.2)
    return fn


def _step(fn, mode, x, w, b, dy):
    if mode == "fwd":
        with torch.no_grad():
            return fn(x, w, b)
    xr = x.detach().requires_grad_()
    y = fn(xr, w, b)
    return (y,) + torch.autograd.grad(y, (xr, w, b), dy)


def cuda_launches(fn) -> int:
    """CUDA kernels launched by one call of fn (after a warm-up call), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _launch_counts(device, variants) -> dict[str, int] | None:
    if device.type != "cuda":
        return None
    return {name: cuda_launches(fn) for name, fn in variants.items()}


def run(device: torch.device, quick: bool) -> list[dict]:
    on_gpu = device.type == "cuda"
    batch = 128 if on_gpu else (8 if quick else 32)
    layers = DCGAN + KERAS if on_gpu or not quick else [DCGAN[1], DCGAN[3], KERAS[0]]
    dtypes = [torch.float32, torch.bfloat16] if on_gpu else [torch.float32]
    layouts = ["nchw", "nhwc"] if on_gpu else ["nchw"]
    modes = ["fwd", "fwd_bwd"]
    prev = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    try:
        for name, cin, cout, hin, k, s, p, op, act in layers:
            for dtype in dtypes:
                for layout in layouts:
                    x = torch.randn(batch, cin, hin, hin, device=device, dtype=dtype)
                    if layout == "nhwc":
                        x = x.to(memory_format=torch.channels_last)
                    w = (torch.randn(cin, cout, k, k, device=device) / (cin * k) ** 0.5).to(dtype).requires_grad_()
                    b = torch.randn(cout, device=device, dtype=dtype).requires_grad_()
                    hout = (hin - 1) * s - 2 * p + k + op
                    dy = torch.randn(batch, cout, hout, hout, device=device, dtype=dtype)
                    if layout == "nhwc":
                        dy = dy.to(memory_format=torch.channels_last)
                    if act in ("relu", "leaky_relu"):
                        with torch.no_grad():
                            pre = F.conv_transpose2d(x.double(), w.double(), b.double(), s, p, op)
                        dy = harness.kink_free_grad(dy, pre)
                    flops1 = 2 * batch * cin * hin * hin * cout * k * k
                    eager = _eager(s, p, op, act)
                    fns = {"eager": eager, "compile": harness.compiled(eager)}
                    for be in harness.genfast_backends(device, FAMILY):
                        fns[f"genfast-{be}"] = _genfast(be, s, p, op, act)
                    for mode in modes:
                        variants = {label: (lambda fn=fn, mode=mode: _step(fn, mode, x, w, b, dy))
                                    for label, fn in fns.items()}
                        case = f"{mode} {name} b{batch} {str(dtype).replace('torch.', '')} {layout}"
                        flops = flops1 * (1 if mode == "fwd" else 3)
                        rows.append(harness.measure(FAMILY, case, variants, flops=flops, device=device,
                                                    launches=_launch_counts(device, variants)))
                        harness.print_row(rows[-1])
        rows += _blocks(device, batch, layers, dtypes, layouts)
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32) = prev
    return rows


def _blocks(device, batch, layers, dtypes, layouts):
    """ConvTranspose2d -> BatchNorm2d -> ReLU, training forward+backward."""
    rows = []
    for name, cin, cout, hin, k, s, p, op, act in layers:
        if act != "relu":
            continue
        for dtype in dtypes:
            for layout in layouts:
                block = gnn.ConvTransposeBNAct2d(cin, cout, k, s, p, op, device=device, activation="relu")
                unfused = nn.Sequential(nn.ConvTranspose2d(cin, cout, k, s, p, op), nn.BatchNorm2d(cout),
                                        nn.ReLU()).to(device)
                unfused.load_state_dict(block.state_dict())
                if dtype != torch.float32:
                    block, unfused = block.to(dtype), unfused.to(dtype)
                x = torch.randn(batch, cin, hin, hin, device=device, dtype=dtype)
                if layout == "nhwc":
                    x = x.to(memory_format=torch.channels_last)
                hout = (hin - 1) * s - 2 * p + k + op
                dy = torch.randn(batch, cout, hout, hout, device=device, dtype=dtype)
                with torch.no_grad():  # ReLU's input: the float64 block without it, training mode
                    pre = copy.deepcopy(unfused[:2]).double()(x.double())
                dy = harness.kink_free_grad(dy, pre)
                comp = harness.compiled(unfused)

                def step(mod, weight, backend=None):
                    xr = x.detach().requires_grad_()
                    if backend is None:
                        y = mod(xr)
                    else:
                        with genfast.backend.use_backend(backend):
                            y = mod(xr)
                    return (y,) + torch.autograd.grad(y, (xr, weight), dy)

                variants = {"eager": lambda: step(unfused, unfused[0].weight),
                            "compile": lambda: step(comp, unfused[0].weight)}
                for be in harness.genfast_backends(device, FAMILY):
                    variants[f"genfast-{be}"] = lambda be=be: step(block, block[0].weight, be)
                case = f"block convT+BN+ReLU fwd_bwd {name} b{batch} {str(dtype).replace('torch.', '')} {layout}"
                flops = 3 * 2 * batch * cin * hin * hin * cout * k * k
                rows.append(harness.measure(FAMILY, case, variants, flops=flops, device=device,
                                            launches=_launch_counts(device, variants)))
                harness.print_row(rows[-1])
    return rows
