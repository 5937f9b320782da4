"""Tiny models and batches for the training tests (importable, unlike conftest)."""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from annotator.pairs import BuildOptions, build_movie
from cldm.convert import init_from_sd
from cldm.config import TINY_CONFIG, load_config
from cldm.model import create_model
from tests.annotator.clips import panning_clip, write_folder


def tiny_sd_state(seed: int = 0) -> dict[str, torch.Tensor]:
    return dict(_tiny_sd_state(seed))  # callers may add or drop keys, never write into tensors


@functools.lru_cache(maxsize=4)
def _tiny_sd_state(seed: int) -> dict[str, torch.Tensor]:
    """A plain-SD-format tiny state dict standing in for trained SD weights.

    A fresh UNet's zero-initialised output layers make it predict 0 and block every gradient,
    so those layers get small random weights; the rest keeps PyTorch's default init.
    """
    torch.manual_seed(seed)
    model = create_model(load_config(TINY_CONFIG, ["model.color_variant=v1"]))
    with torch.no_grad():
        for p in model.model.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.02)
    return {k: v for k, v in model.state_dict().items() if not k.startswith("control_model.")}


def tiny_model(variant: str = "v2", seed: int = 0, overrides=(), sd: dict | None = None):
    """A tiny ControlLDM initialised from `tiny_sd_state` the way tool_add_control_sd21.py does."""
    cfg = load_config(TINY_CONFIG, [f"model.color_variant={variant}", *overrides])
    sd = tiny_sd_state(seed) if sd is None else sd
    torch.manual_seed(seed + 1)
    model = create_model(cfg)
    state, _ = init_from_sd(model, sd)
    model.load_state_dict(state)
    return model


def tiny_batch(b: int = 2, size: int = 64, seed: int = 0) -> dict:
    """A dataset-style batch: HWC `hint` in [0, 1], `jpg` in [-1, 1], blank prompts."""
    g = torch.Generator().manual_seed(seed)
    # smooth images: a few random colours upsampled, so the VAE sees image-like inputs
    rgb = torch.nn.functional.interpolate(torch.rand(b, 3, 4, 4, generator=g), size=size, mode="bilinear")
    ref = torch.nn.functional.interpolate(torch.rand(b, 3, 4, 4, generator=g), size=size, mode="bilinear")
    gray = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2])[:, None]
    batch = {"hint": torch.cat([ref, gray], 1).permute(0, 2, 3, 1).contiguous(),
             "jpg": (rgb * 2 - 1).permute(0, 2, 3, 1).contiguous(), "txt": [""] * b}
    return batch


def tiny_data_root(root: Path, movies: int = 2, frames: int = 8, height: int = 64, width: int = 96,
                   image_format: str = "jpg") -> Path:
    """A DATA_ROOT (`root/data`) built by build_pairs' library code from short panning clips.

    Movie k (`m0`, `m1`, ...) pans 2 px per frame over its own texture; frames are stored at
    `height` x `width` (the short side is the build size), so adjacent frames pair up.
    """
    for k in range(movies):
        src = write_folder(panning_clip(frames, height, width, speed=2, seed=k), root / "src" / f"m{k}")
        build_movie(src, root / "data", f"m{k}",
                    BuildOptions(size=min(height, width), window=3, threads=1, image_format=image_format))
    return root / "data"


class FakeTrainer:
    """What ReplicaCheck and ImageLogger read of a Trainer: one process at step 1, no loggers."""

    global_step, is_global_zero, loggers = 1, True, []

    class precision_plugin:
        @staticmethod
        def forward_context():
            return contextlib.nullcontext()


def training_ckpt(path, step):
    """A file resume_problem accepts: the keys Lightning and on_save_checkpoint write, no tensors."""
    from cldm.callbacks import AtomicCheckpointIO
    from cldm.resume import LIGHTNING_KEYS, TRAINING_KEY

    AtomicCheckpointIO().save_checkpoint({**{k: {} for k in LIGHTNING_KEYS}, "global_step": step, TRAINING_KEY: {}},
                                         path)
    return path


def first_process(monkeypatch):
    """Run as the launch's first process (global rank 0): no rank variables from the environment."""
    for key in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)


def saving(module, world_size=1, accumulate=1):
    """`module` as a Trainer leaves it when it saves a checkpoint, for what the checkpoint records of it."""
    from types import SimpleNamespace

    module.trainer = SimpleNamespace(world_size=world_size, accumulate_grad_batches=accumulate)
    return module
