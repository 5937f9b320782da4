"""Lightning wrapper for training the colour ControlNet (the only model file that imports Lightning).

What trains is decided by `cldm.trainable`; this file adds the step (dataset batch -> loss),
the optimiser, crash-safe checkpoints that resume, and the image/replica callbacks.

Only what trains is in train mode: the ControlNet (and, with sd_locked false, the UNet
decoder). The VAE, the text encoder and the locked UNet stay in eval mode. Gradients still
flow through the locked UNet back to the ControlNet, and gradient checkpointing does not
depend on the train flag (it is on whenever autograd records), so eval costs nothing there.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

from atomicio import atomic_path, write_bytes_atomic
from cldm.checkpoint import CheckpointError
from cldm.cldm import ControlLDM
from cldm.trainable import (UNET_INPUT_CONV, check_optimizer, config_hash, configure_trainable, export_keys,
                            make_optimizer, param_groups, unet_input_conv)


def _hwc_to_bchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2).contiguous()


def noise_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed a process trains from. The same seed everywhere builds identical replicas;
    the noise must differ per rank, and a resumed run must not replay the noise of the steps it
    already did."""
    return seed + 1_000_003 * rank + step


def _warmup(step: int, warmup_steps: int) -> float:
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


class ColorControlModule(L.LightningModule):
    """Trains `model` (a ControlLDM with its init weights loaded) on PairDataset batches.

    Batches hold an HWC tensor `hint` (B, H, W, 4) in [0, 1], a list `txt`, and the target:
    `jpg` (B, H, W, 3) in [-1, 1], or with the latent cache instead the unscaled VAE posteriors
    `jpg_latent_mean/std` and `ref_latent_mean` (B, 4, H/8, W/8) (for v3 also `gray_latent_mean`),
    so no VAE runs in the step.
    Checkpoints hold only the trainable tensors (plus optimiser/loop state): the locked SD
    weights come from the init file, which every run loads first.
    """

    def __init__(self, model: ControlLDM, *, lr: float = 1e-5, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), optimizer: str = "adamw", warmup_steps: int = 0,
                 sd_locked: bool = True, train_unet_input: bool = True, seed: int = 0,
                 compile: bool = False, config: dict | None = None):
        super().__init__()
        check_optimizer(optimizer)
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        configure_trainable(model, sd_locked, train_unet_input)
        self.strict_loading = False  # checkpoints leave out the locked weights; on_load_checkpoint checks the rest
        self._config_hash = config_hash(config) if config is not None else None
        self._locked_snapshot: torch.Tensor | None = None
        self._locked_fp: float | None = None
        if compile:
            model.compile_denoiser()
        self.train()  # Lightning 2.x starts fit in the modules' current modes: set them now

    # ---- modes ------------------------------------------------------------------------
    def train(self, mode: bool = True):
        """Train mode only for the trainable parts; every locked module stays in eval.

        Covers the VAE, the text encoder and the locked UNet (all of it with sd_locked, else
        all but the decoder that trains). Eval changes no numbers there (dropout 0, no batch
        norm), and gradient checkpointing is gated on autograd, not on the flag.
        """
        super().train(mode)
        m = self.model
        m.first_stage_model.eval()
        if m.cond_stage_model is not None:
            m.cond_stage_model.eval()
        unet = m.model.diffusion_model
        unet.eval()
        if not self.hparams.sd_locked:
            unet.output_blocks.train(mode)
            unet.out.train(mode)
        return self

    # ---- the step ---------------------------------------------------------------------
    def context(self, prompts) -> torch.Tensor:
        """Prompt embeddings; computed once per distinct prompt (cached by the model), in fp32."""
        with torch.autocast(self.device.type, enabled=False):
            return self.model.get_learned_conditioning(list(prompts))

    def condition(self, batch: dict):
        """The ColorCondition of a dataset batch; latents from the cache (scaled here) where it has them."""
        latents = {}
        for key, name in (("ref_latent_mean", "ref_latent"), ("gray_latent_mean", "gray_latent")):
            if key in batch:
                latents[name] = batch[key].float() * self.model.scale_factor
        return self.model.prepare_condition(_hwc_to_bchw(batch["hint"]), context=self.context(batch["txt"]),
                                            **latents)

    def target_latent(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """z0, the scaled target latent: a posterior draw, from the cache's mean/std or by the VAE."""
        m = self.model
        if "jpg_latent_mean" in batch:  # latent cache: the same draw as posterior.sample(), without the VAE
            mean, std = batch["jpg_latent_mean"].float(), batch["jpg_latent_std"].float()
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            return (mean + std * eps) * m.scale_factor
        return m.encode_first_stage(_hwc_to_bchw(batch["jpg"]), sample=True, generator=generator)

    def compute_loss(self, batch: dict, noise: torch.Tensor | None = None, t: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """The training loss; what is random (z0's posterior draw, then t, then the noise, unless
        given) comes from `generator`, default torch's RNG."""
        z0 = self.target_latent(batch, generator)
        return self.model.training_loss(z0, self.condition(batch), noise=noise, t=t, generator=generator)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=batch["hint"].shape[0])
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Learning rate per parameter group, once per optimiser step (Lightning's
        LearningRateMonitor logs it once per micro-batch under --accumulate)."""
        opt = getattr(optimizer, "optimizer", optimizer)
        for g in opt.param_groups:
            self.log(f"lr-{type(opt).__name__}/{g.get('name', 'group')}", g["lr"], on_step=True, on_epoch=False)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Loss with noise and timesteps fixed per batch, so values are comparable across evaluations."""
        g = torch.Generator(device=self.device).manual_seed(self.hparams.seed * 100_003 + batch_idx)
        loss = self.compute_loss(batch, generator=g)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=batch["hint"].shape[0])

    # ---- optimiser ----------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        groups = param_groups(self.model, hp.weight_decay)
        opt = make_optimizer(hp.optimizer, groups, hp.lr, tuple(hp.betas), fused=self.device.type == "cuda")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(_warmup, warmup_steps=hp.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- per-rank noise, locked-weight guard, checkpoint contents --------------------------
    def on_train_start(self) -> None:
        torch.manual_seed(noise_seed(self.hparams.seed, self.global_rank, self.global_step))
        self.snapshot_locked()
        self.apply_optimizer_settings()

    def snapshot_locked(self) -> None:
        """Remember the SD channels of the partly trainable input conv, for check_locked."""
        w = unet_input_conv(self.model).weight
        if w.requires_grad:
            self._locked_snapshot = w[:, :self.model.latent_channels].detach().clone()

    def apply_optimizer_settings(self) -> None:
        """Make this run's lr, weight decay and warm-up hold after a resume.

        Lightning restores the optimiser and scheduler as saved, their learning rate and weight
        decay included, so a resume with another --lr or --weight-decay would silently keep the
        old ones. A no-op on a fresh run. The partly locked input conv keeps weight decay 0.
        """
        hp = self.hparams
        opt = self.trainer.optimizers[0]
        sched = self.trainer.lr_scheduler_configs[0].scheduler
        old_lr = sched.base_lrs[0]
        old_wd = next(g["weight_decay"] for g in opt.param_groups if g.get("name") == "trainable")
        sched.base_lrs = [hp.lr] * len(opt.param_groups)
        sched.lr_lambdas = [functools.partial(_warmup, warmup_steps=hp.warmup_steps)] * len(opt.param_groups)
        for g in opt.param_groups:
            g["initial_lr"], g["lr"] = hp.lr, hp.lr * _warmup(sched.last_epoch, hp.warmup_steps)
            if g.get("name") == "trainable":
                g["weight_decay"] = hp.weight_decay
        if self.trainer.is_global_zero and (old_lr, old_wd) != (hp.lr, hp.weight_decay):
            print(f"note: resumed with learning rate {hp.lr:g} and weight decay {hp.weight_decay:g} (the checkpoint "
                  f"had {old_lr:g} and {old_wd:g})", file=sys.stderr)

    def check_locked(self) -> None:
        """Raise if the SD channels of the partly trainable input conv moved (optimiser misuse)."""
        if self._locked_snapshot is None:
            return
        w = unet_input_conv(self.model).weight
        if not torch.equal(w[:, :self._locked_snapshot.shape[1]], self._locked_snapshot):
            raise RuntimeError(f"{UNET_INPUT_CONV}: the locked SD channels changed during training; use "
                               "weight decay 0 on it and an optimiser that keeps zero-gradient weights")

    def locked_fingerprint(self) -> float:
        """Sum of squares (float64) of the weights the checkpoints leave out; computed once.

        They come from --init on every start, so a resume on top of other SD weights would go
        unnoticed without it.
        """
        if self._locked_fp is None:
            keep = set(export_keys(self.model))
            with torch.no_grad():
                self._locked_fp = float(sum(p.detach().double().square().sum() for n, p in
                                            self.model.named_parameters() if n not in keep))
        return self._locked_fp

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_locked()
        keep = {"model." + k for k in export_keys(self.model)}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["cldm"] = {"config_hash": self._config_hash, "color_variant": self.model.color_variant,
                              "locked_fingerprint": self.locked_fingerprint()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get("cldm", {})
        if self._config_hash and info.get("config_hash") and info["config_hash"] != self._config_hash:
            raise CheckpointError(f"checkpoint was trained with another model config (hash "
                                  f"{info['config_hash']}, this run {self._config_hash})")
        fp = info.get("locked_fingerprint")
        if fp is not None and abs(fp - self.locked_fingerprint()) > 1e-7 * abs(fp):
            raise CheckpointError("checkpoint was trained on other locked SD weights than this run's --init "
                                  f"(fingerprint {fp:.9g} vs {self.locked_fingerprint():.9g})")
        missing = sorted({"model." + k for k in export_keys(self.model)} - set(checkpoint["state_dict"]))
        if missing:
            raise CheckpointError(f"checkpoint lacks {len(missing)} trainable tensors (e.g. {missing[0]}); "
                                  "is it from this training setup?")

    # ---- images ---------------------------------------------------------------------------
    @torch.no_grad()
    def image_grid(self, batch: dict, n: int = 4, steps: int = 20, seed: int = 0) -> torch.Tensor:
        """(3, H', W') grid in [0, 1], one row per sample: reference | gray | DDIM sample | ground truth."""
        was_training = self.training
        self.eval()
        try:
            b = {k: v[:n] for k, v in batch.items() if isinstance(v, (torch.Tensor, list))}
            cond = self.condition(b)
            hint = _hwc_to_bchw(b["hint"])
            g = torch.Generator(device=self.device).manual_seed(seed)
            sample = self.model.decode_first_stage(self.model.sample(cond, steps=steps, generator=g))
            if "jpg" in b:
                truth = _hwc_to_bchw(b["jpg"])
            else:
                truth = self.model.decode_first_stage(b["jpg_latent_mean"].float() * self.model.scale_factor)
        finally:
            self.train(was_training)
        ref, gray = hint[:, :3], hint[:, 3:].expand(-1, 3, -1, -1)
        cols = [ref, gray, (sample.float() + 1) / 2, (truth.float() + 1) / 2]
        import torchvision
        tiles = torch.stack([c.clamp(0, 1).float().cpu() for c in cols], dim=1).flatten(0, 1)
        return torchvision.utils.make_grid(tiles, nrow=4, padding=2)


# ------------------------------------------------------------------------------------------
# checkpoints


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
            torch.save(checkpoint, f)


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

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        super().on_train_batch_end(trainer, *args, **kwargs)
        self.prune(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        # Private ModelCheckpoint API (tested in tests/cldm/test_lightning.py): a run that ends
        # between two save points still leaves its final state resumable.
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
        self.prune(trainer)

    def prune(self, trainer) -> None:
        if trainer.is_global_zero:
            for _, _, path in list_checkpoints(self.dirpath)[:-self.keep]:
                path.unlink(missing_ok=True)


STEP_RE = re.compile(r"step=(\d+)")


def is_complete_checkpoint(path: str | Path) -> bool:
    """Cheap completeness test: torch.save writes a zip whose directory is at the very end."""
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


# What Lightning reads to resume a run, and what ColorControlModule.on_save_checkpoint adds.
LIGHTNING_KEYS = ("pytorch-lightning_version", "global_step", "state_dict", "optimizer_states", "lr_schedulers",
                  "loops")
TRAINING_KEY = "cldm"


def resume_problem(path: str | Path) -> str | None:
    """Why `path` cannot be resumed from (one line), or None for a training checkpoint of this project.

    Reads only the checkpoint's pickle, with weights_only (no code runs) and the tensors
    memory-mapped, so a multi-GB file costs little. Catches what a zip check lets through,
    such as the --init file saved as .ckpt, before Lightning fails on it with a traceback.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        return f"truncated, or not a checkpoint written by this training ({type(e).__name__})"
    if not isinstance(ckpt, dict):
        return f"holds a {type(ckpt).__name__}, not a training checkpoint"
    missing = [k for k in LIGHTNING_KEYS if k not in ckpt]
    if missing:
        return (f"not a Lightning training checkpoint (no {missing[0]!r}; an --init or exported file holds "
                "weights only); resume from a file in OUT/checkpoints")
    if TRAINING_KEY not in ckpt:
        return f"a Lightning checkpoint, but not of this training (no {TRAINING_KEY!r} entry)"
    return None


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


def remove_partial_checkpoints(dirpath: str | Path) -> list[Path]:
    """Delete temp files that a killed save left behind."""
    gone = []
    for p in Path(dirpath).glob(".*.tmp") if Path(dirpath).is_dir() else []:
        p.unlink(missing_ok=True)
        gone.append(p)
    return gone


# ------------------------------------------------------------------------------------------
# callbacks


class ImageLogger(Callback):
    """Every `every_n_steps` optimiser steps, rank 0 writes a reference | gray | sample | truth grid.

    PNG to `out_dir/step-XXXXXXXX.png` and the image to TensorBoard. Sampling is DDIM with a
    fixed seed, under the run's precision.
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
        self.out_dir.mkdir(parents=True, exist_ok=True)
        import torchvision
        with atomic_path(self.out_dir / f"step-{step:08d}.png") as tmp:
            torchvision.utils.save_image(grid, tmp, format="PNG")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", grid, step)  # columns: ref, gray, sample, truth


def weights_digest(module: ColorControlModule) -> str:
    """SHA-256 over the trainable tensors' bytes: equal iff the weights are bitwise equal."""
    h = hashlib.sha256()
    sd = module.model.state_dict()
    for k in export_keys(module.model):
        h.update(k.encode())
        h.update(sd[k].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ResumeAgreement(Callback):
    """Before Lightning restores a checkpoint, check that every process resumes from the one
    global rank 0 chose (`check_same_resume`); `ckpt_path` is what this process passes to fit."""

    def __init__(self, ckpt_path: str | Path | None):
        self.ckpt_path = ckpt_path

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Trainer._run: setup_environment (process group) -> setup hooks -> restore
        check_same_resume(self.ckpt_path)


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
