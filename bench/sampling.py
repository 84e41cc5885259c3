"""Sampling throughput.

1. Text-to-image, images/s: our DDIM loop (model.sampling.generate) vs diffusers'
   StableDiffusionPipeline + DDIMScheduler; SD1.5 shape (UNet, VAE, CLIP ViT-L text encoder) with
   the same random weights, prompts and seeds; 20 steps, guidance 7.5, 256 px.
2. The reject loop, kept images/s: model.reject.reject_sample (candidates of all items batched,
   round by round) vs the paper's naive loop (one image at a time: generate, classify, retry
   until accepted), with a ResNet-18 validator made to accept a fixed fraction p of what it sees
   (p = 0.3, 0.7), so both loops spend the same number of candidates per kept image.

    python bench/sampling.py --part t2i            # CPU fp32 (~6.5 min here)
    python bench/sampling.py --part reject         # tiny model at 64 and 256 px (~5 min here)
    python bench/sampling.py --part reject --reject-model sd15 --reject-resolution 256
    python bench/sampling.py --device cuda --dtype float16 --resolution 512 --batch-size 8 \
        --reject-model sd15 --reject-resolution 512 --reject-batch-size 8 --reject-steps 20

The reject part uses the tiny preset (model/tiny.py) by default: at the SD1.5 shape one naive
run is minutes on this CPU, too long to repeat 5 times per loop and p.
"""
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
from model.sd.loader import Pipeline, load_pipeline, load_tokenizer  # noqa: E402
from model.validator.classifier import Classifier  # noqa: E402
from model.data import PATHMNIST_CLASSES  # noqa: E402
from model.sd.ddim import DDIMScheduler  # noqa: E402
from model.reject.loop import Settings, candidate_seed, reject_sample  # noqa: E402
from model.sd.sampling import generate  # noqa: E402
from model.sd.tiny import TINY_SCHEDULER, make_tiny_sd, make_tiny_tokenizer  # noqa: E402

PROMPT = "an H&E stained histopathology image of colorectal adipose tissue"
# transformers CLIPTextConfig of SD1.5's text encoder (CLIP ViT-L/14). The bench tokenizer is
# model.sd.tiny's character-level one (no download): its ids are < 514, so they fit this vocabulary.
SD15_CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                 projection_dim=768, layer_norm_eps=1e-5, bos_token_id=512, eos_token_id=513,
                 pad_token_id=513)


def sd15_pipelines(device, dtype, with_diffusers=True):
    """(our Pipeline, diffusers' StableDiffusionPipeline or None), sharing every weight tensor."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel
    from model.sd.convert import SD_VAE
    from model.sd.vae import AutoencoderKL
    unets = C.sd15_unets(device, dtype)
    torch.manual_seed(1)
    ref_vae = diffusers.AutoencoderKL(**SD_VAE).to(device, dtype).eval()
    with torch.device("meta"):
        vae = AutoencoderKL(**SD_VAE)
    vae.load_state_dict(ref_vae.state_dict(), strict=True, assign=True)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_CLIP)).to(device, dtype).eval()
    folder = tempfile.mkdtemp(prefix="medsynth-bench-tok-")
    make_tiny_tokenizer(folder)
    tokenizer = load_tokenizer(folder)
    ours = Pipeline(unet=unets["ours"], vae=vae.eval(), text_encoder=text_encoder, tokenizer=tokenizer,
                    scheduler=DDIMScheduler(**TINY_SCHEDULER), vae_scale=0.18215,
                    prediction_type="epsilon", kind="sd1")
    if not with_diffusers:
        return ours, None
    ref = diffusers.StableDiffusionPipeline(
        vae=ref_vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unets["diffusers"],
        scheduler=diffusers.DDIMScheduler.from_config(TINY_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ours, ref


def text_to_image(args, device, dtype):
    ours, ref = sd15_pipelines(device, dtype)
    rows, speedups = [], []
    for batch in args.batch_size:
        prompts, seeds = [PROMPT] * batch, list(range(batch))
        kw = dict(height=args.resolution, width=args.resolution)

        def run_ours(steps):
            return generate(ours, prompts, seeds, steps=steps, guidance=7.5, **kw)[0]

        def run_ref(steps):
            gens = [torch.Generator().manual_seed(s) for s in seeds]
            with torch.no_grad():
                return ref(prompts, num_inference_steps=steps, guidance_scale=7.5, generator=gens,
                           output_type="pt", **kw).images

        diff = (run_ours(2) - run_ref(2).float().cpu()).abs().max().item()  # also the warm-up
        variants = {"diffusers": lambda: run_ref(args.steps), "ours": lambda: run_ours(args.steps)}
        seconds = C.interleaved(variants, args.repeats, device, warmup=0)
        for k in ("diffusers", "ours"):
            rows.append([f"{args.resolution}px x{batch}, {args.steps} steps", k, f"{seconds[k]:.1f}",
                         f"{batch / seconds[k]:.3f}", C.ratio(seconds["diffusers"], seconds[k]),
                         f"{diff:.1e}" if k == "ours" else ""])
        speedups.append(f"t2i x{batch} {C.ratio(seconds['diffusers'], seconds['ours'])}")
    C.table(["text-to-image", "impl", "s/batch", "images/s", "vs diffusers", "max |diff|"], rows)
    return speedups


class FixedRateValidator(Classifier):
    """A real ResNet-18 validator (its cost is part of the loop) whose verdict is overridden: of
    the images it sees, in order, it accepts a fraction p spread evenly (image k is accepted when
    floor((k+1) p) > floor(k p)), predicting class 0 (the prompted one) or else class 1."""

    def __init__(self, p):
        super().__init__("resnet18", "small", 28, PATHMNIST_CLASSES, (0.5,) * 3, (0.25,) * 3)
        self.p, self.seen = p, 0
        self.eval()

    def predict_proba(self, images, batch_size=256):
        probs = torch.zeros_like(super().predict_proba(images, batch_size))
        for row in probs:
            k, self.seen = self.seen, self.seen + 1
            row[0 if int((k + 1) * self.p) > int(k * self.p) else 1] = 1.0
        return probs


def naive_loop(pipe, validator, s):
    """The paper's loop: one candidate at a time until each of s.per_class images is accepted."""
    kept = candidates = 0
    for index in range(s.per_class):
        for attempt in range(1, s.max_attempts + 1):
            images, _ = generate(pipe, [PROMPT], [candidate_seed(s.seed, 0, index, attempt)],
                                 steps=s.steps, guidance=s.guidance, height=s.height, width=s.width)
            candidates += 1
            if validator.predict_proba(images)[0].argmax() == 0:
                kept += 1
                break
    return kept, candidates


def batched_loop(pipe, validator, s):
    rows = reject_sample(pipe, validator, {0: PROMPT}, {0: PATHMNIST_CLASSES[0]}, s)
    return sum(r["accepted"] for r in rows), len(rows)


def reject(args, device, dtype):
    if args.reject_model == "tiny":
        if args.threads is None:
            # The tiny model is latency-bound: one thread is as fast as two on an idle machine,
            # and up to 10x faster on a busy one, where every parallel region waits for a
            # descheduled second thread (the tests run it on one thread too).
            torch.set_num_threads(1)
        folder = make_tiny_sd(tempfile.mkdtemp(prefix="medsynth-bench-tiny-"))
        pipe = load_pipeline(folder, device, dtype)
    else:
        pipe, _ = sd15_pipelines(device, dtype, with_diffusers=False)
    rows, speedups = [], []
    # Batching pays where a network call costs more than its arithmetic (small maps, or a GPU at
    # batch 1); where the arithmetic dominates, images/s hardly depends on the batch size. Hence
    # two sizes: 64 px (latency-bound on this CPU) and 256 px (compute-bound).
    for res in args.reject_resolution:
        for p in (0.3, 0.7):
            s = Settings(per_class=args.per_class, max_attempts=100, batch_size=args.reject_batch_size,
                         steps=args.reject_steps, guidance=7.5, height=res, width=res)
            loops = {"naive": naive_loop, "batched": batched_loop}
            counts = {}

            def run(name):
                counts[name] = loops[name](pipe, FixedRateValidator(p), s)

            seconds = C.interleaved({k: (lambda k=k: run(k)) for k in loops}, args.repeats, device)
            for k in loops:
                kept, candidates = counts[k]
                rows.append([f"{res}px p={p}", k, f"{seconds[k]:.1f}", f"{kept}/{candidates}",
                             f"{kept / seconds[k]:.3f}", C.ratio(seconds["naive"], seconds[k])])
            speedups.append(f"reject {res}px p={p} {C.ratio(seconds['naive'], seconds['batched'])}")
            print(f"  done reject {res}px p={p}", flush=True)
    print(f"reject loop: {args.reject_model} model, {torch.get_num_threads()} thread(s), "
          f"{args.reject_steps} steps, guidance 7.5, batch size {args.reject_batch_size}, "
          f"{args.per_class} kept images per run")
    C.table(["acceptance", "loop", "s/run", "kept/candidates", "kept/s", "vs naive"], rows)
    return speedups


def main():
    p = C.parser(__doc__, batch_sizes=(1,))
    p.add_argument("--part", choices=["all", "t2i", "reject"], default="all")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--reject-model", choices=["tiny", "sd15"], default="tiny")
    p.add_argument("--per-class", type=int, default=8, help="kept images per reject-loop run")
    p.add_argument("--reject-batch-size", type=int, default=8)
    p.add_argument("--reject-resolution", type=int, nargs="+", default=[64, 256],
                   help="image sides for the reject loop (default: %(default)s)")
    p.add_argument("--reject-steps", type=int, default=10,
                   help="DDIM steps in the reject loop: both loops spend the same steps per candidate, so "
                        "fewer steps only shorten the bench (default: %(default)s)")
    args = p.parse_args()
    device, dtype = C.setup(args)
    C.header("Sampling: ours vs diffusers (text-to-image), batched vs naive (reject loop)", args)
    speedups = []
    with torch.no_grad():
        if args.part in ("all", "t2i"):
            speedups += text_to_image(args, device, dtype)
        if args.part in ("all", "reject"):
            speedups += reject(args, device, dtype)
    print("speedups: " + ", ".join(speedups))


if __name__ == "__main__":
    main()
