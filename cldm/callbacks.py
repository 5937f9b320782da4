"""Lightning plug-ins around ColorControlModule: crash-safe checkpoint writing and pruning,
the resume agreement between processes, the image logger and the DDP replica check.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

from atomicio import atomic_path, write_bytes_atomic
from cldm.resume import check_same_resume, list_checkpoints
from cldm.trainable import export_keys


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temp file in the same folder, fsync, then rename over the final name.

    A kill at any moment leaves either the previous file or the complete new one, never a
    truncated checkpoint under a `.ckpt` name (temp names start with '.' and end in '.tmp').
    Checkpoints get the permissions of an ordinary new file (0666 less the umask).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if "://" in str(path):  # remote storage: Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, fsync=True, keep_suffix=False) as tmp, open(tmp, "wb") as f:
            try:
                torch.save(checkpoint, f)
            except Exception as e:
                interrupt = _interruption(e)
                if interrupt is not None:
                    raise interrupt from None  # Lightning ends an interrupted run cleanly
                failed = _write_error(e)
                if failed is None:
                    raise
                raise OSError(failed.errno, failed.strerror, str(path)) from None


def _under(e: BaseException | None, wanted) -> BaseException | None:
    """The first error in `e`'s context chain, `e` first, that `wanted` accepts; a cycle ends
    the search."""
    seen = set()
    while e is not None and id(e) not in seen:
        if wanted(e):
            return e
        seen.add(id(e))
        e = e.__context__
    return None


def _write_error(e: BaseException) -> OSError | None:
    """The failed write under `e`, if any: the zip writer says only 'unexpected pos' over a full
    disk's ENOSPC."""
    return _under(e, lambda x: isinstance(x, OSError) and x.errno is not None)


def _interruption(e: BaseException) -> BaseException | None:
    """The Ctrl-C (or exit) under `e`, if any: torch.save's zip writer, closed after a write that a
    KeyboardInterrupt cut short, raises its own RuntimeError ('unexpected pos') over it, which
    would turn an interrupted run into a crash."""
    return _under(e, lambda x: not isinstance(x, Exception))


class StepCheckpoint(ModelCheckpoint):
    """Keep the newest `keep` checkpoints, one every `every_n_steps`, plus one at the final step.

    Lightning saves them all (save_top_k=-1); pruning is ours, by the step in the file names of
    the whole folder: ModelCheckpoint forgets files of earlier runs (the one resumed from, or
    all of them when --ckpt-every changed), which would pile up, a few GB each.
    """

    def __init__(self, dirpath, every_n_steps: int, keep: int):
        super().__init__(dirpath=dirpath, filename="step={step:08d}", auto_insert_metric_name=False,
                         monitor="step", mode="max", save_top_k=-1, every_n_train_steps=every_n_steps,
                         save_last=False, enable_version_counter=False, save_on_train_epoch_end=False)
        self.keep = keep

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        # Private ModelCheckpoint API, as in on_train_end: a resume does not restore it, so under
        # --accumulate the first batch (no optimiser step yet) rewrote the checkpoint resumed
        # from, one batch into the next window.
        self._last_global_step_saved = trainer.global_step

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        super().on_train_batch_end(trainer, *args, **kwargs)
        self.prune(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        # Private ModelCheckpoint API (tested by a resume without periodic checkpoints in
        # tests/scripts/test_train.py): a run that ends between two save points stays resumable.
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
        self.prune(trainer)

    def prune(self, trainer) -> None:
        if trainer.is_global_zero:
            for _, _, path in list_checkpoints(self.dirpath)[:-self.keep]:
                path.unlink(missing_ok=True)


class ResumeAgreement(Callback):
    """Before Lightning restores a checkpoint, check that every process resumes from the one
    global rank 0 chose (`check_same_resume`); `ckpt_path` is what this process passes to fit."""

    def __init__(self, ckpt_path: str | Path | None):
        self.ckpt_path = ckpt_path

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Trainer._run: setup_environment (process group) -> setup hooks -> restore
        check_same_resume(self.ckpt_path)


class StepLines(Callback):
    """Where no progress bar is drawn (--no-progress, or stderr no terminal: a scheduler's log),
    global rank 0 prints a plain line every `every` optimiser steps: the step, the loss and
    learning rate logged for it, and the seconds per step so far. Such a log said nothing
    between the start and the end of a run (and a bar in it is carriage returns)."""

    def __init__(self, every: int, file=None):
        self.every, self.file = max(1, every), file
        self._last, self._start = -1, None

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = (time.perf_counter(), trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last or step % self.every or not trainer.is_global_zero or self._start is None:
            return
        self._last = step  # with gradient accumulation several batches end at one step
        seconds = (time.perf_counter() - self._start[0]) / max(1, step - self._start[1])
        metrics = trainer.callback_metrics
        said = [f"step {step}" + (f"/{trainer.max_steps}" if trainer.max_steps > 0 else "")]
        if "train/loss" in metrics:
            said.append(f"loss {float(metrics['train/loss']):.4g}")
        lr = next((float(v) for k, v in metrics.items() if k.startswith("lr-")), None)
        if lr is not None:
            said.append(f"lr {lr:.3g}")
        print(f"{', '.join(said)}, {seconds:.3g} s/step", file=self.file or sys.stdout, flush=True)


GRID_COLUMNS = ("reference", "gray (input)", "DDIM sample", "ground truth")
LATENT_TRUTH = "truth (VAE decode)"  # latent-cache batches hold no image: the cached latent, decoded
MIN_GRID_TILE = 128  # px: smaller tiles (a 64 px tiny run's) are enlarged, by a whole factor


def labelled_grid(grid: torch.Tensor, labels: Sequence[str]) -> torch.Tensor:
    """`grid` (3, H, W) in [0, 1], `len(labels)` tiles a row with make_grid's 2 px padding, under a
    header naming each column, tiles enlarged (nearest) to at least MIN_GRID_TILE px wide. A bare
    grid of four look-alike columns (the reference and the truth are near frames by design) was
    read by the documentation's order alone."""
    img = (grid.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    tile = max(1, (img.shape[1] - 2) // len(labels) - 2)
    k = math.ceil(MIN_GRID_TILE / tile)
    img = np.repeat(np.repeat(img, k, axis=0), k, axis=1) if k > 1 else img
    head = np.full((30, img.shape[1], 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    for c, label in enumerate(labels):
        scale = 0.55
        while scale > 0.3 and cv2.getTextSize(label, font, scale, 1)[0][0] > tile * k - 4:
            scale -= 0.05
        (w, h), _ = cv2.getTextSize(label, font, scale, 1)
        x = round((2 + c * (tile + 2) + tile / 2) * k - w / 2)
        cv2.putText(head, label, (max(0, x), 15 + h // 2), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return torch.from_numpy(np.concatenate([head, img])).permute(2, 0, 1).float() / 255


class ImageLogger(Callback):
    """Every `every_n_steps` optimiser steps, rank 0 writes a reference | gray | sample | truth grid.

    PNG to `out_dir/step-XXXXXXXX.png` and the image to TensorBoard, with a header naming the
    columns (labelled_grid). Sampling is DDIM with a fixed seed, under the run's precision.
    """

    def __init__(self, out_dir, every_n_steps: int = 500, n: int = 4, ddim_steps: int = 20, seed: int = 0):
        self.out_dir, self.every, self.n, self.ddim_steps, self.seed = Path(out_dir), every_n_steps, n, ddim_steps, seed
        self._last = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every <= 0 or step == 0 or step % self.every or step == self._last or not trainer.is_global_zero:
            return
        self._last = step  # with gradient accumulation several batches end at one step
        with trainer.precision_plugin.forward_context():
            grid = pl_module.image_grid(batch, self.n, self.ddim_steps, self.seed)
        latent = isinstance(batch, dict) and "jpg" not in batch and "jpg_latent_mean" in batch
        grid = labelled_grid(grid, (*GRID_COLUMNS[:3], LATENT_TRUTH if latent else GRID_COLUMNS[3]))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        import torchvision
        with atomic_path(self.out_dir / f"step-{step:08d}.png") as tmp:
            torchvision.utils.save_image(grid, tmp, format="PNG")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", grid, step)  # columns: ref, gray, sample, truth


def weights_digest(module) -> str:
    """SHA-256 over the trainable tensors' bytes: equal iff the weights are bitwise equal."""
    h = hashlib.sha256()
    sd = module.model.state_dict()
    for k in export_keys(module.model):
        h.update(k.encode())
        h.update(sd[k].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ReplicaCheck(Callback):
    """At the end of training, compare every process's trainable weights; write `path` (JSON).

    DDP keeps replicas identical only if every step's all-reduce and update agree; this makes
    that an observable fact of each run rather than an assumption. Raises if they differ.
    """

    def __init__(self, path):
        self.path = Path(path)

    def on_train_end(self, trainer, pl_module) -> None:
        digest = weights_digest(pl_module)
        digests = [digest]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            digests = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(digests, digest)
        same = len(set(digests)) == 1
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(self.path, json.dumps({"step": trainer.global_step, "world_size": len(digests),
                                                      "identical": same, "digests": digests}, indent=1).encode())
        if not same:
            raise RuntimeError(f"DDP replicas hold different weights at step {trainer.global_step}: {digests}")
