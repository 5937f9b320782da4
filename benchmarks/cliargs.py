"""Command-line checks the benchmark scripts share, so a bad argument is one line and exit 2
before any work (cliutil.run_cli reports what the libraries raise), not a traceback or a
nonsense number minutes later."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from atomicio import write_bytes_atomic
from cliutil import DefaultsFormatter


class HelpFormatter(DefaultsFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring's examples kept as written, and each flag's default shown."""


def check_sides(config, overrides=(), **sides: int) -> None:
    """Refuse image sides the model cannot take (ValueError naming the flag); also loads the
    config, so a missing file or bad override (ConfigError) is refused before the run, not after.

    The multiple is the model's own (ControlLDM.size_multiple: 64 for SD2.1, 32 for the tiny
    config), read from a model built on the meta device (well under a second for SD2.1)."""
    import torch

    from cldm.config import load_config

    from cldm.model import create_model

    with torch.device("meta"):
        multiple = create_model(load_config(config, overrides)).size_multiple
    for flag, side in sides.items():
        if side < 1 or side % multiple:
            raise ValueError(f"--{flag.replace('_', '-')} {side}: must be a positive multiple of {multiple} for "
                             f"{Path(config).name} (the VAE and the UNet's downsampling)")


def json_problem(path: str | os.PathLike | None) -> str | None:
    """Why --json PATH could not be written at the end of a run (checked before it), else None."""
    if path is None:
        return None
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        return f"--json {path}: is a folder"
    if not folder.is_dir():
        return f"--json {path}: no folder {folder}"
    if not os.access(folder, os.W_OK):
        return f"--json {path}: folder {folder} is not writable"
    return None


def write_json(path: str | os.PathLike, result: dict) -> None:
    """Written whole or not at all (atomicio), so a killed run leaves no half file."""
    write_bytes_atomic(path, json.dumps(result, indent=1).encode())
