#!/usr/bin/env python3
"""Make the initial trainable colour-ControlNet checkpoint from a Stable Diffusion 2.1 checkpoint.

The ControlNet encoder is copied from the SD UNet, new input channels (v2/v3) start at zero so
the model initially predicts exactly what SD2.1 does, and the hint block and zero convs are
freshly initialised. Prints what was copied and what is new.

  python tool_add_control_sd21.py v2-1_512-ema-pruned.safetensors models/control_sd21_color_v2.safetensors
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from cldm.checkpoint import CheckpointError, load_state_dict, save_state_dict
from cldm.convert import init_from_sd
from cldm.model import DEFAULT_CONFIG, ConfigError, create_model, load_config

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_control(sd_path: str | Path, out_path: str | Path, config: str | Path = DEFAULT_CONFIG,
                variant: str | None = None, overrides: list[str] = (), allow_pickle: bool = False,
                dtype: str = "float32", seed: int = 0, overwrite: bool = False) -> str:
    """Write the initial checkpoint; returns the human-readable report."""
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise CheckpointError(f"{out_path} exists (use --overwrite to replace it)")
    overrides = list(overrides) + ([f"model.color_variant={variant}"] if variant else [])
    cfg = load_config(config, overrides)
    sd = load_state_dict(sd_path, allow_pickle=allow_pickle)
    torch.manual_seed(seed)  # the hint block's random init is reproducible
    model = create_model(cfg)
    state, report = init_from_sd(model, sd)
    del model, sd
    state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    save_state_dict(state, out_path, metadata={"color_variant": cfg.model.color_variant,
                                               "source": Path(sd_path).name, "made_by": "tool_add_control_sd21.py"})
    return f"colour variant {cfg.model.color_variant}, {len(state)} tensors -> {out_path}\n" + report.summary()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sd_ckpt", help="Stable Diffusion 2.1 512-base checkpoint (.safetensors or .ckpt)")
    p.add_argument("out_ckpt", help="output checkpoint; .safetensors (default) or .ckpt by extension")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="model YAML (default: %(default)s)")
    p.add_argument("--variant", choices=["v1", "v2", "v3"], help="colour variant (default: the config's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the written tensors")
    p.add_argument("--seed", type=int, default=0, help="seed for the hint block's random initialisation")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow full unpickling of a .ckpt that holds more than tensors (only for files you trust)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_CKPT if it exists")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.concat_to_unet=false")
    args = p.parse_args(argv)
    try:
        print(add_control(args.sd_ckpt, args.out_ckpt, args.config, args.variant, args.overrides,
                          args.allow_pickle, args.dtype, args.seed, args.overwrite))
    except (CheckpointError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
