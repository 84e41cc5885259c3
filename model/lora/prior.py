"""Prior preservation (DreamBooth, Ruiz et al. 2023, sec. 3.3) for the LoRA loop: the identifier
prompts, and the class-prior images the base model generates once.

DreamBooth binds a subject to a rare identifier in its prompt ("a [V] dog") and keeps what the
model knew of the bare class ("a dog") by training, beside every batch of subject images, on
images the frozen base model made from the class prompt (eq. 2, here with the checkpoint's target):
    L = E || unet(x_t, t, c_inst) - target ||^2 + lambda E || unet(x'_t', t', c_prior) - target' ||^2
Here every class is a subject. Its instance prompt is the plain recipe's class prompt with the
class's own identifier before the class description ("... colorectal sks adipose tissue"); its
prior prompt is that class prompt as it is ("... colorectal adipose tissue"). The prior prompt
keeps the class description, rather than one generic "a histopathology image of tissue" for all
classes, because that is DreamBooth's construction: the prior prompt names the coarse class the
identifier refines, so the class words keep the base model's meaning (the language drift sec. 3.3
guards against) and the identifier alone carries what the real images add. It also keeps the
comparison clean: plain and prior runs see the same class words and differ by the identifier and
the prior term only.

The identifiers are rare words that SD1.5's CLIP BPE (bpe_simple_vocab_16e6, 49,408 tokens) keeps
as one token each, token ids 44,758-49,053 (BPE learns its merges most frequent first, so late
ids are rare words): a single embedding for the LoRA to re-purpose, carrying little meaning of
its own to unlearn, as DreamBooth's rare-token choice asks. medsynth-mini's and tiny's byte-level
tokenizer splits every word into characters; there they are just distinct strings.

The prior set, OUT/prior-<key>/ (key: a hash of everything the images depend on: base model,
prompts, count, resolution, DDIM steps, guidance, seed, precision; other settings get another
folder and the training checkpoint, whose settings differ too, is refused):
  prior.json              those settings, for the reader
  images/<class>/<class>_<j>.png   image j of each class from seed step_seed(seed, PRIOR_IMAGES,
                          class, j), made in fixed chunks of CHUNK, every PNG written atomically;
                          a rerun remakes only chunks with a PNG missing (the same chunks, so the
                          same floats as an uninterrupted run)
  latents/                the PNGs through the VAE encoder, a latent cache (model/lora/latent_cache.py)
                          that the loop reads as it reads the real images' latents
"""
import os
import time

import torch
from tqdm import tqdm

from model.data import DEFAULT_PROMPT_TEMPLATE, ImageSet, class_prompts, read_image
from model.io import UserError, save_png, write_json
from model.lora.latent_cache import build_cache, cache_folder, is_complete, open_cache
from model.objective import PRIOR_IMAGES, step_seed
from model.sd.sampling import generate, to_pil
from model.training import autocast, is_main

# One per class, in class order; each is one token of SD1.5's CLIP vocabulary.
IDENTIFIERS = ("sks", "wwx", "yql", "ygk", "kly", "vaw", "pkk", "olu", "izz",
               "jnu", "wbo", "uwe", "tdp", "nyk", "ohn", "bsu")
CHUNK = 16  # prior images per generate() call; fixed, so a resumed build makes the same floats


def identifier_prompts(classes, template=None):
    """-> (instance prompts, prior prompts), one per class: class c's prompt with IDENTIFIERS[c]
    before its class description (or name), and the class prompt as the plain recipe has it."""
    if len(classes) > len(IDENTIFIERS):
        raise UserError(f"--prior-preservation has identifiers for at most {len(IDENTIFIERS)} classes, "
                        f"the data has {len(classes)}")
    template = template or DEFAULT_PROMPT_TEMPLATE
    instance = [class_prompts([name], _with_identifier(template, ident))[0]
                for name, ident in zip(classes, IDENTIFIERS)]
    return instance, class_prompts(classes, template)


def _with_identifier(template, ident):
    for slot in ("{desc}", "{name}"):
        if slot in template:
            return template.replace(slot, f"{ident} {slot}", 1)
    return f"{template} {ident}"  # a template without the class in it: the identifier is all that differs


def prior_folder(out_dir, recipe, prompts, precision):
    """OUT/prior-<key>: the same on every rank, so none has to be told."""
    return cache_folder(out_dir, prefix="prior", model=recipe.model, prompts=list(prompts),
                        per_class=recipe.prior_images, resolution=recipe.resolution,
                        steps=recipe.sample_steps, guidance=recipe.guidance, seed=recipe.seed,
                        precision=precision)


def prepare_prior(recipe, out_dir, pipe, device, precision, classes, prompts):
    """The prior set's latents (M, 4, h, w) memmap, labels (M,) and info: rank 0 makes whatever
    is missing with `pipe`, which must be the base model (no LoRA yet); the other ranks wait for it
    on the file system (generating for the paper's recipe can outlast a collective's timeout)."""
    folder = prior_folder(out_dir, recipe, prompts, precision)
    latents = os.path.join(folder, "latents")
    if is_main() and not is_complete(latents):
        write_json(os.path.join(folder, "prior.json"), {
            "base_model": recipe.model, "classes": list(classes), "prompts": list(prompts),
            "per_class": recipe.prior_images, "resolution": recipe.resolution,
            "steps": recipe.sample_steps, "guidance": recipe.guidance, "seed": recipe.seed,
            "precision": precision})
        with autocast(device, precision):
            paths, labels = generate_prior_images(folder, pipe, classes, prompts, recipe)
            images = torch.stack([read_image(path) for path in paths])               # (M, 3, R, R) uint8
            data = ImageSet(images, torch.tensor(labels), list(classes), folder, os.path.basename(folder))
            build_cache(latents, data, pipe.vae, pipe.vae_scale, recipe.resolution, show_progress=False)
    while not is_complete(latents):
        time.sleep(2)
    return open_cache(latents)


def generate_prior_images(folder, pipe, classes, prompts, recipe):
    """Make every missing PNG of `folder`/images, chunk by chunk. -> (paths, labels) of all of them."""
    items = [(c, j) for c in range(len(classes)) for j in range(recipe.prior_images)]
    paths = [os.path.join(folder, "images", classes[c], f"{classes[c]}_{j:04d}.png") for c, j in items]
    todo = [k for k in range(0, len(items), CHUNK) if not all(map(os.path.isfile, paths[k:k + CHUNK]))]
    for k in tqdm(todo, desc="prior images", disable=not todo, dynamic_ncols=True):
        part = items[k:k + CHUNK]
        images, _ = generate(pipe, [prompts[c] for c, _ in part],
                             seeds=[step_seed(recipe.seed, PRIOR_IMAGES, c, j) for c, j in part],
                             steps=recipe.sample_steps, guidance=recipe.guidance, eta=0.0,
                             height=recipe.resolution, width=recipe.resolution)   # (b, 3, R, R)
        for path, image in zip(paths[k:k + CHUNK], to_pil(images.float())):
            save_png(path, image)
    return paths, [c for c, _ in items]
