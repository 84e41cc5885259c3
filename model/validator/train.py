"""Train the validator from ImageSets with one recipe (train_classifier.py; `evaluate.py utility`
trains the same recipe on real, synthetic or mixed data).

Recipe: histology augmentation applied batched on tensors (augment.py: random 90-degree rotations
and flips, since tissue has no orientation; brightness and contrast; optional random-resized-crop
zoom, H&E stain jitter in HED colour space and mixup), AdamW without weight decay on norms and biases, linear
warm-up then cosine decay, label smoothing, and an exponential moving average (EMA) of the weights.
After every epoch the (EMA) network is scored on the validation split and the checkpoint with the
best validation macro F1 is kept (ties: lower validation loss). The test split is never looked at
here. The defaults were chosen on the validation split of the shared 400-image subset (the search
and its numbers are in the README): zoom is off because rescaling 28 px tissue hurt, the EMA
removes most of the epoch-to-epoch noise of a small-batch run, and averaging the prediction over
the 8 rotations/flips (tta) is what helped consistently.

The loop, `train`, reads top to bottom: check the run folder, build, resume, then per epoch
`_train_epoch` (one `_train_step` per batch) and `_end_epoch` (validate, keep the best, log, save).
`_Guard` is the only place that stops it: a non-finite loss, Ctrl-C, or a save that is due.

Files in out_dir: classifier.safetensors (the best epoch), metrics.json, log.jsonl (one line per
epoch), training_curve.png and state.pt (everything needed to resume: saved after each epoch, every
10 minutes and on Ctrl-C, always between two optimizer steps). Rerunning the same call continues an
interrupted run and leaves a finished one alone; a run with other settings or on other data in
out_dir is refused unless overwrite (which deletes these files and starts over).
"""
import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.validator.augment import augment, mixup
from model.validator.classifier import IMAGENET_MEAN, IMAGENET_STD, VIT_CONFIG, Classifier, evaluate_classifier, \
    load_classifier, load_pretrained, pick_stem, save_classifier
from model.data import resize_uint8
from model.io import UserError, load_torch, save_torch, write_json, write_text
from model.plots import line_plot
from model.training import StopOnSigint, autocast, ema_update, grad_scaler, lr_at, pick_device, set_seed

CHECKPOINT, STATE, METRICS, LOG, CURVE = "classifier.safetensors", "state.pt", "metrics.json", "log.jsonl", \
    "training_curve.png"
OUR_FILES = (CHECKPOINT, STATE, METRICS, LOG, CURVE)
SAVE_EVERY_S = 600
RESUME_MAY_CHANGE = ("device", "mixed_precision")
AGAIN = "pass --overwrite to start over, or choose another --out"


@dataclass
class Recipe:
    arch: str = "resnet18"
    stem: str = "auto"           # auto: small (3x3/1, no max-pool) up to 64 px, standard above
    image_size: int = 0          # 0: the training data's own size
    pretrained: str = ""         # torchvision ImageNet weights: a .pth path or a name such as DEFAULT
    epochs: int = 60
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 3.0
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    flip_rotate: bool = True
    zoom: float = 1.0            # smallest area fraction kept by a random-resized crop (1 = off)
    brightness: float = 0.1      # factors drawn from [1 - b, 1 + b]
    contrast: float = 0.1
    hed_jitter: float = 0.0      # sigma of the HED stain jitter (0 = off; 0.02-0.05 is typical)
    ema: float = 0.99            # decay of an exponential moving average of the weights (0 = off)
    mixup: float = 0.0           # probability that a batch is mixed up (lam ~ U(0, 1), i.e. alpha = 1)
    tta: bool = True             # predict (validate, judge) by averaging the 8 rotations/flips
    device: str = "auto"
    mixed_precision: str = "no"
    seed: int = 0


# The ViT's own defaults: a transformer trained from scratch on a few hundred images, with no
# convolutional prior, needs a longer warm-up, more epochs and a lower peak lr than the ResNet.
# Chosen on the validation split of the 400-image subset among 100 epochs at lr 1e-3 and 5e-4 and
# 60 epochs at 1e-3 (the numbers are in the README); the rest of the recipe is the ResNet's.
VIT = Recipe(arch="vit", epochs=100, lr=5e-4, warmup_epochs=10.0, weight_decay=0.05)
ARCH_DEFAULTS = {"vit": VIT}


# --- the run: where it is, what a step changes ---

@dataclass
class Progress:
    """Where a run is. Saved in state.pt with the weights, so a resumed run goes on from exactly here."""
    epoch: int = 0              # epochs finished
    batch: int = 0              # batches done in the current epoch
    loss_sum: float = 0.0       # the current epoch so far: sum of (batch loss x batch size),
    correct: int = 0            # training images predicted as their label (before mixup),
    seen: int = 0               # and training images seen
    best: dict = None           # the log record of the best epoch so far
    log: list = field(default_factory=list)  # one record per finished epoch
    elapsed: float = 0.0        # seconds of training, over all sessions


@dataclass
class _Run:
    """One training run: what it trains on and into, the parts an optimizer step changes (all saved
    in state.pt) and its progress."""
    recipe: Recipe
    out_dir: str
    meta: dict                  # data source, fingerprint, n_train, recipe, extra: stored in the checkpoint
    extra_meta: dict
    clf: Classifier
    ema: Classifier             # EMA of clf's weights, or None
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    aug_rng: torch.Generator    # augmentation and mixup draws: the same on any device
    device: torch.device
    per_epoch: int              # optimizer steps per epoch
    progress: Progress = field(default_factory=Progress)

    @property
    def judged(self):
        """With EMA the averaged weights are the ones scored on validation and kept."""
        return self.clf if self.ema is None else self.ema

    @property
    def checkpoint(self):
        return os.path.join(self.out_dir, CHECKPOINT)


class _Guard(StopOnSigint):
    """Stops the loop only between two optimizer steps. A non-finite loss is a UserError before it
    reaches the weights or any file. The first Ctrl-C only sets `hit`, so the loop saves a
    consistent state and then stops; a second one interrupts at once. A save is also due every
    SAVE_EVERY_S seconds."""

    def __init__(self, out_dir, elapsed):
        self.out_dir, self.start, self.last_save = out_dir, time.time() - elapsed, time.time()

    def check_loss(self, loss, where):
        if not torch.isfinite(loss):
            raise UserError(f"loss became {loss.item()} at {where}: lower --lr (the last good state, if any, "
                            f"is kept in {self.out_dir})")

    def elapsed(self):
        return time.time() - self.start

    def save_due(self):
        return self.hit or time.time() - self.last_save > SAVE_EVERY_S

    def saved(self):
        """Called after each save: after a Ctrl-C, this is where the run stops."""
        self.last_save = time.time()
        if self.hit:
            raise KeyboardInterrupt


# --- the loop ---

def train(train_set, val_set, recipe, out_dir, resume=False, overwrite=False, extra_meta=None):
    """Train with `recipe`, keep the best-validation checkpoint in out_dir; returns its path.
    resume: require a run in out_dir to continue (one is continued anyway); overwrite: delete a
    run there and start over (without it, a run with other settings or data is refused)."""
    _check_inputs(train_set, val_set, recipe)
    saved = check_run(out_dir, recipe, train_set, resume, overwrite)
    if overwrite:
        _remove_outputs(out_dir)
    if saved is not None and saved["epoch"] == recipe.epochs and os.path.exists(os.path.join(out_dir, METRICS)):
        tqdm.write(f"{out_dir}: this run is finished, nothing to do")
        return os.path.join(out_dir, CHECKPOINT)
    images, val_set = _resized(train_set, val_set, recipe)
    run = _build(recipe, train_set, images, out_dir, extra_meta or {})
    if saved is not None:
        _restore(run, saved)
    done = run.progress.epoch * run.per_epoch + run.progress.batch
    with _Guard(out_dir, run.progress.elapsed) as guard, \
            tqdm(total=recipe.epochs * run.per_epoch, initial=done, desc="train", unit="step") as bar:
        while run.progress.epoch < recipe.epochs:
            _train_epoch(run, images, train_set.labels, guard, bar)
            record = _end_epoch(run, val_set, guard)
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", val_acc=f"{record['val_acc']:.3f}",
                            val_f1=f"{record['val_f1']:.3f}", best=run.progress.best["epoch"])
    _write_metrics(run)
    return run.checkpoint


def _train_epoch(run, images, labels, guard, bar):
    """The rest of epoch `run.progress.epoch` (all of it unless resumed inside it), one batch of
    uint8 images (B, 3, S, S) per optimizer step; the ragged last batch is dropped (BatchNorm)."""
    progress, batch_size = run.progress, run.recipe.batch_size
    # The order depends only on (seed, epoch), so a resumed epoch continues the same order.
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(
        run.recipe.seed * 1_000_003 + progress.epoch))
    run.clf.train()
    while progress.batch < run.per_epoch:
        idx = order[progress.batch * batch_size:(progress.batch + 1) * batch_size]
        loss, correct = _train_step(run, images[idx], labels[idx], guard)
        progress.loss_sum += loss * len(idx)
        progress.correct += correct
        progress.seen += len(idx)
        progress.batch += 1
        bar.update()
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        if guard.save_due():
            _save_state(run, guard)


def _train_step(run, images, labels, guard):
    """One optimizer step on uint8 images (B, 3, S, S); -> (loss, images predicted as their label)."""
    recipe, step = run.recipe, run.progress.epoch * run.per_epoch + run.progress.batch
    for group in run.opt.param_groups:
        group["lr"] = lr_at(step, recipe.epochs * run.per_epoch, round(recipe.warmup_epochs * run.per_epoch),
                            recipe.lr, recipe.min_lr)
    x = augment(images.to(run.device).float().div_(255), recipe, run.aug_rng)  # (B, 3, S, S) in [0, 1]
    y = labels.to(run.device)
    x, partner, lam = mixup(x, recipe.mixup, run.aug_rng)
    with autocast(run.device, recipe.mixed_precision):
        logits = run.clf(x).float()
    loss = lam * F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
    if lam < 1:
        loss = loss + (1 - lam) * F.cross_entropy(logits, y[partner], label_smoothing=recipe.label_smoothing)
    guard.check_loss(loss, f"epoch {run.progress.epoch + 1}, step {step}")
    run.opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.opt)
    run.scaler.update()
    if run.ema is not None:  # the decay warms up so early, random weights are soon forgotten
        ema_update(run.ema.net, run.clf.net, min(recipe.ema, (1 + step) / (10 + step)))
    return loss.item(), (logits.argmax(1) == y).sum().item()


def _end_epoch(run, val_set, guard):
    """Score the finished epoch on validation, keep its checkpoint if it is the best so far, write
    the log and save the state; -> the epoch's log record."""
    report = evaluate_classifier(run.judged, val_set)
    progress = run.progress
    progress.epoch, progress.batch = progress.epoch + 1, 0
    record = {"epoch": progress.epoch, "step": progress.epoch * run.per_epoch, "lr": run.opt.param_groups[0]["lr"],
              "train_loss": progress.loss_sum / progress.seen, "train_acc": progress.correct / progress.seen,
              "val_loss": report["log_loss"], "val_acc": report["accuracy"], "val_f1": report["f1_macro"],
              "val_auc": report["auc_macro"], "time_s": round(guard.elapsed(), 1)}
    progress.loss_sum, progress.correct, progress.seen = 0.0, 0, 0
    progress.log.append(record)
    best = progress.best
    if best is None or (record["val_f1"], -record["val_loss"]) > (best["val_f1"], -best["val_loss"]):
        progress.best = record
        save_classifier(run.checkpoint, run.judged, **run.meta, epoch=progress.epoch, val_metrics=report)
    _write_log(run.out_dir, progress.log)
    _save_state(run, guard)
    return record


# --- before the loop: inputs, the run folder, building, resuming ---

def _check_inputs(train_set, val_set, recipe):
    """Refuse what cannot train before anything in out_dir is touched (--overwrite deletes)."""
    if list(val_set.classes) != list(train_set.classes):
        raise UserError("the validation split names other classes than the training split")
    size, patch = recipe.image_size or train_set.images.shape[-1], VIT_CONFIG["patch_size"]
    if recipe.arch == "vit" and recipe.pretrained:
        raise UserError("--pretrained: ImageNet weights are for the ResNets only; --arch vit trains from scratch")
    if recipe.arch == "vit" and size % patch:
        raise UserError(f"--arch vit cuts {patch} px patches: the image size must be a multiple of {patch}, "
                        f"got {size} (pass --image-size)")
    for name, value in [("epochs", recipe.epochs), ("batch-size", recipe.batch_size), ("lr", recipe.lr)]:
        if value <= 0:
            raise UserError(f"--{name} {value}: must be positive")


def check_run(out_dir, recipe, train_set, resume=False, overwrite=False):
    """The state.pt of the run in out_dir to continue, or None to start afresh. Refuses (UserError) a
    run there with other settings or on other data unless overwrite, and a missing one if resume."""
    path = os.path.join(out_dir, STATE)
    if resume and overwrite:
        raise UserError("--resume continues the run in --out, --overwrite starts it over: choose one")
    # Without state.pt a run starts over, even where a crash left the first epoch's checkpoint behind.
    if overwrite or not (resume or os.path.exists(path)):
        return None
    if not os.path.exists(path):
        raise UserError(f"--resume: {path} not found, nothing to resume")
    saved = load_torch(path)
    missing = [key for key in ("recipe", "fingerprint", "n_train", *(f.name for f in fields(Progress)))
               if not isinstance(saved, dict) or key not in saved]
    if missing:
        raise UserError(f"{path}: not a state.pt of this medsynth version (no '{missing[0]}'); {AGAIN}")
    old = saved["recipe"]
    changed = [f.name for f in fields(recipe)
               if f.name not in RESUME_MAY_CHANGE and old.get(f.name) != getattr(recipe, f.name)]
    if changed:
        was = ", ".join(f"{k}={old.get(k)!r}" for k in changed)
        raise UserError(f"{path} is a run with other settings ({was}): rerun with those to continue it, or {AGAIN}")
    if saved["fingerprint"] != train_set.fingerprint or saved["n_train"] != len(train_set):
        raise UserError(f"{path} is a run on other training data: {AGAIN}")
    return saved


def _remove_outputs(out_dir):
    for name in OUR_FILES:
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def _resized(train_set, val_set, recipe):
    """Training images (N, 3, S, S) uint8 at the recipe's size, kept on the CPU as loaded (a 224 px
    PathMNIST is 13.5 GB: no copies), and the validation set at the same size."""
    size = recipe.image_size or train_set.images.shape[-1]
    return resize_uint8(train_set.images, size), replace(val_set, images=resize_uint8(val_set.images, size))


def _build(recipe, train_set, images, out_dir, extra_meta):
    """The network (normalised with the training images' own statistics unless ImageNet weights
    are loaded), its EMA copy, the optimizer and the scaler, from the recipe's seed."""
    device = pick_device(recipe.device)
    set_seed(recipe.seed)
    size = images.shape[-1]
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if recipe.pretrained else channel_stats(images)
    stem = None if recipe.arch == "vit" else pick_stem(recipe.stem, size)  # a ViT starts with its patches
    clf = Classifier(recipe.arch, stem, size, train_set.classes, mean, std, recipe.tta)
    if recipe.pretrained:
        fresh = load_pretrained(clf.net, recipe.arch, recipe.pretrained)
        tqdm.write(f"loaded ImageNet weights; freshly initialised: {', '.join(fresh)}")
    clf.to(device)
    meta = {"data_source": train_set.source, "data_fingerprint": train_set.fingerprint,
            "n_train": len(train_set), "recipe": asdict(recipe), **extra_meta}
    return _Run(recipe, out_dir, meta, extra_meta, clf, copy.deepcopy(clf) if recipe.ema > 0 else None,
                torch.optim.AdamW(_param_groups(clf.net, recipe.weight_decay), lr=recipe.lr),
                grad_scaler(device, recipe.mixed_precision), torch.Generator().manual_seed(recipe.seed), device,
                per_epoch=max(1, len(images) // recipe.batch_size))


def _restore(run, saved):
    run.clf.net.load_state_dict(saved["net"])
    if run.ema is not None:
        run.ema.net.load_state_dict(saved["ema"])
    run.opt.load_state_dict(saved["opt"])
    run.scaler.load_state_dict(saved["scaler"])
    run.aug_rng.set_state(saved["aug_rng"])
    run.progress = Progress(**{f.name: saved[f.name] for f in fields(Progress)})


def channel_stats(images, chunk=4096):
    """Per-channel mean and std of uint8 images (N, 3, S, S), as floats in [0, 1] units."""
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].double() / 255
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    n = len(images) * images.shape[-1] * images.shape[-2]
    mean = total / n
    return mean.tolist(), (total_sq / n - mean ** 2).clamp_min(1e-12).sqrt().tolist()


def _param_groups(net, weight_decay):
    """Weight decay on conv/linear weights only: decaying norms and biases just fights the optimiser.
    A ViT's class token and position embeddings are not weights of a map but learned inputs: no decay."""
    def decays(name, p):
        return p.ndim > 1 and not name.endswith(("class_token", "pos_embedding"))
    decay = [p for name, p in net.named_parameters() if decays(name, p)]
    rest = [p for name, p in net.named_parameters() if not decays(name, p)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


# --- saving ---

def _save_state(run, guard):
    """state.pt: the progress, every part a step changes, and what the run is (to check a resume)."""
    run.progress.elapsed = guard.elapsed()
    save_torch(os.path.join(run.out_dir, STATE), {
        **asdict(run.progress), "net": run.clf.net.state_dict(), "opt": run.opt.state_dict(),
        "ema": run.ema.net.state_dict() if run.ema is not None else {}, "scaler": run.scaler.state_dict(),
        "aug_rng": run.aug_rng.get_state(), "recipe": asdict(run.recipe),
        "fingerprint": run.meta["data_fingerprint"], "n_train": run.meta["n_train"]})
    guard.saved()


def _write_log(out_dir, log):
    write_text(os.path.join(out_dir, LOG), "".join(json.dumps(r) + "\n" for r in log))
    epochs = [r["epoch"] for r in log]
    line_plot(os.path.join(out_dir, CURVE),
              {name: (epochs, [r[key] for r in log]) for name, key in
               [("train loss", "train_loss"), ("val loss", "val_loss"), ("train acc", "train_acc"),
                ("val acc", "val_acc"), ("val macro F1", "val_f1")]},
              title="classifier training", xlabel="epoch", ylabel="loss, accuracy (log scale)", logy=True)


def _write_metrics(run):
    best = load_classifier(run.checkpoint, run.device)
    write_json(os.path.join(run.out_dir, METRICS), {
        "best_epoch": best.meta["epoch"], "epochs": run.recipe.epochs, "selected_on": "val f1_macro",
        "wall_time_s": round(run.progress.elapsed, 1), "val": best.meta["val_metrics"],
        "recipe": asdict(run.recipe),
        "data": {k: run.meta[k] for k in ("data_source", "data_fingerprint", "n_train")}, **run.extra_meta})
