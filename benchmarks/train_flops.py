#!/usr/bin/env python3
"""FLOPs of one training sample (forward + backward), counted by torch's FlopCounterMode.

Runs the real training step (cldm.lightning.ColorControlModule.compute_loss, then
loss.backward()) on the `meta` device, so the SD2.1 config needs no memory and no GPU. On
meta, attention decomposes into counted matmuls (on CPU, SDPA's fused kernel is not counted
at all). The blank-prompt embedding is computed once per run, so it is not per-sample work.

"Model FLOPs" (for MFU) are counted without gradient checkpointing; with it on, the
recomputed forward adds hardware FLOPs that do no new work.

  python benchmarks/train_flops.py                       # real config, 512, latent cache
  python benchmarks/train_flops.py --no-latent-cache     # + the two VAE encodes per sample
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cldm.color import needs_gray_latent  # noqa: E402
from cldm.lightning import ColorControlModule  # noqa: E402
from benchmarks.cliargs import HelpFormatter, check_sides  # noqa: E402
from cldm.config import DEFAULT_CONFIG, ConfigError, load_config  # noqa: E402
from cldm.model import create_model  # noqa: E402
from cliutil import OneLineParser, config_override, positive_int, run_cli  # noqa: E402

PROG = "train_flops.py"

# Forward FLOPs by the module the step calls directly (FlopCounterMode names them by class;
# its attribution of backward ops to modules is unreliable, so parts are forward only).
PARTS = {"ControlledUnetModel": "fwd UNet", "ControlNet": "fwd ControlNet", "Sequential": "fwd hint block",
         "Encoder": "fwd VAE encode"}


def synthetic_batch(model, b: int, size: int, latent_cache: bool, device="meta") -> dict:
    """A dataset batch for `model` (a ControlLDM) of the right shapes (values don't matter for counting).

    With the latent cache it holds what PairDataset's latent mode yields: no image `jpg`.
    """
    with torch.device(device):
        batch = {"hint": torch.rand(b, size, size, 4), "txt": [""] * b}
        if latent_cache:
            lat = (b, model.latent_channels, size // model.latent_factor, size // model.latent_factor)
            batch.update(jpg_latent_mean=torch.randn(lat), jpg_latent_std=torch.rand(lat),
                         ref_latent_mean=torch.randn(lat))
            if needs_gray_latent(model.color_variant):
                batch["gray_latent_mean"] = torch.randn(lat)
        else:
            batch["jpg"] = torch.rand(b, size, size, 3) * 2 - 1
    return batch


def build_module(config=DEFAULT_CONFIG, overrides=(), checkpointing: bool = False, device="meta",
                 compile: bool = False):
    cfg = load_config(config, [*overrides, f"model.unet.use_checkpoint={str(checkpointing).lower()}"])
    with torch.device(device):
        model = create_model(cfg)
    module = ColorControlModule(model, sd_locked=cfg.model.sd_locked,
                                train_unet_input=cfg.model.get("train_unet_input", True), compile=compile)
    return module.train()


def training_flops(config=DEFAULT_CONFIG, size: int = 512, latent_cache: bool = True,
                   checkpointing: bool = False, overrides=()) -> dict[str, int]:
    """FLOPs per sample: 'total', 'forward', 'backward', and the forward by part (see PARTS)."""
    module = build_module(config, overrides, checkpointing)
    batch = synthetic_batch(module.model, 1, size, latent_cache)
    module.context([""])  # the blank prompt: once per run, not per sample

    with FlopCounterMode(display=False) as counter:
        loss = module.compute_loss(batch)
        forward = counter.get_total_flops()
        counts = counter.get_flop_counts()  # a copy: the forward's counts by module
        loss.backward()
        total = counter.get_total_flops()
    out = {"total": total, "forward": forward, "backward": total - forward}
    for cls, name in PARTS.items():
        out[name] = sum(counts.get(cls, {}).values())
    return out


def main(argv=None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="model YAML")
    p.add_argument("--size", type=positive_int, default=512,
                   help="training crop (pixels; a multiple of the model's, 64 for SD2.1)")
    p.add_argument("--latent-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="targets/reference latents from the cache or VAE-encoded in the step")
    p.add_argument("--checkpointing", action="store_true", help="count gradient checkpointing's recompute too")
    p.add_argument("overrides", nargs="*", type=config_override, metavar="key=value", help="config overrides")
    return run_cli(PROG, run, p.parse_args(argv), errors=(ConfigError, ValueError))


def run(a: argparse.Namespace) -> int:
    check_sides(a.config, a.overrides, size=a.size)  # and the config, before the count
    f = training_flops(a.config, a.size, a.latent_cache, a.checkpointing, a.overrides)
    print(f"{Path(a.config).name} {a.size}px, latent cache {'on' if a.latent_cache else 'off'}, "
          f"checkpointing {'on' if a.checkpointing else 'off'}: FLOPs per training sample")
    for k, v in f.items():
        print(f"  {k:14s} {v / 1e9:11.3f} GFLOP")
    return 0


if __name__ == "__main__":
    sys.exit(main())
