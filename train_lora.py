"""Fine-tune Stable Diffusion with LoRA on class-labelled images (PathMNIST by default).

  python train_lora.py --out runs/lora                      # SD1.5 on PathMNIST-224, the paper's recipe (GPU)
  python train_lora.py --preset tiny --out runs/lora-tiny   # tiny random SD on CPU, about a minute
  torchrun --nproc_per_node 4 train_lora.py --out runs/lora --batch-size 4   # data-parallel

Each image is trained with its class prompt (--prompt-template). Rerunning the same command after
a crash or Ctrl-C resumes from the newest checkpoint in --out; a finished run is left alone unless
--overwrite is given. The LoRA is written to OUT/lora.safetensors.
"""
import os

from model.io import ArgumentParser, UserError, check_out_dir, cli
from model.lora.files import FORMATS
from model.lora.layers import TARGETS

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE_DATA = os.path.join(HERE, "examples", "pathmnist_subset_28.npz")  # 600 real images, offline

# Paper (Choudhary, sec. 3.4): 1,000-3,000 steps, batch 8/16/32, LR 1e-5..5e-5 with warm-up,
# cosine decay, a small noise offset, no augmentation; the best model was ~1,100 steps.
PRESETS = {
    "paper": dict(model="stable-diffusion-v1-5/stable-diffusion-v1-5", data="pathmnist_224",
                  out="runs/lora", resolution=256, max_steps=1500, batch_size=16, lr=5e-5,
                  min_lr=1e-6, warmup_steps=100, rank=4, save_every=250, sample_every=250,
                  sample_steps=30),
    # Tiny random-weight SD (model/tiny.py, built into OUT/tiny-sd) on small data: 8x8 latents.
    "tiny": dict(model=None, data=None, out="runs/lora-tiny", resolution=64, max_steps=100,
                 batch_size=8, lr=1e-3, min_lr=1e-5, warmup_steps=10, rank=4, save_every=50,
                 sample_every=50, sample_steps=10),
}


def build_parser():
    p = ArgumentParser(description=__doc__)

    def preset(key):  # "(default: paper 256 / tiny 64)" for flags whose default comes from --preset
        return f"(default: paper {PRESETS['paper'][key]} / tiny {PRESETS['tiny'][key]})"

    p.add_argument("--preset", choices=PRESETS, default="paper",
                   help="defaults for the flags marked 'paper / tiny': the SD1.5 recipe for a GPU, or a "
                   "CPU smoke run on a tiny random model (default: paper)")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="base model: diffusers folder, single .safetensors/.ckpt file or hub id "
                   "(default: paper stable-diffusion-v1-5/stable-diffusion-v1-5 / tiny: a tiny random SD "
                   "built into OUT/tiny-sd)")
    g.add_argument("--data", help="pathmnist | pathmnist_64 | pathmnist_128 | pathmnist_224 (downloaded once, "
                   "MD5-checked), an .npz in MedMNIST layout, or a folder with one sub-folder per class "
                   "(default: paper pathmnist_224 / tiny examples/pathmnist_subset_28.npz)")
    g.add_argument("--few-shot", type=int, help="train on K images per class (default: all)")
    g.add_argument("--prompt-template", help="the prompt of each class: {desc} = class description, {name} = "
                   "class name (default: 'an H&E stained histopathology image of colorectal {desc}')")
    g.add_argument("--resolution", type=int, help="training image size in px; SD's latent is 1/8 of it "
                   + preset("resolution"))
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, help="LoRA rank r " + preset("rank"))
    g.add_argument("--alpha", type=float, help="LoRA alpha: the update is scaled by alpha/r (default: = rank)")
    g.add_argument("--targets", default="unet_attn", help="comma list of layer groups to adapt: "
                   + ", ".join(f"{k} ({'/'.join(v)})" for k, v in TARGETS.items())
                   + "; text_* also train the text encoder, as the SD2.1 cytomorphology paper does "
                   "(default: unet_attn)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input (default: 0)")
    g.add_argument("--lora-format", choices=FORMATS, default="diffusers", help="file layout: diffusers "
                   "(pipe.load_lora_weights) or kohya (ComfyUI, A1111) (default: diffusers)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, help="optimizer steps " + preset("max_steps"))
    g.add_argument("--batch-size", type=int, help="images per step and process " + preset("batch_size"))
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    g.add_argument("--lr", type=float, help="peak learning rate " + preset("lr"))
    g.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine decay " + preset("min_lr"))
    g.add_argument("--warmup-steps", type=int, help="linear warm-up steps " + preset("warmup_steps"))
    g.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay (default: 0.01)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping, 0 = off (default: 1.0)")
    g.add_argument("--noise-offset", type=float, default=0.05,
                   help="per-channel offset noise, training only (default: 0.05)")
    g.add_argument("--snr-gamma", type=float, default=0.0,
                   help="min-SNR loss weighting gamma, e.g. 5; 0 = off (default: 0)")
    g.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), help="autocast precision; LoRA "
                   "weights stay float32 (default: bf16 on GPUs that have it, else fp16; no on CPU)")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute UNet activations in backward: less memory, ~30%% more compute")
    g.add_argument("--seed", type=int, default=0, help="seed of LoRA init, batches and noise (default: 0)")
    g = p.add_argument_group("outputs")
    g.add_argument("--out", help="output folder " + preset("out"))
    g.add_argument("--save-every", type=int, help="write lora-STEP.safetensors and the resumable "
                   "checkpoint-STEP.pt every N steps " + preset("save_every"))
    g.add_argument("--sample-every", type=int, help="validation grid, one image per class from fixed seeds, "
                   "every N steps; 0 = never " + preset("sample_every"))
    g.add_argument("--sample-steps", type=int, help="DDIM steps of the validation grid " + preset("sample_steps"))
    g.add_argument("--guidance", type=float, default=7.5,
                   help="classifier-free guidance of the validation grid (default: 7.5)")
    g.add_argument("--resume", metavar="CHECKPOINT", help="resume from this checkpoint-STEP.pt "
                   "(default: the newest one in --out, if any)")
    g.add_argument("--overwrite", action="store_true", help="delete this script's outputs in --out and start over")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    return p


def parse_args(argv=None):
    return resolve(build_parser().parse_args(argv))


def resolve(args):
    """Fill preset defaults and check values: one-line UserErrors for anything unusable."""
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.preset == "tiny" and args.data is None:
        args.data = EXAMPLE_DATA
    # The tiny preset's model is built (once, by rank 0) into OUT/tiny-sd when training starts.
    args.build_tiny = args.preset == "tiny" and args.model is None
    check_out_dir(args.out)  # a file in the way is an error now, not after loading the model
    if args.build_tiny:
        args.model = os.path.abspath(os.path.join(args.out, "tiny-sd"))
    # Local paths are recorded absolute, so resuming from another working directory still matches.
    for key in ("model", "data"):
        if os.path.exists(getattr(args, key)):
            setattr(args, key, os.path.abspath(getattr(args, key)))
    args.alpha = float(args.rank if args.alpha is None else args.alpha)
    for name in ("max_steps", "batch_size", "grad_accum", "rank", "resolution", "save_every", "sample_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("lr", "min_lr", "warmup_steps", "noise_offset", "snr_gamma", "sample_every",
                 "weight_decay", "max_grad_norm"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    if not 0 <= args.lora_dropout < 1:
        raise UserError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    groups = [g.strip() for g in args.targets.split(",") if g.strip()]
    unknown = [g for g in groups if g not in TARGETS]
    if unknown or not groups:
        raise UserError(f"--targets: unknown group {unknown[0] if unknown else '(none)'!r}; "
                        f"choose from {', '.join(TARGETS)}")
    args.targets = ",".join(groups)
    return args


def main(argv=None):
    from model.lora.train import train
    train(parse_args(argv))


if __name__ == "__main__":
    cli(main)
