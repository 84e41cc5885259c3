"""Classifier guidance (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis"):
steer every DDIM step towards images the validator gives the prompted class.

ADM trains a classifier on noisy images x_t. We have only the validator, trained on clean images,
so it judges the decoded x0 estimate instead (as in Bansal et al. 2023's "forward universal
guidance"): log p(y | D(x0_hat(x_t))). This module gives its gradient with respect to x0_hat;
model.sd.sampling._guided turns it into the guided noise estimate of ADM eq. 14.

A guided image has been pushed towards what this one network believes, so its verdict on the
result is no longer independent evidence: judge guided runs with a second classifier
(`evaluate.py generation --second-classifier`).
"""
import torch

from model.data import from_model_size
from model.sd.sampling import decode_latents_differentiable


def log_prob(classifier, images, classes, view=None):
    """log p(class_k | image_k) under the validator, averaged over its 8 views when it was trained
    with test-time averaging (as predict_proba judges), or from view number `view` (mod the number
    of views) alone. images (K, 3, H, W) in [0, 1] -> (K,)"""
    views = classifier.views(classifier.prepare(images))   # [(K, 3, S, S)] * 1 or 8
    if view is not None:
        views = [views[view % len(views)]]
    probs = torch.stack([classifier(v).softmax(dim=-1) for v in views]).mean(0)  # (K, C)
    return probs.gather(1, classes.view(-1, 1)).squeeze(1).clamp_min(1e-12).log()


class ClassifierGradient:
    """grad_log_p for model.sd.sampling.generate: d log p(prompted class | D(x0)) / d x0.

    `classes` (B,) are the prompted classes of the batch; generate passes `kept`, the positions of
    the candidates still alive, with their x0 estimates. A validator with test-time averaging is
    differentiated through one of its 8 views per DDIM step, in turn (step i: view i mod 8): a
    backward pass through all 8 would cost 8 times as much, and over any 8 consecutive steps every
    orientation pulls once. The view depends on the step only, so an image still depends on its
    (class, seed) alone."""

    def __init__(self, pipe, classifier, classes, image_size=0):
        self.pipe, self.classifier, self.image_size = pipe, classifier, image_size
        self.classes = torch.as_tensor(classes, dtype=torch.long)
        self.steps = 0  # DDIM steps guided so far in this batch
        self.calls = 0  # differentiable VAE decodes of one image each (a cost the run reports)

    def __call__(self, x0, kept):
        with torch.enable_grad():
            x0 = x0.detach().to(torch.promote_types(x0.dtype, torch.float32)).requires_grad_(True)  # (K, 4, h, w)
            images = decode_latents_differentiable(self.pipe, x0)       # (K, 3, H, W) in [0, 1]
            if self.image_size:  # judged as the loop judges: at the data's own size
                images = from_model_size(images, self.image_size)       # (K, 3, S, S)
            logp = log_prob(self.classifier, images, self.classes[kept].to(images.device), view=self.steps)
            # The candidates are independent, so the gradient of the sum is each one's own gradient.
            grad, = torch.autograd.grad(logp.sum(), x0)
        self.steps += 1
        self.calls += len(x0)
        return grad                                                     # (K, 4, h, w)
