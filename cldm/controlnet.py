"""ControlNet (a trainable copy of the UNet encoder) and the UNet that takes its residuals.

The ControlNet sees the noisy latent plus a hint image; each encoder block's output goes
through a zero-initialised 1x1 conv and is added to the matching skip connection of the
locked UNet, the middle block's to the middle of the UNet. Zero convs make the pair equal
to plain SD at initialisation.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ldm.modules.unet import UNetConfigMixin, UNetModel, zero_module

HINT_WIDTHS = (16, 16, 32, 32, 96, 96, 256)  # fixed by the ControlNet release; downsamples by 8


class ControlledUnetModel(UNetModel):
    """SD UNet whose skips (and middle) receive ControlNet residuals."""

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                control: Sequence[torch.Tensor] | None = None, only_mid_control: bool = False) -> torch.Tensor:
        emb = self.embed_time(timesteps)
        # The encoder needs a graph only if something in it trains (e.g. new input channels).
        # Grad mode first: sampling then skips the walk over the encoder's parameters at every step.
        encoder_trains = torch.is_grad_enabled() and any(p.requires_grad for p in self.input_blocks.parameters())
        with torch.set_grad_enabled(encoder_trains):
            h, skips = self.encode(x, emb, context)
        if control is not None:
            h = h + control[-1]
            if not only_mid_control:
                skips = [s + c for s, c in zip(skips, control[:-1])]
        return self.decode(h, skips, emb, context, x.dtype)


class ControlNet(UNetConfigMixin, nn.Module):
    """The UNet's keyword arguments (minus out_channels) plus `hint_channels`; nothing else."""

    def __init__(self, in_channels: int, hint_channels: int, model_channels: int, num_res_blocks: int,
                 attention_resolutions: Sequence[int], channel_mult: Sequence[int], num_head_channels: int,
                 context_dim: int, transformer_depth: int = 1, dropout: float = 0.0,
                 use_checkpoint: bool = False, use_linear_in_transformer: bool = True):
        super().__init__()
        chans, ch, *_ = self._init_common(in_channels, model_channels, num_res_blocks, attention_resolutions,
                                         channel_mult, num_head_channels, context_dim, transformer_depth,
                                         dropout, use_checkpoint, use_linear_in_transformer)
        self.zero_convs = nn.ModuleList(nn.Sequential(zero_module(nn.Conv2d(c, c, 1))) for c in chans)
        layers: list[nn.Module] = []
        widths = (hint_channels,) + HINT_WIDTHS
        for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            stride = 2 if i in (2, 4, 6) else 1
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, stride=stride), nn.SiLU()]
        layers.append(zero_module(nn.Conv2d(HINT_WIDTHS[-1], model_channels, 3, padding=1)))
        self.input_hint_block = nn.Sequential(*layers)
        self.middle_block_out = nn.Sequential(zero_module(nn.Conv2d(ch, ch, 1)))

    def encode_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """Hint image (B, C, H, W) -> features at latent size; independent of the noise, so once per sample."""
        return self.input_hint_block(hint)

    def forward(self, x: torch.Tensor, guided_hint: torch.Tensor, timesteps: torch.Tensor,
                context: torch.Tensor) -> list[torch.Tensor]:
        emb = self.embed_time(timesteps)
        outs, h = [], x
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided_hint
            outs.append(zero_conv(h))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h))
        return outs
