"""003's imbalanced real set: an .npz whose train split keeps only `n` images of a few classes.

Validation and test splits are left whole, so the scarce classes are still measured on as many
real images as before; only what a model may learn from shrinks.
"""
import numpy as np

from model.data import load_split
from model.io import UserError, atomic_write

IMBALANCED_NPZ = "data.npz"


def write_imbalanced(data, classes, n, seed, path):
    """Write `path`: `data` (an .npz or any spec load_split reads) with `classes` cut to `n` train images
    each, chosen by `seed`. -> {class index: images kept}."""
    splits = {s: load_split(data, s) for s in ("train", "val", "test")}
    train = splits["train"]
    labels = train.labels.numpy()
    rng = np.random.default_rng(seed)
    keep = np.ones(len(labels), dtype=bool)
    for c in classes:
        idx = np.flatnonzero(labels == c)
        if len(idx) < n:
            raise UserError(f"class {c} has {len(idx)} training images, fewer than the {n} to keep")
        keep[idx] = False
        keep[rng.choice(idx, size=n, replace=False)] = True
    arrays = {}
    for split, images in splits.items():
        rows = keep if split == "train" else np.ones(len(images.labels), dtype=bool)
        pixels = images.images.permute(0, 2, 3, 1).numpy()  # uint8 (N, H, W, 3), the npz layout
        arrays[f"{split}_images"] = pixels[rows]
        arrays[f"{split}_labels"] = images.labels.numpy()[rows].reshape(-1, 1)
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
    return {int(c): int((labels[keep] == c).sum()) for c in range(len(train.classes))}
