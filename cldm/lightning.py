"""Lightning wrapper for training the colour ControlNet. With cldm/callbacks.py it is the
Lightning side of the model code: the nn.Modules (cldm/cldm.py, cldm/controlnet.py, ldm/)
never import Lightning. cldm/training.py builds the Trainer around them (and, like
cldm/launch.py, imports Lightning inside its functions); tutorial_dataset.py has the DataModule.

What trains is decided by `cldm.trainable`; this file adds the step (dataset batch -> loss),
the optimiser and what a checkpoint holds. Checkpoint files and resuming: cldm/resume.py;
writing them, the image logger and the replica check: cldm/callbacks.py.

Only what trains is in train mode: the ControlNet (and, with sd_locked false, the UNet
decoder). The VAE, the text encoder and the locked UNet stay in eval mode. Gradients still
flow through the locked UNet back to the ControlNet, and gradient checkpointing does not
depend on the train flag (it is on whenever autograd records), so eval costs nothing there.
"""
from __future__ import annotations

import functools
import math
import sys
from typing import Any

import lightning as L
import torch

from cldm.checkpoint import CheckpointError
from cldm.cldm import ControlLDM
from cldm.color import split_hint
from cldm.launch import NOISE, VALIDATION, run_seed
from cldm.resume import resume_misfit
from cldm.trainable import (MODULE_PREFIX, TRAINING_KEY, UNET_INPUT_CONV, check_optimizer,
                            configure_trainable, export_keys, locked_digest, locked_fingerprint, make_optimizer,
                            param_groups, unet_input_conv)
from cldm.weights_config import config_hashes


def _hwc_to_bchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2).contiguous()


def noise_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed a process trains from. The same seed everywhere builds identical replicas;
    the noise must differ per rank, and a resumed run must not replay the noise of the steps it
    already did."""
    return run_seed(seed, NOISE, rank, step)


def _warmup(step: int, warmup_steps: int) -> float:
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


class ResumeRefusedError(CheckpointError):
    """A checkpoint that does not fit the run resuming from it (on_load_checkpoint). The message
    says "checkpoint ..."; `reason`, `detail` and `locked` (other locked SD weights) let a caller
    that knows the file's path and the --init name them instead (the training script does)."""

    def __init__(self, reason: str, detail: str = "", locked: bool = False):
        super().__init__(f"checkpoint {reason}" + (f" ({detail})" if detail else ""))
        self.reason, self.detail, self.locked = reason, detail, locked


NON_FINITE_FP16_STEPS = 10  # non-finite losses in a row that stop a 16-mixed run (its scaler skips single ones)


class NonFiniteLossError(RuntimeError):
    """An optimiser step's loss is NaN or infinite (on any device): the step is not taken."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"the loss at step {step} is {loss}")
        self.step, self.loss = step, loss


class ColorControlModule(L.LightningModule):
    """Trains `model` (a ControlLDM with its init weights loaded) on PairDataset batches.

    Batches hold an HWC tensor `hint` (B, H, W, 4) in [0, 1], a list `txt`, and the target:
    `jpg` (B, H, W, 3) in [-1, 1], or with the latent cache instead the unscaled VAE posteriors
    `jpg_latent_mean/std` and `ref_latent_mean` (B, 4, H/8, W/8) (for v3 also `gray_latent_mean`),
    so no VAE runs in the step.
    Checkpoints hold only the trainable tensors (plus optimiser/loop state): the locked SD
    weights come from the init file, which every run loads first. `data`: the run's data root,
    kept with the hyperparameters so a resume on another one is noted. `fused`: AdamW's fused
    CUDA kernel, on a GPU; off to clip gradients under mixed precision (16 or bf16): Lightning's
    MixedPrecision plugin refuses to clip for a fused optimiser, at the first step, as one that
    may unscale gradients itself.
    """

    def __init__(self, model: ControlLDM, *, lr: float = 1e-5, weight_decay: float = 0.01,
                 betas: tuple[float, float] = (0.9, 0.999), optimizer: str = "adamw", warmup_steps: int = 0,
                 sd_locked: bool = True, train_unet_input: bool = True, seed: int = 0,
                 compile: bool = False, config: dict | None = None, data: str | None = None, fused: bool = True):
        super().__init__()
        check_optimizer(optimizer)
        self.save_hyperparameters(ignore=["model", "fused"])  # fused: how the step runs, not what it trains
        self.fused = fused
        self.model = model
        configure_trainable(model, sd_locked, train_unet_input)
        self.strict_loading = False  # checkpoints leave out the locked weights; on_load_checkpoint checks the rest
        self._config_hashes = config_hashes(config) if config is not None else (None,)
        self._locked_snapshot: torch.Tensor | None = None
        self._locked_digest: str | None = None
        self._resumed_hparams: dict = {}  # the hyperparameters a resumed checkpoint records (data root, ...)
        self._resumed_batch: dict | None = None  # its batch_setup(), where it records one
        self._step_losses: list[torch.Tensor] = []  # this optimiser step's micro-batch losses so far
        self._non_finite = 0  # optimiser steps in a row whose loss was not finite
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
        self._step_losses.append(loss.detach())
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """The step's loss and learning rate per parameter group, once per optimiser step. The
        loss is the mean over the step's micro-batches (--accumulate) and devices: logged from
        training_step, it was one micro-batch of one device's, a noisier curve the more GPUs.
        (Lightning's LearningRateMonitor would log the rate once per micro-batch.)"""
        if self._step_losses:
            loss = torch.stack(self._step_losses).mean()
            self._step_losses.clear()
            # One all-reduce serves the log (sync_dist would be a second) and the check below.
            total = self.trainer.strategy.reduce(loss.detach().float(), reduce_op="mean")
            self.log("train/loss", total, on_step=True, on_epoch=False)
            # Before the update: a diverged step (too high a --lr) would make every weight NaN, and
            # the run go on to export them with exit 0. Averaged over the devices first, so that
            # every process stops at the same step (one host sync). Under 16-mixed the loss scaler
            # skips a step whose gradients overflow, so only a run of them stops the run there.
            self._non_finite = 0 if torch.isfinite(total) else self._non_finite + 1
            if self._non_finite >= (NON_FINITE_FP16_STEPS if self.trainer.precision == "16-mixed" else 1):
                raise NonFiniteLossError(self.trainer.global_step, float(total))
        opt = getattr(optimizer, "optimizer", optimizer)
        for g in opt.param_groups:
            self.log(f"lr-{type(opt).__name__}/{g.get('name', 'group')}", g["lr"], on_step=True, on_epoch=False)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Loss with noise and timesteps fixed per batch, so values are comparable across evaluations."""
        g = torch.Generator(device=self.device).manual_seed(run_seed(self.hparams.seed, VALIDATION, batch_idx))
        loss = self.compute_loss(batch, generator=g)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=batch["hint"].shape[0])

    # ---- optimiser ----------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        groups = param_groups(self.model, hp.weight_decay)
        fused = self.fused and self.device.type == "cuda"
        opt = make_optimizer(hp.optimizer, groups, hp.lr, tuple(hp.betas), fused=fused)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(_warmup, warmup_steps=hp.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- per-rank noise, locked-weight guard, checkpoint contents --------------------------
    def on_train_start(self) -> None:
        torch.manual_seed(noise_seed(self.hparams.seed, self.global_rank, self.global_step))
        self.snapshot_locked()
        self.apply_optimizer_settings()
        self.align_epoch()
        self.note_other_data()
        self.note_other_seed_and_batch()

    def note_other_data(self) -> None:
        """A resume on another --data than its checkpoint's run is allowed (more films, a moved
        folder) but said, since a mistyped --data would otherwise train on the wrong films unseen."""
        ours, theirs = self.hparams.get("data"), self._resumed_hparams.get("data")
        if ours and theirs and ours != theirs and self.trainer.is_global_zero:
            print(f"note: resumed a run that trained on --data {theirs}; this one reads {ours}", file=sys.stderr)

    def batch_setup(self) -> dict | None:
        """The factors of this run's effective batch (samples per optimiser step), kept in each
        checkpoint: its hyperparameters lack the number of processes. The batch size is the data
        module's, read here from the run's config (None without one)."""
        batch = ((self.hparams.get("config") or {}).get("train") or {}).get("batch_size")
        return None if batch is None else {"devices": self.trainer.world_size, "batch_size": batch,
                                           "accumulate": self.trainer.accumulate_grad_batches}

    def note_other_seed_and_batch(self) -> None:
        """A resume may take another --seed or effective batch (--batch-size, --devices, --num-nodes,
        --accumulate: after an out-of-memory, on another machine), but either changes what the
        continued run does, so say it. Checkpoints that record no seed or batch get no note."""
        if not self.trainer.is_global_zero:
            return
        ours, theirs = self.hparams.seed, self._resumed_hparams.get("seed")
        if theirs is not None and theirs != ours:
            print(f"note: resumed with --seed {ours}, the checkpoint's run had {theirs}: the data order and the noise "
                  f"from here on are drawn from seed {ours}, and the validation loss and the sample grids draw other "
                  "fixed noise (not comparable with theirs before)", file=sys.stderr)
        ours, theirs = self.batch_setup(), self._resumed_batch
        if ours is None or theirs is None:
            return
        n, m = (math.prod(b.values()) for b in (ours, theirs))
        if n != m:
            ours, theirs = (f"devices {b['devices']} x batch {b['batch_size']} x accumulate {b['accumulate']}"
                            for b in (ours, theirs))
            print(f"note: resumed with an effective batch of {n} ({ours}), the checkpoint's run had {m} ({theirs}): "
                  "the step count and the learning-rate schedule go on by step, so each step from here on averages "
                  "over another number of samples (--lr is not scaled)", file=sys.stderr)

    def align_epoch(self) -> None:
        """Count the batches a resumed run has done in its epoch as this run's batches, in whole
        --accumulate windows.

        Lightning counts an epoch in batches. After a resume with another --batch-size or number
        of devices it counted the old batches as new ones (an epoch of 16 samples ended after 7,
        or 25, or started over when the count passed its new end); so the samples done are
        converted by the batch the checkpoint records (older checkpoints: counted as before),
        rounded down and held short of the epoch's end. With another --accumulate the first step
        came after a partial window and the logged step fell one behind for good; so whole
        windows. At most a batch and a window more are trained: the rest of the epoch is a
        fresh pass over the data anyway. A no-op on a fresh run.
        """
        loop, acc, batches = self.trainer.fit_loop.epoch_loop, self.trainer.accumulate_grad_batches, \
            self.trainer.num_training_batches
        current = loop.batch_progress.current
        if not loop.restarting:
            return
        if loop.batch_progress.is_last_batch:  # saved at the epoch's end: the next starts at a count this high
            done = max(current.ready, batches)
        else:
            ours, theirs = self.batch_setup(), self._resumed_batch
            done = current.ready
            if ours is not None and theirs is not None:
                done = done * theirs["devices"] * theirs["batch_size"] // (ours["devices"] * ours["batch_size"])
            done = min(done, batches - 1)  # past the end, the epoch would start over: end it after one batch
            done -= done % acc
        # Not clamped at 0: a checkpoint saved at a batch's end has completed one below ready, and
        # Lightning's restart adds that batch back before it sets ready = completed; resumed after
        # 1 batch with --accumulate 2, completed -1 comes back as 0 (clamped, as 1: step 2 took 1 batch)
        shift = done - current.ready
        for name in ("ready", "started", "processed", "completed"):
            setattr(current, name, getattr(current, name) + shift)

    def snapshot_locked(self) -> None:
        """Remember the SD channels of the partly trainable input conv, for check_locked."""
        w = unet_input_conv(self.model).weight
        if w.requires_grad:
            self._locked_snapshot = w[:, :self.model.latent_channels].detach().clone()

    def apply_optimizer_settings(self) -> None:
        """Make this run's lr, weight decay and warm-up hold after a resume.

        Lightning restores the optimiser and scheduler as saved, their learning rate and weight
        decay included, so a resume with another --lr or --weight-decay would silently keep the
        old ones. A no-op on a fresh run. The partly locked input conv keeps weight decay 0. A
        note names what differs from the checkpoint (lr, weight decay, warm-up, optimiser).
        """
        hp = self.hparams
        opt = self.trainer.optimizers[0]
        sched = self.trainer.lr_scheduler_configs[0].scheduler
        old_lr = sched.base_lrs[0]
        old_wd = next(g["weight_decay"] for g in opt.param_groups if g.get("name") == "trainable")
        other_optimizer = self.other_optimizer()
        if other_optimizer is not None:  # its groups were not restored (on_load_checkpoint)
            old_wd = self._resumed_hparams.get("weight_decay", old_wd)
        old_warmup = self._resumed_hparams.get("warmup_steps", hp.warmup_steps)
        sched.base_lrs = [hp.lr] * len(opt.param_groups)
        sched.lr_lambdas = [functools.partial(_warmup, warmup_steps=hp.warmup_steps)] * len(opt.param_groups)
        for g in opt.param_groups:
            g["initial_lr"], g["lr"] = hp.lr, hp.lr * _warmup(sched.last_epoch, hp.warmup_steps)
            if g.get("name") == "trainable":
                g["weight_decay"] = hp.weight_decay
        if not self.trainer.is_global_zero:
            return
        if (old_lr, old_wd, old_warmup) != (hp.lr, hp.weight_decay, hp.warmup_steps):
            print(f"note: resumed with learning rate {hp.lr:g}, weight decay {hp.weight_decay:g} and "
                  f"{hp.warmup_steps} warm-up steps (the checkpoint had {old_lr:g}, {old_wd:g} and {old_warmup})",
                  file=sys.stderr)
        if other_optimizer is not None:
            print(f"note: resumed with optimizer {hp.optimizer}, the checkpoint's is {other_optimizer}: its "
                  "state does not carry over, the moments start again from zero (weights, step and learning-rate "
                  "schedule continue)", file=sys.stderr)

    def other_optimizer(self) -> str | None:
        """The resumed checkpoint's --optimizer where it is not this run's (else None)."""
        theirs = self._resumed_hparams.get("optimizer")
        return theirs if theirs is not None and theirs != self.hparams.optimizer else None

    def check_locked(self) -> None:
        """Raise if the SD channels of the partly trainable input conv moved (optimiser misuse)."""
        if self._locked_snapshot is None:
            return
        w = unet_input_conv(self.model).weight
        if not torch.equal(w[:, :self._locked_snapshot.shape[1]], self._locked_snapshot):
            raise RuntimeError(f"{UNET_INPUT_CONV}: the locked SD channels changed during training; use "
                               "weight decay 0 on it and an optimiser that keeps zero-gradient weights")

    def locked_digest(self) -> str:
        """cldm.trainable.locked_digest of the model, computed once (the locked weights do not change)."""
        if self._locked_digest is None:
            with torch.no_grad():
                self._locked_digest = locked_digest(self.model)
        return self._locked_digest

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_locked()
        keep = {MODULE_PREFIX + k for k in export_keys(self.model)}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[TRAINING_KEY] = {"config_hash": self._config_hashes[0],
                                    "color_variant": self.model.color_variant,
                                    "locked_digest": self.locked_digest()}
        if (batch := self.batch_setup()) is not None:
            checkpoint[TRAINING_KEY]["batch"] = batch

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, before Lightning restores anything, a checkpoint that is not of this setup: the
        rules `inspect` applies too (resume_misfit), then the locked weights' digest."""
        info = checkpoint.get(TRAINING_KEY, {})
        self._resumed_hparams = dict(checkpoint.get("hyper_parameters", {}))
        self._resumed_batch = info.get("batch")  # checkpoints before 2026-11-29 record none
        trained = {k.removeprefix(MODULE_PREFIX): v for k, v in checkpoint["state_dict"].items()}
        ours, *older = self._config_hashes
        _, reason = resume_misfit(self.model, ours, trained, info, also=older)
        if reason is not None:
            raise ResumeRefusedError(reason)
        digest = info.get("locked_digest")
        if digest is not None and digest != self.locked_digest():
            raise ResumeRefusedError("was trained on other locked SD weights than this run's --init",
                                     f"digest {digest[:12]}... vs {self.locked_digest()[:12]}...", locked=True)
        if digest is None and isinstance(fp := info.get("locked_fingerprint"), float):  # written before 2026-11-27
            with torch.no_grad():  # 20:49: that version's own check, which a resume of it skipped since
                now = locked_fingerprint(self.model)
            if abs(fp - now) > 1e-7 * abs(fp):
                raise ResumeRefusedError("was trained on other locked SD weights than this run's --init",
                                         f"fingerprint {fp:.9g} vs {now:.9g}", locked=True)
        # Another --optimizer (adamw8bit after an out-of-memory, say): AdamW's and bitsandbytes'
        # states have different keys, and either one loaded into the other failed at the first
        # step (KeyError). Restore none: the optimiser configure_optimizers made starts afresh.
        if self.other_optimizer() is not None:
            checkpoint["optimizer_states"] = []  # Lightning loads zip(optimizers, states): nothing

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
        ref, gray = split_hint(hint)
        gray = gray.expand(-1, 3, -1, -1)
        cols = [ref, gray, (sample.float() + 1) / 2, (truth.float() + 1) / 2]
        import torchvision
        tiles = torch.stack([c.clamp(0, 1).float().cpu() for c in cols], dim=1).flatten(0, 1)
        return torchvision.utils.make_grid(tiles, nrow=4, padding=2)
