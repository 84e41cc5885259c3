"""Latent cache: every training image goes through the VAE encoder once, so a LoRA step costs only
the UNet (the generator is trained without augmentation, so the latents never change).

A cache is a folder `latents-<key>/` beside the run's outputs:
  latents.npy  (N, 4, h, w) float32, VAE posterior mean * vae_scale; read memory-mapped, so a set
               bigger than RAM (PathMNIST-224 at 256 px: 89,996 x 4 x 32 x 32 floats) still works
  labels.npy   (N,) int64
  info.json    classes, data source and fingerprint; written last, so a folder without it is an
               interrupted build and is rebuilt
The key hashes everything the latents depend on (model, data file, few-shot subset, resolution),
so a rerun reuses the cache and a changed setting builds a new one. `prepare_latents` is the LoRA
loop's entry (rank 0 builds, torchrun's other ranks wait); model/lora/prior.py builds one of the
prior images the same way.
"""
import hashlib
import json
import os
import shutil
import time

import numpy as np
import torch
from tqdm import tqdm

from model.data import load_split, to_model_size
from model.io import UserError, atomic_write, write_json
from model.training import autocast, is_main, share_from_main


def cache_folder(out_dir, prefix="latents", **depends_on):
    """out_dir/<prefix>-<key>: key hashes `depends_on`, so other settings get another folder."""
    key = hashlib.md5(json.dumps(depends_on, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(out_dir, f"{prefix}-{key}")


def is_complete(folder):
    return os.path.isfile(os.path.join(folder, "info.json"))


@torch.no_grad()
def build_cache(folder, data, vae, vae_scale, resolution, batch_size=32, show_progress=True):
    """Encode `data` (an ImageSet, uint8 (N, 3, S, S)) at `resolution` px into `folder`.

    We cache the posterior mean rather than a sample: SD's VAE posterior std is small next to
    the spread of the latents, and a deterministic cache makes runs and resumes reproducible.
    """
    if is_complete(folder):
        return
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    n = len(data)
    if n == 0:
        raise UserError(f"{data.source}: the training split has no images")
    device, dtype = vae.device, vae.dtype

    def encode(i):
        x = data.images[i:i + batch_size].float()                   # (b, 3, S, S) in [0, 255]
        x = to_model_size(x, resolution) / 127.5 - 1.0               # (b, 3, R, R) in [-1, 1]
        mean, _ = vae.encode(x.to(device, dtype))                    # (b, C, R/f, R/f)
        return (mean.float() * vae_scale).cpu().numpy()

    first = encode(0)
    path = os.path.join(folder, "latents.npy")
    # Fill a memory-mapped temp file chunk by chunk, then rename: never the whole set in RAM.
    tmp = path + ".part"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, *first.shape[1:]))
    out[:len(first)] = first
    starts = range(batch_size, n, batch_size)
    for i in tqdm(starts, desc="caching latents", disable=not show_progress or len(starts) < 2):
        out[i:i + batch_size] = encode(i)
    if not np.isfinite(out).all():
        raise UserError("the VAE produced non-finite latents (try --mixed-precision no)")
    out.flush()
    del out
    os.replace(tmp, path)
    atomic_write(os.path.join(folder, "labels.npy"), lambda f: np.save(f, data.labels.numpy()))
    write_json(os.path.join(folder, "info.json"), {
        "classes": list(data.classes), "source": data.source, "fingerprint": data.fingerprint,
        "resolution": resolution, "image_size": data.images.shape[-1], "count": n,
        "latent_shape": list(first.shape[1:])})


def prepare_latents(recipe, out_dir, pipe, device, precision):
    """`recipe`'s training latents, labels and info: rank 0 loads the data and fills the cache;
    the other ranks wait for it on the file system, not in a collective: NCCL gives up after 10
    minutes, and encoding PathMNIST-224 on one small GPU can take longer. The VAE runs under the
    training autocast (fast on GPUs)."""
    data = load_split(recipe.data, "train", few_shot=recipe.few_shot, seed=recipe.seed) if is_main() else None
    folder = share_from_main(cache_folder(
        out_dir, model=recipe.model, data=data.fingerprint, precision=precision, few_shot=recipe.few_shot,
        seed=recipe.seed if recipe.few_shot else None, resolution=recipe.resolution,
        size_path="reflect-pad") if is_main() else None)
    if is_main():
        with autocast(device, precision):
            build_cache(folder, data, pipe.vae, pipe.vae_scale, recipe.resolution)
    while not is_complete(folder):
        time.sleep(2)
    return open_cache(folder)


def open_cache(folder):
    """-> (latents (N, 4, h, w) read-only float32 memmap, labels (N,) int64 array, info dict)."""
    if not is_complete(folder):
        raise UserError(f"{folder}: latent cache is incomplete; delete it and rerun")
    with open(os.path.join(folder, "info.json"), encoding="utf-8") as f:
        info = json.load(f)
    latents = np.load(os.path.join(folder, "latents.npy"), mmap_mode="r")
    labels = np.load(os.path.join(folder, "labels.npy"))
    return latents, labels, info
