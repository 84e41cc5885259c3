"""The diffusion training objective of the LoRA loop, written for any loop that trains a UNet.

One step (Rombach et al. 2022, LDM eq. 2, with the checkpoint's target):
    x0 = cached VAE latents of a batch,  eps ~ N(0, I) (+ noise offset),  t ~ U{0..T-1}
    x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps                 (DDPM eq. 4)
    loss = w_t * || unet(x_t, t, text(prompt)) - target ||^2,  target = eps | v | x0

With prior preservation (DreamBooth, model/lora/prior.py) each step also trains on a batch of
the base model's class-prior images, with draws of its own (the PRIOR_* streams), and the loss is
L_inst + lambda L_prior (prior_preservation_loss).

Reproducibility is by construction rather than by saved generator state: the samples, noise,
timesteps, offsets and caption drops of step s are drawn from generators seeded with (seed, s)
for the whole global batch, and each rank / micro-batch takes its slice. So a resumed run, and a run split
over N processes, see exactly the batches of an uninterrupted single-process run.
"""
from functools import lru_cache

import numpy as np
import torch

# The independent random streams of step_seed(seed, stream, ...): one per kind of draw. The first
# three are the plain loop's (their numbers fix its batches); the PRIOR_* ones are prior
# preservation's: the prior batch's order and noise, and the seeds of the prior images.
EPOCH_ORDER, NOISE, CAPTION_DROP, PRIOR_ORDER, PRIOR_NOISE, PRIOR_IMAGES = range(6)


def step_seed(*ints):
    """A well-mixed 63-bit seed from a tuple of ints (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(i) for i in ints]).generate_state(2, np.uint64)[0] >> 1)


@lru_cache(maxsize=4)
def _epoch_order(n, seed, epoch, stream):
    return torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(seed, stream, epoch)))


def sample_indices(n, seed, start, count, stream=EPOCH_ORDER):
    """Dataset indices at global sample positions start..start+count-1: each epoch (n positions)
    visits every image once, in a fresh seeded order (sampling without replacement)."""
    return np.array([int(_epoch_order(n, seed, p // n, stream)[p % n]) for p in range(start, start + count)])


def step_noise(seed, step, batch, latent_shape, num_timesteps, stream=NOISE):
    """Noise (B, C, h, w), timesteps (B,) and per-channel offsets (B, C) of one global batch."""
    g = torch.Generator().manual_seed(step_seed(seed, stream, step))
    noise = torch.randn(batch, *latent_shape, generator=g)
    t = torch.randint(0, num_timesteps, (batch,), generator=g)
    offset = torch.randn(batch, latent_shape[0], generator=g)
    return noise, t, offset


def caption_dropout_mask(seed, step, batch, p):
    """(B,) bool: the samples of step's global batch that train on the empty prompt "" instead of
    their class prompt, each with probability p. The model so also learns the unconditional
    prediction that classifier-free guidance extrapolates away from."""
    g = torch.Generator().manual_seed(step_seed(seed, CAPTION_DROP, step))
    return torch.rand(batch, generator=g) < p


def snr_weights(alphas_cumprod, t, gamma, prediction_type):
    """Min-SNR-gamma (Hang et al. 2023): weight each sample's loss, measured in x0-space, by
    min(SNR_t, gamma), SNR_t = a_t / (1 - a_t). In the space of the network's own target that is
    min(SNR, g)/SNR for eps (||eps - eps^||^2 = SNR ||x0 - x0^||^2), min(SNR, g)/(SNR + 1) for v
    (||v - v^||^2 = (SNR + 1) ||x0 - x0^||^2) and min(SNR, g) for x0 itself."""
    a = alphas_cumprod.to(t.device)[t]
    snr = a / (1 - a)
    w = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return w / snr.clamp(min=1e-12)   # zero-terminal-SNR step: weight 0, not 0/0
    if prediction_type == "v_prediction":
        return w / (snr + 1)
    return w


def per_sample_loss(unet, scheduler, x0, cond, noise, t, offset, noise_offset, snr_gamma):
    """(b,) (weighted) MSE of the UNet's prediction for each sample of a micro-batch; x0 (b, C, h, w)."""
    if noise_offset:
        # Offset noise (Guttenberg 2023): a per-image, per-channel constant shift lets the model
        # change an image's mean brightness/colour, which zero-mean noise never teaches it.
        noise = noise + noise_offset * offset[:, :, None, None]
    x_t = scheduler.add_noise(x0, noise, t)
    kind = scheduler.prediction_type
    target = noise if kind == "epsilon" else x0 if kind == "sample" else scheduler.get_velocity(x0, noise, t)
    pred = unet(x_t, t, cond)
    per_sample = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))   # (b,)
    if snr_gamma:
        per_sample = per_sample * snr_weights(scheduler.alphas_cumprod, t, snr_gamma, kind)
    return per_sample


def diffusion_loss(unet, scheduler, x0, cond, noise, t, offset, noise_offset, snr_gamma):
    """Mean (weighted) MSE of the UNet's prediction for one micro-batch; x0 (b, C, h, w)."""
    return per_sample_loss(unet, scheduler, x0, cond, noise, t, offset, noise_offset, snr_gamma).mean()


def prior_preservation_loss(per_sample, n_instance, weight):
    """DreamBooth's objective (Ruiz et al. 2023, eq. 2): the instance loss plus `weight` (lambda)
    times the class-prior loss, each the mean over its own samples. per_sample (b_inst + b_prior,)
    holds the instance samples first. -> (3,): L_inst + lambda L_prior, L_inst, L_prior."""
    instance, prior = per_sample[:n_instance].mean(), per_sample[n_instance:].mean()
    return torch.stack([instance + weight * prior, instance, prior])
