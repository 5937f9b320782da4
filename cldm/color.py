"""Colour conditioning: what each variant feeds the networks, computed once per sample.

hint = reference RGB (3) + target gray (1), BCHW in [0, 1]; it always goes through the
ControlNet's hint block. v2/v3 additionally concatenate latent-size maps to the noisy latent:
  v1: nothing                     (4 input channels)
  v2: ref latent (4) + gray (1)   (9)  gray area-averaged to latent size, scaled to [-1, 1]
  v3: ref latent (4) + gray latent (4) (12)  VAE latent of the gray repeated to RGB
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

VARIANTS = {"v1": 0, "v2": 5, "v3": 8}


def extra_channels(variant: str) -> int:
    """Channels concatenated to the noisy latent for a colour variant."""
    if variant not in VARIANTS:
        raise ValueError(f"color_variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    return VARIANTS[variant]


def needs_ref_latent(variant: str) -> bool:
    """Whether a variant concatenates the reference's VAE latent (the encode that callers skip otherwise)."""
    return extra_channels(variant) > 0


def needs_gray_latent(variant: str) -> bool:
    """Whether a variant concatenates the VAE latent of the gray (a second encode; the latent cache's
    `gray_latent_mean`)."""
    extra_channels(variant)
    return variant == "v3"


def join_hint(reference: torch.Tensor, gray: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) reference RGB + (B, 1, H, W) target gray, both in [0, 1] -> the hint; split_hint's
    inverse, so that inference builds exactly what training's data (tutorial_dataset.make_hint) gives."""
    if reference.ndim != 4 or reference.shape[1] != 3 or gray.ndim != 4 or gray.shape[1] != 1:
        raise ValueError(f"hint parts must be (B, 3, H, W) and (B, 1, H, W), got {tuple(reference.shape)} and "
                         f"{tuple(gray.shape)}")
    return torch.cat([reference, gray], dim=1)


def split_hint(hint: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if hint.ndim != 4 or hint.shape[1] != 4:
        raise ValueError(f"hint must be (B, 4, H, W) = reference RGB + target gray, got {tuple(hint.shape)}")
    return hint[:, :3], hint[:, 3:]


def gray_to_latent_size(gray: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Gray in [0, 1] -> [-1, 1], averaged over each latent cell (area interpolation)."""
    return F.interpolate(gray * 2 - 1, size=latent_hw, mode="area")


@dataclass
class ColorCondition:
    """Everything about a sample that stays fixed while it is denoised."""

    context: torch.Tensor            # (B, 77, D) prompt embedding
    guided_hint: torch.Tensor        # (B, C, h, w) hint-block features
    concat: torch.Tensor | None      # (B, 5 or 8, h, w) for v2/v3, None for v1

    def __len__(self) -> int:
        return self.context.shape[0]

    @staticmethod
    def cat(conds: list["ColorCondition"]) -> "ColorCondition":
        """One batch of several conditions' rows, in order (reference guidance: cond and uncond)."""
        concats = [c.concat for c in conds]
        if any(t is None for t in concats) and not all(t is None for t in concats):
            raise ValueError("conditions with a concat (v2/v3) and without (v1) cannot share a batch")
        return ColorCondition(torch.cat([c.context for c in conds]), torch.cat([c.guided_hint for c in conds]),
                              None if concats[0] is None else torch.cat(concats))


def build_concat(variant: str, ref: torch.Tensor, gray: torch.Tensor,
                 encode: Callable[[torch.Tensor], torch.Tensor], latent_hw: tuple[int, int],
                 ref_latent: torch.Tensor | None = None,
                 gray_latent: torch.Tensor | None = None) -> torch.Tensor | None:
    """Extra latent-size input channels of a variant.

    `encode` maps an image in [-1, 1] to its scaled latent (posterior mean x scale factor);
    pass `ref_latent` / `gray_latent` (e.g. from the latent cache) to skip the encodes.
    """
    if not needs_ref_latent(variant):
        return None
    if ref_latent is None:
        ref_latent = encode(ref * 2 - 1)
    if variant == "v2":
        return torch.cat([ref_latent, gray_to_latent_size(gray, latent_hw).to(ref_latent.dtype)], dim=1)
    if variant == "v3":
        if gray_latent is None:
            gray_latent = encode(gray.repeat(1, 3, 1, 1) * 2 - 1)
        return torch.cat([ref_latent, gray_latent], dim=1)
    raise ValueError(f"build_concat has no rule for colour variant {variant!r}")  # one added to VARIANTS only
