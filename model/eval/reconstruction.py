"""Does the way into the model keep what the validator looks at? Real images, judged three ways.

    as they are   the real images (N, 3, s, s)
    size path     taken to the model's resolution and back (model/data.py: reflect pad and centre
                  crop for a small margin, so this column equals the first; a resize both ways
                  for a large one), with no VAE
    + VAE         the same, with the VAE's round trip (encode to the posterior mean, decode) in
                  between

Every column is rounded to uint8, as a kept image is written. PSNR (peak 1) is measured at s
against the originals. Whatever these columns lose, no generator through this path can bring
back: the third is a ceiling on what any image the model makes can score.
"""
import numpy as np
import torch

from model.data import ImageSet, from_model_size, to_model_size
from model.plots import image_grid
from model.sd.sampling import to_pil
from model.validator.classifier import evaluate_classifier

PAIRS_SHOWN = 16
COLUMNS = ("original", "size_path", "vae")


def _to_uint8(x):
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def round_trip(images, resolution, vae=None, batch=128):
    """uint8 (N, 3, s, s) -> uint8 (N, 3, s, s): to `resolution` px by the size path and back,
    through the VAE in between when one is given."""
    side, out = images.shape[-1], []
    for lo in range(0, len(images), batch):
        x = to_model_size(images[lo:lo + batch].float() / 255, resolution)          # (B, 3, R, R)
        if vae is not None:
            device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
            rec = vae.decode(vae.encode((x * 2 - 1).to(device, dtype))[0]).float().cpu()
            x = rec / 2 + 0.5
        out.append(_to_uint8(from_model_size(x, side)))                              # (B, 3, s, s)
    return torch.cat(out)


def psnr(a, b):
    """Mean over images of the PSNR (dB, peak 1) between uint8 sets a and b (identical: capped at 100)."""
    mse = ((a.float() - b.float()) / 255).pow(2).mean(dim=(1, 2, 3)).clamp(min=1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


def _column(classifier, data, images, suffix):
    report = evaluate_classifier(classifier, ImageSet(images, data.labels, data.classes, data.source + suffix,
                                                      data.fingerprint))
    return {"accuracy": report["accuracy"], "f1_macro": report["f1_macro"], "psnr_db": psnr(data.images, images),
            "recall_per_class": {r["name"]: r["recall"] for r in report["per_class"]}}


def reconstruction_report(vae, resolution, classifier, data):
    """The three columns on `data` (an ImageSet), the drops against the first, and a PNG of
    real / size path / VAE rows."""
    images = {"original": data.images, "size_path": round_trip(data.images, resolution),
              "vae": round_trip(data.images, resolution, vae)}
    columns = {name: _column(classifier, data, images[name], f" ({name})") for name in COLUMNS}
    base = columns["original"]
    drops = {name: {"accuracy": base["accuracy"] - columns[name]["accuracy"],
                    "recall_per_class": {c: _drop(base["recall_per_class"][c], r)
                                         for c, r in columns[name]["recall_per_class"].items()}}
             for name in COLUMNS[1:]}
    shown = np.linspace(0, len(data) - 1, min(PAIRS_SHOWN, len(data))).round().astype(int)
    pils = to_pil(torch.cat([images[name][shown] for name in COLUMNS]).float() / 255)
    grid = image_grid(pils, len(shown), row_labels=["real", "size path", "+ VAE"], cell=64)
    vae_col = columns["vae"]
    return {"n": len(data), "columns": columns, "drops": drops,
            "max_class_recall_drop_vae": max((d for d in drops["vae"]["recall_per_class"].values()
                                              if d is not None), default=None),
            # the headline keys, as before: originals against the full round trip
            "accuracy_original": base["accuracy"], "accuracy_reconstructed": vae_col["accuracy"],
            "accuracy_drop": drops["vae"]["accuracy"], "f1_original": base["f1_macro"],
            "f1_reconstructed": vae_col["f1_macro"], "psnr_db": vae_col["psnr_db"]}, grid


def _drop(before, after):
    return None if before is None or after is None else before - after


def format_reconstruction(r):
    c, d = r["columns"], r["drops"]
    lines = [f"{r['n']} real images, validator accuracy / macro F1 / PSNR:",
             f"  as they are          {c['original']['accuracy']:.3f} / {c['original']['f1_macro']:.3f}",
             f"  size path alone      {c['size_path']['accuracy']:.3f} / {c['size_path']['f1_macro']:.3f} / "
             f"{c['size_path']['psnr_db']:.1f} dB (drop {d['size_path']['accuracy']:+.3f})",
             f"  size path + VAE      {c['vae']['accuracy']:.3f} / {c['vae']['f1_macro']:.3f} / "
             f"{c['vae']['psnr_db']:.1f} dB (drop {d['vae']['accuracy']:+.3f})",
             "  recall per class (as they are -> size path -> + VAE):"]
    for name in c["original"]["recall_per_class"]:
        vals = [c[col]["recall_per_class"][name] for col in COLUMNS]
        lines.append(f"    {name:<32} " + " -> ".join("  -  " if v is None else f"{v:.2f}" for v in vals))
    return "\n".join(lines)
