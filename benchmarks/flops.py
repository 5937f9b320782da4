#!/usr/bin/env python3
"""FLOPs of colourising one frame with DDIM, counted by torch's FlopCounterMode.

Runs on the `meta` device by default, so the real SD2.1 config needs no memory and no GPU.
Compares our path (per-sample work once, guidance scale 1) with the original project's
(reference VAE encode inside every step, classifier-free guidance on the blank prompt).

  python benchmarks/flops.py                      # real config, 512x512, 20 steps (~1.5 min on CPU)
  python benchmarks/flops.py --config models/cldm_tiny_color.yaml --size 64
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.cliargs import HelpFormatter, check_sides  # noqa: E402
from cldm.color import needs_gray_latent, needs_ref_latent  # noqa: E402
from cldm.config import DEFAULT_CONFIG, ConfigError, load_config  # noqa: E402
from cldm.model import create_model  # noqa: E402
from cliutil import OneLineParser, config_override, positive_int, run_cli  # noqa: E402
from colorize.pipeline import check_steps  # noqa: E402
from ldm import schedule  # noqa: E402

PROG = "flops.py"


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch has no FLOP formula for SDPA's fused CPU kernel, so on CPU tensors attention would
# silently count 0; on meta SDPA runs its math path, whose FLOPs show up as aten.bmm.
CUSTOM_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}


def _is_attention(op) -> bool:
    """Ops that carry attention's FLOPs: SDPA kernels, or bmm (SDPA's math path; the UNet and
    ControlNet have no other batched matmul). Used for the per-step parts only."""
    name = str(op)
    return "scaled_dot_product" in name or name == "aten.bmm"


def _flops(fn) -> tuple[int, int]:
    """(total FLOPs, of which attention) of running fn."""
    with FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
        fn()
    by_op = counter.get_flop_counts().get("Global", {})
    return counter.get_total_flops(), sum(n for op, n in by_op.items() if _is_attention(op))


def meta_model(config=DEFAULT_CONFIG, overrides=(), device: str = "meta"):
    """ControlLDM built on `device` (meta: shapes only, no memory) with real schedule buffers.

    DDIM reads the schedule's values on the CPU (which timesteps, their alphas); meta tensors
    have none, so the 13 small buffers get their real values. They carry no FLOPs.
    """
    cfg = load_config(config, overrides)
    with torch.device(device):
        model = create_model(cfg).eval()
    s = cfg.model.schedule
    for name, value in schedule.schedule_buffers("linear", s.timesteps, s.linear_start, s.linear_end).items():
        model.register_buffer(name, value)
    return model


@torch.no_grad()
def sampling_flops(config=DEFAULT_CONFIG, size: int = 512, steps: int = 20, device: str = "meta",
                   overrides=()) -> dict[str, int]:
    """Per-part FLOPs of one frame (batch 1), both ways of sampling, and the measured end-to-end run.

    `ours_measured` counts the real path (prepare_condition with the blank prompt on a fresh
    model, DDIM, decode) in one go; it must equal `ours_total`, the sum of the parts, so a part
    the formula leaves out (or one that stops being counted) shows up as a difference.
    `*_attention` is the attention share of a step (see CUSTOM_FLOPS for why CPU needs help).
    """
    model = meta_model(config, overrides, device)
    with torch.device(device):
        hint = torch.rand(1, 4, size, size)
        x = torch.randn(1, 4, size // model.latent_factor, size // model.latent_factor)
        t = torch.tensor([500])
    parts: dict[str, int] = {}
    # First, while the prompt cache is empty, so the text encoder is part of the measured run.
    parts["ours_measured"], _ = _flops(lambda: model.decode_first_stage(model.sample(
        model.prepare_condition(hint, [""]), x_T=x, steps=steps)))
    context = model.get_learned_conditioning([""])
    tokens = model.cond_stage_model.tokenize([""])
    parts["text_encoder"], _ = _flops(lambda: model.cond_stage_model.encode_tokens(tokens))
    parts["vae_encode_reference"] = _flops(lambda: model.encode_first_stage(hint[:, :3] * 2 - 1))[0] \
        if needs_ref_latent(model.color_variant) else 0
    if needs_gray_latent(model.color_variant):
        parts["vae_encode_gray"] = _flops(lambda: model.encode_first_stage(hint[:, 3:].repeat(1, 3, 1, 1) * 2 - 1))[0]
    parts["hint_block"], _ = _flops(lambda: model.control_model.encode_hint(hint))
    cond = model.prepare_condition(hint, context=context)
    x_in = x if cond.concat is None else torch.cat([x, cond.concat], 1)
    parts["controlnet_step"], parts["controlnet_step_attention"] = _flops(
        lambda: model.control_model(x_in, cond.guided_hint, t, cond.context))
    control = model.control_model(x_in, cond.guided_hint, t, cond.context)
    parts["unet_step"], parts["unet_step_attention"] = _flops(lambda: model.model.diffusion_model(
        x_in if model.concat_to_unet else x, t, cond.context, control=control))
    parts["vae_decode"], _ = _flops(lambda: model.decode_first_stage(x))
    encodes = parts["vae_encode_reference"] + parts.get("vae_encode_gray", 0)
    once = parts["text_encoder"] + encodes + parts["hint_block"]
    step = parts["controlnet_step"] + parts["unet_step"]
    parts["ours_total"] = once + steps * step + parts["vae_decode"]
    # A clip shares the prompt and (fixed mode) the reference latent: what each frame costs there.
    parts["ours_per_frame_in_clip"] = parts["ours_total"] - parts["text_encoder"] - parts["vae_encode_reference"]
    # The original: conditioning (VAE encode + hint block) rebuilt inside every model call, and
    # guidance on the blank prompt doubling every call.
    per_call = step + encodes + parts["hint_block"]
    parts["original_total"] = parts["text_encoder"] * 2 + steps * 2 * per_call + parts["vae_decode"]
    return parts


def main(argv=None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="model YAML")
    p.add_argument("--size", type=positive_int, default=512,
                   help="frame size in pixels (square; a multiple of the model's, 64 for SD2.1)")
    p.add_argument("--steps", type=positive_int, default=20, help="DDIM steps")
    p.add_argument("--device", choices=["meta", "cpu"], default="meta", help="meta (no memory) or cpu")
    p.add_argument("overrides", nargs="*", type=config_override, metavar="key=value", help="config overrides")
    return run_cli(PROG, run, p.parse_args(argv), errors=(ConfigError, ValueError))


def run(args: argparse.Namespace) -> int:
    check_sides(args.config, args.overrides, size=args.size)  # and the config, before minutes of counting
    check_steps(load_config(args.config, args.overrides).model.schedule.timesteps, args.steps)
    parts = sampling_flops(args.config, args.size, args.steps, args.device, args.overrides)
    print(f"# {Path(args.config).name}, {args.size}x{args.size}, {args.steps} DDIM steps, batch 1, "
          f"device {args.device}, torch {torch.__version__}")
    scale, unit = (1e12, "TFLOP") if parts["ours_total"] >= 1e12 else (1e9, "GFLOP")
    for k, v in parts.items():
        print(f"{k:26s} {v / scale:10.3f} {unit}")
    print(f"original / ours: {parts['original_total'] / parts['ours_total']:.2f}x "
          f"(per frame in a clip: {parts['original_total'] / parts['ours_per_frame_in_clip']:.2f}x)")
    if parts["ours_measured"] != parts["ours_total"]:
        print(f"error: measured {parts['ours_measured']} FLOPs != sum of parts {parts['ours_total']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
