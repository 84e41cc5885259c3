"""The Stable Diffusion denoiser: a UNet conditioned on the timestep and on CLIP text tokens.

`UNet2DConditionModel(**config)` takes the keys of a diffusers `unet/config.json` (SD1.x and
SD2.x) and has diffusers' parameter names, so their `diffusion_pytorch_model.safetensors` loads
with `load_state_dict(strict=True)`. Keys that would build a network we do not implement (SDXL's
added embeddings, class embeddings, several transformer layers per block, ...) raise UserError.

Data flow (SD1.5, 64x64 latent): conv_in -> 4 down blocks (64->32->16->8 px, every
intermediate kept as a skip) -> mid block -> 4 up blocks (each concatenates the skips of the
matching resolution) -> GroupNorm, SiLU, conv_out. The text enters through cross-attention in
every Transformer2DModel; the timestep through `time_emb_proj` in every ResnetBlock2D.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.io import UserError
from model.sd.layers import (Downsample2D, ResnetBlock2D, TimestepEmbedding, Timesteps,
                          Transformer2DModel, Upsample2D, resolve_config)

# Keys we build from, with diffusers' defaults (so a partial config means what it means there).
VARIABLE = {
    "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1,
    "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 1280,
    "attention_head_dim": 8, "num_attention_heads": None,
    "use_linear_projection": False, "upcast_attention": False,
}
# Keys only supported at these values: anything else is a different architecture.
FIXED = {
    "act_fn": ("silu", "swish"), "dropout": (0.0,), "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,), "mid_block_only_cross_attention": (None, False),
    "transformer_layers_per_block": (1,), "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "dual_cross_attention": (False,),
    "class_embed_type": (None,), "num_class_embeds": (None,), "class_embeddings_concat": (False,),
    "addition_embed_type": (None,), "addition_time_embed_dim": (None,),
    "projection_class_embeddings_input_dim": (None,), "time_cond_proj_dim": (None,),
    "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,), "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,), "time_embedding_act_fn": (None,), "timestep_post_act": (None,),
    "conv_in_kernel": (3,), "conv_out_kernel": (3,), "attention_type": ("default",),
    "cross_attention_norm": (None,),
}
# Keys that do not change the network (addition_embed_type_num_heads is unused without one).
IGNORED = {"sample_size", "addition_embed_type_num_heads"}
DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


class _Block(nn.Module):
    """A UNet stage whose layers can be recomputed in backward instead of storing activations."""

    gradient_checkpointing = False

    def _run(self, layer, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)


class DownBlock2D(_Block):
    """diffusers' DownBlock2D, or CrossAttnDownBlock2D when `transformer` kwargs are given:
    num_layers x (resnet [-> transformer]), then an optional stride-2 downsample.
    Returns the output and every intermediate, the skips for the up path."""

    def __init__(self, in_channels, out_channels, temb_channels, num_layers, add_downsample,
                 resnet, transformer=None, downsample_padding=1):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels,
                          **resnet)
            for i in range(num_layers)])
        self.attentions = None if transformer is None else nn.ModuleList([
            Transformer2DModel(out_channels, **transformer) for _ in range(num_layers)])
        self.downsamplers = (nn.ModuleList([Downsample2D(out_channels, downsample_padding)])
                             if add_downsample else None)

    def forward(self, x, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = self._run(resnet, x, temb)
            if self.attentions is not None:
                x = self._run(self.attentions[i], x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # (B, C, H/2, W/2)
            skips.append(x)
        return x, skips


class UpBlock2D(_Block):
    """diffusers' UpBlock2D, or CrossAttnUpBlock2D when `transformer` kwargs are given: each of
    num_layers resnets first concatenates the most recent skip on channels (popped from `skips`)."""

    def __init__(self, in_channels, prev_output_channel, out_channels, temb_channels, num_layers,
                 add_upsample, resnet, transformer=None):
        super().__init__()
        self.resnets = nn.ModuleList()
        for i in range(num_layers):
            # The last layer's skip comes from the next-lower resolution stage (in_channels).
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            x_channels = prev_output_channel if i == 0 else out_channels
            self.resnets.append(ResnetBlock2D(x_channels + skip_channels, out_channels,
                                              temb_channels, **resnet))
        self.attentions = None if transformer is None else nn.ModuleList([
            Transformer2DModel(out_channels, **transformer) for _ in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x, skips, temb, context):
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C_x + C_skip, H, W)
            x = self._run(resnet, x, temb)
            if self.attentions is not None:
                x = self._run(self.attentions[i], x, context)
        if self.upsamplers is not None:
            # Upsample to the next skip's size: x2, or one less when the down path saw an odd size.
            x = self.upsamplers[0](x, skips[-1].shape[-2:])
        return x


class UNetMidBlock2DCrossAttn(_Block):
    """resnet -> transformer -> resnet at the lowest resolution."""

    def __init__(self, channels, temb_channels, resnet, transformer):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, temb_channels, **resnet)
                                      for _ in range(2)])
        self.attentions = nn.ModuleList([Transformer2DModel(channels, **transformer)])

    def forward(self, x, temb, context):
        x = self._run(self.resnets[0], x, temb)
        x = self._run(self.attentions[0], x, context)
        return self._run(self.resnets[1], x, temb)


def _per_block(value, n, key):
    """An int (or None) for every block, or a per-block list as diffusers allows."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UserError(f"unet config {key} has {len(value)} entries for {n} blocks")
        return list(value)
    return [value] * n


class UNet2DConditionModel(nn.Module):
    """eps/v-prediction UNet; unet(sample, timestep, encoder_hidden_states) -> like sample."""

    def __init__(self, **config):
        super().__init__()
        cfg = resolve_config("unet", config, VARIABLE, FIXED, IGNORED)
        self.config = cfg
        channels = list(cfg["block_out_channels"])
        n = len(channels)
        down_types, up_types = list(cfg["down_block_types"]), list(cfg["up_block_types"])
        if len(down_types) != n or len(up_types) != n:
            raise UserError(f"unet config needs one down and one up block type per entry of "
                            f"block_out_channels ({n}), got {len(down_types)} and {len(up_types)}")
        for t in down_types + up_types:
            if t not in DOWN_TYPES + UP_TYPES:
                raise UserError(f"unet block type {t!r} is not supported "
                                f"(only {', '.join(DOWN_TYPES + UP_TYPES)})")
        # diffusers reads `attention_head_dim` as the number of heads (a historical misnomer it
        # keeps for compatibility): SD1.x has 8 heads everywhere, SD2.x [5, 10, 20, 20] = dim 64.
        heads = _per_block(cfg["num_attention_heads"] or cfg["attention_head_dim"], n,
                           "attention_head_dim")
        layers = _per_block(cfg["layers_per_block"], n, "layers_per_block")
        cross_dims = _per_block(cfg["cross_attention_dim"], n, "cross_attention_dim")
        temb_channels = channels[0] * 4
        resnet = dict(groups=cfg["norm_num_groups"], eps=cfg["norm_eps"])

        def transformer(i):
            return dict(heads=heads[i], cross_attention_dim=cross_dims[i],
                        groups=cfg["norm_num_groups"],
                        use_linear_projection=cfg["use_linear_projection"],
                        upcast_attention=cfg["upcast_attention"])

        self.conv_in = nn.Conv2d(cfg["in_channels"], channels[0], 3, padding=1)
        self.time_proj = Timesteps(channels[0], cfg["flip_sin_to_cos"], cfg["freq_shift"])
        self.time_embedding = TimestepEmbedding(channels[0], temb_channels)

        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(down_types):
            self.down_blocks.append(DownBlock2D(
                channels[max(i - 1, 0)], channels[i], temb_channels, layers[i],
                add_downsample=i < n - 1, resnet=resnet,
                transformer=transformer(i) if block_type == "CrossAttnDownBlock2D" else None,
                downsample_padding=cfg["downsample_padding"]))

        self.mid_block = UNetMidBlock2DCrossAttn(
            channels[-1], temb_channels,
            dict(resnet, output_scale_factor=cfg["mid_block_scale_factor"]), transformer(n - 1))

        # Up path mirrors the down path: block i works at the resolution of down block n-1-i.
        self.up_blocks = nn.ModuleList()
        for i, block_type in enumerate(up_types):
            j = n - 1 - i
            self.up_blocks.append(UpBlock2D(
                channels[max(j - 1, 0)], channels[min(j + 1, n - 1)], channels[j], temb_channels,
                layers[j] + 1, add_upsample=i < n - 1, resnet=resnet,
                transformer=transformer(j) if block_type == "CrossAttnUpBlock2D" else None))

        self.conv_norm_out = nn.GroupNorm(cfg["norm_num_groups"], channels[0], eps=cfg["norm_eps"])
        self.conv_out = nn.Conv2d(channels[0], cfg["out_channels"], 3, padding=1)

    @property
    def dtype(self):
        return self.conv_in.weight.dtype

    @property
    def device(self):
        return self.conv_in.weight.device

    def enable_gradient_checkpointing(self, enabled=True):
        """Recompute each resnet/transformer in backward (torch.utils.checkpoint): trades ~30%
        more compute for storing only block inputs, what makes LoRA training fit in memory."""
        for module in self.modules():
            if isinstance(module, _Block):
                module.gradient_checkpointing = enabled

    def forward(self, sample, timestep, encoder_hidden_states):
        """sample (B, C_in, h, w) latents; timestep int, 0-d or (B,) tensor; encoder_hidden_states
        (B, M, cross_attention_dim) text tokens. Returns (B, C_out, h, w)."""
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        if self.config["center_input_sample"]:
            sample = 2 * sample - 1.0
        temb = self.time_embedding(self.time_proj(t).to(sample.dtype))  # (B, 4*C0)

        x = self.conv_in(sample)  # (B, C0, h, w)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, encoder_hidden_states)
            skips += block_skips
        x = self.mid_block(x, temb, encoder_hidden_states)  # (B, C_last, h/2^(n-1), w/2^(n-1))
        for block in self.up_blocks:
            x = block(x, skips, temb, encoder_hidden_states)  # consumes its skips from the end
        return self.conv_out(F.silu(self.conv_norm_out(x)))
