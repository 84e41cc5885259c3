"""The study's settings: one dataclass, three scales.

    full   (default) every arm on medsynth-mini, sized to run in about 90 minutes on a 2-core CPU
    quick  the same arms, every count cut down, for trying a change (a few minutes)
    tiny   quick on the tiny random-weight SD (its images are noise): for the tests only

Every count below is a budget, not a tuned value: they were set from the time each stage takes on
a 2-core CPU, and nothing was chosen by looking at a test-split number.
"""
from dataclasses import dataclass, replace

from model.io import UserError

EXAMPLE_DATA = "examples/pathmnist_subset_28.npz"
MINI = "examples/medsynth-mini"


@dataclass(frozen=True)
class StudyRecipe:
    scale: str = "full"                # full or quick (the counts below)
    preset: str = "mini"               # train_lora.py --preset: mini, or tiny (tests)
    data: str = EXAMPLE_DATA
    seed: int = 0                      # every arm's --seed; the headline arms rerun with seed + 1
    second_seed: bool = True
    # classifiers (train_classifier.py, evaluate.py utility)
    validator_epochs: int = 12         # the ResNet-18 validator
    judge_epochs: int = 50             # the ViT second judge (seed + 1): 001's validator
    utility_epochs: int = 5            # every utility arm: the same recipe, real vs real + synthetic
    # LoRA (train_lora.py)
    lora_steps: int = 300              # the mini preset's
    sweep_every: int = 100             # lora-STEP.safetensors snapshots: 000's V1..V10 progression
    few_shot: tuple = (1, 4, 8, 16)    # 003's K images per class
    few_shot_steps: int = 100
    prior_images: int = 10             # DreamBooth class-prior images per class (001)
    gan_steps: int = 1000              # train_gan.py (002)
    # sampling (sample_validated.py), as run.sh mini but fewer DDIM steps
    steps: int = 15
    guidance: float = 3.0
    batch_size: int = 30
    per_class: int = 5                 # kept images per class asked of each loop arm
    max_attempts: int = 10
    first_per_class: int = 10          # first-attempt-only arms (base, LoRA-steps sweep)
    few_shot_per_class: int = 3
    one_at_a_time_per_class: int = 1   # batch size 1 is slow: fewer images, same per-kept costs
    guidance_scale: float = 3.0        # classifier guidance (ADM eq. 14) weight of the pool
    pool_per_class: int = 25           # the classifier-guided pool that utility-vs-N draws from
    utility_n: tuple = (10, 25)        # synthetic images per class added to the real set (0 = real)
    scarce_classes: tuple = (0, 4, 8)  # 003's imbalanced set: these classes cut to scarce_n images
    scarce_n: int = 5
    early_reject_at: float = 0.4

    def __post_init__(self):
        if self.preset not in ("mini", "tiny"):
            raise UserError(f"--preset {self.preset}: use mini or tiny")
        if max(self.utility_n) > self.pool_per_class:
            raise UserError(f"utility N {max(self.utility_n)} exceeds the pool's {self.pool_per_class} per class")

    @property
    def base_model(self):
        """The model the LoRAs adapt: mini, or the tiny SD train_lora.py builds into lora/tiny-sd."""
        return MINI if self.preset == "mini" else None


QUICK = dict(validator_epochs=2, judge_epochs=4, utility_epochs=1, lora_steps=40, sweep_every=20,
             few_shot_steps=10, prior_images=2, gan_steps=60, steps=6, per_class=2, max_attempts=3,
             first_per_class=2, few_shot_per_class=2, one_at_a_time_per_class=1, pool_per_class=4,
             utility_n=(2, 4))


def study_recipe(quick=False, preset="mini", **overrides):
    recipe = StudyRecipe(preset=preset, **overrides)
    if not quick:
        return recipe
    return replace(recipe, scale="quick", **{k: v for k, v in QUICK.items() if k not in overrides})
