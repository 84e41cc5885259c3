"""`evaluate.py generation`: how often does the generator make the class it was asked for?

The paper's measure (sec. 4): prompt a fixed number of images per class, let the validator label
each one, and score the labels against the prompts, with the prompted class as ground truth. A
reject-sampling run records exactly that in its manifest: the attempt-1 candidate of every work
item is the image the paper's generator would have produced, before any regeneration. So
precision/recall/F1 come from attempt-1 rows; the later attempts say what the loop cost
(acceptance rate, attempts per kept image, work items that ran out of attempts).

A folder made elsewhere (one sub-folder per class, no manifest) is scored by classifying every
image in it once with a given classifier (so are a run's kept images, if a classifier is given).

A second judge: every kept image passed the validator by construction, so the validator cannot say
whether it shows its class or only fools that one network. A second classifier of another
architecture, trained with another seed (e.g. `train_classifier.py --arch vit`), is asked the same
question; `second_judge` reports how often it agrees with the prompted class.
"""
import os

import numpy as np

from model.data import class_folders, image_batches, list_images, name_key
from model.io import UserError
from model.reject.run_folder import REJECTED, read_manifest, read_run_json, rejected_file
from model.metrics import classification_report, confusion_matrix


def _class_names(rows, run):
    """The validator's full class list: from run.json, else from the manifest's own names."""
    if run and run.get("classes"):
        return list(run["classes"])
    n_classes = max(max(r["class_index"], r["predicted_index"]) for r in rows) + 1
    names = [f"class_{index}" for index in range(n_classes)]
    for r in rows:
        names[r["class_index"]] = r["class_name"]
    return names


def scores(y_true, y_pred, classes, prompted):
    """The classifier-style report, with macro averages over the prompted classes only: a class
    nobody asked for has no support, and counting its zero F1 would punish the generator for it.
    Images predicted as such a class still count as errors (they lower the prompted class's recall)."""
    conf = confusion_matrix(y_true, y_pred, len(classes))
    report = classification_report(conf, classes)
    per_class = [report["per_class"][label] for label in prompted]
    for key in ("precision", "recall", "f1"):
        report[f"{key}_macro"] = float(np.mean([p[key] for p in per_class])) if per_class else 0.0
    report["per_class"] = per_class
    report["classes"] = list(classes)
    return report


def _acceptance(rows, classes, prompted, max_attempts):
    """Per prompted class: candidates, kept images, acceptance rate, attempts per kept image, and
    work items whose last allowed attempt was rejected too."""
    out = {}
    for label in prompted:
        mine = [r for r in rows if r["class_index"] == label]
        kept = [r["attempt"] for r in mine if r["accepted"] == 1]
        out[classes[label]] = {
            "candidates": len(mine), "kept": len(kept),
            "acceptance_rate": len(kept) / len(mine) if mine else 0.0,
            "mean_attempts": float(np.mean(kept)) if kept else None,
            "max_attempts": max(kept) if kept else None,
            # each work item has at most one row per attempt, so this counts work items
            "hit_max_attempts": sum(1 for r in mine if r["attempt"] == max_attempts and r["accepted"] == 0)
            if max_attempts else None,
        }
    return out


def manifest_metrics(run_dir):
    """Metrics of a sample_validated.py run folder, from its manifest (and run.json) alone."""
    rows = read_manifest(run_dir)
    if not rows:
        raise UserError(f"{run_dir}: no manifest.csv (for a folder of images, pass --classifier to classify them)")
    run = read_run_json(run_dir) or {}
    classes = _class_names(rows, run)
    prompted = sorted({r["class_index"] for r in rows})
    first = [r for r in rows if r["attempt"] == 1]
    report = scores([r["class_index"] for r in first], [r["predicted_index"] for r in first], classes, prompted)
    max_attempts = run.get("settings", {}).get("max_attempts")
    acceptance = _acceptance(rows, classes, prompted, max_attempts)
    for entry in report["per_class"]:
        entry.update(acceptance[entry["name"]])
    kept = [r["attempt"] for r in rows if r["accepted"] == 1]
    early = sum(1 for r in first if r.get("early_dropped") == 1 and not run.get("settings", {}).get("audit_early_reject"))
    return {
        "source": "manifest", "run": os.path.abspath(run_dir), "n_first_attempt": len(first),
        # without --audit-early-reject a candidate dropped at the early check has no final image:
        # its label is the early prediction, which these attempt-1 metrics then use
        "first_attempt_labels_from_early_check": early,
        **report,
        "acceptance": {
            "candidates": len(rows), "kept": len(kept),
            "acceptance_rate": len(kept) / len(rows),
            "mean_attempts": float(np.mean(kept)) if kept else None,
            "max_attempts": max(kept) if kept else None,
            "max_attempts_allowed": max_attempts,
            "classes_hit_max_attempts": {name: entry["hit_max_attempts"] for name, entry in acceptance.items()
                                         if entry["hit_max_attempts"]},
        },
    }


def _match_class(folder, name, classes):
    """Index of a sub-folder's class among the classifier's classes, spelling aside."""
    keys = [name_key(c) for c in classes]
    if name_key(name) not in keys:
        raise UserError(f"sub-folder '{folder}' is not a class of the classifier ({', '.join(classes)})")
    return keys.index(name_key(name))


def image_files(folder, classes):
    """(relative file, class index) of the images of a run: the kept ones listed in its manifest,
    else every image of `folder/<class>/` with sub-folders matched to `classes` by name (a run's
    rejected/ folder is skipped)."""
    if not os.path.isdir(folder):
        raise UserError(f"--run {folder}: not a folder")
    rows = read_manifest(folder)
    if rows:
        return [(r["file"], r["class_index"]) for r in rows if r["accepted"] == 1 and r["file"]]
    files = []
    for sub, name in class_folders(folder).items():
        # rejected/ holds a run's rejects, memorization/ evaluate.py memorization's report (a PNG)
        names = list_images(os.path.join(folder, sub)) if sub not in (REJECTED, "memorization") else []
        if names:  # folders without images (e.g. evaluate.py utility's output) are not classes
            label = _match_class(sub, name, classes)
            files += [(os.path.join(sub, f), label) for f in names]
    if not files:
        raise UserError(f"{folder}: no manifest.csv and no class sub-folders with images")
    return files


def folder_metrics(folder, classifier, batch_size=64):
    """Classify every image of `folder/<class>/` once, the prompted class being the folder's (of a
    run folder: its kept images, e.g. to ask an independent classifier whether it agrees)."""
    classes = list(classifier.classes)
    files = image_files(folder, classes)
    # predict_proba resizes to the classifier's size, so batches of mixed sizes just go one at a time
    preds = [int(p) for batch in image_batches(folder, [f for f, _ in files], batch_size)
             for p in classifier.predict_proba(batch).argmax(1)]
    y_true = [label for _, label in files]
    report = scores(y_true, preds, classes, sorted(set(y_true)))
    return {"source": "classified", "run": os.path.abspath(folder), "n_first_attempt": len(files), **report,
            "predictions": [{"file": f, "class_index": label, "predicted_index": p}
                            for (f, label), p in zip(files, preds)]}


def second_judge(folder, judge, path):
    """The fraction of the kept images of `folder` (see image_files) that classifier `judge` (loaded
    from `path`) assigns to their prompted class, overall and per prompted class. A manifest names
    prompted classes by index, so the judge must put the same class at each of those indices (its
    other classes do not matter: predicting one is a disagreement); class sub-folders go by name."""
    named = {r["class_index"]: r["class_name"] for r in read_manifest(folder)}
    wrong = [(i, name) for i, name in sorted(named.items())
             if i >= len(judge.classes) or name_key(judge.classes[i]) != name_key(name)]
    if wrong:
        raise UserError(f"--second-classifier {path}: its class {wrong[0][0]} is not '{wrong[0][1]}' as in the "
                        f"run (it knows {', '.join(judge.classes)})")
    first = _first_attempt_agreement(folder, judge)
    if not image_files(folder, judge.classes):
        if first is None:
            raise UserError(f"--second-classifier: {folder} has no kept images to judge")
        return {"classifier": os.path.abspath(path), "arch": judge.arch, "agreement": None, "per_class": {},
                "kept": 0, "first_attempt_agreement": first}
    m = folder_metrics(folder, judge)
    hits = sum(1 for p in m["predictions"] if p["predicted_index"] == p["class_index"])
    # with the prompted class as the truth, a class's recall is the share of its images judged as it
    return {"classifier": os.path.abspath(path), "arch": judge.arch, "agreement": hits / len(m["predictions"]),
            "per_class": {p["name"]: p["recall"] for p in m["per_class"]}, "kept": len(m["predictions"]),
            "first_attempt_agreement": first}


def _first_attempt_agreement(folder, judge, batch_size=64):
    """The judge's agreement with the prompted class on every first attempt, kept or rejected: what
    the loop's output would be without the loop. None unless the run kept its rejects
    (sample_validated.py --keep-rejected) and dropped none at an early check."""
    first = [r for r in read_manifest(folder) if r["attempt"] == 1]
    files = [r["file"] if r["accepted"] == 1 else rejected_file(r["class_name"], r["index"], r["attempt"])
             for r in first]
    if not files or not all(os.path.isfile(os.path.join(folder, f)) for f in files):
        return None
    preds = [int(p) for batch in image_batches(folder, files, batch_size)
             for p in judge.predict_proba(batch).argmax(1)]
    return sum(p == r["class_index"] for p, r in zip(preds, first)) / len(first)


def format_second_judge(judge):
    per_class = ", ".join(f"{name} {value:.3f}" for name, value in judge["per_class"].items())
    kept = "no kept images" if judge["agreement"] is None else \
        f"{judge['agreement']:.3f} of {judge['kept']} kept images; per class: {per_class}"
    return (f"second judge ({judge['arch']}, {judge['classifier']}): agrees with the prompted class on {kept}"
            + ("" if judge.get("first_attempt_agreement") is None else
               f"; on all first attempts (no loop): {judge['first_attempt_agreement']:.3f}"))


def format_generation(metrics):
    """Per-class table: precision, recall, F1 (first attempts) and, for a run, acceptance stats."""
    rows = metrics["per_class"]
    width = max(12, *(len(r["name"]) for r in rows))
    loop = metrics["source"] == "manifest"
    head = f"{'class':<{width}}  precision  recall     f1  n"
    lines = [head + ("   accept  kept  mean_att  max_att  hit_max" if loop else "")]
    for r in rows:
        line = f"{r['name']:<{width}}  {r['precision']:>9.3f}  {r['recall']:>6.3f}  {r['f1']:>5.3f}  {r['support']}"
        if loop:
            mean = "-" if r["mean_attempts"] is None else f"{r['mean_attempts']:.2f}"
            line += (f"   {r['acceptance_rate']:>6.3f}  {r['kept']:>4}  {mean:>8}  {r['max_attempts'] or '-':>7}"
                     f"  {r['hit_max_attempts'] if r['hit_max_attempts'] is not None else '-':>7}")
        lines.append(line)
    lines.append(f"{'macro':<{width}}  {metrics['precision_macro']:>9.3f}  {metrics['recall_macro']:>6.3f}  "
                 f"{metrics['f1_macro']:>5.3f}  {metrics['n_first_attempt']}")
    if loop:
        loop_stats = metrics["acceptance"]
        mean = "-" if loop_stats["mean_attempts"] is None else f"{loop_stats['mean_attempts']:.2f}"
        lines.append(f"acceptance {loop_stats['acceptance_rate']:.3f} ({loop_stats['kept']} kept of "
                     f"{loop_stats['candidates']} candidates), attempts per kept image: mean {mean}, "
                     f"max {loop_stats['max_attempts']}")
        if loop_stats["classes_hit_max_attempts"]:
            lines.append("hit --max-attempts: " + ", ".join(
                f"{name} ({count})" for name, count in loop_stats["classes_hit_max_attempts"].items()))
    return "\n".join(lines)
