"""Generate class-prompted images and keep only those the validator classifies as the prompted class.

    python sample_validated.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --lora runs/lora/lora.safetensors --classifier runs/classifier/classifier.safetensors \\
        --per-class 10 --out runs/synth                       # the paper: 10 images per class
    torchrun --nproc_per_node 4 sample_validated.py ... --out runs/synth   # same folder as 1 GPU
    python sample_validated.py --model SD --prompt "an H&E image of mucus" --num-images 4   # no validator

Every candidate is classified; a rejected one is regenerated (next attempt, new seed) until it is
accepted or --max-attempts is reached, which is reported, never looped past. Writes
OUT/<class>/<class>_<index>.png, OUT/manifest.csv (one row per candidate, with its seed: any image
can be regenerated exactly), OUT/contact_sheet.png and OUT/run.json. Rerunning the same command
resumes an interrupted run and leaves a finished one alone; other settings need --overwrite.
1 or N processes give the same folder on one machine at equal threads per process: on CPU,
torchrun gives each rank one thread unless OMP_NUM_THREADS is set, so OMP_NUM_THREADS=1 python
sample_validated.py ... writes the folder torchrun does.
Then: python evaluate.py generation --run OUT.

Other generators, through the same loop (model/reject/generators.py):
    --generator runs/gan/gan.safetensors          a train_gan.py conditional GAN (also detected as --model)
    --init-images examples/pathmnist_subset_28.npz --strength 0.6   SDEdit from real images of the class
    --classifier-guidance 20                      steer every DDIM step with the validator's gradient
A guided run's kept images were steered by the validator itself: judge them with a second network
(evaluate.py generation --second-classifier).

Plain text-to-image (--prompt, repeatable): image i uses prompt i (cycling) and seed SEED + i, no
validator; writes OUT/txt2img_<i>.png (default OUT: runs/txt2img).
"""
import argparse
import os
import sys
import time

import torch.distributed as dist
from tqdm import tqdm

from model.sd.loader import load_pipeline, model_defaults
from model.validator.classifier import load_classifier
from model.data import class_prompts, file_md5, from_model_size, resolve_classes
from model.io import ArgumentParser, UserError, check_out_dir, cli, save_png
from model.lora.files import load_lora
from model.lora.layers import inject_lora_weights, merge_lora
from model.reject.run_folder import RunFolder, read_run_json
from model.reject.generators import GANGenerator, SDGenerator
from model.reject.init_images import InitImages
from model.reject.loop import Settings, by_item, items_of, reject_sample, replay, summary, unfinished
from model.gan.generator import is_gan_file, load_gan
from model.sd.sampling import generate, to_pil
from model.training import (PRECISION_HELP, PRECISIONS, barrier, cleanup_distributed, init_distributed, is_main,
                            pick_device, precision_dtype, resolve_precision)

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# The old --dtype flag (hidden, still accepted) -> --mixed-precision.
OLD_DTYPES = {"auto": "auto", "float32": "no", "float16": "fp16", "bfloat16": "bf16"}


def add_sampler_flags(p, d):
    """Steps, guidance and sizes: unset ones follow the LoRA, then the model (sampling_defaults)."""
    p.add_argument("--steps", type=int, help=f"DDIM steps (default: the LoRA's recorded value, else the model "
                                             f"card's, else {d.steps})")
    p.add_argument("--guidance", type=float, help=f"classifier-free guidance (default: the LoRA's recorded value, "
                                                  f"else the model card's, else {d.guidance})")
    p.add_argument("--eta", type=float, default=d.eta, help="DDIM eta: 0 deterministic, 1 DDPM-like (default: %(default)s)")
    p.add_argument("--resolution", type=int, help="side of the images the model makes, in pixels (default: the "
                                                  "LoRA's, else the model's own: UNet sample_size x VAE factor, "
                                                  "else 512)")
    p.add_argument("--image-size", type=int, help="side of the judged and kept images: made images are cut back "
                                                  "to it by the size path (default: the data's own size as the "
                                                  "LoRA or model records it, else as made)")
    p.add_argument("--height", type=int, help="image height, overriding --resolution")
    p.add_argument("--width", type=int, help="image width, overriding --resolution")


def parse_args():
    d = Settings(per_class=10)
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", help=f"SD 1.x/2.x: diffusers folder, single .safetensors/.ckpt file or hub id "
                                   f"(default: the LoRA's base model, else {SD15})")
    p.add_argument("--tokenizer", help="tokenizer folder or hub id (needed with a single-file --model)")
    p.add_argument("--lora", help="LoRA .safetensors from train_lora.py (or diffusers / kohya files)")
    p.add_argument("--classifier", help="validator .safetensors from train_classifier.py (required unless --prompt)")
    p.add_argument("--classes", nargs="+", metavar="C", help="class names or indices (default: all)")
    p.add_argument("--per-class", type=int, default=d.per_class, help="accepted images per class (default: %(default)s)")
    p.add_argument("--max-attempts", type=int, default=d.max_attempts,
                   help="candidates per image before giving up on it (default: %(default)s)")
    p.add_argument("--min-confidence", type=float, default=d.min_confidence, metavar="P",
                   help="also require p(prompted class) >= P (default: %(default)s, plain argmax)")
    p.add_argument("--prompt-template", help="e.g. 'an H&E image of {desc}' (default: the LoRA's prompts, "
                                             "else model.data's template)")
    p.add_argument("--negative-prompt", default=d.negative_prompt)
    add_sampler_flags(p, d)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="candidates per UNet batch (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="base seed of every candidate (default: %(default)s)")
    p.add_argument("--early-reject-at", type=float, default=d.early_reject_at, metavar="F",
                   help="classify the x0 estimate after this fraction of the steps and drop candidates "
                        "already another class (default: off)")
    p.add_argument("--early-reject-confidence", type=float, default=d.early_reject_confidence, metavar="P",
                   help="drop only if p(that other class) >= P (default: %(default)s)")
    p.add_argument("--audit-early-reject", action="store_true",
                   help="finish the dropped candidates too, to count how many would have passed")
    p.add_argument("--generator", metavar="PATH",
                   help="make the candidates with this train_gan.py checkpoint instead of SD (a GAN file given "
                        "as --model is detected too)")
    p.add_argument("--init-images", metavar="D",
                   help="image-to-image (SDEdit): start each candidate from a real image of its class, from "
                        "an .npz (its train split) or a folder with one sub-folder per class")
    p.add_argument("--strength", type=float, default=d.strength, metavar="S",
                   help="with --init-images: noise the real image to this fraction of the schedule, in [0, 1] "
                        "(1 = ignore it: text-to-image; 0 = the real image back; default: %(default)s)")
    p.add_argument("--classifier-guidance", type=float, default=d.classifier_guidance, metavar="W",
                   help="add W x the gradient of log p(prompted class | decoded x0) at every DDIM step "
                        "(Dhariwal & Nichol 2021; default: %(default)s, off)")
    p.add_argument("--keep-rejected", action="store_true", help="also save rejected images in OUT/rejected/")
    p.add_argument("--prompt", action="append", help="plain text-to-image with this prompt (repeatable), no validator")
    p.add_argument("--num-images", type=int, default=4, help="with --prompt: images to write (default: %(default)s)")
    p.add_argument("--out", help="output folder (default: runs/synth, or runs/txt2img with --prompt)")
    p.add_argument("--overwrite", action="store_true", help="replace a run with other settings in --out")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    p.add_argument("--mixed-precision", default="auto", choices=PRECISIONS,
                   help=f"weights and compute of the networks in this precision: {PRECISION_HELP}")
    p.add_argument("--dtype", choices=OLD_DTYPES, help=argparse.SUPPRESS)  # deprecated name of the above
    args = p.parse_args()
    if args.dtype is not None:
        args.mixed_precision = OLD_DTYPES[args.dtype]
    return args


def check_args(args):
    """Every number checked before anything is loaded or written."""
    rules = [("per-class", args.per_class >= 1, "at least 1"), ("max-attempts", args.max_attempts >= 1, "at least 1"),
             ("batch-size", args.batch_size >= 1, "at least 1"), ("steps", args.steps is None or args.steps >= 1,
                                                                  "at least 1"),
             ("min-confidence", 0 <= args.min_confidence <= 1, "in [0, 1]"),
             ("guidance", args.guidance is None or args.guidance >= 0, ">= 0"),
             ("eta", args.eta >= 0, ">= 0"), ("seed", args.seed >= 0, ">= 0"),
             ("early-reject-at", 0 <= args.early_reject_at < 1, "in [0, 1), 0 = off"),
             ("early-reject-confidence", 0 < args.early_reject_confidence <= 1, "in (0, 1]"),
             ("strength", 0 <= args.strength <= 1, "in [0, 1]"),
             ("classifier-guidance", args.classifier_guidance >= 0, ">= 0")]
    for name, ok, what in rules:
        if not ok:
            raise UserError(f"--{name} {getattr(args, name.replace('-', '_'))}: must be {what}")
    for name in ("resolution", "height", "width"):
        side = getattr(args, name)
        if side is not None and (side < 8 or side % 8):
            raise UserError(f"--{name} {side}: must be a positive multiple of 8")
    if args.image_size is not None and args.image_size < 1:
        raise UserError(f"--image-size {args.image_size}: must be at least 1")
    if args.prompt is not None and args.num_images < 1:
        raise UserError(f"--num-images {args.num_images}: must be at least 1")
    args.out = args.out or ("runs/txt2img" if args.prompt is not None else "runs/synth")
    if args.audit_early_reject and not args.early_reject_at:
        raise UserError("--audit-early-reject needs --early-reject-at")
    if args.prompt is None and not args.classifier:
        raise UserError("--classifier is required (or --prompt for plain text-to-image)")
    if args.strength != 1 and not args.init_images:
        raise UserError("--strength needs --init-images")
    if args.generator is None and args.model and is_gan_file(args.model):
        args.generator, args.model = args.model, None
    if args.generator is not None:
        check_gan_args(args)
    check_out_dir(args.out)


def check_gan_args(args):
    """A GAN has no prompt, no steps and no latents: the SD-only flags are refused, not ignored."""
    if not is_gan_file(args.generator):
        raise UserError(f"--generator {args.generator}: not a train_gan.py checkpoint (gan.safetensors)")
    sd_only = [("--lora", args.lora), ("--init-images", args.init_images), ("--prompt", args.prompt),
               ("--classifier-guidance", args.classifier_guidance), ("--early-reject-at", args.early_reject_at),
               ("--model", args.model)]
    given = [flag for flag, value in sd_only if value]
    if given:
        raise UserError(f"{given[0]} does not apply to a GAN --generator")


def load_model(args, device, dtype, lora):
    pipe = load_pipeline(args.model, device, dtype, tokenizer=args.tokenizer)
    if lora is not None:
        inject_lora_weights(pipe.unet, pipe.text_encoder, lora)  # a LoRA for another base model: UserError
        merge_lora(pipe.unet)
        merge_lora(pipe.text_encoder)
    return pipe


def text_to_image(args, device, dtype, lora, height, width):
    """--prompt: the plain pipeline, no validator."""
    pipe = load_model(args, device, dtype, lora)
    count = args.num_images
    batches = [range(i, min(i + args.batch_size, count)) for i in range(0, count, args.batch_size)]
    bar = tqdm(total=len(batches) * args.steps, unit="step", desc="sampling")

    def on_ddim_step(i, t, pred_x0):
        bar.update()  # returns None: keep every candidate

    for batch in batches:
        prompts, seeds = [args.prompt[i % len(args.prompt)] for i in batch], [args.seed + i for i in batch]
        images, _ = generate(pipe, prompts, seeds, steps=args.steps, guidance=args.guidance, eta=args.eta,
                             height=height, width=width, negative_prompt=args.negative_prompt,
                             on_ddim_step=on_ddim_step)
        if args.image_size:  # the size path back to the data's own size
            images = from_model_size(images, args.image_size)
        for i, image in zip(batch, to_pil(images)):
            save_png(os.path.join(args.out, f"txt2img_{i}.png"), image)
    bar.close()
    print(f"wrote {count} images to {args.out}")


def main():
    args = parse_args()
    check_args(args)
    device = pick_device(args.device)  # under torchrun, "cuda" means this rank's GPU
    dtype = precision_dtype(resolve_precision(device, args.mixed_precision))
    lora, lora_meta = load_lora(args.lora) if args.lora else (None, {})
    if args.generator is None:
        args.model = args.model or lora_meta.get("base_model") or SD15
    height, width = sampling_defaults(args, lora_meta)
    if args.prompt is not None:
        return text_to_image(args, device, dtype, lora, height, width)
    return validated(args, device, dtype, lora, lora_meta, height, width)


def sampling_defaults(args, lora_meta):
    """Fill what the user left unset, as diffusers does from the model: the LoRA's recorded values
    first, then the model's own (model_defaults), then SD's. -> (height, width) of the made images;
    sets args.steps, args.guidance and args.image_size."""
    model = {} if args.generator else model_defaults(args.model)
    d = Settings(per_class=1)

    def pick(flag, key, fallback):
        found = [v for v in (flag, lora_meta.get(key), model.get(key)) if v is not None]
        return found[0] if found else fallback

    size = int(pick(args.resolution, "resolution", 512))
    args.steps = int(pick(args.steps, "sample_steps", d.steps))
    args.guidance = float(pick(args.guidance, "guidance", d.guidance))
    args.image_size = int(pick(args.image_size, "image_size", 0))
    return args.height or size, args.width or size


def validated(args, device, dtype, lora, lora_meta, height, width):
    """The reject loop into --out: a new run, the rest of an interrupted one, or nothing to do."""
    rank, world = init_distributed(device)
    classifier = load_classifier(args.classifier, device)
    names = classifier.classes
    prompts = class_prompts_of(args, names, lora_meta)
    gan = load_gan(args.generator, device) if args.generator else None
    if gan is not None:
        if gan.classes != names:
            raise UserError(f"--generator {args.generator}: its classes {gan.classes} differ from the validator's")
        height = width = gan.resolution
        args.image_size = args.image_size or int(gan.meta.get("image_size") or 0)
    settings = Settings(
        per_class=args.per_class, max_attempts=args.max_attempts, min_confidence=args.min_confidence,
        batch_size=args.batch_size, seed=args.seed, steps=args.steps, guidance=args.guidance, eta=args.eta,
        height=height, width=width, negative_prompt=args.negative_prompt,
        early_reject_at=args.early_reject_at, early_reject_confidence=args.early_reject_confidence,
        audit_early_reject=args.audit_early_reject, init_images=os.path.abspath(args.init_images or "") if
        args.init_images else "", strength=args.strength, classifier_guidance=args.classifier_guidance,
        generator="gan" if gan is not None else "sd", image_size=args.image_size)
    init = InitImages(args.init_images, names, list(prompts)) if args.init_images else None
    record = run_record(args, settings, names, prompts, dtype, init)
    folder = RunFolder(args.out, keep_rejected=args.keep_rejected, main=is_main())
    rows = folder.resume(record["settings"], args.overwrite)
    # wall seconds of the earlier sessions of this run (run.json is rewritten below)
    before = 0.0 if args.overwrite or not rows else float((read_run_json(args.out) or {}).get("seconds_total", 0.0))
    items = items_of(prompts, settings.per_class)
    missing = folder.missing_images(rows)
    if not missing and not unfinished(items, by_item(rows), settings.max_attempts):
        if not folder.is_complete():  # killed while finishing
            finish(folder, rows, settings, record, world, time.time(), before)
        print(f"{args.out}: this run is complete; nothing to do")
        return
    generator = (GANGenerator(gan, settings) if gan is not None else
                 SDGenerator(load_model(args, device, dtype, lora), prompts, settings, classifier, init))

    start = time.time()
    folder.start(record, args.overwrite)
    if folder.main and missing:  # a kept image deleted since: made again, exactly
        folder.restore(missing, replay(generator, classifier, rows, missing, settings))
    barrier()
    bar = tqdm(total=len(items), desc="kept", unit="img", disable=not is_main())
    rows = reject_sample(generator, classifier, prompts, names, settings, rows, folder=folder,
                         on_batch=show_kept(bar, items) if is_main() else None,
                         gather=gather_rows if world > 1 else None, rank=rank, world=world)
    bar.close()
    finish(folder, rows, settings, record, world, start, before)


def class_prompts_of(args, names, lora_meta):
    """{class index: prompt} of the classes asked for. The LoRA learned one prompt per class: its
    exact wording is used unless --prompt-template is given."""
    wanted = resolve_classes(args.classes, names) if args.classes else list(range(len(names)))
    trained = dict(zip(lora_meta.get("classes", []), lora_meta.get("prompts", [])))
    return {c: (trained.get(names[c]) if trained.get(names[c]) and not args.prompt_template
                else class_prompts([names[c]], args.prompt_template)[0]) for c in sorted(set(wanted))}


def run_record(args, settings, names, prompts, dtype, init):
    """What run.json holds besides the status. Its "settings" are everything that decides a pixel
    or a verdict (a rerun with others is refused); the world size does not (see model/reject/loop.py).
    The input paths are not settings: the files' contents are, by their md5."""
    model = args.generator or args.model
    model = os.path.abspath(model) if os.path.exists(model) else model
    identity = {**settings.asdict(), "model": model, "lora_md5": file_md5(args.lora) if args.lora else None,
                "classifier_md5": file_md5(args.classifier), "prompts": {names[c]: p for c, p in prompts.items()},
                "dtype": str(dtype).removeprefix("torch."), "keep_rejected": args.keep_rejected,
                "generator_md5": file_md5(args.generator) if args.generator else None,
                "init_images_fingerprint": init.fingerprint() if init is not None else None}
    return {"settings": identity, "classifier": os.path.abspath(args.classifier),
            "lora": args.lora and os.path.abspath(args.lora), "classes": names}


def gather_rows(mine):
    """Every rank's new manifest rows, as a list with one list per rank (torch.distributed)."""
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


def show_kept(bar, items):
    """reject_sample's on_batch: the number of items with a kept image on the progress bar."""
    def on_batch(all_rows):
        done = by_item(all_rows)
        bar.n = sum(1 for it in items if any(r["accepted"] for r in done.get(it, {}).values()))
        bar.set_postfix(candidates=len(all_rows), refresh=False)
        bar.refresh()
    return on_batch


def finish(folder, rows, settings, record, world, start, before=0.0):
    """Rank 0: manifest, contact sheet, run.json with the statistics, and a word on shortfalls."""
    if not folder.main:
        return
    stats = summary(rows, settings, record["classes"])
    folder.finish(rows, record["classes"], settings.per_class, record, world_size=world, **stats,
                  seconds_last_session=round(time.time() - start, 1),
                  seconds_total=round(before + time.time() - start, 1), command=" ".join(sys.argv))
    kept, short = stats["kept_per_class"], stats["hit_max_attempts"]
    print(f"kept {sum(kept.values())} of {settings.per_class * len(kept)} images ({len(rows)} candidates) "
          f"in {folder.path}")
    if short:
        print("warning: --max-attempts reached for " + ", ".join(f"{n} ({k} missing)" for n, k in short.items()),
              file=sys.stderr)


def run():
    try:
        main()
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    cli(run)
