"""`evaluate.py memorization`: is a kept image a copy of a training image?

Synthetic images are meant to stand in for patients' images, so a kept image that reproduces a
training image is a failure, however good it looks. For every kept image we find its nearest image
in the real training split (all classes) by two distances:

    pixel_rms       RMS over pixels and channels of the difference, values in [0, 1], at 28 x 28 px
    feature_cosine  1 - cos between the validator's penultimate features (what it judges classes by)

A distance alone says little: blank slide-background tiles are nearly identical to one another and
tissue of one class shares its texture. So the same figures are measured for the real TEST images
(unseen real tissue) as the yardstick: a generator that copies no more than unseen tissue resembles
the training set has median(kept) / median(real test) near 1 or above.

Both sides are compared as the generator's output is: a kept image of side S is compared with the
training images resized to S (model/data.py's antialiased resize, as training data is upscaled) and
then, like it, down to 28 px; the yardstick's test images go the same way. A copy of a training image
that the model makes at S then lands at 0, and the blur of the round trip, which brings every image
closer to its neighbours, is on both sides of the ratio alike.

A near-copy is a kept image closer than COPY_THRESHOLD in pixel RMS to some training image. The
default lies well below the nearest distance that unseen real tissue shows (two blank background
tiles are the closest real pairs) and well above what a lossless copy, or one resized as above,
gives: it counts copies, not look-alikes. A copy resampled by another filter or passed through a VAE
can land above it; closest_pairs.png puts the closest pairs in front of a person.
"""
import os
from collections import Counter

import numpy as np
import torch

from model.data import read_image, resize_uint8
from model.io import UserError, save_png, write_csv, write_json
from model.plots import image_grid

COPY_THRESHOLD = 0.002
PIXEL_SIZE = 28     # PathMNIST's own size: finer detail than this is not in the training images
CLOSEST_PAIRS = 16  # pairs in closest_pairs.png
CHUNK = 256         # images per feature batch (at most Classifier.predict_proba's own batch)


def image_features(extract, images):
    """(B, 3, H, W) uint8 -> (B, D) float64, one orientation-free row per image, in chunks."""
    return np.concatenate([extract(images[i:i + CHUNK]) for i in range(0, len(images), CHUNK)])


def seen_at(images, side, extract):
    """uint8 images (N, 3, s, s) as a generator of side `side` would show them: their pixels at
    28 px (N, 3, 28, 28) uint8, and their features (N, D), in chunks (a 512 px copy of PathMNIST's
    90k images would not fit in memory at once)."""
    pixels, feats = [], []
    for i in range(0, len(images), CHUNK):
        x = resize_uint8(images[i:i + CHUNK], side)
        pixels.append(resize_uint8(x, PIXEL_SIZE))
        feats.append(image_features(extract, x))
    return torch.cat(pixels), np.concatenate(feats)


def nearest_pixel(queries, refs, device="cpu", chunk=4096):
    """uint8 (Q, 3, 28, 28) and (N, 3, 28, 28) -> RMS to the nearest ref (Q,) float64, its index (Q,).
    The search uses |q|^2 + |r|^2 - 2 q.r in float32; the winner's distance is then recomputed
    exactly, so an exact copy reports 0, not float32 round-off."""
    q = queries.reshape(len(queries), -1).to(device, torch.float32) / 255   # (Q, D)
    qq = (q * q).sum(1, keepdim=True)
    best = torch.full((len(q),), float("inf"), device=device)
    index = torch.zeros(len(q), dtype=torch.int64, device=device)
    for i in range(0, len(refs), chunk):
        r = refs[i:i + chunk].reshape(-1, q.shape[1]).to(device, torch.float32) / 255  # (C, D)
        d2, j = (qq + (r * r).sum(1) - 2 * q @ r.T).min(1)
        better = d2 < best
        best[better], index[better] = d2[better], j[better] + i
    index = index.cpu()
    diff = queries.reshape(len(queries), -1).double() - refs[index].reshape(len(index), -1).double()
    return (diff / 255).pow(2).mean(1).sqrt().numpy(), index.numpy()


def nearest_feature(queries, refs, chunk=256):
    """(Q, D) and (N, D) features -> 1 - cos to the most similar ref (Q,), its index (Q,)."""
    unit = lambda f: f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    q, r = unit(queries), unit(refs)
    dist, index = [], []
    for i in range(0, len(q), chunk):
        cos = q[i:i + chunk] @ r.T                                     # (chunk, N)
        index.append(cos.argmax(1))
        dist.append(1 - cos.max(1))
    return np.clip(np.concatenate(dist), 0, 2), np.concatenate(index)


def _summary(rms, cos, threshold):
    return {"n": len(rms), "near_copies": int((rms < threshold).sum()),
            "pixel_rms": {"median": float(np.median(rms)), "min": float(rms.min())},
            "feature_cosine": {"median": float(np.median(cos)), "min": float(cos.min())}}


def memorization(run_dir, files, train, test, extract, threshold=COPY_THRESHOLD, device="cpu"):
    """files: [(relative path, class index)] of kept images; train, test: ImageSets of real images.
    Returns (result for memorization.json, one row per kept image for nearest.csv)."""
    if not files:
        raise UserError(f"{run_dir}: no kept images to compare")
    if len(train) == 0 or len(test) == 0:
        raise UserError(f"{train.source}: the train and test splits must both hold images")
    kept = [read_image(os.path.join(run_dir, f)) for f, _ in files]     # (3, H, W) uint8 each
    sides = [max(x.shape[-2:]) for x in kept]
    refs = {s: seen_at(train.images, s, extract) for s in sorted(set(sides))}
    rms, cos = np.zeros(len(kept)), np.zeros(len(kept))
    near, near_feat = np.zeros(len(kept), dtype=np.int64), np.zeros(len(kept), dtype=np.int64)
    for shape in sorted({tuple(x.shape) for x in kept}):
        idx = [i for i, x in enumerate(kept) if tuple(x.shape) == shape]
        images = torch.stack([kept[i] for i in idx])
        ref_pixels, ref_feats = refs[max(shape[1:])]
        rms[idx], near[idx] = nearest_pixel(resize_uint8(images, PIXEL_SIZE), ref_pixels, device)
        cos[idx], near_feat[idx] = nearest_feature(image_features(extract, images), ref_feats)
    # The yardstick at the kept images' usual side: unseen tissue as the generator would show it.
    side = Counter(sides).most_common(1)[0][0]
    test_pixels, test_feats = seen_at(test.images, side, extract)
    test_rms, _ = nearest_pixel(test_pixels, refs[side][0], device)
    test_cos, _ = nearest_feature(test_feats, refs[side][1])
    gen, real = _summary(rms, cos, threshold), _summary(test_rms, test_cos, threshold)
    ratio = {m: gen[m]["median"] / real[m]["median"] if real[m]["median"] > 0 else None
             for m in ("pixel_rms", "feature_cosine")}
    result = {"run": os.path.abspath(run_dir), "data": train.source, "data_fingerprint": train.fingerprint,
              "n_train": len(train), "threshold": threshold, "compared_at_side": sorted(set(sides)),
              "yardstick_side": side, "generated": gen, "real_test": real, "ratio": ratio}
    names = train.classes
    rows = [{"file": f, "class_name": names[k], "nearest_train_index": int(near[i]),
             "nearest_train_class": names[int(train.labels[near[i]])], "pixel_rms": float(rms[i]),
             "feature_cosine": float(cos[i]), "feature_nearest_train_index": int(near_feat[i])}
            for i, (f, k) in enumerate(files)]
    return result, rows


COLUMNS = ["file", "class_name", "nearest_train_index", "nearest_train_class", "pixel_rms",
           "feature_cosine", "feature_nearest_train_index"]


def closest_pairs(run_dir, rows, train, k=CLOSEST_PAIRS, cell=112):
    """The k kept images closest in pixel RMS to a training image, one pair per grid row: the kept
    image as saved, then its nearest training image (both upscaled to `cell` px to be looked at)."""
    from PIL import Image
    pairs = sorted(rows, key=lambda r: r["pixel_rms"])[:k]
    cells, labels = [], []
    for r in pairs:
        with Image.open(os.path.join(run_dir, r["file"])) as im:
            cells.append(im.convert("RGB"))
        real = train.images[r["nearest_train_index"]]                     # (3, S, S) uint8
        cells.append(Image.fromarray(real.permute(1, 2, 0).contiguous().numpy()))
        labels.append(f"rms {r['pixel_rms']:.4f}  {os.path.splitext(os.path.basename(r['file']))[0]}"
                      f"  |  train #{r['nearest_train_index']} {r['nearest_train_class']}")
    return image_grid(cells, 2, labels, cell=cell)


def write_memorization(out_dir, result, rows, run_dir, train):
    """memorization.json, nearest.csv and closest_pairs.png into out_dir, each atomically."""
    write_json(os.path.join(out_dir, "memorization.json"), result)
    write_csv(os.path.join(out_dir, "nearest.csv"), COLUMNS,
              [[f"{r[c]:.6f}" if isinstance(r[c], float) else r[c] for c in COLUMNS] for r in rows])
    save_png(os.path.join(out_dir, "closest_pairs.png"), closest_pairs(run_dir, rows, train))


def format_memorization(result):
    g, t = result["generated"], result["real_test"]
    lines = [f"nearest of {result['n_train']} real training images, for {g['n']} kept images and, as the "
             f"yardstick, {t['n']} real test images",
             f"  {'':<24}  {'kept':>8}  {'real test':>9}  {'ratio':>6}"]
    for m, name in (("pixel_rms", "median pixel RMS (28 px)"), ("feature_cosine", "median feature 1 - cos")):
        ratio = "-" if result["ratio"][m] is None else f"{result['ratio'][m]:.3f}"
        lines.append(f"  {name:<24}  {g[m]['median']:>8.4f}  {t[m]['median']:>9.4f}  {ratio:>6}")
    lines.append(f"  near-copies (pixel RMS < {result['threshold']:g}): {g['near_copies']} of {g['n']} kept, "
                 f"{t['near_copies']} of {t['n']} real test")
    return "\n".join(lines)
