"""LoRA files: the in-memory "state" dict and its two on-disk safetensors layouts.

In memory a LoRA is a flat "state" dict keyed `<component>.<module>.lora_down.weight`,
`.lora_up.weight` and `.alpha` (0-d), component "unet" or "text_encoder". On disk it is
safetensors in one of two layouts:
  kohya      (the default) `lora_unet_<module_with_underscores>.lora_down.weight` /
             `.lora_up.weight` / `.alpha` (`lora_te_` for the text encoder): ComfyUI, A1111 and
             diffusers' `load_lora_weights` all read every key of it;
  diffusers  `unet.<module>.lora_A.weight` / `.lora_B.weight` (PEFT names), rank and alpha in the
             `lora_adapter_metadata` header, which diffusers and peft read; ComfyUI drops its UNet
             keys and ignores that header's alpha.
Loading also takes bare PEFT keys (`lora_A`/`lora_B`, optional `base_model.model.` prefix) and the
older diffusers `.lora.down`/`.lora.up` names.
"""
import json
import re
from collections import Counter

import torch

from model.io import UserError, read_safetensors, save_safetensors
from model.lora.layers import COMPONENTS, _modules

FORMATS = ("kohya", "diffusers")
META_KEY = "medsynth"                       # our run settings, JSON, in the safetensors header
DIFFUSERS_META_KEY = "lora_adapter_metadata"
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}

def _file_name(comp, mod):
    """Text-encoder names go to files with the `text_model.` prefix that diffusers and kohya expect."""
    if comp == "text_encoder" and not mod.startswith("text_model"):
        return "text_model." + mod
    return mod


def _peft_config(entries):
    """LoraConfig kwargs (what diffusers reads from `lora_adapter_metadata`) for
    {module: (rank, alpha)}: the most common rank / alpha, plus per-module patterns for the others."""
    rank = Counter(r for r, _ in entries.values()).most_common(1)[0][0]
    alpha = Counter(a for _, a in entries.values()).most_common(1)[0][0]
    return {"r": rank, "lora_alpha": alpha, "target_modules": sorted(entries),
            "rank_pattern": {module: r for module, (r, _) in entries.items() if r != rank},
            "alpha_pattern": {module: a for module, (_, a) in entries.items() if a != alpha}}


def save_lora(path, state, fmt="kohya", metadata=None):
    """Write a canonical state as `fmt` ("kohya" | "diffusers") safetensors, atomically.
    `metadata` (run settings: JSON-able dict) goes to the header under "medsynth"."""
    if fmt not in FORMATS:
        raise UserError(f"--lora-format must be one of {FORMATS}, got {fmt!r}")
    tensors, header, peft = {}, {}, {c: {} for c in COMPONENTS}
    for (comp, mod), (down, up, alpha) in _modules(state).items():
        name = _file_name(comp, mod)
        if fmt == "diffusers" and "." not in mod:
            raise UserError(f"{comp}.{mod}: a kohya-style flattened name cannot be written in diffusers "
                            "format; inject it into its model (inject_lora_weights) and save lora_state(...) instead")
        if fmt == "diffusers":
            tensors[f"{comp}.{name}.lora_A.weight"] = down
            tensors[f"{comp}.{name}.lora_B.weight"] = up
            # PEFT matches target_modules by suffix, so dropping `text_model.` fits either CLIP layout.
            peft[comp][name.removeprefix("text_model.")] = (down.shape[0], alpha)
        else:
            key = KOHYA_PREFIX[comp] + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    if fmt == "diffusers":
        packed = {f"{comp}.{k}": v for comp in COMPONENTS if peft[comp]
                  for k, v in _peft_config(peft[comp]).items()}
        header[DIFFUSERS_META_KEY] = json.dumps(packed, sort_keys=True)
        header["format"] = "pt"
    else:
        ranks = {t.shape[0] for key, t in tensors.items() if key.endswith("lora_down.weight")}
        alphas = {float(t) for key, t in tensors.items() if key.endswith(".alpha")}
        header.update(ss_network_module="networks.lora", ss_network_dim=str(max(ranks)),
                      ss_network_alpha=str(max(alphas)))
    if metadata is not None:
        header[META_KEY] = json.dumps(metadata)
    save_safetensors(path, tensors, header)


_PEFT = re.compile(r"^(?P<mod>.+?)\.(?:lora_(?P<ab>[AB])(?:\.[\w-]+)?|lora\.(?P<du>down|up)"
                   r"|lora_linear_layer\.(?P<du2>down|up))\.weight$")
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


def _component_of(key):
    """Split `unet.x`/`text_encoder.x`; bare PEFT keys are text encoder if they look like CLIP."""
    for comp in COMPONENTS:
        if key.startswith(comp + "."):
            return comp, key[len(comp) + 1:]
    is_text = key.startswith(("text_model.", "encoder.layers."))
    return ("text_encoder" if is_text else "unet"), key


def _from_kohya(tensors):
    state = {}
    for key, t in tensors.items():
        prefix, comp = next(((p, c) for c, p in KOHYA_PREFIX.items() if key.startswith(p)), (None, None))
        if comp is None:
            raise UserError(f"unrecognised key {key!r} in a kohya-format LoRA (SD1/SD2 only)")
        mod, _, suffix = key[len(prefix):].partition(".")
        if suffix not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise UserError(f"unrecognised key {key!r} in a kohya-format LoRA (e.g. DoRA / LoCon)")
        state[f"{comp}.{mod}.{suffix}"] = t.float() if suffix == "alpha" else t
    return state


def _header_json(header, key, path):
    try:
        return json.loads(header.get(key) or "{}")
    except json.JSONDecodeError:
        raise UserError(f"{path}: the '{key}' header is not valid JSON") from None


def _from_peft(tensors, config):
    """diffusers / PEFT names -> canonical. Alpha from diffusers' header `config`, else alpha = rank."""
    state = {}
    for key, t in tensors.items():
        key = key.removeprefix("base_model.model.")
        key = _PROCESSOR.sub(lambda hit: f".{hit[1]}{'.0' if hit[1] == 'to_out' else ''}.lora.{hit[2]}.weight",
                             key)
        comp, rest = _component_of(key)
        hit = _PEFT.match(rest)
        if hit is None:
            raise UserError(f"unrecognised LoRA key {key!r}")
        mod = hit["mod"]
        part = "lora_down" if (hit["ab"] == "A" or "down" in (hit["du"], hit["du2"])) else "lora_up"
        state[f"{comp}.{mod}.{part}.weight"] = t
        if part == "lora_down":
            short = mod.removeprefix("text_model.")
            alpha = config.get(f"{comp}.lora_alpha", t.shape[0])
            # PEFT's pattern rule: a key matches a module name it ends with, at a "." boundary
            patterns = config.get(f"{comp}.alpha_pattern", {}).items()
            alpha = next((a for pat, a in patterns if re.fullmatch(rf"(.*\.)?(?:{pat})", short)), alpha)
            state[f"{comp}.{mod}.alpha"] = torch.tensor(float(alpha))
    return state


def load_lora(path):
    """Read a LoRA .safetensors in any supported layout -> (canonical state, run settings dict).
    The run settings are what `save_lora` stored (empty for files from other tools)."""
    tensors, header = read_safetensors(path)
    if any("dora_scale" in k or "magnitude" in k for k in tensors):
        raise UserError(f"{path}: DoRA LoRAs are not supported")
    if not tensors:
        raise UserError(f"{path}: contains no tensors")
    if all(k.startswith(tuple(KOHYA_PREFIX.values())) for k in tensors):
        state = _from_kohya(tensors)
    else:
        state = _from_peft(tensors, _header_json(header, DIFFUSERS_META_KEY, path))
    for key in state:
        if key.endswith(".lora_down.weight") and key.replace("lora_down", "lora_up") not in state:
            raise UserError(f"{path}: {key} has no matching lora_up weight")
    return state, _header_json(header, META_KEY, path)
