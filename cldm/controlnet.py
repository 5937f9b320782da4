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

from ldm.modules.unet import UNetEncoderMixin, UNetModel, zero_module

# (out channels, stride) of the hint block's 3x3 convs, each followed by SiLU: fixed by the
# ControlNet release; the three stride-2 convs bring the hint image to latent size (/8)
HINT_LAYERS = ((16, 1), (16, 1), (32, 2), (32, 1), (96, 2), (96, 1), (256, 2))


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


class ControlNet(UNetEncoderMixin, nn.Module):
    """The UNet's keyword arguments (minus out_channels) plus `hint_channels`; nothing else."""

    def __init__(self, in_channels: int, hint_channels: int, model_channels: int, num_res_blocks: int,
                 attention_resolutions: Sequence[int], channel_mult: Sequence[int], num_head_channels: int,
                 context_dim: int, transformer_depth: int = 1, dropout: float = 0.0,
                 use_checkpoint: bool = False, use_linear_in_transformer: bool = True):
        super().__init__()
        chans, ch, *_ = self._build_encoder(in_channels, model_channels, num_res_blocks, attention_resolutions,
                                            channel_mult, num_head_channels, context_dim, transformer_depth,
                                            dropout, use_checkpoint, use_linear_in_transformer)
        self.zero_convs = nn.ModuleList(nn.Sequential(zero_module(nn.Conv2d(c, c, 1))) for c in chans)
        layers: list[nn.Module] = []
        c_in = hint_channels
        for c_out, stride in HINT_LAYERS:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, stride=stride), nn.SiLU()]
            c_in = c_out
        layers.append(zero_module(nn.Conv2d(c_in, model_channels, 3, padding=1)))
        self.input_hint_block = nn.Sequential(*layers)
        self.middle_block_out = nn.Sequential(zero_module(nn.Conv2d(ch, ch, 1)))

    def encode_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """Hint image (B, C, H, W) -> features at latent size; independent of the noise, so once per sample."""
        return self.input_hint_block(hint)

    def forward(self, x: torch.Tensor, guided_hint: torch.Tensor, timesteps: torch.Tensor,
                context: torch.Tensor) -> list[torch.Tensor]:
        """The residuals for the UNet's skips, then for its middle block."""
        h, skips = self.encode(x, self.embed_time(timesteps), context, hint=guided_hint)
        return [zero_conv(s) for zero_conv, s in zip(self.zero_convs, skips)] + [self.middle_block_out(h)]
