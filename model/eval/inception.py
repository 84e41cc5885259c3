"""Inception-v3 pool features (2048-d) for standard FID, from weights the user already has.

Standard FID (Heusel et al. 2017) is defined by TensorFlow's 2015 Inception graph. Its PyTorch port
is pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (1008 classes): torchvision's Inception3
with the last branch of the mixed blocks pooled as TF pools it (average without the zero padding,
and a max in the last block). Give that file to get numbers comparable with published FIDs.
torchvision's own ImageNet weights (`inception_v3_google-*.pth`, 1000 classes) also load, as
plain torchvision Inception3: close, but not comparable with published FIDs (said in the output).
Nothing is downloaded here. Inputs are resized to 299 px (bilinear) and scaled to [-1, 1].
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import inception as tv

from model.io import UserError, first_line, load_torch


def _avg_without_padding(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max(x):
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class _TFPooling:
    """Recompute the pooling branch (the last output) of a torchvision mixed block with TF's pooling."""
    tf_pool = staticmethod(_avg_without_padding)

    def _forward(self, x):
        outputs = super()._forward(x)
        outputs[-1] = self.branch_pool(self.tf_pool(x))
        return outputs


class FIDInceptionA(_TFPooling, tv.InceptionA):
    pass


class FIDInceptionC(_TFPooling, tv.InceptionC):
    pass


class FIDInceptionE1(_TFPooling, tv.InceptionE):
    pass


class FIDInceptionE2(_TFPooling, tv.InceptionE):
    tf_pool = staticmethod(_max)


def fid_inception(num_classes=1008):
    """pytorch-fid's network: torchvision Inception3 with the TF-pooling mixed blocks."""
    net = tv.Inception3(num_classes=num_classes, aux_logits=False, transform_input=False, init_weights=False)
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = FIDInceptionA(192, 32), FIDInceptionA(256, 64), FIDInceptionA(288, 64)
    net.Mixed_6b, net.Mixed_6c = FIDInceptionC(768, 128), FIDInceptionC(768, 160)
    net.Mixed_6d, net.Mixed_6e = FIDInceptionC(768, 160), FIDInceptionC(768, 192)
    net.Mixed_7b, net.Mixed_7c = FIDInceptionE1(1280), FIDInceptionE2(2048)
    return net


class InceptionFeatures:
    """Callable: uint8 or [0, 1] float images (B, 3, H, W) -> (B, 2048) float64 pool features."""

    def __init__(self, path, device="cpu"):
        state = load_torch(path)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict) or "fc.weight" not in state:
            raise UserError(f"--inception {path}: not Inception-v3 weights (no fc.weight)")
        n_classes = state["fc.weight"].shape[0]
        if n_classes == 1008:
            net, self.name = fid_inception(), "Inception-v3 pool3, pytorch-fid weights (standard FID)"
        elif n_classes == 1000:
            net = tv.Inception3(num_classes=1000, aux_logits=False, transform_input=False, init_weights=False)
            self.name = "Inception-v3 pool3, torchvision weights (FID-like; not comparable with published FIDs)"
        else:
            raise UserError(f"--inception {path}: fc has {n_classes} classes; expected 1008 (pytorch-fid) or 1000 (torchvision)")
        state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(f"--inception {path}: weights do not fit Inception-v3 ({first_line(e)})") from None
        net.fc = nn.Identity()  # forward then ends at the 2048-d global average pool (dropout is off in eval)
        self.net = net.to(device).eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images, batch_size=64):
        out = []
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(self.device)
            x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            out.append(self.net(2 * x - 1).double().cpu())  # (B, 3, 299, 299) -> (B, 2048)
        return torch.cat(out).numpy()
