"""The validator (ResNet-18, small stem, 28 px PathMNIST-sized input): a training step and a judged
batch, with the weights and inputs in channels-last (NHWC, what model.validator.classifier uses)
against the default contiguous (NCHW) layout.

    python bench/validator.py                 # CPU fp32, batch 32 (train) and 256 (judge)
    python bench/validator.py --device cuda --batch-size 128

Both variants are the same network with the same weights and inputs; only the memory layout
differs. The judged batch is one forward of 8 rotations/flips (test-time averaging), as
predict_proba runs it.
"""
import copy
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
from model.data import PATHMNIST_CLASSES  # noqa: E402
from model.validator.classifier import Classifier  # noqa: E402


def variants(device, batch, judged):
    torch.manual_seed(0)
    nhwc = Classifier("resnet18", "small", 28, PATHMNIST_CLASSES, (0.5,) * 3, (0.25,) * 3, tta=True).to(device)
    nchw = copy.deepcopy(nhwc)
    nchw.net.to(memory_format=torch.contiguous_format)
    nchw.nhwc = False
    x = torch.rand(batch, 3, 28, 28, device=device)
    y = torch.randint(0, 9, (batch,), device=device)
    xj = torch.rand(judged, 3, 28, 28, device=device)
    out = {}
    for name, clf in (("NCHW", nchw), ("NHWC", nhwc)):
        opt = torch.optim.AdamW(clf.parameters(), lr=1e-4)

        def step(clf=clf, opt=opt):
            loss = F.cross_entropy(clf(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        out[f"train step, {name}"] = step
        out[f"judge (8 views), {name}"] = lambda clf=clf: clf.predict_proba(xj)
    return out


def main():
    p = C.parser(__doc__, resolution=28, batch_sizes=(32,))
    p.add_argument("--judged", type=int, default=256, help="images judged per call")
    args = p.parse_args()
    device, _ = C.setup(args)
    C.header("validator: channels-last vs contiguous", args)
    fns = variants(device, args.batch_size[0], args.judged)
    times = C.interleaved(fns, args.repeats, device)
    rows = []
    for what in ("train step", "judge (8 views)"):
        a, b = times[f"{what}, NCHW"], times[f"{what}, NHWC"]
        rows.append([what, f"{a * 1e3:.0f} ms", f"{b * 1e3:.0f} ms", C.ratio(a, b)])
    C.table(["what", "NCHW", "NHWC (ours)", "speed-up"], rows)


if __name__ == "__main__":
    main()
