"""The papers' claims, each checked against our numbers: reproduced or not, said plainly.

Each check compares two numbers of the arms (model/study/cells.py sources); the sentence is written
from the numbers of this run, so it stays true when the study is run again.
"""
from model.study.cells import lookup

U = "utility.json"


def _checks(r):
    """(claim, (file, keys) of the number that should be higher, (file, keys) of the lower one)."""
    n = max(r.utility_n)
    first = ["second_judge", "first_attempt_agreement"]
    return [
        ("000: LoRA fine-tuning raises first-attempt macro F1 over the untuned base (0.122 -> 0.6727)",
         ("000_lora/metrics.json", ["f1_macro"]), ("000_base/metrics.json", ["f1_macro"])),
        ("000: the reject loop makes the kept images more label-consistent than first attempts (judged by "
         "an independent ViT, not the validator that did the rejecting)",
         ("000_lora/metrics.json", ["second_judge", "agreement"]), ("000_lora/metrics.json", first)),
        ("000: more LoRA steps give a higher F1 (V6 0.43 -> V8 0.54 -> V9 0.67)",
         ("000_lora/metrics.json", ["f1_macro"]), (f"000_steps_{r.sweep_every}/metrics.json", ["f1_macro"])),
        (f"003: more real shots make a better LoRA (K = {r.few_shot[-1]} vs K = {r.few_shot[0]}, first-attempt F1)",
         (f"003_k{r.few_shot[-1]}/samples/metrics.json", ["f1_macro"]), (f"003_k{r.few_shot[0]}/samples/metrics.json",
                                                                           ["f1_macro"])),
        (f"003 / 001: adding synthetic images ({n} per class) raises real test accuracy",
         (f"003_utility_n{n}/{U}", ["hybrid", "accuracy"]), (f"003_utility_n0/{U}", ["real", "accuracy"])),
        ("003: synthetic images for the cut classes raise accuracy on an imbalanced set (27.3% -> 78.4%)",
         (f"003_imbalanced/utility/{U}", ["hybrid", "accuracy"]), (f"003_imbalanced/utility/{U}", ["real", "accuracy"])),
        ("002: cGAN augmentation raises real test accuracy (+6.6 to +7.8 points)",
         (f"002_gan/utility/{U}", ["hybrid", "accuracy"]), (f"003_utility_n0/{U}", ["real", "accuracy"])),
    ]


def directions(recipe, out):
    """Markdown bullets, one per claim: reproduced, not reproduced (with both numbers) or not measured."""
    lines = []
    for claim, (hi_file, hi_keys), (lo_file, lo_keys) in _checks(recipe):
        hi, lo = lookup(out, hi_file, hi_keys), lookup(out, lo_file, lo_keys)
        if hi is None or lo is None:
            verdict = "**not measured** (an arm is missing)"
        else:
            word = "reproduced" if hi > lo else "**not reproduced**"
            verdict = f"{word}: {hi:.3f} vs {lo:.3f}"
        lines.append(f"- {claim}: {verdict}.")
    return lines
