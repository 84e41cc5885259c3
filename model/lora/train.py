"""The LoRA fine-tuning loop behind train_lora.py.

One step (Rombach et al. 2022, LDM eq. 2, with the checkpoint's target):
    x0 = cached VAE latents of a batch,  eps ~ N(0, I) (+ noise offset),  t ~ U{0..T-1}
    x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps                 (DDPM eq. 4)
    loss = w_t * || unet(x_t, t, text(class prompt)) - target ||^2,  target = eps | v | x0
Only the LoRA matrices train (AdamW, warm-up + cosine LR, gradient clipping).

Reproducibility is by construction rather than by saved generator state: the samples, noise,
timesteps and offsets of step s are drawn from a generator seeded with (seed, s) for the whole
global batch, and each rank / micro-batch takes its slice. So a resumed run, and a run split
over N processes, see exactly the batches of an uninterrupted single-process run.

Outputs in --out: lora.safetensors (final), lora-<step>.safetensors and checkpoint-<step>.pt
every --save-every steps (the .pt resumes: LoRA, optimizer, grad scaler, step, RNG, loss log),
loss.csv + loss.png, samples/step-<step>.png validation grids, latents-<key>/ the latent cache.
"""
import glob
import math
import os
import re
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from model.lora import files as LF, layers as L
from model.sd.loader import load_pipeline
from model.data import class_prompts, load_split
from model.io import UserError, load_torch, save_png, save_torch, write_csv
from model.lora.latent_cache import build_cache, cache_folder, is_complete, open_cache
from model.plots import image_grid, line_plot
from model.sd.sampling import generate, to_pil, tokenize
from model.sd.tiny import make_tiny_sd
from model.objective import diffusion_loss, sample_indices, step_noise
from model.training import (all_reduce_mean, autocast, barrier, cleanup_distributed, grad_scaler, init_distributed,
                            is_main, lr_at, pick_device, rng_state, set_rng_state, set_seed,
                            share_from_main)

# Settings that determine the training trajectory: a checkpoint only resumes under equal ones.
RUN_KEYS = ("model", "data", "few_shot", "prompt_template", "resolution", "targets", "rank",
            "alpha", "lora_dropout", "max_steps", "global_batch", "lr", "min_lr", "warmup_steps",
            "weight_decay", "max_grad_norm", "noise_offset", "snr_gamma", "seed")
OUR_FILES = ("lora.safetensors", "lora-*.safetensors", "checkpoint-*.pt", "loss.csv", "loss.png",
             os.path.join("samples", "step-*.png"))
LOG_EVERY = 25
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def run_settings(args, world):
    s = {k: getattr(args, k) for k in RUN_KEYS if k != "global_batch"}
    s["global_batch"] = args.batch_size * world * args.grad_accum
    return s


def _differences(old, new):
    return [f"{k}: {old.get(k)!r} there, {new.get(k)!r} here" for k in RUN_KEYS if old.get(k) != new.get(k)]


def _checkpoints(out):
    found = glob.glob(os.path.join(out, "checkpoint-*.pt"))
    return sorted(p for p in found if re.fullmatch(r"checkpoint-\d+\.pt", os.path.basename(p)))


def plan_run(args, settings):
    """Rank 0 decides: ("done", message) | ("resume", checkpoint path) | ("fresh", None)."""
    out, final = args.out, os.path.join(args.out, "lora.safetensors")
    if args.overwrite:
        for pattern in OUR_FILES:
            for path in glob.glob(os.path.join(out, pattern)):
                os.remove(path)
        return "fresh", None
    hint = "pass --overwrite to start over, or choose another --out"
    if os.path.isfile(final):
        old = LF.load_lora(final)[1].get("settings", {})
        if diff := _differences(old, settings):
            raise UserError(f"{final} was trained with other settings ({diff[0]}); {hint}")
        return "done", f"{final} is already trained with these settings; nothing to do ({hint})"
    path = args.resume or (_checkpoints(out) or [None])[-1]
    if path is None:
        return "fresh", None
    old = load_torch(path)["settings"]
    if diff := _differences(old, settings):
        raise UserError(f"{path} is from a run with other settings ({diff[0]}); {hint}")
    return "resume", path


def _prepare_latents(args, pipe, device, mp):
    """Rank 0 loads the data and fills the latent cache; the other ranks wait for it on the file
    system, not in a collective: NCCL gives up after 10 minutes, and encoding PathMNIST-224 on
    one small GPU can take longer. The VAE runs under the training autocast (fast on GPUs)."""
    data = load_split(args.data, "train", few_shot=args.few_shot, seed=args.seed) if is_main() else None
    folder = share_from_main(cache_folder(args.out, model=args.model, data=data.fingerprint, precision=mp,
                                 few_shot=args.few_shot, seed=args.seed if args.few_shot else None,
                                 resolution=args.resolution) if is_main() else None)
    if is_main():
        with autocast(device, mp):
            build_cache(folder, data, pipe.vae, pipe.vae_scale, args.resolution)
    while not is_complete(folder):
        time.sleep(2)
    return open_cache(folder)


def _write_log(out, log):
    write_csv(os.path.join(out, "loss.csv"), ["step", "loss", "lr", "seconds"], log)
    steps, losses = [r[0] for r in log], [r[1] for r in log]
    ema, smooth = [], 0.0
    for k, v in enumerate(losses, 1):  # bias-corrected exponential moving average (as Adam's m)
        smooth = 0.95 * smooth + 0.05 * v
        ema.append(smooth / (1 - 0.95 ** k))
    line_plot(os.path.join(out, "loss.png"), {"loss": (steps, losses), "EMA 0.95": (steps, ema)},
              title="LoRA training loss", ylabel="loss")


@torch.no_grad()
def _sample_grid(args, pipe, prompts, classes, step, mp, device):
    """One image per class from fixed seeds: the same noise at every step, so grids compare."""
    pipe.unet.eval()
    with autocast(device, mp):
        images, _ = generate(pipe, prompts, seeds=list(range(len(prompts))), steps=args.sample_steps,
                          guidance=args.guidance, eta=0.0, height=args.resolution, width=args.resolution)
    pipe.unet.train()
    grid = image_grid(to_pil(images.float()), ncols=1, row_labels=classes, cell=96)
    save_png(os.path.join(args.out, "samples", f"step-{step:06d}.png"), grid)


def add_lora(args, pipe, mp):
    """Freeze the model, inject LoRA layers into the --targets groups (new parameters, so the only
    trainable ones) and set precisions. Returns ({name: parameter}, whether the text encoder trains)."""
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
    g = torch.Generator().manual_seed(args.seed)
    groups = args.targets.split(",")
    unet_pat = [p for grp in groups if grp.startswith("unet_") for p in L.TARGETS[grp]]
    text_pat = [p for grp in groups if grp.startswith("text_") for p in L.TARGETS[grp]]
    if unet_pat:
        L.inject_lora(pipe.unet, unet_pat, args.rank, args.alpha, args.lora_dropout, g)
    if text_pat:
        L.inject_lora(pipe.text_encoder, text_pat, args.rank, args.alpha, args.lora_dropout, g)
    if mp != "no":
        # Frozen weights in half precision (half the memory); the LoRA weights, their gradients
        # and Adam's moments stay float32, and autocast runs the matmuls in half.
        pipe.unet.to(HALF[mp])
        pipe.text_encoder.to(HALF[mp])
    named = {f"{c}.{n}": p for c, root in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder))
             for n, p in root.named_parameters() if p.requires_grad}
    for p in named.values():
        p.data = p.data.float()
    return named, bool(text_pat)


def train(args):
    device = pick_device(args.device)
    init_distributed(device)
    try:
        _train(args, device)
    finally:
        cleanup_distributed()


def _train(args, device):
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if args.mixed_precision is None:
        cuda = device.type == "cuda"
        args.mixed_precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "no"
    mp = args.mixed_precision
    autocast(device, mp)  # a precision this device cannot run is an error now, not after loading
    settings = run_settings(args, world)
    status, detail = share_from_main(plan_run(args, settings) if is_main() else None)
    if status == "done":
        if is_main():
            print(detail)
        return
    set_seed(args.seed)

    if args.build_tiny and is_main() and not os.path.isfile(os.path.join(args.model, "model_index.json")):
        make_tiny_sd(args.model, kind="sd1", seed=0)
    barrier()
    pipe = load_pipeline(args.model, device)
    latents, labels, info = _prepare_latents(args, pipe, device, mp)
    classes = info["classes"]
    prompts = class_prompts(classes, args.prompt_template)
    B = settings["global_batch"]
    if is_main():
        print(f"{len(labels)} training images, {len(classes)} classes; global batch {B} = "
              f"{args.batch_size} per rank x {world} rank(s) x {args.grad_accum} accumulation "
              f"({args.max_steps * B / len(labels):.1f} epochs); device {device}, precision {mp}")
    ids = tokenize(pipe.tokenizer, prompts).input_ids.to(device)                       # (n_classes, 77)

    named, train_text = add_lora(args, pipe, mp)
    params = list(named.values())
    if args.grad_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    pipe.unet.train()
    pipe.text_encoder.train(train_text)
    with torch.no_grad(), autocast(device, mp):
        frozen_cond = None if train_text else pipe.text_encoder(ids)[0].float()   # (n_classes, 77, D)

    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=args.weight_decay)
    scaler = grad_scaler(device, mp)
    start, log = 0, []
    if status == "resume":
        ckpt = load_torch(detail)
        with torch.no_grad():
            for k, p in named.items():
                p.copy_(ckpt["lora"][k])
        opt.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"] and scaler.is_enabled():  # fp16 loss scale; empty for bf16 / fp32 runs
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        start, log = ckpt["step"], ckpt["log"]
        if is_main():
            print(f"resuming from {detail} (step {start})")

    b, accum, n = args.batch_size, args.grad_accum, len(labels)
    run_meta = {"settings": settings, "classes": classes, "prompts": prompts,
                "base_model": args.model, "kind": pipe.kind, "prediction_type": pipe.prediction_type,
                "data_source": info["source"], "data_fingerprint": info["fingerprint"],
                "rank": args.rank, "alpha": args.alpha, "resolution": args.resolution}

    def save(step, final=False):
        state = L.lora_state(pipe.unet, pipe.text_encoder)
        meta = dict(run_meta, steps=step)
        name = "lora.safetensors" if final else f"lora-{step:06d}.safetensors"
        LF.save_lora(os.path.join(args.out, name), state, args.lora_format, meta)
        if not final:  # the LoRA snapshot first: a crash in between leaves the older checkpoint
            save_torch(os.path.join(args.out, f"checkpoint-{step:06d}.pt"), {
                "step": step, "lora": {k: p.detach().cpu() for k, p in named.items()},
                "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
                "log": log, "settings": settings})

    t0 = time.time() - (log[-1][3] if log else 0.0)
    bar = tqdm(range(start, args.max_steps), initial=start, total=args.max_steps, desc="lora",
               disable=not is_main(), dynamic_ncols=True)
    for step in bar:
        lr = lr_at(step, args.max_steps, args.warmup_steps, args.lr, args.min_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        noise, t, offset = step_noise(args.seed, step, B, latents.shape[1:], pipe.scheduler.num_train_timesteps)
        total = torch.zeros((), device=device)
        for m in range(accum):
            lo = m * b * world + rank * b          # this rank's slice of micro-batch m
            idx = sample_indices(n, args.seed, step * B + lo, b)
            x0 = torch.from_numpy(latents[idx]).to(device)               # (b, 4, h, w)
            sl = slice(lo, lo + b)
            with autocast(device, mp):
                cond = pipe.text_encoder(ids)[0] if train_text else frozen_cond
                cond = cond[torch.from_numpy(labels[idx]).to(device)]    # (b, 77, D)
                loss = diffusion_loss(pipe.unet, pipe.scheduler, x0, cond, noise[sl].to(device),
                                      t[sl].to(device), offset[sl].to(device), args.noise_offset,
                                      args.snr_gamma)
            scaler.scale(loss / accum).backward()
            total += loss.detach() / accum
        all_reduce_mean([total])
        loss_value = total.item()
        if not math.isfinite(loss_value):
            last = (_checkpoints(args.out) or ["none"])[-1]
            raise UserError(f"loss became {loss_value} at step {step + 1}; stopped without saving. "
                            f"Last good checkpoint: {last}. Try a lower --lr or --mixed-precision bf16/no")
        all_reduce_mean([p.grad for p in params if p.grad is not None])
        scaler.unscale_(opt)
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

        done = step + 1
        log.append([done, loss_value, lr, round(time.time() - t0, 3)])
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        if not is_main():
            continue
        # The checkpoint last: a kill before it resumes from the previous one and redoes this
        # step's grid and log too (after it, they would be missing from the resumed run).
        if args.sample_every and (done % args.sample_every == 0 or done == args.max_steps):
            _sample_grid(args, pipe, prompts, classes, done, mp, device)
        if done % LOG_EVERY == 0 or done % args.save_every == 0 or done == args.max_steps:
            _write_log(args.out, log)
        if done % args.save_every == 0 or done == args.max_steps:
            save(done)
    bar.close()
    if is_main():
        save(args.max_steps, final=True)
        print(f"wrote {os.path.join(args.out, 'lora.safetensors')} ({args.lora_format} format)")
