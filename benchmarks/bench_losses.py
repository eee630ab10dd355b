"""GAN and VAE losses: forward + backward of one training step's losses.

GAN: discriminator BCE loss on real and fake logits + non-saturating generator loss, and the
gradients w.r.t. the logits (what D's and G's backward start from), at batch 64, 128, 1024, 4096 and
patch-GAN logits 128x1x30x30. VAE: BCE-on-probabilities (MNIST 128x784, z=20) and MSE
(64x3x64x64 images, z=128) reconstruction + KL, summed, with gradients w.r.t. recon, mu, logvar.
Latency-bound at these sizes: the numbers that matter are microseconds and kernel launches per
call (counted with the CUDA profiler on a GPU)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import genfast
import genfast.functional as GF
from benchmarks import harness

FAMILY = "losses"
GAN_SHAPES = [(64, 1), (128, 1), (1024, 1), (4096, 1), (128, 1, 30, 30)]
VAE_SHAPES = [("mnist bce 128x784 z20", (128, 784), 20, "bce"), ("img mse 64x3x64x64 z128", (64, 3, 64, 64), 128, "mse")]


def _eager_gan(real, fake, fake_g):
    d = (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
         + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
    g = F.binary_cross_entropy_with_logits(fake_g, torch.ones_like(fake_g))
    return d, g


def _genfast_gan(backend):
    def fn(real, fake, fake_g):
        with genfast.backend.use_backend(backend):
            return GF.discriminator_loss(real, fake, "bce"), GF.generator_loss(fake_g, "bce")
    return fn


def _gan_step(fn, real, fake, fake_g):
    """D loss on (real, fake) and G loss on fake_g (the generator step's own D output), and the
    gradients w.r.t. all three logit tensors, in one backward."""
    ins = [t.detach().requires_grad_() for t in (real, fake, fake_g)]
    d, g = fn(*ins)
    return (d, g) + torch.autograd.grad(d + g, ins)


def _eager_vae(recon_loss):
    def fn(recon, x, mu, lv):
        if recon_loss == "bce":
            rec = F.binary_cross_entropy(recon, x, reduction="sum")
        else:
            rec = F.mse_loss(recon, x, reduction="sum")
        return rec - 0.5 * torch.sum(1 + lv - mu.pow(2) - lv.exp())
    return fn


def _genfast_vae(backend, recon_loss):
    def fn(recon, x, mu, lv):
        with genfast.backend.use_backend(backend):
            return GF.vae_loss(recon, x, mu, lv, recon_loss=recon_loss)
    return fn


def _vae_step(fn, recon, x, mu, lv):
    ins = [t.detach().requires_grad_() for t in (recon, mu, lv)]
    loss = fn(ins[0], x, ins[1], ins[2])
    return (loss,) + torch.autograd.grad(loss, ins)


def count_launches(fn, device):
    """CUDA kernels (and memsets) launched by one call of fn, from the profiler; None on CPU."""
    if device.type != "cuda":
        return None
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _variants(make_eager, make_genfast, step, args, device):
    eager = make_eager()
    fns = {"eager": eager, "compile": harness.compiled(eager)}
    for be in harness.genfast_backends(device, FAMILY):
        fns[f"genfast-{be}"] = make_genfast(be)
    return {name: (lambda fn=fn: step(fn, *args)) for name, fn in fns.items()}


def run(device: torch.device, quick: bool) -> list[dict]:
    rows = []
    for shape in GAN_SHAPES:
        case = f"gan D+G bce fwd+bwd {'x'.join(map(str, shape))}"
        if not harness.should_run(FAMILY, case):
            continue
        real = torch.randn(shape, device=device) * 2
        fake = torch.randn(shape, device=device) * 2
        fake_g = torch.randn(shape, device=device) * 2
        variants = _variants(lambda: _eager_gan, _genfast_gan, _gan_step, (real, fake, fake_g), device)
        launches = {k: count_launches(v, device) for k, v in variants.items()}
        rows.append(harness.measure(FAMILY, case, variants, device=device,
                                    launches=launches if device.type == "cuda" else None))
        harness.print_row(rows[-1])
    for name, shape, z, recon_loss in VAE_SHAPES:
        if not harness.should_run(FAMILY, f"vae {name} fwd+bwd"):
            continue
        n = shape[0]
        recon = torch.rand(shape, device=device).clamp(0.01, 0.99)
        x = torch.rand(shape, device=device)
        mu, lv = torch.randn(n, z, device=device), torch.randn(n, z, device=device) * 0.5
        variants = _variants(lambda rl=recon_loss: _eager_vae(rl), lambda be, rl=recon_loss: _genfast_vae(be, rl),
                             _vae_step, (recon, x, mu, lv), device)
        launches = {k: count_launches(v, device) for k, v in variants.items()}
        # floor: read recon and target, write d recon (the latent part is negligible)
        nbytes = 3 * recon.numel() * recon.element_size()
        rows.append(harness.measure(FAMILY, f"vae {name} fwd+bwd", variants, device=device, bytes_moved=nbytes,
                                    launches=launches if device.type == "cuda" else None))
        harness.print_row(rows[-1])
    return rows
