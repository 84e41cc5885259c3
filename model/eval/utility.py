"""`evaluate.py utility`: do the synthetic images help a classifier learn the real task?

The validator's recipe (model/classifier_train.py) is trained three times, and each result is
tested on the same real test split:

    real       the real training split (or a stratified --real-fraction of it: scarce data)
    synthetic  only the run's kept images (the seeds' "synthetic-only" experiment)
    hybrid     both together (the seeds' "hybrid" experiment)

Model selection uses the real validation split in all three arms, so they differ only in their
training images. Synthetic images are resized to the real images' size. Each arm trains into its
own folder and resumes there if interrupted; a finished arm is not trained again.
"""
import os
from dataclasses import replace

import numpy as np
import torch

from model.validator.classifier import evaluate_classifier, load_classifier
from model.validator.train import CHECKPOINT, STATE, train
from model.data import ImageSet, resize_uint8
from model.eval.generation import image_files, read_rgb
from model.io import UserError

ARMS = ("real", "synthetic", "hybrid")


def synthetic_set(run_dir, classes, size):
    """The kept images of a run (or a class-folder set) as an ImageSet at `size` px."""
    files = image_files(run_dir, classes)
    images = torch.empty(len(files), 3, size, size, dtype=torch.uint8)
    for k, (f, _) in enumerate(files):
        images[k] = resize_uint8(read_rgb(os.path.join(run_dir, f))[None], size)[0]
    labels = torch.tensor([c for _, c in files], dtype=torch.int64)
    return ImageSet(images, labels, list(classes), os.path.abspath(run_dir), f"synthetic:{len(files)}")


def stratified_fraction(data, fraction, seed):
    """Keep round(fraction * n_c) images of every class c (at least 1), chosen by `seed`."""
    if not 0 < fraction <= 1:
        raise UserError(f"--real-fraction {fraction}: must be in (0, 1]")
    if fraction == 1:
        return data
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in range(len(data.classes)):
        idx = torch.nonzero(data.labels == c).flatten()
        if len(idx):
            keep.append(idx[torch.randperm(len(idx), generator=g)[:max(1, round(fraction * len(idx)))]])
    keep = torch.cat(keep).sort().values
    return ImageSet(data.images[keep], data.labels[keep], data.classes, data.source,
                    f"{data.fingerprint}:fraction={fraction}:seed={seed}")


def concat(a, b):
    return ImageSet(torch.cat([a.images, b.images]), torch.cat([a.labels, b.labels]), a.classes,
                    f"{a.source} + {b.source}", f"{a.fingerprint}+{b.fingerprint}")


def _train_arm(train_set, val_set, recipe, out_dir):
    """Train (or resume, or reuse) one arm; -> path of its best checkpoint."""
    ckpt, state = os.path.join(out_dir, CHECKPOINT), os.path.join(out_dir, STATE)
    if os.path.isfile(os.path.join(out_dir, "metrics.json")) and os.path.isfile(ckpt):
        return ckpt  # finished earlier
    return train(train_set, val_set, recipe, out_dir, resume=os.path.isfile(state))


def utility(run_dir, real_train, real_val, real_test, recipe, out_dir, real_fraction=1.0):
    """Train the three arms and test each on real_test; -> {arm: report + training set sizes}."""
    size = real_train.images.shape[-1]
    synth = synthetic_set(run_dir, real_train.classes, size)
    if len(synth) == 0:
        raise UserError(f"{run_dir}: no kept images to train on")
    real = stratified_fraction(real_train, real_fraction, recipe.seed)
    sets = {"real": real, "synthetic": synth, "hybrid": concat(real, synth)}
    results = {}
    for arm in ARMS:
        train_set = replace(sets[arm], images=sets[arm].images.contiguous())
        ckpt = _train_arm(train_set, real_val, recipe, os.path.join(out_dir, arm))
        report = evaluate_classifier(load_classifier(ckpt), real_test)
        counts = np.bincount(train_set.labels.numpy(), minlength=len(real_train.classes))
        results[arm] = {"accuracy": report["accuracy"], "f1_macro": report["f1_macro"],
                        "auc_macro": report["auc_macro"], "n_train": len(train_set),
                        "n_train_per_class": counts.tolist(), "checkpoint": os.path.abspath(ckpt),
                        "test": report}
    return results


def format_utility(results):
    lines = [f"{'trained on':<10}  {'n_train':>7}  {'test ACC':>8}  {'macro F1':>8}  {'AUC':>6}"]
    for arm, r in results.items():
        auc = "-" if r["auc_macro"] is None else f"{r['auc_macro']:.4f}"
        lines.append(f"{arm:<10}  {r['n_train']:>7}  {r['accuracy']:>8.4f}  {r['f1_macro']:>8.4f}  {auc:>6}")
    return "\n".join(lines)
