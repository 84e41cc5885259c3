"""The study's tables: each a list of rows of cells (model/study/cells.py), the paper's figure
beside ours, and one line on the difference in scale.

A table is built from the recipe alone (which arms exist, and which file of which arm each number
comes from); `model/study/report.py` renders them into study.md and study.json.
"""
from dataclasses import dataclass, field

from model.eval.fidelity import ClassifierFeatures
from model.study.cells import DASH, Cell, per_kept, text

SCALE = ("the paper fine-tunes SD1.5 (860 M UNet) at 224-512 px on the full PathMNIST (90k training "
         "images) on an A100; here medsynth-mini (4.7 M UNet, 32 px) learns from 400 training images on a "
         "2-core CPU.")
SCALE_001 = ("the paper: SD1.5 DreamBooth (about 25 instance images per type) and a ViT on ISIC 2020 skin "
             "lesions; here medsynth-mini + LoRA on 400 PathMNIST images at 32 px, on a 2-core CPU.")
SCALE_002 = ("the paper: a cGAN (z in R^128) and a ResNet-50 at 224 px on ChestX-ray14, HAM10000 and ISIC 2020, "
             "on an RTX 3080; here a DCGAN-style cGAN at 32 px on 400 PathMNIST images, on a 2-core CPU.")
SCALE_003 = ("the paper: SD2.1 + LoRA and a ResNet-50 on 18,365 white-blood-cell images (15 classes); here "
             "medsynth-mini (4.7 M UNet, 32 px) on 400 PathMNIST images, on a 2-core CPU.")
FRECHET = [ClassifierFeatures.name, "overall", "frechet_distance"]   # fidelity.json keys
CLASSES = ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth_muscle", "normal_colon_mucosa",
           "cancer_associated_stroma", "colorectal_adenocarcinoma_epithelium"]


@dataclass
class Table:
    key: str
    title: str
    head: list
    rows: list                      # [[Cell, ...], ...], one Cell per head column
    paper: str = ""                 # the paper's published figure(s)
    scale: str = None               # the difference in scale, one line (default: by the paper in the title)
    plot: dict = field(default_factory=dict)   # {"file": name.png, "x": column, "y": [columns]}

    def __post_init__(self):
        if self.scale is None:
            self.scale = {"001": SCALE_001, "002": SCALE_002, "003": SCALE_003}.get(self.title[:3], SCALE)


def _m(arm, *keys, fmt=".3f"):
    return Cell(fmt, f"{arm}/metrics.json", keys)


def _scores(arm, first=True):
    """First-attempt macro P / R / F1 and the second judge (on all first attempts, or on kept images)."""
    judge = ("second_judge", "first_attempt_agreement") if first else ("second_judge", "agreement")
    return [_m(arm, "precision_macro"), _m(arm, "recall_macro"), _m(arm, "f1_macro"), _m(arm, *judge)]


def headline(r):
    rows = []
    for seed, p in [(r.seed, "")] + ([(r.seed + 1, f"seed{r.seed + 1}/")] if r.second_seed else []):
        s = text(str(seed))
        rows += [
            [text("base mini, first attempt"), s, *_scores(p + "000_base"), text(DASH), text(DASH)],
            [text("mini + LoRA, first attempt"), s, *_scores(p + "000_lora"), text(DASH), text(DASH)],
            [text("mini + LoRA + reject loop (kept)"), s, text("1 (by construction)"), text(DASH), text(DASH),
             _m(p + "000_lora", "second_judge", "agreement"), _m(p + "000_lora", "acceptance", "kept", fmt=".0f"),
             Cell(".2f", f"{p}000_lora/metrics.json", ["acceptance", "candidates"], "ratio",
                  f"{p}000_lora/metrics.json", ["acceptance", "kept"])],
        ]
    rows.append([text("paper 000: untuned SD1.5, first attempt"), text(DASH), text("n/a"), text("n/a"), text("0.122"),
                 text("n/a"), text(DASH), text(DASH)])
    rows.append([text("paper 000: SD1.5 + LoRA (V9), first attempt"), text(DASH), text("0.6817"), text("0.7111"),
                 text("0.6727"), text("n/a"), text(DASH), text("n/a")])
    return Table("headline", "000, the system: base vs LoRA vs LoRA + the reject loop",
                 ["arm", "seed", "macro P", "macro R", "macro F1", "2nd judge agrees", "kept", "candidates / kept"],
                 rows, paper="000 sec. 4.1-4.2: untuned SD1.5 F1 0.122; LoRA V9 P 0.6817, R 0.7111, F1 0.6727 "
                             "(10 images per class). P, R, F1 are the validator's verdict on first attempts; the "
                             "2nd judge (a ViT of another seed) scores all first attempts, or the kept images.")


def per_class(r):
    rows = [[text(c), _m("000_base", "per_class", i, "f1"), _m("000_lora", "per_class", i, "f1"),
             _m("000_lora", "per_class", i, "kept", fmt=".0f"), _m("000_lora", "second_judge", "per_class", c)]
            for i, c in enumerate(CLASSES)]
    return Table("per_class", f"000, per class (seed {r.seed}); confusion matrices below",
                 ["class", "base F1", "LoRA F1", "LoRA kept", "2nd judge on kept"], rows,
                 paper="000 reports per-class precision / recall / F1 of its V9 LoRA (its table 2), not reproduced here.")


def sweep(r):
    points = [(0, "000_base")] + [(s, f"000_steps_{s}") for s in range(r.sweep_every, r.lora_steps, r.sweep_every)]
    points.append((r.lora_steps, "000_lora"))
    rows = [[text(str(s)), _m(a, "f1_macro"), _m(a, "second_judge", "first_attempt_agreement")] for s, a in points]
    return Table("sweep", "000: first-attempt F1 against LoRA steps (the paper's V1-V10 progression)",
                 ["LoRA steps", "macro F1", "2nd judge agrees"], rows,
                 paper="000 sec. 3.4: V6 F1 about 0.43, V8 about 0.54, V9 (1131 steps) 0.6727; versions differ in "
                       "steps (1,000-3,000), batch size and learning rate, not only steps.",
                 plot={"file": "steps.png", "x": 0, "y": [1, 2], "xlabel": "LoRA steps"})


def _sampled(arm):
    """F1, 2nd judge (first attempts, kept), Frechet, memorisation and costs of a sampled arm folder."""
    return [_m(arm, "f1_macro"), _m(arm, "second_judge", "first_attempt_agreement"),
            _m(arm, "second_judge", "agreement"),
            Cell(".1f", f"{arm}/fidelity.json", FRECHET),
            Cell(".4f", f"{arm}/memorization/memorization.json", ["generated", "pixel_rms", "median"]),
            Cell(".0f", f"{arm}/memorization/memorization.json", ["generated", "near_copies"]),
            _m(arm, "acceptance", "kept", fmt=".0f")]


def _judged(arm):
    """F1, the 2nd judge on first attempts and on kept images, kept, candidates per kept."""
    return [_m(arm, "f1_macro"), _m(arm, "second_judge", "first_attempt_agreement"),
            _m(arm, "second_judge", "agreement"), _m(arm, "acceptance", "kept", fmt=".0f"),
            Cell(".2f", f"{arm}/metrics.json", ["acceptance", "candidates"], "ratio", f"{arm}/metrics.json",
                 ["acceptance", "kept"])]


JUDGED_HEAD = ["macro F1", "2nd judge, first attempts", "2nd judge, kept", "kept", "candidates / kept"]
SAMPLED_HEAD = ["macro F1", "2nd judge, first attempts", "2nd judge, kept", "Frechet", "memo. median RMS",
                "near-copies", "kept"]


def few_shot(r):
    rows = [[text(str(k)), *_sampled(f"003_k{k}/samples")] for k in r.few_shot]
    rows.append([text(f"all (~44), {r.lora_steps} steps"), *_sampled("000_lora")])
    return Table("few_shot", f"003: LoRA trained on K images per class ({r.few_shot_steps} steps each)",
                 ["K", *SAMPLED_HEAD], rows,
                 paper="003 trains on K = 1, 4, 8, 16 per class (SD2.1 + LoRA, white blood cells) and compares "
                       "them only by eye (its fig. 5): no numbers to set beside ours.",
                 plot={"file": "few_shot.png", "x": 0, "y": [1, 3], "xlabel": "K images per class", "rows": len(r.few_shot)})


def targets(r):
    rows = [[text("UNet attention only"), *_judged("003_unet_only/samples")],
            [text("UNet + text-encoder attention (the mini preset)"), *_judged("000_lora")]]
    return Table("targets", "003: LoRA on the UNet only vs the UNet and the text encoder", ["LoRA on", *JUDGED_HEAD],
                 rows, paper="003 puts LoRA on both the UNet and the text encoder; it reports no UNet-only arm.")


def _utility(arm, split):
    return [Cell(".0f", f"{arm}/utility.json", [split, "n_train"]), Cell(".3f", f"{arm}/utility.json", [split, "accuracy"]),
            Cell(".3f", f"{arm}/utility.json", [split, "f1_macro"])]


def utility_n(r):
    rows = [[text("0 (real only)"), *_utility("003_utility_n0", "real")]]
    rows += [[text(str(n)), *_utility(f"003_utility_n{n}", "hybrid")] for n in r.utility_n]
    return Table("utility_n", "003: a classifier's real test accuracy against synthetic images per class added",
                 ["synthetic per class", "n_train", "test ACC", "test macro F1"], rows,
                 paper="003 (ResNet-50, 15 classes): real only 0.27 ACC; 0.60 at 700 synthetic per class; 27.3% -> "
                       "78.4% at 5,000 per class (abstract). Ours: the classifier-guided pool (003_pool), "
                       f"validator recipe, {r.utility_epochs} epochs.",
                 plot={"file": "utility.png", "x": None, "xs": [0, *r.utility_n], "y": [2, 3],
                       "xlabel": "synthetic images per class"})


def imbalanced(r):
    arm = "003_imbalanced/utility"
    scarce = ", ".join(CLASSES[c] for c in r.scarce_classes)
    rows = [[text("imbalanced real"), *_utility(arm, "real")]
            + [Cell(".3f", f"{arm}/utility.json", ["real", "test", "per_class", c, "recall"]) for c in r.scarce_classes],
            [text("+ synthetic for the cut classes"), *_utility(arm, "hybrid")]
            + [Cell(".3f", f"{arm}/utility.json", ["hybrid", "test", "per_class", c, "recall"]) for c in r.scarce_classes]]
    return Table("imbalanced", f"003: {scarce} cut to {r.scarce_n} training images; {r.pool_per_class} synthetic "
                               "images added to each", ["train set", "n_train", "test ACC", "test macro F1",
                                                       *(f"recall {CLASSES[c]}" for c in r.scarce_classes)], rows,
                 paper="003: its real set is imbalanced as collected (some classes under 20 images, nothing cut); "
                       "ResNet-50 27.3% -> 78.4% ACC with 5,000 synthetic per class. Here the LoRA and both "
                       "classifiers of this table see only the cut set; the loop's validator saw the whole "
                       "training split (one trained on the cut set kept none of 285 guided candidates).")


def seed_001(r):
    n = max(r.utility_n)
    rows = [[text("real only"), Cell(".3f", "003_utility_n0/utility.json", ["real", "accuracy"]), text(DASH)],
            [text(f"real + {n} synthetic per class"), Cell(".3f", f"003_utility_n{n}/utility.json", ["hybrid", "accuracy"]),
             Cell("+.1f", f"003_utility_n{n}/utility.json", ["hybrid", "accuracy"], "points",
                  "003_utility_n0/utility.json", ["real", "accuracy"])]]
    return Table("seed_001_utility", "001: real-only vs real + synthetic classifier", ["trained on", "test ACC",
                                                                                      "gain, points"], rows,
                 paper="001 table 1 (ViT, ISIC skin lesions, Derm-T2IM images): 81.73% -> 84.06% (+2.33 points).")


def prior(r):
    rows = [[text("plain LoRA"), *_judged("000_lora")],
            [text(f"DreamBooth prior preservation ({r.prior_images} prior images per class)"),
             *_judged("001_prior/samples")]]
    return Table("prior", "001: DreamBooth prior preservation vs plain LoRA", ["LoRA", *JUDGED_HEAD], rows,
                 paper="001 did not get its DreamBooth run to work and gives no prior vs no-prior numbers.")


def validators(r):
    rows = [[text("ResNet-18 validator, ViT judge"), Cell(".3f", "validator/eval/metrics.json", ["accuracy"]),
             _m("000_lora", "f1_macro"), _m("000_lora", "second_judge", "agreement"),
             Cell(".2f", "000_lora/metrics.json", ["acceptance", "candidates"], "ratio", "000_lora/metrics.json",
                  ["acceptance", "kept"])],
            [text("ViT validator, ResNet-18 judge"), Cell(".3f", "judge/eval/metrics.json", ["accuracy"]),
             _m("001_vit_validator", "f1_macro"), _m("001_vit_validator", "second_judge", "agreement"),
             Cell(".2f", "001_vit_validator/metrics.json", ["acceptance", "candidates"], "ratio",
                  "001_vit_validator/metrics.json", ["acceptance", "kept"])]]
    return Table("validators", "001: a ViT vs a ResNet-18 as the loop's validator",
                 ["validator", "its real test ACC", "first-attempt F1 (its verdict)", "other network agrees on kept",
                  "candidates / kept"], rows, paper="001 uses a ViT (ISIC); it reports no ViT vs ResNet comparison.")


def gan(r):
    n = max(r.utility_n)
    def row(name, arm, util):
        return [text(name), Cell(".1f", f"{arm}/fidelity.json", FRECHET),
                _m(arm, "f1_macro"), _m(arm, "second_judge", "agreement"),
                Cell(".4f", f"{arm}/memorization/memorization.json", ["generated", "pixel_rms", "median"]),
                Cell("+.1f", f"{util}/utility.json", ["hybrid", "accuracy"], "points", "003_utility_n0/utility.json",
                     ["real", "accuracy"])]
    rows = [row("cGAN + loop", "002_gan/samples", "002_gan/utility"),
            row("mini + LoRA + loop", "000_lora", f"003_utility_n{n}")]
    return Table("gan", f"002: cGAN vs latent diffusion (utility: + {n} per class, the diffusion row from 003_pool)",
                 ["generator", "Frechet", "first-attempt F1", "2nd judge, kept", "memo. median RMS", "utility, points"],
                 rows, paper="002 table 3 (ResNet-50, 224 px chest X-ray / skin): +7.3, +7.8, +6.6 ACC points from "
                             "cGAN augmentation; FID 28.3 (theirs) vs 36.1 (DDPM). Frechet here is in the "
                             "validator's feature space, not Inception FID.")


def loops(r):
    def row(name, arm):
        return [text(name), _m(arm, "acceptance", "kept", fmt=".0f"),
                Cell(".2f", f"{arm}/metrics.json", ["acceptance", "candidates"], "ratio", f"{arm}/metrics.json",
                     ["acceptance", "kept"]),
                per_kept(arm, "run.json", ["costs", "unet_evals"]), per_kept(arm, "run.json", ["seconds_total"], ".2f"),
                _m(arm, "second_judge", "agreement")]
    rows = [row("one at a time (the paper's loop)", "loop_one_at_a_time"), row("batched (30)", "000_lora"),
            row(f"batched + early rejection at {r.early_reject_at}", "loop_early_reject"),
            row(f"batched + classifier guidance w={r.guidance_scale:g}", "003_pool")]
    return Table("loops", "Beyond the papers: the loop itself", ["loop", "kept", "candidates / kept",
                                                                 "UNet evals / kept", "seconds / kept",
                                                                 "2nd judge, kept"], rows,
                 paper="000 regenerates one image at a time and reports no cost per kept image.",
                 plot={"file": "loops.png", "bars": [2, 3, 4, 5]})


def tables(recipe):
    return [f(recipe) for f in (headline, per_class, sweep, few_shot, targets, utility_n, imbalanced, seed_001,
                                prior, validators, gan, loops)]
