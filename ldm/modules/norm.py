"""Normalisation shared by the UNet and the autoencoder."""
import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32: half-precision statistics over large maps overflow,
    and CPU group_norm refuses mixed dtypes, so the affine parameters are upcast too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)
