"""Train the conditional GAN (seed paper 002) on a training split, behind train_gan.py:
`train(GANRecipe(...), "runs/gan")`.

One step s, every draw from a generator seeded with (seed, s), so nothing about the data order is
saved and a run resumed from state.pt takes exactly the steps of an uninterrupted one (bit for bit
on a CPU at the same thread count). As in Goodfellow et al. 2014, Algorithm 1:
    d_steps times: a batch of real training images (x, y), each turned by one of the 8
        rotations/flips (tissue has no orientation), and fakes G(z, c), z ~ N(0, I),
        c ~ U{classes}; one Adam step on the hinge L_D;
    then fresh (z', c'), c' in pairs when mode_seeking > 0: one Adam step on
        L_G + mode_seeking * L_ms, and the EMA of G's weights moves.
With the hinge loss alone G learns one image per class and ignores z (intra-class mode collapse,
on these 400 images); the mode-seeking term (model.gan.nets) makes two noises of one class give
two images. Too heavy a weight turns that round: z then sets the image and the class hardly does.
Every `save_every` steps and at the end, a checkpoint: the EMA generator, with its BatchNorm
statistics measured again on its own activations ("standing statistics", Brock et al. 2019: the
EMA's weights are an average, the running statistics the live G's, and they do not belong
together), goes to gan.safetensors and into samples/step-N.png (one row per class, column j from
seed j). D's mean score on training images, on validation images and on fakes (at most SCORED
of each) is logged with it: D scoring validation images like fakes rather than like training
images means D is memorising the training set (Karras et al. 2020, sec. 3). The test split is
never read.

Files in out_dir: gan.safetensors, samples/, loss.png, log.json and state.pt (G, D, the EMA G,
both optimizers, RNG state, step, log; written last at every checkpoint and on Ctrl-C).
Rerunning the same call continues an interrupted run and leaves a finished one alone; a run with
other settings or on other data in out_dir is refused unless overwrite.
"""
import copy
import os
import shutil
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from tqdm import tqdm

from model.data import load_split, to_model_size
from model.gan.generator import save_gan, sample_images
from model.gan.nets import Discriminator, Generator, hinge_d_loss, hinge_g_loss, levels_for, mode_seeking_loss
from model.io import UserError, load_torch, save_png, save_torch, write_json
from model.mini.stages import dihedral
from model.objective import sample_indices, step_seed
from model.plots import image_grid, line_plot
from model.sd.sampling import to_pil
from model.training import StopOnSigint, ema_update, pick_device, rng_state, set_rng_state

GAN_FILE, STATE, LOG, CURVE, SAMPLES = "gan.safetensors", "state.pt", "log.json", "loss.png", "samples"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESUME_MAY_CHANGE = ("device", "data")   # the data is checked by its fingerprint instead
AGAIN = "pass --overwrite to start over, or choose another --out"
STANDING_BATCHES = 16   # batches the EMA generator's BatchNorm statistics are measured on
SCORED = 1024           # images of each kind D scores at a checkpoint (the first ones of a split)
# The step_seed streams of this loop's own draws (batch order comes from model.objective's
# sample_indices, stream EPOCH_ORDER).
STEP_DRAWS, INIT_WEIGHTS, STANDING_NOISE = 50, 60, 70
GRID_COLS, GRID_CELL = 10, 64
CURVE_WINDOW = 50       # the loss curves are running means over this many steps


@dataclass
class GANRecipe:
    data: str = "examples/pathmnist_subset_28.npz"
    resolution: int = 32        # the 28 px images padded by the size path, as for medsynth-mini
    steps: int = 1500
    batch_size: int = 32
    d_steps: int = 1            # D updates per G update
    g_lr: float = 2e-4
    d_lr: float = 2e-4
    beta1: float = 0.5          # Adam's, as SNGAN's setting C (Miyato et al. 2018, table 1)
    beta2: float = 0.999
    ema_decay: float = 0.999    # of G's weights; the EMA generator is the one saved and sampled
    dihedral: bool = True       # real images turned by a random one of the 8 rotations/flips
    mode_seeking: float = 0.1   # weight of the mode-seeking term in L_G (0: off)
    z_dim: int = 128
    embed_dim: int = 128        # G's class embedding, concatenated with z
    g_channels: int = 32        # G's width at full resolution (doubling per level down to 4x4)
    d_channels: int = 32        # D's width at full resolution (doubling per level down to 4x4)
    save_every: int = 250       # checkpoint: gan.safetensors, a sample grid, the state
    seed: int = 0
    device: str = "auto"


@dataclass
class _Run:
    """One training run: what it learns from, the parts a step changes (all saved in state.pt)."""
    recipe: GANRecipe
    out_dir: str
    config: dict                # Generator(**config)
    meta: dict                  # data source, fingerprint, size: stored in gan.safetensors
    classes: list
    images: torch.Tensor        # (N, 3, R, R) training images in [-1, 1]
    labels: torch.Tensor        # (N,)
    val_images: torch.Tensor    # (M, 3, R, R), only for D's scores at checkpoints
    val_labels: torch.Tensor
    g: Generator
    d: Discriminator
    g_ema: Generator
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    device: torch.device
    step: int = 0
    seconds: float = 0.0
    log: list = field(default_factory=list)     # [step, D loss, G loss] per step
    checks: list = field(default_factory=list)  # D's mean scores per checkpoint


# --- the loop ---

def train(recipe, out_dir, overwrite=False):
    """Train with `recipe` into out_dir (continuing a run there); returns gan.safetensors' path."""
    _check(recipe)
    device = pick_device(recipe.device)
    data = _locate(recipe.data)
    train_set, val_set = load_split(data, "train"), load_split(data, "val")
    saved = _check_run(out_dir, recipe, train_set, overwrite)
    path = os.path.join(out_dir, GAN_FILE)
    if overwrite:
        _remove_outputs(out_dir)
    if saved is not None and saved["step"] == recipe.steps and os.path.isfile(path):
        tqdm.write(f"{out_dir}: this run is finished, nothing to do")
        return path
    run = _build(recipe, out_dir, train_set, val_set, device)
    if saved is not None:
        _restore(run, saved)
    if run.step == recipe.steps:   # finished, but gan.safetensors was deleted since
        _export(run)
    t0 = time.time() - run.seconds
    with StopOnSigint() as stop, tqdm(total=recipe.steps, initial=run.step, desc="gan", unit="step",
                                      dynamic_ncols=True) as bar:
        while run.step < recipe.steps:
            d_loss, g_loss = _train_step(run, run.step)
            run.step, run.seconds = run.step + 1, time.time() - t0
            run.log.append([run.step, d_loss, g_loss])
            bar.update()
            bar.set_postfix(d_loss=f"{d_loss:.3f}", g_loss=f"{g_loss:.3f}", refresh=False)
            if run.step % recipe.save_every == 0 or run.step == recipe.steps:
                _checkpoint(run)
            elif stop.hit:
                _save_state(run)
            if stop.hit:
                raise KeyboardInterrupt
    return path


def _train_step(run, step):
    """d_steps updates of D, then one of G and its EMA, on step's seeded draws -> (L_D, L_G)."""
    r, dev = run.recipe, run.device
    g = torch.Generator().manual_seed(step_seed(r.seed, STEP_DRAWS, step))
    n, batch, k = len(run.images), r.batch_size, len(run.classes)
    run.g.train()
    run.d.train()
    for j in range(r.d_steps):
        idx = sample_indices(n, r.seed, (step * r.d_steps + j) * batch, batch)
        x, y = run.images[idx], run.labels[idx]                    # (B, 3, R, R), (B,)
        if r.dihedral:
            x = dihedral(x, torch.randint(0, 8, (batch,), generator=g))
        z, c = _noise(g, batch, r.z_dim, k)
        with torch.no_grad():
            fake = run.g(z.to(dev), c.to(dev))                     # (B, 3, R, R)
        # One D call on [real; fake]: D has no batch statistics, and one call is one power
        # iteration of each spectral norm.
        scores = run.d(torch.cat([x.to(dev), fake]), torch.cat([y, c]).to(dev))   # (2B,)
        d_loss = hinge_d_loss(scores[:batch], scores[batch:])
        _check_finite(d_loss, "D", step, run.out_dir)
        run.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        run.opt_d.step()
    z, c = _noise(g, batch, r.z_dim, k)
    if r.mode_seeking:
        c[batch // 2:2 * (batch // 2)] = c[:batch // 2]    # pairs (i, i + B/2) share a class
    z, c = z.to(dev), c.to(dev)
    run.d.requires_grad_(False)    # L_G's gradient is only needed for G
    fake = run.g(z, c)
    g_loss = hinge_g_loss(run.d(fake, c))
    run.d.requires_grad_(True)
    _check_finite(g_loss, "G", step, run.out_dir)
    run.opt_g.zero_grad(set_to_none=True)
    (g_loss + r.mode_seeking * mode_seeking_loss(fake, z) if r.mode_seeking else g_loss).backward()
    run.opt_g.step()
    # The decay warms up, so the average soon forgets the random initial weights.
    ema_update(run.g_ema, run.g, min(r.ema_decay, (1 + step) / (10 + step)))
    return d_loss.item(), g_loss.item()


def _noise(g, batch, z_dim, num_classes):
    """z (B, z_dim) ~ N(0, I) and classes c (B,) ~ U{0..K-1}, from generator g."""
    return torch.randn(batch, z_dim, generator=g), torch.randint(0, num_classes, (batch,), generator=g)


def _check_finite(loss, which, step, out_dir):
    if not torch.isfinite(loss):  # before it reaches the weights or any file
        raise UserError(f"{which} loss became {loss.item()} at step {step + 1}: lower --g-lr / --d-lr "
                        f"(the last good state, if any, is in {out_dir})")


# --- checkpoints ---

def _checkpoint(run):
    """The EMA generator (standing statistics) -> a sample grid and gan.safetensors; D's scores;
    the log and its curve; the state last (a kill before it only redoes these steps)."""
    net = _export(run)
    run.checks.append({"step": run.step, **_d_scores(run, net)})
    _write_log(run)
    _save_state(run)


def _export(run):
    """The EMA generator with standing statistics -> samples/step-N.png and gan.safetensors."""
    net = standing_stats(run.g_ema, run.recipe, len(run.classes))
    save_png(os.path.join(run.out_dir, SAMPLES, f"step-{run.step:06d}.png"), sample_grid(net, run.classes))
    save_gan(os.path.join(run.out_dir, GAN_FILE), net, run.config, run.classes,
             {**run.meta, "steps": run.step, "recipe": asdict(run.recipe)})
    return net


@torch.no_grad()
def standing_stats(g_ema, recipe, num_classes):
    """A copy of g_ema in eval mode whose BatchNorm statistics are the plain average over
    STANDING_BATCHES fixed batches of its own activations (momentum None: a cumulative mean)."""
    net = copy.deepcopy(g_ema).train()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    g = torch.Generator().manual_seed(step_seed(recipe.seed, STANDING_NOISE))
    device = next(net.parameters()).device
    for _ in range(STANDING_BATCHES):
        z, c = _noise(g, recipe.batch_size, recipe.z_dim, num_classes)
        net(z.to(device), c.to(device))
    return net.eval()


def sample_grid(net, classes):
    """One row per class, column j from seed j (the same z down a column: only the class changes)."""
    rows = [c for c in range(len(classes)) for _ in range(GRID_COLS)]
    images = sample_images(net, rows, list(range(GRID_COLS)) * len(classes))
    return image_grid(to_pil(images), GRID_COLS, row_labels=list(classes), cell=GRID_CELL)


@torch.no_grad()
def _d_scores(run, net):
    """D's mean score f(x, y) on the first SCORED training and validation images and on as many
    fakes of `net` as validation images, with their labels (eval mode: the spectral norms' vectors
    stay as they are, so scoring changes nothing a later step sees). None for an empty split."""
    run.d.eval()
    labels = run.val_labels[:SCORED]
    fakes = sample_images(net, labels.tolist(), [10_000 + i for i in range(len(labels))]) * 2 - 1
    out = {"d_train": _mean_score(run, run.images[:SCORED], run.labels[:SCORED]),
           "d_val": _mean_score(run, run.val_images[:SCORED], labels),
           "d_fake": _mean_score(run, fakes, labels)}
    run.d.train()
    return out


def _mean_score(run, images, labels, chunk=256):
    if not len(labels):
        return None
    total = sum(run.d(images[i:i + chunk].to(run.device), labels[i:i + chunk].to(run.device)).sum().item()
                for i in range(0, len(labels), chunk))
    return total / len(labels)


def _write_log(run):
    write_json(os.path.join(run.out_dir, LOG), {"steps": run.step, "seconds": round(run.seconds, 1),
                                                "checks": run.checks, "log": run.log})
    steps = [row[0] for row in run.log]
    series = {f"{name} loss (mean of {CURVE_WINDOW} steps)": (steps, _running_mean([row[col] for row in run.log]))
              for name, col in (("D", 1), ("G", 2))}
    at = [c["step"] for c in run.checks]
    series.update({f"D score, {name}": (at, [float("nan") if c[key] is None else c[key] for c in run.checks])
                   for name, key in (("train", "d_train"), ("val", "d_val"), ("fake", "d_fake"))})
    line_plot(os.path.join(run.out_dir, CURVE), series, title="conditional GAN training (hinge loss)",
              xlabel="step", ylabel="loss; D's mean score at checkpoints")


def _running_mean(values):
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - CURVE_WINDOW] if i >= CURVE_WINDOW else 0.0)
        out.append(total / min(i + 1, CURVE_WINDOW))
    return out


def _save_state(run):
    save_torch(os.path.join(run.out_dir, STATE), {
        "step": run.step, "seconds": run.seconds, "log": run.log, "checks": run.checks,
        "g": run.g.state_dict(), "d": run.d.state_dict(), "g_ema": run.g_ema.state_dict(),
        "opt_g": run.opt_g.state_dict(), "opt_d": run.opt_d.state_dict(), "rng": rng_state(),
        "recipe": asdict(run.recipe), "fingerprint": run.meta["data_fingerprint"]})


# --- before the loop: settings, the run folder, building, resuming ---

def _check(recipe):
    for name in ("steps", "batch_size", "d_steps", "z_dim", "embed_dim", "g_channels", "d_channels",
                 "save_every", "g_lr", "d_lr"):
        if getattr(recipe, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(recipe, name)}: must be positive")
    for name in ("beta1", "beta2", "ema_decay"):
        if not 0 <= getattr(recipe, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(recipe, name)}: must be in [0, 1)")
    if levels_for(recipe.resolution) is None:
        raise UserError(f"--resolution {recipe.resolution}: must be 4 times a power of 2, at least 8 (e.g. 32)")
    if recipe.seed < 0:
        raise UserError(f"--seed {recipe.seed}: must be at least 0")
    if recipe.mode_seeking < 0 or (recipe.mode_seeking and recipe.batch_size < 2):
        raise UserError(f"--mode-seeking {recipe.mode_seeking}: must be at least 0, and needs "
                        f"--batch-size 2 or more (its image pairs)")


def _locate(spec):
    """The bundled default data is named relative to the repository (as pretrain.py does), so the
    command works from any working directory; anything else is passed on as given."""
    bundled = os.path.join(REPO, spec)
    return bundled if not os.path.exists(spec) and os.path.exists(bundled) else spec


def _check_run(out_dir, recipe, train_set, overwrite):
    """The state.pt to continue, or None to start afresh; UserError for a run there with other
    settings or on other data (unless overwrite)."""
    path = os.path.join(out_dir, STATE)
    if overwrite or not os.path.isfile(path):
        return None
    saved = load_torch(path)
    if not isinstance(saved, dict) or not {"recipe", "fingerprint", "step", "g_ema"} <= set(saved):
        raise UserError(f"{path}: not a GAN state.pt of this medsynth version; {AGAIN}")
    old = saved["recipe"]
    changed = [k for k, v in asdict(recipe).items() if k not in RESUME_MAY_CHANGE and old.get(k) != v]
    if changed:
        was = ", ".join(f"{k}={old.get(k)!r}" for k in changed)
        raise UserError(f"{path} is a run with other settings ({was}): rerun with those to continue it, or {AGAIN}")
    if saved["fingerprint"] != train_set.fingerprint:
        raise UserError(f"{path} is a run on other training data: {AGAIN}")
    return saved


def _remove_outputs(out_dir):
    for name in (GAN_FILE, STATE, LOG, CURVE):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    shutil.rmtree(os.path.join(out_dir, SAMPLES), ignore_errors=True)


def _as_float(images, size):
    """uint8 (N, 3, s, s) -> float (N, 3, size, size) in [-1, 1], through the size path."""
    return to_model_size(images.float() / 255, size) * 2 - 1


def _build(recipe, out_dir, train_set, val_set, device):
    """G, D, the EMA G and both optimizers; the weights depend only on (seed, network)."""
    classes = list(train_set.classes)
    if not len(train_set):
        raise UserError(f"{train_set.source}: the train split is empty")
    if len(val_set) and list(val_set.classes) != classes:
        raise UserError("the validation split names other classes than the training split")
    config = {"num_classes": len(classes), "z_dim": recipe.z_dim, "embed_dim": recipe.embed_dim,
              "channels": recipe.g_channels, "resolution": recipe.resolution}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(step_seed(recipe.seed, INIT_WEIGHTS, 1))
        g = Generator(**config).to(device)
        torch.manual_seed(step_seed(recipe.seed, INIT_WEIGHTS, 2))
        d = Discriminator(len(classes), recipe.d_channels, recipe.resolution).to(device)
    betas = (recipe.beta1, recipe.beta2)
    meta = {"data_source": train_set.source, "data_fingerprint": train_set.fingerprint, "n_train": len(train_set),
            "image_size": train_set.images.shape[-1]}  # made at `resolution`, cut back to this
    return _Run(recipe, out_dir, config, meta, classes, _as_float(train_set.images, recipe.resolution),
                train_set.labels, _as_float(val_set.images, recipe.resolution), val_set.labels, g, d,
                copy.deepcopy(g).requires_grad_(False), torch.optim.Adam(g.parameters(), recipe.g_lr, betas),
                torch.optim.Adam(d.parameters(), recipe.d_lr, betas), device)


def _restore(run, saved):
    run.g.load_state_dict(saved["g"])
    run.d.load_state_dict(saved["d"])
    run.g_ema.load_state_dict(saved["g_ema"])
    run.opt_g.load_state_dict(saved["opt_g"])
    run.opt_d.load_state_dict(saved["opt_d"])
    set_rng_state(saved["rng"])
    run.step, run.seconds, run.log, run.checks = saved["step"], saved["seconds"], saved["log"], saved["checks"]
    if run.step < run.recipe.steps:
        tqdm.write(f"{run.out_dir}: resuming from {os.path.join(run.out_dir, STATE)} (step {run.step})")
