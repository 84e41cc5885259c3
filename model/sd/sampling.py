"""Text-to-image with Stable Diffusion: CLIP prompt embeddings -> DDIM in latent space -> VAE.

    images, kept = generate(pipe, ["an H&E image of ..."] * 4, seeds=[0, 1, 2, 3])

`pipe` is what model.sd.loader.load_pipeline returns. Reproducibility contract: image i is a
function of (prompt i, seeds[i], settings) only. Every image has its own CPU torch.Generator,
seeded with seeds[i], that draws its initial latents and then, with eta > 0, its fresh noise at
every step; so batch size, batch composition and the device do not change which noise an image
sees (the order of draws is diffusers' with a list of generators, so the two agree).

Early stopping: `on_ddim_step(i, t, pred_x0)` runs after every DDIM step i (timestep t) with the
current x0 estimate of the K candidates still alive, (K, 4, h, w) float32 latents (decode_latents
turns them into images); if it returns a boolean keep-mask of length K, the others are dropped
from the batch right away (no more UNet evaluations for them); None keeps all. `generate` returns
the images of the survivors and `kept`, their positions in the input batch.
"""
import numpy as np
import torch
from PIL import Image

from model.io import UserError


def tokenize(tokenizer, prompts):
    """list of B strings -> BatchEncoding with input_ids (B, 77): every prompt padded to the
    tokenizer's max length (77), longer ones truncated, as SD was trained."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt")


@torch.no_grad()
def encode_prompts(pipe, prompts):
    """list of B strings -> (B, 77, D) CLIP text-encoder last hidden state, as SD conditions on it."""
    tok = tokenize(pipe.tokenizer, prompts)
    te = pipe.text_encoder
    # SD1.x/2.x encoders were trained without a mask (the pad tokens are attended to); a config
    # that asks for one gets it, as in diffusers.
    mask = tok.attention_mask.to(te.device) if getattr(te.config, "use_attention_mask", False) else None
    return te(tok.input_ids.to(te.device), attention_mask=mask)[0]  # (B, 77, D)


def vae_factor(pipe):
    """Pixels per latent cell: the VAE halves the resolution at every level but the last (8 for SD)."""
    return 2 ** (len(pipe.vae.config["block_out_channels"]) - 1)


def _randn(shape, generators, device):
    """One standard-normal (1, *shape) draw per generator, stacked: (len(generators), *shape)."""
    return torch.cat([torch.randn((1, *shape), generator=g) for g in generators]).to(device)


def decode_latents_differentiable(pipe, latents):
    """(B, 4, h, w) scaled latents -> (B, 3, h*f, w*f) float32 (float64 for a float64 VAE) images in
    [0, 1], decoded in the VAE's dtype (latents were multiplied by vae_scale to have unit variance: undo it)."""
    x = pipe.vae.decode((latents / pipe.vae_scale).to(pipe.vae.device, pipe.vae.dtype))
    return (x.to(torch.promote_types(x.dtype, torch.float32)) / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def decode_latents(pipe, latents):
    """decode_latents_differentiable without autograd: what sampling uses."""
    return decode_latents_differentiable(pipe, latents)


def start_step(steps, strength):
    """Index of the first DDIM step an image-to-image run takes: SDEdit (Meng et al. 2022) starts
    from the init image noised to the timestep at fraction `strength` of the schedule and runs the
    last int(steps * strength) steps (diffusers' rounding). strength 1: every step, from x_T."""
    return steps - min(int(steps * strength), steps)


def _initial_latents(scheduler, noise, init_latents, strength, first):
    """x at the first step run: pure noise x_T for text-to-image or strength 1 (so strength 1 is
    text-to-image from the same seed, the init image unused); else the init latents noised to
    that step's timestep, q(x_t | x_0) (DDPM eq. 4); the init itself when no step runs."""
    if init_latents is None or strength >= 1:
        return noise
    init = init_latents.to(noise.device, torch.float32)
    if first >= len(scheduler.timesteps):
        return init
    t = scheduler.timesteps[first].repeat(len(init))
    return scheduler.add_noise(init, noise, t)


def _guided(scheduler, out, latents, t, kept, grad_log_p, scale):
    """Classifier guidance for DDIM, Dhariwal & Nichol 2021, eq. 14 / Algorithm 2:
    eps_hat = eps - scale * sqrt(1 - a_t) * grad_{x_t} log p(y | x_t). The classifier judges the
    decoded x0 estimate; eps is held fixed, so d x0 / d x_t = 1 / sqrt(a_t) and the gradient flows
    through the decoder and classifier only, never back through the UNet. -> guided network output."""
    x0, eps = scheduler.x0_and_eps(out, latents, t)
    alpha_t = scheduler.alphas_cumprod[int(t)]
    grad_xt = grad_log_p(x0, kept) / alpha_t ** 0.5   # (K, 4, h, w)
    return scheduler.output_from_eps(eps - scale * (1 - alpha_t) ** 0.5 * grad_xt, latents, t)


@torch.no_grad()
def generate(pipe, prompts, seeds, steps=20, guidance=7.5, eta=0.0, height=256, width=256,
             negative_prompt="", on_ddim_step=None, prompt_embeds=None, negative_embeds=None,
             init_latents=None, strength=1.0, grad_log_p=None, classifier_guidance=0.0):
    """Sample one image per (prompt, seed). Returns (images, kept):
    images (K, 3, height, width) float32 in [0, 1]; kept (K,) int64 input positions of the K
    candidates on_ddim_step did not drop (all of them without it).

    prompt_embeds (B, 77, D) / negative_embeds (1 or B, 77, D): precomputed encode_prompts()
    outputs that replace `prompts` / `negative_prompt` (pass prompts=None then).
    guidance: classifier-free guidance weight w (Ho & Salimans 2022):
    eps = eps_uncond + w (eps_cond - eps_uncond); w = 1 is the plain conditional model.
    init_latents (B, 4, h, w) scaled VAE latents + strength in [0, 1]: image-to-image (SDEdit,
    see start_step); strength 0 returns the init images decoded.
    grad_log_p(x0 (K, 4, h, w), kept) -> d log p(y | x0) / d x0 for the K candidates alive, with
    classifier_guidance > 0: classifier guidance (see _guided).
    """
    seeds = [int(s) for s in seeds]
    factor = vae_factor(pipe)
    if height % factor or width % factor or height <= 0 or width <= 0:
        raise UserError(f"height and width must be positive multiples of {factor}, got {height}x{width}")
    B, unet, scheduler = len(seeds), pipe.unet, pipe.scheduler
    use_cfg = guidance != 1.0
    cond, uncond = _conditioning(pipe, prompts, seeds, prompt_embeds, negative_embeds, negative_prompt, use_cfg)

    generators = [torch.Generator().manual_seed(s) for s in seeds]
    shape = (unet.config["in_channels"], height // factor, width // factor)
    scheduler.set_timesteps(steps)
    first = start_step(steps, strength) if init_latents is not None else 0
    # The DDIM state stays in float32 whatever the UNet dtype: the update subtracts nearly equal
    # terms at small t, where float16 would lose the image. DDIM starts from x_T ~ N(0, I).
    latents = _initial_latents(scheduler, _randn(shape, generators, unet.device),
                               init_latents, strength, first)  # (B, 4, H/factor, W/factor)
    kept = torch.arange(B)
    for i, t in enumerate(scheduler.timesteps[first:].tolist(), start=first):
        if use_cfg:  # one UNet call on [uncond; cond]
            out = unet(torch.cat([latents, latents]).to(unet.dtype), t,
                       encoder_hidden_states=torch.cat([uncond[kept], cond[kept]])).float()
            out_uncond, out_cond = out.chunk(2)  # (K, 4, h, w) each
            out = out_uncond + guidance * (out_cond - out_uncond)
        else:
            out = unet(latents.to(unet.dtype), t, encoder_hidden_states=cond[kept]).float()
        if classifier_guidance > 0 and grad_log_p is not None:
            out = _guided(scheduler, out, latents, t, kept, grad_log_p, classifier_guidance)
        noise = _randn(shape, [generators[j] for j in kept.tolist()], unet.device) if eta > 0 else None
        latents, pred_x0 = scheduler.step(out, t, latents, eta=eta, noise=noise)
        if on_ddim_step is not None:
            latents, kept = _apply_keep(on_ddim_step(i, t, pred_x0), latents, kept)
            if len(kept) == 0:
                return torch.zeros(0, 3, height, width), kept
    return decode_latents(pipe, latents), kept


def _conditioning(pipe, prompts, seeds, prompt_embeds, negative_embeds, negative_prompt, use_cfg):
    """The UNet's text conditioning: (cond (B, 77, D), uncond (B, 77, D) or None without CFG),
    encoded from the prompts unless precomputed embeddings are given."""
    if prompt_embeds is None:
        if prompts is None or len(prompts) != len(seeds):
            raise UserError(f"need one prompt per seed, got {0 if prompts is None else len(prompts)} "
                            f"prompts for {len(seeds)} seeds")
        prompt_embeds = encode_prompts(pipe, prompts)
    elif len(prompt_embeds) != len(seeds):
        raise UserError(f"need one prompt embedding per seed, got {len(prompt_embeds)} "
                        f"for {len(seeds)} seeds")
    unet = pipe.unet
    cond = prompt_embeds.to(unet.device, unet.dtype)  # (B, 77, D)
    if not use_cfg:
        return cond, None
    if negative_embeds is None:
        negative_embeds = encode_prompts(pipe, [negative_prompt])
    return cond, negative_embeds.to(unet.device, unet.dtype).expand_as(cond)  # (B, 77, D)


def _apply_keep(keep, latents, kept):
    """Drop the candidates an on_ddim_step keep-mask (or None: keep all) rules out."""
    if keep is None:
        return latents, kept
    keep = torch.as_tensor(keep, dtype=torch.bool, device=latents.device)
    if keep.shape != (len(kept),):
        raise ValueError(f"on_ddim_step's keep-mask must have shape ({len(kept)},), got {tuple(keep.shape)}")
    return latents[keep], kept[keep.cpu()]


@torch.no_grad()
def encode_images(pipe, images):
    """(B, 3, H, W) float images in [0, 1] -> (B, 4, H/f, W/f) scaled latents: the VAE posterior's
    mean (deterministic, so an init image always gives the same latents) times vae_scale."""
    vae = pipe.vae
    mean, _ = vae.encode((images * 2 - 1).to(vae.device, vae.dtype))
    return mean.float() * pipe.vae_scale


def to_pil(images):
    """(B, 3, H, W) float in [0, 1] -> list of B RGB PIL images (rounded to 8 bits)."""
    arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round()
    return [Image.fromarray(a) for a in arr.astype(np.uint8)]
