"""Reject sampling, the paper's self-validation loop: generate a candidate for a class, let the
validator classify it, keep it only if it shows the prompted class, otherwise try again.

Work items are (class, index) pairs, index 0 .. per_class - 1; attempt a of an item is generated
from the noise seed candidate_seed(seed, class, index, a) and nothing else.

Batches and exact reproducibility. A batched network's float output also depends, in the last
bits, on what else is in the batch (CPU and GPU kernels block differently for different batch
sizes), and a last bit can flip an 8-bit pixel or a probability near a threshold. So batches are
made from the run's own state, never from timing, rank, or where an earlier process stopped:
round a holds every work item whose attempts 1 .. a-1 were all rejected, in (class, index) order,
cut into batches of batch_size. One process or N, interrupted and resumed or not, the same batches
run and give the same images, on one machine at the same threads per process (a CPU kernel's
float result also depends on how many threads split it: torchrun gives each rank one thread unless
OMP_NUM_THREADS is set); `replay` reruns a manifest row's batch to get its image bit for bit.

Early rejection (beyond the paper): after a fraction f of the DDIM steps, the current x0 estimate
is decoded and classified; a candidate that already looks like another class with high confidence
is dropped before the remaining steps are spent. Kept images are still only those whose final
image passes the check. With `audit_early_reject` nothing is dropped: the would-be-dropped
candidates are finished (and still rejected), to count how many would have passed.
"""
import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from model.reject.generators import SDGenerator, early_check_step, spent
from model.sd.sampling import to_pil


@dataclass(frozen=True)
class Settings:
    per_class: int
    max_attempts: int = 10
    min_confidence: float = 0.0     # accept iff predicted == prompted and p(prompted) >= this
    batch_size: int = 8
    seed: int = 0
    steps: int = 50
    guidance: float = 7.5
    eta: float = 0.0
    height: int = 512
    width: int = 512
    negative_prompt: str = ""
    early_reject_at: float = 0.0    # fraction of the steps after which to check (0 = off)
    early_reject_confidence: float = 0.9
    audit_early_reject: bool = False
    init_images: str = ""           # image-to-image from these real images ("" = text-to-image)
    strength: float = 1.0           # SDEdit: the fraction of the schedule the init image is noised to
    classifier_guidance: float = 0.0  # the scale of the validator's gradient at every step (0 = off)
    generator: str = "sd"           # what makes the candidates: "sd" or "gan" (model/reject/generators.py)
    image_size: int = 0             # side of the judged and kept images: the data's own (0 = as made)

    def asdict(self):
        return asdict(self)


def candidate_seed(seed, class_index, index, attempt):
    """The noise seed of one candidate: a hash, so that nearby (class, index, attempt) triples get
    unrelated noise. 48 bits, so it survives a spreadsheet (exact below 2^53)."""
    digest = hashlib.sha256(f"medsynth:{seed}:{class_index}:{index}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:6], "big")


def items_of(class_indices, per_class):
    return [(c, i) for c in sorted(class_indices) for i in range(per_class)]


def by_item(rows):
    """{(class, index): {attempt: row}}"""
    state = {}
    for r in rows:
        state.setdefault((r["class_index"], r["index"]), {})[r["attempt"]] = r
    return state


def unfinished(items, state, max_attempts):
    """Work items neither accepted nor out of attempts."""
    return [it for it in items if len(state.get(it, {})) < max_attempts
            and not any(r["accepted"] for r in state.get(it, {}).values())]


def round_batches(items, state, attempt, batch_size):
    """Every batch of round `attempt` (done ones too, so the cut points never move): the items
    whose attempts 1 .. attempt-1 all exist and were all rejected, in order."""
    entering = [it for it in items
                if all(a in state.get(it, {}) and not state[it][a]["accepted"] for a in range(1, attempt))]
    return [entering[k:k + batch_size] for k in range(0, len(entering), batch_size)]


def verdict(probs, class_index, min_confidence):
    """(predicted index, p(predicted), p(prompted), accepted) for one probability vector."""
    pred = int(probs.argmax())
    p_c = float(probs[class_index])
    return pred, float(probs[pred]), p_c, int(pred == class_index and p_c >= min_confidence)


def _quantized(pils):
    """The images exactly as saved, 8-bit values as floats in [0, 1], (B, 3, H, W): the validator
    judges the file, not the decoder's float output."""
    return torch.from_numpy(np.stack([np.asarray(p) for p in pils])).permute(0, 3, 1, 2).float() / 255


class Batch:
    """One batch of candidates of one round: generation, early check, final check, manifest rows."""

    def __init__(self, items, attempt, settings):
        self.items, self.attempt, self.settings = items, attempt, settings
        self.seeds = [candidate_seed(settings.seed, c, i, attempt) for c, i in items]
        self.early = {}          # batch position -> (predicted, p(predicted), p(prompted), drop)

    def _early_check(self, classifier):
        """The generator's check: classify the decoded x0 estimates and drop candidates already
        another class (the keep-mask)."""
        def check(step, images):
            # The only check, so every candidate is still alive: images is (B, 3, H, W).
            probs = classifier.predict_proba(_quantized(to_pil(images)))
            keep = []
            for pos, p in enumerate(probs):
                c = self.items[pos][0]
                pred, p_pred, p_c, _ = verdict(p, c, 0.0)
                drop = pred != c and p_pred >= self.settings.early_reject_confidence
                self.early[pos] = (pred, p_pred, p_c, drop)
                keep.append(not drop or self.settings.audit_early_reject)
            return None if all(keep) else keep
        return check

    def run(self, generator, classifier, class_names, prompts):
        """-> (rows, {batch position: PIL image}) for every candidate (dropped ones: no image)."""
        settings = self.settings
        check = self._early_check(classifier) if early_check_step(settings) is not None else None
        images, kept, extras = generator([c for c, _ in self.items], self.seeds, check=check)
        pils = dict(zip(kept.tolist(), to_pil(images)))
        probs = classifier.predict_proba(_quantized(list(pils.values()))) if pils else []
        final = dict(zip(pils, probs))
        rows = []
        for pos, (c, i) in enumerate(self.items):
            early = self.early.get(pos)
            if pos in final:
                pred, p_pred, p_c, accepted = verdict(final[pos], c, settings.min_confidence)
            else:  # dropped at the early check: its early prediction is all there is
                pred, p_pred, p_c, accepted = early[0], early[1], early[2], 0
            dropped = early is not None and early[3]
            rows.append({
                "file": "", "class_index": c, "class_name": class_names[c], "prompt": prompts[c],
                "seed": self.seeds[pos], "attempt": self.attempt, "predicted_index": pred,
                "prob_prompted": p_c, "accepted": 0 if dropped else accepted, "index": i,
                "prob_predicted": p_pred, "early_predicted_index": early[0] if early else None,
                "early_prob_prompted": early[2] if early else None,
                "early_dropped": (1 if dropped else 0) if early else None, **extras[pos],
            })
        return rows, pils


def as_generator(generator, prompts, settings, classifier):
    """A generator (model/reject/generators.py), or an SD pipeline made into one."""
    return generator if callable(generator) else SDGenerator(generator, prompts, settings, classifier)


def reject_sample(generator, classifier, prompts, class_names, settings, rows=(), folder=None,
                  on_batch=None, gather=None, rank=0, world=1):
    """Run (or finish) the loop for the classes in `prompts` ({class index: prompt}); returns every
    row, old and new. `generator`: see model/reject/generators.py (an SD pipeline is made into an
    SDGenerator). `rows`: a previous run's manifest, resumed from. `folder`: the RunFolder
    (model/reject/run_folder.py) that stores each image this process makes and rewrites the
    manifest after every batch (None: nothing is written). `on_batch(rows)` is called with all
    rows after every batch (progress display); `gather(rows)` -> list of every rank's rows
    (torch.distributed)."""
    items = items_of(prompts, settings.per_class)
    state = by_item(rows)
    generator = as_generator(generator, prompts, settings, classifier)
    for attempt in range(1, settings.max_attempts + 1):
        todo = [[it for it in b if attempt not in state.get(it, {})]
                for b in round_batches(items, state, attempt, settings.batch_size)]
        todo = [b for b in todo if b]
        for start in range(0, len(todo), world):  # all ranks step together: one batch each
            mine = todo[start + rank] if start + rank < len(todo) else []
            new = []
            if mine:
                batch = Batch(mine, attempt, settings)
                new, pils = batch.run(generator, classifier, class_names, prompts)
                if folder is not None:
                    for pos, row in enumerate(new):
                        if pos in pils:
                            row["file"] = folder.save_image(row, pils[pos])
            for row in (sum(gather(new), []) if gather else new):
                state.setdefault((row["class_index"], row["index"]), {})[attempt] = row
            every = [r for per in state.values() for r in per.values()]
            if folder is not None:
                folder.write_manifest(every)
            if on_batch is not None:
                on_batch(every)
    return [r for per in state.values() for r in per.values()]


def replay(generator, classifier, rows, targets, settings):
    """Regenerate the images of manifest rows `targets` exactly: rerun each one's batch (same
    members, same early check) as the run made it. -> list of PIL images (None if a target was
    dropped at the early check, which leaves no final image)."""
    state = by_item(rows)
    items = sorted(state)
    prompts = {r["class_index"]: r["prompt"] for r in rows}
    class_names = {r["class_index"]: r["class_name"] for r in rows}
    generator = as_generator(generator, prompts, settings, classifier)
    out = []
    for target in targets:
        item, attempt = (target["class_index"], target["index"]), target["attempt"]
        batch = next(b for b in round_batches(items, state, attempt, settings.batch_size) if item in b)
        _, pils = Batch(batch, attempt, settings).run(generator, classifier, class_names, prompts)
        out.append(pils.get(batch.index(item)))
    return out


def costs(rows, settings):
    """Network evaluations spent (model.reject.generators.spent) and, with early rejection, what
    the check saved, from the manifest alone."""
    out = {"candidates": len(rows), **spent(rows, settings)}
    check_step = early_check_step(settings)
    if check_step is None:
        return out
    per_step = 2 if settings.guidance != 1.0 else 1
    dropped = sum(1 for r in rows if r.get("early_dropped") == 1)
    saved_steps = dropped * (settings.steps - check_step - 1)
    would_pass = sum(1 for r in rows if r.get("early_dropped") == 1 and r["predicted_index"] == r["class_index"]
                     and r["prob_prompted"] >= settings.min_confidence)
    out.update({
        "early_check_after_step": check_step + 1, "early_dropped": dropped,
        "early_checked": sum(1 for r in rows if r.get("early_dropped") is not None),
        "unet_evals_saved": 0 if settings.audit_early_reject else saved_steps * per_step,
        "vae_decodes_saved": 0 if settings.audit_early_reject else dropped,
    })
    if settings.audit_early_reject:
        out["unet_evals_that_would_be_saved"] = saved_steps * per_step
        out["early_dropped_that_would_have_passed"] = would_pass
    return out


def summary(rows, settings, class_names):
    """What run.json reports: kept images and shortfalls per class, and the network costs."""
    classes = sorted({r["class_index"] for r in rows})
    kept = {class_names[c]: sum(1 for r in rows if r["class_index"] == c and r["accepted"] == 1)
            for c in classes}
    short = {name: settings.per_class - k for name, k in kept.items() if k < settings.per_class}
    return {"kept_per_class": kept, "hit_max_attempts": short, "costs": costs(rows, settings)}
