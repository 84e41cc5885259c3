"""Pretrain medsynth-mini: a small Stable Diffusion trained from scratch on real histology.

    python pretrain.py --out runs/pretrain-mini        # the bundled 400 training images, CPU
    python pretrain.py --data pathmnist --out runs/mini-full --device cuda   # full PathMNIST, GPU

Stage 1 trains the VAE (reconstruction + KL), stage 2 the UNet on its cached latents (epsilon
prediction, SD's scaled_linear schedule) with one generic caption. Writes --out/vae/, --out/unet/
(state.pt, loss.csv, loss.png, samples/) and --out/model/: a diffusers-layout SD folder with a
model card, which every script's --model takes. Rerunning the same command resumes; a finished
run is left alone; other settings into the same --out need --overwrite.
"""
import shlex
import sys
from dataclasses import fields, replace

from model.io import ArgumentParser, check_out_dir, cli
from model.mini.pretrain import pretrain
from model.mini.recipe import PRESETS
from model.training import PRECISIONS


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="mini", choices=sorted(PRESETS),
                   help="mini: the shipped model's recipe; smoke: a few steps, to try the command")
    p.add_argument("--out", default="runs/pretrain-mini", help="output folder (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out used with other settings")
    d = PRESETS["mini"]
    for f in fields(d):  # every recipe field is a flag; unset ones take the preset's value
        kind = type(getattr(d, f.name))
        extra = {"choices": PRECISIONS} if f.name == "mixed_precision" else {}
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None, **extra,
                       help=f"default: {getattr(d, f.name)!r} (preset mini)")
    return p.parse_args(argv)


def main():
    args = parse_args()
    given = {f.name: getattr(args, f.name) for f in fields(PRESETS[args.preset])
             if getattr(args, f.name) is not None}
    recipe = replace(PRESETS[args.preset], **given)
    check_out_dir(args.out)
    command = " ".join(["python", "pretrain.py", *map(shlex.quote, sys.argv[1:])])
    folder = pretrain(recipe, args.out, overwrite=args.overwrite, command=command)
    print(f"wrote {folder}; use it with: python train_lora.py --model {folder} ...")


if __name__ == "__main__":
    cli(main)
