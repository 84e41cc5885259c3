"""Train the conditional GAN baseline (seed paper 002) on real PathMNIST, at medsynth-mini's 32 px.

    python train_gan.py --out runs/gan                       # the bundled 400 training images, CPU
    python train_gan.py --data pathmnist --out runs/gan-full --device cuda

On a CPU shared with other jobs, OMP_NUM_THREADS=1 is often much faster than one thread per core:
threads that wait on each other at every small convolution stall whenever one of them is
preempted. A run resumes bit-exactly only at the thread count it started with.

G(z|c) is DCGAN-style with a class embedding, D(x|c) a projection discriminator with spectral
norm, the loss the hinge loss (plus MSGAN's mode-seeking term for G); the EMA of G is what is
saved and sampled. Writes only into --out: gan.safetensors (the EMA generator: `python
sample_validated.py --generator PATH`), samples/ (a grid per checkpoint, one row per class),
loss.png, log.json and state.pt. Rerunning the same
command continues an interrupted run (a finished one is left as it is); a run with other settings
or data in --out is refused unless --overwrite.
"""
import argparse
from dataclasses import fields

from model.gan.train import GANRecipe, train
from model.io import ArgumentParser, check_out_dir, cli

HELP = {
    "data": "an .npz in MedMNIST layout, a folder with one sub-folder per class, or pathmnist[_64|...] "
            "(downloaded); the train split is learnt from, val only scored",
    "resolution": "image side in px: 4 times a power of 2 (the images are resized to it)",
    "steps": "G updates",
    "batch_size": "real (and fake) images per D update",
    "d_steps": "D updates per G update",
    "g_lr": "Adam learning rate of G",
    "d_lr": "Adam learning rate of D",
    "beta1": "Adam beta1 of both",
    "beta2": "Adam beta2 of both",
    "ema_decay": "decay of the moving average of G's weights that is saved and sampled",
    "dihedral": "turn each real image by a random one of its 8 rotations/flips",
    "mode_seeking": "weight of MSGAN's mode-seeking term in G's loss (different noise, different image; 0: off)",
    "z_dim": "noise dimensions",
    "embed_dim": "dimensions of G's class embedding",
    "g_channels": "G's width at full resolution (doubles per level down to 4x4)",
    "d_channels": "D's width at full resolution (doubles per level down to 4x4)",
    "save_every": "steps between checkpoints (gan.safetensors, a sample grid, state.pt)",
    "seed": "weights, batches, noise: the whole run",
    "device": "auto | cpu | cuda | cuda:N | mps",
}


def parse_args():
    defaults = GANRecipe()
    p = ArgumentParser(description=__doc__)
    p.add_argument("--out", default="runs/gan", help="output folder (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete a run with other settings or data in --out and start over")
    for f in fields(GANRecipe):  # every recipe field is a flag
        default = getattr(defaults, f.name)
        kind = {"type": type(default)} if not isinstance(default, bool) else {"action": argparse.BooleanOptionalAction}
        p.add_argument("--" + f.name.replace("_", "-"), default=default, **kind,
                       help=f"{HELP[f.name]} (default: %(default)s)")
    return p.parse_args()


def main():
    args = parse_args()
    recipe = GANRecipe(**{f.name: getattr(args, f.name) for f in fields(GANRecipe)})
    check_out_dir(args.out)
    path = train(recipe, args.out, overwrite=args.overwrite)
    print(f"saved {path}; sample it with: python sample_validated.py --generator {path} ...")


if __name__ == "__main__":
    cli(main)
