"""Evaluate medsynth's parts; one subcommand per question.

    python evaluate.py classifier --classifier runs/classifier/classifier.safetensors --data pathmnist --out runs/eval

classifier: how good is the validator on held-out real images (default: the test split)? Prints a
per-class table and writes OUT/metrics.json and OUT/confusion.png.

generation: the paper's measure of the generator. From a sample_validated.py run's manifest, the
prompted class is the truth and the validator's verdict on each first attempt the prediction:
per-class and macro precision / recall / F1, the confusion matrix, and the loop's acceptance rate and
attempts per kept image (RUN/metrics.json, RUN/confusion.png). A folder of images made elsewhere
(one sub-folder per class) is classified with --classifier. --second-classifier PATH asks a second,
independent network (another architecture and seed, e.g. train_classifier.py --arch vit) how often it
agrees with the prompted class on the kept images (metrics.json "second_judge").

    python evaluate.py generation --run runs/synth --second-classifier runs/vit/classifier.safetensors

fidelity: Frechet distance between real and generated images in the validator's penultimate-layer
feature space, per class and overall (NOT Inception FID); standard FID too with --inception PATH.

utility: the validator's recipe trained on real, synthetic and real + synthetic images, each tested
on the real test split (ACC, macro F1, AUC); --real-fraction simulates scarce real data. Each arm
trains into OUT/<arm>/ as train_classifier.py trains into --out: rerunning continues or reuses it,
other settings or data need --overwrite.

reconstruction: the validator's accuracy on real images in three columns, overall and per class: as
they are, through the size path alone (to the model's resolution and back), and through the size
path plus the VAE's round trip (encode -> decode), with PSNR: what these lose, no generator can
bring back.

conditioning: does the model (with --lora) listen to the class prompt? A diffusion classifier (Li et
al. 2023) on real images: each is given the class whose prompt lets the UNet denoise it best, with
the same (t, noise) draws for every prompt. Accuracy against chance, per class, and how much the
prompt changes the error at all -> OUT/conditioning.json, confusion.png, errors.npz.

    python evaluate.py conditioning --lora runs/lora/lora.safetensors --data pathmnist --out runs/conditioning

report: RUN/report.md for a run.sh folder, linking what every stage wrote with its headline numbers.

compare: one table over runs (sample_validated.py or run.sh folders) of the evaluations above and the
costs per kept image -> OUT/compare.md, compare.json, compare.png.

    python evaluate.py compare runs/mini runs/gan --names "SD + LoRA" GAN

study: the four seed papers' experiments in miniature on medsynth-mini (`bash run.sh study`): every
arm a folder of OUT that the scripts above fill and resume, then docs/study.md with the papers'
figures beside ours (model/study/). --quick cuts every count down; --preset tiny is for the tests.

    python evaluate.py study --out runs/study
"""
import os
import sys

from model.validator.classifier import evaluate_classifier, load_classifier
from model.validator.train import Recipe
from model.data import SPLITS, file_md5, load_split
from model.eval.conditioning import ConditioningSettings
from model.lora.recipe import SD15
from model.eval.fidelity import ClassifierFeatures, fidelity, format_fidelity
from model.eval.generation import folder_metrics, format_generation, format_second_judge, image_files, \
    manifest_metrics, second_judge
from model.eval.utility import ARMS
from model.eval.memorization import COPY_THRESHOLD, format_memorization, memorization, write_memorization
from model.io import ArgumentParser, UserError, check_out_dir, cli, save_png, write_json
from model.reject.run_folder import read_run_json
from model.metrics import format_report
from model.plots import confusion_png
from model.training import PRECISION_HELP, PRECISIONS, pick_device, resolve_precision


def add_classifier_parser(sub):
    p = sub.add_parser("classifier", help="accuracy, AUC, F1 and confusion of a trained classifier on real data")
    p.add_argument("--classifier", required=True, help="classifier.safetensors from train_classifier.py")
    p.add_argument("--data", default="pathmnist", help="pathmnist[_64|_128|_224], an .npz or a class folder")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="default: %(default)s")
    p.add_argument("--out", default="runs/eval_classifier", help="output folder (default: %(default)s)")
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
    p.add_argument("--second-classifier", metavar="PATH",
                   help="a second classifier (another architecture and seed): how often it agrees with the "
                        "prompted class on the kept images")
    p.add_argument("--out", metavar="DIR", help="where metrics.json and confusion.png go (default: --run)")
    p.add_argument("--device", default="auto")
    p.set_defaults(run=run_generation)


def run_generation(args):
    validator = load_classifier(args.classifier, pick_device(args.device)) if args.classifier else None
    metrics = folder_metrics(args.run_dir, validator) if validator else manifest_metrics(args.run_dir)
    print(format_generation(metrics))
    if args.second_classifier:
        metrics["second_judge"] = _second_judge(args)
        print(format_second_judge(metrics["second_judge"]))
    out = args.out or args.run_dir
    write_json(os.path.join(out, "metrics.json"), metrics)
    confusion_png(os.path.join(out, "confusion.png"), metrics["confusion"], metrics["classes"],
                  title="generated images: prompted (rows) vs predicted (columns)")
    print(f"wrote {os.path.join(out, 'metrics.json')} and confusion.png")


def _second_judge(args):
    """--second-classifier on the run's kept images; a warning says when it is the very file that
    judged the run (its agreement then says nothing new)."""
    run = read_run_json(args.run_dir) or {}
    judge = load_classifier(args.second_classifier, pick_device(args.device))
    md5 = file_md5(args.second_classifier)
    if md5 in {run.get("settings", {}).get("classifier_md5"), args.classifier and file_md5(args.classifier)}:
        print(f"warning: --second-classifier {args.second_classifier} is the run's own validator (same md5): "
              f"its agreement is not an independent judgement", file=sys.stderr)
    return second_judge(args.run_dir, judge, args.second_classifier)


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
    p.add_argument("--floor-split", choices=["train", "val", "test"],
                   help="also measure the real-vs-real distance between --split and this split, the floor "
                        "that a perfect generator reaches (e.g. --split test --floor-split train)")
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
    if args.floor_split == args.split:
        raise UserError(f"--floor-split {args.floor_split}: must differ from --split")
    floor = load_split(args.data, args.floor_split) if args.floor_split else None
    result = fidelity(args.run_dir, image_files(args.run_dir, clf.classes), real, extractors, clf.classes,
                      floor=floor)
    print(format_fidelity(result))
    path = os.path.join(args.out or args.run_dir, "fidelity.json")
    write_json(path, {"run": os.path.abspath(args.run_dir), "data": real.source, "split": args.split, **result})
    print(f"wrote {path}")


def add_memorization_parser(sub):
    p = sub.add_parser("memorization", help="each kept image's nearest training image, beside unseen real tissue's")
    p.add_argument("--run", dest="run_dir", required=True, metavar="DIR", help="generated images (run or class folders)")
    p.add_argument("--data", required=True, help="real images, its train and test splits: pathmnist[_64|_128|_224], "
                                                  "an .npz or a class folder")
    p.add_argument("--classifier", help="feature extractor (default: the run's validator, from run.json)")
    p.add_argument("--copy-threshold", type=float, default=COPY_THRESHOLD, metavar="RMS",
                   help="pixel RMS (0-1, at 28 px) below which an image is a near-copy (default: %(default)s)")
    p.add_argument("--out", metavar="DIR", help="memorization.json, nearest.csv, closest_pairs.png "
                                                "(default: RUN/memorization)")
    p.add_argument("--device", default="auto")
    p.set_defaults(run=run_memorization)


def run_memorization(args):
    if not 0 < args.copy_threshold < 1:
        raise UserError(f"--copy-threshold {args.copy_threshold}: must lie between 0 and 1")
    out = args.out or os.path.join(args.run_dir, "memorization")
    check_out_dir(out)
    device = pick_device(args.device)
    path = _run_classifier_path(args)
    clf = load_classifier(path, device)
    files = image_files(args.run_dir, clf.classes)
    train, test = load_split(args.data, "train"), load_split(args.data, "test")
    if list(train.classes) != clf.classes:
        raise UserError(f"--data names classes {list(train.classes)}, the validator {clf.classes}")
    result, rows = memorization(args.run_dir, files, train, test, ClassifierFeatures(clf), args.copy_threshold, device)
    result = {"classifier": os.path.abspath(path), **result}
    print(format_memorization(result))
    write_memorization(out, result, rows, args.run_dir, train)
    print(f"wrote {os.path.join(out, 'memorization.json')}, nearest.csv and closest_pairs.png")


def add_reconstruction_parser(sub):
    p = sub.add_parser("reconstruction", help="validator accuracy on real images through the size path and the VAE")
    p.add_argument("--model", required=True, help="SD folder, single file or hub id whose VAE to test")
    p.add_argument("--classifier", required=True, help="classifier.safetensors from train_classifier.py")
    p.add_argument("--data", required=True, help="real images: pathmnist[_64|_128|_224], an .npz or a class folder")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="default: %(default)s")
    p.add_argument("--resolution", type=int, help="the side the VAE sees (default: the model's own, "
                                                  "UNet sample_size x VAE factor, else the VAE's sample_size)")
    p.add_argument("--out", default="runs/eval_reconstruction", help="output folder (default: %(default)s)")
    p.add_argument("--device", default="auto")
    p.set_defaults(run=run_reconstruction)


def run_reconstruction(args):
    from model.eval.reconstruction import format_reconstruction, reconstruction_report
    from model.sd.loader import load_pipeline, model_defaults
    check_out_dir(args.out)
    device = pick_device(args.device)
    clf = load_classifier(args.classifier, device)
    data = load_split(args.data, args.split)
    vae = load_pipeline(args.model, device).vae
    resolution = args.resolution or model_defaults(args.model).get("resolution") or vae.config.get("sample_size") or 256
    if resolution < 8 or resolution % 8:  # any SD VAE factor (4 or 8) divides a multiple of 8
        raise UserError(f"--resolution {resolution}: must be a positive multiple of 8")
    report, grid = reconstruction_report(vae, resolution, clf, data)
    print(format_reconstruction(report))
    write_json(os.path.join(args.out, "reconstruction.json"), {
        "model": args.model, "classifier": os.path.abspath(args.classifier), "data": data.source,
        "split": args.split, "resolution": resolution, **report})
    save_png(os.path.join(args.out, "reconstruction.png"), grid)
    print(f"wrote {os.path.join(args.out, 'reconstruction.json')} and reconstruction.png")


def add_conditioning_parser(sub):
    d = ConditioningSettings()
    p = sub.add_parser("conditioning", help="does the model listen to the class prompt? a diffusion classifier "
                                            "on real images")
    p.add_argument("--model", help=f"SD folder, single file or hub id (default: the LoRA's base model, else {SD15})")
    p.add_argument("--tokenizer", help="tokenizer folder or hub id (needed with a single-file --model)")
    p.add_argument("--lora", help="LoRA .safetensors from train_lora.py, with its class prompts (default: none, "
                                  "the base model with model.data's prompts)")
    p.add_argument("--data", required=True, help="real images: pathmnist[_64|_128|_224], an .npz or a class folder")
    p.add_argument("--split", default=d.split, choices=SPLITS, help="default: %(default)s")
    p.add_argument("--images-per-class", type=int, metavar="N", help="only the first N images of each class "
                                                                     "(default: all)")
    p.add_argument("--draws", type=int, default=d.draws, metavar="K",
                   help="(t, noise) draws per image, the same for every prompt; more: less noise, K x the time "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the draws (default: %(default)s)")
    p.add_argument("--resolution", type=int, help="the side the model sees (default: the LoRA's training "
                                                  "resolution, else the UNet's sample_size x the VAE factor)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="UNet calls per batch: speed only, the draws stay the same (default: %(default)s)")
    p.add_argument("--mixed-precision", default="auto", choices=PRECISIONS, help=f"autocast, {PRECISION_HELP}")
    p.add_argument("--out", default="runs/eval_conditioning", help="output folder (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="compute again where --out holds a result made "
                                                            "with other settings")
    p.add_argument("--device", default="auto")
    p.set_defaults(run=run_conditioning)


def run_conditioning(args):
    from model.eval.conditioning import (diffusion_classifier, finished_result, format_conditioning, run_settings,
                                         write_conditioning)
    settings, model, lora, data, prompts, device = _conditioning_inputs(args)
    record = run_settings(settings, model, file_md5(args.lora) if args.lora else None, data, prompts)
    done = finished_result(args.out, record, args.overwrite)
    if done is not None:
        print(format_conditioning(done))
        print(f"{args.out}: finished with these settings; nothing to do")
        return
    pipe = _lora_pipeline(model, device, args.tokenizer, lora)
    result = diffusion_classifier(pipe, data, prompts, settings)
    write_conditioning(args.out, {"model": model, "lora": args.lora and os.path.abspath(args.lora),
                                  "data": data.source, "data_fingerprint": data.fingerprint, **result,
                                  "settings": record})
    print(format_conditioning(result))
    print(f"wrote {os.path.join(args.out, 'conditioning.json')}, confusion.png and errors.npz")


def _conditioning_inputs(args):
    """Every flag checked, the LoRA read and the split loaded, before any model is.
    -> (ConditioningSettings, model, LoRA state or None, the split, one prompt per class, device)."""
    from model.eval.conditioning import lora_prompts
    from model.lora.files import load_lora
    rules = [("draws", args.draws >= 1, "at least 1"), ("batch-size", args.batch_size >= 1, "at least 1"),
             ("images-per-class", args.images_per_class is None or args.images_per_class >= 1, "at least 1"),
             ("seed", args.seed >= 0, ">= 0"),
             ("resolution", args.resolution is None or (args.resolution >= 8 and args.resolution % 8 == 0),
              "a positive multiple of 8")]
    for name, ok, what in rules:
        if not ok:
            raise UserError(f"--{name} {getattr(args, name.replace('-', '_'))}: must be {what}")
    check_out_dir(args.out)
    device = pick_device(args.device)
    precision = resolve_precision(device, args.mixed_precision)
    lora, meta = load_lora(args.lora) if args.lora else (None, {})
    model = args.model or meta.get("base_model") or SD15
    model = os.path.abspath(model) if os.path.exists(model) else model
    data = load_split(args.data, args.split)
    resolution = args.resolution or (int(meta["resolution"]) if meta.get("resolution") else None)
    settings = ConditioningSettings(split=args.split, images_per_class=args.images_per_class, draws=args.draws,
                                    seed=args.seed, resolution=resolution, mixed_precision=precision,
                                    batch_size=args.batch_size)
    return settings, model, lora, data, lora_prompts(data.classes, meta), device


def _lora_pipeline(model, device, tokenizer, lora):
    """The float32 pipeline (--mixed-precision is autocast) with the LoRA merged in, if any."""
    from model.lora.layers import inject_lora_weights, merge_lora
    from model.sd.loader import load_pipeline
    pipe = load_pipeline(model, device, tokenizer=tokenizer)
    if lora is not None:
        inject_lora_weights(pipe.unet, pipe.text_encoder, lora)  # a LoRA for another base model: UserError
        merge_lora(pipe.unet)
        merge_lora(pipe.text_encoder)
    return pipe


def add_utility_parser(sub):
    defaults = Recipe()
    p = sub.add_parser("utility", help="train on real / synthetic / both, test on real")
    p.add_argument("--run", dest="run_dir", required=True, metavar="DIR", help="generated images (run or class folders)")
    p.add_argument("--data", required=True, help="real images: pathmnist[_64|_128|_224], an .npz or a class folder")
    p.add_argument("--real-fraction", type=float, default=1.0,
                   help="train on this stratified fraction of the real training split (default: all)")
    p.add_argument("--synthetic-per-class", type=int, metavar="N",
                   help="add only the first N kept images of each class (default: all of them)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS, metavar="ARM",
                   help="train only these of real, synthetic, hybrid (default: all three)")
    p.add_argument("--image-size", type=int, default=0, help="train at this size (default: the real data's)")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="default: %(default)s")
    p.add_argument("--seed", type=int, default=defaults.seed, help="weights, batches, --real-fraction pick")
    p.add_argument("--out", metavar="DIR", help="one sub-folder per arm + utility.json (default: RUN/utility)")
    p.add_argument("--overwrite", action="store_true",
                   help="train the arms again where --out holds arms trained with other settings or data")
    p.add_argument("--device", default="auto")
    p.set_defaults(run=run_utility)


def run_utility(args):
    from model.eval.utility import format_utility, utility
    size = args.image_size or None
    splits = [load_split(args.data, s, size=size) for s in ("train", "val", "test")]
    recipe = Recipe(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, device=args.device)
    out = args.out or os.path.join(args.run_dir, "utility")
    results = utility(args.run_dir, *splits, recipe, out, real_fraction=args.real_fraction, overwrite=args.overwrite,
                      synthetic_per_class=args.synthetic_per_class, arms=args.arms)
    print(format_utility(results))
    write_json(os.path.join(out, "utility.json"), {"run": os.path.abspath(args.run_dir), "data": splits[0].source,
                                                   "real_fraction": args.real_fraction,
                                                   "synthetic_per_class": args.synthetic_per_class, **results})
    print(f"wrote {os.path.join(out, 'utility.json')}")


def add_report_parser(sub):
    p = sub.add_parser("report", help="report.md for a run.sh folder, linking every stage's outputs")
    p.add_argument("--run", dest="run_dir", required=True, metavar="DIR", help="a run.sh run folder")
    p.add_argument("--preset", default="mini", choices=["mini", "tiny", "paper"], help="default: %(default)s")
    p.add_argument("--data", help="real images (test split): adds real_vs_synthetic.png, real beside kept "
                                  "synthetic images per class")
    p.set_defaults(run=run_report)


def run_report(args):
    from model.eval.report import write_report
    if not os.path.isdir(args.run_dir):
        raise UserError(f"{args.run_dir}: no such run folder")
    real = load_split(args.data, "test") if args.data else None
    print(f"wrote {write_report(args.run_dir, args.preset, real)}")


def add_compare_parser(sub):
    p = sub.add_parser("compare", help="one table over runs: scores, fidelity, memorisation, costs per kept image")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="sample_validated.py output folders or run.sh folders")
    p.add_argument("--names", nargs="+", metavar="NAME", help="a row name per RUN_DIR (default: the folder names)")
    p.add_argument("--out", default="runs/compare", help="compare.md, compare.json, compare.png (default: %(default)s)")
    p.set_defaults(run=run_compare)


def run_compare(args):
    from model.eval.compare import compare, format_compare, write_compare
    check_out_dir(args.out)
    rows = compare(args.runs, args.names)
    print(format_compare(rows))
    write_compare(args.out, rows)
    print(f"wrote {os.path.join(args.out, 'compare.md')}, compare.json and compare.png")


def add_study_parser(sub):
    p = sub.add_parser("study", help="the four papers' experiments in miniature: every arm, then docs/study.md")
    p.add_argument("--out", default="runs/study", help="one folder per arm (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="every count cut down: minutes, not an hour")
    p.add_argument("--preset", default="mini", choices=["mini", "tiny"],
                   help="mini (default), or tiny: the random-weight SD whose images are noise (tests)")
    p.add_argument("--data", help="real images (default: the bundled examples/pathmnist_subset_28.npz)")
    p.add_argument("--seed", type=int, default=0, help="every arm's seed; the headline arms also run with seed + 1")
    p.add_argument("--arms", nargs="+", metavar="ARM", help="run only these arms (default: all), then the tables")
    p.add_argument("--tables-only", action="store_true",
                   help="run no arm: write the report from the arms that have finished (the others are n/a)")
    p.add_argument("--in-process", action="store_true",
                   help="run each script inside this process, not as a child process (saves Python's start-up "
                        "per command; a crash of one script then ends the study)")
    p.add_argument("--doc", help="the report (default: docs/study.md for the full mini study, else OUT/study.md); "
                                 "its plots go beside it, in <doc name>/")
    p.set_defaults(run=run_study)


def run_study(args):
    from model.study.recipe import study_recipe
    from model.study.run import ROOT, finished_arms, run_study as run_arms
    from model.study.report import write_study
    # every path from here on is relative to the repository root, as the commands in study.md are
    out, doc = (os.path.relpath(os.path.abspath(p), ROOT) if p else None for p in (args.out, args.doc))
    data = os.path.relpath(os.path.abspath(args.data), ROOT) if args.data else None
    os.chdir(ROOT)
    recipe = study_recipe(args.quick, args.preset, seed=args.seed, **({"data": data} if data else {}))
    seconds = finished_arms(recipe, out) if args.tables_only else run_arms(recipe, out, args.arms, args.in_process)
    full = not args.quick and args.preset == "mini"
    doc = doc or (os.path.join("docs", "study.md") if full and not args.arms else os.path.join(out, "study.md"))
    if not seconds:
        raise UserError(f"{out}: no finished arm to report (run the study without --tables-only first)")
    print(f"wrote {write_study(recipe, out, doc, seconds, sys.argv[1:])}")


def main():
    p = ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    add_classifier_parser(sub)
    add_generation_parser(sub)
    add_fidelity_parser(sub)
    add_memorization_parser(sub)
    add_reconstruction_parser(sub)
    add_conditioning_parser(sub)
    add_utility_parser(sub)
    add_report_parser(sub)
    add_compare_parser(sub)
    add_study_parser(sub)
    args = p.parse_args()
    args.run(args)


if __name__ == "__main__":
    cli(main)
