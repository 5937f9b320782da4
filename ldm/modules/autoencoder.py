"""The Stable Diffusion KL autoencoder ("first stage"): image <-> 8x smaller latent.

Module names mirror the SD checkpoints (`encoder.down.{i}.block.{j}`, `decoder.up.{i}...`,
`quant_conv`, `post_quant_conv`), so a `first_stage_model.*` state_dict loads unchanged.
Encoder levels go from fine to coarse; decoder level `i` is the same resolution as encoder
level `i` but is *built and run* from the deepest level up, hence `up` is indexed by
resolution, not by execution order.
"""
from __future__ import annotations

import inspect
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.norm import GroupNorm32


def Normalize(channels: int) -> nn.GroupNorm:
    return GroupNorm32(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-norm residual block without a time embedding; 1x1 `nin_shortcut` when widths differ."""

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, channels as the head dimension."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (b, c, h, w) -> (b, 1 head, h*w tokens, c), made contiguous: SDPA's fused kernels need the
        # channels at stride 1 and would otherwise fall back to materialising the (hw x hw) matrix.
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3).contiguous() for t in (self.q(y), self.k(y), self.v(y)))
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with asymmetric (right/bottom) zero padding, as in the SD VAE."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (no transposed conv: avoids checkerboarding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """Res blocks of one resolution, each followed by self-attention when `attns` is non-empty."""

    def __init__(self, blocks: Sequence[ResnetBlock], attns: Sequence[AttnBlock]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


class DownLevel(Level):
    def __init__(self, blocks: Sequence[ResnetBlock], attns: Sequence[AttnBlock], downsample: Downsample | None):
        super().__init__(blocks, attns)
        self.downsample = downsample  # None on the coarsest level

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.blocks(h)
        return self.downsample(h) if self.downsample is not None else h


class UpLevel(Level):
    def __init__(self, blocks: Sequence[ResnetBlock], attns: Sequence[AttnBlock], upsample: Upsample | None):
        super().__init__(blocks, attns)
        self.upsample = upsample  # None on the finest level

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.blocks(h)
        return self.upsample(h) if self.upsample is not None else h


class MidBlock(nn.Module):
    """ResnetBlock, self-attention, ResnetBlock at the coarsest resolution (always present)."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2*z_channels, H/f, W/f), f = 2**(len(ch_mult)-1)."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        levels, block_in, res = [], ch, resolution
        for i, mult in enumerate(ch_mult):
            block_out = ch * mult
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            last = i == len(ch_mult) - 1
            levels.append(DownLevel(blocks, attns, None if last else Downsample(block_in)))
            res = res if last else res // 2
        self.down = nn.ModuleList(levels)
        self.mid = MidBlock(block_in, dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f); mirror image of the Encoder."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], resolution: int, z_channels: int,
                 dropout: float = 0.0):
        super().__init__()
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, dropout)
        levels = [None] * len(ch_mult)
        for i in reversed(range(len(ch_mult))):  # deepest first, so `block_in` flows like the forward pass
            block_out = ch * ch_mult[i]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            levels[i] = UpLevel(blocks, attns, Upsample(block_in) if i != 0 else None)
            res = res * 2 if i != 0 else res
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) from the encoder's stacked moments (mean first, then logvar)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)  # keeps exp() finite for untrained/odd inputs
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * noise, drawn and returned in at least float32 as in the reference: under
        autocast the moments are half precision, and a half draw would quantise the training
        target z0 and, through it, the diffusion noise drawn like z0."""
        dtype = torch.promote_types(self.mean.dtype, torch.float32)
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=dtype)
        return self.mean + self.std * noise


def keyword_names(cls: type) -> set[str]:
    """The keyword arguments `cls(...)` takes, by its signature: for refusing unknown config keys by name."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {n for n, prm in inspect.signature(cls).parameters.items() if prm.kind in kinds}


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder; the latent diffusion model works on the posterior `encode` returns:
    its `mean` (inference, the latent cache) or a `sample()` (a training target).

    Latents are *unscaled* here; the diffusion model's `scale_factor` (0.18215 for SD) is applied
    by the caller.
    """

    def __init__(self, ddconfig: dict, embed_dim: int):
        super().__init__()
        ddconfig = dict(ddconfig)
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z=true (the encoder must output mean and logvar)")
        z_channels = ddconfig["z_channels"]
        # One ddconfig serves both halves; each takes its own keys, and a key neither knows (a
        # typo, or a reference option such as attn_type that is not implemented) is an error.
        enc_keys, dec_keys = keyword_names(Encoder), keyword_names(Decoder)
        unknown = sorted(set(ddconfig) - enc_keys - dec_keys)
        if unknown:
            raise ValueError(f"unknown ddconfig key(s) {unknown}; known: {sorted(enc_keys | dec_keys)}")
        self.encoder = Encoder(**{k: v for k, v in ddconfig.items() if k in enc_keys})
        self.decoder = Decoder(**{k: v for k, v in ddconfig.items() if k in dec_keys})
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))
