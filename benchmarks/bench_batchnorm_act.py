"""BatchNorm + LeakyReLU: training forward, training forward+backward, eval forward.

Shapes: the DCGAN discriminator/generator BatchNorm inputs at batch 128 and one large tensor; on
the CPU also channels_last and the (N, C) inputs of BatchNorm1d in an MLP GAN ((256, 1024), and
(2M, 16) for a long reduction over rows).
Bytes counted at the floor: training forward reads x twice and writes y (3 tensor passes);
its backward reads dy and x twice and writes dx (5); eval reads x and writes y (2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import genfast
import genfast.functional as GF
from benchmarks import harness

FAMILY = "batchnorm_act"
GPU_SHAPES = [(128, 64, 32, 32), (128, 128, 16, 16), (128, 256, 8, 8), (128, 512, 4, 4),
              (256, 64, 64, 64)]
PASSES = {"fwd_train": 3, "fwd_bwd_train": 8, "fwd_eval": 2}
ALL_MODES = list(PASSES)
# CPU cases: (shape, layout, modes, in the quick set). Layout "nc" is a 2-D (N, C) input.
CPU_CASES = [
    ((32, 64, 32, 32), "nchw", ALL_MODES, True),
    ((32, 64, 32, 32), "nhwc", ALL_MODES, False),
    ((32, 256, 8, 8), "nchw", ALL_MODES, False),
    ((64, 128, 16, 16), "nchw", ["fwd_eval"], True),
    # 4x4 maps (the DCGAN generator's first and discriminator's last BatchNorm, narrower): short rows
    ((64, 256, 4, 4), "nchw", ["fwd_train", "fwd_bwd_train"], True),
    ((64, 128, 16, 16), "nhwc", ["fwd_eval"], True),
    ((256, 1024), "nc", ALL_MODES, True),
    ((1 << 21, 16), "nc", ["fwd_train", "fwd_eval"], True),
]


def _torch_fwd(x, w, b, rm, rv, training):
    return F.leaky_relu(F.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5), 0.2)


def _genfast_fwd(backend):
    def fwd(x, w, b, rm, rv, training):
        with genfast.backend.use_backend(backend):
            return GF.batch_norm_act(x, rm, rv, w, b, training, 0.1, 1e-5, negative_slope=0.2)
    return fwd


def _step(fwd, mode, x, w, b, rm, rv, dy):
    """One call of `mode` through the forward function `fwd` (autograd for the backward)."""
    if mode == "fwd_bwd_train":
        xr = x.detach().requires_grad_()
        y = fwd(xr, w, b, rm, rv, True)
        return (y,) + torch.autograd.grad(y, (xr, w, b), dy)
    with torch.no_grad():
        return fwd(x, w, b, rm, rv, mode != "fwd_eval")


def _cases(on_gpu: bool, quick: bool):
    """(shape, dtype, layout, modes) of this run."""
    if on_gpu:
        return [(shape, dtype, layout, ALL_MODES) for shape in GPU_SHAPES
                for dtype in (torch.float32, torch.bfloat16) for layout in ("nchw", "nhwc")]
    return [(shape, torch.float32, layout, modes) for shape, layout, modes, in_quick in CPU_CASES
            if in_quick or not quick]


def run(device: torch.device, quick: bool) -> list[dict]:
    rows = []
    for shape, dtype, layout, modes in _cases(device.type == "cuda", quick):
        x = torch.randn(shape, device=device, dtype=dtype)
        if layout == "nhwc":
            x = x.to(memory_format=torch.channels_last)
        C = shape[1]
        w = (torch.rand(C, device=device) + 0.5).requires_grad_()
        b = torch.randn(C, device=device).requires_grad_()
        with torch.no_grad():  # LeakyReLU's input in float64, training mode
            pre = F.batch_norm(x.double(), None, None, w.double(), b.double(), True, 0.1, 1e-5)
        dy = harness.kink_free_grad(torch.randn_like(x), pre)
        for mode in modes:
            bufs = {}

            def stats(key):
                if key not in bufs:
                    bufs[key] = (torch.zeros(C, device=device), torch.ones(C, device=device))
                return bufs[key]

            fwds = {"eager": _torch_fwd, "compile": harness.compiled(_torch_fwd)}
            for be in harness.genfast_backends(device, FAMILY):
                fwds[f"genfast-{be}"] = _genfast_fwd(be)
            variants = {
                name: (lambda fwd=fwd, name=name, mode=mode:
                       _step(fwd, mode, x, w, b, *stats(name), dy))
                for name, fwd in fwds.items()
            }
            case = (f"{mode} {'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')} "
                    f"{layout}")
            nbytes = PASSES[mode] * x.numel() * x.element_size()
            rows.append(harness.measure(FAMILY, case, variants, bytes_moved=nbytes, device=device))
            harness.print_row(rows[-1])
    return rows
