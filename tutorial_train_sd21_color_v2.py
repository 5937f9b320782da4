#!/usr/bin/env python3
"""Train the colour ControlNet on SD2.1 (PyTorch Lightning 2.x, DDP across GPUs and nodes).

    python tutorial_train_sd21_color_v2.py --init models/control_sd21_color_v2.safetensors \\
        --data data/films --out runs/color_v2 --devices 8 --use-latent-cache

Starts from the checkpoint made by tool_add_control_sd21.py, on pairs from build_pairs.py.
Every flag defaults to the config's `train:` section; `key=value` arguments override the
YAML. Without --config the config is the run's own (OUT/config.yaml) on a resume, else the one
found for --init as colorize_inference.py finds it (so the toy model needs none). Rerunning
the same command resumes from the newest complete checkpoint in OUT (`--resume auto`, the
default). At the end OUT/control.safetensors holds the trained weights alone (load them on
top of SD2.1 with cldm.trainable.load_sd_plus_control).
Multi-GPU / multi-node recipes (torchrun, SLURM): docs/TRAINING.md.

Exit status: 0 done, 2 bad input (config, data root, checkpoint), 130 interrupted (Ctrl-C),
143 stopped by SIGTERM (both resumable).
"""
from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import threading
import warnings
from pathlib import Path

from cliutil import (NOT_REGULAR, OneLineParser, Terminated, config_override, file_problem, not_a_folder,
                     out_folder_problem, quiet_startup_signals, run_cli)

if __name__ == "__main__":  # also in every DDP process Lightning starts
    quiet_startup_signals()

PROG = "tutorial_train_sd21_color_v2.py"


class UsageError(ValueError):
    """Bad command-line input found after parsing (a missing folder, say); one line, exit status 2."""


def parser() -> argparse.ArgumentParser:
    from cldm.model import DEFAULT_CONFIG
    from cldm.trainable import OPTIMIZERS

    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                      epilog=f"Flags left out take the config's values (see --config); the defaults shown are "
                             f"{DEFAULT_CONFIG.name}'s.")
    p.add_argument("--config", metavar="YAML",
                   help="model + training YAML (default: when resuming, the run's own OUT/config.yaml; else a .yaml "
                        "beside --init with the same stem, else the config --init records, else "
                        f"models/{DEFAULT_CONFIG.name})")
    p.add_argument("--init", required=True, metavar="CKPT",
                   help="initial full checkpoint from tool_add_control_sd21.py; also needed when resuming, "
                        "since checkpoints hold only the trainable weights")
    p.add_argument("--data", required=True, metavar="DATA_ROOT", help="folder written by build_pairs.py")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder: checkpoints, logs, images, export")
    g = p.add_argument_group("data")
    g.add_argument("--size", type=int, help="training crop size in pixels (multiple of 64)")
    g.add_argument("--low", type=float, help="pair band: similarity above this")
    g.add_argument("--high", type=float, help="pair band: similarity below this")
    g.add_argument("--min-gap", type=int, help="pair band: at least this many frames apart")
    g.add_argument("--num-workers", type=int, help="data loader processes per device")
    g.add_argument("--use-latent-cache", action="store_true",
                   help="take target/reference latents (v3: and the gray's, build_latent_cache.py --gray) from "
                        "build_latent_cache.py's cache: no VAE encode in the step")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, help="samples per device per step")
    g.add_argument("--accumulate", type=int, help="batches accumulated per optimiser step")
    g.add_argument("--lr", type=float, help="learning rate")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (the original's Adam had none)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="adamw8bit needs bitsandbytes")
    g.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up steps")
    g.add_argument("--grad-clip", type=float, help="max gradient norm (0 = off)")
    g.add_argument("--precision", choices=["32", "bf16-mixed", "16-mixed"],
                   help="32 = fp32 (TF32 matmuls on GPU); bf16-mixed = bf16 autocast (fast path on A100/H100)")
    g.add_argument("--max-steps", type=int, help="stop at this optimiser step (-1: no limit)")
    g.add_argument("--max-epochs", type=int, help="stop after this many epochs (-1: no limit)")
    g.add_argument("--seed", type=int, help="seed for initialisation, data order and noise")
    g.add_argument("--sd-locked", action=argparse.BooleanOptionalAction, default=None,
                   help="keep SD locked; --no-sd-locked also trains the UNet decoder, as in ControlNet")
    g.add_argument("--only-mid-control", action=argparse.BooleanOptionalAction, default=None,
                   help="add the ControlNet only to the UNet's middle block, as in ControlNet")
    g.add_argument("--train-unet-input", action=argparse.BooleanOptionalAction, default=None,
                   help="v2/v3: train the new input channels of the UNet's first conv")
    g.add_argument("--grad-checkpoint", action=argparse.BooleanOptionalAction, default=None,
                   help="gradient checkpointing in UNet and ControlNet (less memory, ~27%% more compute)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the ControlNet and UNet (slow first steps, faster after)")
    g = p.add_argument_group("devices")
    g.add_argument("--accelerator", default="auto", choices=["auto", "gpu", "cuda", "cpu", "mps"],
                   help="where to train (default: auto, a GPU if there is one)")
    g.add_argument("--devices", default="auto",
                   help="devices per node: a count, 'auto', or a list like 0,1 (default: %(default)s)")
    g.add_argument("--num-nodes", type=int, default=1,
                   help="machines (with torchrun or SLURM: docs/TRAINING.md) (default: %(default)s)")
    g.add_argument("--strategy", default="ddp", help="ddp (default), or any Lightning strategy name")
    g = p.add_argument_group("checkpoints and logs")
    g.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                   help="auto: continue from the newest complete checkpoint in OUT, if any (default); "
                        "never: start fresh (refused if OUT has checkpoints); PATH: this checkpoint")
    g.add_argument("--ckpt-every", type=int, help="steps between resumable checkpoints")
    g.add_argument("--ckpt-keep", type=int, help="how many of the newest checkpoints to keep")
    g.add_argument("--image-every", type=int, help="steps between sample grids (0 = off)")
    g.add_argument("--log-every", type=int, help="steps between logged losses")
    g.add_argument("--val-every", type=int, help="validation loss every N training batches (0 = off)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (for logs: the losses go to OUT/csv "
                                                               "and OUT/tb either way)")
    g.add_argument("--export", action="store_true",
                   help="only write OUT/control.safetensors from the resume checkpoint, then exit")
    p.add_argument("overrides", nargs="*", type=config_override, metavar="key=value",
                   help="config overrides, e.g. model.color_variant=v3 train.image_ddim_steps=50")
    show_config_defaults(p, DEFAULT_CONFIG)
    return p


def show_config_defaults(p: argparse.ArgumentParser, config: Path) -> None:
    """Add `config`'s value to the help of every flag that falls back to it (a null pair band:
    the dataset's own default)."""
    from omegaconf import OmegaConf

    from annotator.pairs import DEFAULT_HIGH, DEFAULT_LOW, DEFAULT_MIN_GAP

    cfg = OmegaConf.load(config)
    band = {"train.low": DEFAULT_LOW, "train.high": DEFAULT_HIGH, "train.min_gap": DEFAULT_MIN_GAP}
    for action in p._actions:
        key = FLAG_KEYS.get(action.dest)
        if key is None or action.help is None:
            continue
        value = OmegaConf.select(cfg, key)
        value = band.get(key) if value is None else value
        shown = ("on" if value else "off") if isinstance(value, bool) else value
        action.help += f" (default: {shown})".replace("%", "%%")


# flag -> config key (None values are left to the config)
FLAG_KEYS = {
    "size": "train.size", "low": "train.low", "high": "train.high", "min_gap": "train.min_gap",
    "num_workers": "train.num_workers", "batch_size": "train.batch_size", "accumulate": "train.accumulate",
    "lr": "train.lr", "weight_decay": "train.weight_decay", "optimizer": "train.optimizer",
    "warmup_steps": "train.warmup_steps", "grad_clip": "train.grad_clip", "precision": "train.precision",
    "max_steps": "train.max_steps", "max_epochs": "train.max_epochs", "seed": "train.seed",
    "compile": "train.compile", "ckpt_every": "train.ckpt_every", "ckpt_keep": "train.ckpt_keep",
    "image_every": "train.image_every", "log_every": "train.log_every", "val_every": "train.val_every",
    "sd_locked": "model.sd_locked", "only_mid_control": "model.only_mid_control",
    "train_unet_input": "model.train_unet_input", "grad_checkpoint": "model.unet.use_checkpoint",
}


# train: key -> (type, lowest allowed value, what it is); checked before the model loads
TRAIN_NUMBERS = {
    "size": (int, 64, "training crop in pixels"), "batch_size": (int, 1, "samples per device"),
    "accumulate": (int, 1, "batches per optimiser step"), "num_workers": (int, 0, "loader processes"),
    "lr": (float, 0.0, "learning rate"), "weight_decay": (float, 0.0, "weight decay"),
    "warmup_steps": (int, 0, "warm-up steps"), "grad_clip": (float, 0.0, "max gradient norm"),
    "max_steps": (int, -1, "last step"), "max_epochs": (int, -1, "epochs"), "seed": (int, 0, "seed"),
    "val_every": (int, 0, "validation interval"), "log_every": (int, 1, "logging interval"),
    "ckpt_every": (int, 1, "checkpoint interval"), "ckpt_keep": (int, 1, "checkpoints kept"),
    "image_every": (int, 0, "image interval"), "image_count": (int, 1, "images per grid"),
    "image_ddim_steps": (int, 1, "DDIM steps of the image grids"),
}


NULL_OK = ("max_epochs", "grad_clip", "val_every", "image_every")  # null: no limit / off
NO_LIMIT = ("max_steps", "max_epochs")  # -1: no limit; 0 would export the init weights as trained ones


def check_train_numbers(t) -> None:
    """One-line UsageError for a train: value of the wrong type or out of range (else Lightning,
    the loader or the optimiser would fail on it with a traceback once the model has loaded)."""
    for key, (kind, low, what) in TRAIN_NUMBERS.items():
        if key not in t or (t[key] is None and key in NULL_OK):
            continue
        v = t[key]
        ok = (isinstance(v, int) or (kind is float and isinstance(v, float) and math.isfinite(v))) \
            and not isinstance(v, bool)
        flag = "--" + key.replace("_", "-")
        if not ok:
            kind_name = "an integer" if kind is int else "a finite number"
            raise UsageError(f"train.{key} ({flag}, {what}) must be {kind_name}, got {v!r}")
        if v < low or (key in ("lr", *NO_LIMIT) and v == 0):
            bound = "> 0" if key == "lr" else "-1 (no limit) or >= 1" if key in NO_LIMIT else f">= {low}"
            raise UsageError(f"train.{key} ({flag}, {what}) must be {bound}, got {v!r}")


def resolve_config(args, source=None):
    """The run's config from `source` (default: cldm.run_dir.config_source), the overrides and the
    flags, checked."""
    from cldm.model import ConfigError, load_config
    from cldm.run_dir import config_source
    from cldm.weights_config import config_origin, found_note, load_resolved_config

    source = config_source(args.out, args.init, args.config, args.resume) if source is None else source
    weights = [("--init", args.init)]

    def load(overrides):  # a config found beside --init, or recorded in it, is named as such when bad
        return load_resolved_config(source, overrides, weights, args.config)

    cfg = load(list(args.overrides))
    if "train" not in cfg:  # before the flags, which set train.*
        where = source if isinstance(source, Path) else f"the config {args.init} records"
        found = config_origin(source, args.config, weights) if isinstance(source, Path) else None
        raise UsageError(f"{where}: no train: section (see models/cldm_v21_color.yaml)"
                         + (f" {found_note(found[0])}" if found else ""))
    # on the config as checked so far, so that a bad value is the flag's, said as such
    flags = {f"{key}={getattr(args, name)}": f"--{name.replace('_', '-')} {getattr(args, name)}"
             for name, key in FLAG_KEYS.items() if getattr(args, name) is not None}
    try:
        cfg = load_config(cfg, list(flags), name="the flags")
    except ConfigError as e:
        for override, flag in flags.items():
            if str(e).startswith(prefix := f"the flags with {override}: "):
                raise UsageError(f"{flag}: {str(e)[len(prefix):]}") from None
        raise
    check_train_numbers(cfg.train)
    check_band(cfg.train)
    return cfg


def check_band(t) -> None:
    """An empty pair band in one line naming both ends (else the dataset's "band is empty" line,
    after the model has loaded, with no flag in it)."""
    from annotator.pairs import DEFAULT_HIGH, DEFAULT_LOW

    low = DEFAULT_LOW if t.get("low") is None else t.low
    high = DEFAULT_HIGH if t.get("high") is None else t.high
    if not low < high:
        raise UsageError(f"train.low (--low) must be below train.high (--high): the pair band {low} < sim < {high} "
                         "is empty")


def saved_config_remedy(args, source) -> str:
    """What to do when --init records another model config than the run's (check_saved_config)."""
    if args.config is not None:
        return f"leave out --config{' and the model overrides' if args.overrides else ''} to use the one it records"
    if not isinstance(source, Path):  # its own config, changed by an override or flag
        return "leave out the overrides of model keys to use the one it records"
    if source == Path(args.out) / "config.yaml":
        return f"resume with the --init {args.out} was started with, or use another --out"
    return f"fix or remove {source}, or pass --config"  # the YAML beside --init


MODEL_FLAGS = {name: key for name, key in FLAG_KEYS.items() if key.startswith("model.")}


def model_settings(args) -> list[tuple[str, str]]:
    """(what the command said, the config key it sets) for --config, the overrides and the model
    flags: what check_run_dir names as the cause of a config that differs from the run's."""
    flags = [("--" + ("" if getattr(args, n) else "no-") + n.replace("_", "-"), key)
             for n, key in MODEL_FLAGS.items() if getattr(args, n) is not None]
    return [*([("--config", "model")] if args.config is not None else []),
            *[(o, o.split("=", 1)[0].strip()) for o in args.overrides], *flags]


def build_model(cfg, init: Path):
    """ControlLDM with the init checkpoint loaded; every tensor must match (else CheckpointError)."""
    import torch

    from cldm.checkpoint import CheckpointError, check_fit, load_into, load_state_dict
    from cldm.model import create_model
    from cldm.trainable import check_recorded, is_export
    from cldm.weights_config import read_export_metadata

    try:
        sd = load_state_dict(init)
        if is_export(sd, read_export_metadata(init)):  # else "lacks N tensors": true, but no help
            raise CheckpointError(f"{init}: an export of trained weights (control.safetensors), not a full "
                                  "checkpoint; --init needs the file tool_add_control_sd21.py writes (a resume too: "
                                  "the run's own --init)")
        with torch.device("meta"):  # the checks first: building SD2.1 for real takes tens of seconds
            shapes = create_model(cfg)
        check_recorded(read_export_metadata(init), shapes, init)  # what tool_add_control_sd21.py was told
        check_fit(shapes, sd, strict_prefixes=("",))
        model = create_model(cfg)
        load_into(model, sd, strict_prefixes=("",))
    except CheckpointError as e:  # the file readers' messages start with the path already
        where = "--init " if str(e).startswith(f"{init}: ") else f"--init {init}: "
        raise CheckpointError(where + str(e)) from None
    return model


def build_datamodule(cfg, args, model):
    from cldm.launch import is_launch_rank_zero
    from tutorial_dataset import PairDataModule

    t = cfg.train
    band = {k: t[k] for k in ("low", "high", "min_gap") if t[k] is not None}
    fingerprint = None
    if args.use_latent_cache:
        from annotator.latent_cache import vae_fingerprint
        fingerprint = vae_fingerprint(model.first_stage_model)
    dm = PairDataModule(args.data, batch_size=t.batch_size, num_workers=t.num_workers, size=t.size,
                        val_movies=None if t.val_every else [], vae_fingerprint=fingerprint,
                        gray_latents=model.color_variant == "v3",
                        accelerator=args.accelerator, seed=t.seed, **band)
    dm.setup("fit")  # fail here, with one line, on an empty band or a missing latent cache (Lightning reuses it)
    if t.val_every and dm.val is None and is_launch_rank_zero():
        print(f"{PROG}: note: no validation: it holds out a whole movie, and {args.data} has no second movie "
              "with pairs in the band", file=sys.stderr)
    return dm


def make_trainer(cfg, args, out: Path, resume: Path | None = None, validate: bool = True):
    """`validate=False`: no validation even with train.val_every (the data has no held-out movie)."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from lightning.pytorch.plugins.environments import SLURMEnvironment
    from lightning.pytorch.strategies import DDPStrategy

    from cldm.callbacks import AtomicCheckpointIO, ImageLogger, ReplicaCheck, ResumeAgreement, StepCheckpoint
    from cldm.launch import count_devices, ddp_kwargs, devices_arg

    t = cfg.train
    devices = devices_arg(args.devices)
    strategy = args.strategy
    if strategy == "ddp":
        if count_devices(args.accelerator, devices) * args.num_nodes == 1:
            strategy = "auto"  # one process: no process group, no DDP wrapper, no all-reduce
        else:
            strategy = DDPStrategy(**ddp_kwargs())
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 runs, as on the original A6000s
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))  # one resume mechanism: --resume auto
    callbacks = [
        ResumeAgreement(resume),  # every process must resume from global rank 0's choice
        StepCheckpoint(out / "checkpoints", every_n_steps=t.ckpt_every, keep=t.ckpt_keep),
        ImageLogger(out / "images", t.image_every, t.image_count, t.image_ddim_steps, seed=t.seed),
        ReplicaCheck(out / "replicas.json"),
        *([] if args.no_progress else [TQDMProgressBar(refresh_rate=max(1, t.log_every))]),
    ]
    val = dict(val_check_interval=t.val_every, check_val_every_n_epoch=None) if t.val_every and validate else \
        dict(limit_val_batches=0)
    try:
        return L.Trainer(
            accelerator=args.accelerator, devices=devices, num_nodes=args.num_nodes, strategy=strategy,
            precision=str(t.precision), max_steps=t.max_steps, max_epochs=t.max_epochs,
            accumulate_grad_batches=t.accumulate, gradient_clip_val=t.grad_clip or None,
            log_every_n_steps=t.log_every, callbacks=callbacks, plugins=plugins, default_root_dir=out,
            logger=[TensorBoardLogger(out, name="tb"), CSVLogger(out, name="csv")],
            num_sanity_val_steps=0, benchmark=True, enable_model_summary=False,
            enable_progress_bar=not args.no_progress, **val)
    except (TypeError, ValueError, RuntimeError) as e:  # Lightning's checks of devices, strategy, precision
        raise UsageError(f"cannot set up training with --accelerator {args.accelerator} --devices {args.devices} "
                         f"--strategy {args.strategy} --precision {t.precision}: {str(e).strip().splitlines()[0]}") \
            from None


def export(module, out: Path, cfg, step: int, init: Path) -> Path:
    """OUT/control.safetensors, plus OUT/control.yaml (its config, found by colorize_inference.py)."""
    from omegaconf import OmegaConf

    from atomicio import write_bytes_atomic
    from cldm.trainable import export_control

    write_bytes_atomic(out / "control.yaml", OmegaConf.to_yaml(cfg).encode())
    return export_control(module.model, out / "control.safetensors", step=step, cfg=cfg,
                          extra={"init": init.name})


def export_from_checkpoint(module, ckpt: Path, out: Path, cfg, init: Path) -> Path:
    import torch

    from cldm.lightning import ResumeRefusedError

    state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)  # the optimiser states stay on disk
    try:
        module.on_load_checkpoint(state)
    except ResumeRefusedError as e:
        raise refused_resume(e, ckpt, init, "export") from None
    module.load_state_dict(state["state_dict"], strict=False)
    return export(module, out, cfg, int(state.get("global_step", 0)), init)


def check_paths(data: Path, init: Path, out: Path) -> None:
    """One line for a path that is missing or of the wrong kind, before the (slow) model load."""
    if not data.is_dir():
        what = not_a_folder(data) if data.exists() else "no such folder"
        raise UsageError(f"--data {data}: {what} (make it with build_pairs.py)")
    if problem := file_problem(init, folder="a folder, not a checkpoint file"):
        hint = "" if problem == NOT_REGULAR else " (make it with tool_add_control_sd21.py)"
        raise UsageError(f"--init {init}: {problem}{hint}")
    if problem := out_folder_problem("--out", out):
        raise UsageError(problem)


def note_nothing_to_train(resume: Path | None, max_steps: int) -> None:
    """Say so when the resume checkpoint already reached --max-steps: Lightning stops at once, silently."""
    from cldm.launch import is_launch_rank_zero
    from cldm.resume import checkpoint_step

    if resume is None or max_steps < 0 or not is_launch_rank_zero():
        return
    step = checkpoint_step(resume)
    if step >= max_steps:
        print(f"{PROG}: note: {resume.name} is at step {step}, --max-steps is {max_steps}: nothing to train; "
              "its weights are exported as they are", file=sys.stderr)


def note_skipped(ckpt_dir: Path) -> None:
    """Name the incomplete checkpoints --resume auto skips (once per run, not per process)."""
    from cldm.launch import is_launch_rank_zero
    from cldm.resume import incomplete_checkpoints

    if is_launch_rank_zero():
        for path in incomplete_checkpoints(ckpt_dir):
            print(f"{PROG}: note: skipped {path}: not a whole checkpoint file (cut short?); not resumed from nor "
                  "counted toward --ckpt-keep; move it away", file=sys.stderr)


def prepare(args):
    """Everything that can fail on bad input, before any training: (cfg, trainer, module, data, resume)."""
    import lightning as L
    from omegaconf import OmegaConf

    from cldm.launch import check_launcher, is_launch_rank_zero
    from cldm.lightning import ColorControlModule
    from cldm.resume import remove_partial_checkpoints
    from cldm.run_dir import check_resume_config, check_run_dir, config_source, record_config, resolve_resume
    from cldm.trainable import check_optimizer
    from cldm.weights_config import check_saved_config

    data, init, out = Path(args.data), Path(args.init), Path(args.out)
    check_paths(data, init, out)  # first: the config may come from --init or OUT
    source = config_source(out, init, args.config, args.resume)
    cfg = resolve_config(args, source)
    world = check_launcher(args.devices, args.num_nodes, args.accelerator)
    ckpt_dir = out / "checkpoints"
    if is_launch_rank_zero():
        remove_partial_checkpoints(ckpt_dir)
    if args.resume == "auto":
        note_skipped(ckpt_dir)
    resume = resolve_resume(args.resume, ckpt_dir)  # before check_run_dir: --resume never says what it means
    settings = model_settings(args)
    check_run_dir(out, cfg, settings)
    check_resume_config(resume, cfg, settings)  # before OUT/config.yaml is written
    if args.export and resume is None:
        raise UsageError(f"--export: no checkpoint to export in {ckpt_dir}")
    if not args.export:
        note_nothing_to_train(resume, cfg.train.max_steps)

    t = cfg.train
    check_optimizer(t.optimizer)  # before the (slow) model load; ColorControlModule checks again
    quiet_lightning()
    L.seed_everything(t.seed, workers=True, verbose=False)
    check_saved_config(init, cfg, source, args.overrides, remedy=saved_config_remedy(args, source),
                       free=("only_mid_control",))  # cheap; an init may be trained either way
    if args.config is None and is_launch_rank_zero():  # say which one it found
        print(f"config: {source if isinstance(source, Path) else f'the one {init} records'}")
    model = build_model(cfg, init)
    module = ColorControlModule(
        model, lr=t.lr, weight_decay=t.weight_decay, optimizer=t.optimizer, warmup_steps=t.warmup_steps,
        sd_locked=cfg.model.sd_locked, train_unet_input=cfg.model.get("train_unet_input", True), seed=t.seed,
        compile=t.compile, config=OmegaConf.to_container(cfg, resolve=True))
    if args.export:
        return cfg, None, module, None, resume
    dm = build_datamodule(cfg, args, model)
    per_device = -(-len(dm.train) // world)  # DistributedSampler's share of each process
    if per_device < t.batch_size:  # the loader drops incomplete batches: not one step would run
        raise UsageError(f"{args.data}: the band gives {len(dm.train)} training frames with a partner, "
                         f"{per_device} per device, fewer than --batch-size {t.batch_size}; lower it or widen "
                         "the band (--low/--high/--min-gap)")
    trainer = make_trainer(cfg, args, out, resume, validate=dm.val is not None)
    record_config(out, cfg)
    return cfg, trainer, module, dm, resume


# Lightning messages that say nothing true about this run (checked against Lightning 2.6):
QUIET = (
    r"Found \d+ module\(s\) in eval mode",  # the frozen VAE and text encoder, on purpose
    r"Checkpoint directory .* exists and is not empty",  # a resume writes beside its own checkpoints
    r"You're resuming from a checkpoint that ended before the epoch ended",  # the loaders reseed by step
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's own use of torch's pytree
    # a resume with another --ckpt-every: StepCheckpoint keeps no state worth restoring (it
    # prunes by the files in the folder)
    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be provided",
)


def _no_litlogger_tip(record) -> bool:
    return not record.getMessage().startswith("\N{ELECTRIC LIGHT BULB} Tip:")  # an advert, on every start


def _no_sigterm_notice(record) -> bool:
    return not record.getMessage().endswith("Received SIGTERM: 15")  # train() says it, with what to do


def quiet_lightning() -> None:
    for message in QUIET:
        warnings.filterwarnings("ignore", message=message)
    for name, quiet in (("lightning.pytorch.utilities.rank_zero", _no_litlogger_tip),
                        ("lightning.pytorch.trainer.connectors.signal_connector", _no_sigterm_notice)):
        log = logging.getLogger(name)
        if quiet not in log.filters:
            log.addFilter(quiet)


def input_errors() -> tuple[type[BaseException], ...]:
    """What bad input (config, data root, checkpoint) raises while the run is prepared."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from annotator.latent_cache import LatentCacheError
    from cldm.checkpoint import CheckpointError

    return UsageError, CheckpointError, LatentCacheError, MisconfigurationException, ValueError, OSError


def refused_resume(e, ckpt: Path, init: Path, doing: str = "resume"):
    """The one line for a checkpoint on_load_checkpoint refused (ResumeRefusedError), naming the
    file and, for other locked weights, the --init and what to do."""
    from cldm.checkpoint import CheckpointError

    if not e.locked:
        return CheckpointError(f"{ckpt}: {e.reason}" + (f" ({e.detail})" if e.detail else ""))
    other_out = ", or use another --out" if doing == "resume" else ""
    return CheckpointError(f"{ckpt} was trained on other locked SD weights than --init {init} ({e.detail}); {doing} "
                           f"with the --init the run started with{other_out}")


def train(args, cfg, trainer, module, dm, resume) -> int:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from cldm.lightning import ResumeRefusedError
    from cldm.run_dir import rerun_hint

    out = Path(args.out)
    received = []

    def before_lightning(signum, _frame):
        # SIGTERM while Lightning sets up (the checkpoint restore, seconds) would end the run
        # unseen: stop as on Ctrl-C. Once Lightning's handler holds SIGTERM it calls this one
        # too, and stops the run itself at the end of a step: then step aside.
        if signal.getsignal(signal.SIGTERM) is before_lightning:
            received.append(signum)
            raise Terminated

    def no_ctrl_c_notice(record) -> bool:  # Lightning's "Detected KeyboardInterrupt", untrue after SIGTERM
        return not (received and "KeyboardInterrupt" in record.getMessage())

    hook = threading.current_thread() is threading.main_thread()  # signals are the main thread's
    previous = signal.signal(signal.SIGTERM, before_lightning) if hook else None
    notices = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    notices.addFilter(no_ctrl_c_notice)
    try:
        if resume is not None and trainer.is_global_zero:
            print(f"resuming from {resume}", file=sys.stderr)
        # Lightning ends a run it stopped itself with SystemExit: 1 after the first Ctrl-C, 0 (a
        # SIGTERMException) after SIGTERM, which a scheduler or `&&` would take for success.
        try:
            trainer.fit(module, datamodule=dm, ckpt_path=resume)
        except SIGTERMException:
            received.append(signal.SIGTERM)
        except SystemExit:
            if not trainer.interrupted:
                raise
        except ResumeRefusedError as e:
            raise refused_resume(e, resume, Path(args.init)) from None
        except KeyboardInterrupt as e:  # one Lightning did not handle: run_cli says it, with what is true
            if str(e).strip():
                raise
            raise type(e)(f"interrupted; {rerun_hint(out)}") from None
        if received:
            bar_line = "\n" if trainer.progress_bar_callback is not None else ""  # the bar's line is unfinished
            print(f"{bar_line}{PROG}: stopped by SIGTERM at step {trainer.global_step}; {rerun_hint(out)}",
                  file=sys.stderr)
            return 143
        if trainer.interrupted:
            print(f"{PROG}: interrupted; {rerun_hint(out)}", file=sys.stderr)
            return 130
        if trainer.is_global_zero:
            path = export(module, out, cfg, trainer.global_step, Path(args.init))
            print(f"step {trainer.global_step}: trained weights -> {path}")
        return 0
    finally:
        notices.removeFilter(no_ctrl_c_notice)
        if hook:
            signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    run = []

    def start(args) -> int:  # everything bad input can break: exit 2 with one line
        run.extend(prepare(args))
        if args.export:
            cfg, _, module, _, resume = run
            path = export_from_checkpoint(module, resume, Path(args.out), cfg, Path(args.init))
            print(f"exported {resume.name} -> {path}")
        return 0

    status = run_cli(PROG, start, args, input_errors())
    if status or args.export:
        return status
    # While training, only a resume checkpoint of another setup (on_load_checkpoint) is bad
    # input; any other error is a bug and keeps its traceback. SIGTERM is Lightning's: it stops
    # the run at the end of a step (train() says so).
    from cldm.checkpoint import CheckpointError
    from cldm.run_dir import rerun_hint
    return run_cli(PROG, lambda args: train(args, *run), args, (CheckpointError,),
                   interrupted=f"interrupted; {rerun_hint(Path(args.out))}", sigterm=False)


if __name__ == "__main__":  # required: DDP re-runs this file in every process it starts
    sys.exit(main())
