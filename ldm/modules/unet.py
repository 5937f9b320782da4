"""The SD2.x denoising UNet, written to be read top to bottom.

Layout (and therefore state_dict names) follows the latent-diffusion "openaimodel" UNet:
`input_blocks` (conv, then per level `num_res_blocks` x [ResBlock (+ SpatialTransformer)] and a
Downsample), `middle_block` (ResBlock, SpatialTransformer, ResBlock), `output_blocks` (per
level `num_res_blocks + 1` x [ResBlock on the concatenated skip (+ SpatialTransformer)] and an
Upsample), `out` (GroupNorm, SiLU, zero conv). The encoder builder is shared with ControlNet.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.modules.attention import SpatialTransformer
from ldm.modules.norm import GroupNorm32


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps, float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None,
                 dropout: float = 0.0, use_checkpoint: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(GroupNorm32(32, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(32, out_channels), nn.SiLU(), nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():  # pointless without autograd; eval mode is fine
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A block whose layers take what they need: ResBlocks the time embedding, transformers the context."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetEncoderMixin:
    """The half that the UNet and the ControlNet (its trainable copy) share: time embedding,
    encoder blocks and middle block, built and run the same way.

    `_build_encoder` returns the encoder's skip widths plus the block builders, so the UNet can
    build a decoder that mirrors it."""

    def _build_encoder(self, in_channels: int, model_channels: int, num_res_blocks: int,
                     attention_resolutions: Sequence[int], channel_mult: Sequence[int],
                     num_head_channels: int, context_dim: int, transformer_depth: int,
                     dropout: float, use_checkpoint: bool, use_linear_in_transformer: bool = True):
        if not use_linear_in_transformer:
            # SD1.x's 1x1-conv projections have other weight shapes; only SD2.x's Linear is built.
            raise ValueError("use_linear_in_transformer=false (1x1-conv projections, SD1.x) is not supported: "
                             "this UNet implements SD2.x's linear projections only")
        self.model_channels = model_channels
        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def res(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, emb_dim, ch_out, dropout, use_checkpoint)

        def attn(ch: int) -> SpatialTransformer:
            return SpatialTransformer(ch, ch // num_head_channels, num_head_channels, transformer_depth,
                                      context_dim, use_checkpoint)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        chans, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch), res(ch, ch))
        return chans, ch, ds, res, attn

    def embed_time(self, timesteps: torch.Tensor) -> torch.Tensor:
        t_emb = timestep_embedding(timesteps, self.model_channels)
        return self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))

    def encode(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
               hint: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(middle block output, every encoder block's output: the skips). `hint`, the ControlNet's
        hint features, is added to the first block's output."""
        skips, h = [], x
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, context)
            if i == 0 and hint is not None:
                h = h + hint
            skips.append(h)
        return self.middle_block(h, emb, context), skips


class UNetModel(UNetEncoderMixin, nn.Module):
    """Takes exactly these keyword arguments, so a misspelt config key is an error, not a no-op."""

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, num_res_blocks: int,
                 attention_resolutions: Sequence[int], channel_mult: Sequence[int], num_head_channels: int,
                 context_dim: int, transformer_depth: int = 1, dropout: float = 0.0,
                 use_checkpoint: bool = False, use_linear_in_transformer: bool = True):
        super().__init__()
        chans, ch, ds, res, attn = self._build_encoder(in_channels, model_channels, num_res_blocks,
                                                       attention_resolutions, channel_mult, num_head_channels,
                                                       context_dim, transformer_depth, dropout, use_checkpoint,
                                                       use_linear_in_transformer)
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers: list[nn.Module] = [res(ch + chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attn(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        # ch = model_channels * channel_mult[0]; the reference writes model_channels for the conv's
        # input, which is the same for SD (mult 1) and a shape error at the first forward otherwise.
        self.out = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(), zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def decode(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor, context: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
        for block, skip in zip(self.output_blocks, reversed(skips)):
            h = block(torch.cat([h, skip], dim=1), emb, context)
        return self.out(h.type(dtype))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        emb = self.embed_time(timesteps)
        h, skips = self.encode(x, emb, context)
        return self.decode(h, skips, emb, context, x.dtype)
