"""The discriminator and MLP halves: Conv2d / Linear (-> BatchNorm) -> activation, training
forward+backward, per layer of the seed models.

Cases: the DCGAN 64x64 discriminator at batch 128 (Conv2d 3->64 k4 s2 -> LeakyReLU(0.2), then
three Conv2d k4 s2 -> BatchNorm2d -> LeakyReLU(0.2) blocks), the Keras-style 28x28 one (k5 s2
p2), and the MLP GAN (Linear -> BatchNorm1d -> LeakyReLU(0.2) generator blocks, Linear ->
LeakyReLU(0.2) discriminator layers), each with the seed model's activation module (in place in
the DCGAN and MLP GAN, out of place LeakyReLU(0.3) in the Keras one). Each case is an
nn.Sequential of torch's modules:
"eager" runs it, "compile" runs torch.compile of it, "genfast-<backend>" runs a
genfast.convert copy (same weights) on that backend. FLOPs: 2 * M * K * N per product and pass
(forward+backward: 3 passes). On CPU (quick) the batch is reduced and a subset runs; the
whole converted GAN step of each seed model is in bench_end_to_end."""
from __future__ import annotations

import copy

import torch
from torch import nn

import genfast
from benchmarks import harness
from benchmarks.bench_conv_transpose import _launch_counts

FAMILY = "conv_act"
# (name, C_in, C_out, H_in, kernel, stride, padding, batchnorm)
CONV = [
    ("dcgan D1 3-64 64->32", 3, 64, 64, 4, 2, 1, False),
    ("dcgan D2 64-128 32->16", 64, 128, 32, 4, 2, 1, True),
    ("dcgan D3 128-256 16->8", 128, 256, 16, 4, 2, 1, True),
    ("dcgan D4 256-512 8->4", 256, 512, 8, 4, 2, 1, True),
    ("keras D1 1-64 28->14", 1, 64, 28, 5, 2, 2, False),
    ("keras D2 64-128 14->7", 64, 128, 14, 5, 2, 2, True),
]
# (name, in_features, out_features, batchnorm)
LINEAR = [
    ("mlp G1 100-256", 100, 256, True),
    ("mlp G2 256-512", 256, 512, True),
    ("mlp G3 512-1024", 512, 1024, True),
    ("mlp D1 784-512", 784, 512, False),
    ("mlp D2 512-256", 512, 256, False),
]
QUICK_CPU = ("dcgan D2 64-128 32->16", "keras D2 64-128 14->7", "mlp G3 512-1024", "mlp D1 784-512")


def _layer(name: str, product: nn.Module, channels: int, bn: bool, conv: bool) -> nn.Sequential:
    mods = [product]
    if bn:
        mods.append(nn.BatchNorm2d(channels) if conv else nn.BatchNorm1d(channels))
    # the seed models' activation: LeakyReLU(0.2, inplace=True) in the DCGAN and MLP GAN,
    # LeakyReLU(0.3) (out of place) in the Keras-style discriminator
    mods.append(nn.LeakyReLU(0.3) if name.startswith("keras") else nn.LeakyReLU(0.2, inplace=True))
    return nn.Sequential(*mods)


def _cases(device, quick):
    on_gpu = device.type == "cuda"
    for name, cin, cout, hin, k, s, p, bn in CONV:
        if quick and not on_gpu and name not in QUICK_CPU:
            continue
        batch = 128 if on_gpu else (16 if quick else 64)
        hout = (hin + 2 * p - k) // s + 1
        seq = _layer(name, nn.Conv2d(cin, cout, k, s, p, bias=not bn), cout, bn, True)
        yield (name, seq, (batch, cin, hin, hin), 2 * batch * hout * hout * cout * cin * k * k, True)
    for name, fin, fout, bn in LINEAR:
        if quick and not on_gpu and name not in QUICK_CPU:
            continue
        batch = 128 if on_gpu else 64
        seq = _layer(name, nn.Linear(fin, fout), fout, bn, False)
        yield (name, seq, (batch, fin), 2 * batch * fin * fout, False)


def run(device: torch.device, quick: bool) -> list[dict]:
    on_gpu = device.type == "cuda"
    dtypes = [torch.float32, torch.bfloat16] if on_gpu else [torch.float32]
    prev = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    try:
        for name, seq, xshape, flops1, conv in _cases(device, quick):
            for dtype in dtypes:
                layouts = ["nchw", "nhwc"] if (conv and on_gpu) else ["nchw"]
                for layout in layouts:
                    unfused = copy.deepcopy(seq).to(device=device, dtype=dtype)
                    fused = genfast.convert(copy.deepcopy(unfused))
                    x = torch.randn(*xshape, device=device, dtype=dtype)
                    if layout == "nhwc":
                        x = x.to(memory_format=torch.channels_last)
                        unfused.to(memory_format=torch.channels_last)
                        fused.to(memory_format=torch.channels_last)
                    with torch.no_grad():
                        dy = torch.randn_like(unfused(x))
                        # LeakyReLU's input: the float64 layer without it, training mode
                        pre = copy.deepcopy(unfused[:-1]).double()(x.double())
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
                        variants[f"genfast-{be}"] = lambda be=be: step(fused, fused[0].weight, be)
                    kind = "+BN" if len(seq) == 3 else ""
                    prod = "conv" if conv else "linear"
                    case = (f"{prod}{kind}+LeakyReLU fwd_bwd {name} b{xshape[0]} "
                            f"{str(dtype).replace('torch.', '')} {layout}")
                    rows.append(harness.measure(FAMILY, case, variants, flops=3 * flops1,
                                                device=device,
                                                launches=_launch_counts(device, variants)))
                    harness.print_row(rows[-1])
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32) = prev
    return rows
