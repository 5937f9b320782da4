#!/usr/bin/env python3
"""Make the initial trainable colour-ControlNet checkpoint from a Stable Diffusion 2.1 checkpoint.

The ControlNet encoder is copied from the SD UNet, new input channels (v2/v3) start at zero so
the model initially predicts exactly what SD2.1 does, and the hint block and zero convs are
freshly initialised. Prints what was copied and what is new. The output format follows its
suffix: .safetensors (recommended) or .ckpt. With --dtype float16/bfloat16 the weights are
cast, but the 13 diffusion-schedule buffers (betas, alphas_cumprod, ...) stay float32. A file
that already holds a ControlNet (control_model.*: made by this tool, or trained) is refused.

  python tool_add_control_sd21.py v2-1_512-ema-pruned.safetensors models/control_sd21_color_v2.safetensors

SD2.1-768-v (v2-1_768-ema-pruned) has exactly the same tensor names and shapes as 512-base,
so only what the file says of itself tells them apart: one that declares what it predicts
(metadata modelspec.prediction_type or ss_v_parameterization, or an SD-layout YAML beside it
with parameterization) is refused under a config that predicts the other; one that does not
is accepted (a file whose name holds 768 gets a note under a config that predicts eps). The
768 model predicts v, not eps: use it only with a config that sets `parameterization: v` and
trains/samples at 768 (a copy of models/cldm_v21_color.yaml with those changes); the default
config is 512-base. SD2 inpainting, depth and unCLIP files are refused: their extra inputs
would read the colour inputs.

Exit status: 0 done, 2 bad input (arguments, config, checkpoint) or a full disk (one line on stderr;
nothing is left behind), 130 / 143 stopped by Ctrl-C / SIGTERM (nothing left behind either).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from cliutil import (MAX_SEED, OneLineParser, config_override, exit_quietly, out_file_problem, out_of_memory,
                     path_arg, quiet_startup_signals, run_cli, seed_arg)

if __name__ == "__main__":
    quiet_startup_signals()

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from safetensors import safe_open  # noqa: E402

from atomicio import remove_stale_temps  # noqa: E402
from cldm.checkpoint import CheckpointError, load_state_dict, save_checkpoint  # noqa: E402
from cldm.checkpoint_fit import CONTROL, guess_kind, not_text_to_image  # noqa: E402
from cldm.color import VARIANTS  # noqa: E402
from cldm.convert import init_from_sd  # noqa: E402
from cldm.config import DEFAULT_CONFIG, ConfigError, load_config  # noqa: E402
from cldm.model import create_control_net, create_model  # noqa: E402
from cldm.weights_config import declared_parameterization, parameterization_conflict  # noqa: E402
from ldm.schedule import schedule_buffers  # noqa: E402

PROG = "tool_add_control_sd21.py"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OUT_SUFFIXES = (".safetensors", ".ckpt")
VARIANT_KEY = "model.color_variant"


def header_shapes(path: str | Path) -> dict[str, list[int]]:
    """{name: shape} from a .safetensors header alone (no tensor is read); {} for other files and
    for headers that cannot be read (the loader then says what is wrong with the file)."""
    if Path(path).suffix != ".safetensors" or not Path(path).is_file():
        return {}
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception:
        return {}


def check_plain_sd(path: str | Path, shapes) -> None:
    """Refuse a file that already holds a ControlNet (converting it would replace its trained
    control_model.* tensors with a fresh copy of the UNet encoder), and SD2 weights of another
    task (inpainting's 9 inputs are v2's: its mask kernels would be copied as they are)."""
    if any(k.startswith(CONTROL) for k in shapes):
        raise CheckpointError(f"{path}: already a ControlNet/colour checkpoint ({guess_kind(shapes)}), "
                              "whose control_model.* weights this tool would replace; it takes a plain "
                              "Stable Diffusion 2.1 file such as v2-1_512-ema-pruned.safetensors")
    if shapes and (why := not_text_to_image(guess_kind(shapes))):
        raise CheckpointError(f"{path}: {why}")


def check_output(sd_path: str | Path, out_path: Path, overwrite: bool) -> None:
    """Everything about the output that can be wrong, checked before the (slow) load of a
    multi-GB file: suffix, an existing file or folder, the folder it goes in, and the SD
    file itself (through a symlink too), which --overwrite would replace."""
    if out_path.suffix not in OUT_SUFFIXES:
        raise ValueError(f"{out_path}: output must end in .safetensors (recommended) or .ckpt")
    if out_path.is_dir():
        raise ValueError(f"{out_path}: is a folder; give a file name for the output")
    if out_path.exists() and Path(sd_path).exists() and os.path.samefile(sd_path, out_path):
        raise ValueError(f"{out_path}: is the input checkpoint {sd_path} itself; write to another file")
    if os.path.lexists(out_path) and not overwrite:  # a broken link too: the output never replaces one
        raise CheckpointError(f"{out_path} exists (use --overwrite to replace it)")
    if problem := out_file_problem(None, out_path, new_folders=False):
        raise ValueError(problem)


def variant_overrides(variant: str | None, overrides: list[str]) -> list[str]:
    """`overrides` plus --variant as model.color_variant; the two disagreeing is refused
    rather than one silently winning."""
    given = [o.split("=", 1)[1].strip() for o in overrides if o.split("=", 1)[0].strip() == VARIANT_KEY]
    if variant and any(v != variant for v in given):
        raise ValueError(f"--variant {variant} contradicts the override {VARIANT_KEY}={given[-1]}; give one of them")
    return list(overrides) + ([f"{VARIANT_KEY}={variant}"] if variant else [])


def add_control(sd_path: str | Path, out_path: str | Path, config: str | Path = DEFAULT_CONFIG,
                variant: str | None = None, overrides: list[str] = (), allow_pickle: bool = False,
                dtype: str = "float32", seed: int = 0, overwrite: bool = False,
                note: Callable[[str], None] | None = None) -> str:
    """Write the initial checkpoint; returns the human-readable report. `note`: told when the SD
    file's name says 768-v, the config predicts eps and the file does not say what it predicts."""
    if str(out_path).endswith(("/", os.sep)):  # Path() drops it: out/x.safetensors/ was written as a file
        raise ValueError(f"{out_path}: ends in '/', as a folder's name does; give a file name for the output")
    out_path = Path(out_path)
    check_output(sd_path, out_path, overwrite)
    remove_stale_temps(out_path.parent)  # a killed run's hidden, whole-size output
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"--seed must be in 0..{MAX_SEED} (got {seed})")
    cfg = load_config(config, variant_overrides(variant, list(overrides)))
    check_plain_sd(sd_path, header_shapes(sd_path))  # safetensors: before the (slow) load
    declared = declared_parameterization(sd_path)
    if conflict := parameterization_conflict(sd_path, cfg.model.parameterization, declared):
        raise CheckpointError(conflict)
    if note is not None and "768" in Path(sd_path).name and cfg.model.parameterization == "eps" and declared is None:
        note(f"{Path(sd_path).name}: the name of SD2.1 768-v, which predicts v, but the config predicts eps "
             "(512-base); the file cannot tell which it is: for 768-v use a config with model.parameterization=v "
             "(and train and sample at 768)")
    sd = load_state_dict(sd_path, allow_pickle=allow_pickle)
    check_plain_sd(sd_path, sd)  # .ckpt: its names are only known once loaded
    # Only the shapes of the whole model are needed (meta: no memory); real values only for what
    # the SD file cannot give: the ControlNet's new layers and the schedule (from the config).
    with torch.device("meta"):
        model = create_model(cfg)
    with torch.random.fork_rng(devices=[]):  # the hint block's random init is reproducible; the caller's RNG kept
        torch.manual_seed(seed)
        fresh = {CONTROL + k: v for k, v in create_control_net(cfg).state_dict().items()}
    s = cfg.model.schedule
    fresh.update(schedule_buffers("linear", s.timesteps, s.linear_start, s.linear_end))
    try:
        # The schedule stays float32 in every SD checkpoint: in half precision alphas_cumprod near
        # 1 rounds, and the sampler's sqrt(1 - a) of the smallest timesteps changes a lot.
        state, report = init_from_sd(model, sd, fresh=fresh, dtype=DTYPES[dtype])
    except CheckpointError as e:  # its message says "checkpoint": name the file
        raise CheckpointError(f"{sd_path}: {e}") from None
    del sd, fresh
    # The config recorded in the file: later tools (latent cache, training) find it without --config.
    meta = {"color_variant": cfg.model.color_variant, "parameterization": cfg.model.parameterization,
            "config": OmegaConf.to_yaml(cfg, resolve=True), "source": Path(sd_path).name,
            "made_by": "tool_add_control_sd21.py"}
    try:  # without --overwrite, not over a file another run wrote since check_output
        save_checkpoint(state, out_path, metadata=meta, replace=overwrite)
    except FileExistsError:
        raise CheckpointError(f"{out_path} exists: written by another run meanwhile (use --overwrite to replace "
                              "it); this one was not written") from None
    return f"colour variant {cfg.model.color_variant}, {len(state)} tensors -> {out_path}\n" + report.summary()


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sd_ckpt", type=path_arg, help="Stable Diffusion 2.1 512-base checkpoint (.safetensors or .ckpt); "
                                   "768-v has the same keys and needs a v/768 config (see above)")
    p.add_argument("out_ckpt", type=path_arg, help="output checkpoint: .safetensors (recommended) or .ckpt, by suffix")
    p.add_argument("--config", type=path_arg, default=str(DEFAULT_CONFIG), help="model YAML (default: %(default)s)")
    p.add_argument("--variant", choices=sorted(VARIANTS),
                   help="colour variant (default: the config's); refused if an override sets another")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype of the written weights (schedule buffers stay float32; default: %(default)s)")
    p.add_argument("--seed", type=seed_arg, default=0,
                   help=f"seed for the hint block's random initialisation, 0..{MAX_SEED} (default: %(default)s)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow full unpickling of a .ckpt that holds more than tensors (only for files you trust)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_CKPT if it exists")
    p.add_argument("overrides", nargs="*", type=config_override, default=[], metavar="key=value",
                   help="config overrides, e.g. model.concat_to_unet=false")
    args = p.parse_intermixed_args(argv)  # key=value overrides may come before or after the options

    def run(args) -> int:
        try:
            report = add_control(args.sd_ckpt, args.out_ckpt, args.config, args.variant, args.overrides,
                                 args.allow_pickle, args.dtype, args.seed, args.overwrite,
                                 note=lambda msg: print(f"{PROG}: note: {msg}", file=sys.stderr))
        except (RuntimeError, MemoryError) as e:  # RuntimeError: torch's CPU allocator says it so
            if not out_of_memory(e):
                raise
            less = "; --dtype float16 needs about a third of the memory (BENCHMARKS.md)" \
                if args.dtype == "float32" else ""
            raise MemoryError(f"out of memory (RAM) making {args.out_ckpt} from {args.sd_ckpt}{less}; nothing was "
                              "written") from None
        print(report)
        return 0

    return run_cli(PROG, run, args, (CheckpointError, ConfigError, ValueError, OSError, MemoryError),
                   needs=("open_clip",))


if __name__ == "__main__":
    exit_quietly(main())
