"""LoRA (Hu et al. 2021): low-rank adapters on frozen Linear / 1x1-conv layers.

A LoRA layer keeps the pretrained weight W frozen and learns a rank-r update (LoRA eq. 3):

    y = W x + (alpha / r) * B(A(x)),    A: (r, in) Kaiming-uniform,  B: (out, r) zeros

so a freshly injected model computes exactly what the base model computes. The update is applied
as two thin matmuls on the activations (never materialising W + BA) while training; `merge_lora`
folds it into W for inference and `unmerge_lora` takes it out again.

Two ways in: `inject_lora` puts fresh layers on the modules whose names match target patterns (to
train them); `inject_lora_weights` puts layers holding a file's weights where the file says, after
checking that every one fits. The file formats are in model/lora/files.py.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.io import UserError

# Module-name suffixes per target group (a pattern matches `name == p` or `name.endswith("." + p)`).
TARGETS = {
    "unet_attn": ("to_q", "to_k", "to_v", "to_out.0"),          # attn1 (self) and attn2 (cross)
    "unet_ff": ("ff.net.0.proj", "ff.net.2"),                   # GEGLU input and output
    "unet_proj": ("proj_in", "proj_out"),                       # 1x1 conv (SD1) or Linear (SD2)
    "text_attn": ("q_proj", "k_proj", "v_proj", "out_proj"),    # CLIP self-attention
    "text_mlp": ("fc1", "fc2"),
}
COMPONENTS = ("unet", "text_encoder")


class LoRALayer(nn.Module):
    """Wraps a frozen nn.Linear or 1x1 nn.Conv2d `base`; forward = base(x) + scale * up(down(x))."""

    def __init__(self, base, rank, alpha, dropout=0.0, generator=None):
        super().__init__()
        if isinstance(base, nn.Linear):
            fan_in, fan_out, self.conv = base.in_features, base.out_features, False
        elif (isinstance(base, nn.Conv2d) and base.kernel_size == (1, 1) and base.stride == (1, 1)
              and base.groups == 1):
            fan_in, fan_out, self.conv = base.in_channels, base.out_channels, True
        else:
            raise UserError(f"LoRA supports nn.Linear and 1x1 nn.Conv2d, not {base}")
        if rank < 1:
            raise UserError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank  # sec. 4.1: scaling by alpha/r keeps the LR usable across r
        tail = (1, 1) if self.conv else ()
        # Kaiming-uniform with a=sqrt(5) is nn.Linear's own init, as loralib and PEFT do. It runs on
        # CPU from `generator` so a seed gives the same A on any device.
        down = torch.empty(rank, fan_in)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_down = nn.Parameter(down.view(rank, fan_in, *tail).to(**like))   # A: (r, in[,1,1])
        self.lora_up = nn.Parameter(torch.zeros(fan_out, rank, *tail, **like))      # B: (out, r[,1,1])
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        x = self.dropout(x)
        if self.conv:
            h = F.conv2d(F.conv2d(x, self.lora_down), self.lora_up)
        else:
            h = F.linear(F.linear(x, self.lora_down), self.lora_up)   # (..., in) -> (..., r) -> (..., out)
        return torch.add(y, h, alpha=self.scale)   # y + scale * h without a temporary

    def delta_weight(self):
        """scale * B @ A in the base weight's shape: (out, in) or (out, in, 1, 1)."""
        up, down = self.lora_up.flatten(1), self.lora_down.flatten(1)
        return (self.scale * up @ down).view_as(self.base.weight).to(self.base.weight.dtype)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False


def _matches(name, patterns):
    return any(name == p or name.endswith("." + p) for p in patterns)


def _set_submodule(root, name, module):
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def inject_lora(root, patterns, rank, alpha, dropout=0.0, generator=None):
    """Replace every Linear / 1x1 Conv2d of `root` whose name matches a pattern by a LoRALayer.
    Freezes nothing itself (the caller decides what trains). Returns the injected module names."""
    names = [name for name, module in root.named_modules()
             if _matches(name, patterns) and isinstance(module, (nn.Linear, nn.Conv2d))]
    if not names:
        raise UserError(f"no module of {type(root).__name__} matches the LoRA targets {list(patterns)}")
    for name in names:
        _set_submodule(root, name, LoRALayer(root.get_submodule(name), rank, alpha, dropout, generator))
    return names


def lora_layers(root):
    """[(name, LoRALayer)] in module order."""
    return [(name, module) for name, module in root.named_modules() if isinstance(module, LoRALayer)]


def lora_parameters(root):
    return [param for _, layer in lora_layers(root) for param in (layer.lora_down, layer.lora_up)]


def merge_lora(root):
    """Fold scale * B @ A into every base weight: inference then costs exactly the base model."""
    for _, layer in lora_layers(root):
        layer.merge()


def unmerge_lora(root):
    """Undo merge_lora (W - delta; equal to the original W up to float rounding)."""
    for _, layer in lora_layers(root):
        layer.unmerge()


def lora_state(unet, text_encoder=None):
    """The canonical state dict of every LoRA layer in the UNet (and text encoder), on CPU."""
    state = {}
    for comp, root in (("unet", unet), ("text_encoder", text_encoder)):
        for name, layer in lora_layers(root) if root is not None else []:
            state[f"{comp}.{name}.lora_down.weight"] = layer.lora_down.detach().cpu()
            state[f"{comp}.{name}.lora_up.weight"] = layer.lora_up.detach().cpu()
            state[f"{comp}.{name}.alpha"] = torch.tensor(layer.alpha)
    return state


def _modules(state):
    """{(component, module): (down, up, alpha)} from a canonical state."""
    out = {}
    for key, down in state.items():
        if key.endswith(".lora_down.weight"):
            comp, _, mod = key[: -len(".lora_down.weight")].partition(".")
            up = state[f"{comp}.{mod}.lora_up.weight"]
            out[comp, mod] = (down, up, float(state.get(f"{comp}.{mod}.alpha", down.shape[0])))
    return out


def _flat(comp, name):
    """Comparison key for a module name: dots == underscores, `text_model.` prefix optional
    (transformers >= 5 dropped that wrapper from CLIPTextModel; files keep it)."""
    name = name.replace(".", "_")
    return name.removeprefix("text_model_") if comp == "text_encoder" else name


# ------------------------------------------------------------------ a file's weights into a model

def inject_lora_weights(unet, text_encoder, state):
    """Inject LoRA layers holding the weights of `state` (a canonical state, e.g. from
    model.lora.files.load_lora) into the UNet / text encoder; `inject_lora` makes fresh ones.

    All names and shapes are checked before the model is touched: a LoRA for another base model
    is a UserError naming the first module that does not fit. Returns {component: [module names]}.
    """
    roots = {"unet": unet, "text_encoder": text_encoder}
    plan, done = [], {c: [] for c in COMPONENTS}
    for (comp, mod), (down, up, alpha) in _modules(state).items():
        root = roots.get(comp)
        if root is None:
            raise UserError(f"the LoRA has {comp} weights but no {comp} was given to apply them to")
        lookup = {_flat(comp, name): name for name, module in root.named_modules()
                  if isinstance(module, (nn.Linear, nn.Conv2d, LoRALayer))}
        name = lookup.get(_flat(comp, mod))
        if name is None:
            raise UserError(f"LoRA module {comp}.{mod} does not exist in the base model "
                            "(is this LoRA for a different base model?)")
        base = root.get_submodule(name)
        if isinstance(base, LoRALayer):
            raise UserError(f"{comp}.{name} already has a LoRA applied")
        rank = down.shape[0]
        fan_in, fan_out = ((base.in_channels, base.out_channels) if isinstance(base, nn.Conv2d)
                           else (base.in_features, base.out_features))
        if down.flatten(1).shape != (rank, fan_in) or up.flatten(1).shape != (fan_out, rank):
            raise UserError(f"LoRA does not fit the base model at {comp}.{name}: lora_down "
                            f"{tuple(down.shape)} / lora_up {tuple(up.shape)}, but the layer's weight "
                            f"is {tuple(base.weight.shape)} (is this LoRA for a different base model?)")
        plan.append((comp, root, name, base, down, up, alpha))
    for comp, root, name, base, down, up, alpha in plan:
        layer = LoRALayer(base, down.shape[0], alpha)
        with torch.no_grad():
            layer.lora_down.copy_(down.reshape(layer.lora_down.shape))
            layer.lora_up.copy_(up.reshape(layer.lora_up.shape))
        _set_submodule(root, name, layer)
        done[comp].append(name)
    return done
