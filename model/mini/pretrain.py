"""Pretrain medsynth-mini from scratch: stage 1 the VAE, stage 2 the UNet, then the diffusers
folder. Behind pretrain.py; `pretrain(PretrainRecipe(...), "runs/mini")`.

Run folder: vae/ and unet/ (state.pt, loss.csv, loss.png, samples/step-*.png each), then
model/ (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/, MODEL_CARD.md,
pretrain.json): a folder that load_pipeline and diffusers' StableDiffusionPipeline both load.
Rerunning the same command resumes; a finished run is left alone; other settings need
overwrite=True.
"""
import hashlib
import os
import shutil
import time
from dataclasses import asdict

import torch

from model.data import from_model_size, load_split, to_model_size
from model.io import UserError, read_json, write_json, write_text
from model.mini.loop import check_settings, train_stage
from model.mini.recipe import LEVELS, MINI_CLIP, MINI_SCHEDULER, unet_config, vae_config
from model.mini.stages import SAMPLE_GUIDANCE, SAMPLE_STEPS, caption_embeddings, encode_latents, stage_settings, \
    unet_stage, vae_stage
from model.objective import step_seed
from model.sd.ddim import DDIMScheduler
from model.sd.tiny import make_tiny_tokenizer, write_sd_folder
from model.sd.unet import UNet2DConditionModel
from model.sd.vae import AutoencoderKL
from model.training import pick_device, resolve_precision, set_seed

RUN_JSON = "pretrain.json"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WEIGHTS = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
           "text_encoder/model.safetensors")


def pretrain(recipe, out_dir, overwrite=False, command=""):
    """Train both stages into `out_dir` and write `out_dir/model`; returns that folder."""
    _check(recipe)
    device = pick_device(recipe.device)
    resolve_precision(device, recipe.mixed_precision)  # fp16 on a CPU is an error now, not later
    model_dir = os.path.join(out_dir, "model")
    if _finished(model_dir, recipe, overwrite):
        print(f"{model_dir}: this run is finished, nothing to do")
        return model_dir
    if overwrite:
        for sub in ("vae", "unet", "model"):
            shutil.rmtree(os.path.join(out_dir, sub), ignore_errors=True)
    for stage in ("vae", "unet"):  # refuse other settings now, not after the VAE stage has run
        check_settings(os.path.join(out_dir, stage), stage_settings(recipe, stage))
    set_seed(recipe.seed)
    t0 = time.time()
    data = _locate(recipe.data)
    train_set = load_split(data, "train")
    side = train_set.images.shape[-1]                                            # the data's own size
    images = _as_float(train_set, recipe.resolution)                             # (N, 3, S, S)
    val_images = _as_float(load_split(data, "val"), recipe.resolution)
    vae_cfg = vae_config(recipe.vae_factor, recipe.latent_channels, recipe.resolution)
    unet_cfg = unet_config(recipe.vae_factor, recipe.latent_channels, recipe.resolution)

    vae = _build(AutoencoderKL, vae_cfg, recipe.seed, 1).to(device)
    vae = train_stage(vae_stage(vae, images, val_images, recipe, side), recipe, out_dir, device)
    vae_seconds = time.time() - t0

    val_psnr = _round_trip_psnr(vae, val_images, side)
    latents = encode_latents(vae, images)                                        # (8N, C, S/f, S/f)
    vae_scale = float(1.0 / latents.std())  # LDM sec. 4.3: unit-variance latents for the UNet
    text_encoder, tokenizer = _text_encoder(recipe.seed, os.path.join(model_dir, "tokenizer"))
    text_encoder.to(device)
    cond = caption_embeddings(text_encoder, tokenizer, recipe.caption)           # (2, 77, D)
    parts = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
             "scheduler": DDIMScheduler(**MINI_SCHEDULER), "vae_scale": vae_scale}
    unet = _build(UNet2DConditionModel, unet_cfg, recipe.seed, 2).to(device)
    unet = train_stage(unet_stage(unet, latents * vae_scale, cond, parts, recipe), recipe, out_dir, device)

    write_sd_folder(model_dir, unet.cpu(), unet_cfg, vae.cpu(), {**vae_cfg, "scaling_factor": vae_scale},
                    text_encoder.cpu(), MINI_SCHEDULER)
    info = {"recipe": asdict(recipe), "command": command, "fingerprint": fingerprint(model_dir),
            "vae_scale": vae_scale, "n_train": len(images), "image_size": side, "sample_steps": SAMPLE_STEPS,
            "guidance": SAMPLE_GUIDANCE, "vae_val_psnr_db": round(val_psnr, 2), "device": str(device),
            "torch_threads": torch.get_num_threads(), "wall_seconds": round(time.time() - t0, 1),
            "vae_seconds": round(vae_seconds, 1)}
    write_text(os.path.join(model_dir, "MODEL_CARD.md"), model_card(info))
    write_json(os.path.join(model_dir, RUN_JSON), info)
    return model_dir


def fingerprint(model_dir):
    """sha256 over the sha256 of each weights file: equal fingerprints, equal networks."""
    outer = hashlib.sha256()
    for rel in WEIGHTS:
        with open(os.path.join(model_dir, rel), "rb") as f:
            outer.update(hashlib.sha256(f.read()).hexdigest().encode())
    return outer.hexdigest()


def model_card(info):
    r = info["recipe"]
    return f"""# medsynth-mini

A small Stable Diffusion (our AutoencoderKL + UNet2DConditionModel, a random frozen
transformers CLIPTextModel, the byte-level tokenizer, DDIM) pretrained from scratch by
medsynth's `pretrain.py` on real PathMNIST images, with one generic caption
("{r['caption']}", dropped to "" with probability {r['caption_dropout']}). It knows what
H&E tissue looks like but not the nine classes: LoRA teaches those (`train_lora.py`).

- data: `{r['data']}`, train split, {info['n_train']} images of {info['image_size']} px, taken to
  {r['resolution']} px by the size path (x8 rotations/flips); images are made at {r['resolution']} px
  and cut back to {info['image_size']} px
- VAE: {r['vae_factor']}x per side, {r['latent_channels']} latent channels: latents of
  {r['latent_channels']} x {r['resolution'] // r['vae_factor']} x {r['resolution'] // r['vae_factor']}
- command: `{info['command']}`
- wall time: {info['wall_seconds'] / 60:.1f} min ({info['vae_seconds'] / 60:.1f} min VAE) on {info['device']},
  {info['torch_threads']} threads
- VAE scaling factor (1 / std of the training latents): {info['vae_scale']:.5f}; VAE round trip on
  the val split (size path included): PSNR {info['vae_val_psnr_db']:.2f} dB
- sampling defaults (sample_validated.py uses them when no LoRA says otherwise): {info['sample_steps']}
  DDIM steps, guidance {info['guidance']}
- fingerprint (sha256 over the sha256 of unet, vae and text_encoder weights): `{info['fingerprint']}`
  The same command gives the same fingerprint on the same kind of CPU with the same thread
  count (float sums depend on both).

Licence of the data: PathMNIST, CC BY 4.0 (Kather et al. 2018; Yang et al. 2023).
"""


def _check(recipe):
    for name in ("vae_steps", "vae_batch_size", "latent_channels", "unet_steps", "unet_batch_size", "save_every",
                 "sample_every", "resolution", "vae_lr", "unet_lr", "max_grad_norm"):
        if getattr(recipe, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(recipe, name)}: must be positive")
    for name in ("kl_weight", "snr_gamma", "warmup_steps", "weight_decay"):
        if getattr(recipe, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(recipe, name)}: must not be negative")
    if not 0 <= recipe.ema_decay < 1:
        raise UserError(f"--ema-decay {recipe.ema_decay}: must be in [0, 1)")
    if recipe.vae_factor not in LEVELS:
        raise UserError(f"--vae-factor {recipe.vae_factor}: use one of {', '.join(map(str, sorted(LEVELS)))}")
    # the UNet halves the latent side at every level but the last
    need = recipe.vae_factor * 2 ** (len(LEVELS[recipe.vae_factor]["unet"]) - 1)
    if recipe.resolution % need:
        raise UserError(f"--resolution {recipe.resolution}: must be a multiple of {need} (VAE factor x UNet levels)")
    if not 0 <= recipe.caption_dropout <= 1:
        raise UserError(f"--caption-dropout {recipe.caption_dropout}: must be in [0, 1]")


def _finished(model_dir, recipe, overwrite):
    info = read_json(os.path.join(model_dir, RUN_JSON), missing_ok=True)
    if info is None or overwrite:
        return False
    if info["recipe"] != asdict(recipe):
        changed = [k for k, v in asdict(recipe).items() if info["recipe"].get(k) != v]
        raise UserError(f"{model_dir} was pretrained with other settings ({', '.join(changed)}): "
                        f"pass --overwrite or choose another --out")
    return True


def _locate(spec):
    """The bundled default data is named relative to the repository, so the command works from any
    working directory; anything else is passed on as given."""
    bundled = os.path.join(REPO, spec)
    return bundled if not os.path.exists(spec) and os.path.exists(bundled) else spec


def _as_float(image_set, size):
    """uint8 (N, 3, s, s) -> float (N, 3, size, size) in [-1, 1], through the size path."""
    return to_model_size(image_set.images.float() / 255, size) * 2 - 1


@torch.no_grad()
def _round_trip_psnr(vae, images, side):
    """Mean PSNR (dB, peak 1) of the val images after the VAE, both cut to the data's own size."""
    x = images.to(next(vae.parameters()).device)
    rec = vae.decode(vae.encode(x)[0]).float().clamp(-1, 1)
    err = ((from_model_size(rec, side) - from_model_size(x, side)) / 2).pow(2).mean((1, 2, 3)).clamp(min=1e-10)
    return float((10 * torch.log10(1 / err)).mean())


def _build(cls, config, seed, part):
    """A freshly initialised network whose weights depend only on (seed, part)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(step_seed(seed, 20, part))
        return cls(**config)


def _text_encoder(seed, tokenizer_dir):
    """The random, frozen CLIP text encoder and the byte-level tokenizer (written to disk first:
    transformers loads tokenizers from files)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    make_tiny_tokenizer(tokenizer_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(step_seed(seed, 20, 3))
        text_encoder = CLIPTextModel(CLIPTextConfig(**MINI_CLIP, architectures=["CLIPTextModel"]))
    return text_encoder.eval().requires_grad_(False), CLIPTokenizer.from_pretrained(tokenizer_dir)
