"""Fixtures for the reject-loop and generation-evaluation tests: a tiny SD folder and validators
whose verdicts the test controls, saved as real classifier files so the CLI path is the real one."""
import torch

from model.validator.classifier import Classifier, save_classifier
from model.data import PATHMNIST_CLASSES
from model.sd.sampling import generate

SIZE = 16  # the validators look at 16 px images: fast, and any generated size is resized to it


def new_classifier(seed=0):
    torch.manual_seed(seed)
    return Classifier("resnet18", "small", SIZE, PATHMNIST_CLASSES, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).eval()


def always(k, seed=0):
    """A validator that predicts class k for every image, with probability ~1."""
    clf = new_classifier(seed)
    with torch.no_grad():
        clf.net.fc.weight.zero_()
        clf.net.fc.bias.fill_(-8.0)
        clf.net.fc.bias[k] = 8.0
    return clf


def features(clf, images):
    got = []
    hook = clf.net.fc.register_forward_hook(lambda m, inp, out: got.append(inp[0]))
    clf.predict_proba(images)
    hook.remove()
    return torch.cat(got)


def coin(pipe, k, j, gen_kwargs, seed=0, n=24):
    """A validator that splits images between classes k and j about half and half, calibrated on
    `n` images the pipeline makes with `gen_kwargs` (seeds 10**6 + i, none of which a run uses)."""
    images, _ = generate(pipe, ["calibration"] * n, [10**6 + i for i in range(n)], **gen_kwargs)
    return coin_from_images(images, k, j, seed)


def coin_from_images(images, k, j, seed=0):
    """A validator whose fc layer scores a random direction of the penultimate features, centred on
    its median over `images`: about half of images like them go to class k, half to j."""
    clf = new_classifier(seed)
    f = features(clf, images)                                      # (n, 512)
    w = torch.randn(f.shape[1], generator=torch.Generator().manual_seed(seed))
    score = f @ w
    scale = 20.0 / (score.std() + 1e-8)                             # a decisive but not saturated softmax
    with torch.no_grad():
        clf.net.fc.weight.zero_()
        clf.net.fc.bias.fill_(-30.0)
        clf.net.fc.weight[k] = w * scale / 2
        clf.net.fc.weight[j] = -w * scale / 2
        clf.net.fc.bias[k] = -score.median() * scale / 2
        clf.net.fc.bias[j] = score.median() * scale / 2
    return clf


def save(clf, path):
    save_classifier(path, clf)
    return path
