"""The two pretraining stages of medsynth-mini as `loop.Stage`s: what each one's loss and sample
grid are. Every random draw of step s comes from generators seeded with (seed, s).

Stage 1, the VAE (LDM's "KL-reg" autoencoder, Rombach et al. 2022 sec. 3):
    z = mu + sigma * e,  loss = |x - D(z)|_1 + |x - D(z)|_2^2 + w_kl * KL(N(mu, sigma) || N(0, I))
with the KL summed over latent elements and divided by the pixel count, so `kl_weight` 1e-6 is
SD's own weight. Stage 2, the UNet: epsilon prediction (objective.py) on the VAE's latents,
scaled to unit variance (LDM sec. 4.3), conditioned on one generic caption, dropped to "" with
probability `caption_dropout` so that classifier-free guidance has an unconditional branch.
"""
import torch
import torch.nn.functional as F

from model.data import from_model_size
from model.mini.loop import Stage
from model.objective import caption_dropout_mask, diffusion_loss, sample_indices, step_noise, step_seed
from model.plots import image_grid
from model.sd.loader import Pipeline
from model.sd.sampling import encode_prompts, generate, to_pil

GRID_CELL = 64     # px per image in the sample grids (the images are 32 px)
GRID_SEEDS = 16    # images per UNet sample grid
# How the base model is sampled: its grids here, and sample_validated.py's defaults for it (the
# model card records them; a LoRA records its own).
SAMPLE_STEPS, SAMPLE_GUIDANCE = 25, 2.0


def dihedral(x, k):
    """Each image of x (B, C, H, W) turned by one of the 8 rotations/flips k (B,) in 0..7; tissue
    has no orientation, so these are 8 equally real images."""
    out = x.clone()
    for code in range(8):
        sel = k == code
        if sel.any():
            y = torch.rot90(x[sel], code % 4, dims=(2, 3))
            out[sel] = torch.flip(y, dims=(3,)) if code >= 4 else y
    return out


def vae_stage(vae, images, val_images, recipe, side):
    """images, val_images: (N, 3, S, S) float in [-1, 1], data images of `side` px taken to S by the
    size path. The reconstruction loss counts only the data's own pixels (the centre `side` x
    `side`): the padding is cut off every image the model makes, so it earns no capacity."""
    n, pixels = len(images), images[0].numel()

    def loss(step):
        g = torch.Generator().manual_seed(step_seed(recipe.seed, 10, step))
        idx = sample_indices(n, recipe.seed, step * recipe.vae_batch_size, recipe.vae_batch_size)
        x = dihedral(images[idx], torch.randint(0, 8, (len(idx),), generator=g))
        x = x.to(next(vae.parameters()).device)
        mean, logvar = vae.encode(x)                                     # (B, C, S/f, S/f) each
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=g).to(x.device)
        rec = from_model_size(vae.decode(z).float(), side)               # (B, 3, side, side)
        x = from_model_size(x, side)
        kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1 - logvar.float()).sum((1, 2, 3))
        return F.l1_loss(rec, x) + F.mse_loss(rec, x) + recipe.kl_weight * kl.mean() / pixels

    @torch.no_grad()
    def grid(ema, step):
        x = val_images[:8].to(next(ema.parameters()).device)
        rec = ema.decode(ema.encode(x)[0]).float()
        pils = to_pil(torch.cat([x, rec]) / 2 + 0.5)
        return image_grid(pils, 8, row_labels=["val", "recon"], cell=GRID_CELL)

    return Stage("vae", vae, recipe.vae_steps, recipe.vae_lr, loss, grid, settings=stage_settings(recipe, "vae"))


def unet_stage(unet, latents, cond, parts, recipe):
    """latents (M, C, h, w), already scaled; cond (2, 77, D): the caption's and ""'s embeddings;
    `parts` the frozen rest of the pipeline (vae, text_encoder, tokenizer, scheduler, vae_scale)
    for the sample grid."""
    scheduler = parts["scheduler"]
    n, batch = len(latents), recipe.unet_batch_size

    def loss(step):
        device = next(unet.parameters()).device
        idx = sample_indices(n, recipe.seed, step * batch, batch)
        noise, t, offset = step_noise(recipe.seed, step, batch, latents.shape[1:],
                                      scheduler.num_train_timesteps)
        dropped = caption_dropout_mask(recipe.seed, step, batch, recipe.caption_dropout).long()  # 1: ""
        return diffusion_loss(unet, scheduler, latents[idx].to(device), cond[dropped].to(device),
                              noise.to(device), t.to(device), offset.to(device), 0.0, recipe.snr_gamma)

    @torch.no_grad()
    def grid(ema, step):
        pipe = Pipeline(unet=ema, prediction_type="epsilon", kind="sd1", **parts)
        images, _ = generate(pipe, [recipe.caption] * GRID_SEEDS, list(range(GRID_SEEDS)), steps=SAMPLE_STEPS,
                             guidance=SAMPLE_GUIDANCE, height=recipe.resolution, width=recipe.resolution)
        return image_grid(to_pil(images), 8, cell=GRID_CELL)

    return Stage("unet", unet, recipe.unet_steps, recipe.unet_lr, loss, grid, settings=stage_settings(recipe, "unet"))


def stage_settings(recipe, stage):
    """The recipe fields that fix a stage's trajectory (the UNet's depend on the VAE's too)."""
    shared = ("data", "resolution", "seed", "warmup_steps", "weight_decay", "max_grad_norm", "ema_decay")
    vae = ("vae_steps", "vae_batch_size", "vae_lr", "kl_weight", "vae_factor", "latent_channels")
    unet = ("unet_steps", "unet_batch_size", "unet_lr", "snr_gamma", "caption", "caption_dropout")
    keys = shared + vae + (unet if stage == "unet" else ())
    return {k: getattr(recipe, k) for k in keys}


@torch.no_grad()
def encode_latents(vae, images, batch=256):
    """(N, 3, S, S) in [-1, 1] -> (8N, C, S/f, S/f) posterior means of every image under each of
    the 8 rotations/flips (the UNet's training set, computed once)."""
    device = next(vae.parameters()).device
    out = []
    for code in range(8):
        for lo in range(0, len(images), batch):
            x = dihedral(images[lo:lo + batch], torch.full((len(images[lo:lo + batch]),), code))
            out.append(vae.encode(x.to(device))[0].float().cpu())
    return torch.cat(out)


@torch.no_grad()
def caption_embeddings(text_encoder, tokenizer, caption):
    """(2, 77, D): the caption's embedding, then the empty prompt's (the dropped caption)."""
    holder = Pipeline(unet=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer,
                      scheduler=None, vae_scale=1.0, prediction_type="epsilon", kind="sd1")
    return encode_prompts(holder, [caption, ""]).float()
