"""The study's arms: each a folder under OUT and the script commands that fill it.

An arm is only commands of the four scripts (and train_gan.py), in the order they must run; every
path in them is inside OUT, so an arm can be rerun alone by pasting its commands (study.md lists
them) and each script resumes or skips what it finished. `plan(recipe, out)` returns them in an
order where every arm comes after the arms it reads from.

    validator/  judge/  lora/               shared: the ResNet-18 validator, the ViT second judge
                                            (seed + 1) and the system's LoRA with its snapshots
    000_base/  000_lora/  000_steps_<n>/     seed 000: base mini, mini + LoRA + loop, LoRA steps sweep
    seed<s+1>/...                            the 000 headline LoRA and samples again with the second seed
    003_k<K>/  003_unet_only/  003_pool/  003_utility_n<N>/  003_imbalanced/
    001_prior/  001_vit_validator/  002_gan/  loop_one_at_a_time/  loop_early_reject/
"""
import os
from dataclasses import dataclass

from model.study.imbalance import IMBALANCED_NPZ


@dataclass
class Arm:
    name: str           # its folder under OUT
    commands: list      # [[script, arg, ...], ...]; a None entry is the study's own imbalanced-set step


class Planner:
    """Builds the commands; `self.at(...)` is a path inside OUT."""

    def __init__(self, recipe, out):
        self.r, self.out = recipe, out

    def at(self, *parts):
        return os.path.join(self.out, *parts)

    # ---- the scripts' commands ----
    def validator(self, folder, seed, data=None, epochs=None, arch="resnet18"):
        cmd = ["train_classifier.py", "--data", data or self.r.data, "--arch", arch, "--seed", str(seed),
               "--epochs", str(epochs or self.r.validator_epochs), "--out", self.at(folder)]
        test = ["evaluate.py", "classifier", "--classifier", self.at(folder, "classifier.safetensors"),
                "--data", data or self.r.data, "--out", self.at(folder, "eval")]
        return [cmd, test]

    def lora(self, folder, seed, steps=None, data=None, extra=()):
        return [["train_lora.py", "--preset", self.r.preset, "--data", data or self.r.data,
                 "--max-steps", str(steps or self.r.lora_steps), "--seed", str(seed), *extra,
                 "--out", self.at(folder)]]

    def sample(self, folder, seed, lora=None, per_class=None, attempts=None, extra=(), validator=None, batch=None):
        source = ["--lora", self.at(lora, "lora.safetensors")] if lora and not lora.endswith(".safetensors") \
            else ["--lora", self.at(lora)] if lora else []
        return [["sample_validated.py", *source, "--classifier", validator or self.at("validator", "classifier.safetensors"),
                 "--per-class", str(per_class or self.r.per_class),
                 "--max-attempts", str(attempts or self.r.max_attempts), "--steps", str(self.r.steps),
                 "--guidance", str(self.r.guidance), "--batch-size", str(batch or self.r.batch_size),
                 "--seed", str(seed), *extra, "--out", self.at(folder)]]

    def scores(self, folder, judge=None, data=None, fidelity=True):
        """The paper's scores with the second judge, and (fidelity) Frechet distance and memorisation."""
        data = data or self.r.data
        return ([["evaluate.py", "generation", "--run", self.at(folder),
                 "--second-classifier", judge or self.at("judge", "classifier.safetensors")],
                ["evaluate.py", "fidelity", "--run", self.at(folder), "--data", data, "--split", "test",
                 "--floor-split", "train"],
                ["evaluate.py", "memorization", "--run", self.at(folder), "--data", data,
                 "--out", self.at(folder, "memorization")]])[:3 if fidelity else 1]

    def utility(self, folder, run, arms, seed, n=None, data=None):
        cmd = ["evaluate.py", "utility", "--run", self.at(run), "--data", data or self.r.data,
               "--epochs", str(self.r.utility_epochs), "--seed", str(seed), "--arms", *arms, "--out", self.at(folder)]
        return [cmd + (["--synthetic-per-class", str(n)] if n else [])]

    def base_model(self, lora_folder):
        """--model of the untuned base: mini, or the tiny SD that train_lora.py built into the LoRA's folder."""
        return self.r.base_model or self.at(lora_folder, "tiny-sd")

    # ---- the arms ----
    def headline(self, seed, prefix=""):
        """000: the LoRA (with its snapshots), base first attempts, LoRA + loop."""
        p = prefix
        first = dict(per_class=self.r.first_per_class, attempts=1)
        res = ["--resolution", "32" if self.r.preset == "mini" else "64"]
        arms = [Arm(p + "lora", self.lora(p + "lora", seed, extra=["--save-every", str(self.r.sweep_every)]))]
        validator = self.at("validator", "classifier.safetensors")  # one validator: the seed moves LoRA and sampling
        base = self.sample(p + "000_base", seed, validator=validator, extra=[
            "--model", self.base_model(p + "lora"), *res, "--keep-rejected"], **first)
        arms.append(Arm(p + "000_base", base + self.scores(p + "000_base", fidelity=not p)))
        loop = self.sample(p + "000_lora", seed, lora=p + "lora", validator=validator, extra=["--keep-rejected"])
        arms.append(Arm(p + "000_lora", loop + self.scores(p + "000_lora", fidelity=not p)))
        return arms

    def sweep(self, seed):
        arms = []
        for step in range(self.r.sweep_every, self.r.lora_steps, self.r.sweep_every):
            name = f"000_steps_{step}"
            cmds = self.sample(name, seed, lora=os.path.join("lora", f"lora-{step:06d}.safetensors"),
                               per_class=self.r.first_per_class, attempts=1, extra=["--keep-rejected"])
            arms.append(Arm(name, cmds + self.scores(name, fidelity=False)))
        return arms

    def seed_003(self, seed):
        r, arms = self.r, []
        for k in r.few_shot:
            name = f"003_k{k}"
            cmds = self.lora(os.path.join(name, "lora"), seed, steps=r.few_shot_steps, extra=["--few-shot", str(k)])
            cmds += self.sample(os.path.join(name, "samples"), seed, lora=os.path.join(name, "lora"),
                                per_class=r.few_shot_per_class, extra=["--keep-rejected"])
            arms.append(Arm(name, cmds + self.scores(os.path.join(name, "samples"))))
        cmds = self.lora(os.path.join("003_unet_only", "lora"), seed, extra=["--targets", "unet_attn"])
        cmds += self.sample(os.path.join("003_unet_only", "samples"), seed, lora=os.path.join("003_unet_only", "lora"),
                            extra=["--keep-rejected"])
        arms.append(Arm("003_unet_only", cmds + self.scores(os.path.join("003_unet_only", "samples"), fidelity=False)))
        pool = self.sample("003_pool", seed, lora="lora", per_class=r.pool_per_class,
                           extra=["--classifier-guidance", str(r.guidance_scale)])
        arms.append(Arm("003_pool", pool + self.scores("003_pool", fidelity=False)))
        arms.append(Arm("003_utility_n0", self.utility("003_utility_n0", "003_pool", ["real"], seed)))
        for n in r.utility_n:
            arms.append(Arm(f"003_utility_n{n}", self.utility(f"003_utility_n{n}", "003_pool", ["hybrid"], seed, n=n)))
        return arms + [self.imbalanced(seed)]

    def imbalanced(self, seed):
        """003's imbalanced set: the LoRA and the real-only classifier see only the cut set, and
        synthetic images top up the cut classes. They are validated by the study's validator, which
        saw the whole training split: one trained on 5 images of a class kept none of 285 guided
        candidates of it (a compromise that study.md states)."""
        r, name = self.r, "003_imbalanced"
        data = self.at(name, IMBALANCED_NPZ)
        cmds = [None]  # the study writes data.npz first (model/study/imbalance.py)
        cmds += self.lora(os.path.join(name, "lora"), seed, data=data)
        cmds += self.sample(os.path.join(name, "samples"), seed, lora=os.path.join(name, "lora"),
                            per_class=r.pool_per_class,
                            extra=["--classes", *map(str, r.scarce_classes), "--classifier-guidance",
                                   str(r.guidance_scale)])
        cmds += self.utility(os.path.join(name, "utility"), os.path.join(name, "samples"), ["real", "hybrid"], seed,
                             data=data)
        return Arm(name, cmds)

    def seed_001(self, seed):
        r = self.r
        prior = self.lora(os.path.join("001_prior", "lora"), seed,
                          extra=["--prior-preservation", "--prior-images", str(r.prior_images)])
        prior += self.sample(os.path.join("001_prior", "samples"), seed, lora=os.path.join("001_prior", "lora"),
                             extra=["--keep-rejected"])
        vit = self.sample("001_vit_validator", seed, lora="lora", validator=self.at("judge", "classifier.safetensors"),
                          extra=["--keep-rejected"])
        vit += self.scores("001_vit_validator", judge=self.at("validator", "classifier.safetensors"), fidelity=False)
        return [Arm("001_prior", prior + self.scores(os.path.join("001_prior", "samples"), fidelity=False)),
                Arm("001_vit_validator", vit)]

    def seed_002(self, seed):
        r = self.r
        cmds = [["train_gan.py", "--data", r.data, "--steps", str(r.gan_steps), "--seed", str(seed),
                 "--out", self.at("002_gan", "gan")]]
        cmds += [["sample_validated.py", "--generator", self.at("002_gan", "gan", "gan.safetensors"),
                  "--classifier", self.at("validator", "classifier.safetensors"), "--per-class", str(r.pool_per_class),
                  "--max-attempts", str(r.max_attempts), "--batch-size", str(r.batch_size), "--seed", str(seed),
                  "--keep-rejected", "--out", self.at("002_gan", "samples")]]
        cmds += self.scores(os.path.join("002_gan", "samples"))
        cmds += self.utility(os.path.join("002_gan", "utility"), os.path.join("002_gan", "samples"), ["hybrid"], seed,
                             n=max(r.utility_n))
        return [Arm("002_gan", cmds)]

    def loops(self, seed):
        r = self.r
        one = self.sample("loop_one_at_a_time", seed, lora="lora", per_class=r.one_at_a_time_per_class, batch=1)
        early = self.sample("loop_early_reject", seed, lora="lora", extra=["--early-reject-at", str(r.early_reject_at)])
        return [Arm("loop_one_at_a_time", one + self.scores("loop_one_at_a_time", fidelity=False)),
                Arm("loop_early_reject", early + self.scores("loop_early_reject", fidelity=False))]


def plan(recipe, out):
    """Every arm of the study, in an order that runs each after what it reads."""
    p, s = Planner(recipe, out), recipe.seed
    arms = [Arm("validator", p.validator("validator", s)),
            Arm("judge", p.validator("judge", s + 1, epochs=recipe.judge_epochs, arch="vit"))]
    arms += p.headline(s) + p.sweep(s) + p.seed_003(s) + p.seed_001(s) + p.seed_002(s) + p.loops(s)
    if recipe.second_seed:
        arms += p.headline(s + 1, prefix=f"seed{s + 1}/")
    return arms
