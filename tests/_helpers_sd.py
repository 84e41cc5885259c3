"""Stable Diffusion configs shared by the tests: tiny ones to build random models fast, and the
real published SD1.5 / SD2.1 ones for reference (never instantiate those in a test: ~1 GB).

Tiny configs keep every architectural feature of the real ones (cross-attention and plain blocks,
>1 resnet per block so channel-changing `conv_shortcut`s exist, 3 resolutions so down/up
samplers run, GroupNorm with several groups) but use channel widths of 32-64.
"""


def tiny_unet_config(kind="sd1"):
    """diffusers UNet2DConditionModel config dict: "sd1" = conv proj + a fixed 8 heads, "sd2" =
    linear proj + per-block head counts (diffusers reads `attention_head_dim` as head *count*)
    + upcast_attention as SD2.1 (768-v) has it."""
    if kind not in ("sd1", "sd2"):
        raise ValueError(f"kind must be 'sd1' or 'sd2', got {kind!r}")
    cfg = {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "block_out_channels": [32, 64, 64],
        "center_input_sample": False,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-5,
        "norm_num_groups": 8,
        "sample_size": 8,
    }
    if kind == "sd1":
        cfg.update(attention_head_dim=8, cross_attention_dim=32)
    else:
        cfg.update(attention_head_dim=[2, 4, 4], cross_attention_dim=48,
                   use_linear_projection=True, upcast_attention=True)
    return cfg


def tiny_vae_config():
    """diffusers AutoencoderKL config dict: 3 resolutions (x4 down), 2 layers per block."""
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [32, 64, 64],
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 8,
        "sample_size": 32,
        "scaling_factor": 0.18215,
    }


def tiny_clip_config(kind="sd1"):
    """transformers CLIPTextConfig kwargs whose hidden_size == the tiny unet's cross_attention_dim.
    Vocab and positions are the real CLIP ones so the real tokenizer's ids fit."""
    hidden = tiny_unet_config(kind)["cross_attention_dim"]
    return {
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "hidden_act": "quick_gelu" if kind == "sd1" else "gelu",
        "projection_dim": hidden,
        "layer_norm_eps": 1e-5,
        "pad_token_id": 1,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
    }


def sd15_unet_config():
    """unet/config.json of stable-diffusion-v1-5 as published (860M parameters)."""
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.6.0",
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                             "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                           "CrossAttnUpBlock2D"],
    }


def sd15_vae_config():
    """vae/config.json of stable-diffusion-v1-5 as published. It has no `scaling_factor` key:
    that config predates it, and the default 0.18215 applies."""
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.6.0",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 512,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }


def sd21_unet_config():
    """unet/config.json of stable-diffusion-2-1 (768-v) as published: 5/10/20/20 heads of dim 64."""
    cfg = sd15_unet_config()
    cfg.update({
        "_diffusers_version": "0.10.0.dev0",
        "attention_head_dim": [5, 10, 20, 20],
        "cross_attention_dim": 1024,
        "dual_cross_attention": False,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "sample_size": 96,
        "upcast_attention": True,
        "use_linear_projection": True,
    })
    return cfg


def diffusers_kwargs(cfg):
    """A config dict minus the `_`-prefixed bookkeeping keys, ready for diffusers' constructors."""
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def relative_error(got, want):
    """max |got - want| / max |want|: a parity error on the output's own scale. Float32 rounding
    grows with the values, and its last bits differ between CPUs (other kernels, other summation
    orders), so parity bounds are set relative to the output with a margin, never in absolute
    terms. A wrong weight, eps or missing layer is off by 1e-2 .. 1e-1 relative."""
    got, want = got.float(), want.float()
    return ((got - want).abs().max() / want.abs().max()).item()
