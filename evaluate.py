"""Evaluate medsynth's parts; one subcommand per question.

    python evaluate.py classifier --classifier out/classifier/classifier.safetensors --data pathmnist --out out/eval

classifier: how good is the validator on held-out real images (default: the test split)? Prints a
per-class table and writes OUT/metrics.json and OUT/confusion.png.

generation: the paper's measure of the generator. From a sample_validated.py run's manifest, the
prompted class is the truth and the validator's verdict on each first attempt the prediction:
per-class and macro precision / recall / F1, the confusion matrix, and the loop's acceptance rate and
attempts per kept image (RUN/metrics.json, RUN/confusion.png). A folder of images made elsewhere
(one sub-folder per class) is classified with --classifier.

    python evaluate.py generation --run runs/synth

fidelity: Frechet distance between real and generated images in the validator's penultimate-layer
feature space, per class and overall (NOT Inception FID); standard FID too with --inception PATH.

utility: the validator's recipe trained on real, synthetic and real + synthetic images, each tested
on the real test split (ACC, macro F1, AUC); --real-fraction simulates scarce real data.

report: RUN/report.md for a run.sh folder, linking what every stage wrote with its headline numbers.
"""
import os

from model.validator.classifier import evaluate_classifier, load_classifier
from model.validator.train import Recipe
from model.data import load_split
from model.eval.fidelity import ClassifierFeatures, fidelity, format_fidelity
from model.eval.generation import folder_metrics, format_generation, image_files, manifest_metrics
from model.io import ArgumentParser, UserError, cli, write_json
from model.reject.run_folder import read_run_json
from model.metrics import format_report
from model.plots import confusion_png
from model.training import pick_device


def add_classifier_parser(sub):
    p = sub.add_parser("classifier", help="accuracy, AUC, F1 and confusion of a trained classifier on real data")
    p.add_argument("--classifier", required=True, help="classifier.safetensors from train_classifier.py")
    p.add_argument("--data", default="pathmnist", help="pathmnist[_64|_128|_224], an .npz or a class folder")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="default: %(default)s")
    p.add_argument("--out", default="out/eval_classifier", help="output folder (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.set_defaults(run=run_classifier)


def run_classifier(args):
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    clf = load_classifier(args.classifier, pick_device(args.device))
    data = load_split(args.data, args.split)
    report = evaluate_classifier(clf, data, batch_size=args.batch_size)
    print(format_report(report))
    write_json(os.path.join(args.out, "metrics.json"), {
        "classifier": os.path.abspath(args.classifier), "data": data.source, "data_fingerprint": data.fingerprint,
        "split": args.split, **report})
    confusion_png(os.path.join(args.out, "confusion.png"), report["confusion"], clf.classes,
                  title=f"{args.split} split (rows: true, columns: predicted)")
    print(f"wrote {os.path.join(args.out, 'metrics.json')} and confusion.png")


def add_generation_parser(sub):
    p = sub.add_parser("generation", help="the paper's precision / recall / F1 of generated images, and acceptance")
    p.add_argument("--run", dest="run_dir", required=True, metavar="DIR",
                   help="a sample_validated.py output folder, or any folder with one sub-folder of images per class")
    p.add_argument("--classifier", help="classify the images in DIR/<class>/ with this validator instead of "
                                        "reading a manifest (needed for a folder made elsewhere)")
    p.add_argument("--out", metavar="DIR", help="where metrics.json and confusion.png go (default: --run)")
    p.add_argument("--device", default="auto")
    p.set_defaults(run=run_generation)


def run_generation(args):
    if args.classifier:
        m = folder_metrics(args.run_dir, load_classifier(args.classifier, pick_device(args.device)))
    else:
        m = manifest_metrics(args.run_dir)
    print(format_generation(m))
    out = args.out or args.run_dir
    write_json(os.path.join(out, "metrics.json"), m)
    confusion_png(os.path.join(out, "confusion.png"), m["confusion"], m["classes"],
                  title="generated images: prompted (rows) vs predicted (columns)")
    print(f"wrote {os.path.join(out, 'metrics.json')} and confusion.png")


def _run_classifier_path(args):
    """--classifier, else the validator the run was made with (run.json)."""
    path = args.classifier or (read_run_json(args.run_dir) or {}).get("classifier")
    if not path:
        raise UserError(f"{args.run_dir} has no run.json naming its validator: pass --classifier")
    return path


def add_fidelity_parser(sub):
    p = sub.add_parser("fidelity", help="Frechet distance to real images in the validator's feature space")
    p.add_argument("--run", dest="run_dir", required=True, metavar="DIR", help="generated images (run or class folders)")
    p.add_argument("--data", required=True, help="real images: pathmnist[_64|_128|_224], an .npz or a class folder")
    p.add_argument("--split", default="train", choices=["train", "val", "test"], help="default: %(default)s")
    p.add_argument("--classifier", help="feature extractor (default: the run's validator, from run.json)")
    p.add_argument("--inception", metavar="PATH",
                   help="Inception-v3 weights you have (pytorch-fid's pt_inception-2015-12-05 .pth, or "
                        "torchvision's inception_v3 .pth) for standard FID; nothing is downloaded")
    p.add_argument("--out", metavar="DIR", help="where fidelity.json goes (default: --run)")
    p.add_argument("--device", default="auto")
    p.set_defaults(run=run_fidelity)


def run_fidelity(args):
    device = pick_device(args.device)
    clf = load_classifier(_run_classifier_path(args), device)
    extractors = [ClassifierFeatures(clf)]
    if args.inception:
        from model.eval.inception import InceptionFeatures
        extractors.append(InceptionFeatures(args.inception, device))
    real = load_split(args.data, args.split)
    if list(real.classes) != clf.classes:
        raise UserError(f"--data names classes {list(real.classes)}, the validator {clf.classes}")
    result = fidelity(args.run_dir, image_files(args.run_dir, clf.classes), real, extractors, clf.classes)
    print(format_fidelity(result))
    path = os.path.join(args.out or args.run_dir, "fidelity.json")
    write_json(path, {"run": os.path.abspath(args.run_dir), "data": real.source, "split": args.split, **result})
    print(f"wrote {path}")


def add_utility_parser(sub):
    d = Recipe()
    p = sub.add_parser("utility", help="train on real / synthetic / both, test on real")
    p.add_argument("--run", dest="run_dir", required=True, metavar="DIR", help="generated images (run or class folders)")
    p.add_argument("--data", required=True, help="real images: pathmnist[_64|_128|_224], an .npz or a class folder")
    p.add_argument("--real-fraction", type=float, default=1.0,
                   help="train on this stratified fraction of the real training split (default: all)")
    p.add_argument("--image-size", type=int, default=0, help="train at this size (default: the real data's)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="default: %(default)s")
    p.add_argument("--seed", type=int, default=d.seed, help="weights, batches, --real-fraction pick")
    p.add_argument("--out", metavar="DIR", help="one sub-folder per arm + utility.json (default: RUN/utility)")
    p.add_argument("--device", default="auto")
    p.set_defaults(run=run_utility)


def run_utility(args):
    from model.eval.utility import format_utility, utility
    size = args.image_size or None
    splits = [load_split(args.data, s, size=size) for s in ("train", "val", "test")]
    recipe = Recipe(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, device=args.device)
    out = args.out or os.path.join(args.run_dir, "utility")
    results = utility(args.run_dir, *splits, recipe, out, real_fraction=args.real_fraction)
    print(format_utility(results))
    write_json(os.path.join(out, "utility.json"), {"run": os.path.abspath(args.run_dir), "data": splits[0].source,
                                                   "real_fraction": args.real_fraction, **results})
    print(f"wrote {os.path.join(out, 'utility.json')}")


def add_report_parser(sub):
    p = sub.add_parser("report", help="report.md for a run.sh folder, linking every stage's outputs")
    p.add_argument("--run", dest="run_dir", required=True, metavar="DIR", help="a run.sh run folder")
    p.add_argument("--preset", default="tiny", choices=["tiny", "paper"], help="default: %(default)s")
    p.set_defaults(run=run_report)


def run_report(args):
    from model.eval.report import write_report
    if not os.path.isdir(args.run_dir):
        raise UserError(f"{args.run_dir}: no such run folder")
    print(f"wrote {write_report(args.run_dir, args.preset)}")


def main():
    p = ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    add_classifier_parser(sub)
    add_generation_parser(sub)
    add_fidelity_parser(sub)
    add_utility_parser(sub)
    add_report_parser(sub)
    args = p.parse_args()
    args.run(args)


if __name__ == "__main__":
    cli(main)
