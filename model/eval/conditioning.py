"""`evaluate.py conditioning`: does the model (with its LoRA) listen to the class prompt?

A diffusion classifier (Li et al. 2023, "Your Diffusion Model is Secretly a Zero-Shot
Classifier"; Clark & Jaini 2023, "Text-to-Image Diffusion Models are Zero-Shot Classifiers"): a
real image is assigned the class whose prompt lets the UNet denoise it best,

    z0 = vae_scale * VAE posterior mean of the image, brought to the model's size by the size path
    for draws k = 1..K, the same K (t_k, eps_k) for every class prompt:
        x_k = sqrt(a_t) z0 + sqrt(1 - a_t) eps_k                        (DDPM eq. 4)
        err_c = mean_k || target_k - unet(x_k, t_k, text(prompt_c)) ||^2
    prediction = argmin_c err_c         (a tie goes to the first class)

target is the network's own: eps, v (v-prediction) or x0 (model.objective.per_sample_loss, the
training loss without its weighting). Sharing the draws between classes leaves only the prompt
to differ, so a model that ignores its prompt gives equal errors and scores the share of the
first class (chance on a balanced set), and "relative_spread", the mean over images of
(max_c err - min_c err) / mean_c err, is 0.

Timesteps are stratified: draw k lies uniformly in the k-th of K equal slices of 0..T-1, so each
image's timesteps cover the schedule evenly (Li et al. also spread theirs evenly over the
schedule) and the mean over draws stays an unbiased estimate of the uniform-t error. Image i
of the split draws its (t, eps) from a generator seeded by (seed, i) alone: the draws do not
depend on the batch size (the errors only by float rounding: CPU kernels round differently at
other batch sizes), and a smaller images_per_class draws the same for the images it keeps.

Outputs in OUT: conditioning.json (written last: it marks the result finished), confusion.png and
errors.npz (per image: split index, label, errors (K, C)). A rerun with the same settings prints
the finished result and computes nothing; other settings are refused unless overwrite. An
interrupted run is simply computed again (nothing partial is kept: it is cheap next to training).

During LoRA training (`ConditioningLog`) the same classifier runs on a few val images per class
at every checkpoint, with the LoRA being trained: conditioning.csv and conditioning.png.
"""
import csv
import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch

from model.data import class_prompts, load_split, to_model_size
from model.io import UserError, atomic_write, read_json, write_csv, write_json
from model.metrics import confusion_matrix
from model.objective import per_sample_loss, step_seed
from model.plots import confusion_png, line_plot
from model.sd.sampling import encode_prompts, vae_factor
from model.training import autocast

DRAWS = 6   # step_seed stream of the classifier's draws (model.objective's streams are 0..5)
Z95 = 1.959964  # two-sided 95% normal quantile
RESULT, CONFUSION, ERRORS, LOG, LOG_PNG = ("conditioning.json", "confusion.png", "errors.npz",
                                           "conditioning.csv", "conditioning.png")
LOG_COLUMNS = ["step", "accuracy", "chance", "relative_spread", "images", "draws"]


@dataclass
class ConditioningSettings:
    split: str = "val"
    images_per_class: int | None = None  # the first N images of each class of the split (None: all)
    draws: int = 8                       # (t, eps) pairs per image, shared by all class prompts
    seed: int = 0
    resolution: int | None = None        # model image side (None: the UNet's sample_size x the VAE factor)
    mixed_precision: str = "no"          # model.training.PRECISIONS, resolved for the device
    batch_size: int = 64                 # UNet calls per batch: speed, and float rounding only


def pick_images(labels, per_class=None):
    """(n,) split indices: the first `per_class` images of each class in split order (all: None)."""
    labels = torch.as_tensor(labels)
    if per_class is None:
        return torch.arange(len(labels))
    keep = [torch.nonzero(labels == c).flatten()[:per_class] for c in labels.unique().tolist()]
    return torch.cat(keep).sort().values if keep else torch.zeros(0, dtype=torch.int64)


def model_resolution(pipe):
    """The image side the UNet was built for: its sample_size (a latent side) x the VAE factor."""
    return int(pipe.unet.config["sample_size"]) * vae_factor(pipe)


def encode_latents(pipe, images, resolution, batch_size=64):
    """uint8 (N, 3, S, S) -> (N, 4, R/f, R/f) float32: VAE posterior mean * vae_scale of each image
    brought to R = resolution px by the size path (model.data.to_model_size), as the LoRA's
    training latents are (model/lora/latent_cache.py)."""
    vae, out = pipe.vae, []
    for lo in range(0, len(images), batch_size):
        x = to_model_size(images[lo:lo + batch_size].float(), resolution) / 127.5 - 1   # (b, 3, R, R) in [-1, 1]
        mean, _ = vae.encode(x.to(vae.device, vae.dtype))                                  # (b, 4, R/f, R/f)
        out.append(mean.float() * pipe.vae_scale)
    return torch.cat(out)


def draws(seed, index, count, latent_shape, num_timesteps):
    """Image `index`'s draws: noise (count, C, h, w) and stratified timesteps (count,), the k-th
    uniform in [k T / count, (k + 1) T / count)."""
    g = torch.Generator().manual_seed(step_seed(seed, DRAWS, index))
    noise = torch.randn(count, *latent_shape, generator=g)
    u = torch.rand(count, generator=g, dtype=torch.float64)
    t = ((torch.arange(count) + u) * num_timesteps / count).long().clamp(max=num_timesteps - 1)
    return noise, t


@torch.no_grad()
def prompt_errors(unet, scheduler, z0, indices, cond, settings):
    """Denoising errors (n, K, C) float64 of n images' latents z0 (n, 4, h, w), whose split indices
    are `indices` (n,), under each of the C class conditionings cond (C, 77, D).

    The n * K * C UNet calls are laid out flat, item p = (image p // KC, draw p // C % K, class
    p % C), and cut into batches of settings.batch_size; each batch draws again the (t, eps) of
    the images it touches, so what an item sees never depends on the batch it falls in."""
    n, k, c = len(z0), settings.draws, len(cond)
    device = next(unet.parameters()).device
    z0, cond, out = z0.to(device), cond.to(device), []
    for items in torch.arange(n * k * c).split(settings.batch_size):
        rows, draw, cls = items // (k * c), items // c % k, items % c
        drawn = {r: draws(settings.seed, int(indices[r]), k, z0.shape[1:], scheduler.num_train_timesteps)
                 for r in rows.unique().tolist()}
        noise = torch.stack([drawn[r][0][d] for r, d in zip(rows.tolist(), draw.tolist())])   # (b, 4, h, w)
        t = torch.stack([drawn[r][1][d] for r, d in zip(rows.tolist(), draw.tolist())])       # (b,)
        # (b,) || target - unet(x_t, t, text_c) ||^2 against the model's own target, unweighted
        err = per_sample_loss(unet, scheduler, z0[rows], cond[cls], noise.to(device), t.to(device),
                              offset=None, noise_offset=0.0, snr_gamma=0.0)
        out.append(err.double().cpu())
    return torch.cat(out).view(n, k, c).numpy()


def _wilson(correct, n, z=Z95):
    """Wilson score interval of a binomial proportion: sensible at small n and near 0 or 1."""
    if n == 0:
        return [None, None]
    p, z2 = correct / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def summarise(errors, labels, classes):
    """errors (N, K, C) and true labels (N,) -> the JSON-able scores (see the module docstring)."""
    labels = np.asarray(labels, dtype=np.int64)
    mean = errors.mean(axis=1)                                 # (N, C)
    predicted = mean.argmin(axis=1)                            # (N,), ties: the first class
    conf = confusion_matrix(labels, predicted, len(classes))
    n, correct, support = len(labels), int(np.trace(conf)), conf.sum(axis=1)
    centre = mean.mean(axis=1)
    spread = np.divide(mean.max(axis=1) - mean.min(axis=1), centre, out=np.zeros(n), where=centre > 0)
    accuracy = correct / n if n else 0.0
    return {
        "accuracy": accuracy, "chance": 1 / len(classes),
        "accuracy_se": math.sqrt(accuracy * (1 - accuracy) / n) if n else None,
        "accuracy_interval_95": _wilson(correct, n),
        "per_class_accuracy": {name: (float(conf[i, i] / support[i]) if support[i] else None)
                               for i, name in enumerate(classes)},
        "predicted_counts": {name: int(v) for name, v in zip(classes, conf.sum(axis=0))},
        "relative_spread": float(spread.mean()) if n else 0.0,
        "confusion": conf.tolist(), "n_images": n, "draws": int(errors.shape[1]), "classes": list(classes),
    }


def diffusion_classifier(pipe, data, prompts, settings):
    """The diffusion classifier on `data` (an ImageSet: the split), one prompt per class of
    data.classes. -> summarise's dict, plus "per_image" (numpy arrays: split index, label,
    errors (N, K, C)) that write_conditioning stores beside the JSON."""
    if len(prompts) != len(data.classes):
        raise UserError(f"need one prompt per class: {len(prompts)} prompts for {len(data.classes)} classes")
    index = pick_images(data.labels, settings.images_per_class)
    if len(index) == 0:
        raise UserError(f"{data.source}: the {settings.split} split has no images")
    resolution = settings.resolution or model_resolution(pipe)
    with torch.no_grad(), autocast(pipe.unet.device, settings.mixed_precision):
        z0 = encode_latents(pipe, data.images[index], resolution, settings.batch_size)   # (N, 4, h, w)
        cond = encode_prompts(pipe, prompts)                                              # (C, 77, D)
        errors = prompt_errors(pipe.unet, pipe.scheduler, z0, index, cond, settings)      # (N, K, C)
    labels = data.labels[index].numpy()
    return {**summarise(errors, labels, data.classes), "split": settings.split, "seed": settings.seed,
            "resolution": resolution, "prediction_type": pipe.scheduler.prediction_type,
            "timesteps": "stratified", "prompts": dict(zip(data.classes, prompts)),
            "per_image": {"index": index.numpy(), "label": labels, "errors": errors}}


def lora_prompts(classes, lora_meta):
    """One prompt per class: the LoRA's own, as it was trained (with prior preservation, its
    identifier prompts), else model.data's class prompts. A LoRA trained on other classes: UserError."""
    trained = dict(zip(lora_meta.get("classes", []), lora_meta.get("prompts", [])))
    if not trained:
        return class_prompts(classes)
    missing = [name for name in classes if name not in trained]
    if missing:
        raise UserError(f"the LoRA was trained on the classes {', '.join(trained)}: it has no prompt for "
                        f"'{missing[0]}' of --data")
    return [trained[name] for name in classes]


def run_settings(settings, model, lora_md5, data, prompts):
    """What decides a result, as stored in its JSON: a rerun with other settings is refused. The
    batch size does not count (it changes no draw, only float rounding), nor the device."""
    kept = {k: v for k, v in asdict(settings).items() if k != "batch_size"}
    return {**kept, "model": model, "lora_md5": lora_md5, "data_fingerprint": data.fingerprint,
            "prompts": dict(zip(data.classes, prompts)), "timesteps": "stratified"}


def finished_result(out_dir, settings, overwrite=False):
    """The finished result in out_dir made with `settings` (nothing to do then), or None to compute
    (none there, or overwrite). One made with other settings is refused, naming the first that
    differs in the order of `settings` (run_settings': the classifier's own settings first)."""
    old = None if overwrite else read_json(os.path.join(out_dir, RESULT), missing_ok=True,
                                           hint="; remove it or pass --overwrite")
    if old is None:
        return None
    before, now = old.get("settings", {}), json.loads(json.dumps(settings))  # compare as stored
    changed = [k for k in [*now, *(k for k in before if k not in now)] if before.get(k) != now.get(k)]
    if changed:
        k, more = changed[0], f", and {len(changed) - 1} more" if len(changed) > 1 else ""
        raise UserError(f"{out_dir} holds a conditioning result with other settings ({k}: {before.get(k)!r} "
                        f"there, {now.get(k)!r} now{more}); pass --overwrite to replace it, or use another --out")
    return old


def write_conditioning(out_dir, result):
    """errors.npz, confusion.png, then conditioning.json (last: its presence means finished)."""
    per_image = result.pop("per_image")
    atomic_write(os.path.join(out_dir, ERRORS), lambda f: np.savez(f, **per_image))
    confusion_png(os.path.join(out_dir, CONFUSION), result["confusion"], result["classes"],
                  title=f"diffusion classifier, {result['split']} split (rows: true, columns: predicted)")
    write_json(os.path.join(out_dir, RESULT), result)


def format_conditioning(r):
    lo, hi = r["accuracy_interval_95"]
    per_class = ", ".join(f"{name} {'-' if acc is None else f'{acc:.2f}'}"
                          for name, acc in r["per_class_accuracy"].items())
    return "\n".join([
        f"diffusion classifier on {r['n_images']} {r['split']} images ({len(r['classes'])} class prompts, "
        f"{r['draws']} draws each): accuracy {r['accuracy']:.3f} +- {r['accuracy_se']:.3f} (binomial s.e.; "
        f"95% Wilson interval {lo:.3f}-{hi:.3f}), chance {r['chance']:.3f}",
        f"relative spread of the error over the prompts: {r['relative_spread']:.4g} (0: the prompt changes nothing)",
        f"per class: {per_class}"])


# ------------------------------------------------------------------------ during LoRA training

class ConditioningLog:
    """The diffusion classifier at every checkpoint of a LoRA run (rank 0), on the first few val
    images per class, encoded once: conditioning.csv (one row per measured step) and .png."""

    def __init__(self, out_dir, val, pipe, settings):
        self.out_dir, self.settings, self.classes = out_dir, settings, list(val.classes)
        self.index = pick_images(val.labels, settings.images_per_class)
        if len(self.index) == 0:
            raise UserError(f"{val.source}: the val split has no images for the conditioning check "
                            f"(--conditioning-images 0 trains without it)")
        self.labels = val.labels[self.index].numpy()
        with torch.no_grad(), autocast(pipe.unet.device, settings.mixed_precision):
            self.z0 = encode_latents(pipe, val.images[self.index], settings.resolution, settings.batch_size)
        self.rows = []

    def begin(self, pipe, ids, done):
        """Keep the logged rows up to step `done`, the one the run resumes from (each row was
        written before its step's checkpoint), dropping those of a killed session after it; a
        fresh run (done 0) first measures the base model, step 0. ids (C, 77): the class prompts."""
        path = os.path.join(self.out_dir, LOG)
        if done and os.path.isfile(path):
            with open(path, newline="", encoding="utf-8") as f:
                rows = [[int(r[0]), float(r[1]), float(r[2]), float(r[3]), int(r[4]), int(r[5])]
                        for r in list(csv.reader(f))[1:]]
            self.rows = [r for r in rows if r[0] <= done]
        if not done:
            self.measure(pipe, ids, 0)

    def measure(self, pipe, ids, step):
        """Classify with the networks as they are now, in eval mode: LoRA dropout would draw from
        the global RNG, which the training (and its exact resume) owns. Modes are restored."""
        modes = pipe.unet.training, pipe.text_encoder.training
        pipe.unet.eval(), pipe.text_encoder.eval()
        try:
            with torch.no_grad(), autocast(pipe.unet.device, self.settings.mixed_precision):
                cond = pipe.text_encoder(ids)[0]                                            # (C, 77, D)
                errors = prompt_errors(pipe.unet, pipe.scheduler, self.z0, self.index, cond, self.settings)
        finally:
            pipe.unet.train(modes[0]), pipe.text_encoder.train(modes[1])
        r = summarise(errors, self.labels, self.classes)
        row = [step, round(r["accuracy"], 6), round(r["chance"], 6), round(r["relative_spread"], 6),
               r["n_images"], r["draws"]]
        self.rows = [old for old in self.rows if old[0] < step] + [row]
        write_csv(os.path.join(self.out_dir, LOG), LOG_COLUMNS, self.rows)
        steps, accuracy, chance = ([old[i] for old in self.rows] for i in range(3))
        line_plot(os.path.join(self.out_dir, LOG_PNG), {"accuracy": (steps, accuracy), "chance": (steps, chance)},
                  title=f"diffusion classifier on {r['n_images']} val images, {r['draws']} draws each",
                  ylabel="accuracy", ylim=(0, 1))


def lora_conditioning_log(recipe, out_dir, pipe, precision):
    """A LoRA run's ConditioningLog (recipe: model.lora.recipe.LoRARecipe), or None when
    recipe.conditioning_images is 0."""
    if not recipe.conditioning_images:
        return None
    try:
        val = load_split(recipe.data, "val")
    except UserError as e:
        raise UserError(f"{e} (the conditioning check reads the val split: --conditioning-images 0 "
                        f"trains without it)") from None
    settings = ConditioningSettings(images_per_class=recipe.conditioning_images, draws=recipe.conditioning_draws,
                                    seed=recipe.seed, resolution=recipe.resolution, mixed_precision=precision)
    return ConditioningLog(out_dir, val, pipe, settings)
