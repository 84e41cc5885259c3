"""The offline "tiny preset": a complete diffusers-layout Stable Diffusion folder with random
weights, small enough that a 256x256 generation of a few steps takes seconds on a CPU.

    make_tiny_sd("runs/tiny-sd")          # then: load_pipeline("runs/tiny-sd")

It is built with our own UNet / VAE and transformers' CLIP text encoder (no diffusers needed),
and has the same files as a hub snapshot of SD1.5 (kind="sd1") or SD2.x (kind="sd2": linear
attention projections, v-prediction): model_index.json, unet/, vae/, text_encoder/, tokenizer/,
scheduler/. It exercises every code path of the real models, but its images are noise: it is for
trying the commands and for tests, not for results.

The tokenizer is a real CLIPTokenizer whose BPE has no merges: every word is split into single
byte-level characters, so it needs no downloaded vocabulary.
"""
import os

import torch

from model.io import save_safetensors, write_json, write_text
from model.sd.unet import UNet2DConditionModel
from model.sd.vae import AutoencoderKL

DIFFUSERS_VERSION = "0.30.0"  # the layout version written into the configs

# Latent 32x32 at 256 px (VAE factor 8, as SD); two UNet resolutions, one with cross-attention.
TINY_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
    "act_fn": "silu", "attention_head_dim": 4, "block_out_channels": [32, 64],
    "center_input_sample": False, "cross_attention_dim": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 1,
    "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 8, "out_channels": 4,
    "sample_size": 32, "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}
TINY_UNET_SD2 = {**TINY_UNET, "attention_head_dim": [2, 4], "use_linear_projection": True,
                 "upcast_attention": True}
TINY_VAE = {
    "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
    "block_out_channels": [16, 16, 32, 32], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3, "out_channels": 3,
    "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 256,
    "scaling_factor": 0.18215,
}
# Byte-level vocabulary: 256 characters, the same 256 ending a word ("</w>"), then the two
# specials, in the order CLIP's own vocab.json has them (specials last).
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TINY_VOCAB_SIZE = 2 * 256 + 2
TINY_CLIP = {  # transformers CLIPTextConfig fields; hidden_size == the UNet's cross_attention_dim
    "vocab_size": TINY_VOCAB_SIZE, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 32,
    "bos_token_id": TINY_VOCAB_SIZE - 2, "eos_token_id": TINY_VOCAB_SIZE - 1,
    "pad_token_id": TINY_VOCAB_SIZE - 1,
}
# SD1.5's scheduler betas (scaled_linear 0.00085..0.012, steps_offset 1), written as a DDIM config.
TINY_SCHEDULER = {
    "_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False,
    "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading",
    "trained_betas": None,
}
KINDS = {
    "sd1": (TINY_UNET, TINY_CLIP, TINY_SCHEDULER),
    "sd2": (TINY_UNET_SD2, {**TINY_CLIP, "hidden_act": "gelu"},
            {**TINY_SCHEDULER, "prediction_type": "v_prediction"}),
}


def byte_level_chars():
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [table[b] for b in range(256)]


def make_tiny_tokenizer(folder):
    """Write a character-level CLIPTokenizer (vocab.json, merges.txt, configs) into `folder`."""
    chars = byte_level_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({BOS: 512, EOS: 513})
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    write_json(os.path.join(folder, "vocab.json"), vocab)
    write_text(os.path.join(folder, "merges.txt"), "#version: 0.2\n")  # no merges: one token per char
    write_json(os.path.join(folder, "special_tokens_map.json"), specials)
    write_json(os.path.join(folder, "tokenizer_config.json"),
               {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
                "add_prefix_space": False, **specials})


def _save_model(folder, config, weights_name, module):
    write_json(os.path.join(folder, "config.json"), config)
    # "format": "pt" is the metadata transformers and diffusers expect in a torch safetensors file
    save_safetensors(os.path.join(folder, weights_name), module.state_dict(), {"format": "pt"})


def make_tiny_sd(folder, kind="sd1", seed=0):
    """Write a random-weight tiny SD folder (see module docstring); returns `folder`.
    The same (kind, seed) always gives the same weights. model_index.json is written last, so a
    folder that has it is complete."""
    from transformers import CLIPTextConfig, CLIPTextModel
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    unet_config, clip_config, scheduler_config = KINDS[kind]
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)  # resolve_config ignores the `_`-keys
        vae = AutoencoderKL(**TINY_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**clip_config, architectures=["CLIPTextModel"]))

    return write_sd_folder(folder, unet, unet_config, vae, TINY_VAE, text_encoder, scheduler_config)


def write_sd_folder(folder, unet, unet_config, vae, vae_config, text_encoder, scheduler_config):
    """Write networks in the layout of a hub snapshot of SD (diffusers' StableDiffusionPipeline
    folder) with the byte-level tokenizer; model_index.json last, so a folder that has it is
    complete. Returns `folder`."""
    _save_model(os.path.join(folder, "unet"), unet_config, "diffusion_pytorch_model.safetensors", unet)
    _save_model(os.path.join(folder, "vae"), vae_config, "diffusion_pytorch_model.safetensors", vae)
    _save_model(os.path.join(folder, "text_encoder"), text_encoder.config.to_dict(),
                "model.safetensors", text_encoder)
    make_tiny_tokenizer(os.path.join(folder, "tokenizer"))
    write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), scheduler_config)
    write_json(os.path.join(folder, "model_index.json"), {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None],
        "image_encoder": [None, None], "requires_safety_checker": False,
    })
    return folder
