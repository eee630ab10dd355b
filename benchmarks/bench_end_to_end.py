"""Whole training steps: one GAN step (D step + G step, Adam) and one VAE step, in plain
PyTorch eager, torch.compile, genfast-converted, and converted + compiled. Time per step and,
on a GPU, peak memory of one step.

GAN steps of every seed GAN: the DCGAN 64x64 (GPU: batch 64 and 128) or the 28x28 Keras-style
DCGAN (width 64; CPU: batch 64), the MLP GAN and the conditional (label-embedding) MLP GAN
(batch 128 on a GPU, 64 on the CPU); the convolutional VAE at batch 128 (GPU) or 64 (CPU). On the
CPU also sampling: the Keras-style DCGAN and MLP generators in eval mode under no_grad, batch 1 and
64."""
from __future__ import annotations

import torch
from torch import nn

import genfast
from benchmarks import harness
from genfast import demo, models

FAMILY = "end_to_end"


class _WithLabels(nn.Module):
    """A conditional seed model with the step's class labels bound: forward(x) = net(x, labels),
    so that the conditional GAN trains through the same GANTrainer as the others."""

    def __init__(self, net: nn.Module, labels: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("labels", labels, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, self.labels)


def _gan_factory(name, device, width, batch):
    def make():
        torch.manual_seed(0)
        if name == "dcgan64":
            return models.DCGANGenerator().to(device), models.DCGANDiscriminator().to(device), 100, (3, 64, 64)
        if name == "mlp_gan":
            return models.MLPGenerator().to(device), models.MLPDiscriminator().to(device), 100, (784,)
        if name == "cgan":
            labels = torch.randint(0, 10, (batch,), device=device)
            return (_WithLabels(models.ConditionalGenerator(), labels).to(device),
                    _WithLabels(models.ConditionalDiscriminator(), labels).to(device), 100, (784,))
        return (models.KerasDCGANGenerator(nz=64, nc=1, width=width).to(device),
                models.KerasDCGANDiscriminator(nc=1).to(device), 64, (1, 28, 28))
    return make


def _variants_gan(make, batch, device):
    variants = {}
    _, _, nz, shape = make()
    real = torch.randn((batch,) + shape, device=device).clamp(-1, 1)
    z = torch.randn(batch, nz, device=device)
    for label, convert, compile_ in (("eager", False, False), ("compile", False, True),
                                     ("genfast", True, False), ("genfast+compile", True, True)):
        G, D, _, _ = make()
        if convert:
            genfast.convert(G)
            genfast.convert(D)
        if compile_:
            G, D = torch.compile(G), torch.compile(D)
        t = demo.GANTrainer(G, D, nz, plain=not convert)

        def step(t=t):
            return torch.stack(t.step(real, z))

        variants[label] = step
    return variants


def _variants_sample(make, batch, device):
    """Sampling: the generator in eval mode under no_grad (what a user runs to draw images from a
    trained model), z fixed."""
    variants = {}
    _, _, nz, _ = make()
    z = torch.randn(batch, nz, device=device)
    for label, convert, compile_ in (("eager", False, False), ("compile", False, True),
                                     ("genfast", True, False), ("genfast+compile", True, True)):
        G, _, _, _ = make()
        G.eval()
        if convert:
            genfast.convert(G)
        if compile_:
            G = torch.compile(G)

        def sample(G=G):
            with torch.no_grad():
                return G(z)

        variants[label] = sample
    return variants


def _variants_vae(batch, device):
    # Inductor draws random numbers with its own generator unless told to fall back to
    # torch's: with the fallback every variant samples the same eps and parity is checkable.
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    variants = {}
    x = torch.rand(batch, 1, 28, 28, device=device)
    for label, convert, compile_ in (("eager", False, False), ("compile", False, True),
                                     ("genfast", True, False), ("genfast+compile", True, True)):
        torch.manual_seed(0)
        vae = models.ConvVAE().to(device)
        if convert:
            genfast.convert(vae)
        t = demo.VAETrainer(torch.compile(vae) if compile_ else vae, plain=not convert)

        def step(t=t):
            torch.manual_seed(1)  # the same eps in every variant
            (loss,) = t.step(x)
            return loss

        variants[label] = step
    return variants


def _rounds(device, quick):
    """Rounds of single steps: 3 in a quick GPU run (its time budget); on the CPU 31 (a median of
    3 steps moved 0.82-1.09x between back-to-back runs on the 2-core VM, and one of 15 steps
    0.86x-1.04x for the Keras DCGAN step, two runs minutes apart on the AVX2 host)."""
    if device.type == "cuda":
        return 3 if quick else None
    return 31


def _peak_memory(fn, device):
    if device.type != "cuda":
        return {}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize()
    return {"peak_MiB": (torch.cuda.max_memory_allocated(device) - base) / 2**20}


def run(device: torch.device, quick: bool) -> list[dict]:
    rows = []
    if device.type == "cuda":
        gan_cases = [("dcgan64", 64), ("dcgan64", 128), ("mlp_gan", 128), ("cgan", 128)]
        vae_batches = [128]
    else:
        gan_cases = [("keras_dcgan28", 64), ("mlp_gan", 64), ("cgan", 64)]
        vae_batches = [64]
    for name, batch in gan_cases:
        if not harness.should_run(FAMILY, f"GAN step {name} batch {batch}"):
            continue
        variants = _variants_gan(_gan_factory(name, device, 64, batch), batch, device)
        for fn in variants.values():
            fn()  # compile / warm up before the memory reading
        extra = {k: _peak_memory(fn, device) for k, fn in variants.items()}
        rows.append(harness.measure(FAMILY, f"GAN step {name} batch {batch}", variants, device=device,
                                    extra=extra, rounds=_rounds(device, quick), min_round_ms=1.0))
        harness.print_row(rows[-1])
    # sampling (eval, no_grad) on the CPU: batch 1 (one image: the per-layer call overhead) and 64
    sample_cases = [] if device.type == "cuda" else [("keras_dcgan28", 1), ("keras_dcgan28", 64),
                                                     ("mlp_gan", 1), ("mlp_gan", 64)]
    for name, batch in sample_cases:
        case = f"sample G {name} batch {batch} eval no_grad"
        if not harness.should_run(FAMILY, case):
            continue
        variants = _variants_sample(_gan_factory(name, device, 64, batch), batch, device)
        rows.append(harness.measure(FAMILY, case, variants, device=device, rounds=_rounds(device, quick)))
        harness.print_row(rows[-1])
    for batch in vae_batches:
        if not harness.should_run(FAMILY, f"VAE step conv_vae batch {batch}"):
            continue
        variants = _variants_vae(batch, device)
        for fn in variants.values():
            fn()
        extra = {k: _peak_memory(fn, device) for k, fn in variants.items()}
        rows.append(harness.measure(FAMILY, f"VAE step conv_vae batch {batch}", variants, device=device,
                                    extra=extra, rounds=_rounds(device, quick), min_round_ms=1.0))
        harness.print_row(rows[-1])
    return rows
