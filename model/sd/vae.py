"""The Stable Diffusion autoencoder (KL-regularised VAE): images <-> latents, 8x smaller per side.

`AutoencoderKL(**config)` takes the keys of a diffusers `vae/config.json` and has diffusers'
parameter names. `encode(images in [-1, 1]) -> (mean, logvar)` of the diagonal Gaussian
posterior; `decode(latents) -> images ~[-1, 1]`. `config["scaling_factor"]` (0.18215 for SD) is
kept but NOT applied here: the pipeline multiplies latents by it before the UNet and divides
after, so the VAE stays a plain autoencoder.
"""
import torch.nn.functional as F
from torch import nn

from model.io import UserError
from model.sd.layers import Downsample2D, ResnetBlock2D, SpatialAttention, Upsample2D, resolve_config

# Keys we build from, with diffusers' defaults (so a partial config means what it means there).
VARIABLE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64], "layers_per_block": 1, "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}
# Keys only supported at these values. shift_factor / latents_mean / latents_std (SD3, Flux)
# would change how the pipeline scales latents, which only handles `scaling_factor`.
FIXED = {
    "act_fn": ("silu", "swish"), "use_quant_conv": (True,), "use_post_quant_conv": (True,),
    "mid_block_add_attention": (True,), "shift_factor": (None,), "latents_mean": (None,),
    "latents_std": (None,),
}
# force_upcast is a hint to pipelines running in float16; sample_size only sizes tiling.
IGNORED = {"sample_size", "force_upcast"}


class DownEncoderBlock2D(nn.Module):
    """num_layers resnets (no time embedding), then an optional stride-2 downsample."""

    def __init__(self, in_channels, out_channels, num_layers, add_downsample, groups):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups=groups)
            for i in range(num_layers)])
        # padding=0: the LDM autoencoder pads right/bottom only before its stride-2 conv.
        self.downsamplers = (nn.ModuleList([Downsample2D(out_channels, padding=0)])
                             if add_downsample else None)

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # (B, C, H/2, W/2)
        return x


class UpDecoderBlock2D(nn.Module):
    """num_layers resnets, then an optional nearest x2 upsample + conv. No skips in a VAE."""

    def __init__(self, in_channels, out_channels, num_layers, add_upsample, groups):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups=groups)
            for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)  # (B, C, 2H, 2W)
        return x


class UNetMidBlock2D(nn.Module):
    """resnet -> single-head attention over all pixels -> resnet, at the lowest resolution."""

    def __init__(self, channels, groups):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups=groups)
                                      for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialAttention(channels, groups)])

    def forward(self, x):
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """(B, 3, H, W) image -> (B, 2*latent, H/f, W/f) Gaussian parameters, f = 2^(blocks-1)."""

    def __init__(self, in_channels, latent_channels, channels, layers_per_block, groups):
        super().__init__()
        n = len(channels)
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock2D(channels[max(i - 1, 0)], channels[i], layers_per_block,
                               add_downsample=i < n - 1, groups=groups) for i in range(n)])
        self.mid_block = UNetMidBlock2D(channels[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(channels[-1], 2 * latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """(B, latent, h, w) -> (B, 3, h*f, w*f) image; one more resnet per block than the encoder."""

    def __init__(self, latent_channels, out_channels, channels, layers_per_block, groups):
        super().__init__()
        n = len(channels)
        rev = list(reversed(channels))
        self.conv_in = nn.Conv2d(latent_channels, rev[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(rev[0], groups)
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], layers_per_block + 1,
                             add_upsample=i < n - 1, groups=groups) for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=1e-6)
        self.conv_out = nn.Conv2d(channels[0], out_channels, 3, padding=1)

    def forward(self, z):
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """encode -> (mean, logvar); decode(latents) -> images. See the module docstring."""

    def __init__(self, **config):
        super().__init__()
        cfg = resolve_config("vae", config, VARIABLE, FIXED, IGNORED)
        self.config = cfg
        channels = list(cfg["block_out_channels"])
        down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
        n = len(channels)
        if down != ["DownEncoderBlock2D"] * n or up != ["UpDecoderBlock2D"] * n:
            raise UserError(f"vae config needs {n} DownEncoderBlock2D and "
                            f"UpDecoderBlock2D blocks, got {down} and {up}")
        latent = cfg["latent_channels"]
        args = dict(channels=channels, layers_per_block=cfg["layers_per_block"],
                    groups=cfg["norm_num_groups"])
        self.encoder = Encoder(cfg["in_channels"], latent, **args)
        self.decoder = Decoder(latent, cfg["out_channels"], **args)
        # 1x1 convs between the networks and the latent space (a legacy of the LDM code).
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)
        self.post_quant_conv = nn.Conv2d(latent, latent, 1)

    @property
    def dtype(self):
        return self.quant_conv.weight.dtype

    @property
    def device(self):
        return self.quant_conv.weight.device

    def encode(self, images):
        """(B, 3, H, W) in [-1, 1] -> mean, logvar, each (B, latent, H/f, W/f)."""
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        # Clamp as diffusers' DiagonalGaussianDistribution does: keeps exp(logvar) finite.
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, latents):
        """(B, latent, h, w) unscaled latents -> (B, 3, h*f, w*f) images, roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(latents))
