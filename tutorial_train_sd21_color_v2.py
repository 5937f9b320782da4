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
import contextlib
from pathlib import Path

from cldm.train_config import (FLAG_KEYS, UsageError, model_settings, run_config,
                               saved_config_remedy)
from cldm.training import (PROG, build_datamodule, build_model, end_with_launcher, export_from_checkpoint, fit,
                           make_trainer, note_nothing_to_train, note_skipped, quiet_lightning)
from cliutil import (NOT_REGULAR, OneLineParser, config_override, exit_quietly, file_problem, not_a_folder,
                     out_folder_problem, path_arg, quiet_startup_signals, run_cli)

if __name__ == "__main__":  # also in every DDP process Lightning starts
    end_with_launcher()
    quiet_startup_signals()


def parser() -> argparse.ArgumentParser:
    from cldm.config import DEFAULT_CONFIG
    from cldm.trainable import OPTIMIZERS

    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                      epilog=f"Flags left out take the config's values (see --config); the defaults shown are "
                             f"{DEFAULT_CONFIG.name}'s. Exit status: 0 done, 2 bad input (one line), 130 / 143 "
                             "stopped by Ctrl-C / SIGTERM (one line; a rerun resumes from the newest checkpoint). "
                             "See docs/TRAINING.md.")
    p.add_argument("--config", type=path_arg, metavar="YAML",
                   help="model + training YAML (default: when resuming, the run's own OUT/config.yaml; else a .yaml "
                        "beside --init with the same stem, else the config --init records, else "
                        f"models/{DEFAULT_CONFIG.name})")
    p.add_argument("--init", type=path_arg, required=True, metavar="CKPT",
                   help="initial full checkpoint from tool_add_control_sd21.py; also needed when resuming, "
                        "since checkpoints hold only the trainable weights")
    p.add_argument("--data", type=path_arg, required=True, metavar="DATA_ROOT", help="folder written by build_pairs.py")
    p.add_argument("--out", type=path_arg, required=True, metavar="DIR",
                   help="run folder: checkpoints, logs, images, export")
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
    g.add_argument("--weight-decay", type=float,
                   help="AdamW weight decay (ControlNet's AdamW had torch's default, 0.01)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="adamw8bit needs bitsandbytes")
    g.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up steps")
    g.add_argument("--grad-clip", type=float, help="max gradient norm (0 = off)")
    g.add_argument("--precision", choices=["32", "bf16-mixed", "16-mixed"],
                   help="32 = fp32 (TF32 matmuls on GPU); bf16-mixed = bf16 autocast (fast path on A100/H100); "
                        "16-mixed = fp16 autocast with loss scaling (GPU only)")
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
    g.add_argument("--resume", type=path_arg, default="auto", metavar="auto|never|PATH",
                   help="auto: continue from the newest complete checkpoint in OUT, if any (default); "
                        "never: start fresh (refused if OUT has checkpoints); PATH: this checkpoint")
    g.add_argument("--ckpt-every", type=int, help="steps between resumable checkpoints")
    g.add_argument("--ckpt-keep", type=int, help="how many of the newest checkpoints to keep")
    g.add_argument("--image-every", type=int, help="steps between sample grids (0 = off)")
    g.add_argument("--log-every", type=int, help="steps between logged losses")
    g.add_argument("--val-every", type=int,
                   help="validation loss every N training batches (0 = off); the last movie of --data (by id) "
                        "is then held out of training to validate on, and named at the start")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar: a plain line (step, loss, learning rate, s/step) every --log-every steps "
                        "instead, as where stderr is no terminal (a log); the losses go to OUT/csv and OUT/tb "
                        "either way")
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


# what a run writes in OUT, by kind
RUN_PATHS = {"checkpoints": "folder", "images": "folder", "tb": "folder", "csv": "folder", "replicas.json": "file",
             "config.yaml": "file", "control.safetensors": "file", "control.yaml": "file"}  # all a run writes in OUT


def check_paths(data: Path, init: Path, out: Path) -> None:
    """One line for a path that is missing or of the wrong kind, before the (slow) model load."""
    from cldm.checkpoint import CheckpointError, check_checkpoint_file
    from cldm.resume import read_training_checkpoint

    if not data.is_dir():
        what = not_a_folder(data) if data.exists() else "no such folder"
        raise UsageError(f"--data {data}: {what} (make it with build_pairs.py)")
    if problem := file_problem(init, folder="a folder, not a checkpoint file"):
        hint = "" if problem == NOT_REGULAR else " (make it with tool_add_control_sd21.py)"
        raise UsageError(f"--init {init}: {problem}{hint}")
    try:  # cut short or no checkpoint: said before the "config:" line
        check_checkpoint_file(init)
    except CheckpointError as e:
        raise UsageError(f"--init {e}") from None
    if (training := read_training_checkpoint(init)) is not None:  # else "(all)* does not match", after the config
        raise UsageError(f"--init {init}: a training checkpoint (step {training.get('global_step', '?')}), not a full "
                         "checkpoint; --init is the file tool_add_control_sd21.py writes (a resume too: the run's own "
                         f"--init): to continue from this one, pass it as --resume {init}; for its weights alone "
                         "(colorize_inference.py --control), add --export to that")
    if problem := out_folder_problem("--out", out):
        raise UsageError(problem)
    for name, kind in RUN_PATHS.items():  # else found at the first checkpoint, image or the export: after training
        path = out / name
        if path.exists() and path.is_dir() != (kind == "folder"):
            raise UsageError(f"--out {out}: {path} is {'a folder' if path.is_dir() else not_a_folder(path)}; the "
                             f"run writes a {kind} there: move it away")


def prepare(args, hold: contextlib.ExitStack | None = None):
    """Everything that can fail on bad input, before any training: (cfg, trainer, module, data, resume).
    OUT's run lock (run_dir.run_lock) is entered on `hold`, to be held until the run ends (main's;
    None: not taken, for callers that only build a run)."""
    import lightning as L
    from omegaconf import OmegaConf

    from cldm.launch import check_launcher, is_launch_rank_zero
    from cldm.lightning import ColorControlModule
    from cldm.resume import remove_partial_checkpoints, remove_partial_run_files
    from cldm.run_dir import (check_resume_config, check_run_dir, config_source, record_config, resolve_resume,
                              run_lock)
    from cldm.trainable import check_optimizer
    from cldm.weights_config import check_saved_config

    data, init, out = Path(args.data), Path(args.init), Path(args.out)
    check_paths(data, init, out)  # first: the config may come from --init or OUT
    if hold is not None and is_launch_rank_zero():  # before anything in OUT is read or removed
        hold.enter_context(run_lock(out))
    source = config_source(out, init, args.config, args.resume)
    cfg = run_config(args, source)
    if args.config is None and is_launch_rank_zero():  # say which one it found: the run's first line, before notes
        print(f"config: {source if isinstance(source, Path) else f'the one {init} records'}")
    world = check_launcher(args.devices, args.num_nodes, args.accelerator)
    ckpt_dir = out / "checkpoints"
    if is_launch_rank_zero():
        remove_partial_checkpoints(ckpt_dir)
        remove_partial_run_files(out)
    if args.resume == "auto":
        note_skipped(ckpt_dir)
    resume = resolve_resume(args.resume, ckpt_dir)  # before check_run_dir: --resume never says what it means
    settings = model_settings(args)
    check_run_dir(out, cfg, settings)
    check_resume_config(resume, cfg, settings)  # before OUT/config.yaml is written
    if args.export and resume is None:
        raise UsageError(f"--export: no checkpoint to export in {ckpt_dir}")

    t = cfg.train
    check_optimizer(t.optimizer)  # before the (slow) model load; ColorControlModule checks again
    quiet_lightning()
    L.seed_everything(t.seed, workers=True, verbose=False)
    check_saved_config(init, cfg, source, args.overrides, remedy=saved_config_remedy(args, source),
                       free=("only_mid_control",))  # cheap; an init may be trained either way
    model = build_model(cfg, init)
    module = ColorControlModule(
        model, lr=t.lr, weight_decay=t.weight_decay, optimizer=t.optimizer, warmup_steps=t.warmup_steps,
        sd_locked=cfg.model.sd_locked, train_unet_input=cfg.model.get("train_unet_input", True), seed=t.seed,
        compile=t.compile, config=OmegaConf.to_container(cfg, resolve=True), data=str(data.resolve()),
        fused=not (t.grad_clip > 0 and str(t.precision).endswith("-mixed")))
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
    note_nothing_to_train(resume, t.max_steps)  # last: not before an error that stops the run, export and all
    return cfg, trainer, module, dm, resume


def input_errors() -> tuple[type[BaseException], ...]:
    """What bad input (config, data root, checkpoint) raises while the run is prepared."""
    from annotator.latent_cache import LatentCacheError
    from cldm.checkpoint import CheckpointError

    try:
        from lightning.fabric.utilities.exceptions import MisconfigurationException
    except ImportError:  # no lightning: run_cli says so in one line, before anything runs
        return UsageError, CheckpointError, LatentCacheError, ValueError, OSError
    return UsageError, CheckpointError, LatentCacheError, MisconfigurationException, ValueError, OSError


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    with contextlib.ExitStack() as hold:  # OUT's run lock, from prepare() to the end of the run
        return train(args, hold)


def train(args, hold: contextlib.ExitStack) -> int:
    run = []

    def start(args) -> int:  # everything bad input can break: exit 2 with one line
        run.extend(prepare(args, hold))
        if args.export:
            cfg, _, module, _, resume = run
            path = export_from_checkpoint(module, resume, Path(args.out), cfg, Path(args.init))
            print(f"exported {resume.name} -> {path}")
        return 0

    status = run_cli(PROG, start, args, input_errors(), needs=("opencv", "av", "open_clip", "lightning"))
    if status or args.export:
        return status
    # While training, a resume checkpoint of another setup (on_load_checkpoint) and what fit()
    # turns into a UsageError (out of memory, a data loader process lost, a full disk, a frame
    # gone) are one line; any other error is a bug and keeps its traceback. SIGTERM is
    # Lightning's: it stops the run at the end of a step.
    from cldm.checkpoint import CheckpointError
    from cldm.run_dir import rerun_hint
    return run_cli(PROG, lambda args: fit(args, *run), args, (CheckpointError, UsageError),
                   interrupted=f"interrupted; {rerun_hint(Path(args.out))}", sigterm=False)


if __name__ == "__main__":  # required: DDP re-runs this file in every process it starts
    exit_quietly(main())
