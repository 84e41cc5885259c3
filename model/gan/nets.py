"""The conditional GAN's two networks and its loss.

G(z|c), DCGAN-style (Radford et al. 2016): z ~ N(0, I) concatenated with a learned class
embedding, a linear layer to a 4x4 feature map, then per level nearest 2x upsampling + 3x3 conv +
BatchNorm + ReLU up to the resolution, and a 3x3 conv + tanh to RGB in [-1, 1]. Upsampling then
convolving, rather than a strided transposed conv, avoids the checkerboard pattern a transposed
conv stamps on texture (Odena et al. 2016), and tissue is all texture. G's convs pad by
reflection: zero padding left a bright frame round every image.

D(x|c), the projection discriminator (Miyato & Koyama 2018, eq. 3):
    f(x, y) = psi(phi(x)) + embed(y)^T phi(x)
phi is SNGAN's standard CNN (Miyato et al. 2018, table 3b: 3x3 stride-1 and 4x4 stride-2 convs,
leaky ReLU 0.1) ending, as their ResNet D does, in a sum over positions; psi is a linear layer,
embed one vector per class.
Every layer of D has spectral norm (Miyato et al. 2018), so D is 1-Lipschitz per layer.

Hinge loss (Lim & Ye 2017; Miyato et al. 2018, eq. 16 and 17):
    L_D = E_real[max(0, 1 - D(x, y))] + E_fake[max(0, 1 + D(G(z, c), c))]
    L_G = -E_fake[D(G(z, c), c)]
and G's mode-seeking term (Mao et al. 2019, eq. 3), against one image per class whatever z:
    L_ms = 1 / (mean|G(z1, c) - G(z2, c)| / mean|z1 - z2| + eps)
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm


def levels_for(resolution):
    """Number of 2x up (G) / down (D) levels between 4x4 and `resolution`; None if it is not 4 * 2^k."""
    k = round(math.log2(max(resolution, 1) / 4))
    return k if k >= 1 and 4 * 2 ** k == resolution else None


def _levels(resolution):
    levels = levels_for(resolution)
    if levels is None:
        raise ValueError(f"resolution {resolution}: must be 4 times a power of 2, at least 8")
    return levels


class Generator(nn.Module):
    """(B, z_dim) noise and (B,) class indices -> (B, 3, resolution, resolution) in [-1, 1].
    Widths halve per level from channels * 2^levels at 4x4 to `channels` at full resolution."""

    def __init__(self, num_classes, z_dim=128, embed_dim=128, channels=32, resolution=32):
        super().__init__()
        levels = _levels(resolution)
        widths = [channels * 2 ** (levels - i) for i in range(levels + 1)]
        self.z_dim, self.resolution, self.top = z_dim, resolution, widths[0]
        self.embed = nn.Embedding(num_classes, embed_dim)
        self.fc = nn.Linear(z_dim + embed_dim, widths[0] * 16)
        self.bn0 = nn.BatchNorm2d(widths[0])
        self.ups = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                          nn.Conv2d(w_in, w_out, 3, padding=1, padding_mode="reflect"),
                          nn.BatchNorm2d(w_out), nn.ReLU())
            for w_in, w_out in zip(widths, widths[1:]))
        self.to_rgb = nn.Conv2d(widths[-1], 3, 3, padding=1, padding_mode="reflect")

    def forward(self, z, y):
        h = self.fc(torch.cat([z, self.embed(y)], dim=1))         # (B, C0 * 16)
        h = F.relu(self.bn0(h.view(len(z), self.top, 4, 4)))       # (B, C0, 4, 4)
        for up in self.ups:
            h = up(h)                                              # (B, C/2, 2H, 2W)
        return torch.tanh(self.to_rgb(h))                          # (B, 3, R, R)


class Discriminator(nn.Module):
    """(B, 3, R, R) images in [-1, 1] and (B,) class indices -> (B,) scores f(x, y). Widths
    double per level from `channels` at full resolution."""

    def __init__(self, num_classes, channels=64, resolution=32):
        super().__init__()
        levels = _levels(resolution)
        widths = [channels * 2 ** i for i in range(levels + 1)]
        layers = [spectral_norm(nn.Conv2d(3, widths[0], 3, padding=1))]
        for w_in, w_out in zip(widths, widths[1:]):
            layers += [spectral_norm(nn.Conv2d(w_in, w_in, 4, stride=2, padding=1)),   # 2x down
                       spectral_norm(nn.Conv2d(w_in, w_out, 3, padding=1))]
        self.convs = nn.ModuleList(layers)
        self.psi = spectral_norm(nn.Linear(widths[-1], 1))
        self.embed = spectral_norm(nn.Embedding(num_classes, widths[-1]))

    def features(self, x):
        """phi(x): (B, 3, R, R) -> (B, C), the leaky-ReLU features summed over the 4x4 positions."""
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)                         # (B, C, 4, 4) after the last one
        return x.sum(dim=(2, 3))

    def forward(self, x, y):
        phi = self.features(x)                                     # (B, C)
        return self.psi(phi).squeeze(1) + (self.embed(y) * phi).sum(dim=1)   # (B,)


def hinge_d_loss(d_real, d_fake):
    """L_D of the hinge loss: real scores are pushed above +1, fake ones below -1 (eq. 16)."""
    return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()


def hinge_g_loss(d_fake):
    """L_G of the hinge loss: raise D's score of the generated images (eq. 17)."""
    return -d_fake.mean()


def mode_seeking_loss(fake, z, eps=1e-5):
    """Mao et al. 2019 (MSGAN), eq. 3: the images of two noises for the same class should differ
    in proportion to the noises, d_I(G(z1, c), G(z2, c)) / d_z(z1, z2) large. fake (2P, 3, R, R)
    and z (2P, z_dim) hold the pairs as first half / second half; returns 1 / (ratio + eps), the
    term G minimises (their code's form)."""
    p = len(z) // 2
    ratio = (fake[:p] - fake[p:2 * p]).abs().mean() / (z[:p] - z[p:2 * p]).abs().mean()
    return 1 / (ratio + eps)
