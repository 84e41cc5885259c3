"""What medsynth-mini is: its network configs (diffusers config.json contents) and the recipe
that trains it. Presets are instances of `PretrainRecipe`; pretrain.py maps flags onto one.

Sizes. 32 px images (the 28 px PathMNIST images reflect-padded by 2 px a side, the size path of
model/data.py: a size the VAE's levels divide evenly, reached without resampling), a VAE that
downsamples `vae_factor`x per side into `latent_channels` channels, so the UNet works on
(C, 32 / f, 32 / f) latents. The whole folder stays under 50 MB in float32.
"""
from dataclasses import dataclass

from model.sd.tiny import DIFFUSERS_VERSION, TINY_CLIP, TINY_SCHEDULER

GENERIC_CAPTION = "an H&E stained histopathology image"

MINI_VAE = {
    "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
    "in_channels": 3, "out_channels": 3, "layers_per_block": 1, "norm_num_groups": 16, "sample_size": 32,
    "scaling_factor": 1.0,  # replaced by the measured 1 / std of the training latents
}
MINI_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
    "act_fn": "silu", "attention_head_dim": 8, "center_input_sample": False, "cross_attention_dim": 64,
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "layers_per_block": 1,
    "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32,
}
# The VAE factor fixes both networks' levels. The VAE halves the side at every level but the last.
# The UNet keeps cross-attention at 8x8 and 4x4 latents either way, where it is cheap, and the
# factor-2 UNet adds a plain level in front at 16x16, so its cost stays within about 1.4x.
LEVELS = {
    4: {"vae": [32, 64, 64],  # 32 -> 16 -> 8 px
        "unet": [64, 96, 128],  # (C, 8, 8) -> 8x8 and 4x4 with cross-attention -> 2x2 without
        "down": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]},
    2: {"vae": [32, 64],  # 32 -> 16 px
        "unet": [32, 64, 96, 128],  # (C, 16, 16) -> 16x16 plain -> 8x8, 4x4 cross-attention -> 2x2 plain
        "down": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]},
}
UP = {"DownBlock2D": "UpBlock2D", "CrossAttnDownBlock2D": "CrossAttnUpBlock2D"}
# A random, frozen text encoder (see the README): hidden size = the UNet's cross_attention_dim.
MINI_CLIP = {**TINY_CLIP, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "projection_dim": 64}
# SD1.5's noise schedule (scaled_linear 0.00085..0.012 over 1000 steps), epsilon prediction.
MINI_SCHEDULER = dict(TINY_SCHEDULER)


def vae_config(factor, latent_channels, resolution):
    widths = LEVELS[factor]["vae"]
    return {**MINI_VAE, "block_out_channels": widths, "down_block_types": ["DownEncoderBlock2D"] * len(widths),
            "up_block_types": ["UpDecoderBlock2D"] * len(widths), "latent_channels": latent_channels,
            "sample_size": resolution}


def unet_config(factor, latent_channels, resolution):
    down = LEVELS[factor]["down"]
    return {**MINI_UNET, "block_out_channels": LEVELS[factor]["unet"], "down_block_types": down,
            "up_block_types": [UP[kind] for kind in reversed(down)], "in_channels": latent_channels,
            "out_channels": latent_channels, "sample_size": resolution // factor}


@dataclass
class PretrainRecipe:
    data: str = "examples/pathmnist_subset_28.npz"
    resolution: int = 32
    vae_factor: int = 2         # pixels per latent cell per side: 2 or 4 (SD: 8)
    latent_channels: int = 8    # per latent cell (SD: 4)
    seed: int = 0
    device: str = "auto"
    mixed_precision: str = "auto"
    # stage 1, the VAE: L1 + MSE reconstruction plus a small KL (LDM sec. 3: "KL-reg")
    vae_steps: int = 3000
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    # stage 2, the UNet: epsilon prediction on cached latents, min-SNR weighting
    unet_steps: int = 2500
    unet_batch_size: int = 64
    unet_lr: float = 5e-4
    snr_gamma: float = 5.0
    caption: str = GENERIC_CAPTION
    caption_dropout: float = 0.1
    # both stages
    warmup_steps: int = 100
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    ema_decay: float = 0.999
    save_every: int = 250
    sample_every: int = 500


PRESETS = {
    "mini": PretrainRecipe(),
    # seconds, for tests and trying the command: the same code, a few steps
    "smoke": PretrainRecipe(vae_steps=4, vae_batch_size=8, unet_steps=4, unet_batch_size=8,
                            warmup_steps=1, save_every=2, sample_every=4),
}
