"""Building blocks of the Stable Diffusion UNet and VAE.

Module and attribute names equal diffusers' parameter names (`to_q`, `to_out.0`, `time_emb_proj`,
`ff.net.0.proj`, ...) so a diffusers state dict loads with `load_state_dict(strict=True)` and no
key table. The numerics follow diffusers' default code path (SDPA attention processor) so outputs
agree to float32 rounding; see tests/test_unet_vae.py.

Shapes: B batch, C channels, H x W a feature map, N = H*W pixel tokens, M text tokens.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from model.io import UserError


def resolve_config(name, given, variable, fixed, ignored):
    """Merge a diffusers config.json dict over our defaults, refusing what we cannot build.

    variable: {key: diffusers default} for keys we implement; fixed: {key: allowed values} for
    keys we only support at their default (a different value would change the architecture);
    ignored: keys that do not change the network (`_`-prefixed keys are always ignored).
    Returns the full config (defaults filled in, like diffusers' `model.config`).
    """
    for key, value in given.items():
        if key.startswith("_") or key in ignored or key in variable:
            continue
        if key not in fixed:
            raise UserError(f"{name} config key {key!r} is not supported by this implementation")
        if value not in fixed[key]:
            raise UserError(f"{name} config {key}={value!r} is not supported "
                            f"(only {' or '.join(map(repr, fixed[key]))})")
    defaults = {**{k: v[0] for k, v in fixed.items()}, **variable}
    return {**defaults, **given}


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same results) that runs some CPU convolutions as plain GEMMs.

    PyTorch's CPU (oneDNN) convolution re-lays out the whole weight, and the input and output
    between NCHW and a blocked layout, on every call: costs that do not shrink with the feature map.
    Measured at SD1.5 shapes (fp32, 1 and 2 threads), on CPU:
    - a 1x1 conv is a matmul over the pixels, with no re-layout at all: 1.0-2x faster;
    - a 3x3 conv on a small map is im2col (unfold) + one GEMM: 1.3-4x faster up to 8x8 pixels,
      1.1-1.5x at 16x16 when it has >= 1280 output channels (the 512 px UNet's third stage).
      On larger maps oneDNN's direct convolution wins: im2col's buffer grows with the map.
    """

    GEMM_MAX_PIXELS = 64
    GEMM_MAX_PIXELS_WIDE, WIDE_CHANNELS = 256, 1280

    def forward(self, x):  # (B, C_in, H, W) -> (B, C_out, H, W)
        B, _, H, W = x.shape
        if x.device.type != "cpu" or self.stride != (1, 1):
            return super().forward(x)
        w = self.weight.flatten(1)  # (C_out, C_in*k*k)
        if self.kernel_size == (1, 1):
            if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
                # Pixel-major input (a transformer's tokens seen as a map): (B, N, C) is
                # contiguous, so this is one GEMM, and the output stays pixel-major as nn.Conv2d's.
                return F.linear(x.flatten(2).mT, w, self.bias).mT.unflatten(2, (H, W))
            cols = x.flatten(2)  # (B, C_in, H*W), a view
        elif H * W <= self.GEMM_MAX_PIXELS or (H * W <= self.GEMM_MAX_PIXELS_WIDE
                                               and self.out_channels >= self.WIDE_CHANNELS):
            cols = F.unfold(x, self.kernel_size, padding=self.padding)  # (B, C_in*k*k, H*W)
        else:
            return super().forward(x)
        out = w @ cols  # (B, C_out, H*W)
        out += self.bias[:, None]  # in place: matmul's backward does not need its output
        return out.view(B, -1, H, W)


class Timesteps(nn.Module):
    """Sinusoidal embedding of the diffusion step (as DDPM, from "Attention Is All You Need" 3.5).

    Frequencies are computed in forward (no buffer), so a model built on the meta device works.
    """

    def __init__(self, num_channels, flip_sin_to_cos, downscale_freq_shift):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift

    def forward(self, timesteps):  # (B,) -> (B, num_channels) float32
        half = self.num_channels // 2
        exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device)
        freqs = torch.exp(-math.log(10000) * exponent / (half - self.downscale_freq_shift))
        args = timesteps[:, None].float() * freqs[None]  # (B, half)
        # SD checkpoints were trained with cos first (flip_sin_to_cos=True).
        parts = (args.cos(), args.sin()) if self.flip_sin_to_cos else (args.sin(), args.cos())
        return torch.cat(parts, dim=-1)


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: linear -> SiLU -> linear."""

    def __init__(self, in_channels, time_embed_dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, sample):
        return self.linear_2(F.silu(self.linear_1(sample)))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, the (projected) time embedding added in between, plus a skip.

    temb_channels=None gives the VAE variant (no `time_emb_proj`); a 1x1 `conv_shortcut`
    matches the skip's channels when in_channels != out_channels.
    """

    def __init__(self, in_channels, out_channels, temb_channels=None, groups=32, eps=1e-6,
                 output_scale_factor=1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = (Conv2d(in_channels, out_channels, 1)
                              if in_channels != out_channels else None)
        self.output_scale_factor = output_scale_factor

    def forward(self, x, temb=None):  # x (B, C_in, H, W), temb (B, T) -> (B, C_out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # broadcast over H, W
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        # Only the UNet mid block of some checkpoints uses a factor != 1; skip a no-op pass.
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. padding=0 (the VAE) pads right/bottom only, as the original LDM code."""

    def __init__(self, channels, padding=1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):  # (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 (or to `output_size`, for odd skip sizes) then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, output_size=None):  # (B, C, H, W) -> (B, C, 2H, 2W) or output_size
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=output_size, mode="nearest")
        return self.conv(x)


class Attention(nn.Module):
    """Multi-head attention over token sequences (self- or cross-attention).

    softmax(Q K^T / sqrt(d)) V ("Attention Is All You Need" eq. 1) via
    F.scaled_dot_product_attention, which picks a fused kernel and never materialises more
    than it must. upcast_attention (SD2.1) computes the attention in float32 when the model
    runs in half precision, where Q K^T can overflow; in float32 it changes nothing.
    """

    def __init__(self, query_dim, cross_attention_dim=None, heads=8, dim_head=64, bias=False,
                 upcast_attention=False):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.upcast_attention = upcast_attention
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(cross_attention_dim or query_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(cross_attention_dim or query_dim, inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim)])

    def forward(self, x, context=None):  # x (B, N, C), context (B, M, C_ctx) or None -> (B, N, C)
        context = x if context is None else context
        # (B, N|M, heads*d) -> (B, heads, N|M, d) as strided views: no copy here.
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        dtype = q.dtype
        if self.upcast_attention and dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        out = out.transpose(1, 2).flatten(2).to(dtype)  # (B, N, heads*d)
        return self.to_out[0](out)


class SpatialAttention(Attention):
    """The VAE mid-block attention: one head over all H*W pixels, GroupNorm in, residual out."""

    def __init__(self, channels, groups=32, eps=1e-6):
        super().__init__(channels, heads=1, dim_head=channels, bias=True, upcast_attention=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)

    def forward(self, x):  # (B, C, H, W) -> (B, C, H, W)
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
        h = super().forward(h)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020, "GLU Variants Improve Transformer" eq. 6)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):  # (B, N, dim_in) -> (B, N, dim_out)
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU then a linear back to `dim`: inner width 4*dim as in SD."""

    def __init__(self, dim, mult=4):
        super().__init__()
        inner_dim = dim * mult
        # Slot 1 is diffusers' (p=0) dropout; Identity keeps the output linear named `net.2`.
        self.net = nn.ModuleList([GEGLU(dim, inner_dim), nn.Identity(), nn.Linear(inner_dim, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention on the text, GEGLU feed-forward."""

    def __init__(self, dim, heads, dim_head, cross_attention_dim, upcast_attention=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head,
                               upcast_attention=upcast_attention)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, cross_attention_dim, heads=heads, dim_head=dim_head,
                               upcast_attention=upcast_attention)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):  # x (B, N, C), context (B, M, C_ctx) -> (B, N, C)
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """A feature map as N = H*W tokens through one BasicTransformerBlock, with a residual.

    proj_in/proj_out are 1x1 convs (SD1.x) or linears on the tokens (SD2.x,
    use_linear_projection); both are the same per-pixel linear map, applied before or after
    the (B, C, H, W) -> (B, N, C) reshape.
    """

    def __init__(self, channels, heads, cross_attention_dim, groups=32, use_linear_projection=False,
                 upcast_attention=False):
        super().__init__()
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        proj = nn.Linear if use_linear_projection else (lambda i, o: Conv2d(i, o, 1))
        self.proj_in = proj(channels, channels)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(
            channels, heads, channels // heads, cross_attention_dim, upcast_attention)])
        self.proj_out = proj(channels, channels)

    def forward(self, x, context):  # x (B, C, H, W), context (B, M, C_ctx) -> (B, C, H, W)
        B, C, H, W = x.shape
        h = self.norm(x)
        if self.use_linear_projection:
            h = self.proj_in(h.flatten(2).transpose(1, 2))  # (B, N, C)
        else:
            h = self.proj_in(h).flatten(2).transpose(1, 2)  # (B, N, C)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear_projection:
            h = self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)
        else:
            h = self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))
        # h is pixel-major (a view of the tokens); x first makes the sum NCHW like x, so the
        # convolutions after this block do not re-lay it out.
        return x + h
