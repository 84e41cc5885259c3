"""The LoRA fine-tuning loop behind train_lora.py: `train(recipe, out_dir)`.

One step (Rombach et al. 2022, LDM eq. 2; the objective is model/objective.py):
    x0 = cached VAE latents of a batch,  c = text(class prompt), or text("") with probability
         recipe.caption_dropout, so the model also learns the unconditional branch that
         classifier-free guidance pushes against
    loss = w_t * || unet(x_t, t, c) - target ||^2,  target = eps | v | x0 (the checkpoint's)
Only the LoRA matrices train (AdamW, warm-up + cosine LR, gradient clipping). Every draw of step s
(samples, noise, timesteps, offsets, caption drops) is seeded by (seed, s) for the whole global
batch and each rank / micro-batch takes its slice, so a resumed run and a run over N processes
see exactly the batches of one uninterrupted process.

With recipe.prior_preservation (DreamBooth, model/lora/prior.py) the class prompts carry a rare
identifier each, the base model first generates a class-prior set from the plain class prompts,
and every micro-batch pairs its instance samples with as many prior ones, drawn from streams of
their own (objective.PRIOR_ORDER / PRIOR_NOISE, so a plain run's draws are untouched):
    loss = L_inst + lambda L_prior      (DreamBooth eq. 2, lambda = recipe.prior_loss_weight)
The prior samples always see their class prompt (no caption dropout).

Read in this order: `train`, the loop `_train`, then what it calls: `plan_run` (fresh, resume or
done), `_setup` (model, latent cache, LoRA, optimizer), `_resume`, `_train_step`, `_after_step`
(validation grid, loss log, conditioning check, checkpoint).

Outputs in out_dir: lora.safetensors (final), lora-<step>.safetensors and checkpoint-<step>.pt
every save_every steps (the .pt resumes: LoRA, optimizer, grad scaler, step, RNG, loss log),
loss.csv + loss.png, samples/step-<step>.png validation grids, conditioning.csv + .png (a diffusion
classifier on val images at step 0 and every checkpoint), latents-<key>/ the latent cache,
prior-<key>/ the prior images and their latents (prior preservation only).
"""
import glob
import math
import os
import re
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from model.data import class_prompts
from model.eval.conditioning import lora_conditioning_log
from model.io import UserError, load_torch, save_png, save_torch, write_csv
from model.lora import files as LF, layers as L
from model.lora.latent_cache import prepare_latents
from model.lora.prior import identifier_prompts, prepare_prior
from model.lora.recipe import LoRARecipe, checked
from model.objective import (PRIOR_NOISE, PRIOR_ORDER, caption_dropout_mask, diffusion_loss, per_sample_loss,
                             prior_preservation_loss, sample_indices, step_noise)
from model.plots import image_grid, line_plot
from model.sd.loader import load_pipeline
from model.sd.sampling import generate, to_pil, tokenize
from model.training import (all_reduce_mean, autocast, cleanup_distributed, grad_scaler, init_distributed,
                            is_main, lr_at, pick_device, precision_dtype, resolve_precision, rng_state,
                            set_rng_state, set_seed, share_from_main)

# Settings that determine the training trajectory: a checkpoint only resumes under equal ones.
# (Not the outputs' schedules, nor the conditioning check's budget: it draws from no RNG the training uses.)
RUN_KEYS = ("model", "data", "few_shot", "prompt_template", "resolution", "targets", "rank",
            "alpha", "lora_dropout", "max_steps", "global_batch", "lr", "min_lr", "warmup_steps",
            "weight_decay", "max_grad_norm", "noise_offset", "snr_gamma", "caption_dropout", "seed")
# ... and, with prior preservation only (a plain run's settings are what they always were), these:
# the prior images are made with the grid's sampler, so its steps and guidance shape them too.
PRIOR_KEYS = ("prior_preservation", "prior_loss_weight", "prior_images", "sample_steps", "guidance")
OUR_FILES = ("lora.safetensors", "lora-*.safetensors", "checkpoint-*.pt", "loss.csv", "loss.png",
             "conditioning.csv", "conditioning.png", os.path.join("samples", "step-*.png"))
LOG_EVERY = 25


@dataclass
class Run:
    """Everything a step needs, fixed for the whole run."""
    recipe: LoRARecipe
    out_dir: str
    device: torch.device
    precision: str            # "no" | "fp16" | "bf16", resolved for `device`
    rank: int                 # this process among `world` (torchrun), 0 of 1 otherwise
    world: int
    settings: dict            # the RUN_KEYS values a checkpoint must match to resume
    pipe: object              # model.sd.loader.Pipeline with the LoRA injected
    params: dict              # {"unet.<module>.lora_down": trainable float32 parameter, ...}
    train_text: bool          # the text encoder has LoRA layers too, so it runs every step
    latents: np.ndarray       # (N, 4, h, w) cached VAE latents, memory-mapped
    labels: np.ndarray        # (N,) class indices
    info: dict                # the cache's info.json: classes, data source and fingerprint
    prompts: list             # one per class (with prior preservation: the identifier prompts)
    ids: torch.Tensor         # (n_classes + 1 [+ n_classes], 77) token ids: the class prompts, "" [, prior prompts]
    frozen_states: torch.Tensor | None  # (len(ids), 77, D) their text states, if the encoder is frozen
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    prior_latents: np.ndarray | None = None   # (M, 4, h, w) the class-prior images' latents, memory-mapped
    prior_labels: np.ndarray | None = None    # (M,) their class indices
    conditioning: object = None               # model.eval.conditioning.ConditioningLog (rank 0), or None


def train(recipe, out_dir, overwrite=False, resume=None):
    """Train `recipe`'s LoRA into `out_dir`. A finished run with equal settings is left alone and
    one with other settings needs `overwrite`; an unfinished one resumes from its newest
    checkpoint (or from `resume`, a checkpoint path). Under torchrun every rank calls this."""
    recipe = checked(recipe)
    device = pick_device(recipe.device)
    precision = resolve_precision(device, recipe.mixed_precision)  # an error now, not after loading
    rank, world = init_distributed(device)
    try:
        _train(recipe, out_dir, device, precision, rank, world, overwrite, resume)
    finally:
        cleanup_distributed()


def _train(recipe, out_dir, device, precision, rank, world, overwrite, resume):
    settings = run_settings(recipe, world)
    status, detail = share_from_main(plan_run(out_dir, settings, overwrite, resume) if is_main() else None)
    if status == "done":
        if is_main():
            print(detail)
        return
    set_seed(recipe.seed)
    run = _setup(recipe, out_dir, device, precision, rank, world, settings)
    start, log = _resume(run, detail) if status == "resume" else (0, [])
    if run.conditioning is not None:  # a fresh run measures the base model first
        run.conditioning.begin(run.pipe, run.ids[:len(run.prompts)], start)

    t0 = time.time() - (log[-1][3] if log else 0.0)
    bar = tqdm(range(start, recipe.max_steps), initial=start, total=recipe.max_steps, desc="lora",
               disable=not is_main(), dynamic_ncols=True)
    for step in bar:
        (loss, *parts), lr = _train_step(run, step)   # parts: [L_inst, L_prior] with prior preservation
        log.append([step + 1, loss, lr, round(time.time() - t0, 3), *parts])
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if is_main():
            _after_step(run, step + 1, log)
    bar.close()
    if is_main():
        _save(run, recipe.max_steps, log, final=True)
        print(f"wrote {os.path.join(out_dir, 'lora.safetensors')} ({recipe.lora_format} format)")


# ------------------------------------------------------------------------ fresh, resume or done

def run_settings(recipe, world):
    settings = {key: getattr(recipe, key) for key in RUN_KEYS if key != "global_batch"}
    settings["global_batch"] = recipe.batch_size * world * recipe.grad_accum
    if recipe.prior_preservation:
        settings.update({key: getattr(recipe, key) for key in PRIOR_KEYS})
    return settings


def _differences(old, new):
    return [f"{k}: {old.get(k)!r} there, {new.get(k)!r} here" for k in RUN_KEYS + PRIOR_KEYS
            if old.get(k) != new.get(k)]


def _checkpoints(out_dir):
    found = glob.glob(os.path.join(out_dir, "checkpoint-*.pt"))
    return sorted(p for p in found if re.fullmatch(r"checkpoint-\d+\.pt", os.path.basename(p)))


def plan_run(out_dir, settings, overwrite=False, resume=None):
    """Rank 0 decides: ("done", message) | ("resume", checkpoint path) | ("fresh", None)."""
    final = os.path.join(out_dir, "lora.safetensors")
    if overwrite:
        for pattern in OUR_FILES:
            for path in glob.glob(os.path.join(out_dir, pattern)):
                os.remove(path)
        return "fresh", None
    hint = "pass --overwrite to start over, or choose another --out"
    if os.path.isfile(final):
        old = LF.load_lora(final)[1].get("settings", {})
        if diff := _differences(old, settings):
            raise UserError(f"{final} was trained with other settings ({diff[0]}); {hint}")
        return "done", f"{final} is already trained with these settings; nothing to do ({hint})"
    path = resume or (_checkpoints(out_dir) or [None])[-1]
    if path is None:
        return "fresh", None
    old = load_torch(path)["settings"]
    if diff := _differences(old, settings):
        raise UserError(f"{path} is from a run with other settings ({diff[0]}); {hint}")
    return "resume", path


# ------------------------------------------------------------------------------------ set-up

def _setup(recipe, out_dir, device, precision, rank, world, settings):
    """Load the model, fill the latent cache, inject the LoRA and build the optimizer."""
    pipe = load_pipeline(recipe.model, device)
    latents, labels, info = prepare_latents(recipe, out_dir, pipe, device, precision)
    prompts, prior_prompts, prior = class_prompts(info["classes"], recipe.prompt_template), [], (None, None)
    if recipe.prior_preservation:  # before the LoRA goes in: the prior images are the base model's
        prompts, prior_prompts = identifier_prompts(info["classes"], recipe.prompt_template)
        prior = prepare_prior(recipe, out_dir, pipe, device, precision, info["classes"], prior_prompts)[:2]
    params, train_text = inject_trainable_lora(recipe, pipe, precision)
    if recipe.grad_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    pipe.unet.train()
    pipe.text_encoder.train(train_text)
    ids = tokenize(pipe.tokenizer, prompts + [""] + prior_prompts).input_ids.to(device)  # (n_classes + 1 [+ n_classes], 77)
    frozen_states = None
    if not train_text:
        with torch.no_grad(), autocast(device, precision):
            frozen_states = pipe.text_encoder(ids)[0].float()                       # (len(ids), 77, D)
    opt = torch.optim.AdamW(list(params.values()), lr=recipe.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=recipe.weight_decay)
    batch = settings["global_batch"]
    if is_main():
        print(f"{len(labels)} training images, {len(prompts)} classes; global batch {batch} = "
              f"{recipe.batch_size} per rank x {world} rank(s) x {recipe.grad_accum} accumulation "
              f"({recipe.max_steps * batch / len(labels):.1f} epochs); device {device}, precision {precision}")
        if recipe.prior_preservation:
            print(f"prior preservation: {len(prior[1])} class-prior images, each step {batch} of them "
                  f"beside the instance batch, weight {recipe.prior_loss_weight}")
    conditioning = lora_conditioning_log(recipe, out_dir, pipe, precision) if is_main() else None
    return Run(recipe, out_dir, device, precision, rank, world, settings, pipe, params, train_text,
               latents, labels, info, prompts, ids, frozen_states, opt, grad_scaler(device, precision), *prior,
               conditioning=conditioning)


def inject_trainable_lora(recipe, pipe, precision):
    """Freeze the model, inject fresh LoRA layers into the recipe's target groups (new parameters,
    so the only trainable ones) and set precisions. -> ({name: parameter}, whether the text
    encoder trains)."""
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
    generator = torch.Generator().manual_seed(recipe.seed)
    groups = recipe.targets.split(",")
    unet_patterns = [p for group in groups if group.startswith("unet_") for p in L.TARGETS[group]]
    text_patterns = [p for group in groups if group.startswith("text_") for p in L.TARGETS[group]]
    lora = (recipe.rank, recipe.alpha, recipe.lora_dropout, generator)
    if unet_patterns:
        L.inject_lora(pipe.unet, unet_patterns, *lora)
    if text_patterns:
        L.inject_lora(pipe.text_encoder, text_patterns, *lora)
    if precision != "no":
        # Frozen weights in half precision (half the memory); the LoRA weights, their gradients
        # and Adam's moments stay float32, and autocast runs the matmuls in half.
        pipe.unet.to(precision_dtype(precision))
        pipe.text_encoder.to(precision_dtype(precision))
    params = {f"{component}.{name}": param
              for component, root in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder))
              for name, param in root.named_parameters() if param.requires_grad}
    for param in params.values():
        param.data = param.data.float()
    return params, bool(text_patterns)


def _resume(run, path):
    """Load checkpoint `path` into the run's LoRA, optimizer, grad scaler and RNG.
    -> (steps done, loss log)."""
    ckpt = load_torch(path)
    with torch.no_grad():
        for name, param in run.params.items():
            param.copy_(ckpt["lora"][name])
    run.opt.load_state_dict(ckpt["optimizer"])
    if ckpt["scaler"] and run.scaler.is_enabled():  # fp16 loss scale; empty for bf16 / fp32 runs
        run.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    if is_main():
        print(f"resuming from {path} (step {ckpt['step']})")
    return ckpt["step"], ckpt["log"]


# --------------------------------------------------------------------------------- one step

def _train_step(run, step):
    """One optimizer step on the global batch of `step`: this rank's slice of each of the
    grad_accum micro-batches, gradients averaged over ranks. -> (mean losses, learning rate):
    [loss], or [loss, L_inst, L_prior] with prior preservation."""
    recipe, batch, size = run.recipe, run.settings["global_batch"], run.recipe.batch_size
    lr = lr_at(step, recipe.max_steps, recipe.warmup_steps, recipe.lr, recipe.min_lr)
    for group in run.opt.param_groups:
        group["lr"] = lr
    # The draws of the whole global batch: (B, 4, h, w), (B,), (B, 4) and (B,) bool
    noise, t, offset = step_noise(recipe.seed, step, batch, run.latents.shape[1:],
                                  run.pipe.scheduler.num_train_timesteps)
    dropped = caption_dropout_mask(recipe.seed, step, batch, recipe.caption_dropout)
    prior_noise = None if run.prior_latents is None else step_noise(   # the prior batch's own draws
        recipe.seed, step, batch, run.prior_latents.shape[1:], run.pipe.scheduler.num_train_timesteps, PRIOR_NOISE)
    total = torch.zeros(1 if prior_noise is None else 3, device=run.device)
    for micro in range(recipe.grad_accum):
        lo = (micro * run.world + run.rank) * size       # this rank's slice of micro-batch `micro`
        part = slice(lo, lo + size)
        idx = sample_indices(len(run.labels), recipe.seed, step * batch + lo, size)
        prior = None if prior_noise is None else (
            sample_indices(len(run.prior_labels), recipe.seed, step * batch + lo, size, PRIOR_ORDER),
            *(draw[part] for draw in prior_noise))
        losses = _micro_batch_loss(run, idx, dropped[part], noise[part], t[part], offset[part], prior)
        run.scaler.scale(losses[0] / recipe.grad_accum).backward()
        total += losses.detach() / recipe.grad_accum
    all_reduce_mean([total])
    mean_losses = total.tolist()
    _stop_if_diverged(mean_losses[0], step, run.out_dir)
    _optimizer_step(run)
    return mean_losses, lr


def _micro_batch_loss(run, idx, dropped, noise, t, offset, prior=None):
    """The loss on dataset images `idx` (b,) with their slice of the step's draws: (1,) [loss].
    prior = (prior set indices (b,), their noise, t, offset): one UNet call on both halves,
    (3,) [L_inst + lambda L_prior, L_inst, L_prior]."""
    device = run.device
    x0 = torch.from_numpy(run.latents[idx]).to(device)                             # (b, 4, h, w)
    # Each sample's row of `ids`: its class prompt, or the last one ("") where its caption is dropped.
    rows = torch.from_numpy(run.labels[idx]).masked_fill(dropped, len(run.prompts)).to(device)
    if prior is not None:  # append the prior half; its rows are the prior prompts after ""
        prior_idx, *prior_draws = prior
        x0 = torch.cat([x0, torch.from_numpy(run.prior_latents[prior_idx]).to(device)])      # (2b, 4, h, w)
        prior_rows = torch.from_numpy(run.prior_labels[prior_idx]) + len(run.prompts) + 1
        rows = torch.cat([rows, prior_rows.to(device)])
        noise, t, offset = (torch.cat([a, b]) for a, b in zip((noise, t, offset), prior_draws))
    with autocast(device, run.precision):
        states = run.pipe.text_encoder(run.ids)[0] if run.train_text else run.frozen_states
        args = (run.pipe.unet, run.pipe.scheduler, x0, states[rows],                   # (b or 2b, 77, D)
                noise.to(device), t.to(device), offset.to(device), run.recipe.noise_offset, run.recipe.snr_gamma)
        if prior is None:
            return diffusion_loss(*args).reshape(1)
        return prior_preservation_loss(per_sample_loss(*args), len(idx), run.recipe.prior_loss_weight)


def _stop_if_diverged(loss, step, out_dir):
    """A NaN / inf loss ends the run with one line naming the newest checkpoint, saving nothing
    of this step. Ctrl-C needs no handler: every file is written atomically (model/io.py), so an
    interrupt leaves the newest checkpoint to resume from, and model.io.cli says so."""
    if not math.isfinite(loss):
        last = (_checkpoints(out_dir) or ["none"])[-1]
        raise UserError(f"loss became {loss} at step {step + 1}; stopped without saving. "
                        f"Last good checkpoint: {last}. Try a lower --lr or --mixed-precision bf16/no")


def _optimizer_step(run):
    params = list(run.params.values())
    all_reduce_mean([p.grad for p in params if p.grad is not None])
    run.scaler.unscale_(run.opt)
    if run.recipe.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, run.recipe.max_grad_norm)
    run.scaler.step(run.opt)
    run.scaler.update()
    run.opt.zero_grad(set_to_none=True)


# ----------------------------------------------------------------- after a step (rank 0 only)

def _after_step(run, done, log):
    """Validation grid, loss log, conditioning check and checkpoint after step `done`, each on its
    schedule. The checkpoint last: a kill before it resumes from the previous one and redoes this
    step's grid, log and check too (after it, they would be missing from the resumed run)."""
    recipe, last = run.recipe, done == run.recipe.max_steps
    if recipe.sample_every and (done % recipe.sample_every == 0 or last):
        _sample_grid(run, done)
    if done % LOG_EVERY == 0 or done % recipe.save_every == 0 or last:
        _write_log(run.out_dir, log)
    if run.conditioning is not None and (done % recipe.save_every == 0 or last):
        run.conditioning.measure(run.pipe, run.ids[:len(run.prompts)], done)
    if done % recipe.save_every == 0 or last:
        _save(run, done, log)


@torch.no_grad()
def _sample_grid(run, step):
    """One image per class from fixed seeds: the same noise at every step, so grids compare."""
    recipe, pipe = run.recipe, run.pipe
    pipe.unet.eval()
    with autocast(run.device, run.precision):
        images, _ = generate(pipe, run.prompts, seeds=list(range(len(run.prompts))), steps=recipe.sample_steps,
                             guidance=recipe.guidance, eta=0.0, height=recipe.resolution, width=recipe.resolution)
    pipe.unet.train()
    grid = image_grid(to_pil(images.float()), ncols=1, row_labels=run.info["classes"], cell=96)
    save_png(os.path.join(run.out_dir, "samples", f"step-{step:06d}.png"), grid)


def _write_log(out_dir, log):
    """loss.csv and loss.png; a prior-preservation log has two more columns, L_inst and L_prior."""
    prior = len(log[0]) > 4
    write_csv(os.path.join(out_dir, "loss.csv"),
              ["step", "loss", "lr", "seconds"] + (["loss_instance", "loss_prior"] if prior else []), log)
    steps = [row[0] for row in log]
    curves = {"loss": (steps, [row[1] for row in log]), "EMA 0.95": (steps, _ema([row[1] for row in log]))}
    if prior:
        curves.update({"instance, EMA": (steps, _ema([row[4] for row in log])),
                       "prior, EMA": (steps, _ema([row[5] for row in log]))})
    line_plot(os.path.join(out_dir, "loss.png"), curves, title="LoRA training loss", ylabel="loss")


def _ema(values):
    """Bias-corrected exponential moving average, 0.95 (as Adam's m)."""
    out, smooth = [], 0.0
    for k, value in enumerate(values, 1):
        smooth = 0.95 * smooth + 0.05 * value
        out.append(smooth / (1 - 0.95 ** k))
    return out


def _save(run, step, log, final=False):
    """lora-STEP.safetensors and checkpoint-STEP.pt, or the final lora.safetensors. The file
    records its base model, classes, prompts and settings (sample_validated.py reads them)."""
    recipe, pipe, info = run.recipe, run.pipe, run.info
    meta = {"settings": run.settings, "classes": info["classes"], "prompts": run.prompts,
            "base_model": recipe.model, "kind": pipe.kind, "prediction_type": pipe.prediction_type,
            "data_source": info["source"], "data_fingerprint": info["fingerprint"],
            "rank": recipe.rank, "alpha": recipe.alpha, "resolution": recipe.resolution, "steps": step,
            # how to sample it (sample_validated.py's defaults): the data's own size, steps, guidance
            "image_size": info.get("image_size"), "sample_steps": recipe.sample_steps, "guidance": recipe.guidance}
    if run.prior_latents is not None:  # "prompts" are the identifier ones: what sampling must use
        meta["prior_prompts"] = class_prompts(info["classes"], recipe.prompt_template)
    name = "lora.safetensors" if final else f"lora-{step:06d}.safetensors"
    LF.save_lora(os.path.join(run.out_dir, name), L.lora_state(pipe.unet, pipe.text_encoder),
                 recipe.lora_format, meta)
    if not final:  # the LoRA snapshot first: a crash in between leaves the older checkpoint
        save_torch(os.path.join(run.out_dir, f"checkpoint-{step:06d}.pt"), {
            "step": step, "lora": {k: p.detach().cpu() for k, p in run.params.items()},
            "optimizer": run.opt.state_dict(), "scaler": run.scaler.state_dict(), "rng": rng_state(),
            "log": log, "settings": run.settings})
