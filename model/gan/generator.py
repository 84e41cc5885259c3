"""gan.safetensors: the trained generator as a file any stage can sample from.

The file holds the EMA generator's weights (BatchNorm statistics included) and, in the
safetensors metadata, format "medsynth-gan-v1", the class names, resolution, z_dim, the
Generator's config, the data fingerprint and the steps trained. `is_gan_file` reads the metadata
only, so a caller can tell a GAN from an SD checkpoint without loading either.

Sampling: image i is G(z_i, c_i) with z_i drawn from its own torch.Generator seeded with seeds[i],
and G in eval mode (BatchNorm uses its stored statistics, so no image sees another), so an image
is a function of (class_indices[i], seeds[i]) only, whatever else is in the batch: the property
the reject loop's seeds rely on. (Up to the last float bits: a kernel blocks differently for
another batch size; model.reject.loop makes its batches from the run's state for that reason.)
"""
import json
import os

import torch

from model.gan.nets import Generator
from model.io import UserError, first_line, read_safetensors, save_safetensors

FORMAT = "medsynth-gan-v1"


def save_gan(path, net, config, classes, extra_meta):
    """Write `net` (a Generator built from `config`) and its metadata atomically."""
    meta = {"classes": list(classes), "resolution": config["resolution"], "z_dim": config["z_dim"],
            "config": config, **extra_meta}
    # Every value but the format as JSON, strings too, so that load_gan decodes them all alike.
    meta = {"format": FORMAT, **{k: json.dumps(v) for k, v in meta.items()}}
    save_safetensors(path, net.state_dict(), metadata=meta)


def is_gan_file(path):
    """True iff `path` is a .safetensors file whose metadata says it is a medsynth GAN."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        return False
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # not a safetensors file at all
        return False
    return meta.get("format") == FORMAT


class GAN:
    """A loaded generator: `.classes`, `.resolution`, `.config`, `.meta`, `.sample(...)`."""

    def __init__(self, net, meta):
        self.net = net.eval().requires_grad_(False)
        self.meta = meta
        self.classes = meta["classes"]
        self.resolution = meta["resolution"]
        self.config = meta["config"]

    @property
    def device(self):
        return next(self.net.parameters()).device

    @torch.no_grad()
    def sample(self, class_indices, seeds):
        """One image per (class index, seed): (B, 3, R, R) float32 in [0, 1], on the GAN's device."""
        class_indices, seeds = [int(c) for c in class_indices], [int(s) for s in seeds]
        if len(class_indices) != len(seeds):
            raise UserError(f"need one seed per class index, got {len(seeds)} seeds for "
                            f"{len(class_indices)} class indices")
        bad = [c for c in class_indices if not 0 <= c < len(self.classes)]
        if bad:
            raise UserError(f"class index {bad[0]}: this GAN has classes 0-{len(self.classes) - 1}")
        return sample_images(self.net, class_indices, seeds)


def sample_images(net, class_indices, seeds):
    """G(z_i, c_i) with z_i ~ N(0, I) from torch.Generator().manual_seed(seeds[i]); net in eval
    mode -> (B, 3, R, R) float32 in [0, 1]."""
    device = next(net.parameters()).device
    if not len(seeds):
        return torch.zeros(0, 3, net.resolution, net.resolution, device=device)
    z = torch.stack([torch.randn(net.z_dim, generator=torch.Generator().manual_seed(s)) for s in seeds])
    y = torch.tensor(class_indices, dtype=torch.long)
    x = net(z.to(device), y.to(device))                            # (B, 3, R, R) in [-1, 1]
    return (x.float() / 2 + 0.5).clamp(0, 1)


def load_gan(path, device="cpu"):
    """The generator in a gan.safetensors file, ready to sample; UserError if it is not one."""
    tensors, meta = read_safetensors(path)
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: not a medsynth GAN file (no format {FORMAT!r} in its metadata); "
                        f"train one with train_gan.py")
    try:
        meta = {k: json.loads(v) if k != "format" else v for k, v in meta.items()}
        net = Generator(**meta["config"])
        net.load_state_dict(tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: a damaged medsynth GAN file ({first_line(e)})") from None
    if meta["config"]["num_classes"] != len(meta["classes"]):
        raise UserError(f"{path}: a damaged medsynth GAN file ({len(meta['classes'])} class names "
                        f"for {meta['config']['num_classes']} classes)")
    return GAN(net.to(device), meta)
