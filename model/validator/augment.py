"""Histology augmentation for the validator's training, batched on float images (B, 3, S, S) in
[0, 1]. Per-image parameters come from a CPU generator (`rng`), so a run draws the same
augmentations on any device and resumes exactly.
"""
import math

import torch
import torch.nn.functional as F

# Optical densities of haematoxylin, eosin and DAB (Ruifrok & Johnston 2001; skimage's rgb2hed).
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
LOG_EPS = math.log(1e-6)


def _uniform(rng, n, lo, hi, device):
    return (lo + (hi - lo) * torch.rand(n, generator=rng)).to(device)


def flip_rotate(x, rng):
    """One of the 8 symmetries of the square per image."""
    quarter_turns = torch.randint(0, 4, (len(x),), generator=rng)
    out = x.clone()
    for turns in (1, 2, 3):
        mask = (quarter_turns == turns).to(x.device)
        out[mask] = torch.rot90(x[mask], turns, dims=(2, 3))
    flip = (torch.rand(len(x), generator=rng) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def zoom_crop(x, min_area, rng):
    """Random square crop of area fraction in [min_area, 1], resized back to S x S."""
    side = _uniform(rng, len(x), min_area, 1.0, x.device).sqrt()
    theta = torch.zeros(len(x), 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = side
    # Shifts keep the crop inside the image: grid coordinates stay in [-1, 1].
    theta[:, 0, 2] = (1 - side) * _uniform(rng, len(x), -1.0, 1.0, x.device)
    theta[:, 1, 2] = (1 - side) * _uniform(rng, len(x), -1.0, 1.0, x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def rgb_to_hed(x):
    """(B, 3, H, W) RGB in [0, 1] -> stain concentrations (B, 3, H, W), skimage's scaling."""
    od = torch.log(x.clamp_min(1e-6)) / LOG_EPS
    return torch.einsum("bchw,cd->bdhw", od, HED_FROM_RGB.to(x.device))


def hed_to_rgb(s):
    return torch.exp(torch.einsum("bdhw,dc->bchw", s, RGB_FROM_HED.to(s.device)) * LOG_EPS).clamp(0, 1)


def hed_jitter(x, sigma, rng):
    """Stain variation between labs (Tellez et al. 2018): each stain s -> s * a + b, a ~ U(1 +- sigma),
    b ~ U(+- sigma), per image."""
    a = _uniform(rng, len(x) * 3, 1 - sigma, 1 + sigma, x.device).view(-1, 3, 1, 1)
    b = _uniform(rng, len(x) * 3, -sigma, sigma, x.device).view(-1, 3, 1, 1)
    return hed_to_rgb(rgb_to_hed(x) * a + b)


def brightness_contrast(x, brightness, contrast, rng):
    x = x * _uniform(rng, len(x), 1 - brightness, 1 + brightness, x.device).view(-1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _uniform(rng, len(x), 1 - contrast, 1 + contrast, x.device).view(-1, 1, 1, 1) + mean


def augment(x, recipe, rng):
    if recipe.flip_rotate:
        x = flip_rotate(x, rng)
    if recipe.zoom < 1:
        x = zoom_crop(x, recipe.zoom, rng)
    if recipe.hed_jitter > 0:
        x = hed_jitter(x, recipe.hed_jitter, rng)
    if recipe.brightness > 0 or recipe.contrast > 0:
        x = brightness_contrast(x, recipe.brightness, recipe.contrast, rng)
    return x.clamp(0, 1)


def mixup(x, probability, rng):
    """Mixup (Zhang et al. 2018) of a share `probability` of the batches: x -> lam x + (1 - lam)
    x[partner], lam ~ U(0, 1), trained on both labels in that proportion. -> (x, partner, lam)."""
    if probability <= 0 or torch.rand(1, generator=rng).item() >= probability:
        return x, None, 1.0
    lam = torch.rand(1, generator=rng).item()
    partner = torch.randperm(len(x), generator=rng).to(x.device)
    return lam * x + (1 - lam) * x[partner], partner, lam
