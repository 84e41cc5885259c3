"""Generate class-prompted images and keep only those the validator classifies as the prompted class.

    python sample_validated.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --lora runs/lora/lora.safetensors --classifier out/classifier/classifier.safetensors \\
        --per-class 10 --out runs/synth                       # the paper: 10 images per class
    torchrun --nproc_per_node 4 sample_validated.py ... --out runs/synth   # same folder, 4 GPUs
    python sample_validated.py --model SD --prompt "an H&E image of mucus" --num-images 4   # no validator

Every candidate is classified; a rejected one is regenerated (next attempt, new seed) until it is
accepted or --max-attempts is reached, which is reported, never looped past. Writes
OUT/<class>/<class>_<index>.png, OUT/manifest.csv (one row per candidate, with its seed: any image
can be regenerated exactly), OUT/contact_sheet.png and OUT/run.json. Rerunning the same command
resumes an interrupted run and leaves a finished one alone; other settings need --overwrite.
Then: python evaluate.py generation --run OUT.

Plain text-to-image (--prompt, repeatable): image i uses prompt i (cycling) and seed SEED + i, no
validator; writes OUT/txt2img_<i>.png (default OUT: runs/txt2img).
"""
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from model.sd.loader import load_pipeline
from model.validator.classifier import load_classifier
from model.data import class_prompts, file_md5, resolve_classes
from model.io import ArgumentParser, UserError, check_out_dir, cli, save_png, write_json
from model.lora.files import load_lora
from model.lora.layers import apply_lora, merge_lora
from model.reject.run_folder import (RUN_JSON, check_resumable, contact_sheet, image_file, read_manifest,
                            read_run_json, rejected_file, remove_run, write_manifest)
from model.reject.loop import Settings, by_item, items_of, reject_sample, replay, summary, unfinished
from model.sd.sampling import generate, to_pil
from model.training import barrier, cleanup_distributed, init_distributed, is_main, pick_device

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    p.add_argument("--steps", type=int, default=d.steps, help="DDIM steps (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=d.guidance, help="classifier-free guidance (default: %(default)s)")
    p.add_argument("--eta", type=float, default=d.eta, help="DDIM eta: 0 deterministic, 1 DDPM-like (default: %(default)s)")
    p.add_argument("--resolution", type=int, help="image side in pixels (default: the LoRA's, else 512)")
    p.add_argument("--height", type=int, help="image height, overriding --resolution")
    p.add_argument("--width", type=int, help="image width, overriding --resolution")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="candidates per UNet batch (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="base seed of every candidate (default: %(default)s)")
    p.add_argument("--early-reject-at", type=float, default=d.early_reject_at, metavar="F",
                   help="classify the x0 estimate after this fraction of the steps and drop candidates "
                        "already another class (default: off)")
    p.add_argument("--early-reject-confidence", type=float, default=d.early_reject_confidence, metavar="P",
                   help="drop only if p(that other class) >= P (default: %(default)s)")
    p.add_argument("--audit-early-reject", action="store_true",
                   help="finish the dropped candidates too, to count how many would have passed")
    p.add_argument("--keep-rejected", action="store_true", help="also save rejected images in OUT/rejected/")
    p.add_argument("--prompt", action="append", help="plain text-to-image with this prompt (repeatable), no validator")
    p.add_argument("--num-images", type=int, default=4, help="with --prompt: images to write (default: %(default)s)")
    p.add_argument("--out", help="output folder (default: runs/synth, or runs/txt2img with --prompt)")
    p.add_argument("--overwrite", action="store_true", help="replace a run with other settings in --out")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="network dtype (auto: float16 on CUDA, else float32)")
    return p.parse_args()


def check_args(a):
    """Every number checked before anything is loaded or written."""
    rules = [("per-class", a.per_class >= 1, "at least 1"), ("max-attempts", a.max_attempts >= 1, "at least 1"),
             ("batch-size", a.batch_size >= 1, "at least 1"), ("steps", a.steps >= 1, "at least 1"),
             ("min-confidence", 0 <= a.min_confidence <= 1, "in [0, 1]"), ("guidance", a.guidance >= 0, ">= 0"),
             ("eta", a.eta >= 0, ">= 0"), ("seed", a.seed >= 0, ">= 0"),
             ("early-reject-at", 0 <= a.early_reject_at < 1, "in [0, 1), 0 = off"),
             ("early-reject-confidence", 0 < a.early_reject_confidence <= 1, "in (0, 1]")]
    for name, ok, what in rules:
        if not ok:
            raise UserError(f"--{name} {getattr(a, name.replace('-', '_'))}: must be {what}")
    for name in ("resolution", "height", "width"):
        v = getattr(a, name)
        if v is not None and (v < 8 or v % 8):
            raise UserError(f"--{name} {v}: must be a positive multiple of 8")
    if a.prompt is not None and a.num_images < 1:
        raise UserError(f"--num-images {a.num_images}: must be at least 1")
    a.out = a.out or ("runs/txt2img" if a.prompt is not None else "runs/synth")
    if a.audit_early_reject and not a.early_reject_at:
        raise UserError("--audit-early-reject needs --early-reject-at")
    if a.prompt is None and not a.classifier:
        raise UserError("--classifier is required (or --prompt for plain text-to-image)")
    check_out_dir(a.out)


def load_model(a, device, dtype, lora):
    pipe = load_pipeline(a.model, device, dtype, tokenizer=a.tokenizer)
    if lora is not None:
        apply_lora(pipe.unet, pipe.text_encoder, lora)  # a LoRA for another base model: UserError
        merge_lora(pipe.unet)
        merge_lora(pipe.text_encoder)
    return pipe


def text_to_image(a, device, dtype, lora, height, width):
    """--prompt: the plain pipeline, no validator."""
    pipe = load_model(a, device, dtype, lora)
    batches = [range(i, min(i + a.batch_size, a.num_images)) for i in range(0, a.num_images, a.batch_size)]
    bar = tqdm(total=len(batches) * a.steps, unit="step", desc="sampling")

    def on_step(i, t, pred_x0):
        bar.update()  # returns None: keep every candidate

    for batch in batches:
        images, _ = generate(pipe, [a.prompt[i % len(a.prompt)] for i in batch], [a.seed + i for i in batch],
                             steps=a.steps, guidance=a.guidance, eta=a.eta, height=height, width=width,
                             negative_prompt=a.negative_prompt, callback=on_step)
        for i, image in zip(batch, to_pil(images)):
            save_png(os.path.join(a.out, f"txt2img_{i}.png"), image)
    bar.close()
    print(f"wrote {a.num_images} images to {a.out}")


def main():
    a = parse_args()
    check_args(a)
    device = pick_device(a.device)  # under torchrun, "cuda" means this rank's GPU
    dtype = DTYPES["float16" if device.type == "cuda" else "float32"] if a.dtype == "auto" else DTYPES[a.dtype]
    lora, lora_meta = load_lora(a.lora) if a.lora else (None, {})
    a.model = a.model or lora_meta.get("base_model") or SD15
    size = a.resolution or int(lora_meta.get("resolution") or 512)
    height, width = a.height or size, a.width or size
    if a.prompt is not None:
        return text_to_image(a, device, dtype, lora, height, width)

    rank, world = init_distributed(device)
    clf = load_classifier(a.classifier, device)
    names = clf.classes
    wanted = resolve_classes(a.classes, names) if a.classes else list(range(len(names)))
    # The LoRA learned one prompt per class: use its exact wording unless a template is given.
    trained = dict(zip(lora_meta.get("classes", []), lora_meta.get("prompts", [])))
    prompts = {c: (trained.get(names[c]) if trained.get(names[c]) and not a.prompt_template
                   else class_prompts([names[c]], a.prompt_template)[0]) for c in sorted(set(wanted))}
    s = Settings(per_class=a.per_class, max_attempts=a.max_attempts, min_confidence=a.min_confidence,
                 batch_size=a.batch_size, seed=a.seed, steps=a.steps, guidance=a.guidance, eta=a.eta,
                 height=height, width=width, negative_prompt=a.negative_prompt, early_reject_at=a.early_reject_at,
                 early_reject_confidence=a.early_reject_confidence, audit_early_reject=a.audit_early_reject)
    # Everything that decides a pixel or a verdict; the world size does not (see model/reject.py).
    identity = {**s.asdict(), "model": os.path.abspath(a.model) if os.path.exists(a.model) else a.model,
                "lora_md5": file_md5(a.lora) if a.lora else None, "classifier_md5": file_md5(a.classifier),
                "prompts": {names[c]: p for c, p in prompts.items()}, "dtype": str(dtype).removeprefix("torch."),
                "keep_rejected": a.keep_rejected}
    rows = check_resumable(a.out, identity, a.overwrite)
    items = items_of(prompts, s.per_class)
    missing = [r for r in rows if r["file"] and not os.path.isfile(os.path.join(a.out, r["file"]))]
    if not missing and not unfinished(items, by_item(rows), s.max_attempts):
        if (read_run_json(a.out) or {}).get("status") != "complete":  # killed while finishing
            finish(a, rows, s, identity, names, world, time.time())
        print(f"{a.out}: this run is complete; nothing to do")
        return
    pipe = load_model(a, device, dtype, lora)

    start = time.time()
    if is_main():
        if a.overwrite:
            remove_run(a.out, read_manifest(a.out))
        write_json(os.path.join(a.out, RUN_JSON), {"settings": identity, **paths(a), "classes": names,
                                                   "status": "running"})
        for r, im in zip(missing, replay(pipe, clf, rows, missing, s) if missing else []):
            save_png(os.path.join(a.out, r["file"]), im)  # a kept image deleted since: made again, exactly
    barrier()

    def save(row, pil):
        name = (image_file(row["class_name"], row["index"]) if row["accepted"] else
                rejected_file(row["class_name"], row["index"], row["attempt"]) if a.keep_rejected else "")
        if name:
            save_png(os.path.join(a.out, name), pil)
        return name

    def gather(mine):
        every = [None] * world
        dist.all_gather_object(every, mine)
        return every

    bar = tqdm(total=len(items), desc="kept", unit="img", disable=not is_main())

    def on_step(all_rows):
        if is_main():
            write_manifest(a.out, all_rows)
            done = by_item(all_rows)
            bar.n = sum(1 for it in items if any(r["accepted"] for r in done.get(it, {}).values()))
            bar.set_postfix(candidates=len(all_rows), refresh=False)
            bar.refresh()

    rows = reject_sample(pipe, clf, prompts, names, s, rows, save=save, on_step=on_step,
                         gather=gather if world > 1 else None, rank=rank, world=world)
    bar.close()
    finish(a, rows, s, identity, names, world, start)


def paths(a):
    """Where the inputs were (not part of the settings: the files' contents are, by their md5)."""
    return {"classifier": os.path.abspath(a.classifier), "lora": a.lora and os.path.abspath(a.lora)}


def finish(a, rows, s, identity, names, world, start):
    """Rank 0: manifest, contact sheet, run.json with the statistics, and a word on shortfalls."""
    if not is_main():
        return
    write_manifest(a.out, rows)
    contact_sheet(a.out, rows, names, s.per_class)
    stats = summary(rows, s, names)
    write_json(os.path.join(a.out, RUN_JSON), {
        "settings": identity, **paths(a), "classes": names, "status": "complete", "world_size": world, **stats,
        "seconds_last_session": round(time.time() - start, 1), "command": " ".join(sys.argv)})
    kept, short = stats["kept_per_class"], stats["hit_max_attempts"]
    print(f"kept {sum(kept.values())} of {s.per_class * len(kept)} images ({len(rows)} candidates) in {a.out}")
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
