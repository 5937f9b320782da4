"""Training checkpoints on disk: which are complete, which one to resume from, whether one fits
a config (`resume_misfit`, also for `inspect`), and whether every process of a run agrees.

Lightning-free (torch only), so checks such as `resume_problem` cost no Lightning import; the
writers and callbacks that produce these files are in cldm/callbacks.py.
"""
from __future__ import annotations

import re
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch

from atomicio import temp_glob
from cldm.checkpoint import CheckpointError, pickled_globals
from cldm.checkpoint_fit import LoadReport, compare_state_dict, misfit
from cldm.cldm import ControlLDM
from cldm.trainable import MODULE_PREFIX, TRAINING_KEY, export_keys

STEP_RE = re.compile(r"step=(\d+)")


def is_complete_checkpoint(path: str | Path) -> bool:
    """Cheap completeness test: torch.save writes a zip whose directory is at the very end."""
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


# What Lightning reads to resume a run (ColorControlModule.on_save_checkpoint adds TRAINING_KEY).
LIGHTNING_KEYS = ("pytorch-lightning_version", "global_step", "state_dict", "optimizer_states", "lr_schedulers",
                  "loops")


def resume_problem(path: str | Path) -> str | None:
    """Why `path` cannot be resumed from (one line), or None for a training checkpoint of this project.

    Reads only the checkpoint's pickle, with weights_only (no code runs) and the tensors
    memory-mapped, so a multi-GB file costs little. Catches what a zip check lets through,
    such as the --init file saved as .ckpt, before Lightning fails on it with a traceback.
    """
    return _read_training(path)[1]


def read_training_checkpoint(path: str | Path) -> dict | None:
    """The top level of a Lightning training checkpoint of this project (OUT/checkpoints/*.ckpt),
    or None for any other file (`resume_problem` says why)."""
    if Path(path).suffix == ".safetensors":
        return None
    ckpt, problem = _read_training(path)
    if problem is not None:
        return None
    if not isinstance(ckpt.get("state_dict"), dict) or not isinstance(ckpt[TRAINING_KEY], dict):
        return None
    return ckpt if all(str(k).startswith(MODULE_PREFIX) for k in ckpt["state_dict"]) else None


def _read_training(path: str | Path) -> tuple[dict | None, str | None]:
    """(top level, None) of a training checkpoint of this project, else (None, why not); read once."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # no code runs
    except Exception as e:
        if needs := pickled_globals(path):  # e.g. Lightning 1.x's AttributeDict hyper-parameters: not damaged
            return None, (f"holds pickled Python objects ({', '.join(needs[:2])}{', ...' * (len(needs) > 2)}), "
                          "which this training's checkpoints never do: another project's or Lightning 1.x's "
                          "checkpoint, which cannot be resumed")
        return None, f"truncated, or not a checkpoint written by this training ({type(e).__name__})"
    if not isinstance(ckpt, dict):
        return None, f"holds a {type(ckpt).__name__}, not a training checkpoint"
    missing = [k for k in LIGHTNING_KEYS if k not in ckpt]
    if missing and "pytorch-lightning_version" in ckpt:  # Lightning < 1.6 wrote no loops
        return None, (f"a Lightning {ckpt['pytorch-lightning_version']} checkpoint without {missing[0]!r} (weights "
                      "only, Lightning before 1.6, or another project's), which cannot be resumed")
    if missing:
        return None, (f"not a Lightning training checkpoint (no {missing[0]!r}; an --init or exported file holds "
                      "weights only); resume from a file in OUT/checkpoints")
    if TRAINING_KEY not in ckpt:
        return None, f"a Lightning checkpoint, but not of this training (no {TRAINING_KEY!r} entry)"
    return ckpt, None


def resume_misfit(model: ControlLDM, ours: str, trained: dict, info: dict,
                  also: Sequence[str] = ()) -> tuple[LoadReport, str | None]:
    """How a training checkpoint fits resuming `model` (set up by configure_trainable) under the
    config of hash `ours` (config_hash; `also`: other hashes it may record, config_hashes), and
    why it would not (None: it would). `trained`: its
    tensors under the model's names, `info`: its TRAINING_KEY entry. It must hold exactly the
    tensors that train (export_keys) in their shapes, for the same model config; a resume
    (ColorControlModule.on_load_checkpoint) also checks the locked weights, which only the
    --init file has."""
    own = model.state_dict()
    report = compare_state_dict({k: own[k] for k in export_keys(model)}, trained)
    if report.mismatched:
        return report, misfit(report)
    policy = "model.sd_locked and model.train_unet_input say which train"
    if n := len(report.missing):
        return report, f"lacks {n} tensor{'s' * (n > 1)} that this config trains (e.g. {report.missing[0]}; {policy})"
    if n := len(report.unexpected):
        return report, (f"holds {n} tensor{'s' * (n > 1)} that this config does not train (e.g. "
                        f"{report.unexpected[0]}; {policy})")
    recorded = info.get("config_hash")
    if recorded and ours and recorded != ours and recorded not in also:
        return report, f"trained with another model config (hash {recorded}, this config's {ours})"
    return report, None


def _step_files(dirpath: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every step=N .ckpt under `dirpath`, complete or not, oldest step first."""
    found = []
    for p in Path(dirpath).glob("*.ckpt") if Path(dirpath).is_dir() else []:
        if m := STEP_RE.search(p.name):
            found.append((int(m.group(1)), p))
    return sorted(found)


def list_checkpoints(dirpath: str | Path) -> list[tuple[int, float, Path]]:
    """(step, mtime, path) of the complete step checkpoints under `dirpath`, oldest step first."""
    return [(step, p.stat().st_mtime, p) for step, p in _step_files(dirpath) if is_complete_checkpoint(p)]


def incomplete_checkpoints(dirpath: str | Path) -> list[Path]:
    """Step checkpoints under `dirpath` that are not whole files (a copy cut short, say).

    Never a save in progress: AtomicCheckpointIO writes under a temp name and renames. Still,
    a final name may belong to someone else's copy in progress, so these are neither resumed
    from, nor counted toward keep, nor deleted.
    """
    return [p for _, p in _step_files(dirpath) if not is_complete_checkpoint(p)]


def checkpoint_step(path: str | Path) -> int:
    """The optimiser step a checkpoint was saved at: from its name (step=N), else its contents."""
    m = STEP_RE.search(Path(path).name)
    if m:
        return int(m.group(1))
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0))


def find_resume_checkpoint(dirpath: str | Path) -> Path | None:
    """The complete checkpoint of the highest step under `dirpath`, or None."""
    found = list_checkpoints(dirpath)
    return found[-1][2] if found else None


class ResumeMismatchError(CheckpointError):
    """Processes of one run picked different checkpoints to resume from."""


def check_same_resume(path: str | Path | None) -> None:
    """Raise ResumeMismatchError on every process unless all resume from global rank 0's choice.

    Each process picks its resume checkpoint by listing OUT/checkpoints itself, before the
    process group exists (torchrun and SLURM start them all at once, on several nodes). On a
    shared filesystem whose view lags on some node, a process could see an older newest
    checkpoint, resume from it, and train on different weights than the others. Called once
    the group exists and before anything is restored; all processes reach the same verdict,
    so none is left waiting in a collective. A no-op without a process group.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    mine = None if path is None else str(path)
    chosen = [None] * dist.get_world_size()
    dist.all_gather_object(chosen, mine)
    odd = [r for r, c in enumerate(chosen) if c != chosen[0]]
    if odd:
        def name(c):
            return c or "none (fresh start)"
        raise ResumeMismatchError(
            f"processes chose different checkpoints to resume from: global rank 0 {name(chosen[0])}, rank "
            f"{odd[0]} {name(chosen[odd[0]])} ({len(odd)} rank(s) differ); is --out on a shared filesystem that "
            "every node sees up to date? Rerun, or pass --resume with rank 0's file")


def _remove_matching(folder: str | Path, patterns: Sequence[str]) -> list[Path]:
    """Delete the files of `folder` that match any of the glob `patterns` (none if no folder)."""
    gone = []
    for pattern in patterns if Path(folder).is_dir() else ():
        for p in sorted(Path(folder).glob(pattern)):
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def remove_partial_checkpoints(dirpath: str | Path) -> list[Path]:
    """Delete temp files that a killed save left behind."""
    return _remove_matching(dirpath, [".*.tmp"])


# What a run writes in OUT besides its checkpoints, and whether its temporary name keeps the
# suffix (atomicio): the export (as large as the ControlNet: ~1.5 GB for SD2.1's), its YAML,
# the config, the replica check, the image grids
RUN_FILES = (("control.safetensors", False), ("control.yaml", True), ("config.yaml", True),
             ("replicas.json", True), ("images/step-*.png", True))


def remove_partial_run_files(out: str | Path) -> list[Path]:
    """Delete the temp files a run killed while writing in OUT (SIGKILL, a power cut) left
    beside the export and its other files; checkpoints: remove_partial_checkpoints."""
    return _remove_matching(out, [temp_glob(name, keep_suffix) for name, keep_suffix in RUN_FILES])
