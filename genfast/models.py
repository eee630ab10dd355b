"""Ready-made GAN and VAE models in plain PyTorch. ``genfast.convert(model)`` turns any of them
into its fused form with the same state_dict; :func:`converted` does both in one call.

DCGAN (Radford et al., 2016) at 64x64; the Keras-tutorial style DCGAN at 28x28 (k5 s2
transposed convolutions); an MLP GAN (Linear + BatchNorm1d + LeakyReLU); a convolutional VAE
(Kingma and Welling, 2014) for 28x28 images; a conditional GAN (Mirza and Osindero, 2014) whose
label embedding is concatenated to the noise."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

import genfast


def dcgan_init(m: nn.Module) -> None:
    """The DCGAN paper's initialisation: N(0, 0.02) convolutions, N(1, 0.02) BatchNorm weights."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    """z (N, nz, 1, 1) or (N, nz) -> image (N, nc, 64, 64) in [-1, 1]."""

    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 3) -> None:
        super().__init__()
        self.nz = nz
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh(),
        )
        self.apply(dcgan_init)

    def forward(self, z: Tensor) -> Tensor:
        return self.main(z.view(z.shape[0], self.nz, 1, 1))


class DCGANDiscriminator(nn.Module):
    """image (N, nc, 64, 64) -> logits (N,)."""

    def __init__(self, ndf: int = 64, nc: int = 3) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 8), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False),
        )
        self.apply(dcgan_init)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x).view(-1)


class KerasDCGANGenerator(nn.Module):
    """The Keras-tutorial generator at 28x28: Dense -> 7x7x256, then k5 transposed convolutions
    (s1 at 7x7, s2 p2 output_padding 1 to 14x14 and 28x28). z (N, nz) -> (N, nc, 28, 28)."""

    def __init__(self, nz: int = 100, nc: int = 1, width: int = 256) -> None:
        super().__init__()
        self.width = width
        self.fc = nn.Sequential(nn.Linear(nz, 7 * 7 * width, bias=False), nn.BatchNorm1d(7 * 7 * width),
                                nn.LeakyReLU(0.3))
        self.main = nn.Sequential(
            nn.ConvTranspose2d(width, width // 2, 5, 1, 2, bias=False), nn.BatchNorm2d(width // 2), nn.LeakyReLU(0.3),
            nn.ConvTranspose2d(width // 2, width // 4, 5, 2, 2, 1, bias=False), nn.BatchNorm2d(width // 4),
            nn.LeakyReLU(0.3),
            nn.ConvTranspose2d(width // 4, nc, 5, 2, 2, 1, bias=False), nn.Tanh(),
        )
        self.apply(dcgan_init)

    def forward(self, z: Tensor) -> Tensor:
        return self.main(self.fc(z).view(z.shape[0], self.width, 7, 7))


class KerasDCGANDiscriminator(nn.Module):
    """(N, nc, 28, 28) -> logits (N,)."""

    def __init__(self, nc: int = 1) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(nc, 64, 5, 2, 2), nn.LeakyReLU(0.3),
            nn.Conv2d(64, 128, 5, 2, 2), nn.BatchNorm2d(128), nn.LeakyReLU(0.3),
            nn.Flatten(), nn.Linear(128 * 7 * 7, 1),
        )
        self.apply(dcgan_init)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x).view(-1)


class MLPGenerator(nn.Module):
    """z (N, nz) -> flat image (N, out_dim) in [-1, 1]."""

    def __init__(self, nz: int = 100, out_dim: int = 784, hidden: tuple[int, ...] = (256, 512, 1024)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = nz
        for h in hidden:
            layers += [nn.Linear(d, h), nn.BatchNorm1d(h), nn.LeakyReLU(0.2, inplace=True)]
            d = h
        layers += [nn.Linear(d, out_dim), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.main(z)


class MLPDiscriminator(nn.Module):
    """flat image (N, in_dim) -> logits (N,)."""

    def __init__(self, in_dim: int = 784, hidden: tuple[int, ...] = (512, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.LeakyReLU(0.2, inplace=True)]
            d = h
        layers += [nn.Linear(d, 1)]
        self.main = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x.flatten(1)).view(-1)


class ConditionalGenerator(nn.Module):
    """(z (N, nz), labels (N,)) -> flat image (N, out_dim): the label's embedding is
    concatenated to the noise, then an MLP generator."""

    def __init__(self, nz: int = 100, num_classes: int = 10, embed_dim: int = 10, out_dim: int = 784) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_classes, embed_dim)
        self.net = MLPGenerator(nz + embed_dim, out_dim)

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        return self.net(torch.cat([z, self.embed(labels)], dim=1))


class ConditionalDiscriminator(nn.Module):
    """(flat image (N, in_dim), labels (N,)) -> logits (N,)."""

    def __init__(self, in_dim: int = 784, num_classes: int = 10, embed_dim: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_classes, embed_dim)
        self.net = MLPDiscriminator(in_dim + embed_dim)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        return self.net(torch.cat([x.flatten(1), self.embed(labels)], dim=1))


class ConvVAE(nn.Module):
    """Convolutional VAE for (N, nc, 28, 28) images in [0, 1].

    forward(x) -> (recon_logits (N, nc, 28, 28), mu (N, z_dim), logvar (N, z_dim)); the decoder
    ends in logits (use the "bce_logits" reconstruction loss) unless ``sigmoid_output``.
    """

    def __init__(self, nc: int = 1, z_dim: int = 20, width: int = 32, sigmoid_output: bool = False) -> None:
        super().__init__()
        self.width = width
        self.enc = nn.Sequential(
            nn.Conv2d(nc, width, 4, 2, 1), nn.BatchNorm2d(width), nn.LeakyReLU(0.2),          # 14x14
            nn.Conv2d(width, width * 2, 4, 2, 1), nn.BatchNorm2d(width * 2), nn.LeakyReLU(0.2),  # 7x7
            nn.Flatten(),
        )
        self.fc_mu = nn.Linear(width * 2 * 49, z_dim)
        self.fc_logvar = nn.Linear(width * 2 * 49, z_dim)
        self.fc_dec = nn.Linear(z_dim, width * 2 * 49)
        dec: list[nn.Module] = [
            nn.ConvTranspose2d(width * 2, width, 4, 2, 1), nn.BatchNorm2d(width), nn.ReLU(True),  # 14x14
            nn.ConvTranspose2d(width, nc, 4, 2, 1),                                                 # 28x28
        ]
        if sigmoid_output:
            dec.append(nn.Sigmoid())
        self.dec = nn.Sequential(*dec)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.enc(x)
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z: Tensor) -> Tensor:
        return self.dec(self.fc_dec(z).view(z.shape[0], self.width * 2, 7, 7))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar


MODELS: dict[str, type[nn.Module]] = {
    "dcgan_generator": DCGANGenerator,
    "dcgan_discriminator": DCGANDiscriminator,
    "keras_dcgan_generator": KerasDCGANGenerator,
    "keras_dcgan_discriminator": KerasDCGANDiscriminator,
    "mlp_generator": MLPGenerator,
    "mlp_discriminator": MLPDiscriminator,
    "conditional_generator": ConditionalGenerator,
    "conditional_discriminator": ConditionalDiscriminator,
    "conv_vae": ConvVAE,
}


def converted(name: str, **kwargs: Any) -> nn.Module:
    """The model ``name`` (a key of MODELS) built in plain PyTorch, then genfast.convert-ed."""
    return genfast.convert(MODELS[name](**kwargs))
