"""Test-side inverse converter: diffusers / transformers state dicts -> one original (CompVis /
Stability) single-file checkpoint, as `v1-5-pruned.safetensors` or `v2-1_768-ema-pruned.safetensors`
lay it out.

Written independently of model/convert.py, the other way round: explicit prefix tables built
by walking the diffusers config (as diffusers' convert_diffusers_to_original_stable_diffusion.py
script does), instead of string rules on the original names. If both agree, loading the file we write
here reproduces the diffusers models.
"""
import torch

RESNET = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."),
          ("time_emb_proj.", "emb_layers.1."), ("norm2.", "out_layers.0."),
          ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection.")]


def _apply(key, prefixes, inner=()):
    """Replace the longest matching diffusers prefix, then the first matching inner name."""
    for old in sorted(prefixes, key=len, reverse=True):
        if key.startswith(old):
            rest = key[len(old):]
            for a, b in inner:
                if rest.startswith(a):
                    rest = b + rest[len(a):]
                    break
            return prefixes[old] + rest
    return key


def unet_to_original(state, config):
    n, L = len(config["block_out_channels"]), config["layers_per_block"]
    blocks = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
              "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
              "mid_block.attentions.0.": "middle_block.1."}
    resnets = {"mid_block.resnets.0.": "middle_block.0.", "mid_block.resnets.1.": "middle_block.2."}
    for b in range(n):
        for k in range(L):
            i = b * (L + 1) + k + 1
            resnets[f"down_blocks.{b}.resnets.{k}."] = f"input_blocks.{i}.0."
            blocks[f"down_blocks.{b}.attentions.{k}."] = f"input_blocks.{i}.1."
        if b < n - 1:
            blocks[f"down_blocks.{b}.downsamplers.0.conv."] = f"input_blocks.{(b + 1) * (L + 1)}.0.op."
        for k in range(L + 1):
            i = b * (L + 1) + k
            resnets[f"up_blocks.{b}.resnets.{k}."] = f"output_blocks.{i}.0."
            blocks[f"up_blocks.{b}.attentions.{k}."] = f"output_blocks.{i}.1."
        if b < n - 1:
            slot = 2 if config["up_block_types"][b] == "CrossAttnUpBlock2D" else 1
            blocks[f"up_blocks.{b}.upsamplers.0.conv."] = f"output_blocks.{b * (L + 1) + L}.{slot}.conv."
    out = {}
    for key, value in state.items():
        if any(key.startswith(p) for p in resnets):
            new = _apply(key, resnets, RESNET)
        else:
            new = _apply(key, blocks)
        out["model.diffusion_model." + new] = value
    return out


def vae_to_original(state, config):
    n = len(config["block_out_channels"])
    prefixes = {"encoder.conv_norm_out.": "encoder.norm_out.",
                "decoder.conv_norm_out.": "decoder.norm_out."}
    for side in ("encoder", "decoder"):
        prefixes[f"{side}.mid_block.resnets.0."] = f"{side}.mid.block_1."
        prefixes[f"{side}.mid_block.resnets.1."] = f"{side}.mid.block_2."
        for a, b in [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                     ("to_out.0.", "proj_out.")]:
            prefixes[f"{side}.mid_block.attentions.0.{a}"] = f"{side}.mid.attn_1.{b}"
    for i in range(n):
        prefixes[f"encoder.down_blocks.{i}.resnets."] = f"encoder.down.{i}.block."
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        prefixes[f"decoder.up_blocks.{i}.resnets."] = f"decoder.up.{n - 1 - i}.block."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{n - 1 - i}.upsample."
    out = {}
    for key, value in state.items():
        new = _apply(key, prefixes).replace("conv_shortcut.", "nin_shortcut.")
        if ".mid.attn_1." in new and new.endswith(".weight") and ".norm." not in new:
            value = value[:, :, None, None]  # linear (o, i) -> the original 1x1 conv (o, i, 1, 1)
        out["first_stage_model." + new] = value
    return out


def clip_to_original(state):
    """SD1.x: transformers CLIPTextModel, stored under cond_stage_model.transformer.text_model."""
    out = {"cond_stage_model.transformer." + "text_model." + k.removeprefix("text_model."): v
           for k, v in state.items()}
    pos = out["cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"]
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = \
        torch.arange(pos.shape[0])[None]  # released SD1 files still carry this buffer
    return out


def openclip_to_original(state, generator):
    """SD2.x: OpenCLIP layout, fused q/k/v, plus a last block (and projection head) that SD2
    does not use: filled with random numbers, loading must ignore them."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers."))
    width = state["embeddings.token_embedding.weight"].shape[1]
    p = "cond_stage_model.model."
    out = {p + "token_embedding.weight": state["embeddings.token_embedding.weight"],
           p + "positional_embedding": state["embeddings.position_embedding.weight"],
           p + "ln_final.weight": state["final_layer_norm.weight"],
           p + "ln_final.bias": state["final_layer_norm.bias"],
           p + "text_projection": torch.randn(width, 8, generator=generator),
           p + "logit_scale": torch.tensor(4.6)}
    names = [("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
             ("mlp.fc2.", "mlp.c_proj."), ("self_attn.out_proj.", "attn.out_proj.")]
    for i in range(layers + 1):
        src, dst = f"encoder.layers.{min(i, layers - 1)}.", f"{p}transformer.resblocks.{i}."
        block = {}
        for a, b in names:
            for end in ("weight", "bias"):
                block[dst + b + end] = state[src + a + end]
        for end in ("weight", "bias"):
            block[dst + "attn.in_proj_" + end] = torch.cat(
                [state[f"{src}self_attn.{q}_proj.{end}"] for q in "qkv"], dim=0)
        if i == layers:  # the unused 24th block: random, so using it would change the output
            block = {k: torch.randn(v.shape, generator=generator) for k, v in block.items()}
        out.update(block)
    return out


def to_original(unet_state, unet_config, vae_state, vae_config, text_state, kind, seed=0):
    """All three networks -> one original checkpoint dict, with the extras real files carry:
    DDPM schedule buffers and EMA bookkeeping at the top level (ignored by loaders)."""
    generator = torch.Generator().manual_seed(seed)
    out = {**unet_to_original(unet_state, unet_config), **vae_to_original(vae_state, vae_config)}
    out.update(clip_to_original(text_state) if kind == "sd1"
               else openclip_to_original(text_state, generator))
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    out.update(betas=betas, alphas_cumprod=torch.cumprod(1 - betas, 0))
    out["model_ema.decay"] = torch.tensor(0.9999)
    out["model_ema.num_updates"] = torch.tensor(1000)
    out["model_ema.diffusion_modelconv_inweight"] = torch.zeros(1)  # EMA keys drop their dots
    return out
