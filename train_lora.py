"""Fine-tune Stable Diffusion with LoRA on class-labelled images (PathMNIST by default).

  python train_lora.py --out runs/lora                      # SD1.5 on PathMNIST-224, the paper's recipe (GPU)
  python train_lora.py --preset tiny --out runs/lora-tiny   # tiny random SD on CPU: a smoke run
  python train_lora.py --preset mini --out runs/lora-mini   # medsynth-mini on the bundled images, CPU
  torchrun --nproc_per_node 4 train_lora.py --out runs/lora --batch-size 4   # data-parallel
  python train_lora.py --preset mini --prior-preservation --out runs/prior/lora   # DreamBooth-style

Each image is trained with its class prompt (--prompt-template), or with the empty prompt for a
fraction --caption-dropout of the samples. --prior-preservation (DreamBooth, Ruiz et al. 2023)
puts a rare identifier in each class prompt ("... colorectal sks adipose tissue"; the LoRA file
records these prompts, so sample_validated.py uses them), has the base model generate
--prior-images per class from the plain class prompts once (cached in OUT/prior-<key>/), and
trains every step on as many of them beside the real images: loss = L_inst + w L_prior,
w = --prior-loss-weight. Rerunning the same command after a crash or Ctrl-C
resumes from the newest checkpoint in --out; a finished run is left alone unless --overwrite is
given. The LoRA is written to OUT/lora.safetensors (kohya format: diffusers, ComfyUI and A1111
all read it).
"""
import argparse
import os
import time
from dataclasses import fields, replace

from model.io import ArgumentParser, UserError, check_out_dir, cli
from model.lora.files import FORMATS
from model.lora.layers import TARGETS
from model.lora.recipe import LoRARecipe, checked
from model.sd.tiny import make_tiny_sd
from model.training import PRECISION_HELP, PRECISIONS

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE_DATA = os.path.join(HERE, "examples", "pathmnist_subset_28.npz")  # 600 real images, offline
TINY_SD = "tiny-sd"  # the tiny preset's model: a random SD this script builds into OUT/tiny-sd
MINI = os.path.join(HERE, "examples", "medsynth-mini")  # our SD pretrained on real tissue (pretrain.py)
MINI_TEMPLATE = "{desc}, an H&E stained histopathology image"

PRESETS = {
    "paper": LoRARecipe(),  # the recipe's defaults are the paper's (model/lora/recipe.py)
    # Tiny random-weight SD (model/sd/tiny.py) on the bundled subset: 8x8 latents.
    "tiny": LoRARecipe(model=TINY_SD, data=EXAMPLE_DATA, resolution=64, max_steps=100, batch_size=8,
                       lr=1e-3, min_lr=1e-5, warmup_steps=10, save_every=50, sample_every=50,
                       sample_steps=10, prior_images=8, conditioning_images=1),
    # medsynth-mini on the bundled subset, as the paper fine-tunes SD1.5 on PathMNIST, at the model's
    # own size. A from-scratch base this small learns from a higher LR and rank than SD1.5 needs.
    # The class words come first: mini's text encoder is random and causal, so words at the end
    # leave most token states the same for every class. The encoder's MLP learns too, and min-SNR
    # weighting keeps the loss on the low-noise steps where the classes differ (README, section 2).
    "mini": LoRARecipe(model=MINI, data=EXAMPLE_DATA, resolution=0, prompt_template=MINI_TEMPLATE,
                       targets="unet_attn,text_attn,text_mlp", rank=8, alpha=8.0, max_steps=1000,
                       batch_size=32, lr=2e-3, min_lr=1e-5, warmup_steps=20, noise_offset=0.0,
                       snr_gamma=5.0, save_every=250, sample_every=250, sample_steps=25, guidance=3.0,
                       prior_images=50),
}
DEFAULT_OUT = {"paper": "runs/lora", "tiny": "runs/lora-tiny", "mini": "runs/lora-mini"}
RECIPE_FIELDS = {field.name for field in fields(LoRARecipe)}


def _default(field):
    """'(default: X)', or '(default: paper X / tiny Y / mini Z)' where the presets differ."""
    values = {name: getattr(recipe, field) for name, recipe in PRESETS.items()}
    same = len({repr(v) for v in values.values()}) == 1
    text = f"{values['paper']}" if same else " / ".join(f"{k} {v}" for k, v in values.items())
    return f"(default: {text})".replace("%", "%%")


def build_parser():
    # A recipe flag not given is absent from the namespace, so the preset's value stays.
    p = ArgumentParser(description=__doc__, argument_default=argparse.SUPPRESS)
    p.add_argument("--preset", choices=PRESETS, default="paper",
                   help="defaults for the flags marked 'paper / tiny / mini': the SD1.5 recipe for a GPU, "
                   "a CPU smoke run on a tiny random model, or medsynth-mini (examples/medsynth-mini, "
                   "pretrained on real tissue) on the bundled images, on a CPU (default: paper)")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="base model: diffusers folder, single .safetensors/.ckpt file or hub id "
                   f"(default: paper {PRESETS['paper'].model} / tiny: a tiny random SD built into OUT/tiny-sd)")
    g.add_argument("--data", help="pathmnist | pathmnist_64 | pathmnist_128 | pathmnist_224 (downloaded once, "
                   "MD5-checked), an .npz in MedMNIST layout, or a folder with one sub-folder per class "
                   "(default: paper pathmnist_224 / tiny examples/pathmnist_subset_28.npz)")
    g.add_argument("--few-shot", type=int, help="train on K images per class (default: all)")
    g.add_argument("--prompt-template", help="the prompt of each class: {desc} = class description, {name} = "
                   "class name (default: 'an H&E stained histopathology image of colorectal {desc}')")
    g.add_argument("--resolution", type=int, help="training image size in px; the latent is 1/8 of it (SD) or 1/4 (medsynth-mini) "
                   + _default("resolution"))
    g.add_argument("--caption-dropout", type=float, metavar="P", help="probability that a sample trains on "
                   "the empty prompt instead of its class prompt, so classifier-free guidance has an "
                   "unconditional branch to push against " + _default("caption_dropout"))
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, help="LoRA rank r " + _default("rank"))
    g.add_argument("--alpha", type=float, help="LoRA alpha: the update is scaled by alpha/r (default: = rank)")
    g.add_argument("--targets", help="comma list of layer groups to adapt: "
                   + ", ".join(f"{k} ({'/'.join(v)})" for k, v in TARGETS.items())
                   + "; text_* also train the text encoder, as the SD2.1 cytomorphology paper does "
                   + _default("targets"))
    g.add_argument("--lora-dropout", type=float, help="dropout on the LoRA input " + _default("lora_dropout"))
    g.add_argument("--lora-format", choices=FORMATS, help="file layout: kohya (diffusers' load_lora_weights, "
                   "ComfyUI, A1111) or diffusers (diffusers and peft only) " + _default("lora_format"))
    g = p.add_argument_group("prior preservation (DreamBooth, Ruiz et al. 2023, sec. 3.3)")
    g.add_argument("--prior-preservation", action="store_true", help="give each class prompt a rare "
                   "identifier ('... colorectal sks adipose tissue'), generate --prior-images per class once "
                   "with the base model from the plain class prompts (--sample-steps, --guidance), and train "
                   "every step on a batch of them too, so the class words keep the base model's meaning")
    g.add_argument("--prior-loss-weight", type=float, metavar="W", help="loss = L_inst + W L_prior "
                   "(DreamBooth eq. 2), with --prior-preservation " + _default("prior_loss_weight"))
    g.add_argument("--prior-images", type=int, metavar="N", help="class-prior images per class, with "
                   "--prior-preservation " + _default("prior_images"))
    _add_training_flags(p)
    return p


def _add_training_flags(p):
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, help="optimizer steps " + _default("max_steps"))
    g.add_argument("--batch-size", type=int, help="images per step and process " + _default("batch_size"))
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step " + _default("grad_accum"))
    g.add_argument("--lr", type=float, help="peak learning rate " + _default("lr"))
    g.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine decay " + _default("min_lr"))
    g.add_argument("--warmup-steps", type=int, help="linear warm-up steps " + _default("warmup_steps"))
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay " + _default("weight_decay"))
    g.add_argument("--max-grad-norm", type=float, help="gradient clipping, 0 = off " + _default("max_grad_norm"))
    g.add_argument("--noise-offset", type=float,
                   help="per-channel offset noise, training only " + _default("noise_offset"))
    g.add_argument("--snr-gamma", type=float,
                   help="min-SNR loss weighting gamma, e.g. 5; 0 = off " + _default("snr_gamma"))
    g.add_argument("--mixed-precision", choices=PRECISIONS,
                   help=f"autocast precision, {PRECISION_HELP}; LoRA weights stay float32")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute UNet activations in backward: less memory, more compute")
    g.add_argument("--seed", type=int, help="seed of LoRA init, batches, noise, caption dropout and prior images "
                   + _default("seed"))
    g = p.add_argument_group("outputs")
    g.add_argument("--out", default=None, help="output folder (default: paper runs/lora / tiny runs/lora-tiny / mini runs/lora-mini)")
    g.add_argument("--save-every", type=int, help="write lora-STEP.safetensors and the resumable "
                   "checkpoint-STEP.pt every N steps " + _default("save_every"))
    g.add_argument("--sample-every", type=int, help="validation grid, one image per class from fixed seeds, "
                   "every N steps; 0 = never " + _default("sample_every"))
    g.add_argument("--sample-steps", type=int, help="DDIM steps of the validation grid (and of the prior "
                   "images) " + _default("sample_steps"))
    g.add_argument("--guidance", type=float,
                   help="classifier-free guidance of the validation grid (and of the prior images) "
                   + _default("guidance"))
    g.add_argument("--conditioning-images", type=int, metavar="N", help="does the LoRA listen to the class "
                   "prompt? At step 0 and every checkpoint, a diffusion classifier (as evaluate.py conditioning) "
                   "on the first N val images per class -> conditioning.csv, conditioning.png; 0 = off "
                   + _default("conditioning_images"))
    g.add_argument("--conditioning-draws", type=int, metavar="K", help="(t, noise) draws per image of that check "
                   + _default("conditioning_draws"))
    g.add_argument("--resume", metavar="CHECKPOINT", default=None, help="resume from this checkpoint-STEP.pt "
                   "(default: the newest one in --out, if any)")
    g.add_argument("--overwrite", action="store_true", default=False,
                   help="delete this script's outputs in --out and start over")
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps " + _default("device"))


def recipe_from_args(args, out):
    """The preset's recipe with every flag given on the command line put over it."""
    given = {name: value for name, value in vars(args).items() if name in RECIPE_FIELDS}
    for name in ("prior_loss_weight", "prior_images"):
        if name in given and not given.get("prior_preservation"):
            raise UserError(f"--{name.replace('_', '-')} needs --prior-preservation")
    if "rank" in given and "alpha" not in given:
        given["alpha"] = float(given["rank"])  # --alpha defaults to --rank
    if args.preset == "tiny" and "model" not in given:
        given["model"] = os.path.abspath(os.path.join(out, TINY_SD))
    return checked(replace(PRESETS[args.preset], **given))


def build_tiny_sd(folder):
    """The tiny preset's random SD, built once, by the first process: torchrun's others wait for
    it on the file system (make_tiny_sd writes model_index.json last)."""
    index = os.path.join(folder, "model_index.json")
    if os.environ.get("RANK", "0") == "0" and not os.path.isfile(index):
        make_tiny_sd(folder, kind="sd1", seed=0)
    while not os.path.isfile(index):
        time.sleep(1)


def main(argv=None):
    from model.lora.train import train
    args = build_parser().parse_args(argv)
    out = args.out or DEFAULT_OUT[args.preset]
    check_out_dir(out)  # a file in the way is an error now, not after loading the model
    recipe = recipe_from_args(args, out)
    if args.preset == "tiny" and "model" not in vars(args):
        build_tiny_sd(recipe.model)
    train(recipe, out, overwrite=args.overwrite, resume=args.resume)


if __name__ == "__main__":
    cli(main)
