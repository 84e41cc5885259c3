"""What makes the reject loop's candidates. One small interface, so the loop (manifest, resume,
torchrun, bit-exact replay) is the same whatever the generator:

    images, kept, extras = generator(classes, seeds, check=None)

classes and seeds: the batch's prompted class indices and noise seeds (B each); images (K, 3, H, W)
float in [0, 1] of the K candidates not dropped; kept (K,) their batch positions; extras: one dict
per batch position of extra manifest columns. Image k must be a function of (classes[k], seeds[k])
and the generator's settings only. `check(step, images) -> keep-mask or None` is the loop's early
rejection, offered the decoded x0 estimates of the candidates alive after DDIM step `step`
(generators without steps ignore it). `costs(rows)` counts the network evaluations the manifest
rows spent.

- SDGenerator: Stable Diffusion (+ LoRA): text-to-image; image-to-image from real images (SDEdit);
  classifier guidance.
- GANGenerator: a train_gan.py checkpoint.
"""
import math

import torch

from model.data import from_model_size
from model.reject.guidance import ClassifierGradient
from model.sd.sampling import decode_latents, encode_prompts, generate, start_step


def class_embeddings(pipe, prompts, negative_prompt):
    """Each class prompt encoded on its own (batch of 1), so its embedding does not depend on which
    other classes a run asks for. -> ({class: (1, 77, D)}, negative (1, 77, D))"""
    embeds = {c: encode_prompts(pipe, [p]) for c, p in prompts.items()}
    return embeds, encode_prompts(pipe, [negative_prompt])


def steps_run(settings):
    """DDIM steps each candidate takes: all of them, or SDEdit's last part (model.sd.sampling)."""
    return settings.steps - start_step(settings.steps, settings.strength) if settings.init_images else settings.steps


def early_check_step(settings):
    """0-based schedule index of the DDIM step after which the early check runs (None when off):
    after the fraction early_reject_at of the steps the candidate runs."""
    if not settings.early_reject_at:
        return None
    n = steps_run(settings)
    first = settings.steps - n
    return first + min(n - 1, max(0, math.ceil(settings.early_reject_at * n) - 1))


class SDGenerator:
    kind = "sd"

    def __init__(self, pipe, prompts, settings, classifier=None, init_images=None):
        self.pipe, self.settings, self.init_images = pipe, settings, init_images
        self.classifier = classifier if settings.classifier_guidance > 0 else None
        self.embeds, self.negative = class_embeddings(pipe, prompts, settings.negative_prompt)

    def decode(self, latents):
        return cut(decode_latents(self.pipe, latents), self.settings)

    def __call__(self, classes, seeds, check=None):
        s = self.settings
        init, names = None, [None] * len(seeds)
        if self.init_images is not None:
            init, names = self.init_images.latents(self.pipe, classes, seeds, s.height, s.width)
        at = early_check_step(s)

        def on_ddim_step(step, t, pred_x0):  # pred_x0: (K, 4, h, w) latents of the alive ones
            return check(step, self.decode(pred_x0)) if check is not None and step == at else None

        grad = (ClassifierGradient(self.pipe, self.classifier, classes, s.image_size)
                if self.classifier is not None else None)
        images, kept = generate(
            self.pipe, None, seeds, steps=s.steps, guidance=s.guidance, eta=s.eta, height=s.height,
            width=s.width, prompt_embeds=torch.cat([self.embeds[c] for c in classes]),  # (B, 77, D)
            negative_embeds=self.negative, on_ddim_step=on_ddim_step, init_latents=init,
            strength=s.strength, grad_log_p=grad, classifier_guidance=s.classifier_guidance)
        return cut(images, s), kept, [{"init_image": n} for n in names]


class GANGenerator:
    """A model.gan checkpoint: one forward of G per candidate, no steps (so no early check)."""
    kind = "gan"

    def __init__(self, gan, settings):
        self.gan, self.settings = gan, settings

    def __call__(self, classes, seeds, check=None):
        images = self.gan.sample(list(classes), list(seeds)).float().cpu()  # (B, 3, R, R)
        return cut(images, self.settings), torch.arange(len(seeds)), [{} for _ in seeds]


def cut(images, settings):
    """(K, 3, H, W) images as made -> (K, 3, S, S) at the data's own size S (the size path back,
    model/data.py: a centre crop of the padding), which is what the validator judges and the run
    keeps; unchanged when the run keeps images as made (image_size 0)."""
    return from_model_size(images, settings.image_size) if settings.image_size else images


def spent(rows, settings):
    """UNet, VAE and GAN evaluations the manifest rows spent (one image through a network once = 1;
    a classifier-free guided UNet step is 2). Early rejection: a dropped candidate stops after the
    check step and skips its final decode; each check decodes the candidates alive once.
    Image-to-image: one encode per candidate. Classifier guidance: one differentiable decode per
    alive candidate per step (its backward pass is not counted)."""
    if settings.generator == "gan":
        return {"unet_evals": 0, "vae_evals": 0, "generator_evals": len(rows)}
    s = settings
    per_step, n, at = (2 if s.guidance != 1.0 else 1), steps_run(s), early_check_step(s)
    dropped = sum(1 for r in rows if r.get("early_dropped") == 1)
    checked = sum(1 for r in rows if r.get("early_dropped") is not None)
    audit = s.audit_early_reject
    steps_short = 0 if at is None or audit else dropped * (s.steps - at - 1)  # steps never run
    unet_steps = len(rows) * n - steps_short
    vae = (len(rows) - (0 if audit else dropped)) + checked   # final decodes + check decodes
    vae += len(rows) if s.init_images else 0                  # one encode of each init image
    vae += unet_steps if s.classifier_guidance > 0 else 0
    return {"unet_evals": unet_steps * per_step, "vae_evals": vae, "generator_evals": 0}
