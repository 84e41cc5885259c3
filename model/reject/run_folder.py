"""The output folder of sample_validated.py: where images go, manifest.csv, run.json, resuming.

    DIR/<class_name>/<class_name>_<index>.png     accepted images (index 0000 .. per_class - 1)
    DIR/rejected/<class_name>_<index>_a<attempt>.png   rejected candidates, with --keep-rejected
    DIR/manifest.csv   one row per candidate ever classified, sorted by (class, index, attempt)
    DIR/run.json       the settings (which decide every pixel) and, once finished, the statistics
    DIR/contact_sheet.png

The manifest is the run's memory: it is rewritten atomically after every batch, so a kill loses
at most the batch in flight, and a rerun reads it back to know which candidates exist already.
Its first nine columns are a fixed contract other tools read; ours follow them.

`RunFolder` is the folder as one run uses it: sample_validated.py hands it to
`model.reject.loop.reject_sample`, which calls `save_image` for each candidate and
`write_manifest` after each batch; the script starts and finishes the run through it.
"""
import csv
import json
import os

from PIL import Image

from model.io import UserError, read_json, save_png, write_csv, write_json
from model.plots import image_grid

COLUMNS = ["file", "class_index", "class_name", "prompt", "seed", "attempt",
           "predicted_index", "prob_prompted", "accepted"]
# index: the work item within its class. early_*: the check at --early-reject-at (empty when off);
# early_dropped=1 means the candidate was rejected there (with --audit-early-reject it was still
# finished, and predicted_index/prob_prompted are then those of its final image).
# init_image: with --init-images, the real image the candidate started from (npz "train:<row>" or
# "<class folder>/<file>").
EXTRA_COLUMNS = ["index", "prob_predicted", "early_predicted_index", "early_prob_prompted", "early_dropped",
                 "init_image"]
INT_COLUMNS = ("class_index", "seed", "attempt", "predicted_index", "accepted", "index",
               "early_predicted_index", "early_dropped")
FLOAT_COLUMNS = ("prob_prompted", "prob_predicted", "early_prob_prompted")
MANIFEST, RUN_JSON, CONTACT_SHEET, REJECTED = "manifest.csv", "run.json", "contact_sheet.png", "rejected"


def image_file(class_name, index):
    return f"{class_name}/{class_name}_{index:04d}.png"


def rejected_file(class_name, index, attempt):
    return f"{REJECTED}/{class_name}_{index:04d}_a{attempt}.png"


def row_key(row):
    return row["class_index"], row["index"], row["attempt"]


def _cell(value):
    if value is None:
        return ""
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def write_manifest(run_dir, rows):
    columns = COLUMNS + EXTRA_COLUMNS
    ordered = sorted(rows, key=row_key)
    write_csv(os.path.join(run_dir, MANIFEST), columns, [[_cell(r.get(c)) for c in columns] for r in ordered])


def _parse(row, path, line):
    out = dict(row)
    try:
        for c in INT_COLUMNS:
            if c in out:
                out[c] = int(out[c]) if out[c] != "" else None
        for c in FLOAT_COLUMNS:
            if c in out:
                out[c] = float(out[c]) if out[c] != "" else None
    except (TypeError, ValueError):
        raise UserError(f"{path}, line {line}: malformed row (column {c} = {out[c]!r})") from None
    return out


def read_manifest(run_dir):
    """Rows as dicts with ints and floats parsed; [] when there is no manifest yet."""
    path = os.path.join(run_dir, MANIFEST)
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{path}: not a sample_validated.py manifest (missing columns {', '.join(missing)})")
        return [_parse(r, path, i + 2) for i, r in enumerate(reader)]


def read_run_json(run_dir):
    return read_json(os.path.join(run_dir, RUN_JSON), missing_ok=True,
                     hint="; remove it or pass --overwrite")


def check_resumable(run_dir, settings, overwrite):
    """Existing rows to resume from. A folder holding a run with other settings is refused (its
    images would be mixed with different ones) unless overwrite (then the caller removes it)."""
    previous = read_run_json(run_dir)
    rows = read_manifest(run_dir)
    if overwrite or (previous is None and not rows):
        return []
    if previous is None:
        raise UserError(f"{run_dir} has a {MANIFEST} but no {RUN_JSON}: pass --overwrite or use another --out")
    old = previous.get("settings", {})
    settings = json.loads(json.dumps(settings))  # compare as stored: tuples become lists
    changed = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
    if changed:
        k = changed[0]
        raise UserError(f"{run_dir} holds a run with other settings ({k}: {old.get(k)!r} there, "
                        f"{settings.get(k)!r} now{f', and {len(changed) - 1} more' if len(changed) > 1 else ''}); "
                        f"pass --overwrite to replace it, or use another --out")
    return rows


def remove_run(run_dir, rows):
    """Delete the files a previous run made (and only those), then the folders left empty."""
    names = {r["file"] for r in rows if r.get("file")} | {MANIFEST, RUN_JSON, CONTACT_SHEET, "metrics.json",
                                                          "confusion.png", "fidelity.json"}
    for name in names:
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            os.remove(path)
    for name in sorted({os.path.dirname(n) for n in names if os.path.dirname(n)}):
        folder = os.path.join(run_dir, name)
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)


def contact_sheet(run_dir, rows, class_names, per_class, max_columns=10):
    """One row per class: its first kept images in index order, blank where none was kept."""
    classes = sorted({r["class_index"] for r in rows})
    ncols = min(per_class, max_columns)
    kept = {(r["class_index"], r["index"]): r["file"] for r in rows if r["accepted"] == 1}
    cells = []
    for c in classes:
        for i in range(ncols):
            name = kept.get((c, i))
            if name:
                with Image.open(os.path.join(run_dir, name)) as image:
                    cells.append(image.convert("RGB"))
            else:
                cells.append(None)
    save_png(os.path.join(run_dir, CONTACT_SHEET), image_grid(cells, ncols, [class_names[c] for c in classes]))


class RunFolder:
    """One run's folder. Under torchrun every process saves the images it makes, and only the
    `main` one writes the files the processes share: the manifest, run.json, the contact sheet.

    run.json holds `record` (the settings, the input paths, the class names), then the status:
    "running" from `start` on, "complete" with the statistics once `finish`ed.
    """

    def __init__(self, path, keep_rejected=False, main=True):
        self.path, self.keep_rejected, self.main = path, keep_rejected, main

    def resume(self, settings, overwrite):
        """The rows to resume from ([] for a new run); UserError for a run with other settings
        unless `overwrite` (see check_resumable)."""
        return check_resumable(self.path, settings, overwrite)

    def missing_images(self, rows):
        """The rows whose image file has gone since (deleted by hand): `restore` makes them again."""
        return [r for r in rows if r["file"] and not os.path.isfile(os.path.join(self.path, r["file"]))]

    def is_complete(self):
        return (read_run_json(self.path) or {}).get("status") == "complete"

    def start(self, record, overwrite):
        """Main process: remove the previous run if `overwrite`, then mark this one running."""
        if not self.main:
            return
        if overwrite:
            remove_run(self.path, read_manifest(self.path))
        write_json(os.path.join(self.path, RUN_JSON), {**record, "status": "running"})

    def restore(self, rows, images):
        """Save replayed `images` (model.reject.loop.replay) under their rows' file names."""
        for row, image in zip(rows, images):
            save_png(os.path.join(self.path, row["file"]), image)

    def save_image(self, row, image):
        """Store one candidate's PIL image: an accepted one in its class folder, a rejected one in
        rejected/ if keep_rejected, else nowhere. -> its manifest `file` ("" when not stored)."""
        name = (image_file(row["class_name"], row["index"]) if row["accepted"] else
                rejected_file(row["class_name"], row["index"], row["attempt"]) if self.keep_rejected else "")
        if name:
            save_png(os.path.join(self.path, name), image)
        return name

    def write_manifest(self, rows):
        if self.main:
            write_manifest(self.path, rows)

    def finish(self, rows, class_names, per_class, record, **stats):
        """Main process: the final manifest, the contact sheet, and run.json marked complete."""
        if not self.main:
            return
        write_manifest(self.path, rows)
        contact_sheet(self.path, rows, class_names, per_class)
        write_json(os.path.join(self.path, RUN_JSON), {**record, "status": "complete", **stats})
