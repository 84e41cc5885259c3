"""The one training loop of both pretraining stages (the VAE, then the UNet), read top to bottom.

A stage is a network, a step count, a learning rate and a `loss(step)` that draws the batch of
that step from generators seeded with (seed, step): nothing about the data order is saved, so a
run resumed from `state.pt` takes exactly the steps an uninterrupted run takes (bit-exact on CPU).

The loop is nanoGPT's: set the LR (warm-up + cosine), forward, backward, clip, step, average the
weights (EMA), log; every `save_every` steps write the log and the state; every `sample_every`
steps a grid of the EMA network's output. Ctrl-C saves a consistent state, then stops.
"""
import copy
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from model.io import UserError, load_torch, save_png, save_torch, write_csv
from model.plots import line_plot
from model.training import StopOnSigint, autocast, ema_update, grad_scaler, lr_at

STATE = "state.pt"


@dataclass
class Stage:
    name: str                   # "vae" | "unet": the stage's sub-folder of the run
    net: torch.nn.Module        # what trains (all of its parameters)
    steps: int
    lr: float
    loss: Callable              # step -> scalar loss of that step's seeded batch
    grid: Callable              # (ema network, step) -> PIL image for a person to look at
    settings: dict              # what fixes the trajectory: a state resumes only under equal ones


def train_stage(stage, recipe, out_dir, device):
    """Train `stage` (resuming from its state.pt if there is one); returns the EMA network."""
    folder = os.path.join(out_dir, stage.name)
    ema = copy.deepcopy(stage.net).requires_grad_(False)
    params = [p for p in stage.net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=stage.lr, betas=(0.9, 0.999), weight_decay=recipe.weight_decay)
    scaler = grad_scaler(device, recipe.mixed_precision)
    state = resume(folder, stage, ema, opt, scaler)
    if state["step"] == stage.steps:
        return ema
    bar = tqdm(range(state["step"], stage.steps), initial=state["step"], total=stage.steps,
               desc=stage.name, dynamic_ncols=True)
    t0 = time.time() - state["seconds"]
    with StopOnSigint() as stop:
        for step in bar:
            lr = lr_at(step, stage.steps, recipe.warmup_steps, stage.lr)
            for group in opt.param_groups:
                group["lr"] = lr
            with autocast(device, recipe.mixed_precision):
                loss = stage.loss(step)
            if not math.isfinite(loss.item()):  # before it reaches the weights or any file
                raise UserError(f"{stage.name} loss became {loss.item()} at step {step + 1}: lower "
                                f"the learning rate (the last good state is {os.path.join(folder, STATE)})")
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            # The decay warms up, so the average soon forgets the random initial weights.
            ema_update(ema, stage.net, min(recipe.ema_decay, (1 + step) / (10 + step)))

            done, state["step"], state["seconds"] = step + 1, step + 1, time.time() - t0
            state["log"].append([done, round(loss.item(), 6), lr, round(state["seconds"], 2)])
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}", refresh=False)
            if done % recipe.sample_every == 0 or done == stage.steps:
                save_png(os.path.join(folder, "samples", f"step-{done:06d}.png"), stage.grid(ema, done))
            if done % recipe.save_every == 0 or done == stage.steps or stop.hit:
                save(folder, stage, ema, opt, scaler, state)
            if stop.hit:
                bar.close()
                raise KeyboardInterrupt
    bar.close()
    return ema


def resume(folder, stage, ema, opt, scaler):
    """Load `folder/state.pt` into the networks and optimizer; the loop state to continue from."""
    path = os.path.join(folder, STATE)
    if not os.path.isfile(path):
        return {"step": 0, "seconds": 0.0, "log": []}
    saved = load_torch(path)
    check_settings(folder, stage.settings, saved)
    stage.net.load_state_dict(saved["net"])
    ema.load_state_dict(saved["ema"])
    opt.load_state_dict(saved["opt"])
    if saved["scaler"] and scaler.is_enabled():  # fp16 loss scale; empty for bf16 / fp32 runs
        scaler.load_state_dict(saved["scaler"])
    if saved["step"] < stage.steps:
        tqdm.write(f"{stage.name}: resuming from {path} (step {saved['step']})")
    return {k: saved[k] for k in ("step", "seconds", "log")}


def check_settings(folder, settings, saved=None):
    """UserError if `folder/state.pt` holds a run with other settings than `settings`."""
    path = os.path.join(folder, STATE)
    if saved is None:
        if not os.path.isfile(path):
            return
        saved = load_torch(path)
    if saved["settings"] != settings:
        changed = [k for k in settings if saved["settings"].get(k) != settings[k]]
        raise UserError(f"{path} is a run with other settings ({', '.join(changed)}): rerun with "
                        f"those to continue it, pass --overwrite, or choose another --out")


def save(folder, stage, ema, opt, scaler, state):
    """The loss log, its curve, then the state (last: a kill before it redoes these steps)."""
    write_csv(os.path.join(folder, "loss.csv"), ["step", "loss", "lr", "seconds"], state["log"])
    steps = [row[0] for row in state["log"]]
    line_plot(os.path.join(folder, "loss.png"), {"loss": (steps, [row[1] for row in state["log"]])},
              title=f"{stage.name} pretraining", xlabel="step", ylabel="loss (log scale)", logy=True)
    save_torch(os.path.join(folder, STATE), {
        **state, "net": stage.net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
        "scaler": scaler.state_dict(), "settings": stage.settings})
