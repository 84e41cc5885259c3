"""`evaluate.py fidelity`: how close are the generated images to real ones, as distributions?

Frechet distance (Heusel et al. 2017, the "F" of FID) between Gaussians fitted to features of real
and of generated images:

    d^2 = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))

By default the features are the validator's penultimate layer (ResNet global-average-pool, 512-d
for ResNet-18; a ViT's class token after its last LayerNorm), so this is NOT Inception FID and its
numbers are not comparable with published FIDs: it measures distance in the space the validator
judges classes in, per class and overall.
Standard FID needs Inception-v3 weights the user already has (`--inception PATH`, see
model/eval/inception.py); nothing is downloaded.

With few images the estimate is biased upwards (the covariance of n < d samples is rank-deficient):
compare runs at equal sample sizes, which fidelity.json records.
"""
import numpy as np
import torch

from model.data import image_batches
from model.io import UserError

CHUNK = 256  # images per predict_proba call: one batch, so its views come out view-major


def gaussian(features):
    """(N, D) -> mean (D,) and covariance (D, D), float64; at least 2 samples."""
    x = np.asarray(features, dtype=np.float64)
    if len(x) < 2:
        raise UserError(f"a Frechet distance needs at least 2 images per set, got {len(x)}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _psd_sqrt(m):
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, s1, mu2, s2):
    """Squared Frechet distance between N(mu1, s1) and N(mu2, s2).

    Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)): the second matrix is symmetric PSD, so
    symmetric eigendecompositions do it exactly (no complex parts to discard, unlike sqrtm(S1 S2))."""
    root1 = _psd_sqrt(s1)
    eig = np.linalg.eigvalsh(root1 @ s2 @ root1)
    tr_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


class ClassifierFeatures:
    """The validator's penultimate features: the input of its final linear layer, after its own resize
    and normalisation, so real 28 px and generated 512 px images are compared at the same size."""

    name = "validator penultimate layer (not Inception FID)"

    def __init__(self, classifier):
        self.clf = classifier

    @torch.no_grad()
    def __call__(self, images):  # (B, 3, H, W) uint8 -> (B, D) float64
        out = []
        for lo in range(0, len(images), CHUNK):
            chunk, got = images[lo:lo + CHUNK], []
            hook = self.clf.head.register_forward_hook(lambda module, inputs, output: got.append(inputs[0]))
            try:
                self.clf.predict_proba(chunk, batch_size=CHUNK)
            finally:
                hook.remove()
            # A validator that averages over the 8 rotations/flips runs its head once per view, view-major:
            # (V * B, D). Their mean is one orientation-free feature per image, as the verdict is.
            feats = torch.cat(got).double().cpu()
            out.append(feats.reshape(-1, len(chunk), feats.shape[1]).mean(0))
        return torch.cat(out).numpy()


def _features(extract, images, batch_size=64):
    """Features (N, D) of uint8 images (N, 3, S, S), or of an iterable of such batches."""
    batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size)) \
        if torch.is_tensor(images) else images
    return np.concatenate([extract(batch) for batch in batches])


def fidelity(run_dir, files, real, extractors, class_names, floor=None):
    """files: [(relative path, class index)] of generated images; real: an ImageSet.
    Returns {extractor name: {"overall": ..., "per_class": {name: ...}}} with d^2 and sample sizes.
    With `floor` (another real ImageSet, e.g. the training split when `real` is the test split),
    "overall" also holds the real-vs-real distance between the two, the floor that sampling noise
    alone reaches, and the generated images' distance as a multiple of it."""
    if not files:
        raise UserError(f"{run_dir}: no generated images to compare")
    prompted = sorted({label for _, label in files})
    out = {}
    for extract in extractors:
        gen = _features(extract, image_batches(run_dir, [f for f, _ in files]))
        gen_labels = np.array([label for _, label in files])
        keep = np.isin(real.labels.numpy(), prompted)
        real_feat = _features(extract, real.images[torch.from_numpy(keep)])
        real_labels = real.labels.numpy()[keep]
        per_class = {}
        for label in prompted:
            gen_c, real_c = gen[gen_labels == label], real_feat[real_labels == label]
            distance = frechet_distance(*gaussian(real_c), *gaussian(gen_c)) \
                if len(gen_c) >= 2 and len(real_c) >= 2 else None
            per_class[class_names[label]] = {"frechet_distance": distance, "n_generated": len(gen_c),
                                             "n_real": len(real_c)}
        # one kept image has no covariance: its distance is None (n/a), as a class's is
        overall = {"frechet_distance": frechet_distance(*gaussian(real_feat), *gaussian(gen)) if len(gen) >= 2 else None,
                   "n_generated": len(gen), "n_real": len(real_feat)}
        if floor is not None:
            floor_feat = _features(extract, floor.images[torch.from_numpy(np.isin(floor.labels.numpy(), prompted))])
            overall["floor_frechet_distance"] = frechet_distance(*gaussian(real_feat), *gaussian(floor_feat))
            overall["n_floor"] = len(floor_feat)
            overall["ratio_to_floor"] = None if overall["frechet_distance"] is None else \
                overall["frechet_distance"] / overall["floor_frechet_distance"]
        out[extract.name] = {"overall": overall, "per_class": per_class, "feature_dim": int(gen.shape[1])}
    return out


def format_fidelity(result):
    lines = []
    for features, r in result.items():
        lines.append(f"Frechet distance, features: {features} ({r['feature_dim']}-d)")
        lines.append(f"  {'class':<36}  {'distance':>10}  {'n_gen':>5}  {'n_real':>6}")
        for name, entry in [*r["per_class"].items(), ("overall", r["overall"])]:
            distance = "-" if entry["frechet_distance"] is None else f"{entry['frechet_distance']:.4g}"
            lines.append(f"  {name:<36}  {distance:>10}  {entry['n_generated']:>5}  {entry['n_real']:>6}")
        if "floor_frechet_distance" in r["overall"]:
            lines.append(f"  real-vs-real floor ({r['overall']['n_floor']} other real images): "
                         f"{r['overall']['floor_frechet_distance']:.4g}; generated / floor = "
                         + ("-" if r["overall"]["ratio_to_floor"] is None else f"{r['overall']['ratio_to_floor']:.2f}"))
    return "\n".join(lines)
