#!/usr/bin/env python3
"""FLOPs of colourising one frame with DDIM, counted by torch's FlopCounterMode.

Runs on the `meta` device by default, so the real SD2.1 config needs no memory and no GPU.
Compares our path (per-sample work once, guidance scale 1) with the original project's
(reference VAE encode inside every step, classifier-free guidance on the blank prompt).

  python benchmarks/flops.py                      # real config, 512x512, 20 steps
  python benchmarks/flops.py --config models/cldm_tiny_color.yaml --size 64
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cldm.model import DEFAULT_CONFIG, create_model, load_config  # noqa: E402


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@torch.no_grad()
def sampling_flops(config=DEFAULT_CONFIG, size: int = 512, steps: int = 20, device: str = "meta",
                   overrides=()) -> dict[str, int]:
    """Per-part FLOPs of one frame (batch 1) and the totals of both ways of sampling."""
    with torch.device(device):
        model = create_model(load_config(config, overrides)).eval()
        hint = torch.rand(1, 4, size, size)
        x = torch.randn(1, 4, size // 8, size // 8)
        t = torch.tensor([500])
    context = model.get_learned_conditioning([""])
    parts: dict[str, int] = {}
    tokens = model.cond_stage_model.tokenize([""]).to(device)
    parts["text_encoder"] = _flops(lambda: model.cond_stage_model.encode_tokens(tokens))
    parts["vae_encode_reference"] = _flops(lambda: model.encode_first_stage(hint[:, :3] * 2 - 1)) \
        if model.color_variant != "v1" else 0
    if model.color_variant == "v3":
        parts["vae_encode_gray"] = parts["vae_encode_reference"]
    parts["hint_block"] = _flops(lambda: model.control_model.encode_hint(hint))
    cond = model.prepare_condition(hint, context=context)
    x_in = x if cond.concat is None else torch.cat([x, cond.concat], 1)
    parts["controlnet_step"] = _flops(lambda: model.control_model(x_in, cond.guided_hint, t, cond.context))
    control = model.control_model(x_in, cond.guided_hint, t, cond.context)
    parts["unet_step"] = _flops(lambda: model.model.diffusion_model(
        x_in if model.concat_to_unet else x, t, cond.context, control=control))
    parts["vae_decode"] = _flops(lambda: model.decode_first_stage(x))
    once = parts["text_encoder"] + parts["vae_encode_reference"] + parts.get("vae_encode_gray", 0) + parts["hint_block"]
    step = parts["controlnet_step"] + parts["unet_step"]
    parts["ours_total"] = once + steps * step + parts["vae_decode"]
    # The original: conditioning (VAE encode + hint block) rebuilt inside every model call, and
    # guidance on the blank prompt doubling every call.
    per_call = step + parts["vae_encode_reference"] + parts.get("vae_encode_gray", 0) + parts["hint_block"]
    parts["original_total"] = parts["text_encoder"] * 2 + steps * 2 * per_call + parts["vae_decode"]
    # The measured end-to-end run must agree with the sum of its parts.
    parts["ours_measured"] = _flops(lambda: model.decode_first_stage(model.sample(
        model.prepare_condition(hint, [""]), x_T=x, steps=steps)))
    return parts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="model YAML")
    p.add_argument("--size", type=int, default=512, help="frame size in pixels (square)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--device", default="meta", help="meta (no memory) or cpu")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = p.parse_args(argv)
    parts = sampling_flops(args.config, args.size, args.steps, args.device, args.overrides)
    for k, v in parts.items():
        print(f"{k:24s} {v / 1e12:10.3f} TFLOP")
    print(f"original / ours: {parts['original_total'] / parts['ours_total']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
