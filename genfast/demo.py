"""``python -m genfast.demo``: train a genfast-converted DCGAN (or VAE, ``--model vae``) on
scikit-learn's 8x8 digits upscaled to 28x28 (shipped with scikit-learn: nothing is downloaded),
on the GPU if there is one, else the CPU. Writes a loss curve and a sample grid as PNG and
prints the time per training step of the converted model and of the same model in plain
PyTorch.

Needs the demo extra: pip install 'genfast[demo]' (scikit-learn, matplotlib, tqdm).
Default length: 1200 steps on a GPU, 800 on the CPU (about 0.1 s per step on two idle cores:
recognisable digits after about 1.5 minutes);
an estimate of the duration is printed after the first steps."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import genfast
import genfast.functional as GF
from genfast import models


def load_digits_28(device: torch.device) -> torch.Tensor:
    """(1797, 1, 28, 28) float32 images in [0, 1]."""
    from sklearn.datasets import load_digits

    imgs = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    return F.interpolate(imgs, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1).to(device)


def _plain_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    bce = F.binary_cross_entropy_with_logits
    return bce(real_logits, torch.ones_like(real_logits)) + bce(fake_logits, torch.zeros_like(fake_logits))


def _plain_g_loss(fake_logits: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def _plain_vae_loss(recon: Tensor, target: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    rec = F.binary_cross_entropy_with_logits(recon, target, reduction="sum")
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return (rec + kl) / target.shape[0]


class GANTrainer:
    """Adam, one D step and one G step per batch; `plain` uses the PyTorch loss formulas."""

    def __init__(self, G: nn.Module, D: nn.Module, nz: int, lr: float = 2e-4, plain: bool = False) -> None:
        self.G, self.D, self.nz = G, D, nz
        self.d_loss: Callable[[Tensor, Tensor], Tensor] = (
            _plain_d_loss if plain else (lambda r, f: GF.discriminator_loss(r, f, kind="bce")))
        self.g_loss: Callable[[Tensor], Tensor] = (
            _plain_g_loss if plain else (lambda f: GF.generator_loss(f, kind="bce")))
        self.opt_g = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(D.parameters(), lr=lr, betas=(0.5, 0.999))

    def step(self, real: Tensor, z: Tensor | None = None) -> tuple[Tensor, ...]:
        """One discriminator step and one generator step on `real` (noise `z`, drawn when None);
        returns (d_loss, g_loss)."""
        if z is None:
            z = torch.randn(real.shape[0], self.nz, device=real.device)
        fake = self.G(z)
        self.opt_d.zero_grad(set_to_none=True)
        d_loss = self.d_loss(self.D(real), self.D(fake.detach()))
        d_loss.backward()
        self.opt_d.step()
        self.opt_g.zero_grad(set_to_none=True)
        g_loss = self.g_loss(self.D(fake))
        g_loss.backward()
        self.opt_g.step()
        return d_loss.detach(), g_loss.detach()

    def sample(self, n: int, device: torch.device) -> Tensor:
        self.G.eval()
        with torch.no_grad():
            out = self.G(torch.randn(n, self.nz, device=device))
        self.G.train()
        return (out + 1) / 2


class VAETrainer:
    def __init__(self, vae: nn.Module, lr: float = 1e-3, plain: bool = False) -> None:
        self.vae = vae
        self.z_dim = int(getattr(vae, "fc_mu").out_features)
        self.opt = torch.optim.Adam(vae.parameters(), lr=lr)
        self.loss: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] = _plain_vae_loss if plain else (
            lambda r, x, mu, lv: GF.vae_loss(r, x, mu, lv, recon_loss="bce_logits", reduction="batchmean"))

    def step(self, real: Tensor) -> tuple[Tensor, ...]:
        self.opt.zero_grad(set_to_none=True)
        recon, mu, logvar = self.vae(real)
        loss = self.loss(recon, real, mu, logvar)
        loss.backward()
        self.opt.step()
        return (loss.detach(),)

    def sample(self, n: int, device: torch.device) -> Tensor:
        self.vae.eval()
        with torch.no_grad():
            out = torch.sigmoid(getattr(self.vae, "decode")(torch.randn(n, self.z_dim, device=device)))
        self.vae.train()
        return out


def build(kind: str, width: int, device: torch.device, seed: int) -> tuple[nn.Module, ...]:
    torch.manual_seed(seed)
    if kind == "dcgan":
        G = models.KerasDCGANGenerator(nz=64, nc=1, width=width).to(device)
        D = models.KerasDCGANDiscriminator(nc=1).to(device)
        return (G, D)
    return (models.ConvVAE(nc=1, z_dim=16, width=width // 4).to(device),)


Trainer = Union["GANTrainer", "VAETrainer"]


def trainer_for(kind: str, nets: tuple[nn.Module, ...], plain: bool = False) -> Trainer:
    if kind == "dcgan":
        return GANTrainer(nets[0], nets[1], nz=64, plain=plain)
    return VAETrainer(nets[0], plain=plain)


def time_steps(trainer: Trainer, data: Tensor, batch: int, steps: int, device: torch.device) -> float:
    """Seconds per training step (after two warm-up steps)."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    for i in range(steps + 2):
        if i == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        idx = torch.randint(0, data.shape[0], (batch,), generator=gen).to(device)
        trainer.step(data[idx])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def save_plots(losses: list[list[float]], names: list[str], samples: Tensor, out_dir: str,
               kind: str) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for j, name in enumerate(names):
        ax.plot([row[j] for row in losses], label=name, lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"genfast demo: {kind} on 8x8 digits (upscaled to 28x28)")
    ax.legend()
    fig.tight_layout()
    curve = os.path.join(out_dir, f"{kind}_loss.png")
    fig.savefig(curve, dpi=100)
    plt.close(fig)
    n = int(samples.shape[0] ** 0.5)
    grid = samples[: n * n, 0].cpu().reshape(n, n, 28, 28).permute(0, 2, 1, 3).reshape(n * 28, n * 28)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1)
    ax.axis("off")
    ax.set_title(f"{kind} samples")
    fig.tight_layout()
    grid_path = os.path.join(out_dir, f"{kind}_samples.png")
    fig.savefig(grid_path, dpi=100)
    plt.close(fig)
    return curve, grid_path


# Default number of training steps per device type.
# On two idle CPU cores (0.1 s per step at batch 64) 800 steps give recognisable digits in about
# 1.5 minutes; 200 steps give digit-like blobs.
DEFAULT_STEPS = {"cuda": 1200, "cpu": 800}
# The packages of the [demo] extra: import name -> distribution name.
DEMO_PACKAGES = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm"}
# The duration estimate is printed after this many steps (the first two are warm-up).
ESTIMATE_AFTER = 5


def missing_demo_packages() -> list[str]:
    """The distributions of the [demo] extra that are not installed."""
    return [dist for mod, dist in DEMO_PACKAGES.items() if importlib.util.find_spec(mod) is None]


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m genfast.demo``."""
    p = argparse.ArgumentParser(prog="python -m genfast.demo", description=(__doc__ or "").replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["dcgan", "vae"], default="dcgan",
                   help="dcgan: Keras-style DCGAN at 28x28; vae: convolutional VAE (default dcgan)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps (default {DEFAULT_STEPS['cuda']} on cuda, {DEFAULT_STEPS['cpu']} on cpu)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--width", type=int, default=64, help="generator width (default 64)")
    p.add_argument("--timing-steps", type=int, default=10,
                   help="steps timed for each of genfast and plain PyTorch at the end (default 10; 0: skip)")
    p.add_argument("--out", default="demo_out", help="folder for the PNGs (default demo_out)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def main(argv: list[str] | None = None) -> int:
    """Run the demo with command-line arguments ``argv``; returns the exit status."""
    p = parser()
    args = p.parse_args(argv)
    missing = missing_demo_packages()
    if missing:
        print(f"genfast.demo needs {', '.join(missing)}: pip install 'genfast[demo]' "
              f"(or pip install {' '.join(missing)})", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.steps is None:
        args.steps = DEFAULT_STEPS.get(device.type, DEFAULT_STEPS["cpu"])
    if args.steps < 1 or args.batch < 2:
        p.error("--steps must be >= 1 and --batch >= 2")
    os.makedirs(args.out, exist_ok=True)
    data = load_digits_28(device)
    if args.model == "dcgan":
        data = data * 2 - 1  # the generator ends in tanh
    fused = tuple(genfast.convert(m) for m in build(args.model, args.width, device, seed=0))
    print(f"device {device}; {data.shape[0]} images; model {args.model} (converted with genfast.convert)")

    trainer = trainer_for(args.model, fused)
    names = ["D loss", "G loss"] if args.model == "dcgan" else ["loss (per sample)"]
    losses = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    from tqdm import tqdm

    bar = tqdm(range(args.steps), disable=args.no_progress, desc="training", unit="step")
    t0 = time.perf_counter()
    for step in bar:
        if step == 2:
            t0 = time.perf_counter()
        idx = torch.randint(0, data.shape[0], (args.batch,), generator=gen).to(device)
        vals = [float(v) for v in trainer.step(data[idx])]
        losses.append(vals)
        bar.set_postfix({n: f"{v:.3f}" for n, v in zip(names, vals)})
        if step + 1 == ESTIMATE_AFTER and args.steps > ESTIMATE_AFTER:
            per_step = (time.perf_counter() - t0) / (ESTIMATE_AFTER - 2)
            tqdm.write(f"estimated duration: {_duration(per_step * args.steps)} for {args.steps} steps "
                       f"({per_step:.2f} s per step)")
    curve, grid = save_plots(losses, names, trainer.sample(64, device), args.out, args.model)
    print(f"wrote {curve} and {grid}")

    if args.timing_steps > 0:
        t_plain = time_steps(trainer_for(args.model, build(args.model, args.width, device, 0), plain=True),
                             data, args.batch, args.timing_steps, device)
        fresh = tuple(genfast.convert(m) for m in build(args.model, args.width, device, 0))
        t_fused = time_steps(trainer_for(args.model, fresh), data, args.batch, args.timing_steps, device)
        print(f"time per training step (batch {args.batch}): plain PyTorch {t_plain * 1e3:.1f} ms, "
              f"genfast {t_fused * 1e3:.1f} ms ({t_plain / t_fused:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
