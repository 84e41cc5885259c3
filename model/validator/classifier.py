"""The validator: a ResNet (or ViT) that owns its preprocessing, and its .safetensors checkpoint.

Every image medsynth keeps is kept because `Classifier.predict_proba` said it shows the prompted
class, so the network carries everything needed to judge an image the way it was trained: the
training image size (inputs of any size are resized to it, antialiased), the mean/std it was
normalised with and the class names. The reject loop hands it decoded SD images at 256-512 px while
the network may have been trained on 28 px PathMNIST.

Architecture: torchvision's ResNet-18 (default) or ResNet-50. For small images (<= 64 px) the stem
is a 3x3 stride-1 convolution with no max-pool (as for CIFAR): the standard 7x7/2 convolution plus
3x3/2 max-pool would shrink a 28 px image to 7 px before the first residual block.

A second, independent judge: torchvision's VisionTransformer (Dosovitskiy et al. 2021) in a small
configuration, VIT_CONFIG, for images of a few hundred training examples: 4 px patches (a 28 px
image is 7 x 7 = 49 tokens plus the class token), trained from scratch. Its config is stored in the
checkpoint's metadata, so a file says which ViT it holds.
"""
import json
import os

import torch
import torch.nn as nn
import torchvision

from model.data import resize_images
from model.io import UserError, first_line, load_torch, read_safetensors, save_safetensors
from model.metrics import evaluate_probs

RESNETS = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50}
ARCHS = (*RESNETS, "vit")
# Narrow and shallow: about 0.46 M weights, where ViT-B/16 has 86 M and would only memorise 400 images.
VIT_CONFIG = {"patch_size": 4, "num_layers": 6, "num_heads": 4, "hidden_dim": 96, "mlp_dim": 192,
              "dropout": 0.1, "attention_dropout": 0.0}
STEMS = ("auto", "small", "standard")
SMALL_STEM_MAX_SIZE = 64
FORMAT = "medsynth-classifier-v1"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def pick_stem(stem, image_size):
    if stem not in STEMS:
        raise UserError(f"--stem {stem}: use one of {', '.join(STEMS)}")
    if stem == "auto":
        return "small" if image_size <= SMALL_STEM_MAX_SIZE else "standard"
    return stem


def build_net(arch, num_classes, stem, image_size, vit=None):
    if arch not in ARCHS:
        raise UserError(f"--arch {arch}: use one of {', '.join(ARCHS)}")
    if arch == "vit":
        return build_vit(num_classes, image_size, vit)
    net = RESNETS[arch](num_classes=num_classes)
    if stem == "small":
        # 28 px stays 28 px into layer1, then 28 -> 14 -> 7 -> 4 through layers 2-4.
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    return net


def build_vit(num_classes, image_size, config):
    if image_size % config["patch_size"]:
        raise UserError(f"a ViT with {config['patch_size']} px patches needs an image size that is a multiple of "
                        f"{config['patch_size']}, got {image_size} (pass --image-size)")
    # (B, 3, S, S) -> (B, (S/p)^2 + 1, hidden_dim) tokens -> class token -> heads.head -> (B, C)
    return torchvision.models.VisionTransformer(image_size=image_size, num_classes=num_classes, **config)


class Classifier(nn.Module):
    """ResNet or ViT + its preprocessing. forward: float images (B, 3, H, W) in [0, 1] -> logits (B, C).
    A ViT has no stem (stored as None); `vit` is its torchvision config (default VIT_CONFIG)."""

    def __init__(self, arch, stem, image_size, classes, mean, std, tta=False, meta=None, vit=None):
        super().__init__()
        self.arch, self.image_size, self.classes = arch, int(image_size), list(classes)
        self.stem = None if arch == "vit" else stem  # a ViT starts with its patch embedding
        self.tta = bool(tta)  # predict_proba averages over the 8 symmetries of the square
        self.vit = dict(vit or VIT_CONFIG) if arch == "vit" else None
        self.net = build_net(arch, len(self.classes), stem, self.image_size, self.vit)
        # oneDNN (CPU) and cuDNN run NHWC convolutions faster than NCHW (bench/validator.py)
        self.nhwc = arch != "vit"
        if self.nhwc:
            self.net.to(memory_format=torch.channels_last)
        # Not persistent: they live in the checkpoint's metadata, not among the weights.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.meta = dict(meta or {})  # data source, fingerprint, epoch, validation metrics

    def config(self):
        vit = {"vit": self.vit} if self.vit else {}
        return {"arch": self.arch, "stem": self.stem, "image_size": self.image_size, "classes": self.classes,
                "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist(), "tta": self.tta, **vit}

    @property
    def head(self):
        """The final linear layer: its input is the penultimate feature (ResNet: the global average
        pool; ViT: the class token after the last LayerNorm)."""
        return self.net.heads.head if self.arch == "vit" else self.net.fc

    def forward(self, images):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        x = resize_images(images, self.image_size)  # (B, 3, H, W) -> (B, 3, S, S)
        x = (x - self.mean) / self.std
        return self.net(x.contiguous(memory_format=torch.channels_last) if self.nhwc else x)

    @torch.no_grad()
    def predict_proba(self, images, batch_size=256):
        """(B, 3, H, W) float in [0, 1] (or uint8) at any size -> (B, C) probabilities, on images' device."""
        was_training = self.training
        self.eval()
        out = []
        for i in range(0, len(images), batch_size):
            x = self.prepare(images[i:i + batch_size].to(self.mean.device))
            out.append(torch.stack([self(v).float().softmax(dim=-1) for v in self.views(x)]).mean(0))
        self.train(was_training)
        return torch.cat(out).to(images.device) if out else torch.empty(0, len(self.classes))

    def prepare(self, images):
        """(B, 3, H, W) float in [0, 1] or uint8 -> (B, 3, S, S) float in [0, 1] at the training size
        (differentiable for float input: classifier guidance backpropagates through it)."""
        # Decoded SD images overshoot [0, 1] slightly; the network never saw values outside it.
        if images.dtype == torch.uint8:
            x = images.float() / 255
        else:  # float64 stays float64 (a finite-difference check of the guidance gradient needs it)
            x = images.to(torch.promote_types(images.dtype, torch.float32)).clamp(0, 1)
        return resize_images(x, self.image_size)  # resized once, not once per view

    def views(self, x):
        """The inputs whose predictions are averaged: x alone, or with TTA its 8 rotations/flips.
        Tissue has no orientation, so every rotation/flip of an image is the same evidence:
        averaging the 8 predictions removes the network's orientation noise (8x the cost of a
        28 px forward, negligible next to decoding one SD image)."""
        if not self.tta:
            return [x]
        return [torch.rot90(v, k, dims=(2, 3)) for v in (x, x.flip(-1)) for k in range(4)]


def save_classifier(path, clf, **meta):
    """Weights as tensors; architecture, preprocessing, classes and `meta` as JSON metadata."""
    metadata = {"format": FORMAT, **clf.config(), **meta}
    save_safetensors(path, clf.net.state_dict(), {k: json.dumps(v) for k, v in metadata.items()})


def load_classifier(path, device="cpu"):
    """A saved Classifier in eval mode on `device`; `.classes`, `.meta` and `.predict_proba`."""
    tensors, raw = read_safetensors(path)
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError:
        meta = {}
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: not a medsynth classifier (train one with train_classifier.py)")
    cfg = {k: meta.pop(k) for k in ("arch", "stem", "image_size", "classes", "mean", "std", "tta")}
    cfg["vit"] = meta.pop("vit", None)
    meta.pop("format")
    clf = Classifier(**cfg, meta=meta)
    try:
        clf.net.load_state_dict(tensors)
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not match {cfg['arch']} ({first_line(e)})") from None
    return clf.to(device).eval()


def load_pretrained(net, arch, spec):
    """Copy torchvision ImageNet weights into `net` (a .pth file the user has, or a torchvision
    weights name such as DEFAULT, downloaded by torchvision). Layers whose shape differs from
    ImageNet's (the classifier head, and the 3x3 small-image stem) keep their fresh initialisation.
    Returns the names of the tensors that were not loaded."""
    if arch not in RESNETS:
        raise UserError(f"--pretrained: ImageNet weights are for {' and '.join(RESNETS)} only; --arch {arch} "
                        f"trains from scratch")
    if os.path.isfile(spec):
        state = load_torch(spec)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    else:
        enum = f"{'ResNet18' if arch == 'resnet18' else 'ResNet50'}_Weights"
        try:
            weights = torchvision.models.get_weight(spec if "." in spec else f"{enum}.{spec}")
        except (ValueError, KeyError, AttributeError):
            raise UserError(f"--pretrained {spec}: not a file, nor a torchvision weights name "
                            f"(e.g. DEFAULT or IMAGENET1K_V1)") from None
        try:
            state = weights.get_state_dict(progress=True)
        except OSError as e:
            raise UserError(f"--pretrained {spec}: cannot download {weights.url} ({e}); download it "
                            f"by hand and pass --pretrained PATH") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"--pretrained {spec}: not a state dict of tensors")
    own = net.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise UserError(f"--pretrained {spec}: not {arch} weights (unexpected tensors such as {unknown[0]})")
    fits = {k: v for k, v in state.items() if v.shape == own[k].shape}
    net.load_state_dict(fits, strict=False)
    return sorted(set(own) - set(fits))


def evaluate_classifier(clf, data, batch_size=256):
    """Predict every image of an ImageSet and return the metrics report (see model.metrics)."""
    if list(data.classes) != clf.classes:
        raise UserError(f"the classifier knows classes {clf.classes}, the data has {list(data.classes)}")
    probs = clf.predict_proba(data.images, batch_size=batch_size)
    return evaluate_probs(data.labels.numpy(), probs.cpu().numpy(), clf.classes)
