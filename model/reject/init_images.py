"""Real images to start image-to-image candidates from (`sample_validated.py --init-images D`).

Seed 003 guides SD with real few-shot samples; SDEdit (Meng et al. 2022) is the simplest way: noise
a real image of the class part of the way and let the class prompt denoise it. D is an .npz (its
train split: never the images evaluation tests on) or a folder with one sub-folder of images per
class. A candidate's init image is chosen from its seed alone (seed mod the class's count), so the
loop's reproducibility contract holds: an image is a function of (class, seed, settings).
"""
import os

import torch

from model.data import class_folders, file_md5, list_images, load_split, read_image, resize_images, to_model_size
from model.io import UserError
from model.sd.sampling import encode_images


class InitImages:
    """{class index: uint8 images (N_c, 3, S, S)} and their names, for the classes of a run."""

    def __init__(self, source, class_names, wanted):
        self.source = os.path.abspath(source)
        self.by_class, self.names = (_from_npz if os.path.isfile(source) else _from_folder)(source, class_names)
        empty = [class_names[c] for c in wanted if not len(self.by_class.get(c, []))]
        if empty:
            raise UserError(f"--init-images {source}: no images of class {', '.join(empty)}")

    def fingerprint(self):
        """What run.json records: the file's md5, or the folder's file names and sizes."""
        if os.path.isfile(self.source):
            return file_md5(self.source)
        return {c: names for c, names in sorted(self.names.items())}

    def pick(self, class_index, seed):
        """(uint8 image (3, S, S), its name for the manifest) chosen by the candidate's seed."""
        images = self.by_class[class_index]
        k = seed % len(images)
        return images[k], self.names[class_index][k]

    def latents(self, pipe, classes, seeds, height, width):
        """-> ((B, 4, h, w) scaled latents of each candidate's init image, [B names])."""
        picked = [self.pick(c, s) for c, s in zip(classes, seeds)]
        x = torch.stack([im for im, _ in picked]).float() / 255    # (B, 3, S, S)
        if x.shape[-2:] != (height, width):
            if height != width:
                raise UserError(f"--init-images: square images cannot start a {height}x{width} run")
            x = to_model_size(x, height)                            # (B, 3, H, W): the size path
        return encode_images(pipe, x), [name for _, name in picked]


def _from_npz(path, class_names):
    data = load_split(path, "train")
    if list(data.classes) != list(class_names):
        raise UserError(f"--init-images {path}: classes {list(data.classes)} differ from the validator's")
    by_class, names = {}, {}
    for c in range(len(class_names)):
        idx = (data.labels == c).nonzero().flatten()
        by_class[c] = data.images[idx].contiguous()
        names[c] = [f"train:{int(i)}" for i in idx]
    return by_class, names


def _from_folder(path, class_names):
    if not os.path.isdir(path):
        raise UserError(f"--init-images {path}: no such file or folder")
    by_class, names = {}, {}
    for sub, name in class_folders(path).items():
        if name not in class_names:
            raise UserError(f"--init-images {path}: folder '{sub}' is not one of the validator's classes")
        c = class_names.index(name)
        files = list_images(os.path.join(path, sub))
        by_class[c] = _same_size([read_image(os.path.join(path, sub, f), square=True) for f in files])
        names[c] = [f"{sub}/{f}" for f in files]
    return by_class, names


def _same_size(images):
    """One stack of the class's images at the smallest side among them."""
    if not images:
        return torch.empty(0, 3, 1, 1, dtype=torch.uint8)
    side = min(im.shape[-1] for im in images)
    return torch.stack([resize_images(im[None].float(), side)[0].round().clamp(0, 255).to(torch.uint8)
                        if im.shape[-1] != side else im for im in images])
