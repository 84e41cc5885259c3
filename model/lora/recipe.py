"""The LoRA training recipe: one dataclass holding every setting of `model.lora.train.train`.

Its defaults are the paper's recipe (Choudhary, sec. 3.4: 1,000-3,000 steps, batch 8/16/32, LR
1e-5..5e-5 with warm-up, cosine decay, a small noise offset, no augmentation), on SD1.5 and
PathMNIST-224 at 256 px. train_lora.py's presets are instances of it, and its flags override
fields one by one. `checked` turns a recipe into the one the loop runs, or says in one line
(naming the flag) which value cannot train.
"""
import math
import os
from dataclasses import dataclass, replace

from model.io import UserError
from model.lora.files import FORMATS
from model.lora.layers import TARGETS
from model.sd.loader import model_defaults
from model.training import PRECISIONS

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@dataclass
class LoRARecipe:
    # model and data
    model: str = SD15                 # diffusers folder, single .safetensors/.ckpt file or hub id
    data: str = "pathmnist_224"       # official name, MedMNIST-layout .npz or class folders
    few_shot: int | None = None       # K training images per class (None: all of them)
    prompt_template: str | None = None  # {desc} / {name} of each class (None: model.data's)
    resolution: int = 256             # training image side in px (0: the model's own, as diffusers defaults it)
    # the LoRA (Hu et al. eq. 3: y = W x + alpha / rank * B A x)
    targets: str = "unet_attn"        # comma list of model.lora.layers.TARGETS groups
    rank: int = 4
    alpha: float = 4.0
    lora_dropout: float = 0.0         # dropout on the LoRA input
    # optimisation
    max_steps: int = 1500
    batch_size: int = 16              # per process and micro-batch
    grad_accum: int = 1               # micro-batches per optimizer step
    lr: float = 5e-5                  # peak, after linear warm-up; cosine decay to min_lr
    min_lr: float = 1e-6
    warmup_steps: int = 100
    weight_decay: float = 1e-2        # AdamW
    max_grad_norm: float = 1.0        # gradient clipping (0: off)
    noise_offset: float = 0.05        # per-channel offset noise
    snr_gamma: float = 0.0            # min-SNR-gamma loss weighting (0: off)
    caption_dropout: float = 0.1      # probability that a sample trains on "" (the unconditional branch)
    # prior preservation (DreamBooth, model/lora/prior.py): identifier prompts + the base model's class images
    prior_preservation: bool = False
    prior_loss_weight: float = 1.0    # lambda of L_inst + lambda L_prior (DreamBooth eq. 2)
    prior_images: int = 100           # per class, generated once with sample_steps and guidance
    seed: int = 0                     # LoRA init, batch order, noise, caption drops
    mixed_precision: str = "auto"     # model.training.PRECISIONS; LoRA weights stay float32
    grad_checkpointing: bool = False  # recompute UNet activations in backward: less memory
    # outputs
    save_every: int = 250             # lora-STEP.safetensors + the resumable checkpoint-STEP.pt
    sample_every: int = 250           # validation grid, one image per class (0: never)
    sample_steps: int = 30            # DDIM steps of the grid (and of the prior images)
    guidance: float = 7.5             # classifier-free guidance of the grid (and of the prior images)
    conditioning_images: int = 2      # diffusion classifier at every checkpoint: val images per class (0: off)
    conditioning_draws: int = 2       # its (t, noise) draws per image (model/eval/conditioning.py)
    lora_format: str = "kohya"        # model.lora.files.FORMATS
    device: str = "auto"              # auto | cpu | cuda | cuda:N | mps


AT_LEAST_1 = ("max_steps", "batch_size", "grad_accum", "rank", "save_every", "sample_steps",
              "prior_images", "conditioning_draws")
NOT_NEGATIVE = ("lr", "min_lr", "warmup_steps", "noise_offset", "snr_gamma", "sample_every",
                "weight_decay", "max_grad_norm", "conditioning_images")


def _flag(field):
    return "--" + field.replace("_", "-")


def checked(recipe):
    """`recipe` as the loop runs it: targets normalised ("unet_attn, text_attn" ->
    "unet_attn,text_attn"), local model / data paths absolute (recorded in the run's settings, so
    resuming from another working directory still matches). UserError for a value that cannot train."""
    if recipe.resolution < 0:
        raise UserError(f"--resolution must be positive (or 0: the model's own), got {recipe.resolution}")
    # 0: the UNet's sample_size x the VAE factor of a local folder; SD1.5's 512 for anything else
    recipe = replace(recipe, resolution=recipe.resolution or model_defaults(recipe.model).get("resolution", 512))
    for field in AT_LEAST_1:
        if getattr(recipe, field) < 1:
            raise UserError(f"{_flag(field)} must be at least 1, got {getattr(recipe, field)}")
    for field in NOT_NEGATIVE:
        if getattr(recipe, field) < 0:
            raise UserError(f"{_flag(field)} must not be negative, got {getattr(recipe, field)}")
    if not 0 <= recipe.lora_dropout < 1:
        raise UserError(f"--lora-dropout must be in [0, 1), got {recipe.lora_dropout}")
    if not 0 <= recipe.prior_loss_weight < math.inf:  # NaN fails this too
        raise UserError(f"--prior-loss-weight must be a finite number >= 0, got {recipe.prior_loss_weight}")
    if not 0 <= recipe.caption_dropout <= 1:
        raise UserError(f"--caption-dropout must be in [0, 1], got {recipe.caption_dropout}")
    if recipe.lora_format not in FORMATS:
        raise UserError(f"--lora-format must be one of {', '.join(FORMATS)}, got {recipe.lora_format!r}")
    if recipe.mixed_precision not in PRECISIONS:
        raise UserError(f"--mixed-precision must be one of {', '.join(PRECISIONS)}, got {recipe.mixed_precision!r}")
    groups = [group.strip() for group in recipe.targets.split(",") if group.strip()]
    unknown = [group for group in groups if group not in TARGETS]
    if unknown or not groups:
        raise UserError(f"--targets: unknown group {unknown[0] if unknown else '(none)'!r}; "
                        f"choose from {', '.join(TARGETS)}")
    local = {field: os.path.abspath(getattr(recipe, field)) for field in ("model", "data")
             if os.path.exists(getattr(recipe, field))}
    return replace(recipe, targets=",".join(groups), alpha=float(recipe.alpha),
                   prior_loss_weight=float(recipe.prior_loss_weight), **local)
