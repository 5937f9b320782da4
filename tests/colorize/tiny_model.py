"""A randomly initialised tiny ControlLDM whose reference actually matters, and its checkpoint.

create_model leaves the ControlNet's zero convs at zero (the hint would have no effect), so
they get small random weights: then reference, hint and noise all change the output.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from cldm.config import TINY_CONFIG, load_config

from cldm.model import create_model


def tiny_model(seed: int = 0, variant: str | None = None):
    torch.manual_seed(seed)
    cfg = load_config(TINY_CONFIG, [f"model.color_variant={variant}"] if variant else [])
    model = create_model(cfg).eval().requires_grad_(False)
    for name, p in model.named_parameters():
        if not p.any():
            p.normal_(0.0, 0.05)
    return model


def save_tiny(model, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
