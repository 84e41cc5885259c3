"""`evaluate.py utility`: do the synthetic images help a classifier learn the real task?

The validator's recipe (model/validator/train.py) is trained three times, and each result is
tested on the same real test split:

    real       the real training split (or a stratified --real-fraction of it: scarce data)
    synthetic  only the run's kept images (the seeds' "synthetic-only" experiment)
    hybrid     both together (the seeds' "hybrid" experiment)

Model selection uses the real validation split in all three arms, so they differ only in their
training images. Synthetic images are resized to the real images' size. Each arm trains into its
own folder, exactly as train_classifier.py trains into --out: an interrupted arm continues, a
finished one is not trained again, and an arm trained with other settings or on other images
(another --real-fraction, --seed, --epochs, other synthetic images) is refused before any arm
trains, unless overwrite (--overwrite), which trains every arm again.
"""
import os
import sys
from dataclasses import replace

import numpy as np
import torch

from model.validator.classifier import evaluate_classifier, load_classifier
from model.validator.train import check_run, train
from model.data import ImageSet, files_fingerprint, per_class_subset, read_images
from model.eval.generation import image_files
from model.io import UserError

ARMS = ("real", "synthetic", "hybrid")


def synthetic_set(run_dir, classes, size, per_class=None):
    """The kept images of a run (or a class-folder set) as an ImageSet at `size` px; per_class: only
    the first that many of each class, in file order (nested sets: 10 of them are among the 25)."""
    files = image_files(run_dir, classes)
    if per_class is not None:
        files = [f for c in range(len(classes)) for f in sorted(f for f in files if f[1] == c)[:per_class]]
    rels = [f for f, _ in files]
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ImageSet(read_images(run_dir, rels, size), labels, list(classes), os.path.abspath(run_dir),
                    f"synthetic:{files_fingerprint(run_dir, rels)}")


def real_subset(data, fraction, seed):
    """Keep round(fraction * n_c) images of every class c (at least 1), chosen by `seed`."""
    if not 0 < fraction <= 1:
        raise UserError(f"--real-fraction {fraction}: must be in (0, 1]")
    if fraction == 1:
        return data
    subset = per_class_subset(data, seed, fraction=fraction)
    return replace(subset, fingerprint=f"{data.fingerprint}:fraction={fraction}:seed={seed}")


def concat(first, second):
    return ImageSet(torch.cat([first.images, second.images]), torch.cat([first.labels, second.labels]),
                    first.classes, f"{first.source} + {second.source}", f"{first.fingerprint}+{second.fingerprint}")


def utility(run_dir, real_train, real_val, real_test, recipe, out_dir, real_fraction=1.0, overwrite=False,
            synthetic_per_class=None, arms=ARMS):
    """Train `arms` (default all three) and test each on real_test; -> {arm: report + training set sizes}.
    synthetic_per_class: use only the first N kept images of each class (utility against N)."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise UserError(f"--arms {' '.join(arms)}: choose among {', '.join(ARMS)}")
    if synthetic_per_class is not None and synthetic_per_class < 1:
        raise UserError(f"--synthetic-per-class {synthetic_per_class}: must be at least 1")
    size = real_train.images.shape[-1]
    synth = synthetic_set(run_dir, real_train.classes, size, synthetic_per_class)
    if len(synth) == 0 and "synthetic" in arms:
        raise UserError(f"{run_dir}: no kept images to train on")
    if len(synth) == 0:  # the loop kept nothing: the hybrid set is the real one, and says so
        print(f"warning: {run_dir} has no kept images: the hybrid arm trains on the real images alone", file=sys.stderr)
    real = real_subset(real_train, real_fraction, recipe.seed)
    sets = {"real": real, "synthetic": synth, "hybrid": concat(real, synth)}
    for arm in arms:  # refuse now, not after hours of training the arms before it
        check_run(os.path.join(out_dir, arm), recipe, sets[arm], overwrite=overwrite)
    results = {}
    for arm in arms:
        train_set = replace(sets[arm], images=sets[arm].images.contiguous())
        ckpt = train(train_set, real_val, recipe, os.path.join(out_dir, arm), overwrite=overwrite)
        report = evaluate_classifier(load_classifier(ckpt), real_test)
        counts = np.bincount(train_set.labels.numpy(), minlength=len(real_train.classes))
        results[arm] = {"accuracy": report["accuracy"], "f1_macro": report["f1_macro"],
                        "auc_macro": report["auc_macro"], "n_train": len(train_set),
                        "n_train_per_class": counts.tolist(), "checkpoint": os.path.abspath(ckpt),
                        "test": report}
    return results


def format_utility(results):
    lines = [f"{'trained on':<10}  {'n_train':>7}  {'test ACC':>8}  {'macro F1':>8}  {'AUC':>6}"]
    for arm, result in results.items():
        auc = "-" if result["auc_macro"] is None else f"{result['auc_macro']:.4f}"
        lines.append(f"{arm:<10}  {result['n_train']:>7}  {result['accuracy']:>8.4f}  {result['f1_macro']:>8.4f}  "
                     f"{auc:>6}")
    return "\n".join(lines)
