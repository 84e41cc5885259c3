"""`evaluate.py compare`: one table over runs, from what the other evaluations wrote.

A run folder is either sample_validated.py's output (manifest.csv, run.json) or a run.sh folder
holding it in samples/. Nothing is recomputed: every number is read from the file its evaluation
wrote at its default place, and a missing one is "n/a" in compare.md and null in compare.json.

    samples/metrics.json       evaluate.py generation [--second-classifier]: first-attempt macro
                               P / R / F1 by the validator, and the second judge's agreement
    samples/fidelity.json      evaluate.py fidelity: overall Frechet distance, validator features
    memorization.json          evaluate.py memorization (RUN/memorization/, or samples/memorization/):
                               median pixel RMS to the nearest training image, near-copies
    utility.json               evaluate.py utility (RUN/utility/, or samples/utility/): test
                               accuracy of the validator's recipe on real + kept images minus on real
                               images alone, in points (seed 002's "gain from augmentation")
    samples/run.json           sample_validated.py: candidates, network evaluations and wall seconds,
                               each divided by the kept images (the sum of kept_per_class)
"""
import math
import os

from model.eval.fidelity import ClassifierFeatures
from model.io import UserError, read_json, write_json, write_text
from model.plots import bar_chart
from model.reject.run_folder import MANIFEST, RUN_JSON

# key, column title, format, where it comes from
COLUMNS = [
    ("precision_macro", "P", ".3f", "metrics.json precision_macro (`evaluate.py generation`, first attempts, validator)"),
    ("recall_macro", "R", ".3f", "metrics.json recall_macro (same)"),
    ("f1_macro", "F1", ".3f", "metrics.json f1_macro (same)"),
    ("second_judge", "2nd judge", ".3f",
     "metrics.json second_judge.agreement (`evaluate.py generation --second-classifier`, kept images)"),
    ("frechet", "Frechet", ".4g",
     f"fidelity.json \"{ClassifierFeatures.name}\".overall.frechet_distance (`evaluate.py fidelity`)"),
    ("memo_median", "mem. median", ".4f",
     "memorization.json generated.pixel_rms.median (`evaluate.py memorization`)"),
    ("near_copies", "near-copies", "d", "memorization.json generated.near_copies (same)"),
    ("utility_gain", "utility +ACC pts", "+.1f",
     "utility.json 100 x (hybrid.accuracy - real.accuracy) (`evaluate.py utility`, real test split)"),
    ("attempts_per_kept", "attempts/kept", ".2f", "run.json costs.candidates / kept"),
    ("unet_per_kept", "UNet evals/kept", ".1f", "run.json costs.unet_evals / kept"),
    ("vae_per_kept", "VAE evals/kept", ".2f", "run.json costs.vae_evals / kept"),
    ("generator_per_kept", "generator evals/kept", ".2f", "run.json costs.generator_evals / kept (GAN forwards)"),
    ("seconds_per_kept", "seconds/kept", ".2f", "run.json seconds_total / kept (wall seconds, all sessions)"),
]
CHART = ["f1_macro", "second_judge", "frechet", "memo_median", "attempts_per_kept", "seconds_per_kept"]
MEMORIZATION = os.path.join("memorization", "memorization.json")
UTILITY = os.path.join("utility", "utility.json")


def _get(obj, *keys):
    """obj[k1][k2]... as a float, or None where a key is missing or the value is not a number."""
    for k in keys:
        if not isinstance(obj, dict) or k not in obj:
            return None
        obj = obj[k]
    number = isinstance(obj, (int, float)) and not isinstance(obj, bool)
    return float(obj) if number and math.isfinite(obj) else None


def _per(value, kept):
    return None if value is None or not kept else value / kept


def find_run(run_dir):
    """(samples folder, memorization.json path or None, utility.json path or None) of a run folder;
    UserError if it is none."""
    if not os.path.isdir(run_dir):
        raise UserError(f"{run_dir}: not a folder")
    for samples in (run_dir, os.path.join(run_dir, "samples")):
        if all(os.path.isfile(os.path.join(samples, f)) for f in (MANIFEST, RUN_JSON)):
            break
    else:
        raise UserError(f"{run_dir}: not a run (no {MANIFEST} and {RUN_JSON} in it or in its samples/)")
    return samples, _beside(samples, run_dir, MEMORIZATION), _beside(samples, run_dir, UTILITY)


def _beside(samples, run_dir, name):
    """samples/name, else run_dir/name (where run.sh puts it), else None."""
    return next((p for p in (os.path.join(d, name) for d in (samples, run_dir)) if os.path.isfile(p)), None)


def run_row(run_dir, name):
    """One row of the table: the run's numbers, None where an evaluation is missing."""
    samples, mem_path, utility_path = find_run(run_dir)
    run = read_json(os.path.join(samples, RUN_JSON))
    if not isinstance(run, dict):
        raise UserError(f"{os.path.join(samples, RUN_JSON)}: not a sample_validated.py run.json")
    metrics = read_json(os.path.join(samples, "metrics.json"), missing_ok=True) or {}
    judge = metrics.get("second_judge") if isinstance(metrics, dict) else None
    judge = judge if isinstance(judge, dict) else {}
    if not isinstance(metrics, dict) or metrics.get("source") != "manifest":
        metrics = {}  # metrics of a folder classified by --classifier have no first attempts
    fid = read_json(os.path.join(samples, "fidelity.json"), missing_ok=True) or {}
    mem = read_json(mem_path) if mem_path else {}
    util = read_json(utility_path) if utility_path else {}
    hybrid, real = _get(util, "hybrid", "accuracy"), _get(util, "real", "accuracy")
    per_class = run.get("kept_per_class")
    counts = list(per_class.values()) if isinstance(per_class, dict) else None
    kept = sum(counts) if counts and all(isinstance(k, int) for k in counts) else None
    costs, near, n = run.get("costs"), _get(mem, "generated", "near_copies"), _get(mem, "generated", "n")
    return {
        "name": name, "run": os.path.abspath(run_dir), "samples": os.path.abspath(samples),
        "status": run.get("status"), "kept": kept,
        **{k: _get(metrics, k) for k in ("precision_macro", "recall_macro", "f1_macro")},
        "second_judge": _get(judge, "agreement"), "second_judge_arch": judge.get("arch"),
        "frechet": _get(fid, ClassifierFeatures.name, "overall", "frechet_distance"),
        "memo_median": _get(mem, "generated", "pixel_rms", "median"),
        "near_copies": None if near is None else int(near), "memo_n": None if n is None else int(n),
        "utility_gain": None if hybrid is None or real is None else 100 * (hybrid - real),
        "attempts_per_kept": _per(_get(costs, "candidates"), kept),
        "unet_per_kept": _per(_get(costs, "unet_evals"), kept),
        "vae_per_kept": _per(_get(costs, "vae_evals"), kept),
        "generator_per_kept": _per(_get(costs, "generator_evals"), kept),
        "seconds_per_kept": _per(_get(run, "seconds_total"), kept),
    }


def compare(run_dirs, names=None):
    """One row per run folder, in the order given. names: one per run (default: the folder names,
    or the paths as given where two folders share a name)."""
    if names is not None and len(names) != len(run_dirs):
        raise UserError(f"--names: {len(names)} names for {len(run_dirs)} runs")
    if names is None:
        names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
        if len(set(names)) < len(names):
            names = list(run_dirs)
    return [run_row(d, n) for d, n in zip(run_dirs, names)]


def _cell(value, fmt):
    return "n/a" if value is None else format(value, fmt)


def format_compare(rows):
    """The markdown table, one row per run, then where each column comes from."""
    head = ["run", "kept", *(title for _, title, _, _ in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], _cell(r["kept"], "d"), *(_cell(r[k], fmt) for k, _, fmt, _ in COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Where each column comes from (files of each run's samples folder; n/a: not evaluated):", ""]
    lines.append("- **kept**: run.json, the sum of kept_per_class")
    lines += [f"- **{title}**: {source}" for _, title, _, source in COLUMNS]
    return "\n".join(lines) + "\n"


def write_compare(out_dir, rows):
    """compare.md, compare.json (the same numbers, full precision) and compare.png, atomically."""
    write_text(os.path.join(out_dir, "compare.md"), format_compare(rows))
    write_json(os.path.join(out_dir, "compare.json"), {
        "columns": {k: {"title": title, "source": source} for k, title, _, source in COLUMNS}, "runs": rows})
    titles = {k: title for k, title, _, _ in COLUMNS}
    bar_chart(os.path.join(out_dir, "compare.png"), {titles[k]: [r[k] for r in rows] for k in CHART},
              [r["name"] for r in rows], title="runs compared (each panel on its own scale)")
