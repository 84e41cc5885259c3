"""report.md for a run folder made by run.sh: what each stage wrote, its headline numbers, links.

Stage folders (each written by its own script, so any stage can be swapped or rerun alone):
    classifier/  train_classifier.py     eval_classifier/  evaluate.py classifier (real test split)
    lora/        train_lora.py           samples/          sample_validated.py + evaluate.py generation
    conditioning/                        evaluate.py conditioning (the diffusion classifier)
    reconstruction/                      evaluate.py reconstruction (the size path and the VAE, judged)
    memorization/, utility/              evaluate.py memorization / utility (samples/fidelity.json too)
With the real data (`data`), report.md opens with real_vs_synthetic.png: per class, real test
images beside kept synthetic ones.
"""
import os

from model.data import read_image
from model.eval.generation import image_files
from model.io import read_json, save_png, write_text
from model.plots import image_grid
from model.sd.sampling import to_pil

PER_SIDE = 5  # images per class on each side of real_vs_synthetic.png

# The paper's headline for its best LoRA (sec. 4.2: 10 images per class, first attempts).
PAPER = {"precision_macro": 0.6817, "recall_macro": 0.7111, "f1_macro": 0.6727}


def _links(run, items):
    """Markdown lines for the files that exist: images inline, other files as links."""
    out = []
    for title, rel in items:
        if os.path.isfile(os.path.join(run, rel)):
            # An image is a paragraph of its own (a blank line first), a file a list item.
            out += ["", f"![{title}]({rel})"] if rel.endswith(".png") else [f"- [{title}]({rel})"]
    return out


def _latest_grid(run):
    folder = os.path.join(run, "lora", "samples")
    pngs = sorted(f for f in os.listdir(folder) if f.endswith(".png")) if os.path.isdir(folder) else []
    return os.path.join("lora", "samples", pngs[-1]) if pngs else None


def real_vs_synthetic(samples, real, per_side=PER_SIDE):
    """Per class, a row: `per_side` real images (the first of each class in `real`), a gap, then
    the first `per_side` kept synthetic images of the run folder `samples`."""
    kept = {}
    for rel, label in image_files(samples, list(real.classes)):
        kept.setdefault(label, []).append(rel)
    cells, labels = [], []
    for label, name in enumerate(real.classes):
        reals = (real.labels == label).nonzero().flatten()[:per_side]
        row = to_pil(real.images[reals].float() / 255) + [None] * (per_side - len(reals)) + [None]
        synth = [to_pil(read_image(os.path.join(samples, rel))[None].float() / 255)[0]
                 for rel in kept.get(label, [])[:per_side]]
        cells += row + synth + [None] * (per_side - len(synth))
        labels.append(name.replace("_", " "))
    return image_grid(cells, 2 * per_side + 1, row_labels=labels, cell=64)


def _conditioning(run):
    """The diffusion classifier's lines (evaluate.py conditioning): accuracy against chance, per class."""
    r = read_json(os.path.join(run, "conditioning", "conditioning.json"), missing_ok=True)
    if not r:
        return []
    lo, hi = r["accuracy_interval_95"]
    lines = [f"Does the LoRA listen to the class prompt? A diffusion classifier (each real {r['split']} image "
             f"gets the class whose prompt lets the UNet denoise it best; {r['n_images']} images, {r['draws']} "
             f"draws each): accuracy {r['accuracy']:.3f} +- {r['accuracy_se']:.3f} (95% interval {lo:.3f}-{hi:.3f}) "
             f"against chance {r['chance']:.3f}; the prompt moves the error by {r['relative_spread']:.3g} of its "
             f"size (0: ignored).", "", "| class | accuracy | predicted as it |", "|---|---|---|"]
    for name, acc in r["per_class_accuracy"].items():
        lines.append(f"| {name} | {'-' if acc is None else f'{acc:.2f}'} | {r['predicted_counts'][name]} |")
    return lines + [""]


def _reconstruction(run):
    """What the way into the model costs the validator (evaluate.py reconstruction): three columns."""
    r = read_json(os.path.join(run, "reconstruction", "reconstruction.json"), missing_ok=True)
    if not r or "columns" not in r:
        return []
    c = r["columns"]
    lines = [f"What the size path and the VAE cost the validator, on {r['n']} real {r['split']} images "
             f"(no generator through this path can score above the last column):", "",
             "| | as they are | size path alone | size path + VAE |", "|---|---|---|---|",
             "| accuracy | " + " | ".join(f"{c[k]['accuracy']:.3f}" for k in ("original", "size_path", "vae")) + " |",
             f"| PSNR (dB) | - | {c['size_path']['psnr_db']:.1f} | {c['vae']['psnr_db']:.1f} |"]
    for name in c["original"]["recall_per_class"]:
        vals = [c[k]["recall_per_class"][name] for k in ("original", "size_path", "vae")]
        lines.append(f"| recall {name} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + " |")
    return lines + [""]


def _evaluations(run):
    """Fidelity, memorisation and utility lines, for those that were run."""
    lines = []
    fid = read_json(os.path.join(run, "samples", "fidelity.json"), missing_ok=True)
    if fid:
        for features, result in fid.items():
            if isinstance(result, dict) and "overall" in result:
                overall = result["overall"]
                floor = (f"; real train vs test floor {overall['floor_frechet_distance']:.4g}, ratio "
                         f"{overall['ratio_to_floor']:.2f}" if "floor_frechet_distance" in overall else "")
                lines.append(f"- Frechet distance to the real {fid.get('split', '')} split ({features}): "
                             f"{overall['frechet_distance']:.4g}{floor}")
    mem = read_json(os.path.join(run, "memorization", "memorization.json"), missing_ok=True)
    if mem:
        gen, real = mem["generated"], mem["real_test"]
        lines.append(f"- Memorisation: median nearest-training-image pixel RMS {gen['pixel_rms']['median']:.4f} "
                     f"(real test images: {real['pixel_rms']['median']:.4f}, ratio {mem['ratio']['pixel_rms']:.2f}); "
                     f"near-copies {gen['near_copies']} of {gen['n']} (real test: {real['near_copies']})")
    util = read_json(os.path.join(run, "utility", "utility.json"), missing_ok=True)
    if util:
        arms = [f"{arm} {util[arm]['accuracy']:.3f}" for arm in ("real", "synthetic", "hybrid") if arm in util]
        lines.append(f"- Utility, test accuracy of the validator recipe trained on: {', '.join(arms)}")
    return lines + [""] if lines else []


def build_report(run, preset):
    lines = [f"# medsynth run: `{os.path.basename(os.path.abspath(run))}` (preset `{preset}`)", ""]
    lines += _links(run, [("real (left) and kept synthetic (right) images per class", "real_vs_synthetic.png")])
    if preset == "tiny":
        lines += ["> Tiny preset: a random-weight, SD-shaped model and 600 real images. This run shows the "
                  "machinery working end to end; the images are noise and the generation scores mean "
                  "nothing. Use `bash run.sh paper` on a GPU for real results.", ""]
    clf = read_json(os.path.join(run, "eval_classifier", "metrics.json"), missing_ok=True)
    lines += ["## 1. Validator (ResNet, `classifier/`)", ""]
    if clf:
        lines += [f"Real test split: accuracy {clf['accuracy']:.3f}, macro AUC {clf['auc_macro']:.3f}, "
                  f"macro F1 {clf['f1_macro']:.3f}.", ""]
    lines += _links(run, [("weights", "classifier/classifier.safetensors"), ("training log", "classifier/log.jsonl"),
                          ("test metrics", "eval_classifier/metrics.json"),
                          ("training curve", "classifier/training_curve.png"),
                          ("test confusion matrix", "eval_classifier/confusion.png")]) + [""]
    lines += _reconstruction(run) + _links(run, [("real / size path / VAE round trip", "reconstruction/reconstruction.png")])
    lines += ["", "## 2. Generator (LoRA, `lora/`)", ""]
    lines += _links(run, [("LoRA weights", "lora/lora.safetensors"), ("loss log", "lora/loss.csv"),
                          ("loss curve", "lora/loss.png")])
    grid = _latest_grid(run)
    lines += (["", "Last validation grid (one image per class):", "", f"![validation grid]({grid})"]
              if grid else []) + [""]
    links = _links(run, [("diffusion classifier during training (val images)", "lora/conditioning.png"),
                         ("diffusion classifier, result", "conditioning/conditioning.json"),
                         ("diffusion classifier, confusion matrix", "conditioning/confusion.png")])
    lines += _conditioning(run) + links + ([""] if links else [])
    gen = read_json(os.path.join(run, "samples", "metrics.json"), missing_ok=True)
    lines += ["## 3. Validated samples (`samples/`)", ""]
    if gen:
        acceptance = gen.get("acceptance", {})
        lines += ["First-attempt scores (prompted class = truth, validator = prediction), against the paper:", "",
                  "| | precision | recall | F1 |", "|---|---|---|---|",
                  f"| this run | {gen['precision_macro']:.4f} | {gen['recall_macro']:.4f} | {gen['f1_macro']:.4f} |",
                  f"| paper (SD1.5 + LoRA, 10/class) | {PAPER['precision_macro']} | {PAPER['recall_macro']} "
                  f"| {PAPER['f1_macro']} |", ""]
        if acceptance:
            mean = acceptance["mean_attempts"]
            hit = acceptance.get("classes_hit_max_attempts")
            lines += [f"Reject loop: {acceptance['kept']} kept of {acceptance['candidates']} candidates "
                      f"(acceptance {acceptance['acceptance_rate']:.3f}); attempts per kept image: mean "
                      f"{mean if mean is None else round(mean, 2)}, max {acceptance['max_attempts']}."
                      + (f" Hit --max-attempts: {hit}." if hit else ""), ""]
    lines += _links(run, [("manifest (one row per candidate)", "samples/manifest.csv"),
                          ("settings", "samples/run.json"), ("metrics", "samples/metrics.json"),
                          ("contact sheet (one row per class)", "samples/contact_sheet.png"),
                          ("first-attempt confusion matrix", "samples/confusion.png")]) + [""]
    lines += ["## 4. Fidelity, memorisation, utility", ""] + _evaluations(run)
    lines += _links(run, [("closest synthetic / training pairs", "memorization/closest_pairs.png")]) + [""]
    return "\n".join(lines)


def write_report(run, preset, real=None):
    """report.md (and, given the real test split `real`, real_vs_synthetic.png) into `run`."""
    if real is not None and os.path.isdir(os.path.join(run, "samples")):
        save_png(os.path.join(run, "real_vs_synthetic.png"), real_vs_synthetic(os.path.join(run, "samples"), real))
    path = os.path.join(run, "report.md")
    write_text(path, build_report(run, preset))
    return path

