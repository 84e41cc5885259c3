"""Train the ResNet validator that judges every synthetic image medsynth keeps (or, with --arch vit,
a small ViT from scratch: a second, independent judge for `evaluate.py generation --second-classifier`).

    python train_classifier.py --data pathmnist --out runs/classifier
    python train_classifier.py --data examples/pathmnist_subset_28.npz --out runs/clf_subset
    python train_classifier.py --arch vit --seed 1 --data examples/pathmnist_subset_28.npz --out runs/vit

--arch vit has its own defaults for --epochs, --lr, --warmup-epochs and --weight-decay (shown in
brackets below, chosen on the validation split); a value you pass is used as it is.

Writes only into --out: classifier.safetensors (best validation macro F1), metrics.json, log.jsonl,
training_curve.png and state.pt. Rerunning the same command continues an interrupted run (a finished
one is left as it is); a run with other settings or data in --out is refused unless --overwrite.
Test the classifier with `python evaluate.py classifier`.
"""
from dataclasses import fields

from model.validator.classifier import ARCHS
from model.validator.train import ARCH_DEFAULTS, VIT, Recipe, train
from model.data import load_split
from model.io import ArgumentParser, check_out_dir, cli
from model.training import PRECISION_HELP, PRECISIONS


def arch_default(name):
    """The help text of a flag whose default depends on --arch."""
    return f"default: {getattr(Recipe(), name)} [vit: {getattr(VIT, name)}]"


def parse_args():
    defaults = Recipe()
    p = ArgumentParser(description=__doc__)
    p.add_argument("--data", default="pathmnist",
                   help="pathmnist[_64|_128|_224] (downloaded), an .npz in MedMNIST layout, or a folder "
                        "with one sub-folder per class (default: %(default)s)")
    p.add_argument("--out", default="runs/classifier", help="output folder (default: %(default)s)")
    p.add_argument("--few-shot", type=int, default=None, metavar="K", help="train on K images per class")
    p.add_argument("--arch", default=defaults.arch, choices=ARCHS,
                   help="vit: a small ViT with 4 px patches, from scratch (default: %(default)s)")
    p.add_argument("--stem", default=defaults.stem, choices=["auto", "small", "standard"],
                   help="ResNet: small = 3x3 stride-1 conv, no max-pool; auto: small up to 64 px (default: auto)")
    p.add_argument("--image-size", type=int, default=defaults.image_size,
                   help="train at this size (default: the data's own size)")
    p.add_argument("--pretrained", default=defaults.pretrained, metavar="PATH|NAME",
                   help="start from torchvision ImageNet weights: a .pth file, or a name like DEFAULT "
                        "(downloaded); default: from scratch")
    p.add_argument("--epochs", type=int, help=arch_default("epochs"))
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="default: %(default)s")
    p.add_argument("--lr", type=float, help=f"peak AdamW learning rate ({arch_default('lr')})")
    p.add_argument("--min-lr", type=float, default=defaults.min_lr, help="end of the cosine decay (default: %(default)s)")
    p.add_argument("--warmup-epochs", type=float, help=arch_default("warmup_epochs"))
    p.add_argument("--weight-decay", type=float, help=arch_default("weight_decay"))
    p.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing, help="default: %(default)s")
    p.add_argument("--no-flip-rotate", dest="flip_rotate", action="store_false",
                   help="turn off random 90-degree rotations and flips")
    p.add_argument("--zoom", type=float, default=defaults.zoom,
                   help="random-resized crop keeping at least this area fraction, e.g. 0.7 at 224 px; "
                        "1 = off (default: %(default)s)")
    p.add_argument("--brightness", type=float, default=defaults.brightness, help="default: %(default)s")
    p.add_argument("--contrast", type=float, default=defaults.contrast, help="default: %(default)s")
    p.add_argument("--hed-jitter", type=float, default=defaults.hed_jitter,
                   help="H&E stain jitter strength in HED space, e.g. 0.03 (default: off)")
    p.add_argument("--ema", type=float, default=defaults.ema,
                   help="decay of the moving average of the weights that is validated and kept; 0 = off "
                        "(default: %(default)s)")
    p.add_argument("--mixup", type=float, default=defaults.mixup,
                   help="probability that a batch is mixed up (mixup with alpha 1); 0 = off "
                        "(default: %(default)s)")
    p.add_argument("--no-tta", dest="tta", action="store_false",
                   help="predict from the image as it is, not averaged over its 8 rotations/flips "
                        "(stored in the checkpoint: it is how the validator judges)")
    p.add_argument("--device", default=defaults.device, help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    p.add_argument("--mixed-precision", default="auto", choices=PRECISIONS, help=f"autocast precision: {PRECISION_HELP}")
    p.add_argument("--seed", type=int, default=defaults.seed, help="weights, batches, augmentation, few-shot pick")
    p.add_argument("--resume", action="store_true",
                   help="require a run in --out to continue (rerunning the same command continues one too)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete a run with other settings or data in --out and start over")
    return p.parse_args()


def main():
    args = parse_args()
    # A flag left out (None: --epochs, --lr, --warmup-epochs, --weight-decay) takes the arch's default.
    base = ARCH_DEFAULTS.get(args.arch, Recipe())
    given = {f.name: getattr(args, f.name) for f in fields(Recipe)}
    recipe = Recipe(**{k: getattr(base, k) if v is None else v for k, v in given.items()})
    check_out_dir(args.out)
    size = args.image_size or None
    train_set = load_split(args.data, "train", size=size, few_shot=args.few_shot, seed=args.seed)
    val_set = load_split(args.data, "val", size=size)
    print(f"train {len(train_set)} / val {len(val_set)} images of {train_set.images.shape[-1]} px, "
          f"{len(train_set.classes)} classes, from {train_set.source}")
    path = train(train_set, val_set, recipe, args.out, resume=args.resume, overwrite=args.overwrite,
                 extra_meta={"few_shot": args.few_shot})
    print(f"saved {path}; test it with: python evaluate.py classifier --classifier {path} --data {args.data}")


if __name__ == "__main__":
    cli(main)
