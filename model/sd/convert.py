"""Original single-file Stable Diffusion checkpoints (CompVis / Stability layout) -> diffusers names.

A `v1-5-pruned.safetensors` or `v2-1_768-ema-pruned.safetensors` holds all three networks under
one prefix each: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and the text
encoder, `cond_stage_model.transformer.*` (SD1.x: OpenAI CLIP ViT-L/14, already in transformers'
layout) or `cond_stage_model.model.*` (SD2.x: OpenCLIP ViT-H/14, fused q/k/v). `convert_key` maps
one original key to the diffusers/transformers key(s) with a few string rules; `configs_from_shapes`
rebuilds the configs the file does not carry: the published SD1.5 / SD2.1 ones, with every
width, depth and block type read from the tensor shapes (so smaller models of the same family load).

What shapes cannot tell, and the published models fix: GroupNorm uses 32 groups; attention heads
are 8 per UNet block in SD1.x and 64 channels wide in SD2.x and in both text encoders; and whether
an SD2.x model predicts epsilon (512-px "base") or v (768-px): that is the caller's
`prediction_type` (default epsilon).
"""
import re

SD_SCHEDULER = {  # scheduler/scheduler_config.json of stable-diffusion-v1-5 (a PNDM config: same betas)
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "clip_sample": False,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "prediction_type": "epsilon", "trained_betas": None,
}
SD15_UNET = {  # unet/config.json of stable-diffusion-v1-5
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32, "out_channels": 4,
    "sample_size": 64, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
SD21_UNET = {**SD15_UNET,  # unet/config.json of stable-diffusion-2-1 (768-v)
             "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "sample_size": 96,
             "upcast_attention": True, "use_linear_projection": True}
SD_VAE = {  # vae/config.json of stable-diffusion-v1-5 (2-1: sample_size 768, same weights shapes)
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "scaling_factor": 0.18215,
}
SD15_TEXT = {  # text_encoder/config.json of stable-diffusion-v1-5 (CLIP ViT-L/14 text tower)
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2,
    "pad_token_id": 1,
}
# OpenCLIP ViT-H/14 has 24 blocks; SD2 conditions on the penultimate one, so diffusers (and we)
# keep 23 and apply the final LayerNorm after block 23, as the original FrozenOpenCLIPEmbedder does.
SD21_TEXT = {**SD15_TEXT, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
             "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512}

UNET, VAE, CLIP, OPENCLIP = ("model.diffusion_model.", "first_stage_model.",
                             "cond_stage_model.transformer.", "cond_stage_model.model.")
IGNORED = ("model_ema.", "cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale")

RESNET_RULES = [  # ldm ResBlock (nn.Sequential indices) -> diffusers ResnetBlock2D
    ("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."),
    ("nin_shortcut.", "conv_shortcut."),  # the VAE's ResnetBlock names it this way
]
UNET_RULES = [("time_embed.0.", "time_embedding.linear_1."),
              ("time_embed.2.", "time_embedding.linear_2."), ("input_blocks.0.0.", "conv_in."),
              ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
VAE_ATTN_RULES = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                  ("proj_out.", "to_out.0.")]
OPENCLIP_FIXED = {"token_embedding.weight": "embeddings.token_embedding.weight",
                  "positional_embedding": "embeddings.position_embedding.weight"}
OPENCLIP_RULES = [("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."),
                  ("mlp.c_proj.", "mlp.fc2."), ("attn.out_proj.", "self_attn.out_proj.")]


def _replace_prefix(rest, rules):
    """`rest` with its prefix swapped by the first rule whose `old` it starts with (else as is)."""
    for old, new in rules:
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def identity(t):
    return t


def _conv1x1_to_linear(t):
    return t.reshape(t.shape[0], t.shape[1])  # (out, in, 1, 1) -> (out, in)


def _qkv(part):
    # OpenCLIP's nn.MultiheadAttention stacks q, k, v along dim 0: in_proj_weight (3D, D)
    return lambda t: t.chunk(3, dim=0)[part]


def _unet_key(key, layers):
    """ldm UNetModel key (prefix removed) -> diffusers UNet2DConditionModel key.

    ldm numbers its blocks flat: input_blocks.0 is conv_in, then each resolution level has
    `layers` (resnet[, transformer]) blocks and, except the last, one downsampler block; the
    decoder side mirrors it with `layers + 1` blocks per level and the upsampler inside the last.
    A block `input_blocks.{block}.{part}` holds its resnet at part 0 and its transformer at 1.
    """
    if (new := _replace_prefix(key, UNET_RULES)) != key:
        return new
    if match := re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", key):
        block, part, rest = int(match[1]), int(match[2]), match[3]
        level, layer = divmod(block - 1, layers + 1)
        if rest.startswith("op."):
            return f"down_blocks.{level}.downsamplers.0.conv.{rest[3:]}"
        return (f"down_blocks.{level}.resnets.{layer}.{_replace_prefix(rest, RESNET_RULES)}" if part == 0
                else f"down_blocks.{level}.attentions.{layer}.{rest}")
    if match := re.fullmatch(r"middle_block\.(\d+)\.(.+)", key):
        part, rest = int(match[1]), match[2]  # resnet, transformer, resnet
        return (f"mid_block.attentions.0.{rest}" if part == 1
                else f"mid_block.resnets.{part // 2}.{_replace_prefix(rest, RESNET_RULES)}")
    if match := re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", key):
        block, part, rest = int(match[1]), int(match[2]), match[3]
        level, layer = divmod(block, layers + 1)
        if part > 0 and rest.startswith("conv."):  # the Upsample module: part 1, or 2 after attention
            return f"up_blocks.{level}.upsamplers.0.{rest}"
        return (f"up_blocks.{level}.resnets.{layer}.{_replace_prefix(rest, RESNET_RULES)}" if part == 0
                else f"up_blocks.{level}.attentions.{layer}.{rest}")
    return key  # unknown: left as is, so loading reports it as an unexpected key


def _vae_key(key, levels):
    """ldm AutoencoderKL key (prefix removed) -> (diffusers key, transform). The ldm decoder
    numbers its levels from the lowest resolution up (`up.0` runs last); diffusers in run order."""
    key = key.replace("norm_out.", "conv_norm_out.")
    if match := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(.+)", key):
        rest = _replace_prefix(match[2], VAE_ATTN_RULES)
        # ldm's AttnBlock projects with 1x1 convs, diffusers' Attention with nn.Linear
        linear = rest.endswith(".weight") and not rest.startswith("group_norm.")
        return f"{match[1]}.mid_block.attentions.0.{rest}", _conv1x1_to_linear if linear else identity
    if match := re.fullmatch(r"(encoder|decoder)\.mid\.block_(\d)\.(.+)", key):
        resnet = int(match[2]) - 1
        return f"{match[1]}.mid_block.resnets.{resnet}.{_replace_prefix(match[3], RESNET_RULES)}", identity
    if match := re.fullmatch(r"encoder\.down\.(\d+)\.(block\.(\d+)|downsample)\.(.+)", key):
        level, resnet, rest = match[1], match[3], match[4]
        if resnet is None:
            return f"encoder.down_blocks.{level}.downsamplers.0.{rest}", identity
        return f"encoder.down_blocks.{level}.resnets.{resnet}.{_replace_prefix(rest, RESNET_RULES)}", identity
    if match := re.fullmatch(r"decoder\.up\.(\d+)\.(block\.(\d+)|upsample)\.(.+)", key):
        level, resnet, rest = levels - 1 - int(match[1]), match[3], match[4]
        if resnet is None:
            return f"decoder.up_blocks.{level}.upsamplers.0.{rest}", identity
        return f"decoder.up_blocks.{level}.resnets.{resnet}.{_replace_prefix(rest, RESNET_RULES)}", identity
    return key, identity


def _openclip_key(key, layers):
    """OpenCLIP text tower key (prefix removed) -> [(transformers CLIPTextModel key, transform)]."""
    if key in OPENCLIP_FIXED:
        return [(OPENCLIP_FIXED[key], identity)]
    if key.startswith("ln_final."):
        return [("final_layer_norm." + key[len("ln_final."):], identity)]
    match = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key)
    if not match:
        return [(key, identity)]
    block, rest = int(match[1]), match[2]
    if block >= layers:  # the last block: SD2 reads the penultimate layer's output
        return []
    prefix = f"encoder.layers.{block}."
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = rest.rsplit("_", 1)[1]
        return [(f"{prefix}self_attn.{name}_proj.{kind}", _qkv(i)) for i, name in enumerate("qkv")]
    return [(prefix + _replace_prefix(rest, OPENCLIP_RULES), identity)]


def convert_key(key, unet_config, vae_config, text_config):
    """One original key -> [(component, diffusers key, transform)]; [] for keys we ignore: EMA
    copies, the DDPM schedule buffers (`betas`, `alphas_cumprod`, ...: top-level, no dot),
    `position_ids`, and OpenCLIP's projection head. Text keys come without transformers'
    `text_model.` prefix, which the loader adds when the installed transformers uses it."""
    if "." not in key or key.startswith(IGNORED) or key.endswith("position_ids"):
        return []
    if key.startswith(UNET):
        return [("unet", _unet_key(key[len(UNET):], unet_config["layers_per_block"]), identity)]
    if key.startswith(VAE):
        new, transform = _vae_key(key[len(VAE):], len(vae_config["block_out_channels"]))
        return [("vae", new, transform)]
    if key.startswith(CLIP):
        return [("text_encoder", key[len(CLIP):].removeprefix("text_model."), identity)]
    if key.startswith(OPENCLIP):
        return [("text_encoder", new, transform)
                for new, transform in _openclip_key(key[len(OPENCLIP):], text_config["num_hidden_layers"])]
    return [("file", key, identity)]  # not part of SD: reported as an unexpected key


class _Under(dict):
    """The shapes under one key prefix, prefix removed; a missing key is reported in full."""

    def __init__(self, shapes, prefix):
        super().__init__((k[len(prefix):], s) for k, s in shapes.items() if k.startswith(prefix))
        self.prefix = prefix

    def __missing__(self, key):
        raise KeyError(self.prefix + key)


def _count(shapes, pattern):
    """Number of distinct values of the first group of `pattern` among the keys."""
    return len({m[1] for k in shapes if (m := re.fullmatch(pattern, k))})


def configs_from_shapes(shapes):
    """{key: shape} of an original checkpoint -> (kind, unet, vae, text_encoder config dicts).
    Raises ValueError saying what is missing if the file is not an SD1.x/SD2.x checkpoint."""
    if not any(k.startswith(UNET) for k in shapes):
        raise ValueError("not an original Stable Diffusion 1.x/2.x checkpoint "
                         "(no model.diffusion_model.* keys; for a diffusers model pass its folder)")
    try:
        kind, text = _text_config(shapes)
        return kind, _unet_config(shapes, kind, text), _vae_config(shapes, kind), text
    except KeyError as e:
        raise ValueError(f"expected key {e.args[0]} is missing") from None


def _text_config(shapes):
    if any(k.startswith(CLIP) for k in shapes):
        kind, text = "sd1", dict(SD15_TEXT)
        base = CLIP + ("text_model." if any(k.startswith(CLIP + "text_model.") for k in shapes) else "")
        tok = base + "embeddings.token_embedding.weight"
        pos = base + "embeddings.position_embedding.weight"
        fc1 = base + "encoder.layers.0.mlp.fc1.weight"
        text["num_hidden_layers"] = _count(shapes, re.escape(base) + r"encoder\.layers\.(\d+)\..+")
    elif any(k.startswith(OPENCLIP) for k in shapes):
        kind, text = "sd2", dict(SD21_TEXT)
        tok, pos = OPENCLIP + "token_embedding.weight", OPENCLIP + "positional_embedding"
        fc1 = OPENCLIP + "transformer.resblocks.0.mlp.c_fc.weight"
        blocks = _count(shapes, re.escape(OPENCLIP) + r"transformer\.resblocks\.(\d+)\..+")
        text["num_hidden_layers"] = blocks - 1  # the penultimate block's output, see SD21_TEXT
    else:
        raise ValueError("has no text encoder (cond_stage_model.transformer.* keys for SD1.x, "
                         "cond_stage_model.model.* for SD2.x)")
    vocab, width = shapes[tok]
    text.update(vocab_size=vocab, hidden_size=width, max_position_embeddings=shapes[pos][0],
                intermediate_size=shapes[fc1][0], num_attention_heads=max(1, width // 64))
    return kind, text


def _unet_config(shapes, kind, text):
    under = _Under(shapes, UNET)  # the UNet's shapes by ldm key
    levels = _count(under, r"input_blocks\.(\d+)\.0\.op\.weight") + 1
    layers = _count(under, r"input_blocks\.(\d+)\..+") // levels - 1  # minus the downsampler block
    first = [1 + b * (layers + 1) for b in range(levels)]  # first input block of each level
    widths = [under[f"input_blocks.{i}.0.in_layers.2.weight"][0] for i in first]
    cross = [shape[1] for key, shape in under.items() if key.endswith("attn2.to_k.weight")]
    unet = dict(SD15_UNET if kind == "sd1" else SD21_UNET)
    unet.update(
        in_channels=under["input_blocks.0.0.weight"][1], out_channels=under["out.2.weight"][0],
        layers_per_block=layers, block_out_channels=widths,
        down_block_types=["CrossAttnDownBlock2D" if f"input_blocks.{i}.1.proj_in.weight" in under
                          else "DownBlock2D" for i in first],
        up_block_types=["CrossAttnUpBlock2D" if f"output_blocks.{b * (layers + 1)}.1.proj_in.weight" in under
                        else "UpBlock2D" for b in range(levels)],
        cross_attention_dim=cross[0] if cross else text["hidden_size"],
        # SD2 swapped the transformer's 1x1-conv proj_in/proj_out for nn.Linear
        use_linear_projection=len(under.get("middle_block.1.proj_in.weight", ())) == 2,
    )
    if kind == "sd2":
        unet["attention_head_dim"] = [max(1, w // 64) for w in widths]  # head counts, 64 channels each
    if unet["cross_attention_dim"] != text["hidden_size"]:
        raise ValueError(f"the UNet's cross-attention width {unet['cross_attention_dim']} does not "
                         f"match the text encoder's width {text['hidden_size']}")
    return unet


def _vae_config(shapes, kind):
    under = _Under(shapes, VAE)  # the VAE's shapes by ldm key
    if not under:
        raise ValueError("has no VAE (first_stage_model.* keys)")
    levels = _count(under, r"encoder\.down\.(\d+)\..+")
    return dict(
        SD_VAE, sample_size=512 if kind == "sd1" else 768,
        in_channels=under["encoder.conv_in.weight"][1], out_channels=under["decoder.conv_out.weight"][0],
        latent_channels=under["post_quant_conv.weight"][0],
        block_out_channels=[under[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)],
        layers_per_block=_count(under, r"encoder\.down\.0\.block\.(\d+)\..+"),
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
    )
