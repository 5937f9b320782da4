"""A training run's folder (OUT): which config and checkpoint a run continues from, and what it refuses.

OUT/config.yaml is the resolved config a run started with (written once it is known to start);
OUT/checkpoints/ holds its Lightning checkpoints, named by step. Rerunning the same command
continues the run, so OUT decides the config and the step, and a command that would mix two
runs' histories in one OUT is refused before anything is written.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Sequence

from omegaconf import DictConfig, OmegaConf

from atomicio import folder_lock, write_bytes_atomic
from cldm.launch import is_launch_rank_zero
from cldm.resume import checkpoint_step, find_resume_checkpoint, read_training_checkpoint, resume_problem
from cldm.trainable import TRAINING_KEY
from cldm.weights_config import (config_difference, config_hash, config_hashes, differing_keys, model_leaves,
                                 resolve_config)
from cliutil import file_problem

RUN_LOCK = ".run.lock"  # in OUT, held by the launching process while a run uses OUT
RESUME = "rerun the same command to resume from the newest checkpoint"
NO_CHECKPOINT = "no checkpoint saved yet (see --ckpt-every); rerun the same command to start over"


class RunDirError(ValueError):
    """OUT, or the checkpoint asked for, cannot continue this command's run (one line, bad input)."""


@contextlib.contextmanager
def run_lock(out: str | os.PathLike) -> Iterator[None]:
    """Held for a whole run by the process that writes to OUT first (is_launch_rank_zero), so that
    a second run on the same OUT (the command started twice, a requeued job whose first one still
    runs) is refused, rather than deleting the first's checkpoint being written and resuming
    from its history. A killed run's lock dies with it. An OUT made for the lock alone is
    removed again if the run leaves it empty (refused on its input, say)."""
    out = Path(out)
    with folder_lock(out, RUN_LOCK) as mine:
        if not mine:
            raise RunDirError(f"--out {out} is in use by another training run (it holds {out / RUN_LOCK}); "
                              "wait for it to end, or give another --out")
        yield


def rerun_hint(out: str | os.PathLike) -> str:
    """What rerunning the command does after a stop: resume, or start over when OUT has no checkpoint."""
    return RESUME if find_resume_checkpoint(Path(out) / "checkpoints") is not None else NO_CHECKPOINT


def config_source(out: str | os.PathLike, init: str | os.PathLike, config: str | os.PathLike | None = None,
                  resume: str = "auto") -> Path | DictConfig:
    """`config` if given; else, resuming (OUT/checkpoints holds a checkpoint), the run's own
    OUT/config.yaml (with its train: values, which flags given now override); else the config
    inference takes for `init` (a YAML beside it, the config it records, SD2.1's). So neither a
    run of the toy model nor its resume needs --config."""
    recorded = Path(out) / "config.yaml"
    # a run stopped before its first checkpoint leaves config.yaml but nothing to resume: a new start
    if config is None and resume != "never" and recorded.is_file() \
            and find_resume_checkpoint(Path(out) / "checkpoints") is not None:
        return recorded
    return resolve_config(init, config)


def check_run_dir(out: str | os.PathLike, cfg: DictConfig, given: Sequence[tuple[str, str]] = ()) -> None:
    """Refuse to continue OUT's checkpoints with another model config (as config_hash counts it),
    naming the first model key that differs. `given`: (what the command said, the config key it
    sets) for --config, overrides and flags; those that set a differing key are named as what to
    leave out."""
    saved = Path(out) / "config.yaml"
    if not saved.is_file() or find_resume_checkpoint(Path(out) / "checkpoints") is None:
        return
    recorded = OmegaConf.load(saved)
    if config_hash(recorded) == config_hash(cfg):
        return
    what, culprits = _difference(recorded, cfg, given)
    remedy = (f"leave out {' and '.join(culprits)} to continue the run (it has its own config.yaml), or use another "
              "--out for a new run") if culprits else "use another --out for a new run"
    raise RunDirError(f"{out} holds checkpoints of another model config ({saved}): {what}; {remedy}")


def _difference(recorded: DictConfig, cfg: DictConfig, given: Sequence[tuple[str, str]]) -> tuple[str, list[str]]:
    """('model.k is A there, B in this command's (n key(s) differ)', what in `given` sets a differing key)."""
    theirs, ours = model_leaves(recorded), model_leaves(cfg)
    diff, note = differing_keys(theirs, ours), ""
    if not diff:  # equal numbers the hash tells apart (1 and 1.0): name them rather than no key at all
        diff = [k for k in sorted(theirs.keys() & ours.keys()) if type(theirs[k]) is not type(ours[k])]
        note = " (the same number written differently: write it as there)" if diff else ""
    what = config_difference(theirs, ours, diff, "this command's") + note if diff else "another model config"
    return what, _culprits(diff, given)


def _culprits(diff: Sequence[str], given: Sequence[tuple[str, str]]) -> list[str]:
    """What in `given` decides a key of `diff`: the settings of the key itself or of the nearest
    section above it ("model" for --config); an override of the key decides it, not --config."""
    culprits = set()
    for k in diff:
        setters = [(said, key) for said, key in given if f"model.{k}.".startswith(key + ".")]
        nearest = max((len(key) for _, key in setters), default=0)
        culprits.update(said for said, key in setters if len(key) == nearest)
    return [said for said, _ in given if said in culprits]


def check_resume_config(resume: Path | None, cfg: DictConfig, given: Sequence[tuple[str, str]] = ()) -> None:
    """Refuse, before anything is written to OUT, a checkpoint to resume from that was trained under
    another model config (the hash it records): a fork (--resume PATH into a new OUT) with other
    model settings, or an OUT whose config.yaml is gone. Lightning's restore refused it only after
    OUT/config.yaml had been rewritten with the refused config, which the next plain rerun then
    took. Names the first differing key by the checkpoint's run folder's config.yaml, or else by the
    config its hyperparameters keep; only the hashes where it has neither."""
    ckpt = read_training_checkpoint(resume) if resume is not None else None
    recorded = ckpt[TRAINING_KEY].get("config_hash") if ckpt is not None else None
    ours = config_hashes(cfg)
    if not recorded or recorded in ours:
        return
    saved = Path(resume).parent.parent / "config.yaml"
    try:
        run_cfg = OmegaConf.load(saved) if saved.is_file() else None
    except Exception:  # unreadable: fall back to the hashes
        run_cfg = None
    if run_cfg is not None and recorded in config_hashes(run_cfg):
        source, trained = f"({saved})", run_cfg
    else:  # config.yaml gone, unreadable or changed since: the config the checkpoint's hparams keep
        trained = _kept_config(ckpt, recorded)
        source = f"(the one the checkpoint records{f'; {saved} was changed since' if run_cfg is not None else ''})"
    if trained is not None:
        what, culprits = _difference(trained, cfg, given)
        remedy = f"; leave out {' and '.join(culprits)} to continue it" if culprits else ""
        raise RunDirError(f"{resume}: trained with another model config {source}: {what}{remedy}")
    raise RunDirError(f"{resume}: trained with another model config (hash {recorded}, this config's {ours[0]}); "
                      "pass the --config and model settings it was trained with")


def _kept_config(ckpt: dict, recorded: str) -> DictConfig | None:
    """The config a training checkpoint's hyperparameters keep, where it gives the hash the
    checkpoint recorded (else None: not to be trusted for naming a key)."""
    kept = (ckpt.get("hyper_parameters") or {}).get("config")
    if not (isinstance(kept, dict) and "model" in kept):
        return None
    kept = OmegaConf.create(kept)
    return kept if recorded in config_hashes(kept) else None


def record_config(out: str | os.PathLike, cfg: DictConfig) -> None:
    """OUT/config.yaml: the resolved config of the run (written once the run is known to start)."""
    if is_launch_rank_zero():
        Path(out).mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(Path(out) / "config.yaml", OmegaConf.to_yaml(cfg).encode())


def resolve_resume(resume: str, ckpt_dir: Path) -> Path | None:
    """The checkpoint --resume (auto, never or a path) means, by this process's own listing of
    `ckpt_dir`. Every process runs this before the process group exists; ResumeAgreement then
    stops the run, on all of them, unless they all chose what global rank 0 chose."""
    if resume == "auto":
        return auto_resume(ckpt_dir)
    if resume == "never":
        if find_resume_checkpoint(ckpt_dir) is not None:
            raise RunDirError(f"{ckpt_dir} already holds checkpoints; use --resume auto or another --out")
        return None
    return checked_resume_path(Path(resume), ckpt_dir)


def auto_resume(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint, if it can be resumed from. A bad newest file is refused
    rather than skipped: every rerun (a SLURM requeue too) would otherwise meet it again, or
    silently train on from an older step."""
    path = find_resume_checkpoint(ckpt_dir)
    if path is not None and (problem := resume_problem(path)):
        raise RunDirError(f"{path}: {problem}; move it out of {ckpt_dir}, or pass --resume PATH")
    return path


def checked_resume_path(path: Path, ckpt_dir: Path) -> Path:
    """--resume PATH, refused where it would leave two histories in `ckpt_dir`: pruning to
    --ckpt-keep and a later --resume auto go by the highest step, i.e. maybe by the abandoned one."""
    if problem := file_problem(path, folder="a folder, not a checkpoint file"):
        raise RunDirError(f"--resume {path}: {problem}")
    if problem := resume_problem(path):
        raise RunDirError(f"--resume {path}: {problem}")
    newest = find_resume_checkpoint(ckpt_dir)
    if newest is None:
        return path  # a new or empty OUT: starting from any run's checkpoint forks it
    if path.resolve().parent != ckpt_dir.resolve():
        raise RunDirError(f"--resume {path}: from outside {ckpt_dir}, which holds this run's own checkpoints "
                          f"(newest {newest.name}); fork into another --out, or move them away")
    if checkpoint_step(newest) > checkpoint_step(path):
        raise RunDirError(f"--resume {path}: {ckpt_dir} already holds a later checkpoint ({newest.name}); "
                          "move the later ones away, or resume into another --out")
    return path
