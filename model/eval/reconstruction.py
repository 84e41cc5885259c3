"""Does the VAE keep what the validator looks at? Real images through encode -> decode, judged.

Each real image (N, 3, s, s) is resized to the pipeline's resolution, encoded to its posterior
mean, decoded, and resized back to s; the validator then classifies originals and
reconstructions, and PSNR (peak 1) is measured at s. A VAE fit for latent diffusion loses
little accuracy: whatever it cannot reconstruct, the UNet can never generate.
"""
import numpy as np
import torch

from model.data import ImageSet, resize_images
from model.plots import image_grid
from model.sd.sampling import to_pil
from model.validator.classifier import evaluate_classifier

PAIRS_SHOWN = 16


@torch.no_grad()
def reconstruct(vae, images, resolution, batch=128):
    """uint8 (N, 3, s, s) -> uint8 (N, 3, s, s) after a VAE round trip at `resolution` px."""
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    side, out = images.shape[-1], []
    for lo in range(0, len(images), batch):
        x = resize_images(images[lo:lo + batch].float() / 255, resolution) * 2 - 1   # (B, 3, R, R)
        rec = vae.decode(vae.encode(x.to(device, dtype))[0]).float().cpu()
        rec = resize_images((rec / 2 + 0.5).clamp(0, 1), side)                      # (B, 3, s, s)
        out.append((rec * 255).round().to(torch.uint8))
    return torch.cat(out)


def psnr(a, b):
    """Mean over images of the PSNR (dB, peak 1) between uint8 sets a and b."""
    mse = ((a.float() - b.float()) / 255).pow(2).mean(dim=(1, 2, 3)).clamp(min=1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


def reconstruction_report(vae, resolution, classifier, data):
    """Validator accuracy on `data` (an ImageSet) as it is and after the VAE; PSNR; a PNG of pairs."""
    recon = reconstruct(vae, data.images, resolution)
    before = evaluate_classifier(classifier, data)
    after = evaluate_classifier(classifier, ImageSet(recon, data.labels, data.classes, data.source + " (VAE)",
                                                     data.fingerprint))
    shown = np.linspace(0, len(data) - 1, min(PAIRS_SHOWN, len(data))).round().astype(int)
    pils = to_pil(torch.cat([data.images[shown], recon[shown]]).float() / 255)
    grid = image_grid(pils, len(shown), row_labels=["real", "VAE"], cell=64)
    return {"n": len(data), "accuracy_original": before["accuracy"], "accuracy_reconstructed": after["accuracy"],
            "accuracy_drop": before["accuracy"] - after["accuracy"], "f1_original": before["f1_macro"],
            "f1_reconstructed": after["f1_macro"], "psnr_db": psnr(data.images, recon)}, grid


def format_reconstruction(r):
    return (f"VAE round trip on {r['n']} real images: validator accuracy {r['accuracy_original']:.3f} -> "
            f"{r['accuracy_reconstructed']:.3f} (drop {r['accuracy_drop']:+.3f}), macro F1 "
            f"{r['f1_original']:.3f} -> {r['f1_reconstructed']:.3f}, PSNR {r['psnr_db']:.2f} dB")
